"""Grouped-query attention, position-based masks and the KV cache.

Shape vocabulary: see `rvlf_jax.models.layers` (B, T, S, D, N, K, G, H, L).

Masks are built from token *positions* rather than slot indices: every query and key carries its
position in the sequence, and position -1 marks padding (or an empty cache slot). Causal,
padding and sliding-window masking then all follow from comparing positions, for full forwards
and cached decoding alike, with left or right padding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvlf_jax.models import layers

Array = jax.Array
NEG_INF = -2.3819763e38  # finite, so fully masked (padding) rows give finite outputs, no NaN.


def make_mask(q_pos_bt: Array, k_pos_bs: Array, window: int | None = None) -> Array:
  """Boolean mask bool[B, 1, T, S]: key visible to query.

  A key is visible when it is not padding (position >= 0), not in the future, and, with a
  sliding window, fewer than `window` positions back (as transformers' sliding_window_overlay).
  """
  q = q_pos_bt[:, None, :, None]
  k = k_pos_bs[:, None, None, :]
  mask = (k >= 0) & (k <= q)
  if window is not None:
    mask &= (q - k) < window
  return mask


def attend(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_b1ts: Array, scale: float,
           logit_cap: float | None = None) -> Array:
  """softmax(scale * q k^T [+ soft-cap], masked) v, with K kv heads shared by N = K * G queries.

  Without soft-capping this goes through `jax.nn.dot_product_attention`, so XLA/cuDNN fused
  kernels are used where they exist; soft-capping (Gemma 2) needs the logits, so it takes an
  explicit einsum path.
  """
  if logit_cap is None:
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, k_bskh).astype(jnp.float32) * scale
  logits = layers.softcap(logits, logit_cap)
  logits = jnp.where(mask_b1ts[:, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v_bskh)
  return out.reshape(b, t, n, h)


def attend_with_prefix(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_b1ts: Array,
                       prefix_k_bpkh: Array, prefix_v_bpkh: Array, prefix_mask_b1tp: Array,
                       scale: float, logit_cap: float | None = None) -> Array:
  """Attention over a shared prefix cache and a per-sample cache, one softmax over both.

  For group sampling, G samples continue one prefilled prompt: the prefix keys/values are the
  same for all G, so under `jax.vmap` over the group they stay unbatched (in_axes=None) and the
  q.k products become one contraction with G as a free dimension, instead of G copies of the
  prefix. The two partial softmaxes are merged exactly through a shared running maximum.
  """
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)

  def logits(keys, mask):
    z = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, keys).astype(jnp.float32) * scale
    return jnp.where(mask[:, :, None], layers.softcap(z, logit_cap), NEG_INF)

  z_p = logits(prefix_k_bpkh, prefix_mask_b1tp)
  z_s = logits(k_bskh, mask_b1ts)
  m = jnp.maximum(z_p.max(axis=-1, keepdims=True), z_s.max(axis=-1, keepdims=True))
  p_p, p_s = jnp.exp(z_p - m), jnp.exp(z_s - m)
  total = p_p.sum(axis=-1, keepdims=True) + p_s.sum(axis=-1, keepdims=True)
  dtype = v_bskh.dtype
  out = (jnp.einsum('bkgts,bskh->btkgh', (p_p / total).astype(dtype), prefix_v_bpkh) +
         jnp.einsum('bkgts,bskh->btkgh', (p_s / total).astype(dtype), v_bskh))
  return out.reshape(b, t, n, h)


def init_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32) -> dict[str, Array]:
  """An empty KV cache.

  Returns:
    {'k', 'v': [L, B, S, K, H] zeros, 'pos': int32[B, S] all -1 (empty), 'index': int32[] next
    slot to write}. A pytree, passed to and returned by the decoder, never hidden in flax state.
  """
  shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
  return {
      'k': jnp.zeros(shape, dtype),
      'v': jnp.zeros(shape, dtype),
      'pos': jnp.full((batch, max_len), -1, jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def write_positions(cache: dict[str, Array], positions_bt: Array) -> dict[str, Array]:
  """Records the positions of T new tokens in slots [index, index + T) and advances index."""
  pos = jax.lax.dynamic_update_slice(cache['pos'], positions_bt.astype(jnp.int32),
                                     (0, cache['index']))
  return {**cache, 'pos': pos, 'index': cache['index'] + positions_bt.shape[1]}


def write_kv(k_cache_bskh: Array, v_cache_bskh: Array, index: Array, k_btkh: Array,
             v_btkh: Array) -> tuple[Array, Array]:
  """Writes one layer's new keys and values into its cache slots starting at `index`."""
  start = (0, index, 0, 0)
  k = jax.lax.dynamic_update_slice(k_cache_bskh, k_btkh.astype(k_cache_bskh.dtype), start)
  v = jax.lax.dynamic_update_slice(v_cache_bskh, v_btkh.astype(v_cache_bskh.dtype), start)
  return k, v


class Attention(nn.Module):
  """Multi-head attention with grouped kv heads, RoPE, optional QK-norm, bias and soft-capping.

  Attributes:
    config: the decoder's `DecoderConfig` (its attention fields).
    lora: adapters for the projections named in lora.targets, or None.
  """

  config: Any
  lora: layers.LoraConfig | None = None

  @nn.compact
  def __call__(self, x_btd: Array, sin_bth: Array, cos_bth: Array, mask_b1ts: Array,
               kv_cache: tuple[Array, Array, Array] | None = None,
               prefix: tuple[Array, Array, Array] | None = None):
    """Attends x to itself, or to the cache after writing x's keys into it.

    Args:
      x_btd: normalised input.
      sin_bth, cos_bth: rotary tables for the query positions.
      mask_b1ts: visibility; S = T without cache, S = cache length with it.
      kv_cache: (k [B, S, K, H], v [B, S, K, H], index) of this layer, or None.
      prefix: (k [B, P, K, H], v [B, P, K, H], mask bool[B, 1, T, P]) of a read-only prefix
        cache that x also attends to (shared by a group of samples), or None.

    Returns:
      (output [B, T, D], updated (k, v) or None).
    """
    cfg = self.config
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)

    def proj(name, in_shape, out_shape, axes, bias):
      lora = self.lora if self.lora is not None and name in self.lora.targets else None
      return layers.Linear(in_shape, out_shape, axes, use_bias=bias, lora=lora, dtype=dtype,
                           param_dtype=param_dtype, name=name)

    q = proj('q_proj', (d,), (n, h), ('embed', 'heads', 'head_dim'), cfg.attention_bias)(x_btd)
    key = proj('k_proj', (d,), (k, h), ('embed', 'kv_heads', 'head_dim'), cfg.attention_bias)(x_btd)
    value = proj('v_proj', (d,), (k, h), ('embed', 'kv_heads', 'head_dim'),
                 cfg.attention_bias)(x_btd)
    if cfg.qk_norm:
      norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, cfg.norm_unit_offset, 'head_dim',
                                         dtype=dtype, param_dtype=param_dtype, name=name)
      q, key = norm('q_norm')(q), norm('k_norm')(key)
    q = layers.apply_rope(q, sin_bth, cos_bth)
    key = layers.apply_rope(key, sin_bth, cos_bth)
    new_cache = None
    if kv_cache is not None:
      k_cache, v_cache, index = kv_cache
      key, value = write_kv(k_cache, v_cache, index, key, value)
      new_cache = (key, value)
    scale = (cfg.query_pre_attn_scalar or h)**-0.5
    if prefix is None:
      out_btnh = attend(q, key.astype(dtype), value.astype(dtype), mask_b1ts, scale,
                        cfg.attn_logit_softcap)
    else:
      k_p, v_p, mask_p = prefix
      out_btnh = attend_with_prefix(q, key.astype(dtype), value.astype(dtype), mask_b1ts,
                                    k_p.astype(dtype), v_p.astype(dtype), mask_p, scale,
                                    cfg.attn_logit_softcap)
    out = proj('o_proj', (n, h), (d,), ('heads', 'head_dim', 'embed'), cfg.o_bias)(out_btnh)
    return out, new_cache
