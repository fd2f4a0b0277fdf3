"""Corpus BLEU-1..4 and ROUGE-L against sacrebleu, the BLEU-n definition and a plain LCS DP."""

import collections
import math
import random
import re

import numpy as np
import pytest
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from rvlf_jax.eval import metrics

# Word-level corpus without punctuation (so 13a tokens are the words) where every n-gram order
# up to 4 has matches: BLEU-n then needs no smoothing and follows the textbook definition.
HYPS = [
    'am tag scheint die sonne im norden',
    'morgen regnet es im süden und westen',
    'the cat sat on the mat',
    'in der nacht wird es kalt',
    'heute abend gibt es gewitter im osten und im westen',
]
REFS = [
    'am tag scheint im norden die sonne',
    'morgen regnet es im süden',
    'the cat is on the mat',
    'in der nacht wird es sehr kalt im süden',
    'heute abend gibt es gewitter im osten',
]


def _bleu_n_by_definition(hyps, refs, n):
  """Cumulative BLEU-n: brevity penalty x geometric mean of the clipped 1..n-gram precisions."""
  correct, total = [0] * n, [0] * n
  hyp_len = ref_len = 0
  for h, r in zip(hyps, refs):
    h, r = h.split(), r.split()
    hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
    for k in range(1, n + 1):
      hc = collections.Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
      rc = collections.Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
      correct[k - 1] += sum(min(c, rc[g]) for g, c in hc.items())
      total[k - 1] += sum(hc.values())
  bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  return 100 * bp * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / n)


def _lcs_dp(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def _rouge_l_reference(hyp, ref):
  """Plain sentence ROUGE-L F1 on whitespace tokens."""
  h, r = hyp.split(), ref.split()
  lcs = _lcs_dp(h, r)
  if lcs == 0:
    return 0.0
  p, rec = lcs / len(h), lcs / len(r)
  return 2 * p * rec / (p + rec)


def test_bleu4_is_sacrebleu_corpus_bleu_and_bleu_n_follows_the_definition():
  scores = metrics.score_corpus(HYPS, REFS, lang='de')
  assert scores['bleu4'] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
  for n in range(1, 5):
    expected = sacrebleu.BLEU(max_ngram_order=n).corpus_score(HYPS, [REFS]).score
    assert scores[f'bleu{n}'] == pytest.approx(expected, abs=1e-12)
    assert scores[f'bleu{n}'] == pytest.approx(_bleu_n_by_definition(HYPS, REFS, n), abs=1e-9)
  assert scores['bleu1'] > scores['bleu2'] > scores['bleu3'] > scores['bleu4'] > 0


def test_bleu1_by_hand():
  # 5 of 6 unigrams match ('is' is missing); lengths are equal, so no brevity penalty.
  scores = metrics.score_corpus(['the cat sat on the mat'], ['the cat is on the mat'])
  assert scores['bleu1'] == pytest.approx(100 * 5 / 6)
  # Matched bigrams: 'the cat', 'on the', 'the mat' of 5.
  assert scores['bleu2'] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))


def test_bleu_uses_13a_tokens():
  hyps, refs = ['Hello, world! It costs 1,000.50 $.'], ['Hello world! It costs 1,000.50 $ .']
  assert metrics.score_corpus(hyps, refs)['bleu4'] == sacrebleu.corpus_bleu(hyps, [refs]).score
  assert metrics.tokenize(hyps[0]) == ('Hello', ',', 'world', '!', 'It', 'costs', '1,000.50', '$',
                                       '.')


def test_rouge_l_is_mean_sentence_lcs_f1():
  rng = random.Random(0)
  words = 'a b c d e'.split()  # a small vocabulary, so tokens repeat and LCS paths branch
  hyps = [' '.join(rng.choices(words, k=rng.randint(0, 9))) for _ in range(60)]
  refs = [' '.join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(60)]
  expected = 100 * np.mean([_rouge_l_reference(h, r) for h, r in zip(hyps, refs)])
  assert metrics.corpus_rouge_l(hyps, refs) == pytest.approx(expected, rel=1e-12)
  assert metrics.score_corpus(hyps, refs)['rouge_l'] == pytest.approx(expected, rel=1e-12)


def test_rouge_l_beta_is_the_coco_caption_formula():
  # coco-caption / nlg-eval: (1 + b^2) P R / (R + b^2 P) with b = 1.2. LCS 'a c d' = 3 of 4 and 5.
  p, r = 3 / 4, 3 / 5
  got = metrics.sentence_rouge_l('a b c d'.split(), 'a c e d f'.split(), beta=1.2)
  assert got == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
  assert metrics.sentence_rouge_l('a b c d'.split(), 'a c e d f'.split()) == pytest.approx(
      2 * p * r / (p + r))


def test_rouge_l_matches_the_rouge_package_where_its_conventions_agree():
  """The PyPI `rouge` package (1.0.1) scores the same LCS F1, up to its + 1e-8 in the denominator,
  on sentences without '.' and without repeated words; it splits on '.' and counts unique words
  (`exclusive=True`) otherwise, so it differs from the LCS F1 there."""
  rouge = pytest.importorskip('rouge')
  rng = random.Random(1)
  vocab = [f'w{i}' for i in range(12)]
  hyps = [' '.join(rng.sample(vocab, rng.randint(1, 8))) for _ in range(50)]
  refs = [' '.join(rng.sample(vocab, rng.randint(1, 8))) for _ in range(50)]
  theirs = rouge.Rouge(metrics=['rouge-l']).get_scores(hyps, refs, avg=True)['rouge-l']['f']
  assert metrics.corpus_rouge_l(hyps, refs) == pytest.approx(100 * theirs, abs=1e-5)


def test_lcs_bit_parallel_equals_dp():
  rng = random.Random(2)
  for _ in range(300):
    a = rng.choices('abcd', k=rng.randint(0, 70))  # up to 70 positions: past one 64-bit word
    b = rng.choices('abcd', k=rng.randint(0, 70))
    assert metrics.lcs_length(a, b) == _lcs_dp(a, b)


def test_chinese_is_scored_on_characters():
  hyps = ['今天天气很好，我们去公园。', '明天 下雨']
  refs = ['今天天气不错，我们去公园吧。', '明天会下雨']
  assert metrics.tokenize('明天 下雨 ab', 'zh') == ('明', '天', '下', '雨', 'a', 'b')
  scores = metrics.score_corpus(hyps, refs, lang='zh')
  # The same as scoring the space-separated characters, as SLT papers do for CSL-Daily.
  def spaced(s):
    return ' '.join(c for c in s if not c.isspace())

  assert scores == pytest.approx(metrics.score_corpus([spaced(h) for h in hyps],
                                                      [spaced(r) for r in refs], lang='en'))
  assert scores['bleu4'] == sacrebleu.corpus_bleu(hyps, [refs], tokenize='char').score
  # Whole sentences share no word, so word-level scoring would give ~0.
  assert scores['bleu1'] > 50 and metrics.score_corpus(hyps, refs)['bleu4'] < 1


def test_13a_equals_sacrebleu_on_fuzzed_text():
  rng = random.Random(3)
  pieces = (list('abcXYZ019 .,-\'"!?()[]{}<>/\\:;@#$%^&*_+=|~`\n\t') +
            ['é', 'ß', 'ü', '中', '文', '١', '\u00a0', '\u2028', '<skipped>', '&amp;',
             '&quot;', '&lt;', '&gt;', '-\n', '1,000', '3.5', 'e.g.', ' . ', 'U.S.', '--', '...'])
  ref_tok = Tokenizer13a()
  for _ in range(3000):
    text = ''.join(rng.choices(pieces, k=rng.randint(0, 25)))
    assert metrics.tokenize(text) == tuple(ref_tok(text.rstrip()).split()), repr(text)


def test_13a_punctuation_table_covers_exactly_the_first_13a_rule():
  rule = re.compile(r'([\{-\~\[-\` -\&\(-\+\:-\@\/])')  # sacrebleu tokenizer_re.py, rule 1
  matching = {chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and rule.match(chr(c))}
  assert matching == {chr(c) for c in metrics._PUNCT_TABLE}


def test_mismatched_lengths_name_both_counts():
  with pytest.raises(ValueError, match='3 hypotheses but 2 references'):
    metrics.score_corpus(['a', 'b', 'c'], ['a', 'b'])
  with pytest.raises(ValueError, match='empty corpus'):
    metrics.score_corpus([], [])
  with pytest.raises(ValueError, match="Unknown language 'fr'"):
    metrics.score_corpus(['a'], ['a'], lang='fr')


def test_score_files(tmp_path):
  hyp_path, ref_path = tmp_path / 'hyp.txt', tmp_path / 'ref.txt'
  hyp_path.write_text('\n'.join(HYPS) + '\n', encoding='utf-8')
  ref_path.write_text('\r\n'.join(REFS), encoding='utf-8')  # no final newline, CRLF
  assert metrics.score_files(hyp_path, ref_path, 'de') == metrics.score_corpus(HYPS, REFS, 'de')
  ref_path.write_text('\n'.join(REFS[:3]) + '\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r'hyp\.txt has 5 lines but .*ref\.txt has 3'):
    metrics.score_files(hyp_path, ref_path, 'de')
