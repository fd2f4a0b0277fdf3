"""The GRPO loss and its gradient against a token-by-token numpy reference, for each aggregation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.rl import losses

EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04
LOG_RATIO_CLIP, KL_CLIP = 20.0, 10.0

# N = 4 completions of up to L = 6 tokens; sequence 3 has no completion token at all.
MASK = np.asarray([[1, 1, 1, 1, 1, 1],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [0, 0, 0, 0, 0, 0]], np.float32)
ADVANTAGES = np.asarray([1.0, -1.0, 0.5, -0.7], np.float32)
# log(ratio) = logp - old_logp per token: inside and outside [log 0.8, log 1.2] and [.., log 1.28],
# so the clip binds for positive advantages (ratio > 1 + eps) and negative ones (ratio < 1 - eps),
# and is outside the range without binding in the other direction.
LOG_RATIO = np.asarray([[0.05, 0.3, -0.4, 0.22, -0.05, 0.0],
                        [-0.4, 0.3, -0.3, 0.5, 0.0, 0.0],
                        [0.21, 0.4, -0.3, 0.1, 0.0, 0.0],
                        [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]], np.float32)
# ref_logp - logp: small values, one past the k3 clamp (e^3 - 4 > 10), one past the log-ratio clamp.
REF_GAP = np.asarray([[0.1, -0.2, 3.0, 0.5, -25.0, 0.3],
                      [0.05, -0.5, 1.0, 0.0, 0.0, 0.0],
                      [-1.0, 0.2, 0.0, 0.7, 0.0, 0.0],
                      [0.3, 0.3, 0.0, 0.0, 0.0, 0.0]], np.float32)
LOGP = -np.abs(np.random.default_rng(0).normal(1.0, 0.5, MASK.shape)).astype(np.float32)


def _reference(logp, old_logp, ref_logp, adv, mask, *, eps_high, beta, aggregation, max_len):
  """Loss and d loss / d logp, one token at a time, in float64."""
  logp, mask = logp.astype(np.float64), mask.astype(np.float64)
  n, length = logp.shape
  token_loss, token_grad = np.zeros((n, length)), np.zeros((n, length))
  for i in range(n):
    a = float(adv[i])
    for t in range(length):
      old = logp[i, t] if old_logp is None else float(old_logp[i, t])
      log_ratio = logp[i, t] - old
      ratio = math.exp(min(max(log_ratio, -LOG_RATIO_CLIP), LOG_RATIO_CLIP))
      clipped = min(max(ratio, 1 - EPS), 1 + eps_high)
      if ratio * a <= clipped * a:  # the unclipped term is the minimum: d(ratio) / d logp = ratio
        pg, d_pg = -ratio * a, -ratio * a
      else:  # the clipped term is constant
        pg, d_pg = -clipped * a, 0.0
      kl = d_kl = 0.0
      if beta:
        gap = float(ref_logp[i, t]) - logp[i, t]
        g = min(max(gap, -LOG_RATIO_CLIP), LOG_RATIO_CLIP)
        kl = math.exp(g) - g - 1
        d_kl = -(math.exp(g) - 1) if abs(gap) < LOG_RATIO_CLIP else 0.0
        if kl > KL_CLIP:
          kl, d_kl = KL_CLIP, 0.0
      token_loss[i, t] = pg + beta * kl
      token_grad[i, t] = d_pg + beta * d_kl
  if aggregation == 'seq_mean_token_mean':
    weight = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1) / n
  elif aggregation == 'token_mean':
    weight = mask / max(mask.sum(), 1)
  else:
    weight = mask / (n * (length if max_len is None else max_len))
  loss = sum(weight[i, t] * token_loss[i, t] for i in range(n) for t in range(length))
  return loss, weight * token_grad


CASES = {  # name: (old_logp given (mu > 1), epsilon_high, beta)
    'mu2_symmetric_kl': (True, None, BETA),
    'mu2_clip_higher_kl': (True, EPS_HIGH, BETA),
    'mu2_no_kl': (True, None, 0.0),
    'mu1_kl': (False, None, BETA),
}


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('aggregation,max_len',
                         [('seq_mean_token_mean', None), ('token_mean', None), ('dr_grpo', None),
                          ('dr_grpo', 16)])
def test_loss_and_gradient_match_reference(aggregation, max_len, case):
  with_old, eps_high, beta = CASES[case]
  old_logp = LOGP - LOG_RATIO if with_old else None
  ref_logp = LOGP + REF_GAP
  kwargs = dict(epsilon=EPS, epsilon_high=eps_high, beta=beta, aggregation=aggregation,
                max_len=max_len)

  def loss_fn(logp):
    return losses.grpo_loss(logp, jnp.asarray(ADVANTAGES), jnp.asarray(MASK),
                            old_logp=None if old_logp is None else jnp.asarray(old_logp),
                            ref_logp=jnp.asarray(ref_logp), **kwargs)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(LOGP))
  expected_loss, expected_grad = _reference(
      LOGP, old_logp, ref_logp, ADVANTAGES, MASK, eps_high=EPS if eps_high is None else eps_high,
      beta=beta, aggregation=aggregation, max_len=max_len)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['pg_loss'] + beta * metrics['kl_loss'], loss, rtol=1e-6)
  if with_old:  # the data must exercise the clip, or the test proves little
    assert 0 < float(metrics['clip_frac']) < 1
    if not beta:  # the 6 tokens whose clip binds pass no gradient
      assert np.sum((np.asarray(grad) == 0) & (MASK > 0)) == 6


def test_metrics_count_binding_clips_and_kl():
  old_logp = LOGP - LOG_RATIO
  loss_fn = jax.jit(functools.partial(losses.grpo_loss, epsilon=EPS))  # as a train step uses it
  _, metrics = loss_fn(jnp.asarray(LOGP), jnp.asarray(ADVANTAGES), jnp.asarray(MASK),
                       old_logp=jnp.asarray(old_logp), ref_logp=jnp.asarray(LOGP + REF_GAP))
  ratio = np.exp(LOG_RATIO)
  adv = ADVANTAGES[:, None]
  on = MASK > 0
  low = (ratio < 1 - EPS) & (adv < 0) & on
  high = (ratio > 1 + EPS) & (adv > 0) & on
  assert low.sum() == 2 and high.sum() == 4  # tokens picked above, for the record
  assert float(metrics['clip_frac_low']) == pytest.approx(low.sum() / on.sum())
  assert float(metrics['clip_frac_high']) == pytest.approx(high.sum() / on.sum())
  assert float(metrics['clip_frac']) == pytest.approx((low | high).sum() / on.sum())
  assert float(metrics['ratio']) == pytest.approx(ratio[on].mean(), rel=1e-6)
  gap = np.clip(REF_GAP, -LOG_RATIO_CLIP, LOG_RATIO_CLIP).astype(np.float64)
  kl = np.minimum(np.exp(gap) - gap - 1, KL_CLIP)
  assert float(metrics['kl']) == pytest.approx(kl[on].mean(), rel=1e-5)


def test_argument_errors():
  logp, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match='needs ref_logp'):
    losses.grpo_loss(logp, jnp.zeros(2), mask)
  with pytest.raises(ValueError, match=r'advantages \[N\]'):
    losses.grpo_loss(logp, jnp.zeros(3), mask, beta=0.0)
  with pytest.raises(KeyError, match="Unknown loss aggregation 'sum'"):
    losses.grpo_loss(logp, jnp.zeros(2), mask, beta=0.0, aggregation='sum')


def test_entropy_from_logits():
  logits = np.random.default_rng(1).normal(0, 3, (2, 3, 7)).astype(np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(losses.entropy_from_logits(jnp.asarray(logits)), expected, rtol=1e-5)
  mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(losses.masked_mean(jnp.asarray(expected), mask),
                             expected[[0, 0, 1], [0, 1, 0]].mean(), rtol=1e-6)
