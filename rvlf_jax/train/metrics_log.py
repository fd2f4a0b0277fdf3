"""Where a stage's numbers go: metrics.jsonl, TensorBoard event files and progress lines.

A record of metrics.jsonl is one JSON object per logged step or evaluation:

  {"step": 120, "wall_time": 1767000000.0, "split": "train", "loss": 2.31, "perf/steps_per_s": 3.4}
  {"step": 500, "wall_time": 1767000100.0, "split": "eval", "bleu4": 11.2, "perf/eval_s": 41.0}

Metric names are those the step or `eval_fn` returned (so `best_metric='bleu4'` names the same
key everywhere); the loop's own timings start with 'perf/'. TensorBoard gets the same scalars
under '<split>/<name>' tags, written with tensorboardX (no TensorFlow needed).

On resume both are cut back to the restored step: records after it are dropped from
metrics.jsonl and the new TensorBoard writer starts with a purge at the next step, so that a
resumed run leaves exactly the files of an uninterrupted one.

Only JAX process 0 writes, so that a multi-host run logs once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
TB_DIR = 'tb'
PERF_PREFIX = 'perf/'
STEP_TIME_PREFIX = 'time/'  # seconds a step function reports for its own parts

logger = logging.getLogger('rvlf_jax.train')


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Python floats of scalar metrics (numpy or fetched jax values).

  Raises:
    ValueError: a metric is not a scalar (a stage should reduce it in its step).
  """
  out = {}
  for name, value in metrics.items():
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f'metric {name!r} has shape {array.shape}; metrics must be scalars.')
    out[name] = float(array.reshape(()))
  return out


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (or of the one in a stage folder); [] if there is none."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
  records = []
  for i, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      # A crash can leave a half-written last line; anywhere else it is a corrupt file.
      if i < len(lines) - 1:
        raise ValueError(f'{path}:{number}: not a JSON record ({e}).') from e
      logger.warning('%s:%d: dropping a truncated last record.', path, number)
  return records


class MetricsLog:
  """Appends records to `<stage_dir>/metrics.jsonl` and TensorBoard events to `<stage_dir>/tb/`.

  Use as a context manager, or call `close()`.
  """

  def __init__(self, stage_dir: str, *, resume_step: int = 0, tensorboard: bool = True,
               enabled: bool | None = None):
    """Opens the files, dropping what was logged after `resume_step`.

    Args:
      stage_dir: the stage folder.
      resume_step: the step the run (re)starts from; later records are from a run whose state
        was lost, and the resumed run writes them again.
      tensorboard: also write TensorBoard event files (needs tensorboardX).
      enabled: write at all; default: on JAX process 0 only.
    """
    self.stage_dir = stage_dir
    self.path = os.path.join(stage_dir, METRICS_FILE)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(stage_dir, exist_ok=True)
    self._truncate(resume_step)
    self._file = open(self.path, 'a')
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError('TensorBoard logging needs tensorboardX (pip install tensorboardX), '
                          'or pass tensorboard=False.') from e
      tb_dir = os.path.join(stage_dir, TB_DIR)
      resumed = os.path.isdir(tb_dir) and any('tfevents' in n for n in os.listdir(tb_dir))
      # A SessionLog START at resume_step + 1 makes TensorBoard discard the events that the lost
      # run wrote past the checkpoint. tensorboardX names files by the second and opens them
      # with 'wb', so a unique suffix keeps a quick restart from overwriting the previous file.
      self._tb = tensorboardX.SummaryWriter(
          tb_dir, purge_step=resume_step + 1 if resumed else None, flush_secs=30,
          filename_suffix=f'.{time.time_ns()}')

  def _truncate(self, resume_step: int) -> None:
    records = read_metrics(self.path)
    kept = [r for r in records if r['step'] <= resume_step]
    if len(kept) == len(records) and os.path.exists(self.path):
      return
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for record in kept:
        f.write(json.dumps(record) + '\n')
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Logs scalar metrics of `split` ('train', 'eval', ...) at `step`; returns the record."""
    record = {'step': int(step), 'wall_time': time.time(), 'split': split, **scalars(metrics)}
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + '\n')
    # Flushed at once: the file is how a run is watched, and what a crash must not lose.
    self._file.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name not in ('step', 'wall_time', 'split'):
          self._tb.add_scalar(f'{split}/{name}', value, record['step'],
                              walltime=record['wall_time'])
    return record

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """'1h02m', '4m18s', '12s'."""
  if not math.isfinite(seconds):
    return '?'
  seconds = round(max(seconds, 0.0))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


class Progress:
  """Progress lines: step/total, steps/s, ETA, metrics, and where the wall time went.

  The loop reports the time each step spent waiting for data and running (dispatch until its
  metrics are fetched); the rest of an interval went to evaluation, checkpoints and logging. A
  step that reports its own parts in seconds under 'time/...' metrics gets them shown as shares
  of its run time.
  """

  def __init__(self, stage: str, num_steps: int, start_step: int, *,
               time_limit_s: float | None = None):
    self.stage, self.num_steps, self.time_limit_s = stage, num_steps, time_limit_s
    self._start_step = start_step
    self._reset(start_step)

  def _reset(self, step: int) -> None:
    self._interval_start = time.perf_counter()
    self._interval_step = step
    self._data_s = self._step_s = 0.0
    self._last_step_s = 0.0

  def add_step(self, data_s: float, step_s: float) -> None:
    self._data_s += data_s
    self._step_s += step_s
    self._last_step_s = step_s

  def perf(self, step: int) -> dict[str, float]:
    """Interval averages, and starts a new interval."""
    wall = max(time.perf_counter() - self._interval_start, 1e-9)
    steps = max(step - self._interval_step, 1)
    out = {'perf/steps_per_s': steps / wall, 'perf/data_s': self._data_s / steps,
           'perf/step_s': self._step_s / steps,
           'perf/other_s': max(wall - self._data_s - self._step_s, 0.0) / steps}
    self._last = (wall, self._data_s, self._step_s, self._last_step_s)
    self._reset(step)
    return out

  def line(self, step: int, metrics: Mapping[str, float], perf: Mapping[str, float],
           elapsed_s: float) -> str:
    """The progress line for `step` (after `perf(step)`)."""
    wall, data_s, step_s, last_step_s = self._last
    rate = perf['perf/steps_per_s']
    eta = (self.num_steps - step) / rate if rate > 0 else math.inf
    if self.time_limit_s is not None:
      eta = min(eta, max(self.time_limit_s - elapsed_s, 0.0))
    shown = ', '.join(f'{k} {v:.4g}' for k, v in sorted(metrics.items(), key=_metric_order)
                      if not k.startswith(STEP_TIME_PREFIX))
    parts = [f'data {data_s / wall:.0%}', f'step {step_s / wall:.0%}']
    own = [f'{k[len(STEP_TIME_PREFIX):]} {v / last_step_s:.0%}' for k, v in sorted(metrics.items())
           if k.startswith(STEP_TIME_PREFIX) and last_step_s > 0]
    if own:
      parts[-1] += f' ({", ".join(own)})'
    parts.append(f'other {max(wall - data_s - step_s, 0.0) / wall:.0%}')
    return (f'{self.stage} step {step}/{self.num_steps} ({step / self.num_steps:.0%}) | '
            f'{rate:.3g} steps/s | ETA {format_duration(eta)} | {shown} | '
            f'time: {", ".join(parts)}')


def _metric_order(item: tuple[str, float]) -> tuple[int, str]:
  return (0 if item[0] == 'loss' else 1, item[0])
