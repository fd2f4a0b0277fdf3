"""The SynthSign dataset: examples as pure functions of (seed, split, index), and their cache.

    ds = SynthSign('default', seed=0)
    ex = ds.example('train', 17)                  # keypoints, scores, frames, text, ...
    ex = ds.example('train', 17, frames=False)    # skeleton only (about 10 ms)
    ds.save('/data/synthsign')                    # compact cache: skeletons + manifest
    ds = SynthSign.load('/data/synthsign')        # skeletons from the cache, frames re-rendered
    source = pipeline.SplitSource(ds, 'train', frames=True)   # for grain (rvlf_jax.data.pipeline)

Every example draws from independent random streams seeded by (seed, split, index, stream), so
examples can be made in any order, in parallel, or on the fly in a data pipeline, and the same
seed gives identical arrays on the same platform. The size only sets how many examples a split
has: 'tiny' is a prefix of 'default', which is a prefix of 'large'. Dev and test use held-out
signers (`signers.SPLIT_SIGNERS`) and held-out gloss compositions (`grammar.split_of`).

Cache layout (all files deterministic, so the same seed gives the same bytes):
  meta.json                       config and counts
  {split}.jsonl                   one line per example: id, texts, glosses, signer, frame count,
                                  sign times, and where its skeleton is (shard, row)
  {split}-{shard:04d}-{array}.npy  per shard of 500 examples: keypoints int16[N, 133, 2] in 1/32 px,
                                  scores uint8[N, 133] in 1/255, offsets int64[n + 1] (the rows
                                  of each example). Uncompressed, so they are memory-mapped: any
                                  example is read in well under a millisecond, in any order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import re
from typing import Any

import numpy as np

from rvlf_jax.data.synthsign import grammar, pose, render, scene, signers

SPLITS = ('train', 'dev', 'test')
SIZES = {
    'tiny': {'train': 40, 'dev': 12, 'test': 12},
    'default': {'train': 4000, 'dev': 300, 'test': 300},
    'large': {'train': 40000, 'dev': 3000, 'test': 3000},
}
_SPLIT_CODE = {'train': 0, 'dev': 1, 'test': 2}
_STREAMS = {'language': 0, 'signer': 1, 'scene': 2, 'pose': 3, 'render': 4}
# Bump VERSION whenever a change in this package changes what an example contains: a cache holds
# skeletons, while frames are rendered anew, so an old cache must not be mixed with a new renderer.
VERSION = 1
SHARD_SIZE = 500
_SHARD_NAME = re.compile(r'^(train|dev|test)-\d{4}-(keypoints|scores|offsets)\.npy$')
_ARRAYS = ('keypoints', 'scores', 'offsets')


@dataclasses.dataclass(frozen=True)
class SynthSignConfig:
  """What defines a SynthSign dataset.

  Attributes:
    size: 'tiny', 'default' or 'large' (example counts per split in SIZES).
    seed: the dataset seed.
    image_size: frame side in pixels (keypoints are pixel coordinates of this frame).
    fps: frames per second.
  """

  size: str = 'tiny'
  seed: int = 0
  image_size: int = 64
  fps: float = 12.0

  def __post_init__(self):
    if self.size not in SIZES:
      raise ValueError(f'Unknown size {self.size!r}; known: {tuple(SIZES)}.')
    if self.image_size < 16:
      raise ValueError(f'image_size must be at least 16, got {self.image_size}.')
    if not 1.0 <= self.fps <= 60.0:
      raise ValueError(f'fps must be in [1, 60], got {self.fps}.')


@dataclasses.dataclass(frozen=True)
class _Language:
  """The text side of one example (cheap: no scene)."""

  meaning: grammar.Meaning
  signed: grammar.Signed
  paraphrases: tuple[str, ...]
  reference: int
  signer: int


def _rng(config: SynthSignConfig, split: str, index: int, stream: str) -> np.random.Generator:
  return np.random.default_rng([config.seed, _SPLIT_CODE[split], index, _STREAMS[stream]])


class SynthSign:
  """SynthSign examples, generated on demand or read from a cache (see the module docstring)."""

  def __init__(self, size: str = 'tiny', seed: int = 0, *, image_size: int = 64,
               fps: float = 12.0):
    self.config = SynthSignConfig(size, seed, image_size, fps)
    self._cache_dir: str | None = None
    self._manifest: dict[str, list[dict[str, Any]]] = {}
    self._language: dict[tuple[str, int], _Language] = {}

  @classmethod
  def from_config(cls, config: SynthSignConfig) -> SynthSign:
    return cls(config.size, config.seed, image_size=config.image_size, fps=config.fps)

  # ------------------------------------------------------------------------------ examples

  def num_examples(self, split: str) -> int:
    _check_split(split)
    return SIZES[self.config.size][split]

  def _check_index(self, split: str, index: int):
    n = self.num_examples(split)
    if not 0 <= index < n:
      raise IndexError(f'{split} index {index} out of range [0, {n}).')

  def language(self, split: str, index: int) -> _Language:
    """Glosses, non-manual marks, paraphrases, reference choice and signer of an example."""
    key = (split, index)
    if key not in self._language:
      self._check_index(split, index)
      rng = _rng(self.config, split, index, 'language')
      meaning = grammar.sample_for_split(rng, split, self.config.seed)
      texts = grammar.paraphrases(meaning, self.config.seed)
      ref = grammar.reference_index(rng, len(texts))
      ids = signers.signers_of(split)
      signer = ids[int(_rng(self.config, split, index, 'signer').integers(len(ids)))]
      self._language[key] = _Language(meaning, grammar.sign(meaning), tuple(texts), ref, signer)
    return self._language[key]

  def scene(self, split: str, index: int) -> scene.Scene:
    """The clean scene of an example (noise-free keypoints, for analysis and rendering)."""
    lang = self.language(split, index)
    return scene.build_scene(lang.signed.glosses, lang.signed.nonmanual,
                             signers.make_signer(self.config.seed, lang.signer),
                             _rng(self.config, split, index, 'scene'), self.config.fps,
                             self.config.image_size)

  def frame_counts(self, split: str) -> np.ndarray | None:
    """int[N] frames of each example of `split`, from the cache's manifest (None when the
    dataset was not loaded from a cache: the counts would take building every scene)."""
    _check_split(split)
    if split not in self._manifest:
      return None
    return np.array([row['num_frames'] for row in self._manifest[split]], np.int64)

  def example_id(self, split: str, index: int) -> str:
    """The id of an example, e.g. 'synthsign-0-train-000017' (nothing is generated)."""
    self._check_index(split, index)
    return f'synthsign-{self.config.seed}-{split}-{index:06d}'

  def example(self, split: str, index: int, frames: bool = True) -> dict[str, Any]:
    """One example.

    Returns a dict of numpy values:
      id: str, e.g. 'synthsign-0-train-000017'.
      keypoints: float32[T, 133, 2] COCO-WholeBody points in pixel coordinates of the
        image_size x image_size frame (x right, y down); undetected points are (0, 0).
      scores: float32[T, 133] detector confidences in [0, 1]; 0 = not detected.
      frames: uint8[T, H, W, 3] RGB (only with frames=True).
      text: the reference English translation; paraphrases: list[str] all valid ones (2-3),
        including the reference.
      glosses: space-separated gloss sequence; nonmanual: '+'-joined marks over it
        ('neg', 'yn', 'wh', 'topic'; '' for none).
      gloss_times: float32[N, 2] start and end of each sign (seconds).
      signer: int; fps: float; split: str; index: int.
    """
    row = self._cached_row(split, index)
    sc = self.scene(split, index) if row is None or frames else None
    if row is None:
      lang = self.language(split, index)
      keypoints, scores = pose.estimate(sc, _rng(self.config, split, index, 'pose'))
      text = dict(text=lang.paraphrases[lang.reference], paraphrases=list(lang.paraphrases),
                  glosses=' '.join(lang.signed.glosses), nonmanual=lang.signed.marks,
                  gloss_times=sc.gloss_times, signer=lang.signer)
    else:
      keypoints, scores = self._cached_arrays(split, row)
      text = {k: row[k] for k in ('text', 'paraphrases', 'glosses', 'nonmanual', 'signer')}
      text['gloss_times'] = np.asarray(row['gloss_times'], np.float32).reshape(-1, 2)
    out = {'id': self.example_id(split, index), 'keypoints': keypoints,
           'scores': scores, **text, 'fps': float(self.config.fps), 'split': split, 'index': index}
    if frames:
      out['frames'] = render.render(sc, _rng(self.config, split, index, 'render'))
    return out

  def sentences(self, split: str) -> list[str]:
    """Reference texts of a split, in index order (no scenes are built)."""
    if split in self._manifest:
      return [r['text'] for r in self._manifest[split]]
    return [self.example_text(split, i) for i in range(self.num_examples(split))]

  def example_text(self, split: str, index: int) -> str:
    lang = self.language(split, index)
    return lang.paraphrases[lang.reference]

  def text_corpus(self, split: str = 'train') -> list[str]:
    """Every valid translation (references and paraphrases) of a split's examples, for tokenizer
    training and text-only pretraining. Only 'train' is safe for that: dev and test sentences are
    held-out compositions."""
    _check_split(split)
    if split in self._manifest:
      rows = self._manifest[split]
      return [p for r in rows for p in r['paraphrases']]
    return [p for i in range(self.num_examples(split)) for p in self.language(split, i).paraphrases]

  # ---------------------------------------------------------------------------------- cache

  def save(self, out_dir: str, workers: int | None = None) -> dict[str, int]:
    """Writes the cache (see the module docstring) to out_dir; returns examples per split."""
    os.makedirs(out_dir, exist_ok=True)
    # meta.json is written last: a folder without one is never taken for a complete cache.
    for name in os.listdir(out_dir):
      if name == 'meta.json' or _SHARD_NAME.match(name):
        os.remove(os.path.join(out_dir, name))
    tasks = [(self.config, split, start, min(start + SHARD_SIZE, self.num_examples(split)), out_dir)
             for split in SPLITS for start in range(0, self.num_examples(split), SHARD_SIZE)]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers > 1:
      # spawn: safe even when the caller runs threads (jax, grain); workers only import numpy.
      with multiprocessing.get_context('spawn').Pool(workers) as p:
        results = p.map(_write_shard, tasks, chunksize=1)
    else:
      results = [_write_shard(task) for task in tasks]
    rows = {split: [] for split in SPLITS}
    for (_, split, *_), shard_rows in zip(tasks, results):
      rows[split].extend(shard_rows)
    for split in SPLITS:
      with open(os.path.join(out_dir, f'{split}.jsonl'), 'w') as f:
        for r in rows[split]:
          f.write(json.dumps(r, sort_keys=True) + '\n')
    meta = {'format': 'synthsign', 'version': VERSION,
            'config': dataclasses.asdict(self.config),
            'num_examples': {s: self.num_examples(s) for s in SPLITS}, 'shard_size': SHARD_SIZE}
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    return meta['num_examples']

  @classmethod
  def load(cls, cache_dir: str) -> SynthSign:
    """A dataset backed by the cache in cache_dir (skeletons and texts read, frames rendered)."""
    path = os.path.join(cache_dir, 'meta.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path}: not a SynthSign cache (run launch.synthsign first).')
    with open(path) as f:
      meta = json.load(f)
    if meta.get('format') != 'synthsign' or meta.get('version') != VERSION:
      raise ValueError(f'{path}: cache of format {meta.get("format")!r} version '
                       f'{meta.get("version")!r}, this generator writes version {VERSION}; '
                       f'regenerate it (python -m launch.synthsign).')
    ds = cls.from_config(SynthSignConfig(**meta['config']))
    ds._cache_dir = cache_dir
    for split in SPLITS:
      with open(os.path.join(cache_dir, f'{split}.jsonl')) as f:
        rows = [json.loads(line) for line in f]
      if len(rows) != ds.num_examples(split):
        raise ValueError(f'{cache_dir}/{split}.jsonl has {len(rows)} rows, meta.json says '
                         f'{ds.num_examples(split)}.')
      ds._manifest[split] = rows
    return ds

  def _cached_row(self, split: str, index: int):
    if split not in self._manifest:
      return None
    self._check_index(split, index)
    return self._manifest[split][index]

  def _cached_arrays(self, split: str, row):
    prefix = os.path.join(self._cache_dir, f'{split}-{row["shard"]:04d}')
    shard = _load_shard(prefix, os.stat(f'{prefix}-offsets.npy').st_mtime_ns)
    a, b = shard['offsets'][row['row']], shard['offsets'][row['row'] + 1]
    return pose.from_cache(shard['keypoints'][a:b], shard['scores'][a:b])


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; known: {SPLITS}.')


@functools.lru_cache(maxsize=1024)
def _load_shard(prefix: str, mtime_ns: int) -> dict[str, np.ndarray]:
  """A shard's arrays, memory-mapped (cheap to hold: pages are read when touched)."""
  del mtime_ns  # part of the cache key: a rewritten shard is mapped again
  return {name: np.load(f'{prefix}-{name}.npy', mmap_mode='r') for name in _ARRAYS}


def _write_npy(path: str, array: np.ndarray):
  """np.save, written atomically (a crash never leaves a truncated file under the final name)."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
  os.replace(tmp, path)


def _write_shard(task) -> list[dict[str, Any]]:
  """Generates examples [start, stop) of a split, writes their shard, returns manifest rows."""
  config, split, start, stop, out_dir = task
  ds = SynthSign.from_config(config)
  shard = start // SHARD_SIZE
  kps, scs, rows, offsets = [], [], [], [0]
  for index in range(start, stop):
    ex = ds.example(split, index, frames=False)
    kp, sc = pose.to_cache(ex['keypoints'], ex['scores'])
    kps.append(kp)
    scs.append(sc)
    offsets.append(offsets[-1] + len(ex['keypoints']))
    rows.append({'id': ex['id'], 'index': index, 'signer': ex['signer'],
                 'num_frames': len(ex['keypoints']), 'text': ex['text'],
                 'paraphrases': ex['paraphrases'], 'glosses': ex['glosses'],
                 'nonmanual': ex['nonmanual'],
                 'gloss_times': [float(x) for x in ex['gloss_times'].ravel()],  # exact float32
                 'shard': shard, 'row': index - start})
  arrays = {'keypoints': np.concatenate(kps), 'scores': np.concatenate(scs),
            'offsets': np.asarray(offsets, np.int64)}
  for name in _ARRAYS:
    _write_npy(os.path.join(out_dir, f'{split}-{shard:04d}-{name}.npy'), arrays[name])
  return rows
