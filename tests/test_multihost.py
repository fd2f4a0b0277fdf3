"""Multi-host training for real: 2 JAX processes on 127.0.0.1, then a restore on another mesh.

Two processes (2 fake CPU devices each, CPU collectives over gloo) run the recipe
(`run.run(config, workdir, ('represent', 'sft'))`) on the tiny SynthSign with a mesh of
fsdp 2 (across the processes) x tensor 2 (within each) over their 4 devices, so parameters and
optimizer state are split across the processes and each checkpoint is written by both. Each process feeds its own rows of every batch
(grain sharded by process) and both score the dev and test splits. A third, single-process run
then restores the SFT checkpoint onto other meshes (tensor 2 on its 2 devices, and 1 device) and
must get the parameters the two processes trained and their dev loss.

The processes run this file as a script (`python -m tests.test_multihost ROLE ...`); the test
only starts them and compares what they write.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
TIMEOUT_S = 300


def tiny_config():
  """configs/synthsign.py:tiny with fewer steps; SFT evaluates at steps 2 and 4."""
  from configs import synthsign  # pylint: disable=g-import-not-at-top
  config = synthsign.get_config('tiny')
  config.mesh.update(data=1, fsdp=2, tensor=2)
  config.lm.steps = 10
  config.represent.update(steps=2, checkpoint_every=2)
  config.sft.update(steps=4, eval_every=2, checkpoint_every=2)
  return config


# -- The processes -------------------------------------------------------------------------------


def _params_npz(path, params):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(params, sep='/')
  np.savez(path, **{k: np.asarray(v) for k, v in jax.device_get(flat).items()})


def _log(line: str) -> None:
  print(time.strftime('%H:%M:%S'), line, flush=True)


def _setup_logging() -> None:
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s %(message)s')
  logging.getLogger('rvlf_jax').setLevel(logging.INFO)


def train(process_id: int, port: int, workdir: str, out: str) -> None:
  """One of the processes that train: the recipe, then what it trained and its dev loss."""
  _setup_logging()
  import jax  # pylint: disable=g-import-not-at-top
  # gloo is jax 0.10's default; said here since older versions had no CPU collectives by default.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=NUM_PROCESSES,
                             process_id=process_id)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from rvlf_jax.recipe import run, stages  # pylint: disable=g-import-not-at-top
  from rvlf_jax.train import loop  # pylint: disable=g-import-not-at-top
  from rvlf_jax.train import params as params_lib  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 4
  # The state run_stage returns (the best evaluated one), as the stages get it.
  trained = {}
  run_stage = loop.run_stage

  def keep(stage, *args, **kwargs):
    state, history = run_stage(stage, *args, **kwargs)
    trained[stage] = (state, history)
    return state, history

  loop.run_stage = keep
  config = tiny_config()
  results = run.run(config, workdir, ('represent', 'sft'), log=_log)
  loop.run_stage = run_stage

  state, history = trained['sft']
  params = params_lib.merge(state.params, state.frozen)
  split = [x for x in jax.tree.leaves(params) if _split_across_processes(x)]
  ctx = run.context(config, workdir, log=_log)
  model = stages.sft_model(ctx)
  report = {
      'process': jax.process_index(), 'results': {k: results[k] for k in ('sft',)},
      'state_step': history.state_step, 'batch_rows': _first_batch_rows(ctx),
      'params_split_across_processes': len(split),
      'dev_loss': stages.eval_loss(ctx, model, params, 'dev'),
  }
  # Every process's copy of the parameters, gathered whole (process 0 writes them).
  whole = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    _params_npz(os.path.join(out, 'params.npz'), whole)
  with open(os.path.join(out, f'process_{jax.process_index()}.json'), 'w') as f:
    json.dump(report, f)
  _log('written')


def _split_across_processes(x) -> bool:
  """Whether this process holds only some of the distinct shards of a global array."""
  everywhere = {str(index) for index in x.sharding.devices_indices_map(x.shape).values()}
  return len({str(shard.index) for shard in x.addressable_shards}) < len(everywhere)


def _first_batch_rows(ctx):
  """The example ids of this process's first SFT batch: its shard of the train split."""
  batch = next(iter(ctx.train_batches(ctx.config.sft, ctx.seed)))
  return [str(i) for i in batch['id']]


def restore(workdir: str, out: str) -> None:
  """The single-process run: the SFT checkpoint onto tensor 2 and onto one device."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from rvlf_jax import sharding  # pylint: disable=g-import-not-at-top
  from rvlf_jax.recipe import build, run, stages  # pylint: disable=g-import-not-at-top
  from rvlf_jax.train import params as params_lib  # pylint: disable=g-import-not-at-top

  _setup_logging()
  assert jax.process_count() == 1 and jax.device_count() == 2
  with open(os.path.join(workdir, run.CONFIG_FILE)) as f:
    config = build.from_json(f.read())
  config.mesh.update(data=1, fsdp=1, tensor=2)
  ctx = run.context(config, workdir, log=_log)
  report = {}
  for name, mesh in (('tensor2', None),
                     ('one_device', sharding.mesh_from_config((1, 1, 1), jax.devices()[:1]))):
    on = ctx if mesh is None else dataclasses.replace(ctx, mesh=mesh)
    model, state = stages.restore_sft(on, 'the multi-host test', 'best')
    params = params_lib.merge(state.params, state.frozen)
    meshes = {tuple(x.sharding.mesh.axis_sizes) for x in jax.tree.leaves(params)}
    report[name] = {'meshes': sorted(map(list, meshes)),
                    'tensor_split': sum(1 for x in jax.tree.leaves(params)
                                        if 'tensor' in str(x.sharding.spec)),
                    'dev_loss': stages.eval_loss(on, model, params, 'dev')}
    _params_npz(os.path.join(out, f'params_{name}.npz'), params)
    _log(f'restored onto {name}: dev loss {report[name]["dev_loss"]}')
  with open(os.path.join(out, 'restore.json'), 'w') as f:
    json.dump(report, f)


# -- The test ------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  # Compiles dominate the processes' time: no LLVM optimisation and XLA CPU's older fusion
  # emitters (as tests/test_sharding.py's FAST), about 3x faster compiles, the same numbers.
  flags = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
  env.update(XLA_FLAGS=' '.join((f'--xla_force_host_platform_device_count={devices}',) + flags),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', TOKENIZERS_PARALLELISM='false',
             HF_HUB_OFFLINE='1', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''))
  return env


def _start(args, devices, log_path):
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, '-m', 'tests.test_multihost', *map(str, args)],
                          cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, logs):
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, log in zip(procs, logs):
    if proc.returncode != 0:
      with open(log) as f:
        tail = f.read()[-6000:]
      pytest.fail(f'{log} (exit {proc.returncode}):\n{tail}')


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('multihost_run'))
  out = str(tmp_path_factory.mktemp('multihost_out'))
  port = _free_port()
  logs = [os.path.join(out, f'train_{i}.log') for i in range(NUM_PROCESSES)]
  _wait([_start(('train', i, port, workdir, out), 2, logs[i]) for i in range(NUM_PROCESSES)],
        logs)
  log = os.path.join(out, 'restore.log')
  _wait([_start(('restore', workdir, out), 2, log)], [log])
  reports = []
  for i in range(NUM_PROCESSES):
    with open(os.path.join(out, f'process_{i}.json')) as f:
      reports.append(json.load(f))
  with open(os.path.join(out, 'restore.json')) as f:
    restored = json.load(f)
  return workdir, out, reports, restored


def test_two_processes_train_on_their_own_rows_and_agree(outputs):
  workdir, _, reports, _ = outputs
  first, second = reports
  # Each process read its own shard of the train split.
  assert first['batch_rows'] and not set(first['batch_rows']) & set(second['batch_rows'])
  # The parameters were split across the processes (fsdp over their devices).
  assert first['params_split_across_processes'] > 0
  # Replicated evaluation: both processes scored every example and got the same numbers.
  assert first['results'] == second['results']
  assert first['dev_loss'] == second['dev_loss']
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['sft'] == first['results']['sft']
  with open(os.path.join(workdir, 'eval', 'sft', 'test', 'hyps.txt')) as f:
    assert len(f.read().splitlines()) == 12  # every test clip once, not once per process
  # One metrics log, by process 0; the SFT stage's checkpoints written by both.
  with open(os.path.join(workdir, 'sft', 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert steps == sorted(set(steps)) and steps[-1] == 4
  checkpoint = os.path.join(workdir, 'sft', 'checkpoints', str(first['state_step']))
  for item, prefix in (('state', 'ocdbt.process_'), ('data', 'process_')):
    written = os.listdir(os.path.join(checkpoint, item))  # the arrays' shards; the iterators
    assert len([n for n in written if n.startswith(prefix)]) == NUM_PROCESSES, (item, written)


@pytest.mark.parametrize('mesh', ['tensor2', 'one_device'])
def test_single_process_restores_the_checkpoint_on_another_mesh(outputs, mesh):
  _, out, reports, restored = outputs
  got = restored[mesh]
  assert got['meshes'] == ([[1, 1, 2]] if mesh == 'tensor2' else [[1, 1, 1]])
  if mesh == 'tensor2':
    assert got['tensor_split'] > 0
  want = np.load(os.path.join(out, 'params.npz'))
  have = np.load(os.path.join(out, f'params_{mesh}.npz'))
  assert sorted(have.files) == sorted(want.files)
  for name in want.files:
    np.testing.assert_array_equal(have[name], want[name], err_msg=name)
  dev = reports[0]['dev_loss']
  assert got['dev_loss']['num_tokens'] == dev['num_tokens']
  np.testing.assert_allclose(got['dev_loss']['loss'], dev['loss'], rtol=1e-5)
  np.testing.assert_allclose(got['dev_loss']['accuracy'], dev['accuracy'], rtol=1e-5)


if __name__ == '__main__':
  role, *rest = sys.argv[1:]
  if role == 'train':
    train(int(rest[0]), int(rest[1]), rest[2], rest[3])
  elif role == 'restore':
    restore(*rest)
  else:
    raise SystemExit(f'unknown role {role!r}')
