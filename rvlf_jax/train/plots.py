"""PNG curves of a stage's metrics.jsonl: one plot per metric and split.

`run_stage` calls `plot_metrics` when a stage ends; it also runs on its own, e.g. on a stage that is
still training:

  python -m rvlf_jax.train.plots WORKDIR/STAGE [OUT_DIR]

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting neither needs a
display nor changes the backend of the process that imports this module.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from rvlf_jax.train import metrics_log

PLOTS_DIR = 'plots'
BEST_FILE = 'best.json'
_META_KEYS = ('step', 'wall_time', 'split')


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
  """TensorBoard's exponential moving average, debiased so the first points are not pulled to 0."""
  out = np.empty_like(values)
  last, norm = 0.0, 0.0
  for i, v in enumerate(values):
    last = weight * last + (1 - weight) * v
    norm = weight * norm + (1 - weight)
    out[i] = last / norm
  return out


def _file_name(split: str, name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{split}_{name}') + '.png'


def curves(records: Sequence[Mapping[str, Any]], *, include_perf: bool = False
           ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
  """{(split, metric): (steps, values)} of finite values, in step order."""
  points = collections.defaultdict(list)
  for record in records:
    split = record.get('split', 'train')
    for name, value in record.items():
      if name in _META_KEYS or not isinstance(value, (int, float)):
        continue
      if name.startswith(metrics_log.PERF_PREFIX) and not include_perf:
        continue
      if np.isfinite(value):
        points[split, name].append((record['step'], float(value)))
  out = {}
  for key, pts in points.items():
    pts.sort()
    out[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
  return out


def plot_metrics(source: str | Sequence[Mapping[str, Any]], out_dir: str | None = None, *,
                 title: str | None = None, best: Mapping[str, Any] | None = None,
                 include_perf: bool = False) -> list[str]:
  """Writes one PNG per (split, metric) of a metrics.jsonl.

  Args:
    source: a stage folder, a metrics.jsonl file, or its records.
    out_dir: where to write; default `<stage folder>/plots` (required when `source` is records).
    title: prefix of every plot title; default the stage folder's name.
    best: {'step', 'metrics'} of the best evaluation, marked on the eval plots; default read from
      the stage folder's best.json when there is one.
    include_perf: also plot the loop's 'perf/...' timings.

  Returns:
    The paths written, e.g. [.../plots/train_loss.png, .../plots/eval_bleu4.png].
  """
  # Imported here: only plotting needs matplotlib, not the training loop that imports this.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

  if isinstance(source, str):
    stage_dir = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    records = metrics_log.read_metrics(source)
    out_dir = out_dir or os.path.join(stage_dir, PLOTS_DIR)
    title = title if title is not None else os.path.basename(os.path.normpath(stage_dir))
    best_path = os.path.join(stage_dir, BEST_FILE)
    if best is None and os.path.exists(best_path):
      with open(best_path) as f:
        best = json.load(f)
  else:
    records = list(source)
    if out_dir is None:
      raise ValueError('plot_metrics(records) needs out_dir.')
  os.makedirs(out_dir, exist_ok=True)

  paths = []
  for (split, name), (steps, values) in sorted(curves(records, include_perf=include_perf).items()):
    fig = figure.Figure(figsize=(6.4, 4.0), dpi=100)
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if split == 'train' and len(values) > 50:
      # Per-step training metrics are noisy: show them faintly under their moving average.
      ax.plot(steps, values, color='tab:blue', alpha=0.25, linewidth=0.8)
      ax.plot(steps, _smooth(values, 0.9), color='tab:blue', linewidth=1.5, label='EMA 0.9')
      ax.legend(loc='best')
    else:
      ax.plot(steps, values, color='tab:blue' if split == 'train' else 'tab:orange',
              marker='o' if len(values) <= 50 else None, markersize=3, linewidth=1.5)
    if split == 'eval' and best and name in best.get('metrics', {}):
      ax.plot([best['step']], [best['metrics'][name]], marker='*', markersize=14,
              color='tab:red', linestyle='none', label=f'best (step {best["step"]})')
      ax.legend(loc='best')
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.set_title(f'{title}: {split} {name}' if title else f'{split} {name}')
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, _file_name(split, name))
    fig.savefig(path, format='png')
    paths.append(path)
  return paths


def main(argv: Sequence[str]) -> None:
  if len(argv) not in (2, 3):
    sys.exit('usage: python -m rvlf_jax.train.plots STAGE_DIR_OR_METRICS_JSONL [OUT_DIR]')
  for path in plot_metrics(argv[1], argv[2] if len(argv) == 3 else None):
    print(path)


if __name__ == '__main__':
  main(sys.argv)
