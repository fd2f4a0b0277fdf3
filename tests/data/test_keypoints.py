"""COCO-WholeBody mapping of each layout (real files where we have them), subsets, normalisation."""

import os

import numpy as np
import pytest

from rvlf_jax.data import keypoints as kp
from rvlf_jax.data.errors import PoseError
from rvlf_jax.data.poses import Pose, load_pose




@pytest.fixture(scope='module')
def holistic(shared_data):
  return load_pose(os.path.join(shared_data, 'holistic_v02.pose'))


@pytest.fixture(scope='module')
def rtmpose(shared_data):
  return load_pose(os.path.join(shared_data, 'rtmpose133_lis.pkl'))


def point(pose, name):
  return pose.data[:, 0, pose.index()[name], :2]


def synthetic_pose(names, t=3, people=1, seed=0):
  rng = np.random.default_rng(seed)
  n = len(names)
  return Pose(data=rng.uniform(0, 500, (t, people, n, 2)).astype(np.float32),
              confidence=rng.uniform(0.2, 1, (t, people, n)).astype(np.float32), names=tuple(names))


# --- Mapping real files.


def test_holistic_mapping_by_name(holistic):
  wb = kp.to_wholebody(holistic)
  assert wb.layout == 'mediapipe_holistic'
  assert wb.keypoints.shape == (5, 133, 2) and wb.scores.shape == (5, 133)
  assert (wb.fps, wb.width, wb.height) == (25.0, 640, 360)
  np.testing.assert_array_equal(wb.keypoints[:, 0], point(holistic, 'POSE_LANDMARKS/NOSE'))
  np.testing.assert_array_equal(wb.keypoints[:, 9], point(holistic, 'POSE_LANDMARKS/LEFT_WRIST'))
  np.testing.assert_array_equal(wb.keypoints[:, 17],
                                point(holistic, 'POSE_LANDMARKS/LEFT_FOOT_INDEX'))
  np.testing.assert_array_equal(wb.keypoints[:, 22], point(holistic, 'POSE_LANDMARKS/RIGHT_HEEL'))
  np.testing.assert_array_equal(wb.keypoints[:, 91], point(holistic, 'LEFT_HAND_LANDMARKS/WRIST'))
  np.testing.assert_array_equal(wb.keypoints[:, 132],
                                point(holistic, 'RIGHT_HAND_LANDMARKS/PINKY_TIP'))
  np.testing.assert_array_equal(wb.keypoints[:, 23 + 8], point(holistic, 'FACE_LANDMARKS/152'))
  # Small toes have no BlazePose counterpart; everything else is present.
  assert set(np.flatnonzero(wb.scores.max(axis=0) == 0)) == {18, 21}
  np.testing.assert_array_equal(wb.keypoints[:, [18, 21]], 0)


def test_holistic_geometry_is_anatomical(holistic):
  """The mapped points sit where their names say, on a real signer facing the camera."""
  wb = kp.to_wholebody(holistic)
  xy = wb.keypoints
  shoulders = np.linalg.norm(xy[:, 5] - xy[:, 6], axis=-1)
  assert np.all(xy[:, 5, 0] > xy[:, 6, 0])  # the signer's left shoulder is on the image's right
  # The body's wrists and the hand models' wrists agree.
  for wrist, root in ((9, 91), (10, 112)):
    assert np.all(np.linalg.norm(xy[:, wrist] - xy[:, root], axis=-1) < 0.15 * shoulders)
  face = xy[:, kp.FACE]  # [T, 68, 2] in iBUG order
  jaw = face[:, :17]
  # Jaw points 0-7 (signer's right) lie left of their mirror points 16-9 in the image. (Strict
  # monotony fails near the ears, where the contour turns vertical when the head turns.)
  assert np.all(jaw[:, :8, 0] < jaw[:, 16:8:-1, 0])
  assert np.all(jaw[..., 1].argmax(axis=1) == 8)  # the chin is the lowest jaw point
  assert np.all(face[:, 36, 0] < face[:, 45, 0])  # right eye's outer corner left of the left's
  assert np.all(face[:, 17:27, 1].max(axis=1) < face[:, 36:48, 1].min(axis=1))  # brows above eyes
  assert np.all(face[:, 48, 0] < face[:, 54, 0])  # mouth corners
  assert np.all(np.diff(face[:, 27:31, 1], axis=1) > 0)  # nose bridge runs down to the tip
  nose_gap = np.linalg.norm(face[:, 30] - xy[:, 0], axis=-1)
  assert np.all(nose_gap < 0.05 * shoulders)  # face mesh nose tip ~ body nose


def test_reduced_holistic_set_maps_by_name(holistic):
  # pose-format can keep only the face contour points; mapping must follow names, not counts.
  keep = [i for i, n in enumerate(holistic.names)
          if not n.startswith('FACE_LANDMARKS/') or int(n.split('/')[1]) in (152, 33, 263, 61)]
  reduced = Pose(data=holistic.data[:, :, keep], confidence=holistic.confidence[:, :, keep],
                 names=tuple(holistic.names[i] for i in keep))
  full, part = kp.to_wholebody(holistic), kp.to_wholebody(reduced)
  assert part.layout == 'mediapipe_holistic'
  present = [23 + k for k, mesh in enumerate(kp.MEDIAPIPE_FACE_68) if mesh in (152, 33, 263, 61)]
  assert len(present) == 4
  np.testing.assert_array_equal(part.keypoints[:, present], full.keypoints[:, present])
  absent = sorted(set(range(23, 91)) - set(present))
  assert np.all(part.scores[:, absent] == 0) and np.all(part.keypoints[:, absent] == 0)
  np.testing.assert_array_equal(part.keypoints[:, 91:], full.keypoints[:, 91:])


def test_rtmpose_is_already_wholebody(rtmpose):
  wb = kp.to_wholebody(rtmpose)
  assert wb.layout == 'coco_wholebody'
  np.testing.assert_array_equal(wb.keypoints, rtmpose.data[:, 0])
  np.testing.assert_array_equal(wb.scores, rtmpose.confidence[:, 0])
  assert np.all(wb.keypoints[:, 5, 0] > wb.keypoints[:, 6, 0])  # frontal signer
  sure = (wb.scores[:, 9] > 0.5) & (wb.scores[:, 91] > 0.5)
  assert sure.sum() > 50
  gap = np.linalg.norm(wb.keypoints[sure, 9] - wb.keypoints[sure, 91], axis=-1)
  shoulders = np.linalg.norm(wb.keypoints[:, 5] - wb.keypoints[:, 6], axis=-1)
  assert np.median(gap) < 0.1 * np.median(shoulders)


# --- Mapping synthetic OpenPose layouts (no real sample file for these).


def test_openpose_137_by_name():
  names = list(kp.LAYOUTS['openpose_137'])
  names = names[:23] + ['pose_keypoints_2d/Neck', 'pose_keypoints_2d/MidHip'] + names[23:]
  names += ['face_keypoints_2d/FP_68', 'face_keypoints_2d/FP_69']  # pupils: not mapped
  rng = np.random.default_rng(0)
  order = rng.permutation(len(names))  # the file's order must not matter
  pose = synthetic_pose([names[i] for i in order])
  wb = kp.to_wholebody(pose)
  assert wb.layout == 'openpose_137' and np.all(wb.scores > 0)
  np.testing.assert_array_equal(wb.keypoints[:, 5], point(pose, 'pose_keypoints_2d/LShoulder'))
  np.testing.assert_array_equal(wb.keypoints[:, 18], point(pose, 'pose_keypoints_2d/LSmallToe'))
  np.testing.assert_array_equal(wb.keypoints[:, 23 + 30], point(pose, 'face_keypoints_2d/FN_30'))
  np.testing.assert_array_equal(wb.keypoints[:, 112], point(pose, 'hand_right_keypoints_2d/BASE'))
  np.testing.assert_array_equal(wb.keypoints[:, 111], point(pose, 'hand_left_keypoints_2d/P_DIP'))


def test_openpose_135_hands_take_the_body_wrists():
  # The table names each wrist twice (body wrist and hand root); the file holds it once.
  names = list(dict.fromkeys(kp.LAYOUTS['openpose_135']))
  pose = synthetic_pose(names[:17] + ['BODY_135/UpperNeck', 'BODY_135/HeadTop'] + names[17:])
  wb = kp.to_wholebody(pose)
  assert wb.layout == 'openpose_135'
  np.testing.assert_array_equal(wb.keypoints[:, 91], point(pose, 'BODY_135/LWrist'))
  np.testing.assert_array_equal(wb.keypoints[:, 9], point(pose, 'BODY_135/LWrist'))
  np.testing.assert_array_equal(wb.keypoints[:, 92], point(pose, 'BODY_135/LThumb1CMC'))
  np.testing.assert_array_equal(wb.keypoints[:, 23 + 22], point(pose, 'BODY_135/LEyeBrow4'))


def test_unknown_layout_is_refused():
  with pytest.raises(PoseError, match='no known keypoint layout'):
    kp.to_wholebody(synthetic_pose(['SKELETON/head', 'SKELETON/tail']))


def test_person_choice():
  pose = synthetic_pose(kp.LAYOUTS['coco_wholebody'], people=2)
  conf = pose.confidence.copy()
  conf[:, 0] *= 0.1  # the second slot is the confident one
  pose = Pose(data=pose.data, confidence=conf, names=pose.names)
  np.testing.assert_array_equal(kp.to_wholebody(pose).keypoints, pose.data[:, 1])
  np.testing.assert_array_equal(kp.to_wholebody(pose, person=0).keypoints, pose.data[:, 0])
  with pytest.raises(ValueError, match='person 2 out of range'):
    kp.to_wholebody(pose, person=2)


def test_nan_in_mapped_points():
  pose = synthetic_pose(kp.LAYOUTS['coco_wholebody'])
  pose.data[1, 0, 7, 0] = np.nan
  with pytest.raises(PoseError, match='NaN'):
    kp.to_wholebody(pose)
  wb = kp.to_wholebody(pose, strict=False)
  assert wb.scores[1, 7] == 0 and np.all(wb.keypoints[1, 7] == 0)
  assert np.isfinite(wb.keypoints).all()


# --- Subsets.


def test_subsets():
  cosign = kp.SUBSETS['cosign77']
  assert len(cosign) == 77 and len(set(cosign.indices)) == 77
  sizes = {name: stop - start for name, (start, stop) in cosign.parts.items()}
  assert sizes == {'body': 9, 'left_hand': 21, 'right_hand': 21, 'mouth': 8, 'face': 18}
  start, stop = cosign.parts['mouth']
  assert cosign.indices[start:stop] == tuple(range(83, 91))  # inner lips
  # Uni-Sign's selection, as in its load_part_kp.
  unisign = kp.SUBSETS['unisign69'].indices
  assert unisign == (0, *range(3, 11), *range(91, 133), *range(23, 40, 2), *range(83, 91), 53)
  keypoints = np.arange(2 * 133 * 2, dtype=np.float32).reshape(2, 133, 2)
  scores = np.arange(2 * 133, dtype=np.float32).reshape(2, 133)
  sel, sel_scores = kp.select(keypoints, scores, 'cosign77')
  assert sel.shape == (2, 77, 2) and sel_scores.shape == (2, 77)
  np.testing.assert_array_equal(sel_scores[1], 133 + np.array(cosign.indices))


# --- Normalisation.


def body_arrays(t=4):
  keypoints = np.zeros((t, 133, 2), np.float32)
  scores = np.ones((t, 133), np.float32)
  keypoints[:, 5] = [300, 200]  # left shoulder
  keypoints[:, 6] = [100, 200]  # right shoulder
  keypoints[:, 0] = [200, 100]  # nose
  keypoints[:, 91] = [350, 300]  # left hand root
  keypoints[:, 92] = [370, 280]
  keypoints[:, 112] = [50, 300]
  keypoints[:, 113] = [30, 260]
  return keypoints, scores


def test_to_unit_square():
  out = kp.to_unit_square(np.array([[0, 0], [640, 360], [320, 90]], np.float32), 640, 360)
  np.testing.assert_allclose(out, [[-1, -1], [1, 1], [0, -0.5]])
  with pytest.raises(ValueError, match='positive'):
    kp.to_unit_square(np.zeros((1, 2)), 0, 360)


def test_normalize_body():
  keypoints, scores = body_arrays()
  keypoints[1, :] += [40, 10]  # the signer moves: centring follows each frame
  keypoints[2, 6] = [0, 0]
  scores[2, 6] = 0  # right shoulder lost in frame 2: use the median centre
  scores[:, 100] = 0  # a missing point anywhere
  out, out_scores = kp.normalize_body(keypoints, scores)
  np.testing.assert_allclose(out[0, 0], [0, -0.5])  # nose: 100 px above a 200 px shoulder line
  np.testing.assert_allclose(out[1, 0], [0, -0.5])
  np.testing.assert_allclose(out[[0, 1, 3], 5], [[0.5, 0]] * 3)
  np.testing.assert_allclose(out[2, 6], 0)  # dropped
  assert out_scores[2, 6] == 0
  np.testing.assert_allclose(out[2, 5], [0.5, 0])  # median centre of the other frames
  assert np.all(out[:, 100] == 0) and np.all(out_scores[:, 100] == 0)


def test_normalize_min_score_and_modes():
  keypoints, scores = body_arrays()
  scores[:, 0] = 0.2
  out, out_scores = kp.normalize_body(keypoints, scores, min_score=0.3)
  assert np.all(out[:, 0] == 0) and np.all(out_scores[:, 0] == 0)
  keypoints[0, 0, 0] = np.nan
  scores[0, 0] = 1
  with pytest.raises(PoseError, match='NaN'):
    kp.normalize_body(keypoints, scores)
  out, out_scores = kp.normalize_body(keypoints, scores, strict=False)
  assert np.isfinite(out).all() and out_scores[0, 0] == 0
  keypoints[0, 0, 0] = 1
  scores[:, 5] = 0  # no left shoulder anywhere
  with pytest.raises(ValueError, match='no frame has both shoulders'):
    kp.normalize_body(keypoints, scores)
  out, out_scores = kp.normalize_body(keypoints, scores, strict=False)
  assert not out.any() and not out_scores.any()


def test_normalize_hands_relative_to_wrists():
  keypoints, scores = body_arrays()
  scores[3, 112] = 0  # right wrist lost in frame 3: that hand goes
  out, out_scores = kp.normalize_hands(keypoints, scores)
  np.testing.assert_allclose(out[:, 91], 0)
  np.testing.assert_allclose(out[:, 92], [[0.1, -0.1]] * 4)  # (20, -20) px / 200 px
  np.testing.assert_allclose(out[:3, 113], [[-0.1, -0.2]] * 3)
  assert np.all(out[3, 112:] == 0) and np.all(out_scores[3, 112:] == 0)
  np.testing.assert_array_equal(out[:, 0], keypoints[:, 0])  # non-hand points pass through
  out, _ = kp.normalize_hands(keypoints, scores, scale=10.0)
  np.testing.assert_allclose(out[0, 92], [2, -2])


def test_normalize_combines_both():
  keypoints, scores = body_arrays()
  out, _ = kp.normalize(keypoints, scores)
  np.testing.assert_allclose(out[:, 0], [[0, -0.5]] * 4)
  np.testing.assert_allclose(out[:, 92], [[0.1, -0.1]] * 4)
  out, _ = kp.normalize(keypoints, scores, hands_relative=False)
  np.testing.assert_allclose(out[:, 92], [[0.85, 0.4]] * 4)


def test_normalize_real_signer(rtmpose):
  wb = kp.to_wholebody(rtmpose)
  out, scores = kp.normalize(wb.keypoints, wb.scores, min_score=0.3)
  assert np.isfinite(out).all()
  both = (scores[:, 5] > 0) & (scores[:, 6] > 0)
  mid = (out[both, 5] + out[both, 6]) / 2
  np.testing.assert_allclose(mid, 0, atol=1e-5)
  width = np.linalg.norm(out[both, 5] - out[both, 6], axis=-1)
  assert np.median(width) == pytest.approx(1.0, abs=1e-5)
  rooted = scores[:, 91] > 0
  np.testing.assert_array_equal(out[rooted, 91], 0)
  assert np.abs(out[:, 91:]).max() < 1.0  # a hand is smaller than the shoulders are wide


# -- Standardisation -----------------------------------------------------------------------------


def test_keypoint_stats_standardise_detected_points(tmp_path):
  rng = np.random.default_rng(0)
  clips = []
  for _ in range(5):
    pts = rng.normal([1.0, -2.0], [0.5, 0.1], size=(20, 4, 2)).astype(np.float32)
    scores = np.ones((20, 4), np.float32)
    scores[:, 3] = 0  # joint 3 never detected
    scores[::4, 1] = 0  # joint 1 sometimes lost; its garbage must not count
    pts[::4, 1] = 1e6
    clips.append((pts, scores))
  stats = kp.KeypointStats.fit(clips)
  seen = np.concatenate([pts[s > 0][None] for pts, s in [(c[0][:, 1], c[1][:, 1]) for c in clips]],
                        axis=1)[0]
  np.testing.assert_allclose(stats.mean[1], seen.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.std[1], seen.std(0), rtol=1e-4)
  assert stats.mean[3].tolist() == [0, 0] and stats.std[3].tolist() == [1, 1]
  out, scores = stats.apply(*clips[0])
  assert out.dtype == np.float32 and np.all(out[clips[0][1] == 0] == 0)
  all_out = np.concatenate([stats.apply(*c)[0][:, 0] for c in clips])
  np.testing.assert_allclose(all_out.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(all_out.std(0), 1, atol=1e-4)
  path = str(tmp_path / 'stats.npz')
  stats.save(path)
  again = kp.KeypointStats.load(path)
  assert np.array_equal(again.mean, stats.mean) and np.array_equal(again.std, stats.std)


def test_keypoint_stats_refuse_bad_input(tmp_path):
  with pytest.raises(ValueError, match='no clips'):
    kp.KeypointStats.fit([])
  stats = kp.KeypointStats(np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32))
  with pytest.raises(ValueError, match='keypoints of 5 joints, statistics of 4'):
    stats.apply(np.zeros((3, 5, 2), np.float32), np.ones((3, 5), np.float32))
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not numpy')
  with pytest.raises(PoseError, match='bad.npz: not a keypoint statistics file'):
    kp.KeypointStats.load(str(bad))


def test_normalizer_is_picklable_and_composes():
  import pickle  # pylint: disable=g-import-not-at-top
  stats = kp.KeypointStats(np.full((133, 2), 0.5, np.float32),
                                  np.full((133, 2), 2.0, np.float32))
  norm = pickle.loads(pickle.dumps(kp.Normalizer(stats)))
  rng = np.random.default_rng(1)
  pts = rng.uniform(0, 64, size=(6, 133, 2)).astype(np.float32)
  scores = np.ones((6, 133), np.float32)
  plain = kp.normalize(pts, scores, strict=False)
  got = norm(pts, scores)
  np.testing.assert_allclose(got[0], (plain[0] - 0.5) / 2.0, rtol=1e-6, atol=1e-6)
