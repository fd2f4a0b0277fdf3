"""TrainState: creation, updates, abstract restore targets, a sharded save and restore."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rvlf_jax.train import loop
from rvlf_jax.train import state as state_lib
from tests.helpers import fast_jit

TX = optax.adam(0.1)


def test_create_and_apply_gradients_match_optax():
  params = {'w': jnp.arange(3.0), 'b': jnp.ones(())}
  frozen = {'base': jnp.full((2,), 7.0)}
  state = state_lib.create(params, TX, frozen=frozen)
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert state_lib.create(params, TX).frozen == {}

  grads = {'w': jnp.array([0.5, -1.0, 2.0]), 'b': jnp.array(0.25)}
  new = state_lib.apply_gradients(state, grads, TX)
  updates, opt_state = TX.update(grads, TX.init(params), params)
  assert int(new.step) == 1
  for got, want in zip(jax.tree.leaves((new.params, new.opt_state)),
                       jax.tree.leaves((optax.apply_updates(params, updates), opt_state))):
    np.testing.assert_array_equal(got, want)
  assert new.frozen is state.frozen  # untouched


def test_abstract_keeps_shapes_dtypes_and_shardings():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(jnp.zeros((16, 2), jnp.bfloat16), NamedSharding(mesh, P('data')))
  tree = {'sharded': sharded, 'numpy': np.zeros((3,), np.int8), 'scalar': np.int32(4),
          'python': 1.5}
  out = state_lib.abstract(tree)
  assert out['sharded'] == jax.ShapeDtypeStruct((16, 2), jnp.bfloat16, sharding=sharded.sharding)
  assert out['numpy'] == jax.ShapeDtypeStruct((3,), np.int8)
  assert out['scalar'] == jax.ShapeDtypeStruct((), np.int32)
  assert out['python'].shape == () and out['python'].sharding is None
  # From jax.eval_shape of a jitted initialiser: the shardings come without any allocation.
  init = jax.jit(lambda: jnp.zeros((16, 2)), out_shardings=NamedSharding(mesh, P('data')))
  assert state_lib.abstract(jax.eval_shape(init)).sharding == NamedSharding(mesh, P('data'))


def test_sharded_state_resumes_and_restores_with_its_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())

  def init():
    return state_lib.create({'w': jnp.ones((8, 2))}, TX)

  # Adam's moments follow the parameters; the counters are replicated.
  shardings = jax.tree.map(lambda x: rows if x.ndim == 2 else replicated, jax.eval_shape(init))
  sharded_init = jax.jit(init, out_shardings=shardings)

  def step(state, batch, rng):
    del rng
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch @ p['w']) ** 2))(state.params)
    return state_lib.apply_gradients(state, grads, TX), {'loss': loss}

  step = fast_jit(step, out_shardings=(shardings, replicated))
  data = grain.MapDataset.source(np.eye(8, dtype=np.float32)).repeat(None).to_iter_dataset(
      grain.ReadOptions(num_threads=0)).batch(2)
  workdir = str(tmp_path)
  loop.run_stage('sharded', sharded_init, step, data, workdir, num_steps=2, plot=False)
  state, history = loop.run_stage('sharded', sharded_init, step, data, workdir, num_steps=4,
                                  plot=False)
  assert history.resumed_from == 2
  restored = loop.restore_state(workdir, 'sharded', sharded_init, 'latest')
  for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                 jax.tree.leaves(shardings)):
    assert got.sharding == sharding
    np.testing.assert_array_equal(got, want)
  assert restored.params['w'].addressable_shards[0].data.shape == (1, 2)
