"""launch/tpu_pod.sh in dry-run mode, and launch.train's multi-host flags."""

import os
import shlex
import subprocess

import pytest
from absl import app
from absl import flags
from absl.testing import flagsaver

from launch import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, 'launch', 'tpu_pod.sh')


def dry_run(*args, **env):
  full_env = {k: v for k, v in os.environ.items()
              if k not in ('TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR', 'WORKDIR', 'MESH',
                           'CONFIG', 'SPOT', 'TPU_VERSION')}
  full_env.update(env)
  return subprocess.run(['bash', SCRIPT, '--dry-run', *args], capture_output=True, text=True,
                        env=full_env, check=False)


def test_create_names_the_slice_and_its_type():
  out = dry_run('create', TPU_NAME='slt', ZONE='us-central2-b', PROJECT='p',
                ACCELERATOR='v5p-128', SPOT='1')
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'slt', '--zone=us-central2-b',
      '--project=p', '--accelerator-type=v5p-128', '--version=v2-alpha-tpuv5', '--spot']


def test_run_starts_the_recipe_on_every_worker_with_the_mesh():
  out = dry_run('run', '--', '--stage=sft', '--config.seed=3', TPU_NAME='slt',
                WORKDIR='/mnt/shared/phoenix', MESH='data=2,fsdp=16,tensor=4')
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'slt']
  assert '--worker=all' in words
  remote = shlex.split([w for w in words if w.startswith('--command=')][0][len('--command='):])
  assert remote[remote.index('python3'):remote.index('>')] == [
      'python3', '-m', 'launch.train', '--config=configs/phoenix2014t.py',
      '--workdir=/mnt/shared/phoenix', '--distributed', '--config.mesh.data=2',
      '--config.mesh.fsdp=16', '--config.mesh.tensor=4', '--stage=sft', '--config.seed=3']


@pytest.mark.parametrize('command,worker,remote', [
    ('tail', '0', 'tail -n 100 -f'),
    ('stop', 'all', 'pkill -f'),
    ('setup', 'all', 'pip install -r requirements.txt'),
])
def test_worker_commands(command, worker, remote):
  out = dry_run(command)
  assert out.returncode == 0, out.stderr
  ssh = [line for line in out.stdout.splitlines() if ' ssh ' in line]
  assert any(f'--worker={worker}' in line and remote in shlex.split(line)[-1] for line in ssh)


@pytest.mark.parametrize('env,message', [
    ({}, 'set WORKDIR to a folder that every worker mounts'),
    ({'WORKDIR': 'gs://b/r'}, 'WORKDIR=gs://b/r is not an absolute path on a shared mount'),
    ({'WORKDIR': '/mnt/shared/r', 'MESH': 'data2'}, "MESH entry 'data2' is not axis=size"),
])
def test_run_refuses_bad_settings(env, message):
  out = dry_run('run', **env)
  assert out.returncode == 2 and message in out.stderr
  assert 'gcloud' not in out.stdout


def test_unknown_command():
  out = dry_run('launch')
  assert out.returncode == 2 and "unknown command 'launch'" in out.stderr


@pytest.mark.parametrize('values,message', [
    (dict(coordinator_address='127.0.0.1:1234'), 'need --distributed'),
    (dict(distributed=True, num_processes=2), 'also needs --coordinator_address, --process_id'),
])
def test_distributed_flags_are_checked(values, message):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    with pytest.raises(app.UsageError, match=message):
      train.initialize_distributed()


@pytest.mark.parametrize('values,expected', [
    (dict(distributed=False), []),
    (dict(distributed=True), [{}]),  # a TPU pod: jax finds its peers
    (dict(distributed=True, coordinator_address='10.0.0.2:1234', num_processes=4, process_id=1),
     [dict(coordinator_address='10.0.0.2:1234', num_processes=4, process_id=1)]),
])
def test_distributed_initialisation(monkeypatch, values, expected):
  calls = []
  monkeypatch.setattr(train.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    train.initialize_distributed()
  assert calls == expected
