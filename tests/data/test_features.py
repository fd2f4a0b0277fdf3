"""The DINOv2 feature cache on a tiny random encoder: cached features against a direct
`encode_frames` call, packing and padding, resizing, sharding, reloading, resuming and errors."""

import functools
import json
import logging
import pickle
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.data import features as ft
from rvlf_jax.models import vit

CONFIG = vit.VitConfig.tiny()  # 28x28 images, 4x4 patches, D = 32.
LENGTHS = (5, 1, 12, 7)  # Clips straddle batches of 8 frames; the last batch is padded.
# Settings most tests share, so they share one compilation (each new one costs ~1 s).
SAME = dict(batch_frames=8, dense=True, dtype='float32')


@pytest.fixture(scope='module')
def params():
  """Random parameters drawn with numpy from the abstract init (jitting jax.random for every
  parameter takes seconds on CPU); spread wide so every parameter matters."""
  abstract = nn.meta.unbox(jax.eval_shape(vit.VisionTransformer(CONFIG).init, jax.random.key(0),
                                          jnp.zeros((1, 28, 28, 3)))['params'])
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    value = 0.2 * rng.randn(*leaf.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    return value + 1.0 if "'scale'" in name or 'layer_scale' in name else value

  return jax.tree_util.tree_map_with_path(draw, abstract)


def make_clips(lengths=LENGTHS, size=(28, 28), seed=0):
  rng = np.random.RandomState(seed)
  return [(f'clip-{i}', rng.randint(0, 256, (t, *size, 3)).astype(np.uint8))
          for i, t in enumerate(lengths)]


@jax.jit
def _encode_frames(params, pixels):
  out = vit.VisionTransformer(CONFIG).apply({'params': params}, pixels,
                                            method=vit.VisionTransformer.encode_frames)
  return out.cls, out.patch_tokens


def direct(params, clips):
  """What the cache should hold: the model's own `encode_frames` on the clips as one batch.

  Args:
    clips: (id, float[T, 28, 28, 3] pixels in [0, 255]) pairs; at most 4 clips of 12 frames
      (padded to that, so this compiles once).
  """
  pixels = np.zeros((4, 12, 28, 28, 3), np.float32)
  for b, (_, frames) in enumerate(clips):
    pixels[b, :len(frames)] = frames
  pixels = (pixels / 255.0 - np.array(ft.IMAGENET_MEAN, np.float32)) / np.array(ft.IMAGENET_STD,
                                                                              np.float32)
  cls, patches = map(np.asarray, _encode_frames(params, pixels))
  return {clip_id: {'cls': cls[b, :len(f)], 'mean_patch': patches[b, :len(f)].mean(1),
                    'dense': patches[b, :len(f)]} for b, (clip_id, f) in enumerate(clips)}


@pytest.fixture(scope='module')
def f32_cache(params, tmp_path_factory):
  out = tmp_path_factory.mktemp('f32')
  return ft.build_feature_cache(make_clips(), CONFIG, params, out, **SAME)


def test_cache_equals_direct_encoding(f32_cache, params):
  assert len(f32_cache) == len(LENGTHS) and f32_cache.complete
  assert f32_cache.ids() == [f'clip-{i}' for i in range(len(LENGTHS))]
  assert f32_cache.feature_shapes == {'cls': (32,), 'mean_patch': (32,), 'dense': (16, 32)}
  clips = make_clips()
  wants = direct(params, clips)
  for clip_id, frames in clips:
    got = f32_cache.get(clip_id)
    want = wants[clip_id]
    assert f32_cache.length(clip_id) == len(frames)
    for name in ('cls', 'mean_patch', 'dense'):
      assert got[name].dtype == np.float32
      assert got[name].shape == want[name].shape
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)
  assert list(f32_cache.get('clip-2', names=['cls'])) == ['cls']


def test_batch_padding_does_not_change_features(f32_cache, params, tmp_path):
  # One batch holding everything plus 7 padding frames vs batches of 8 (and a clip alone).
  wide = ft.build_feature_cache(make_clips(), CONFIG, params, tmp_path / 'wide', batch_frames=32,
                                pooling=('cls',), dtype='float32')
  alone = ft.build_feature_cache(make_clips()[1:2], CONFIG, params, tmp_path / 'alone',
                                 batch_frames=32, pooling=('cls',), dtype='float32')
  for clip_id in f32_cache.ids():
    np.testing.assert_allclose(wide.get(clip_id)['cls'], f32_cache.get(clip_id)['cls'],
                               atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(alone.get('clip-1')['cls'], f32_cache.get('clip-1')['cls'],
                             atol=1e-5, rtol=1e-5)


def test_sharded_over_devices(f32_cache, params, tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cache = ft.build_feature_cache(make_clips(), CONFIG, params, tmp_path, mesh=mesh, **SAME)
  for clip_id in f32_cache.ids():
    for name, array in cache.get(clip_id).items():
      np.testing.assert_allclose(array, f32_cache.get(clip_id)[name], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='multiple of the mesh size'):
    ft.build_feature_cache(make_clips(), CONFIG, params, tmp_path / 'x', batch_frames=6, mesh=mesh)


def test_resize_and_float16(params, tmp_path):
  clips = make_clips(lengths=(3, 6), size=(40, 36))
  cache = ft.build_feature_cache(clips, CONFIG, params, tmp_path, batch_frames=8, image_size=28,
                                 shard_size_bytes=1)
  assert cache.manifest['preprocess']['image_size'] == [28, 28]
  assert len(cache.manifest['shards']) == 2  # One clip per shard at this size.
  # Resizing commutes with the affine normalisation, so resizing the raw pixels is the same.
  resized = [(i, np.asarray(jax.image.resize(f.astype(np.float32), (len(f), 28, 28, 3),
                                             'bilinear'))) for i, f in clips]
  wants = direct(params, resized)
  for clip_id, _ in clips:
    got = cache.get(clip_id)
    assert got['cls'].dtype == np.float16 and got['mean_patch'].dtype == np.float16
    for name in ('cls', 'mean_patch'):
      # float16 keeps 11 significant bits.
      np.testing.assert_allclose(got[name].astype(np.float32), wants[clip_id][name], atol=2e-3,
                                 rtol=2e-3)


def test_reload_from_disk(f32_cache, tmp_path):
  reloaded = ft.FeatureCache(f32_cache.path, max_open_shards=1)
  assert reloaded.ids() == f32_cache.ids()
  assert reloaded.encoder_fingerprint == f32_cache.encoder_fingerprint
  assert reloaded.encoder_fingerprint.startswith('sha256:')
  # Pickling (for grain workers) drops open shards and still reads.
  reloaded.get('clip-0')
  clone = pickle.loads(pickle.dumps(reloaded))
  for clip_id in f32_cache.ids():
    np.testing.assert_array_equal(clone.get(clip_id)['dense'], f32_cache.get(clip_id)['dense'])


def test_resume_skips_cached_clips(params, tmp_path):
  clips = make_clips()
  first = ft.build_feature_cache(clips[:2], CONFIG, params, tmp_path, **SAME)
  before = {i: first.get(i)['cls'] for i in first.ids()}
  # Corrupted frames for the cached clips prove they are not encoded again.
  again = [(i, np.full_like(f, 255)) for i, f in clips[:2]] + clips[2:]
  cache = ft.build_feature_cache(again, CONFIG, params, tmp_path, **SAME)
  assert cache.ids() == [i for i, _ in clips] and cache.complete
  for clip_id, array in before.items():
    np.testing.assert_array_equal(cache.get(clip_id)['cls'], array)
  assert len(cache.manifest['shards']) == 2



def test_complete_cache_is_only_read(params, tmp_path):
  """Runs sharing a finished cache start together: a build that adds nothing writes nothing
  (another run's temporary files are left alone); one that adds a clip takes the folder."""
  clips = make_clips()
  ft.build_feature_cache(clips[:2], CONFIG, params, tmp_path, **SAME)
  manifest = (tmp_path / ft.MANIFEST)
  before = manifest.read_bytes(), manifest.stat().st_mtime_ns
  (tmp_path / f'{ft._TMP_PREFIX}other-run').write_bytes(b'x')
  cache = ft.build_feature_cache(clips[:2], CONFIG, params, tmp_path, **SAME)
  assert cache.complete and cache.ids() == ['clip-0', 'clip-1']
  assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
  assert (tmp_path / f'{ft._TMP_PREFIX}other-run').exists()
  cache = ft.build_feature_cache(clips[:3], CONFIG, params, tmp_path, **SAME)
  assert cache.complete and cache.ids() == ['clip-0', 'clip-1', 'clip-2']
  assert not (tmp_path / f'{ft._TMP_PREFIX}other-run').exists()

def test_loaders_called_only_for_uncached_clips(f32_cache, params, tmp_path):
  clips = make_clips()
  ft.build_feature_cache(clips[:2], CONFIG, params, tmp_path, **SAME)
  called = []

  def loader(clip_id, frames):
    def load():
      called.append(clip_id)
      return frames
    return clip_id, load

  unreadable = ('clip-gone', lambda: called.append('clip-gone'))  # returns None: skipped
  lazy = [loader(i, f) for i, f in clips] + [unreadable]
  cache = ft.build_feature_cache(lazy, CONFIG, params, tmp_path, **SAME)
  assert sorted(called) == ['clip-2', 'clip-3', 'clip-gone']
  assert cache.ids() == f32_cache.ids()
  for clip_id in cache.ids():
    np.testing.assert_array_equal(cache.get(clip_id)['dense'], f32_cache.get(clip_id)['dense'])


def clip_frames(index: int) -> np.ndarray:
  """make_clips()'s frames of one clip: a module-level loader, picklable for processes."""
  return make_clips()[index][1]


def test_loaders_in_processes_give_the_thread_cache(f32_cache, params, tmp_path):
  lazy = [(f'clip-{i}', functools.partial(clip_frames, i)) for i in range(len(LENGTHS))]
  cache = ft.build_feature_cache(lazy, CONFIG, params, tmp_path, loader_processes=2, **SAME)
  assert cache.ids() == f32_cache.ids()
  for clip_id in cache.ids():
    np.testing.assert_array_equal(cache.get(clip_id)['dense'], f32_cache.get(clip_id)['dense'])
  with pytest.raises(ValueError, match='loader_processes must be >= 0'):
    ft.build_feature_cache(lazy, CONFIG, params, tmp_path / 'neg', loader_processes=-1, **SAME)


def test_interrupted_build_resumes(f32_cache, params, tmp_path):
  clips = make_clips()

  def failing():
    yield from clips[:3]
    raise OSError('video decoder crashed')

  with pytest.raises(OSError, match='crashed'):
    ft.build_feature_cache(failing(), CONFIG, params, tmp_path, shard_size_bytes=1, **SAME)
  partial = ft.FeatureCache(tmp_path)
  assert not partial.complete
  # Clips finish one batch late (the device works ahead), so fewer than 3 may be stored.
  assert 0 < len(partial) <= 3 and partial.ids() == [i for i, _ in clips[:len(partial)]]
  (tmp_path / '.tmp-left-over').write_bytes(b'x')
  cache = ft.build_feature_cache(clips, CONFIG, params, tmp_path, shard_size_bytes=1, **SAME)
  assert cache.complete and cache.ids() == f32_cache.ids()
  assert not (tmp_path / '.tmp-left-over').exists()
  for clip_id in cache.ids():
    np.testing.assert_array_equal(cache.get(clip_id)['dense'], f32_cache.get(clip_id)['dense'])


def test_a_failing_loader_keeps_the_clips_encoded_before_it(f32_cache, params, tmp_path):
  """A clip whose loader raises (one that cannot be rendered) stops the build with its error;
  every clip before it is encoded and kept, whatever the shard size, and a rerun encodes only
  the rest."""
  clips = make_clips()

  def broken():
    raise TypeError('clip-bad cannot be rendered')

  lazy = [(i, functools.partial(lambda f: f, f)) for i, f in clips[:3]] + [('clip-bad', broken)]
  with pytest.raises(TypeError, match='cannot be rendered'):
    ft.build_feature_cache(lazy, CONFIG, params, tmp_path, **SAME)
  partial = ft.FeatureCache(tmp_path)
  assert not partial.complete and partial.ids() == ['clip-0', 'clip-1', 'clip-2']
  loaded = []
  rest = [(i, functools.partial(lambda i, f: loaded.append(i) or f, i, f)) for i, f in clips]
  cache = ft.build_feature_cache(rest, CONFIG, params, tmp_path, **SAME)
  assert loaded == ['clip-3'] and cache.complete and cache.ids() == f32_cache.ids()
  for clip_id in cache.ids():
    np.testing.assert_array_equal(cache.get(clip_id)['dense'], f32_cache.get(clip_id)['dense'])


def test_other_encoder_or_settings_is_an_error(params, tmp_path):
  ft.build_feature_cache(make_clips()[:1], CONFIG, params, tmp_path, **SAME)
  manifest = str(tmp_path / 'manifest.json')
  other = jax.tree.map(lambda x: x, params)
  other['cls_token'] = other['cls_token'] + 1.0
  with pytest.raises(ft.FeatureCacheError, match='encoder differs in fingerprint') as e:
    ft.build_feature_cache(make_clips(), CONFIG, other, tmp_path, **SAME)
  assert manifest in str(e.value)
  with pytest.raises(ft.FeatureCacheError, match='preprocess differs in image_size'):
    ft.build_feature_cache(make_clips(), CONFIG, params, tmp_path, image_size=28, **SAME)
  # The refused runs left the cache as it was.
  assert ft.FeatureCache(tmp_path).ids() == ['clip-0']


def test_missing_and_corrupt(f32_cache, tmp_path):
  with pytest.raises(KeyError, match='nope') as e:
    f32_cache.get('nope')
  assert f32_cache.manifest_path in str(e.value) and 'nope' not in f32_cache
  with pytest.raises(ft.FeatureCacheError, match='manifest.json'):
    ft.FeatureCache(tmp_path)  # No cache here.
  (tmp_path / 'junk.txt').write_text('x')
  with pytest.raises(ft.FeatureCacheError, match='not empty'):
    ft.build_feature_cache([], CONFIG, {}, tmp_path)

  # A copy of the cache with a truncated shard, then a garbled manifest.
  copy = tmp_path / 'copy'
  shutil.copytree(f32_cache.path, copy)
  shard = copy / 'features-00000.cls.npy'
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ft.FeatureCacheError, match='features-00000.cls.npy.*truncated'):
    ft.FeatureCache(copy).get('clip-0')
  (copy / 'manifest.json').write_text('{"format": ')
  with pytest.raises(ft.FeatureCacheError, match='manifest.json: unreadable'):
    ft.FeatureCache(copy)


def test_bad_clips(params, tmp_path):
  with pytest.raises(ValueError, match="'a' has no frames"):
    ft.build_feature_cache([('a', np.zeros((0, 28, 28, 3), np.uint8))], CONFIG, params,
                           tmp_path / '1')
  with pytest.raises(ValueError, match="'b': frames must be uint8"):
    ft.build_feature_cache([('b', np.zeros((2, 28, 28, 3), np.float32))], CONFIG, params,
                           tmp_path / '2')
  clips = make_clips(lengths=(1,))
  with pytest.raises(ValueError, match="'clip-0' appears twice"):
    ft.build_feature_cache(clips + clips, CONFIG, params, tmp_path / '3', **SAME)


def test_progress_is_logged(params, tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    ft.build_feature_cache(make_clips(lengths=(2, 2)), CONFIG, params, tmp_path, log_every=1,
                           **SAME)
  lines = [r.getMessage() for r in caplog.records if 'feature cache' in r.getMessage()]
  assert len(lines) == 3, lines
  assert 'clips/s' in lines[0] and 'ETA' in lines[0] and 'done' in lines[-1]
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  assert manifest['complete'] and manifest['clips']['clip-1'] == {'shard': 0, 'offset': 2,
                                                                 'length': 2}
