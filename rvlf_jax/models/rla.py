"""RL-gated attention (RLA, DVLA-RL): text tokens mix a cross path and a self path by a gate a.

Shape vocabulary: B batch, T visual tokens, M text tokens, S key/value tokens (T or M), D model
dim, E text dim (the RLA block allows E != D), N heads, H head dim (D / N), G gates (B or 1),
R class-text (reward) dim.

`RLABlock` (one block of the visual encoder; the gate is an input):
  cross = Attn(q = text, kv = visual)          text tokens read the visual tokens
  self  = Attn(q = text, kv = text)            text tokens read each other
  H     = a * cross + (1 - a) * self           [B, M, D], the fused text tokens
  visual' = visual + mean_M(H)                 the pooled fused context, added to every visual token
The caller may append H to the visual tokens for the next layer and drop it after (as the paper
does for one block); the block returns it for that and for the reward.

`StreamRLA` is the text-free variant for fusing two streams (SLT: skeleton and video):
  x' = x + a * Attn(q = x, kv = y) + (1 - a) * Attn(q = x, kv = x).

`GatedRLA` wires a gate policy (`rvlf_jax.models.gates`) to an `RLABlock`: it builds the policy
state from the block's inputs, draws a (or takes the policy's mode, or a fixed value), feeds
stop_gradient(a) to the block, and sows one record per call into the 'gates' collection for the
REINFORCE objective of `rvlf_jax.fewshot.train`.

Inputs are pre-normalised (RMSNorm) inside each block, so the paths see unit-scale tokens;
attention carries no positions: text tokens are a set of attributes and the visual tokens carry
whatever positions the backbone gave them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvlf_jax.models import gates as policy_lib
from rvlf_jax.models import layers
from rvlf_jax.models import skeleton as skel

Array = jax.Array


def gate_column(gate: Array | float, batch: int) -> Array:
  """float32[B, 1, 1] from a gate that is a scalar, float[1] or float[B]."""
  a = jnp.asarray(gate, jnp.float32).reshape(-1)
  if a.shape[0] not in (1, batch):
    raise ValueError(f'A gate must be a scalar or hold 1 or B={batch} values, got {a.shape}.')
  return jnp.broadcast_to(a, (batch,))[:, None, None]


def _attention(d: int, num_heads: int, norm_eps: float, dtype: str, param_dtype: str,
               name: str) -> skel.MultiHeadAttention:
  """The encoders' attention (`skeleton.MultiHeadAttention`), used here without positions:
  text tokens are a set of attributes, and visual tokens carry the positions their backbone
  gave them."""
  config = skel.EncoderConfig(d, 0, num_heads, d, 0.0, norm_eps=norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
  return skel.MultiHeadAttention(config, name=name)


def _attend(attn: skel.MultiHeadAttention, x_btd: Array, ctx_bsd: Array,
            ctx_mask_bs: Array | None) -> Array:
  """Every query attends to every valid key (ctx_mask_bs: bool[B, S], None means all)."""
  if ctx_mask_bs is None:
    ctx_mask_bs = jnp.ones(ctx_bsd.shape[:2], bool)
  return attn(x_btd, ctx_bsd, None, None, skel.key_mask(ctx_mask_bs, x_btd.shape[1]))


class _TwoPaths(nn.Module):
  """Shared by `RLABlock` and `StreamRLA`: queries q [B, M, E] and a context c [B, S, Dc] ->
  a * Attn(q -> c) + (1 - a) * Attn(q -> q), [B, M, D].

  Submodules: 'query_norm', 'context_norm' (RMSNorm), 'cross_attn', 'self_attn'
  (`skeleton.MultiHeadAttention` without positions).

  Attributes:
    num_heads: N of both attention paths.
    norm_eps: RMSNorm epsilon.
  """

  num_heads: int
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def mix(self, d: int, q_bme: Array, c_bsd: Array, gate: Array | float, q_mask_bm: Array | None,
          c_mask_bs: Array | None) -> Array:
    """The gated mix of the two paths (called from the subclass's compact `__call__`)."""
    norm = lambda name: layers.RMSNorm(self.norm_eps, dtype=layers.dtype_of(self.dtype),
                                       param_dtype=layers.dtype_of(self.param_dtype), name=name)
    attn = lambda name: _attention(d, self.num_heads, self.norm_eps, self.dtype,
                                   self.param_dtype, name)
    q, c = norm('query_norm')(q_bme), norm('context_norm')(c_bsd)
    cross = _attend(attn('cross_attn'), q, c, c_mask_bs)
    self_ = _attend(attn('self_attn'), q, q, q_mask_bm)
    a = gate_column(gate, q_bme.shape[0]).astype(cross.dtype)
    return a * cross + (1.0 - a) * self_


class RLABlock(_TwoPaths):
  """The two-path RLA block (module docstring): (visual [B, T, D], text [B, M, E], a) ->
  (visual' [B, T, D], fused text H [B, M, D]); the text tokens are the queries."""

  @nn.compact
  def __call__(self, visual_btd: Array, text_bme: Array, gate: Array | float,
               visual_mask_bt: Array | None = None,
               text_mask_bm: Array | None = None) -> tuple[Array, Array]:
    """Fuses.

    Args:
      visual_btd: visual tokens.
      text_bme: text tokens (attributes, a description).
      gate: a in [0, 1]: a scalar (one per layer) or float[B] (one per example). 1 gives the pure
        cross path, 0 the pure self path.
      visual_mask_bt, text_mask_bm: bool masks of valid tokens, or None (all valid). Padded visual
        tokens get no context; padded text tokens are neither attended to nor pooled.

    Returns:
      (visual' [B, T, D], H [B, M, D]).
    """
    fused_bmd = self.mix(visual_btd.shape[-1], text_bme, visual_btd, gate, text_mask_bm,
                         visual_mask_bt)
    context_b1d = policy_lib.masked_mean(fused_bmd, text_mask_bm)[:, None, :]
    if visual_mask_bt is not None:
      context_b1d = jnp.where(visual_mask_bt[..., None], context_b1d, 0.0)
    return visual_btd + context_b1d.astype(visual_btd.dtype), fused_bmd


class StreamRLA(_TwoPaths):
  """Text-free RLA for two streams: x' = x + a * Attn(x -> y) + (1 - a) * Attn(x -> x)."""

  @nn.compact
  def __call__(self, x_btd: Array, y_bsd: Array, gate: Array | float,
               x_mask_bt: Array | None = None, y_mask_bs: Array | None = None) -> Array:
    """x [B, T, D] (the stream updated), y [B, S, Dy] (the other stream), a scalar or float[B]
    gate, bool masks of valid tokens -> x' [B, T, D]."""
    mixed = self.mix(x_btd.shape[-1], x_btd, y_bsd, gate, x_mask_bt, y_mask_bs)
    return x_btd + mixed.astype(x_btd.dtype)


class GatedRLA(nn.Module):
  """An `RLABlock` whose gate comes from a policy over its own inputs.

  With a 'gate' rng (`apply(..., rngs={'gate': key})`) the gate is sampled (training); without
  one it is the policy's mode (evaluation); `gate.fixed` replaces the policy by a constant. Each
  call sows into the 'gates' collection (collect with `mutable=['gates']`, read with
  `gate_records`) one record:
    'gate'      float32[G] the gate used,
    'log_prob'  float32[G] log-probability of the action under the policy (0 without sampling),
    'entropy'   float32[G] entropy of the policy (0 with a fixed gate),
    'projected' float32[B, R] U GAP(stop_gradient(H)), the reward's projection of the fused
               context into the class-text space,
  with G = 1 (gate.scope 'episode') or B ('example'). Gradients: the block sees
  stop_gradient(a) and the policy sees the stop-gradient of its state, so the supervised loss
  never trains the policy and the policy's loss never trains the backbone.

  Attributes:
    num_heads: N of the block.
    gate: how the gate is chosen (`policy.GateConfig`).
    reward_dim: R, the width of the class-text embeddings t* of the reward; None means D.
  """

  num_heads: int
  gate: policy_lib.GateConfig = policy_lib.GateConfig()
  reward_dim: int | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, visual_btd: Array, text_bmd: Array, visual_mask_bt: Array | None = None,
               text_mask_bm: Array | None = None) -> tuple[Array, Array]:
    """As `RLABlock.__call__` without the gate argument (the text dim must be D here: the
    policy's state compares the pooled visual and text tokens)."""
    gate_g, log_prob_g, entropy_g = self._policy_gate(visual_btd, text_bmd, visual_mask_bt,
                                                      text_mask_bm)
    block = RLABlock(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, name='block')
    visual_btd, fused_bmd = block(visual_btd, text_bmd, jax.lax.stop_gradient(gate_g),
                                  visual_mask_bt, text_mask_bm)
    pooled_bd = jax.lax.stop_gradient(policy_lib.masked_mean(fused_bmd, text_mask_bm))
    d = pooled_bd.shape[-1]
    projected = layers.Linear((d,), (self.reward_dim or d,), ('embed', None),
                              param_dtype=layers.dtype_of(self.param_dtype),
                              name='reward_proj')(pooled_bd)
    self.sow('gates', 'record', {'gate': gate_g, 'log_prob': log_prob_g,
                                 'entropy': entropy_g, 'projected': projected})
    return visual_btd, fused_bmd

  def _policy_gate(self, visual_btd, text_bmd, visual_mask_bt, text_mask_bm):
    """(gate, log_prob, entropy) float32[G] from the policy on the stop-gradient state (or the
    fixed gate)."""
    cfg = self.gate
    visual_gap = policy_lib.masked_mean(jax.lax.stop_gradient(visual_btd), visual_mask_bt)
    text_gap = policy_lib.masked_mean(jax.lax.stop_gradient(text_bmd), text_mask_bm)
    if cfg.scope == 'episode':
      visual_gap = visual_gap.mean(axis=0, keepdims=True)
      text_gap = text_gap.mean(axis=0, keepdims=True)
    return policy_lib.draw_gate(self, cfg, policy_lib.policy_state(visual_gap, text_gap),
                                'policy')


def gate_records(collections: Any) -> list[dict[str, Array]]:
  """The records sown by every `GatedRLA` call, from `apply(...)`'s mutated collections (the
  dict returned with mutable=['gates'], or its 'gates' entry).

  Read inside the trace that ran `apply` (as `train.module_embed` does), the order is the call
  order; collections that crossed a jit boundary come back with their dict keys sorted, so the
  order is then that of the sorted module names. Either way it is the same at every step for a
  given model, which is what the per-layer baselines need.
  """
  tree = collections.get('gates', collections)
  found: list[dict[str, Array]] = []

  def walk(node):
    for key, value in node.items():
      if key == 'record' and isinstance(value, tuple):
        found.extend(value)
      elif hasattr(value, 'items'):
        walk(value)

  walk(tree)
  return found
