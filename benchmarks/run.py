r"""Runs every benchmark on model M and rewrites BENCHMARKS.md.

  python -m benchmarks.run                       # the full run (goal: the figures of the issue)
  python -m benchmarks.run --quick               # fewer repetitions, same shapes (< 20 minutes)
  python -m benchmarks.run --only=bench_train,bench_rewards --out=/tmp/BENCHMARKS.md

The machine's limits (`common.measure_env`: dense matmul peak, memory bandwidth) are measured once
and handed to each benchmark of `REGISTRY`, in order. A benchmark that raises is reported as
failed (its traceback printed, "failed: <error>" in its section) and the others still run; the
command then exits with status 1. The report is rewritten after every benchmark, so an
interrupted run keeps what it measured. Every figure in the report comes from this run.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import shlex
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from benchmarks import common

# The benchmarks, in the order they run and appear in the report: module names in this package,
# each exposing `run(env: common.Env, quick: bool) -> common.Section`.
REGISTRY = ('bench_train', 'bench_sampling', 'bench_grpo', 'bench_prefix', 'bench_rewards',
            'bench_growth')
PACKAGE = 'benchmarks'
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'BENCHMARKS.md')

# Issue item 7: the figures a GPU run would add, against the GPU's bf16 peak.
GPU_FIGURES = (
    'training step MFU on model M (batch 8 x 256, AdamW) vs the GPU bf16 peak',
    'sampling: 8 prompts x G=8, 64 new tokens, our group sampler vs HF generate',
    'batch-1 greedy decoding vs the memory-bandwidth roofline',
)

# What the issue measured on the 2-core development machine, set against this run's own figures
# so that a reader can tell a slow machine from a slow benchmark.
ISSUE_MATMUL_GFLOPS = 179.0
ISSUE_HF_STEP_S = 2.60
QUICK_GOAL_S = 20 * 60

Log = Callable[[str], None]


@dataclasses.dataclass
class Result:
  """One benchmark's outcome in this run.

  Attributes:
    name: its module name.
    seconds: wall time of its `run`, compilation and warm-up included.
    section: what it returned; for a failed benchmark, a section saying so.
    error: None, or 'failed: <error>'.
  """

  name: str
  seconds: float
  section: common.Section
  error: str | None = None


def _print(line: str) -> None:
  print(line, flush=True)


def load(name: str) -> Any | None:
  """The benchmark module `name`, or None when this package has no such module (yet).

  Raises:
    ImportError: the module exists but fails to import (e.g. a peer library is missing).
  """
  full = f'{PACKAGE}.{name}'
  try:
    return importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name == full:
      return None
    raise


def run_one(name: str, module: Any, env: common.Env, quick: bool, log: Log = _print) -> Result:
  """Runs one benchmark; an exception becomes a failed `Result` (its traceback logged)."""
  start = time.perf_counter()
  try:
    section = module.run(env, quick)
    if not isinstance(section, common.Section):
      raise TypeError(f'{name}.run returned {type(section).__name__}, not common.Section.')
    return Result(name, time.perf_counter() - start, section)
  except Exception as e:  # pylint: disable=broad-except  (one failure must not lose the rest)
    seconds = time.perf_counter() - start
    tb = traceback.format_exc()
    log(tb.rstrip())
    error = f'failed: {type(e).__name__}: {e}'
    body = f'**{error}**\n\n```\n{tb.rstrip()}\n```'
    return Result(name, seconds, common.Section(name, body), error)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def summary_rows(results: Sequence[Result]) -> list[list[Any]]:
  """[benchmark, figure, value] for every figure of every section (failures as one row)."""
  rows = []
  for r in results:
    if r.error:
      rows.append([r.name, '-', r.error.splitlines()[0]])
      continue
    for key, value in r.section.figures.items():
      rows.append([r.name, key, value])
    if not r.section.figures:
      rows.append([r.name, '-', '(no figures)'])
  return rows


def _gflops(value: float | None) -> str:
  return 'not measured' if value is None else f'{value:.1f} GFLOP/s'


def _machine(env: common.Env) -> str:
  rows = [
      ['CPU', env.cpu],
      ['logical cores', env.cores],
      ['JAX device', env.device],
      ['dense float32 matmul 2048^3, the MFU reference: the faster of the two below',
       f'{env.matmul_gflops:.1f} GFLOP/s'],
      ['... jitted JAX (XLA\'s GEMM), median of 5', _gflops(env.matmul_gflops_jax)],
      ['... numpy (its BLAS), median of 5', _gflops(env.matmul_gflops_blas)],
      ['memory bandwidth (256 MB float32 copy, read + write bytes, median of 5)',
       f'{env.bandwidth_gbs:.1f} GB/s'],
  ]
  versions = [[k, v] for k, v in env.versions.items()]
  return (common.table(['', 'measured'], rows) + '\n\n' +
          common.table(['library', 'version'], versions))


def _speed(results: Sequence[Result], env: common.Env, command: str,
           total_seconds: float) -> str:
  """This run's machine speed against the issue's figures, and the quick run's time goal."""
  hf_step = next((r.section.figures.get('HF/PyTorch s/step') for r in results
                  if r.name == 'bench_train' and not r.error), None)
  parts = [f'dense matmul {env.matmul_gflops:.1f} GFLOP/s (the issue: about '
           f'{ISSUE_MATMUL_GFLOPS:.0f}, {env.matmul_gflops / ISSUE_MATMUL_GFLOPS:.2f}x)']
  if hf_step:
    parts.append(f'HF/PyTorch training step of model M {hf_step:.3g} s (the issue: '
                 f'{ISSUE_HF_STEP_S:.2f} s, so this machine ran it at '
                 f'{ISSUE_HF_STEP_S / hf_step:.2f}x the issue\'s speed)')
  text = 'Speed against the issue\'s figures for this machine: ' + '; '.join(parts) + '.'
  if '--quick' in command.split():
    verdict = 'within' if total_seconds < QUICK_GOAL_S else 'over'
    text += (f' `--quick` aims at under {QUICK_GOAL_S // 60} minutes; this run took '
             f'{total_seconds:.0f} s, {verdict} that.')
  return text


def _gpu_section(env: common.Env) -> str:
  on_gpu = not env.device.lower().startswith('cpu')
  if on_gpu:
    status = f'measured on {env.device} in the sections above'
    note = ('This run had a GPU: the benchmarks above ran on it. The MFU reference is still the '
            'matmul peak measured in this run (float32), not the GPU\'s bf16 peak.')
  else:
    status = 'not measured'
    note = ('Not measured: no GPU was lent to this task, and this run\'s JAX device is '
            f'`{env.device}`. The rows stay here until a run on a GPU machine fills them in, '
            'against the GPU\'s bf16 peak.')
  return common.table(['figure (issue item 7)', 'value'],
                      [[figure, status] for figure in GPU_FIGURES]) + '\n\n' + note


def render(results: Sequence[Result], env: common.Env, command: str, started: str,
           total_seconds: float, missing: Sequence[str] = (), pending: Sequence[str] = ()) -> str:
  """The whole BENCHMARKS.md."""
  so_far = 'so far' if pending else 'in all'
  parts = [
      '# Benchmarks',
      '',
      f'Generated by `{command}` (started {started}, {total_seconds:.0f} s {so_far}). Every '
      'figure below was measured by that command in that run; nothing is edited by hand. '
      'Timings are medians (min, max) over the timed repetitions after warm-up.',
      '',
  ]
  if pending:
    parts += [f'**Incomplete: still to run: {", ".join(pending)}.**', '']
  parts += ['## Machine', '', _machine(env), '', _speed(results, env, command, total_seconds),
            '']
  parts += ['## Summary', '',
            common.table(['benchmark', 'figure', 'value'], summary_rows(results)), '']
  wall = [[r.name, r.section.title if not r.error else '-', f'{r.seconds:.1f} s',
           r.error or 'ok'] for r in results]
  wall += [[name, '-', '-', 'not in this checkout (module missing)'] for name in missing]
  parts += [common.table(['benchmark', 'section', 'wall time', 'status'], wall), '']
  for r in results:
    parts += [f'## {r.section.title}', '',
              f'*`benchmarks/{r.name}.py`, wall time {r.seconds:.1f} s'
              f'{" (failed)" if r.error else ""}.*', '', r.section.markdown.strip(), '']
    if r.section.files:
      parts += ['Files: ' + ', '.join(f'`{f}`' for f in r.section.files), '']
  parts += ['## GPU', '', _gpu_section(env), '']
  return '\n'.join(parts)


def _write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def run_all(names: Sequence[str], *, quick: bool, out: str, command: str,
            env: common.Env | None = None, log: Log = _print) -> int:
  """Runs the benchmarks `names` in order and writes the report to `out` after each.

  Args:
    names: module names of this package.
    quick: passed to every benchmark.
    out: the BENCHMARKS.md to (re)write.
    command: the command line recorded in the report.
    env: the machine (measured here when None).
    log: receives the progress lines and tracebacks.

  Returns:
    The exit status: 0 when every benchmark present ran, 1 when one failed.
  """
  start = time.perf_counter()
  started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  if env is None:
    log('measuring the machine (matmul peak, memory bandwidth) ...')
    env = common.measure_env()
  log(f'machine: {env.cpu}, {env.cores} cores, {env.device}; matmul {env.matmul_gflops:.1f} '
      f'GFLOP/s, bandwidth {env.bandwidth_gbs:.1f} GB/s')
  modules, missing = {}, []
  results: list[Result] = []
  for name in names:
    try:
      module = load(name)
    except Exception as e:  # pylint: disable=broad-except
      log(traceback.format_exc().rstrip())
      error = f'failed: cannot import benchmarks.{name}: {type(e).__name__}: {e}'
      results.append(Result(name, 0.0, common.Section(name, f'**{error}**'), error))
      continue
    if module is None:
      log(f'benchmarks.{name}: no such module in this checkout; left out of the report.')
      missing.append(name)
    else:
      modules[name] = module
  todo = list(modules)
  for i, name in enumerate(todo):
    log(f'[{i + 1}/{len(todo)}] {name}{" (quick)" if quick else ""} ...')
    result = run_one(name, modules[name], env, quick, log)
    results.append(result)
    log(f'[{i + 1}/{len(todo)}] {name}: {result.error or "done"} in {result.seconds:.1f} s')
    _write(out, render(results, env, command, started, time.perf_counter() - start, missing,
                       pending=todo[i + 1:]))
  total = time.perf_counter() - start
  _write(out, render(results, env, command, started, total, missing))
  rows = summary_rows(results)
  log('')
  log(common.table(['benchmark', 'figure', 'value'], [[a, b, _fmt(c)] for a, b, c in rows]))
  failed = [r.name for r in results if r.error]
  log(f'\nwrote {out} in {total:.0f} s' + (f'; FAILED: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


def command_line(argv: Sequence[str]) -> str:
  """The command as a user would type it again."""
  return ' '.join(['python -m benchmarks.run', *map(shlex.quote, argv[1:])])


def standalone(run: Callable[[common.Env, bool], common.Section],
               argv: Sequence[str] | None = None) -> None:
  """`python -m benchmarks.<module> [--quick]`: measures the machine, runs, prints the section."""
  argv = list(sys.argv if argv is None else argv)
  unknown = [a for a in argv[1:] if a != '--quick']
  if unknown:
    raise SystemExit(f'usage: python -m benchmarks.<module> [--quick]; unknown: {unknown}')
  env = common.measure_env()
  print(f'machine: {env.cpu}, {env.cores} cores, {env.device}; matmul '
        f'{env.matmul_gflops:.1f} GFLOP/s, bandwidth {env.bandwidth_gbs:.1f} GB/s', flush=True)
  section = run(env, '--quick' in argv[1:])
  print(f'## {section.title}\n\n{section.markdown}')


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  names = [n for n in (s.strip() for s in flags.FLAGS.only.split(',')) if n] or list(REGISTRY)
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise SystemExit(f'--only: unknown benchmarks {unknown}; known: {", ".join(REGISTRY)}.')
  del argv  # absl's leftovers; the report records the whole command line as typed
  status = run_all(names, quick=flags.FLAGS.quick, out=flags.FLAGS.out,
                   command=command_line(sys.argv))
  sys.exit(status)


if __name__ == '__main__':
  # Flags are defined only when this file is the program: a benchmark importing this module (for
  # `standalone`) must not define them a second time.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool('quick', False, 'Fewer repetitions (still >= 5), same shapes.')
  flags.DEFINE_string('only', '', 'Comma-separated benchmarks to run (default: all, in order).')
  flags.DEFINE_string('out', DEFAULT_OUT, 'The report to write.')
  app.run(main)
