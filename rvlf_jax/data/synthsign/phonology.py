"""Manual sign forms: handshapes, orientations, locations, movements, and one form per gloss.

A `SignForm` is (handshape, orientation, location, movement, hands), the parameters of sign
phonology. Forms are fixed (not drawn from the dataset seed). Some groups are designed, as in real
sign languages: numbers ONE..FIVE differ only in handshape, SIX..NINE repeat them with a twist,
past and future time signs differ only in the direction of movement (the time line), IX-1 (I)
and POSS-1 (my), WE and POSS-1PL (our) only in handshape. The rest are drawn in families whose
members differ in one parameter, so the lexicon has many minimal pairs (`minimal_pairs`).

Hand geometry: each handshape is a set of 21 hand points (COCO-WholeBody order: wrist; thumb CMC,
MCP, IP, tip; index, middle, ring, pinky MCP, PIP, DIP, tip) in hand-local 3D coordinates
(u: wrist to fingers, l: toward the thumb, n: out of the palm), in units of the hand length.
Fingers bend toward n. The scene module rotates and projects them.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from rvlf_jax.data.synthsign import lexicon

# ---------------------------------------------------------------------------------- handshapes

# Finger flexions (MCP, PIP, DIP) in radians, by finger state.
_FLEX = {
    'E': (0.0, 0.0, 0.0),      # extended
    'B': (1.5, 0.05, 0.05),    # bent at the knuckle only
    'C': (0.45, 0.7, 0.45),    # curved
    'O': (0.8, 0.95, 0.6),     # curved until the tip meets the thumb
    'H': (0.05, 1.5, 1.2),     # hooked
    'F': (1.5, 1.7, 1.1),      # in the fist
}
# Finger spreads (toward the thumb) for index, middle, ring, pinky.
_SPREAD = {'together': (0.06, 0.0, -0.06, -0.12), 'spread': (0.32, 0.06, -0.2, -0.45)}
# MCP positions (u, l) and segment lengths of index, middle, ring, pinky.
_MCP = ((0.44, 0.13), (0.45, 0.04), (0.43, -0.05), (0.40, -0.13))
_SEG = ((0.24, 0.15, 0.11), (0.26, 0.17, 0.12), (0.24, 0.16, 0.11), (0.19, 0.12, 0.10))
_THUMB_BASE = np.array([0.1, 0.12, 0.0])
_THUMB_SEG = (0.2, 0.15, 0.13)
# Thumb segment directions (u, l, n) by state; 'touch' is computed (tip on the index tip).
_THUMB = {
    'out': ((0.55, 0.85, 0.0),) * 3,
    'side': ((0.9, 0.35, 0.1), (0.95, 0.2, 0.15), (0.95, 0.1, 0.2)),
    'tuck': ((0.5, 0.45, 0.6), (0.25, -0.65, 0.7), (0.05, -0.9, 0.4)),
    'opp': ((0.5, 0.55, 0.6), (0.6, 0.15, 0.75), (0.7, -0.1, 0.7)),
}

# name: (finger states index..pinky, spread, thumb)
HANDSHAPES = {
    'B': ('EEEE', 'together', 'tuck'),
    '5': ('EEEE', 'spread', 'out'),
    'A': ('FFFF', 'together', 'side'),
    'S': ('FFFF', 'together', 'tuck'),
    '1': ('EFFF', 'together', 'tuck'),
    'V': ('EEFF', 'spread', 'tuck'),
    '3': ('EEFF', 'spread', 'out'),
    'W': ('EEEF', 'spread', 'tuck'),
    '4': ('EEEE', 'spread', 'tuck'),
    'Y': ('FFFE', 'together', 'out'),
    'L': ('EFFF', 'together', 'out'),
    'I': ('FFFE', 'together', 'tuck'),
    'C': ('CCCC', 'together', 'opp'),
    'O': ('OOOO', 'together', 'touch'),
    'X': ('HFFF', 'together', 'tuck'),
    'F': ('OEEE', 'spread', 'touch'),
    'bB': ('BBBB', 'together', 'side'),
    'claw': ('HHHH', 'spread', 'opp'),
}
# Not phonological: the relaxed hand at rest, between signs.
REST_SHAPE = ('CCCC', 'together', 'side')


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def hand_points(fingers: str, spread: str, thumb: str) -> np.ndarray:
  """Hand-local 3D points of a handshape: float64[21, 3] in (u, l, n), wrist at the origin."""
  pts = np.zeros((21, 3))
  for f in range(4):
    mcp = np.array([_MCP[f][0], _MCP[f][1], 0.0])
    a = _SPREAD[spread][f]
    d0 = np.array([np.cos(a), np.sin(a), 0.0])
    n = np.array([0.0, 0.0, 1.0])
    pts[5 + 4 * f] = mcp
    angle, p = 0.0, mcp
    for j, (flex, length) in enumerate(zip(_FLEX[fingers[f]], _SEG[f])):
      angle += flex
      p = p + length * (np.cos(angle) * d0 + np.sin(angle) * n)
      pts[6 + 4 * f + j] = p
  pts[1] = _THUMB_BASE
  if thumb == 'touch':
    tip = pts[8] + np.array([0.0, 0.02, 0.02])
    chord = tip - _THUMB_BASE
    bulge = np.array([0.0, 0.12, 0.08])
    for j, s in enumerate((0.4, 0.72, 1.0), start=2):
      pts[j] = _THUMB_BASE + s * chord + np.sin(np.pi * s) * bulge
  else:
    p = _THUMB_BASE
    for j, (d, length) in enumerate(zip(_THUMB[thumb], _THUMB_SEG), start=2):
      p = p + length * _unit(d)
      pts[j] = p
  return pts


SHAPE_NAMES: tuple[str, ...] = tuple(HANDSHAPES)
SHAPE_POINTS = np.stack([hand_points(*HANDSHAPES[k]) for k in SHAPE_NAMES] +
                        [hand_points(*REST_SHAPE)])  # float64[num shapes + 1, 21, 3]
REST = len(SHAPE_NAMES)  # index of the rest shape in SHAPE_POINTS
# Shapes that can open/close (from a fist) or wiggle (several extended fingers).
_OPENABLE = ('5', 'B', 'C', 'V', 'L', 'Y', '4', 'W', '3')
_WIGGLABLE = ('5', '4', 'W', 'V', 'B', 'claw', '3')

# ------------------------------------------------------------------ orientations and locations

# name: (theta, psi) in degrees. theta turns the fingers from up toward the contralateral side in
# the image plane; psi rolls the hand about the fingers (0 palm to the camera, 90 palm to the
# contralateral side or down, 180 palm to the signer, -90 palm up when the fingers point contra).
ORIENTATIONS = {
    'up_front': (0.0, 0.0),
    'up_back': (0.0, 180.0),
    'up_side': (0.0, 90.0),
    'diag_front': (45.0, 0.0),
    'diag_side': (45.0, 90.0),
    'contra_down': (90.0, 90.0),
    'contra_up': (90.0, -90.0),
    'contra_back': (90.0, 180.0),
}

# name: (reference, x, y, amplitude). The contact point (middle-finger knuckle) goes to the
# reference ('head': centre, in head radii; 'body': shoulder midpoint, in shoulder half-widths)
# plus (x, y); x grows toward the signing hand's side. Amplitude scales movements (small at face).
LOCATIONS = {
    'forehead': ('head', 0.35, -0.6, 0.6),
    'temple': ('head', 1.0, -0.4, 0.6),
    'nose': ('head', 0.15, 0.1, 0.5),
    'mouth': ('head', 0.1, 0.55, 0.5),
    'chin': ('head', 0.05, 1.0, 0.6),
    'cheek': ('head', 0.85, 0.35, 0.6),
    'ear': ('head', 1.25, 0.0, 0.6),
    'chest': ('body', 0.15, 0.6, 1.0),
    'shoulder': ('body', -0.75, 0.25, 0.8),
    'stomach': ('body', 0.15, 1.55, 1.0),
    'neutral': ('body', 0.4, 1.15, 1.2),
    'side': ('body', 1.35, 0.8, 1.0),
    'nondom': ('base', 0.0, 0.0, 0.8),  # on the non-dominant hand (hands 'base_*')
}
_SYM_LOCATIONS = ('neutral', 'chest', 'stomach', 'side', 'temple', 'cheek')

# ------------------------------------------------------------------------------- movements

# Movements and their base durations (seconds, before signer speed and context).
MOVEMENTS = {
    'static': 0.42, 'up': 0.5, 'down': 0.5, 'contra': 0.5, 'ipsi': 0.5, 'arc_contra': 0.55,
    'arc_up': 0.55, 'circle_cw': 0.65, 'circle_ccw': 0.65, 'tap': 0.55, 'brush': 0.55,
    'shake': 0.55, 'wiggle': 0.6, 'open': 0.5, 'close': 0.5, 'twist': 0.5, 'zigzag': 0.6,
}
_CYCLIC = ('circle_cw', 'circle_ccw', 'tap', 'brush', 'shake', 'wiggle')
HANDS = ('one', 'sym', 'alt', 'base_B', 'base_S')


@dataclasses.dataclass(frozen=True)
class SignForm:
  """The manual form of a sign (see the module docstring)."""

  shape: str
  orient: str
  loc: str
  move: str
  hands: str = 'one'

  def valid(self) -> bool:
    """Whether the combination is articulable under SynthSign's rules."""
    base = self.hands.startswith('base_')
    if base != (self.loc == 'nondom'):
      return False
    if self.hands in ('sym', 'alt') and self.loc not in _SYM_LOCATIONS:
      return False
    if self.hands == 'alt' and self.move not in _CYCLIC:
      return False
    if self.move in ('open', 'close') and self.shape not in _OPENABLE:
      return False
    if self.move == 'wiggle' and self.shape not in _WIGGLABLE:
      return False
    return True

  def differs_in(self, other: SignForm) -> list[str]:
    """Names of the parameters in which two forms differ."""
    return [f.name for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)]


def _designed() -> dict[str, SignForm]:
  """Forms with structure, as real sign languages have it."""
  f = SignForm
  forms = {
      # Pronouns and possessives: minimal pairs in handshape (index finger vs flat hand).
      'IX-1': f('1', 'contra_back', 'chest', 'tap'),
      'POSS-1': f('B', 'contra_back', 'chest', 'tap'),
      'IX-2': f('1', 'diag_front', 'neutral', 'static'),
      'POSS-2': f('B', 'up_front', 'neutral', 'brush'),
      'WE': f('1', 'contra_back', 'chest', 'arc_contra'),
      'POSS-1PL': f('B', 'contra_back', 'chest', 'arc_contra'),
      'THEY': f('1', 'diag_front', 'side', 'arc_contra'),
      'WHAT': f('5', 'contra_up', 'neutral', 'shake', 'sym'),
      'WHERE': f('1', 'up_front', 'neutral', 'shake'),
      'WHO': f('X', 'up_side', 'chin', 'circle_cw'),
      'HOW-MANY': f('5', 'contra_up', 'neutral', 'open', 'sym'),
      'TEN': f('A', 'up_side', 'neutral', 'shake'),
      'MANY': f('5', 'up_back', 'neutral', 'open', 'sym'),
      # The time line: past behind (toward the signing side), future ahead (contralateral).
      'YESTERDAY': f('Y', 'up_side', 'cheek', 'ipsi'),
      'TOMORROW': f('Y', 'up_side', 'cheek', 'contra'),
      'LAST-WEEK': f('1', 'contra_down', 'nondom', 'ipsi', 'base_B'),
      'NEXT-WEEK': f('1', 'contra_down', 'nondom', 'contra', 'base_B'),
      'LAST-MONTH': f('1', 'up_side', 'nondom', 'ipsi', 'base_S'),
      'NEXT-MONTH': f('1', 'up_side', 'nondom', 'contra', 'base_S'),
      'LAST-YEAR': f('S', 'contra_down', 'nondom', 'ipsi', 'base_S'),
      'NEXT-YEAR': f('S', 'contra_down', 'nondom', 'contra', 'base_S'),
      'TODAY': f('Y', 'up_back', 'neutral', 'down', 'sym'),
      'NOW': f('Y', 'contra_up', 'neutral', 'down', 'sym'),
  }
  for name, shape in zip(('ONE', 'TWO', 'THREE', 'FOUR', 'FIVE'), ('1', 'V', '3', '4', '5')):
    forms[name] = f(shape, 'up_back', 'neutral', 'static')
  for name, shape in zip(('SIX', 'SEVEN', 'EIGHT', 'NINE'), ('1', 'V', '3', '4')):
    forms[name] = f(shape, 'up_back', 'neutral', 'twist')
  return forms


_FORM_SEED = 20240917  # the lexicon's forms never change with the dataset seed


def _random_form(rng) -> SignForm:
  while True:
    hands = str(rng.choice(HANDS, p=(0.55, 0.2, 0.07, 0.1, 0.08)))
    loc = 'nondom' if hands.startswith('base_') else str(rng.choice(
        [loc for loc in LOCATIONS if loc != 'nondom']))
    form = SignForm(str(rng.choice(SHAPE_NAMES)), str(rng.choice(list(ORIENTATIONS))), loc,
                    str(rng.choice(list(MOVEMENTS))), hands)
    if form.valid():
      return form


def _mutate(rng, form: SignForm) -> SignForm:
  """A valid form that differs from `form` in exactly one parameter."""
  choices = {'shape': SHAPE_NAMES, 'orient': tuple(ORIENTATIONS), 'move': tuple(MOVEMENTS),
             'loc': tuple(loc for loc in LOCATIONS if loc != 'nondom')}
  for _ in range(100):
    field = str(rng.choice(list(choices)))
    new = dataclasses.replace(form, **{field: str(rng.choice(choices[field]))})
    if new != form and new.valid():
      return new
  return _random_form(rng)


def assign_forms() -> dict[str, SignForm]:
  """One distinct form per gloss: designed groups, then families of minimal pairs."""
  forms = _designed()
  used = set(forms.values())
  assert len(used) == len(forms), 'designed forms collide'
  rng = np.random.default_rng(_FORM_SEED)
  family: list[SignForm] = []
  for gloss in lexicon.GLOSSES:
    if gloss.name in forms:
      continue
    while True:
      # Half of the glosses join the current family (one parameter away from one of its members).
      if family and rng.random() < 0.5 and len(family) < 4:
        form = _mutate(rng, family[int(rng.integers(len(family)))])
      else:
        family = []
        form = _random_form(rng)
      if form not in used:
        break
    family.append(form)
    used.add(form)
    forms[gloss.name] = form
  return {g.name: forms[g.name] for g in lexicon.GLOSSES}


FORMS: dict[str, SignForm] = assign_forms()


def minimal_pairs(forms: dict[str, SignForm] | None = None) -> list[tuple[str, str, str]]:
  """(gloss, gloss, parameter) for every pair of forms that differ in exactly one parameter."""
  forms = FORMS if forms is None else forms
  out = []
  for (a, fa), (b, fb) in itertools.combinations(forms.items(), 2):
    diff = fa.differs_in(fb)
    if len(diff) == 1:
      out.append((a, b, diff[0]))
  return out
