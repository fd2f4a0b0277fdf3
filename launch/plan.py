r"""Plans a run's memory before launch: each stage's step compiled ahead of time on fake devices.

  python -m launch.plan --config=configs/phoenix2014t.py --mesh=data:1,fsdp:16,tensor:4
  python -m launch.plan --config=configs/phoenix2014t.py --mesh=fsdp:16 --stage=sft \
      --config.sft.lora=False --tpu=v5e --json=/tmp/plan.json

For each stage (represent, sft, grpo: its policy update) the real model and step are built
abstractly: parameters as `jax.eval_shape` shapes with their logical names, the train state's
shardings from `sharding.state_shardings`, and a batch of the config's batch size at its largest
frame and token buckets. The step is lowered and compiled with `sharding.shard_step(...).lower`
on N fake CPU devices (N = the mesh's size, set before jax is imported), so nothing the size of
the model is ever allocated. Printed per stage, per device:

  - state: trained / frozen parameters and optimizer state, exact (shard shape x dtype size);
  - the compiled program's memory analysis: arguments, outputs (minus those aliased to donated
    arguments), temporaries (activations, gradients, collectives' buffers), generated code; their
    sum is the peak estimate compared with --hbm_gib (or the --tpu's HBM);
  - FLOPs a step: matmuls and convolutions counted from the step's jaxpr, scans times their length
    (global, and / devices); and XLA's own `cost_analysis()` per device, which counts a loop body
    once, so it is far lower for models whose layers are scanned;
  - the largest per-device tensors of the state (path, global shape, sharding, MiB).

--mesh gives the mesh ('data:2,fsdp:16,tensor:4'; missing axes are 1, one may be -1 with
--devices), replacing the config's. Without --mesh the config's mesh is used with --devices.
Bad input (a mesh that does not fit the devices, a batch that does not split over data x fsdp)
ends it with a one-line message naming both numbers and exit code 1. --prompt gives the token
counts of the instruction before and after the sign tokens (no tokenizer is loaded).

Caveat: the compiler is XLA:CPU's. Arguments and outputs are what a TPU holds; temporaries depend
on the backend's fusion and scheduling, so treat them as an estimate of a TPU's.
"""

import os
import sys


def _device_count(argv: list[str]) -> int | None:
  """The device count the command line asks for, read before jax is imported: --devices, else
  the product of --mesh's sizes (None when neither says)."""
  values = {}
  for i, arg in enumerate(argv):
    for name in ('devices', 'mesh'):
      if arg.startswith(f'--{name}='):
        values[name] = arg.split('=', 1)[1]
      elif arg == f'--{name}' and i + 1 < len(argv):
        values[name] = argv[i + 1]
  try:
    if 'devices' in values:
      return int(values['devices'])
    if 'mesh' in values:
      sizes = [int(part.split(':', 1)[1]) for part in values['mesh'].split(',') if part.strip()]
      n = 1
      for size in sizes:
        n *= size
      return n if sizes and min(sizes) > 0 else None
  except (ValueError, IndexError):
    return None  # the flags' own parsing reports it
  return None


def _use_fake_devices(argv: list[str]) -> None:
  """XLA_FLAGS / JAX_PLATFORMS for N fake CPU devices: only effective before jax is imported."""
  n = _device_count(argv)
  if n is None or 'jax' in sys.modules:
    return
  flags_ = [f for f in os.environ.get('XLA_FLAGS', '').split()
            if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(flags_ + [f'--xla_force_host_platform_device_count={n}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'


if __name__ == '__main__':
  _use_fake_devices(sys.argv)

# pylint: disable=g-import-not-at-top,g-bad-import-order  (after the device count is set)
import dataclasses
import json
import math
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.extend import core as jex_core

from rvlf_jax import sharding
from rvlf_jax.models import slt
from rvlf_jax.recipe import build
from rvlf_jax.train import grpo, optimizers, represent, sft
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib
# pylint: enable=g-import-not-at-top,g-bad-import-order

GIB = 2**30
MIB = 2**20
# HBM per chip (GiB): --tpu picks one, --hbm_gib overrides it.
TPU_HBM_GIB = {'v5p': 95.0, 'v5e': 16.0, 'v4': 32.0, 'v6e': 32.0}
# XLA:CPU options that shorten compiles (no LLVM optimisation, the older fusion emitters) about
# 8x and leave the memory analysis as it was (the tiny config's SFT step: the same argument and
# output sizes, temporaries 256 bytes apart).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}

# The same names as launch.train's flags (allow_override: both launchers import in one test run).
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthsign.py', 'Recipe config.',
                                          allow_override=True)
_STAGE = flags.DEFINE_string('stage', 'all', "'all', or stages among represent,sft,grpo.",
                             allow_override=True)
_MESH = flags.DEFINE_string('mesh', None,
                            "Mesh as 'data:2,fsdp:16,tensor:4' (missing axes are 1); default the "
                            "config's mesh with --devices.")
_DEVICES = flags.DEFINE_integer('devices', None,
                                'Fake CPU devices; default the product of --mesh.')
_TPU = flags.DEFINE_enum('tpu', 'v5p', sorted(TPU_HBM_GIB), 'TPU generation whose HBM a device '
                         'has: ' + ', '.join(f'{k} {v:g} GiB' for k, v in TPU_HBM_GIB.items()))
_HBM_GIB = flags.DEFINE_float('hbm_gib', None, 'HBM per device in GiB; overrides --tpu.')
_PROMPT = flags.DEFINE_string('prompt', '24,8', 'Instruction tokens before,after the sign tokens.')
_JSON = flags.DEFINE_string('json', None, 'Also write the plan as JSON to this path.')
_FAST = flags.DEFINE_bool('fast_compile', True, 'Compile with FAST_COMPILE options.')


# -- What a stage compiles -----------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  """A stage's step with abstract inputs.

  Attributes:
    step: step(state, batch, rng) -> (state, metrics).
    state: the train state as `jax.ShapeDtypeStruct`s.
    boxed: the full model's boxed abstract parameters (shapes and logical names).
    batch: the step's batch as `jax.ShapeDtypeStruct`s (leading dimension: the rows).
  """

  step: Callable
  state: Any
  boxed: Any
  batch: Any


def _widen(row: dict[str, np.ndarray], rows: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in row.items()}


def _abstract_state(boxed: Any, mask: Any | None, tx) -> Any:
  params = nn.meta.unbox(boxed)
  if mask is None:
    return jax.eval_shape(lambda p: state_lib.create(p, tx), params)
  trained, frozen = params_lib.partition(params, mask)
  return jax.eval_shape(lambda t, f: state_lib.create(t, tx, frozen=f), trained, frozen)


def _models(config: ml_collections.ConfigDict):
  decoder = build.decoder_config(config, int(config.tokenizer.vocab_size))
  width = build.visual_dim(config) if config.visual.enabled else None
  return decoder, width


def _bucket_batch(sign, rows: int, config: ml_collections.ConfigDict):
  """The pipeline's batch at the largest frame and token buckets (the most memory)."""
  row = slt.dummy_batch(sign, 1, max(config.data.frame_buckets), max(config.data.token_buckets))
  return _widen(row, rows)


def represent_program(config: ml_collections.ConfigDict, prompt: slt.Prompt) -> Program:
  del prompt  # stage 1 has no instruction
  decoder, width = _models(config)
  model = slt.SignTextAligner(build.aligner_config(config, decoder, width))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'represent'))
  boxed = model.abstract_params(boxed=True)
  return Program(represent.make_step(model, tx), _abstract_state(boxed, None, tx), boxed,
                 _bucket_batch(model.config.sign, int(config.represent.batch_size), config))


def sft_program(config: ml_collections.ConfigDict, prompt: slt.Prompt) -> Program:
  decoder, width = _models(config)
  model = slt.SLTModel(build.slt_config(config, decoder, width, build.lora_config(config)))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'sft'))
  boxed = model.abstract_params(boxed=True)
  mask = sft.trained_mask(nn.meta.unbox(boxed), lora=bool(config.sft.lora))
  return Program(sft.make_step(model, tx, prompt), _abstract_state(boxed, mask, tx), boxed,
                 _bucket_batch(model.config.sign, int(config.sft.batch_size), config))


def grpo_program(config: ml_collections.ConfigDict, prompt: slt.Prompt) -> Program:
  """The GRPO policy update on the B x G sampled completions of a step (run grpo.mu times a
  step); the sampling and the reference's log-probabilities are not planned."""
  decoder, width = _models(config)
  model = slt.SLTModel(build.slt_config(config, decoder, width, build.grpo_lora(config)))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'grpo'))
  cfg = build.grpo_config(config)
  boxed = model.abstract_params(boxed=True)
  params = nn.meta.unbox(boxed)
  prefix, update = grpo.make_prefix(model, prompt), grpo.make_update(model, tx, cfg, prompt)
  b = int(config.grpo.batch_size)
  videos = _bucket_batch(model.config.sign, b, config)
  embeds, valid = jax.eval_shape(prefix, params, videos)
  rows, n = b * cfg.group_size, cfg.sampling.max_new_tokens
  shape = lambda dtype, *dims: jax.ShapeDtypeStruct((rows, *dims), dtype)
  logp = shape(jnp.float32, n)
  # As GRPOTrainer.step builds them: the prompts (embeddings and validity tiled over the group,
  # or the videos when the sign encoder trains), completions, their mask, advantages, old (only
  # when mu > 1) and reference log-probs.
  prompts = videos if cfg.train_sign_encoder else dict(
      embeds=shape(embeds.dtype, *embeds.shape[1:]), valid=shape(valid.dtype, *valid.shape[1:]))
  inputs = dict(prompts=prompts, tokens=shape(jnp.int32, n), mask=shape(jnp.bool_, n),
                adv=shape(jnp.float32), old_logp=logp if cfg.mu > 1 else None, ref_logp=logp)
  step = lambda state, batch, rng: update(state, **batch)

  def make_state(params):
    trained, frozen = grpo.split_params(params, sign_encoder=cfg.train_sign_encoder)
    return state_lib.create(trained, tx, frozen=frozen)

  return Program(step, jax.eval_shape(make_state, params), boxed, inputs)


PROGRAMS = {'represent': represent_program, 'sft': sft_program, 'grpo': grpo_program}


# -- Counting ------------------------------------------------------------------------------------


def per_device_bytes(leaf: Any, leaf_sharding: jax.sharding.Sharding) -> int:
  """Bytes one device holds of `leaf` (an array or ShapeDtypeStruct) under `leaf_sharding`."""
  shape = leaf_sharding.shard_shape(tuple(leaf.shape))
  return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def _path(path: tuple[Any, ...]) -> str:
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of a jaxpr's matmuls and convolutions (2 per multiply-add), scans counted times
  their length, a cond's costliest branch, a while loop's body once."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # a ClosedJaxpr's
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
    elif name == 'cond':
      total += max(jaxpr_flops(branch) for branch in eqn.params['branches'])
    else:
      inner = sum(jaxpr_flops(sub) for sub in jex_core.jaxprs_in_params(eqn.params))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


@dataclasses.dataclass
class Tensor:
  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: str
  mib: float  # per device


@dataclasses.dataclass
class StagePlan:
  """One stage's numbers; bytes and FLOPs are per device unless named global."""

  stage: str
  mesh: dict[str, int]
  devices: int
  batch: dict[str, tuple[int, ...]]
  param_count: int            # the model's parameters (trained + frozen)
  param_bytes_global: int     # their bytes unsharded
  param_shards: int           # fsdp x tensor: the ways a fully split parameter is cut
  trained_bytes: int
  frozen_bytes: int
  optimizer_bytes: int
  state_bytes: int            # trained + frozen + optimizer + step counter
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int             # argument + output - alias + temp + code
  hbm_bytes: int
  fits: bool
  flops_global: float         # matmul + conv FLOPs of a step, from the jaxpr
  flops_per_device: float     # flops_global / devices
  xla_flops: float            # compiled cost_analysis(), per device, loop bodies once
  largest: list[Tensor]
  lower_s: float
  compile_s: float

  @property
  def param_bytes(self) -> int:
    return self.trained_bytes + self.frozen_bytes

  @property
  def ideal_param_bytes(self) -> float:
    """Parameter count x bytes / shards: every parameter split over fsdp x tensor."""
    return self.param_bytes_global / self.param_shards


def mesh_sizes(text: str) -> dict[str, int]:
  """'data:2,fsdp:16,tensor:4' -> {'data': 2, 'fsdp': 16, 'tensor': 4}; missing axes 1."""
  sizes = {axis: 1 for axis in build.MESH_AXES}
  for part in text.split(','):
    if not part.strip():
      continue
    axis, sep, size = part.partition(':')
    axis = axis.strip()
    if not sep or axis not in sizes:
      raise build.ConfigError(f'--mesh: {part!r} is not axis:size with an axis among '
                              f'{build.MESH_AXES}.')
    try:
      sizes[axis] = int(size)
    except ValueError:
      raise build.ConfigError(f'--mesh: size {size!r} of {axis} is not an integer.') from None
  return sizes


def make_mesh(config: ml_collections.ConfigDict, num_devices: int) -> jax.sharding.Mesh:
  """The config's mesh over the first num_devices devices of this process."""
  sizes = build.mesh_shape(config, num_devices)  # ConfigError naming both numbers
  available = len(jax.devices())
  if num_devices > available:
    raise build.ConfigError(
        f'the mesh {sizes} needs {num_devices} devices but this process has {available}; '
        f'set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before jax is '
        f'imported (python -m launch.plan does).')
  return sharding.mesh_from_config(config, jax.devices()[:num_devices])


def plan_stage(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, *,
               prompt: tuple[int, int] = (24, 8), hbm_bytes: int = int(95 * GIB),
               fast_compile: bool = True, top: int = 10) -> StagePlan:
  """Builds, lowers and compiles one stage's sharded step; nothing model-sized is allocated.

  Args:
    config: the recipe config.
    stage: 'represent', 'sft' or 'grpo' (its policy update).
    mesh: the device mesh (`make_mesh`).
    prompt: instruction tokens before and after the sign tokens.
    hbm_bytes: memory of one device, for `fits`.
    fast_compile: compile with FAST_COMPILE (same memory analysis, faster).
    top: how many of the largest per-device state tensors to list.
  """
  program = PROGRAMS[stage](config, slt.Prompt(np.zeros(prompt[0], np.int32),
                                               np.zeros(prompt[1], np.int32)))
  state_sh = sharding.state_shardings(program.state, program.boxed, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  rng = jax.random.key(0)
  jit_kwargs = {'compiler_options': FAST_COMPILE} if fast_compile else {}
  step = sharding.shard_step(program.step, state_sh, batch_sh, mesh, **jit_kwargs)
  start = time.perf_counter()
  lowered = step.lower(program.state, program.batch, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  with sharding.mesh_context(mesh):
    flops = jaxpr_flops(jax.make_jaxpr(program.step)(program.state, program.batch, rng))

  size = lambda tree, shardings: sum(
      per_device_bytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
  state = program.state
  trained, frozen = size(state.params, state_sh.params), size(state.frozen, state_sh.frozen)
  opt = size(state.opt_state, state_sh.opt_state)
  params = jax.tree.leaves(nn.meta.unbox(program.boxed))
  tensors = []
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(state_sh)):
    tensors.append(Tensor(_path(path), tuple(x.shape), str(x.dtype), str(s.spec),
                          per_device_bytes(x, s) / MIB))
  tensors.sort(key=lambda t: -t.mib)

  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
  devices = mesh.devices.size
  return StagePlan(
      stage=stage, mesh=dict(mesh.shape), devices=devices,
      batch={_path(p): tuple(x.shape) for p, x in
             jax.tree_util.tree_leaves_with_path(program.batch)},
      param_count=sum(math.prod(x.shape) for x in params),
      param_bytes_global=sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in params),
      param_shards=mesh.shape['fsdp'] * mesh.shape['tensor'],
      trained_bytes=trained, frozen_bytes=frozen, optimizer_bytes=opt,
      state_bytes=size(state, state_sh),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, peak_bytes=peak, hbm_bytes=hbm_bytes,
      fits=peak <= hbm_bytes, flops_global=flops, flops_per_device=flops / devices,
      xla_flops=float(cost.get('flops', 0.0)), largest=tensors[:top], lower_s=lower_s,
      compile_s=compile_s)


def plan(config: ml_collections.ConfigDict, stages: Sequence[str], num_devices: int,
         **kwargs: Any) -> list[StagePlan]:
  """Checks the config as launch.train does (mesh against devices, batches against data x
  fsdp; `build.ConfigError` naming both numbers), then plans each stage (`plan_stage`)."""
  build.check(config, stages=stages, num_devices=num_devices)
  mesh = make_mesh(config, num_devices)
  return [plan_stage(config, stage, mesh, **kwargs) for stage in stages]


# -- Output --------------------------------------------------------------------------------------


def _size(n: float) -> str:
  """Bytes in the largest unit that keeps the number at least 1, e.g. '  12.34 GiB'."""
  for unit, scale in (('GiB', GIB), ('MiB', MIB), ('KiB', 2**10)):
    if abs(n) >= scale:
      return f'{n / scale:8.2f} {unit}'
  return f'{n:8.0f} B  '


def format_plan(p: StagePlan) -> str:
  mesh = ', '.join(f'{k}={v}' for k, v in p.mesh.items())
  batch = ', '.join(f'{k} {list(v)}' for k, v in p.batch.items())
  ratio = p.param_bytes / p.ideal_param_bytes
  stage = 'grpo (its policy update, grpo.mu a step)' if p.stage == 'grpo' else p.stage
  lines = [
      f'== {stage}  mesh ({mesh}) on {p.devices} devices; lowered in {p.lower_s:.0f} s, '
      f'compiled in {p.compile_s:.0f} s',
      f'batch: {batch}',
      f'parameters: {p.param_count / 1e6:.1f} M, {_size(p.param_bytes_global).strip()} in all',
      'per device:',
      f'  parameters  {_size(p.param_bytes)}  trained {_size(p.trained_bytes).strip()}, frozen '
      f'{_size(p.frozen_bytes).strip()}; count x bytes / {p.param_shards} shards = '
      f'{_size(p.ideal_param_bytes).strip()} (x{ratio:.3f})',
      f'  optimizer   {_size(p.optimizer_bytes)}',
      f'  compiled    arguments {_size(p.argument_bytes).strip()}, outputs '
      f'{_size(p.output_bytes).strip()} (aliased {_size(p.alias_bytes).strip()}), temporaries '
      f'{_size(p.temp_bytes).strip()}, code {_size(p.code_bytes).strip()}',
      f'  peak        {_size(p.peak_bytes)}  of {p.hbm_bytes / GIB:g} GiB HBM: '
      + ('fits' if p.fits else 'DOES NOT FIT'),
      f'FLOPs a step: {p.flops_global:.3e} (matmuls + convs, scans x length), '
      f'{p.flops_per_device:.3e} per device; XLA cost_analysis {p.xla_flops:.3e} per device '
      '(loop bodies once)',
      'largest per-device tensors:',
  ]
  for t in p.largest:
    lines.append(f'  {t.mib:10.1f} MiB  {t.path}  {list(t.shape)} {t.dtype} {t.spec}')
  return '\n'.join(lines)


def to_json(plans: Sequence[StagePlan]) -> list[dict[str, Any]]:
  out = []
  for p in plans:
    d = dataclasses.asdict(p)
    d.update(param_bytes=p.param_bytes, ideal_param_bytes=p.ideal_param_bytes)
    out.append(d)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    if _MESH.value is not None:
      with config.unlocked():
        config.mesh = ml_collections.ConfigDict(mesh_sizes(_MESH.value))
    num_devices = _DEVICES.value or _device_count(sys.argv)
    if not num_devices:
      raise build.ConfigError('give --devices=N, or a --mesh whose sizes are all given, to say '
                              'how many devices to plan for.')
    before, _, after = _PROMPT.value.partition(',')
    hbm = _HBM_GIB.value if _HBM_GIB.value is not None else TPU_HBM_GIB[_TPU.value]
    plans = []
    for stage in build.parse_stages(_STAGE.value):
      plans += plan(config, [stage], num_devices, prompt=(int(before), int(after or 0)),
                    hbm_bytes=int(hbm * GIB), fast_compile=_FAST.value)
      print(format_plan(plans[-1]), flush=True)
  except ValueError as e:  # build.ConfigError, batch sizes, --prompt
    sys.exit(f'launch.plan: {e}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(to_json(plans), f, indent=2)


if __name__ == '__main__':
  app.run(main)
