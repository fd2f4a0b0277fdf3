"""Parity of our decoders with transformers (tiny random models, float32), and HF export."""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp

from rvlf_jax.hf import load_hf, save_hf
from rvlf_jax.models import decoder, lora
from rvlf_jax.models.layers import LoraConfig

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
GEMMA = dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)

# name -> (model class, config); sliding windows are shorter than the test sequences.
CASES = {
    'llama': (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**COMMON)),
    'llama3_rope': (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters=LLAMA3_ROPE)),
    'llama_tied_bias': (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    'qwen2': (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(**COMMON)),
    'qwen3': (transformers.Qwen3ForCausalLM, lambda: transformers.Qwen3Config(**COMMON,
                                                                               head_dim=16)),
    'gemma2': (transformers.Gemma2ForCausalLM, lambda: transformers.Gemma2Config(**COMMON,
                                                                                 **GEMMA)),
    'gemma3': (transformers.Gemma3ForCausalLM, lambda: transformers.Gemma3TextConfig(
        **COMMON, **GEMMA, sliding_window_pattern=2,
        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 4.0,
                                            'rope_theta': 1e6},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})),
}


def make_hf(name, path):
  """A tiny random HF model, its weights perturbed so that norms and biases are not trivial."""
  cls, make_config = CASES[name]
  torch.manual_seed(0)
  config = make_config()
  config._attn_implementation = 'eager'
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def padded_batch():
  torch.manual_seed(1)
  ids = torch.randint(0, 128, (3, 12))
  mask = torch.ones(3, 12, dtype=torch.long)
  mask[1, 8:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  return ids, mask


@pytest.fixture(scope='module', params=sorted(CASES))
def hf_case(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  model = make_hf(request.param, path)
  return request.param, model, path


@pytest.mark.parametrize('scan_layers', [True, False])
def test_layer_by_layer_parity_with_padding(hf_case, scan_layers):
  name, model, path = hf_case
  ids, mask = padded_batch()
  position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    ref = model(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
  config, params = load_hf(str(path), scan_layers=scan_layers)
  positions = decoder.positions_from_mask(jnp.asarray(mask.numpy()))
  model_jax = decoder.Decoder(config)
  out = model_jax.apply({'params': params}, jnp.asarray(ids.numpy()), positions_bt=positions,
                        return_hidden_states=True)
  valid = mask.numpy().astype(bool)
  # transformers' last hidden state is after the final norm; ours are all before it.
  ours = list(out.hidden_states)
  ours[-1] = model_jax.apply({'params': params}, ours[-1],
                             method=lambda m, x: m.final_norm(x))
  assert len(ours) == len(ref.hidden_states) == config.num_layers + 1
  for layer, (a, b) in enumerate(zip(ours, ref.hidden_states)):
    np.testing.assert_allclose(np.asarray(a)[valid], b.numpy()[valid], atol=1e-4,
                               err_msg=f'{name}: hidden state {layer}')
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=1e-4,
                             err_msg=f'{name}: logits')


def test_export_round_trip_bit_exact(hf_case, tmp_path):
  name, model, path = hf_case
  config, params = load_hf(str(path))
  save_hf(config, params, str(tmp_path / 'out'))
  reloaded = type(model).from_pretrained(str(tmp_path / 'out')).eval()
  original = model.state_dict()
  exported = reloaded.state_dict()
  assert set(original) == set(exported), name
  for key, value in original.items():
    assert exported[key].dtype == value.dtype, key
    assert torch.equal(exported[key], value), f'{name}: {key} differs after export'


def test_config_round_trip(hf_case):
  name, model, path = hf_case
  config, _ = load_hf(str(path))
  again = decoder.DecoderConfig.from_hf_config(config.to_hf_config())
  assert again == config, name
  hf_again = transformers.AutoConfig.for_model(**config.to_hf_config())
  assert getattr(hf_again, 'layer_types', None) == getattr(model.config, 'layer_types', None)
  assert hf_again.rope_parameters == model.config.rope_parameters


def test_lora_merged_export_matches_lora_forward(tmp_path):
  make_hf('qwen3', tmp_path / 'base')
  config, params = load_hf(str(tmp_path / 'base'))
  adapters = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'gate_proj'))
  fresh = decoder.init_params(config, jax.random.key(0), adapters)
  params = lora.add_adapters(params, fresh)
  # Trained adapters are non-zero; fresh ones have B = 0, so perturb B to make the test bite.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key == 'lora_b' else x, params)
  ids, mask = padded_batch()
  positions = decoder.positions_from_mask(jnp.asarray(mask.numpy()))
  lora_logits = decoder.Decoder(config, adapters).apply(
      {'params': params}, jnp.asarray(ids.numpy()), positions_bt=positions).logits
  save_hf(config, lora.merge(params, adapters), str(tmp_path / 'merged'))
  merged_model = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path / 'merged')).eval()
  with torch.no_grad():
    ref = merged_model(ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.numpy()
  valid = mask.numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(lora_logits)[valid], ref[valid], atol=1e-4)
  base_logits = decoder.Decoder(config).apply(
      {'params': lora.split(params)[1]}, jnp.asarray(ids.numpy()), positions_bt=positions).logits
  assert np.abs(np.asarray(base_logits) - np.asarray(lora_logits))[valid].max() > 1e-2


def test_save_refuses_unmerged_lora(tmp_path):
  config = decoder.DecoderConfig.tiny('llama')
  adapters = LoraConfig(rank=2)
  params = decoder.init_params(config, jax.random.key(0), adapters)
  with pytest.raises(ValueError, match='merge LoRA'):
    save_hf(config, params, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
