"""benchmarks.bench_growth: FLOP counting with loops, FLOPs against shapes, the check, one run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_growth as growth
from benchmarks import common
from configs import synthsign


def _timing(seconds):
  return common.Timing(seconds, seconds, seconds, 5)


def test_loop_flops_counts_while_trips_and_scan_length():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  matmul = 2 * 4 * 8 * 8

  def looped(x, w):
    _, x = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))
    return x

  def scanned(x, w):
    return jax.lax.scan(lambda x, _: (x @ w, None), x, None, length=5)[0]

  assert growth.loop_flops(jax.make_jaxpr(looped)(x, w), while_trips=3) == 3 * matmul
  assert growth.loop_flops(jax.make_jaxpr(jax.jit(scanned))(x, w)) == 5 * matmul
  with pytest.raises(ValueError, match='while loop'):
    growth.loop_flops(jax.make_jaxpr(looped)(x, w))


def test_step_flops_double_with_the_batch():
  config = synthsign.get_config('skeleton_only,tiny')
  for stage in ('sft', 'grpo'):
    at = growth.stage_runner(config, stage)
    base = growth.Shape(batch=2, frames=16, tokens=4, group=2)
    flops = {dim: at(base.scaled(dim, 2), compile_step=False).flops
             for dim in ('batch', 'group', 'frames')}
    one = at(base, compile_step=False).flops
    assert one > 0
    np.testing.assert_allclose(flops['batch'] / one, 2.0, rtol=1e-9, err_msg=stage)
    # Longer videos cost more, but the prompt and text do not grow with them.
    assert 1.0 < flops['frames'] / one < 2.0, stage
    if stage == 'grpo':
      # The prefix and prefill are shared by the group: less than twice the FLOPs.
      assert 1.0 < flops['group'] / one < 2.0
  # Stage 1's contrastive loss compares every pair of a batch: at least twice.
  at = growth.stage_runner(config, 'represent')
  rep = [at(growth.Shape(b, 16, 4), compile_step=False).flops for b in (2, 4)]
  assert rep[1] / rep[0] >= 2.0


def _measurement(dim, scale, seconds, flops, **kwargs):
  return growth.Measurement('sft', dim, scale, growth.Shape(8 * scale, 48, 24), _timing(seconds),
                            flops, **kwargs)


def test_rows_report_and_plot(tmp_path):
  xla = lambda b: {'flops': 2e9 * b, 'bytes accessed': 1e8 * b}
  ms = [_measurement('base', 1, 1.0, 1e9, xla=xla(1)),
        _measurement('frames', 2, 1.9, 2e9, xla=xla(2)),
        _measurement('batch', 2, 2.5, 2e9, xla=xla(3))]
  rows = growth.growth_rows(ms, tolerance=1.15)
  assert [r.holds for r in rows] == [None, True, False]
  assert rows[1].time_ratio == pytest.approx(1.9) and rows[1].flop_ratio == pytest.approx(2.0)
  assert 'bytes accessed x3.00' in rows[2].evidence
  env = common.Env('cpu', 2, 'cpu', 100.0, 10.0, {})
  text = growth.report(rows, ms, env, (1, 2), 5)
  assert '1 of 2 rows hold' in text and '**no**' in text and 'sft batch 2x' in text
  path = tmp_path / 'growth.png'
  growth.plot(rows, str(path))
  assert path.stat().st_size > 1000


def test_jitted_run_counts_times_and_donates_a_toy_step():
  def step(state, batch, rng):
    del rng
    return state + 1.0, {'y': batch['x'] @ state}

  run = growth._jitted_run(step, np.ones((8, 8), np.float32), {'x': np.ones((4, 8), np.float32)})
  assert run.flops == 2 * 4 * 8 * 8 and run.xla['flops'] > 0 and run.compile_s > 0
  m = growth.timed(run, 'toy', 'base', 1, growth.Shape(4, 1, 1), reps=2, warmup=1)
  assert m.timing.reps == 2 and m.timing.median > 0 and m.xla == run.xla


def test_measure_runs_the_grpo_step():
  config = synthsign.get_config('skeleton_only,tiny')
  m = growth.measure(growth.stage_runner(config, 'grpo'), 'grpo', 'base', 1,
                     growth.Shape(2, 16, 3, 2), reps=1, warmup=1)
  assert set(m.phases) == set(growth.PHASES) and m.timing.median > 0
  assert m.phase_flops['sampling'] > 0 and m.phase_flops['update'] > 0
  assert m.xla['sampling bytes accessed'] > 0  # the sampler's cost analysis, from jit's cache
