"""The DINOv2 encoder on its own: interpolation against torch, configs, shapes, axis names, remat,
video frames and bfloat16. Parity with transformers is in tests/hf/test_dinov2.py."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rvlf_jax.models import vit

_PRESETS = [
    ('dinov2_small', 384, 12, 6, 0, False),
    ('dinov2_base', 768, 12, 12, 0, False),
    ('dinov2_large', 1024, 24, 16, 0, False),
    ('dinov2_giant', 1536, 40, 24, 0, True),
    ('dinov2_with_registers_small', 384, 12, 6, 4, False),
    ('dinov2_with_registers_base', 768, 12, 12, 4, False),
    ('dinov2_with_registers_large', 1024, 24, 16, 4, False),
    ('dinov2_with_registers_giant', 1536, 40, 24, 4, True),
]

_TINY_VARIANTS = {
    'gelu': vit.VitConfig.tiny(),
    'swiglu': vit.VitConfig.tiny(use_swiglu_ffn=True),
    'registers': vit.VitConfig.tiny(model_type='dinov2_with_registers', num_register_tokens=4),
    'no_bias_no_mask': vit.VitConfig.tiny(qkv_bias=False, use_mask_token=False),
}


def _pixels(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _init(config, seed=0):
  """The model and random float32 parameters, drawn with numpy from the abstract init.

  Spread wider than a fresh init (biases, mask and register tokens are not zero; norm and layer
  scales are around 1) so that every parameter matters. numpy, because compiling jax.random for
  every parameter takes seconds on CPU.
  """
  model = vit.VisionTransformer(config)
  size = config.image_size
  abstract = nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, size, size, config.num_channels)))['params'])
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    value = 0.2 * rng.randn(*leaf.shape).astype(np.float32)
    if "'scale'" in name or 'layer_scale' in name:
      value += 1.0
    return jnp.asarray(value)

  return model, jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize('antialias', [False, True])
def test_bicubic_matches_torch_interpolate(antialias):
  rng = np.random.RandomState(0)
  cases = [(4, 4, 5, 6), (4, 4, 2, 3), (4, 4, 6, 4), (5, 5, 37, 37), (16, 16, 11, 23),
           (37, 37, 5, 9), (3, 3, 1, 1), (1, 1, 3, 2), (6, 6, 6, 6), (2, 7, 9, 3)]
  for in_h, in_w, out_h, out_w in cases:
    x = rng.randn(in_h, in_w, 8).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(2, 0, 1)[None], size=(out_h, out_w), mode='bicubic',
        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    got = np.asarray(vit.resize_bicubic(jnp.asarray(x), out_h, out_w, antialias=antialias))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0,
                               err_msg=f'{(in_h, in_w)} -> {(out_h, out_w)}')


@pytest.mark.parametrize('antialias', [False, True])
def test_bicubic_matrix_is_exact_identity_at_same_size(antialias):
  np.testing.assert_array_equal(vit.bicubic_matrix(7, 7, antialias), np.eye(7, dtype=np.float32))


def test_bicubic_is_not_jax_image_resize():
  # The reason for our own interpolation: jax's cubic kernel (a = -0.5) differs from torch's.
  x = jnp.asarray(np.random.RandomState(0).randn(4, 4, 3).astype(np.float32))
  ours = vit.resize_bicubic(x, 7, 5)
  theirs = jax.image.resize(x, (7, 5, 3), 'bicubic')
  assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-3


@pytest.mark.parametrize('name,hidden,num_layers,heads,registers,swiglu', _PRESETS)
def test_presets(name, hidden, num_layers, heads, registers, swiglu):
  config = getattr(vit.VitConfig, name)()
  assert (config.image_size, config.patch_size, config.grid_size) == (518, 14, 37)
  assert (config.hidden_size, config.num_layers, config.num_heads) == (hidden, num_layers, heads)
  assert (config.num_register_tokens, config.use_swiglu_ffn) == (registers, swiglu)
  assert config.model_type == ('dinov2_with_registers' if registers else 'dinov2')
  # HF's giant has weights_in [8192, 1536]: F = 4096 after SwiGLU's 2/3 rounding.
  assert config.mlp_dim == (4096 if swiglu else 4 * hidden)
  assert vit.VitConfig.from_hf_config(config.to_hf_config()) == config


@pytest.mark.parametrize('variant', sorted(_TINY_VARIANTS))
def test_hf_config_round_trip_through_transformers(variant):
  config = _TINY_VARIANTS[variant]
  d = config.to_hf_config()
  assert vit.VitConfig.from_hf_config(d) == config
  # transformers' strict config classes accept every field and give them back unchanged.
  hf = transformers.AutoConfig.for_model(**d)
  assert type(hf).__name__ == d['architectures'][0].replace('Model', 'Config')
  assert vit.VitConfig.from_hf_config(hf.to_dict()) == config
  runtime = dict(dtype='bfloat16', param_dtype='bfloat16', scan_layers=False, remat='dots')
  assert vit.VitConfig.from_hf_config(d, **runtime) == dataclasses.replace(config, **runtime)


def test_config_validation():
  with pytest.raises(ValueError, match='dinov2_with_registers'):
    vit.VitConfig.tiny(num_register_tokens=4)
  with pytest.raises(ValueError, match='remat'):
    vit.VitConfig.tiny(remat='some')
  with pytest.raises(ValueError, match='num_heads'):
    vit.VitConfig.tiny(num_heads=5)
  with pytest.raises(ValueError, match='activation'):
    vit.VitConfig.tiny(hidden_act='nope')
  with pytest.raises(ValueError, match='square'):
    vit.VitConfig.from_hf_config({'model_type': 'dinov2', 'image_size': [28, 35]})


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('variant', ['swiglu', 'registers'])
def test_every_param_has_logical_axis_names(variant, scan):
  config = dataclasses.replace(_TINY_VARIANTS[variant], scan_layers=scan)
  model = vit.VisionTransformer(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    assert any(name is not None for name in leaf.names)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  layer_keys = [k for k in boxed if k.startswith('layers')]
  assert layer_keys == (['layers'] if scan else ['layers_0', 'layers_1'])
  if scan:
    for leaf in jax.tree.leaves(boxed['layers'], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      assert leaf.names[0] == 'layers' and leaf.value.shape[0] == config.num_layers


def test_outputs_shapes_and_hidden_states():
  config = _TINY_VARIANTS['registers']
  model, params = _init(config)
  # 37 x 45 pixels: a 5 x 6 patch grid, the remainder rows and columns dropped as by the conv.
  pixels = _pixels((2, 37, 45, 3))
  out = jax.jit(lambda p, x: model.apply({'params': p}, x, return_hidden_states=True))(
      params, pixels)
  s = 1 + 4 + 30
  assert out.last_hidden_state.shape == (2, s, 32)
  assert out.cls.shape == (2, 32) and out.patch_tokens.shape == (2, 30, 32)
  assert len(out.hidden_states) == config.num_layers + 1
  assert all(h.shape == (2, s, 32) for h in out.hidden_states)
  np.testing.assert_array_equal(out.cls, out.last_hidden_state[:, 0])
  np.testing.assert_array_equal(out.patch_tokens, out.last_hidden_state[:, 5:])
  cropped = jax.jit(lambda p, x: model.apply({'params': p}, x, return_hidden_states=True))(
      params, pixels[:, :35, :42])
  np.testing.assert_allclose(cropped.last_hidden_state, out.last_hidden_state, atol=1e-6)
  # Shape-only checks need no compilation.
  shapes = lambda x: jax.eval_shape(lambda p: model.apply({'params': p}, x), params)
  assert shapes(pixels).hidden_states is None
  with pytest.raises(ValueError, match='channels'):
    shapes(pixels[..., :2])
  with pytest.raises(ValueError, match='smaller than one'):
    shapes(pixels[:, :6])


def test_scan_and_unrolled_layers_agree():
  scanned = _TINY_VARIANTS['swiglu']
  model, params = _init(scanned)
  unrolled = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(scanned.num_layers):
    unrolled[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  pixels = _pixels((2, 35, 42, 3))
  unrolled_model = vit.VisionTransformer(dataclasses.replace(scanned, scan_layers=False))
  a = jax.jit(lambda p: model.apply({'params': p}, pixels, return_hidden_states=True))(params)
  b = jax.jit(lambda p: unrolled_model.apply({'params': p}, pixels, return_hidden_states=True))(
      unrolled)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_remat_keeps_values_and_gradients():
  base = _TINY_VARIANTS['gelu']
  _, params = _init(base)
  pixels = _pixels((2, 28, 28, 3))

  def value_and_grad(config, params, compile_it=True):
    model = vit.VisionTransformer(config)
    fn = jax.value_and_grad(
        lambda p: jnp.sum(model.apply({'params': p}, pixels).last_hidden_state ** 2))
    return jax.jit(fn)(params) if compile_it else jax.eval_shape(fn, params)

  v0, g0 = value_and_grad(base, params)
  for remat in ('full', 'dots'):
    v1, g1 = value_and_grad(dataclasses.replace(base, remat=remat), params)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
  # The other policy and the unrolled branch only change what is saved; tracing them is enough.
  for config in (dataclasses.replace(base, remat='dots_no_batch'),
                 dataclasses.replace(base, scan_layers=False, remat='full')):
    _, other = _init(config)
    _, grads = value_and_grad(config, other, compile_it=False)
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, other)


def test_encode_frames_equals_per_image_encoding():
  config = _TINY_VARIANTS['registers']
  model, params = _init(config)
  frames = _pixels((2, 3, 35, 42, 3))
  encode = jax.jit(lambda p, f: model.apply({'params': p}, f, return_hidden_states=True,
                                            method=vit.VisionTransformer.encode_frames))
  out = encode(params, frames)
  assert out.last_hidden_state.shape == (2, 3, 1 + 4 + 30, 32)
  assert out.cls.shape == (2, 3, 32) and out.patch_tokens.shape == (2, 3, 30, 32)
  single = jax.jit(lambda p, x: model.apply({'params': p}, x, return_hidden_states=True))
  for b in range(2):
    for t in range(3):
      ref = single(params, frames[b, t][None])
      for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(got[b, t], want[0], atol=1e-5)


def test_bfloat16_forward_is_finite_and_close_to_float32():
  config = _TINY_VARIANTS['registers']
  model, params = _init(config)
  pixels = _pixels((2, 35, 42, 3))
  ref = jax.jit(lambda p: model.apply({'params': p}, pixels).last_hidden_state)(params)
  bf16 = vit.VisionTransformer(dataclasses.replace(config, dtype='bfloat16',
                                                   param_dtype='bfloat16'))
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = jax.jit(lambda p, x: bf16.apply({'params': p}, x))(params16, pixels)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  got = out.last_hidden_state.astype(jnp.float32)
  assert bool(jnp.all(jnp.isfinite(got)))
  err = jnp.abs(got - ref)
  # LayerNorm outputs are O(1); bfloat16 keeps about 3 significant digits per op.
  assert float(jnp.mean(err)) < 0.05 and float(jnp.max(err)) < 0.5, (jnp.mean(err), jnp.max(err))
