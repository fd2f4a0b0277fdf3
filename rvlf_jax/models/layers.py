"""Building blocks shared by the decoders: projections (with LoRA), RMSNorm, RoPE, gated MLPs.

Shape vocabulary (used in einsum strings and variable suffixes across `rvlf_jax.models`):
  B batch, T query tokens (or frames), S key/value tokens, D model dim, N query heads,
  K key/value heads, G query heads per kv head (N = K * G), H head dim, F mlp dim, V vocab,
  L layers, R LoRA rank.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the mapping of those
names to mesh axes lives in one table in `rvlf_jax.sharding`, never here. Names used:
  'vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'norm', 'lora', 'layers'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters: y = x W + (alpha / rank) * (x A) B, with W frozen and A, B trained.

  Attributes:
    rank: R, the adapter rank.
    alpha: scale numerator; the update is multiplied by alpha / rank (as in PEFT).
    targets: names of the projections that get adapters, among q_proj, k_proj, v_proj, o_proj,
      gate_proj, up_proj, down_proj.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ('q_proj', 'v_proj')

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f'LoRA rank must be positive, got {self.rank}.')
    known = {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'}
    unknown = set(self.targets) - known
    if unknown:
      raise ValueError(f'Unknown LoRA targets {sorted(unknown)}; choose among {sorted(known)}.')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def activation(name: str):
  """Returns the activation function named as in HF configs."""
  fns = {
      'silu': jax.nn.silu,
      'swish': jax.nn.silu,
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
  }
  if name not in fns:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(fns)}.')
  return fns[name]


class Linear(nn.Module):
  """`y = x W (+ b)`, contracting the last len(in_shape) dims of x; optional LoRA adapter.

  Multi-dimensional shapes keep heads explicit: q_proj is in_shape (D,), out_shape (N, H), so its
  kernel is [D, N, H] with logical axes ('embed', 'heads', 'head_dim').

  Attributes:
    in_shape: the contracted trailing dims of x.
    out_shape: the produced trailing dims of y.
    axes: logical names of the kernel dims (len(in_shape) + len(out_shape) names).
    use_bias: adds a bias of shape out_shape.
    lora: adapter settings, or None for no adapter.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  lora: LoraConfig | None = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_shape)
    if tuple(x.shape[-n_in:]) != tuple(self.in_shape):
      raise ValueError(f'{self.name}: expected trailing dims {self.in_shape}, got {x.shape}.')
    fan_in = math.prod(self.in_shape)
    init = self.kernel_init or nn.initializers.normal(stddev=fan_in**-0.5)
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        self.in_shape + self.out_shape, self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.tensordot(x, kernel.astype(self.dtype), axes=n_in)
    if self.lora is not None:
      in_axes, out_axes = self.axes[:n_in], self.axes[n_in:]
      a = self.param('lora_a', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=fan_in**-0.5), in_axes + ('lora',)),
                     self.in_shape + (self.lora.rank,), self.param_dtype)
      b = self.param('lora_b', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('lora',) + out_axes),
                     (self.lora.rank,) + self.out_shape, self.param_dtype)
      xa = jnp.tensordot(x, a.astype(self.dtype), axes=n_in)
      y = y + self.lora.scale * jnp.tensordot(xa, b.astype(self.dtype), axes=1)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.axes[n_in:]), self.out_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32.

  Attributes:
    eps: added to the mean square.
    unit_offset: Gemma stores w and applies (1 + w); Llama/Qwen apply w.
    axis_name: logical name of the scale vector's axis.
  """

  eps: float = 1e-6
  unit_offset: bool = False
  axis_name: str = 'norm'
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
    scale = self.param('scale', nn.with_logical_partitioning(init, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    w = scale.astype(jnp.float32)
    if self.unit_offset:
      w = 1.0 + w
    return (y * w).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding frequencies.

  Attributes:
    theta: base wavelength.
    kind: 'default', 'linear' (positions divided by factor) or 'llama3' (frequency-dependent
      scaling of Llama 3.1+).
    factor: scaling factor for 'linear' and 'llama3'.
    low_freq_factor, high_freq_factor, original_max_position_embeddings: 'llama3' parameters.
  """

  theta: float = 10_000.0
  kind: str = 'default'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ('default', 'linear', 'llama3'):
      raise ValueError(f"Unsupported RoPE type {self.kind!r}; supported: default, linear, llama3.")

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Inverse frequencies float32[H // 2], computed as transformers does (in float32)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
    if self.kind == 'linear':
      return (inv / np.float32(self.factor)).astype(np.float32)
    if self.kind == 'llama3':
      old = self.original_max_position_embeddings
      low_wavelen = old / self.low_freq_factor
      high_wavelen = old / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_sin_cos(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """sin, cos float32[B, T, H] for integer positions int[B, T] (halves repeated, as in HF)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x_btnh: Array, sin_bth: Array, cos_bth: Array) -> Array:
  """Rotates x[B, T, N, H] by the 'rotate half' convention of transformers."""
  sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
  cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
  half = x_btnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  return x_btnh * cos + rotated * sin


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""

  hidden_size: int
  intermediate_size: int
  act: str = 'silu'
  use_bias: bool = False
  lora: LoraConfig | None = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    d, f = self.hidden_size, self.intermediate_size

    def proj(name, in_shape, out_shape, axes):
      lora = self.lora if self.lora is not None and name in self.lora.targets else None
      return Linear(in_shape, out_shape, axes, use_bias=self.use_bias, lora=lora,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    gate = proj('gate_proj', (d,), (f,), ('embed', 'mlp'))(x_btd)
    up = proj('up_proj', (d,), (f,), ('embed', 'mlp'))(x_btd)
    h_btf = activation(self.act)(gate) * up
    h_btf = nn.with_logical_constraint(h_btf, ('batch', 'length', 'mlp'))
    return proj('down_proj', (f,), (d,), ('mlp', 'embed'))(h_btf)


def softcap(x: Array, cap: float | None) -> Array:
  """cap * tanh(x / cap), or x when cap is None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def dtype_of(name: str | DType) -> DType:
  """jnp dtype from a config string such as 'float32' or 'bfloat16'."""
  return jnp.dtype(name)


def logical_names(tree: Any) -> Any:
  """The logical axis names of each parameter of a boxed (`nn.Partitioned`) pytree."""
  return nn.get_partition_spec(tree)


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks a list of identical pytrees along a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
