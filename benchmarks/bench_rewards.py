r"""Issue item 5: our batched sentence BLEU + ROUGE-L rewards vs the per-pair loops users write.

  python -m benchmarks.bench_rewards [--quick]

1,024 (hypothesis, reference) pairs, G = 8 hypotheses per reference, built deterministically from
SynthSign sentences (`rvlf_jax.data.synthsign.grammar`): each group holds the reference itself,
another paraphrase of the same meaning, word dropout, swapped neighbours, a truncation, word
substitutions, an unrelated sentence and an empty output (an immediate EOS), the mix a GRPO batch
sees. Both sides score them cold (no tokenisation cached from a previous repetition):
  ours: `rvlf_jax.rl.rewards.compute(None, hyps, refs, group_size=8)` (0.5 BLEU + 0.5 ROUGE-L),
    and each reward alone;
  reference: a loop of `sacrebleu.sentence_bleu(hyp, [ref]).score / 100` and a loop of the plain
    O(|hyp| |ref|) LCS dynamic programme, F1 = 2 P R / (P + R) (the LCS F-measure the PyPI
    `rouge` package computes), on the same 13a tokens (sacrebleu's tokenizer, one per batch).
Every value is asserted equal to the reference (absolute difference <= 1e-9; BLEU is in fact bit
for bit). The PyPI `rouge` package is timed too when installed, for scale only: it tokenises
differently (splits sentences on '.', counts unique words), so its values are not compared.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from benchmarks import common

GROUP = 8
NUM_REFS = 128  # 128 x 8 = 1,024 pairs
TOLERANCE = 1e-9


def make_pairs(num_refs: int = NUM_REFS, group: int = GROUP, seed: int = 0
               ) -> tuple[list[str], list[str]]:
  """(hyps: num_refs * group hypotheses, refs: num_refs references), deterministic.

  Hypothesis g of a group is: 0 the reference, 1 another paraphrase of its meaning, 2 word
  dropout, 3 two neighbours swapped, 4 the first half, 5 two words replaced by words of another
  sentence, 6 another reference, 7 empty; groups larger than 8 cycle through them again.
  """
  from rvlf_jax.data.synthsign import grammar  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  meanings = [grammar.sample_meaning(rng) for _ in range(num_refs)]
  texts = [grammar.paraphrases(m, seed) for m in meanings]
  refs = [t[0] for t in texts]
  hyps = []
  for i, (ref, paraphrases) in enumerate(zip(refs, texts)):
    words = ref.split()
    other = refs[(i + 1 + int(rng.integers(max(num_refs - 1, 1)))) % num_refs].split()
    for g in range(group):
      kind = g % 8
      if kind == 0:
        hyp = ref
      elif kind == 1:
        hyp = paraphrases[1 + int(rng.integers(len(paraphrases) - 1))]
      elif kind == 2:
        hyp = ' '.join(w for w in words if rng.random() > 0.2)
      elif kind == 3:
        w = list(words)
        j = int(rng.integers(max(len(w) - 1, 1)))
        w[j:j + 2] = w[j:j + 2][::-1]
        hyp = ' '.join(w)
      elif kind == 4:
        hyp = ' '.join(words[:max(len(words) // 2, 1)])
      elif kind == 5:
        w = list(words)
        for j in rng.integers(len(w), size=2):
          w[j] = other[int(rng.integers(len(other)))]
        hyp = ' '.join(w)
      elif kind == 6:
        hyp = ' '.join(other)
      else:
        hyp = ''
      hyps.append(hyp)
  return hyps, refs


def lcs_dp(a: Sequence[str], b: Sequence[str]) -> int:
  """The textbook LCS dynamic programme, row by row."""
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def reference_rouge_l(hyp: str, ref: str, tokenizer=None) -> float:
  """Sentence ROUGE-L F1 by the plain DP on the 13a tokens (0 when the LCS is empty).

  Args:
    hyp, ref: the sentences.
    tokenizer: a `sacrebleu` 13a tokenizer (one per batch, so that a reference repeated over its
      group is tokenised once, as with ours); None: a fresh one.
  """
  from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer or Tokenizer13a()
  h, r = tokenizer(hyp.rstrip()).split(), tokenizer(ref.rstrip()).split()
  lcs = lcs_dp(h, r)
  if lcs == 0:
    return 0.0
  p, rec = lcs / len(h), lcs / len(r)
  return 2 * p * rec / (p + rec)


def reference_bleu(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
  """The loop users write: `sacrebleu.sentence_bleu` pair by pair, / 100."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return np.asarray([sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in zip(hyps, refs)])


def reference_rouge(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
  """The plain-DP ROUGE-L loop, with a fresh 13a tokenizer (nothing cached from a previous call)."""
  from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer13a()
  return np.asarray([reference_rouge_l(h, r, tokenizer) for h, r in zip(hyps, refs)])


def ours(hyps: Sequence[str], refs: Sequence[str], weights=None) -> dict[str, np.ndarray]:
  """Our rewards, cold: the tokeniser cache is cleared first, as for a fresh GRPO batch."""
  from rvlf_jax.eval import metrics  # pylint: disable=g-import-not-at-top
  from rvlf_jax.rl import rewards  # pylint: disable=g-import-not-at-top
  metrics._tokenize_13a.cache_clear()  # pylint: disable=protected-access
  return rewards.compute(weights, hyps, refs, group_size=GROUP)


def check(hyps: Sequence[str], refs: Sequence[str], got: dict[str, np.ndarray]
          ) -> dict[str, float]:
  """Asserts our values equal the reference loops; returns the max abs differences.

  Args:
    hyps: N hypotheses.
    refs: N / GROUP references.
    got: `ours(hyps, refs)`.
  """
  repeated = [r for r in refs for _ in range(GROUP)]
  bleu, rouge = reference_bleu(hyps, repeated), reference_rouge(hyps, repeated)
  diffs = {'bleu': float(np.max(np.abs(got['bleu'] - bleu))),
           'rouge_l': float(np.max(np.abs(got['rouge_l'] - rouge))),
           'total': float(np.max(np.abs(got['total'] - (0.5 * bleu + 0.5 * rouge))))}
  for name, diff in diffs.items():
    if not diff <= TOLERANCE:
      raise AssertionError(f'{name}: ours differs from the reference by {diff!r} '
                           f'(> {TOLERANCE}).')
  diffs['bleu_bit_identical'] = float(np.array_equal(got['bleu'], bleu))
  return diffs


def run(env: common.Env, quick: bool) -> common.Section:
  del env  # host-side Python and numpy; the matmul peak is not the reference here
  reps = 5 if quick else 10
  hyps, refs = make_pairs()
  repeated = [r for r in refs for _ in range(GROUP)]
  n = len(hyps)
  diffs = check(hyps, refs, ours(hyps, refs))

  t_ours = common.time_fn(lambda: ours(hyps, refs), reps=reps)
  t_ours_bleu = common.time_fn(lambda: ours(hyps, refs, {'bleu': 1.0}), reps=reps)
  t_ours_rouge = common.time_fn(lambda: ours(hyps, refs, {'rouge_l': 1.0}), reps=reps)
  t_bleu = common.time_fn(lambda: reference_bleu(hyps, repeated), reps=reps)
  t_rouge = common.time_fn(lambda: reference_rouge(hyps, repeated), reps=reps)
  loop = t_bleu.median + t_rouge.median

  rouge_pkg = None
  try:
    import rouge  # pylint: disable=g-import-not-at-top
  except ImportError:
    rouge = None
  if rouge is not None:
    scorer = rouge.Rouge(metrics=['rouge-l'])
    nonempty = [(h, r) for h, r in zip(hyps, repeated) if h.strip()]
    hs, rs = zip(*nonempty)
    start = time.perf_counter()
    scorer.get_scores(list(hs), list(rs))
    rouge_pkg = (time.perf_counter() - start, len(nonempty))

  rows = [
      ['BLEU + ROUGE-L (0.5 / 0.5)', t_ours, loop, loop / t_ours.median],
      ['BLEU alone', t_ours_bleu, t_bleu.median, t_bleu.median / t_ours_bleu.median],
      ['ROUGE-L alone', t_ours_rouge, t_rouge.median, t_rouge.median / t_ours_rouge.median],
  ]
  table_rows = [[name, f'{1e3 * t.median:.2f} ms ({1e3 * t.min:.2f}-{1e3 * t.max:.2f})',
                 f'{1e3 * ref:.1f} ms', f'{ratio:.1f}x', f'{n / t.median:,.0f}']
                for name, t, ref, ratio in rows]
  lines = [
      f'{n:,} (hypothesis, reference) pairs, G = {GROUP} hypotheses per reference, from '
      f'{len(refs)} SynthSign sentences (reference, paraphrase, dropout, swap, truncation, '
      'substitutions, unrelated, empty). Reference side: a loop of `sacrebleu.sentence_bleu` '
      f'(BLEU {t_bleu}) and a loop of the plain LCS DP F1 on the same 13a tokens, from sacrebleu\'s '
      f'tokenizer (ROUGE-L '
      f'{t_rouge}). Ours scores cold (tokeniser cache cleared each repetition).',
      '',
      common.table(['reward', 'ours (median, min-max)', 'reference loop (median)', 'speed-up',
                    'ours pairs/s'], table_rows),
      '',
      f'Values asserted equal: max |ours - reference| = {diffs["bleu"]:.1e} (BLEU; bit-identical:'
      f' {bool(diffs["bleu_bit_identical"])}), {diffs["rouge_l"]:.1e} (ROUGE-L), '
      f'{diffs["total"]:.1e} (weighted total); tolerance {TOLERANCE:g}.',
  ]
  figures = {'speed-up BLEU+ROUGE-L': loop / t_ours.median,
             'ours ms / 1024 pairs': 1e3 * t_ours.median,
             'reference loop ms': 1e3 * loop,
             'max abs diff': max(diffs['bleu'], diffs['rouge_l'])}
  if rouge_pkg is not None:
    seconds, count = rouge_pkg
    lines += ['', f'For scale: the PyPI `rouge` package (`Rouge(metrics=["rouge-l"]).get_scores`, '
              f'one run) takes {1e3 * seconds:.1f} ms for the {count} pairs with a non-empty '
              'hypothesis (it rejects empty ones); its values are not compared, since it splits on '
              "'.' and counts unique words."]
  return common.Section('Rewards: batched sentence BLEU + ROUGE-L, 1,024 pairs (issue item 5)',
                        '\n'.join(lines), figures)


if __name__ == '__main__':
  from benchmarks import run as run_lib  # pylint: disable=g-import-not-at-top
  run_lib.standalone(run)
