"""Orbax checkpoints with their architecture: layout-free round trips, dtypes, atomicity, errors."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rvlf_jax.hf import ConversionError, api, checkpoint, dinov2
from rvlf_jax.models import decoder, vit


def random_params(abstract, seed=0):
  """Random numpy parameters shaped like `abstract` (cheaper than compiling the model's init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    b = np.asarray(b)
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def gemma_bf16(tmp_path_factory):
  """A bf16 scanned tiny Gemma 3 and its checkpoint folder."""
  config = decoder.DecoderConfig.tiny('gemma3', param_dtype='bfloat16')
  params = random_params(decoder.abstract_params(config))
  path = str(tmp_path_factory.mktemp('ckpt') / 'gemma')
  checkpoint.save_checkpoint(config, params, path)
  return config, params, path


def test_round_trip_keeps_config_and_bf16(gemma_bf16):
  config, params, path = gemma_bf16
  assert sorted(os.listdir(path)) == [checkpoint.CONFIG_FILE, checkpoint.PARAMS_DIR]
  restored_config, restored = checkpoint.load_checkpoint(path)
  assert restored_config == config
  assert_trees_equal(restored, params)


def test_restore_into_looped_layers(gemma_bf16):
  config, params, path = gemma_bf16
  looped_config, looped = checkpoint.load_checkpoint(path, scan_layers=False)
  assert looped_config == config.replace(scan_layers=False)
  stacked = params['transformer']['layers']
  for i in range(config.num_layers):
    assert_trees_equal(looped['transformer'][f'layers_{i}'], jax.tree.map(lambda a: a[i], stacked))
  # And back: a checkpoint saved from looped layers restores into scanned ones.
  path2 = os.path.join(os.path.dirname(path), 'looped')
  checkpoint.save_checkpoint(looped_config, looped, path2)
  assert_trees_equal(checkpoint.load_checkpoint(path2)[1], params)


def test_float32_params_of_a_bf16_config_stay_float32(tmp_path):
  config = decoder.DecoderConfig.tiny('llama', param_dtype='bfloat16')
  params = random_params(decoder.abstract_params(config.replace(param_dtype='float32')))
  checkpoint.save_checkpoint(config, params, str(tmp_path / 'c'))
  restored_config, restored = checkpoint.load_checkpoint(str(tmp_path / 'c'))
  assert restored_config.param_dtype == 'float32'
  assert_trees_equal(restored, params)


def test_dinov2_round_trip(tmp_path):
  config = vit.VitConfig.tiny(model_type='dinov2_with_registers', num_register_tokens=2,
                              use_swiglu_ffn=True, param_dtype='bfloat16')
  params = random_params(dinov2.abstract_params(config))
  checkpoint.save_checkpoint(config, params, str(tmp_path / 'vit'))
  restored_config, restored = checkpoint.load_checkpoint(str(tmp_path / 'vit'), scan_layers=False)
  assert restored_config == dataclasses.replace(config, scan_layers=False)
  assert restored_config.param_dtype == 'bfloat16'
  assert_trees_equal(restored['layers_1'], jax.tree.map(lambda a: a[1], params['layers']))
  assert_trees_equal(restored['cls_token'], params['cls_token'])


def test_destination_rules(gemma_bf16, tmp_path):
  config, params, _ = gemma_bf16
  dst = tmp_path / 'out'
  dst.mkdir()  # An empty folder may be written into.
  checkpoint.save_checkpoint(config, params, str(dst))
  with pytest.raises(FileExistsError, match=re.escape(str(dst)) + '.*overwrite=True'):
    checkpoint.save_checkpoint(config, params, str(dst))
  other = random_params(decoder.abstract_params(config), seed=7)
  checkpoint.save_checkpoint(config, other, str(dst), overwrite=True)
  assert_trees_equal(checkpoint.load_checkpoint(str(dst))[1], other)
  assert os.listdir(tmp_path) == ['out']


def test_failed_save_leaves_nothing_and_keeps_previous(gemma_bf16, tmp_path, monkeypatch):
  config, params, _ = gemma_bf16
  dst = tmp_path / 'out'
  checkpoint.save_checkpoint(config, params, str(dst))

  def fail(self, directory, *args, **kwargs):
    os.makedirs(directory)  # Partly written, then the disk fills up.
    raise OSError(28, 'No space left on device', str(directory))

  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'save', fail)
  with pytest.raises(OSError, match='No space'):
    checkpoint.save_checkpoint(config, params, str(tmp_path / 'new'))
  with pytest.raises(OSError, match='No space'):
    checkpoint.save_checkpoint(config, params, str(dst), overwrite=True)
  assert os.listdir(tmp_path) == ['out']
  monkeypatch.undo()
  assert_trees_equal(checkpoint.load_checkpoint(str(dst))[1], params)


def test_load_errors_name_the_path(gemma_bf16, tmp_path):
  _, _, path = gemma_bf16
  with pytest.raises(ConversionError, match=re.escape(str(tmp_path / 'nope')) + ': not a folder'):
    checkpoint.load_checkpoint(str(tmp_path / 'nope'))
  config_path = str(tmp_path / checkpoint.CONFIG_FILE)
  with pytest.raises(ConversionError, match=re.escape(config_path) + ': missing'):
    checkpoint.load_checkpoint(str(tmp_path))
  (tmp_path / checkpoint.CONFIG_FILE).write_text('{"model_type": ')
  with pytest.raises(ConversionError, match=re.escape(config_path) + ': not valid JSON'):
    checkpoint.load_checkpoint(str(tmp_path))
  (tmp_path / checkpoint.CONFIG_FILE).write_text('{"model_type": "mamba"}')
  with pytest.raises(ConversionError, match=re.escape(config_path) + ".*'mamba'"):
    checkpoint.load_checkpoint(str(tmp_path))
  with open(os.path.join(path, checkpoint.CONFIG_FILE)) as f:
    (tmp_path / checkpoint.CONFIG_FILE).write_text(f.read())
  params_dir = str(tmp_path / checkpoint.PARAMS_DIR)
  with pytest.raises(ConversionError, match=re.escape(params_dir) + ': missing'):
    checkpoint.load_checkpoint(str(tmp_path))
  os.mkdir(params_dir)
  with pytest.raises(ConversionError, match=re.escape(params_dir) + ': not an orbax checkpoint'):
    checkpoint.load_checkpoint(str(tmp_path))


def write_tensors(path, hf_config, tensors):
  os.makedirs(path)
  with open(os.path.join(path, checkpoint.CONFIG_FILE), 'w') as f:
    json.dump(hf_config, f)
  with ocp.PyTreeCheckpointer() as c:
    c.save(os.path.join(path, checkpoint.PARAMS_DIR), args=ocp.args.PyTreeSave(tensors))


def test_tensor_errors_name_tensor(gemma_bf16, tmp_path):
  config, params, _ = gemma_bf16
  hf_config, tensors = api.hf_tensors(config, params)
  key = 'model.layers.1.self_attn.q_proj.weight'
  cases = {
      'missing': ({k: v for k, v in tensors.items() if k != key}, f"missing tensor '{key}'"),
      'misshaped': ({**tensors, key: tensors[key][:8]}, f"'{key}' has shape \\(8, 64\\)"),
      'extra': ({**tensors, 'model.extra.weight': np.ones(3, np.float32)},
                "'model.extra.weight' do not belong"),
  }
  for name, (broken, message) in cases.items():
    path = str(tmp_path / name)
    write_tensors(path, hf_config, broken)
    params_dir = re.escape(os.path.join(path, checkpoint.PARAMS_DIR))
    with pytest.raises(ConversionError, match=params_dir + '.*' + message):
      checkpoint.load_checkpoint(path)


@pytest.mark.parametrize('text, expected', [
    ('1000', 1000), (1000, 1000), ('5GB', 5 * 10**9), ('500MB', 500 * 10**6), ('2GiB', 2 * 2**30),
    ('1.5kb', 1500), ('64 KiB', 65536), ('7b', 7)])
def test_parse_size(text, expected):
  assert checkpoint.parse_size(text) == expected


@pytest.mark.parametrize('text', ['', 'GB', '5 GBs', '-1', '5XB'])
def test_parse_size_rejects(text):
  with pytest.raises(ValueError, match=re.escape(repr(text))):
    checkpoint.parse_size(text)
