"""Greedy decoding with the KV cache, compiled as one loop.

The prompt is given as embeddings (so a sign-token prefix and a text prompt are one sequence) with
positions (-1 marks padding, left or right); it is prefilled once, then one token is appended per
step inside `jax.lax.fori_loop`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rvlf_jax.models import decoder


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'eos_id'))
def greedy_decode(model: decoder.Decoder, params, prompt_embeds_btd: jax.Array,
                  prompt_positions_bt: jax.Array, *, max_new_tokens: int,
                  eos_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy continuation of a batch of prompts.

  Args:
    model: the decoder module (static).
    params: its parameters.
    prompt_embeds_btd: float[B, P, D] prompt embeddings.
    prompt_positions_bt: int[B, P] positions, -1 for padding.
    max_new_tokens: N, the number of tokens generated.
    eos_id: once generated, a row stops; its later tokens are eos_id.

  Returns:
    (tokens int32[B, N], lengths int32[B]: tokens up to and including the first eos, else N).
  """
  b, p = prompt_positions_bt.shape
  cache = decoder.init_cache(model.config, b, p + max_new_tokens)
  out = model.apply({'params': params}, embeds_btd=prompt_embeds_btd,
                    positions_bt=prompt_positions_bt, cache=cache)
  # The next token follows the last valid prompt position, wherever padding put it.
  last = jnp.argmax(prompt_positions_bt, axis=1)
  logits = out.logits[jnp.arange(b), last]
  next_pos = prompt_positions_bt.max(axis=1) + 1

  def step(i, carry):
    cache, logits, tokens, done = carry
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    tokens = tokens.at[:, i].set(token)
    out = model.apply({'params': params}, token[:, None], positions_bt=(next_pos + i)[:, None],
                      cache=cache)
    return out.cache, out.logits[:, 0], tokens, done

  tokens = jnp.zeros((b, max_new_tokens), jnp.int32)
  done = jnp.zeros((b,), bool)
  _, _, tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (out.cache, logits, tokens, done))
  if eos_id is None:
    return tokens, jnp.full((b,), max_new_tokens, jnp.int32)
  is_eos = tokens == eos_id
  lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
  return tokens, lengths.astype(jnp.int32)
