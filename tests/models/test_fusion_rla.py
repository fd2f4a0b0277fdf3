"""The sign encoder's 'rla' fusion: RL-gated attention between the skeleton and visual streams."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rvlf_jax.models import fusion, rla, slt


def config(**changes) -> fusion.SignEncoderConfig:
  return fusion.SignEncoderConfig.tiny(mode='rla', **changes)


def batch_for(cfg: fusion.SignEncoderConfig, b: int = 3, frames: int = 12) -> dict:
  batch = slt.dummy_batch(cfg, batch_size=b, frames=frames)
  rs = np.random.RandomState(0)
  batch['keypoints'] = rs.randn(*batch['keypoints'].shape).astype(np.float32)
  batch['visual'] = rs.randn(*batch['visual'].shape).astype(np.float32)
  batch['frame_mask'][-1, frames // 2:] = False
  return batch


@pytest.fixture(scope='module')
def built():
  cfg = config()
  model = fusion.SignEncoder(cfg)
  batch = batch_for(cfg)
  params = model.init(jax.random.key(0), batch)['params']
  return cfg, model, batch, params


def test_builds_with_a_policy_and_an_rla_block_per_layer(built):
  cfg, _, _, params = built
  for i in range(cfg.fusion.rla_layers):
    for name in (f'rla_{i}', f'rla_policy_{i}', f'rla_mlp_{i}', f'rla_mlp_norm_{i}'):
      assert name in params, sorted(params)
  assert f'rla_{cfg.fusion.rla_layers}' not in params
  assert cfg.fusion.uses_rla
  assert not config(skeleton_only=True).fusion.uses_rla


def test_shapes_masks_and_records(built):
  cfg, model, batch, params = built
  (x, mask), collections = model.apply(
      {'params': params}, batch, deterministic=False, mutable=['gates'],
      rngs={'dropout': jax.random.key(1), 'gate': jax.random.key(2)})
  assert x.shape == (3, cfg.num_tokens(12), cfg.d_model)
  assert mask.shape == (3, cfg.num_tokens(12))
  assert not np.asarray(mask)[-1, -1]
  np.testing.assert_array_equal(np.asarray(x)[~np.asarray(mask)], 0.0)
  records = rla.gate_records(collections)
  assert len(records) == cfg.fusion.rla_layers
  for rec in records:
    assert set(rec) == {'gate', 'log_prob', 'entropy'}
    for value in rec.values():
      assert value.shape == (3,) and np.isfinite(np.asarray(value)).all()
    gate = np.asarray(rec['gate'])
    assert ((gate >= 0) & (gate <= 1)).all()
    assert np.asarray(rec['log_prob']).any()  # sampled: a real log-probability


def test_eval_is_deterministic_without_a_gate_rng(built):
  _, model, batch, params = built
  run = lambda: model.apply({'params': params}, batch, mutable=['gates'])
  (x1, _), c1 = run()
  (x2, _), _ = run()
  np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
  for rec in rla.gate_records(c1):
    # A fresh policy's mode is p = 0.5, and nothing was sampled.
    np.testing.assert_allclose(np.asarray(rec['gate']), 0.5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(rec['log_prob']), 0.0)
  # Without mutable 'gates' the records are simply not kept.
  x3, _ = model.apply({'params': params}, batch)
  np.testing.assert_array_equal(np.asarray(x1), np.asarray(x3))


def test_fixed_gates_differ_and_create_no_policy(built):
  _, _, batch, params = built
  shapes = jax.eval_shape(fusion.SignEncoder(config(gate_fixed=0.5)).init, jax.random.key(0),
                          batch)['params']
  assert set(shapes) == {k for k in params if not k.startswith('rla_policy')}
  fixed_params = {k: params[k] for k in shapes}
  outs = [np.asarray(fusion.SignEncoder(config(gate_fixed=fixed)).apply(
      {'params': fixed_params}, batch)[0]) for fixed in (1.0, 0.0)]
  assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_task_gradient_does_not_reach_the_policy(built):
  _, model, batch, params = built

  def task(p):
    x, _ = model.apply({'params': p}, batch, deterministic=False,
                       rngs={'dropout': jax.random.key(1), 'gate': jax.random.key(2)})
    return jnp.sum(jnp.square(x))

  grads = jax.grad(task)(params)
  for i in range(2):
    for leaf in jax.tree.leaves(grads[f'rla_policy_{i}']):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads['rla_0']))


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match='rla_layers'):
    fusion.FusionConfig(mode='rla', rla_layers=0)
  with pytest.raises(ValueError, match='fixed gate'):
    fusion.FusionConfig(mode='rla', gate_fixed=1.5)
  with pytest.raises(ValueError, match='gate kind'):
    fusion.FusionConfig(mode='rla', gate_kind='gaussian')
