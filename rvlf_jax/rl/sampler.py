"""Group sampling for GRPO: each prompt prefilled once, G continuations vmapped over the group.

The prompt (instruction + sign tokens, as embeddings) of each of the B examples is prefilled once
into a prefix KV cache. The G samples of a group then decode with per-sample RNG keys: one step
of one sample is written for a [B] batch, and `jax.vmap` over G runs the group, with the prefix
cache passed unbatched (in_axes=None) so that it is shared, not copied. All steps run inside one
`jax.lax.while_loop`, which stops early once every sample has produced eos.

Shape vocabulary: B prompts, G samples per prompt, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rvlf_jax.eval import decoding
from rvlf_jax.models import decoder

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn.

  Attributes:
    temperature: logits are divided by it; 0 means greedy.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
    max_new_tokens: N.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f'Invalid sampling settings: {self}.')
    if self.max_new_tokens <= 0:
      raise ValueError(f'max_new_tokens must be positive, got {self.max_new_tokens}.')


def sample_token(logits_bv: Array, key: Array, config: SamplingConfig) -> tuple[Array, Array]:
  """Draws one token per row.

  Returns:
    (tokens int32[B], log-probabilities float32[B] of those tokens under softmax(logits / T),
    i.e. the policy the GRPO update differentiates; top-k / top-p only restrict the draw).
  """
  logits = logits_bv.astype(jnp.float32)
  if config.temperature == 0:
    tokens = decoding.first_argmax(logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    logits = logits / config.temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    masked = logits
    if config.top_k:
      kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
      masked = jnp.where(logits < kth, -jnp.inf, masked)
    if config.top_p < 1.0:
      order = jnp.argsort(-masked, axis=-1)
      sorted_logits = jnp.take_along_axis(masked, order, axis=-1)
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      # Keep a token while the mass before it is below p: the most likely one always stays.
      keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < config.top_p
      keep = jnp.zeros_like(keep_sorted).at[
          jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
      masked = jnp.where(keep, masked, -jnp.inf)
    # The Gumbel-max draw of `jax.random.categorical` (same key, same tokens), with argmax as
    # two plain reductions: XLA:CPU's variadic argmax reduce made this ~8x slower on [64, 8000].
    tokens = decoding.first_argmax(masked + jax.random.gumbel(key, masked.shape, masked.dtype))
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=('model', 'group_size', 'config', 'eos_id', 'pad_id'))
def sample_group(model: decoder.Decoder, params, prompt_embeds_bpd: Array,
                 prompt_positions_bp: Array, rng: Array, *, group_size: int,
                 config: SamplingConfig, eos_id: int, pad_id: int = 0) -> dict[str, Array]:
  """G sampled continuations of each of B prompts.

  Args:
    model: the decoder (static).
    params: its parameters.
    prompt_embeds_bpd: float[B, P, D] prompt embeddings (instruction and sign tokens).
    prompt_positions_bp: int[B, P] positions, -1 on padding.
    rng: one key; sample g of every prompt uses `jax.random.split(rng, G)[g]`, folded with the
      step index.
    group_size: G.
    config: sampling settings (static).
    eos_id: ends a sample; pad_id: fills its remaining slots.

  Returns:
    {'tokens': int32[B, G, N], 'logp': float32[B, G, N] (sampling policy, 0 on padding),
     'mask': bool[B, G, N] (completion tokens, eos included), 'lengths': int32[B, G]}.
  """
  model, params = decoder.unrolled(model, params)
  b = prompt_positions_bp.shape[0]
  n = config.max_new_tokens
  prefix_cache, first_logits = decoding.prefill(model, params, prompt_embeds_bpd,
                                                 prompt_positions_bp)
  next_pos = prompt_positions_bp.max(axis=1) + 1
  keys = jax.random.split(rng, group_size)

  def member_step(cache, logits, key, done, i):
    """One token of one sample of every prompt; vmapped over the group."""
    token, logp = sample_token(logits, jax.random.fold_in(key, i), config)
    token = jnp.where(done, pad_id, token)
    logp = jnp.where(done, 0.0, logp)
    out = model.apply({'params': params}, token[:, None], positions_bt=(next_pos + i)[:, None],
                      cache=cache, prefix_cache=prefix_cache)
    return out.cache, out.logits[:, 0], token, logp, done | (token == eos_id)

  group_step = jax.vmap(member_step, in_axes=(0, 0, 0, 0, None))

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, caches, logits, tokens, logps, done = carry
    caches, logits, token, logp, now_done = group_step(caches, logits, keys, done, i)
    tokens = tokens.at[:, :, i].set(token)
    logps = logps.at[:, :, i].set(logp)
    return i + 1, caches, logits, tokens, logps, now_done

  caches = jax.vmap(lambda _: decoder.init_cache(model.config, b, n))(keys)
  carry = (jnp.int32(0), caches, jnp.broadcast_to(first_logits, (group_size,) + first_logits.shape),
           jnp.full((group_size, b, n), pad_id, jnp.int32), jnp.zeros((group_size, b, n)),
           jnp.zeros((group_size, b), bool))
  _, _, _, tokens, logps, _ = jax.lax.while_loop(cond, body, carry)
  tokens, logps = tokens.transpose(1, 0, 2), logps.transpose(1, 0, 2)  # [B, G, N]
  is_eos = tokens == eos_id
  lengths = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, n).astype(jnp.int32)
  mask = jnp.arange(n) < lengths[..., None]
  return {'tokens': tokens, 'logp': jnp.where(mask, logps, 0.0), 'mask': mask,
          'lengths': lengths}
