"""HF folder I/O: sharded writes loadable by transformers, atomic writes, clear errors, dtypes."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from rvlf_jax.hf import ConversionError, io, load_hf, save_hf

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SHARD = re.compile(r'model-(\d{5})-of-(\d{5})\.safetensors')


def make_llama(path, dtype=torch.float32):
  """A tiny random LlamaForCausalLM saved to `path`, returned in `dtype`."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval().to(dtype)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp('llama')
  return make_llama(path), str(path)


def assert_same_state(reloaded, original):
  want, got = original.state_dict(), reloaded.state_dict()
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    assert torch.equal(got[key], value), f'{key} differs'


def leftovers(parent):
  """Temporary folders that a write left in `parent`."""
  return [n for n in os.listdir(parent) if '.tmp-' in n or '.old-' in n]


def test_sharded_export_loads_in_transformers(llama, tmp_path):
  model, src = llama
  config, params = load_hf(src)
  dst = tmp_path / 'sharded'
  save_hf(config, params, str(dst), max_shard_bytes=100_000)
  shards = sorted(n for n in os.listdir(dst) if n.endswith('.safetensors'))
  assert len(shards) > 2 and all(SHARD.fullmatch(n) for n in shards)
  assert {SHARD.fullmatch(n).group(2) for n in shards} == {f'{len(shards):05d}'}
  with open(dst / io.INDEX_FILE) as f:
    index = json.load(f)
  assert set(index['weight_map'].values()) == set(shards)
  assert_same_state(transformers.LlamaForCausalLM.from_pretrained(str(dst)), model)

  # read_tensors follows the index and knows which shard holds each tensor.
  tensors = io.read_tensors(str(dst))
  assert set(tensors.keys()) == set(model.state_dict())
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(tensors.get(key), value.numpy())
    assert tensors.where(key) == str(dst / index['weight_map'][key])


def test_bf16_round_trip_keeps_dtype(tmp_path):
  model = make_llama(tmp_path / 'bf16', torch.bfloat16)
  config, params = load_hf(str(tmp_path / 'bf16'))
  assert config.param_dtype == 'bfloat16'
  assert {str(a.dtype) for a in jax.tree.leaves(params)} == {'bfloat16'}
  save_hf(config, params, str(tmp_path / 'out'))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'out'), dtype='auto')
  assert_same_state(reloaded, model)


def failing_after_first_shard(monkeypatch):
  """Makes the second safetensors write fail, as a full disk would."""
  calls = []
  real = io.save_file

  def save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) > 1:
      raise OSError(28, 'No space left on device', path)
    real(tensors, path, metadata=metadata)

  monkeypatch.setattr(io, 'save_file', save)
  return calls


def test_failed_write_leaves_nothing(llama, tmp_path, monkeypatch):
  config, params = load_hf(llama[1])
  calls = failing_after_first_shard(monkeypatch)
  with pytest.raises(OSError, match='No space'):
    save_hf(config, params, str(tmp_path / 'out'), max_shard_bytes=100_000)
  assert len(calls) == 2
  assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_previous_folder(llama, tmp_path, monkeypatch):
  model, src = llama
  config, params = load_hf(src)
  dst = tmp_path / 'out'
  save_hf(config, params, str(dst))
  before = {n: (dst / n).read_bytes() for n in os.listdir(dst)}
  failing_after_first_shard(monkeypatch)
  with pytest.raises(OSError):
    save_hf(config, params, str(dst), max_shard_bytes=100_000, overwrite=True)
  assert {n: (dst / n).read_bytes() for n in os.listdir(dst)} == before
  assert leftovers(tmp_path) == []
  monkeypatch.undo()
  assert_same_state(transformers.LlamaForCausalLM.from_pretrained(str(dst)), model)


def test_refuses_existing_destination(llama, tmp_path):
  config, params = load_hf(llama[1])
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='overwrite'):
    save_hf(config, params, str(tmp_path / 'out'))
  assert (tmp_path / 'out' / 'notes.txt').read_text() == 'keep me'
  (tmp_path / 'empty').mkdir()  # an empty folder is no work to lose: it is replaced
  save_hf(config, params, str(tmp_path / 'empty'))
  assert (tmp_path / 'empty' / 'config.json').exists()


def variant(src, dst, change):
  """Copies the HF folder `src` to `dst` with its tensors edited by change(dict) in place."""
  shutil.copytree(src, dst)
  source = io.read_tensors(src)
  tensors = {k: source.get(k) for k in source.keys()}
  change(tensors)
  os.remove(os.path.join(dst, io.SINGLE_FILE))
  save_file(tensors, os.path.join(dst, io.SINGLE_FILE))
  return str(dst)


def test_error_without_config(tmp_path):
  with pytest.raises(ConversionError, match=re.escape(str(tmp_path / 'config.json'))):
    load_hf(str(tmp_path))


def test_error_invalid_json(llama, tmp_path):
  shutil.copytree(llama[1], tmp_path / 'm')
  (tmp_path / 'm' / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(ConversionError, match=re.escape(str(tmp_path / 'm' / 'config.json')) +
                     '.*not valid JSON'):
    load_hf(str(tmp_path / 'm'))


def test_error_unknown_model_type(llama, tmp_path):
  shutil.copytree(llama[1], tmp_path / 'm')
  path = tmp_path / 'm' / 'config.json'
  path.write_text(json.dumps({**json.loads(path.read_text()), 'model_type': 'mamba'}))
  with pytest.raises(ConversionError, match=re.escape(str(path)) + ".*unsupported.*'mamba'"):
    load_hf(str(tmp_path / 'm'))


def test_error_missing_tensor(llama, tmp_path):
  key = 'model.layers.1.mlp.up_proj.weight'
  path = variant(llama[1], tmp_path / 'm', lambda t: t.pop(key))
  with pytest.raises(ConversionError, match=re.escape(path) + f".*missing tensor '{key}'"):
    load_hf(path)


def test_error_misshaped_tensor(llama, tmp_path):
  key = 'model.layers.0.self_attn.k_proj.weight'

  def change(tensors):
    tensors[key] = tensors[key][:16]

  path = variant(llama[1], tmp_path / 'm', change)
  with pytest.raises(ConversionError, match=re.escape(os.path.join(path, io.SINGLE_FILE)) +
                     f".*'{re.escape(key)}' has shape \\(16, 64\\), expected \\(32, 64\\)"):
    load_hf(path)


def test_error_unexpected_tensor(llama, tmp_path):
  key = 'model.layers.0.mlp.extra_proj.weight'

  def change(tensors):
    tensors[key] = np.zeros((4, 4), np.float32)

  path = variant(llama[1], tmp_path / 'm', change)
  with pytest.raises(ConversionError, match=re.escape(os.path.join(path, io.SINGLE_FILE)) +
                     f".*'{re.escape(key)}' do not belong"):
    load_hf(path)


def test_error_index_lists_missing_shard(llama, tmp_path):
  config, params = load_hf(llama[1])
  dst = tmp_path / 'sharded'
  save_hf(config, params, str(dst), max_shard_bytes=100_000)
  shard = sorted(n for n in os.listdir(dst) if SHARD.fullmatch(n))[1]
  os.remove(dst / shard)
  with pytest.raises(ConversionError, match=re.escape(str(dst / io.INDEX_FILE)) +
                     f'.*lists {shard}, which does not exist'):
    load_hf(str(dst))
