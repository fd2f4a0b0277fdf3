"""Feature cache: per-frame features of a frozen DINOv2, computed once and read during training.

`build_feature_cache` runs the encoder over every frame of every clip and writes a folder:
  manifest.json                 encoder fingerprint, preprocessing, feature shapes and dtype,
                                every shard and, per clip, its shard, first frame and length.
  features-00000.cls.npy        float[N, D], the frames of many clips concatenated in order;
  features-00000.mean_patch.npy one .npy per feature per shard (dense: float[N, P, D]).
`FeatureCache(folder)` reads it back: `get(clip_id)` memory-maps the clip's shard (a small LRU of
open shards) and copies out only that clip's rows, so random access during training reads what
it uses. One .npy per feature rather than an .npz: npz members cannot be memory-mapped.

Shape vocabulary: T frames of a clip, N frames of a shard, Hpx/Wpx pixels, P patch tokens,
D encoder width.

Frames of all clips are packed into batches of exactly `batch_frames` images (the last batch is
padded with black frames), so the encoder compiles once per frame size. Images are encoded
independently, so packing and padding do not change any clip's features.

Building is resumable: shards and the manifest are each written to a temporary file and renamed,
the manifest after every shard. Rerunning with the same encoder and settings skips the clips
already stored; a different encoder or settings is an error naming the manifest, never a silent
mix of features.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.data.errors import DataError
from rvlf_jax.models.vit import VisionTransformer, VitConfig

FORMAT = 'rvlf_feature_cache'
VERSION = 1
MANIFEST = 'manifest.json'
POOLINGS = ('cls', 'mean_patch')
# torchvision's ImageNet statistics, which DINOv2's image processor uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Config fields that change how, not what, the encoder computes.
_RUNTIME_FIELDS = ('scan_layers', 'remat')
_TMP_PREFIX = '.tmp-'
_logger = logging.getLogger('rvlf_jax.data')


class FeatureCacheError(DataError):
  """A feature cache folder, manifest or shard that is missing, corrupt or does not match."""


class ClipNotFoundError(KeyError):
  """A clip id that the cache does not hold."""

  def __str__(self):
    # KeyError's str() is the repr of its argument; show the message as written.
    return str(self.args[0])


def encoder_fingerprint(config: VitConfig, params: Any) -> str:
  """sha256 of the encoder: architecture and compute dtype, then every parameter's bytes.

  Hashes the parameters as laid out, so the same weights with scanned and looped layers get
  different fingerprints (a false alarm, never a missed change). Hashing runs at ~0.7 GB/s
  on the 2-core development machine: ~0.5 s for DINOv2-base in float32.

  Args:
    config: the encoder's config; runtime-only fields (scan_layers, remat) are left out.
    params: its parameter tree (numpy or jax arrays, boxed or not).

  Returns:
    'sha256:<hex>'.
  """
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUNTIME_FIELDS}
  h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))
  for path, leaf in leaves:
    array = np.asarray(jax.device_get(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{array.dtype.name}:{array.shape};'.encode())
    # A uint8 view hashes the buffer without the copy tobytes() makes (bfloat16 included).
    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  return f'sha256:{h.hexdigest()}'


def _image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, int):
    return (image_size, image_size)
  if len(image_size) != 2:
    raise ValueError(f'image_size must be an int or (height, width), got {image_size!r}.')
  return (int(image_size[0]), int(image_size[1]))


@functools.lru_cache(maxsize=8)
def _encode_fn(config: VitConfig, names: tuple[str, ...], image_size: tuple[int, int] | None,
               mean: tuple[float, ...], std: tuple[float, ...], dtype: str):
  """The jitted frames -> features function (cached, so repeated builds reuse compilations)."""
  model = VisionTransformer(config)

  def encode(params, frames):
    """uint8[B, Hpx, Wpx, C] -> {name: dtype[B, D] or [B, P, D]}."""
    x = frames.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    if image_size is not None and (h, w) != image_size:
      # Antialiased when shrinking (a triangle filter as wide as the scale, like PIL's bilinear);
      # close to, not bit-identical with, the HF image processor's PIL resize.
      x = jax.image.resize(x, (b, *image_size, c), method='bilinear', antialias=True)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    out = model.apply({'params': params}, x)
    features = {
        'cls': lambda: out.cls,
        'mean_patch': lambda: jnp.mean(out.patch_tokens.astype(jnp.float32), axis=1),
        'dense': lambda: out.patch_tokens,
    }
    return {name: features[name]().astype(dtype) for name in names}

  return jax.jit(encode)


# ----------------------------------------------------------------------------- building


def build_feature_cache(
    clips: Iterable[tuple[str, np.ndarray]],
    encoder_config: VitConfig,
    encoder_params: Any,
    out_dir: str | os.PathLike,
    *,
    batch_frames: int = 256,
    pooling: Sequence[str] = POOLINGS,
    dense: bool = False,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: str = 'float16',
    shard_size_bytes: int = 512 << 20,
    encoder_name: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    num_clips: int | None = None,
    log_every: int = 100,
    loader_processes: int = 0,
) -> 'FeatureCache':
  """Encodes every frame of every clip with a frozen encoder and stores the features.

  Args:
    clips: (clip_id, frames uint8[T, Hpx, Wpx, C]) pairs with T >= 1, e.g. from
      `rvlf_jax.data.video.load_frames`. Clips already in `out_dir` (same encoder and
      settings) are skipped without encoding. `frames` may also be a function of no arguments
      returning them (a video to decode, a clip to render): it is called only for clips not
      yet in the cache, one thread ahead of the encoder, so a resumed build reads no video
      twice. A function may return None for a clip it could not read (having reported why):
      the clip is skipped.
    encoder_config: the DINOv2 config.
    encoder_params: its parameters (as from `rvlf_jax.hf.api.load_hf`).
    out_dir: the cache folder; created, or resumed if it holds a cache of the same encoder.
    batch_frames: images per encoder call; frames of consecutive clips share batches. Must be
      a multiple of the mesh size.
    pooling: per-frame vectors to store, among 'cls' (the normalised CLS token) and
      'mean_patch' (mean of the normalised patch tokens).
    dense: also store every patch token ('dense', [T, P, D]); P * larger. Needs one frame size
      for the whole cache (set image_size).
    image_size: resize frames to this (side or (height, width)) with antialiased bilinear
      interpolation, stretching if the aspect differs (crop first with
      `video.resize_frames(center_crop=True)` to keep it). None encodes frames at their size.
    mean: per-channel mean of pixels scaled to [0, 1] (ImageNet's, as DINOv2).
    std: per-channel standard deviation.
    dtype: stored dtype, 'float16' (half the disk; DINOv2 features are far inside its range,
      and non-finite values are an error) or 'float32'.
    shard_size_bytes: a shard is written once its features reach this size.
    encoder_name: a readable name stored in the manifest (e.g. 'facebook/dinov2-base').
    mesh: spread each batch over all devices of this mesh (frames split over all its axes,
      parameters replicated); None runs on the default device.
    num_clips: how many clips `clips` yields, for the ETA (len(clips) if it has one).
    log_every: log progress every this many clips.
    loader_processes: run the frame loaders in this many spawned worker processes rather than
      one thread: for loaders that hold the GIL (SynthSign's numpy rendering). They must then
      be picklable (e.g. a functools.partial of a module-level function). 0: one thread.

  Returns:
    The `FeatureCache` of `out_dir`.
  """
  pooling = tuple(pooling)
  unknown = sorted(set(pooling) - set(POOLINGS))
  if unknown or len(set(pooling)) != len(pooling):
    raise ValueError(f'pooling must be distinct names among {POOLINGS}, got {pooling}.')
  names = pooling + (('dense',) if dense else ())
  if not names:
    raise ValueError('nothing to store: pooling is empty and dense is False.')
  if dtype not in ('float16', 'float32'):
    raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
  if batch_frames < 1:
    raise ValueError(f'batch_frames must be positive, got {batch_frames}.')
  size = _image_size(image_size)
  mean = tuple(float(m) for m in mean)
  std = tuple(float(s) for s in std)
  if len(mean) != encoder_config.num_channels or len(std) != encoder_config.num_channels:
    raise ValueError(f'mean and std need {encoder_config.num_channels} values each.')

  encoder_params = nn.meta.unbox(encoder_params)
  settings = {
      'encoder': {'fingerprint': encoder_fingerprint(encoder_config, encoder_params),
                  'config': dataclasses.asdict(encoder_config)},
      'preprocess': {'image_size': None if size is None else list(size),
                     'resize': 'jax.image.resize bilinear antialias', 'mean': list(mean),
                     'std': list(std)},
      'dtype': dtype,
      'names': list(names),
  }
  writer = _Writer(os.fspath(out_dir), settings, encoder_name, shard_size_bytes)

  if mesh is not None:
    if batch_frames % mesh.size:
      raise ValueError(f'batch_frames {batch_frames} is not a multiple of the mesh size '
                       f'{mesh.size}.')
    P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
    frames_sharding = jax.sharding.NamedSharding(mesh, P(mesh.axis_names))
    params = jax.device_put(encoder_params, jax.sharding.NamedSharding(mesh, P()))
  else:
    frames_sharding = None
    params = jax.device_put(encoder_params)
  encode = _encode_fn(encoder_config, names, size, mean, std, dtype)

  if num_clips is None and hasattr(clips, '__len__'):
    num_clips = len(clips)
  progress = _Progress(os.fspath(out_dir), num_clips, log_every)
  pending: dict[int, _Clip] = {}  # Clips whose frames are (partly) in flight, by arrival index.
  seen: set[str] = set()
  batch: list[np.ndarray] = []  # Frame chunks of the batch being filled.
  segments: list[tuple[int, int]] = []  # (clip index, frames) per chunk, in batch order.
  filled = 0
  in_flight: collections.deque = collections.deque()

  def collect(job):
    """Blocks on one dispatched batch and hands its rows to their clips."""
    job_segments, outputs = job
    outputs = jax.device_get(outputs)
    row = 0
    for index, n in job_segments:
      clip = pending[index]
      for name in names:
        clip.pieces[name].append(outputs[name][row:row + n])
      clip.received += n
      row += n
      if clip.received == clip.length:
        finish(pending.pop(index))

  def finish(clip: '_Clip'):
    arrays = {name: np.concatenate(clip.pieces[name]) for name in names}
    for name, array in arrays.items():
      if not np.isfinite(array).all():
        raise FeatureCacheError(out_dir, f'clip {clip.clip_id!r}: non-finite {name} features '
                                f'(out of {dtype} range?).')
    writer.add(clip.clip_id, arrays)
    progress.clip_done(clip.length)

  def dispatch():
    nonlocal batch, segments, filled
    frames = np.concatenate(batch)
    if filled < batch_frames:
      # A fixed batch shape compiles once; padding frames are encoded and dropped.
      frames = np.concatenate([frames, np.zeros((batch_frames - filled, *frames.shape[1:]),
                                                np.uint8)])
    outputs = encode(params, jax.device_put(frames, frames_sharding))  # Asynchronous.
    in_flight.append((segments, outputs))
    batch, segments, filled = [], [], 0
    # Keep one batch queued on the device while the host collects the previous one.
    if len(in_flight) > 1:
      collect(in_flight.popleft())

  def todo():
    """(index, clip_id, frames or a loader) of the clips not in the cache yet."""
    for index, (clip_id, frames) in enumerate(clips):
      clip_id = str(clip_id)
      if clip_id in seen:
        raise ValueError(f'clip id {clip_id!r} appears twice in clips.')
      seen.add(clip_id)
      if clip_id in writer.clips:
        progress.skipped()
        continue
      yield index, clip_id, frames

  def encode_all():
    nonlocal batch, segments, filled
    for index, clip_id, frames in _load_ahead(todo(), processes=loader_processes):
      if frames is None:
        progress.unread()
        continue
      frames = np.asarray(frames)
      if (frames.dtype != np.uint8 or frames.ndim != 4
          or frames.shape[-1] != encoder_config.num_channels):
        raise ValueError(f'clip {clip_id!r}: frames must be uint8[T, H, W, '
                         f'{encoder_config.num_channels}], got '
                         f'{frames.dtype}{list(frames.shape)}.')
      if not len(frames):
        # Most likely a video that failed to decode; a T=0 sequence would also break training.
        raise ValueError(f'clip {clip_id!r} has no frames.')
      if batch and frames.shape[1:] != batch[0].shape[1:]:
        dispatch()  # Frames of another size start a batch of their own (and a compilation).
      pending[index] = clip = _Clip(clip_id, len(frames), {name: [] for name in names})
      start = 0
      while start < clip.length:
        n = min(clip.length - start, batch_frames - filled)
        batch.append(frames[start:start + n])
        segments.append((index, n))
        filled += n
        start += n
        if filled == batch_frames:
          dispatch()

  def drain():
    """Encodes the batch being filled and collects every batch in flight."""
    if filled:
      dispatch()
    while in_flight:
      collect(in_flight.popleft())

  try:
    encode_all()
    drain()
  except BaseException:
    # Lose nothing already done: the clips loaded before the failure are encoded and written
    # (the cache stays incomplete), so that a rerun encodes only the rest.
    with contextlib.suppress(Exception):
      drain()
    writer.save()
    raise
  writer.close()
  progress.done()
  return FeatureCache(out_dir)


def _load_ahead(items: Iterator[tuple[int, str, Any]], depth: int = 4, processes: int = 0):
  """Yields the items with callable frames replaced by their result, computed by one thread
  (or `processes` spawned processes) up to `depth` clips per worker ahead of the consumer, in
  order. Loaders that release the GIL (video decoders) run beside the encoder in the thread;
  SynthSign's numpy rendering mostly holds it, so it needs processes."""
  if processes < 0:
    raise ValueError(f'loader_processes must be >= 0, got {processes}.')
  if processes:
    # Spawned, not forked: the parent runs JAX's threads.
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context('spawn'))
    depth *= processes
  else:
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='frames')
  with pool:
    queue: collections.deque = collections.deque()
    exhausted, error = False, None
    while queue or not exhausted:
      while not exhausted and len(queue) <= depth:
        try:
          index, clip_id, frames = next(items)
        except StopIteration:
          exhausted = True
        except Exception as e:  # pylint: disable=broad-except
          # Raised after the clips before it are encoded (and kept).
          exhausted, error = True, e
        else:
          queue.append((index, clip_id, pool.submit(frames) if callable(frames) else frames))
      if queue:
        yield _resolved(queue.popleft())
    if error is not None:
      raise error


def _resolved(item: tuple[int, str, Any]) -> tuple[int, str, Any]:
  index, clip_id, frames = item
  if isinstance(frames, concurrent.futures.Future):
    frames = frames.result()
  return index, clip_id, frames


@dataclasses.dataclass
class _Clip:
  clip_id: str
  length: int
  pieces: dict[str, list[np.ndarray]]
  received: int = 0


class _Progress:
  """Logs clips/s, frames/s and the ETA every `every` clips."""

  def __init__(self, out_dir: str, total: int | None, every: int):
    self.out_dir, self.total, self.every = out_dir, total, max(1, every)
    self.start = time.perf_counter()
    self.clips = self.frames = self.skip = self.unreadable = 0

  def skipped(self):
    self.skip += 1

  def unread(self):
    self.unreadable += 1

  def clip_done(self, frames: int):
    self.clips += 1
    self.frames += frames
    if self.clips % self.every == 0:
      _logger.info('%s', self.line())

  def line(self) -> str:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    rate = self.clips / elapsed
    text = (f'feature cache {self.out_dir}: {self.clips} clips encoded'
            f'{f", {self.skip} already cached" if self.skip else ""}'
            f'{f", {self.unreadable} unreadable (skipped)" if self.unreadable else ""}, '
            f'{rate:.1f} clips/s, '
            f'{self.frames / elapsed:.0f} frames/s')
    if self.total is not None and rate > 0:
      left = max(self.total - self.skip - self.unreadable - self.clips, 0)
      text += f', ETA {datetime.timedelta(seconds=round(left / rate))}'
    return text

  def done(self):
    _logger.info('%s (done in %.1f s)', self.line(), time.perf_counter() - self.start)


class _Writer:
  """Owns the folder while building: shards, the manifest, resumption checks."""

  def __init__(self, out_dir: str, settings: dict[str, Any], encoder_name: str | None,
               shard_size_bytes: int):
    self.out_dir = out_dir
    self.manifest_path = os.path.join(out_dir, MANIFEST)
    self.shard_size_bytes = shard_size_bytes
    # Through JSON, so tuples and lists compare equal to what a manifest holds.
    settings = json.loads(json.dumps(settings))
    if os.path.exists(self.manifest_path):
      self.manifest = _read_manifest(self.manifest_path)
      old = {k: self.manifest.get(k) for k in settings}
      if old != settings:
        diff = _describe_difference(old, settings)
        raise FeatureCacheError(self.manifest_path,
                                f'the cache was built with another encoder or settings ({diff}); '
                                'use a new folder or delete this one.')
    else:
      if os.path.isdir(out_dir) and any(not n.startswith(_TMP_PREFIX) for n in os.listdir(out_dir)):
        raise FeatureCacheError(out_dir, f'not empty and has no {MANIFEST}; refusing to write a '
                                'feature cache into it.')
      os.makedirs(out_dir, exist_ok=True)
      self.manifest = {
          'format': FORMAT, 'version': VERSION, 'complete': False,
          **settings, 'encoder_name': encoder_name, 'features': {}, 'shards': [], 'clips': {},
          'created': {'time': _now(), 'host': platform.node(), 'jax': jax.__version__,
                      'devices': sorted({d.device_kind for d in jax.devices()})},
      }
    self.clips = self.manifest['clips']
    self.shapes = {k: tuple(v['shape']) for k, v in self.manifest['features'].items()}
    self.buffer: list[tuple[str, dict[str, np.ndarray]]] = []
    self.buffer_bytes = 0
    # A complete cache is only read until a clip is added to it, so runs sharing a finished
    # cache (seeds, ablations) can start together.
    self.writing = False
    if not self.manifest['complete']:
      self._open()

  def _open(self):
    """Takes the folder for writing: incomplete until closed, temporary files of an interrupted
    run removed."""
    self.writing = True
    if self.manifest['clips']:
      self.manifest['updated'] = _now()
    self.manifest['complete'] = False
    for name in os.listdir(self.out_dir):
      if name.startswith(_TMP_PREFIX):
        os.remove(os.path.join(self.out_dir, name))
    self._write_manifest()

  def add(self, clip_id: str, arrays: dict[str, np.ndarray]):
    if not self.writing:
      self._open()
    for name, array in arrays.items():
      shape = tuple(array.shape[1:])
      if name not in self.shapes:
        self.shapes[name] = shape
        self.manifest['features'][name] = {'shape': list(shape), 'dtype': array.dtype.name}
      elif shape != self.shapes[name]:
        raise FeatureCacheError(self.out_dir, f'clip {clip_id!r}: {name} features of shape '
                                f'{list(shape)}, the cache holds {list(self.shapes[name])} (frames '
                                'of another size? set image_size).')
    self.buffer.append((clip_id, arrays))
    self.buffer_bytes += sum(a.nbytes for a in arrays.values())
    if self.buffer_bytes >= self.shard_size_bytes:
      self._flush()

  def save(self):
    """Writes the clips added so far, the cache staying incomplete."""
    if self.writing and self.buffer:
      self._flush()

  def close(self):
    if not self.writing:
      return
    if self.buffer:
      self._flush()
    self.manifest['complete'] = True
    self._write_manifest()

  def _flush(self):
    index = len(self.manifest['shards'])
    stem = f'features-{index:05d}'
    record = {'name': stem, 'num_frames': sum(len(next(iter(a.values())))
                                               for _, a in self.buffer), 'files': {}}
    for name in self.manifest['features']:
      data = np.concatenate([arrays[name] for _, arrays in self.buffer])
      file = f'{stem}.{name}.npy'
      fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=_TMP_PREFIX)
      with os.fdopen(fd, 'wb') as f:
        np.save(f, data)
      os.replace(tmp, os.path.join(self.out_dir, file))
      record['files'][name] = {'file': file, 'bytes': os.path.getsize(
          os.path.join(self.out_dir, file))}
    offset = 0
    for clip_id, arrays in self.buffer:
      length = len(next(iter(arrays.values())))
      self.clips[clip_id] = {'shard': index, 'offset': offset, 'length': length}
      offset += length
    self.manifest['shards'].append(record)
    # Only now do the clips exist: a crash before this line leaves an orphan shard that the
    # next run overwrites.
    self._write_manifest()
    self.buffer, self.buffer_bytes = [], 0

  def _write_manifest(self):
    fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=_TMP_PREFIX)
    with os.fdopen(fd, 'w') as f:
      json.dump(self.manifest, f, indent=1)
    os.replace(tmp, self.manifest_path)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
  parts = []
  for key in new:
    if old.get(key) == new[key]:
      continue
    if isinstance(new[key], dict) and isinstance(old.get(key), dict):
      fields = sorted(k for k in set(old[key]) | set(new[key])
                      if old[key].get(k) != new[key].get(k))
      parts.append(f'{key} differs in {", ".join(fields)}')
    else:
      parts.append(f'{key}: {old.get(key)!r} != {new[key]!r}')
  return '; '.join(parts)


def _read_manifest(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError as e:
    raise FeatureCacheError(path, 'no such file; not a feature cache folder.') from e
  except (OSError, ValueError) as e:
    raise FeatureCacheError(path, f'unreadable manifest: {e}') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise FeatureCacheError(path, f'not a {FORMAT} manifest.')
  if manifest.get('version') != VERSION:
    raise FeatureCacheError(path, f'manifest version {manifest.get("version")}, this code reads '
                            f'{VERSION}.')
  for key in ('encoder', 'features', 'shards', 'clips'):
    if key not in manifest:
      raise FeatureCacheError(path, f'manifest has no {key!r}.')
  return manifest


# ----------------------------------------------------------------------------- reading


class FeatureCache:
  """Reads a folder written by `build_feature_cache`.

  Picklable (open shards are not carried), so it can live in grain worker processes; `get` is
  thread-safe.

  Attributes:
    path: the folder.
    manifest: the parsed manifest.json.
  """

  def __init__(self, path: str | os.PathLike, *, max_open_shards: int = 16):
    """Reads the manifest; shards are opened on first use.

    Args:
      path: the cache folder.
      max_open_shards: memory-mapped shards kept open (least recently used closed first).
    """
    self.path = os.fspath(path)
    self.manifest_path = os.path.join(self.path, MANIFEST)
    self.manifest = _read_manifest(self.manifest_path)
    self.max_open_shards = max_open_shards
    self._open: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_open'], state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.manifest['clips'])

  def __contains__(self, clip_id: str) -> bool:
    return clip_id in self.manifest['clips']

  def ids(self) -> list[str]:
    """Clip ids in the order they were stored."""
    return list(self.manifest['clips'])

  @property
  def complete(self) -> bool:
    """False while a build is running or after one was interrupted."""
    return bool(self.manifest.get('complete'))

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(self.manifest['features'])

  @property
  def feature_shapes(self) -> dict[str, tuple[int, ...]]:
    """Per-frame shape of each feature: (D,), or (P, D) for 'dense'."""
    return {k: tuple(v['shape']) for k, v in self.manifest['features'].items()}

  @property
  def encoder_fingerprint(self) -> str:
    return self.manifest['encoder']['fingerprint']

  def length(self, clip_id: str) -> int:
    """T, the clip's number of frames (without reading its features)."""
    return self._record(clip_id)['length']

  def get(self, clip_id: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The features of one clip.

    Args:
      clip_id: as given to `build_feature_cache`.
      names: features to read (default all), e.g. ('cls',).

    Returns:
      {name: array[T, D] (or [T, P, D] for 'dense')} in the stored dtype, owned by the caller.
    """
    record = self._record(clip_id)
    names = self.feature_names if names is None else tuple(names)
    missing = sorted(set(names) - set(self.feature_names))
    if missing:
      raise ValueError(f'{self.manifest_path}: no features {missing}; the cache has '
                       f'{list(self.feature_names)}.')
    shard = self._shard(record['shard'])
    start, stop = record['offset'], record['offset'] + record['length']
    return {name: np.array(shard[name][start:stop]) for name in names}

  def _record(self, clip_id: str) -> dict[str, int]:
    try:
      return self.manifest['clips'][clip_id]
    except KeyError:
      raise ClipNotFoundError(f'clip {clip_id!r} is not in the feature cache {self.manifest_path} '
                              f'({len(self)} clips).') from None

  def _shard(self, index: int) -> dict[str, np.ndarray]:
    with self._lock:
      if index in self._open:
        self._open.move_to_end(index)
        return self._open[index]
      shard = self._load_shard(index)
      self._open[index] = shard
      while len(self._open) > self.max_open_shards:
        self._open.popitem(last=False)
      return shard

  def _load_shard(self, index: int) -> dict[str, np.ndarray]:
    try:
      record = self.manifest['shards'][index]
    except IndexError:
      raise FeatureCacheError(self.manifest_path, f'refers to shard {index}, which it does not '
                              'list.') from None
    arrays = {}
    for name, spec in self.manifest['features'].items():
      entry = record['files'].get(name)
      if entry is None:
        raise FeatureCacheError(self.manifest_path, f'shard {record["name"]} has no {name} file.')
      path = os.path.join(self.path, entry['file'])
      if not os.path.exists(path):
        raise FeatureCacheError(path, 'shard file is missing.')
      size = os.path.getsize(path)
      if size != entry['bytes']:
        # Checked up front: reading past the end of a truncated memory map crashes the process.
        raise FeatureCacheError(path, f'shard file has {size} bytes, the manifest says '
                                f'{entry["bytes"]} (truncated or rewritten).')
      expected = (record['num_frames'], *spec['shape'])
      try:
        array = np.load(path, mmap_mode='r')
      except (OSError, ValueError) as e:
        raise FeatureCacheError(path, f'corrupt shard file: {e}') from e
      if array.shape != expected or array.dtype.name != spec['dtype']:
        raise FeatureCacheError(path, f'holds {array.dtype.name}{list(array.shape)}, the manifest '
                                f'says {spec["dtype"]}{list(expected)}.')
      arrays[name] = array
    return arrays
