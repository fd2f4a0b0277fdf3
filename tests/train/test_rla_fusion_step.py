"""SFT and stage-1 steps with the sign encoder's 'rla' fusion: the gates' REINFORCE term."""

import numpy as np
import pytest

import jax

from rvlf_jax.models import slt
from rvlf_jax.train import optimizers, represent, sft
from rvlf_jax.train import state as state_lib

STEPS = 3


def random_batch(sign: slt.SignEncoderConfig, vocab_size: int, b: int = 4) -> dict:
  batch = slt.dummy_batch(sign, batch_size=b, frames=8, text_len=6)
  rs = np.random.RandomState(0)
  batch['keypoints'] = rs.randn(*batch['keypoints'].shape).astype(np.float32)
  batch['visual'] = rs.randn(*batch['visual'].shape).astype(np.float32)
  batch['text_ids'] = rs.randint(3, vocab_size, batch['text_ids'].shape).astype(np.int32)
  batch['text_mask'][:, -1] = False
  return batch


def optimizer():
  return optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=3e-3, warmup_steps=0, total_steps=100))


def run(step, state, batch):
  step = jax.jit(step, compiler_options={'xla_backend_optimization_level': 0})
  history = []
  for i in range(STEPS):
    state, metrics = step(state, batch, jax.random.key(i))
    history.append(jax.device_get(metrics))
  return state, history


PROMPT = slt.Prompt(np.asarray([1, 2], np.int32), np.asarray([3], np.int32))


@pytest.fixture(scope='module')
def sft_run():
  config = slt.SLTConfig.tiny(mode='rla')
  model = slt.SLTModel(config)
  params = model.init_params(jax.random.key(0))
  tx = optimizer()
  state = state_lib.create(params, tx, rl=state_lib.rl_state(config.sign.fusion.rla_layers))
  batch = random_batch(config.sign, config.decoder.vocab_size)
  end, history = run(sft.make_step(model, tx, PROMPT), state, batch)
  return model, batch, state, end, history


def test_sft_step_trains_the_policies_and_updates_the_rl_state(sft_run):
  _, _, start, end, history = sft_run
  assert int(end.step) == STEPS
  for metrics in history:
    for key in ('loss', 'accuracy', 'grad_norm', 'gate_loss', 'gate_reward', 'gate_0', 'gate_1',
                'gate_entropy_0', 'gate_entropy_1'):
      assert key in metrics and np.isfinite(metrics[key]), (key, metrics)
    assert 0.0 <= metrics['gate_0'] <= 1.0
  assert slt.GATE_RECORDS not in history[0]
  assert history[0]['gate_reward'] == 0.0  # no previous loss at step 0
  np.testing.assert_allclose(history[1]['gate_reward'], history[0]['loss'] - history[1]['loss'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(end.rl['prev_loss']), history[-1]['loss'], rtol=1e-6)
  assert end.rl['baseline'].shape == (2,)
  assert np.abs(np.asarray(end.rl['baseline'])).max() > 0
  for i in range(2):
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(end.params['sign_encoder'][f'rla_policy_{i}']),
        jax.tree.leaves(start.params['sign_encoder'][f'rla_policy_{i}']))]
    assert max(moved) > 0, i


def test_sft_eval_loss_has_no_records(sft_run):
  model, batch, _, end, _ = sft_run
  metrics = jax.eval_shape(sft.make_eval_loss(model, PROMPT), end, batch)
  assert set(metrics) == {'loss', 'accuracy', 'num_tokens'}


def test_represent_step_with_rla():
  config = slt.AlignerConfig.tiny(sign=slt.SignEncoderConfig.tiny(mode='rla', rla_layers=1))
  model = slt.SignTextAligner(config)
  tx = optimizer()
  state = state_lib.create(model.init_params(jax.random.key(0)), tx, rl=state_lib.rl_state(1))
  end, history = run(represent.make_step(model, tx), state, random_batch(config.sign, 64))
  assert all(np.isfinite(m['loss']) and 'gate_0' in m and 'gate_1' not in m for m in history)
  np.testing.assert_allclose(float(end.rl['prev_loss']), history[-1]['loss'], rtol=1e-6)


def test_missing_rl_state_is_a_clear_error():
  records = [{'gate': np.zeros(2), 'log_prob': np.zeros(2), 'entropy': np.zeros(2)}]
  with pytest.raises(ValueError, match='state.rl is None'):
    sft.gate_objective(np.float32(1.0), records, None, np.int32(0))
  with pytest.raises(ValueError, match='2 RLA layers'):
    sft.gate_objective(np.float32(1.0), records * 2, state_lib.rl_state(1), np.int32(0))


def test_non_rla_step_is_unchanged():
  """Traced only (jax.eval_shape): same metrics as before, and no rl state."""
  config = slt.SLTConfig.tiny()  # gated_sum fusion
  model = slt.SLTModel(config)
  tx = optimizer()
  state = jax.eval_shape(lambda: state_lib.create(model.init_params(jax.random.key(0)), tx))
  assert state.rl is None
  batch = random_batch(config.sign, config.decoder.vocab_size)
  end, metrics = jax.eval_shape(sft.make_step(model, tx, PROMPT), state, batch,
                                jax.random.key(0))
  assert set(metrics) == {'loss', 'accuracy', 'num_tokens', 'grad_norm'}
  assert end.rl is None
