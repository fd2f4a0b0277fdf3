"""Batched rewards against sacrebleu.sentence_bleu and a plain ROUGE-L DP, pair by pair."""

import random

import numpy as np
import pytest
import sacrebleu

from rvlf_jax.eval import metrics
from rvlf_jax.rl import registry, rewards

_PIECES = (['the', 'The', 'cat', 'sat', 'on', 'mat', 'a', 'dog', 'und', 'der', 'Straße', 'über',
            'naïve', '中文', 'emoji🙂', "don't", 'e.g.', 'U.S.', '3.5', '1,000', '12-3', '(x)',
            '&amp;', '<skipped>'] + list('.,!?;:-"\'()') + ['  ', '\t'])


def _random_pairs(n, seed):
  """Hypotheses sampled around their references: empty, identical, edited, unrelated."""
  rng = random.Random(seed)
  pairs = []
  for i in range(n):
    ref = ' '.join(rng.choices(_PIECES, k=rng.randint(1, 20)))
    kind = i % 5
    if kind == 0:
      hyp = '' if i % 10 == 0 else ' '
    elif kind == 1:
      hyp = ref
    elif kind == 2:
      words = ref.split()
      rng.shuffle(words)
      hyp = ' '.join(words[:rng.randint(0, len(words))] + rng.choices(_PIECES, k=rng.randint(0, 4)))
    elif kind == 3:
      words = ref.split()
      hyp = ' '.join(w for w in words if rng.random() < 0.8) + rng.choice(['', '.', ' !'])
    else:
      hyp = ' '.join(rng.choices(_PIECES, k=rng.randint(1, 25)))
    pairs.append((hyp, ref))
  return pairs


def _rouge_l_reference(hyp_tokens, ref_tokens):
  """Plain LCS DP and F1."""
  table = np.zeros((len(hyp_tokens) + 1, len(ref_tokens) + 1), np.int64)
  for i, x in enumerate(hyp_tokens):
    for j, y in enumerate(ref_tokens):
      table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
  lcs = table[-1, -1]
  if lcs == 0:
    return 0.0
  p, r = lcs / len(hyp_tokens), lcs / len(ref_tokens)
  return 2 * p * r / (p + r)


def test_bleu_is_sacrebleu_sentence_bleu_bit_for_bit():
  pairs = _random_pairs(300, seed=0) + [('', ''), ('a', ''), ('same words', 'same words')]
  hyps, refs = zip(*pairs)
  got = rewards.compute({'bleu': 1.0}, hyps, refs)['bleu']
  expected = np.asarray([sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in pairs])
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
  np.testing.assert_array_equal(got, expected)  # the same operations, so even the same bits
  assert got[1] == pytest.approx(1.0) and got[0] == 0.0  # identical pair, empty hypothesis


def test_bleu_on_every_short_sentence_pair_alone_and_batched():
  # Every sentence over {a, b} of 0..3 words: batches shorter than the n-gram orders, repeats.
  sents = ['']
  for length in range(3):
    sents += [f'{s} {w}'.strip() for s in sents for w in 'ab' if len(s.split()) == length]
  pairs = [(h, r) for h in sents for r in sents]
  expected = np.asarray([sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in pairs])
  np.testing.assert_array_equal(rewards.compute({'bleu': 1.0}, *zip(*pairs))['bleu'], expected)
  alone = [rewards.compute({'bleu': 1.0}, [h], [r])['bleu'][0] for h, r in pairs]
  np.testing.assert_array_equal(alone, expected)


def test_bleu_chinese_characters_match_sacrebleu_char():
  pairs = [('今天天气很好', '今天天气不错'), ('明天 下雨。', '明天会下雨。'),
           ('', '好')]
  got = rewards.compute({'bleu': 1.0}, *zip(*pairs), lang='zh')['bleu']
  expected = [sacrebleu.sentence_bleu(h, [r], tokenize='char').score / 100 for h, r in pairs]
  np.testing.assert_array_equal(got, expected)


def test_rouge_l_matches_plain_dp():
  pairs = _random_pairs(300, seed=1)
  got = rewards.compute({'rouge_l': 1.0}, *zip(*pairs))['rouge_l']
  expected = [_rouge_l_reference(metrics.tokenize(h), metrics.tokenize(r)) for h, r in pairs]
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_group_references_are_shared_and_order_does_not_matter():
  pairs = _random_pairs(48, seed=2)
  group = 4
  refs_per_group = [r for _, r in pairs[::group]]
  hyps = [h for h, _ in pairs]
  repeated = [r for r in refs_per_group for _ in range(group)]
  weights = {'bleu': 0.3, 'rouge_l': 0.7}
  a = rewards.compute(weights, hyps, repeated)
  b = rewards.compute(weights, hyps, refs_per_group, group_size=group)
  for key in ('bleu', 'rouge_l', 'total'):
    np.testing.assert_array_equal(a[key], b[key])
  batch = rewards.Pairs(hyps, refs_per_group, group_size=group)
  assert len(batch.ref_texts) == len(set(refs_per_group))
  # One pair scored alone gives the same value as inside the batch.
  for i in (0, 5, 47):
    alone = rewards.compute(weights, [hyps[i]], [repeated[i]])
    assert alone['total'][0] == a['total'][i]


def test_total_is_the_weighted_sum_and_penalties():
  hyps = ['the cat sat on the mat', '', 'the cat', 'the cat sat on the mat and on the sofa too']
  refs = ['the cat sat on the mat'] * 4
  out = rewards.compute(None, hyps, refs)
  np.testing.assert_allclose(out['total'], 0.5 * out['bleu'] + 0.5 * out['rouge_l'])
  assert set(out) == {'bleu', 'rouge_l', 'total'}
  out = rewards.compute([('bleu', 1.0), ('length_penalty', 0.1), ('empty_penalty', 1.0)], hyps,
                        refs)
  np.testing.assert_allclose(out['length_penalty'], [0.0, -1.0, -2 / 3, -5 / 6])
  np.testing.assert_array_equal(out['empty_penalty'], [0.0, -1.0, 0.0, 0.0])
  np.testing.assert_allclose(out['total'],
                             out['bleu'] + 0.1 * out['length_penalty'] + out['empty_penalty'])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='Got 3 hypotheses but 2 references'):
    rewards.compute(None, ['a', 'b', 'c'], ['a', 'b'])
  with pytest.raises(ValueError, match='expected 4 or 2'):
    rewards.compute(None, ['a'] * 4, ['a'] * 3, group_size=2)
  with pytest.raises(KeyError, match="Unknown reward 'meteor'"):
    rewards.compute({'meteor': 1.0}, ['a'], ['a'])
  with pytest.raises(ValueError, match='reserved'):
    rewards.register('total')


def test_registry():
  table = registry.Registry('thing')

  @table.register('double')
  def double(x):
    return 2 * x

  assert table.get('double')(3) == 6 and table.names() == ['double'] and 'double' in table
  with pytest.raises(ValueError, match='already registered'):
    table.register('double')(lambda x: x)
  table.register('double', override=True)(lambda x: 4 * x)
  assert table.get('double')(3) == 12
  assert {'bleu', 'rouge_l', 'length_penalty', 'empty_penalty'} <= set(rewards.names())
