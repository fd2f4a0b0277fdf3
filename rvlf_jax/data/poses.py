"""Pose files: `.pose` (sign-language-processing/pose, versions 0.0, 0.1, 0.2) and RTMPose pickles.

`load_pose(path)` returns a `Pose` whose points keep the file's own order and names, written
"COMPONENT/POINT" (e.g. "POSE_LANDMARKS/NOSE", "FACE_LANDMARKS/152", "BODY/left_wrist"). Mapping
onto the project's COCO-WholeBody layout goes by those names and lives in
`rvlf_jax.data.keypoints`.

Shape letters: T frames, P people, N points, D spatial dims (the format string minus its "C").

The `.pose` binary layout (little-endian), from the format's spec and its Python and JS readers:
  header   f32 version; u16 width, height, depth; u16 component count; per component:
           str name, str format (e.g. "XYZC"), u16 point, limb and colour counts, then the point
           names (str each), limbs (u16 pairs) and colours (u16 triples). str = u16 length + UTF-8.
  v0.1     u16 fps, u16 frames, u16 people; f32 data[T, P, N, D]; f32 confidence[T, P, N].
           The u16 frame count overflows on long videos (the reference writer then stores 0), so
           the reference reader derives T from the body size; this reader does the same and checks
           it against the stored count.
  v0.2     f32 fps, u32 frames, u16 people; then the same two arrays.
  v0.0     u16 fps, u16 frames; per frame: u16 people; per person: i16 id, then per component
           f32[points, len(format)] with the confidence last. The header is read as in later
           versions, as both reference readers do. People are padded to the most seen in a frame.
D is max(len(format)) - 1 over the components, as in the reference reader; a component with a
shorter format leaves its extra dims at 0.

RTMPose pickles (the Uni-Sign layout): {'keypoints': T x [P, 133, 2] pixel coordinates in
COCO-WholeBody order, 'scores': T x [P, 133], 'w_h': [W, H] (optional)}, lists or arrays. Their
points are named as pose-format's COCO-WholeBody header does (components BODY 23, FACE 68,
LEFT_HAND 21, RIGHT_HAND 21), so a `.pose` file written from the same estimator maps identically.
RTMPose (SimCC) scores are not probabilities: real files hold values above 1.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
from typing import Any, BinaryIO, Sequence

import numpy as np

from rvlf_jax.data.errors import PoseError

KNOWN_VERSIONS = (0.0, 0.1, 0.2)
WHOLEBODY_COUNT = 133

# Point names of pose-format's COCO-WholeBody 133 header (utils/cocowholebody133_header.py).
COCO_WHOLEBODY_NAMES: tuple[str, ...] = tuple(
    [f'BODY/{n}' for n in (
        'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
        'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip',
        'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle', 'left_big_toe',
        'left_small_toe', 'left_heel', 'right_big_toe', 'right_small_toe', 'right_heel')]
    + [f'FACE/face-{i}' for i in range(68)]
    + [f'LEFT_HAND/left_hand_{i}' for i in range(21)]
    + [f'RIGHT_HAND/right_hand_{i}' for i in range(21)])


@dataclasses.dataclass(frozen=True, eq=False)
class Pose:
  """Pose estimates of a video, in the file's own point order and coordinates.

  Attributes:
    data: float32[T, P, N, D] coordinates (pixels for every estimator we read; MediaPipe's z is
      its own relative depth).
    confidence: float32[T, P, N]; 0 marks a point the estimator did not find.
    names: N "COMPONENT/POINT" names, in file order.
    fps: frames per second, or None where the file does not say (pickles).
    width: frame width in pixels, or None.
    height: frame height in pixels, or None.
    path: the file it was read from ('' if built in memory); used in later error messages.
  """

  data: np.ndarray
  confidence: np.ndarray
  names: tuple[str, ...]
  fps: float | None = None
  width: int | None = None
  height: int | None = None
  path: str = ''

  def __post_init__(self):
    if self.data.ndim != 4 or self.data.dtype != np.float32:
      raise ValueError(f'Pose.data must be float32[T, P, N, D], got '
                       f'{self.data.dtype}{self.data.shape}.')
    if self.confidence.shape != self.data.shape[:3] or self.confidence.dtype != np.float32:
      raise ValueError(f'Pose.confidence must be float32{list(self.data.shape[:3])}, '
                       f'got {self.confidence.dtype}{self.confidence.shape}.')
    if len(self.names) != self.data.shape[2]:
      raise ValueError(f'Pose has {self.data.shape[2]} points but {len(self.names)} names.')
    object.__setattr__(self, 'names', tuple(self.names))

  @property
  def num_frames(self) -> int:
    return self.data.shape[0]

  @property
  def components(self) -> tuple[str, ...]:
    """Component names in file order."""
    return tuple(dict.fromkeys(n.split('/', 1)[0] for n in self.names))

  def index(self) -> dict[str, int]:
    """Maps each "COMPONENT/POINT" name to its point index (the first, if a name repeats)."""
    out: dict[str, int] = {}
    for i, name in enumerate(self.names):
      out.setdefault(name, i)
    return out


def load_pose(path: str | os.PathLike, *, strict: bool = True, fps: float | None = None) -> Pose:
  """Reads a `.pose` file or an RTMPose `.pkl`, chosen by the file extension.

  Args:
    path: the file.
    strict: what to do with non-finite coordinates or confidences at points the estimator claims
      to have found (confidence > 0): raise (True), or set those points to 0 with confidence 0
      (False). Non-finite coordinates at confidence-0 points carry no information and become 0 in
      either mode.
    fps: frame rate to record where the file has none (pickles); ignored for `.pose` files.

  Returns:
    The Pose.

  Raises:
    PoseError: the file is missing, of unknown type, truncated, corrupt, empty, or (strict) holds
      NaN/inf values.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.pose', '.pkl', '.pickle'):
    raise PoseError(path, f'unknown pose file type {ext!r}; expected .pose or .pkl')
  try:
    with open(path, 'rb') as f:
      buffer = f.read()
  except FileNotFoundError:
    raise PoseError(path, 'no such file') from None
  except IsADirectoryError:
    raise PoseError(path, 'is a folder, not a pose file') from None
  if ext == '.pose':
    return parse_pose_file(buffer, path, strict=strict)
  return parse_rtmpose_pickle(buffer, path, strict=strict, fps=fps)


class _Reader:
  """Bounds-checked little-endian reads from a buffer; overruns raise PoseError naming the file."""

  def __init__(self, buffer: bytes, path: str):
    self.buffer, self.path, self.offset = buffer, path, 0

  def take(self, n: int, what: str) -> bytes:
    if self.offset + n > len(self.buffer):
      raise PoseError(self.path, f'truncated: reading {what} needs {n} bytes at offset '
                      f'{self.offset}, but the file has {len(self.buffer)} bytes')
    out = self.buffer[self.offset:self.offset + n]
    self.offset += n
    return out

  def unpack(self, fmt: str, what: str):
    s = struct.Struct('<' + fmt)
    values = s.unpack(self.take(s.size, what))
    return values[0] if len(values) == 1 else values

  def string(self, what: str) -> str:
    n = self.unpack('H', f'length of {what}')
    raw = self.take(n, what)
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      raise PoseError(self.path, f'{what} at offset {self.offset - n} is not UTF-8: '
                      f'{raw[:40]!r}') from None

  def floats(self, count: int, what: str) -> np.ndarray:
    return np.frombuffer(self.take(4 * count, what), dtype='<f4').astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Component:
  name: str
  format: str
  points: tuple[str, ...]


def _read_header(r: _Reader) -> tuple[float, int, int, list[_Component]]:
  raw_version = r.unpack('f', 'version')
  # The version is stored as float32 (0.2 reads back as 0.2000000030), so compare rounded.
  version = round(raw_version, 3) if math.isfinite(raw_version) else raw_version
  if version not in KNOWN_VERSIONS:
    raise PoseError(r.path, f'unknown .pose version {raw_version!r}; this reader knows '
                    f'{", ".join(map(str, KNOWN_VERSIONS))}')
  width, height, _ = r.unpack('HHH', 'width, height, depth')
  count = r.unpack('H', 'component count')
  if count == 0:
    raise PoseError(r.path, 'header lists no components')
  components = []
  for c in range(count):
    name = r.string(f'name of component {c}')
    fmt = r.string(f'format of component {name}')
    if len(fmt) < 2:
      raise PoseError(r.path, f'component {name} has format {fmt!r}; expected dims plus C, '
                      f'e.g. "XYC"')
    n_points, n_limbs, n_colours = r.unpack('HHH', f'counts of component {name}')
    points = tuple(r.string(f'point {i} of component {name}') for i in range(n_points))
    r.take(4 * n_limbs + 6 * n_colours, f'limbs and colours of component {name}')
    components.append(_Component(name, fmt, points))
  if not any(c.points for c in components):
    raise PoseError(r.path, 'header lists no points')
  return version, width, height, components


def parse_pose_file(buffer: bytes, path: str = '<bytes>', *, strict: bool = True) -> Pose:
  """Parses the bytes of a `.pose` file (see the module docstring for the layout).

  Args:
    buffer: the whole file.
    path: its name, for error messages.
    strict: see `load_pose`.

  Returns:
    The Pose.

  Raises:
    PoseError: on any truncation, corruption, unknown version or empty body.
  """
  r = _Reader(buffer, path)
  version, width, height, components = _read_header(r)
  names = tuple(f'{c.name}/{p}' for c in components for p in c.points)
  n_points = len(names)
  dims = max(len(c.format) for c in components) - 1

  if version == 0.0:
    fps, data, conf = _read_body_v00(r, components, dims)
  else:
    if version == 0.1:
      fps, stored_frames, people = r.unpack('HHH', 'fps, frame count, people')
    else:
      fps, stored_frames, people = r.unpack('fIH', 'fps, frame count, people')
    frame_bytes = 4 * people * n_points * (dims + 1)
    body = len(buffer) - r.offset
    if people == 0:
      raise PoseError(path, f'body lists 0 people ({stored_frames} frames)')
    if version == 0.1:
      # See the module docstring: the u16 count may have wrapped, so trust the body's size.
      frames, extra = divmod(body, frame_bytes)
      wrapped = stored_frames == 0 and frames >= 65535  # what the reference writer stores then
      if extra or (stored_frames != frames % 65536 and not wrapped):
        raise PoseError(path, f'body of {body} bytes does not hold the {stored_frames} frames the '
                        f'header gives ({people} people x {n_points} points x {dims} dims + '
                        f'confidence = {frame_bytes} bytes a frame); the file is truncated or '
                        f'corrupt')
    else:
      frames = stored_frames
      if body != frames * frame_bytes:
        state = 'truncated' if body < frames * frame_bytes else 'longer than its header says'
        raise PoseError(path, f'body is {state}: {frames} frames x {people} people x {n_points} '
                        f'points x ({dims} dims + confidence) need {frames * frame_bytes} bytes '
                        f'after the header, the file has {body}')
    if frames == 0:
      raise PoseError(path, 'body holds no frames')
    data = r.floats(frames * people * n_points * dims, 'data')
    data = data.reshape(frames, people, n_points, dims)
    conf = r.floats(frames * people * n_points, 'confidence').reshape(frames, people, n_points)

  data, conf = check_finite(data, conf, path, strict=strict)
  fps = float(fps) if math.isfinite(fps) and fps > 0 else None  # writers store 0 for unknown
  return Pose(data=data, confidence=conf, names=names, fps=fps, width=width or None,
              height=height or None, path=path)


def _read_body_v00(r: _Reader, components: Sequence[_Component], dims: int):
  fps, frames = r.unpack('HH', 'fps and frame count')
  if frames == 0:
    raise PoseError(r.path, 'body holds no frames')
  per_frame = []
  for t in range(frames):
    people = r.unpack('H', f'people count of frame {t}')
    persons = []
    for p in range(people):
      r.unpack('h', f'person id in frame {t}')
      parts = []
      for c in components:
        width = len(c.format)
        values = r.floats(len(c.points) * width, f'frame {t} person {p} component {c.name}')
        parts.append(values.reshape(len(c.points), width))
      persons.append(parts)
    per_frame.append(persons)
  n_points = sum(len(c.points) for c in components)
  max_people = max(len(p) for p in per_frame)
  if max_people == 0:
    raise PoseError(r.path, f'none of the {frames} frames holds a person')
  if r.offset != len(r.buffer):
    raise PoseError(r.path, f'{len(r.buffer) - r.offset} bytes follow the last frame; corrupt file')
  data = np.zeros((frames, max_people, n_points, dims), np.float32)
  conf = np.zeros((frames, max_people, n_points), np.float32)
  for t, persons in enumerate(per_frame):
    for p, parts in enumerate(persons):
      start = 0
      for values in parts:
        stop = start + values.shape[0]
        data[t, p, start:stop, :values.shape[1] - 1] = values[:, :-1]
        conf[t, p, start:stop] = values[:, -1]
        start = stop
  return fps, data, conf


def check_finite(data: np.ndarray, confidence: np.ndarray, path: str, *, strict: bool = True):
  """Deals with NaN/inf in pose arrays; see `load_pose` for the policy.

  Args:
    data: float[..., N, D] coordinates.
    confidence: float[..., N].
    path: named in the error.
    strict: raise on non-finite values at points with confidence > 0 (or non-finite confidence),
      else zero those points and their confidence.

  Returns:
    (data, confidence), copies if anything changed.

  Raises:
    PoseError: strict, and a found point (or a confidence) is not finite.
  """
  bad_xy = ~np.isfinite(data).all(axis=-1)
  bad_conf = ~np.isfinite(confidence)
  if not (bad_xy.any() or bad_conf.any()):
    return data, confidence
  found = np.where(bad_conf, True, confidence > 0)
  corrupt = (bad_xy & found) | bad_conf
  if strict and corrupt.any():
    where = np.argwhere(corrupt)
    raise PoseError(path, f'{len(where)} points have NaN/inf coordinates or confidence although '
                    f'marked as found, the first at index {tuple(int(i) for i in where[0])} '
                    f'(pass strict=False to zero them)')
  data = np.where((bad_xy | corrupt)[..., None], 0.0, data).astype(data.dtype)
  confidence = np.where(corrupt, 0.0, confidence).astype(confidence.dtype)
  return data, confidence


class _SafeUnpickler(pickle.Unpickler):
  """Loads only builtins and numpy arrays: dataset pickles come from the internet, and a plain
  pickle.load runs whatever code the file names."""

  ALLOWED = {
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('_codecs', 'encode'),  # numpy arrays pickled with protocol 2 store their bytes this way
      ('collections', 'OrderedDict'),
  }

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refers to {module}.{name}; only builtins and numpy arrays '
                                 f'are loaded')


def safe_unpickle(file: BinaryIO) -> Any:
  """`pickle.load` restricted to builtins and numpy arrays (see `_SafeUnpickler`)."""
  return _SafeUnpickler(file).load()


def parse_rtmpose_pickle(buffer: bytes, path: str = '<bytes>', *, strict: bool = True,
                         fps: float | None = None) -> Pose:
  """Parses an RTMPose (Uni-Sign layout) pickle; see the module docstring.

  Args:
    buffer: the whole file.
    path: its name, for error messages.
    strict: see `load_pose`.
    fps: frame rate to record (the pickle has none).

  Returns:
    The Pose, with COCO_WHOLEBODY_NAMES and P the most people seen in a frame (frames with
    fewer are padded with confidence 0).

  Raises:
    PoseError: not a pickle, wrong structure, wrong keypoint count, empty, or (strict) NaN.
  """
  try:
    obj = safe_unpickle(io.BytesIO(buffer))
  except Exception as e:  # pickle raises many types on garbage (UnpicklingError, EOFError, ...)
    raise PoseError(path, f'cannot unpickle: {type(e).__name__}: {e}') from None
  if not isinstance(obj, dict) or 'keypoints' not in obj or 'scores' not in obj:
    keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    raise PoseError(path, f"expected a dict with 'keypoints' and 'scores', got {keys}")
  keypoints, scores = obj['keypoints'], obj['scores']
  if len(keypoints) == 0:
    raise PoseError(path, 'holds no frames')
  if len(keypoints) != len(scores):
    raise PoseError(path, f'{len(keypoints)} frames of keypoints but {len(scores)} of scores')

  frames_xy, frames_s = [], []
  for t, (xy, s) in enumerate(zip(keypoints, scores)):
    xy = np.asarray(xy, np.float64)
    s = np.asarray(s, np.float64)
    if xy.size == 0 and s.size == 0:  # nobody detected in this frame
      xy, s = np.zeros((0, WHOLEBODY_COUNT, 2)), np.zeros((0, WHOLEBODY_COUNT))
    if xy.ndim == 2:  # a single person without the person axis
      xy, s = xy[None], s.reshape(1, -1)
    if xy.ndim != 3 or xy.shape[-1] != 2:
      raise PoseError(path, f'frame {t}: keypoints have shape {xy.shape}; expected '
                      f'[people, 133, 2]')
    if xy.shape[1] != WHOLEBODY_COUNT:
      raise PoseError(path, f'frame {t}: {xy.shape[1]} keypoints per person; expected '
                      f'{WHOLEBODY_COUNT} (COCO-WholeBody)')
    if s.shape != xy.shape[:2]:
      raise PoseError(path, f'frame {t}: scores have shape {s.shape}; expected {xy.shape[:2]}')
    frames_xy.append(xy)
    frames_s.append(s)
  people = max(xy.shape[0] for xy in frames_xy)
  if people == 0:
    raise PoseError(path, f'none of the {len(frames_xy)} frames holds a person')
  data = np.zeros((len(frames_xy), people, WHOLEBODY_COUNT, 2), np.float32)
  conf = np.zeros((len(frames_xy), people, WHOLEBODY_COUNT), np.float32)
  for t, (xy, s) in enumerate(zip(frames_xy, frames_s)):
    data[t, :xy.shape[0]] = xy
    conf[t, :xy.shape[0]] = s

  width = height = None
  if obj.get('w_h') is not None:
    w_h = np.asarray(obj['w_h']).reshape(-1)
    if w_h.shape != (2,) or not np.all(np.isfinite(w_h)) or np.any(w_h <= 0):
      raise PoseError(path, f"'w_h' should be [width, height] in pixels, got {obj['w_h']!r}")
    width, height = int(w_h[0]), int(w_h[1])
  data, conf = check_finite(data, conf, path, strict=strict)
  return Pose(data=data, confidence=conf, names=COCO_WHOLEBODY_NAMES, fps=fps, width=width,
              height=height, path=path)


def save_pose(pose: Pose, path: str | os.PathLike) -> None:
  """Writes `pose` as a `.pose` v0.2 file (no limbs or colours; depth 0).

  Components are the runs of equal "COMPONENT/" prefixes in `pose.names`; each gets the format
  "X", "XY" or "XYZ" (by D) plus "C". The file is written to a temporary name and renamed, so a
  crash never leaves a truncated file behind.

  Args:
    pose: D must be 1 to 3; width, height must fit in u16. A None fps is stored as 0, which
      `load_pose` reads back as None.
    path: destination.
  """
  path = os.fspath(path)
  n_dims = pose.data.shape[-1]
  if not 1 <= n_dims <= 3:
    raise ValueError(f'save_pose writes 1 to 3 spatial dims, got {n_dims}.')
  fmt = 'XYZ'[:n_dims] + 'C'
  runs: list[tuple[str, list[str]]] = []
  for name in pose.names:
    component, _, point = name.partition('/')
    if not runs or runs[-1][0] != component:
      runs.append((component, []))
    runs[-1][1].append(point)

  def string(s: str) -> bytes:
    raw = s.encode('utf-8')
    return struct.pack('<H', len(raw)) + raw

  out = [struct.pack('<fHHHH', 0.2, pose.width or 0, pose.height or 0, 0, len(runs))]
  for component, points in runs:
    out += [string(component), string(fmt), struct.pack('<HHH', len(points), 0, 0)]
    out += [string(p) for p in points]
  frames, people = pose.data.shape[:2]
  out.append(struct.pack('<fIH', pose.fps or 0.0, frames, people))
  out.append(pose.data.astype('<f4').tobytes())
  out.append(pose.confidence.astype('<f4').tobytes())
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(b''.join(out))
  os.replace(tmp, path)
