"""launch.translate, launch.export_hf and launch.evaluate's checkpoint mode on the tiny run.

They live here rather than in tests/launch/ because they read the `tiny_run` fixture.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from launch import evaluate as evaluate_launch
from launch import export_hf as export_launch
from launch import translate as translate_launch
from rvlf_jax.recipe import artifacts
from rvlf_jax.recipe import export as export_lib
from rvlf_jax.recipe import run as run_lib
from tests.recipe.test_artifacts import write_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every flag the checkpoint launchers share (several define them; the last definition stands):
# each call sets them all rather than relying on whichever definition the process saw last.
SHARED = dict(checkpoint=None, checkpoint_stage=None, decode=None, beam_size=None)


def run_main(module, **values):
  """module.main in this process with the given flag values."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**{**SHARED, **values}):
    module.main([module.__name__])


@pytest.fixture(scope='module')
def clip(tiny_run, tmp_path_factory):
  return write_clip(tiny_run.config, tiny_run.workdir, str(tmp_path_factory.mktemp('clip')))


def test_translate_prints_the_translation_last(tiny_run, clip):
  _, pose_path, frames_dir = clip
  expected = artifacts.translate_clip(artifacts.load_translator(tiny_run.workdir),
                                      pose=pose_path, frames=frames_dir)
  env = {**os.environ, 'PYTHONPATH': REPO}
  if jax.config.jax_compilation_cache_dir:  # the session's cache (tests/conftest.py), if any
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2')
  result = subprocess.run(
      [sys.executable, '-m', 'launch.translate', f'--checkpoint={tiny_run.workdir}',
       f'--pose={pose_path}', f'--frames={frames_dir}'], cwd=REPO, env=env,
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.endswith('\n') and result.stdout.splitlines()[-1] == expected
  assert 'restored the best grpo checkpoint' in result.stderr


def test_translate_errors_are_one_line(tiny_run, clip):
  _, pose_path, _ = clip
  with pytest.raises(SystemExit, match=r'^launch.translate: .*reads frame features'):
    run_main(translate_launch, checkpoint=tiny_run.workdir, pose=pose_path, video=None,
             frames=None)
  with pytest.raises(SystemExit, match=r'^launch.translate: --checkpoint=WORKDIR .* required'):
    run_main(translate_launch, pose=pose_path, video=None, frames=None)


def test_export_hf_writes_once_then_needs_overwrite(tiny_run, tmp_path, capsys):
  out = str(tmp_path / 'export')
  run_main(export_launch, checkpoint=tiny_run.workdir, checkpoint_stage='sft', out=out,
           overwrite=False)
  assert capsys.readouterr().out.splitlines()[-1] == out
  with open(os.path.join(out, export_lib.SIGN_CONFIG)) as f:
    assert json.load(f)['source']['stage'] == 'sft'
  with pytest.raises(SystemExit, match=r'^launch.export_hf: .*refusing to overwrite'):
    run_main(export_launch, checkpoint=tiny_run.workdir, out=out, overwrite=False)
  run_main(export_launch, checkpoint=tiny_run.workdir, out=out, overwrite=True)
  with open(os.path.join(out, export_lib.SIGN_CONFIG)) as f:
    assert json.load(f)['source']['stage'] == 'grpo'


def test_evaluate_checkpoint_mode_reproduces_the_runs_scores(tiny_run, tmp_path, capsys):
  out = str(tmp_path / 'scored')
  run_main(evaluate_launch, checkpoint=tiny_run.workdir, split='test', output_dir=out,
           hyps=None, refs=None)
  lines = capsys.readouterr().out.splitlines()
  scores = json.loads(lines[-1])
  assert list(scores) == ['bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l']
  assert scores == pytest.approx(tiny_run.results['grpo']['test'])
  assert lines[-2].startswith(f'{tiny_run.workdir} grpo test: bleu1 ')
  for name in ('hyps.txt', 'refs.txt', 'ids.txt'):
    with open(os.path.join(out, name)) as ours, open(
        os.path.join(tiny_run.workdir, 'eval', 'grpo', 'test', name)) as runs:
      assert ours.read() == runs.read(), name


def test_evaluate_scores_a_larger_synthsign_split(tiny_run, tmp_path, capsys):
  out = str(tmp_path / 'scored_default')
  run_main(evaluate_launch, checkpoint=tiny_run.workdir, split='test', output_dir=out,
           synthsign_size='default', hyps=None, refs=None)
  lines = capsys.readouterr().out.splitlines()
  assert list(json.loads(lines[-1])) == ['bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l']
  assert lines[-2].startswith(f'{tiny_run.workdir} grpo test (default): bleu1 ')
  def read(folder, name):
    with open(os.path.join(folder, name)) as f:
      return f.read().splitlines()

  ids, hyps = read(out, 'ids.txt'), read(out, 'hyps.txt')
  assert len(hyps) == len(ids) == 300 and ids[-1] == 'synthsign-0-test-000299'
  # SynthSign default's test split starts with tiny's 12 clips, translated as the run did.
  own = os.path.join(tiny_run.workdir, 'eval', 'grpo', 'test')
  assert ids[:12] == read(own, 'ids.txt') and hyps[:12] == read(own, 'hyps.txt')
  assert os.path.isdir(os.path.join(tiny_run.workdir, 'features_default'))
  with pytest.raises(ValueError, match="this run trained on 'tiny'; a larger split is one of "
                     r"\['default', 'large'\]"):
    artifacts.evaluate_checkpoint(tiny_run.workdir, 'test', synthsign_size='tiny')


def test_evaluate_scores_the_control(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run.workdir, workdir)
  results = run_lib.run(tiny_run.config, workdir, ['control'], log=lambda line: None)
  scores = artifacts.evaluate_checkpoint(workdir, 'test', 'control')
  assert scores == pytest.approx(results['sft_control']['test'])
  with pytest.raises(ValueError, match="stage must be one of .*'control'.*, got 'rl'"):
    artifacts.evaluate_checkpoint(workdir, 'test', 'rl')


def test_evaluate_modes_exclude_each_other(tiny_run, tmp_path):
  hyps = str(tmp_path / 'h.txt')
  with pytest.raises(SystemExit, match='--hyps and --refs .* and --checkpoint .* exclude each '
                     'other'):
    run_main(evaluate_launch, checkpoint=tiny_run.workdir, split='test', hyps=hyps, refs=hyps)
  with pytest.raises(SystemExit, match='nothing to score; give --hyps and --refs .* or '
                     '--checkpoint and --split'):
    run_main(evaluate_launch, hyps=None, refs=None)
  with pytest.raises(SystemExit, match='--checkpoint needs --split=dev or --split=test'):
    run_main(evaluate_launch, checkpoint=tiny_run.workdir, split=None, hyps=None, refs=None)
  with pytest.raises(SystemExit, match='file mode needs both --hyps and --refs'):
    run_main(evaluate_launch, hyps=hyps, refs=None)
  with pytest.raises(SystemExit, match='--split belong to checkpoint mode'):
    run_main(evaluate_launch, hyps=hyps, refs=hyps, split='dev', output_dir=None)
