"""Isolated SynthSign signs: one gloss per clip, for few-shot sign recognition.

    signs = IsolatedSigns(seed=0)                      # 194 glosses x 16 signers x 1 repetition
    ex = signs.example(17)                             # keypoints, scores, gloss, class, signer
    ex = signs.example(17, frames=True)                # ... and the rendered RGB frames
    pool = build_pool(signs, '/tmp/rvlf/isolated')     # model-ready arrays, cached as .npz
    attribute_phrases('MOTHER')                        # the sign's form in plain English

A clip is a pure function of (seed, gloss, signer, repetition): its scene, pose and render
streams are seeded by `np.random.default_rng([seed, 3, gloss index, signer, repetition,
stream])`, where the gloss index is the gloss's position in `lexicon.GLOSSES` (so a clip does
not depend on which other glosses are chosen), and 3 keeps these streams apart from the sentence
streams of `dataset.SynthSign` (split codes 0-2). Clips carry no non-manual marks. A signer
looks the same here as in the sentences of a dataset with the same seed (`make_signer(seed, id)`).

`build_pool` featurizes every clip with the recipe's own `pipeline.Featurizer` (joint subset,
`keypoints.normalize`, optional per-joint standardisation: `recipe_featurizer`), so the pool is
what the SLT sign encoder sees in training. Full default pool, measured on the 2-core
development machine: 3,104 clips of 24-36 frames, keypoints float32[3104, 36, 133, 3], built in
25-35 s with 2 worker processes (about 13 s of generation per core, plus spawning and a jax
import per worker); reading the cached .npz (180 MB) back takes 1-3 s.

`attribute_phrases` names a sign's phonological parameters in words (handshape, orientation,
location, movement, hands) plus its meaning from the lexicon: candidate attribute texts for
few-shot text semantics, written from the lexicon because no pretrained language model is
available here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from rvlf_jax.data.synthsign import dataset, lexicon, phonology, pose, render, scene, signers

# Bump VERSION whenever a change here changes a pool's arrays (dataset.VERSION, also part of
# every cache key, covers changes to the generator itself).
VERSION = 1
_CODE = 3  # after the sentence split codes 0-2 of dataset.py
_STREAMS = {'scene': 0, 'pose': 1, 'render': 2}
_GLOSS_INDEX = {g.name: i for i, g in enumerate(lexicon.GLOSSES)}
ALL_GLOSSES: tuple[str, ...] = tuple(g.name for g in lexicon.GLOSSES)
ALL_SIGNERS: tuple[int, ...] = tuple(range(signers.NUM_SIGNERS))
POOL_KEYS = ('keypoints', 'frame_mask', 'classes', 'signers', 'repetitions')
_CHUNK = 64  # clips per worker task


@dataclasses.dataclass(frozen=True)
class IsolatedConfig:
  """What defines a set of isolated-sign clips.

  Attributes:
    seed: the dataset seed (signers, motion variation and estimator noise).
    glosses: the glosses, in class order (class id = position here).
    signers: signer ids in [0, signers.NUM_SIGNERS).
    repetitions: clips per (gloss, signer), each with its own variation and noise.
    fps: frames per second.
    image_size: frame side in pixels (keypoints are pixel coordinates of this frame).
  """

  seed: int = 0
  glosses: tuple[str, ...] = ALL_GLOSSES
  signers: tuple[int, ...] = ALL_SIGNERS
  repetitions: int = 1
  fps: float = 12.0
  image_size: int = 64

  def __post_init__(self):
    where = 'synthsign/isolated.py'
    unknown = [g for g in self.glosses if g not in _GLOSS_INDEX]
    if unknown:
      raise ValueError(f'{where}: unknown glosses {unknown[:5]}; see lexicon.GLOSSES.')
    if not self.glosses or len(set(self.glosses)) != len(self.glosses):
      raise ValueError(f'{where}: glosses must be distinct and at least one, got '
                       f'{len(self.glosses)} with {len(set(self.glosses))} distinct.')
    bad = [s for s in self.signers if not 0 <= s < signers.NUM_SIGNERS]
    if bad or not self.signers or len(set(self.signers)) != len(self.signers):
      raise ValueError(f'{where}: signers must be distinct ids in [0, {signers.NUM_SIGNERS}), '
                       f'got {self.signers}.')
    if self.repetitions < 1:
      raise ValueError(f'{where}: repetitions must be at least 1, got {self.repetitions}.')
    # The sentence dataset's checks of fps and image_size.
    dataset.SynthSignConfig(seed=self.seed, image_size=self.image_size, fps=self.fps)


class IsolatedSigns:
  """Isolated-sign clips indexed by (gloss, signer, repetition); see the module docstring.

  Example i is gloss i // (S * R), signer position (i // R) % S, repetition i % R, for S signers
  and R repetitions: all clips of a class are contiguous.
  """

  def __init__(self, seed: int = 0, glosses: Sequence[str] | None = None,
               signer_ids: Sequence[int] | None = None, repetitions: int = 1, *,
               fps: float = 12.0, image_size: int = 64):
    self.config = IsolatedConfig(
        seed=int(seed), glosses=ALL_GLOSSES if glosses is None else tuple(glosses),
        signers=ALL_SIGNERS if signer_ids is None else tuple(int(s) for s in signer_ids),
        repetitions=int(repetitions), fps=float(fps), image_size=int(image_size))

  @classmethod
  def from_config(cls, config: IsolatedConfig) -> IsolatedSigns:
    return cls(config.seed, config.glosses, config.signers, config.repetitions,
               fps=config.fps, image_size=config.image_size)

  @property
  def glosses(self) -> tuple[str, ...]:
    return self.config.glosses

  @property
  def num_classes(self) -> int:
    return len(self.config.glosses)

  def __len__(self) -> int:
    c = self.config
    return len(c.glosses) * len(c.signers) * c.repetitions

  def index(self, i: int) -> tuple[int, int, int]:
    """(class id, signer id, repetition) of example i."""
    if not 0 <= i < len(self):
      raise IndexError(f'isolated sign index {i} out of range [0, {len(self)}).')
    reps, num_signers = self.config.repetitions, len(self.config.signers)
    return i // (num_signers * reps), self.config.signers[(i // reps) % num_signers], i % reps

  def _rng(self, gloss: str, signer: int, repetition: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([self.config.seed, _CODE, _GLOSS_INDEX[gloss], signer,
                                  repetition, _STREAMS[stream]])

  def scene(self, gloss: str, signer: int, repetition: int = 0) -> scene.Scene:
    """The clean (noise-free) scene of one clip."""
    c = self.config
    return scene.build_scene([gloss], (), signers.make_signer(c.seed, signer),
                             self._rng(gloss, signer, repetition, 'scene'), c.fps, c.image_size)

  def clip(self, gloss: str, signer: int, repetition: int = 0,
           frames: bool = False) -> dict[str, Any]:
    """One clip by name (any gloss of the lexicon, any signer); see `example` for the fields."""
    if gloss not in _GLOSS_INDEX:
      raise ValueError(f'synthsign/isolated.py: unknown gloss {gloss!r}.')
    if not 0 <= signer < signers.NUM_SIGNERS or repetition < 0:
      raise ValueError(f'synthsign/isolated.py: bad signer {signer} or repetition {repetition}.')
    sc = self.scene(gloss, signer, repetition)
    keypoints, scores = pose.estimate(sc, self._rng(gloss, signer, repetition, 'pose'))
    out = {'id': f'synthsign-{self.config.seed}-isolated-{gloss}-s{signer:02d}-r{repetition}',
           'keypoints': keypoints, 'scores': scores, 'gloss': gloss,
           'class': self.config.glosses.index(gloss) if gloss in self.config.glosses else -1,
           'signer': signer, 'repetition': repetition, 'fps': self.config.fps}
    if frames:
      out['frames'] = render.render(sc, self._rng(gloss, signer, repetition, 'render'))
    return out

  def example(self, i: int, frames: bool = False) -> dict[str, Any]:
    """Example i.

    Returns a dict:
      id: str, e.g. 'synthsign-0-isolated-MOTHER-s03-r0'.
      keypoints: float32[T, 133, 2] COCO-WholeBody pixel coordinates (undetected: (0, 0)).
      scores: float32[T, 133] detector confidences in [0, 1].
      frames: uint8[T, H, W, 3] RGB (only with frames=True).
      gloss: str; class: int (position in `glosses`); signer: int; repetition: int; fps: float.
    """
    cls, signer, rep = self.index(i)
    return self.clip(self.config.glosses[cls], signer, rep, frames=frames)

  def __getitem__(self, i: int) -> dict[str, Any]:
    """Skeleton-only example i (a random-access source for `pipeline`)."""
    return self.example(i, frames=False)


# ------------------------------------------------------------------------------ the pool


def recipe_featurizer(config: Any = None, stats: Any = None):
  """The recipe's `pipeline.Featurizer` for `config` (default configs/synthsign.py), text off.

  Args:
    config: an experiment ConfigDict; its data.joints, data.frame_buckets and data.strict apply.
    stats: the run's `keypoints.KeypointStats` (`recipe.data.load_keypoint_stats`) when the run
      standardises keypoints (data.standardize, on by default): pass it, or the pool is only
      normalised, not standardised as the trained encoder's inputs were.
  """
  # Imported here: the recipe pulls in jax and flax, which generating clips does not need.
  from rvlf_jax.recipe import data as recipe_data  # pylint: disable=g-import-not-at-top
  if config is None:
    from configs import synthsign as synthsign_config  # pylint: disable=g-import-not-at-top
    config = synthsign_config.get_config()
  return recipe_data.featurizer(config, None, stats=stats)


def _describe(fn: Any) -> Any:
  """A stable description of a featurizer's normalize callable, for the cache key."""
  if fn is None:
    return None
  stats = getattr(fn, 'stats', None)
  if stats is not None or type(fn).__name__ == 'Normalizer':
    digest = None
    if stats is not None:
      h = hashlib.sha256()
      for a in (stats.mean, stats.std):
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
      digest = h.hexdigest()[:16]
    return {'type': type(fn).__name__, 'strict': bool(getattr(fn, 'strict', False)),
            'stats': digest}
  inner = getattr(fn, 'func', fn)  # functools.partial
  return {'fn': f'{getattr(inner, "__module__", "?")}.{getattr(inner, "__qualname__", repr(inner))}',
          'kwargs': repr(sorted(getattr(fn, 'keywords', {}).items()))}


def pool_key(config: IsolatedConfig, featurizer: Any, multiple: int) -> dict[str, Any]:
  """Everything a pool's arrays depend on (compared when a cache file is read)."""
  return {'format': 'synthsign-isolated-pool', 'version': VERSION,
          'synthsign_version': dataset.VERSION, 'config': dataclasses.asdict(config),
          'joints': None if featurizer.joints is None else list(featurizer.joints),
          'max_frames': int(featurizer.buckets.frames[-1]),
          'normalize': _describe(featurizer.normalize), 'multiple': int(multiple)}


def pool_path(cache_dir: str, key: dict[str, Any]) -> str:
  """The cache file of a pool: readable config in the name, a digest of the whole key."""
  c = key['config']
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  name = (f'isolated-v{VERSION}-seed{c["seed"]}-{len(c["glosses"])}g-{len(c["signers"])}s-'
          f'{c["repetitions"]}r-{c["fps"]:g}fps-{c["image_size"]}px-{digest}.npz')
  return os.path.join(cache_dir, name)


def _featurize_chunk(task) -> list[tuple[np.ndarray, int, int, int]]:
  """(keypoints float32[T, J, 3], class, signer, repetition) of examples [start, stop)."""
  config, featurizer, start, stop = task
  signs = IsolatedSigns.from_config(config)
  out = []
  for i in range(start, stop):
    ex = signs.example(i)
    feats = featurizer(ex)
    if 'keypoints' not in feats:  # a lenient featurizer's skip marker
      raise ValueError(f'synthsign/isolated.py: featurizer skipped {ex["id"]}: {feats}.')
    out.append((np.asarray(feats['keypoints'], np.float32), ex['class'], ex['signer'],
                ex['repetition']))
  return out


def _generate(signs: IsolatedSigns, featurizer: Any, multiple: int, workers: int | None,
              log: Callable[[str], None]) -> dict[str, np.ndarray]:
  n = len(signs)
  tasks = [(signs.config, featurizer, s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
  workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
  start, done, rows, next_report = time.time(), 0, [], 0.0

  def collect(chunks):
    nonlocal done, next_report
    for chunk in chunks:
      rows.extend(chunk)
      done += len(chunk)
      if done / n >= next_report or done == n:
        log(f'isolated signs: {done}/{n} clips featurized ({time.time() - start:.1f} s)')
        next_report = done / n + 0.1

  if workers > 1:
    # spawn: safe even when the caller runs threads (jax, grain), as in dataset.SynthSign.save.
    with multiprocessing.get_context('spawn').Pool(workers) as p:
      collect(p.imap(_featurize_chunk, tasks, chunksize=1))
  else:
    collect(map(_featurize_chunk, tasks))
  t_max = max(kp.shape[0] for kp, *_ in rows)
  t_pad = math.ceil(t_max / multiple) * multiple
  keypoints = np.zeros((n, t_pad) + rows[0][0].shape[1:], np.float32)
  frame_mask = np.zeros((n, t_pad), bool)
  for i, (kp, *_) in enumerate(rows):
    keypoints[i, :len(kp)] = kp
    frame_mask[i, :len(kp)] = True
  column = lambda j: np.asarray([r[j] for r in rows], np.int32)
  return {'keypoints': keypoints, 'frame_mask': frame_mask, 'classes': column(1),
          'signers': column(2), 'repetitions': column(3)}


def _read(path: str, key: dict[str, Any]) -> dict[str, Any]:
  """A cached pool; ValueError naming the file when it is unreadable or of another key."""
  try:
    with np.load(path, allow_pickle=False) as f:
      stored = json.loads(str(f['key']))
      arrays = {k: f[k] for k in POOL_KEYS}
      glosses = [str(g) for g in f['glosses']]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: unreadable isolated-sign pool cache ({type(e).__name__}: {e}).'
                     ) from e
  if stored != json.loads(json.dumps(key, sort_keys=True)):  # tuples come back as lists
    raise ValueError(f'{path}: cache key differs from the requested pool (stored version '
                     f'{stored.get("version")!r}, this code writes {VERSION}).')
  n = len(arrays['classes'])
  if (arrays['keypoints'].shape[:2] != arrays['frame_mask'].shape or
      any(len(arrays[k]) != n for k in POOL_KEYS) or glosses != list(key['config']['glosses'])):
    raise ValueError(f'{path}: inconsistent arrays in the isolated-sign pool cache.')
  return {**arrays, 'glosses': glosses}


def _write(path: str, pool: dict[str, Any], key: dict[str, Any]):
  """np.savez, atomically: a crash never leaves a truncated file under the final name."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, key=np.asarray(json.dumps(key, sort_keys=True)),
             glosses=np.asarray(pool['glosses'], dtype=str),
             **{k: pool[k] for k in POOL_KEYS})
  os.replace(tmp, path)


def build_pool(signs: IsolatedSigns, cache_dir: str | None = None, *, featurizer: Any = None,
               multiple: int = 4, workers: int | None = None, rebuild_corrupt: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every clip of `signs`, featurized and padded into model-ready arrays (cached).

  Args:
    signs: the clips.
    cache_dir: where the pool's .npz is read from, or written to (`pool_path`); None: no cache.
    featurizer: a `pipeline.Featurizer` (text off); None: `recipe_featurizer()`, the default
      recipe's (all 133 joints, normalised, not standardised). Pass `recipe_featurizer(config,
      stats)` for a run that standardises.
    multiple: frames are padded to a multiple of this; 4 is the default skeleton encoder's
      temporal downsampling (`SkeletonConfig.downsample`), so no output step is partly padding.
    workers: generating processes (None: one per CPU core; 1: in this process).
    rebuild_corrupt: an unreadable or mismatched cache file is rebuilt with a log line (True),
      or raises a ValueError naming it (False).
    log: progress and cache messages.

  Returns:
    A dict (E = len(signs), in example order):
      keypoints: float32[E, T, J, 3] featurized x, y, confidence; 0 on padding.
      frame_mask: bool[E, T]; T = the longest clip, rounded up to `multiple`.
      classes: int32[E] positions in `glosses`; signers: int32[E]; repetitions: int32[E].
      glosses: list[str] the class names.
  """
  if multiple < 1:
    raise ValueError(f'synthsign/isolated.py: multiple must be at least 1, got {multiple}.')
  featurizer = recipe_featurizer() if featurizer is None else featurizer
  if getattr(featurizer, 'tokenizer', None) is not None or getattr(featurizer, 'frames', False):
    raise ValueError('synthsign/isolated.py: the pool featurizer must have tokenizer=None and '
                     'frames=False (skeleton only).')
  key = pool_key(signs.config, featurizer, multiple)
  path = None
  if cache_dir is not None:
    path = pool_path(cache_dir, key)
    if os.path.exists(path):
      try:
        pool = _read(path, key)
        log(f'isolated signs: read {len(pool["classes"])} clips from {path}')
        return pool
      except ValueError as e:
        if not rebuild_corrupt:
          raise
        log(f'isolated signs: rebuilding the cache, {e}')
  start = time.time()
  pool = _generate(signs, featurizer, multiple, workers, log)
  pool['glosses'] = list(signs.glosses)
  log(f'isolated signs: {len(signs)} clips, keypoints {pool["keypoints"].shape} in '
      f'{time.time() - start:.1f} s')
  if path is not None:
    os.makedirs(cache_dir, exist_ok=True)
    _write(path, pool, key)
    log(f'isolated signs: wrote {path}')
  return pool


# -------------------------------------------------------------------- attribute phrases

HANDSHAPE_PHRASES = {
    'B': 'a flat hand with the fingers together',
    '5': 'an open hand with the fingers spread',
    'A': 'a fist with the thumb along its side',
    'S': 'a closed fist with the thumb across the fingers',
    '1': 'the index finger pointing out of a fist',
    'V': 'the index and middle fingers spread in a V',
    '3': 'the thumb, index and middle fingers spread',
    'W': 'the index, middle and ring fingers spread',
    '4': 'four fingers spread with the thumb folded in',
    'Y': 'the thumb and little finger stretched out',
    'L': 'the thumb and index finger stretched out in an L',
    'I': 'only the little finger stretched out',
    'C': 'a curved hand shaped like the letter C',
    'O': 'all fingertips touching the thumb in an O',
    'X': 'the index finger hooked over a fist',
    'F': 'the index finger touching the thumb, the other fingers spread',
    'bB': 'a flat hand bent at the knuckles',
    'claw': 'a clawed hand with the fingers spread and bent',
}
ORIENTATION_PHRASES = {
    'up_front': 'fingers pointing up, palm facing forward',
    'up_back': 'fingers pointing up, palm facing the signer',
    'up_side': 'fingers pointing up, palm facing sideways',
    'diag_front': 'fingers pointing diagonally up and across, palm facing forward',
    'diag_side': 'fingers pointing diagonally up and across, palm facing sideways',
    'contra_down': 'fingers pointing across the body, palm facing down',
    'contra_up': 'fingers pointing across the body, palm facing up',
    'contra_back': 'fingers pointing across the body, palm facing the signer',
}
LOCATION_PHRASES = {
    'forehead': 'at the forehead',
    'temple': 'at the temple',
    'nose': 'at the nose',
    'mouth': 'at the mouth',
    'chin': 'at the chin',
    'cheek': 'at the cheek',
    'ear': 'at the ear',
    'chest': 'at the chest',
    'shoulder': 'at the opposite shoulder',
    'stomach': 'at the stomach',
    'neutral': 'in neutral space in front of the body',
    'side': 'out to the side of the body',
    'nondom': 'on the non-dominant hand',
}
MOVEMENT_PHRASES = {
    'static': 'held still',
    'up': 'moving upward',
    'down': 'moving downward',
    'contra': 'moving across the body',
    'ipsi': 'moving outward to the side',
    'arc_contra': 'arcing across the body',
    'arc_up': 'arcing upward',
    'circle_cw': 'circling clockwise',
    'circle_ccw': 'circling counterclockwise',
    'tap': 'tapping',
    'brush': 'brushing',
    'shake': 'shaking',
    'wiggle': 'wiggling the fingers',
    'open': 'opening from a closed hand',
    'close': 'closing into a fist',
    'twist': 'twisting at the wrist',
    'zigzag': 'moving in a zigzag',
}
HANDS_PHRASES = {
    'one': 'one hand',
    'sym': 'both hands moving together',
    'alt': 'both hands alternating',
    'base_B': 'on a flat non-dominant hand',
    'base_S': 'on a fist-shaped non-dominant hand',
}
CATEGORY_PHRASES = {
    'time': 'time', 'daypart': 'time of day', 'pronoun': 'pronoun', 'poss': 'possessive',
    'person': 'person', 'noun': 'noun', 'verb': 'verb', 'place': 'place', 'adj': 'adjective',
    'number': 'number', 'question': 'question', 'weather': 'weather',
}
ATTRIBUTES = ('handshape', 'orientation', 'location', 'movement', 'hands', 'meaning')


def attribute_phrases(gloss_name: str) -> dict[str, str]:
  """A sign's form and meaning in plain English, one phrase per attribute (`ATTRIBUTES`).

  e.g. {'handshape': 'a flat hand with the fingers together', 'orientation': 'fingers pointing
  up, palm facing forward', 'location': 'at the chin', 'movement': 'tapping', 'hands': 'one
  hand', 'meaning': 'a person sign meaning mother'}.
  """
  if gloss_name not in phonology.FORMS:
    raise ValueError(f'synthsign/isolated.py: unknown gloss {gloss_name!r}; see lexicon.GLOSSES.')
  form = phonology.FORMS[gloss_name]
  gloss = lexicon.BY_NAME[gloss_name]
  category = CATEGORY_PHRASES[gloss.category]
  word = 'I' if gloss.english[0] == 'i' else gloss.english[0]
  return {'handshape': HANDSHAPE_PHRASES[form.shape],
          'orientation': ORIENTATION_PHRASES[form.orient],
          'location': LOCATION_PHRASES[form.loc],
          'movement': MOVEMENT_PHRASES[form.move],
          'hands': HANDS_PHRASES[form.hands],
          'meaning': f'{lexicon.article(category)} {category} sign meaning {word}'}
