"""Greedy decoding and beam search with the KV cache, each compiled as one loop.

The prompt is given as embeddings (so a sign-token prefix and a text prompt are one sequence) with
positions (-1 marks padding, left or right); it is prefilled once, then one token is appended per
step inside `jax.lax.fori_loop` (greedy) or `jax.lax.while_loop` (beam search, which stops early
once no hypothesis can improve). Beam search shares the prefilled prompt between its K beams
through the decoder's `prefix_cache`, as the GRPO group sampler (`rvlf_jax.rl.sampler`) does.

Shape vocabulary: B prompts, P prompt length, K beams, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rvlf_jax.models import decoder


def first_argmax(x_bv: jax.Array) -> jax.Array:
  """int32[B]: the first index of each row's maximum, as `jnp.argmax` (rows without NaN)."""
  top = x_bv.max(axis=-1, keepdims=True)
  iota = jnp.arange(x_bv.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x_bv == top, iota, x_bv.shape[-1] - 1), axis=-1)


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
  model, params = decoder.unrolled(model, params)
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
    token = first_argmax(logits).astype(jnp.int32)
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


def prefill(model: decoder.Decoder, params, prompt_embeds_bpd: jax.Array,
            prompt_positions_bp: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  """Prefills B prompts into a cache of exactly P slots.

  Returns:
    (the cache, to pass as `prefix_cache`; logits float32[B, V] of the first new token).
  """
  b, p = prompt_positions_bp.shape
  cache = decoder.init_cache(model.config, b, p)
  out = model.apply({'params': params}, embeds_btd=prompt_embeds_bpd,
                    positions_bt=prompt_positions_bp, cache=cache)
  last = jnp.argmax(prompt_positions_bp, axis=1)  # the last valid prompt token, whatever padding
  return out.cache, out.logits[jnp.arange(b), last]


def length_penalty_factor(length: jax.Array | int, length_penalty: jax.Array | float) -> jax.Array:
  """HF's length normalisation: a hypothesis of `length` tokens scores log p / length**alpha."""
  return jnp.asarray(length, jnp.float32)**jnp.asarray(length_penalty, jnp.float32)


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_new_tokens', 'eos_id',
                                             'pad_id'))
def beam_search(model: decoder.Decoder, params, prompt_embeds_bpd: jax.Array,
                prompt_positions_bp: jax.Array, *, beam_size: int, max_new_tokens: int,
                eos_id: int, length_penalty: float | jax.Array = 1.0,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search continuation of a batch of prompts, the best hypothesis of each.

  Scores are HF `generate`'s: a hypothesis of l generated tokens (its eos included) with summed
  log-probability log p scores log p / l**length_penalty (not GNMT's ((5 + l) / 6)**alpha);
  length_penalty=0 ranks by log p alone, > 0 favours longer hypotheses. It is traced, not static:
  trying several values compiles once.

  Each step ranks the 2K best continuations of the K live beams. As in HF and fairseq, a
  continuation ending in eos that ranks within the first K joins the row's finished list (the K
  best finished hypotheses, HF's BeamHypotheses), the K best that do not end in eos stay live,
  and a finished hypothesis never occupies a live beam. After step N every top-K continuation is
  finished. The loop stops early once no row can improve its finished list: each row holds K
  finished hypotheses and no live beam can beat the worst of them (log-probabilities only fall,
  so the bound is the live log p over the largest length factor still reachable). Unlike HF's
  default heuristic this bound is exact, so stopping early never changes the result. With
  beam_size=1 and length_penalty=0 this is greedy decoding.

  The prompts are prefilled once into a [B, P] cache that the K beams share as `prefix_cache`:
  one decoder step is written for [B] rows and vmapped over the beams with the prefix unbatched.
  Each beam has its own suffix cache of N slots (keys/values [K, L, B, N, K_kv, H]), whose keys and
  values are gathered by parent beam when beams are reordered (slot positions are the same for
  every beam).

  Args:
    model: the decoder (static).
    params: its parameters.
    prompt_embeds_bpd: float[B, P, D] prompt embeddings.
    prompt_positions_bp: int[B, P] positions, -1 for padding (left or right).
    beam_size: K.
    max_new_tokens: N, the most tokens a hypothesis has (eos included).
    eos_id: ends a hypothesis; an id outside the vocabulary never does.
    length_penalty: alpha in the score above (a float or float32[] array).
    pad_id: fills the slots after a hypothesis's end.

  Returns:
    (tokens int32[B, N]: the best hypothesis, pad_id after its end; lengths int32[B]: its tokens,
    eos included; scores float32[B]: its score, log p / length**length_penalty).
  """
  if beam_size < 1 or max_new_tokens < 1:
    raise ValueError(f'beam_size ({beam_size}) and max_new_tokens ({max_new_tokens}) must be '
                     'positive.')
  model, params = decoder.unrolled(model, params)
  b = prompt_positions_bp.shape[0]
  k, n = beam_size, max_new_tokens
  prefix_cache, first_logits = prefill(model, params, prompt_embeds_bpd, prompt_positions_bp)
  v = first_logits.shape[-1]
  if v < 2:
    raise ValueError(f'beam search needs a vocabulary of 2 or more tokens, got {v}.')
  c = min(2 * k, v)
  next_pos = prompt_positions_bp.max(axis=1) + 1
  lp = lambda length: length_penalty_factor(length, length_penalty)

  def beam_step(cache, token_b, i):
    """Writes one token of one beam of every row; vmapped over the beams."""
    out = model.apply({'params': params}, token_b[:, None], positions_bt=(next_pos + i)[:, None],
                      cache=cache, prefix_cache=prefix_cache)
    return out.cache, out.logits[:, 0]

  # The cache's positions and write index are the same for every beam, but batching them with
  # the keys/values (as rl/sampler.py does) measured faster on an H100 than keeping them once.
  group_step = jax.vmap(beam_step, in_axes=(0, 0, None), out_axes=(0, 1))

  def gather_beams(cache, parent_bk):
    """New beam j of row r takes old beam parent[r, j]'s keys and values ([K, L, B, ...])."""
    index = (parent_bk.T[:, None, :], jnp.arange(model.config.num_layers)[None, :, None],
             jnp.arange(b)[None, None, :])
    return {**cache, 'k': cache['k'][index], 'v': cache['v'][index]}

  def cond(carry):
    i, _, _, _, alive_logp, _, fin_scores, _ = carry
    # A live beam of i tokens ends with a length in [i + 1, N] and a log p no higher than its
    # current one (<= 0), so its best score divides that by the largest length factor in reach.
    best = alive_logp.max(axis=1) / jnp.maximum(lp(i + 1), lp(n))
    can_improve = best > fin_scores.min(axis=1)
    return (i < n) & jnp.any(can_improve)

  def body(carry):
    i, caches, logits_bkv, alive_seqs, alive_logp, fin_seqs, fin_scores, fin_lens = carry
    logp = jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1)
    # The 2K best of the K x V continuations are among the C = min(2K, V) best of each beam: two
    # small top-k's instead of one over K x V.
    beam_logp, beam_token = jax.lax.top_k(alive_logp[:, :, None] + logp, c)  # [B, K, C]
    top_logp, top_idx = jax.lax.top_k(beam_logp.reshape(b, k * c), 2 * k)  # [B, 2K], best first
    parent = top_idx // c
    token = jnp.take_along_axis(beam_token.reshape(b, k * c), top_idx, axis=1)
    seqs = jnp.take_along_axis(alive_seqs, parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, i))
    is_eos = token == eos_id

    # Finished: eos continuations within the top K; every top-K one at the last step.
    ends = (is_eos | (i == n - 1)) & (jnp.arange(2 * k) < k)
    new_scores = jnp.where(ends, top_logp / lp(i + 1), -jnp.inf)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    fin_scores, best = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], 1), best[:, :, None], 1)
    all_lens = jnp.concatenate([fin_lens, jnp.full((b, 2 * k), i + 1, jnp.int32)], axis=1)
    fin_lens = jnp.take_along_axis(all_lens, best, axis=1)

    # Live: the K best continuations that do not end in eos (there are at least K among 2K).
    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp), k)
    alive_seqs = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    caches = gather_beams(caches, jnp.take_along_axis(parent, keep, axis=1))
    tokens_kb = jnp.take_along_axis(token, keep, axis=1).T
    caches, logits_bkv = group_step(caches, tokens_kb, i)
    return i + 1, caches, logits_bkv, alive_seqs, alive_logp, fin_seqs, fin_scores, fin_lens

  caches = jax.vmap(lambda _: decoder.init_cache(model.config, b, n))(jnp.arange(k))
  # All beams start as the same prompt: only beam 0 is live, or step 0 would pick K copies.
  alive_logp = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, k))
  carry = (jnp.int32(0), caches, jnp.broadcast_to(first_logits[:, None], (b, k, v)),
           jnp.full((b, k, n), pad_id, jnp.int32), alive_logp,
           jnp.full((b, k, n), pad_id, jnp.int32), jnp.full((b, k), -jnp.inf),
           jnp.zeros((b, k), jnp.int32))
  carry = jax.lax.while_loop(cond, body, carry)
  fin_seqs, fin_scores, fin_lens = carry[-3:]
  return fin_seqs[:, 0], fin_lens[:, 0], fin_scores[:, 0]
