"""Isolated SynthSign signs: determinism, the featurized pool and its cache, attribute phrases."""

import os

import numpy as np
import pytest
from rvlf_jax.data import keypoints, pipeline
from rvlf_jax.data.synthsign import isolated, lexicon, phonology

GLOSSES = ('MOTHER', 'IX-1', 'RAIN')


@pytest.fixture(scope='module')
def signs():
  return isolated.IsolatedSigns(seed=0, glosses=GLOSSES, signer_ids=(0, 5), repetitions=2)


@pytest.fixture(scope='module')
def featurizer():
  # What recipe.data.featurizer builds for configs/synthsign.py (no stats), without importing jax.
  return pipeline.Featurizer(buckets=pipeline.Buckets(frames=(48, 72, 96), tokens=(24,)),
                             normalize=keypoints.Normalizer(None))


def test_example_fields_and_determinism(signs):
  assert len(signs) == 3 * 2 * 2
  ex = signs.example(5)
  assert (ex['gloss'], ex['class'], ex['signer'], ex['repetition']) == ('IX-1', 1, 0, 1)
  t = len(ex['keypoints'])
  assert ex['keypoints'].shape == (t, 133, 2) and ex['keypoints'].dtype == np.float32
  assert ex['scores'].shape == (t, 133) and ex['scores'].dtype == np.float32
  again = isolated.IsolatedSigns(seed=0, glosses=GLOSSES, signer_ids=(0, 5), repetitions=2)
  assert np.array_equal(ex['keypoints'], again.example(5)['keypoints'])
  # A clip does not depend on which other glosses are chosen.
  alone = isolated.IsolatedSigns(seed=0, glosses=('IX-1',), signer_ids=(0,), repetitions=2)
  assert np.array_equal(ex['keypoints'], alone.example(1)['keypoints'])


def test_signers_reps_seeds_differ(signs):
  a = signs.clip('MOTHER', 0, 0)['keypoints']
  for other in (signs.clip('MOTHER', 5, 0), signs.clip('MOTHER', 0, 1),
                isolated.IsolatedSigns(seed=1, glosses=GLOSSES).clip('MOTHER', 0, 0)):
    b = other['keypoints']
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_frames_view(signs):
  ex = signs.example(0, frames=True)
  assert ex['frames'].shape == (len(ex['keypoints']), 64, 64, 3)
  assert ex['frames'].dtype == np.uint8 and ex['frames'].std() > 0


def test_bad_config():
  with pytest.raises(ValueError, match='unknown glosses'):
    isolated.IsolatedSigns(glosses=('NOT-A-SIGN',))
  with pytest.raises(ValueError, match='signers'):
    isolated.IsolatedSigns(signer_ids=(16,))


def test_pool_cache_round_trip(signs, featurizer, tmp_path):
  logs = []
  pool = isolated.build_pool(signs, str(tmp_path), featurizer=featurizer, workers=1,
                             log=logs.append)
  n = len(signs)
  e, t, j, c = pool['keypoints'].shape
  assert (e, j, c) == (n, 133, 3) and t % 4 == 0 and pool['keypoints'].dtype == np.float32
  assert pool['frame_mask'].shape == (n, t) and pool['frame_mask'].dtype == bool
  lengths = pool['frame_mask'].sum(1)
  assert t - 4 < lengths.max() <= t
  for i in (0, 7):
    ex = signs.example(i)
    assert lengths[i] == len(ex['keypoints'])
    assert np.array_equal(pool['keypoints'][i, :lengths[i]], featurizer(ex)['keypoints'])
    assert pool['classes'][i] == ex['class'] and pool['signers'][i] == ex['signer']
  assert not pool['keypoints'][~pool['frame_mask']].any()
  assert pool['classes'].dtype == np.int32 and list(pool['classes']) == [0] * 4 + [1] * 4 + [2] * 4
  assert list(pool['signers']) == [0, 0, 5, 5] * 3 and pool['glosses'] == list(GLOSSES)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith('isolated-v1-seed0-3g-2s-2r-')
  logs.clear()
  again = isolated.build_pool(signs, str(tmp_path), featurizer=featurizer, workers=1,
                              log=logs.append)
  assert any('read 12 clips' in line for line in logs), logs
  for key in isolated.POOL_KEYS:
    assert np.array_equal(pool[key], again[key]), key
  assert again['glosses'] == pool['glosses']

  # A corrupt file: a clear error naming it, or (the default) rebuilt with a log line.
  path = os.path.join(tmp_path, files[0])
  with open(path, 'wb') as f:
    f.write(b'not a zip file')
  with pytest.raises(ValueError, match='unreadable isolated-sign pool cache') as err:
    isolated.build_pool(signs, str(tmp_path), featurizer=featurizer, workers=1,
                        rebuild_corrupt=False, log=logs.append)
  assert path in str(err.value)
  logs.clear()
  rebuilt = isolated.build_pool(signs, str(tmp_path), featurizer=featurizer, workers=1,
                                log=logs.append)
  assert any('rebuilding' in line and path in line for line in logs), logs
  assert np.array_equal(rebuilt['keypoints'], pool['keypoints'])


def test_pool_with_two_workers_matches(featurizer):
  small = isolated.IsolatedSigns(glosses=('MOTHER', 'RAIN'), signer_ids=(1,))
  one = isolated.build_pool(small, featurizer=featurizer, workers=1, log=lambda _: None)
  two = isolated.build_pool(small, featurizer=featurizer, workers=2, log=lambda _: None)
  assert np.array_equal(one['keypoints'], two['keypoints'])


def test_phrase_tables_cover_phonology():
  assert set(isolated.HANDSHAPE_PHRASES) == set(phonology.HANDSHAPES)
  assert set(isolated.ORIENTATION_PHRASES) == set(phonology.ORIENTATIONS)
  assert set(isolated.LOCATION_PHRASES) == set(phonology.LOCATIONS)
  assert set(isolated.MOVEMENT_PHRASES) == set(phonology.MOVEMENTS)
  assert set(isolated.HANDS_PHRASES) == set(phonology.HANDS)
  assert set(isolated.CATEGORY_PHRASES) == set(lexicon.CATEGORIES)
  for table in (isolated.HANDSHAPE_PHRASES, isolated.ORIENTATION_PHRASES,
                isolated.LOCATION_PHRASES, isolated.MOVEMENT_PHRASES, isolated.HANDS_PHRASES):
    assert len(set(table.values())) == len(table)  # distinct phrases


def test_attribute_phrases():
  for g in lexicon.GLOSSES:
    phrases = isolated.attribute_phrases(g.name)
    assert tuple(phrases) == isolated.ATTRIBUTES and all(phrases.values())
  p = isolated.attribute_phrases('STUDENT')
  assert p['meaning'] == 'a person sign meaning student'
  assert isolated.attribute_phrases('ONE')['handshape'] == isolated.HANDSHAPE_PHRASES['1']
  assert isolated.attribute_phrases('IX-1')['meaning'] == 'a pronoun sign meaning I'
  with pytest.raises(ValueError, match='unknown gloss'):
    isolated.attribute_phrases('NOT-A-SIGN')
