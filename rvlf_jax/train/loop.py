"""The loop every training stage runs under: checkpoints, exact resume, evaluation and stopping.

A stage supplies a pure `step(state, batch, rng) -> (state, metrics)` (jitted, usually with the
state donated) and a grain pipeline; `run_stage` does the rest, in `workdir/<stage>/`:

  checkpoints/<step>/  orbax, saved asynchronously: 'state' (the TrainState), 'data' (the grain
                       iterator's position, one JSON per process, through grain's own orbax
                       handler), 'meta' (JSON: the loop's progress - step, training time, best
                       evaluation, evaluations since the best, why it stopped - and the step's
                       train and eval metrics) and 'metrics' (orbax's record of the evaluation,
                       which ranks checkpoints)
  metrics.jsonl, tb/   the logged numbers (see `metrics_log`)
  best.json            step and metrics of the best evaluation, written when the stage ends
  done.json            written when the stage ends: why it stopped, at which step
  plots/*.png          curves of metrics.jsonl, drawn when the stage ends

Loop step s (from 1) trains on the s-th batch of the iterator with `jax.random.fold_in(key(seed),
s - 1)`. Nothing else feeds a step, so a run resumed from a checkpoint repeats the uninterrupted
one exactly: same batches, same random numbers, same state. Called again after an interruption,
`run_stage` restores the latest checkpoint and goes on; called on a finished stage (all steps
done, early-stopped or out of time) it only restores and returns the result.

Every step's loss is fetched and checked: a NaN or infinite loss stops the stage with
`NonFiniteLossError` before anything is saved, so the checkpoints on disk stay good.

Restoring reads a checkpoint onto the shardings of its target (`jax.ShapeDtypeStruct`s with a
`.sharding` each), not onto the mesh that wrote it: a state saved by 8 devices restores onto 1
and the other way round. Several processes (multi-host): every process runs the loop with its own
rows of each batch; orbax writes each checkpoint cooperatively (every process calls save), each
process saves its own data iterator's position, process 0 alone writes metrics, logs and the
files of a finished stage, and process 0's clock decides when a time limit is up.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import grain.checkpoint  # registers grain's orbax handler (CheckpointSave / CheckpointRestore)
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from rvlf_jax.train import metrics_log, plots
from rvlf_jax.train import state as state_lib

CHECKPOINTS_DIR = 'checkpoints'
BEST_FILE = plots.BEST_FILE
DONE_FILE = 'done.json'
STOP_REASONS = ('num_steps', 'early_stopping', 'time_limit')
_STEP_METRIC = 'loop_step'  # added to the metrics orbax records with a checkpoint

StepFn = Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, Any]]]
EvalFn = Callable[[Any], Mapping[str, Any]]
Callback = Callable[[int, Any, Mapping[str, float]], None]

logger = logging.getLogger('rvlf_jax.train')


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN or infinite loss. Its state was not saved.

  Attributes:
    stage: the stage's name.
    step: the loop step whose loss was not finite (counting from 1).
    metrics: all metrics of that step.
    last_checkpoint: the latest good checkpoint's step (None if none was saved).
  """

  def __init__(self, stage: str, step: int, loss_key: str, metrics: Mapping[str, float],
               last_checkpoint: int | None, checkpoint_dir: str):
    self.stage, self.step, self.metrics = stage, step, dict(metrics)
    self.last_checkpoint = last_checkpoint
    kept = (f'the last good checkpoint is step {last_checkpoint} in {checkpoint_dir}'
            if last_checkpoint is not None else 'no checkpoint had been saved')
    super().__init__(f'stage {stage!r}: non-finite {loss_key} ({metrics[loss_key]}) at step '
                     f'{step}; that state was not saved, {kept}. Metrics of step {step}: '
                     f'{dict(metrics)}')


@dataclasses.dataclass
class _Progress:
  """The loop's own state, saved in the 'meta' item of every checkpoint."""

  step: int = 0
  elapsed_s: float = 0.0  # training wall time over all runs up to this checkpoint
  best: dict[str, Any] | None = None  # {'step': int, 'metrics': {name: float}}
  evals_since_best: int = 0  # evaluations since the running mean last improved
  stop_reason: str | None = None
  recent: list[float] = dataclasses.field(default_factory=list)  # the window's best_metric
  best_mean: float | None = None  # the best running mean of `recent` so far

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> _Progress:
    # Checkpoints written before `recent`/`best_mean` existed resume with their defaults.
    return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})

  def record(self, value: float, window: int, mode: str) -> None:
    """Adds an evaluation of best_metric to the running mean that early stopping watches."""
    self.recent = (self.recent + [value])[-window:]
    mean = sum(self.recent) / len(self.recent)
    better = (self.best_mean is None or
              (mean > self.best_mean if mode == 'max' else mean < self.best_mean))
    if better:
      self.best_mean, self.evals_since_best = mean, 0
    else:
      self.evals_since_best += 1

  def to_meta(self, metrics: Mapping[str, float], eval_metrics: Mapping[str, float] | None
              ) -> dict[str, Any]:
    """The 'meta' item: this progress with the saved step's train and eval metrics."""
    return {**dataclasses.asdict(self), 'metrics': dict(metrics),
            'eval_metrics': None if eval_metrics is None else dict(eval_metrics)}


@dataclasses.dataclass(frozen=True)
class History:
  """What a stage did.

  Attributes:
    records: the records of metrics.jsonl (train and eval, the resumed runs' included).
    best: {'step', 'metrics'} of the best evaluation; None without `best_metric`.
    stop_reason: 'num_steps', 'early_stopping' or 'time_limit'.
    step: the last loop step trained.
    resumed_from: the step this call restored (None if it started from scratch).
    state_step: the loop step of the returned state (the best one's or the last one's).
  """

  records: list[dict[str, Any]]
  best: dict[str, Any] | None
  stop_reason: str
  step: int
  resumed_from: int | None
  state_step: int

  def split(self, name: str) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get('split') == name]

  @property
  def train(self) -> list[dict[str, Any]]:
    return self.split('train')

  @property
  def eval(self) -> list[dict[str, Any]]:
    return self.split('eval')


def checkpoint_manager(directory: str, *, keep: int = 2, best_metric: str | None = None,
                       best_mode: str = 'max', read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """An orbax manager that keeps the `keep` latest checkpoints and the best evaluated one.

  orbax's `max_to_keep` together with `best_fn` would keep the `keep` *best* checkpoints (and
  every checkpoint without metrics), which can delete the latest one that a resume needs; the
  two preservation policies below keep the latest `keep` plus the single best instead, so at most
  `keep + 1` checkpoints are on disk. `best_fn` is still set so that orbax records each
  checkpoint's metrics and ranks them again after a restart.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  best_fn = None
  if best_metric is not None:
    best_fn = _ranking(best_metric, best_mode)
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=best_fn, reverse=best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode=best_mode, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _ranking(metric: str, mode: str) -> Callable[[Mapping[str, float]], tuple[float, int]]:
  """orbax's sort key of a checkpoint's metrics: the metric, then the earlier step on a tie.

  The loop counts only a strict improvement as a new best; breaking ties by step makes orbax
  keep that same checkpoint (sorting on the metric alone would keep the latest of equals).
  """
  def key(metrics: Mapping[str, float]) -> tuple[float, int]:
    step = int(metrics[_STEP_METRIC])
    return (metrics[metric], -step if mode == 'max' else step)
  return key


def _abstract_target(init_state: Any) -> Any:
  """Restore target from a state, an abstract state (`jax.ShapeDtypeStruct`s: restored onto
  their shardings) or a function building one (traced, never run).

  A leaf without a sharding (a numpy value, or traced from a function that does not place its
  outputs) is restored onto this process's first device; with several processes, replicated on
  all devices. Never onto the saved sharding, whose devices may not exist here.
  """
  target = state_lib.abstract(jax.eval_shape(init_state) if callable(init_state) else init_state)
  if jax.process_count() == 1:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  else:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',))
    default = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: x if x.sharding is not None else x.update(sharding=default),
                      target)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Every process waits here until all have arrived (a no-op with one process).

  The coordination service's barrier (through orbax), not a device collective: a process may
  wait long at it (CPU collectives give up on a peer after about 30 s). Every process must pass
  the same barriers in the same order; each gets a key of its own from their count.
  """
  key = f'{name} ({next(_BARRIERS)})'
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))


_BARRIERS = itertools.count()


def _restore(manager: ocp.CheckpointManager, step: int, target: Any = None, iterator: Any = None
             ) -> Any:
  items = {'meta': ocp.args.JsonRestore()}
  if target is not None:
    items['state'] = ocp.args.StandardRestore(target)
  if iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))


def restore_state(workdir: str, stage: str, target: Any, which: str | int = 'best') -> Any:
  """A stage's saved TrainState, e.g. the best stage-1 state to start SFT from.

  Args:
    workdir: the run's folder (holding `<stage>/checkpoints`).
    stage: the stage's name.
    target: a TrainState of the same structure, or `jax.ShapeDtypeStruct`s of one (e.g.
      `state_lib.abstract(state, shardings)`), or a function building one; the restored arrays
      get its shardings, whatever mesh saved them (see `_abstract_target`).
    which: 'best' (the best evaluation, or the latest if the stage tracks no metric), 'latest',
      or a step.

  Raises:
    FileNotFoundError: the stage has no checkpoint (of that step).
  """
  directory = os.path.join(workdir, stage, CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no checkpoints of stage {stage!r}.')
  with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0)) as manager:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(f'{directory}: no checkpoints of stage {stage!r}.')
    if which == 'latest':
      step = latest
    elif which == 'best':
      best = _Progress.from_meta(_restore(manager, latest).meta).best
      step = best['step'] if best else latest
    else:
      step = int(which)
    if step not in manager.all_steps():
      raise FileNotFoundError(f'{directory}: no checkpoint of step {step} (have '
                              f'{manager.all_steps()}).')
    return _restore(manager, step, _abstract_target(target)).state


def _write_json(path: str, value: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def _improved(value: float, best: dict[str, Any] | None, metric: str, mode: str) -> bool:
  if best is None:
    return True
  return value > best['metrics'][metric] if mode == 'max' else value < best['metrics'][metric]


def _validate(*, num_steps, eval_fn, eval_every, best_metric, best_mode, checkpoint_every, keep,
              log_every, early_stopping_patience, early_stopping_window,
              early_stopping_min_steps, time_limit_s) -> None:
  if num_steps < 1 or checkpoint_every < 1 or log_every < 1 or keep < 1 or eval_every < 0:
    raise ValueError(f'num_steps ({num_steps}), checkpoint_every ({checkpoint_every}), log_every '
                     f'({log_every}) and keep ({keep}) must be >= 1, eval_every ({eval_every}) '
                     '>= 0.')
  if best_mode not in ('max', 'min'):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
  if best_metric is not None and eval_fn is None:
    raise ValueError(f'best_metric={best_metric!r} needs an eval_fn.')
  if early_stopping_patience is not None and (best_metric is None or early_stopping_patience < 1):
    raise ValueError('early_stopping_patience needs a best_metric and must be >= 1, got '
                     f'{early_stopping_patience}.')
  if early_stopping_window < 1:
    raise ValueError(f'early_stopping_window must be >= 1, got {early_stopping_window}.')
  if early_stopping_min_steps < 0:
    raise ValueError(f'early_stopping_min_steps must be >= 0, got {early_stopping_min_steps}.')
  if time_limit_s is not None and time_limit_s <= 0:
    raise ValueError(f'time_limit_s must be positive, got {time_limit_s}.')


def run_stage(
    stage: str,
    init_state: Any,
    step_fn: StepFn,
    data: Iterable[Any] | Callable[[], Iterable[Any]],
    workdir: str,
    *,
    num_steps: int,
    target: Any = None,
    seed: int = 0,
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    best_metric: str | None = None,
    best_mode: str = 'max',
    checkpoint_every: int = 1000,
    keep: int = 2,
    log_every: int = 50,
    early_stopping_patience: int | None = None,
    early_stopping_window: int = 1,
    early_stopping_min_steps: int = 0,
    time_limit_s: float | None = None,
    return_best: bool = True,
    loss_key: str = 'loss',
    tensorboard: bool = True,
    plot: bool = True,
    callbacks: Sequence[Callback] = (),
) -> tuple[Any, History]:
  """Trains one stage to its end, resuming from its latest checkpoint if it has one.

  Args:
    stage: the stage's name; its folder is `workdir/<stage>`.
    init_state: the initial TrainState (any pytree of arrays), or a function building it. A
      function is only called when the stage starts from scratch; to resume it is traced with
      `jax.eval_shape` for the restore target (unless `target` is given), so a jitted
      initialiser with `out_shardings` restores sharded without materialising anything twice.
    step_fn: `step(state, batch, rng) -> (state, metrics)`, metrics a dict of scalars with
      `loss_key` among them. It may donate `state` (the loop keeps no reference to it).
    data: a grain IterDataset (or DataLoader) whose iterator has get_state()/set_state(), or a
      function returning one (not called when the stage has finished). Use a pipeline that
      repeats as long as training may run.
    workdir: the run's folder, shared by its stages.
    num_steps: loop steps to train in all (including those restored).
    target: what the stage's checkpoints restore onto: the state as `jax.ShapeDtypeStruct`s
      with the shardings of this run's mesh (default: traced from init_state).
    seed: the per-step keys are `fold_in(key(seed), step)`.
    eval_fn: `eval_fn(state) -> {name: float}`, run every `eval_every` steps and when training
      stops (unless early stopping stopped it right after an evaluation).
    eval_every: steps between evaluations (0: only at the end).
    best_metric: the eval metric that ranks checkpoints ('bleu4'); its best checkpoint is never
      deleted, and it is the state returned when `return_best`.
    best_mode: 'max' (higher is better, e.g. BLEU) or 'min' (a loss).
    checkpoint_every: steps between checkpoints. Every evaluated step and the last step are
      saved too, so that the best state is on disk.
    keep: how many of the latest checkpoints to keep (plus the best one).
    log_every: steps between logged train records and progress lines (and the last step).
    early_stopping_patience: stop after this many evaluations in a row without an improvement
      of `best_metric`'s running mean (None: never).
    early_stopping_window: the running mean is over this many latest evaluations. 1 watches
      each evaluation itself; more keeps the noise of a small dev set (BLEU-4 on 300 clips
      moves by 1-2 points between nearby checkpoints) from stopping a stage that still learns.
      The best checkpoint is still the best single evaluation.
    early_stopping_min_steps: early stopping does not stop the stage before this step. The
      evaluations before it still rank checkpoints and count towards the patience, so a stage
      whose running mean has not improved for `patience` evaluations by then stops at its
      first evaluation from this step on. A rate that decays over the step budget brings most
      of the dev gains late; a noisy dip early on must not end such a run.
    time_limit_s: stop after this much training wall time, counted over all runs of the
      stage (the time after the last checkpoint of an interrupted run is not counted).
    return_best: return the best evaluated state rather than the last one.
    loss_key: the metric checked for NaN/inf at every step.
    tensorboard: also write TensorBoard event files (needs tensorboardX).
    plot: draw plots/*.png when the stage ends (needs matplotlib; a failure is logged, not
      raised, since the trained state matters more than its plots).
    callbacks: `callback(step, state, metrics)` after each step, once it is logged, evaluated
      and checkpointed. An exception in one interrupts the stage as a crash would.

  Returns:
    (state, history): the best (or last) state and what the stage did.

  Raises:
    NonFiniteLossError: a step's loss was NaN or infinite (names the stage and step).
  """
  _validate(num_steps=num_steps, eval_fn=eval_fn, eval_every=eval_every, best_metric=best_metric,
            best_mode=best_mode, checkpoint_every=checkpoint_every, keep=keep,
            log_every=log_every, early_stopping_patience=early_stopping_patience,
            early_stopping_window=early_stopping_window,
            early_stopping_min_steps=early_stopping_min_steps, time_limit_s=time_limit_s)
  stage_dir = os.path.join(workdir, stage)
  checkpoint_dir = os.path.join(stage_dir, CHECKPOINTS_DIR)
  is_main = jax.process_index() == 0
  restore_target = lambda: _abstract_target(init_state if target is None else target)
  manager = checkpoint_manager(checkpoint_dir, keep=keep, best_metric=best_metric,
                               best_mode=best_mode)
  log = None
  try:
    latest = manager.latest_step()
    progress = (_Progress.from_meta(_restore(manager, latest).meta) if latest is not None
                else _Progress())
    if progress.stop_reason == 'num_steps' and progress.step < num_steps:
      progress.stop_reason = None  # more steps asked of a stage that finished its earlier count
    if progress.stop_reason is None and progress.step >= num_steps:
      progress.stop_reason = 'num_steps'  # fewer steps asked than were already trained

    if progress.stop_reason is not None:
      # Finished earlier: restore its result and train nothing.
      logger.info('%s: finished at step %d (%s); not training again.', stage, progress.step,
                  progress.stop_reason)
      state_step = (progress.best['step'] if return_best and progress.best else latest)
      state = _restore(manager, state_step, restore_target()).state
      if is_main and not os.path.exists(os.path.join(stage_dir, DONE_FILE)):
        _finish_files(stage_dir, progress, plot)  # it stopped between its last save and these
      barrier(f'{stage}: finished')
      return state, _history(stage_dir, progress, None, state_step)

    iterator = iter(data() if callable(data) else data)
    if not (hasattr(iterator, 'get_state') and hasattr(iterator, 'set_state')):
      raise TypeError(f'stage {stage!r}: the data iterator ({type(iterator).__name__}) has no '
                      'get_state()/set_state(); pass a grain IterDataset or DataLoader so that '
                      'its position can be checkpointed.')
    if latest is not None:
      restored = _restore(manager, latest, restore_target(), iterator)
      state = restored.state
      logger.info('%s: resuming from the checkpoint of step %d in %s.', stage, latest,
                  checkpoint_dir)
    else:
      state = init_state() if callable(init_state) else init_state
    if is_main and os.path.exists(os.path.join(stage_dir, DONE_FILE)):
      os.remove(os.path.join(stage_dir, DONE_FILE))  # from a shorter run; no longer true

    log = metrics_log.MetricsLog(stage_dir, resume_step=progress.step, tensorboard=tensorboard)
    state = _train(
        stage, state, step_fn, iterator, manager, log, progress, num_steps=num_steps,
        seed=seed, eval_fn=eval_fn, eval_every=eval_every, best_metric=best_metric,
        best_mode=best_mode, checkpoint_every=checkpoint_every, log_every=log_every,
        patience=early_stopping_patience, window=early_stopping_window,
        min_steps=early_stopping_min_steps, time_limit_s=time_limit_s, loss_key=loss_key,
        callbacks=callbacks, last_checkpoint=latest, checkpoint_dir=checkpoint_dir)
    manager.wait_until_finished()

    state_step = progress.step
    if return_best and progress.best and progress.best['step'] != progress.step:
      target = state_lib.abstract(state)
      del state  # release the last state before the best one is read back
      state_step = progress.best['step']
      state = _restore(manager, state_step, target).state
    log.close()
    if is_main:
      _finish_files(stage_dir, progress, plot)
    barrier(f'{stage}: finished')  # done.json and best.json are there for every process
    return state, _history(stage_dir, progress, latest, state_step)
  finally:
    # Let saves in flight complete: on an error, the last good checkpoint must be on disk.
    manager.wait_until_finished()
    manager.close()
    if log is not None:
      log.close()


def _train(stage: str, state: Any, step_fn: StepFn, iterator: Any,
           manager: ocp.CheckpointManager, log: metrics_log.MetricsLog, progress: _Progress, *,
           num_steps: int, seed: int, eval_fn: EvalFn | None, eval_every: int,
           best_metric: str | None, best_mode: str, checkpoint_every: int, log_every: int,
           patience: int | None, window: int, min_steps: int, time_limit_s: float | None,
           loss_key: str,
           callbacks: Sequence[Callback], last_checkpoint: int | None, checkpoint_dir: str
           ) -> Any:
  """Steps from `progress.step` until a stop reason is set; updates `progress` in place."""
  is_main = jax.process_index() == 0
  meter = metrics_log.Progress(stage, num_steps, progress.step, time_limit_s=time_limit_s)
  base_key = jax.random.key(seed)
  run_start, elapsed_before = time.perf_counter(), progress.elapsed_s
  step = start_step = progress.step
  ahead = None  # the next batch, fetched while the device runs the current step

  while progress.stop_reason is None:
    t0 = time.perf_counter()
    batch = _next_batch(iterator, stage, step + 1) if ahead is None else ahead[0]
    ahead = None
    t1 = time.perf_counter()
    state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
    step += 1
    elapsed = elapsed_before + time.perf_counter() - run_start
    time_up = time_limit_s is not None and elapsed >= time_limit_s
    if time_limit_s is not None and jax.process_count() > 1:
      # The processes' clocks differ: all must stop (and save) at the same step.
      time_up = bool(multihost_utils.broadcast_one_to_all(np.asarray(time_up)))
    evaluate = eval_fn is not None and (
        (eval_every and step % eval_every == 0) or step == num_steps or time_up)
    boundary = evaluate or time_up or step == num_steps or step % checkpoint_every == 0
    fetch_s = 0.0
    if not boundary:
      # Overlap host-side batching with the device. Never before a possible save: the
      # iterator's saved position must be that of the state (early stopping and the time limit
      # only stop on such boundaries).
      t = time.perf_counter()
      ahead = (_next_batch(iterator, stage, step + 1),)
      fetch_s = time.perf_counter() - t
    metrics = metrics_log.scalars(jax.device_get(metrics))
    meter.add_step(data_s=t1 - t0 + fetch_s, step_s=time.perf_counter() - t1 - fetch_s)
    if step == start_step + 1 and is_main:
      logger.info('%s: step %d took %.1f s (with compilation).', stage, step,
                  time.perf_counter() - t0)

    if loss_key not in metrics:
      raise KeyError(f'stage {stage!r}: the step returned no {loss_key!r} metric (it returned '
                     f'{sorted(metrics)}); set loss_key to the loss it reports.')
    if not math.isfinite(metrics[loss_key]):
      raise NonFiniteLossError(stage, step, loss_key, metrics, last_checkpoint, checkpoint_dir)

    eval_metrics = None
    if evaluate:
      t = time.perf_counter()
      eval_metrics = metrics_log.scalars(eval_fn(state))
      eval_s = time.perf_counter() - t
      if best_metric is not None:
        if best_metric not in eval_metrics:
          raise KeyError(f'stage {stage!r}: eval_fn returned {sorted(eval_metrics)}, without '
                         f'best_metric {best_metric!r}.')
        if _improved(eval_metrics[best_metric], progress.best, best_metric, best_mode):
          progress.best = {'step': step, 'metrics': eval_metrics}
        progress.record(eval_metrics[best_metric], window, best_mode)
        if (patience is not None and progress.evals_since_best >= patience
            and step >= min_steps):
          progress.stop_reason = 'early_stopping'
    if progress.stop_reason is None and time_up:
      progress.stop_reason = 'time_limit'
    elif progress.stop_reason is None and step >= num_steps:
      progress.stop_reason = 'num_steps'

    if step % log_every == 0 or progress.stop_reason is not None:
      perf = meter.perf(step)
      log.write(step, 'train', {**metrics, **perf})
      if is_main:
        logger.info('%s', meter.line(step, metrics, perf, elapsed))
    if eval_metrics is not None:
      log.write(step, 'eval', {**eval_metrics, 'perf/eval_s': eval_s})
      if is_main:
        shown = ', '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
        best = (f' | best {best_metric} {progress.best["metrics"][best_metric]:.4g} at step '
                f'{progress.best["step"]}' if best_metric is not None else '')
        logger.info('%s eval at step %d (%.1f s): %s%s', stage, step, eval_s, shown,
                    best)
    progress.step = step
    progress.elapsed_s = elapsed_before + time.perf_counter() - run_start
    if boundary:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(iterator),
          meta=ocp.args.JsonSave(progress.to_meta(metrics, eval_metrics))),
          metrics=({**eval_metrics, _STEP_METRIC: step}
                   if best_metric is not None and eval_metrics is not None else None))
      last_checkpoint = step
    if progress.stop_reason is not None and is_main:
      logger.info('%s: stopping at step %d (%s) after %s of training.', stage, step,
                  progress.stop_reason, metrics_log.format_duration(progress.elapsed_s))
    for callback in callbacks:
      callback(step, state, metrics)
  return state


def _next_batch(iterator: Any, stage: str, step: int) -> Any:
  try:
    return next(iterator)
  except StopIteration:
    # Raised out of run_stage as such, it would end a caller's generator or loop silently.
    raise RuntimeError(f'stage {stage!r}: the data ran out before step {step}; give the stage a '
                       'pipeline that repeats (num_epochs=None) and bound it by num_steps.'
                       ) from None


def _finish_files(stage_dir: str, progress: _Progress, plot: bool) -> None:
  """best.json, done.json and the plots of a stage that has ended (process 0)."""
  if progress.best is not None:
    _write_json(os.path.join(stage_dir, BEST_FILE), progress.best)
  _write_json(os.path.join(stage_dir, DONE_FILE),
              {'step': progress.step, 'stop_reason': progress.stop_reason,
               'elapsed_s': progress.elapsed_s, 'best': progress.best})
  if plot:
    try:
      paths = plots.plot_metrics(stage_dir)
      logger.info('%s: wrote %d plots to %s.', os.path.basename(stage_dir), len(paths),
                  os.path.join(stage_dir, plots.PLOTS_DIR))
    except Exception:  # pylint: disable=broad-except
      logger.exception('%s: plotting failed; the stage itself finished.', stage_dir)


def _history(stage_dir: str, progress: _Progress, resumed_from: int | None,
             state_step: int) -> History:
  return History(records=metrics_log.read_metrics(stage_dir), best=progress.best,
                 stop_reason=progress.stop_reason, step=progress.step,
                 resumed_from=resumed_from, state_step=state_step)
