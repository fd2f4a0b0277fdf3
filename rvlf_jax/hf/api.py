"""`load_hf` / `save_hf`: HF folders <-> (our config, our parameters), for every family we support.

Each family module (llama.py, gemma.py, dinov2.py) exposes `FAMILIES`, a tuple of `Family`
records: which HF `model_type`s it reads, how configs translate, its key table and how to get
our abstract parameter tree for a config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np

from rvlf_jax.hf import convert, io


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF model family maps onto ours.

  Attributes:
    model_types: HF `model_type` values this family reads.
    config_from_hf: HF config dict -> our config (keyword overrides allowed).
    table: our config -> key table.
    abstract_params: our config -> unboxed tree of `jax.ShapeDtypeStruct`.
    num_layers: our config -> L.
  """

  model_types: tuple[str, ...]
  config_from_hf: Callable[..., Any]
  table: Callable[[Any], convert.Table]
  abstract_params: Callable[[Any], Any]
  num_layers: Callable[[Any], int]


def _registry() -> dict[str, Family]:
  from rvlf_jax.hf import dinov2, gemma, llama  # pylint: disable=g-import-not-at-top
  return {t: f for m in (llama, gemma, dinov2) for f in m.FAMILIES for t in f.model_types}


def family_for(model_type: str, source: str) -> Family:
  registry = _registry()
  if model_type not in registry:
    raise convert.ConversionError(
        f'{source}: unsupported model_type {model_type!r}; supported: {sorted(registry)}.')
  return registry[model_type]


def load_hf(path: str, **overrides) -> tuple[Any, dict[str, Any]]:
  """Reads an HF folder (config.json + safetensors) into our config and parameters.

  Args:
    path: local folder as written by `save_pretrained`.
    **overrides: fields of our config to set (e.g. scan_layers=False, dtype='bfloat16');
      param_dtype also casts the parameters.

  Returns:
    (config, params): our config dataclass and a nested dict of numpy arrays in the checkpoint's
    dtype, ready for `model.apply({'params': params}, ...)` or for `jax.device_put` with shardings.
  """
  hf_config = io.read_config(path)
  source = os.path.join(path, 'config.json')
  model_type = hf_config.get('model_type')
  if model_type is None:
    raise convert.ConversionError(f'{source}: has no "model_type" field.')
  family = family_for(model_type, source)
  try:
    config = family.config_from_hf(hf_config, **overrides)
  except (KeyError, TypeError, ValueError) as e:
    raise convert.ConversionError(f'{source}: cannot build a {model_type} config: {e}') from e
  tensors = io.read_tensors(path)
  # The checkpoint's dtype is kept unless the caller asked for another parameter dtype.
  cast = config.param_dtype if 'param_dtype' in overrides else None
  params = convert.hf_to_params(family.table(config), tensors, family.abstract_params(config),
                                family.num_layers(config), dtype=cast)
  return config, params


def floating_dtype(arrays: Iterable[np.ndarray]) -> str | None:
  """The name of the first floating dtype among `arrays` (bfloat16 included), or None."""
  for array in arrays:
    # ml_dtypes' bfloat16 is not a subtype of np.floating.
    if np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16':
      return array.dtype.name
  return None


def hf_tensors(config: Any, params: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Our config and parameters as HF sees them.

  Args:
    config: our config dataclass of a registered family.
    params: its parameter tree (numpy or jax arrays, scanned or looped layers).

  Returns:
    (HF config dict whose `dtype` is that of the parameters, {HF key: numpy array}).
  """
  hf_config = config.to_hf_config()
  family = family_for(hf_config['model_type'], type(config).__name__)
  tensors = convert.params_to_hf(family.table(config), jax.device_get(params),
                                 family.num_layers(config))
  dtype = floating_dtype(tensors.values())
  if dtype is not None:
    # The parameters, not config.param_dtype, decide: reading back rebuilds the same dtype.
    hf_config['dtype'] = dtype
  return hf_config, tensors


def save_hf(config: Any, params: Any, path: str, *, max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False) -> None:
  """Writes our config and parameters as an HF folder loadable by transformers.

  Tensors keep their dtype; config.json records it. LoRA adapters must be merged first
  (`rvlf_jax.models.lora.merge`). The folder appears only once complete.
  """
  hf_config, tensors = hf_tensors(config, params)
  io.write_folder(path, hf_config, tensors, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
