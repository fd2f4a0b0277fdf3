"""What every benchmark shares: timing, the machine's limits, model M, report sections.

A benchmark module exposes `run(env: Env, quick: bool) -> Section`; `benchmarks.run` measures
the `Env` once (the dense matmul peak and the memory bandwidth of this machine, in this run),
calls every benchmark and writes their sections into BENCHMARKS.md.

Timings are medians (with min and max) over `reps` timed repetitions after `warmup` untimed ones;
each timed callable must block until its work is done (`jax.block_until_ready`, or a torch call,
which is synchronous on CPU).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

# Model M of the performance issue: a small Llama, float32, random weights (seed 0), saved once
# with save_pretrained and read by every side, so all of them run the same weights.
MODEL_M = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
               tie_word_embeddings=False)
CACHE_DIR = os.environ.get('RVLF_BENCH_CACHE',
                           os.path.join(os.path.expanduser('~'), '.cache', 'rvlf_jax_bench'))


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call over the timed repetitions."""

  median: float
  min: float
  max: float
  reps: int

  def __str__(self) -> str:
    return f'{self.median:.4g} s (min {self.min:.4g}, max {self.max:.4g}, n={self.reps})'


def time_fn(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> Timing:
  """Times `fn()` (which must block until done) `reps` times after `warmup` calls."""
  if reps < 1:
    raise ValueError(f'reps must be >= 1, got {reps}.')
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), min(times), max(times), reps)


@dataclasses.dataclass(frozen=True)
class Env:
  """The machine and what it can do, measured in this run.

  Attributes:
    cpu: CPU model name; cores: logical CPUs JAX and torch may use.
    device: the JAX default device, in words.
    matmul_gflops: the machine's dense float32 matmul peak, GFLOP/s (the MFU reference): the
      faster of `matmul_gflops_jax` and `matmul_gflops_blas`.
    bandwidth_gbs: memory bandwidth of a large array copy, GB/s (read + write bytes / time).
    versions: library -> version string.
    matmul_gflops_jax: a 2048^3 matmul jitted in JAX (XLA's own GEMM), median GFLOP/s.
    matmul_gflops_blas: the same product in numpy (the BLAS it links, as torch's CPU GEMMs are of
      that class), median GFLOP/s; None when not measured.
  """

  cpu: str
  cores: int
  device: str
  matmul_gflops: float
  bandwidth_gbs: float
  versions: dict[str, str]
  matmul_gflops_jax: float | None = None
  matmul_gflops_blas: float | None = None


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
  from importlib import metadata
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'trl', 'google-tunix',
               'sacrebleu', 'numpy'):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def measure_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  """Median GFLOP/s of a jitted float32 n^3 matmul on the default JAX device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  timing = time_fn(lambda: matmul(a, b).block_until_ready(), reps=reps, warmup=2)
  return 2 * n ** 3 / timing.median / 1e9


def measure_blas_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  """Median GFLOP/s of a float32 n^3 matmul in numpy (its BLAS, all cores)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  out = np.empty_like(a)
  timing = time_fn(lambda: np.matmul(a, b, out=out), reps=reps, warmup=2)
  return 2 * n ** 3 / timing.median / 1e9


def measure_bandwidth_gbs(mbytes: int = 256, reps: int = 5) -> float:
  """Median GB/s of copying a float32 array of `mbytes` MB (bytes read + written / time)."""
  src = np.ones(mbytes * 2 ** 20 // 4, np.float32)
  dst = np.empty_like(src)
  timing = time_fn(lambda: np.copyto(dst, src), reps=reps, warmup=1)
  return 2 * src.nbytes / timing.median / 1e9


def measure_env() -> Env:
  import jax
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  jax_gflops = measure_matmul_gflops()
  # On a CPU, XLA's GEMM may be slower than the BLAS torch and numpy use: MFU is against the
  # machine's peak, not against what XLA makes of it (the issue measured 179 GFLOP/s here).
  blas_gflops = measure_blas_matmul_gflops() if on_cpu else None
  return Env(cpu=cpu_name(), cores=os.cpu_count() or 1,
             device=f'{device.platform}: {getattr(device, "device_kind", device)}',
             matmul_gflops=max(jax_gflops, blas_gflops or 0.0),
             bandwidth_gbs=measure_bandwidth_gbs(), versions=library_versions(),
             matmul_gflops_jax=jax_gflops, matmul_gflops_blas=blas_gflops)


def model_m_dir(**overrides) -> str:
  """The HF folder of model M (written once with save_pretrained, float32, torch seed 0).

  `overrides` change LlamaConfig fields (a smaller model for tests); each variant has its own
  folder under CACHE_DIR.
  """
  fields = {**MODEL_M, **overrides}
  name = 'model_m' if not overrides else 'model_m-' + '-'.join(
      f'{k}{v}' for k, v in sorted(overrides.items()))
  path = os.path.join(CACHE_DIR, name)
  if os.path.exists(os.path.join(path, 'config.json')):
    return path
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(torch.float32)
  tmp = path + f'.tmp{os.getpid()}'
  model.save_pretrained(tmp)
  os.replace(tmp, path)
  return path


def non_embedding_params(config: dict[str, Any]) -> int:
  """N of the issue's FLOP formula: every parameter but the input embedding, lm_head included."""
  d, f, layers = config['hidden_size'], config['intermediate_size'], config['num_hidden_layers']
  heads, kv = config['num_attention_heads'], config['num_key_value_heads']
  head_dim = config.get('head_dim') or d // heads
  attention = d * heads * head_dim * 2 + d * kv * head_dim * 2
  per_layer = attention + 3 * d * f + 2 * d
  return layers * per_layer + d + d * config['vocab_size']


def train_step_flops(config: dict[str, Any], batch: int, seq: int) -> float:
  """FLOPs of one training step: 6 N T + 12 L d S T (T = batch x seq tokens, S = seq)."""
  tokens = batch * seq
  return (6 * non_embedding_params(config) * tokens
          + 12 * config['num_hidden_layers'] * config['hidden_size'] * seq * tokens)


@dataclasses.dataclass
class Section:
  """One benchmark's part of BENCHMARKS.md.

  Attributes:
    title: the heading.
    markdown: the body: tables of measured figures, goals met or missed (and by how much), and
      for a missed goal what limits it.
    figures: the key numbers by name (printed in the summary table of `benchmarks.run`).
    files: paths of files it wrote (plots), relative to the benchmarks folder.
  """

  title: str
  markdown: str
  figures: dict[str, float] = dataclasses.field(default_factory=dict)
  files: list[str] = dataclasses.field(default_factory=list)


def table(header: list[str], rows: list[list[Any]]) -> str:
  """A markdown table; floats printed with 4 significant digits."""
  cell = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)
