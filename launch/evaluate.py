r"""Scores translations against references: BLEU-1..4 and ROUGE-L, as SLT papers report them.

File mode scores two text files:

  python -m launch.evaluate --hyps=out/hyps.txt --refs=out/refs.txt --lang=de

Both files hold one sentence per line (UTF-8), line i of one paired with line i of the other, as
`rvlf_jax.eval.evaluate.evaluate(..., output_dir=...)` writes them. --lang picks the tokenisation
(de, en: sacrebleu's 13a; zh: characters; see `rvlf_jax.eval.metrics`).

Checkpoint mode translates a split with a trained checkpoint and scores it:

  python -m launch.evaluate --checkpoint=/tmp/rvlf --split=test
  python -m launch.evaluate --checkpoint=/tmp/rvlf --split=dev --checkpoint_stage=sft \
      --decode=beam --beam_size=4 --output_dir=/tmp/rvlf-sft-dev

--checkpoint is the --workdir of a launch.train run; --checkpoint_stage picks its GRPO or SFT
translator (default: GRPO if it was trained, else SFT), restored at its best dev BLEU-4, or the
control run's last state (control); decoding
follows the run's config (eval.*) unless --decode/--beam_size say otherwise, and the config's data.lang picks
the tokenisation. The data are read as the run prepared them (`rvlf_jax.recipe.run.context`
reuses the workdir's caches). --output_dir also writes the hypotheses, references and ids.
--synthsign_size=large scores a SynthSign run on the 3,000 clips of SynthSign large's split
rather than the default's 300 (the default's come first), where BLEU-4 differences of a point
are no longer inside the split's noise.

Either mode prints a readable summary, then, as its last line, one JSON object
{"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"} of percentages. Bad input (a missing file, files
of different lengths, a workdir without checkpoints, both modes or neither) ends it with a
message and exit code 1.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from rvlf_jax.eval import metrics

_HYPS = flags.DEFINE_string('hyps', None, 'File mode: hypotheses, one sentence per line.')
_REFS = flags.DEFINE_string('refs', None, 'File mode: references, one sentence per line.')
_LANG = flags.DEFINE_enum('lang', 'en', ['de', 'en', 'zh'],
                          'File mode: language of the translations.')
# See launch/translate.py: these names are defined by other launchers too.
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Checkpoint mode: the --workdir of a launch.train run.',
                                  allow_override=True)
# Here it also takes 'control' (translate and export_hf, which define it too, do not).
_STAGE = flags.DEFINE_enum('checkpoint_stage', None, ['sft', 'grpo', 'control'],
                           'Which translator; default: grpo if trained, else sft; control: SFT '
                           'continued for the GRPO stage\'s time (launch.train --stage=control).',
                           allow_override=True)
_SPLIT = flags.DEFINE_enum('split', None, ['dev', 'test'], 'Checkpoint mode: the split to score.')
_DECODE = flags.DEFINE_enum('decode', None, ['greedy', 'beam'],
                            'Decoding; default: the config\'s eval.decode.', allow_override=True)
_BEAM_SIZE = flags.DEFINE_integer('beam_size', None,
                                  'Beam size; default: the config\'s eval.beam_size.',
                                  allow_override=True)
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None,
                                  'Checkpoint mode: also write hyps.txt, refs.txt, ids.txt here.')
_SYNTHSIGN_SIZE = flags.DEFINE_enum(
    'synthsign_size', None, ['default', 'large'],
    'Checkpoint mode, SynthSign runs: score --split of this larger SynthSign, whose first clips '
    'are the run\'s own (large: 3,000 test clips rather than 300); their frame features are '
    'cached once under WORKDIR/features_<size>.')

_FILE_FLAGS = ('hyps', 'refs')
_CHECKPOINT_FLAGS = ('split', 'checkpoint_stage', 'decode', 'beam_size', 'output_dir',
                     'synthsign_size')


def _given(names) -> list[str]:
  return [f'--{name}' for name in names if flags.FLAGS[name].value is not None]


def score_files(hyps: str, refs: str, lang: str) -> dict[str, float]:
  for flag, path in (('hyps', hyps), ('refs', refs)):
    if not os.path.isfile(path):
      raise SystemExit(f'launch.evaluate: --{flag}={path} is not a file.')
  try:
    scores = metrics.score_files(hyps, refs, lang)
  except ValueError as e:  # line counts differ, an empty corpus, or not UTF-8
    raise SystemExit(f'launch.evaluate: cannot score {hyps} against {refs}: {e}') from e
  print(f'{hyps} vs {refs} ({lang}): ' +
        ', '.join(f'{name} {value:.2f}' for name, value in scores.items()))
  return scores


def score_checkpoint(workdir: str, split: str) -> dict[str, float]:
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  from rvlf_jax.recipe import artifacts  # pylint: disable=g-import-not-at-top  (heavy; this mode)
  log = lambda line: print(line, file=sys.stderr, flush=True)
  try:
    stage = artifacts.pick_stage(workdir, _STAGE.value)
    scores = artifacts.evaluate_checkpoint(
        workdir, split, stage, decode=_DECODE.value, beam_size=_BEAM_SIZE.value,
        output_dir=_OUTPUT_DIR.value, synthsign_size=_SYNTHSIGN_SIZE.value, log=log)
  except (ValueError, OSError) as e:
    raise SystemExit(f'launch.evaluate: cannot score {workdir}: {e}') from e
  where = f'{split} ({_SYNTHSIGN_SIZE.value})' if _SYNTHSIGN_SIZE.value else split
  print(f'{workdir} {stage} {where}: ' +
        ', '.join(f'{name} {value:.2f}' for name, value in scores.items()))
  return scores


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  file_flags = _given(_FILE_FLAGS)
  if _CHECKPOINT.value is not None:
    if file_flags:
      raise SystemExit(f'launch.evaluate: {" and ".join(file_flags)} (file mode) and '
                       '--checkpoint (checkpoint mode) exclude each other; give one mode.')
    if _SPLIT.value is None:
      raise SystemExit('launch.evaluate: --checkpoint needs --split=dev or --split=test.')
    scores = score_checkpoint(_CHECKPOINT.value, _SPLIT.value)
  elif file_flags:
    if len(file_flags) < 2:
      raise SystemExit('launch.evaluate: file mode needs both --hyps and --refs.')
    extra = _given(_CHECKPOINT_FLAGS)
    if extra:
      raise SystemExit(f'launch.evaluate: {", ".join(extra)} belong to checkpoint mode '
                       '(--checkpoint); file mode takes --hyps, --refs and --lang.')
    scores = score_files(_HYPS.value, _REFS.value, _LANG.value)
  else:
    raise SystemExit('launch.evaluate: nothing to score; give --hyps and --refs (file mode) or '
                     '--checkpoint and --split (checkpoint mode).')
  print(json.dumps(scores))


if __name__ == '__main__':
  app.run(main)
