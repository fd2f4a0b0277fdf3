"""Renders a SynthSign scene to RGB frames with vectorised numpy, all frames of a clip at once.

Every body part is a signed distance field (capsules, ellipses, convex polygons; negative inside)
evaluated on a small window around the part in every frame at once, then painted with hard edges
in back-to-front order: background, hair, torso, neck, head, face (eyes, brows, nose, lips), the
non-dominant arm and hand, the dominant arm and hand. Hands have a dark outline so that fingers
stay visible in front of the face. Per-clip lighting and a little sensor noise finish the frames.

Hard edges are deliberate: at 64x64 they quantise positions to whole pixels, so fine location and
movement are better read from the skeleton, while the finger configuration (which the pose
simulation often drops or blurs) is drawn exactly.
"""

from __future__ import annotations

import functools

import numpy as np

from rvlf_jax.data.synthsign.scene import Scene
from rvlf_jax.data.synthsign.signers import Signer

# Hand segments (COCO-WholeBody hand order): palm, then thumb and fingers.
_PALM = np.array([[0, 5], [0, 9], [0, 13], [0, 17], [1, 5], [5, 17], [2, 5]])
_FINGERS = np.array([[1, 2], [2, 3], [3, 4]] + [[b + j, b + j + 1] for b in (5, 9, 13, 17)
                                                for j in range(3)])


class _Canvas:
  """Frames uint8[T, H, W, 3] and a painter of distance fields on per-frame windows."""

  def __init__(self, frames: np.ndarray):
    self.frames = frames
    self.t, self.h, self.w = frames.shape[:3]
    self.tt = np.arange(self.t)

  def paint(self, center, half: int, sdf_fn, layers):
    """Paints `layers` [(threshold, rgb)] in order where sdf_fn(X, Y) <= threshold.

    Args:
      center: float[T, 2] window centres; half: window half-size in pixels.
      sdf_fn: maps pixel-centre coordinates X float[T, 1, S], Y float[T, S, 1] to float[T, S, S].
    """
    size = 2 * half + 1
    ox = np.floor(center[:, 0]).astype(np.int64) - half
    oy = np.floor(center[:, 1]).astype(np.int64) - half
    xs = ox[:, None] + np.arange(size)
    ys = oy[:, None] + np.arange(size)
    x, y = (xs + 0.5).astype(np.float32), (ys + 0.5).astype(np.float32)
    sdf = sdf_fn(x[:, None, :], y[:, :, None])
    inside = ((xs >= 0) & (xs < self.w))[:, None, :] & ((ys >= 0) & (ys < self.h))[:, :, None]
    for threshold, color in layers:
      t, iy, ix = np.nonzero((sdf <= threshold) & inside)
      self.frames[t, ys[t, iy], xs[t, ix]] = color

  def paint_capsules(self, p0, p1, radius, layers):
    """Paints a union of capsules p0 -> p1 (float[T, K, 2], radius float[K]) like `paint`."""
    field = self.capsule_field(p0, p1, radius, max(t for t, _ in layers))
    for threshold, color in layers:
      self.fill(field, threshold, color)

  def capsule_field(self, p0, p1, radius, pad: float):
    """Distances to capsules, each on its own small window (much less work than one window around
    all of them): (xs int[T, K, S], ys int[T, K, S], sdf float[T, K, S, S]) for `fill`."""
    radius = np.asarray(radius, np.float32)
    reach = 0.5 * np.linalg.norm(p1 - p0, axis=-1).max() + radius.max() + pad
    half = int(np.ceil(reach)) + 1
    size = 2 * half + 1
    mid = 0.5 * (p0 + p1)
    xs = np.floor(mid[..., 0]).astype(np.int64)[..., None] - half + np.arange(size)
    ys = np.floor(mid[..., 1]).astype(np.int64)[..., None] - half + np.arange(size)
    ax, ay = p0[..., 0, None, None], p0[..., 1, None, None]
    bx, by = p1[..., 0, None, None] - ax, p1[..., 1, None, None] - ay
    px = (xs + 0.5).astype(np.float32)[:, :, None, :] - ax
    py = (ys + 0.5).astype(np.float32)[:, :, :, None] - ay
    t = np.clip((px * bx + py * by) / np.maximum(bx * bx + by * by, 1e-6), 0.0, 1.0)
    dx, dy = px - t * bx, py - t * by
    sdf = np.sqrt(dx * dx + dy * dy) - radius[None, :, None, None]
    # Pixels outside the frame never pass the threshold.
    in_x, in_y = (xs >= 0) & (xs < self.w), (ys >= 0) & (ys < self.h)
    sdf[~(in_x[:, :, None, :] & in_y[:, :, :, None])] = np.inf
    return xs, ys, sdf

  def fill(self, field, threshold: float, color):
    xs, ys, sdf = field
    t, k, iy, ix = np.nonzero(sdf <= threshold)
    self.frames[t, ys[t, k, iy], xs[t, k, ix]] = color


def _ellipse(center, rx, ry):
  """Approximate distance field of ellipses centred at center float[T, 2]."""
  cx, cy = center[:, 0, None, None], center[:, 1, None, None]
  m = min(rx, ry)

  def fn(x, y):
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * m

  return fn


def _polygon(verts):
  """Distance-like field of convex polygons verts float[T, V, 2] (either winding)."""
  a, b = verts, np.roll(verts, -1, axis=1)
  e = b - a
  area = (a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]).sum(1)
  sign = np.where(area > 0, 1.0, -1.0)[:, None]  # outward normals for either winding
  norm = np.maximum(np.linalg.norm(e, axis=-1), 1e-6)
  nx = (sign * e[..., 1] / norm)[..., None, None]
  ny = (-sign * e[..., 0] / norm)[..., None, None]
  ax, ay = a[..., 0][..., None, None], a[..., 1][..., None, None]

  def fn(x, y):
    return ((x[:, None] - ax) * nx + (y[:, None] - ay) * ny).max(1)

  return fn


def _half(r: float) -> int:
  """Window half-size that covers a radius r."""
  return int(np.ceil(r)) + 2


def _seg(pts, pairs):
  """Segment end points (p0, p1) float[T, K, 2] of keypoint pairs."""
  return pts[:, [a for a, _ in pairs]], pts[:, [b for _, b in pairs]]


def _shade(rgb, f):
  return np.clip(np.asarray(rgb, np.float32) * f, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def background(signer: Signer, size: int) -> np.ndarray:
  """The signer's background, uint8[size, size, 3]: a vertical gradient and a few boxes."""
  top, bottom = (np.asarray(c, np.float32) for c in signer.background)
  w = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
  img = np.broadcast_to(top + w * (bottom - top), (size, size, 3)).copy()
  for x0, y0, x1, y1, *rgb in signer.bg_boxes:
    img[int(y0 * size):int(y1 * size), int(x0 * size):int(x1 * size)] = rgb
  return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """Frames of a scene: uint8[T, size, size, 3]. rng draws lighting and noise only."""
  s, k, kp = scene.signer, scene.scale, scene.keypoints.astype(np.float32)
  t = len(kp)
  canvas = _Canvas(np.repeat(background(s, scene.size)[None], t, axis=0))
  skin, hair, shirt = s.skin, s.hair, s.shirt
  head, rx, ry = scene.head_center, s.head_rx * k, s.head_ry * k
  yaw = scene.head_yaw[:, None]

  if s.long_hair:
    c = head + np.array([0.0, 0.55 * ry], np.float32)
    canvas.paint(c, _half(1.6 * ry), _ellipse(c, 1.3 * rx, 1.55 * ry), [(0.0, hair)])
  # Torso: the quad between shoulders and hips, with rounded shoulders, and the neck.
  sh, hips = kp[:, [6, 5]], kp[:, [11, 12]]
  mid = 0.5 * (sh.mean(1) + hips.mean(1))
  torso = np.concatenate([sh + np.array([[-1.0, 0.0], [1.0, 0.0]], np.float32) * k, hips], 1)
  canvas.paint(mid, _half(float(np.abs(torso - mid[:, None]).max())), _polygon(torso),
               [(0.0, shirt)])
  canvas.paint_capsules(sh[:, :1], sh[:, 1:], [2.2 * k], [(0.0, shirt)])
  canvas.paint_capsules(sh.mean(1)[:, None], head[:, None], [0.38 * rx],
                        [(0.0, _shade(skin, 0.85))])
  # Head: a hair ellipse above, then the face; the face slides a little with the head turn.
  hc = head + np.concatenate([-0.25 * rx * yaw, np.full_like(yaw, -0.2 * ry)], 1)
  canvas.paint(hc, _half(1.2 * ry), _ellipse(hc, 1.08 * rx, ry), [(0.0, hair)])
  fc = head + np.concatenate([0.12 * rx * yaw, np.zeros_like(yaw)], 1)
  canvas.paint(fc, _half(ry), _ellipse(fc, rx, ry), [(0.0, skin)])
  face = kp[:, 23:91]
  canvas.paint_capsules(*_seg(face, [(27, 30)]), [0.35 * k], [(0.0, _shade(skin, 0.8))])
  lips = [(48, 50), (50, 52), (52, 54), (54, 56), (56, 58), (58, 48)]
  canvas.paint_capsules(*_seg(face, lips), [0.45 * k] * 6, [(0.0, s.lips)])
  canvas.paint_capsules(*_seg(face, [(62, 66)]), [0.2 * k], [(0.0, (60, 20, 25))])
  # Eyes: thinner as the lids close; brows: thick dark strokes that carry raise and furrow.
  for a, b, top, bottom in ((36, 39, 37, 41), (42, 45, 43, 47)):
    gap = np.linalg.norm(face[:, top] - face[:, bottom], axis=-1).mean()
    r = float(np.clip(0.35 * gap + 0.2 * k, 0.3 * k, 0.7 * k))
    canvas.paint_capsules(*_seg(face, [(a, b)]), [r], [(0.0, (25, 25, 35))])
  brows = [(17, 19), (19, 21), (22, 24), (24, 26)]
  canvas.paint_capsules(*_seg(face, brows), [0.55 * k] * 4, [(0.0, _shade(hair, 0.6))])

  # Arms and hands, the non-dominant one first (behind).
  left, right = (5, 7, 9, slice(91, 112)), (6, 8, 10, slice(112, 133))
  sleeve = _shade(shirt, 0.72)
  fore = _shade(skin, 0.95) if s.short_sleeves else sleeve
  hand_len, outline = s.hand * k, 0.55 * k
  palm_r = np.full(len(_PALM), max(0.1 * hand_len, 0.5 * k))
  finger_r = np.full(len(_FINGERS), max(0.055 * hand_len, 0.5 * k))
  for shoulder, elbow, wrist, hand in ((right, left) if s.left_handed else (left, right)):
    canvas.paint_capsules(*_seg(kp, [(shoulder, elbow)]), [1.9 * k], [(0.0, sleeve)])
    canvas.paint_capsules(*_seg(kp, [(elbow, wrist)]), [1.5 * k], [(0.0, fore)])
    # Palm and fingers get windows of their own sizes; outlines first, so that they never cover
    # the inside of another part of the hand.
    pts = kp[:, hand]
    parts = [canvas.capsule_field(pts[:, p[:, 0]], pts[:, p[:, 1]], r, outline)
             for p, r in ((_PALM, palm_r), (_FINGERS, finger_r))]
    for threshold, color in ((outline, _shade(s.hand_skin, 0.5)), (0.0, s.hand_skin)):
      for field in parts:
        canvas.fill(field, threshold, color)
  # Lighting and sensor noise: a per-clip gain and colour cast, noise from a small cycled tile.
  gain = (rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
  tile = rng.integers(-5, 6, size=(3, scene.size, scene.size, 3), dtype=np.int16)
  out = (canvas.frames * gain).astype(np.int16) + tile[np.arange(t) % 3]
  return np.clip(out, 0, 255).astype(np.uint8)
