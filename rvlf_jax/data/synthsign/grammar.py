"""SynthSign's two grammars: meanings, their sign order with non-manual marks, and English.

A `Meaning` is drawn from slots (time, subject, verb, object, place, ...). The sign side orders it
topic-first, time-subject-object-verb: `YESTERDAY POSS-1 MOTHER APPLE RED TWO EAT`; modifiers follow
their noun; a wh-sign comes last. Negation and yes/no questions have no sign: they are non-manual
marks over spans of glosses (a head shake over the predicate, raised brows over the clause); a
wh-question has furrowed brows, a topicalised object raised brows over the topic only.

The English side has its own order, function words, tense from the time sign, agreement with the
subject and numbers, do-support, contractions and 2-3 paraphrases per meaning (time first or last,
synonyms, prepositions, contractions): "My mother ate two red apples yesterday." / "Yesterday, my
mom ate two red apples."

Splits hold out compositions: `composition_key` (the gloss sequence in canonical order, without
non-manual marks) hashes with the seed into train, dev or test, so no dev/test gloss sequence (nor
its negation, question or topicalised form) ever occurs in train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import numpy as np

from rvlf_jax.data.synthsign import lexicon
from rvlf_jax.data.synthsign.lexicon import BY_NAME

MIN_GLOSSES, MAX_GLOSSES = 3, 9
# Fractions of the composition space per split (by hash of the composition).
SPLIT_FRACTIONS = {'train': 0.8, 'dev': 0.1, 'test': 0.1}
FRAMES = ('action', 'motion', 'intrans', 'state', 'weather')
_FRAME_P = (0.5, 0.14, 0.14, 0.13, 0.09)
_STYPE_P = {'stmt': 0.5, 'neg': 0.2, 'yn': 0.15, 'wh': 0.15}
# Paraphrase count and the chance that the reference is paraphrase 0, 1 or 2: translators differ.
REFERENCE_P = (0.7, 0.2, 0.1)


@dataclasses.dataclass(frozen=True)
class NP:
  """A noun phrase: head gloss (pronoun, person or noun) and optional modifiers (glosses)."""

  head: str
  poss: str | None = None
  adj: str | None = None
  num: str | None = None


@dataclasses.dataclass(frozen=True)
class Meaning:
  """What a sentence says; the sign and English sides are both functions of it.

  Attributes:
    frame: 'action' (transitive), 'motion' (to a place), 'intrans', 'state' (person is ADJ) or
      'weather'.
    stype: 'stmt', 'neg', 'yn' (yes/no question) or 'wh'.
    time: time gloss or None; daypart: daypart gloss or None (at least one is set).
    subj, obj: noun phrases (None where the frame has none).
    verb: verb gloss; place: place gloss; pred: state adjective or weather gloss.
    wh: WHAT, WHERE, WHO or HOW-MANY (stype 'wh' only).
    topic: the object is topicalised (signed first, under raised brows).
  """

  frame: str
  stype: str
  time: str | None
  daypart: str | None
  subj: NP | None = None
  verb: str | None = None
  obj: NP | None = None
  place: str | None = None
  pred: str | None = None
  wh: str | None = None
  topic: bool = False


@dataclasses.dataclass(frozen=True)
class Signed:
  """The sign side: glosses and non-manual spans [start, end) over gloss indices."""

  glosses: tuple[str, ...]
  nonmanual: tuple[tuple[str, int, int], ...]  # (kind, start, end); kinds: neg, yn, wh, topic

  @property
  def marks(self) -> str:
    """The non-manual kinds, '+'-joined ('' for a plain statement)."""
    return '+'.join(k for k, _, _ in self.nonmanual)


def _choice(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _names(category: str) -> tuple[str, ...]:
  return tuple(g.name for g in lexicon.by_category(category))


_PERSON_FAMILY = tuple(g.name for g in lexicon.by_category('person') if g.family)
_PERSON_OTHER = tuple(g.name for g in lexicon.by_category('person') if not g.family)
_VERBS = {k: tuple(g.name for g in lexicon.by_category('verb') if g.kind == k)
          for k in ('trans', 'intrans', 'motion')}
_STATES = tuple(g.name for g in lexicon.by_category('adj') if g.cls == 'state')
_PLURAL_NUMBERS = tuple(n for n in _names('number') if n != 'ONE')
_OBJECT_NOUNS = lexicon.by_category('noun')
_COUNT_NOUNS = tuple(n for n in _OBJECT_NOUNS if not n.mass)


def _verbs_for(cls: str):
  # Verbs that take few nouns (READ, DRINK) are weighted up, or they would be rare.
  verbs = tuple(v for v in _VERBS['trans'] if cls in BY_NAME[v].objects)
  w = np.array([len(lexicon.nouns_of(BY_NAME[v].objects)) ** -0.7 for v in verbs])
  return verbs, w / w.sum()


_VERBS_FOR = {c: _verbs_for(c) for c in ('food', 'drink', 'read', 'thing', 'animal')}
_TRANS_PEOPLE = tuple(v for v in _VERBS['trans'] if 'person' in BY_NAME[v].objects)
_TRANS_THINGS = tuple(v for v in _VERBS['trans'] if 'person' not in BY_NAME[v].objects)
_WEATHER_PLACES = ('CITY', 'PARK', 'BEACH', 'GARDEN', 'ZOO', 'SCHOOL')


def _sample_person(rng, allow_number: bool) -> NP:
  if rng.random() < 0.55:
    poss = _choice(rng, ('POSS-1', 'POSS-1', 'POSS-2', 'POSS-1PL'))
    return NP(_choice(rng, _PERSON_FAMILY), poss=poss)
  head = _choice(rng, _PERSON_OTHER)
  r = rng.random()
  if allow_number and r < 0.3:
    return NP(head, num=_choice(rng, _PLURAL_NUMBERS))
  return NP(head, poss=_choice(rng, ('POSS-1', 'POSS-2')) if r < 0.55 else None)


def _sample_subject(rng) -> NP:
  if rng.random() < 0.3:
    return NP(_choice(rng, _names('pronoun')))
  return _sample_person(rng, allow_number=True)


def _sample_object(rng, verb: str, subj: NP | None, count_only: bool = False) -> NP:
  nouns = lexicon.nouns_of(BY_NAME[verb].objects)
  if count_only:
    nouns = tuple(n for n in nouns if n.category == 'noun' and not n.mass)
  head = _choice(rng, nouns)
  if head.category == 'person':
    np_ = _sample_person(rng, allow_number=False)
    return np_ if np_ != subj else _sample_object(rng, verb, subj, count_only)
  return _modify(rng, head, count_only)


def _modify(rng, head: lexicon.Gloss, count_only: bool = False) -> NP:
  """An object noun phrase: the noun, maybe an adjective, maybe a number."""
  adjs = lexicon.adjectives_for(head)
  adj = _choice(rng, adjs).name if adjs and rng.random() < 0.4 else None
  num = None
  if not head.mass and not count_only and rng.random() < 0.35:
    num = _choice(rng, _names('number'))
  return NP(head.name, adj=adj, num=num)


def _sample_action(rng, subj: NP, wh: str | None):
  """(verb, object) of a transitive sentence. Object nouns are drawn first, uniformly, and the verb
  among those that take them, so that every noun is about equally frequent in a small train set."""
  if wh == 'WHAT':
    return _choice(rng, _TRANS_THINGS), None
  if rng.random() < 0.2 or wh == 'WHO' and rng.random() < 0.5:
    verb = _choice(rng, _TRANS_PEOPLE)
    return verb, _sample_object(rng, verb, subj)
  nouns = _COUNT_NOUNS if wh == 'HOW-MANY' else _OBJECT_NOUNS
  head = _choice(rng, nouns)
  verbs, weights = _VERBS_FOR[head.cls]
  verb = verbs[int(rng.choice(len(verbs), p=weights))]
  return verb, _modify(rng, head, count_only=wh == 'HOW-MANY')



def sample_meaning(rng: np.random.Generator) -> Meaning:
  """Draws one meaning (not yet checked for length or split; see `sample_for_split`)."""
  frame = FRAMES[int(rng.choice(len(FRAMES), p=_FRAME_P))]
  stype = str(rng.choice(list(_STYPE_P), p=list(_STYPE_P.values())))
  r = rng.random()
  if r < 0.75:
    time, daypart = _choice(rng, _names('time')), None
  else:
    combos = [k for k in lexicon.TIME_COMBOS]
    time, daypart = _choice(rng, combos)
  m = dict(frame=frame, stype=stype, time=time, daypart=daypart)
  if frame == 'weather':
    stype = 'stmt' if stype == 'wh' else stype
    place = _choice(rng, _WEATHER_PLACES) if rng.random() < 0.5 else None
    pred = _choice(rng, _names('weather') + ('HOT', 'COLD'))
    return Meaning(**{**m, 'stype': stype}, place=place, pred=pred)
  subj = _sample_subject(rng)
  wh = None
  if frame == 'state':
    if stype == 'wh':
      wh, subj = 'WHO', None
    return Meaning(**m, subj=subj, pred=_choice(rng, _STATES), wh=wh)
  if frame == 'action':
    if stype == 'wh':
      wh = _choice(rng, ('WHAT', 'WHO', 'HOW-MANY'))
      subj = None if wh == 'WHO' else subj
    verb, obj = _sample_action(rng, subj, wh)
    topic = stype in ('stmt', 'neg') and rng.random() < 0.2
    return Meaning(**m, subj=subj, verb=verb, obj=obj, wh=wh, topic=topic)
  verb = _choice(rng, _VERBS[frame])
  if stype == 'wh':
    wh = _choice(rng, ('WHERE', 'WHO'))
    subj = None if wh == 'WHO' else subj
  place = None
  if frame == 'motion' or (frame == 'intrans' and rng.random() < 0.5):
    place = _choice(rng, _names('place'))
  if wh == 'WHERE':
    place = None
  return Meaning(**m, subj=subj, verb=verb, place=place, wh=wh)


# ------------------------------------------------------------------------------- the sign side


def _np_signs(np_: NP | None) -> list[str]:
  if np_ is None:
    return []
  return [g for g in (np_.poss, np_.head, np_.adj, np_.num) if g]


def sign(m: Meaning, topic: bool | None = None) -> Signed:
  """The gloss sequence and non-manual spans of a meaning (`topic` overrides m.topic)."""
  topic = m.topic if topic is None else topic
  time = [g for g in (m.time, m.daypart) if g]
  subj = [] if m.wh == 'WHO' else _np_signs(m.subj)
  place = [m.place] if m.place else []
  if m.frame == 'weather':
    pre, pred = time + place, [m.pred]
  elif m.frame == 'state':
    pre, pred = time + subj, [m.pred]
  elif m.frame == 'action':
    obj = _np_signs(m.obj)
    if m.wh == 'HOW-MANY':
      obj = [g for g in obj if g != m.obj.num]
    pre, pred = time + subj, obj + [m.verb]
    if topic:
      pre, pred = obj + time + subj, [m.verb]
  elif m.frame == 'motion':
    pre, pred = time + subj, place + [m.verb]
  else:  # intrans: a location is a topic, after the time
    pre, pred = time + place + subj, [m.verb]
  glosses = pre + pred + ([m.wh] if m.wh else [])
  spans = []
  if topic:
    spans.append(('topic', 0, len(_np_signs(m.obj))))
  if m.stype == 'neg':
    spans.append(('neg', len(pre), len(pre) + len(pred)))
  elif m.stype in ('yn', 'wh'):
    spans.append((m.stype, len(time) if not topic else 0, len(glosses)))
  return Signed(tuple(glosses), tuple(spans))


def composition_key(m: Meaning) -> str:
  """The held-out unit: glosses in canonical order, without non-manual marks or topicalisation."""
  return ' '.join(sign(m, topic=False).glosses)


def split_of(key: str, seed: int) -> str:
  """The split that owns a composition, from a hash of (seed, key)."""
  h = hashlib.blake2b(f'{seed}:{key}'.encode(), digest_size=8).digest()
  u = int.from_bytes(h, 'little') / 2.0**64
  edge = 0.0
  for split, fraction in SPLIT_FRACTIONS.items():
    edge += fraction
    if u < edge:
      return split
  return 'test'


def sample_for_split(rng: np.random.Generator, split: str, seed: int) -> Meaning:
  """Draws meanings until one has 3-9 glosses and belongs to `split` (about 1.3 draws for train)."""
  for _ in range(10_000):
    m = sample_meaning(rng)
    n = len(sign(m).glosses)
    if MIN_GLOSSES <= n <= MAX_GLOSSES and split_of(composition_key(m), seed) == split:
      return m
  raise RuntimeError(f'No meaning found for split {split!r}.')  # unreachable in practice


# ------------------------------------------------------------------------------ the English side


class _Chooser:
  """Picks among alternatives by key; records the axes so that variants can be enumerated."""

  def __init__(self, choices: dict[str, int] | None = None):
    self.choices = choices or {}
    self.axes: dict[str, int] = {}

  def __call__(self, key: str, options):
    self.axes[key] = len(options)
    return options[self.choices.get(key, 0) % len(options)]


_NEG_CONTRACTIONS = [(r'\b(did|does|do|is|are|was|were) not\b', r"\1n't"),
                     (r'\bwill not\b', "won't")]
_SUBJ_CONTRACTIONS = [(r'\bi am\b', "i'm"), (r'\b(you|we|they) are\b', r"\1're"),
                      (r'\b(i|you|we|they) will\b', r"\1'll")]


def _agreement(np_: NP | None) -> str:
  if np_ is None:
    return '3s'
  g = BY_NAME[np_.head]
  if g.category == 'pronoun':
    return g.person
  return '3p' if np_.num and np_.num != 'ONE' else '3s'


def _np_english(np_: NP, pick: _Chooser, role: str, polarity: str) -> str:
  g = BY_NAME[np_.head]
  if g.category == 'pronoun':
    return g.english[0]
  k = pick(f'{role}.head', range(len(g.english)))
  adj = ''
  if np_.adj:
    adj = pick(f'{role}.adj', BY_NAME[np_.adj].english) + ' '
  if np_.num:
    if np_.num == 'ONE':
      det = pick(f'{role}.one', ['one', lexicon.article(adj or g.english[k])])
      return f'{det} {adj}{g.english[k]}'
    return f'{pick(f"{role}.num", BY_NAME[np_.num].english)} {adj}{g.plural[k]}'
  if np_.poss:
    return f'{BY_NAME[np_.poss].english[0]} {adj}{g.english[k]}'
  if g.category == 'person':
    return f'the {g.english[k]}'
  if g.mass:
    some = 'some' if polarity == 'pos' else 'any'
    det = pick(f'{role}.some', ['', some + ' '])
    return f'{det}{adj}{g.english[k]}'
  return f'{lexicon.article(adj or g.english[k])} {adj}{g.english[k]}'


def _verb_group(forms, tense: str, person: str, neg: bool, question: bool):
  """(auxiliary or None, main verb) for a lexical verb; the auxiliary carries negation."""
  base, third, past, ing = forms
  if tense == 'past':
    return ('did', base) if neg or question else (None, past)
  if tense == 'habitual':
    aux = 'does' if person == '3s' else 'do'
    return (aux, base) if neg or question else (None, third if person == '3s' else base)
  if tense == 'progressive':
    return {'1s': 'am', '3s': 'is'}.get(person, 'are'), ing
  return 'will', base


def _copula_group(tense: str, person: str):
  """(auxiliary, rest) of the copula: was/is/will be."""
  if tense == 'past':
    return ('was' if person in ('1s', '3s') else 'were'), ''
  if tense == 'future':
    return 'will', 'be'
  return {'1s': 'am', '3s': 'is'}.get(person, 'are'), ''


def _time_english(m: Meaning, pick: _Chooser) -> tuple[str, str]:
  """(English time phrase, tense)."""
  if m.daypart:
    phrases, tense = lexicon.TIME_COMBOS[(m.time, m.daypart)]
  else:
    g = BY_NAME[m.time]
    phrases, tense = g.english, g.tense
  return pick('time', phrases), tense


def _realise(m: Meaning, pick: _Chooser) -> str:
  """One English sentence for `m` under the choices of `pick`."""
  time, tense = _time_english(m, pick)
  neg, question = m.stype == 'neg', m.stype in ('yn', 'wh')
  polarity = 'pos' if m.stype == 'stmt' else 'neg'
  if m.frame == 'weather':
    subj, person = 'it', '3s'
  elif m.wh == 'WHO':
    subj, person = 'who', '3s'
  else:
    subj, person = _np_english(m.subj, pick, 'subj', polarity), _agreement(m.subj)
  obj = _np_english(m.obj, pick, 'obj', polarity) if m.obj else ''
  if m.wh == 'HOW-MANY':  # "how many red apples did ..."
    g = BY_NAME[m.obj.head]
    adj = pick('obj.adj', BY_NAME[m.obj.adj].english) + ' ' if m.obj.adj else ''
    if g.plural is None:  # a mass noun, which a verb of people can draw: "how much water"
      obj = f'how much {adj}{pick("obj.head", g.english)}'
    else:
      obj = f'how many {adj}{g.plural[pick("obj.head", range(len(g.english)))]}'
  place = ''
  if m.place:
    phrases = BY_NAME[m.place].dest if m.frame == 'motion' else BY_NAME[m.place].loc
    place = pick('place', phrases)
  pred = m.pred and BY_NAME[m.pred]
  if m.frame in ('state', 'weather') and (pred.category == 'adj' or pred.kind == 'adj'):
    aux, rest = _copula_group(tense, person)
    main = ' '.join(w for w in (rest, pick('pred', pred.english)) if w)
  else:
    if m.frame == 'weather':
      forms = pred.forms
      stative = False
    else:
      verb = BY_NAME[m.verb]
      forms, stative = pick('verb', verb.forms), verb.stative
    if tense == 'progressive' and stative:
      tense = 'habitual'
    aux, main = _verb_group(forms, tense, person, neg, question and m.wh != 'WHO')
  tail = ' '.join(w for w in (obj if m.wh != 'HOW-MANY' else '', place) if w)
  if m.wh in ('WHAT', 'WHERE', 'HOW-MANY'):  # wh-word or phrase first, then aux-subject inversion
    front = obj if m.wh == 'HOW-MANY' else m.wh.lower()
    words = [front, aux, subj, main, tail] if aux else [front, subj, main, tail]
  elif m.wh == 'WHO' or not question:
    words = [subj, aux, 'not' if neg else '', main, tail] if aux else [subj, main, tail]
  else:
    words = [aux, subj, main, tail]
  body = ' '.join(w for w in words if w)
  contraction = pick('contract', [(), _NEG_CONTRACTIONS, _SUBJ_CONTRACTIONS])
  for pattern, repl in contraction:
    body = re.sub(pattern, repl, body)
  end = '?' if question else '.'
  text = f'{time}, {body}{end}' if pick('time_front', [False, True]) else f'{body} {time}{end}'
  text = re.sub(r"\bi\b", 'I', text)
  return text[0].upper() + text[1:]


def paraphrases(m: Meaning, seed: int = 0) -> list[str]:
  """2-3 distinct English translations of `m`; the first is canonical (all first choices).

  The others are drawn with an rng seeded by the meaning, so the same meaning always gets the
  same list; the time phrase can go first or last, so there are always at least two.
  """
  canonical = _Chooser()
  out = [_realise(m, canonical)]
  h = hashlib.blake2b(f'{seed}:{m}'.encode(), digest_size=8).digest()
  rng = np.random.default_rng(int.from_bytes(h, 'little'))
  axes = sorted(canonical.axes.items())
  for _ in range(24):
    if len(out) == 3:
      break
    choices = {k: int(rng.integers(n)) for k, n in axes}
    text = _realise(m, _Chooser(choices))
    if text not in out:
      out.append(text)
  return out


def reference_index(rng: np.random.Generator, num_paraphrases: int) -> int:
  """Which paraphrase a translator wrote: mostly the canonical one (REFERENCE_P)."""
  p = np.asarray(REFERENCE_P[:num_paraphrases])
  return int(rng.choice(num_paraphrases, p=p / p.sum()))


def tokenize(text: str) -> list[str]:
  """Lower-cased words (contractions kept whole) and punctuation, for statistics."""
  return re.findall(r"[a-z]+(?:'[a-z]+)?|[^\sa-z]", text.lower())

