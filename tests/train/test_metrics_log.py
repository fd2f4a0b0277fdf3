"""metrics.jsonl records, resume truncation, TensorBoard purge and progress lines."""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from rvlf_jax.train import metrics_log


def _tb_scalars(stage_dir, tag):
  acc = event_accumulator.EventAccumulator(os.path.join(stage_dir, metrics_log.TB_DIR))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_drops_what_came_after_the_restored_step(tmp_path):
  stage_dir = str(tmp_path / 'stage')
  with metrics_log.MetricsLog(stage_dir) as log:
    for step in range(1, 6):
      log.write(step, 'train', {'loss': np.float32(10 - step)})
  with metrics_log.MetricsLog(stage_dir, resume_step=3) as log:
    for step in range(4, 7):
      log.write(step, 'train', {'loss': 100.0 + step})
  records = metrics_log.read_metrics(stage_dir)
  assert [(r['step'], r['loss']) for r in records] == [
      (1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
  assert _tb_scalars(stage_dir, 'train/loss') == [
      (1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]


def test_a_half_written_last_line_is_dropped_and_other_damage_raises(tmp_path):
  path = tmp_path / metrics_log.METRICS_FILE
  path.write_text(json.dumps({'step': 1, 'loss': 1.0}) + '\n{"step": 2, "lo')
  assert metrics_log.read_metrics(str(path)) == [{'step': 1, 'loss': 1.0}]
  path.write_text('{"step": 1\n' + json.dumps({'step': 2}) + '\n')
  with pytest.raises(ValueError, match=':1: not a JSON record'):
    metrics_log.read_metrics(str(path))


def test_metrics_must_be_scalars():
  assert metrics_log.scalars({'a': np.float32(1.5), 'b': np.array([2]), 'c': 3}) == {
      'a': 1.5, 'b': 2.0, 'c': 3.0}
  with pytest.raises(ValueError, match="'v' has shape"):
    metrics_log.scalars({'v': np.zeros(3)})


def test_progress_line():
  progress = metrics_log.Progress('sft', 1000, 0)
  progress.add_step(data_s=0.01, step_s=0.09)
  perf = progress.perf(100)
  line = progress.line(100, {'loss': 2.5, 'time/sample': 0.06, 'time/update': 0.03}, perf, 10.0)
  assert line.startswith('sft step 100/1000 (10%) | ')
  assert 'steps/s | ETA ' in line and '| loss 2.5 |' in line
  assert '(sample 67%, update 33%)' in line
  assert metrics_log.format_duration(3725) == '1h02m'
  assert metrics_log.format_duration(258) == '4m18s'
