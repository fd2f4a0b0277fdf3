"""The stage loop on a toy regression: exact resume, NaN stop, best checkpoint, stop rules, logs.

The model is linear regression with input dropout (so every step uses its key) trained with adam
on a shuffled, repeating grain pipeline over a numpy source: small enough that each run costs
milliseconds of compute, and the loop's bookkeeping is what is tested.
"""

import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from rvlf_jax.train import loop, metrics_log, plots
from rvlf_jax.train import state as state_lib
from tests.helpers import fast_jit

TX = optax.adam(0.05)
_RNG = np.random.RandomState(0)
_X = _RNG.randn(20, 3).astype(np.float32)
_Y = (_X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1 * _RNG.randn(20)).astype(np.float32)
SOURCE = [{'x': _X[i], 'y': _Y[i]} for i in range(len(_X))]


def make_data(seed=0):
  """5 batches of 4 per epoch, shuffled anew each epoch, forever."""
  return (grain.MapDataset.source(SOURCE).shuffle(seed=seed).repeat(None)
          .to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(4))


def init_state():
  return state_lib.create({'w': jnp.zeros(3), 'b': jnp.zeros(())}, TX)


def _loss(params, x, y):
  return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)


def _step(state, batch, rng, nan_at=-1):
  keep = jax.random.bernoulli(rng, 0.8, batch['x'].shape)
  loss, grads = jax.value_and_grad(_loss)(state.params, batch['x'] * keep / 0.8, batch['y'])
  state = state_lib.apply_gradients(state, grads, TX)
  loss = jnp.where(state.step == nan_at, jnp.nan, loss)
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


STEP = fast_jit(_step, donate_argnums=0)
NAN_AT_7 = fast_jit(lambda s, b, r: _step(s, b, r, nan_at=7), donate_argnums=0)
_EVAL = fast_jit(_loss)


def eval_mse(state):
  return {'mse': float(_EVAL(state.params, _X, _Y))}


def scripted_eval(scores):
  """An eval_fn returning scores[step] as 'score' (state.step is the loop step here)."""
  return lambda state: {'score': scores[int(state.step)]}


class Interrupt(Exception):
  pass


def interrupt_at(step):
  def callback(s, state, metrics):
    del state, metrics
    if s == step:
      raise Interrupt(f'interrupted at step {s}')
  return callback


def checkpoint_steps(workdir, stage):
  directory = os.path.join(workdir, stage, loop.CHECKPOINTS_DIR)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def read_tb(stage_dir):
  acc = event_accumulator.EventAccumulator(os.path.join(stage_dir, metrics_log.TB_DIR))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


COMMON = dict(num_steps=12, checkpoint_every=4, log_every=1, eval_fn=eval_mse, eval_every=6,
              best_metric='mse', best_mode='min', return_best=False, plot=False)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  state, history = loop.run_stage('stage', init_state, STEP, make_data(), workdir, **COMMON)
  return workdir, state, history


@pytest.mark.parametrize('interruption', ['callback', 'shorter_run'])
def test_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path, interruption):
  ref_dir, ref_state, ref_history = uninterrupted
  workdir = str(tmp_path)
  if interruption == 'callback':
    # Crashes after step 11: steps 9..11 are lost and trained again from the checkpoint of 8.
    with pytest.raises(Interrupt):
      loop.run_stage('stage', init_state, STEP, make_data(), workdir,
                     callbacks=[interrupt_at(11)], **COMMON)
    assert checkpoint_steps(workdir, 'stage') == [6, 8]  # 6 was evaluated, hence saved
    resumed_from = 8
  else:
    loop.run_stage('stage', init_state, STEP, make_data(), workdir, **{**COMMON, 'num_steps': 7})
    resumed_from = 7
  state, history = loop.run_stage('stage', init_state, STEP, make_data(), workdir, **COMMON)

  assert history.resumed_from == resumed_from
  assert history.stop_reason == 'num_steps' and history.step == 12
  assert [r['step'] for r in history.train] == list(range(1, 13))
  for name in ('loss', 'grad_norm'):
    assert [r[name] for r in history.train] == [r[name] for r in ref_history.train]
  assert int(state.step) == 12
  for got, want in zip(leaves(state), leaves(ref_state), strict=True):
    np.testing.assert_array_equal(got, want)
  # TensorBoard shows each step once, with the uninterrupted run's values.
  tb, ref_tb = read_tb(os.path.join(workdir, 'stage')), read_tb(os.path.join(ref_dir, 'stage'))
  assert tb['train/loss'] == ref_tb['train/loss']
  assert [s for s, _ in tb['train/loss']] == list(range(1, 13))


def test_metrics_jsonl_and_tensorboard_events(uninterrupted):
  workdir, state, history = uninterrupted
  stage_dir = os.path.join(workdir, 'stage')
  records = metrics_log.read_metrics(stage_dir)
  assert records == history.records
  train = [r for r in records if r['split'] == 'train']
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in train] == list(range(1, 13))
  assert [r['step'] for r in evals] == [6, 12]
  for r in records:
    assert isinstance(r['wall_time'], float)
    assert all(isinstance(v, float) for k, v in r.items() if k not in ('step', 'split'))
  assert {'loss', 'grad_norm', 'perf/steps_per_s', 'perf/data_s', 'perf/step_s'} <= set(train[0])
  assert evals[-1]['mse'] == eval_mse(state)['mse']

  tb = read_tb(stage_dir)
  assert {'train/loss', 'train/grad_norm', 'eval/mse', 'eval/perf/eval_s'} <= set(tb)
  np.testing.assert_allclose([v for _, v in tb['train/loss']], [r['loss'] for r in train],
                             rtol=1e-6)
  assert [s for s, _ in tb['eval/mse']] == [6, 12]
  with open(os.path.join(stage_dir, loop.BEST_FILE)) as f:
    best = json.load(f)
  assert best == history.best
  assert best['metrics']['mse'] == min(r['mse'] for r in evals)


def test_nan_loss_stops_without_saving_the_bad_state(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(loop.NonFiniteLossError, match=r"stage 'nan_stage'.* at step 7") as error:
    loop.run_stage('nan_stage', init_state, NAN_AT_7, make_data(), workdir, num_steps=12,
                   checkpoint_every=1, keep=2, log_every=1, plot=False)
  assert error.value.step == 7 and error.value.last_checkpoint == 6
  assert checkpoint_steps(workdir, 'nan_stage') == [5, 6]
  assert not os.path.exists(os.path.join(workdir, 'nan_stage', loop.DONE_FILE))
  assert max(r['step'] for r in metrics_log.read_metrics(os.path.join(workdir, 'nan_stage'))) == 6

  good = loop.restore_state(workdir, 'nan_stage', init_state, 'latest')
  assert int(good.step) == 6
  assert all(np.all(np.isfinite(x)) for x in leaves(good))
  # Fixed, the stage goes on from the good checkpoint.
  _, history = loop.run_stage('nan_stage', init_state, STEP, make_data(), workdir, num_steps=8,
                              checkpoint_every=1, keep=2, plot=False)
  assert history.resumed_from == 6 and history.step == 8


@pytest.mark.parametrize('mode,scores', [
    ('max', {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.4, 10: 0.2}),
    ('min', {2: 0.5, 4: 0.1, 6: 0.7, 8: 0.6, 10: 0.8}),
])
def test_best_checkpoint_is_kept_while_older_ones_go(tmp_path, mode, scores):
  workdir = str(tmp_path)
  state, history = loop.run_stage(
      'sft', init_state, STEP, make_data(), workdir, num_steps=10, eval_fn=scripted_eval(scores),
      eval_every=2, best_metric='score', best_mode=mode, checkpoint_every=2, keep=2, plot=False)
  assert checkpoint_steps(workdir, 'sft') == [4, 8, 10]
  assert history.best == {'step': 4, 'metrics': {'score': scores[4]}}
  assert history.state_step == 4 and int(state.step) == 4  # the best state is returned
  with open(os.path.join(workdir, 'sft', loop.BEST_FILE)) as f:
    assert json.load(f) == history.best
  best = loop.restore_state(workdir, 'sft', init_state, 'best')
  for got, want in zip(leaves(best), leaves(state), strict=True):
    np.testing.assert_array_equal(got, want)


def test_early_stopping_and_a_finished_stage_is_not_rerun(tmp_path):
  workdir = str(tmp_path)
  scores = {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.9, 10: 0.95}
  kwargs = dict(num_steps=20, eval_fn=scripted_eval(scores), eval_every=2, best_metric='score',
                early_stopping_patience=2, checkpoint_every=100, plot=False)
  state, history = loop.run_stage('sft', init_state, STEP, make_data(), workdir, **kwargs)
  # Steps 6 and 8 do not beat step 4 (a tie is no improvement): stop after the second.
  assert history.stop_reason == 'early_stopping' and history.step == 8
  assert [r['step'] for r in history.eval] == [2, 4, 6, 8]
  assert int(state.step) == 4
  assert checkpoint_steps(workdir, 'sft') == [4, 6, 8]
  with loop.checkpoint_manager(os.path.join(workdir, 'sft', loop.CHECKPOINTS_DIR),
                               best_metric='score', read_only=True) as manager:
    assert manager.best_step() == 4  # orbax ranks the tie at step 8 below step 4 as well
  with open(os.path.join(workdir, 'sft', loop.DONE_FILE)) as f:
    assert json.load(f)['stop_reason'] == 'early_stopping'

  def must_not_run(*args):
    raise AssertionError('a finished stage was trained again')

  again, history_again = loop.run_stage('sft', init_state, must_not_run, must_not_run, workdir,
                                        **kwargs)
  assert history_again.stop_reason == 'early_stopping' and history_again.step == 8
  assert history_again.records == history.records
  for got, want in zip(leaves(again), leaves(state), strict=True):
    np.testing.assert_array_equal(got, want)


def test_early_stopping_waits_for_min_steps(tmp_path):
  """A dip before min_steps does not end the stage; the evaluations before it still rank the
  checkpoints and count towards the patience."""
  scores = {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.3, 10: 1.0, 12: 0.2, 14: 0.1, 16: 0.1, 18: 0.1}
  kwargs = dict(num_steps=20, eval_fn=scripted_eval(scores), eval_every=2, best_metric='score',
                early_stopping_patience=2, checkpoint_every=100, plot=False)
  _, eager = loop.run_stage('eager', init_state, STEP, make_data(), str(tmp_path), **kwargs)
  assert eager.stop_reason == 'early_stopping' and eager.step == 8 and eager.state_step == 4
  state, waited = loop.run_stage('waited', init_state, STEP, make_data(), str(tmp_path),
                                 early_stopping_min_steps=9, **kwargs)
  # Step 10 is a new best; 12 and 14 are not: the patience of 2 ends it at step 14.
  assert waited.stop_reason == 'early_stopping' and waited.step == 14
  assert waited.best == {'step': 10, 'metrics': {'score': 1.0}} and int(state.step) == 10
  # With no new best after the dip, it stops at the first evaluation from min_steps on.
  late = {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.3, 10: 0.3, 12: 0.3, 14: 0.3}
  _, held = loop.run_stage('held', init_state, STEP, make_data(), str(tmp_path),
                           **{**kwargs, 'eval_fn': scripted_eval(late)},
                           early_stopping_min_steps=11)
  assert held.stop_reason == 'early_stopping' and held.step == 12 and held.state_step == 4
  with pytest.raises(ValueError, match='early_stopping_min_steps must be >= 0'):
    loop.run_stage('bad', init_state, STEP, make_data(), str(tmp_path),
                   early_stopping_min_steps=-1, **kwargs)


def test_early_stopping_watches_the_running_mean_across_a_resume(tmp_path):
  workdir = str(tmp_path)
  # Noisy but rising: a dip below the best at 6 and 8, then a new best. Watched evaluation by
  # evaluation (window 1) this stops at step 8; the mean of the last 2 still rises until 12.
  scores = {2: 1.0, 4: 3.0, 6: 2.0, 8: 2.5, 10: 3.5, 12: 2.0, 14: 1.5, 16: 1.0}
  kwargs = dict(eval_fn=scripted_eval(scores), eval_every=2, best_metric='score',
                early_stopping_patience=2, checkpoint_every=100, plot=False)
  _, plain = loop.run_stage('plain', init_state, STEP, make_data(), workdir, num_steps=20,
                            **kwargs)
  assert plain.stop_reason == 'early_stopping' and plain.step == 8
  # Means of the last two: 1, 2, 2.5, 2.25, 3, 2.75, 1.75: no new best mean after step 10.
  # Interrupted at step 8: the window's values come back from its checkpoint.
  _, first = loop.run_stage('smooth', init_state, STEP, make_data(), workdir, num_steps=8,
                            early_stopping_window=2, **kwargs)
  assert first.stop_reason == 'num_steps'
  state, history = loop.run_stage('smooth', init_state, STEP, make_data(), workdir,
                                  num_steps=20, early_stopping_window=2, **kwargs)
  assert history.resumed_from == 8
  assert history.stop_reason == 'early_stopping' and history.step == 14
  assert history.best['step'] == 10 and int(state.step) == 10  # the best single evaluation
  with pytest.raises(ValueError, match='early_stopping_window must be >= 1, got 0'):
    loop.run_stage('bad', init_state, STEP, make_data(), workdir, num_steps=4,
                   early_stopping_window=0, **kwargs)


def test_time_limit_stops_and_counts_as_finished(tmp_path):
  workdir = str(tmp_path)

  def slow_step(state, batch, rng):
    time.sleep(0.01)
    return STEP(state, batch, rng)

  evaluated = []

  def eval_fn(state):
    evaluated.append(int(state.step))
    return eval_mse(state)

  kwargs = dict(num_steps=100_000, time_limit_s=0.4, eval_fn=eval_fn, log_every=1000, plot=False)
  _, history = loop.run_stage('control', init_state, slow_step, make_data(), workdir, **kwargs)
  assert history.stop_reason == 'time_limit' and 1 <= history.step < 100
  assert evaluated == [history.step]  # evaluated at the end only
  assert [r['step'] for r in history.train] == [history.step]  # the last step is logged
  assert checkpoint_steps(workdir, 'control') == [history.step]
  with open(os.path.join(workdir, 'control', loop.DONE_FILE)) as f:
    assert json.load(f)['elapsed_s'] >= 0.4

  _, again = loop.run_stage('control', init_state, slow_step, make_data(), workdir, **kwargs)
  assert again.step == history.step and evaluated == [history.step]


def test_plots_are_written_at_the_end(tmp_path):
  workdir = str(tmp_path)
  loop.run_stage('sft', init_state, STEP, make_data(), workdir, num_steps=60, log_every=1,
                 checkpoint_every=100, eval_fn=eval_mse, eval_every=20, best_metric='mse',
                 best_mode='min')
  plot_dir = os.path.join(workdir, 'sft', plots.PLOTS_DIR)
  assert sorted(os.listdir(plot_dir)) == ['eval_mse.png', 'train_grad_norm.png', 'train_loss.png']
  for name in os.listdir(plot_dir):
    with Image.open(os.path.join(plot_dir, name)) as image:
      assert image.format == 'PNG' and image.size == (640, 400)
      image.verify()
  # Standalone, from records, with the loop's timings.
  records = [{'step': s, 'split': 'train', 'perf/steps_per_s': 2.0 + s} for s in range(1, 4)]
  out_dir = str(tmp_path / 'more')
  assert plots.plot_metrics(records, out_dir) == []
  assert plots.plot_metrics(records, out_dir, include_perf=True) == [
      os.path.join(out_dir, 'train_perf_steps_per_s.png')]


def test_data_must_be_checkpointable_and_last(tmp_path):
  with pytest.raises(TypeError, match='get_state'):
    loop.run_stage('bad', init_state, STEP, [{'x': _X[:4], 'y': _Y[:4]}], str(tmp_path),
                   num_steps=2, plot=False)
  one_epoch = grain.MapDataset.source(SOURCE).to_iter_dataset(
      grain.ReadOptions(num_threads=0)).batch(4)
  with pytest.raises(RuntimeError, match="'short'.* ran out before step 6"):
    loop.run_stage('short', init_state, STEP, one_epoch, str(tmp_path), num_steps=10, plot=False)


def _layout(tree, sharding):
  """`sharding` for the matrices of a tree, the scalars (step, adam's count) replicated."""
  scalar = (sharding if isinstance(sharding, jax.sharding.SingleDeviceSharding)
            else jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
  return jax.tree.map(lambda x: sharding if np.ndim(x) == 2 else scalar, tree)


def _sharded_state(sharding):
  """A state whose parameter, adam moments included, is laid out by `sharding`."""
  state = state_lib.create({'kernel': jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7}, TX)
  return jax.device_put(state, _layout(state, sharding))


def _save(workdir, stage, state):
  """One loop step that keeps `state` as it is, checkpointed as run_stage saves it."""
  keep = lambda s, batch, rng: (s, {'loss': jnp.zeros(())})
  loop.run_stage(stage, lambda: state, keep, make_data(), workdir, num_steps=1, plot=False,
                 tensorboard=False)


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved split over 8 devices, restored onto 1 device, onto a (2, 4) mesh split the other way,
  and back: a target's shardings decide, not the saver's."""
  P = jax.sharding.PartitionSpec
  devices = np.asarray(jax.devices())
  assert devices.size == 8, 'tests/conftest.py sets up 8 fake CPU devices'
  mesh8 = jax.sharding.Mesh(devices, ('fsdp',))
  mesh24 = jax.sharding.Mesh(devices.reshape(2, 4), ('data', 'tensor'))
  split8 = jax.sharding.NamedSharding(mesh8, P('fsdp', None))
  split24 = jax.sharding.NamedSharding(mesh24, P(None, 'tensor'))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  workdir = str(tmp_path)
  saved = _sharded_state(split8)
  want = leaves(saved)
  _save(workdir, 'eight', saved)

  for sharding in (one, split24):
    layout = _layout(saved, sharding)
    got = loop.restore_state(workdir, 'eight', state_lib.abstract(saved, layout), 'latest')
    assert jax.tree.map(lambda x: x.sharding, got) == layout
    for a, b in zip(leaves(got), want):
      np.testing.assert_array_equal(a, b)
  # Traced from a function whose outputs carry no sharding: onto the first device.
  plain = lambda: state_lib.create({'kernel': jnp.zeros((8, 8))}, TX)
  got = loop.restore_state(workdir, 'eight', plain, 'latest')
  assert all(x.sharding == one for x in jax.tree.leaves(got))

  # Saved by one device, restored split over 8.
  _save(workdir, 'one', _sharded_state(one))
  got = loop.restore_state(workdir, 'one', _sharded_state(split8), 'latest')
  kernel = got.params['kernel']
  assert kernel.sharding == split8 and kernel.addressable_shards[0].data.shape == (1, 8)
  for a, b in zip(leaves(got), want):
    np.testing.assert_array_equal(a, b)
