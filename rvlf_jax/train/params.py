"""Parameter trees cut into trained and frozen parts, and put back together.

A stage trains part of the model (LoRA adapters, the sign encoder and projector) and keeps the
rest frozen (the decoder's base weights, the reference policy). Only the trained part is
differentiated and has optimizer state; the frozen part rides along in the train state.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import traverse_util

Path = tuple[str, ...]


def mask_from(params: Any, trained: Callable[[Path], bool]) -> Any:
  """A tree of bools like `params`: trained(path) for each leaf's path of keys."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: bool(trained(k)) for k in flat})


def partition(params: Any, mask: Any) -> tuple[dict, dict]:
  """(trained, frozen): disjoint trees holding the leaves where mask is True / False."""
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  if set(flat) != set(flat_mask):
    raise ValueError(f'mask and params differ in their leaves: '
                     f'{sorted(set(flat) ^ set(flat_mask))[:5]}')
  trained = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge(*trees: Any) -> dict:
  """The union of disjoint trees (inverse of `partition`)."""
  flat: dict = {}
  for tree in trees:
    part = traverse_util.flatten_dict(tree) if tree else {}
    overlap = set(flat) & set(part)
    if overlap:
      raise ValueError(f'trees overlap at {sorted(overlap)[:5]}')
    flat.update(part)
  return traverse_util.unflatten_dict(flat)
