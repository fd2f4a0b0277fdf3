"""The training state every stage steps: a pytree of step counter, parameters and optimizer state.

The optax transformation is not part of the state: it is static configuration, closed over by
each stage's jitted step (`functools.partial(step, tx=tx)`), so the state holds arrays only and
checkpoints, shards and donates like any other pytree.

A stage that trains part of the model keeps the rest in `frozen` (see `train.params`): only
`params` is differentiated and has optimizer state, and the frozen part rides along unchanged.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Arrays of one training run.

  Attributes:
    step: int32[] number of optimizer updates applied (a stage may apply several per loop step).
    params: the trained parameters.
    opt_state: the optax state of `tx.init(params)` for the stage's transformation.
    frozen: parameters the stage uses but does not train (LoRA's base weights, the reference
      policy); {} when everything is trained.
    rl: the REINFORCE state of a sign encoder with RLA gates (`rl_state`): {'baseline':
      float32[L] per-layer reward baselines, 'prev_loss': float32[] the last step's task loss};
      None (no leaves) for every other model, whose states and checkpoints it leaves unchanged.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  frozen: Any = flax.struct.field(default_factory=dict)
  rl: Any = None


def rl_state(num_layers: int) -> dict[str, jax.Array]:
  """The initial `TrainState.rl` of a sign encoder with `num_layers` RLA gates."""
  return {'baseline': jnp.zeros((num_layers,), jnp.float32),
          'prev_loss': jnp.zeros((), jnp.float32)}


def create(params: Any, tx: optax.GradientTransformation, *, frozen: Any = None,
           rl: Any = None) -> TrainState:
  """A fresh state at step 0 with `tx`'s initial optimizer state for `params`.

  Call it inside `jax.jit(..., out_shardings=...)` (or under `jax.eval_shape`) for large models
  so that the optimizer state is created sharded like the parameters.

  Args:
    params: the trained parameters.
    tx: the stage's optimizer.
    frozen: the untrained parameters, if any.
    rl: the REINFORCE state (`rl_state`) of a model with RLA gates, else None.
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    frozen={} if frozen is None else frozen, rl=rl)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation
                    ) -> TrainState:
  """One optimizer update: `tx` turns `grads` into updates applied to the parameters."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def abstract(tree: Any, shardings: Any = None) -> Any:
  """`jax.ShapeDtypeStruct`s of a tree of arrays, keeping each array's sharding.

  The restore target for orbax: built directly rather than with
  `ocp.utils.to_shape_dtype_struct`, which rejects numpy scalar leaves. Leaves may be jax arrays
  (sharding kept), numpy arrays or scalars (no sharding), or `ShapeDtypeStruct`s, e.g. from
  `jax.eval_shape` of a jitted initialiser with `out_shardings` (sharding kept, so nothing is
  materialised to build the target).

  Args:
    tree: the arrays.
    shardings: a sharding per leaf (a tree of the same structure) to use instead of the leaves'
      own: restoring onto another mesh than the one that saved.
  """

  def leaf(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    dtype = x.dtype if hasattr(x, 'dtype') else np.result_type(x)
    sharding = sharding if sharding is not None else getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(leaf, tree)
  return jax.tree.map(leaf, tree, shardings)
