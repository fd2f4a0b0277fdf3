"""SynthSign signers: body proportions, speed, place in the frame, handedness, colours, background.

Signers are numbered 0..NUM_SIGNERS-1 and split by number: dev and test signers never appear in
train. Some signers are left-handed (their dominant hand is the left one; the scene mirrors their
signing). A signer is a pure function of (seed, signer id).

Lengths are in design pixels of a 64x64 frame; the scene scales them to the rendered size.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools

import numpy as np

NUM_SIGNERS = 16
SPLIT_SIGNERS = {
    'train': tuple(range(10)),
    'dev': (10, 11, 12),
    'test': (13, 14, 15),
}
LEFT_HANDED = (4, 7, 12, 15)  # two in train, one each in dev and test

_SKIN = ((241, 194, 170), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172),
         (120, 72, 40), (233, 180, 150))
_HAIR = ((25, 20, 20), (70, 45, 25), (120, 80, 40), (200, 170, 110), (150, 150, 150),
         (140, 60, 30))


@dataclasses.dataclass(frozen=True)
class Signer:
  """One signer's body, motion style and appearance.

  Attributes:
    id: signer number.
    left_handed: the dominant hand is the left one.
    cx, shoulder_y: body midline and shoulder height (design px).
    shoulder_half, hip_half: half widths of shoulders and hips.
    neck: shoulder line to the chin; head_rx, head_ry: head ellipse radii.
    upper_arm, forearm, hand: segment lengths (hand: wrist to middle fingertip).
    speed: signing speed factor (durations are divided by it).
    amplitude: size of movements.
    expressiveness: strength of non-manual marks (brows, head shake).
    pose_noise: how hard this signer's videos are for the pose estimator (lighting, clothing).
    skin, hand_skin, shirt, hair, lips: RGB colours; long_hair, short_sleeves: style.
    background: top and bottom RGB colours of the background gradient; bg_boxes: rectangles
      (x0, y0, x1, y1 as fractions of the frame, then R, G, B) drawn on it.
  """

  id: int
  left_handed: bool
  cx: float
  shoulder_y: float
  shoulder_half: float
  hip_half: float
  neck: float
  head_rx: float
  head_ry: float
  upper_arm: float
  forearm: float
  hand: float
  speed: float
  amplitude: float
  expressiveness: float
  pose_noise: float
  skin: tuple[int, int, int]
  hand_skin: tuple[int, int, int]
  shirt: tuple[int, int, int]
  hair: tuple[int, int, int]
  lips: tuple[int, int, int]
  long_hair: bool
  short_sleeves: bool
  background: tuple[tuple[int, int, int], tuple[int, int, int]]
  bg_boxes: tuple[tuple[float, ...], ...]


def _rgb(h, s, v):
  return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _far(a, b, d):
  return np.linalg.norm(np.subtract(a, b, dtype=np.float64)) >= d


@functools.lru_cache(maxsize=256)
def make_signer(seed: int, signer_id: int) -> Signer:
  """The signer `signer_id` of the dataset with this seed."""
  if not 0 <= signer_id < NUM_SIGNERS:
    raise ValueError(f'signer_id must be in [0, {NUM_SIGNERS}), got {signer_id}.')
  rng = np.random.default_rng([seed, 0x5167, signer_id])

  def u(lo, hi):
    return float(rng.uniform(lo, hi))

  s = u(0.9, 1.08)  # overall size in the frame
  skin = np.array(_SKIN[int(rng.integers(len(_SKIN)))]) + rng.integers(-10, 11, 3)
  skin = tuple(int(c) for c in np.clip(skin, 0, 255))
  hand_skin = tuple(int(c) for c in np.clip(np.array(skin) * 1.06 + 6, 0, 255))
  while True:
    shirt = _rgb(u(0, 1), u(0.35, 0.9), u(0.3, 0.85))
    if _far(shirt, skin, 90):
      break
  while True:
    h = u(0, 1)
    top, bottom = _rgb(h, u(0.05, 0.35), u(0.35, 0.95)), _rgb(h + u(-0.1, 0.1), u(0.05, 0.4),
                                                              u(0.3, 0.9))
    if all(_far(c, x, 80) for c in (top, bottom) for x in (skin, shirt)):
      break
  boxes = []
  for _ in range(int(rng.integers(1, 4))):
    x0, y0 = u(0, 0.9), u(0, 0.7)
    shade = np.clip(np.array(top) * u(0.75, 1.2), 0, 255)
    boxes.append((x0, y0, x0 + u(0.08, 0.35), y0 + u(0.1, 0.4)) + tuple(float(c) for c in shade))
  return Signer(
      id=signer_id,
      left_handed=signer_id in LEFT_HANDED,
      cx=32.0 + u(-4, 4),
      shoulder_y=31.0 + u(-2, 2.5),
      shoulder_half=10.5 * s * u(0.9, 1.1),
      hip_half=8.0 * s * u(0.9, 1.1),
      neck=3.5 * s * u(0.85, 1.2),
      head_rx=6.0 * s * u(0.92, 1.08),
      head_ry=7.2 * s * u(0.92, 1.08),
      upper_arm=12.5 * s * u(0.94, 1.06),
      forearm=11.0 * s * u(0.94, 1.06),
      hand=9.5 * s * u(0.94, 1.06),
      speed=u(0.8, 1.25),
      amplitude=u(0.85, 1.2),
      expressiveness=u(0.8, 1.2),
      pose_noise=u(0.8, 1.3),
      skin=skin,
      hand_skin=hand_skin,
      shirt=shirt,
      hair=_HAIR[int(rng.integers(len(_HAIR)))],
      lips=tuple(int(c) for c in np.clip(np.array(skin) * np.array([0.75, 0.45, 0.45]), 0, 255)),
      long_hair=bool(rng.random() < 0.4),
      short_sleeves=bool(rng.random() < 0.3),
      background=(top, bottom),
      bg_boxes=tuple(boxes),
  )


def signers_of(split: str) -> tuple[int, ...]:
  """Signer ids of a split."""
  if split not in SPLIT_SIGNERS:
    raise ValueError(f'Unknown split {split!r}; known: {tuple(SPLIT_SIGNERS)}.')
  return SPLIT_SIGNERS[split]
