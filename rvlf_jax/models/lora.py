"""LoRA bookkeeping on parameter trees: which leaves train, adding fresh adapters, merging them.

The adapters themselves live in `layers.Linear` (params 'lora_a' [*in, R] and 'lora_b' [R, *out]
beside 'kernel'); these helpers work on any tree that holds them, scanned (leading L axis) or not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from rvlf_jax.models.layers import LoraConfig

ADAPTER_NAMES = ('lora_a', 'lora_b')


def trainable_mask(params: Any) -> Any:
  """A tree of bools like `params`: True on LoRA adapters, False on the frozen base.

  Use with `optax.masked` / `optax.multi_transform` so that only adapters are updated.
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] in ADAPTER_NAMES for k in flat})


def split(params: Any) -> tuple[Any, Any]:
  """(adapters, base): the tree cut in two disjoint trees, for differentiating adapters only."""
  flat = traverse_util.flatten_dict(params)
  adapters = {k: v for k, v in flat.items() if k[-1] in ADAPTER_NAMES}
  base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_NAMES}
  return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def combine(adapters: Any, base: Any) -> Any:
  """Inverse of `split`."""
  flat = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)}
  return traverse_util.unflatten_dict(flat)


def add_adapters(params: Any, lora_params: Any) -> Any:
  """Base params (e.g. loaded from HF) completed with the adapters of a freshly initialised
  LoRA model's params; base values win, adapters come from `lora_params`."""
  adapters, _ = split(lora_params)
  return combine(adapters, params)


def merge(params: Any, lora: LoraConfig) -> Any:
  """Folds every adapter into its kernel: W + (alpha / R) A B, and drops the adapters.

  The result has exactly the base model's structure, so it can be exported with `save_hf`.
  The kernel keeps its dtype; the update is computed in float32.
  """
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_NAMES}
  for key, a in flat.items():
    if key[-1] != 'lora_a':
      continue
    prefix = key[:-1]
    b, kernel = flat[prefix + ('lora_b',)], flat[prefix + ('kernel',)]
    # Scanned layers carry extra leading axes on all three arrays: vmap over them.
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    product = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)
    for _ in range(lead):
      product = jax.vmap(product)
    delta = product(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    merged = jnp.asarray(kernel, jnp.float32) + lora.scale * delta
    out[prefix + ('kernel',)] = merged.astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)
