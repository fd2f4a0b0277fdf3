"""Helpers shared by the model tests.

Parameters are drawn with numpy from the abstract (`jax.eval_shape`) init: compiling threefry for
every parameter costs seconds on this CPU, and the tests need behaviour, not a particular random
stream. For the same reason `fast_jit` compiles without LLVM optimisation: tiny models run in
microseconds either way, and compiles take half as long.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def fast_jit(fn, **kwargs):
  """`jax.jit` with the CPU backend's optimisation off (same results, faster compiles)."""
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0}, **kwargs)


def numpy_params(module, *args, seed=0, **kwargs):
  """Parameters of `module.init(key, *args, **kwargs)`, drawn with numpy (no compile).

  Norm scales are 1, 'lora_b' 0 (a fresh adapter), biases and everything else small random
  values, so that every parameter matters.
  """
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']
  abstract = nn.meta.unbox(abstract)
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == 'lora_b':
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == 'logit_scale':
      return jnp.full(leaf.shape, np.log(1 / 0.07), leaf.dtype)
    return jnp.asarray(0.15 * rng.randn(*leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def assert_all_named(boxed_params):
  """Every leaf is `nn.LogicallyPartitioned` with one name per dimension."""
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f'{key} has no logical axis names'
    assert len(leaf.names) == leaf.value.ndim, (key, leaf.names, leaf.value.shape)


def keypoint_batch(rng, b, t, lengths, j=133):
  """Random keypoints [B, T, J, 3] with confidences in (0.1, 1], zero past each length."""
  kp = rng.randn(b, t, j, 3).astype(np.float32)
  kp[..., 2] = rng.uniform(0.1, 1.0, (b, t, j))
  mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
  kp[~mask] = 0.0
  return kp, mask
