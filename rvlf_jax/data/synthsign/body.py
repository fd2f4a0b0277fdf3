"""Body geometry for the SynthSign scene: face landmarks under head pose, hands, arms, mirroring.

All functions are vectorised over frames (leading dim T) and work in image coordinates: x to the
right, y down, z toward the signer (the camera looks along +z; projection drops z). The signer
faces the camera, so their right side is on the image's left.

Keypoint layout is COCO-WholeBody 133 (see `rvlf_jax.data.keypoints`); the face is the 68-point
iBUG layout, index 0 at the signer's right jaw (image left).
"""

from __future__ import annotations

import numpy as np

from rvlf_jax.data.keypoints import FACE, LEFT_HAND, NUM_KEYPOINTS, RIGHT_HAND


def _face_template() -> np.ndarray:
  """float64[68, 3]: landmarks in head units (x in radii rx, y in radii ry, z toward the viewer)."""
  pts = np.zeros((68, 3))
  k = np.arange(17)
  pts[:17, 0] = -0.95 * np.cos(np.pi * k / 16)
  pts[:17, 1] = -0.1 + 1.08 * np.sin(np.pi * k / 16)
  pts[:17, 2] = 0.3 * np.sin(np.pi * k / 16)
  j = np.arange(5)
  pts[17:22, 0] = np.linspace(-0.75, -0.15, 5)
  pts[22:27, 0] = np.linspace(0.15, 0.75, 5)
  pts[17:22, 1] = pts[22:27, 1][::-1] = -0.42 - 0.08 * np.sin(np.pi * j / 4)
  pts[17:27, 2] = 0.7
  pts[27:31] = np.stack([np.zeros(4), np.linspace(-0.28, 0.12, 4), np.linspace(0.8, 1.05, 4)], 1)
  pts[31:36] = np.stack([np.linspace(-0.18, 0.18, 5), [0.2, 0.24, 0.26, 0.24, 0.2],
                         np.full(5, 0.85)], 1)
  # Eyes: outer corner, two top, inner corner, two bottom (right eye); the left eye mirrors it.
  eye = np.array([[-1, 0], [-1 / 3, -1], [1 / 3, -1], [1, 0], [1 / 3, 1], [-1 / 3, 1]], float)
  pts[36:42, :2] = np.array([-0.4, -0.2]) + eye * [0.17, 0.07]
  pts[42:48, :2] = pts[[39, 38, 37, 36, 41, 40], :2] * [-1.0, 1.0]  # 42 is the inner corner
  pts[36:48, 2] = 0.75
  # Lips: outer 48-59 from the right corner over the top, inner 60-67 likewise.
  a = np.linspace(0, 2 * np.pi, 12, endpoint=False)
  pts[48:60, 0] = -0.28 * np.cos(a)
  pts[48:60, 1] = 0.55 - 0.075 * np.sin(a)
  b = np.linspace(0, 2 * np.pi, 8, endpoint=False)
  pts[60:68, 0] = -0.2 * np.cos(b)
  pts[60:68, 1] = 0.55 - 0.01 * np.sin(b)
  pts[48:68, 2] = 0.85
  return pts


FACE_TEMPLATE = _face_template()
_UPPER_LIP = np.r_[49:54, 61:64]
_LOWER_LIP = np.r_[55:60, 65:68]
_UPPER_LID = np.array([37, 38, 43, 44])
_LOWER_LID = np.array([40, 41, 46, 47])
_INNER_BROW = np.array([20, 21, 22, 23])


def face_points(center, rx, ry, yaw, pitch, roll, brow_raise, brow_furrow, mouth_open, eye_open):
  """The 68 face landmarks in the image.

  Args:
    center: float[T, 2] head centre; rx, ry: head radii (scalars).
    yaw: float[T] head turn (radians, positive turns the face toward image right).
    pitch: float[T] positive tilts the chin down; roll: float[T] in-plane tilt.
    brow_raise, brow_furrow, mouth_open, eye_open: float[T], about 0..1.

  Returns:
    float[T, 68, 2].
  """
  t = len(center)
  p = np.broadcast_to(FACE_TEMPLATE, (t, 68, 3)).copy()
  p[:, 17:27, 1] -= 0.22 * brow_raise[:, None]
  p[:, _INNER_BROW, 1] += 0.1 * brow_furrow[:, None]
  p[:, 17:22, 0] += 0.05 * brow_furrow[:, None] * np.linspace(0, 1, 5)
  p[:, 22:27, 0] -= 0.05 * brow_furrow[:, None] * np.linspace(1, 0, 5)
  p[:, _LOWER_LIP, 1] += 0.22 * mouth_open[:, None]
  p[:, 57, 1] += 0.03 * mouth_open  # the outer lower lip hangs below the inner one
  # Raised brows widen the eyes a little; closing eyes brings the upper lid down to the lower.
  lid = 0.07 * (eye_open + 0.3 * brow_raise - 1.0)
  p[:, _UPPER_LID, 1] -= lid[:, None]
  p[:, _LOWER_LID, 1] += 0.3 * lid[:, None]
  x, y, z = p[..., 0] * rx, p[..., 1] * ry, p[..., 2] * rx
  cy, sy = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
  x, z = x * cy + z * sy, -x * sy + z * cy
  cp, sp = np.cos(pitch)[:, None], np.sin(pitch)[:, None]
  y = y * cp + z * sp
  cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]
  x, y = x * cr - y * sr, x * sr + y * cr
  return np.stack([x, y], -1) + center[:, None, :]


def hand_basis(theta, psi, left: bool):
  """Image-plane projections of the hand axes (u, l, n): float[T, 3, 2].

  Args:
    theta: float[T] radians; turns the fingers from up toward the hand's contralateral side.
    psi: float[T] radians; rolls the hand about the fingers (0: palm to the camera).
    left: a left hand (the mirror image of a right one).
  """
  c, s = np.cos(psi), np.sin(psi)
  zero = np.zeros_like(c)
  # Right hand, fingers up, palm to the camera: u = -y, l (thumb) = +x, n = -z (to the camera).
  u = np.stack([zero, -np.ones_like(c), zero], -1)
  thumb = np.stack([c, zero, s], -1)   # cos(psi) l0 - sin(psi) n0
  n = np.stack([s, zero, -c], -1)      # cos(psi) n0 + sin(psi) l0
  axes = np.stack([u, thumb, n], 1)[..., :2]  # [T, 3, 2], z dropped
  ct, st = np.cos(theta)[:, None], np.sin(theta)[:, None]
  x, y = axes[..., 0], axes[..., 1]
  axes = np.stack([x * ct - y * st, x * st + y * ct], -1)
  if left:
    axes = axes * np.array([-1.0, 1.0])
  return axes


def project_hand(contact, local, basis, length):
  """Hand points in the image: float[T, 21, 2], placed so the middle knuckle (9) is at `contact`.

  Args:
    contact: float[T, 2]; local: float[T, 21, 3] hand-local points (units of hand length);
    basis: float[T, 3, 2] from `hand_basis`; length: hand length in pixels.
  """
  pts = np.einsum('tkc,tcd->tkd', local, basis) * length
  return pts - pts[:, 9:10] + contact[:, None, :]


def arm_ik(shoulder, wrist, upper, fore, side: float):
  """Elbow positions for wrists, and the wrists moved within reach.

  Args:
    shoulder, wrist: float[T, 2]; upper, fore: segment lengths.
    side: -1 for an arm on the image's left (the signer's right), +1 otherwise; the elbow is
      chosen low and outward, as a relaxed signer holds it.

  Returns:
    (elbow float[T, 2], wrist float[T, 2]).
  """
  v = wrist - shoulder
  d = np.linalg.norm(v, axis=-1, keepdims=True)
  d_ok = np.clip(d, abs(upper - fore) + 0.5, (upper + fore) * 0.995)
  direction = v / np.maximum(d, 1e-6)
  wrist = shoulder + direction * d_ok
  cos_a = np.clip((upper**2 + d_ok**2 - fore**2) / (2 * upper * d_ok), -1.0, 1.0)
  a = np.arccos(cos_a)
  dx, dy = direction[:, :1], direction[:, 1:]
  c, s = np.cos(a), np.sin(a)
  e1 = shoulder + upper * np.concatenate([dx * c - dy * s, dx * s + dy * c], -1)
  e2 = shoulder + upper * np.concatenate([dx * c + dy * s, -dx * s + dy * c], -1)
  # Higher score: lower (larger y) and further out.
  s1 = e1[:, 1] + 0.4 * side * (e1[:, 0] - shoulder[:, 0])
  s2 = e2[:, 1] + 0.4 * side * (e2[:, 0] - shoulder[:, 0])
  return np.where((s1 >= s2)[:, None], e1, e2), wrist


def _mirror_permutation() -> np.ndarray:
  perm = np.arange(NUM_KEYPOINTS)
  pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 20),
           (18, 21), (19, 22)]
  face = list(range(17)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
  face += [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
  face += [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
  face[:17] = list(range(16, -1, -1))
  perm[FACE] = np.array(face) + FACE.start
  for a, b in pairs:
    perm[a], perm[b] = b, a
  perm[LEFT_HAND] = np.arange(RIGHT_HAND.start, RIGHT_HAND.stop)
  perm[RIGHT_HAND] = np.arange(LEFT_HAND.start, LEFT_HAND.stop)
  return perm


MIRROR = _mirror_permutation()


def mirror(keypoints, width: float):
  """Left-right mirror image of keypoints [..., 133, 2] in a frame `width` wide: x -> width - x,
  with left and right points swapped (a right hand's keypoints become the left hand's)."""
  out = keypoints[..., MIRROR, :].copy()
  out[..., 0] = width - out[..., 0]
  return out
