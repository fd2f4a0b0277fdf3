"""Translating an evaluation split with an `SLTModel` and scoring it (BLEU-1..4, ROUGE-L).

    batches = pipeline.eval_pipeline(source, featurizer, batch_size=32)
    pairs = translate(model, params, batches, prompt, tokenizer, decode='beam', beam_size=4)
    scores = evaluate(model, params, batches, prompt, tokenizer, lang='de', output_dir=out)

Each batch is translated by one jitted function (sign encoder, prefill and decoding together), so
it compiles once per batch shape: eval batches all have batch_size rows (the last one is padded
with example_mask False rows, which are dropped from the results) and one of a few frame buckets.

Without a mesh, batches run where the parameters are (the default device for host arrays), and
each process translates only the batches it is given. With `mesh=`, every process must be given
the same batches (the whole split, `eval_pipeline(..., shard=(0, 1))`): each batch is split by
rows over the mesh's data axes (`sharding.shared_batch`; replicated when its size does not
divide), the parameters stay as they are sharded, and the translations come back replicated, so
every process gets every translation and the same scores. Only process 0 writes files.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from rvlf_jax import sharding
from rvlf_jax.data.tokenizers import Tokenizer
from rvlf_jax.eval import decoding, metrics
from rvlf_jax.models.slt import Prompt, SLTModel

DECODERS = ('greedy', 'beam')
# The targets are not model inputs; left in, each text bucket would compile anew.
_TARGET_KEYS = ('text_ids', 'text_mask')
HYPS_FILE, REFS_FILE, IDS_FILE = 'hyps.txt', 'refs.txt', 'ids.txt'


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The arrays of a pipeline batch that translation reads: no strings ('id', 'text') or targets."""
  dtype = lambda v: v.dtype if hasattr(v, 'dtype') else np.asarray(v).dtype
  return {k: v for k, v in batch.items()
          if k not in _TARGET_KEYS and np.dtype(dtype(v)).kind in 'biuf'}


_STATIC = ('model', 'decode', 'beam_size', 'max_new_tokens', 'eos_id', 'pad_id')


def _translate_batch(model: SLTModel, params: Any, inputs: Mapping[str, jax.Array],
                     prompt: Prompt, length_penalty: jax.Array | float = 1.0, *, decode: str,
                     beam_size: int, max_new_tokens: int, eos_id: int,
                     pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Token ids of the translations of one batch (`translate_batch` is it jitted).

  Args:
    model: the translator (static).
    params: its parameters.
    inputs: `model_inputs(batch)`.
    prompt: the instruction around the sign tokens.
    length_penalty: beam search's alpha (`decoding.beam_search`); unused by greedy decoding.
    decode: 'greedy' or 'beam'.
    beam_size: K, for beam search.
    max_new_tokens: N.
    eos_id, pad_id: the tokenizer's.

  Returns:
    (tokens int32[B, N], lengths int32[B]: tokens of each translation, eos included).
  """
  embeds, positions = model.prefill(params, inputs, prompt)
  if decode == 'greedy':
    return decoding.greedy_decode(model.decoder, params['decoder'], embeds, positions,
                                  max_new_tokens=max_new_tokens, eos_id=eos_id)
  tokens, lengths, _ = decoding.beam_search(
      model.decoder, params['decoder'], embeds, positions, beam_size=beam_size,
      max_new_tokens=max_new_tokens, eos_id=eos_id, length_penalty=length_penalty,
      pad_id=pad_id)
  return tokens, lengths


translate_batch = jax.jit(_translate_batch, static_argnames=_STATIC)


@functools.cache
def _sharded_translate_batch(mesh: jax.sharding.Mesh):
  """`translate_batch` whose outputs are replicated over `mesh`: on every process, whole."""
  return jax.jit(_translate_batch, static_argnames=_STATIC,
                 out_shardings=sharding.replicated(mesh))


def _translated_rows(model: SLTModel, params: Any, batches: Iterable[Mapping[str, Any]],
                     prompt: Prompt, tokenizer: Tokenizer, *, decode: str, beam_size: int,
                     max_new_tokens: int, length_penalty: float,
                     mesh: jax.sharding.Mesh | None = None
                     ) -> Iterator[tuple[str, str, Mapping[str, Any], int]]:
  """Yields (id, hypothesis, batch, row) for each real row of each batch, in order."""
  if decode not in DECODERS:
    raise ValueError(f'decode must be one of {DECODERS}, got {decode!r}.')
  if decode == 'beam' and beam_size < 1:
    raise ValueError(f'beam_size must be positive, got {beam_size}.')
  static = dict(decode=decode, beam_size=beam_size if decode == 'beam' else 1,
                max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  def finish(batch, keep, out):
    tokens, lengths = np.asarray(out[0]), np.asarray(out[1])
    for row in np.flatnonzero(keep):
      yield str(batch['id'][row]), tokenizer.decode(tokens[row, :lengths[row]]), batch, row

  # One batch in flight: the next one is dispatched before the previous one is decoded to text,
  # so host-side detokenisation overlaps device work.
  pending = None
  for batch in batches:
    if 'id' not in batch:
      raise KeyError(f"batches need an 'id' field (the pipeline's); got keys {sorted(batch)}.")
    keep = np.asarray(batch.get('example_mask', np.ones(len(batch['id']), bool)), bool)
    if not keep.any():
      continue
    inputs = model_inputs(batch)
    if mesh is None:
      out = translate_batch(model, params, inputs, prompt, length_penalty, **static)
    else:
      rows = sharding.rows_sharding(len(keep), mesh)
      with sharding.mesh_context(mesh):
        out = _sharded_translate_batch(mesh)(
            model, params, sharding.shared_batch(inputs, rows), prompt, length_penalty,
            **static)
    if pending is not None:
      yield from finish(*pending)
    pending = (batch, keep, out)
  if pending is not None:
    yield from finish(*pending)


def translate(model: SLTModel, params: Any, batches: Iterable[Mapping[str, Any]], prompt: Prompt,
              tokenizer: Tokenizer, *, decode: str = 'greedy', beam_size: int = 4,
              max_new_tokens: int = 64, length_penalty: float = 1.0,
              mesh: jax.sharding.Mesh | None = None) -> list[tuple[str, str]]:
  """Translates every real example of a stream of pipeline batches.

  Args:
    model: the translator.
    params: its parameters.
    batches: pipeline batches ('id', 'example_mask' and the sign encoder's inputs), e.g. an
      `eval_pipeline`.
    prompt: the instruction around the sign tokens.
    tokenizer: turns the generated ids into text (stopping at eos, dropping pad).
    decode: 'greedy' (`decoding.greedy_decode`) or 'beam' (`decoding.beam_search`).
    beam_size: K, for beam search.
    max_new_tokens: N, the longest translation in tokens (eos included).
    length_penalty: beam search's alpha: scores are log p / length**alpha (HF's convention).
    mesh: translate each batch split over this mesh's data axes; every process must then be
      given the same batches, and gets every translation (see the module docstring).

  Returns:
    [(id, hypothesis)] in batch order, without the rows whose example_mask is False.
  """
  return [(example_id, hyp) for example_id, hyp, _, _ in _translated_rows(
      model, params, batches, prompt, tokenizer, decode=decode, beam_size=beam_size,
      max_new_tokens=max_new_tokens, length_penalty=length_penalty, mesh=mesh)]


def evaluate(model: SLTModel, params: Any, batches: Iterable[Mapping[str, Any]], prompt: Prompt,
             tokenizer: Tokenizer, *, lang: str, refs_by_id: Mapping[str, str] | None = None,
             decode: str = 'greedy', beam_size: int = 4, max_new_tokens: int = 64,
             length_penalty: float = 1.0, output_dir: str | None = None,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Translates the batches and scores the translations against their references.

  Args:
    model, params, batches, prompt, tokenizer, decode, beam_size, max_new_tokens,
      length_penalty, mesh: as for `translate`.
    lang: 'en', 'de' or 'zh', the tokenisation of the metrics (`metrics.score_corpus`).
    refs_by_id: the reference translation of each example id; None takes them from the batches'
      'text' field (the untokenised sentences the pipeline carries).
    output_dir: if given, writes there hyps.txt, refs.txt and ids.txt, line i of each for the same
      example (line breaks inside a sentence become spaces, which changes no score), so that
      `python -m launch.evaluate --hyps=... --refs=...` gives the same scores. Process 0 only.

  Returns:
    {'bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l'}, percentages.
  """
  ids, hyps, refs = [], [], []
  for example_id, hyp, batch, row in _translated_rows(
      model, params, batches, prompt, tokenizer, decode=decode, beam_size=beam_size,
      max_new_tokens=max_new_tokens, length_penalty=length_penalty, mesh=mesh):
    if refs_by_id is not None:
      if example_id not in refs_by_id:
        raise KeyError(f'no reference for example {example_id!r} ({len(refs_by_id)} references '
                       'given).')
      ref = refs_by_id[example_id]
    elif 'text' in batch:
      ref = str(batch['text'][row])
    else:
      raise KeyError("the batches carry no 'text' field: pass refs_by_id.")
    ids.append(example_id)
    hyps.append(hyp)
    refs.append(ref)
  if not ids:
    raise ValueError('the batches hold no example to evaluate (every example_mask is False).')
  scores = metrics.score_corpus(hyps, refs, lang)
  if output_dir is not None and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    for name, lines in ((HYPS_FILE, hyps), (REFS_FILE, refs), (IDS_FILE, ids)):
      _write_lines(os.path.join(output_dir, name), lines)
  return scores


def _write_lines(path: str, lines: list[str]) -> None:
  """One sentence per line, UTF-8; embedded line breaks become spaces so lines stay paired."""
  text = ''.join(line.replace('\r', ' ').replace('\n', ' ') + '\n' for line in lines)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
