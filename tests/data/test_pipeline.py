"""grain pipelines: buckets, epochs, sharding, checkpointed iterators, skips."""

import dataclasses
import functools
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
from absl import flags
from PIL import Image

from rvlf_jax.data import annotations, keypoints, pipeline
from rvlf_jax.data.pipeline import Buckets, Featurizer, SkipReport


class WordTokenizer:
  """Whitespace tokenizer over a growing vocabulary: enough to exercise the pipeline."""

  pad_id, eos_id = 0, 1

  def encode(self, text):
    return [2 + (sum(map(ord, w)) % 50) for w in text.split()]


class FakeDataset:
  """Clips of 5..40 frames with texts of 1..12 words; some indices are broken on request."""

  def __init__(self, n, broken=None):
    self.n, self.broken = n, broken or {}

  def num_examples(self, split):
    return self.n

  def example(self, split, i, frames=False):
    rng = np.random.default_rng(i)
    t = 5 + (i * 7) % 36
    ex = {'id': f'{split}-{i}', 'keypoints': rng.normal(size=(t, 133, 2)).astype(np.float32),
          'scores': rng.uniform(size=(t, 133)).astype(np.float32),
          'text': ' '.join(['word'] * (1 + i % 12))}
    if frames:
      ex['frames'] = rng.integers(0, 255, (t, 8, 8, 3), dtype=np.uint8)
    kind = self.broken.get(i)
    if kind == 'nan':
      ex['keypoints'][0, 0, 0] = np.nan
    elif kind == 'empty_text':
      ex['text'] = '  '
    elif kind == 'wrong_points':
      ex['keypoints'], ex['scores'] = ex['keypoints'][:, :, :1], ex['scores']
    elif kind == 'unreadable':
      return pipeline.skipped(ex['id'], 'FileNotFoundError: poses/x.pose does not exist')
    return ex


BUCKETS = Buckets(frames=(16, 32), tokens=(8, 16))


def featurizer(**kw):
  return Featurizer(tokenizer=WordTokenizer(), buckets=BUCKETS, **kw)


def ids_of(batches):
  return [i for b in batches for i, keep in zip(b['id'], b['example_mask']) if keep]


def test_batches_use_buckets_and_masks():
  source = pipeline.SplitSource(FakeDataset(20), 'train', frames=True)
  ds = pipeline.train_pipeline(source, featurizer(frames=True), 4, seed=0, num_epochs=1,
                               shard=(0, 1))
  shapes = set()
  for batch in ds:
    b, t = batch['frame_mask'].shape
    assert b == 4 and t in (16, 32) and batch['text_ids'].shape[1] in (8, 16)
    assert batch['keypoints'].shape == (4, t, 133, 3)
    assert batch['frames'].shape == (4, t, 8, 8, 3)
    lengths = batch['frame_mask'].sum(1)
    # Padding frames carry zero confidence; real frames keep theirs.
    for row, n in enumerate(lengths):
      assert np.all(batch['keypoints'][row, n:] == 0)
    np.testing.assert_array_equal(batch['text_mask'], batch['text_ids'] != 0)
    assert np.all(batch['text_ids'][np.arange(4), batch['text_mask'].sum(1) - 1] == 1)  # eos
    shapes.add((t, batch['text_ids'].shape[1]))
  assert len(shapes) >= 2  # several buckets in use, each a fixed shape


def test_epochs_reshuffle_and_cover_everything():
  source = pipeline.SplitSource(FakeDataset(12), 'train')
  batches = list(pipeline.train_pipeline(source, featurizer(), 4, seed=3, num_epochs=2,
                                         shard=(0, 1)))
  first, second = ids_of(batches[:3]), ids_of(batches[3:])
  assert sorted(first) == sorted(second) == sorted(f'train-{i}' for i in range(12))
  assert first != second


def test_process_shards_are_disjoint():
  source = pipeline.SplitSource(FakeDataset(16), 'train')
  seen = [ids_of(pipeline.train_pipeline(source, featurizer(), 2, seed=0, num_epochs=1,
                                         shard=(k, 2))) for k in range(2)]
  assert not set(seen[0]) & set(seen[1])
  assert len(seen[0]) + len(seen[1]) == 16


@pytest.mark.parametrize('workers', [0, 2])
def test_restored_iterator_yields_the_same_batches(workers):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  source = pipeline.SplitSource(FakeDataset(30), 'train')
  make = lambda: iter(pipeline.train_pipeline(source, featurizer(), 4, seed=7, workers=workers,
                                              shard=(0, 1)))
  uninterrupted = make()
  expected = [next(uninterrupted) for _ in range(12)]
  interrupted = make()
  for _ in range(5):
    next(interrupted)
  state = interrupted.get_state()
  del interrupted
  resumed = make()
  resumed.set_state(state)
  for want in expected[5:]:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class CountedDataset(FakeDataset):
  """FakeDataset that knows its clips' lengths, as a cached SynthSign does."""

  def frame_counts(self, split):
    return np.array([5 + (i * 7) % 36 for i in range(self.n)])


def test_length_grouped_order_is_a_shuffled_epoch_of_similar_lengths():
  lengths = np.random.default_rng(0).integers(10, 100, 1000)
  order = pipeline.length_grouped_order(lengths, 10, 8, seed=1, epoch=0)
  assert len(order) == 1000 and len(set(order)) == 1000
  spread = np.ptp(lengths[order].reshape(100, 10), axis=1)
  shuffled = np.ptp(lengths[np.random.default_rng(2).permutation(1000)].reshape(100, 10), axis=1)
  assert spread.mean() < shuffled.mean() / 4
  # Anew each epoch; the same for the same (seed, epoch); the remainder is left out.
  assert not np.array_equal(order, pipeline.length_grouped_order(lengths, 10, 8, 1, 1))
  np.testing.assert_array_equal(order, pipeline.length_grouped_order(lengths, 10, 8, 1, 0))
  assert len(pipeline.length_grouped_order(lengths[:995], 10, 8, 1, 0)) == 990


def test_grouped_batches_pad_less_and_cover_each_epoch():
  source = pipeline.SplitSource(CountedDataset(64), 'train')
  run = lambda group: list(pipeline.train_pipeline(
      source, featurizer(), 8, seed=0, num_epochs=2, shard=(0, 1), group_by_length=group))
  grouped, plain = run(4), run(0)
  padded = lambda batches: sum(b['frame_mask'].size for b in batches)
  assert padded(grouped) < padded(plain)
  for epoch in (grouped[:8], grouped[8:]):
    assert sorted(ids_of(epoch)) == sorted(f'train-{i}' for i in range(64))
  assert ids_of(grouped[:8]) != ids_of(grouped[8:])
  # In memory, the same batches.
  memory = pipeline.FeaturizedSource(source, featurizer())
  cached = list(pipeline.train_pipeline(memory, None, 8, seed=0, num_epochs=2, shard=(0, 1),
                                        group_by_length=4))
  assert ids_of(cached) == ids_of(grouped)


def test_grouped_iterator_restores_and_shards():
  source = pipeline.SplitSource(CountedDataset(40), 'train')
  make = lambda shard=(0, 1): iter(pipeline.train_pipeline(source, featurizer(), 4, seed=5,
                                                           shard=shard, group_by_length=2))
  uninterrupted = make()
  expected = [next(uninterrupted)['id'] for _ in range(15)]
  interrupted = make()
  for _ in range(7):
    next(interrupted)
  resumed = make()
  resumed.set_state(interrupted.get_state())
  assert [list(next(resumed)['id']) for _ in range(8)] == [list(i) for i in expected[7:]]
  halves = [set(i for _ in range(5) for i in next(it)['id']) for it in (make((0, 2)),
                                                                        make((1, 2)))]
  assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 40


def test_sources_without_lengths_are_shuffled_as_before():
  source = pipeline.SplitSource(FakeDataset(12), 'train')
  assert pipeline.frame_counts(source) is None
  args = dict(seed=3, num_epochs=1, shard=(0, 1))
  assert ids_of(pipeline.train_pipeline(source, featurizer(), 4, group_by_length=4, **args)) == \
      ids_of(pipeline.train_pipeline(source, featurizer(), 4, **args))


@dataclasses.dataclass(frozen=True)
class CountingFeaturizer(Featurizer):
  calls: list = dataclasses.field(default_factory=list)

  def __call__(self, example):
    self.calls.append(example['id'])
    return super().__call__(example)


def test_featurized_source_featurizes_each_example_once():
  """In memory, two epochs give the batches of the plain pipeline and featurize once each;
  eval pipelines share the source; skipped examples stay skipped."""
  source = pipeline.SplitSource(FakeDataset(12, broken={5: 'nan'}), 'train')
  counting = CountingFeaturizer(tokenizer=WordTokenizer(), buckets=BUCKETS)
  memory = pipeline.FeaturizedSource(source, counting)
  plain = list(pipeline.train_pipeline(source, featurizer(), 4, seed=3, num_epochs=2,
                                       shard=(0, 1)))
  cached = list(pipeline.train_pipeline(memory, None, 4, seed=3, num_epochs=2, shard=(0, 1)))
  assert len(cached) == len(plain) and ids_of(cached) == ids_of(plain)
  for got, want in zip(cached, plain):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert sorted(counting.calls) == sorted(f'train-{i}' for i in range(12))
  head = list(pipeline.eval_pipeline(memory, None, 4, shard=(0, 1), limit=6))
  assert ids_of(head) == [f'train-{i}' for i in range(6) if i != 5]
  assert len(counting.calls) == 12  # nothing featurized again
  assert pickle.loads(pickle.dumps(memory))._cache == {}  # workers get the recipe, not the data
  with pytest.raises(ValueError, match='own featurizer'):
    pipeline.train_pipeline(memory, featurizer(), 4, seed=0)


def test_eval_yields_every_example_once_in_order():
  source = pipeline.SplitSource(FakeDataset(10), 'dev')
  batches = list(pipeline.eval_pipeline(source, featurizer(), 4, shard=(0, 1)))
  assert [b['example_mask'].sum() for b in batches] == [4, 4, 2]
  assert all(b['frame_mask'].shape[0] == 4 for b in batches)
  assert ids_of(batches) == [f'dev-{i}' for i in range(10)]


def test_lenient_mode_skips_counts_and_reports(caplog):
  broken = {1: 'nan', 4: 'empty_text', 6: 'wrong_points', 9: 'unreadable'}
  source = pipeline.SplitSource(FakeDataset(12, broken), 'train')
  report = SkipReport('train')
  with caplog.at_level(logging.INFO, logger='rvlf_jax.data'):
    got = ids_of(pipeline.train_pipeline(source, featurizer(), 1, seed=0, num_epochs=1,
                                         report=report, shard=(0, 1)))
  assert sorted(got) == sorted(f'train-{i}' for i in range(12) if i not in broken)
  assert report.total == 4
  summary = report.summary()
  for needle in ('NaN', 'empty translation', 'not [T, J, 2]', 'poses/x.pose'):
    assert needle in summary
  assert 'end of epoch 1' in caplog.text and 'skipped 4' in caplog.text


@pytest.mark.parametrize('kind,message', [('nan', 'train-1: NaN'),
                                          ('empty_text', 'train-1: empty translation'),
                                          ('unreadable', 'poses/x.pose')])
def test_strict_mode_raises_naming_the_example(kind, message):
  source = pipeline.SplitSource(FakeDataset(4, {1: kind}), 'train')
  ds = pipeline.eval_pipeline(source, featurizer(strict=True), 2, shard=(0, 1))
  with pytest.raises(ValueError, match=message):
    list(ds)


def test_long_clips_are_subsampled_and_counted():
  source = pipeline.SplitSource(FakeDataset(8), 'train')
  report = SkipReport()
  small = Featurizer(tokenizer=WordTokenizer(), buckets=Buckets(frames=(8, 12), tokens=(4,)))
  batches = list(pipeline.eval_pipeline(source, small, 8, report=report, shard=(0, 1)))
  assert batches[0]['frame_mask'].shape == (8, 12)
  assert batches[0]['text_ids'].shape == (8, 4)
  assert np.all(batches[0]['text_ids'][:, -1][batches[0]['text_mask'][:, -1]] == 1)
  dataset = FakeDataset(8)
  expected = sum(
      dataset.example('train', i)['keypoints'].shape[0] > 12  # frames over the largest bucket
      or len(dataset.example('train', i)['text'].split()) + 1 > 4  # words + eos over 4 tokens
      for i in range(8))
  assert 0 < report.truncated == expected


def test_bucket_validation():
  with pytest.raises(ValueError, match='increasing'):
    Buckets(frames=(32, 16))


def test_real_pose_files_feed_the_pipeline(shared_data, tmp_path):
  """Both real sample files, a missing file and a truncated .pose, through PoseFileSource."""
  with open(os.path.join(shared_data, 'holistic_v02.pose'), 'rb') as f:
    (tmp_path / 'truncated.pose').write_bytes(f.read()[:20000])
  shutil.copy(os.path.join(shared_data, 'rtmpose133_lis.pkl'), tmp_path / 'lis.pkl')
  shutil.copy(os.path.join(shared_data, 'holistic_v02.pose'), tmp_path / 'holistic.pose')
  with open(os.path.join(shared_data, 'rtmpose133_lis.pkl'), 'rb') as f:
    lis = pickle.load(f)
  lis['keypoints'] = [np.asarray(k)[:, :130] for k in lis['keypoints']]
  lis['scores'] = [np.asarray(k)[:, :130] for k in lis['scores']]
  with open(tmp_path / 'wrong_count.pkl', 'wb') as f:
    pickle.dump(lis, f)
  records = [annotations.Annotation(id=name, split='train', text='ein satz hier',
                                    dataset='phoenix2014t')
             for name in ('lis.pkl', 'holistic.pose', 'missing.pkl', 'truncated.pose',
                          'wrong_count.pkl')]
  source = pipeline.PoseFileSource(records, str(tmp_path / '{id}'))
  report = SkipReport('real')
  normalize = functools.partial(keypoints.normalize, strict=False)
  featurize = Featurizer(tokenizer=WordTokenizer(), buckets=Buckets(frames=(8, 128)),
                         normalize=normalize)
  batches = list(pipeline.eval_pipeline(source, featurize, 2, report=report, shard=(0, 1)))
  assert ids_of(batches) == ['lis.pkl', 'holistic.pose']
  batch = batches[0]
  assert batch['keypoints'].shape == (2, 128, 133, 3)
  assert batch['frame_mask'].sum(1).tolist() == [126, 5]
  # Body-centred: the shoulders' midpoint is near the origin in both files.
  shoulders = batch['keypoints'][:, 0, 5:7, :2].mean(1)
  assert np.abs(shoulders).max() < 0.1
  assert report.total == 3
  for name in ('missing.pkl', 'truncated.pose', 'wrong_count.pkl'):
    assert name in report.summary()

  strict = pipeline.PoseFileSource(records[2:], str(tmp_path / '{id}'), strict=True)
  with pytest.raises(ValueError, match='missing.pkl'):
    strict[0]


def test_annotation_clips_skip_missing_videos(tmp_path):
  folder = tmp_path / 'frames' / 'clip_a'
  folder.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
  records = [
      annotations.Annotation(id='a', split='dev', text='x', dataset='phoenix2014t',
                             frames_dir=str(folder), fps=25.0),
      annotations.Annotation(id='b', split='dev', text='y', dataset='how2sign',
                             video=str(tmp_path / 'gone.mp4'), start=1.0, end=2.0),
  ]
  report = SkipReport('clips')
  clips = list(pipeline.annotation_clips(records, size=8, report=report))
  assert [c[0] for c in clips] == ['a', 'b'] and report.total == 0  # nothing read yet
  frames = [load() for _, load in clips]
  assert frames[0].shape == (3, 8, 8, 3) and frames[1] is None
  assert report.total == 1 and 'gone.mp4' in report.summary()
  with pytest.raises(ValueError, match='gone.mp4'):
    [load() for _, load in pipeline.annotation_clips(records, strict=True)]


def test_joint_subset_after_normalisation():
  """Normalisation reads body joints of the 133-point layout, so a subset is taken after it."""
  sub = keypoints.SUBSETS['cosign77'].indices
  full = featurizer(normalize=keypoints.Normalizer())
  reduced = featurizer(normalize=keypoints.Normalizer(), joints=tuple(sub))
  ex = FakeDataset(3).example('train', 2)
  np.testing.assert_array_equal(reduced(ex)['keypoints'], full(ex)['keypoints'][:, list(sub)])
