"""Sampling on model M: our compiled group sampler vs HF `generate`, and batch-1 greedy decoding
against the memory-bandwidth roofline (issue item 2).

    python -m benchmarks.bench_sampling [--quick]

a. B = 8 prompts of P = 32 random tokens, G = 8 samples each, temperature 1 over the full
   vocabulary, exactly N = 64 new tokens per sample. Ours: `rl.sampler.sample_group` (each prompt
   prefilled once, the G samples vmapped over the shared prefix), with an eos id outside the
   vocabulary so that no sample stops early. HF: `generate(do_sample=True, top_k=0, top_p=1,
   num_return_sequences=G, min_new_tokens=N, max_new_tokens=N)` (its prompts repeated G times).
   Both sides are checked to have produced N tokens for every sample.
b. Batch 1, greedy, the same prompt length: the decode cost per token is
   (T(N new tokens) - T(1 new token)) / (N - 1), so the prefill is not counted. The roofline
   reads, per token, every weight once (the input embedding table only for its one row) and the
   KV cache up to that position: bytes / measured bandwidth (`roofline_bytes`).

Both sides load the same `save_pretrained` folder in float32; their logits on the prompts are
compared to show it. Where our time goes is read from a `jax.profiler` trace of one call of each
program, its events (the compiled HLO instructions) grouped by kind (`profile_breakdown`).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from rvlf_jax.eval import decoding
from rvlf_jax.hf import api as hf_api
from rvlf_jax.models import decoder as dec
from rvlf_jax.rl import sampler

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 8, 32, 64
SAMPLING_GOAL, ROOFLINE_GOAL = 3.0, 0.60
FLOAT_BYTES = 4  # float32 weights and KV cache on both sides


# -- The roofline ----------------------------------------------------------------------------------


def weight_bytes(hf_config: dict[str, Any], dtype_bytes: int = FLOAT_BYTES) -> int:
  """Weight bytes one decode step reads: every parameter once, of the input embedding table only
  the looked-up row (with untied embeddings; tied ones are read whole as the output matrix)."""
  if hf_config.get('tie_word_embeddings', False):
    # The output projection is the embedding matrix itself: it is read whole there.
    return (common.non_embedding_params(hf_config)) * dtype_bytes
  return (common.non_embedding_params(hf_config) + hf_config['hidden_size']) * dtype_bytes


def kv_bytes(hf_config: dict[str, Any], position: int, dtype_bytes: int = FLOAT_BYTES) -> int:
  """KV-cache bytes the step of the token at `position` reads: keys and values of positions
  0..position (its own included) in every layer."""
  heads = hf_config['num_attention_heads']
  kv_heads = hf_config.get('num_key_value_heads') or heads
  head_dim = hf_config.get('head_dim') or hf_config['hidden_size'] // heads
  return 2 * hf_config['num_hidden_layers'] * (position + 1) * kv_heads * head_dim * dtype_bytes


def roofline_bytes(hf_config: dict[str, Any], prompt_len: int, new_tokens: int,
                   dtype_bytes: int = FLOAT_BYTES) -> float:
  """Mean bytes per decoded token over the decode steps at positions prompt_len ..
  prompt_len + new_tokens - 2 (the steps that (T(N) - T(1)) / (N - 1) measures)."""
  positions = range(prompt_len, prompt_len + new_tokens - 1)
  return weight_bytes(hf_config, dtype_bytes) + float(
      np.mean([kv_bytes(hf_config, p, dtype_bytes) for p in positions]))


# -- The two sides ---------------------------------------------------------------------------------


def load_ours(path: str) -> tuple[dec.Decoder, Any]:
  config, params = hf_api.load_hf(path)
  return dec.Decoder(config), jax.device_put(params)


def load_hf_model(path: str):
  import torch
  import transformers
  model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def prompt_tokens(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
  """int32[batch, length] random ids (0-2 left out: bos/eos/pad of a Llama config)."""
  return np.random.default_rng(seed).integers(3, vocab_size, (batch, length), dtype=np.int32)


@functools.partial(jax.jit, static_argnames=('model', 'group_size', 'new_tokens'))
def our_sample(model: dec.Decoder, params, tokens_bp: jax.Array, rng: jax.Array, *,
               group_size: int, new_tokens: int) -> dict[str, jax.Array]:
  """G samples of N tokens per prompt: temperature 1, full vocabulary, no early stop (the eos id
  is outside the vocabulary, so it is never drawn)."""
  embeds = model.apply({'params': params}, tokens_bp, method=dec.Decoder.embed)
  positions = jnp.broadcast_to(jnp.arange(tokens_bp.shape[1], dtype=jnp.int32), tokens_bp.shape)
  config = sampler.SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
  return sampler.sample_group(model, params, embeds, positions, rng, group_size=group_size,
                              config=config, eos_id=model.config.vocab_size)


@functools.partial(jax.jit, static_argnames=('model', 'new_tokens'))
def our_greedy(model: dec.Decoder, params, tokens_bp: jax.Array, *, new_tokens: int) -> jax.Array:
  """Greedy continuation int32[B, N] (no eos: exactly N tokens)."""
  embeds = model.apply({'params': params}, tokens_bp, method=dec.Decoder.embed)
  positions = jnp.broadcast_to(jnp.arange(tokens_bp.shape[1], dtype=jnp.int32), tokens_bp.shape)
  return decoding.greedy_decode(model, params, embeds, positions, max_new_tokens=new_tokens)[0]


def hf_sample(model, tokens_bp: np.ndarray, *, group_size: int, new_tokens: int):
  """HF sampling with the same settings: int64[B * G, P + N] (sample g of prompt b at row
  b * G + g)."""
  import torch
  ids = torch.from_numpy(tokens_bp.astype(np.int64))
  with torch.inference_mode():
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=group_size,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=0)


def hf_greedy(model, tokens_bp: np.ndarray, *, new_tokens: int):
  """HF greedy continuation int64[B, P + N] (eos blocked until N tokens)."""
  import torch
  ids = torch.from_numpy(tokens_bp.astype(np.int64))
  with torch.inference_mode():
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)


def check_sampled(ours: dict[str, np.ndarray], hf_out, *, batch: int, group_size: int,
                  prompt_len: int, new_tokens: int) -> None:
  """Raises unless both sides produced exactly N tokens for each of the B x G samples."""
  if ours['tokens'].shape != (batch, group_size, new_tokens):
    raise AssertionError(f'ours: tokens {ours["tokens"].shape}, want '
                         f'{(batch, group_size, new_tokens)}.')
  if not (np.all(np.asarray(ours['lengths']) == new_tokens) and np.all(ours['mask'])):
    raise AssertionError(f'ours: sample lengths {np.unique(ours["lengths"])}, want all '
                         f'{new_tokens}.')
  if tuple(hf_out.shape) != (batch * group_size, prompt_len + new_tokens):
    raise AssertionError(f'HF: output {tuple(hf_out.shape)}, want '
                         f'{(batch * group_size, prompt_len + new_tokens)}.')


def logits_gap(model: dec.Decoder, params, hf_model, tokens_bp: np.ndarray) -> float:
  """Max |ours - HF| over the prompts' logits: the two sides run the same weights."""
  import torch
  ours = np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(tokens_bp)).logits)
  with torch.inference_mode():
    theirs = hf_model(torch.from_numpy(tokens_bp.astype(np.int64))).logits.numpy()
  return float(np.abs(ours - theirs).max())


# -- Where our time goes -------------------------------------------------------------------------------

CATEGORIES = ('weight matmuls', 'attention', 'token sampling (RNG + argmax)',
              'layer weight slices (scanned layers)', 'KV cache copies / transposes', 'other')
_CONTAINERS = re.compile(r'\b(while|call|conditional)\(')
_SHAPE = re.compile(r'^\(?\w+\[([\d,]*)\]')
_MOVES = ('copy', 'transpose', 'scatter', 'dynamic-update-slice', 'concatenate', 'slice',
          'gather')


def _category(name: str, line: str, weight_sizes: set[int]) -> str | None:
  """The category of one HLO instruction of our sampler / decoder (None: a loop container).

  weight_sizes: element counts of one layer's weights (a slice of the stacked weights is told
  from a slice of the KV cache by its size: XLA reshapes [D, N, H] kernels to [D, N * H])."""
  head = line.split(', metadata=')[0]
  if _CONTAINERS.search(head):
    return None
  meta = re.search(r'op_name="([^"]*)"', line)
  meta = meta.group(1) if meta else ''
  shape = _SHAPE.match(line)
  shape = tuple(int(d) for d in shape.group(1).split(',') if d) if shape else ()
  if '_gumbel' in meta or '_uniform' in meta or 'threefry' in meta or 'argmax' in meta or (
      name.startswith('iota_reduce') and 'vmap()/reduce' in meta):
    return 'token sampling (RNG + argmax)'
  if 'dot_general' in meta and ('proj' in meta or 'lm_head' in meta):
    return 'weight matmuls'
  if re.search(r'\bdot\(', head) and len(shape) == 2:
    # A batch-1 matrix-vector product: XLA's dot, emitted without metadata; attention's dots
    # keep batch dimensions.
    return 'weight matmuls'
  if '/attn/' in meta and ('dot_general' in meta or 'softmax' in meta or 'exp' in meta
                           or 'reduce' in meta):
    return 'attention'
  if 'dynamic_index_in_dim' in meta and math.prod(shape) in weight_sizes:
    return 'layer weight slices (scanned layers)'
  if any(m in name for m in _MOVES):
    return 'KV cache copies / transposes'
  return 'other'


def profile_breakdown(fn, compiled_text: str, params) -> dict[str, float]:
  """Share of the device time of one `fn()` call per category (`CATEGORIES`), from a
  `jax.profiler` trace whose events are the compiled program's HLO instructions.

  Args:
    fn: runs the program once and blocks.
    compiled_text: `jitted.lower(...).compile().as_text()` of the same program.
    params: the decoder's parameters (their per-layer shapes tell weight slices apart).
  """
  defs = {m.group(1): m.group(2) for m in
          re.finditer(r'\n\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)', compiled_text)}
  stacked = params['transformer'].get('layers', {})
  weight_sizes = {math.prod(x.shape[1:]) for x in jax.tree.leaves(stacked)}
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      fn()
    files = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True)
    if not files:
      return {}
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  spent = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in defs:
      category = _category(e['name'], defs[e['name']], weight_sizes)
      if category is not None:
        spent[category] += e.get('dur', 0)
  total = sum(spent.values()) or 1
  return {c: spent[c] / total for c in CATEGORIES}


def _breakdown_text(shares: dict[str, float]) -> str:
  if not shares:
    return 'no profile (jax.profiler wrote no trace)'
  return ', '.join(f'{c} {s:.0%}' for c, s in sorted(shares.items(), key=lambda kv: -kv[1])
                   if s >= 0.005)


# -- The benchmark -----------------------------------------------------------------------------------


def run(env: common.Env, quick: bool, *, model_dir: str | None = None, reps: int = 5,
        prompts: int = PROMPTS, group_size: int = GROUP, prompt_len: int = PROMPT_LEN,
        new_tokens: int = NEW_TOKENS) -> common.Section:
  """Runs both comparisons on model M (or the model in `model_dir`)."""
  del quick  # the shapes: a few minutes on 2 cores, most of it in HF generate
  import torch
  path = model_dir or common.model_m_dir()
  hf_config = _read_config(path)
  model, params = load_ours(path)
  hf_model = load_hf_model(path)
  tokens = prompt_tokens(model.config.vocab_size, prompts, prompt_len)
  gap = logits_gap(model, params, hf_model, tokens)

  # a. Group sampling.
  rng = jax.random.key(0)
  run_ours = lambda: jax.block_until_ready(our_sample(
      model, params, jnp.asarray(tokens), rng, group_size=group_size, new_tokens=new_tokens))
  torch.manual_seed(0)
  run_hf = lambda: hf_sample(hf_model, tokens, group_size=group_size, new_tokens=new_tokens)
  check_sampled(jax.device_get(run_ours()), run_hf(), batch=prompts, group_size=group_size,
                prompt_len=prompt_len, new_tokens=new_tokens)
  t_ours = common.time_fn(run_ours, reps=reps)
  t_hf = common.time_fn(run_hf, reps=reps)
  generated = prompts * group_size * new_tokens
  speedup = t_hf.median / t_ours.median

  # Where our sampler's time goes: the prefill alone, the matmul floor of a decode step (every
  # weight but the input embedding, for G x B rows), and a profile of one call.
  embeds = model.apply({'params': params}, jnp.asarray(tokens), method=dec.Decoder.embed)
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
  prefill = jax.jit(decoding.prefill, static_argnums=0)
  t_prefill = common.time_fn(
      lambda: jax.block_until_ready(prefill(model, params, embeds, positions)), reps=reps)
  step_s = (t_ours.median - t_prefill.median) / new_tokens
  step_flops = 2 * prompts * group_size * weight_bytes(hf_config) / FLOAT_BYTES
  sample_hlo = our_sample.lower(model, params, jnp.asarray(tokens), rng, group_size=group_size,
                                new_tokens=new_tokens).compile().as_text()
  sample_shares = profile_breakdown(run_ours, sample_hlo, params)

  # b. Batch-1 greedy decoding.
  one = tokens[:1]
  t_ours_n = common.time_fn(lambda: jax.block_until_ready(
      our_greedy(model, params, jnp.asarray(one), new_tokens=new_tokens)), reps=reps)
  t_ours_1 = common.time_fn(lambda: jax.block_until_ready(
      our_greedy(model, params, jnp.asarray(one), new_tokens=1)), reps=reps)
  ours_tokens = np.asarray(our_greedy(model, params, jnp.asarray(one), new_tokens=new_tokens))
  hf_tokens = hf_greedy(hf_model, one, new_tokens=new_tokens)[:, prompt_len:].numpy()
  if ours_tokens.shape != (1, new_tokens) or hf_tokens.shape != (1, new_tokens):
    raise AssertionError(f'greedy: ours {ours_tokens.shape}, HF {hf_tokens.shape}, want '
                         f'{(1, new_tokens)}.')
  greedy_hlo = our_greedy.lower(model, params, jnp.asarray(one),
                                new_tokens=new_tokens).compile().as_text()
  greedy_shares = profile_breakdown(lambda: jax.block_until_ready(
      our_greedy(model, params, jnp.asarray(one), new_tokens=new_tokens)), greedy_hlo, params)
  agree = int(np.cumprod(ours_tokens[0] == hf_tokens[0]).sum())
  t_hf_n = common.time_fn(lambda: hf_greedy(hf_model, one, new_tokens=new_tokens), reps=reps)
  t_hf_1 = common.time_fn(lambda: hf_greedy(hf_model, one, new_tokens=1), reps=reps)
  per_token = lambda tn, t1: (tn.median - t1.median) / (new_tokens - 1)
  ours_ms, hf_ms = 1e3 * per_token(t_ours_n, t_ours_1), 1e3 * per_token(t_hf_n, t_hf_1)
  bytes_tok = roofline_bytes(hf_config, prompt_len, new_tokens)
  roof_ms = 1e3 * bytes_tok / (env.bandwidth_gbs * 1e9)
  ours_frac, hf_frac = roof_ms / ours_ms, roof_ms / hf_ms

  figures = {
      'sampling_ours_s': t_ours.median, 'sampling_hf_s': t_hf.median,
      'sampling_speedup_vs_hf': speedup,
      'sampling_ours_tokens_per_s': generated / t_ours.median,
      'sampling_hf_tokens_per_s': generated / t_hf.median,
      'greedy_ours_ms_per_token': ours_ms, 'greedy_hf_ms_per_token': hf_ms,
      'greedy_roofline_ms_per_token': roof_ms,
      'greedy_ours_roofline_fraction': ours_frac, 'greedy_hf_roofline_fraction': hf_frac,
  }
  step_gflops = step_flops / step_s / 1e9
  step_floor_s = step_flops / (env.matmul_gflops * 1e9)
  md = [
      f'Model M (`{path}`), float32, same weights on both sides (max |logit difference| on the '
      f'prompts: {gap:.2g}); torch threads: {torch.get_num_threads()}.',
      '',
      f'**a. Group sampling**: {prompts} prompts x G={group_size} samples, {prompt_len}-token '
      f'prompts, temperature 1 over the full vocabulary, exactly {new_tokens} new tokens per '
      f'sample ({generated} generated tokens; checked on both sides).',
      '',
      common.table(['side', 'seconds (median)', 'min', 'max', 'generated tokens/s'], [
          ['ours: `rl.sampler.sample_group` (prefix prefilled once per group)', t_ours.median,
           t_ours.min, t_ours.max, generated / t_ours.median],
          ['HF `generate(do_sample=True, num_return_sequences=8)`', t_hf.median, t_hf.min,
           t_hf.max, generated / t_hf.median],
      ]),
      '',
      f'Speedup: **{speedup:.2f}x** HF (goal >= {SAMPLING_GOAL:g}x: '
      + ('met' if speedup >= SAMPLING_GOAL else
         f'missed by {SAMPLING_GOAL / speedup:.2f}x') + ').',
      '',
      f'Our sampler\'s time: prefill {t_prefill.median * 1e3:.1f} ms, then '
      f'{step_s * 1e3:.2f} ms per decode step of {prompts * group_size} rows, whose weight '
      f'matmuls ({step_flops / 1e9:.3g} GFLOP) alone take {step_floor_s * 1e3:.2f} ms at the '
      f'measured matmul peak: the step runs at {step_gflops:.0f} GFLOP/s of them '
      f'({step_gflops / env.matmul_gflops:.0%} of the peak). Device time of one call by kind of '
      f'op (jax.profiler trace): {_breakdown_text(sample_shares)}.',
      *([] if speedup >= SAMPLING_GOAL else ['', _sampling_bound(
          t_hf.median, t_prefill.median, step_s, step_floor_s, new_tokens)]),
      '',
      f'**b. Batch-1 greedy decoding** ({prompt_len}-token prompt, {new_tokens} new tokens; per '
      f'token = (T({new_tokens}) - T(1)) / {new_tokens - 1}). Roofline: '
      f'{bytes_tok / 1e6:.4g} MB per token (weights {weight_bytes(hf_config) / 1e6:.4g} MB + '
      f'mean KV cache {(bytes_tok - weight_bytes(hf_config)) / 1e6:.3g} MB) at '
      f'{env.bandwidth_gbs:.1f} GB/s = {roof_ms:.2f} ms/token. The two greedy continuations agree '
      f'on their first {agree} of {new_tokens} tokens.',
      '',
      common.table(['side', 'ms/token', '% of roofline', f'T({new_tokens}) s', 'T(1) s'], [
          ['ours: `eval.decoding.greedy_decode`', ours_ms, f'{ours_frac:.0%}', t_ours_n.median,
           t_ours_1.median],
          ['HF `generate(do_sample=False)`', hf_ms, f'{hf_frac:.0%}', t_hf_n.median,
           t_hf_1.median],
      ]),
      '',
      f'Goal >= {ROOFLINE_GOAL:.0%} of the roofline: '
      + ('met' if ours_frac >= ROOFLINE_GOAL else
         f'missed by {ROOFLINE_GOAL / ours_frac:.2f}x') + '. Device time of our '
      f'{new_tokens}-token decode by kind of op (jax.profiler trace): '
      f'{_breakdown_text(greedy_shares)}.',
  ]
  return common.Section('Sampling (model M)', '\n'.join(md), figures)


def _sampling_bound(hf_s: float, prefill_s: float, step_s: float, step_floor_s: float,
                    new_tokens: int) -> str:
  """What caps the speed-up over HF: decode steps whose weight matmuls alone run at the peak."""
  best_s = prefill_s + new_tokens * step_floor_s
  need_ms = 1e3 * (hf_s / SAMPLING_GOAL - prefill_s) / new_tokens
  return (f'What limits it: the decode loop is one pass over the weights per new token for all '
          f'rows, as HF\'s is; with our prefill and every decode step\'s weight matmuls at the '
          f'measured matmul peak and nothing else (no attention, no cache writes, no sampling), '
          f'the call would take {best_s:.3g} s, {hf_s / best_s:.2f}x faster than HF. '
          f'{SAMPLING_GOAL:g}x HF needs {need_ms:.1f} ms per decode step, '
          f'{need_ms / (1e3 * step_floor_s):.2f}x the time of its weight matmuls at the peak; '
          f'ours takes {step_s / step_floor_s:.2f}x (the breakdown above says where).')


def _read_config(path: str) -> dict[str, Any]:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def main(argv: list[str]) -> None:
  env = common.measure_env()
  print(run(env, quick='--quick' in argv).markdown)


if __name__ == '__main__':
  main(sys.argv[1:])
