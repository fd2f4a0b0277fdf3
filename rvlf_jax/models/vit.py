"""ViT / DINOv2 image encoder, numerically matching transformers' `Dinov2Model` and
`Dinov2WithRegistersModel`.

Shape vocabulary (einsum letters and variable suffixes; see also `rvlf_jax.models.layers`):
  B batch (images), T frames per video, P patch tokens (gh * gw), R register tokens,
  S sequence tokens (1 + R + P), D model dim, N heads, H head dim, F mlp dim, L layers,
  C pixel channels, G side of the pretrained position grid (image_size // patch_size).

Pixels are NHWC (`float[B, Hpx, Wpx, C]`, already normalised). Token order is
[CLS, registers..., patches row-major], as in transformers. Parameters carry logical axis names
('embed', 'heads', 'head_dim', 'mlp', 'norm', 'layers'); dims that are never sharded (patch
pixels, the token axis of the position table, gate/up of SwiGLU) are named None.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.models import layers

Array = jax.Array

MODEL_TYPES = ('dinov2', 'dinov2_with_registers')
_ARCHITECTURES = {'dinov2': 'Dinov2Model', 'dinov2_with_registers': 'Dinov2WithRegistersModel'}
_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """DINOv2 architecture (HF field names in parentheses where they differ).

  Attributes:
    model_type: 'dinov2' or 'dinov2_with_registers'. Besides register tokens, the two HF
      implementations differ in how they resize position embeddings (plain vs antialiased
      bicubic), so the variant is explicit rather than implied by num_register_tokens.
    image_size: side of the pretrained square image; G = image_size // patch_size.
    patch_size: side of the square patches (conv kernel and stride).
    num_channels: C.
    hidden_size: D.
    num_layers: L (num_hidden_layers).
    num_heads: N (num_attention_heads).
    mlp_ratio: F = hidden_size * mlp_ratio for the GELU MLP (HF keeps it an int).
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: MLP activation (unused by SwiGLU, which is always silu as in HF).
    use_swiglu_ffn: SwiGLU MLP (DINOv2-giant) instead of fc1/act/fc2.
    layerscale_value: initial value of the per-channel residual scales.
    num_register_tokens: R; must be 0 for 'dinov2'.
    use_mask_token: whether the (pretraining-only) mask token parameter exists; HF's registers
      model always has it.
    qkv_bias: biases on q/k/v (the output projection always has one).
    dtype: computation dtype.
    param_dtype: parameter dtype at init.
    scan_layers: stack layers with nn.scan (params under 'layers' with a leading L axis) rather
      than one module per layer ('layers_0', 'layers_1', ...).
    remat: 'none', 'full' (recompute everything), 'dots' (save matmul outputs) or
      'dots_no_batch' (save only matmuls without batch dims, i.e. not attention's), per layer.
  """

  model_type: str = 'dinov2'
  image_size: int = 518
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-6
  hidden_act: str = 'gelu'
  use_swiglu_ffn: bool = False
  layerscale_value: float = 1.0
  num_register_tokens: int = 0
  use_mask_token: bool = True
  qkv_bias: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f'model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.')
    if self.model_type == 'dinov2' and self.num_register_tokens:
      raise ValueError('num_register_tokens > 0 needs model_type="dinov2_with_registers".')
    if self.model_type == 'dinov2_with_registers' and not self.use_mask_token:
      raise ValueError('Dinov2WithRegistersModel always has a mask token (use_mask_token=True).')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of num_heads '
                       f'{self.num_heads}.')
    if self.image_size < self.patch_size:
      raise ValueError(f'image_size {self.image_size} is smaller than patch_size '
                       f'{self.patch_size}.')
    if self.remat not in ('none', *_REMAT_POLICIES):
      raise ValueError(f"remat must be one of {('none', *_REMAT_POLICIES)}, got {self.remat!r}.")
    layers.activation(self.hidden_act)  # Fails early on an unknown name.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> int:
    """G: side of the pretrained position-embedding grid."""
    return self.image_size // self.patch_size

  @property
  def mlp_dim(self) -> int:
    """F, computed as HF does (SwiGLU keeps 2/3 of it, rounded up to a multiple of 8)."""
    f = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:
      f = (int(f * 2 / 3) + 7) // 8 * 8
    return f

  @classmethod
  def _dinov2(cls, hidden_size: int, num_layers: int, num_heads: int, registers: bool,
              **overrides) -> 'VitConfig':
    fields = dict(image_size=518, patch_size=14, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, mlp_ratio=4, use_swiglu_ffn=hidden_size == 1536)
    if registers:
      fields.update(model_type='dinov2_with_registers', num_register_tokens=4)
    return cls(**{**fields, **overrides})

  @classmethod
  def dinov2_small(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-small (22M)."""
    return cls._dinov2(384, 12, 6, False, **overrides)

  @classmethod
  def dinov2_base(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-base (86M)."""
    return cls._dinov2(768, 12, 12, False, **overrides)

  @classmethod
  def dinov2_large(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-large (300M)."""
    return cls._dinov2(1024, 24, 16, False, **overrides)

  @classmethod
  def dinov2_giant(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-giant (1.1B, SwiGLU MLP)."""
    return cls._dinov2(1536, 40, 24, False, **overrides)

  @classmethod
  def dinov2_with_registers_small(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-with-registers-small."""
    return cls._dinov2(384, 12, 6, True, **overrides)

  @classmethod
  def dinov2_with_registers_base(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-with-registers-base."""
    return cls._dinov2(768, 12, 12, True, **overrides)

  @classmethod
  def dinov2_with_registers_large(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-with-registers-large."""
    return cls._dinov2(1024, 24, 16, True, **overrides)

  @classmethod
  def dinov2_with_registers_giant(cls, **overrides) -> 'VitConfig':
    """facebook/dinov2-with-registers-giant (SwiGLU MLP)."""
    return cls._dinov2(1536, 40, 24, True, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> 'VitConfig':
    """A 2-layer, D=32 model on 28x28 images (4x4 patches of 7 pixels), for tests."""
    fields = dict(image_size=28, patch_size=7, hidden_size=32, num_layers=2, num_heads=4)
    return cls(**{**fields, **overrides})

  @classmethod
  def from_hf_config(cls, d: dict[str, Any], **overrides) -> 'VitConfig':
    """Our config from an HF `Dinov2Config` / `Dinov2WithRegistersConfig` dict (config.json).

    Args:
      d: the HF config dict; absent fields take transformers' defaults.
      **overrides: our fields to set on top, e.g. the runtime-only ones (dtype, param_dtype,
        scan_layers, remat), which HF configs do not carry.
    """
    model_type = d.get('model_type', 'dinov2')
    if model_type not in MODEL_TYPES:
      raise ValueError(f'not a DINOv2 config: model_type {model_type!r}.')
    registers = model_type == 'dinov2_with_registers'
    image_size = _square(d.get('image_size', 224), 'image_size')
    # transformers' defaults differ between the two classes only in patch size.
    patch_size = _square(d.get('patch_size', 16 if registers else 14), 'patch_size')
    fields = dict(
        model_type=model_type,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=d.get('num_channels', 3),
        hidden_size=d.get('hidden_size', 768),
        num_layers=d.get('num_hidden_layers', 12),
        num_heads=d.get('num_attention_heads', 12),
        mlp_ratio=d.get('mlp_ratio', 4),
        layer_norm_eps=d.get('layer_norm_eps', 1e-6),
        hidden_act=d.get('hidden_act', 'gelu'),
        use_swiglu_ffn=d.get('use_swiglu_ffn', False),
        layerscale_value=d.get('layerscale_value', 1.0),
        num_register_tokens=d.get('num_register_tokens', 4) if registers else 0,
        use_mask_token=True if registers else d.get('use_mask_token', True),
        qkv_bias=d.get('qkv_bias', True),
    )
    dtype = d.get('dtype') or d.get('torch_dtype')
    if dtype in ('float32', 'bfloat16', 'float16'):
      fields['param_dtype'] = dtype
    return cls(**{**fields, **overrides})

  def to_hf_config(self) -> dict[str, Any]:
    """The HF config dict from which `AutoModel.from_pretrained` rebuilds this architecture."""
    d = {
        'model_type': self.model_type,
        'architectures': [_ARCHITECTURES[self.model_type]],
        'image_size': self.image_size,
        'patch_size': self.patch_size,
        'num_channels': self.num_channels,
        'hidden_size': self.hidden_size,
        'num_hidden_layers': self.num_layers,
        'num_attention_heads': self.num_heads,
        'mlp_ratio': self.mlp_ratio,
        'layer_norm_eps': self.layer_norm_eps,
        'hidden_act': self.hidden_act,
        'use_swiglu_ffn': self.use_swiglu_ffn,
        'layerscale_value': self.layerscale_value,
        'qkv_bias': self.qkv_bias,
        # Inference-only: no dropout or stochastic depth.
        'hidden_dropout_prob': 0.0,
        'attention_probs_dropout_prob': 0.0,
        'drop_path_rate': 0.0,
        'initializer_range': 0.02,
        'dtype': self.param_dtype,
    }
    if self.model_type == 'dinov2_with_registers':
      d['num_register_tokens'] = self.num_register_tokens
    else:
      d['use_mask_token'] = self.use_mask_token
    return d


def _square(value: Any, name: str) -> int:
  """An int from an HF size field that may be an int or a [h, w] pair."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{name} {value!r}: only square sizes are supported.')
    value = value[0]
  return int(value)


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter a (zero for |x| >= 2), in float64."""
  x = np.abs(x).astype(np.float64)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """The 1-D resampling matrix of torch bicubic interpolation with align_corners=False.

  `torch.nn.functional.interpolate(x, size=..., mode='bicubic', align_corners=False)` is separable,
  so resizing [in_h, in_w] -> [out_h, out_w] is `M_h @ x @ M_w.T`. Built with numpy at trace time
  (sizes are static). Source coordinates are rounded to float32 exactly where torch's CPU kernel
  rounds them (computed in float64 throughout, downsampled weights drift by ~3e-6); the kernel
  itself is evaluated in float64. The weights agree with torch's to under 1e-6.

  Without antialias (transformers' Dinov2): a = -0.75, source coordinate
  (dst + 0.5) * in / out - 0.5, four taps with indices clamped to the border.
  With antialias (Dinov2WithRegisters; PIL's filter): a = -0.5, the kernel is widened by in / out
  when downsampling, taps outside the image are dropped and the rest renormalised to sum to 1.
  (`jax.image.resize` uses a = -0.5 without either border rule, so it matches neither.)

  Args:
    in_size: input length.
    out_size: output length.
    antialias: torch's antialias=True path.

  Returns:
    float32[out_size, in_size].
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  if not antialias:
    # Rounded once from the exact value, as torch's fused multiply-add computes it.
    src = (np.float64(scale) * (rows + 0.5) - 0.5).astype(f32)
    base = np.minimum(np.floor(src), f32(in_size - 1))
    t = np.clip(src - base, f32(0), f32(1)).astype(np.float64)
    # Taps at distance 1 + t, t, 1 - t, 2 - t from the source coordinate.
    weights = (_cubic_kernel(t + 1, -0.75), _cubic_kernel(t, -0.75),
               _cubic_kernel(1 - t, -0.75), _cubic_kernel(2 - t, -0.75))
    for offset, weight in zip((-1, 0, 1, 2), weights):
      cols = np.clip(base.astype(np.int64) + offset, 0, in_size - 1)
      np.add.at(m, (rows, cols), weight.astype(f32))
    return m
  support = f32(2) * scale if scale >= 1 else f32(2)
  inv_scale = f32(1) / scale if scale >= 1 else f32(1)
  max_taps = int(math.ceil(support)) * 2 + 1
  for i in range(out_size):
    center = f32(scale * f32(i + 0.5))
    # int() truncates towards zero, as torch's static_cast<int64_t> does.
    lo = max(int(float(center - support) + 0.5), 0)
    n = min(max(min(int(float(center + support) + 0.5), in_size) - lo, 0), max_taps)
    cols = np.arange(lo, lo + n)
    # torch: (j + xmin - center) in float32, then + 0.5 and * invscale in double.
    x = ((cols.astype(f32) - center).astype(np.float64) + 0.5) * float(inv_scale)
    weight = _cubic_kernel(x.astype(f32), -0.5)
    total = weight.sum()
    m[i, cols] = weight / total if total != 0 else weight
  return m


def resize_bicubic(grid_ghwd: Array, out_h: int, out_w: int, antialias: bool = False) -> Array:
  """Resizes float[G_h, G_w, D] to float32[out_h, out_w, D] like torch's bicubic interpolate.

  Computed in float32 at full matmul precision (TPUs default to bf16 passes for f32 matmuls).
  """
  in_h, in_w = grid_ghwd.shape[:2]
  m_h = jnp.asarray(bicubic_matrix(in_h, out_h, antialias))
  m_w = jnp.asarray(bicubic_matrix(in_w, out_w, antialias))
  x = grid_ghwd.astype(jnp.float32)
  x = jnp.einsum('xj,ijd->ixd', m_w, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('yi,ixd->yxd', m_h, x, precision=jax.lax.Precision.HIGHEST)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis (biased variance), computed in float32."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
    scale = self.param('scale', nn.with_logical_partitioning(ones, ('norm',)), (d,),
                       self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(zeros, ('norm',)), (d,),
                      self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
  """fc2(act(fc1(x))), or SwiGLU weights_out(silu(gate) * up) with [gate, up] = weights_in(x).

  SwiGLU keeps gate and up in one kernel [D, 2, F] because the checkpoints store them fused as
  `weights_in` ([2F, D], gate rows first); one parameter per checkpoint tensor keeps the
  conversion table one-to-one.
  """

  config: VitConfig

  @nn.compact
  def __call__(self, x_bsd: Array) -> Array:
    cfg = self.config
    d, f = cfg.hidden_size, cfg.mlp_dim
    linear = functools.partial(layers.Linear, use_bias=True, dtype=layers.dtype_of(cfg.dtype),
                               param_dtype=layers.dtype_of(cfg.param_dtype))
    if cfg.use_swiglu_ffn:
      gate_up = linear((d,), (2, f), ('embed', None, 'mlp'), name='weights_in')(x_bsd)
      h_bsf = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
      h_bsf = nn.with_logical_constraint(h_bsf, ('batch', 'length', 'mlp'))
      return linear((f,), (d,), ('mlp', 'embed'), name='weights_out')(h_bsf)
    h_bsf = linear((d,), (f,), ('embed', 'mlp'), name='fc1')(x_bsd)
    h_bsf = layers.activation(cfg.hidden_act)(h_bsf)
    h_bsf = nn.with_logical_constraint(h_bsf, ('batch', 'length', 'mlp'))
    return linear((f,), (d,), ('mlp', 'embed'), name='fc2')(h_bsf)


class Attention(nn.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/o projections."""

  config: VitConfig

  @nn.compact
  def __call__(self, x_bsd: Array) -> Array:
    cfg = self.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    linear = functools.partial(layers.Linear, dtype=layers.dtype_of(cfg.dtype),
                               param_dtype=layers.dtype_of(cfg.param_dtype))
    q_bsnh = linear((d,), (n, h), ('embed', 'heads', 'head_dim'), use_bias=cfg.qkv_bias,
                    name='q_proj')(x_bsd)
    k_bsnh = linear((d,), (n, h), ('embed', 'heads', 'head_dim'), use_bias=cfg.qkv_bias,
                    name='k_proj')(x_bsd)
    v_bsnh = linear((d,), (n, h), ('embed', 'heads', 'head_dim'), use_bias=cfg.qkv_bias,
                    name='v_proj')(x_bsd)
    out_bsnh = jax.nn.dot_product_attention(q_bsnh, k_bsnh, v_bsnh)
    return linear((n, h), (d,), ('heads', 'head_dim', 'embed'), use_bias=True,
                  name='o_proj')(out_bsnh)


class Block(nn.Module):
  """Pre-norm layer: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)).

  Returns (x, x or None) so the same module serves as an nn.scan body; the second element is the
  per-layer output collected for `return_hidden_states`.
  """

  config: VitConfig
  collect: bool = False

  @nn.compact
  def __call__(self, x_bsd: Array, _: Any = None) -> tuple[Array, Array | None]:
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = functools.partial(LayerNorm, eps=cfg.layer_norm_eps, dtype=dtype,
                             param_dtype=param_dtype)

    def layer_scale(name):
      init = nn.initializers.constant(cfg.layerscale_value)
      return self.param(name, nn.with_logical_partitioning(init, ('norm',)), (cfg.hidden_size,),
                        param_dtype).astype(dtype)

    x_bsd = nn.with_logical_constraint(x_bsd, ('batch', 'length', 'embed'))
    y = Attention(cfg, name='attn')(norm(name='norm1')(x_bsd))
    x_bsd = x_bsd + y * layer_scale('layer_scale1')
    y = Mlp(cfg, name='mlp')(norm(name='norm2')(x_bsd))
    x_bsd = x_bsd + y * layer_scale('layer_scale2')
    return x_bsd, (x_bsd if self.collect else None)


@flax.struct.dataclass
class VitOutput:
  """Encoder outputs (a pytree, so it can leave jit).

  Attributes:
    last_hidden_state: float[B, S, D], after the final LayerNorm (HF's last_hidden_state).
    cls: float[B, D], the normalised CLS token (HF's pooler_output).
    patch_tokens: float[B, P, D], the normalised patch tokens (registers excluded).
    hidden_states: None, or a tuple of L + 1 float[B, S, D]: the embeddings, then each layer's
      output before the final norm (HF's output_hidden_states).
  """

  last_hidden_state: Array
  cls: Array
  patch_tokens: Array
  hidden_states: tuple[Array, ...] | None = None


class VisionTransformer(nn.Module):
  """DINOv2 encoder: patch embedding + CLS (+ registers) + position embedding, L pre-norm
  layers, final LayerNorm."""

  config: VitConfig

  def _embed(self, pixels_bhwc: Array) -> Array:
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    d, p = cfg.hidden_size, cfg.patch_size
    b, height, width, c = pixels_bhwc.shape
    if c != cfg.num_channels:
      raise ValueError(f'expected {cfg.num_channels} channels, got pixels of shape '
                       f'{pixels_bhwc.shape}.')
    gh, gw = height // p, width // p
    if gh == 0 or gw == 0:
      raise ValueError(f'image {height}x{width} is smaller than one {p}x{p} patch.')
    # A stride-p conv drops the remainder rows/columns; so does this crop.
    x = pixels_bhwc[:, :gh * p, :gw * p, :].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    # Kernel [p, p, C, D] is the flax conv layout, so checkpoints' OIHW weights map by CONV2D.
    x = layers.Linear((p, p, c), (d,), (None, None, None, 'embed'), use_bias=True, dtype=dtype,
                      param_dtype=param_dtype, name='patch_embed')(x)
    x_bpd = x.reshape(b, gh * gw, d)

    normal = nn.initializers.truncated_normal(stddev=0.02)
    zeros = nn.initializers.zeros_init()
    cls_d = self.param('cls_token', nn.with_logical_partitioning(normal, ('embed',)), (d,),
                       param_dtype)
    if cfg.use_mask_token:
      # Only used by masked-image pretraining; kept so checkpoints round-trip exactly.
      self.param('mask_token', nn.with_logical_partitioning(zeros, ('embed',)), (d,), param_dtype)
    g = cfg.grid_size
    pos = self.param('pos_embed', nn.with_logical_partitioning(normal, (None, 'embed')),
                     (1 + g * g, d), param_dtype)
    patch_pos = pos[1:]
    if (gh, gw) != (g, g):
      # HF resizes in float32 and casts back to the parameter dtype before adding.
      patch_pos = resize_bicubic(pos[1:].reshape(g, g, d), gh, gw,
                                 antialias=cfg.model_type == 'dinov2_with_registers')
      patch_pos = patch_pos.reshape(gh * gw, d).astype(param_dtype)
    cls_d = (cls_d + pos[0]).astype(dtype)
    x_bpd = x_bpd + patch_pos.astype(dtype)
    tokens = [jnp.broadcast_to(cls_d, (b, 1, d))]
    if cfg.model_type == 'dinov2_with_registers':
      # Registers get no position embedding and sit between CLS and the patches.
      reg_rd = self.param('register_tokens', nn.with_logical_partitioning(zeros, (None, 'embed')),
                          (cfg.num_register_tokens, d), param_dtype)
      tokens.append(jnp.broadcast_to(reg_rd.astype(dtype), (b, cfg.num_register_tokens, d)))
    return jnp.concatenate(tokens + [x_bpd], axis=1)

  @nn.compact
  def __call__(self, pixels: Array, return_hidden_states: bool = False) -> VitOutput:
    """Encodes images.

    Args:
      pixels: float[B, Hpx, Wpx, C], normalised. Any size of at least one patch; the position
        embeddings are resized to the patch grid as transformers does.
      return_hidden_states: also return the embeddings and every layer's output.

    Returns:
      A `VitOutput`.
    """
    cfg = self.config
    x_bsd = self._embed(pixels)
    block = Block
    if cfg.remat != 'none':
      # Under scan, CSE across iterations is impossible anyway; outside it, prevent it so the
      # recomputation is not optimised away.
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x_out, ys = stack(cfg, collect=return_hidden_states, name='layers')(x_bsd, None)
      per_layer = tuple(ys) if return_hidden_states else ()
    else:
      x_out, per_layer = x_bsd, []
      for i in range(cfg.num_layers):
        x_out, y = block(cfg, collect=return_hidden_states, name=f'layers_{i}')(x_out)
        per_layer.append(y)
      per_layer = tuple(per_layer)
    last = LayerNorm(eps=cfg.layer_norm_eps, dtype=layers.dtype_of(cfg.dtype),
                     param_dtype=layers.dtype_of(cfg.param_dtype), name='norm')(x_out)
    hidden_states = (x_bsd,) + per_layer if return_hidden_states else None
    return VitOutput(last_hidden_state=last, cls=last[:, 0],
                     patch_tokens=last[:, 1 + cfg.num_register_tokens:],
                     hidden_states=hidden_states)

  def encode_frames(self, frames: Array, return_hidden_states: bool = False) -> VitOutput:
    """Encodes video frames independently, as a batch of B * T images.

    Use as `model.apply(variables, frames, method=VisionTransformer.encode_frames)`.

    Args:
      frames: float[B, T, Hpx, Wpx, C].
      return_hidden_states: as in `__call__`.

    Returns:
      A `VitOutput` whose arrays have a frame axis after the batch axis ([B, T, ...]).
    """
    b, t = frames.shape[:2]
    out = self(frames.reshape(b * t, *frames.shape[2:]), return_hidden_states)
    return jax.tree.map(lambda x: x.reshape(b, t, *x.shape[1:]), out)
