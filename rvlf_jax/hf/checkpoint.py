"""Orbax checkpoints that carry their architecture, and conversion to and from HF folders.

A checkpoint written by `save_checkpoint` is a folder:

  model_config.json   the HF config dict (`config.to_hf_config()`, with model_type and dtype);
                      it names the family and rebuilds our config through the same registry as
                      `load_hf`.
  params/             an orbax PyTree checkpoint of {HF key: array}.

The parameters are stored under their HF keys (the family table read backwards) rather than in our
tree: that layout does not depend on `scan_layers`, so a checkpoint saved from a scanned model
restores into a looped one and back, and each tensor keeps its dtype (bf16 stays bf16).

Everything here runs in one process on host memory (a conversion tool, not a training checkpoint):
parameters are gathered with `jax.device_get` and restored as numpy arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rvlf_jax.hf import api, convert, io
from rvlf_jax.hf.convert import ConversionError

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'
HF_CONFIG_FILE = 'config.json'


def save_checkpoint(config: Any, params: Any, path: str, *, overwrite: bool = False) -> None:
  """Writes `params` as an orbax checkpoint with the architecture in model_config.json.

  Args:
    config: our config dataclass of a registered family (DecoderConfig, VitConfig).
    params: its parameter tree (numpy or jax arrays, scanned or looped layers); LoRA adapters must
      be merged first.
    path: destination folder. It appears only once complete.
    overwrite: replace an existing non-empty folder.

  Raises:
    FileExistsError: `path` exists, is not empty and `overwrite` is False.
    ConversionError: the parameters do not match the family's table.
  """
  hf_config, tensors = api.hf_tensors(config, params)

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    # PyTreeCheckpointer is synchronous: the parameters are on disk when save returns, before
    # the folder is renamed into place.
    with ocp.PyTreeCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(tensors))

  io.write_atomically(path, write, overwrite=overwrite)


def _read_json(config_path: str) -> dict[str, Any]:
  config = io.read_json(config_path, 'an rvlf_jax checkpoint')
  if 'model_type' not in config:
    raise ConversionError(f'{config_path}: expected a JSON object with a "model_type" field.')
  return config


def _restore_tensors(params_dir: str) -> dict[str, np.ndarray]:
  """{HF key: numpy array} in the shapes and dtypes they were saved with."""
  if not os.path.isdir(params_dir):
    raise ConversionError(f'{params_dir}: missing; the checkpoint has no parameters.')
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(params_dir).item_metadata
    if metadata is None or not isinstance(metadata.tree, dict):
      raise ConversionError(f'{params_dir}: not an orbax checkpoint of {{HF key: array}} (no '
                            'readable tree metadata).')
    metadata = metadata.tree
    try:
      # Targets from the saved metadata keep each tensor's own dtype; built with
      # jax.ShapeDtypeStruct because ocp.utils.to_shape_dtype_struct rejects numpy scalars.
      target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in metadata.items()}
      restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)
                      for k, t in target.items()}
      tensors = checkpointer.restore(
          params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except (OSError, ValueError) as e:  # tensorstore reports corrupt data as ValueError.
      raise ConversionError(f'{params_dir}: unreadable orbax checkpoint ({e}).') from e
  return {k: np.asarray(v) for k, v in tensors.items()}


def load_checkpoint(path: str, **overrides) -> tuple[Any, dict[str, Any]]:
  """Reads a folder written by `save_checkpoint` into our config and parameters.

  Args:
    path: the checkpoint folder.
    **overrides: fields of our config to set, e.g. scan_layers=False (the stored layout does not
      depend on it).

  Returns:
    (config, params): our config (its param_dtype that of the saved parameters unless overridden)
    and a nested dict of numpy arrays in the saved dtype, like `load_hf` returns.

  Raises:
    ConversionError: the folder, model_config.json or the parameters are missing or do not match
      the architecture; the message names the file and the tensor.
  """
  if not os.path.isdir(path):
    raise ConversionError(f'{path}: not a folder (expected an rvlf_jax checkpoint with '
                          f'{CONFIG_FILE}).')
  config_path = os.path.join(path, CONFIG_FILE)
  hf_config = _read_json(config_path)
  family = api.family_for(hf_config['model_type'], config_path)
  params_dir = os.path.join(path, PARAMS_DIR)
  tensors = _restore_tensors(params_dir)
  dtype = api.floating_dtype(tensors.values())
  if dtype in ('float32', 'bfloat16', 'float16'):
    # Not every family reads `dtype` from the HF config; the restored dtype is the truth.
    overrides = {'param_dtype': dtype, **overrides}
  try:
    config = family.config_from_hf(hf_config, **overrides)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f'{config_path}: cannot build a {hf_config["model_type"]} config: '
                          f'{e}') from e
  params = convert.hf_to_params(family.table(config), convert.TensorSource.from_arrays(
      tensors, origin=params_dir), family.abstract_params(config), family.num_layers(config))
  return config, params


# -- Conversion between HF folders and checkpoints ------------------------------------------------

_SIZE = re.compile(r'\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*', re.IGNORECASE)
_UNITS = {'b': 1, 'kb': 10**3, 'mb': 10**6, 'gb': 10**9, 'tb': 10**12,
          'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


def parse_size(size: str | int) -> int:
  """Bytes from '5GB', '500MB', '2GiB' or '1000'; as in transformers, GB is 10**9 and GiB 2**30."""
  if isinstance(size, int):
    return size
  match = _SIZE.fullmatch(size)
  if not match:
    raise ValueError(f'size {size!r}: expected a number of bytes or e.g. 500MB, 5GB, 2GiB.')
  return int(float(match.group(1)) * _UNITS[(match.group(2) or 'b').lower()])


@dataclasses.dataclass(frozen=True)
class Conversion:
  """What `convert_folder` did: its direction, the model and where it went."""

  direction: str  # 'hf->orbax' or 'orbax->hf'
  model_type: str
  num_params: int
  dtype: str
  dst: str

  def summary(self) -> str:
    return (f'{self.direction}: {self.model_type}, {self.num_params:,} parameters, {self.dtype}, '
            f'written to {self.dst}')


def detect_format(path: str) -> str:
  """'hf' for a folder with config.json, 'orbax' for one with model_config.json."""
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return 'orbax'
  if os.path.isfile(os.path.join(path, HF_CONFIG_FILE)):
    return 'hf'
  raise ConversionError(f'{path}: holds neither {HF_CONFIG_FILE} (an HF model folder) nor '
                        f'{CONFIG_FILE} (an rvlf_jax orbax checkpoint).')


def convert_folder(src: str, dst: str, *, overwrite: bool = False,
                   max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
                   dtype: str | None = None) -> Conversion:
  """Converts an HF folder to an orbax checkpoint, or such a checkpoint back to an HF folder.

  Args:
    src: an HF folder (config.json + safetensors) or a `save_checkpoint` folder.
    dst: destination folder, written atomically.
    overwrite: replace an existing destination.
    max_shard_bytes: largest safetensors shard when writing an HF folder.
    dtype: cast floating parameters to this dtype (e.g. 'bfloat16'); None keeps theirs.

  Returns:
    A `Conversion` describing the result.
  """
  to_orbax = detect_format(src) == 'hf'
  if to_orbax:
    config, params = api.load_hf(src)
  else:
    config, params = load_checkpoint(src)
  if dtype is not None:
    cast = jnp.dtype(dtype)
    params = jax.tree.map(
        lambda a: a.astype(cast) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    config = dataclasses.replace(config, param_dtype=cast.name)
  if to_orbax:
    save_checkpoint(config, params, dst, overwrite=overwrite)
  else:
    api.save_hf(config, params, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  leaves = jax.tree.leaves(params)
  return Conversion(
      direction='hf->orbax' if to_orbax else 'orbax->hf',
      model_type=config.to_hf_config()['model_type'], num_params=sum(a.size for a in leaves),
      dtype=api.floating_dtype(leaves) or str(leaves[0].dtype),
      dst=os.path.abspath(dst))
