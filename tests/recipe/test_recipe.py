"""The recipe end to end on the tiny SynthSign: outputs, resume, bad configs, NaN stop."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthsign
from launch import train as train_launch
from rvlf_jax.recipe import artifacts, build, run
from rvlf_jax.recipe import data as data_lib
from rvlf_jax.recipe import stages as stages_lib
from rvlf_jax.train import loop

METRICS = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l')


def test_results_json_has_every_score(tiny_run):
  with open(os.path.join(tiny_run.workdir, run.RESULTS_FILE)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(tiny_run.results))
  for name in ('sft', 'grpo', 'sft_zero_sign'):
    for split in ('dev', 'test'):
      scores = saved[name][split]
      assert set(METRICS) <= set(scores)
      assert all(0.0 <= scores[m] <= 100.0 for m in METRICS)
  assert saved['sft']['stop_reason'] in ('num_steps', 'early_stopping')


def test_the_table_is_printed(tiny_run):
  table = tiny_run.log[-1]
  header = table.strip().splitlines()[0].split()
  assert header == ['model', 'split', *METRICS]
  rows = [line.split()[:2] for line in table.strip().splitlines()[2:]]
  assert ['sft', 'test'] in rows and ['grpo', 'test'] in rows
  # The printed numbers are results.json's, rounded.
  grpo_test = next(line.split() for line in table.strip().splitlines()[2:]
                   if line.split()[:2] == ['grpo', 'test'])
  assert float(grpo_test[5]) == pytest.approx(tiny_run.results['grpo']['test']['bleu4'], abs=0.01)


def test_workdir_holds_every_stage_and_its_logs(tiny_run):
  wd = tiny_run.workdir
  for stage in ('represent', 'sft', 'grpo'):
    assert os.path.isdir(os.path.join(wd, stage, loop.CHECKPOINTS_DIR))
    assert os.path.exists(os.path.join(wd, stage, 'metrics.jsonl'))
    assert os.path.exists(os.path.join(wd, stage, 'done.json'))
    assert any(name.endswith('.png') for name in os.listdir(os.path.join(wd, stage, 'plots')))
  # The decoder came from text-only pretraining, as an HF folder.
  assert os.path.exists(os.path.join(wd, run.DECODER_DIR, 'config.json'))
  with open(os.path.join(wd, run.CONFIG_FILE)) as f:
    assert build.from_json(f.read()).to_dict() == tiny_run.config.to_dict()
  # Dev evaluations during SFT and GRPO, and the hypotheses of every scored split.
  for stage in ('sft', 'grpo'):
    with open(os.path.join(wd, stage, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    assert any(r.get('split') == 'eval' and 'bleu4' in r for r in records)
  hyps = os.path.join(wd, 'eval', 'grpo', 'test', 'hyps.txt')
  with open(hyps) as f:
    assert len(f.read().splitlines()) == 12  # tiny test split


def test_zero_sign_tokens_zero_the_projection():
  params = {'projector': {'fc1': {'kernel': jnp.ones((2, 3))},
                          'fc2': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones((4,))}},
            'decoder': {'w': jnp.ones(2)}}
  zeroed = stages_lib.zero_sign_tokens(params)
  assert not np.any(zeroed['projector']['fc2']['kernel'])
  assert not np.any(zeroed['projector']['fc2']['bias'])
  assert np.all(zeroed['projector']['fc1']['kernel'] == 1)
  assert zeroed['decoder'] is params['decoder']


class _Interrupt(Exception):
  pass


def test_resume_after_interruption_reproduces_the_run(tiny_run, tmp_path, monkeypatch):
  """SFT killed after its step-4 checkpoint, then rerun: same metrics as the uninterrupted run."""
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(tiny_run.workdir, workdir,
                  ignore=shutil.ignore_patterns('sft', 'grpo', 'eval', 'results.json'))
  real_run_stage = loop.run_stage

  def interrupted(stage, *args, **kwargs):
    def stop(step, state, metrics):
      if step == 5:
        raise _Interrupt(f'killed at step {step}')
    return real_run_stage(stage, *args, **{**kwargs, 'callbacks': (stop,)})

  monkeypatch.setattr(stages_lib.loop, 'run_stage', interrupted)
  with pytest.raises(_Interrupt):
    run.run(tiny_run.config, workdir, ('sft',), log=lambda line: None)
  monkeypatch.undo()
  results = run.run(tiny_run.config, workdir, ('sft',), log=lambda line: None)
  assert results['sft'] == tiny_run.results['sft']

  def train_records(root):
    with open(os.path.join(root, 'sft', 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    # Loss and accuracy only: timings differ between runs.
    return {(r['split'], r['step']): {k: r[k] for k in ('loss', 'accuracy', 'bleu4') if k in r}
            for r in records}

  assert train_records(workdir) == train_records(tiny_run.workdir)


def test_a_finished_stage_is_not_trained_again(tiny_run, tmp_path):
  workdir = str(tmp_path / 'again')
  shutil.copytree(tiny_run.workdir, workdir, ignore=shutil.ignore_patterns('grpo', 'eval'))
  before = os.path.getmtime(os.path.join(workdir, 'sft', 'metrics.jsonl'))
  results = run.run(tiny_run.config, workdir, ('sft',), log=lambda line: None)
  assert results['sft'] == tiny_run.results['sft']
  assert os.path.getmtime(os.path.join(workdir, 'sft', 'metrics.jsonl')) == before


def test_grpo_alone_starts_from_the_sft_checkpoint(tiny_run, tmp_path):
  """--stage=grpo in a workdir whose SFT has run computes what --stage=all computed."""
  workdir = str(tmp_path / 'grpo_alone')
  shutil.copytree(tiny_run.workdir, workdir, ignore=shutil.ignore_patterns('grpo', 'eval'))
  results = run.run(tiny_run.config, workdir, ('grpo',), log=lambda line: None)
  assert results['grpo'] == tiny_run.results['grpo']


def test_grpo_can_train_the_sign_encoder(tiny_run, tmp_path):
  """--config.grpo.train_sign_encoder=True: GRPO from the same SFT checkpoint also moves the
  sign encoder and projector, and its translator restores and scores like any other."""
  workdir = str(tmp_path / 'grpo_encoder')
  shutil.copytree(tiny_run.workdir, workdir, ignore=shutil.ignore_patterns('grpo', 'eval'))
  os.remove(os.path.join(workdir, run.CONFIG_FILE))  # the run's config, which this one changes
  config = synthsign.get_config('tiny')
  config.grpo.train_sign_encoder = True
  results = run.run(config, workdir, ('grpo',), log=lambda line: None)
  assert set(METRICS) <= set(results['grpo']['test'])
  grpo = artifacts.load_translator(workdir, 'grpo')
  sft = artifacts.load_translator(workdir, 'sft')
  assert set(grpo.params) == set(sft.params)  # the model's tree, no reference copy
  for part in ('sign_encoder', 'projector'):
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(grpo.params[part]), jax.tree.leaves(sft.params[part]))]
    assert max(moved) > 0, part
  scores = artifacts.evaluate_checkpoint(workdir, 'test', stage='grpo')
  assert scores == pytest.approx(results['grpo']['test'])


# -- Bad input -----------------------------------------------------------------------------------


def test_unknown_stage_is_refused():
  with pytest.raises(build.ConfigError, match="unknown stage 'distill'"):
    train_launch.parse_stages('sft,distill')
  assert train_launch.parse_stages('grpo,sft') == ('sft', 'grpo')
  assert train_launch.parse_stages('all') == build.STAGES


def test_mesh_that_does_not_fit_the_devices_is_refused():
  config = synthsign.get_config('tiny')
  config.mesh.data = 3
  with pytest.raises(build.ConfigError, match=r'needs 3 devices but 8 are present'):
    build.check(config, stages=build.STAGES, num_devices=8)
  config.mesh.update(data=-1, fsdp=3)
  with pytest.raises(build.ConfigError, match=r'use 3 devices, which does not divide the 8'):
    build.check(config, stages=build.STAGES, num_devices=8)


def test_batch_not_divisible_by_the_data_axes_is_refused():
  config = synthsign.get_config('tiny')
  config.sft.batch_size = 12
  with pytest.raises(build.ConfigError, match=r'sft.batch_size=12 is not divisible by .* 8 ways'):
    build.check(config, stages=build.STAGES, num_devices=8)


def test_bad_values_name_their_key():
  config = synthsign.get_config('tiny')
  config.model.skeleton.part_size = 3
  with pytest.raises(build.ConfigError, match=r"model.skeleton: unknown key\(s\) \['part_size'\]"):
    build.check(config, stages=build.STAGES, num_devices=1)
  config = synthsign.get_config('tiny')
  config.grpo.rewards = (('bleu', 0.5), ('meteor', 0.5))
  with pytest.raises(build.ConfigError, match="grpo.rewards: unknown reward 'meteor'"):
    build.check(config, stages=build.STAGES, num_devices=1)
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    synthsign.get_config('huge')
  config = synthsign.get_config('tiny')
  config.grpo.update(train_sign_encoder=True, sign_encoder_lr_factor=0.0)
  with pytest.raises(build.ConfigError, match='grpo.sign_encoder_lr_factor must be > 0'):
    build.check(config, stages=build.STAGES, num_devices=1)
  config = synthsign.get_config('tiny')
  config.sft.min_steps = -100
  with pytest.raises(build.ConfigError, match=r'min_steps \(-100\) must be >= 0'):
    build.check(config, stages=build.STAGES, num_devices=1)


def test_prompt_and_schedule_come_from_the_config(tiny_run):
  config = synthsign.get_config('tiny')
  assert stages_lib.prompt_template(config).instruction == config.prompt.instruction
  config.prompt.instruction = 'Translate into {language}:'
  with pytest.raises(build.ConfigError, match=r"prompt.instruction: .*'\{sign\}' exactly once"):
    stages_lib.prompt_template(config)
  config.sft.update(schedule='constant', learning_rate=3e-3)
  opt = build.optimizer_config(config, 'sft')
  assert (opt.schedule, opt.learning_rate) == ('constant', 3e-3)
  config.sft.schedule = 'step'
  with pytest.raises(build.ConfigError, match=r"sft: schedule must be"):
    build.optimizer_config(config, 'sft')


def test_pretrained_parts_do_not_depend_on_the_seed(tiny_run, tmp_path):
  """The random frame encoder and the text-pretrained decoder stand for downloaded
  checkpoints: another seed of the run gets the same ones."""
  config = synthsign.get_config('tiny')
  config.seed = 1
  _, _, params = data_lib.frame_encoder(config, str(tmp_path), log=lambda line: None)
  _, _, first = data_lib.frame_encoder(tiny_run.config, tiny_run.workdir, log=lambda line: None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lm_config = run.lm_config(config)
  assert lm_config.seed == run.lm_config(tiny_run.config).seed == config.lm.seed


def test_missing_checkpoint_fails_before_any_work(tmp_path):
  config = synthsign.get_config('tiny')
  workdir = str(tmp_path / 'empty')
  with pytest.raises(stages_lib.MissingCheckpointError, match=r"no 'sft' checkpoint.*'grpo'"):
    run.run(config, workdir, ('grpo',), log=lambda line: None)
  with pytest.raises(stages_lib.MissingCheckpointError, match=r"no 'represent' checkpoint"):
    run.run(config, workdir, ('sft', 'grpo'), log=lambda line: None)
  assert not os.path.exists(workdir)  # nothing was generated


def test_a_changed_config_is_refused_in_the_same_workdir(tiny_run, tmp_path):
  workdir = str(tmp_path / 'changed')
  shutil.copytree(tiny_run.workdir, workdir, ignore=shutil.ignore_patterns('grpo', 'eval'))
  config = synthsign.get_config('tiny')
  config.model.decoder.num_layers = 2
  with pytest.raises(build.ConfigError, match=r'model.decoder.num_layers differ'):
    run.run(config, workdir, ('sft',), log=lambda line: None)


def test_a_workdir_older_than_a_config_key_resumes_with_its_old_value(tiny_run, tmp_path):
  """A key added to the configs after a workdir was run (absent from its config.json) is no
  change while it keeps the value that runs as the workdir ran, and one when it does not."""
  workdir = str(tmp_path / 'older')
  shutil.copytree(tiny_run.workdir, workdir, ignore=shutil.ignore_patterns('grpo', 'eval'))
  path = os.path.join(workdir, run.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  del saved['grpo']['train_sign_encoder'], saved['grpo']['sign_encoder_lr_factor']
  with open(path, 'w') as f:
    json.dump(saved, f)
  # Read back for evaluation or export, it has the keys at those values.
  assert artifacts.read_config(workdir).grpo.train_sign_encoder is False
  config = synthsign.get_config('tiny')
  config.grpo.train_sign_encoder = True
  with pytest.raises(build.ConfigError, match=r'grpo.train_sign_encoder differ'):
    run.run(config, workdir, ('sft',), log=lambda line: None)
  # SFT's early-stopping rule is no change: it only says when a stage ends.
  config = synthsign.get_config('tiny')
  config.sft.update(min_steps=5, patience=1)
  results = run.run(config, workdir, ('sft',), log=lambda line: None)
  assert results['sft'] == tiny_run.results['sft']


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path,
                                                                     monkeypatch):
  workdir = str(tmp_path / 'nan')
  shutil.copytree(tiny_run.workdir, workdir,
                  ignore=shutil.ignore_patterns('sft', 'grpo', 'eval', 'results.json'))
  real_make_step = stages_lib.sft.make_step

  def poisoned(model, tx, prompt):
    step = real_make_step(model, tx, prompt)

    def nan_after_five(state, batch, rng):
      state, metrics = step(state, batch, rng)
      bad = state.step > 5
      return state, {**metrics, 'loss': jnp.where(bad, jnp.nan, metrics['loss'])}

    return nan_after_five

  monkeypatch.setattr(stages_lib.sft, 'make_step', poisoned)
  with pytest.raises(loop.NonFiniteLossError, match=r"sft.*step 6"):
    run.run(tiny_run.config, workdir, ('sft',), log=lambda line: None)
  kept = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'sft', 'checkpoints'))
                if name.isdigit())
  assert kept and max(kept) <= 5
