"""Keypoint (skeleton) encoder: body parts -> per-frame features -> strided temporal convs ->
bidirectional transformer, giving sign features at a reduced frame rate.

Shape vocabulary: see `rvlf_jax.models.layers` (B, T, S, D, N, H, F), plus
  J keypoints per frame (133 in the COCO-WholeBody layout, fewer for a pre-selected subset),
  C = 3 channels per keypoint (x, y, confidence), P body parts, Q joints of one part, E part
  feature dim (also the hidden width F of each part's MLP), T' = ceil(T / downsample) tokens.

Missing points carry confidence 0 (undetected joints, and every joint of a padded frame). Their
coordinates are zeroed before any parameter sees them, and padded frames are zeroed before every
temporal convolution and hidden from attention, so whatever a batch holds there cannot change the
features of valid tokens.

Also home to the small bidirectional transformer pieces (`EncoderConfig`, `MultiHeadAttention`,
`TransformerEncoder`) that the fusion module and the stage-1 text encoder reuse: pre-norm RMSNorm
layers with RoPE over positions derived from a padding mask, plain multi-head attention (no kv
grouping) and SwiGLU MLPs.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.data import keypoints as kp_layout
from rvlf_jax.models import attention, decoder, layers

Array = jax.Array
Parts = tuple[tuple[str, tuple[int, ...]], ...]


def subset_parts(subset: str = 'cosign77', selected: bool = False) -> Parts:
  """The parts of a named keypoint subset (`rvlf_jax.data.keypoints.SUBSETS`).

  Args:
    subset: the subset's name, e.g. 'cosign77' (body, hands, mouth, face) or 'unisign69'.
    selected: False gives indices into the 133-point layout (batches holding all 133 points);
      True gives indices into the subset's own order (batches already reduced with
      `Featurizer(joints=SUBSETS[subset].indices)`).

  Returns:
    ((part name, joint indices), ...), in the subset's part order.
  """
  sub = kp_layout.SUBSETS[subset]
  parts = []
  for name, (start, stop) in sub.parts.items():
    idx = tuple(range(start, stop)) if selected else tuple(sub.indices[start:stop])
    parts.append((name, idx))
  return tuple(parts)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A bidirectional pre-norm transformer encoder (RoPE, SwiGLU, padding-masked).

  Attributes:
    d_model: D.
    num_layers: L (0 is allowed: the encoder is then the identity).
    num_heads: N; head dim H = D / N must be even (RoPE).
    mlp_dim: F of the gated MLP.
    dropout: rate on each sub-layer's output before its residual add.
    rope_theta: RoPE base wavelength.
    norm_eps: RMSNorm epsilon.
    dtype, param_dtype: computation and parameter dtypes (strings).
  """

  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.1
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f'd_model {self.d_model} is not a multiple of num_heads {self.num_heads}.')
    if self.head_dim % 2:
      raise ValueError(f'head dim {self.head_dim} must be even for RoPE.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}.')
    if self.num_layers < 0:
      raise ValueError(f'num_layers must be >= 0, got {self.num_layers}.')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class SkeletonConfig:
  """Architecture of the keypoint encoder.

  Attributes:
    parts: ((name, joint indices into the batch's J points), ...); each part's joints are
      flattened and embedded by their own MLP. Default: CoSign's 77 points of the 133 layout as
      body, left_hand, right_hand, mouth and face.
    num_joints: J expected in the batch (133, or a subset's size when pre-selected).
    part_dim: E, the width of each part's embedding.
    d_model: D, the width of the frame features and of the temporal transformer.
    num_layers, num_heads, mlp_dim: the temporal transformer (num_layers may be 0).
    dropout: dropout rate (part embeddings, convs, transformer sub-layers).
    temporal_kernel: width of the temporal convolutions (>= every stride).
    temporal_strides: one strided conv per entry; downsample = their product, T' = ceil(T / it).
    rope_theta: RoPE base of the temporal transformer (positions need no maximum).
    norm_eps: RMSNorm epsilon.
    dtype, param_dtype: computation and parameter dtypes (strings).
  """

  parts: Parts = subset_parts('cosign77')
  num_joints: int = kp_layout.NUM_KEYPOINTS
  part_dim: int = 64
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.1
  temporal_kernel: int = 5
  temporal_strides: tuple[int, ...] = (2, 2)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if not self.parts:
      raise ValueError('parts must name at least one part.')
    names = [name for name, _ in self.parts]
    if len(set(names)) != len(names):
      raise ValueError(f'part names must be unique, got {names}.')
    for name, idx in self.parts:
      if not idx:
        raise ValueError(f'part {name!r} has no joints.')
      bad = [i for i in idx if not 0 <= i < self.num_joints]
      if bad:
        raise ValueError(f'part {name!r} has joints {bad} outside [0, {self.num_joints}).')
    if any(s < 1 for s in self.temporal_strides):
      raise ValueError(f'temporal_strides must be positive, got {self.temporal_strides}.')
    if self.temporal_strides and self.temporal_kernel < max(self.temporal_strides):
      raise ValueError(f'temporal_kernel {self.temporal_kernel} is smaller than a stride of '
                       f'{self.temporal_strides}; frames would be skipped.')
    _ = self.encoder  # Validates heads, head dim and dropout.

  @property
  def downsample(self) -> int:
    """The temporal downsampling factor (product of the strides)."""
    return math.prod(self.temporal_strides)

  def num_tokens(self, frames: int) -> int:
    """T' = ceil(T / downsample), the number of output tokens for T input frames."""
    return -(-frames // self.downsample)

  @property
  def encoder(self) -> EncoderConfig:
    """The temporal transformer's config."""
    return EncoderConfig(self.d_model, self.num_layers, self.num_heads, self.mlp_dim,
                         self.dropout, self.rope_theta, self.norm_eps, self.dtype,
                         self.param_dtype)

  def replace(self, **changes) -> 'SkeletonConfig':
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **overrides) -> 'SkeletonConfig':
    """A few thousand parameters, for tests."""
    fields = dict(part_dim=16, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, dropout=0.1,
                  temporal_kernel=3, temporal_strides=(2, 2))
    return cls(**{**fields, **overrides})

  @classmethod
  def base(cls, **overrides) -> 'SkeletonConfig':
    """About 17M parameters: D = 512, 4 transformer layers, 4x temporal downsampling."""
    fields = dict(part_dim=128, d_model=512, num_layers=4, num_heads=8, mlp_dim=1536,
                  dropout=0.1, temporal_kernel=5, temporal_strides=(2, 2))
    return cls(**{**fields, **overrides})


# -- Masks and temporal convolutions -------------------------------------------------------------


def downsample_mask(mask_bt: Array, stride: int) -> Array:
  """bool[B, ceil(T / stride)]: an output step is valid when any frame of its stride is."""
  b, t = mask_bt.shape
  t_out = -(-t // stride)
  padded = jnp.pad(mask_bt.astype(bool), ((0, 0), (0, t_out * stride - t)))
  return padded.reshape(b, t_out, stride).any(axis=-1)


def mask_features(x_btd: Array, mask_bt: Array) -> Array:
  """Zeroes the features of padded steps."""
  return jnp.where(mask_bt[..., None], x_btd, jnp.zeros((), x_btd.dtype))


class TemporalConv(nn.Module):
  """A 1-D convolution over time with stride s: [B, T, D] -> [B, ceil(T / s), F].

  The input is zero-padded to a multiple of s, then by (k - s) // 2 frames before and the rest
  after, so output step t' always sees input frames [t's - (k - s) // 2, ... + k): the alignment
  does not depend on T (the batch's bucket length), only on the stride.

  Attributes:
    features: F.
    kernel: k (>= stride).
    stride: s.
    axes: logical names of the kernel's (in, out) dims. The input dim carries none by default:
      with it split over 'fsdp' on a mesh whose three axes all exceed 1, XLA (jax 0.10.2, CPU)
      computes wrong input gradients through stacked strided convs (tests/test_sharding.py).
  """

  features: int
  kernel: int
  stride: int = 1
  axes: tuple[str | None, str | None] = (None, 'mlp')
  dtype: layers.DType = jnp.float32
  param_dtype: layers.DType = jnp.float32

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    k, s = self.kernel, self.stride
    if k < s:
      raise ValueError(f'{self.name}: kernel {k} smaller than stride {s}.')
    d = x_btd.shape[-1]
    init = nn.initializers.normal(stddev=(k * d)**-0.5)
    w_kdf = self.param('kernel', nn.with_logical_partitioning(init, (None,) + self.axes),
                       (k, d, self.features), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           self.axes[1:]),
                      (self.features,), self.param_dtype)
    t = x_btd.shape[1]
    t_pad = -(-t // s) * s
    before = (k - s) // 2
    x = jnp.pad(x_btd.astype(self.dtype), ((0, 0), (before, t_pad - t + k - s - before), (0, 0)))
    y = jax.lax.conv_general_dilated(x, w_kdf.astype(self.dtype), window_strides=(s,),
                                     padding='VALID', dimension_numbers=('NWC', 'WIO', 'NWC'))
    return y + bias.astype(self.dtype)


class TemporalConvStack(nn.Module):
  """One (masked conv -> RMSNorm -> GELU -> dropout) stage per stride: [B, T, D] -> [B, T', D].

  Attributes:
    features: D out (every stage).
    kernel: conv width.
    strides: one stage per entry; T' = ceil(T / prod(strides)).
    dropout: rate after each stage.
  """

  features: int
  kernel: int
  strides: tuple[int, ...]
  dropout: float = 0.0
  norm_eps: float = 1e-6
  dtype: layers.DType = jnp.float32
  param_dtype: layers.DType = jnp.float32

  @nn.compact
  def __call__(self, x_btd: Array, mask_bt: Array, deterministic: bool = True):
    """Returns (features [B, T', D], zero on padded steps, mask bool[B, T'])."""
    for i, stride in enumerate(self.strides):
      # Zeroing before each conv keeps padded frames out of the valid steps' receptive fields.
      x_btd = mask_features(x_btd, mask_bt)
      x_btd = TemporalConv(self.features, self.kernel, stride, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f'conv_{i}')(x_btd)
      x_btd = layers.RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f'norm_{i}')(x_btd)
      x_btd = jax.nn.gelu(x_btd)
      x_btd = nn.Dropout(self.dropout)(x_btd, deterministic=deterministic)
      mask_bt = downsample_mask(mask_bt, stride)
    return mask_features(x_btd, mask_bt), mask_bt


# -- Bidirectional transformer -------------------------------------------------------------------


def rope_tables(config: EncoderConfig, mask_bt: Array) -> tuple[Array, Array]:
  """RoPE sin, cos float32[B, T, H] for positions counted over valid steps (padding: -1)."""
  positions = decoder.positions_from_mask(mask_bt)
  inv_freq = layers.RopeConfig(theta=config.rope_theta).inv_freq(config.head_dim)
  return layers.rope_sin_cos(positions, inv_freq)


def key_mask(kv_mask_bs: Array, num_queries: int) -> Array:
  """bool[B, 1, T, S]: every query sees every valid key (padded queries' outputs are ignored)."""
  b, s = kv_mask_bs.shape
  return jnp.broadcast_to(kv_mask_bs.astype(bool)[:, None, None, :], (b, 1, num_queries, s))


class MultiHeadAttention(nn.Module):
  """Bidirectional attention of x (queries) over ctx (keys/values) into [B, T, D], both rotated
  by RoPE, or carrying no positions at all (sets of tokens, e.g. a class's attribute texts)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_btd: Array, ctx_bsd: Array, q_rope: tuple[Array, Array] | None,
               k_rope: tuple[Array, Array] | None, mask_b1ts: Array) -> Array:
    """Attends.

    Args:
      x_btd: normalised queries' input (any width; the output has D = config.d_model).
      ctx_bsd: normalised keys' and values' input (x itself for self-attention).
      q_rope, k_rope: (sin, cos) float32[B, T or S, H] of the query / key positions, or both
        None for attention without positions.
      mask_b1ts: key visible to query.

    Returns:
      float[B, T, D].
    """
    cfg = self.config
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    if (q_rope is None) != (k_rope is None):
      raise ValueError('q_rope and k_rope must be both given or both None.')
    linear = lambda name, i, o, axes: layers.Linear(
        i, o, axes, dtype=layers.dtype_of(cfg.dtype),
        param_dtype=layers.dtype_of(cfg.param_dtype), name=name)
    q = linear('q_proj', (x_btd.shape[-1],), (n, h), ('embed', 'heads', 'head_dim'))(x_btd)
    k = linear('k_proj', (ctx_bsd.shape[-1],), (n, h), ('embed', 'heads', 'head_dim'))(ctx_bsd)
    v = linear('v_proj', (ctx_bsd.shape[-1],), (n, h), ('embed', 'heads', 'head_dim'))(ctx_bsd)
    if q_rope is not None:
      q = layers.apply_rope(q, *q_rope)
      k = layers.apply_rope(k, *k_rope)
    out_btnh = attention.attend(q, k, v, mask_b1ts, scale=h**-0.5)
    return linear('o_proj', (n, h), (d,), ('heads', 'head_dim', 'embed'))(out_btnh)


class EncoderLayer(nn.Module):
  """x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_btd: Array, rope: tuple[Array, Array], mask_b1ts: Array,
               deterministic: bool = True) -> Array:
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                       name=name)
    x_btd = nn.with_logical_constraint(x_btd, ('batch', 'length', 'embed'))
    h = norm('attn_norm')(x_btd)
    h = MultiHeadAttention(cfg, name='attn')(h, h, rope, rope, mask_b1ts)
    x_btd = x_btd + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = layers.GatedMLP(cfg.d_model, cfg.mlp_dim, 'silu', dtype=dtype, param_dtype=param_dtype,
                        name='mlp')(norm('mlp_norm')(x_btd))
    return x_btd + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class TransformerEncoder(nn.Module):
  """L bidirectional layers over the valid steps of a sequence (no final norm)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_btd: Array, mask_bt: Array, deterministic: bool = True) -> Array:
    """x [B, T, D], mask bool[B, T] -> [B, T, D]; padded steps see nothing and are seen by none."""
    cfg = self.config
    if cfg.num_layers == 0:
      return x_btd
    rope = rope_tables(cfg, mask_bt)
    mask = key_mask(mask_bt, x_btd.shape[1])
    for i in range(cfg.num_layers):
      x_btd = EncoderLayer(cfg, name=f'layers_{i}')(x_btd, rope, mask, deterministic)
    return x_btd


# -- The skeleton encoder ------------------------------------------------------------------------


class PartEmbed(nn.Module):
  """Every part's joints (x, y, confidence), flattened -> Linear -> GELU -> Linear, one MLP per
  part: [B, T, J, C] -> [B, T, P, E].

  The P MLPs run as one batched einsum: parts are gathered into [B, T, P, Q, 3] with Q the
  largest part, the slots past a smaller part's end are zero (their weights get no signal).

  Attributes:
    parts: ((name, joint indices), ...) as in `SkeletonConfig.parts`.
    features: E.
  """

  parts: Parts
  features: int
  dtype: layers.DType = jnp.float32
  param_dtype: layers.DType = jnp.float32

  @nn.compact
  def __call__(self, keypoints_btj3: Array) -> Array:
    p, e = len(self.parts), self.features
    q = max(len(idx) for _, idx in self.parts)
    index_pq = np.zeros((p, q), np.int32)
    slot_pq = np.zeros((p, q), bool)
    for i, (_, idx) in enumerate(self.parts):
      index_pq[i, :len(idx)] = idx
      slot_pq[i, :len(idx)] = True
    x_btpq3 = keypoints_btj3[:, :, index_pq, :]
    conf = x_btpq3[..., 2]
    seen = (conf > 0) & slot_pq
    # Undetected joints: coordinates are meaningless (often 0, sometimes garbage) -> zeroed, and
    # the confidence channel (0 there) tells the MLP they are absent.
    feats = jnp.where(seen[..., None], x_btpq3, 0.0).astype(self.dtype)

    def param(name, shape, axes, fan_in=None):
      init = (nn.initializers.zeros_init() if fan_in is None
              else nn.initializers.normal(stddev=fan_in**-0.5))
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    w1_pqcf = param('fc1_kernel', (p, q, 3, e), (None, None, None, 'mlp'), fan_in=3 * q)
    b1_pf = param('fc1_bias', (p, e), (None, 'mlp'))
    w2_pfe = param('fc2_kernel', (p, e, e), (None, 'mlp', None), fan_in=e)
    b2_pe = param('fc2_bias', (p, e), (None, None))
    h_btpf = jax.nn.gelu(jnp.einsum('btpqc,pqcf->btpf', feats, w1_pqcf) + b1_pf)
    return jnp.einsum('btpf,pfe->btpe', h_btpf, w2_pfe) + b2_pe


class SkeletonEncoder(nn.Module):
  """Keypoints -> sign features at 1 / downsample of the frame rate.

  parts (one MLP each) -> concat + Linear to D -> RMSNorm, GELU -> temporal conv stack (strided)
  -> transformer encoder -> RMSNorm; padded output steps are zero.
  """

  config: SkeletonConfig

  @nn.compact
  def __call__(self, keypoints: Array, frame_mask: Array, deterministic: bool = True):
    """Encodes a batch of keypoint sequences.

    Args:
      keypoints: float[B, T, J, 3] (x, y, confidence); confidence 0 marks missing points.
      frame_mask: bool[B, T], False on padded frames.
      deterministic: disables dropout (otherwise an rng named 'dropout' is needed).

    Returns:
      (features float[B, T', D], mask bool[B, T']) with T' = ceil(T / downsample).
    """
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    if keypoints.ndim != 4 or keypoints.shape[-2:] != (cfg.num_joints, 3):
      raise ValueError(f'expected keypoints [B, T, {cfg.num_joints}, 3], got {keypoints.shape}.')
    keypoints = jnp.asarray(keypoints, jnp.float32)
    frame_mask = jnp.asarray(frame_mask).astype(bool)
    # Padded frames are treated as entirely undetected, whatever they hold.
    conf = jnp.where(frame_mask[..., None], keypoints[..., 2], 0.0)
    keypoints = keypoints.at[..., 2].set(conf)
    x_btpe = PartEmbed(cfg.parts, cfg.part_dim, dtype, param_dtype, name='parts')(keypoints)
    x_btd = layers.Linear((len(cfg.parts), cfg.part_dim), (cfg.d_model,), (None, None, 'embed'),
                          use_bias=True, dtype=dtype, param_dtype=param_dtype,
                          name='merge_parts')(x_btpe)
    x_btd = layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                           name='merge_norm')(x_btd)
    x_btd = nn.Dropout(cfg.dropout)(jax.nn.gelu(x_btd), deterministic=deterministic)
    x_btd, mask_bt = TemporalConvStack(cfg.d_model, cfg.temporal_kernel, cfg.temporal_strides,
                                       cfg.dropout, cfg.norm_eps, dtype, param_dtype,
                                       name='temporal')(x_btd, frame_mask, deterministic)
    x_btd = TransformerEncoder(cfg.encoder, name='encoder')(x_btd, mask_bt, deterministic)
    x_btd = layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                           name='final_norm')(x_btd)
    return mask_features(x_btd, mask_bt), mask_bt
