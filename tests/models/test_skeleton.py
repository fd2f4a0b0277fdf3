"""The keypoint encoder: output lengths, masks, padding and missing points, dropout, axis names.

Dropout keys are 'rbg' keys: compiling threefry costs seconds on CPU, and these tests need
behaviour, not a particular random stream.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.models import skeleton as sk
from tests.helpers import assert_all_named, fast_jit, keypoint_batch, numpy_params


CONFIG = sk.SkeletonConfig.tiny()
KEY = jax.random.key(0, impl='rbg')
T = 16


@pytest.fixture(scope='module')
def encoder():
  """(module, params, jit fn(params, keypoints, mask, rng) -> (deterministic, dropout) outputs)."""
  module = sk.SkeletonEncoder(CONFIG)
  kp = jnp.zeros((1, T, 133, 3))
  mask = jnp.ones((1, T), bool)
  params = numpy_params(module, kp, mask)

  @fast_jit
  def run(params, kp, mask, rng):
    det = module.apply({'params': params}, kp, mask)
    drop = module.apply({'params': params}, kp, mask, deterministic=False, rngs={'dropout': rng})
    return det, drop

  return module, params, run


def test_config_validation():
  with pytest.raises(ValueError, match='outside'):
    sk.SkeletonConfig.tiny(parts=(('hand', (91, 200)),))
  with pytest.raises(ValueError, match='smaller than a stride'):
    sk.SkeletonConfig.tiny(temporal_kernel=2, temporal_strides=(4,))
  with pytest.raises(ValueError, match='multiple of num_heads'):
    sk.SkeletonConfig.tiny(d_model=30, num_heads=4)
  parts = dict(sk.SkeletonConfig().parts)
  assert set(parts) == {'body', 'left_hand', 'right_hand', 'mouth', 'face'}
  assert parts['left_hand'] == tuple(range(91, 112)) and parts['right_hand'][0] == 112
  assert all(71 <= i <= 90 for i in parts['mouth'])  # lips
  # Parts of an already-selected subset index into its own order.
  selected = dict(sk.subset_parts('cosign77', selected=True))
  assert max(max(idx) for idx in selected.values()) == 76


@pytest.mark.parametrize('strides', [(2, 2), (4,), (3,), (2, 3), ()])
@pytest.mark.parametrize('frames', [1, 5, 8, 13])
def test_output_length_is_ceil(strides, frames):
  config = sk.SkeletonConfig.tiny(temporal_strides=strides, temporal_kernel=4)
  module = sk.SkeletonEncoder(config)
  kp = jax.ShapeDtypeStruct((2, frames, 133, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((2, frames), bool)
  (x, m), _ = jax.eval_shape(lambda k, kp, mask: module.init_with_output(k, kp, mask),
                             jax.random.key(0), kp, mask)
  t_out = -(-frames // int(np.prod(strides)))
  assert config.num_tokens(frames) == t_out
  assert x.shape == (2, t_out, config.d_model) and m.shape == (2, t_out) and m.dtype == bool


def test_downsample_mask_counts_tokens():
  lengths = np.arange(0, 14)
  mask = np.arange(13)[None] < lengths[:, None]
  for stride in (2, 3, 4):
    out = np.asarray(sk.downsample_mask(jnp.asarray(mask), stride))
    np.testing.assert_array_equal(out.sum(1), -(-lengths // stride))
    # Still a prefix mask.
    np.testing.assert_array_equal(out, np.arange(out.shape[1])[None] < out.sum(1)[:, None])


def test_padding_and_missing_points_do_not_leak(encoder):
  """Garbage in padded frames and at confidence-0 points changes no valid output."""
  _, params, run = encoder
  rng = np.random.RandomState(0)
  kp, mask = keypoint_batch(rng, 2, T, [13, 7])
  kp[0, 3, 91:112, 2] = 0.0  # the left hand undetected in one frame
  garbage = kp.copy()
  garbage[~mask] = rng.randn(*garbage[~mask].shape) * 100.0  # coordinates and confidences
  garbage[0, 3, 91:112, :2] = 1e4
  (x, m), _ = run(params, kp, mask, KEY)
  (y, m2), _ = run(params, garbage, mask, KEY)
  np.testing.assert_array_equal(np.asarray(m), np.asarray(m2))
  np.testing.assert_array_equal(np.asarray(m).sum(1), [4, 2])
  np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  assert np.all(np.asarray(x)[~np.asarray(m)] == 0)  # padded tokens are zero
  # ... while a detected point does matter.
  moved = kp.copy()
  moved[0, 4, 95, :2] += 1.0
  (z, _), _ = run(params, moved, mask, KEY)
  assert np.abs(np.asarray(z) - np.asarray(x))[0].max() > 1e-4


def test_valid_outputs_do_not_depend_on_bucket_length():
  """The same clip padded to 16 or 21 frames gives the same valid steps: the strided convs'
  alignment is fixed, not centred on the padded length as 'SAME' padding would (which pads 1 or
  2 frames in front here). Attention is masked and positions count valid steps only, so the convs
  are what could break this."""
  module = sk.TemporalConvStack(8, kernel=5, strides=(2, 3))
  x = np.random.RandomState(1).randn(1, 21, 8).astype(np.float32)
  mask = np.arange(21)[None] < 11
  x[~mask] = 0.0
  params = numpy_params(module, x, mask)
  run = fast_jit(module.apply)
  y_long, m_long = run({'params': params}, x, mask)
  y_short, m_short = run({'params': params}, x[:, :16], mask[:, :16])
  assert y_long.shape[1] == 4 and y_short.shape[1] == 3
  np.testing.assert_array_equal(np.asarray(m_long).sum(), 2)
  np.testing.assert_array_equal(np.asarray(m_short).sum(), 2)
  np.testing.assert_allclose(np.asarray(y_long)[:, :2], np.asarray(y_short)[:, :2], atol=1e-6)


def test_dropout_needs_rng_and_changes_outputs(encoder):
  _, params, run = encoder
  kp, mask = keypoint_batch(np.random.RandomState(2), 2, T, [16, 9])
  (det, m), (drop_a, _) = run(params, kp, mask, KEY)
  _, (drop_b, _) = run(params, kp, mask, jax.random.key(1, impl='rbg'))
  valid = np.asarray(m)
  assert np.abs(np.asarray(det) - np.asarray(drop_a))[valid].max() > 1e-3
  assert np.abs(np.asarray(drop_a) - np.asarray(drop_b))[valid].max() > 1e-3
  assert np.all(np.asarray(drop_a)[~valid] == 0)


def test_every_param_has_logical_axes():
  for config in (sk.SkeletonConfig.tiny(), sk.SkeletonConfig.base()):
    module = sk.SkeletonEncoder(config)
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 133, 3)),
                           jnp.ones((1, 8), bool))['params']
    assert_all_named(boxed)


def test_base_size():
  module = sk.SkeletonEncoder(sk.SkeletonConfig.base())
  params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 133, 3)),
                          jnp.ones((1, 8), bool))['params']
  n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
  assert 5e6 < n < 2e7, n
