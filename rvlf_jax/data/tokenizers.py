"""Tokenizers for the text side of translation: decoder targets and instruction prompts.

One interface, `Tokenizer`, with two implementations:
  `SentencePieceTokenizer`: a sentencepiece model trained on the translation corpus, for decoders
    trained from scratch. Ids are fixed as in Gemma: pad 0, eos 1, bos 2, unk 3.
    `save_as_hf` writes it as a transformers tokenizer next to a decoder exported by `save_hf`.
  `HFTokenizer`: the tokenizer of an imported decoder, read from its local HF folder.

`PromptTemplate` builds the token layout the translation model consumes:
  [prompt before sign][sign tokens][prompt after sign][target text, eos][pad ...]
The sign tokens are embeddings, not ids, so the prompt comes back as two id lists around them;
`target_ids` gives the target (text + eos) and `loss_mask` marks the target positions.

Ids are Python lists for single texts and numpy arrays (int32 ids, bool masks) for batches, so
this module is usable from data-loading workers without touching an accelerator.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

# Shape vocabulary: B texts in a batch, L tokens (max_len).


class Tokenizer(abc.ABC):
  """Text <-> ids, with the special ids the models need.

  `encode` never adds special tokens; callers add bos/eos where the layout needs them
  (`encode_batch`, `PromptTemplate`). Padding is always on the right.
  """

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the decoder's embedding table may be larger, never smaller)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id; None for tokenizers without one (e.g. Qwen)."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """End-of-sequence id, appended to targets and where decoding stops."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Padding id (always defined; may equal eos_id, see `HFTokenizer`)."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos or eos."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Text of ids that contain no eos or pad."""

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template, if the tokenizer has one."""
    return None

  def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
    """The chat template rendered for `messages`, ending with the assistant turn's opening."""
    raise ValueError(f'{type(self).__name__} has no chat template.')

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`: stops at the first eos, drops pad and other special tokens.

    Args:
      ids: int[L], e.g. one row of generated ids.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id in ids:
      # Whatever a sampler produced after eos is not part of the text.
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if i != self.pad_id])

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """`decode` of each row of int[B, L]."""
    return [self.decode(row) for row in np.asarray(ids)]

  def encode_batch(self, texts: Sequence[str], max_len: int | None = None, *,
                   add_bos: bool = False, add_eos: bool = False,
                   truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and right-pads texts to a fixed length.

    Args:
      texts: B strings.
      max_len: L; None pads to the longest sequence. A fixed value keeps shapes static under jit.
      add_bos: start each sequence with bos.
      add_eos: end each sequence with eos.
      truncate: cut text ids that do not fit, keeping bos/eos (as transformers truncation does);
        False raises instead.

    Returns:
      (ids int32[B, L] padded with pad_id, mask bool[B, L] True on real tokens).
    """
    if isinstance(texts, str):
      raise TypeError('encode_batch takes a sequence of strings, not one string.')
    prefix = [self._require_bos()] if add_bos else []
    suffix = [self.eos_id] if add_eos else []
    rows = [self.encode(t) for t in texts]
    if max_len is None:
      max_len = max([len(prefix) + len(r) + len(suffix) for r in rows], default=0)
    room = max_len - len(prefix) - len(suffix)
    if room < 0:
      raise ValueError(f'max_len {max_len} leaves no room for the special tokens.')
    ids = np.full((len(rows), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    for b, row in enumerate(rows):
      if len(row) > room and not truncate:
        raise ValueError(f'text {b} has {len(row)} tokens, more than the {room} that fit in '
                         f'max_len {max_len}: {texts[b][:80]!r}')
      seq = prefix + row[:room] + suffix
      ids[b, :len(seq)] = seq
      mask[b, :len(seq)] = True
    return ids, mask

  def _require_bos(self) -> int:
    if self.bos_id is None:
      raise ValueError(f'{type(self).__name__} has no bos token.')
    return self.bos_id


# ----------------------------------------------------------------------------- SentencePiece

_SPM_PIECES = {'pad': '<pad>', 'eos': '<eos>', 'bos': '<bos>', 'unk': '<unk>'}
_SPM_IDS = {'pad': 0, 'eos': 1, 'bos': 2, 'unk': 3}
# Options `train` owns: the special ids above, and the whitespace handling `save_as_hf` mirrors.
_SPM_RESERVED = {f'{k}_{s}' for k in _SPM_IDS for s in ('id', 'piece')} | {
    'add_dummy_prefix', 'remove_extra_whitespaces', 'split_by_whitespace', 'model_writer',
    'model_prefix', 'input', 'sentence_iterator', 'hard_vocab_limit', 'user_defined_symbols'}


def _spm():
  import sentencepiece  # pylint: disable=g-import-not-at-top
  return sentencepiece


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with Gemma's special ids: pad 0, eos 1, bos 2, unk 3.

  Text is normalised as sentencepiece does by default (NFKC, whitespace runs collapsed, newlines
  become spaces). Characters never seen in training become unk, which decodes as ' ⁇ ' (unless
  the model was trained with byte_fallback). Special-token strings inside text ('<eos>') are
  plain text here, never control ids.
  """

  PAD_ID, EOS_ID, BOS_ID, UNK_ID = (_SPM_IDS[k] for k in ('pad', 'eos', 'bos', 'unk'))

  def __init__(self, model_proto: bytes, path: str | None = None):
    """Wraps a serialized sentencepiece model; use `train` or `load` to get one.

    Args:
      model_proto: the bytes of a .model file.
      path: where it was read from, for messages.
    """
    self.model_proto = bytes(model_proto)
    self.path = path
    self._sp = _spm().SentencePieceProcessor(model_proto=self.model_proto)
    found = {'pad': self._sp.pad_id(), 'eos': self._sp.eos_id(), 'bos': self._sp.bos_id(),
             'unk': self._sp.unk_id()}
    if found != _SPM_IDS:
      raise ValueError(f'{path or "sentencepiece model"}: special ids {found}, expected '
                       f'{_SPM_IDS} (train it with SentencePieceTokenizer.train).')

  @classmethod
  def train(cls, corpus: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None, *,
            model_type: str = 'unigram', character_coverage: float = 1.0,
            byte_fallback: bool = False, num_threads: int = 1,
            **options: Any) -> 'SentencePieceTokenizer':
    """Trains a model on sentences, in memory (no temporary corpus file).

    Deterministic: the same corpus and arguments give a byte-identical model. The model records
    its training options, num_threads included, so the bytes depend on it too; one thread also
    keeps the unigram EM independent of the machine. Translation corpora (thousands of sentences)
    train in about a second.

    Args:
      corpus: sentences, e.g. the training targets; empty ones are skipped.
      vocab_size: the target vocabulary size, an upper bound: a small corpus may yield fewer
        pieces (hard_vocab_limit=False), so read `vocab_size` of the result.
      path: where to write the .model file (atomically); None keeps it in memory only.
      model_type: 'unigram' or 'bpe'.
      character_coverage: share of characters that get their own piece; 1.0 (every character of
        the corpus) suits small corpora and Chinese, where 0.9995 would drop rare characters.
      byte_fallback: spell unknown characters as UTF-8 byte pieces instead of unk (adds 256 ids).
      num_threads: sentencepiece training threads.
      **options: other sentencepiece trainer options (e.g. max_sentence_length). The special
        ids and whitespace handling are fixed.

    Returns:
      The trained tokenizer.
    """
    if isinstance(corpus, (str, bytes)):
      raise TypeError('corpus must be an iterable of sentences, not one string.')
    if model_type not in ('unigram', 'bpe'):
      raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
    reserved = sorted(set(options) & _SPM_RESERVED)
    if reserved:
      raise ValueError(f'SentencePieceTokenizer.train sets {reserved} itself.')
    count = [0]

    def sentences() -> Iterator[str]:
      for i, s in enumerate(corpus):
        if not isinstance(s, str):
          raise TypeError(f'corpus item {i} is {type(s).__name__}, not str.')
        if s.strip():
          count[0] += 1
          yield s

    specials = {f'{k}_id': v for k, v in _SPM_IDS.items()}
    specials.update({f'{k}_piece': v for k, v in _SPM_PIECES.items()})
    writer = _BytesSink()
    try:
      _spm().SentencePieceTrainer.Train(
          sentence_iterator=sentences(), model_writer=writer, vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage,
          byte_fallback=byte_fallback, num_threads=num_threads,
          # A small corpus has fewer distinct pieces than a round vocab size.
          hard_vocab_limit=False, minloglevel=options.pop('minloglevel', 2), **specials,
          **options)
    except RuntimeError as e:
      if count[0] == 0:
        raise ValueError('cannot train a sentencepiece model on an empty corpus.') from e
      raise ValueError(f'sentencepiece training failed on {count[0]} sentences: {e}') from e
    tokenizer = cls(writer.data, path=None if path is None else os.fspath(path))
    if path is not None:
      tokenizer.save(path)
    return tokenizer

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'SentencePieceTokenizer':
    """Reads a .model file written by `train` or `save`."""
    path = os.fspath(path)
    with open(path, 'rb') as f:
      data = f.read()
    try:
      return cls(data, path=path)
    except RuntimeError as e:
      raise ValueError(f'{path}: not a sentencepiece model ({e}).') from e

  def save(self, path: str | os.PathLike) -> None:
    """Writes the .model file atomically (a reader never sees half a file)."""
    _write_atomic(os.fspath(path), self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.BOS_ID

  @property
  def eos_id(self) -> int:
    return self.EOS_ID

  @property
  def pad_id(self) -> int:
    return self.PAD_ID

  @property
  def unk_id(self) -> int:
    return self.UNK_ID

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def _decode(self, ids: list[int]) -> str:
    # Control pieces (bos and any other) decode to '' in sentencepiece already.
    return self._sp.decode(ids)

  def to_tokenizers(self):
    """The same tokenizer as a `tokenizers.Tokenizer` (what transformers' fast tokenizers run).

    Built from the model's own pieces, scores and normalisation table rather than through
    transformers' converters (whose BPE path is broken in transformers 5.23). Encodings match
    sentencepiece for text without special-token strings; `save_as_hf` tests check it.
    """
    # pylint: disable=g-import-not-at-top
    from tokenizers import AddedToken, Regex, Tokenizer as HfBackend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    # pylint: enable=g-import-not-at-top
    proto = self._proto()
    norm = proto.normalizer_spec
    if not (norm.add_dummy_prefix and norm.remove_extra_whitespaces
            and proto.trainer_spec.split_by_whitespace):
      raise ValueError('only models with sentencepiece default whitespace handling convert.')
    pieces = [(p.piece, p.score) for p in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
      model = models.Unigram(pieces, unk_id=self.UNK_ID, byte_fallback=byte_fallback)
    elif proto.trainer_spec.model_type == proto.trainer_spec.BPE:
      vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
      model = models.BPE(vocab, _bpe_merges(vocab), unk_token=_SPM_PIECES['unk'], fuse_unk=True,
                         byte_fallback=byte_fallback)
    else:
      raise ValueError(f'cannot convert sentencepiece model type {proto.trainer_spec.model_type}.')
    backend = HfBackend(model)
    steps = []
    if norm.precompiled_charsmap:  # Empty for the 'identity' normalisation.
      steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    # remove_extra_whitespaces: strip, then collapse runs (the charsmap already mapped \t, \n).
    steps += [normalizers.Strip(), normalizers.Replace(Regex(' +'), ' ')]
    backend.normalizer = normalizers.Sequence(steps)
    # add_dummy_prefix + split_by_whitespace.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
    backend.decoder = decoders.Sequence([
        decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=' ', left=1, right=0)])
    backend.add_special_tokens([
        AddedToken(_SPM_PIECES[k], special=True, normalized=False)
        for k in sorted(_SPM_IDS, key=_SPM_IDS.get)])
    # Like Gemma's tokenizer: `tokenizer(text)` starts with bos; add_special_tokens=False does not.
    bos = _SPM_PIECES['bos']
    backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, self.BOS_ID)])
    return backend

  def save_as_hf(self, out_dir: str | os.PathLike, *, chat_template: str | None = None,
                 overwrite: bool = False) -> None:
    """Writes tokenizer files that `transformers.AutoTokenizer.from_pretrained` loads offline.

    Meant for the folder of a decoder exported with `rvlf_jax.hf.api.save_hf`; only tokenizer
    files are written (tokenizer.json, tokenizer_config.json, tokenizer.model for reference and
    chat_template.jinja if given), so config.json and weights are untouched. The HF tokenizer
    encodes like this one with add_special_tokens=False; with the default True it prepends bos.

    Args:
      out_dir: the folder (created if needed).
      chat_template: optional Jinja chat template to ship with it.
      overwrite: replace existing tokenizer files; otherwise they are an error.
    """
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
    out_dir = os.fspath(out_dir)
    existing = os.path.join(out_dir, 'tokenizer.json')
    if os.path.exists(existing) and not overwrite:
      raise FileExistsError(f'{existing} exists; pass overwrite=True to replace it.')
    fast = PreTrainedTokenizerFast(
        tokenizer_object=self.to_tokenizers(), bos_token=_SPM_PIECES['bos'],
        eos_token=_SPM_PIECES['eos'], pad_token=_SPM_PIECES['pad'], unk_token=_SPM_PIECES['unk'])
    if chat_template is not None:
      fast.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    _write_atomic(os.path.join(out_dir, 'tokenizer.model'), self.model_proto)

  def _proto(self):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self.model_proto)
    return proto


class _BytesSink:
  """The `model_writer` sentencepiece writes the trained model to."""

  def __init__(self):
    self.data = b''

  def write(self, data: bytes) -> None:
    self.data += data


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
  """Merges equivalent to sentencepiece BPE for a vocab ordered by score (id 0 best).

  sentencepiece repeatedly joins the adjacent pair whose union is the best-scored piece, so a
  merge's rank is its result's id; splits of the same piece are ordered by their parts' ids.
  """
  merges = []
  for piece, rank in vocab.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in vocab and right in vocab:
        merges.append((rank, vocab[left], vocab[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def _write_atomic(path: str, data: bytes) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ----------------------------------------------------------------------------- transformers


class HFTokenizer(Tokenizer):
  """The tokenizer of an imported decoder, through `transformers`.

  If the tokenizer defines no pad token (Llama, Gemma-3 base define one; some do not), eos
  serves as pad: padding is always on the right of an eos-terminated target and decoding stops
  at the first eos, so the two never get confused; loss masks come from the mask, not from ids.
  """

  def __init__(self, tokenizer: Any):
    """Wraps a transformers tokenizer instance (see `load` for reading a folder)."""
    self.hf = tokenizer
    if tokenizer.eos_token_id is None:
      raise ValueError(f'{tokenizer.name_or_path}: the tokenizer has no eos token.')

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'HFTokenizer':
    """Reads the tokenizer of a local HF folder; never downloads."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path}: no such folder (HFTokenizer reads local folders only).')
    return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))

  @property
  def vocab_size(self) -> int:
    # len() counts added tokens (chat markers), which `.vocab_size` leaves out.
    return len(self.hf)

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def eos_id(self) -> int:
    return self.hf.eos_token_id

  @property
  def pad_id(self) -> int:
    pad = self.hf.pad_token_id
    return self.eos_id if pad is None else pad

  @property
  def chat_template(self) -> str | None:
    return getattr(self.hf, 'chat_template', None)

  def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
    if not self.chat_template:
      return super().apply_chat_template(messages)
    return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

  def encode(self, text: str) -> list[int]:
    # Special-token strings in text (chat markers of a rendered template) become their ids.
    return list(self.hf.encode(text, add_special_tokens=False))

  def _decode(self, ids: list[int]) -> str:
    return self.hf.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- prompts

SIGN = '{sign}'
# A private-use character: not whitespace (so Jinja's `trim` keeps it), never in a real prompt.
_MARKER = '\ue000SIGN\ue000'


@dataclasses.dataclass(frozen=True)
class PromptIds:
  """Token ids of one prompt, split where the sign tokens go.

  The model takes them as `rvlf_jax.models.slt.Prompt(before=jnp.asarray(ids.before, jnp.int32),
  after=...)`.

  Attributes:
    before: ids before the sign tokens (starting with bos where the template has one).
    after: ids between the sign tokens and the target (ending with the assistant turn's opening
      under a chat template).
  """

  before: list[int]
  after: list[int]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """The translation instruction and where the sign tokens sit in it.

  With a tokenizer that has a chat template, the instruction is the user message and the
  template is rendered with add_generation_prompt=True. Otherwise the prompt is plain:
  "<bos>{instruction}\\n". The two halves are tokenized separately (so a token never straddles
  the sign tokens); training and inference must both go through `prompt` to agree. The ids
  depend only on the tokenizer and language: compute them once, not per example.

  Attributes:
    instruction: the user message; must contain '{sign}' once (where the sign tokens go) and may
      contain '{language}'.
    system: optional system message (chat templates only).
  """

  instruction: str = '{sign}\nTranslate the sign language video into {language}.'
  system: str | None = None

  def __post_init__(self):
    if self.instruction.count(SIGN) != 1:
      raise ValueError(f'instruction must contain {SIGN!r} exactly once: {self.instruction!r}')

  def text(self, tokenizer: Tokenizer, language: str) -> str:
    """The rendered prompt with '{sign}' marking the sign tokens, for reading and logging."""
    return self._render(tokenizer, language).replace(_MARKER, SIGN)

  def prompt(self, tokenizer: Tokenizer, language: str) -> PromptIds:
    """The prompt ids around the sign tokens.

    Args:
      tokenizer: its chat template, if any, decides the format.
      language: fills '{language}', e.g. 'German'.

    Returns:
      A `PromptIds`; the model input is before + sign tokens + after + target.
    """
    rendered = self._render(tokenizer, language)
    if rendered.count(_MARKER) != 1:
      raise ValueError('the chat template dropped or repeated the sign position of the prompt.')
    before, after = rendered.split(_MARKER)
    if tokenizer.chat_template:
      # The rendered template spells bos and turn markers as text; encode turns them into ids.
      return PromptIds(before=tokenizer.encode(before), after=tokenizer.encode(after))
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return PromptIds(before=bos + tokenizer.encode(before), after=tokenizer.encode(after))

  def _render(self, tokenizer: Tokenizer, language: str) -> str:
    # str.replace rather than format, so braces elsewhere in the instruction stay literal.
    instruction = self.instruction.replace('{language}', language).replace(SIGN, _MARKER)
    if not tokenizer.chat_template:
      return instruction + '\n'
    messages = [{'role': 'user', 'content': instruction}]
    if self.system:
      messages.insert(0, {'role': 'system', 'content': self.system})
    return tokenizer.apply_chat_template(messages)


def target_ids(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> list[int]:
  """Ids the decoder learns to produce: the text then eos, cut to max_len keeping eos.

  Under a chat template the assistant turn ends at eos here, not at the template's end-of-turn
  marker; generation stops at eos accordingly.
  """
  ids = tokenizer.encode(text)
  if max_len is not None:
    if max_len < 1:
      raise ValueError(f'max_len must be at least 1, got {max_len}.')
    ids = ids[:max_len - 1]
  return ids + [tokenizer.eos_id]


def loss_mask(prefix_len: np.ndarray | Sequence[int] | int,
              target_len: np.ndarray | Sequence[int] | int, length: int) -> np.ndarray:
  """Marks the target tokens of sequences laid out as [prefix][target][pad].

  The prefix is everything before the target (prompt before, sign tokens, prompt after), so its
  length varies with the number of sign tokens. The mask is over the positions holding target
  tokens (labels); with next-token prediction, the logits at position p - 1 are scored against
  the token at p, so shift the mask left by one to weight logits. (`SLTModel.loss` needs none of
  this: it scores only the target rows, weighted by the mask of `encode_batch(texts, L,
  add_eos=True)`.)

  Args:
    prefix_len: int[B] (or a scalar) tokens before each target.
    target_len: int[B] (or a scalar) target tokens, eos included.
    length: L, the padded sequence length.

  Returns:
    bool[B, L] (bool[L] for scalar inputs), True on target positions; positions past L are cut.
  """
  prefix = np.asarray(prefix_len)
  target = np.asarray(target_len)
  pos = np.arange(length)
  return (pos >= prefix[..., None]) & (pos < (prefix + target)[..., None])
