"""Decoder behaviour that needs no reference implementation: caching, LoRA, remat, bf16, configs."""

import flax.linen as nn
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rvlf_jax.models import decoder, lora
from rvlf_jax.models.decoder import Decoder, DecoderConfig
from rvlf_jax.models.layers import LoraConfig, RopeConfig

FAMILIES = ['llama', 'qwen2', 'qwen3', 'gemma2', 'gemma3']


def _decode_cached(model, params, prompt_embeds, prompt_pos, tokens, max_len):
  """Prefills embeddings, then feeds `tokens` one at a time; returns all logits."""
  b = prompt_embeds.shape[0]
  cache = decoder.init_cache(model.config, b, max_len)
  out = model.apply({'params': params}, embeds_btd=prompt_embeds, positions_bt=prompt_pos,
                    cache=cache)
  logits, cache = [out.logits], out.cache
  step = jax.jit(lambda p, t, pos, c: model.apply({'params': p}, t, positions_bt=pos, cache=c))
  next_pos = prompt_pos.max(axis=1, keepdims=True) + 1
  for i in range(tokens.shape[1]):
    out = step(params, tokens[:, i:i + 1], next_pos + i, cache)
    logits.append(out.logits)
    cache = out.cache
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('scan_layers', [True, False])
def test_cached_decoding_equals_full_forward(family, scan_layers):
  """32 tokens decoded one by one after a prefix of embeddings (sign tokens) + a padded prompt."""
  config = DecoderConfig.tiny(family, scan_layers=scan_layers)
  model = Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  b, n_prefix, n_prompt, n_new = 2, 5, 6, 32
  prefix = jax.random.normal(k1, (b, n_prefix, config.hidden_size))
  prompt = jax.random.randint(k2, (b, n_prompt), 0, config.vocab_size)
  new = jax.random.randint(k3, (b, n_new), 0, config.vocab_size)
  prompt_embeds = jnp.concatenate(
      [prefix, model.apply({'params': params}, prompt, method=Decoder.embed)], axis=1)
  valid = np.ones((b, n_prefix + n_prompt), bool)
  valid[1, :3] = False  # left padding in the second example
  prompt_pos = decoder.positions_from_mask(jnp.asarray(valid))

  cached = _decode_cached(model, params, prompt_embeds, prompt_pos, new, max_len=48)

  all_embeds = jnp.concatenate(
      [prompt_embeds, model.apply({'params': params}, new, method=Decoder.embed)], axis=1)
  all_pos = jnp.concatenate(
      [prompt_pos, prompt_pos.max(axis=1, keepdims=True) + 1 + jnp.arange(n_new)], axis=1)
  full = model.apply({'params': params}, embeds_btd=all_embeds, positions_bt=all_pos).logits
  keep = np.concatenate([valid, np.ones((b, n_new), bool)], axis=1)
  np.testing.assert_allclose(np.asarray(cached)[keep], np.asarray(full)[keep], atol=1e-5)


def test_sliding_window_limits_context():
  """With a window of 4, changing a token 4+ positions back does not change the output."""
  config = DecoderConfig.tiny('qwen2', layer_types=('sliding_attention',) * 2, sliding_window=4)
  model = Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, config.vocab_size)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)
  a = model.apply({'params': params}, tokens).logits
  b = model.apply({'params': params}, changed).logits
  # Two layers of window 4 see 2 * 3 = 6 positions back: position 7 onwards is unaffected.
  np.testing.assert_allclose(a[0, 7:], b[0, 7:], atol=1e-6)
  assert np.abs(a[0, 1:7] - b[0, 1:7]).max() > 1e-4


def test_padding_does_not_leak():
  config = DecoderConfig.tiny('gemma3')
  model = Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, config.vocab_size)
  pos = decoder.positions_from_mask(jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]]))
  a = model.apply({'params': params}, tokens, positions_bt=pos).logits
  b = model.apply({'params': params}, tokens.at[0, 6].set(3), positions_bt=pos).logits
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert np.all(np.isfinite(a))


@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_no_batch'])
def test_remat_keeps_values_and_gradients(remat):
  config = DecoderConfig.tiny('llama')
  params = decoder.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)

  def loss(p, cfg):
    return Decoder(cfg).apply({'params': p}, tokens).logits.mean()

  base_loss, base_grad = jax.value_and_grad(loss)(params, config)
  for scan in (True, False):
    cfg = config.replace(remat=remat, scan_layers=scan)
    p = params if scan else decoder.unrolled(Decoder(config), params)[1]
    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(p, cfg)
    np.testing.assert_allclose(value, base_loss, rtol=1e-6)
    if not scan:
      grad = _stack(grad, config.num_layers)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad)):
      np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('family', ['llama', 'gemma3'])
def test_unrolled_is_the_same_function(family):
  """Decoding loops unroll a scanned decoder: same logits and cache, prefilled and per token."""
  config = DecoderConfig.tiny(family)
  model = Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  looped, looped_params = decoder.unrolled(model, params)
  assert not looped.config.scan_layers
  assert sorted(looped_params['transformer']) == [f'layers_{i}' for i in range(config.num_layers)]
  assert decoder.unrolled(looped, looped_params)[0] is looped  # already looped: unchanged
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, config.vocab_size)
  outs = []
  for m, p in ((model, params), (looped, looped_params)):
    cache = decoder.init_cache(config, 2, 8)
    out = m.apply({'params': p}, tokens, cache=cache)
    step = m.apply({'params': p}, tokens[:, :1], positions_bt=jnp.full((2, 1), 6),
                   cache=out.cache)
    outs.append((out.logits, step.logits, step.cache['k'], step.cache['v']))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _stack(params, n):
  params = jax.tree.map(lambda x: x, params)
  layers = [params['transformer'].pop(f'layers_{i}') for i in range(n)]
  params['transformer']['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


@pytest.mark.parametrize('family', FAMILIES)
def test_bfloat16_forward(family):
  config = DecoderConfig.tiny(family, dtype='bfloat16', param_dtype='bfloat16')
  params = decoder.init_params(config, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
  logits = jax.jit(lambda p: Decoder(config).apply({'params': p}, tokens).logits)(params)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  f32 = DecoderConfig.tiny(family)
  ref = Decoder(f32).apply({'params': jax.tree.map(lambda x: x.astype(jnp.float32), params)},
                           tokens).logits
  assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1 * np.abs(ref).max() + 0.05


@pytest.mark.parametrize('scan_layers', [True, False])
def test_every_parameter_has_logical_axes(scan_layers):
  config = DecoderConfig.tiny('gemma3', tie_embeddings=False, scan_layers=scan_layers)
  boxed = decoder.abstract_params(config, LoraConfig(rank=2), boxed=True)
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)), leaves):
    assert len(spec) == len(leaf.value.shape) and all(name is not None for name in spec)
  q = boxed['transformer']['layers' if scan_layers else 'layers_0']['attn']['q_proj']['kernel']
  assert q.names == (('layers',) if scan_layers else ()) + ('embed', 'heads', 'head_dim')


def test_lora_trains_only_adapters():
  config = DecoderConfig.tiny('llama')
  adapters = LoraConfig(rank=2, targets=('q_proj', 'v_proj'))
  params = decoder.init_params(config, jax.random.key(0), adapters)
  mask = lora.trainable_mask(params)
  trainable = [k for k, v in jax.tree_util.tree_leaves_with_path(mask) if v]
  names = {jax.tree_util.keystr(k) for k in trainable}
  assert len(names) == 4 and all('lora_' in n and ('q_proj' in n or 'v_proj' in n) for n in names)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, config.vocab_size)
  adapter_params, base = lora.split(params)
  # Fresh adapters are an identity: B = 0.
  np.testing.assert_array_equal(
      Decoder(config, adapters).apply({'params': params}, tokens).logits,
      Decoder(config).apply({'params': base}, tokens).logits)
  grads = jax.grad(lambda a: Decoder(config, adapters).apply(
      {'params': lora.combine(a, base)}, tokens).logits.sum())(adapter_params)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads) if g.shape[-1] != 2)


PRESETS = {
    # name: parameter count of the released checkpoint (transformers' num_parameters()).
    'llama2_7b': 6_738_415_616,
    'llama3_8b': 8_030_261_248,
    'llama3_2_1b': 1_235_814_400,
    'qwen2_5_7b': 7_615_616_512,
    'qwen3_8b': 8_190_735_360,
    'qwen3_0_6b': 596_049_920,
    'gemma2_2b': 2_614_341_888,
    'gemma3_1b': 999_885_952,
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_presets_build_abstractly(name):
  config = getattr(DecoderConfig, name)()
  shapes = decoder.abstract_params(config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == config.num_params() == PRESETS[name]


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match='multiple of num_kv_heads'):
    DecoderConfig.tiny('llama', num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match='need sliding_window'):
    DecoderConfig.tiny('llama', layer_types=('sliding_attention', 'full_attention'))
  with pytest.raises(ValueError, match='Unsupported RoPE'):
    RopeConfig(kind='yarn')
  with pytest.raises(ValueError, match='cannot express'):
    DecoderConfig.tiny('llama', qk_norm=True).to_hf_config()
  with pytest.raises(ValueError, match='exactly one'):
    Decoder(DecoderConfig.tiny('llama')).init(jax.random.key(0))


def test_prefix_cache_needs_explicit_positions():
  config = DecoderConfig.tiny('llama')
  model = Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  tokens = jnp.ones((1, 4), jnp.int32)
  prefix = model.apply({'params': params}, tokens, cache=decoder.init_cache(config, 1, 4)).cache
  with pytest.raises(ValueError, match='pass positions_bt'):
    model.apply({'params': params}, tokens[:, :1], prefix_cache=prefix,
                cache=decoder.init_cache(config, 1, 2))
