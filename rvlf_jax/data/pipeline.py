"""grain pipelines: sign-language examples -> padded, bucketed numpy batches.

A *source* is any random-access sequence of example dicts (`SynthSign` through `SplitSource`,
real data through `PoseFileSource`). Each example holds at least
  'id' str, 'keypoints' float32[T, 133, 2], 'scores' float32[T, 133], 'text' str,
and optionally 'frames' uint8[T, H, W, 3]. `Featurizer` turns one into model inputs; `collate`
pads a list of them to the smallest bucket that fits the longest, so a run compiles one shape per
(frame bucket, token bucket) pair rather than one per batch.

Batches (all numpy):
  'keypoints' float32[B, Tb, J, 3]   x, y, confidence (confidence 0 on padding)
  'frame_mask' bool[B, Tb]
  'frames' uint8[B, Tb, H, W, 3]     when frames are requested
  'visual' float32[B, Tb, Dv]        when cached features are requested
  'text_ids' int32[B, Lb]            target tokens + eos, pad_id after
  'text_mask' bool[B, Lb]
  'example_mask' bool[B]             False on rows that only fill up the last eval batch
  'id' str[B], 'text' str[B]         the example ids and reference translations (host only)

Training pipelines shuffle anew each epoch, shard by JAX process and have a checkpointable
iterator (`iterator.get_state()` / `set_state()`); when the source knows its clips' lengths
(`frame_counts`), they can also batch clips of similar length together
(`length_grouped_order`), so that little of a batch is padding. Eval pipelines are ordered and
yield every example exactly once. Bad examples either raise (strict) or are skipped, counted and reported
(lenient, the default for training) by a `SkipReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from rvlf_jax.data import annotations, keypoints, poses, video

SKIPPED = '__skipped__'


def skipped(example_id: str, reason: str) -> dict[str, str]:
  """The marker a lenient source returns for an example it could not read."""
  return {SKIPPED: reason, 'id': example_id}


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Padded lengths: a batch takes the smallest bucket that fits its longest member.

  Clips longer than the largest frame bucket are uniformly subsampled to it, and texts longer
  than the largest token bucket are cut (keeping eos); both are counted as truncations.
  """

  frames: tuple[int, ...] = (32, 64, 96, 128)
  tokens: tuple[int, ...] = (16, 32, 48)

  def __post_init__(self):
    for name in ('frames', 'tokens'):
      values = getattr(self, name)
      if not values or list(values) != sorted(set(values)) or values[0] <= 0:
        raise ValueError(f'Buckets.{name} must be increasing positive lengths, got {values}.')

  @staticmethod
  def fit(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
      if length <= bucket:
        return bucket
    return buckets[-1]


class SkipReport:
  """Counts examples skipped in lenient mode, by reason, and says so once per epoch."""

  def __init__(self, name: str = 'data'):
    self.name = name
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self.truncated = 0

  def add(self, reason: str, example_id: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < 5:
      self.examples[reason].append(example_id)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    if not self.total and not self.truncated:
      return f'{self.name}: no example skipped or truncated.'
    lines = [f'{self.name}: skipped {self.total} example(s), truncated {self.truncated}.']
    for reason, count in self.counts.most_common():
      lines.append(f'  {count} x {reason} (e.g. {", ".join(self.examples[reason])})')
    return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class Featurizer:
  """Turns one example dict into model inputs (a grain map transform; picklable).

  Attributes:
    tokenizer: anything with `encode(text) -> list[int]`, `eos_id`; None skips the text.
    buckets: maximum lengths (the largest buckets) apply here.
    frames: keep the RGB frames.
    feature_cache: an object with `get(id) -> {'cls': [T, D], ...}` for cached visual features.
    feature_keys: which cached features to concatenate into 'visual'.
    joints: indices of the keypoints to keep (e.g. a 77-point subset); None keeps all.
    normalize: (keypoints [T, J, 2], scores [T, J]) -> the same, normalised (e.g.
      `functools.partial(keypoints.normalize, strict=False)`), or None.
    strict: raise on bad examples instead of marking them skipped.
  """

  tokenizer: Any = None
  buckets: Buckets = Buckets()
  frames: bool = False
  feature_cache: Any = None
  feature_keys: tuple[str, ...] = ('cls',)
  joints: tuple[int, ...] | None = None
  normalize: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
  strict: bool = False

  def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
    example_id = str(example.get('id', '?'))
    try:
      return self._featurize(example)
    except (OSError, ValueError, KeyError) as e:
      if self.strict:
        raise
      return skipped(example_id, f'{type(e).__name__}: {e}')

  def _featurize(self, example: Mapping[str, Any]) -> dict[str, Any]:
    if SKIPPED in example:  # the source already failed on this one
      if self.strict:
        raise ValueError(example[SKIPPED])
      return dict(example)
    example_id = str(example['id'])
    kp = np.asarray(example['keypoints'], np.float32)
    scores = np.asarray(example['scores'], np.float32)
    if kp.ndim != 3 or kp.shape[-1] != 2 or scores.shape != kp.shape[:2]:
      raise ValueError(f'{example_id}: keypoints {kp.shape} / scores {scores.shape} are not '
                       '[T, J, 2] / [T, J].')
    if kp.shape[0] == 0:
      raise ValueError(f'{example_id}: clip has no frames.')
    if not np.all(np.isfinite(kp)):
      raise ValueError(f'{example_id}: NaN or infinite keypoint coordinates.')
    text = example.get('text', '')
    if self.tokenizer is not None and not str(text).strip():
      raise ValueError(f'{example_id}: empty translation.')
    # Normalisation reads the body joints of the full layout, so it comes before the subset.
    if self.normalize is not None:
      kp, scores = self.normalize(kp, scores)
    if self.joints is not None:
      kp, scores = kp[:, list(self.joints)], scores[:, list(self.joints)]
    out = {'id': example_id, 'keypoints': np.concatenate([kp, scores[..., None]], axis=-1),
           'truncated': False}
    t = kp.shape[0]
    keep = None
    if t > self.buckets.frames[-1]:
      # Uniform temporal subsampling keeps the whole sentence rather than its first part.
      keep = np.linspace(0, t - 1, self.buckets.frames[-1]).round().astype(np.int64)
      out['keypoints'] = out['keypoints'][keep]
      out['truncated'] = True
    if self.frames:
      frames = np.asarray(example['frames'], np.uint8)
      if frames.shape[0] != t:
        raise ValueError(f'{example_id}: {frames.shape[0]} frames but {t} keypoint frames.')
      out['frames'] = frames if keep is None else frames[keep]
    if self.feature_cache is not None:
      cached = self.feature_cache.get(example_id)
      visual = np.concatenate([np.asarray(cached[k], np.float32) for k in self.feature_keys], -1)
      if visual.shape[0] != t:
        raise ValueError(f'{example_id}: cached features have {visual.shape[0]} frames, the clip '
                         f'{t}.')
      out['visual'] = visual if keep is None else visual[keep]
    if self.tokenizer is not None:
      ids = list(self.tokenizer.encode(str(text))) + [self.tokenizer.eos_id]
      if len(ids) > self.buckets.tokens[-1]:
        ids = ids[:self.buckets.tokens[-1] - 1] + [self.tokenizer.eos_id]
        out['truncated'] = True
      out['text_ids'] = np.asarray(ids, np.int32)
    out['text'] = str(text)
    return out


def collate(examples: Sequence[Mapping[str, Any]], buckets: Buckets, pad_id: int = 0,
            batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Pads featurized examples into one batch at the smallest fitting buckets.

  Args:
    examples: outputs of `Featurizer`.
    buckets: the bucket lengths.
    pad_id: token id of text padding.
    batch_size: pad the batch itself to this many rows (rows marked False in 'example_mask'),
      so the last eval batch has the same shape as the others.
  """
  n = len(examples)
  b = batch_size or n
  if n > b:
    raise ValueError(f'{n} examples for a batch of {b}.')
  t = Buckets.fit(max(e['keypoints'].shape[0] for e in examples), buckets.frames)
  first = examples[0]
  batch: dict[str, np.ndarray] = {
      'keypoints': np.zeros((b, t) + first['keypoints'].shape[1:], np.float32),
      'frame_mask': np.zeros((b, t), bool),
      'example_mask': np.arange(b) < n,
      'id': np.asarray([e['id'] for e in examples] + [''] * (b - n)),
      'text': np.asarray([e.get('text', '') for e in examples] + [''] * (b - n)),
  }
  if 'frames' in first:
    batch['frames'] = np.zeros((b, t) + first['frames'].shape[1:], np.uint8)
  if 'visual' in first:
    batch['visual'] = np.zeros((b, t, first['visual'].shape[-1]), np.float32)
  if 'text_ids' in first:
    length = Buckets.fit(max(len(e['text_ids']) for e in examples), buckets.tokens)
    batch['text_ids'] = np.full((b, length), pad_id, np.int32)
    batch['text_mask'] = np.zeros((b, length), bool)
  for i, e in enumerate(examples):
    frames = e['keypoints'].shape[0]
    batch['keypoints'][i, :frames] = e['keypoints']
    batch['frame_mask'][i, :frames] = True
    if 'frames' in batch:
      batch['frames'][i, :frames] = e['frames']
    if 'visual' in batch:
      batch['visual'][i, :frames] = e['visual']
    if 'text_ids' in batch:
      batch['text_ids'][i, :len(e['text_ids'])] = e['text_ids']
      batch['text_mask'][i, :len(e['text_ids'])] = True
  return batch


HOST_KEYS = ('id', 'text')


def device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The batch without its host-only string fields, ready for a jitted step."""
  return {k: v for k, v in batch.items() if k not in HOST_KEYS}


class SplitSource:
  """One split of a dataset with `num_examples(split)` and `example(split, i, frames=...)`."""

  def __init__(self, dataset: Any, split: str, frames: bool = False):
    self.dataset, self.split, self.frames = dataset, split, frames

  def __len__(self) -> int:
    return self.dataset.num_examples(self.split)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.dataset.example(self.split, int(index), frames=self.frames)

  def frame_counts(self) -> np.ndarray | None:
    """Frames per example when the dataset knows them without loading clips, else None."""
    counts = getattr(self.dataset, 'frame_counts', None)
    return None if counts is None else counts(self.split)

  def __repr__(self) -> str:
    return f'SplitSource({type(self.dataset).__name__}, {self.split!r}, frames={self.frames})'


class PoseFileSource:
  """Real data: annotations whose keypoints live in pose files (`.pose` or RTMPose `.pkl`).

  Each example is the annotation's text with the pose mapped onto the COCO-WholeBody layout (in
  the file's pixel coordinates; normalise in the Featurizer). A missing, corrupt or NaN-holding
  file raises (strict) or becomes a skipped example naming the file (lenient).
  """

  def __init__(self, records: Sequence[annotations.Annotation],
               pose_path: str | Callable[[annotations.Annotation], str], *,
               strict: bool = False):
    """Args:
      records: the annotations, e.g. from `annotations.read_phoenix`.
      pose_path: a format string over the annotation's fields ('{split}/{id}.pkl' under a root)
        or a function of the annotation.
      strict: raise on the first bad file instead of skipping it.
    """
    self.records = list(records)
    self.pose_path = pose_path
    self.strict = strict

  def path(self, record: annotations.Annotation) -> str:
    if callable(self.pose_path):
      return self.pose_path(record)
    return self.pose_path.format(**dataclasses.asdict(record))

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.records[int(index)]
    path = self.path(record)
    try:
      pose = poses.load_pose(path, strict=self.strict, fps=record.fps)
      body = keypoints.to_wholebody(pose, strict=self.strict)
    except ValueError as e:  # PoseError and the mapping's errors name the file
      if self.strict:
        raise
      return skipped(record.id, str(e) if path in str(e) else f'{path}: {e}')
    return {'id': record.id, 'keypoints': body.keypoints, 'scores': body.scores,
            'text': record.text, 'fps': body.fps}


class FeaturizedSource:
  """A source whose examples are featurized once, on first use, and then kept in memory.

  Epochs after the first cost only the batching: on SynthSign's default training split the
  featurizer takes about 0.15 s per batch of 32 on two CPU cores, most of a small model's step.
  Give it to `train_pipeline` / `eval_pipeline` in place of (source, featurizer); share one per
  split between the stages of a run so that each example is featurized once per process.
  Memory: the featurized arrays of every example read (float32 keypoints and visual features).
  Pickling (grain worker processes) sends the source and featurizer, not what was cached.
  """

  def __init__(self, source: Sequence[Any], featurize: Featurizer):
    self.source, self.featurize = source, featurize
    self._cache: dict[int, dict[str, Any]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    example = self._cache.get(index)
    if example is not None:
      return example
    # grain's reader threads may ask for one index twice at an epoch boundary: one computes.
    # (Featurizing holds the GIL anyway, so one lock for all indices costs little.)
    with self._lock:
      example = self._cache.get(index)
      if example is None:
        example = self._cache[index] = self.featurize(self.source[index])
    return example

  def frame_counts(self) -> np.ndarray | None:
    return frame_counts(self.source)

  def __getstate__(self):
    return {'source': self.source, 'featurize': self.featurize}

  def __setstate__(self, state):
    self.__init__(state['source'], state['featurize'])

  def __repr__(self) -> str:
    return f'FeaturizedSource({self.source!r}, {len(self._cache)}/{len(self)} in memory)'


def frame_counts(source: Sequence[Any]) -> np.ndarray | None:
  """int[N] frames of each example of `source`, if it can tell without loading them (its
  `frame_counts()` method), else None."""
  counts = getattr(source, 'frame_counts', None)
  counts = None if counts is None else counts()
  if counts is None:
    return None
  counts = np.asarray(counts, np.int64)
  if counts.shape != (len(source),):
    raise ValueError(f'{source!r}: frame_counts() has shape {counts.shape}, the source has '
                     f'{len(source)} examples.')
  return counts


def length_grouped_order(lengths: np.ndarray, batch_size: int, window: int, seed: int,
                         epoch: int) -> np.ndarray:
  """One epoch's order of examples such that each run of `batch_size` holds similar lengths.

  The examples are shuffled (by seed and epoch), each window of `window` batches is sorted by
  length and cut into batches, and the batches are shuffled. Every epoch holds
  len(lengths) // batch_size full batches: the remainder (different examples each epoch) is left
  out, so that batch boundaries never drift across epochs.
  """
  rng = np.random.default_rng((seed, epoch))
  order = rng.permutation(len(lengths))
  span = batch_size * window
  for start in range(0, len(order), span):
    chunk = order[start:start + span]
    order[start:start + span] = chunk[np.argsort(lengths[chunk], kind='stable')]
  num_batches = len(order) // batch_size
  batches = order[:num_batches * batch_size].reshape(num_batches, batch_size)
  return batches[rng.permutation(num_batches)].reshape(-1)


class _LengthGrouped:
  """`source` read epoch after epoch in `length_grouped_order` (a random-access view, so that
  grain's iterator state stays a position)."""

  def __init__(self, source: Sequence[Any], lengths: np.ndarray, batch_size: int, window: int,
               seed: int, num_epochs: int | None):
    self.source, self.lengths = source, lengths
    self.batch_size, self.window, self.seed = batch_size, window, seed
    self.epoch_length = len(lengths) // batch_size * batch_size
    self.num_epochs = num_epochs
    self._order: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    if self.num_epochs is None:
      return sys.maxsize
    return self.epoch_length * self.num_epochs

  def __getitem__(self, index: int) -> Any:
    epoch, position = divmod(int(index), self.epoch_length)
    if self._order is None or self._order[0] != epoch:
      self._order = epoch, length_grouped_order(self.lengths, self.batch_size, self.window,
                                                self.seed, epoch)
    return self.source[int(self._order[1][position])]

  def __repr__(self) -> str:
    return f'_LengthGrouped({self.source!r}, window={self.window})'


def _featurized(source: Sequence[Any], featurize: Featurizer | None
                ) -> tuple[grain.MapDataset, Featurizer, bool]:
  """(examples, featurizer, whether they still need featurizing) of a pipeline's input."""
  ready = isinstance(source, FeaturizedSource)
  if ready and featurize is not None and featurize is not source.featurize:
    raise ValueError('a FeaturizedSource carries its own featurizer; pass featurize=None.')
  if not ready and featurize is None:
    raise ValueError('featurize is required unless the source is a FeaturizedSource.')
  return grain.MapDataset.source(source), source.featurize if ready else featurize, not ready


def _read_options(pending: bool, batch_size: int) -> grain.ReadOptions:
  """How grain reads a pipeline's examples in this process.

  Examples kept in memory (or featurized on first use, which holds the GIL) are read in the
  calling thread: the training loop already fetches the next batch while the device runs the
  current step. grain's default (16 threads, 500 prefetched examples) polls its whole buffer
  for every example read, which cost about 50 ms of a core per batch of 32 (measured with
  cProfile), as much as the model's step. Examples still to featurize (reading pose files) get
  two threads and a buffer of two batches.
  """
  if not pending:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size)


def annotation_clips(records: Sequence[annotations.Annotation], *, size: int | None = None,
                     target_fps: float | None = None, strict: bool = False,
                     report: SkipReport | None = None):
  """Yields (id, load) per annotation, `load()` reading its frame folder or video clip as
  uint8[T, H, W, 3].

  The input of `features.build_feature_cache` for real datasets, which calls `load` only for
  clips it has not cached yet. A missing or undecodable video or folder raises (strict) or
  loads as None (the clip is skipped), logged with its path and counted in `report`.
  """
  logger = logging.getLogger('rvlf_jax.data')

  def load(record: annotations.Annotation) -> np.ndarray | None:
    path = record.frames_dir or record.video
    try:
      if path is None:
        raise ValueError(f'{record.id}: the annotation names neither a frame folder nor a video.')
      return video.load_frames(path, fps=record.fps, target_fps=target_fps, size=size,
                               start=record.start, end=record.end)
    except ValueError as e:  # VideoError names the path
      if strict:
        raise
      if report is not None:
        report.add(str(e), record.id)
      logger.warning('skipping %s: %s', record.id, e)
      return None

  for record in records:
    yield record.id, lambda record=record: load(record)


def _drop_skipped(report: SkipReport, epoch_length: int, logger: logging.Logger):
  """A filter that counts skipped examples and truncations, reporting at each epoch's end."""
  seen = [0]

  def keep(example: Mapping[str, Any]) -> bool:
    seen[0] += 1
    is_skipped = SKIPPED in example
    if is_skipped:
      report.add(example[SKIPPED], example['id'])
      logger.warning('skipping %s: %s', example['id'], example[SKIPPED])
    elif example.get('truncated'):
      report.truncated += 1
    if epoch_length and seen[0] % epoch_length == 0:
      logger.info('end of epoch %d. %s', seen[0] // epoch_length, report.summary())
    return not is_skipped

  return keep


def train_pipeline(source: Sequence[Any], featurize: Featurizer | None, batch_size: int, *,
                   seed: int,
                   num_epochs: int | None = None, pad_id: int = 0, workers: int = 0,
                   report: SkipReport | None = None,
                   shard: tuple[int, int] | None = None,
                   group_by_length: int = 0) -> grain.IterDataset:
  """Shuffled (anew each epoch), process-sharded, bucketed training batches.

  Args:
    source: random-access examples, or a `FeaturizedSource` (already featurized ones).
    featurize: the per-example transform (its `strict` decides skip vs raise); None for a
      `FeaturizedSource`.
    batch_size: per-process batch size; incomplete final batches are dropped.
    seed: shuffle seed (the same on every process: shards are disjoint slices).
    num_epochs: None repeats forever.
    pad_id: text padding id.
    workers: grain worker processes for featurizing (0: in process).
    report: collects skips and truncations (pass one to read its counts and summary).
    shard: (index, count); default (jax.process_index(), jax.process_count()).
    group_by_length: when > 0 and the source knows its clips' lengths (`frame_counts`), batches
      hold clips of similar length: `length_grouped_order` over windows of this many batches.
      Each epoch then leaves out the last len(shard) % batch_size examples (others each time).

  Returns:
    A grain IterDataset; `iter()` it and use `get_state()` / `set_state()` to checkpoint.
  """
  index, count = shard or (jax.process_index(), jax.process_count())
  ds, featurize, pending = _featurized(source, featurize)
  lengths = frame_counts(source) if group_by_length > 0 else None
  if lengths is not None:
    view = _LengthGrouped(ds[index::count], lengths[index::count], batch_size, group_by_length,
                          seed, num_epochs)
    epoch_length = view.epoch_length
    ds = grain.MapDataset.source(view)
  else:
    ds = ds[index::count]
    epoch_length = len(ds)
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = (ds.map(featurize) if pending else ds).to_iter_dataset(_read_options(pending, batch_size))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  report = report or SkipReport('train')
  ds = ds.filter(_drop_skipped(report, epoch_length, logging.getLogger('rvlf_jax.data')))
  return ds.batch(batch_size, drop_remainder=True,
                  batch_fn=lambda xs: collate(xs, featurize.buckets, pad_id))


def eval_pipeline(source: Sequence[Any], featurize: Featurizer | None, batch_size: int, *,
                  pad_id: int = 0, report: SkipReport | None = None,
                  shard: tuple[int, int] | None = None,
                  limit: int | None = None) -> grain.IterDataset:
  """Ordered batches holding every example of this process's shard exactly once.

  The last batch is padded with empty rows (example_mask False) so all batches have
  batch_size rows. `limit` keeps the source's first examples only. Other arguments as in
  `train_pipeline`.
  """
  index, count = shard or (jax.process_index(), jax.process_count())
  ds, featurize, pending = _featurized(source, featurize)
  if limit is not None:
    ds = ds[:limit]
  ds = ds[index::count]
  report = report or SkipReport('eval')
  ds = (ds.map(featurize) if pending else ds).to_iter_dataset(
      _read_options(pending, batch_size)).filter(
      _drop_skipped(report, len(ds), logging.getLogger('rvlf_jax.data')))
  return ds.batch(batch_size, drop_remainder=False,
                  batch_fn=lambda xs: collate(xs, featurize.buckets, pad_id, batch_size))
