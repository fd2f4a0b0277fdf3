"""Gate distributions against closed forms (scipy), the policy state, and REINFORCE on bandits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from rvlf_jax.models import gates as policy
from rvlf_jax.rl import reinforce
from tests import helpers


def _logit(p):
  return np.log(p) - np.log1p(-p)


def test_beta_log_prob_and_entropy_match_scipy():
  gate = policy.BetaGate(concentration=10.0)
  p = np.array([0.05, 0.3, 0.5, 0.77, 0.95])
  a = np.array([0.01, 0.42, 0.5, 0.9, 0.999])
  out = jnp.asarray(_logit(p), jnp.float32)[:, None]
  alpha, beta = gate.params(out)
  np.testing.assert_allclose(alpha, 10 * p, rtol=1e-5)
  np.testing.assert_allclose(beta, 10 * (1 - p), rtol=1e-5)
  np.testing.assert_allclose(gate.log_prob(out, jnp.asarray(a, jnp.float32)),
                             stats.beta.logpdf(a, 10 * p, 10 * (1 - p)), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(gate.entropy(out), stats.beta.entropy(10 * p, 10 * (1 - p)),
                             rtol=2e-4, atol=2e-4)
  # Another concentration, and the closed forms on their own.
  np.testing.assert_allclose(policy.beta_entropy(jnp.float32(0.7), jnp.float32(2.5)),
                             stats.beta.entropy(0.7, 2.5), rtol=1e-4)
  np.testing.assert_allclose(policy.beta_log_prob(jnp.float32(0.2), 0.7, 2.5),
                             stats.beta.logpdf(0.2, 0.7, 2.5), rtol=1e-4)
  np.testing.assert_allclose(gate.mode(out), p, rtol=1e-5)


def test_beta_samples_follow_the_distribution_and_log_prob_survives_the_edges():
  gate = policy.BetaGate(10.0)
  out = jnp.full((20000, 1), _logit(0.8), jnp.float32)
  a = helpers.fast_jit(gate.sample)(jax.random.key(0), out)
  assert a.shape == (20000,) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  assert float(a.mean()) == pytest.approx(0.8, abs=0.01)
  assert float(a.var()) == pytest.approx(0.8 * 0.2 / 11.0, rel=0.05)  # p(1 - p) / (k + 1).
  edges = gate.log_prob(jnp.zeros((2, 1)), jnp.asarray([0.0, 1.0]))
  assert np.all(np.isfinite(edges))


def test_categorical_log_prob_entropy_and_gates_match_direct_computation():
  gate = policy.CategoricalGate()
  logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.5]], np.float32)
  actions = np.array([0, 2, 1])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(gate.log_prob(jnp.asarray(logits), jnp.asarray(actions)),
                             np.log(probs[np.arange(3), actions]), rtol=1e-5)
  np.testing.assert_allclose(gate.entropy(jnp.asarray(logits)),
                             -(probs * np.log(probs)).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(gate.gate(jnp.asarray(actions)), [1.0, 0.0, 0.5])
  np.testing.assert_array_equal(gate.mode(jnp.asarray(logits)), [1.0, 0.0, 0.5])
  draws = helpers.fast_jit(gate.sample)(jax.random.key(1),
                                        jnp.tile(jnp.asarray(logits[:1]), (20000, 1)))
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=3) / 20000, probs[0],
                             atol=0.015)


def test_policy_state_layout_and_gate_config():
  v = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
  t = jnp.asarray([[0.0, 2.0], [2.0, 2.0]])
  state = policy.policy_state(v, t)
  np.testing.assert_allclose(state, [[1, 0, 0, 2, 0.0], [1, 1, 2, 2, 1.0]], atol=1e-6)
  gap = policy.masked_mean(jnp.asarray([[[1.0], [3.0], [100.0]]]), jnp.asarray([[1, 1, 0]]))
  np.testing.assert_allclose(gap, [[2.0]])
  assert policy.GateConfig().distribution == policy.BetaGate(10.0)
  assert policy.GateConfig(kind='categorical').distribution.num_outputs == 3
  with pytest.raises(ValueError, match='Unknown gate kind'):
    policy.GateConfig(kind='gaussian')
  with pytest.raises(ValueError, match='fixed gate'):
    policy.GateConfig(fixed=1.5)


def _bandit_run(gate, reward_fn, steps=150, group=32):
  """REINFORCE with an EMA baseline on a one-state bandit; returns the policy's outputs before
  and after. The policy is the MLP `GatePolicy` on a constant state."""
  net = policy.GatePolicy(gate.num_outputs, hidden=(8,))
  state_gs = jnp.ones((group, 5))
  params = net.init(jax.random.key(0), state_gs)['params']
  tx = optax.adam(0.05)

  def loss_fn(params, rng, baseline):
    out = net.apply({'params': params}, state_gs)
    action = jax.lax.stop_gradient(gate.sample(rng, out))
    reward = reward_fn(gate.gate(action))
    loss = reinforce.reinforce_loss(gate.log_prob(out, action), gate.entropy(out), reward, baseline)
    return loss, reward.mean()

  @helpers.fast_jit
  def run(params, rng):
    def body(carry, rng):
      params, opt_state, baseline = carry
      grads, reward = jax.grad(loss_fn, has_aux=True)(params, rng, baseline)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state, reinforce.ema_baseline(baseline, reward)), reward

    (params, _, _), rewards = jax.lax.scan(body, (params, tx.init(params), jnp.float32(0.5)),
                                           jax.random.split(rng, steps))
    return params, rewards

  trained, rewards = run(params, jax.random.key(1))
  before = net.apply({'params': params}, state_gs[:1])[0]
  after = net.apply({'params': trained}, state_gs[:1])[0]
  return before, after, rewards


def test_reinforce_moves_the_beta_gate_toward_the_better_arm():
  # Arm "a near 1" pays 1, "a near 0" pays 0: the reward is a itself.
  gate = policy.BetaGate(10.0)
  before, after, rewards = _bandit_run(gate, lambda a: a)
  p_before, p_after = float(gate.mode(before[None])[0]), float(gate.mode(after[None])[0])
  assert p_before == pytest.approx(0.5)  # The zero-initialised head starts indifferent.
  assert p_after > 0.8, p_after
  # The first groups pay about 0.5 (a ~ Beta(5, 5)), the last ones what p_after promises.
  assert float(rewards[:3].mean()) < 0.62 and float(rewards[-20:].mean()) > 0.78


def test_reinforce_moves_the_categorical_gate_toward_the_better_arm():
  gate = policy.CategoricalGate()
  payoff = {1.0: 0.2, 0.5: 1.0, 0.0: 0.0}  # The even mix pays best.
  reward_fn = lambda a: jnp.where(a == 0.5, payoff[0.5], jnp.where(a == 1.0, payoff[1.0], 0.0))
  before, after, _ = _bandit_run(gate, reward_fn)
  np.testing.assert_allclose(jax.nn.softmax(before), [1 / 3] * 3, atol=1e-6)
  probs = np.asarray(jax.nn.softmax(after))
  assert probs[1] > 0.8, probs
  assert float(gate.mode(after[None])[0]) == 0.5
