"""Sign encoder: skeleton features + per-frame DINOv2 features fused into sign tokens, and the
projector that maps sign tokens into a decoder's embedding space.

Shape vocabulary: see `rvlf_jax.models.layers` and `rvlf_jax.models.skeleton` (B, T, J, D, F,
T' = ceil(T / downsample)), plus Dv the width of the cached visual features.

Both streams are downsampled in time by strided convolutions with the same total factor, so
they stay aligned step for step: token t' of either stream summarises frames
[t' * downsample, (t' + 1) * downsample). Masks are downsampled with "any frame valid", which
composes exactly across stages, so both streams get the same token mask. At 4x, a 10 s clip at
12-25 fps (120-250 frames) becomes 30-63 tokens.

Mode 'rla' (RL-gated attention, `rvlf_jax.models.rla.StreamRLA`) stacks `rla_layers` layers of
  x' = x + a * Attn(x -> v) + (1 - a) * Attn(x -> x),   then x' + MLP(norm(x')),
starting from the skeleton tokens x = s, with one gate a in [0, 1] per example and layer drawn
by a policy (`rvlf_jax.models.gates`) over the stop-gradient pooled streams. With a 'gate' rng
the gate is sampled, otherwise it is the policy's mode; every layer sows a record {'gate',
'log_prob', 'entropy'} (float32[B]) into the 'gates' collection for the REINFORCE objective of
the training steps (`rvlf_jax.train.sft`). The task loss never trains the policy (its state and
the gate are stop-gradients).

Ablations: `skeleton_only` never reads the batch's 'visual' (it may be absent) and creates no
visual parameters; `visual_only` never reads 'keypoints' and creates no skeleton parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvlf_jax.models import gates as policy_lib
from rvlf_jax.models import layers
from rvlf_jax.models import rla
from rvlf_jax.models import skeleton as skel
from rvlf_jax.models.skeleton import SkeletonConfig

Array = jax.Array
MODES = ('gated_sum', 'cross_attention', 'concat', 'rla')


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """The visual stream and how it is fused with the skeleton stream.

  Attributes:
    mode: 'gated_sum' (g * skeleton + (1 - g) * visual, g = sigmoid(W [s; v] + b) per channel),
      'cross_attention' (skeleton tokens attend to visual tokens, residual + MLP), 'concat'
      (W [s; v] + b) or 'rla' (RL-gated attention, see the module docstring).
    skeleton_only: use the keypoints alone (ablation); mode is then unused.
    visual_only: use the visual features alone (ablation); mode is then unused.
    visual_dim: Dv of the batch's 'visual' features (e.g. 768 for a DINOv2-base CLS token).
    d_model: D, the sign token width (must equal the skeleton's d_model).
    visual_kernel: width of the visual stream's temporal convolutions.
    visual_strides: strides of the visual stream's temporal convs; None uses the skeleton's. Their
      product must equal the skeleton's downsampling when both streams are used.
    num_layers: transformer layers over the fused tokens (0: none).
    num_heads, mlp_dim: of the cross-attention and of the layers after fusion.
    dropout: dropout rate in the visual stream and fusion.
    visual_drop: in training, the probability that an example's sign tokens come from its
      skeleton stream alone (the visual stream and fusion skipped for it): modality dropout, so
      that the translator does not lean on frame features that identify training clips rather
      than signs. 0 keeps both streams always; unused by the ablations.
    rla_layers: L, the number of RLA layers of mode 'rla' (one gate each).
    gate_kind: mode 'rla': the gate distribution, 'beta' or 'categorical' (`gates.GateConfig`).
    gate_concentration: mode 'rla': k of the Beta gate (larger explores less).
    gate_fixed: mode 'rla': a constant gate in [0, 1] instead of the policy (ablation), or None.
    rope_theta, norm_eps: as in `skeleton.EncoderConfig`.
    dtype, param_dtype: computation and parameter dtypes (strings).
  """

  mode: str = 'gated_sum'
  skeleton_only: bool = False
  visual_only: bool = False
  visual_dim: int = 768
  d_model: int = 256
  visual_kernel: int = 5
  visual_strides: tuple[int, ...] | None = None
  num_layers: int = 0
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.1
  visual_drop: float = 0.0
  rla_layers: int = 2
  gate_kind: str = 'beta'
  gate_concentration: float = 10.0
  gate_fixed: float | None = None
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'Unknown fusion mode {self.mode!r}; choose among {MODES}.')
    if self.skeleton_only and self.visual_only:
      raise ValueError('skeleton_only and visual_only exclude each other.')
    if self.visual_strides is not None and any(s < 1 for s in self.visual_strides):
      raise ValueError(f'visual_strides must be positive, got {self.visual_strides}.')
    if not 0.0 <= self.visual_drop < 1.0:
      raise ValueError(f'visual_drop must be in [0, 1), got {self.visual_drop}.')
    if self.rla_layers < 1:
      raise ValueError(f'rla_layers must be at least 1, got {self.rla_layers}.')
    _ = self.gate  # Validates the gate fields.
    _ = self.encoder  # Validates heads and dropout.

  @property
  def uses_skeleton(self) -> bool:
    return not self.visual_only

  @property
  def uses_visual(self) -> bool:
    return not self.skeleton_only

  @property
  def uses_rla(self) -> bool:
    """Mode 'rla' with both streams: the encoder has gate policies and sows gate records."""
    return self.mode == 'rla' and self.uses_skeleton and self.uses_visual

  @property
  def gate(self) -> policy_lib.GateConfig:
    """The RLA layers' gate: one per example (scope 'example')."""
    return policy_lib.GateConfig(kind=self.gate_kind, concentration=self.gate_concentration,
                                 scope='example', fixed=self.gate_fixed)

  @property
  def encoder(self) -> skel.EncoderConfig:
    """Config of the cross-attention and of the layers after fusion."""
    return skel.EncoderConfig(self.d_model, self.num_layers, self.num_heads, self.mlp_dim,
                              self.dropout, self.rope_theta, self.norm_eps, self.dtype,
                              self.param_dtype)

  def replace(self, **changes) -> 'FusionConfig':
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SignEncoderConfig:
  """The skeleton encoder, the visual stream and their fusion.

  Attributes:
    skeleton: the keypoint encoder (its strides also set the visual stream's by default).
    fusion: the visual stream and fusion.
  """

  skeleton: SkeletonConfig = SkeletonConfig()
  fusion: FusionConfig = FusionConfig()

  def __post_init__(self):
    if self.skeleton.d_model != self.fusion.d_model:
      raise ValueError(f'skeleton d_model {self.skeleton.d_model} != fusion d_model '
                       f'{self.fusion.d_model}.')
    if (self.fusion.uses_skeleton and self.fusion.uses_visual
        and math.prod(self.visual_strides) != self.skeleton.downsample):
      raise ValueError(f'visual strides {self.visual_strides} downsample by '
                       f'{math.prod(self.visual_strides)}, the skeleton by '
                       f'{self.skeleton.downsample}; the streams would not align.')
    if self.fusion.uses_visual and self.visual_strides and (
        self.fusion.visual_kernel < max(self.visual_strides)):
      raise ValueError(f'visual_kernel {self.fusion.visual_kernel} is smaller than a stride of '
                       f'{self.visual_strides}.')

  @property
  def d_model(self) -> int:
    return self.fusion.d_model

  @property
  def visual_strides(self) -> tuple[int, ...]:
    s = self.fusion.visual_strides
    return self.skeleton.temporal_strides if s is None else s

  @property
  def downsample(self) -> int:
    if self.fusion.uses_skeleton:
      return self.skeleton.downsample
    return math.prod(self.visual_strides)

  def num_tokens(self, frames: int) -> int:
    """T' = ceil(T / downsample)."""
    return -(-frames // self.downsample)

  def replace(self, **changes) -> 'SignEncoderConfig':
    return dataclasses.replace(self, **changes)

  def with_fusion(self, **changes) -> 'SignEncoderConfig':
    """A copy with some fusion fields changed (e.g. `with_fusion(skeleton_only=True)`)."""
    return dataclasses.replace(self, fusion=self.fusion.replace(**changes))

  @classmethod
  def tiny(cls, visual_dim: int = 24, **fusion) -> 'SignEncoderConfig':
    """Tiny skeleton encoder (D = 32) and fusion, for tests."""
    sk = SkeletonConfig.tiny()
    fields = dict(visual_dim=visual_dim, d_model=sk.d_model, visual_kernel=3, num_heads=2,
                  mlp_dim=64, dropout=0.1)
    return cls(sk, FusionConfig(**{**fields, **fusion}))

  @classmethod
  def base(cls, visual_dim: int = 768, **fusion) -> 'SignEncoderConfig':
    """`SkeletonConfig.base()` (D = 512, 4x downsampling) with DINOv2-base CLS features."""
    sk = SkeletonConfig.base()
    fields = dict(visual_dim=visual_dim, d_model=sk.d_model, visual_kernel=5, num_layers=2,
                  num_heads=8, mlp_dim=1536, dropout=0.1)
    return cls(sk, FusionConfig(**{**fields, **fusion}))


class VisualStream(nn.Module):
  """Cached per-frame features -> RMSNorm -> Linear(Dv -> D) -> GELU -> strided temporal convs."""

  config: FusionConfig
  strides: tuple[int, ...]

  @nn.compact
  def __call__(self, visual_btv: Array, frame_mask: Array, deterministic: bool = True):
    """float[B, T, Dv], bool[B, T] -> (float[B, T', D] zero on padding, bool[B, T'])."""
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    if visual_btv.ndim != 3 or visual_btv.shape[-1] != cfg.visual_dim:
      raise ValueError(f'expected visual features [B, T, {cfg.visual_dim}], got '
                       f'{visual_btv.shape}.')
    # DINOv2 features have large, uneven scales: normalise each frame before projecting.
    x = skel.mask_features(jnp.asarray(visual_btv, jnp.float32), frame_mask)
    x = layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name='input_norm')(x)
    x = layers.Linear((cfg.visual_dim,), (cfg.d_model,), (None, 'embed'), use_bias=True,
                      dtype=dtype, param_dtype=param_dtype, name='proj')(x)
    x = nn.Dropout(cfg.dropout)(jax.nn.gelu(x), deterministic=deterministic)
    return skel.TemporalConvStack(cfg.d_model, cfg.visual_kernel, self.strides, cfg.dropout,
                                  cfg.norm_eps, dtype, param_dtype,
                                  name='temporal')(x, frame_mask, deterministic)


class SignEncoder(nn.Module):
  """Skeleton encoder + visual stream + fusion (+ transformer layers) -> sign tokens."""

  config: SignEncoderConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True):
    """Encodes a batch.

    Args:
      batch: 'frame_mask' bool[B, T]; 'keypoints' float[B, T, J, 3] unless visual_only;
        'visual' float[B, T, Dv] unless skeleton_only. Other keys are ignored.
      deterministic: disables dropout (otherwise an rng named 'dropout' is needed).

    Returns:
      (tokens float[B, T', D], zero on padded steps; mask bool[B, T']).
    """
    cfg = self.config
    fcfg = cfg.fusion
    dtype, param_dtype = layers.dtype_of(fcfg.dtype), layers.dtype_of(fcfg.param_dtype)
    frame_mask = jnp.asarray(batch['frame_mask']).astype(bool)
    for key, used in (('keypoints', fcfg.uses_skeleton), ('visual', fcfg.uses_visual)):
      if used and key not in batch:
        raise KeyError(f'the sign encoder needs batch[{key!r}] (skeleton_only='
                       f'{fcfg.skeleton_only}, visual_only={fcfg.visual_only}).')
    s = v = None
    if fcfg.uses_skeleton:
      s, mask = skel.SkeletonEncoder(cfg.skeleton, name='skeleton')(
          batch['keypoints'], frame_mask, deterministic)
    if fcfg.uses_visual:
      v, mask = VisualStream(fcfg, cfg.visual_strides, name='visual')(
          batch['visual'], frame_mask, deterministic)

    drop = lambda x: nn.Dropout(fcfg.dropout)(x, deterministic=deterministic)
    norm = lambda name: layers.RMSNorm(fcfg.norm_eps, dtype=dtype,
                                       param_dtype=param_dtype, name=name)
    if v is None:
      x = s
    elif s is None:
      x = v
    elif fcfg.mode == 'gated_sum':
      gate = layers.Linear((2, fcfg.d_model), (fcfg.d_model,), (None, 'embed', 'mlp'),
                           use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           name='gate')(jnp.stack([s, v], axis=-2))
      gate = jax.nn.sigmoid(gate)
      x = gate * s + (1.0 - gate) * drop(v)
    elif fcfg.mode == 'concat':
      x = layers.Linear((2, fcfg.d_model), (fcfg.d_model,), (None, 'mlp', 'embed'),
                        use_bias=True, dtype=dtype, param_dtype=param_dtype,
                        name='merge')(jnp.stack([s, drop(v)], axis=-2))
    elif fcfg.mode == 'rla':
      x = s
      for i in range(fcfg.rla_layers):
        gate_b, log_prob_b, entropy_b = _draw_gate(self, fcfg.gate, x, v, mask, f'rla_policy_{i}')
        x = rla.StreamRLA(fcfg.num_heads, fcfg.norm_eps, fcfg.dtype, fcfg.param_dtype,
                          name=f'rla_{i}')(x, drop(v), jax.lax.stop_gradient(gate_b), mask, mask)
        h = layers.GatedMLP(fcfg.d_model, fcfg.mlp_dim, 'silu', dtype=dtype,
                            param_dtype=param_dtype, name=f'rla_mlp_{i}')(
                                norm(f'rla_mlp_norm_{i}')(x))
        x = x + drop(h)
        self.sow('gates', 'record', {'gate': gate_b, 'log_prob': log_prob_b,
                                     'entropy': entropy_b})
    else:  # cross_attention
      enc = fcfg.encoder
      rope = skel.rope_tables(enc, mask)
      h = skel.MultiHeadAttention(enc, name='cross_attn')(
          norm('query_norm')(s), norm('context_norm')(v), rope, rope,
          skel.key_mask(mask, s.shape[1]))
      x = s + drop(h)
      h = layers.GatedMLP(fcfg.d_model, fcfg.mlp_dim, 'silu', dtype=dtype,
                          param_dtype=param_dtype, name='cross_mlp')(norm('cross_mlp_norm')(x))
      x = x + drop(h)
    if s is not None and v is not None and fcfg.visual_drop and not deterministic:
      skeleton_alone = jax.random.bernoulli(self.make_rng('dropout'), fcfg.visual_drop,
                                            (x.shape[0], 1, 1))
      x = jnp.where(skeleton_alone, s, x)
    x = skel.TransformerEncoder(fcfg.encoder, name='encoder')(x, mask, deterministic)
    x = norm('output_norm')(x)
    return skel.mask_features(x, mask), mask


def _draw_gate(module: nn.Module, gate: policy_lib.GateConfig, x_btd: Array, v_btd: Array,
               mask_bt: Array, name: str) -> tuple[Array, Array, Array]:
  """(gate, log_prob, entropy) float32[B] of one RLA layer of `module` (scope 'example').

  The policy `name` reads the stop-gradient state [GAP(x); GAP(v); cos]; with a 'gate' rng the
  gate is sampled (log_prob of the stop-gradient action), without one it is the policy's mode
  (log_prob 0); a fixed gate gives zero log_prob and entropy and creates no policy.
  """
  state_bs = policy_lib.policy_state(
      policy_lib.masked_mean(jax.lax.stop_gradient(x_btd), mask_bt),
      policy_lib.masked_mean(jax.lax.stop_gradient(v_btd), mask_bt))
  # Created in the parent's scope (compact), so its parameters sit at sign_encoder/`name`.
  return policy_lib.draw_gate(module, gate, state_bs, name)


class Projector(nn.Module):
  """Sign tokens into a decoder's embedding space: Linear -> GELU -> Linear, [B, T, D] ->
  [B, T, D_llm].

  Attributes:
    out_dim: the decoder's hidden size.
    hidden_dim: the middle width (None: out_dim).
  """

  out_dim: int
  hidden_dim: int | None = None
  dtype: layers.DType = jnp.float32
  param_dtype: layers.DType = jnp.float32

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    f = self.hidden_dim or self.out_dim
    linear = lambda name, i, o, axes: layers.Linear(
        i, o, axes, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h_btf = linear('fc1', (x_btd.shape[-1],), (f,), (None, 'mlp'))(x_btd)
    h_btf = jax.nn.gelu(h_btf)
    return linear('fc2', (f,), (self.out_dim,), ('mlp', 'embed'))(h_btf)
