"""Pose readers on the real sample files, on synthetic files of each version, on broken files."""

import os
import pickle
import struct

import numpy as np
import pytest

from rvlf_jax.data.errors import DataError, PoseError
from rvlf_jax.data.poses import (COCO_WHOLEBODY_NAMES, Pose, load_pose, parse_pose_file,
                                 save_pose)

HOLISTIC_COMPONENTS = (('POSE_LANDMARKS', 33), ('FACE_LANDMARKS', 478), ('LEFT_HAND_LANDMARKS', 21),
                       ('RIGHT_HAND_LANDMARKS', 21), ('POSE_WORLD_LANDMARKS', 33))
HOLISTIC_HEADER_BYTES = 14897  # offset of the body in holistic_v02.pose, measured by hand



@pytest.fixture(scope='module')
def holistic_bytes(shared_data):
  with open(os.path.join(shared_data, 'holistic_v02.pose'), 'rb') as f:
    return f.read()


# An independent .pose writer, straight from the spec, so the reader is not only checked against
# the library's own writer.
def _str(s):
  raw = s.encode('utf-8')
  return struct.pack('<H', len(raw)) + raw


def pose_header(version, components, width=640, height=480, depth=0, limbs=True):
  out = struct.pack('<fHHHH', version, width, height, depth, len(components))
  for name, fmt, points in components:
    out += _str(name) + _str(fmt) + struct.pack('<HHH', len(points), int(limbs), int(limbs))
    out += b''.join(_str(p) for p in points)
    if limbs:  # one limb and one colour, which the reader must skip
      out += struct.pack('<HH', 0, 1) + struct.pack('<HHH', 255, 0, 0)
  return out


def pose_bytes(version, components, fps, data, conf, frames=None, **header):
  """v0.1 / v0.2 file of data [T, P, N, D] and conf [T, P, N]; frames overrides the stored count."""
  t, p = data.shape[:2]
  frames = t if frames is None else frames
  body = (struct.pack('<HHH', fps, frames, p) if version == 0.1
          else struct.pack('<fIH', fps, frames, p))
  return (pose_header(version, components, **header) + body
          + data.astype('<f4').tobytes() + conf.astype('<f4').tobytes())


TWO_COMPONENTS = (('BODY', 'XYC', ('A', 'B', 'C')), ('HAND', 'XYC', ('W', 'T')))


def random_pose(t=4, p=2, n=5, d=2, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 500, (t, p, n, d)).astype(np.float32),
          rng.uniform(0.1, 1, (t, p, n)).astype(np.float32))


def write(tmp_path, name, payload):
  path = tmp_path / name
  path.write_bytes(payload)
  return str(path)


# --- The real files.


def test_real_holistic_file(shared_data, holistic_bytes):
  pose = load_pose(os.path.join(shared_data, 'holistic_v02.pose'))
  assert pose.components == tuple(c for c, _ in HOLISTIC_COMPONENTS)
  for component, count in HOLISTIC_COMPONENTS:
    assert sum(n.startswith(component + '/') for n in pose.names) == count
  assert pose.data.shape == (5, 1, 586, 3) and pose.data.dtype == np.float32
  assert pose.confidence.shape == (5, 1, 586)
  assert (pose.fps, pose.width, pose.height) == (25.0, 640, 360)
  assert pose.names[0] == 'POSE_LANDMARKS/NOSE' and pose.names[33] == 'FACE_LANDMARKS/0'
  assert pose.names[33 + 478] == 'LEFT_HAND_LANDMARKS/WRIST'
  # D = len("XYZC") - 1 = 3: the body is exactly T * P * N * (D + 1) float32s.
  assert len(holistic_bytes) - HOLISTIC_HEADER_BYTES == 5 * 1 * 586 * 4 * 4
  # Holistic gives face and hand points confidence 1 and body points their visibility.
  index = pose.index()
  hand = index['LEFT_HAND_LANDMARKS/WRIST']
  assert np.all(pose.confidence[:, :, hand:hand + 42] == 1.0)
  assert 0 < pose.confidence[:, :, :33].min() < 0.01 and pose.confidence.max() <= 1.0
  nose = pose.data[:, 0, index['POSE_LANDMARKS/NOSE'], :2]
  assert np.all((nose > 0) & (nose < [640, 360]))  # pixel coordinates inside the frame
  assert np.isfinite(pose.data).all()


def test_real_rtmpose_pickle(shared_data):
  path = os.path.join(shared_data, 'rtmpose133_lis.pkl')
  pose = load_pose(path, fps=25.0)
  with open(path, 'rb') as f:
    raw = pickle.load(f)  # our own sample file, so a plain load is fine here
  assert pose.data.shape == (126, 1, 133, 2) and pose.confidence.shape == (126, 1, 133)
  np.testing.assert_array_equal(pose.data, np.asarray(raw['keypoints'], np.float32))
  np.testing.assert_array_equal(pose.confidence, np.asarray(raw['scores'], np.float32))
  assert pose.names == COCO_WHOLEBODY_NAMES
  assert pose.components == ('BODY', 'FACE', 'LEFT_HAND', 'RIGHT_HAND')
  assert (pose.width, pose.height, pose.fps) == (850, 720, 25.0)
  assert load_pose(path).fps is None
  assert pose.confidence.max() > 1.0  # RTMPose (SimCC) scores are not probabilities


def test_save_pose_writes_the_spec_layout(shared_data, tmp_path):
  pose = load_pose(os.path.join(shared_data, 'holistic_v02.pose'))
  out = tmp_path / 'copy.pose'
  save_pose(pose, out)
  again = load_pose(out)
  np.testing.assert_array_equal(again.data, pose.data)
  np.testing.assert_array_equal(again.confidence, pose.confidence)
  fields = lambda p: (p.names, p.fps, p.width, p.height)  # noqa: E731
  assert fields(again) == fields(pose)
  assert os.listdir(tmp_path) == ['copy.pose']  # no temporary file left behind
  # Byte for byte what the independent writer produces (save_pose writes no limbs or colours).
  components = [(c, 'XYZC', [n.split('/', 1)[1] for n in pose.names if n.startswith(c + '/')])
                for c in pose.components]
  expected = pose_bytes(0.2, components, 25.0, pose.data, pose.confidence, width=640, height=360,
                        limbs=False)
  assert out.read_bytes() == expected


# --- Synthetic files of each version.


def test_v02_synthetic(tmp_path):
  data, conf = random_pose()
  path = write(tmp_path, 'a.pose',
               pose_bytes(0.2, TWO_COMPONENTS, 29.97, data, conf, width=320, height=240))
  pose = load_pose(path)
  np.testing.assert_array_equal(pose.data, data)
  np.testing.assert_array_equal(pose.confidence, conf)
  assert pose.names == ('BODY/A', 'BODY/B', 'BODY/C', 'HAND/W', 'HAND/T')
  assert pose.fps == pytest.approx(29.97) and (pose.width, pose.height) == (320, 240)
  assert pose.path == path
  # Unknown rate and size are stored as 0 and read back as None.
  out = tmp_path / 'b.pose'
  save_pose(Pose(data=data, confidence=conf, names=pose.names), out)
  assert (load_pose(out).fps, load_pose(out).width, load_pose(out).height) == (None, None, None)


def test_v01_synthetic_and_frame_count_checks(tmp_path):
  data, conf = random_pose()
  pose = load_pose(write(tmp_path, 'a.pose', pose_bytes(0.1, TWO_COMPONENTS, 25, data, conf)))
  np.testing.assert_array_equal(pose.data, data)
  assert pose.fps == 25.0
  # A stored count that disagrees with the body means lost or extra frames.
  with pytest.raises(PoseError, match='does not hold the 6 frames'):
    load_pose(write(tmp_path, 'b.pose', pose_bytes(0.1, TWO_COMPONENTS, 25, data, conf, frames=6)))


def test_v01_frame_count_overflow_is_read_from_the_body(tmp_path):
  # The u16 count cannot hold 65537 frames; pose-format then writes 0 and derives T from the size.
  components = (('P', 'XYC', ('a',)),)
  t = 65537
  data = np.arange(t * 2, dtype=np.float32).reshape(t, 1, 1, 2)
  conf = np.ones((t, 1, 1), np.float32)
  payload = pose_bytes(0.1, components, 25, data, conf, frames=0)
  pose = load_pose(write(tmp_path, 'long.pose', payload))
  assert pose.num_frames == t
  assert pose.data[-1, 0, 0].tolist() == [2 * t - 2, 2 * t - 1]


def test_v00_synthetic(tmp_path):
  # Two components with different formats; frame 0 has one person, frame 1 two.
  components = (('BODY', 'XYC', ('a', 'b')), ('HAND', 'XYZC', ('w',)))
  body = struct.pack('<HH', 24, 2)
  body += struct.pack('<Hh', 1, 0) + np.float32([1, 2, .5, 3, 4, .6, 5, 6, 7, .7]).tobytes()
  body += struct.pack('<H', 2)
  body += struct.pack('<h', 0) + np.float32([8, 9, .8, 10, 11, .9, 12, 13, 14, 1.]).tobytes()
  body += struct.pack('<h', 1) + np.float32([15, 16, .1, 17, 18, .2, 19, 20, 21, .3]).tobytes()
  pose = load_pose(write(tmp_path, 'v0.pose', pose_header(0.0, components) + body))
  assert pose.data.shape == (2, 2, 3, 3) and pose.fps == 24.0
  np.testing.assert_array_equal(pose.data[0, 0], [[1, 2, 0], [3, 4, 0], [5, 6, 7]])
  np.testing.assert_allclose(pose.confidence[0, 0], [.5, .6, .7])
  np.testing.assert_array_equal(pose.data[0, 1], 0)  # padding person
  np.testing.assert_array_equal(pose.confidence[0, 1], 0)
  np.testing.assert_array_equal(pose.data[1, 1], [[15, 16, 0], [17, 18, 0], [19, 20, 21]])
  with pytest.raises(PoseError, match='bytes follow the last frame'):
    load_pose(write(tmp_path, 'v0x.pose', pose_header(0.0, components) + body + b'\0\0'))


# --- Broken files.


@pytest.mark.parametrize('cut', [0, 3, 9, 60, HOLISTIC_HEADER_BYTES - 1, HOLISTIC_HEADER_BYTES + 5,
                                 HOLISTIC_HEADER_BYTES + 12, -4, -1])
def test_truncated_real_file(holistic_bytes, tmp_path, cut):
  path = write(tmp_path, 'cut.pose', holistic_bytes[:cut] if cut else b'')
  with pytest.raises(PoseError, match='truncated') as info:
    load_pose(path)
  assert path in str(info.value) and isinstance(info.value, ValueError)


def test_trailing_bytes_are_corruption(holistic_bytes, tmp_path):
  with pytest.raises(PoseError, match='longer than its header says'):
    load_pose(write(tmp_path, 'long.pose', holistic_bytes + b'\0' * 8))


def test_unknown_version(holistic_bytes, tmp_path):
  path = write(tmp_path, 'v3.pose', struct.pack('<f', 0.3) + holistic_bytes[4:])
  with pytest.raises(PoseError, match=r'unknown \.pose version 0\.3'):
    load_pose(path)
  with pytest.raises(PoseError, match='unknown .pose version'):
    load_pose(write(tmp_path, 'text.pose', b'this is not a pose file at all'))


def test_corrupt_point_name(holistic_bytes, tmp_path):
  at = holistic_bytes.index(b'LEFT_EYE_INNER')
  broken = holistic_bytes[:at] + b'\xff\xfe' + holistic_bytes[at + 2:]
  with pytest.raises(PoseError, match='not UTF-8'):
    load_pose(write(tmp_path, 'utf.pose', broken))


def test_missing_file_and_unknown_type(tmp_path):
  missing = str(tmp_path / 'nothing.pose')
  with pytest.raises(PoseError, match='no such file') as info:
    load_pose(missing)
  assert info.value.path == missing
  with pytest.raises(PoseError, match='unknown pose file type'):
    load_pose(write(tmp_path, 'x.json', b'{}'))
  with pytest.raises(PoseError, match='is a folder'):
    os.mkdir(tmp_path / 'dir.pose')
    load_pose(str(tmp_path / 'dir.pose'))


def test_empty_body(tmp_path):
  data, conf = np.zeros((0, 1, 5, 2), np.float32), np.zeros((0, 1, 5), np.float32)
  with pytest.raises(PoseError, match='no frames'):
    load_pose(write(tmp_path, 'e.pose', pose_bytes(0.2, TWO_COMPONENTS, 25, data, conf)))
  with pytest.raises(PoseError, match='no components'):
    load_pose(write(tmp_path, 'c.pose', pose_header(0.2, ()) + struct.pack('<fIH', 25, 0, 1)))


def test_nan_coordinates(tmp_path):
  data, conf = random_pose()
  data[2, 1, 3, 0] = np.nan  # a point marked as found
  data[1, 0, 0, 1] = np.inf
  conf[1, 0, 0] = 0.0  # a missing point: its coordinates mean nothing
  path = write(tmp_path, 'nan.pose', pose_bytes(0.2, TWO_COMPONENTS, 25, data, conf))
  with pytest.raises(PoseError, match=r'1 points have NaN/inf .* index \(2, 1, 3\)') as info:
    load_pose(path)
  assert path in str(info.value)
  pose = load_pose(path, strict=False)
  np.testing.assert_array_equal(pose.data[2, 1, 3], 0)
  assert pose.confidence[2, 1, 3] == 0
  np.testing.assert_array_equal(pose.data[1, 0, 0], 0)
  assert np.isfinite(pose.data).all()
  np.testing.assert_array_equal(pose.data[0], data[0])  # the rest is untouched


def test_nan_at_missing_points_only_is_not_an_error(tmp_path):
  data, conf = random_pose()
  data[:, :, 4] = np.nan
  conf[:, :, 4] = 0.0
  pose = load_pose(write(tmp_path, 'ok.pose', pose_bytes(0.2, TWO_COMPONENTS, 25, data, conf)))
  np.testing.assert_array_equal(pose.data[:, :, 4], 0)


# --- RTMPose pickles.


def write_pickle(tmp_path, obj, name='p.pkl'):
  return write(tmp_path, name, pickle.dumps(obj))


def test_pickle_variants(tmp_path):
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 100, (3, 133, 2))
  s = rng.uniform(0, 1, (3, 133))
  # Arrays without the person axis and without w_h.
  pose = load_pose(write_pickle(tmp_path, {'keypoints': xy, 'scores': s}))
  assert pose.data.shape == (3, 1, 133, 2) and pose.width is None
  np.testing.assert_allclose(pose.data[:, 0], xy.astype(np.float32))
  # People vary per frame (0, 2, 1): padded to 2 with confidence 0.
  frames = [np.zeros((0, 133, 2)), rng.uniform(0, 9, (2, 133, 2)), rng.uniform(0, 9, (1, 133, 2))]
  scores = [np.zeros((0, 133)), np.ones((2, 133)), np.ones((1, 133))]
  pose = load_pose(write_pickle(
      tmp_path, {'keypoints': frames, 'scores': scores, 'w_h': np.array([64, 48])}))
  assert pose.data.shape == (3, 2, 133, 2) and (pose.width, pose.height) == (64, 48)
  assert pose.confidence[0].sum() == 0 and pose.confidence[2, 1].sum() == 0
  np.testing.assert_allclose(pose.data[1], frames[1].astype(np.float32))


def frames_of(people, points=133, dims=2, t=1):
  return {'keypoints': [np.zeros((people, points, dims))] * t,
          'scores': [np.ones((people, points))] * t}


@pytest.mark.parametrize('obj, message', [
    (frames_of(1, points=17), '17 keypoints per person; expected 133'),
    (frames_of(1, dims=3), r'shape \(1, 133, 3\)'),
    ({**frames_of(1), 'scores': [np.zeros((1, 132))]}, 'scores have shape'),
    ({**frames_of(1, t=2), 'scores': [np.zeros((1, 133))]}, '2 frames of keypoints but 1'),
    ({'keypoints': [], 'scores': []}, 'holds no frames'),
    (frames_of(0), 'none of the 1 frames holds a person'),
    ({**frames_of(1), 'w_h': [0, 5]}, "'w_h' should be"),
    ({'points': []}, "expected a dict with 'keypoints' and 'scores'"),
    ([1, 2, 3], "expected a dict with 'keypoints' and 'scores', got list"),
])
def test_bad_pickles(tmp_path, obj, message):
  path = write_pickle(tmp_path, obj)
  with pytest.raises(PoseError, match=message) as info:
    load_pose(path)
  assert str(info.value).startswith(path)


def test_pickle_nan(tmp_path):
  xy = np.ones((2, 1, 133, 2))
  xy[1, 0, 100] = np.nan
  path = write_pickle(tmp_path, {'keypoints': list(xy), 'scores': list(np.ones((2, 1, 133)))})
  with pytest.raises(PoseError, match='NaN'):
    load_pose(path)
  pose = load_pose(path, strict=False)
  assert pose.confidence[1, 0, 100] == 0 and pose.confidence.sum() == 2 * 133 - 1


def test_pickle_that_runs_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.mkdir, (str(tmp_path / 'pwned'),))
  path = write_pickle(tmp_path, {'keypoints': Evil(), 'scores': []})
  with pytest.raises(PoseError, match='only builtins and numpy arrays'):
    load_pose(path)
  assert not (tmp_path / 'pwned').exists()
  with pytest.raises(PoseError, match='cannot unpickle'):
    load_pose(write(tmp_path, 'junk.pkl', b'\x80\x04not really a pickle'))


# --- The Pose record and the errors.


def test_pose_validates_its_fields():
  data, conf = random_pose(n=2)
  with pytest.raises(ValueError, match='2 points but 1 names'):
    Pose(data=data, confidence=conf, names=('A/a',))
  with pytest.raises(ValueError, match='float32'):
    Pose(data=data.astype(np.float64), confidence=conf, names=('A/a', 'A/b'))


def test_errors_survive_pickling():
  # grain workers send exceptions to the main process by pickling them.
  error = pickle.loads(pickle.dumps(PoseError('/x/y.pose', 'truncated', line=3)))
  assert isinstance(error, PoseError) and isinstance(error, DataError)
  assert isinstance(error, ValueError)
  assert (error.path, error.problem, error.line) == ('/x/y.pose', 'truncated', 3)
  assert str(error) == '/x/y.pose:3: truncated'


def test_parse_pose_file_names_its_source():
  with pytest.raises(PoseError, match='^<bytes>: truncated'):
    parse_pose_file(b'\0')
