"""The sign encoder (skeleton + visual fusion) and the projector: shapes, masks, ablations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.models import fusion
from rvlf_jax.models.fusion import FusionConfig, SignEncoder, SignEncoderConfig
from tests.helpers import assert_all_named, fast_jit, keypoint_batch, numpy_params

T, LENGTH, DV = 16, 9, 24
CONFIGS = {
    'gated_sum': SignEncoderConfig.tiny(DV, mode='gated_sum'),
    'cross_attention': SignEncoderConfig.tiny(DV, mode='cross_attention'),
    'concat': SignEncoderConfig.tiny(DV, mode='concat', num_layers=1),
    'skeleton_only': SignEncoderConfig.tiny(DV, skeleton_only=True),
    'visual_only': SignEncoderConfig.tiny(DV, visual_only=True),
}


def perturbed_batch():
  """Rows: 0 a clip; 1 the same with garbage in its padded frames; 2 the same with other visual
  features in its valid frames; 3 the same with other keypoints in its valid frames."""
  rng = np.random.RandomState(0)
  kp, mask = keypoint_batch(rng, 1, T, [LENGTH])
  visual = (rng.randn(1, T, DV) * 5.0).astype(np.float32) * mask[..., None]
  kp, mask, visual = (np.repeat(a, 4, axis=0) for a in (kp, mask, visual))
  pad = ~mask[1]
  kp[1, pad] = rng.randn(pad.sum(), 133, 3) * 100.0
  visual[1, pad] = rng.randn(pad.sum(), DV) * 100.0
  visual[2, :LENGTH] = rng.randn(LENGTH, DV) * 5.0
  kp[3, :LENGTH, :, :2] = rng.randn(LENGTH, 133, 2)
  return {'keypoints': kp, 'frame_mask': mask, 'visual': visual}


@pytest.fixture(scope='module')
def batch():
  return perturbed_batch()


@pytest.mark.parametrize('name', list(CONFIGS))
def test_padding_ablations_and_shapes(name, batch):
  config = CONFIGS[name]
  module = SignEncoder(config)
  params = numpy_params(module, batch)
  x, m = fast_jit(module.apply)({'params': params}, batch)
  x, m = np.asarray(x), np.asarray(m)
  t_out = config.num_tokens(T)
  assert x.shape == (4, t_out, config.d_model) and m.shape == (4, t_out)
  np.testing.assert_array_equal(m.sum(1), config.num_tokens(LENGTH))
  assert np.all(x[~m] == 0)
  # Padded frames, whatever they hold, change nothing.
  np.testing.assert_allclose(x[1], x[0], atol=1e-5)
  diff = lambda i: np.abs(x[i] - x[0])[m[0]].max()
  if config.fusion.skeleton_only:
    np.testing.assert_array_equal(x[2], x[0])  # visual ignored
    assert diff(3) > 1e-3
  elif config.fusion.visual_only:
    np.testing.assert_array_equal(x[3], x[0])  # keypoints ignored
    assert diff(2) > 1e-3
  else:
    assert diff(2) > 1e-3 and diff(3) > 1e-3  # both streams matter


def test_ablations_run_without_the_other_input(batch):
  no_visual = {k: v for k, v in batch.items() if k != 'visual'}
  no_keypoints = {k: v for k, v in batch.items() if k != 'keypoints'}
  for config, inputs in ((CONFIGS['skeleton_only'], no_visual),
                         (CONFIGS['visual_only'], no_keypoints)):
    variables = jax.eval_shape(SignEncoder(config).init, jax.random.key(0), inputs)
    assert set(variables['params']) == ({'skeleton', 'output_norm'} if config.fusion.skeleton_only
                                        else {'visual', 'output_norm'})
  with pytest.raises(KeyError, match='visual'):
    jax.eval_shape(SignEncoder(CONFIGS['gated_sum']).init, jax.random.key(0), no_visual)


def test_every_param_has_logical_axes(batch):
  for config in list(CONFIGS.values()) + [SignEncoderConfig.base(DV)]:
    boxed = jax.eval_shape(SignEncoder(config).init, jax.random.key(0), batch)['params']
    assert_all_named(boxed)
  proj = jax.eval_shape(fusion.Projector(48, 40).init, jax.random.key(0), jnp.zeros((2, 3, 32)))
  assert_all_named(proj['params'])


def test_projector_shapes():
  out = jax.eval_shape(lambda: fusion.Projector(48).init_with_output(
      jax.random.key(0), jnp.zeros((2, 5, 32))))[0]
  assert out.shape == (2, 5, 48)


def test_ten_second_clip_gives_a_few_dozen_tokens():
  config = SignEncoderConfig.base()
  assert config.downsample == 4
  assert [config.num_tokens(10 * fps) for fps in (12, 25)] == [30, 63]
  batch = {'keypoints': jnp.zeros((1, 250, 133, 3)), 'frame_mask': jnp.ones((1, 250), bool),
           'visual': jnp.zeros((1, 250, 768))}
  (x, m), _ = jax.eval_shape(SignEncoder(config).init_with_output, jax.random.key(0), batch)
  assert x.shape == (1, 63, 512) and m.shape == (1, 63)


def test_config_validation():
  with pytest.raises(ValueError, match='exclude'):
    FusionConfig(skeleton_only=True, visual_only=True)
  with pytest.raises(ValueError, match='Unknown fusion mode'):
    FusionConfig(mode='sum')
  with pytest.raises(ValueError, match='would not align'):
    SignEncoderConfig.tiny(DV, visual_strides=(2,))
  with pytest.raises(ValueError, match='d_model'):
    SignEncoderConfig(fusion=FusionConfig(d_model=128))
  # Other strides with the same product align.
  config = SignEncoderConfig.tiny(DV, visual_strides=(4,), visual_kernel=4)
  assert config.downsample == 4
  # visual_only downsamples by the visual strides alone.
  assert SignEncoderConfig.tiny(DV, visual_only=True, visual_strides=(2,)).downsample == 2


@pytest.mark.parametrize('mode', ['gated_sum', 'cross_attention'])
def test_visual_drop_uses_the_skeleton_alone_in_training_only(mode, batch):
  """Rows 0 and 2 differ only in their visual features: when the visual stream is dropped their
  sign tokens agree; in evaluation visual_drop changes nothing."""
  plain = SignEncoderConfig.tiny(DV, mode=mode, dropout=0.0)
  plain = dataclasses.replace(plain, skeleton=dataclasses.replace(plain.skeleton, dropout=0.0))
  params = numpy_params(SignEncoder(plain), batch)
  apply = lambda config, rng=None: np.asarray(SignEncoder(config).apply(
      {'params': params}, batch, deterministic=rng is None,
      rngs=None if rng is None else {'dropout': rng})[0])
  nearly_always = plain.with_fusion(visual_drop=0.999)
  x = apply(nearly_always, jax.random.key(0))
  np.testing.assert_allclose(x[2], x[0], atol=1e-6)
  assert np.abs(x[3] - x[0]).max() > 1e-3  # the skeleton stream still counts
  x = apply(plain.with_fusion(visual_drop=0.0), jax.random.key(0))
  assert np.abs(x[2] - x[0]).max() > 1e-3
  np.testing.assert_array_equal(apply(nearly_always), apply(plain))
  with pytest.raises(ValueError, match='visual_drop'):
    FusionConfig(visual_drop=1.0)
