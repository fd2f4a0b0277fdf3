"""The few-shot sign encoder: keypoints -> skeleton stem -> transformer layers with RLA blocks
(DVLA-RL) after some of them -> one embedding per clip.

Shape vocabulary: B clips, T frames, J joints, T' = ceil(T / downsample) sign tokens, D model
dim, M text tokens, E text-embedding dim.

    stem      `skeleton.SkeletonEncoder` with no transformer layers (parts, temporal convs, norm)
    layers    `skeleton.EncoderLayer` x num_layers over the T' tokens
    RLA       after each layer listed in `rla_at`: a `rla.GatedRLA` block whose text tokens are
              the episode's class semantics (`fewshot.dsc`), projected from E to D; its fused
              text tokens H join the token sequence for the next layer only (as in DVLA-RL),
              then are dropped
    output    RMSNorm, then the mean over valid tokens: float32[B, D]

The text tokens are the same for every clip of an episode (all N classes' attributes and
descriptions, never the clip's own class), so support and query clips are embedded alike and no
label reaches a query. With `rla_at = ()` the encoder reads no text at all: the prototype
baseline without text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvlf_jax.models import gates, layers, rla
from rvlf_jax.models import skeleton as skel
from rvlf_jax.models.skeleton import SkeletonConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FewShotModelConfig:
  """The few-shot encoder.

  Attributes:
    skeleton: the stem (its `num_layers` is ignored: the layers here replace them) and the
      width, heads, MLP and dropout of the layers.
    num_layers: transformer layers after the stem.
    rla_at: indices of the layers after which an RLA block runs (DVLA-RL: one early, one
      late); () for no text.
    gate: how each RLA block chooses its gate (`gates.GateConfig`).
    text_dim: E, the width of the text tokens fed in.
    append_fused: the fused text tokens H join the next layer's sequence (DVLA-RL); False adds
      only their pooled context to the sign tokens.
  """

  skeleton: SkeletonConfig = SkeletonConfig()
  num_layers: int = 4
  rla_at: tuple[int, ...] = (0, 3)
  gate: gates.GateConfig = gates.GateConfig()
  text_dim: int = 128
  append_fused: bool = True

  def __post_init__(self):
    bad = [i for i in self.rla_at if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f'rla_at {self.rla_at}: layers {bad} do not exist (num_layers '
                       f'{self.num_layers}).')
    if len(set(self.rla_at)) != len(self.rla_at):
      raise ValueError(f'rla_at {self.rla_at} lists a layer twice.')

  @property
  def uses_text(self) -> bool:
    return bool(self.rla_at)

  @property
  def encoder(self) -> skel.EncoderConfig:
    return dataclasses.replace(self.skeleton.encoder, num_layers=self.num_layers)

  def replace(self, **changes) -> FewShotModelConfig:
    return dataclasses.replace(self, **changes)


def _no_rotation(b: int, m: int, h: int) -> tuple[Array, Array]:
  """RoPE tables (sin 0, cos 1) for M appended text tokens: a set carries no positions."""
  return jnp.zeros((b, m, h), jnp.float32), jnp.ones((b, m, h), jnp.float32)


class FewShotEncoder(nn.Module):
  """Clips (and, with RLA, the episode's text tokens) -> embeddings (module docstring)."""

  config: FewShotModelConfig

  @nn.compact
  def __call__(self, inputs: Mapping[str, Array], deterministic: bool = True) -> Array:
    """Embeds a batch of clips.

    Args:
      inputs: 'keypoints' float[B, T, J, 3], 'frame_mask' bool[B, T]; with RLA also 'text'
        float[B, M, E] and 'text_mask' bool[B, M].
      deterministic: disables dropout (otherwise an rng named 'dropout' is needed). The gates
        are sampled when an rng named 'gate' is given, the policies' modes otherwise.

    Returns:
      float32[B, D].
    """
    cfg = self.config
    enc = cfg.encoder
    dtype, param_dtype = layers.dtype_of(enc.dtype), layers.dtype_of(enc.param_dtype)
    stem = cfg.skeleton.replace(num_layers=0)
    x_btd, mask_bt = skel.SkeletonEncoder(stem, name='stem')(
        inputs['keypoints'], inputs['frame_mask'], deterministic)
    if cfg.uses_text:
      for key in ('text', 'text_mask'):
        if key not in inputs:
          raise KeyError(f'the few-shot encoder with RLA blocks (rla_at={cfg.rla_at}) needs '
                         f'inputs[{key!r}].')
      text_mask_bm = jnp.asarray(inputs['text_mask']).astype(bool)
      text_bmd = layers.Linear((cfg.text_dim,), (enc.d_model,), (None, 'embed'), use_bias=True,
                               dtype=dtype, param_dtype=param_dtype,
                               name='text_proj')(jnp.asarray(inputs['text'], jnp.float32))
      text_bmd = layers.RMSNorm(enc.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                name='text_norm')(text_bmd)
    b, t = mask_bt.shape
    rope = skel.rope_tables(enc, mask_bt)
    fused = None  # (H [B, M, D], its mask) of the RLA block just before, for one layer
    for i in range(cfg.num_layers):
      layer = skel.EncoderLayer(enc, name=f'layers_{i}')
      if fused is None:
        x_btd = layer(x_btd, rope, skel.key_mask(mask_bt, t), deterministic)
      else:
        h_bmd, h_mask_bm = fused
        m = h_bmd.shape[1]
        joint_mask = jnp.concatenate([mask_bt, h_mask_bm], axis=1)
        text_rope = _no_rotation(b, m, enc.head_dim)
        joint_rope = tuple(jnp.concatenate([r, s], axis=1) for r, s in zip(rope, text_rope))
        y = layer(jnp.concatenate([x_btd, h_bmd.astype(x_btd.dtype)], axis=1), joint_rope,
                  skel.key_mask(joint_mask, t + m), deterministic)
        x_btd = y[:, :t]
        fused = None
      if i in cfg.rla_at:
        x_btd, h_bmd = rla.GatedRLA(enc.num_heads, cfg.gate, reward_dim=cfg.text_dim,
                                    dtype=enc.dtype, param_dtype=enc.param_dtype,
                                    name=f'rla_{i}')(
            x_btd, text_bmd, mask_bt, text_mask_bm)
        if cfg.append_fused:
          fused = (h_bmd, text_mask_bm)
      x_btd = skel.mask_features(x_btd, mask_bt)
    x_btd = layers.RMSNorm(enc.norm_eps, dtype=dtype, param_dtype=param_dtype,
                           name='output_norm')(x_btd)
    return gates.masked_mean(x_btd, mask_bt)
