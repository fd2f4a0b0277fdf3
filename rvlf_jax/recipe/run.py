"""The RVLF recipe end to end: `run(config, workdir, stages)`, as `launch.train` calls it.

The workdir holds everything a run makes, so a second call with the same workdir resumes where
the first stopped (every stage restarts from its latest checkpoint, with its data iterator) and
a finished stage is not trained again:
  config.json                   the config of the run (a resumed run must keep its model)
  data/ tokenizer/ dinov2/ features/   see `recipe.data`
  decoder/                      the text-pretrained decoder, a HuggingFace folder (`recipe.lm`)
  represent/ sft/ grpo/ control/   each stage's checkpoints, metrics.jsonl, TensorBoard, plots
  eval/<model>/<split>/         hypotheses, references and ids of every scored split
  results.json                  {"sft": {"dev": {...}, "test": {...}}, "grpo": {...}, ...}

Several processes (after `jax.distributed.initialize`, e.g. `launch.train --distributed`) run
the same call on one shared workdir: process 0 prepares the data and the decoder while the others
wait, then they read what it made; every stage runs over all processes' devices (see
`recipe.stages`); process 0 alone writes config.json and results.json and logs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from rvlf_jax.hf import api as hf_api
from rvlf_jax.recipe import build, lm
from rvlf_jax.recipe import data as data_lib
from rvlf_jax.recipe import stages as stages_lib
from rvlf_jax.train import loop
from rvlf_jax.train import params as params_lib

CONFIG_FILE, RESULTS_FILE, DECODER_DIR = 'config.json', 'results.json', 'decoder'
METRICS = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l')
# Config sections and keys a resumed run may change: they do not change what was trained so
# far (a checkpoint restores onto any mesh; SFT's early-stopping rule only says when it ends).
_RESUMABLE = ('seed', 'stages', 'eval', 'checkpoint', 'mesh', 'sft.patience', 'sft.stop_window',
              'sft.min_steps')
# Config keys added since workdirs were first written, with the value that runs the way a
# workdir without the key ran: such a workdir resumes when the config keeps that value.
_ADDED = {'grpo.train_sign_encoder': False, 'grpo.sign_encoder_lr_factor': 0.1,
          'sft.min_steps': 0}
# How long the other processes wait for process 0 to prepare the data (a real dataset's feature
# cache takes hours).
_PREPARE_TIMEOUT_S = 24 * 3600.0


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def with_added_keys(saved: dict[str, Any]) -> dict[str, Any]:
  """A config.json's contents with the keys added since it was written (`_ADDED`), at the
  values its run had."""
  filled = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for key, value in _ADDED.items():
    section, name = key.split('.')
    filled.setdefault(section, {}).setdefault(name, value)
  return filled


def _resumable(key: str) -> bool:
  return any(key == r or key.startswith(r + '.') for r in _RESUMABLE)


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks a resumed run's config against config.json; process 0 (re)writes it."""
  path = os.path.join(workdir, CONFIG_FILE)
  text = build.to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = _flat(with_added_keys(json.load(f)))
    now = _flat(json.loads(text))
    changed = sorted(k for k in set(saved) | set(now)
                     if saved.get(k) != now.get(k) and not _resumable(k))
    if changed:
      raise build.ConfigError(
          f'{path}: this workdir was run with a different config ({", ".join(changed[:8])} '
          'differ); use a new --workdir, or the saved config.')
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def pretrained_decoder(config: ml_collections.ConfigDict, workdir: str, data: data_lib.Data,
                       log: Callable[[str], None]):
  """(DecoderConfig, params) of the LLM: model.decoder.hf_path, or the small decoder pretrained
  on the train split's text (seeded by lm.seed, not the run's seed: it stands for a pretrained
  checkpoint, the same for every seed), saved in HF format and read back through the HF import."""
  if config.model.decoder.hf_path:
    return hf_api.load_hf(config.model.decoder.hf_path)
  decoder_cfg = build.decoder_config(config, data.tokenizer.vocab_size)
  out = os.path.join(workdir, DECODER_DIR)
  lm.pretrain_to_hf(decoder_cfg, data.tokenizer, data.texts['train'], lm_config(config), out,
                    log=log)
  return lm.load_pretrained(out)


def lm_config(config: ml_collections.ConfigDict) -> lm.LMConfig:
  """The text-only pretraining settings (config.lm)."""
  l = config.lm
  return lm.LMConfig(steps=int(l.steps), batch_size=int(l.batch_size),
                     learning_rate=float(l.learning_rate), warmup_steps=int(l.warmup_steps),
                     max_len=int(config.data.token_buckets[-1]) + 1, seed=int(l.get('seed', 0)))


def read_results(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_results(workdir: str, results: dict[str, Any]) -> None:
  """results.json, from process 0 (every process holds the same results)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, RESULTS_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def table(results: dict[str, Any]) -> str:
  """The scores as a fixed-width table: one row per (model, split)."""
  rows = [('model', 'split') + METRICS]
  for name, splits in results.items():
    if not isinstance(splits, dict):
      continue
    for split in ('dev', 'test'):
      scores = splits.get(split)
      if isinstance(scores, dict) and all(m in scores for m in METRICS):
        rows.append((name, split) + tuple(f'{scores[m]:.2f}' for m in METRICS))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: '  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  return '\n'.join([fmt(rows[0]), '-' * len(fmt(rows[0]))] + [fmt(r) for r in rows[1:]])


def _stage_seconds(workdir: str, stage: str) -> float:
  path = os.path.join(workdir, stage, 'done.json')
  if not os.path.exists(path):
    raise stages_lib.MissingCheckpointError(
        f'{path}: stage {stage!r} has not finished in this workdir; the control run needs its '
        'wall time.')
  with open(path) as f:
    return float(json.load(f)['elapsed_s'])


def check_prerequisites(config: ml_collections.ConfigDict, workdir: str,
                        stages: Sequence[str]) -> None:
  """Fails before any work when a stage would start from a stage this workdir has not run."""
  needs = []
  if 'sft' in stages and 'represent' not in stages and config.represent.steps > 0:
    needs.append(('represent', 'sft'))
  if 'grpo' in stages and 'sft' not in stages:
    needs.append(('sft', 'grpo'))
  if 'control' in stages:
    if 'sft' not in stages:
      needs.append(('sft', 'control'))
    if 'grpo' not in stages and not os.path.exists(os.path.join(workdir, 'grpo', 'done.json')):
      raise stages_lib.MissingCheckpointError(
          f'{os.path.join(workdir, "grpo")}: the control run lasts as long as the GRPO stage '
          'trained, which has not finished in this workdir; run --stage=grpo first.')
  for stage, needed_by in needs:
    stages_lib.require(workdir, stage, needed_by)


def context(config: ml_collections.ConfigDict, workdir: str,
            log: Callable[[str], None] = print) -> stages_lib.Context:
  """Prepares data, tokenizer and the pretrained decoder (reusing what the workdir holds).

  With several processes, process 0 prepares them first; the others then find them made and
  only read them (process 0 waits meanwhile, so that no file is read while it is written).
  """
  def prepare():
    data = data_lib.prepare(config, workdir, log)
    return data, pretrained_decoder(config, workdir, data, log)

  if jax.process_count() == 1:
    data, decoder = prepare()
  else:
    first = jax.process_index() == 0
    if first:
      data, decoder = prepare()
    loop.barrier('recipe: process 0 prepared the workdir', timeout_s=_PREPARE_TIMEOUT_S)
    if not first:
      data, decoder = prepare()
    loop.barrier('recipe: every process read the workdir', timeout_s=_PREPARE_TIMEOUT_S)
  return stages_lib.Context(config, workdir, data, decoder,
                            stages_lib.prompt_for(data, config), log)


def run(config: ml_collections.ConfigDict, workdir: str, stages: Sequence[str],
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the given stages (in recipe order) and returns the results written to results.json.

  Stages: 'represent', 'sft', 'grpo', and 'control' (SFT continued from its best checkpoint for
  as long as the GRPO stage trained; not part of 'all').
  """
  stages = tuple(stages)
  build.check(config, stages=[s for s in stages if s != 'control'],
              num_devices=jax.device_count(), num_processes=jax.process_count())
  check_prerequisites(config, workdir, stages)
  start = time.perf_counter()
  if jax.process_index() != 0:
    log = lambda line: None  # one process tells the story
  _check_workdir_config(config, workdir)
  ctx = context(config, workdir, log)
  results = read_results(workdir)
  timings = results.setdefault('seconds', {})
  timings['prepare'] = round(time.perf_counter() - start, 1)

  sign = None
  if 'represent' in stages:
    t = time.perf_counter()
    sign, _ = stages_lib.run_represent(ctx)
    timings['represent'] = round(time.perf_counter() - t, 1)
  elif 'sft' in stages and config.represent.steps > 0:
    sign = stages_lib.restore_represent(ctx, 'sft')

  sft_model = sft_params = None
  if 'sft' in stages:
    t = time.perf_counter()
    sft_model, sft_params, history = stages_lib.run_sft(ctx, sign)
    timings['sft'] = round(time.perf_counter() - t, 1)
    results['sft'] = stages_lib.score_splits(ctx, sft_model, sft_params, 'sft')
    results['sft']['best_step'] = history.state_step
    results['sft']['stop_reason'] = history.stop_reason
    results['sft_zero_sign'] = stages_lib.score_splits(
        ctx, sft_model, stages_lib.zero_sign_tokens(sft_params), 'sft_zero_sign')
    _write_results(workdir, results)

  if 'grpo' in stages:
    if sft_params is None:
      sft_model, state = stages_lib.restore_sft(ctx, 'grpo')
      sft_params = params_lib.merge(state.params, state.frozen)
    t = time.perf_counter()
    model, params, history = stages_lib.run_grpo(ctx, sft_params)
    timings['grpo'] = round(time.perf_counter() - t, 1)
    results['grpo'] = stages_lib.score_splits(ctx, model, params, 'grpo')
    results['grpo']['best_step'] = history.state_step
    _write_results(workdir, results)

  if 'control' in stages:
    seconds = _stage_seconds(workdir, 'grpo')
    log(f'control: SFT continued for {seconds:.0f} s, the GRPO stage\'s training time')
    t = time.perf_counter()
    model, params, _ = stages_lib.run_control(ctx, seconds)
    timings['control'] = round(time.perf_counter() - t, 1)
    results['sft_control'] = stages_lib.score_splits(ctx, model, params, 'sft_control')
    _write_results(workdir, results)

  timings['total_this_call'] = round(time.perf_counter() - start, 1)
  _write_results(workdir, results)
  log('\n' + table(results))
  return results
