"""SLT prefix sharing: the sampling half of one GRPO step on SynthSign, with the shared-prefix
sampler vs repeating each clip G times (issue item 4).

    python -m benchmarks.bench_prefix [--quick]

A GRPO step (`train.grpo.GRPOTrainer`) first encodes B clips and the instruction into prefix
embeddings (sign encoder + projector + prompt embeddings), then draws G translations per clip:
- shared (ours, what GRPOTrainer runs): the sign encoder sees the B clips once, each prefix is
  prefilled once, and the G samples are vmapped over the shared prefix cache
  (`rl.sampler.sample_group(group_size=G)`);
- repeated: every clip repeated G times, i.e. a batch of B x G through the sign encoder and the
  prefill, each row sampled alone (`sample_group(group_size=1)`): what a sampler without prefix
  sharing does (e.g. HF `generate(num_return_sequences=G)` on the prefix embeddings).
The time of each path is split into the sign encoder (prefix embeddings), the prefill and the
decode loop (the sampler's time less the prefill's).

The model has the sizes of `configs/synthsign.py` (default, or its tiny variant) and random
weights: this measures speed only. The clips are the first B of SynthSign's train split,
generated on demand (the tiny size is a prefix of the default one), featurized as the recipe does;
their visual features are random at the recipe's width (the recipe's are those of a frozen random
DINOv2; their values do not change the cost). The eos id is outside the vocabulary, so both
paths decode all max_new_tokens steps.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from benchmarks import common
from rvlf_jax.data import pipeline, tokenizers
from rvlf_jax.data.synthsign import SynthSign
from rvlf_jax.eval import decoding
from rvlf_jax.models import decoder as dec
from rvlf_jax.models import slt
from rvlf_jax.recipe import build
from rvlf_jax.recipe import data as recipe_data
from rvlf_jax.rl import sampler
from rvlf_jax.train import grpo


@dataclasses.dataclass
class Setup:
  """One GRPO sampling step's model and inputs.

  Attributes:
    model: the SLT model (GRPO's: LoRA adapters on the decoder); params: its random weights.
    prompt: the instruction ids around the sign tokens.
    batch: the device batch of B clips (keypoints, visual, frame_mask, ...).
    sampling: the GRPO sampler's settings; group_size: G.
    eos_id, pad_id: the sampler's (eos outside the vocabulary: no sample stops early).
    variant: the configs/synthsign.py argument it was built from.
  """

  model: slt.SLTModel
  params: Any
  prompt: slt.Prompt
  batch: dict[str, np.ndarray]
  sampling: sampler.SamplingConfig
  group_size: int
  eos_id: int
  pad_id: int
  variant: str | None = None


def make_setup(variant: str | None = None, batch_size: int | None = None, seed: int = 0,
               **grpo_overrides) -> Setup:
  """The model and B clips of `configs/synthsign.py:<variant>` (batch_size: its grpo.batch_size
  by default; grpo_overrides: fields of its grpo section, e.g. group_size)."""
  from configs import synthsign as synthsign_config  # pylint: disable=g-import-not-at-top
  config = synthsign_config.get_config(variant)
  config.grpo.update(grpo_overrides)
  b = batch_size or int(config.grpo.batch_size)
  ds = SynthSign(config.data.size, seed=0)
  # The recipe's tokenizer: trained on the train split's references (recipe.data).
  tokenizer = tokenizers.SentencePieceTokenizer.train(ds.sentences('train'),
                                                      int(config.tokenizer.vocab_size))
  featurize = recipe_data.featurizer(config, tokenizer)
  width = build.visual_dim(config)
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(b):
    example = featurize(ds.example('train', i, frames=False))
    if pipeline.SKIPPED in example:
      raise RuntimeError(f'SynthSign train clip {i} was skipped: {example[pipeline.SKIPPED]}')
    frames = example['keypoints'].shape[0]
    example['visual'] = rng.normal(size=(frames, width)).astype(np.float32)
    examples.append(example)
  batch = pipeline.device_batch(pipeline.collate(examples, featurize.buckets, tokenizer.pad_id))
  vocab = tokenizer.vocab_size
  model = slt.SLTModel(build.slt_config(config, build.decoder_config(config, vocab), width,
                                        build.grpo_lora(config)))
  params = random_params(model.abstract_params(), seed)
  ids = tokenizers.PromptTemplate(instruction=str(config.prompt.instruction)).prompt(
      tokenizer, str(config.data.language))
  prompt = slt.Prompt(np.asarray(ids.before, np.int32), np.asarray(ids.after, np.int32))
  g = build.grpo_config(config)
  return Setup(model, params, prompt, batch, g.sampling, g.group_size, eos_id=vocab,
               pad_id=tokenizer.pad_id, variant=variant)


def random_params(abstract: Any, seed: int = 0) -> Any:
  """Random weights of the given shapes, drawn in numpy: kernels and embeddings N(0, 0.02),
  norm scales 1, biases and LoRA B 0 (as at initialisation). The SLT model's jitted init
  compiles for tens of seconds on 2 cores; this takes none, and the speed is the same."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if 'scale' in name:
      return np.ones(x.shape, x.dtype)
    if 'bias' in name or name == 'lora_b':
      return np.zeros(x.shape, x.dtype)
    return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.device_put(jax.tree_util.tree_map_with_path(leaf, abstract))


def repeat_batch(batch: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
  """Each row `times` times in a row (row b * times + g is copy g of row b)."""
  return {k: np.repeat(v, times, axis=0) for k, v in batch.items()}


class Path:
  """One way of running the sampling step: `group_size` samples per row of `batch`."""

  def __init__(self, setup: Setup, batch: dict[str, np.ndarray], group_size: int):
    s = setup
    self.setup, self.group_size = s, group_size
    self.batch = jax.device_put(batch)
    prefix = grpo.make_prefix(s.model, s.prompt)

    def encode(params, batch):
      embeds, valid = prefix(params, batch)
      return embeds, dec.positions_from_mask(valid)

    decoder = s.model.decoder
    self._encode = jax.jit(encode)
    self._prefill = jax.jit(lambda params, e, p: decoding.prefill(decoder, params, e, p))
    self._sample = lambda params, e, p, rng: sampler.sample_group(
        decoder, params, e, p, rng, group_size=group_size, config=s.sampling, eos_id=s.eos_id,
        pad_id=s.pad_id)
    self.embeds, self.positions = jax.block_until_ready(self.encode())

  def encode(self):
    return self._encode(self.setup.params, self.batch)

  def prefill(self):
    return self._prefill(self.setup.params['decoder'], self.embeds, self.positions)

  def sample(self, rng: jax.Array):
    return self._sample(self.setup.params['decoder'], self.embeds, self.positions, rng)

  def step(self, rng: jax.Array):
    """The whole sampling step, as GRPOTrainer runs it: encode, then sample."""
    embeds, positions = self._encode(self.setup.params, self.batch)
    return self._sample(self.setup.params['decoder'], embeds, positions, rng)

  def samples(self, rng: jax.Array) -> dict[str, np.ndarray]:
    """The step's samples as [B, G, N] (B the clips, G the samples of each)."""
    out = jax.device_get(self.step(rng))
    g = self.setup.group_size
    return {k: v.reshape((-1, g) + v.shape[2:]) for k, v in out.items()}

  def time(self, rng: jax.Array, reps: int) -> dict[str, common.Timing]:
    block = jax.block_until_ready
    return {
        'sign encoder': common.time_fn(lambda: block(self.encode()), reps=reps),
        'prefill': common.time_fn(lambda: block(self.prefill()), reps=reps),
        'sampler': common.time_fn(lambda: block(self.sample(rng)), reps=reps),
        'step': common.time_fn(lambda: block(self.step(rng)), reps=reps),
    }


def shared_and_repeated(setup: Setup) -> tuple[Path, Path]:
  return (Path(setup, setup.batch, setup.group_size),
          Path(setup, repeat_batch(setup.batch, setup.group_size), 1))


def run(env: common.Env, quick: bool, *, variant: str | None = None, reps: int = 5,
        setup: Setup | None = None) -> common.Section:
  """Both paths on the default SynthSign model sizes (`variant`: a configs/synthsign.py
  argument, e.g. 'tiny'; or on a given `setup`)."""
  del env, quick  # the default sizes run in well under a minute
  setup = setup or make_setup(variant)
  variant = setup.variant
  shared, repeated = shared_and_repeated(setup)
  rng = jax.random.key(0)
  rows = []
  times = {}
  for name, path in (('shared prefix (ours)', shared), ('repeated G times', repeated)):
    out = path.samples(rng)
    if not np.all(out['lengths'] == setup.sampling.max_new_tokens):
      raise AssertionError(f'{name}: sample lengths {np.unique(out["lengths"])}.')
    t = path.time(rng, reps)
    times[name] = t
    decode = t['sampler'].median - t['prefill'].median
    rows.append([name, path.batch['keypoints'].shape[0], path.group_size,
                 1e3 * t['sign encoder'].median, 1e3 * t['prefill'].median, 1e3 * decode,
                 1e3 * t['step'].median, f'{1e3 * t["step"].min:.4g}-{1e3 * t["step"].max:.4g}'])
  t_shared, t_rep = times['shared prefix (ours)'], times['repeated G times']
  ratio = t_rep['step'].median / t_shared['step'].median
  b, p, _ = shared.embeds.shape
  sign = setup.model.config.sign
  frames = setup.batch['keypoints'].shape[1]
  dcfg = setup.model.config.decoder
  md = [
      f'One GRPO sampling step: B={b} SynthSign clips ({frames} frames padded, '
      f'{sign.num_tokens(frames)} sign tokens), prefix of P={p} embeddings (instruction + sign '
      f'tokens), G={setup.group_size} samples of {setup.sampling.max_new_tokens} tokens, '
      f'temperature {setup.sampling.temperature:g}. Model: configs/synthsign.py'
      f'{":" + variant if variant else ""} sizes, random weights (decoder '
      f'{dcfg.num_layers} layers x {dcfg.hidden_size}, vocabulary {dcfg.vocab_size}; sign '
      f'encoder width {sign.d_model}), float32. Milliseconds, medians of {reps}.',
      '',
      common.table(['path', 'encoder rows', 'group', 'sign encoder ms', 'prefill ms',
                    'decode loop ms', 'step ms (encode + sample)', 'step min-max'], rows),
      '',
      f'Prefix sharing: **{ratio:.2f}x** faster than repeating each clip G times '
      f'(sign encoder {t_rep["sign encoder"].median / t_shared["sign encoder"].median:.1f}x, '
      f'prefill {t_rep["prefill"].median / t_shared["prefill"].median:.1f}x, decode loop '
      f'{(t_rep["sampler"].median - t_rep["prefill"].median) / (t_shared["sampler"].median - t_shared["prefill"].median):.2f}x).',
  ]
  figures = {'prefix_sharing_speedup': ratio, 'prefix_shared_step_s': t_shared['step'].median,
             'prefix_repeated_step_s': t_rep['step'].median}
  return common.Section('SLT prefix sharing (SynthSign GRPO sampling)', '\n'.join(md), figures)


def main(argv: list[str]) -> None:
  env = common.measure_env()
  print(run(env, quick='--quick' in argv).markdown)


if __name__ == '__main__':
  main(sys.argv[1:])
