"""DINOv2 against transformers on tiny random models built locally: hidden states layer by layer,
export back to a folder that `from_pretrained` reads bit for bit, and conversion errors."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from rvlf_jax.hf import api, convert, dinov2, io
from rvlf_jax.models import vit

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
             patch_size=7, attn_implementation='eager')

# name -> (HF config class, model class, extra config fields)
_KINDS = {
    'dinov2': (transformers.Dinov2Config, transformers.Dinov2Model, {}),
    'dinov2_swiglu': (transformers.Dinov2Config, transformers.Dinov2Model,
                      {'use_swiglu_ffn': True}),
    'dinov2_plain': (transformers.Dinov2Config, transformers.Dinov2Model,
                     {'qkv_bias': False, 'use_mask_token': False, 'layerscale_value': 0.5}),
    'registers': (transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel,
                  {}),
    'registers_swiglu': (transformers.Dinov2WithRegistersConfig,
                         transformers.Dinov2WithRegistersModel,
                         {'use_swiglu_ffn': True, 'num_register_tokens': 2}),
}


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """kind -> (eval-mode float32 torch model, folder written by save_pretrained), built once."""
  cache = {}

  def get(kind):
    if kind not in cache:
      config_cls, model_cls, extra = _KINDS[kind]
      torch.manual_seed(0)
      model = model_cls(config_cls(**_TINY, **extra)).eval()
      with torch.no_grad():
        # HF init leaves biases, mask and register tokens at zero and scales at one; spread
        # every tensor so that a parameter wired to the wrong place shows.
        for p in model.parameters():
          p.add_(0.2 * torch.randn_like(p))
      path = str(tmp_path_factory.mktemp(kind))
      model.save_pretrained(path)
      cache[kind] = (model, path)
    return cache[kind]

  return get


def _load(path, **overrides):
  config = vit.VitConfig.from_hf_config(io.read_config(path), **overrides)
  params = convert.hf_to_params(dinov2.table(config), io.read_tensors(path),
                                dinov2.abstract_params(config), config.num_layers)
  return config, params


def _pixels(height, width, seed=0):
  return np.random.RandomState(seed).randn(2, 3, height, width).astype(np.float32)


_PARITY = [
    ('dinov2', True, (28, 28)),
    ('dinov2', True, (35, 42)),
    ('dinov2', False, (35, 42)),
    ('dinov2', True, (37, 45)),
    ('dinov2_swiglu', True, (35, 42)),
    ('dinov2_swiglu', False, (28, 28)),
    ('dinov2_plain', False, (42, 35)),
    ('registers', True, (28, 28)),
    ('registers', True, (35, 42)),
    ('registers', False, (35, 42)),
    ('registers', True, (14, 21)),
    ('registers_swiglu', False, (49, 42)),
]


@pytest.mark.parametrize('kind,scan,size', _PARITY, ids=[
    f"{k}-{'scan' if s else 'unrolled'}-{h}x{w}" for k, s, (h, w) in _PARITY])
def test_hidden_states_match_transformers(hf_model, kind, scan, size):
  reference, path = hf_model(kind)
  config, params = _load(path, scan_layers=scan)
  pixels = _pixels(*size)
  with torch.no_grad():
    want = reference(torch.from_numpy(pixels), output_hidden_states=True)
  model = vit.VisionTransformer(config)
  got = jax.jit(lambda p, x: model.apply({'params': p}, x, return_hidden_states=True))(
      params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert len(got.hidden_states) == len(want.hidden_states) == config.num_layers + 1
  for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
    np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0, err_msg=f'hidden state {i}')
  np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state.numpy(), atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(got.cls, want.pooler_output.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got.patch_tokens,
                             want.last_hidden_state[:, 1 + config.num_register_tokens:].numpy(),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind,scan', [('dinov2', True), ('dinov2_swiglu', False),
                                       ('dinov2_plain', True), ('registers', False),
                                       ('registers_swiglu', True)])
def test_export_round_trip_is_bit_exact(hf_model, tmp_path, kind, scan):
  original, path = hf_model(kind)
  config, params = _load(path, scan_layers=scan)
  tensors = convert.params_to_hf(dinov2.table(config), jax.device_get(params), config.num_layers)
  out = str(tmp_path / 'export')
  io.write_folder(out, config.to_hf_config(), tensors)

  # The files hold the same tensors under the same names (fused SwiGLU weights included).
  written, source = load_file(os.path.join(out, io.SINGLE_FILE)), load_file(
      os.path.join(path, io.SINGLE_FILE))
  assert sorted(written) == sorted(source)
  for key in source:
    assert written[key].dtype == source[key].dtype, key
    assert np.array_equal(written[key], source[key]), key

  reloaded, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert type(reloaded) is type(original)
  assert not any(info.values()), info
  for field in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'mlp_ratio',
                'image_size', 'patch_size', 'use_swiglu_ffn', 'qkv_bias', 'layerscale_value',
                'layer_norm_eps', 'hidden_act'):
    assert getattr(reloaded.config, field) == getattr(original.config, field), field
  want, got = original.state_dict(), reloaded.state_dict()
  assert sorted(got) == sorted(want)
  for key, tensor in want.items():
    assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize('kind', ['dinov2_swiglu', 'registers'])
def test_load_hf_and_save_hf(hf_model, tmp_path, kind):
  original, path = hf_model(kind)
  config, params = api.load_hf(path, scan_layers=False)
  assert isinstance(config, vit.VitConfig) and not config.scan_layers
  _, direct = _load(path, scan_layers=False)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, direct))
  # Sharded on the way out (every tensor is over 100 bytes), read back by transformers.
  out = str(tmp_path / 'export')
  api.save_hf(config, params, out, max_shard_bytes=100)
  assert os.path.exists(os.path.join(out, io.INDEX_FILE))
  reloaded = transformers.AutoModel.from_pretrained(out)
  assert type(reloaded) is type(original)
  want, got = original.state_dict(), reloaded.state_dict()
  assert sorted(got) == sorted(want)
  assert all(torch.equal(got[k], want[k]) for k in want)
  again_config, again = api.load_hf(out, scan_layers=False)
  assert again_config == config
  assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
  with pytest.raises(convert.ConversionError, match='cannot build'):
    api.load_hf(path, no_such_field=1)


def test_save_hf_in_bfloat16(hf_model, tmp_path):
  original, path = hf_model('registers_swiglu')
  config, params = api.load_hf(path)
  params16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  api.save_hf(config, params16, str(tmp_path / 'bf16'))
  reloaded = transformers.AutoModel.from_pretrained(str(tmp_path / 'bf16'))
  for key, tensor in original.state_dict().items():
    got = reloaded.state_dict()[key]
    assert got.dtype == torch.bfloat16 and torch.equal(got, tensor.to(torch.bfloat16)), key


def test_abstract_params_are_unboxed_shapes_of_the_loaded_params(hf_model):
  _, path = hf_model('registers_swiglu')
  config, params = _load(path)
  abstract = dinov2.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, params)
  assert params['register_tokens'].shape == (2, 32)
  assert params['layers']['mlp']['weights_in']['kernel'].shape == (2, 32, 2, 88)
  assert dinov2.FAMILIES[0].model_types == ('dinov2', 'dinov2_with_registers')


def _rewrite(src, dst, edit):
  """Copies an HF folder, applying edit(tensors) to its safetensors file."""
  shutil.copytree(src, dst)
  file = os.path.join(dst, io.SINGLE_FILE)
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={'format': 'pt'})
  return file


def test_misshaped_tensor_names_file_and_tensor(hf_model, tmp_path):
  _, path = hf_model('dinov2')
  key = 'encoder.layer.1.mlp.fc1.weight'
  file = _rewrite(path, str(tmp_path / 'bad'), lambda t: t.update({key: t[key][:, :31].copy()}))
  with pytest.raises(convert.ConversionError) as e:
    _load(str(tmp_path / 'bad'))
  assert file in str(e.value) and repr(key) in str(e.value) and '(128, 31)' in str(e.value)


def test_missing_tensor_names_folder_and_tensor(hf_model, tmp_path):
  _, path = hf_model('registers')
  key = 'embeddings.register_tokens'
  _rewrite(path, str(tmp_path / 'bad'), lambda t: t.pop(key))
  with pytest.raises(convert.ConversionError) as e:
    _load(str(tmp_path / 'bad'))
  assert str(tmp_path / 'bad') in str(e.value) and repr(key) in str(e.value)


def test_tensor_without_parameter_is_an_error(hf_model):
  # Registers checkpoint read with a plain dinov2 config: the register tokens are left over.
  _, path = hf_model('registers')
  with pytest.raises(convert.ConversionError, match='register_tokens'):
    _load(path, model_type='dinov2', num_register_tokens=0)
