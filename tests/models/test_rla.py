"""The RLA block and its text-free variant against their paths computed directly, and the gated
block's policy records."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.models import gates as policy
from rvlf_jax.models import rla
from rvlf_jax.models import layers
from rvlf_jax.models import skeleton as skel
from tests import helpers

B, T, M, D, N = 2, 5, 3, 8, 2


def _sampled(module, params, visual, text, seed):
  """module.apply with a 'gate' rng, collecting the records (jitted: sampling a Beta op by op is
  slow)."""
  fn = lambda p, v, t, k: module.apply({'params': p}, v, t, rngs={'gate': k}, mutable=['gates'])
  out, cols = helpers.fast_jit(fn)(params, visual, text, jax.random.key(seed))
  return out, rla.gate_records(cols)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  visual = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((B, M, D)), jnp.float32)
  return visual, text


def _paths(params, query_norm, ctx_norm, x, ctx):
  """(cross, self) computed from the block's own parameters, without the block."""
  q = layers.RMSNorm().apply({'params': params[query_norm]}, x)
  c = layers.RMSNorm().apply({'params': params[ctx_norm]}, ctx)
  attn = skel.MultiHeadAttention(skel.EncoderConfig(D, 0, N, D, 0.0))
  attend = lambda p, x, ctx: attn.apply({'params': p}, x, ctx, None, None,
                                        np.ones((B, 1, x.shape[1], ctx.shape[1]), bool))
  cross = attend(params['cross_attn'], q, c)
  self_ = attend(params['self_attn'], q, q)
  return cross, self_


def test_rla_block_with_gate_one_or_zero_is_the_pure_cross_or_self_path():
  visual, text = _inputs()
  block = rla.RLABlock(N)
  params = helpers.numpy_params(block, visual, text, 0.5)
  cross, self_ = _paths(params, 'query_norm', 'context_norm', text, visual)
  assert not np.allclose(cross, self_, atol=1e-3)  # The two paths really differ.

  out_v, fused = block.apply({'params': params}, visual, text, 1.0)
  np.testing.assert_array_equal(fused, cross)
  np.testing.assert_array_equal(out_v, visual + cross.mean(axis=1)[:, None, :])
  out_v, fused = block.apply({'params': params}, visual, text, 0.0)
  np.testing.assert_array_equal(fused, self_)
  np.testing.assert_array_equal(out_v, visual + self_.mean(axis=1)[:, None, :])
  # One gate per example: example 0 takes the cross path, example 1 the self path.
  _, fused = block.apply({'params': params}, visual, text, jnp.asarray([1.0, 0.0]))
  np.testing.assert_array_equal(fused[0], cross[0])
  np.testing.assert_array_equal(fused[1], self_[1])
  _, fused = block.apply({'params': params}, visual, text, 0.3)
  np.testing.assert_allclose(fused, 0.3 * cross + 0.7 * self_, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='hold 1 or B=2'):
    block.apply({'params': params}, visual, text, jnp.ones((3,)))


def test_rla_block_ignores_padded_tokens():
  visual, text = _inputs()
  block = rla.RLABlock(N)
  params = helpers.numpy_params(block, visual, text, 0.5)
  v_mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  t_mask = jnp.asarray([[1, 1, 0], [1, 1, 1]], bool)
  out_v, fused = block.apply({'params': params}, visual, text, 0.4, v_mask, t_mask)
  noisy_v = jnp.where(v_mask[..., None], visual, 50.0)
  noisy_t = jnp.where(t_mask[..., None], text, -50.0)
  out_v2, fused2 = block.apply({'params': params}, noisy_v, noisy_t, 0.4, v_mask, t_mask)
  np.testing.assert_allclose(jnp.where(v_mask[..., None], out_v2, 0.0),
                             jnp.where(v_mask[..., None], out_v, 0.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused2[t_mask], fused[t_mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out_v2[0, 3:], noisy_v[0, 3:])  # Padded visual tokens untouched.
  # The context is the mean over the valid text tokens only.
  np.testing.assert_allclose(out_v[0, 0] - visual[0, 0], fused[0, :2].mean(axis=0), rtol=1e-5,
                             atol=1e-6)


def test_stream_rla_with_gate_one_or_zero_is_the_residual_cross_or_self_path():
  x, y = _inputs(1)
  y = y[:, :2]  # The other stream has its own length.
  block = rla.StreamRLA(N)
  params = helpers.numpy_params(block, x, y, 0.5)
  cross, self_ = _paths(params, 'query_norm', 'context_norm', x, y)
  assert not np.allclose(cross, self_, atol=1e-3)
  np.testing.assert_array_equal(block.apply({'params': params}, x, y, 1.0), x + cross)
  np.testing.assert_array_equal(block.apply({'params': params}, x, y, 0.0), x + self_)
  np.testing.assert_allclose(block.apply({'params': params}, x, y, jnp.asarray([0.25, 0.75])),
                             x + jnp.asarray([0.25, 0.75])[:, None, None] * cross +
                             jnp.asarray([0.75, 0.25])[:, None, None] * self_,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['beta', 'categorical'])
def test_gated_rla_samples_records_and_feeds_its_gate_to_the_block(kind):
  visual, text = _inputs(2)
  gated = rla.GatedRLA(N, policy.GateConfig(kind=kind, hidden=(4,)), reward_dim=6)
  params = nn.meta.unbox(gated.init(jax.random.key(0), visual, text)['params'])
  assert set(params) == {'policy', 'block', 'reward_proj'}
  (out_v, fused), [record] = _sampled(gated, params, visual, text, 3)
  assert record['gate'].shape == (1,) and record['projected'].shape == (B, 6)
  assert np.isfinite(record['log_prob']).all() and float(record['log_prob'][0]) != 0.0
  a = float(record['gate'][0])
  assert 0.0 <= a <= 1.0
  # The block ran with exactly the recorded gate.
  ref_v, ref_fused = rla.RLABlock(N).apply({'params': params['block']}, visual, text, a)
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out_v, ref_v, rtol=1e-6, atol=1e-6)
  # Without a 'gate' rng the policy's mode is used: p = 0.5 for a fresh Beta head, the first
  # value (1.0, argmax of uniform logits) for the categorical one.
  _, cols = gated.apply({'params': params}, visual, text, mutable=['gates'])
  [record] = rla.gate_records(cols)
  assert float(record['gate'][0]) == (0.5 if kind == 'beta' else 1.0)
  np.testing.assert_array_equal(record['log_prob'], [0.0])


def test_gated_rla_scopes_and_fixed_gate():
  visual, text = _inputs(3)
  per_example = rla.GatedRLA(N, policy.GateConfig(scope='example'))
  params = nn.meta.unbox(per_example.init(jax.random.key(0), visual, text)['params'])
  _, [record] = _sampled(per_example, params, visual, text, 1)
  assert record['gate'].shape == (B,) and record['log_prob'].shape == (B,)
  fixed = rla.GatedRLA(N, policy.GateConfig(fixed=0.5))
  params = nn.meta.unbox(fixed.init(jax.random.key(0), visual, text)['params'])
  assert 'policy' not in params
  (out_v, _), [record] = _sampled(fixed, params, visual, text, 1)
  np.testing.assert_array_equal(record['gate'], [0.5])
  np.testing.assert_array_equal(record['entropy'], [0.0])
  ref_v, _ = rla.RLABlock(N).apply({'params': params['block']}, visual, text, 0.5)
  np.testing.assert_allclose(out_v, ref_v, rtol=1e-6, atol=1e-6)
