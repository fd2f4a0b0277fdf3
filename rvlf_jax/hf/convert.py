"""Declarative HF <-> rvlf_jax parameter conversion.

A family's table is a list of `Rule`s: an HF key pattern, our parameter path and the transform
between the two layouts. `{i}` in both stands for the layer index. The same table is read forwards
on import (`hf_to_params`) and backwards on export (`params_to_hf`).

Our layers live either stacked under a `layers` module (nn.scan, leading axis L) or one module per
layer (`layers_0`, `layers_1`, ...), possibly below a parent (`transformer/layers/...`): the table
always speaks of one layer, `.../layers/...`, and the converter stacks or splits.

A rule whose parameter does not exist in the model (a bias the config turns off, an untied head)
is skipped; a rule whose parameter exists but whose tensor is missing from the checkpoint is an
error, as is a checkpoint tensor that no rule consumes (unless the table lists it as ignorable).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
  """A checkpoint does not match the model it is converted to or from."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of exact, invertible layout changes between an HF tensor and our parameter.

  `to_ours(hf_array, our_shape)` and `to_hf(our_array)`; `hf_shape(our_shape)` gives the HF shape
  expected for a parameter of our shape (used for the shape assertion before any conversion).
  """

  name: str
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform('identity', lambda a, shape: a, lambda a: a, lambda shape: shape)


def linear(n_in: int = 1) -> Transform:
  """torch Linear weight [out, in] <-> our kernel [*in_shape, *out_shape] (n_in leading dims)."""

  def to_ours(a, shape):
    return np.ascontiguousarray(a.T).reshape(shape)

  def to_hf(a):
    n_out = math.prod(a.shape[n_in:])
    return np.ascontiguousarray(a.reshape(math.prod(a.shape[:n_in]), n_out).T)

  def hf_shape(shape):
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))

  return Transform(f'linear(n_in={n_in})', to_ours, to_hf, hf_shape)


RESHAPE = Transform('reshape', lambda a, shape: a.reshape(shape),
                    lambda a: a.reshape(-1), lambda shape: (math.prod(shape),))

# torch conv weight [O, I, kh, kw] <-> flax conv kernel [kh, kw, I, O].
CONV2D = Transform('conv2d', lambda a, shape: np.ascontiguousarray(a.transpose(2, 3, 1, 0)),
                   lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1)),
                   lambda shape: (shape[3], shape[2], shape[0], shape[1]))


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of a family table: HF key pattern <-> our '/'-joined parameter path."""

  hf: str
  ours: str
  transform: Transform = IDENTITY

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf


@dataclasses.dataclass(frozen=True)
class Table:
  """A family's rules plus HF keys that may be present in checkpoints and carry no parameter."""

  rules: tuple[Rule, ...]
  ignore: tuple[str, ...] = ()  # regular expressions over HF keys

  def ignorable(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.ignore)


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


_STACKED = re.compile(r'(^|/)layers/')
_UNSTACKED = re.compile(r'(^|/)layers_\d+/')


def _scanned(flat_shapes: Mapping[str, Any]) -> bool:
  """Whether the tree's layers are stacked ('.../layers/...') rather than '.../layers_i/...'."""
  return not any(_UNSTACKED.search(k) for k in flat_shapes)


def _entries(table: Table, flat_shapes: Mapping[str, Any], num_layers: int):
  """Yields (rule, hf_key, our_key, layer or None) for every parameter the model has."""
  scanned = _scanned(flat_shapes)
  for rule in table.rules:
    if not rule.per_layer:
      if rule.ours in flat_shapes:
        yield rule, rule.hf, rule.ours, None
      continue
    if scanned:
      if rule.ours in flat_shapes:
        for i in range(num_layers):
          yield rule, rule.hf.format(i=i), rule.ours, i
      continue
    for i in range(num_layers):
      ours = _STACKED.sub(rf'\g<1>layers_{i}/', rule.ours, count=1)
      if ours in flat_shapes:
        yield rule, rule.hf.format(i=i), ours, None


def hf_to_params(table: Table, tensors: 'TensorSource', abstract_params: Mapping[str, Any],
                 num_layers: int, dtype: Any = None) -> dict[str, Any]:
  """Builds our parameter tree from HF tensors.

  Args:
    table: the family's table.
    tensors: a `TensorSource` (name -> lazy numpy array, and where each lives).
    abstract_params: our (unboxed) parameter tree of `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)`; it decides which rules apply and the expected shapes.
    num_layers: L.
    dtype: cast every tensor to this dtype; None keeps the checkpoint's dtype.

  Returns:
    Nested dict of numpy arrays shaped like `abstract_params`.

  Raises:
    ConversionError: a tensor is missing, misshaped, or left unconsumed; the message names the
      checkpoint file and the tensor.
  """
  flat_shapes = {k: tuple(v.shape) for k, v in _flat(abstract_params).items()}
  out: dict[str, Any] = {}
  stacks: dict[str, list] = {}
  used = set()
  for rule, hf_key, ours, layer in _entries(table, flat_shapes, num_layers):
    shape = flat_shapes[ours][1:] if layer is not None else flat_shapes[ours]
    if hf_key not in tensors:
      raise ConversionError(
          f'{tensors.where()}: missing tensor {hf_key!r} (needed for parameter {ours!r}).')
    array = tensors.get(hf_key)
    expected = rule.transform.hf_shape(shape)
    if tuple(array.shape) != tuple(expected):
      raise ConversionError(
          f'{tensors.where(hf_key)}: tensor {hf_key!r} has shape {tuple(array.shape)}, expected '
          f'{tuple(expected)} for parameter {ours!r} of shape {shape} under this config.')
    array = rule.transform.to_ours(array, shape)
    if dtype is not None:
      array = array.astype(dtype)
    used.add(hf_key)
    if layer is None:
      out[ours] = array
    else:
      stacks.setdefault(ours, [None] * num_layers)[layer] = array
  for ours, arrays in stacks.items():
    out[ours] = np.stack(arrays)
  unused = sorted(k for k in tensors.keys() if k not in used and not table.ignorable(k))
  if unused:
    shown = ', '.join(repr(k) for k in unused[:5])
    more = f' and {len(unused) - 5} more' if len(unused) > 5 else ''
    raise ConversionError(
        f'{tensors.where(unused[0])}: tensor(s) {shown}{more} do not belong to this model '
        f'(config and weights disagree?).')
  missing = sorted(set(flat_shapes) - set(out))
  if missing:
    raise ConversionError(f'{tensors.where()}: no rule produced parameter(s) {missing}.')
  return _unflat(out)


def params_to_hf(table: Table, params: Mapping[str, Any], num_layers: int) -> dict[str, np.ndarray]:
  """Reads the table backwards: our parameter tree -> {HF key: numpy array} (dtype kept)."""
  flat = {k: np.asarray(v) for k, v in _flat(params).items()}
  out: dict[str, np.ndarray] = {}
  used = set()
  for rule, hf_key, ours, layer in _entries(table, flat, num_layers):
    array = flat[ours] if layer is None else flat[ours][layer]
    out[hf_key] = rule.transform.to_hf(array)
    used.add(ours)
  leftover = sorted(set(flat) - used)
  if leftover:
    raise ConversionError(
        f'parameters {leftover} have no HF counterpart (merge LoRA adapters before export).')
  return out


class TensorSource:
  """Name -> numpy array, lazily, remembering the file each tensor came from (for errors)."""

  def __init__(self, getters: Mapping[str, Callable[[], np.ndarray]], files: Mapping[str, str],
               origin: str):
    self._getters = dict(getters)
    self._files = dict(files)
    self._origin = origin

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray], origin: str = '<memory>'):
    return cls({k: (lambda v=v: np.asarray(v)) for k, v in arrays.items()},
               {k: origin for k in arrays}, origin)

  def keys(self) -> Iterable[str]:
    return self._getters.keys()

  def __contains__(self, key: str) -> bool:
    return key in self._getters

  def get(self, key: str) -> np.ndarray:
    return self._getters[key]()

  def where(self, key: str | None = None) -> str:
    """The file holding `key` (or the folder, when no key is given)."""
    return self._files.get(key, self._origin) if key is not None else self._origin
