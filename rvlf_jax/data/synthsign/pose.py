"""A simulated pose estimator: what a whole-body keypoint detector would report for a scene.

From the clean keypoints it produces noisy coordinates and confidences, the way real pipelines
(RTMPose / MMPose whole-body models on sign videos) fail:
  - jitter: small on the body and face, large on the fingers (a 64x64 hand is a few pixels wide),
    growing with hand speed (motion blur);
  - hands dropped: during fast motion a hand is often not detected at all, in front of the face
    sometimes, and in bursts of a fraction of a second at any time; all its 21 points then have
    score 0 and coordinates (0, 0), as in OpenPose output;
  - fingers collapse toward a generic hand (a per-clip, per-hand bias, worse in motion), so the
    finger configuration is much less reliable than in the RGB frames;
  - left/right confusions: for a few frames, mostly when the hands are close, the two hands'
    keypoints are swapped;
  - occlusion: face points under a hand get low scores and extra noise;
  - legs below the frame: knees, ankles and feet are guessed (large noise, scores near 0).
Coordinates are quantised to 1/32 pixel and scores to 1/255, exactly what the cache stores, so a
cached example equals a generated one bit for bit.
"""

from __future__ import annotations

import numpy as np

from rvlf_jax.data.synthsign.scene import Scene

COORD_STEP = 1.0 / 32.0  # pixels; the cache stores int16 multiples of it
_BODY, _LEGS, _FACE = np.r_[0:13], np.r_[13:23], np.r_[23:91]
_HANDS = (np.r_[91:112], np.r_[112:133])
_TIPS = np.array([4, 8, 12, 16, 20])
# Hand speed (design pixels per second) at which half of the hands are dropped.
DROP_SPEED = 60.0


def to_cache(keypoints: np.ndarray, scores: np.ndarray):
  """(int16 keypoints in 1/32 px, clipped to the int16 range; uint8 scores in 1/255)."""
  kp = np.round(np.clip(keypoints / COORD_STEP, -32767, 32767)).astype(np.int16)
  sc = np.round(np.clip(scores, 0.0, 1.0) * 255.0).astype(np.uint8)
  return kp, sc


def from_cache(keypoints: np.ndarray, scores: np.ndarray):
  """The inverse of `to_cache`: float32 pixels and float32 scores."""
  return (keypoints.astype(np.float32) * np.float32(COORD_STEP),
          scores.astype(np.float32) / np.float32(255.0))


def quantize(keypoints: np.ndarray, scores: np.ndarray):
  """The cache's precision, so that a cached example equals a generated one bit for bit."""
  return from_cache(*to_cache(keypoints, scores))


def estimate(scene: Scene, rng: np.random.Generator):
  """Simulated detections of a scene.

  Args:
    scene: the clean scene.
    rng: draws all the noise; consumed in a pattern fixed by the number of frames.

  Returns:
    (keypoints float32[T, 133, 2] pixels, scores float32[T, 133] in [0, 1]; 0 = not detected).
  """
  clean = scene.keypoints.astype(np.float64)
  t = len(clean)
  k = scene.scale
  q = scene.signer.pose_noise * rng.uniform(0.9, 1.1)
  speed = scene.hand_speed.astype(np.float64) / k  # design px / s, [T, 2] (left, right)
  noise = rng.normal(size=(t, 133, 2))
  u = rng.random((t, 133))

  sigma = np.empty((t, 133))
  sigma[:, _BODY] = 0.35
  sigma[:, _LEGS] = 4.0
  sigma[:, _FACE] = 0.22
  scores = np.empty((t, 133))
  scores[:, _BODY] = 0.8 + 0.15 * u[:, _BODY]
  scores[:, _LEGS] = 0.12 * u[:, _LEGS]
  scores[:, _FACE] = 0.7 + 0.25 * u[:, _FACE]
  below = clean[:, 11:13, 1] > scene.size  # hips just out of the frame
  scores[:, 11:13] = np.where(below, 0.1 + 0.3 * u[:, 11:13], scores[:, 11:13])
  # The ear on the far side of a turned head is guessed.
  yaw = scene.head_yaw.astype(np.float64)
  scores[:, 3] *= np.clip(1.0 - 2.5 * np.maximum(-yaw, 0), 0.2, 1.0)
  scores[:, 4] *= np.clip(1.0 - 2.5 * np.maximum(yaw, 0), 0.2, 1.0)

  hand_u = rng.random((t, 2, 2))
  dropped = np.zeros((t, 2), bool)
  head_r = 1.3 * scene.signer.head_ry * k
  for h, idx in enumerate(_HANDS):
    v = speed[:, h]
    sigma[:, idx] = (0.6 + 0.004 * v)[:, None]
    sigma[:, idx[_TIPS]] *= 1.5
    conf = np.clip(0.95 - 0.004 * v - 0.25 * hand_u[:, h, 0], 0.05, 1.0)
    scores[:, idx] = conf[:, None] * (0.75 + 0.25 * u[:, idx])
    # Missed: in fast motion (blur), and more often in front of the face (skin on skin).
    at_face = np.abs(clean[:, idx].mean(1) - clean[:, 0]).max(-1) < head_r
    p_drop = 0.02 + 0.15 * at_face + 0.9 / (1.0 + np.exp(-(v - DROP_SPEED) / 10.0))
    dropped[:, h] = hand_u[:, h, 1] < p_drop
  # Bursts: the hand detector loses a hand for a while (0.25-0.8 s), even when it is slow.
  fps = scene.fps
  dominant = 0 if scene.signer.left_handed else 1
  for _ in range(int(rng.poisson(0.25 * t / fps))):
    h = dominant if rng.random() < 0.6 else 1 - dominant
    start, length = int(rng.integers(t)), int(rng.uniform(0.25, 0.8) * fps)
    dropped[start:start + length, h] = True
  # Fingers regress toward a generic hand: a low-resolution hand looks like an average one, a
  # systematic error (per clip and hand, worse in motion) that averaging over frames cannot undo.
  collapse = rng.uniform(0.25, 0.6, 2)
  hand_pts = []
  for h, idx in enumerate(_HANDS):
    pts = clean[:, idx]
    centre = pts[:, [5, 9, 13, 17]].mean(1, keepdims=True)
    beta = np.clip(collapse[h] + 0.003 * speed[:, h], 0.0, 0.85)[:, None, None]
    fingers = np.ones(21, bool)
    fingers[[0, 1, 5, 9, 13, 17]] = False
    hand_pts.append(np.where(fingers[None, :, None], pts + beta * (centre - pts), pts))
  # Hands over the face hide the landmarks under them.
  # (Only hand points near the head are checked against the landmarks.)
  hands = np.concatenate([clean[:, idx] for idx in _HANDS], 1)
  ti, hi = np.nonzero(np.abs(hands - clean[:, None, 0]).max(-1) < head_r)
  d = clean[ti][:, _FACE] - hands[ti, hi][:, None]
  near = np.zeros((t, 68), bool)
  np.logical_or.at(near, ti, (d * d).sum(-1) < (1.5 * k) ** 2)
  scores[:, _FACE] = np.where(near, 0.3 * scores[:, _FACE], scores[:, _FACE])
  sigma[:, _FACE] = np.where(near, 3 * sigma[:, _FACE], sigma[:, _FACE])

  kp = clean.copy()
  for h, idx in enumerate(_HANDS):
    kp[:, idx] = hand_pts[h]
  kp += noise * (sigma * q * k)[..., None]
  for h, idx in enumerate(_HANDS):
    kp[:, idx] = np.where(dropped[:, h, None, None], 0.0, kp[:, idx])
    scores[:, idx] = np.where(dropped[:, h, None], 0.0, scores[:, idx])
    wrist = 9 + h  # the body's wrist is still found, with less confidence
    scores[:, wrist] = np.where(dropped[:, h], 0.5 * scores[:, wrist], scores[:, wrist])

  # Left/right confusions: short swaps, most likely when the hands are close.
  n_swaps = int(rng.choice(3, p=(0.7, 0.2, 0.1)))
  gap = np.linalg.norm(clean[:, 91] - clean[:, 112], axis=-1) / k
  weight = np.exp(-gap / 6.0) + 1e-3
  starts = rng.choice(t, size=n_swaps, p=weight / weight.sum())
  lengths = rng.integers(1, 4, size=n_swaps)
  left, right = _HANDS
  for s, n in zip(starts, lengths):
    sl = slice(s, min(s + n, t))
    kp[sl, left], kp[sl, right] = kp[sl, right].copy(), kp[sl, left].copy()
    scores[sl, left], scores[sl, right] = scores[sl, right].copy(), scores[sl, left].copy()
  return quantize(kp, scores)


def hand_drop_rate(scores: np.ndarray) -> float:
  """Fraction of (frame, hand) pairs whose hand was not detected at all."""
  hands = np.stack([scores[:, idx].max(1) for idx in _HANDS], 1)
  return float((hands == 0).mean())
