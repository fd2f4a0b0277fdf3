"""Device meshes, the logical-axis rules table, and sharded init / steps / batches.

The only module that knows the mesh axes. Models name the dimensions of their parameters
(`nn.with_logical_partitioning`) and of a few activations (`nn.with_logical_constraint`) with
logical names; `RULES` maps those names to the mesh axes ('data', 'fsdp', 'tensor'):

  batch                          -> ('data', 'fsdp')   data parallel over both axes
  embed                          -> 'fsdp'             parameters (and their optimizer state)
                                                       split over fsdp, gathered per layer
  vocab, mlp, heads, kv_heads    -> 'tensor'           Megatron-style tensor parallelism
  length, head_dim, norm, lora,  -> None               replicated
  layers

flax gives each mesh axis to the first dimension of an array that asks for it, in the table's
order, so an activation ('batch', 'length', 'embed') is split over ('data', 'fsdp') by batch and
replicated along embed (fsdp is taken), while a kernel ('embed', 'mlp') is split over
('fsdp', 'tensor').

A dimension is only split when its size is divisible by the mesh axes it maps to; otherwise that
dimension is replicated (`logical_sharding`). Tiny test models have odd sizes (2 heads on a
tensor axis of 4), and real ones sometimes do too (Qwen3-8B's 8 kv heads on a tensor axis of 16):
the fallback keeps them runnable at the cost of replicating that dimension of that parameter.
Activation constraints inside the models need no such fallback: XLA pads an uneven split inside a
jitted function.

Known XLA issue (jax 0.10.2, CPU): with all three axes > 1, the input gradient of stacked strided
convolutions whose kernel [k, D, F] is split (None, 'fsdp', 'tensor') comes out wrong, so a conv
kernel's input dimension carries no logical name (skeleton.TemporalConv; tests/test_sharding.py).

Typical use (one stage; `mask` says which parameters it trains):

  mesh = sharding.mesh_from_config(config)                   # ('data', 'fsdp', 'tensor')
  boxed = model.abstract_params(boxed=True)                  # shapes and logical names
  params = sharding.init_sharded(lambda: model.init_params(key, boxed=True), mesh)
  trained, frozen = params_lib.partition(params, mask)
  create = lambda t, f: state_lib.create(t, tx, frozen=f)
  state_sh = sharding.state_shardings(jax.eval_shape(create, trained, frozen), boxed, mesh)
  state = jax.jit(create, out_shardings=state_sh)(trained, frozen)
  batch_sh = sharding.batch_sharding(mesh)
  step = sharding.shard_step(sft.make_step(model, tx, prompt), state_sh, batch_sh, mesh)
  state, metrics = step(state, sharding.global_batch(local_batch, batch_sh), rng)

Several processes (multi-host): each passes its own rows to `global_batch` (grain sharded by
process) and gets its rows of a result back with `local_rows`; a batch that every process holds
whole (an evaluation split each process reads entirely) becomes global with `shared_batch`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# A module import, read at call time: recipe.build imports train.grpo, which imports this module.
from rvlf_jax.recipe import build

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# (logical name, mesh axis / axes / None), in order of precedence. Every logical name the models
# use is listed, replicated ones included, so a new name is a visible decision here.
RULES: Rules = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('embed', 'fsdp'),
    ('length', None),
    ('head_dim', None),
    ('norm', None),
    ('lora', None),
    ('layers', None),
)


# -- Meshes ---------------------------------------------------------------------------------------


def _mesh_config(config_or_sizes: Any) -> ml_collections.ConfigDict:
  """A config with a 'mesh' section, from a recipe config, {axis: size} or (data, fsdp, tensor)."""
  if isinstance(config_or_sizes, ml_collections.ConfigDict) and 'mesh' in config_or_sizes:
    return config_or_sizes
  if isinstance(config_or_sizes, (Mapping, ml_collections.ConfigDict)):
    sizes = dict(config_or_sizes)
  elif isinstance(config_or_sizes, Sequence) and not isinstance(config_or_sizes, str):
    if len(config_or_sizes) != len(build.MESH_AXES):
      raise build.ConfigError(f'mesh sizes {tuple(config_or_sizes)} must give one size per '
                              f'axis {build.MESH_AXES}.')
    sizes = dict(zip(build.MESH_AXES, config_or_sizes))
  else:
    raise TypeError(f'expected a config with a mesh section, a mapping or a sequence of sizes, '
                    f'got {type(config_or_sizes).__name__}.')
  return ml_collections.ConfigDict({'mesh': sizes})


def mesh_from_config(config_or_sizes: Any, devices: Sequence[jax.Device] | None = None, *,
                     dcn: Any = None, process_is_granule: bool = False) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh, with GSPMD-style (Auto) axes.

  Args:
    config_or_sizes: a recipe config (its `mesh` section), a mapping {axis: size} or a sequence
      of three sizes; one size may be -1 (filled so that the mesh uses every device). Checked by
      `recipe.build.mesh_shape`: a mesh that does not match the device count raises
      `ConfigError` naming both numbers.
    devices: the devices to use; default all of them (`jax.devices()`).
    dcn: for multi-slice runs, the sizes across slices (same forms as config_or_sizes, -1
      allowed); config_or_sizes then gives the sizes within one slice (ICI). Each mesh axis has
      size ici x dcn, laid out by `mesh_utils.create_hybrid_device_mesh` so that only the dcn
      part crosses slices. Put 'data' (or 'fsdp') across slices, never 'tensor'.
    process_is_granule: with dcn, treat each process (not each TPU slice) as a granule: for
      multi-process runs on hosts without slices (GPUs, CPU tests).

  Returns:
    A `jax.sharding.Mesh` with axes ('data', 'fsdp', 'tensor').
  """
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,) * len(build.MESH_AXES)
  if dcn is None:
    sizes = build.mesh_shape(_mesh_config(config_or_sizes), len(devices))
    shape = [sizes[a] for a in build.MESH_AXES]
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, build.MESH_AXES, axis_types=auto)
  attr = 'process_index' if process_is_granule else 'slice_index'
  if not all(hasattr(d, attr) for d in devices):
    raise build.ConfigError(f'a dcn mesh needs devices with a {attr} (multi-slice TPU); pass '
                            f'process_is_granule=True to split across processes instead.')
  granules = len({getattr(d, attr) for d in devices})
  if len(devices) % granules:
    raise build.ConfigError(f'{len(devices)} devices do not split evenly into {granules} '
                            f'granules ({attr}).')
  try:
    dcn_sizes = build.mesh_shape(_mesh_config(dcn), granules)
  except build.ConfigError as e:
    raise build.ConfigError(f'dcn (across {granules} granules by {attr}): {e}') from e
  ici_sizes = build.mesh_shape(_mesh_config(config_or_sizes), len(devices) // granules)
  grid = mesh_utils.create_hybrid_device_mesh(
      [ici_sizes[a] for a in build.MESH_AXES], [dcn_sizes[a] for a in build.MESH_AXES],
      devices, process_is_granule=process_is_granule, allow_split_physical_axes=True)
  return Mesh(grid, build.MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules = RULES) -> Iterator[None]:
  """`mesh` and `rules` in effect, so that the models' `nn.with_logical_constraint` applies.

  Both are read when a function is traced: trace (call or lower) jitted code under it.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


# -- Shardings ------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _ways(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  """How many shards `axes` (a PartitionSpec entry) cut a dimension into."""
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules = RULES) -> NamedSharding:
  """The sharding of an array whose dimensions have logical `names`, by `rules`.

  A dimension whose size is not divisible by its mesh axes is replicated instead (see the
  module docstring); the others keep their axes.
  """
  if len(names) != len(shape):
    raise ValueError(f'{len(names)} logical names {tuple(names)} for shape {tuple(shape)}.')
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  dims = [axes if size % _ways(mesh, axes) == 0 else None for size, axes in zip(shape, spec)]
  return NamedSharding(mesh, P(*dims))


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _leaf_sharding(leaf: Any, mesh: Mesh, rules: Rules) -> NamedSharding:
  if _is_boxed(leaf):
    return logical_sharding(leaf.names, leaf.value.shape, mesh, rules)
  return replicated(mesh)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
  """A `NamedSharding` per parameter of a boxed tree (e.g. `model.abstract_params(boxed=True)`).

  The result has the structure of the unboxed parameters. Leaves without logical names are
  replicated.
  """
  return jax.tree.map(lambda x: _leaf_sharding(x, mesh, rules), boxed_params, is_leaf=_is_boxed)


def _dict_suffix(path: tuple[Any, ...]) -> tuple[str, ...]:
  """The trailing run of dict keys of a pytree path: where a parameter's own path would be."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def state_shardings(state: Any, boxed_params: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
  """A `NamedSharding` for each leaf of a `TrainState` (or any tree holding parameters).

  Each leaf whose path ends with the path of a parameter and whose shape is that parameter's
  gets the parameter's sharding: `state.params`, `state.frozen`, and the optax states that mirror
  the parameters (Adam's mu and nu, under any chain, mask or multi_transform). Everything else
  (step counters, schedules' counts, factored statistics) is replicated.

  Args:
    state: the state, as arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape` of its init).
    boxed_params: the full model's boxed parameters (`model.abstract_params(boxed=True)`); the
      trained and frozen parts are both found in it.
    mesh, rules: as in `param_shardings`.
  """
  flat = traverse_util.flatten_dict(boxed_params)
  flat = {tuple(map(str, k)): v for k, v in flat.items()}
  longest = max(map(len, flat), default=0)

  def leaf_sharding(path, leaf):
    keys = _dict_suffix(path)
    for n in range(min(len(keys), longest), 0, -1):
      param = flat.get(keys[-n:])
      if param is not None:
        shape = param.value.shape if _is_boxed(param) else np.shape(param)
        if tuple(np.shape(leaf)) == tuple(shape):
          return _leaf_sharding(param, mesh, rules)
        break
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
  """Leading (batch) dimension over the axes of logical 'batch' (data x fsdp), rest replicated.

  One sharding for every field of a batch (a pytree prefix): all fields must have the batch as
  leading dimension.
  """
  return NamedSharding(mesh, P(nn.logical_to_mesh_axes(('batch',), rules)[0]))


def rows_sharding(rows: int, mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
  """`batch_sharding` when `rows` split over the data axes, else replicated: for batches whose
  size the config does not tie to the mesh (evaluation)."""
  sharding = batch_sharding(mesh, rules)
  return sharding if rows % _ways(mesh, sharding.spec[0]) == 0 else replicated(mesh)


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules = RULES) -> None:
  """Raises ValueError naming both numbers when batch_size does not split over the data axes."""
  _check_rows(batch_size, mesh, nn.logical_to_mesh_axes(('batch',), rules)[0])


def _check_rows(n: int, mesh: Mesh, axes: str | tuple[str, ...] | None, local_ways: int = 0,
                field: str = '') -> None:
  """n rows must split into the shards of `axes`. With local_ways (the shards this process's
  devices hold) below the total, n is one process's rows and must split into those."""
  ways = _ways(mesh, axes)
  per_process = 0 < local_ways < ways
  if n % (local_ways if per_process else ways) == 0:
    return
  names = ' x '.join(_names(axes)) or 'no axes'
  field = f' (field {field})' if field else ''
  if per_process:
    raise ValueError(f'batch size {n} per process{field} is not divisible by the {local_ways} '
                     f'data-parallel shards on this process ({names} = {ways} in all; mesh '
                     f'{dict(mesh.shape)}).')
  raise ValueError(f'batch size {n}{field} is not divisible by the {ways} data-parallel shards '
                   f'of the mesh ({names} = {ways}; mesh {dict(mesh.shape)}).')


def _names(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Global arrays from this process's rows of a batch (`jax.make_array_from_process_local_data`).

  Single-process, the local batch is the whole batch. Multi-process, each process passes its own
  rows (grain sharded by process) and the global batch is their concatenation in process order.

  Args:
    local_batch: a pytree of arrays [B_local, ...].
    sharding: the batch's sharding (`batch_sharding(mesh)`).

  Raises:
    ValueError: a field without a leading dimension, or a batch that does not split over the
      data axes (naming the batch size and the number of shards).
  """
  axes = sharding.spec[0] if len(sharding.spec) else None
  ways = _ways(sharding.mesh, axes)
  # The distinct batch shards held by this process's devices: its rows are split into these.
  probe = (ways,) + (1,) * (len(sharding.spec) - 1)
  starts = {idx[0].start for idx in sharding.addressable_devices_indices_map(probe).values()}
  local_ways = len(starts)

  def make(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f'batch field {jax.tree_util.keystr(path)} has no batch dimension.')
    _check_rows(x.shape[0], sharding.mesh, axes, local_ways, jax.tree_util.keystr(path))
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(make, local_batch)


def shared_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Global arrays from a batch that every process holds whole (e.g. each reads the full
  evaluation split): each process keeps only its own devices' part of it.

  Unlike `global_batch`, the processes' batches are not concatenated: they must be equal.
  """
  def make(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(make, batch)


def local_rows(tree: Any, sharding: NamedSharding) -> Any:
  """This process's rows of global arrays, as numpy: the inverse of `global_batch`.

  The arrays are first laid out by `sharding` (a batch sharding; a no-op when they already
  are), then the distinct row blocks this process's devices hold are put together in order.
  Single-process, the whole arrays.
  """
  tree = jax.device_put(tree, sharding)

  def rows(x):
    blocks = {}
    for shard in x.addressable_shards:
      blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])

  return jax.tree.map(rows, tree)


# -- Sharded init and steps -----------------------------------------------------------------------


def _unbox(tree: Any) -> Any:
  """The values of a boxed tree, without flax's sharding constraints (out_shardings place them,
  with the divisibility fallback that flax's own constraint does not have)."""
  return jax.tree.map(lambda x: x.value if _is_boxed(x) else x, tree, is_leaf=_is_boxed)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules = RULES,
                 **jit_kwargs: Any) -> Any:
  """Parameters created already sharded: nothing is ever whole on one device.

  `jax.eval_shape(init_fn)` gives the boxed parameters' shapes and logical names, from which
  `param_shardings` are the `out_shardings` of the jitted initialiser.

  Args:
    init_fn: init_fn() -> boxed parameters (`nn.Partitioned` leaves), e.g.
      `lambda: model.init_params(key, boxed=True)`.
    mesh: the device mesh.
    rules: the logical-axis rules.
    **jit_kwargs: passed to `jax.jit` (e.g. compiler_options).

  Returns:
    The unboxed parameters, each a `jax.Array` with its `param_shardings` sharding.
  """
  shardings = param_shardings(jax.eval_shape(init_fn), mesh, rules)
  init = jax.jit(lambda: _unbox(init_fn()), out_shardings=shardings, **jit_kwargs)
  with mesh_context(mesh, rules):
    return init()


def shard_step(step_fn: Callable, state_shardings: Any, batch_sharding: Any, mesh: Mesh,
               rules: Rules = RULES, **jit_kwargs: Any) -> Callable:
  """`step(state, batch, rng) -> (state, metrics)` jitted over the mesh, the state donated.

  The state keeps its sharding across steps (in and out shardings are `state_shardings`), the
  batch comes in as `batch_sharding` (a sharding or a pytree prefix of the batch), the key and the
  metrics are replicated. The step is traced under `mesh_context(mesh, rules)`, so the models'
  activation constraints apply.

  Args:
    step_fn: a stage's pure step (`sft.make_step(...)`, `represent.make_step(...)`, ...).
    state_shardings: from `state_shardings`.
    batch_sharding: from `batch_sharding`; with a single `NamedSharding` every batch field is
      checked to split over the data axes (`check_batch_size`) before the step runs.
    mesh, rules: the device mesh and logical-axis rules.
    **jit_kwargs: passed to `jax.jit` (e.g. compiler_options).

  Returns:
    The sharded step; its `lower(state, batch, rng)` lowers it ahead of time (for memory and
    FLOP analysis) under the same mesh and rules.
  """
  rep = replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=0, **jit_kwargs)

  def check(batch):
    if isinstance(batch_sharding, NamedSharding) and len(batch_sharding.spec):
      for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(leaf)  # also of jax.ShapeDtypeStruct, for lower()
        if shape:
          _check_rows(shape[0], mesh, batch_sharding.spec[0], field=jax.tree_util.keystr(path))

  @functools.wraps(step_fn)
  def step(state, batch, rng):
    check(batch)
    with mesh_context(mesh, rules):
      return jitted(state, batch, rng)

  def lower(state, batch, rng):
    check(batch)
    with mesh_context(mesh, rules):
      return jitted.lower(state, batch, rng)

  step.lower = lower
  return step
