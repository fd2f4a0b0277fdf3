"""The SynthSign lexicon: every gloss, its category and its English forms.

A gloss is the name of a sign (upper case, hyphenated: `LAST-WEEK`, `IX-1`). Its English side lists
synonyms in order of preference: the first is the canonical word, the others give paraphrases
(`MOTHER` -> mother, mom). The lexicon is fixed, not drawn from the dataset seed: a seed changes the
signers, sentences and noise, never the language, so results on different seeds stay comparable.

Categories (`Gloss.category`):
  time      YESTERDAY, NEXT-WEEK, ...; sets the English tense          (`tense`, `english`)
  daypart   MORNING, ...; joins a time sign (`TOMORROW MORNING`)       (`english`)
  pronoun   IX-1 (I), IX-2 (you), WE, THEY                             (`person`)
  poss      POSS-1 (my), POSS-2 (your), POSS-1PL (our)
  person    family words (need a possessive) and people               (`plural`, `family`)
  noun      objects by class: food, drink, read, thing, animal         (`cls`, `plural`, `mass`)
  verb      transitive (`objects` classes), intransitive, motion        (`forms`, `stative`)
  place     destinations and locations                                 (`dest`, `loc`)
  adj       attributive (colour, size, ...) and person states          (`cls`)
  number    ONE .. TEN, MANY
  question  WHAT, WHERE, WHO, HOW-MANY
  weather   RAIN, SNOW, SUN, WIND (and the adjectives HOT, COLD)
"""

from __future__ import annotations

import dataclasses
from typing import Any

CATEGORIES = ('time', 'daypart', 'pronoun', 'poss', 'person', 'noun', 'verb', 'place', 'adj',
              'number', 'question', 'weather')


@dataclasses.dataclass(frozen=True)
class Gloss:
  """One sign of the lexicon.

  Attributes:
    name: the gloss, e.g. 'MOTHER'.
    category: one of CATEGORIES.
    english: synonyms, canonical first (for verbs: base forms).
    info: category-specific features (see the module docstring).
  """

  name: str
  category: str
  english: tuple[str, ...]
  info: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

  def __getattr__(self, key):
    # Features read as attributes (gloss.tense); only called when normal lookup fails.
    info = self.__dict__.get('info', {})
    if key in info:
      return info[key]
    raise AttributeError(f'{self.name} has no feature {key!r}')


def _g(name, category, english, **info):
  english = (english,) if isinstance(english, str) else tuple(english)
  return Gloss(name, category, english, info)


# Time signs: tense is what the English verb takes. 'progressive' falls back to the simple present
# for stative verbs (I like, not I am liking); 'habitual' is the simple present.
_TIME = [
    _g('YESTERDAY', 'time', 'yesterday', tense='past'),
    _g('LAST-WEEK', 'time', 'last week', tense='past'),
    _g('LAST-MONTH', 'time', 'last month', tense='past'),
    _g('LAST-YEAR', 'time', 'last year', tense='past'),
    _g('TODAY', 'time', 'today', tense='progressive'),
    _g('NOW', 'time', ('now', 'right now'), tense='progressive'),
    _g('EVERY-DAY', 'time', 'every day', tense='habitual'),
    _g('EVERY-WEEK', 'time', 'every week', tense='habitual'),
    _g('TOMORROW', 'time', 'tomorrow', tense='future'),
    _g('NEXT-WEEK', 'time', 'next week', tense='future'),
    _g('NEXT-MONTH', 'time', 'next month', tense='future'),
    _g('NEXT-YEAR', 'time', 'next year', tense='future'),
    _g('LATER', 'time', 'later', tense='future'),
    _g('SOON', 'time', 'soon', tense='future'),
]

_DAYPART = [
    _g('MORNING', 'daypart', 'morning'),
    _g('AFTERNOON', 'daypart', 'afternoon'),
    _g('EVENING', 'daypart', 'evening'),
    _g('NIGHT', 'daypart', 'night'),
]

# (time, daypart) -> (English phrases, tense). English is irregular here on purpose: YESTERDAY
# NIGHT is "last night", TODAY EVENING "this evening" (future), TODAY MORNING "this morning" (past).
TIME_COMBOS = {
    ('YESTERDAY', 'MORNING'): (('yesterday morning',), 'past'),
    ('YESTERDAY', 'AFTERNOON'): (('yesterday afternoon',), 'past'),
    ('YESTERDAY', 'EVENING'): (('yesterday evening', 'last evening'), 'past'),
    ('YESTERDAY', 'NIGHT'): (('last night',), 'past'),
    ('TODAY', 'MORNING'): (('this morning',), 'past'),
    ('TODAY', 'AFTERNOON'): (('this afternoon',), 'future'),
    ('TODAY', 'EVENING'): (('this evening', 'tonight'), 'future'),
    ('TODAY', 'NIGHT'): (('tonight',), 'future'),
    ('TOMORROW', 'MORNING'): (('tomorrow morning',), 'future'),
    ('TOMORROW', 'AFTERNOON'): (('tomorrow afternoon',), 'future'),
    ('TOMORROW', 'EVENING'): (('tomorrow evening',), 'future'),
    ('TOMORROW', 'NIGHT'): (('tomorrow night',), 'future'),
    ('EVERY-DAY', 'MORNING'): (('every morning',), 'habitual'),
    ('EVERY-DAY', 'AFTERNOON'): (('every afternoon',), 'habitual'),
    ('EVERY-DAY', 'EVENING'): (('every evening',), 'habitual'),
    ('EVERY-DAY', 'NIGHT'): (('every night',), 'habitual'),
    # A day part alone is habitual: MORNING IX-1 COFFEE DRINK = I drink coffee in the morning.
    (None, 'MORNING'): (('in the morning',), 'habitual'),
    (None, 'AFTERNOON'): (('in the afternoon',), 'habitual'),
    (None, 'EVENING'): (('in the evening',), 'habitual'),
    (None, 'NIGHT'): (('at night',), 'habitual'),
}

# person: 1s, 2 (you, singular or plural: agreement is the same), 1p, 3p; 3s is every noun subject.
_PRONOUN = [
    _g('IX-1', 'pronoun', 'i', person='1s'),
    _g('IX-2', 'pronoun', 'you', person='2'),
    _g('WE', 'pronoun', 'we', person='1p'),
    _g('THEY', 'pronoun', 'they', person='3p'),
]

_POSS = [
    _g('POSS-1', 'poss', 'my'),
    _g('POSS-2', 'poss', 'your'),
    _g('POSS-1PL', 'poss', 'our'),
]


def _person(name, english, plural, family):
  return _g(name, 'person', english, plural=(plural,) if isinstance(plural, str) else plural,
            family=family)


# Family words always take a possessive (POSS-1 MOTHER = my mother); the others take one or "the".
_PERSON = [
    _person('MOTHER', ('mother', 'mom'), ('mothers', 'moms'), True),
    _person('FATHER', ('father', 'dad'), ('fathers', 'dads'), True),
    _person('SISTER', 'sister', 'sisters', True),
    _person('BROTHER', 'brother', 'brothers', True),
    _person('GRANDMOTHER', ('grandmother', 'grandma'), ('grandmothers', 'grandmas'), True),
    _person('GRANDFATHER', ('grandfather', 'grandpa'), ('grandfathers', 'grandpas'), True),
    _person('SON', 'son', 'sons', True),
    _person('DAUGHTER', 'daughter', 'daughters', True),
    _person('UNCLE', 'uncle', 'uncles', True),
    _person('AUNT', 'aunt', 'aunts', True),
    _person('HUSBAND', 'husband', 'husbands', True),
    _person('WIFE', 'wife', 'wives', True),
    _person('FRIEND', 'friend', 'friends', True),
    _person('TEACHER', 'teacher', 'teachers', False),
    _person('DOCTOR', 'doctor', 'doctors', False),
    _person('STUDENT', 'student', 'students', False),
    _person('NURSE', 'nurse', 'nurses', False),
    _person('POLICE', 'police officer', 'police officers', False),
    _person('FARMER', 'farmer', 'farmers', False),
    _person('DRIVER', 'driver', 'drivers', False),
    _person('NEIGHBOR', 'neighbor', 'neighbors', False),
    _person('CHILD', ('child', 'kid'), ('children', 'kids'), False),
    _person('MAN', 'man', 'men', False),
    _person('WOMAN', 'woman', 'women', False),
    _person('BABY', 'baby', 'babies', False),
]


def _noun(name, cls, english, plural=None, mass=False):
  english = (english,) if isinstance(english, str) else tuple(english)
  if plural is None and not mass:
    plural = tuple(w + 's' for w in english)
  plural = (plural,) if isinstance(plural, str) else plural
  return _g(name, 'noun', english, cls=cls, plural=plural, mass=mass)


_NOUN = [
    _noun('APPLE', 'food', 'apple'),
    _noun('BANANA', 'food', 'banana'),
    _noun('BREAD', 'food', 'bread', mass=True),
    _noun('RICE', 'food', 'rice', mass=True),
    _noun('SOUP', 'food', 'soup', mass=True),
    _noun('CAKE', 'food', 'cake'),
    _noun('EGG', 'food', 'egg'),
    _noun('FISH', 'food', 'fish', mass=True),
    _noun('MEAT', 'food', 'meat', mass=True),
    _noun('CHEESE', 'food', 'cheese', mass=True),
    _noun('PIZZA', 'food', 'pizza'),
    _noun('WATER', 'drink', 'water', mass=True),
    _noun('MILK', 'drink', 'milk', mass=True),
    _noun('COFFEE', 'drink', 'coffee', mass=True),
    _noun('TEA', 'drink', 'tea', mass=True),
    _noun('JUICE', 'drink', 'juice', mass=True),
    _noun('BEER', 'drink', 'beer', mass=True),
    _noun('BOOK', 'read', 'book'),
    _noun('LETTER', 'read', 'letter'),
    _noun('NEWSPAPER', 'read', 'newspaper'),
    _noun('CAR', 'thing', 'car'),
    _noun('BICYCLE', 'thing', ('bicycle', 'bike')),
    _noun('HOUSE', 'thing', 'house'),
    _noun('PHONE', 'thing', ('phone', 'telephone')),
    _noun('COMPUTER', 'thing', 'computer'),
    _noun('BAG', 'thing', 'bag'),
    _noun('SHOE', 'thing', 'shoe'),
    _noun('SHIRT', 'thing', 'shirt'),
    _noun('HAT', 'thing', 'hat'),
    _noun('KEY', 'thing', 'key'),
    _noun('CUP', 'thing', 'cup'),
    _noun('TABLE', 'thing', 'table'),
    _noun('CHAIR', 'thing', 'chair'),
    _noun('BALL', 'thing', 'ball'),
    _noun('BOX', 'thing', 'box', plural='boxes'),
    _noun('FLOWER', 'thing', 'flower'),
    _noun('PICTURE', 'thing', ('picture', 'photo')),
    _noun('DOOR', 'thing', 'door'),
    _noun('WINDOW', 'thing', 'window'),
    _noun('UMBRELLA', 'thing', 'umbrella'),
    _noun('TICKET', 'thing', 'ticket'),
    _noun('MONEY', 'thing', 'money', mass=True),
    _noun('DOG', 'animal', 'dog'),
    _noun('CAT', 'animal', 'cat'),
    _noun('HORSE', 'animal', 'horse'),
    _noun('BIRD', 'animal', 'bird'),
    _noun('COW', 'animal', 'cow'),
    _noun('MOUSE', 'animal', 'mouse', plural='mice'),
]


def _verb(name, kind, forms, objects=(), stative=False, synonyms=()):
  """forms: (base, 3rd person singular, past, -ing); synonyms: more such 4-tuples."""
  all_forms = (forms,) + tuple(synonyms)
  return _g(name, 'verb', tuple(f[0] for f in all_forms), kind=kind, forms=all_forms,
            objects=tuple(objects), stative=stative)


_ALL_OBJ = ('food', 'drink', 'read', 'thing', 'animal')
_VERB = [
    # Transitive; `objects` are noun classes ('person' = a person noun as object).
    _verb('EAT', 'trans', ('eat', 'eats', 'ate', 'eating'), ('food',)),
    _verb('DRINK', 'trans', ('drink', 'drinks', 'drank', 'drinking'), ('drink',)),
    _verb('COOK', 'trans', ('cook', 'cooks', 'cooked', 'cooking'), ('food',),
          synonyms=[('make', 'makes', 'made', 'making')]),
    _verb('BUY', 'trans', ('buy', 'buys', 'bought', 'buying'), ('food', 'drink', 'read', 'thing')),
    _verb('SELL', 'trans', ('sell', 'sells', 'sold', 'selling'), ('food', 'thing', 'animal')),
    _verb('WANT', 'trans', ('want', 'wants', 'wanted', 'wanting'), _ALL_OBJ, stative=True),
    _verb('LIKE', 'trans', ('like', 'likes', 'liked', 'liking'), _ALL_OBJ + ('person',),
          stative=True),
    _verb('SEE', 'trans', ('see', 'sees', 'saw', 'seeing'), ('thing', 'animal', 'person'),
          stative=True),
    _verb('HAVE', 'trans', ('have', 'has', 'had', 'having'), ('thing', 'animal'), stative=True),
    _verb('NEED', 'trans', ('need', 'needs', 'needed', 'needing'), ('food', 'drink', 'thing'),
          stative=True),
    _verb('READ', 'trans', ('read', 'reads', 'read', 'reading'), ('read',)),
    _verb('WRITE', 'trans', ('write', 'writes', 'wrote', 'writing'), ('read',)),
    _verb('FIND', 'trans', ('find', 'finds', 'found', 'finding'), ('thing', 'animal', 'read')),
    _verb('LOSE', 'trans', ('lose', 'loses', 'lost', 'losing'), ('thing', 'read')),
    _verb('CARRY', 'trans', ('carry', 'carries', 'carried', 'carrying'), ('thing', 'food', 'read')),
    _verb('WASH', 'trans', ('wash', 'washes', 'washed', 'washing'), ('thing', 'animal')),
    _verb('OPEN', 'trans', ('open', 'opens', 'opened', 'opening'), ('thing', 'read')),
    _verb('FEED', 'trans', ('feed', 'feeds', 'fed', 'feeding'), ('animal', 'person')),
    _verb('DRAW', 'trans', ('draw', 'draws', 'drew', 'drawing'), ('thing', 'animal', 'person')),
    _verb('FIX', 'trans', ('fix', 'fixes', 'fixed', 'fixing'), ('thing',),
          synonyms=[('repair', 'repairs', 'repaired', 'repairing')]),
    _verb('HELP', 'trans', ('help', 'helps', 'helped', 'helping'), ('person',)),
    _verb('VISIT', 'trans', ('visit', 'visits', 'visited', 'visiting'), ('person',)),
    _verb('CALL', 'trans', ('call', 'calls', 'called', 'calling'), ('person',),
          synonyms=[('phone', 'phones', 'phoned', 'phoning')]),
    _verb('MEET', 'trans', ('meet', 'meets', 'met', 'meeting'), ('person',)),
    # Intransitive; a location may be topicalised before the subject.
    _verb('SLEEP', 'intrans', ('sleep', 'sleeps', 'slept', 'sleeping')),
    _verb('WORK', 'intrans', ('work', 'works', 'worked', 'working')),
    _verb('PLAY', 'intrans', ('play', 'plays', 'played', 'playing')),
    _verb('RUN', 'intrans', ('run', 'runs', 'ran', 'running')),
    _verb('SWIM', 'intrans', ('swim', 'swims', 'swam', 'swimming')),
    _verb('DANCE', 'intrans', ('dance', 'dances', 'danced', 'dancing')),
    _verb('SING', 'intrans', ('sing', 'sings', 'sang', 'singing')),
    _verb('CRY', 'intrans', ('cry', 'cries', 'cried', 'crying')),
    _verb('LAUGH', 'intrans', ('laugh', 'laughs', 'laughed', 'laughing')),
    _verb('STUDY', 'intrans', ('study', 'studies', 'studied', 'studying')),
    _verb('WAIT', 'intrans', ('wait', 'waits', 'waited', 'waiting')),
    # Motion: a destination (place) is required.
    _verb('GO', 'motion', ('go', 'goes', 'went', 'going')),
    _verb('COME', 'motion', ('come', 'comes', 'came', 'coming')),
    _verb('WALK', 'motion', ('walk', 'walks', 'walked', 'walking')),
]


def _place(name, dest, loc):
  """dest: phrases after a motion verb (go home, go to school); loc: locatives (at/in the park)."""
  return _g(name, 'place', name.lower(), dest=tuple(dest), loc=tuple(loc))


_PLACE = [
    _place('HOME', ['home'], ['at home']),
    _place('SCHOOL', ['to school'], ['at school']),
    _place('HOSPITAL', ['to the hospital'], ['at the hospital', 'in the hospital']),
    _place('SHOP', ['to the shop', 'to the store'], ['at the shop', 'at the store']),
    _place('PARK', ['to the park'], ['in the park', 'at the park']),
    _place('CHURCH', ['to church'], ['at church', 'in church']),
    _place('OFFICE', ['to the office'], ['at the office', 'in the office']),
    _place('RESTAURANT', ['to the restaurant'], ['at the restaurant', 'in the restaurant']),
    _place('STATION', ['to the station'], ['at the station']),
    _place('LIBRARY', ['to the library'], ['at the library', 'in the library']),
    _place('BEACH', ['to the beach'], ['at the beach', 'on the beach']),
    _place('CITY', ['to the city', 'into town'], ['in the city', 'in town']),
    _place('MARKET', ['to the market'], ['at the market']),
    _place('BANK', ['to the bank'], ['at the bank']),
    _place('GARDEN', ['to the garden'], ['in the garden']),
    _place('ZOO', ['to the zoo'], ['at the zoo']),
]

# Attributive classes say which nouns they describe; 'state' adjectives describe people
# (predicates: MOTHER TIRED = my mother is tired); 'temp' is also weather (TOMORROW COLD).
_ADJ_NOUNS = {
    'color': ('food', 'read', 'thing', 'animal'),
    'size': ('food', 'read', 'thing', 'animal'),
    'age': ('read', 'thing', 'animal'),
    'price': ('food', 'drink', 'read', 'thing', 'animal'),
    'looks': ('thing', 'animal'),
    'temp': ('food', 'drink'),
}
_ADJ = [
    _g('RED', 'adj', 'red', cls='color'),
    _g('BLUE', 'adj', 'blue', cls='color'),
    _g('GREEN', 'adj', 'green', cls='color'),
    _g('BLACK', 'adj', 'black', cls='color'),
    _g('WHITE', 'adj', 'white', cls='color'),
    _g('YELLOW', 'adj', 'yellow', cls='color'),
    _g('BIG', 'adj', ('big', 'large'), cls='size'),
    _g('SMALL', 'adj', ('small', 'little'), cls='size'),
    _g('NEW', 'adj', 'new', cls='age'),
    _g('OLD', 'adj', 'old', cls='age'),
    _g('EXPENSIVE', 'adj', 'expensive', cls='price'),
    _g('CHEAP', 'adj', 'cheap', cls='price'),
    _g('BEAUTIFUL', 'adj', ('beautiful', 'pretty'), cls='looks'),
    _g('HOT', 'adj', 'hot', cls='temp'),
    _g('COLD', 'adj', 'cold', cls='temp'),
    _g('HAPPY', 'adj', ('happy', 'glad'), cls='state'),
    _g('SAD', 'adj', 'sad', cls='state'),
    _g('TIRED', 'adj', 'tired', cls='state'),
    _g('SICK', 'adj', ('sick', 'ill'), cls='state'),
    _g('HUNGRY', 'adj', 'hungry', cls='state'),
    _g('ANGRY', 'adj', 'angry', cls='state'),
    _g('BUSY', 'adj', 'busy', cls='state'),
    _g('BORED', 'adj', 'bored', cls='state'),
]

_NUMBER = [
    _g(n.upper(), 'number', n, value=v) for v, n in enumerate(
        ['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten'], 1)
] + [_g('MANY', 'number', ('many', 'a lot of'), value=0)]

_QUESTION = [
    _g('WHAT', 'question', 'what'),
    _g('WHERE', 'question', 'where'),
    _g('WHO', 'question', 'who'),
    _g('HOW-MANY', 'question', 'how many'),
]

# Weather predicates: 'verb' ones conjugate (it rained), 'adj' ones take the copula (it was sunny).
_WEATHER = [
    _g('RAIN', 'weather', 'rain', kind='verb', forms=('rain', 'rains', 'rained', 'raining')),
    _g('SNOW', 'weather', 'snow', kind='verb', forms=('snow', 'snows', 'snowed', 'snowing')),
    _g('SUN', 'weather', 'sunny', kind='adj'),
    _g('WIND', 'weather', 'windy', kind='adj'),
]

GLOSSES: tuple[Gloss, ...] = tuple(_TIME + _DAYPART + _PRONOUN + _POSS + _PERSON + _NOUN + _VERB
                                   + _PLACE + _ADJ + _NUMBER + _QUESTION + _WEATHER)
BY_NAME: dict[str, Gloss] = {g.name: g for g in GLOSSES}
assert len(BY_NAME) == len(GLOSSES), 'duplicate gloss names'


def by_category(category: str) -> tuple[Gloss, ...]:
  """All glosses of one category, in lexicon order."""
  if category not in CATEGORIES:
    raise ValueError(f'Unknown category {category!r}; known: {CATEGORIES}.')
  return tuple(g for g in GLOSSES if g.category == category)


def nouns_of(classes: tuple[str, ...]) -> tuple[Gloss, ...]:
  """Object nouns of the given classes ('person' gives person nouns)."""
  out = [g for g in _NOUN if g.cls in classes]
  if 'person' in classes:
    out += _PERSON
  return tuple(out)


def adjectives_for(noun: Gloss) -> tuple[Gloss, ...]:
  """Attributive adjectives that can describe `noun` (none for people)."""
  if noun.category != 'noun':
    return ()
  return tuple(a for a in _ADJ if a.cls != 'state' and noun.cls in _ADJ_NOUNS[a.cls])


def article(word: str) -> str:
  """'a' or 'an' for a singular count noun phrase starting with `word`."""
  return 'an' if word[0] in 'aeiou' else 'a'


def summary() -> dict[str, int]:
  """Number of glosses per category, and the total."""
  counts = {c: len(by_category(c)) for c in CATEGORIES}
  counts['total'] = len(GLOSSES)
  return counts
