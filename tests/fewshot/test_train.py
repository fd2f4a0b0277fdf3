"""The DVLA-RL objective: REINFORCE/baseline helpers, the reward, and the combined jitted step on a
toy few-shot problem."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rvlf_jax.fewshot import train
from rvlf_jax.models import gates as policy
from rvlf_jax.models import rla
from rvlf_jax.rl import reinforce
from tests import helpers

F, D, T, M = 6, 8, 4, 3
N_WAY, K_SHOT, N_QUERY, NUM_CLASSES = 3, 2, 3, 6


class ToyBackbone(nn.Module):
  """Tokens -> Dense -> two gated RLA blocks -> mean -> Dense: float[B, D] embeddings."""

  gate: policy.GateConfig

  @nn.compact
  def __call__(self, inputs):
    v = nn.Dense(D, name='embed')(inputs['visual'])
    for i in range(2):
      v, _ = rla.GatedRLA(2, self.gate, name=f'rla_{i}')(v, inputs['text'])
      v = jax.nn.gelu(v)
    return nn.Dense(D, name='head')(v.mean(axis=1))


def _episode(rng, centres, class_text, noise=2.0):
  """One episode of the toy task: tokens are the class centre plus heavy noise; every example's
  text tokens are the episode's class texts (labels unseen)."""
  classes = rng.choice(NUM_CLASSES, N_WAY, replace=False)
  labels = np.concatenate([np.repeat(np.arange(N_WAY), K_SHOT), np.repeat(np.arange(N_WAY),
                                                                          N_QUERY)])
  visual = centres[classes[labels]][:, None, :] + noise * rng.standard_normal(
      (labels.size, T, F))
  text = np.broadcast_to(class_text[classes], (labels.size, N_WAY, D))
  s = N_WAY * K_SHOT
  return {'inputs': {'visual': jnp.asarray(visual, jnp.float32), 'text': jnp.asarray(text)},
          'support_labels': jnp.asarray(labels[:s]), 'query_labels': jnp.asarray(labels[s:]),
          'class_text': jnp.asarray(class_text[classes])}


def _task(seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((NUM_CLASSES, F)).astype(np.float32)
  class_text = rng.standard_normal((NUM_CLASSES, D)).astype(np.float32)
  return rng, centres, class_text


def test_reinforce_loss_baseline_and_reward_values():
  lp = jnp.asarray([-1.0, -2.0])
  ent = jnp.asarray([0.5, 0.3])
  loss = reinforce.reinforce_loss(lp, ent, jnp.asarray([1.0, 0.0]), jnp.float32(0.25), 0.2)
  # mean(-(0.75)(-1) - 0.1, -(-0.25)(-2) - 0.06) = mean(0.65, -0.56)
  assert float(loss) == pytest.approx((0.65 - 0.56) / 2)
  # The advantage is a constant: the gradient is -(r - b) d log pi only.
  grad = jax.grad(lambda lp: reinforce.reinforce_loss(lp, ent, jnp.asarray([1.0, 0.0]), 0.25))(lp)
  np.testing.assert_allclose(grad, [-0.75 / 2, 0.25 / 2])
  np.testing.assert_allclose(reinforce.ema_baseline(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 1.0]),
                                                0.9), [0.1, 1.0], rtol=1e-6)
  projected = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  target = jnp.asarray([[3.0, 0.0], [1.0, 0.0]])
  reward = train.gate_reward(projected, target, jnp.float32(0.8), jnp.float32(0.6))
  np.testing.assert_allclose(reward, [0.5 * 1.0 + 0.2, 0.5 * 0.0 + 0.2], rtol=1e-6)


def test_combined_step_reduces_the_supervised_loss_and_trains_each_part():
  rng, centres, class_text = _task()
  model = ToyBackbone(policy.GateConfig(hidden=(8,)))
  embed = train.module_embed(model)
  batches = [_episode(rng, centres, class_text) for _ in range(40)]
  held_out = [_episode(rng, centres, class_text) for _ in range(8)]
  params = nn.meta.unbox(model.init(jax.random.key(0), batches[0]['inputs'])['params'])
  tx = optax.adam(3e-3)
  state = train.create_state(params, tx, num_layers=2)
  step = helpers.fast_jit(train.make_step(embed, tx))
  evaluate = helpers.fast_jit(train.make_eval(embed))

  def held_out_loss(params):
    return np.mean([float(evaluate(params, b)['loss']) for b in held_out])

  before = held_out_loss(state.params)
  rngs = jax.random.split(jax.random.key(1), 3 * len(batches))
  history = []
  for i in range(3 * len(batches)):
    state, metrics = step(state, batches[i % len(batches)], rngs[i])
    history.append({k: float(v) for k, v in metrics.items()})
  after = held_out_loss(state.params)
  assert int(state.step) == 3 * len(batches)
  assert after < 0.8 * before, (before, after)
  assert np.mean([h['sup_loss'] for h in history[-20:]]) < np.mean(
      [h['sup_loss'] for h in history[:20]])
  for h in history:
    assert all(np.isfinite(v) for v in h.values()), h
    assert 0.0 <= h['gate_0'] <= 1.0 and 0.0 <= h['gate_1'] <= 1.0
  # The first step starts the baselines at its rewards, so its policy gradient is zero; later
  # ones move them by the EMA.
  assert history[0]['rl_loss'] == pytest.approx(-0.2 * np.mean(
      [history[0]['entropy_0'], history[0]['entropy_1']]), rel=1e-4)
  assert state.baseline.shape == (2,) and np.all(np.isfinite(state.baseline))
  # Every part moved: backbone (L_sup), policies (L_RL), reward projections U (L_align).
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, state.params)
  for i in range(2):
    assert moved[f'rla_{i}']['policy']['out']['kernel'] > 0
    assert moved[f'rla_{i}']['reward_proj']['kernel'] > 0
    assert moved[f'rla_{i}']['block']['cross_attn']['q_proj']['kernel'] > 0
  assert history[-1]['align_loss'] < history[0]['align_loss']


def test_each_loss_trains_only_its_own_parameters():
  rng, centres, class_text = _task(1)
  model = ToyBackbone(policy.GateConfig(kind='categorical', scope='example', hidden=(4,)))
  embed = train.module_embed(model)
  batch = _episode(rng, centres, class_text)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch['inputs'])['params'])
  state = train.create_state(params, optax.sgd(0.1), num_layers=2)
  state = state.replace(step=jnp.ones((), jnp.int32), baseline=jnp.asarray([0.3, -0.2]))

  def grads_of(params, **weights):
    config = train.ObjectiveConfig(**weights)
    fn = lambda p: train.objective(p, state, batch, jax.random.key(2), embed, config)[0]
    return jax.grad(fn)(params)

  def norms(grads, part):
    return [float(optax.tree.norm(grads[f'rla_{i}'][part])) for i in range(2)]

  # One compile for the three gradients (the same rng, so the same sampled gates in each).
  sup, rl, align = helpers.fast_jit(lambda p: (
      grads_of(p, rl_coef=0.0, align_coef=0.0), grads_of(p, rl_coef=1.0, align_coef=0.0),
      grads_of(p, rl_coef=0.0, align_coef=1.0)))(params)
  assert norms(sup, 'policy') == [0.0, 0.0] and norms(sup, 'reward_proj') == [0.0, 0.0]
  assert min(norms(sup, 'block')) > 0 and float(optax.tree.norm(sup['head'])) > 0
  # Adding L_RL changes the policy gradients only; adding L_align changes U's only.
  rl_delta = jax.tree.map(lambda a, b: a - b, rl, sup)
  assert min(norms(rl_delta, 'policy')) > 0
  assert norms(rl_delta, 'block') == [0.0, 0.0] and norms(rl_delta, 'reward_proj') == [0.0, 0.0]
  align_delta = jax.tree.map(lambda a, b: a - b, align, sup)
  assert min(norms(align_delta, 'reward_proj')) > 0
  assert norms(align_delta, 'block') == [0.0, 0.0] and norms(align_delta, 'policy') == [0.0, 0.0]
  with pytest.raises(ValueError, match='num_layers=2'):
    bad = state.replace(baseline=jnp.zeros((1,)))
    train.objective(params, bad, batch, jax.random.key(2), embed, train.ObjectiveConfig())
