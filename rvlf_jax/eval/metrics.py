"""Corpus BLEU-1..4 and ROUGE-L, with the conventions of the sign language translation literature.

Tokenisation (`tokenize`) is shared by every metric here and by the GRPO rewards in `rvlf_jax.rl`:
  'en', 'de': sacrebleu's 13a tokeniser (mteval-v13a, the WMT default), applied to the
    right-stripped line exactly as sacrebleu does; case is kept.
  'zh': one token per non-space character (CSL-Daily is scored on characters in SLT papers), the
    same tokens as sacrebleu's 'char' tokeniser.

BLEU-n is cumulative, as papers report BLEU-1..4: brevity penalty x geometric mean of the 1..n-gram
precisions over the whole corpus. It is sacrebleu's corpus BLEU (default 'exp' smoothing, which
only acts when a whole corpus has no n-gram match) with `max_ngram_order=n`, computed from one pass
of sacrebleu's statistics.

ROUGE-L is the LCS F-measure of each sentence pair (beta = 1 by default, the F1 score), averaged
over sentences. It uses the same tokens as BLEU, so punctuation split off by 13a counts as tokens. A
pair where either side has no token scores 0. Conventions elsewhere differ: the PyPI `rouge` package
splits on '.' and counts unique words (it deduplicates repeated words), and nlg-eval / coco-caption
(used by some SLT code) uses beta = 1.2; pass `beta` to reproduce the latter.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Sequence

import sacrebleu
from sacrebleu.tokenizers import tokenizer_re

MAX_ORDER = 4

# Language -> sacrebleu tokeniser name. A language is added here, with a test.
_SACREBLEU_TOKENIZER = {'en': '13a', 'de': '13a', 'zh': 'char'}

# sacrebleu's own compiled 13a rules: [0] spaces out ASCII punctuation other than ' - . , and
# [1], [2], [3] split periods, commas and dashes depending on neighbouring digits.
_RULES = tokenizer_re.TokenizerRegexp()._re
# Rule [0] matches one character at a time, so a translation table does the same replacement
# several times faster than re.sub (whose template expansion runs in Python on 3.11).
_PUNCT_TABLE = str.maketrans({c: f' {c} ' for c in map(chr, range(128)) if _RULES[0][0].match(c)})


def _check_lang(lang: str) -> str:
  if lang not in _SACREBLEU_TOKENIZER:
    raise ValueError(f'Unknown language {lang!r}; known: {sorted(_SACREBLEU_TOKENIZER)}.')
  return _SACREBLEU_TOKENIZER[lang]


def tokenize(text: str, lang: str = 'en') -> tuple[str, ...]:
  """The tokens that BLEU and ROUGE-L count for one sentence.

  Args:
    text: one sentence.
    lang: 'en', 'de' (13a) or 'zh' (characters).

  Returns:
    The tokens, identical to `sacrebleu.BLEU(tokenize=...)` preprocessing followed by `.split()`.
  """
  if _check_lang(lang) == 'char':
    # sacrebleu's char tokeniser joins every character with spaces and then splits on whitespace.
    return tuple(c for c in text if not c.isspace())
  return _tokenize_13a(text.rstrip())


@functools.lru_cache(maxsize=2**16)  # a GRPO group repeats its reference G times
def _tokenize_13a(line: str) -> tuple[str, ...]:
  """sacrebleu's `Tokenizer13a()(line).split()`, token for token (a test fuzzes the two).

  Rules [1]-[3] can only match a line holding '.', ',' or '-', so other lines skip them.
  """
  line = line.replace('<skipped>', '').replace('-\n', '').replace('\n', ' ')
  if '&' in line:
    for entity, char in (('&quot;', '"'), ('&amp;', '&'), ('&lt;', '<'), ('&gt;', '>')):
      line = line.replace(entity, char)
  line = f' {line} '.translate(_PUNCT_TABLE)
  if '.' in line or ',' in line:
    for pattern, repl in _RULES[1:3]:
      line = pattern.sub(repl, line)
  if '-' in line:
    pattern, repl = _RULES[3]
    line = pattern.sub(repl, line)
  return tuple(line.split())


def match_masks(ref_tokens: Sequence[str]) -> dict[str, int]:
  """For each token of a reference, the bit mask of the positions where it occurs.

  Built once per reference and reused for every hypothesis scored against it (`lcs_length`).
  """
  masks: dict[str, int] = {}
  for i, token in enumerate(ref_tokens):
    masks[token] = masks.get(token, 0) | (1 << i)
  return masks


def lcs_length(hyp_tokens: Sequence[str], ref_tokens: Sequence[str],
               ref_masks: dict[str, int] | None = None) -> int:
  """Length of the longest common subsequence, bit-parallel over the reference positions.

  Hyyro's (2004) formulation of the Allison-Dix algorithm: one big-integer update per hypothesis
  token instead of a row of the O(|hyp| |ref|) DP table; the zero bits of `v` count the LCS.

  Args:
    hyp_tokens: the hypothesis tokens.
    ref_tokens: the reference tokens.
    ref_masks: `match_masks(ref_tokens)`, when already computed.

  Returns:
    The LCS length.
  """
  masks = match_masks(ref_tokens) if ref_masks is None else ref_masks
  m = len(ref_tokens)
  full = (1 << m) - 1
  v = full
  for token in hyp_tokens:
    u = v & masks.get(token, 0)
    if u:  # u == 0 leaves v unchanged
      v = ((v + u) | (v - u)) & full
  return m - v.bit_count()


def rouge_l_from_lcs(lcs: int, hyp_len: int, ref_len: int, beta: float = 1.0) -> float:
  """ROUGE-L F-measure from the LCS length: (1 + b^2) P R / (R + b^2 P), 0 when P or R is 0."""
  if lcs == 0:  # also covers an empty hypothesis or reference
    return 0.0
  precision = lcs / hyp_len
  recall = lcs / ref_len
  # coco-caption's Rouge.calc_score in the same operation order: on the same tokens, beta = 1.2
  # reproduces it exactly.
  return ((1 + beta**2) * precision * recall) / (recall + beta**2 * precision)


def sentence_rouge_l(hyp_tokens: Sequence[str], ref_tokens: Sequence[str],
                     beta: float = 1.0) -> float:
  """ROUGE-L F-measure of one tokenised pair, in [0, 1]."""
  return rouge_l_from_lcs(lcs_length(hyp_tokens, ref_tokens), len(hyp_tokens), len(ref_tokens),
                          beta)


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
  if isinstance(hyps, str) or isinstance(refs, str):
    raise TypeError('hyps and refs are sequences of sentences, not single strings.')
  if len(hyps) != len(refs):
    raise ValueError(f'Got {len(hyps)} hypotheses but {len(refs)} references; '
                     'they must pair one to one.')
  if not hyps:
    raise ValueError('Cannot score an empty corpus (0 hypotheses, 0 references).')


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str = 'en') -> dict[str, float]:
  """Cumulative corpus BLEU-1..4 (percentages) with one reference per hypothesis.

  Returns:
    {'bleu1': ..., 'bleu4': ...}; 'bleu4' is `sacrebleu.corpus_bleu(hyps, [refs]).score`.
  """
  _check_pairs(hyps, refs)
  bleu = sacrebleu.BLEU(tokenize=_check_lang(lang), max_ngram_order=MAX_ORDER)
  stats = bleu.corpus_score(list(hyps), [list(refs)])
  scores = {}
  for n in range(1, MAX_ORDER + 1):
    # Orders <= n have the same statistics whatever the maximum order, so BLEU-n is
    # `BLEU(max_ngram_order=n)` evaluated on the first n counts; lists are copied because
    # compute_bleu may modify them in place.
    score = sacrebleu.BLEU.compute_bleu(
        list(stats.counts[:n]), list(stats.totals[:n]), stats.sys_len, stats.ref_len,
        smooth_method=bleu.smooth_method, max_ngram_order=n)
    scores[f'bleu{n}'] = score.score
  return scores


def corpus_rouge_l(hyps: Sequence[str], refs: Sequence[str], lang: str = 'en',
                   beta: float = 1.0) -> float:
  """Sentence-level ROUGE-L F-measure averaged over the corpus, as a percentage."""
  _check_pairs(hyps, refs)
  total = math.fsum(sentence_rouge_l(tokenize(h, lang), tokenize(r, lang), beta)
                    for h, r in zip(hyps, refs))
  return 100.0 * total / len(hyps)


def score_corpus(hyps: Sequence[str], refs: Sequence[str], lang: str = 'en') -> dict[str, float]:
  """BLEU-1..4 and ROUGE-L of a corpus with one reference per hypothesis.

  Args:
    hyps: N hypothesis sentences.
    refs: N reference sentences, refs[i] the reference of hyps[i].
    lang: 'en', 'de' or 'zh' (see the module docstring for the tokenisation of each).

  Returns:
    {'bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l'}, all percentages in [0, 100].
  """
  scores = corpus_bleu(hyps, refs, lang)
  scores['rouge_l'] = corpus_rouge_l(hyps, refs, lang)
  return scores


def read_lines(path: str | pathlib.Path) -> list[str]:
  """One sentence per line (UTF-8); a final newline does not start another sentence."""
  text = pathlib.Path(path).read_text(encoding='utf-8')
  # split('\n') rather than splitlines(), which also breaks on form feeds, U+2028, etc.
  lines = text.split('\n')
  if lines[-1] == '':
    lines.pop()
  return [line.rstrip('\r') for line in lines]


def score_files(hyp_path: str | pathlib.Path, ref_path: str | pathlib.Path,
                lang: str = 'en') -> dict[str, float]:
  """`score_corpus` of two files with one sentence per line, line i of each paired."""
  hyps, refs = read_lines(hyp_path), read_lines(ref_path)
  if len(hyps) != len(refs):
    raise ValueError(f'{hyp_path} has {len(hyps)} lines but {ref_path} has {len(refs)}; '
                     'hypothesis and reference files must pair line by line.')
  return score_corpus(hyps, refs, lang)
