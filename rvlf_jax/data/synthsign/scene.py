"""The SynthSign scene: a gloss sequence signed by one signer, as clean keypoints over time.

`build_scene` lays the signs on a timeline (durations vary with the signer, the sign's movement
and its place in the sentence), moves both hands through each sign's path, interpolates the
transitions between signs (co-articulation: positions blend, handshapes change early, locations
assimilate toward neighbouring signs), adds non-manual marks (head shake, raised or furrowed brows,
head tilts) and nuisance motion (sway, blinks, mouthing), and returns the 133 COCO-WholeBody
keypoints that the renderer draws and the pose-estimator simulation observes.

Geometry is computed in design pixels of a 64x64 frame and scaled to the rendered size at the end.
A left-handed signer is built as the mirror image of a right-handed twin, so their dominant hand
is the left one (keypoints 91-111) and every movement is mirrored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rvlf_jax.data.synthsign import body
from rvlf_jax.data.synthsign import phonology as ph
from rvlf_jax.data.synthsign.signers import Signer

DESIGN = 64.0
MIN_SECONDS, MAX_SECONDS = 2.0, 8.0
_DIRS = {'up': (0, -1), 'down': (0, 1), 'contra': (1, 0), 'ipsi': (-1, 0)}


@dataclasses.dataclass
class Scene:
  """A signed sentence as clean (noise-free) keypoints.

  Attributes:
    keypoints: float32[T, 133, 2] pixel coordinates in the size x size frame.
    hand_speed: float32[T, 2] speed of the left and right hand (pixels per second).
    head_center: float32[T, 2]; head_yaw: float32[T] (radians, for the renderer's hair).
    gloss_times: float32[N, 2] start and end (seconds) of each sign.
    signer: the signer; fps: frames per second; size: frame side in pixels.
  """

  keypoints: np.ndarray
  hand_speed: np.ndarray
  head_center: np.ndarray
  head_yaw: np.ndarray
  gloss_times: np.ndarray
  signer: Signer
  fps: float
  size: int

  @property
  def scale(self) -> float:
    """Pixels per design pixel."""
    return self.size / DESIGN


def _ease(t):
  return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))


def _path(move: str, tau: np.ndarray):
  """Movement path: (offset float[n, 2] in movement amplitudes, with +x contralateral;
  roll change float[n] in radians; (shape mode, weight float[n]) or None)."""
  e = _ease(tau)
  z = np.zeros_like(tau)
  shape = None
  roll = z
  if move in _DIRS:
    d = np.array(_DIRS[move], float)
    off = (e - 0.5)[:, None] * d
  elif move == 'arc_contra':
    off = np.stack([e - 0.5, -0.35 * np.sin(np.pi * e)], -1)
  elif move == 'arc_up':
    off = np.stack([0.35 * np.sin(np.pi * e), 0.5 - e], -1)
  elif move in ('circle_cw', 'circle_ccw'):
    a = 2 * np.pi * tau
    off = 0.35 * np.stack([np.sin(a) * (1 if move == 'circle_cw' else -1), -np.cos(a)], -1)
  elif move == 'tap':
    off = np.stack([z, 0.25 * np.abs(np.sin(2 * np.pi * tau))], -1)
  elif move == 'brush':
    off = np.stack([0.25 * np.abs(np.sin(2 * np.pi * tau)), z], -1)
  elif move == 'shake':
    off = np.stack([0.18 * np.sin(4 * np.pi * tau), z], -1)
    roll = 0.35 * np.sin(4 * np.pi * tau)
  elif move == 'zigzag':
    off = np.stack([0.2 * np.sin(4 * np.pi * e), e - 0.5], -1)
  elif move == 'twist':
    off = np.stack([z, z], -1)
    roll = 1.6 * (e - 0.5)
  elif move == 'wiggle':
    off = np.stack([z, z], -1)
    shape = ('wiggle', 0.6 * (0.5 - 0.5 * np.cos(6 * np.pi * tau)))
  elif move in ('open', 'close'):
    off = np.stack([z, (0.5 - e) * 0.3], -1)
    shape = (move, e)
  else:  # static: a small settle into the hold
    off = np.stack([z, 0.06 * np.sin(np.pi * tau)], -1)
  return off, roll, shape


_SHAPE_INDEX = {name: i for i, name in enumerate(ph.SHAPE_NAMES)}


def _local(shape: str, mode, n: int) -> np.ndarray:
  """Hand-local points float[n, 21, 3] of a handshape under a shape-changing movement."""
  p = ph.SHAPE_POINTS[_SHAPE_INDEX[shape]]
  if mode is None:
    return np.broadcast_to(p, (n, 21, 3))
  kind, w = mode
  other = ph.SHAPE_POINTS[_SHAPE_INDEX['claw' if kind == 'wiggle' else 'S']]
  if kind == 'open':
    w = 1.0 - w  # from the fist to the shape
  return p + w[:, None, None] * (other - p)


@dataclasses.dataclass
class _Pose:
  """One hand over n frames: contact point [n, 2], theta [n], psi [n], local points [n, 21, 3]."""

  contact: np.ndarray
  theta: np.ndarray
  psi: np.ndarray
  local: np.ndarray

  def at(self, i):
    return _Pose(self.contact[i:i + 1], self.theta[i:i + 1], self.psi[i:i + 1], self.local[i:i + 1])


class _Geometry:
  """Body anchors of one signer (right-handed frame: the dominant hand is on the image's left)."""

  def __init__(self, signer: Signer, cx: float):
    self.s, self.cx, self.sy = signer, cx, signer.shoulder_y
    self.head = np.array([cx, signer.shoulder_y - signer.neck - signer.head_ry])
    self.amp = 0.65 * signer.hand * signer.amplitude

  def anchor(self, loc: str, side: float, sym: bool = False) -> np.ndarray:
    """Contact point of a location for the hand on `side`: -1 for the dominant (right) hand, on
    the image's left, +1 for the other; the location's x points away from the midline."""
    ref, x, y, _ = ph.LOCATIONS[loc]
    if ref == 'head':
      return self.head + np.array([side * x * self.s.head_rx, y * self.s.head_ry])
    if ref == 'base':
      return self.base() + np.array([0.15, -0.35]) * self.s.hand
    if sym:
      x = max(x, 0.45)  # both hands in front of the body: keep them apart
    return np.array([self.cx + side * x * self.s.shoulder_half,
                     self.sy + y * self.s.shoulder_half])

  def base(self) -> np.ndarray:
    """Contact point of the non-dominant base hand of two-handed asymmetric signs."""
    return np.array([self.cx + 0.3 * self.s.shoulder_half, self.sy + 1.25 * self.s.shoulder_half])

  def rest(self, side: float, n: int) -> _Pose:
    sw = self.s.shoulder_half
    c = np.array([self.cx + side * 0.6 * sw, self.sy + 2.15 * sw])
    return _Pose(np.broadcast_to(c, (n, 2)), np.full(n, np.radians(150.0)),
                 np.full(n, np.radians(180.0)),
                 np.broadcast_to(ph.SHAPE_POINTS[ph.REST], (n, 21, 3)))


def _sign_poses(form: ph.SignForm, tau, geo: _Geometry, loc_shift, amp, dtheta, dpsi):
  """(dominant, non-dominant) poses of one sign at phases tau (float[n])."""
  n = len(tau)
  amp = amp * geo.amp * ph.LOCATIONS[form.loc][3]
  theta0, psi0 = np.radians(ph.ORIENTATIONS[form.orient])
  sym = form.hands in ('sym', 'alt')

  def hand(t, side):
    off, roll, mode = _path(form.move, t)
    contact = geo.anchor(form.loc, -1.0, sym) + loc_shift + off * amp
    if side > 0:  # the non-dominant hand mirrors the dominant one about the midline
      contact = np.stack([2 * geo.cx - contact[:, 0], contact[:, 1]], -1)
    return _Pose(contact, np.full(n, theta0 + dtheta), psi0 + dpsi + roll,
                 _local(form.shape, mode, n))

  dom = hand(tau, -1.0)
  if sym:
    other = hand((tau + 0.5) % 1.0 if form.hands == 'alt' else tau, 1.0)
  elif form.hands.startswith('base_'):
    shape, orient = ('B', 'contra_up') if form.hands == 'base_B' else ('S', 'contra_down')
    th, ps = np.radians(ph.ORIENTATIONS[orient])
    other = _Pose(np.broadcast_to(geo.base(), (n, 2)), np.full(n, th), np.full(n, ps),
                  _local(shape, None, n))
  else:
    other = geo.rest(1.0, n)
  return dom, other


def _lerp(a: _Pose, b: _Pose, w, ws) -> _Pose:
  """Transition frames between poses a and b (each of one frame) at weights w (shape: ws)."""
  w2, ws3 = w[:, None], ws[:, None, None]
  return _Pose(a.contact + w2 * (b.contact - a.contact), a.theta + w * (b.theta - a.theta),
               a.psi + w * (b.psi - a.psi), a.local + ws3 * (b.local - a.local))


def _smooth_noise(rng, t, amp, freq):
  """A smooth random signal: two sinusoids with random phases."""
  ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
  w = 2 * np.pi * freq * t
  return amp * (0.6 * np.sin(w + ph1) + 0.4 * np.sin(2.3 * w + ph2))


def _envelope(t, t0, t1, ramp=0.15):
  return _ease((t - t0) / ramp) * _ease((t1 - t) / ramp)


def build_scene(glosses, nonmanual, signer: Signer, rng: np.random.Generator, fps: float = 12.0,
                size: int = 64) -> Scene:
  """Signs `glosses` with their non-manual spans; a pure function of its arguments and rng state.

  Args:
    glosses: sequence of gloss names (keys of phonology.FORMS).
    nonmanual: (kind, start, end) spans over gloss indices; kinds neg, yn, wh, topic.
    signer: who signs.
    rng: consumed in a fixed pattern that depends only on the number of glosses.
    fps: frame rate; size: frame side in pixels.
  """
  forms = [ph.FORMS[g] for g in glosses]
  n = len(forms)
  cx = signer.cx if not signer.left_handed else DESIGN - signer.cx
  geo = _Geometry(signer, cx)
  # Per-sign variation, drawn in a fixed pattern (a minimal pair then differs only in its form).
  jitter = rng.normal(size=(n, 6))
  loc_shift = 0.08 * geo.amp * jitter[:, :2]
  amps = np.clip(1.0 + 0.1 * jitter[:, 2], 0.75, 1.25)
  dtheta, dpsi = 0.08 * jitter[:, 3], 0.08 * jitter[:, 4]
  mouthing = rng.random(n) < 0.5
  # Assimilation: each sign's location moves a little toward its neighbours'.
  anchors = np.array([geo.anchor(f.loc, -1.0, f.hands in ('sym', 'alt')) for f in forms])
  prev = np.concatenate([anchors[:1], anchors[:-1]])
  nxt = np.concatenate([anchors[1:], anchors[-1:]])
  loc_shift = loc_shift + 0.12 * (prev - anchors) + 0.08 * (nxt - anchors)

  # Timeline.
  dur = np.array([ph.MOVEMENTS[f.move] for f in forms]) * np.clip(1 + 0.1 * jitter[:, 5], 0.8, 1.2)
  dur[0] *= 1.05
  dur[-1] *= 1.25  # sentence-final lengthening
  dur /= signer.speed
  ends = [_sign_poses(f, np.array([0.0, 1.0]), geo, loc_shift[i], amps[i], dtheta[i], dpsi[i])
          for i, f in enumerate(forms)]
  rest_in, rest_out = rng.uniform(0.25, 0.45, 2)
  trans_j = rng.uniform(0.9, 1.1, n + 1)
  start, end = np.zeros(n), np.zeros(n)
  rest_pose = geo.rest(-1.0, 1).contact[0]
  t = rest_in + (0.12 + np.linalg.norm(ends[0][0].contact[0] - rest_pose) / 90) / signer.speed
  for i in range(n):
    if i:
      d = np.linalg.norm(ends[i][0].contact[0] - ends[i - 1][0].contact[1])
      t += (0.1 + d / 90) / signer.speed * trans_j[i]
    start[i], end[i] = t, t + dur[i]
    t = end[i]
  trans_in = start[0] - rest_in
  trans_out = 0.28 / signer.speed * trans_j[n]
  total = end[-1] + trans_out + rest_out
  if total > MAX_SECONDS - 0.1:  # a slow signer with a long sentence signs faster
    f = (MAX_SECONDS - 0.1) / total
    start, end, trans_in, trans_out, rest_out, total = (start * f, end * f, trans_in * f,
                                                         trans_out * f, rest_out * f, total * f)
  if total < MIN_SECONDS:
    pad = MIN_SECONDS - total
    start, end, total = start + pad / 2, end + pad / 2, MIN_SECONDS
  num_frames = int(round(total * fps))
  times = np.arange(num_frames) / fps

  # Hand tracks: rest, then per segment a sign path or a transition.
  tracks = [geo.rest(-1.0, num_frames), geo.rest(1.0, num_frames)]
  tracks = [_Pose(*(np.array(a) for a in (p.contact, p.theta, p.psi, p.local))) for p in tracks]
  rest1 = [geo.rest(-1.0, 1), geo.rest(1.0, 1)]
  segments = [(start[0] - trans_in, start[0], rest1, [e.at(0) for e in ends[0]])]
  for i in range(n):
    segments.append((start[i], end[i], i, None))
    nxt_pose = [e.at(0) for e in ends[i + 1]] if i + 1 < n else rest1
    segments.append((end[i], start[i + 1] if i + 1 < n else end[i] + trans_out,
                     [e.at(1) for e in ends[i]], nxt_pose))
  for t0, t1, a, b in segments:
    idx = np.nonzero((times >= t0) & (times < t1))[0]
    if not len(idx):
      continue
    u = (times[idx] - t0) / max(t1 - t0, 1e-6)
    if b is None:
      poses = _sign_poses(forms[a], u, geo, loc_shift[a], amps[a], dtheta[a], dpsi[a])
    else:
      w = _ease(u)
      poses = [_lerp(pa, pb, w, _ease(1.4 * u)) for pa, pb in zip(a, b)]
    for track, pose in zip(tracks, poses):
      track.contact[idx], track.theta[idx], track.psi[idx] = pose.contact, pose.theta, pose.psi
      track.local[idx] = pose.local

  # Head and face: nuisance motion plus the non-manual marks.
  s = signer
  yaw = _smooth_noise(rng, times, 0.07, 0.2)
  pitch = _smooth_noise(rng, times, 0.05, 0.17)
  roll = _smooth_noise(rng, times, 0.04, 0.13)
  brow_raise = _smooth_noise(rng, times, 0.12, 0.3)
  brow_furrow = np.zeros(num_frames)
  for kind, g0, g1 in nonmanual:
    t0, t1 = start[g0] - 0.12, end[g1 - 1] + 0.12
    env = _envelope(times, t0, t1) * s.expressiveness
    if kind == 'neg':
      yaw = yaw + 0.33 * env * np.sin(2 * np.pi * 2.2 * np.sqrt(s.speed) * (times - t0))
    elif kind == 'yn':
      brow_raise, pitch = brow_raise + env, pitch + 0.15 * env
    elif kind == 'wh':
      brow_furrow, pitch, roll = brow_furrow + env, pitch - 0.05 * env, roll + 0.08 * env
    elif kind == 'topic':
      brow_raise, pitch = brow_raise + 0.9 * env, pitch - 0.12 * env
  mouth = np.zeros(num_frames)
  for i in np.nonzero(mouthing)[0]:
    inside = (times >= start[i]) & (times < end[i])
    mouth[inside] = 0.5 * np.abs(np.sin(2 * np.pi * 2.5 * (times[inside] - start[i])))
  eye = np.ones(num_frames)
  for tb in rng.uniform(0, total, int(rng.poisson(0.4 * total))):
    eye = np.minimum(eye, np.clip(np.abs(times - tb) / 0.12, 0.0, 1.0))

  # Assemble the 133 keypoints (design pixels), everything carried by a slow body sway.
  sway = np.stack([_smooth_noise(rng, times, 0.5, 0.25), _smooth_noise(rng, times, 0.25, 0.3)], -1)
  kp = np.zeros((num_frames, 133, 2))
  head = geo.head + sway
  kp[:, 23:91] = body.face_points(head, s.head_rx, s.head_ry, yaw, pitch, roll, brow_raise,
                                  brow_furrow, mouth, eye)
  kp[:, 0] = kp[:, 23 + 30]
  kp[:, 1], kp[:, 2] = kp[:, 23 + 42:23 + 48].mean(1), kp[:, 23 + 36:23 + 42].mean(1)
  ear = np.stack([s.head_rx * np.cos(yaw), 0.1 * s.head_ry * np.ones_like(yaw)], -1)
  kp[:, 3], kp[:, 4] = head + ear, head - ear
  for side, (sh, el, wr, hip, knee, ankle, hand_sl) in (
      (1.0, (5, 7, 9, 11, 13, 15, slice(91, 112))),
      (-1.0, (6, 8, 10, 12, 14, 16, slice(112, 133)))):
    shoulder = np.array([cx + side * s.shoulder_half, s.shoulder_y + 0.5]) + sway
    kp[:, sh] = shoulder
    kp[:, hip] = np.array([cx + side * s.hip_half, s.shoulder_y + 3.2 * s.shoulder_half]) + sway
    kp[:, knee] = kp[:, hip] + np.array([side * 0.5, 2.2 * s.shoulder_half])
    kp[:, ankle] = kp[:, knee] + np.array([side * 0.3, 2.2 * s.shoulder_half])
    track = tracks[0 if side < 0 else 1]
    basis = body.hand_basis(track.theta, track.psi, left=side > 0)
    hand = body.project_hand(track.contact + sway, track.local, basis, s.hand)
    elbow, wrist = body.arm_ik(shoulder, hand[:, 0], s.upper_arm, s.forearm, side)
    hand += (wrist - hand[:, 0])[:, None]  # out of reach: the whole hand moves with the wrist
    kp[:, el], kp[:, wr], kp[:, hand_sl] = elbow, wrist, hand
  for foot, ankle, side in ((17, 15, 1.0), (20, 16, -1.0)):
    kp[:, foot] = kp[:, ankle] + np.array([side * 1.0, 3.0])
    kp[:, foot + 1] = kp[:, ankle] + np.array([side * 2.5, 2.5])
    kp[:, foot + 2] = kp[:, ankle] + np.array([0.0, 1.0])
  head_yaw = yaw
  if signer.left_handed:
    kp = body.mirror(kp, DESIGN)
    head = np.stack([DESIGN - head[:, 0], head[:, 1]], -1)
    head_yaw = -yaw
  k = size / DESIGN
  kp = kp * k
  speed = np.zeros((num_frames, 2))
  if num_frames > 1:
    for j, sl in enumerate((slice(91, 112), slice(112, 133))):
      v = np.linalg.norm(np.diff(kp[:, sl].mean(1), axis=0), axis=-1) * fps
      speed[1:, j] = v
      speed[0, j] = v[0]
  return Scene(kp.astype(np.float32), speed.astype(np.float32), (head * k).astype(np.float32),
               head_yaw.astype(np.float32), np.stack([start, end], -1).astype(np.float32),
               signer, float(fps), int(size))
