r"""Scores translations against references: BLEU-1..4 and ROUGE-L, as SLT papers report them.

  python -m launch.evaluate --hyps=out/hyps.txt --refs=out/refs.txt --lang=de

Both files hold one sentence per line (UTF-8), line i of one paired with line i of the other, as
`rvlf_jax.eval.evaluate.evaluate(..., output_dir=...)` writes them. --lang picks the tokenisation
(de, en: sacrebleu's 13a; zh: characters; see `rvlf_jax.eval.metrics`). Prints a readable summary,
then, as its last line, one JSON object {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"} of
percentages. A missing file or files of different lengths end it with a message and exit code 1.
"""

import json
import os

from absl import app
from absl import flags

from rvlf_jax.eval import metrics

_HYPS = flags.DEFINE_string('hyps', None, 'Hypotheses, one sentence per line.', required=True)
_REFS = flags.DEFINE_string('refs', None, 'References, one sentence per line.', required=True)
_LANG = flags.DEFINE_enum('lang', 'en', ['de', 'en', 'zh'], 'Language of the translations.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  hyps, refs = _HYPS.value, _REFS.value
  for flag, path in (('hyps', hyps), ('refs', refs)):
    if not os.path.isfile(path):
      raise SystemExit(f'launch.evaluate: --{flag}={path} is not a file.')
  try:
    scores = metrics.score_files(hyps, refs, _LANG.value)
  except ValueError as e:  # line counts differ, an empty corpus, or not UTF-8
    raise SystemExit(f'launch.evaluate: cannot score {hyps} against {refs}: {e}') from e
  print(f'{hyps} vs {refs} ({_LANG.value}): ' +
        ', '.join(f'{name} {value:.2f}' for name, value in scores.items()))
  print(json.dumps(scores))


if __name__ == '__main__':
  app.run(main)
