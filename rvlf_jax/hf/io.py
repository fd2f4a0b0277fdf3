"""Reading and writing HuggingFace model folders: config.json + (sharded) safetensors.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place only
when complete, so an interrupted or failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rvlf_jax.hf.convert import ConversionError, TensorSource

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_json(config_path: str, needed_by: str) -> dict[str, Any]:
  """A JSON object from `config_path`, with errors that name the file and what needs it."""
  if not os.path.exists(config_path):
    raise ConversionError(f'{config_path}: missing; {needed_by} needs '
                          f'{os.path.basename(config_path)}.')
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f'{config_path}: not valid JSON ({e}).') from e
  if not isinstance(config, dict):
    raise ConversionError(f'{config_path}: expected a JSON object, got {type(config).__name__}.')
  return config


def read_config(path: str) -> dict[str, Any]:
  """The parsed config.json of an HF folder, with a clear error when absent or invalid."""
  if not os.path.isdir(path):
    raise ConversionError(f'{path}: not a folder (expected an HF model folder with config.json).')
  return read_json(os.path.join(path, 'config.json'), 'an HF model folder')


def read_tensors(path: str) -> TensorSource:
  """A lazy view of every tensor in the folder's safetensors file(s)."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      try:
        weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f'{index_path}: not a safetensors index ({e!r}).') from e
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if not files:
      raise ConversionError(f'{path}: no *.safetensors files (and no {INDEX_FILE}).')
    weight_map = None
  getters, where = {}, {}
  for name in files:
    file_path = os.path.join(path, name)
    if not os.path.exists(file_path):
      raise ConversionError(f'{index_path}: lists {name}, which does not exist.')
    try:
      with safe_open(file_path, framework='np') as f:
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
      raise ConversionError(f'{file_path}: unreadable safetensors file ({e}).') from e
    for key in keys:
      if weight_map is not None and weight_map.get(key) != name:
        continue
      getters[key] = lambda p=file_path, k=key: _read_one(p, k)
      where[key] = file_path
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(getters))
    if absent:
      raise ConversionError(f'{index_path}: tensor {absent[0]!r} is listed in the index but is not '
                            f'in {weight_map[absent[0]]}.')
  return TensorSource(getters, where, path)


def _read_one(file_path: str, key: str) -> np.ndarray:
  with safe_open(file_path, framework='np') as f:
    return f.get_tensor(key)


def write_atomically(path: str, write: Callable[[str], None], *, overwrite: bool = False) -> None:
  """Runs write(tmp) on a fresh sibling folder, then renames it to `path`.

  An existing empty folder is replaced; a non-empty one only with `overwrite`, and it is removed
  only after the new folder is complete and in place. On any failure the temporary folder is
  removed and `path` is left as it was.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite and not (os.path.isdir(path) and not os.listdir(path)):
    raise FileExistsError(f'{path}: already exists and is not empty; pass overwrite=True to '
                          'replace it.')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir honours the umask (tempfile.mkdtemp would leave the result readable by its owner
  # only); the random suffix keeps concurrent writers apart.
  tmp = os.path.join(parent, f'.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}')
  os.mkdir(tmp)
  try:
    write(tmp)
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.old-', dir=parent)
      os.rename(path, os.path.join(old, 'x'))
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(os.path.join(old, 'x'), path)
        os.rmdir(old)
        raise
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_folder(path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 extra_files: Mapping[str, str] | None = None) -> None:
  """Writes config.json and safetensors (sharded with an index above max_shard_bytes), atomically.

  Args:
    path: destination folder; must not exist (or be empty) unless overwrite is set.
    config: the HF config dict.
    tensors: HF key -> numpy array; dtypes are written as they are.
    max_shard_bytes: largest shard; above it, `model-0000k-of-0000n.safetensors` + index.
    overwrite: replace an existing folder (the old one is removed only after the new one is
      complete).
    extra_files: further text files to write (name -> content), e.g. generation_config.json.
  """

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)
    for name, content in (extra_files or {}).items():
      with open(os.path.join(tmp, name), 'w') as f:
        f.write(content)
    _write_shards(tmp, tensors, max_shard_bytes)

  write_atomically(path, write, overwrite=overwrite)


def _write_shards(folder: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(tensors):
    array = np.ascontiguousarray(tensors[key])
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = array
    size += array.nbytes
  metadata = {'format': 'pt'}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    name = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(folder, name), metadata=metadata)
    weight_map.update({key: name for key in shard})
  total = sum(np.asarray(a).nbytes for a in tensors.values())
  with open(os.path.join(folder, INDEX_FILE), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2,
              sort_keys=True)
