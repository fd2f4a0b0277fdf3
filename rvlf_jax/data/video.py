"""Frames for the vision encoder: from a folder of images or a video file, sampled and resized.

`load_frames(path, ...)` returns uint8[T, H, W, 3] RGB. A folder (PHOENIX PNGs, CSL-Daily JPEGs)
is read in numeric order of the last number in each file name (images9.png before images10.png);
a video is decoded with PyAV (`av`). Images are read with Pillow. Both are imported on first use,
so the rest of `rvlf_jax.data` works without them.

Frame-rate conversion keeps, for each sample time start + k / target_fps, the first frame shown at
or after it (`sample_indices`); it never duplicates frames, so a target at or above the source rate
keeps every frame. The same indices can subsample pose sequences recorded at the video's rate.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from rvlf_jax.data.errors import VideoError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp')
RESAMPLE = ('bilinear', 'area', 'bicubic', 'nearest')
_EPS = 1e-6  # seconds; absorbs float error in frame times such as 3 * (1 / 30)


class _Sampler:
  """Streaming frame selection for a target fps (see the module docstring)."""

  def __init__(self, target_fps: float | None):
    if target_fps is not None and not target_fps > 0:
      raise ValueError(f'target_fps must be positive, got {target_fps}.')
    self.step = None if target_fps is None else 1.0 / target_fps
    self.origin: float | None = None
    self.k = 0

  def take(self, time: float) -> bool:
    if self.step is None:
      return True
    if self.origin is None:
      self.origin = time
    if time + _EPS < self.origin + self.k * self.step:
      return False
    # Skip every sample time this frame covers, so a long gap does not make later frames repeat.
    self.k = int(np.floor((time + _EPS - self.origin) / self.step)) + 1
    return True


def sample_indices(num_frames: int, source_fps: float, target_fps: float | None) -> np.ndarray:
  """Indices of the frames to keep when going from source_fps to target_fps.

  Args:
    num_frames: frames at the source rate.
    source_fps: their rate.
    target_fps: the wanted rate; None keeps all.

  Returns:
    int64[K], increasing; K ~ num_frames * min(1, target / source).
  """
  if not source_fps > 0:
    raise ValueError(f'source_fps must be positive, got {source_fps}.')
  return select_by_time(np.arange(num_frames) / source_fps, target_fps)


def select_by_time(times: Sequence[float], target_fps: float | None) -> np.ndarray:
  """Like `sample_indices`, for frames with arbitrary increasing timestamps (variable frame rate).

  After a gap in the timestamps, sampling resumes on the regular grid rather than catching up.

  Args:
    times: float[N] seconds, increasing.
    target_fps: the wanted rate; None keeps all.

  Returns:
    int64[K] indices into times.
  """
  sampler = _Sampler(target_fps)
  return np.array([i for i, t in enumerate(times) if sampler.take(float(t))], np.int64)


def _natural_key(name: str):
  numbers = re.findall(r'\d+', name)
  return (int(numbers[-1]) if numbers else -1, name)


def list_frames(folder: str | os.PathLike) -> list[str]:
  """Image files of `folder` in numeric frame order.

  Raises:
    VideoError: the folder is missing or holds no images.
  """
  folder = os.fspath(folder)
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    raise VideoError(folder, 'no such folder') from None
  except NotADirectoryError:
    raise VideoError(folder, 'is a file, not a frame folder') from None
  names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith('.')]
  if not names:
    raise VideoError(folder, f'holds no frame images ({", ".join(IMAGE_EXTENSIONS)})')
  return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _pil():
  try:
    from PIL import Image
  except ImportError as e:
    raise ImportError('Reading frame images needs Pillow: pip install pillow') from e
  return Image


def _av():
  try:
    import av
  except ImportError as e:
    raise ImportError('Decoding video files needs PyAV: pip install av') from e
  return av


def _ffmpeg_error(av):
  # PyAV >= 14 names its base error FFmpegError; older releases called it AVError.
  return getattr(av, 'FFmpegError', None) or getattr(av, 'AVError')


def read_image(path: str) -> np.ndarray:
  """One image file as uint8[H, W, 3] RGB (grey and RGBA are converted)."""
  image_lib = _pil()
  try:
    with image_lib.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except FileNotFoundError:
    raise VideoError(path, 'no such file') from None
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad or truncated files
    raise VideoError(path, f'cannot decode image: {e}') from None


def _stack(frames: Sequence[np.ndarray], path: str,
           names: Sequence[str] | None = None) -> np.ndarray:
  shapes = {f.shape for f in frames}
  if len(shapes) > 1:
    first = frames[0].shape
    odd = next(i for i, f in enumerate(frames) if f.shape != first)
    which = names[odd] if names else f'frame {odd}'
    raise VideoError(path, f'frames differ in size: {which} is {frames[odd].shape}, the first '
                     f'is {first}')
  return np.stack(frames)


def read_frame_folder(folder: str | os.PathLike, *, fps: float | None = None,
                      target_fps: float | None = None) -> np.ndarray:
  """Frames of an image folder, optionally subsampled (only the kept files are decoded).

  Args:
    folder: the folder.
    fps: the folder's frame rate; required when target_fps is given.
    target_fps: see `sample_indices`.

  Returns:
    uint8[T, H, W, 3].
  """
  folder = os.fspath(folder)
  files = list_frames(folder)
  if target_fps is not None:
    if fps is None:
      raise ValueError(f'{folder}: a frame folder has no frame rate of its own; pass fps= '
                       f'(PHOENIX-2014T: 25) to resample to target_fps.')
    files = [files[i] for i in sample_indices(len(files), fps, target_fps)]
  return _stack([read_image(f) for f in files], folder, files)


def read_video(path: str | os.PathLike, *, start: float | None = None, end: float | None = None,
               target_fps: float | None = None) -> tuple[np.ndarray, float]:
  """Decodes a video file's first video stream to RGB.

  Args:
    path: the file.
    start, end: seconds from the stream's first timestamp; frames with start <= t < end are kept.
      The decoder seeks to the keyframe before `start`, so clips of long videos are cheap.
    target_fps: see `sample_indices`; frames are selected while decoding.

  Returns:
    (uint8[T, H, W, 3], the stream's average frame rate).

  Raises:
    VideoError: missing file, no video stream, undecodable data, or no frames in [start, end).
  """
  av = _av()
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoError(path, 'no such file')
  if os.path.isdir(path):
    raise VideoError(path, 'is a folder; use read_frame_folder for frame folders')
  if start is not None and end is not None and end <= start:
    raise ValueError(f'{path}: end ({end}) must be after start ({start}).')
  sampler = _Sampler(target_fps)
  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise VideoError(path, 'holds no video stream')
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      time_base = float(stream.time_base) if stream.time_base else None
      origin = stream.start_time * time_base if stream.start_time is not None and time_base else 0.0
      fps = float(stream.average_rate) if stream.average_rate else None
      if start and time_base:
        container.seek(int((origin + start) / time_base), stream=stream, backward=True)
      for index, frame in enumerate(container.decode(stream)):
        if frame.time is not None:
          t = frame.time - origin
        elif fps and not start:  # after a seek the decode index no longer counts from frame 0
          t = index / fps
        else:
          raise VideoError(path, 'frames carry no timestamps, so they cannot be timed')
        if start is not None and t + _EPS < start:
          continue
        if end is not None and t + _EPS >= end:
          break
        if sampler.take(t):
          frames.append(frame.to_ndarray(format='rgb24'))
  except _ffmpeg_error(av) as e:
    raise VideoError(path, f'cannot decode: {e}') from None
  if not frames:
    span = '' if start is None and end is None else f' between {start} s and {end} s'
    raise VideoError(path, f'decoded no frames{span}')
  if fps is None:
    raise VideoError(path, 'the video stream states no frame rate')
  return _stack(frames, path), fps


def resize_frames(frames: np.ndarray, size: int | Sequence[int], *, center_crop: bool = False,
                  resample: str = 'bilinear') -> np.ndarray:
  """Resizes uint8[T, H, W, 3] frames to size (an int for square, or (height, width)).

  Args:
    frames: uint8[T, H, W, 3].
    size: output size.
    center_crop: first cut the largest centred region with the output's aspect ratio, so nothing
      is stretched (for a square output: resize the short side, then crop the middle). False
      stretches the whole frame to the output size.
    resample: 'bilinear' (antialiased when shrinking, like torchvision's antialias=True), 'area'
      (box average), 'bicubic' or 'nearest'.

  Returns:
    uint8[T, out_h, out_w, 3]; `frames` itself when there is nothing to do.
  """
  image_lib = _pil()
  out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f'size must be positive, got {size}.')
  if resample not in RESAMPLE:
    raise ValueError(f'resample must be one of {RESAMPLE}, got {resample!r}.')
  filters = {'bilinear': image_lib.Resampling.BILINEAR, 'area': image_lib.Resampling.BOX,
             'bicubic': image_lib.Resampling.BICUBIC, 'nearest': image_lib.Resampling.NEAREST}
  t, h, w, _ = frames.shape
  box = (0, 0, w, h)
  if center_crop:
    # Largest centred box with aspect out_w / out_h (compared in integers to avoid float ties).
    if w * out_h > h * out_w:
      crop_w = max(1, round(h * out_w / out_h))
      left = (w - crop_w) // 2
      box = (left, 0, left + crop_w, h)
    else:
      crop_h = max(1, round(w * out_h / out_w))
      top = (h - crop_h) // 2
      box = (0, top, w, top + crop_h)
  if (out_h, out_w) == (h, w) and box == (0, 0, w, h):
    return frames
  out = np.empty((t, out_h, out_w, 3), np.uint8)
  for i in range(t):
    # Crop before resizing: resize(box=...) lets the filter read pixels outside the box.
    image = image_lib.fromarray(frames[i]).crop(box)
    out[i] = np.asarray(image.resize((out_w, out_h), filters[resample]))
  return out


def load_frames(path: str | os.PathLike, *, fps: float | None = None,
                target_fps: float | None = None, size: int | Sequence[int] | None = None,
                center_crop: bool = False, resample: str = 'bilinear',
                start: float | None = None, end: float | None = None) -> np.ndarray:
  """Frames of a frame folder or video file, sampled to target_fps and resized for the ViT.

  Args:
    path: a folder of images or a video file.
    fps: a folder's frame rate (needed with target_fps); ignored for videos, which state theirs.
    target_fps: see `sample_indices`; None keeps every frame.
    size: output size (int = square, or (height, width)); None keeps the source size.
    center_crop, resample: see `resize_frames`.
    start, end: seconds, for video files (e.g. How2Sign/OpenASL sentences in long videos).

  Returns:
    uint8[T, H, W, 3] RGB.

  Raises:
    VideoError: the path is missing, empty or undecodable (the message names it).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if start is not None or end is not None:
      raise ValueError(f'{path}: start/end apply to video files; slice frame folders by index.')
    frames = read_frame_folder(path, fps=fps, target_fps=target_fps)
  else:
    frames, _ = read_video(path, start=start, end=end, target_fps=target_fps)
  if size is not None:
    frames = resize_frames(frames, size, center_crop=center_crop, resample=resample)
  return frames


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float,
                codec: str = 'mpeg4', bit_rate: int = 20_000_000) -> None:
  """Encodes uint8[H, W, 3] frames to a video file (tests and debugging; yuv420p, even sizes).

  The default bit rate is high so that decoded frames stay close to the originals.
  """
  av = _av()
  from fractions import Fraction
  frames = list(frames)
  if not frames:
    raise ValueError('write_video needs at least one frame.')
  h, w = frames[0].shape[:2]
  with av.open(os.fspath(path), mode='w') as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
    stream.bit_rate = bit_rate
    for image in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
