"""Text-only pretraining of the small decoder the recipe starts from, saved as an HF model.

There are no pretrained weights on the development machine, so the default recipe makes its own
"pretrained LLM", the way a real run would get one: a short causal-LM training of a small
`DecoderConfig` decoder on the spoken-language sentences of the training split, exported with
`rvlf_jax.hf.api.save_hf` next to its tokenizer, then read back through `load_hf` like any
downloaded checkpoint. The later stages therefore exercise the same HF import path as with a
real Llama or Gemma folder.

  params, stats = pretrain(config, tokenizer, texts, LMConfig())        # in memory
  folder = pretrain_to_hf(config, tokenizer, texts, LMConfig(), out)    # trained once, reused
  config, params = load_pretrained(folder)

Each training sequence is [bos] text [eos] [pad ...], max_len tokens long; the model reads its
first max_len - 1 tokens and is scored on predicting the next one at every real (non-pad)
position. A text too long to fit is cut at max_len tokens, so it loses its eos: the model should
not learn to stop where a sentence does not end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rvlf_jax.data.tokenizers import SentencePieceTokenizer, Tokenizer
from rvlf_jax.hf import io as hf_io
from rvlf_jax.hf.api import load_hf, save_hf
from rvlf_jax.hf.convert import ConversionError
from rvlf_jax.models.decoder import Decoder, DecoderConfig
from rvlf_jax.train import optimizers
from rvlf_jax.train import state as train_state

# Shape vocabulary: B sequences in a batch, S = max_len tokens per sequence, T = S - 1 positions
# the model reads, V vocabulary, N texts in the corpus.

STATS_FILE = 'lm_pretraining.json'

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Settings of the text-only pretraining.

  Attributes:
    steps: optimizer updates.
    batch_size: B sequences per update.
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warmup from 0, then cosine decay to a tenth of the peak at `steps`.
    max_len: S tokens per sequence, bos and eos included; longer texts are cut.
    seed: parameter initialisation and batch sampling.
    log_every: a progress line every this many steps (and after the first and the last).
  """

  steps: int = 300
  batch_size: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  max_len: int = 32
  seed: int = 0
  log_every: int = 50

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
      raise ValueError(f'LMConfig: steps, batch_size and log_every must be positive: {self}.')
    if self.max_len < 2:
      raise ValueError(f'LMConfig: max_len must be at least 2 (bos and one token), got '
                       f'{self.max_len}.')
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      raise ValueError(f'LMConfig: learning_rate must be positive and warmup_steps not negative: '
                       f'{self}.')


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The tokenized training sentences.

  Attributes:
    tokens: int32[N, S] [bos] ids [eos] right-padded with the tokenizer's pad id.
    mask: bool[N, S] True on real tokens.
    truncated: how many texts were cut to S tokens.
  """

  tokens: np.ndarray
  mask: np.ndarray
  truncated: int


def _texts(texts: Sequence[str]) -> list[str]:
  """The non-blank texts, with a clear error when there are none."""
  if isinstance(texts, (str, bytes)):
    raise TypeError('texts must be a sequence of sentences, not one string.')
  kept = []
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f'texts[{i}] is {type(text).__name__}, not str.')
    if text.strip():
      kept.append(text)
  if not kept:
    raise ValueError('cannot pretrain a language model on an empty corpus: none of the '
                     f'{len(texts)} texts has any non-blank character.')
  return kept


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> Corpus:
  """[bos] ids [eos] of every non-blank text, cut to max_len tokens and right-padded.

  Args:
    tokenizer: its bos (if it has one) starts every sequence, its eos ends it.
    texts: the sentences; blank ones are skipped.
    max_len: S.

  Returns:
    The `Corpus`.

  Raises:
    ValueError: no text is left, or one encodes to no tokens at all.
  """
  texts = _texts(texts)
  prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  tokens = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  truncated = 0
  for n, text in enumerate(texts):
    ids = tokenizer.encode(text)
    if not ids:
      raise ValueError(f'text {n} encodes to no tokens: {text[:80]!r}')
    seq = prefix + ids + [tokenizer.eos_id]
    if len(seq) > max_len:
      truncated += 1
      seq = seq[:max_len]
    tokens[n, :len(seq)] = seq
    mask[n, :len(seq)] = True
  return Corpus(tokens, mask, truncated)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Row indices int[B] of successive batches: shuffled epochs, chained across epoch ends.

  Every text is seen once per epoch; a corpus smaller than a batch simply repeats within it.
  """
  order = np.zeros((0,), np.int64)
  while True:
    while len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    yield order[:batch_size]
    order = order[batch_size:]


# ----------------------------------------------------------------------------- training


def next_token_loss(model: Decoder, params: Any, tokens_bs: jax.Array, mask_bs: jax.Array
                    ) -> jax.Array:
  """Mean cross-entropy of predicting tokens 1..S-1 from the ones before, on real tokens only.

  Args:
    model: the decoder.
    params: its parameters.
    tokens_bs: int32[B, S] right-padded sequences.
    mask_bs: bool[B, S] True on real tokens.

  Returns:
    float32[] loss averaged over the real target tokens of the batch.
  """
  # Right padding and the causal mask keep real tokens from ever attending to padding, so the
  # default positions 0..T-1 are the right ones.
  logits_btv = model.apply({'params': params}, tokens_bs[:, :-1]).logits
  losses_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bs[:, 1:])
  weights_bt = mask_bs[:, 1:].astype(jnp.float32)
  return jnp.sum(losses_bt * weights_bt) / jnp.maximum(jnp.sum(weights_bt), 1.0)


def make_step(model: Decoder, tx: optax.GradientTransformation) -> Callable:
  """The pure training step `step(state, tokens_bs, mask_bs) -> (state, loss)`."""

  def step(state: train_state.TrainState, tokens_bs: jax.Array, mask_bs: jax.Array):
    loss, grads = jax.value_and_grad(
        lambda p: next_token_loss(model, p, tokens_bs, mask_bs))(state.params)
    return train_state.apply_gradients(state, grads, tx), loss

  return step


def optimizer(lm: LMConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay over `lm.steps`, gradients clipped at norm 1."""
  return optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=lm.learning_rate, warmup_steps=lm.warmup_steps, total_steps=lm.steps,
      schedule='cosine'))


def _check_compatible(config: DecoderConfig, tokenizer: Tokenizer, lm: LMConfig) -> None:
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but the decoder only '
                     f'{config.vocab_size} embeddings; raise DecoderConfig.vocab_size.')
  if lm.max_len - 1 > config.max_position_embeddings:
    raise ValueError(f'LMConfig.max_len {lm.max_len} exceeds the decoder\'s '
                     f'max_position_embeddings {config.max_position_embeddings}.')
  # Ids the exported config records must be the tokenizer's, or HF generation stops at the
  # wrong token; unset (None) is fine.
  for name, ours in (('bos', tokenizer.bos_id), ('eos', tokenizer.eos_id),
                     ('pad', tokenizer.pad_id)):
    theirs = getattr(config, f'{name}_token_id')
    if theirs is not None and ours not in (theirs if isinstance(theirs, tuple) else (theirs,)):
      raise ValueError(f'DecoderConfig.{name}_token_id is {theirs} but the tokenizer\'s {name} id '
                       f'is {ours}.')


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  minutes, seconds = divmod(seconds, 60)
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


def pretrain(config: DecoderConfig, tokenizer: Tokenizer, texts: Sequence[str], lm: LMConfig, *,
             log: Log = print) -> tuple[Any, dict[str, Any]]:
  """Trains a decoder from random initialisation as a causal LM on `texts`.

  Args:
    config: the decoder architecture; its vocabulary must cover the tokenizer's.
    tokenizer: encodes the texts; supplies bos, eos and pad.
    texts: the training sentences (blank ones are skipped).
    lm: the training settings.
    log: receives the progress lines.

  Returns:
    (params, stats): the trained parameters (unboxed, as `Decoder(config).apply` takes them) and
    {'loss_first': loss of the first batch (at initialisation), 'loss_last': loss of the last
    batch, 'seconds': wall time including compilation, 'compile_seconds': time until the first
    step had run (tokenising, compiling), 'steps_per_second': speed of the steps after it,
    'steps', 'texts', 'tokens': real tokens in the corpus, 'truncated': texts cut to max_len}.

  Raises:
    ValueError: an empty corpus, or a tokenizer that does not fit the decoder.
  """
  start = time.perf_counter()
  _check_compatible(config, tokenizer, lm)
  corpus = tokenize(tokenizer, texts, lm.max_len)
  num_texts, num_tokens = len(corpus.tokens), int(corpus.mask.sum())
  log(f'lm pretraining: {num_texts} texts, {num_tokens} tokens ({corpus.truncated} cut to '
      f'{lm.max_len}); {config.family} decoder with {config.num_params():,} parameters; '
      f'{lm.steps} steps of {lm.batch_size} sequences')

  model = Decoder(config)
  tx = optimizer(lm)

  def init(key: jax.Array) -> train_state.TrainState:
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))['params']
    return train_state.create(nn.meta.unbox(params), tx)

  # One compile for init + optimizer state instead of one per small op.
  state = jax.jit(init)(jax.random.key(lm.seed))
  step = jax.jit(make_step(model, tx), donate_argnums=0)
  batches = _batches(num_texts, lm.batch_size, np.random.default_rng(lm.seed))

  # The first step compiles; it is timed apart, and the speed and ETA count the steps after it.
  rows = next(batches)
  state, loss = step(state, corpus.tokens[rows], corpus.mask[rows])
  loss_first = loss_last = float(loss)  # Waits for the step.
  compile_seconds = time.perf_counter() - start
  timed_from = time.perf_counter()
  log(f'lm step 1/{lm.steps}: loss {loss_first:.4f}, compiled and ran in '
      f'{_duration(compile_seconds)}, eta ?')
  losses = []  # Device scalars, fetched only when logging so that steps stay asynchronous.
  for i in range(2, lm.steps + 1):
    rows = next(batches)
    state, loss = step(state, corpus.tokens[rows], corpus.mask[rows])
    losses.append(loss)
    if i % lm.log_every == 0 or i == lm.steps:
      window = np.asarray(jax.device_get(losses))
      losses = []
      loss_last = float(window[-1])
      rate = (i - 1) / max(time.perf_counter() - timed_from, 1e-9)
      log(f'lm step {i}/{lm.steps}: loss {window.mean():.4f} (last batch {loss_last:.4f}), '
          f'{rate:.2f} steps/s, eta {_duration((lm.steps - i) / rate)}')
  if not math.isfinite(loss_last):
    raise FloatingPointError(f'lm pretraining diverged: loss {loss_last} at step {lm.steps}; '
                             'lower LMConfig.learning_rate.')
  params = jax.block_until_ready(state.params)
  seconds = time.perf_counter() - start
  timed = time.perf_counter() - timed_from
  stats = {
      'loss_first': loss_first, 'loss_last': loss_last, 'seconds': seconds,
      'compile_seconds': compile_seconds,
      'steps_per_second': (lm.steps - 1) / timed if lm.steps > 1 else None,
      'steps': lm.steps, 'texts': num_texts, 'tokens': num_tokens,
      'truncated': corpus.truncated,
  }
  log(f'lm pretraining done in {_duration(seconds)}: loss {loss_first:.4f} -> {loss_last:.4f}')
  return params, stats


# ----------------------------------------------------------------------------- HF folders


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _inputs(config: DecoderConfig, tokenizer: SentencePieceTokenizer, texts: Sequence[str],
            lm: LMConfig) -> dict[str, Any]:
  """Everything the trained weights depend on, as JSON, to tell a reusable folder from a stale one.

  log_every changes only the log; architecture fields HF configs do not record (scan_layers,
  remat, compute dtype) do not change the weights either.
  """
  corpus = json.dumps(_texts(texts), ensure_ascii=False).encode()
  return json.loads(json.dumps({
      'decoder': config.to_hf_config(),
      'lm': {k: v for k, v in dataclasses.asdict(lm).items() if k != 'log_every'},
      'tokenizer_sha256': _sha256(tokenizer.model_proto),
      'corpus_sha256': _sha256(corpus),
  }))


def _has_weights(path: str) -> bool:
  return any(f.endswith('.safetensors') for f in os.listdir(path))


def _stale_reason(out_dir: str, inputs: dict[str, Any]) -> str | None:
  """Why `out_dir` cannot be reused (None: it can).

  Raises:
    FileExistsError: `out_dir` is a non-empty folder that pretrain_to_hf did not write, which it
      will neither reuse nor replace.
  """
  if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
    return 'missing'
  stats_path = os.path.join(out_dir, STATS_FILE)
  if not os.path.isdir(out_dir) or not os.path.exists(stats_path):
    raise FileExistsError(f'{out_dir}: exists but was not written by pretrain_to_hf (no '
                          f'{STATS_FILE}); remove it or choose another folder.')
  try:
    recorded = hf_io.read_json(stats_path, 'pretrain_to_hf').get('inputs', {})
    saved_config = hf_io.read_config(out_dir)
  except ConversionError as e:
    return f'unreadable ({e})'
  if not _has_weights(out_dir):
    return 'no safetensors weights'
  if not os.path.exists(os.path.join(out_dir, 'tokenizer.json')):
    return 'no tokenizer.json'
  if saved_config != inputs['decoder']:
    return 'its config.json differs from the decoder config'
  differ = sorted(k for k in inputs if recorded.get(k) != inputs[k])
  if differ:
    return f'trained with other {", ".join(differ)}'
  return None


def pretrain_to_hf(config: DecoderConfig, tokenizer: SentencePieceTokenizer,
                   texts: Sequence[str], lm: LMConfig, out_dir: str | os.PathLike, *,
                   log: Log = print) -> str:
  """Pretrains the decoder and saves it with its tokenizer as an HF folder, or reuses one.

  The folder holds config.json, the safetensors weights, the tokenizer files transformers reads
  (`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out_dir)` both work) and
  lm_pretraining.json (the stats of `pretrain` and the inputs they came from). It appears only
  once complete (one atomic rename), so an interrupted run leaves either nothing or a finished
  folder. A finished folder trained from the same decoder config, tokenizer, texts and settings
  is reused as it is; one from other inputs is retrained and replaced.

  Args:
    config: the decoder architecture (see `pretrain`).
    tokenizer: the sentencepiece tokenizer of the texts, saved into the folder.
    texts: the training sentences.
    lm: the training settings.
    out_dir: the folder to write.
    log: receives the progress lines.

  Returns:
    out_dir, for `load_pretrained`.

  Raises:
    FileExistsError: out_dir is a non-empty folder this function did not write.
    ValueError: see `pretrain`.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  texts = list(texts)
  _check_compatible(config, tokenizer, lm)
  inputs = _inputs(config, tokenizer, texts, lm)
  reason = _stale_reason(out_dir, inputs)
  if reason is None:
    stats = hf_io.read_json(os.path.join(out_dir, STATS_FILE), 'pretrain_to_hf')
    log(f'{out_dir}: reused the pretrained decoder (loss {stats.get("loss_first", math.nan):.4f} '
        f'-> {stats.get("loss_last", math.nan):.4f} in {stats.get("steps")} steps); not training.')
    return out_dir
  if reason != 'missing':
    log(f'{out_dir}: {reason}; pretraining again and replacing it.')
  params, stats = pretrain(config, tokenizer, texts, lm, log=log)

  def write(tmp: str) -> None:
    save_hf(config, params, tmp)
    tokenizer.save_as_hf(tmp)
    with open(os.path.join(tmp, STATS_FILE), 'w') as f:
      json.dump({**stats, 'inputs': inputs}, f, indent=2, sort_keys=True)

  # save_hf is atomic on its own; the outer write makes model, tokenizer and stats appear
  # together, so a folder with a stats file is always complete.
  hf_io.write_atomically(out_dir, write, overwrite=True)
  log(f'{out_dir}: saved the pretrained decoder and its tokenizer.')
  return out_dir


def load_pretrained(path: str | os.PathLike, **overrides) -> tuple[DecoderConfig, Any]:
  """Reads a decoder folder written by `pretrain_to_hf` (or any HF decoder) through `load_hf`.

  Args:
    path: the HF folder.
    **overrides: DecoderConfig fields to set (e.g. scan_layers=False), as `load_hf` takes them.

  Returns:
    (config, params) with numpy parameters.

  Raises:
    FileNotFoundError: no folder at path.
    ConversionError: the folder is not a readable HF decoder.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no pretrained decoder here (expected the HF folder that '
                            'pretrain_to_hf writes).')
  config, params = load_hf(path, **overrides)
  if not isinstance(config, DecoderConfig):
    raise ConversionError(f'{path}: holds a {type(config).__name__} model, not a decoder.')
  return config, params
