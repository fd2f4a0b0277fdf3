"""launch.plan: each stage's sharded step compiled ahead of time, its memory read off the shardings.

The tiny SynthSign config is planned on the 8 fake devices of tests/conftest.py and its numbers are
checked against parameters really created sharded on those devices; the real-size PHOENIX config
(Qwen3-8B) is planned for SFT without allocating it (about 30 s here); bad meshes and batches fail
at start naming both numbers, on the command line with exit code 1.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phoenix2014t, synthsign
from launch import plan as plan_lib
from rvlf_jax import sharding
from rvlf_jax.models import slt
from rvlf_jax.recipe import build

REPO = Path(__file__).resolve().parents[2]
PROMPT = slt.Prompt(np.zeros(24, np.int32), np.zeros(8, np.int32))


def tiny(mesh=(2, 2, 2), **changes):
  config = synthsign.get_config('tiny')
  config.mesh.update(dict(zip(build.MESH_AXES, mesh)))
  for key, value in changes.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


@pytest.fixture(scope='module')
def tiny_plans():
  """Every stage of the tiny config on data 2 x fsdp 2 x tensor 2."""
  assert len(jax.devices()) == 8, 'tests/conftest.py sets up 8 fake CPU devices'
  return {p.stage: p for p in plan_lib.plan(tiny(), build.STAGES, 8)}


def materialized_bytes(boxed, mesh):
  """Bytes of each device's shards of the parameters, created sharded (zeros) and read back."""
  zeros = lambda: jax.tree.map(lambda b: b.replace_boxed(jnp.zeros(b.value.shape, b.value.dtype)),
                               boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  params = sharding.init_sharded(zeros, mesh)
  per_device = {d: 0 for d in mesh.devices.flat}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return per_device


@pytest.mark.parametrize('stage', ['represent', 'sft', 'grpo'])
def test_tiny_parameter_bytes_are_the_shards_on_the_devices(tiny_plans, stage):
  p = tiny_plans[stage]
  config = tiny()
  mesh = plan_lib.make_mesh(config, 8)
  boxed = plan_lib.PROGRAMS[stage](config, PROMPT).boxed
  per_device = materialized_bytes(boxed, mesh)
  assert set(per_device.values()) == {p.param_bytes}  # every device holds the same
  # The same from the arithmetic: each dimension cut by the mesh axes its spec names.
  shardings = jax.tree.leaves(sharding.param_shardings(boxed, mesh))
  expected = 0
  for leaf, s in zip(jax.tree.leaves(nn.meta.unbox(boxed)), shardings):
    dims = list(leaf.shape)
    for i, axes in enumerate(s.spec):
      ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      assert dims[i] % ways == 0
      dims[i] //= ways
    expected += math.prod(dims) * leaf.dtype.itemsize
  assert p.param_bytes == expected
  # Count x bytes / shards bounds it: below by a fully split model, above by a replicated one.
  assert p.param_count == sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
  assert p.param_bytes_global == 4 * p.param_count  # float32
  assert p.param_shards == 4
  assert p.ideal_param_bytes <= p.param_bytes < p.param_bytes_global


def test_tiny_plan_numbers(tiny_plans):
  for p in tiny_plans.values():
    # Adam's two moments shard like the trained parameters; the rest are scalar counters.
    assert 2 * p.trained_bytes <= p.optimizer_bytes <= 2 * p.trained_bytes + 64
    assert p.state_bytes == p.param_bytes + p.optimizer_bytes + 4  # + the int32 step
    assert p.argument_bytes >= p.state_bytes and p.temp_bytes > 0
    assert p.alias_bytes > 0  # the state is donated
    assert p.peak_bytes == (p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
                            + p.code_bytes)
    assert p.fits and p.hbm_bytes == 95 * 2**30
    assert p.flops_global > 0 and p.flops_per_device == p.flops_global / 8
    assert len(p.largest) == 10 and p.largest == sorted(p.largest, key=lambda t: -t.mib)
  assert tiny_plans['represent'].frozen_bytes == 0  # stage 1 trains everything
  assert tiny_plans['grpo'].trained_bytes < tiny_plans['grpo'].frozen_bytes  # adapters only
  assert tiny_plans['grpo'].batch['prompts/embeds'][0] == 8 * 2  # B x G rows


def test_grpo_plan_with_the_sign_encoder_trained():
  """grpo.train_sign_encoder: the update trains the sign encoder and projector too (their SFT
  copy for the reference takes their place among the frozen bytes) and reads the B videos."""
  (base,) = plan_lib.plan(tiny(), ['grpo'], 8)
  (p,) = plan_lib.plan(tiny(**{'grpo.train_sign_encoder': True}), ['grpo'], 8)
  sign_bytes = p.trained_bytes - base.trained_bytes
  assert sign_bytes > 0 and p.frozen_bytes == base.frozen_bytes
  assert p.optimizer_bytes - base.optimizer_bytes == 2 * sign_bytes  # Adam's two moments
  videos = {k: v for k, v in p.batch.items() if k.startswith('prompts/')}
  assert videos and 'prompts/embeds' not in videos
  assert {v[0] for v in videos.values()} == {8}  # B videos, each encoded once per update


def test_pure_data_parallel_replicates_the_parameters():
  (p,) = plan_lib.plan(tiny((8, 1, 1)), ['grpo'], 8)
  assert p.param_shards == 1 and p.param_bytes == p.param_bytes_global


def test_real_size_phoenix_sft_parameter_memory_is_count_x_bytes_over_shards():
  """The issue's acceptance: Qwen3-8B + the base sign encoder, LoRA SFT, on the config's mesh
  (fsdp 8 over 8 devices), planned without allocating 31 GiB of parameters."""
  config = phoenix2014t.get_config()
  (p,) = plan_lib.plan(config, ['sft'], 8)
  assert p.mesh == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert 8.2e9 < p.param_count < 8.4e9 and p.param_bytes_global == 4 * p.param_count
  assert p.param_bytes == pytest.approx(p.param_count * 4 / 8, rel=0.05)
  # The frozen decoder is split 8 ways exactly but for its norms (replicated, ~0.3 MB).
  decoder = build.decoder_config(config, None)
  frozen_ideal = 4 * decoder.num_params() / 8
  assert p.frozen_bytes == pytest.approx(frozen_ideal, rel=1e-3)
  assert p.optimizer_bytes == pytest.approx(2 * p.trained_bytes, abs=64)
  # LoRA SFT: a forward and the backward's activation gradients through the frozen decoder
  # (no weight gradients for it): about 2 x (2 x non-embedding parameters x tokens).
  body = decoder.num_params() - 2 * decoder.vocab_size * decoder.hidden_size
  frames, text = max(config.data.frame_buckets), max(config.data.token_buckets)
  sign_tokens = build.sign_config(config).num_tokens(frames)
  tokens = config.sft.batch_size * (24 + sign_tokens + 8 + text - 1)  # prefix + inputs
  assert 2.0 < p.flops_global / (2 * body * tokens) < 2.5
  assert p.xla_flops < p.flops_per_device / 10  # XLA counts the 36 scanned layers once
  assert p.fits and p.largest[0].path.startswith('frozen/decoder/transformer/layers/mlp/')


def test_jaxpr_flops_counts_scans_times_their_length():
  w = jax.ShapeDtypeStruct((10, 32, 48), jnp.float32)
  x = jax.ShapeDtypeStruct((8, 32), jnp.float32)

  def f(w, x):
    def body(h, w_i):
      return jnp.tanh(h @ w_i)[:, :32], None
    return jax.lax.scan(body, x, w)[0].sum()

  assert plan_lib.jaxpr_flops(jax.make_jaxpr(f)(w, x)) == 10 * 2 * 8 * 32 * 48
  xla = jax.jit(f).lower(w, x).compile().cost_analysis()
  assert xla['flops'] < 2 * 2 * 8 * 32 * 48  # why the plan counts from the jaxpr
  # A convolution: each output is a kernel window x input features / groups multiply-adds.
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2,), 'SAME', feature_group_count=2,
                                                   dimension_numbers=('NWC', 'WIO', 'NWC'))
  jaxpr = jax.make_jaxpr(conv)(jax.ShapeDtypeStruct((4, 16, 8), jnp.float32),
                               jax.ShapeDtypeStruct((5, 4, 6), jnp.float32))
  assert plan_lib.jaxpr_flops(jaxpr) == 2 * (4 * 8 * 6) * (5 * 4)


# -- Bad input -----------------------------------------------------------------------------------


def test_a_mesh_that_does_not_fit_the_devices_names_both_numbers():
  with pytest.raises(build.ConfigError, match=r'needs 3 devices but 8 are present'):
    plan_lib.plan(tiny((3, 1, 1)), ['sft'], 8)
  with pytest.raises(build.ConfigError, match=r'use 3 devices, which does not divide the 8'):
    plan_lib.plan(tiny((3, -1, 1)), ['sft'], 8)
  with pytest.raises(build.ConfigError, match=r'needs 16 devices but this process has 8'):
    plan_lib.plan(tiny((1, 1, 16)), ['sft'], 16)


def test_a_batch_that_does_not_split_names_both_numbers():
  with pytest.raises(build.ConfigError,
                     match=r"sft\.batch_size=12 is not divisible by the mesh's data x fsdp = 8"):
    plan_lib.plan(tiny((2, 4, 1), **{'sft.batch_size': 12}), ['sft'], 8)


def test_mesh_flag_and_device_count():
  assert plan_lib.mesh_sizes('data:2,fsdp:16,tensor:4') == {'data': 2, 'fsdp': 16, 'tensor': 4}
  assert plan_lib.mesh_sizes('fsdp:-1') == {'data': 1, 'fsdp': -1, 'tensor': 1}
  for bad in ('pipeline:2', 'fsdp=2', 'fsdp:two'):
    with pytest.raises(build.ConfigError, match='--mesh'):
      plan_lib.mesh_sizes(bad)
  count = plan_lib._device_count  # pylint: disable=protected-access
  assert count(['plan', '--mesh=data:2,fsdp:16,tensor:4']) == 128
  assert count(['plan', '--mesh', 'fsdp:8']) == 8
  assert count(['plan', '--mesh=fsdp:-1', '--devices=32']) == 32
  assert count(['plan', '--mesh=fsdp:-1']) is None and count(['plan']) is None


def run_plan(*args):
  return subprocess.run([sys.executable, '-m', 'launch.plan', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})


def test_command_line_errors_are_one_line_and_exit_1():
  out = run_plan('--config=configs/synthsign.py:tiny', '--mesh=data:3', '--devices=8')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "launch.plan: mesh: {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices but 8 are present.")
  out = run_plan('--config=configs/synthsign.py:tiny', '--mesh=fsdp:8', '--stage=sft',
                 '--config.sft.batch_size=12')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      "launch.plan: sft.batch_size=12 is not divisible by the mesh's data x fsdp = 8 ways")


def test_command_line_full_fine_tuning_with_json(tmp_path):
  """--mesh sets the fake device count before jax starts (4 here, the tests' process has 8);
  --config.sft.lora=False trains the whole decoder."""
  path = tmp_path / 'plan.json'
  out = run_plan('--config=configs/synthsign.py:tiny', '--mesh=data:2,fsdp:2', '--stage=sft',
                 '--config.sft.lora=False', '--hbm_gib=0.0001', f'--json={path}')
  assert out.returncode == 0, out.stderr
  assert 'DOES NOT FIT' in out.stdout and '== sft' in out.stdout
  (p,) = json.loads(path.read_text())
  assert p['devices'] == 4 and p['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert p['frozen_bytes'] == 0 and not p['fits']  # full fine-tuning: nothing frozen
  assert p['param_bytes'] == p['trained_bytes'] and p['param_shards'] == 2
  assert p['largest'][0]['path'].startswith('params/') and p['largest'][0]['mib'] > 0
