"""launch.evaluate: file scoring as a subprocess and in process, and its error messages."""

import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from launch import evaluate
from rvlf_jax.eval import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HYPS = ['der wind weht heute stark .', 'am abend regen im norden', 'morgen sonne']
REFS = ['heute weht der wind stark .', 'am abend regnet es im norden', 'morgen viel sonne']


def write(path, lines):
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return str(path)


def run_cli(**values):
  """Runs evaluate.main in this process with the given flag values."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    evaluate.main(['evaluate'])


def test_subprocess_prints_json_last(tmp_path):
  hyps, refs = write(tmp_path / 'h.txt', HYPS), write(tmp_path / 'r.txt', REFS)
  env = {**os.environ, 'PYTHONPATH': REPO}
  result = subprocess.run([sys.executable, '-m', 'launch.evaluate', f'--hyps={hyps}',
                           f'--refs={refs}', '--lang=de'], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  assert scores == pytest.approx(metrics.score_corpus(HYPS, REFS, 'de'))
  assert list(scores) == ['bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l']


def test_in_process_and_errors(tmp_path, capsys):
  hyps, refs = write(tmp_path / 'h.txt', HYPS), write(tmp_path / 'r.txt', REFS)
  run_cli(hyps=hyps, refs=refs, lang='zh')
  out = capsys.readouterr().out.splitlines()
  assert json.loads(out[-1]) == metrics.score_corpus(HYPS, REFS, 'zh')
  assert out[0].startswith(f'{hyps} vs {refs} (zh): bleu1 ')

  with pytest.raises(SystemExit, match=re.escape(f'--refs={tmp_path / "none.txt"} is not a file')):
    run_cli(hyps=hyps, refs=str(tmp_path / 'none.txt'))
  short = write(tmp_path / 'short.txt', REFS[:2])
  with pytest.raises(SystemExit, match=re.escape(f'{hyps} has 3 lines but {short} has 2')):
    run_cli(hyps=hyps, refs=short)
  empty = write(tmp_path / 'empty.txt', [])
  with pytest.raises(SystemExit, match=re.escape(f'cannot score {empty} against {empty}: ') +
                     '.*empty corpus'):
    run_cli(hyps=empty, refs=empty)
