"""Beam search against greedy decoding, exhaustive search, a plain-Python reference and rescoring.

The references score sequences with full forwards (no cache), so these tests also check the
shared-prefix cache path and the gathering of per-beam caches.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.eval import decoding
from rvlf_jax.models import decoder
from tests.helpers import fast_jit, numpy_params

PAD = 0


def make_setup(family, vocab_size, seed=0):
  """A tiny decoder with peaked random weights and three prompts: full, left- and right-padded."""
  config = decoder.DecoderConfig.tiny(family, vocab_size=vocab_size)
  model = decoder.Decoder(config)
  params = numpy_params(model, jnp.zeros((1, 1), jnp.int32), seed=seed)
  prompt = jax.random.randint(jax.random.key(seed + 1), (3, 7), 0, vocab_size)
  valid = np.ones((3, 7), bool)
  valid[1, :2] = False  # left padding
  valid[2, 4:] = False  # right padding
  embeds = model.apply({'params': params}, prompt, method=model.embed)
  return model, params, embeds, decoder.positions_from_mask(jnp.asarray(valid))


def beam_fn(setup, **static):
  """fn(length_penalty) -> beam_search's outputs as numpy arrays; compiled once, without LLVM
  optimisation (the same numbers, half the compile time)."""
  model, params, embeds, positions = setup
  fn = fast_jit(lambda params, embeds, positions, alpha: decoding.beam_search(
      model, params, embeds, positions, length_penalty=alpha, pad_id=PAD, **static))
  return lambda alpha: jax.tree.map(np.asarray, fn(params, embeds, positions, jnp.float32(alpha)))


def token_logprobs(setup):
  """fn(tokens int[B, M, N]) -> float64[B, M, N]: log p of each token after its row's prompt,
  from one full forward over [prompt][tokens] (no cache)."""
  model, params, embeds, positions = setup

  @fast_jit
  def fn(params, embeds, positions, tokens_bmn):
    b, m, n = tokens_bmn.shape
    p = positions.shape[1]
    flat = tokens_bmn.reshape(b * m, n)
    seq = jnp.concatenate([jnp.repeat(embeds, m, axis=0),
                           model.apply({'params': params}, flat, method=model.embed)], axis=1)
    start = jnp.repeat(positions.max(axis=1) + 1, m)
    pos = jnp.concatenate([jnp.repeat(positions, m, axis=0),
                           start[:, None] + jnp.arange(n)], axis=1)
    logits = model.apply({'params': params}, embeds_btd=seq, positions_bt=pos).logits
    # Token j is predicted by the slot before it: the last valid prompt slot for j = 0.
    last = jnp.repeat(jnp.argmax(positions, axis=1), m)
    pred = jnp.concatenate([logits[jnp.arange(b * m), last][:, None], logits[:, p:p + n - 1]], 1)
    logp = jax.nn.log_softmax(pred, axis=-1)
    return jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0].reshape(b, m, n)

  return lambda tokens: np.asarray(fn(params, embeds, positions, jnp.asarray(tokens)), np.float64)


def hypothesis_scores(logp_bmn, tokens_bmn, eos, alpha):
  """HF-style scores log p / length**alpha of hypotheses: tokens up to the first eos, or all N."""
  n = tokens_bmn.shape[-1]
  is_eos = tokens_bmn == eos
  lengths = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, n)
  mask = np.arange(n) < lengths[..., None]
  return (logp_bmn * mask).sum(-1) / lengths.astype(np.float64)**alpha, lengths


@pytest.fixture(scope='module')
def small_vocab():
  return make_setup('llama', vocab_size=8)


def test_beam_size_one_is_greedy(small_vocab):
  model, params, embeds, positions = small_vocab
  n, eos = 6, 7
  greedy, greedy_lengths = jax.tree.map(np.asarray, fast_jit(
      lambda *args: decoding.greedy_decode(model, *args, max_new_tokens=n, eos_id=eos))(
          params, embeds, positions))
  tokens, lengths, _ = beam_fn(small_vocab, beam_size=1, max_new_tokens=n, eos_id=eos)(0.0)
  np.testing.assert_array_equal(lengths, greedy_lengths)
  assert 1 < lengths.min() < n == lengths.max()  # rows that stop early and one that does not
  for row in range(3):
    np.testing.assert_array_equal(tokens[row, :lengths[row]], greedy[row, :lengths[row]])
    assert np.all(tokens[row, lengths[row]:] == PAD)


def test_wide_beam_finds_the_exhaustive_optimum(small_vocab):
  """N = 3, V = 8: 64 beams keep every prefix, so the search is exhaustive."""
  v, n, eos = 8, 3, 4
  every = np.asarray(list(itertools.product(range(v), repeat=n)), np.int32)  # [512, 3]
  every = np.broadcast_to(every, (3,) + every.shape)
  logp = token_logprobs(small_vocab)(every)
  beam = beam_fn(small_vocab, beam_size=64, max_new_tokens=n, eos_id=eos)
  for alpha in (0.0, 1.0):
    scores, lengths = hypothesis_scores(logp, every, eos, alpha)
    tokens, got_lengths, got_scores = beam(alpha)
    best = scores.argmax(axis=1)
    np.testing.assert_allclose(got_scores, scores[np.arange(3), best], rtol=1e-5)
    np.testing.assert_array_equal(got_lengths, lengths[np.arange(3), best])
    for row in range(3):
      length = got_lengths[row]
      np.testing.assert_array_equal(tokens[row, :length], every[row, best[row], :length])
      assert np.all(tokens[row, length:] == PAD)
    if alpha == 0:  # not degenerate: some optimum ends early, some does not
      assert got_lengths.min() < n == got_lengths.max()


def reference_beam_search(next_logprobs, b, k, n, eos, alpha):
  """Plain-Python beam search with the same (HF) rules: the best (score, tokens) of each row.

  next_logprobs(prefixes int[B, K, N], i) gives float[B, K, V], the log-probs of token i after
  the first i tokens of each prefix.
  """
  alive = [[((), 0.0)] for _ in range(b)]
  finished = [[] for _ in range(b)]
  for i in range(n):
    prefixes = np.zeros((b, k, n), np.int32)
    for r in range(b):
      for j, (seq, _) in enumerate(alive[r]):
        prefixes[r, j, :i] = seq
    step = next_logprobs(prefixes, i)
    for r in range(b):
      cands = sorted(((logp + step[r, j, t], seq + (t,)) for j, (seq, logp) in enumerate(alive[r])
                      for t in range(step.shape[-1])), key=lambda c: -c[0])[:2 * k]
      # Only eos continuations ranked within the first K finish (every one at the last step).
      finished[r] += [(logp / len(seq)**alpha, seq) for logp, seq in cands[:k]
                      if seq[-1] == eos or i == n - 1]
      alive[r] = [(seq, logp) for logp, seq in cands if seq[-1] != eos][:k]
  return [max(f, key=lambda c: c[0]) for f in finished]


def test_narrow_beam_matches_reference_and_rescoring():
  """K = 3 < V: beams are pruned and reordered every step. Gemma 3's sliding window (4) is
  shorter than prompt + continuation, so the shared prefix is partly out of its reach."""
  setup = make_setup('gemma3', vocab_size=16, seed=3)
  v, k, n, alpha, eos = 16, 3, 6, 0.5, 0
  logprobs = token_logprobs(setup)  # always called on [3, K * V, N]: one compile

  def next_logprobs(prefixes_bkn, i):
    cand = np.repeat(prefixes_bkn[:, :, None], v, axis=2)
    cand[..., i] = np.arange(v)
    return logprobs(cand.reshape(3, k * v, n))[..., i].reshape(3, k, v)

  want = reference_beam_search(next_logprobs, 3, k, n, eos, alpha)
  tokens, lengths, scores = beam_fn(setup, beam_size=k, max_new_tokens=n, eos_id=eos)(alpha)
  for row, (score, seq) in enumerate(want):
    assert lengths[row] == len(seq)
    np.testing.assert_array_equal(tokens[row, :len(seq)], seq)
    assert np.all(tokens[row, len(seq):] == PAD)
    np.testing.assert_allclose(scores[row], score, rtol=1e-5)
  assert 1 < lengths.min() < n  # some hypothesis ended with eos, after a pruned step

  # Rescoring the returned hypotheses with a full forward gives the returned scores.
  padded = np.zeros((3, k * v, n), np.int32)
  padded[:, 0] = tokens
  rescored, rescored_lengths = hypothesis_scores(logprobs(padded)[:, :1], tokens[:, None], eos,
                                                 alpha)
  np.testing.assert_array_equal(rescored_lengths[:, 0], lengths)
  np.testing.assert_allclose(scores, rescored[:, 0], rtol=1e-5)
