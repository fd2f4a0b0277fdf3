"""Dual-level semantic construction (DSC, DVLA-RL): attribute and description text tokens per class.

Shape vocabulary: C classes, M text tokens per class (k attributes + 1 description with DSC, 1
without), E text-embedding dim, N texts, B texts in a batch, T tokens.

Three pluggable parts, each a small protocol:
  `AttributeSource.candidates(class_name) -> list[str]`: candidate attribute phrases of a sign,
    from a lexicon (`LexiconAttributes`) or a language model prompted per aspect
    (`LanguageModelAttributes`: handshape, location, movement, orientation).
  `Embedder.embed(texts) -> float32[N, E]`: one pooled text embedding per text
    (`DecoderEmbedder`: mean of one of our decoders' final hidden states over the valid tokens).
  `select_attributes`: the progressive top-k choice of k attributes among the candidates.

`build_semantics` puts them together. Per class it keeps the chosen attributes, a holistic
description synthesised from them (`describe`), the texts each token embeds, and

  text_tokens float32[C, M, E]: embed("A sign for CLASS, which has A_j") for j = 1..k, then
                                embed(description);        without DSC: embed("A sign for CLASS")
  text_mask   bool[C, M]:       True on real tokens (all of them: every class has k attributes)
  class_text  float32[C, E]:    t*, embed(description) (the anchor without DSC), for the reward
                                of `rvlf_jax.fewshot.train` (its batch['class_text'] rows).

Everything textual is kept so that it can be printed or saved (`ClassSemantics.to_dict/to_json`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.models import decoder as decoder_lib

ASPECTS = ('handshape', 'location', 'movement', 'orientation')
ANCHOR = 'A sign for {name}'
ATTRIBUTE_TEMPLATE = 'A sign for {name}, which has {attribute}'
LM_PROMPT = 'The {aspect} of the sign for {name} is'
# Token lengths are rounded up to a multiple of this, so that texts of similar lengths share one
# compiled program (padding does not change the result: it is masked out).
_LENGTH_BUCKET = 16
_SENTENCE_END = re.compile(r'[.!?\n]')


class AttributeSource(Protocol):
  """Where candidate attributes come from."""

  def candidates(self, class_name: str) -> list[str]:
    """Candidate attribute phrases of the sign for `class_name` (possibly with repeats)."""


class Embedder(Protocol):
  """A text encoder with one pooled vector per text."""

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32[len(texts), E]."""


def _check_name(class_name: str) -> str:
  if not isinstance(class_name, str) or not class_name.strip():
    raise ValueError(f'class names must be non-empty strings, got {class_name!r}.')
  return class_name.strip()


# ----------------------------------------------------------------------------- attribute sources


class LexiconAttributes:
  """Candidates from a lexicon: the non-empty phrases of `phrases(class_name)`.

  E.g. `LexiconAttributes(synthsign.isolated.attribute_phrases)`, whose dict maps 'handshape',
  'orientation', 'location', 'movement', 'hands', 'meaning' to phrases.
  """

  def __init__(self, phrases: Callable[[str], Mapping[str, str]],
               keys: Sequence[str] | None = None):
    """Args:
      phrases: class name -> {aspect: phrase}.
      keys: the aspects to keep, in this order; None keeps all, in the mapping's order.
    """
    self.phrases = phrases
    self.keys = None if keys is None else tuple(keys)

  def candidates(self, class_name: str) -> list[str]:
    table = self.phrases(_check_name(class_name))
    keys = self.keys if self.keys is not None else tuple(table)
    missing = [k for k in keys if k not in table]
    if missing:
      raise KeyError(f'{class_name!r}: the lexicon has no {missing} (it has {sorted(table)}).')
    return [str(table[k]).strip() for k in keys if str(table[k]).strip()]


def _pad_bucket(n: int) -> int:
  return max(_LENGTH_BUCKET, -(-n // _LENGTH_BUCKET) * _LENGTH_BUCKET)


class LanguageModelAttributes:
  """Candidates from a decoder prompted once per aspect, decoded greedily.

  For each aspect the prompt `prompt.format(aspect=..., name=...)` (default "The handshape of the
  sign for HELLO is") is continued greedily for at most `max_new_tokens` tokens (stopping at
  eos); the continuation, cut at its first sentence end (. ! ? or newline) and stripped, is the
  aspect's phrase, and `candidate.format(aspect=..., text=...)` (default "handshape: a flat
  hand") the candidate. All aspects of a class are decoded as one batch.
  """

  def __init__(self, model: decoder_lib.Decoder, params: Any, tokenizer, *,
               aspects: Sequence[str] = ASPECTS, prompt: str = LM_PROMPT,
               candidate: str = '{aspect}: {text}', max_new_tokens: int = 16):
    """Args:
      model: one of our decoders (e.g. from `rvlf_jax.hf.load_hf`).
      params: its parameters.
      tokenizer: an `rvlf_jax.data.tokenizers.Tokenizer` of the same vocabulary.
      aspects: what to ask about, one prompt each.
      prompt: template with {aspect} and {name}.
      candidate: template with {aspect} and {text} (the continuation).
      max_new_tokens: the longest continuation.
    """
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be positive, got {max_new_tokens}.')
    if not aspects:
      raise ValueError('aspects is empty: nothing to prompt for.')
    self.model = model
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.aspects = tuple(aspects)
    self.prompt = prompt
    self.candidate = candidate
    self.max_new_tokens = max_new_tokens

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> 'LanguageModelAttributes':
    """A decoder and its tokenizer from a local HF folder (`load_hf` + `HFTokenizer.load`)."""
    from rvlf_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    from rvlf_jax.hf import api  # pylint: disable=g-import-not-at-top
    config, params = api.load_hf(os.fspath(path))
    return cls(decoder_lib.Decoder(config), params, tokenizers.HFTokenizer.load(path), **kwargs)

  def phrases(self, class_name: str) -> dict[str, str]:
    """{aspect: continuation cut at its first sentence end}, possibly empty strings."""
    from rvlf_jax.eval import decoding  # pylint: disable=g-import-not-at-top
    name = _check_name(class_name)
    prompts = [self.prompt.format(aspect=a, name=name) for a in self.aspects]
    add_bos = self.tokenizer.bos_id is not None
    lengths = [len(self.tokenizer.encode(p)) + add_bos for p in prompts]
    ids_bt, mask_bt = self.tokenizer.encode_batch(prompts, _pad_bucket(max(lengths)),
                                                  add_bos=add_bos)
    embeds_btd = self.model.apply({'params': self.params}, jnp.asarray(ids_bt),
                                  method=decoder_lib.Decoder.embed)
    positions_bt = decoder_lib.positions_from_mask(jnp.asarray(mask_bt))
    tokens_bn, lengths_b = decoding.greedy_decode(
        self.model, self.params, embeds_btd, positions_bt, max_new_tokens=self.max_new_tokens,
        eos_id=self.tokenizer.eos_id)
    tokens_bn, lengths_b = np.asarray(tokens_bn), np.asarray(lengths_b)
    out = {}
    for aspect, row, n in zip(self.aspects, tokens_bn, lengths_b):
      text = self.tokenizer.decode(row[:n])
      out[aspect] = _SENTENCE_END.split(text, maxsplit=1)[0].strip()
    return out

  def candidates(self, class_name: str) -> list[str]:
    """The non-empty phrases, formatted with `candidate`, in aspect order."""
    return [self.candidate.format(aspect=a, text=t)
            for a, t in self.phrases(class_name).items() if t]


# ----------------------------------------------------------------------------- embedders


def _final_hidden(module: decoder_lib.Decoder, tokens_bt, positions_bt):
  """The final hidden states [B, T, D] as the output head reads them (after the final norm)."""
  out = module(tokens_bt, positions_bt=positions_bt, return_hidden_states=True)
  return module.final_norm(out.hidden_states[-1])


@functools.partial(jax.jit, static_argnames=('model',))
def _mean_pooled(model: decoder_lib.Decoder, params, tokens_bt, mask_bt):
  """float32[B, D]: mean of the final hidden states over each row's valid tokens."""
  # Padding gets position -1: no token attends to it, so valid tokens do not depend on it.
  # (The unused logits are dead code under jit.)
  positions_bt = decoder_lib.positions_from_mask(mask_bt)
  hidden_btd = model.apply({'params': params}, tokens_bt, positions_bt, method=_final_hidden)
  hidden_btd = jnp.where(mask_bt[..., None], hidden_btd.astype(jnp.float32), 0.0)
  return hidden_btd.sum(axis=1) / jnp.maximum(mask_bt.sum(axis=1, keepdims=True), 1)


class DecoderEmbedder:
  """Text embeddings from one of our decoders: final hidden states mean-pooled over valid tokens.

  Texts are encoded (bos first when the tokenizer has one), right-padded to a multiple of 16
  tokens, and run in batches of exactly `batch_size` rows (the last one padded with empty rows),
  so one program is compiled per length bucket; padding is masked out of attention (position -1)
  and out of the mean, so a text's embedding does not depend on what it is batched with (up to
  float rounding).
  """

  def __init__(self, model: decoder_lib.Decoder, params: Any, tokenizer, *,
               batch_size: int = 32, max_len: int | None = None):
    """Args:
      model: the decoder.
      params: its parameters.
      tokenizer: an `rvlf_jax.data.tokenizers.Tokenizer` of the same vocabulary.
      batch_size: texts per forward pass.
      max_len: texts longer than this many tokens are truncated; None never truncates.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    self.model = model
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.max_len = max_len

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> 'DecoderEmbedder':
    """A decoder and its tokenizer from a local HF folder."""
    from rvlf_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    from rvlf_jax.hf import api  # pylint: disable=g-import-not-at-top
    config, params = api.load_hf(os.fspath(path))
    return cls(decoder_lib.Decoder(config), params, tokenizers.HFTokenizer.load(path), **kwargs)

  @property
  def dim(self) -> int:
    return self.model.config.hidden_size

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32[N, D]: one embedding per text.

    Raises:
      ValueError: a text with no token (empty, and no bos to stand in).
    """
    if isinstance(texts, str):
      raise TypeError('embed takes a sequence of strings, not one string.')
    add_bos = self.tokenizer.bos_id is not None
    out = [np.zeros((0, self.dim), np.float32)]
    for start in range(0, len(texts), self.batch_size):
      chunk = list(texts[start:start + self.batch_size])
      length = _pad_bucket(max(len(self.tokenizer.encode(t)) for t in chunk) + add_bos)
      if self.max_len is not None:
        length = min(length, self.max_len)
      ids_bt, mask_bt = self.tokenizer.encode_batch(chunk, length, add_bos=add_bos)
      empty = np.flatnonzero(~mask_bt.any(axis=1))
      if empty.size:
        raise ValueError(f'text {start + empty[0]} ({chunk[empty[0]]!r}) has no tokens to embed.')
      # Rows padded up to batch_size too: one compiled program per length bucket.
      rows = self.batch_size - len(chunk)
      ids_bt = np.pad(ids_bt, ((0, rows), (0, 0)), constant_values=self.tokenizer.pad_id)
      mask_bt = np.pad(mask_bt, ((0, rows), (0, 0)))
      pooled_bd = _mean_pooled(self.model, self.params, jnp.asarray(ids_bt), jnp.asarray(mask_bt))
      out.append(np.asarray(pooled_bd)[:len(chunk)])
    return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- selection


def _unit(x_ne: np.ndarray) -> np.ndarray:
  x_ne = np.asarray(x_ne, np.float64)
  return x_ne / np.maximum(np.linalg.norm(x_ne, axis=-1, keepdims=True), 1e-12)


def _distinct(candidates: Sequence[str]) -> list[str]:
  """Stripped, non-empty, first occurrence kept, order kept."""
  seen, out = set(), []
  for c in candidates:
    c = str(c).strip()
    if c and c not in seen:
      seen.add(c)
      out.append(c)
  return out


def grow_template(class_name: str, attributes: Sequence[str]) -> str:
  """"A sign for CLASS, which has A1, and A2, and A3": the template grown by the attributes."""
  text = ANCHOR.format(name=class_name)
  for j, a in enumerate(attributes):
    text += (', which has ' if j == 0 else ', and ') + a
  return text


def select_attributes(class_name: str, candidates: Sequence[str], embedder: Embedder, k: int,
                      redundancy: float = 0.5) -> list[str]:
  """Progressive top-k: k attributes relevant to the class and not redundant with each other.

  With a = embed("A sign for CLASS") the anchor, e_c = embed(c) for each distinct candidate c
  and cos the cosine similarity, the chosen set S grows one attribute per step:

    step j = 1..k:  pick  argmax_{c not in S}  cos(e_c, a) - redundancy * max_{s in S} cos(e_c, e_s)

  (the max over an empty S is 0, so step 1 takes the candidate most similar to the anchor; ties
  go to the earlier candidate). The chosen attributes, in the order picked, grow the template
  "A sign for CLASS, which has A1, and A2, ..." (`grow_template`).

  Why this rule (maximal marginal relevance, Carbonell & Goldstein 1998) rather than the cosine
  of the grown template to the anchor: every grown template shares the anchor's words, so that
  cosine is highest for the candidate that changes the template least, i.e. the shortest or
  blandest phrase, and it never looks at what was already chosen; repeated aspects ("flat hand",
  "flat handshape") would both be picked. Scoring bare candidates against the anchor measures
  how much an attribute is about the class (it filters a language model's off-topic
  continuations), and the redundancy term makes the k tokens cover different aspects, which is
  what k separate text tokens are for. redundancy=0 gives plain top-k by relevance. It needs one
  embedding call (anchor + candidates), not one per step.

  Args:
    class_name: the class (e.g. a gloss).
    candidates: candidate phrases; repeats and empty strings are dropped first.
    embedder: the text encoder.
    k: how many to choose.
    redundancy: the weight of the redundancy penalty (>= 0).

  Returns:
    The k chosen attributes, in the order picked.

  Raises:
    ValueError: k < 1, an empty class name, or fewer than k distinct candidates.
  """
  name = _check_name(class_name)
  if k < 1:
    raise ValueError(f'k must be at least 1, got {k}.')
  if redundancy < 0:
    raise ValueError(f'redundancy must be >= 0, got {redundancy}.')
  pool = _distinct(candidates)
  if len(pool) < k:
    raise ValueError(f'class {name!r} has {len(pool)} distinct candidate attributes, fewer than '
                     f'k={k}: {pool}.')
  e_ne = _unit(embedder.embed([ANCHOR.format(name=name), *pool]))
  anchor_e, cand_ne = e_ne[0], e_ne[1:]
  relevance_n = cand_ne @ anchor_e
  similarity_nn = cand_ne @ cand_ne.T
  chosen: list[int] = []
  for _ in range(k):
    penalty_n = similarity_nn[:, chosen].max(axis=1) if chosen else np.zeros(len(pool))
    score_n = relevance_n - redundancy * penalty_n
    score_n[chosen] = -np.inf
    chosen.append(int(np.argmax(score_n)))
  return [pool[i] for i in chosen]


# ----------------------------------------------------------------------------- descriptions


def describe(class_name: str, attributes: Sequence[str]) -> str:
  """The holistic description: "A sign for CLASS: made with A1, A2 and A3."

  One sentence from the chosen attributes, in their order; "A sign for CLASS." without any.
  """
  name = _check_name(class_name)
  attrs = [a.strip().rstrip('.') for a in attributes if a.strip()]
  if not attrs:
    return ANCHOR.format(name=name) + '.'
  listed = attrs[0] if len(attrs) == 1 else ', '.join(attrs[:-1]) + ' and ' + attrs[-1]
  return f'{ANCHOR.format(name=name)}: made with {listed}.'


# ----------------------------------------------------------------------------- both levels


@dataclasses.dataclass(frozen=True)
class ClassSemantics:
  """The dual-level text semantics of C classes.

  Attributes:
    class_names: C names.
    attributes: per class, the k chosen attributes in the order picked (empty without DSC).
    descriptions: per class, the holistic description (the anchor text without DSC).
    token_texts: per class, the M texts its tokens embed.
    text_tokens: float32[C, M, E].
    text_mask: bool[C, M], True on real tokens.
    class_text: float32[C, E], t*: the embedding of each class's description.
    use_dsc: whether the tokens are dual-level (k attributes + description) or one anchor.
  """

  class_names: tuple[str, ...]
  attributes: tuple[tuple[str, ...], ...]
  descriptions: tuple[str, ...]
  token_texts: tuple[tuple[str, ...], ...]
  text_tokens: np.ndarray
  text_mask: np.ndarray
  class_text: np.ndarray
  use_dsc: bool

  def texts(self) -> dict[str, Any]:
    """Everything textual, per class name: attributes, description, token texts."""
    return {n: {'attributes': list(a), 'description': d, 'token_texts': list(t)}
            for n, a, d, t in zip(self.class_names, self.attributes, self.descriptions,
                                  self.token_texts)}

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly dict: the texts, the shapes, and the arrays as nested lists."""
    return {'use_dsc': self.use_dsc, 'class_names': list(self.class_names),
            'classes': self.texts(), 'text_tokens_shape': list(self.text_tokens.shape),
            'text_tokens': self.text_tokens.tolist(), 'text_mask': self.text_mask.tolist(),
            'class_text': self.class_text.tolist()}

  def to_json(self, with_arrays: bool = False) -> str:
    """JSON of `to_dict`; without arrays (texts and shapes only) unless asked."""
    d = self.to_dict()
    if not with_arrays:
      for key in ('text_tokens', 'text_mask', 'class_text'):
        d.pop(key)
    return json.dumps(d, indent=2, ensure_ascii=False)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ClassSemantics':
    """Inverse of `to_dict` (arrays included)."""
    names = tuple(d['class_names'])
    per = [d['classes'][n] for n in names]
    return cls(names, tuple(tuple(p['attributes']) for p in per),
               tuple(p['description'] for p in per), tuple(tuple(p['token_texts']) for p in per),
               np.asarray(d['text_tokens'], np.float32), np.asarray(d['text_mask'], bool),
               np.asarray(d['class_text'], np.float32), bool(d['use_dsc']))


def build_semantics(class_names: Sequence[str], source: AttributeSource | None,
                    embedder: Embedder, k: int, use_dsc: bool = True,
                    redundancy: float = 0.5) -> ClassSemantics:
  """Attributes, descriptions and text tokens for every class.

  With DSC (M = k + 1): `select_attributes` picks k of `source.candidates(name)`; the tokens
  embed "A sign for CLASS, which has A_j" for each (the attribute level, each attribute in the
  context of its class) and the description of `describe` (the holistic level); t* embeds the
  description. Without DSC (M = 1; `source` is not used and may be None): the one token and t*
  embed "A sign for CLASS".

  Args:
    class_names: C distinct, non-empty names.
    source: the candidate attributes.
    embedder: the text encoder.
    k: attributes per class (checked even without DSC, so configs fail the same way).
    use_dsc: dual-level tokens, or the single-anchor ablation.
    redundancy: see `select_attributes`.

  Returns:
    The `ClassSemantics`.
  """
  names = [_check_name(n) for n in class_names]
  if not names:
    raise ValueError('class_names is empty.')
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'class names repeat: {dup}.')
  if k < 1:
    raise ValueError(f'k must be at least 1, got {k}.')
  if use_dsc and source is None:
    raise ValueError('use_dsc=True needs an attribute source.')
  attributes, descriptions, token_texts = [], [], []
  for name in names:
    if use_dsc:
      chosen = select_attributes(name, source.candidates(name), embedder, k, redundancy)
      description = describe(name, chosen)
      texts = [ATTRIBUTE_TEMPLATE.format(name=name, attribute=a) for a in chosen] + [description]
    else:
      chosen, description = [], ANCHOR.format(name=name)
      texts = [description]
    attributes.append(tuple(chosen))
    descriptions.append(description)
    token_texts.append(tuple(texts))
  m = len(token_texts[0])
  flat = [t for texts in token_texts for t in texts]
  e_ne = np.asarray(embedder.embed(flat), np.float32)
  if e_ne.ndim != 2 or e_ne.shape[0] != len(flat):
    raise ValueError(f'the embedder returned shape {e_ne.shape} for {len(flat)} texts; '
                     'expected [N, E].')
  tokens_cme = e_ne.reshape(len(names), m, -1)
  return ClassSemantics(
      class_names=tuple(names), attributes=tuple(attributes), descriptions=tuple(descriptions),
      token_texts=tuple(token_texts), text_tokens=tokens_cme,
      text_mask=np.ones((len(names), m), bool), class_text=tokens_cme[:, -1].copy(),
      use_dsc=use_dsc)
