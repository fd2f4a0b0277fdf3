"""The real-dataset recipes: configs/phoenix2014t.py, csl_daily.py, how2sign.py and openasl.py.

They are never trained here, so these tests are all the checking they get: each config passes
`build.check` for a 64-device run, builds exactly the presets it names, and every model of the
three stages traces at its real size under `jax.eval_shape`. Nothing real-sized is allocated (a
float32 Qwen3-8B is 33 GB): parameters are `jax.ShapeDtypeStruct`s and the batches too.
Parameter counts are compared with formulas written out below from each architecture, and with
the sizes the model cards publish, so a preset or a module that drifts from the real model fails
here rather than at checkpoint loading.
"""

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import csl_daily, how2sign, openasl, phoenix2014t, synthsign
from rvlf_jax.models import slt, vit
from rvlf_jax.models.decoder import DecoderConfig
from rvlf_jax.models.fusion import SignEncoderConfig
from rvlf_jax.models.layers import LoraConfig
from rvlf_jax.models.skeleton import EncoderConfig, SkeletonConfig
from rvlf_jax.recipe import build
from rvlf_jax.recipe import data as data_lib

NUM_DEVICES = 64
CONFIGS = {
    'phoenix2014t': phoenix2014t,
    'csl_daily': csl_daily,
    'how2sign': how2sign,
    'openasl': openasl,
}
# name: (data.dataset, data.lang, decoder preset, DINOv2 preset).
EXPECTED = {
    'phoenix2014t': ('phoenix', 'de', 'qwen3_8b', 'dinov2_base'),
    'csl_daily': ('csl_daily', 'zh', 'gemma3_4b', 'dinov2_base'),
    'how2sign': ('how2sign', 'en', 'llama3_2_3b', 'dinov2_large'),
    'openasl': ('openasl', 'en', 'qwen3_8b', 'dinov2_large'),
}
# Published sizes: (total, non-embedding or None), from the model cards. Gemma 3 4B's 4.3B
# includes its ~0.42B SigLIP image encoder, which the text decoder leaves out.
PUBLISHED_DECODER = {
    'qwen3_8b': (8.2e9, 6.95e9),
    'llama3_2_3b': (3.21e9, None),
    'gemma3_4b': (4.3e9 - 0.42e9, None),
}
# facebook/dinov2-base and facebook/dinov2-large as transformers counts them (Dinov2Model).
PUBLISHED_VIT = {'dinov2_base': 86_580_480, 'dinov2_large': 304_368_640}
# Keys the real configs add to configs/synthsign.py's (none: every config has the same keys).
EXTRA_KEYS = set()
# An instruction of realistic length around the sign tokens (chat markers + a sentence).
PROMPT_BEFORE, PROMPT_AFTER = 24, 8

names = pytest.mark.parametrize('name', sorted(CONFIGS))


def get(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return CONFIGS[name].get_config(arg)


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= flat_keys(value, f'{prefix}{key}.')
    else:
      keys.add(prefix + key)
  return keys


def assert_abstract(tree) -> None:
  """Every leaf is a shape, not an array: nothing was allocated."""
  leaves = jax.tree.leaves(tree)
  assert leaves
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


# -- Parameter counts from the architectures ----------------------------------------------------


def decoder_counts(cfg: DecoderConfig) -> tuple[int, int]:
  """(total, non-embedding) parameters of a decoder, tied embeddings counted once."""
  d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  q_o = 2 * d * n * h + cfg.attention_bias * n * h + cfg.o_bias * d
  k_v = 2 * (d * k * h + cfg.attention_bias * k * h)
  qk_norm = 2 * h if cfg.qk_norm else 0
  mlp = 3 * d * f + cfg.mlp_bias * (2 * f + d)
  norms = (4 if cfg.sandwich_norm else 2) * d
  body = cfg.num_layers * (q_o + k_v + qk_norm + mlp + norms) + d  # + the final norm
  embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return body + embeddings, body


def lora_count(cfg: DecoderConfig, lora: LoraConfig) -> int:
  """A [in, R] and a [R, out] matrix per adapted projection and layer."""
  d, f, q, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
                 cfg.num_kv_heads * cfg.head_dim)
  sizes = {'q_proj': (d, q), 'k_proj': (d, kv), 'v_proj': (d, kv), 'o_proj': (q, d),
           'gate_proj': (d, f), 'up_proj': (d, f), 'down_proj': (f, d)}
  return cfg.num_layers * sum(lora.rank * sum(sizes[t]) for t in lora.targets)


def vit_count(cfg: vit.VitConfig) -> int:
  """DINOv2: patch conv, CLS + mask tokens, (1 + G^2) positions, L layers, final LayerNorm."""
  d, f, p = cfg.hidden_size, cfg.mlp_dim, cfg.patch_size
  embed = p * p * cfg.num_channels * d + d + 2 * d + (1 + cfg.grid_size**2) * d
  # Two LayerNorms, q/k/v/o with biases, two layer scales, fc1/fc2 with biases.
  layer = 2 * 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
  return embed + cfg.num_layers * layer + 2 * d


def text_encoder_count(cfg: EncoderConfig) -> int:
  """skeleton.TransformerEncoder: per layer q/k/v/o (no biases), a SwiGLU MLP, two RMSNorms."""
  d, f = cfg.d_model, cfg.mlp_dim
  return cfg.num_layers * (4 * d * d + 3 * d * f + 2 * d)


# -- Models at real size, traced once per config ------------------------------------------------


class Built(NamedTuple):
  """A config's models at real size, with their parameters as shapes."""

  config: ml_collections.ConfigDict
  decoder: DecoderConfig
  lora: LoraConfig
  translator: slt.SLTModel
  translator_params: Any
  aligner: slt.SignTextAligner
  aligner_params: Any


@functools.cache
def built(name: str) -> Built:
  """Traced once per config and shared by the tests below (each trace takes a second or two)."""
  config = get(name)
  decoder = build.decoder_config(config, None)
  lora = build.lora_config(config)
  width = build.visual_dim(config)
  translator = slt.SLTModel(build.slt_config(config, decoder, width, lora))
  aligner = slt.SignTextAligner(build.aligner_config(config, decoder, width))
  return Built(config, decoder, lora, translator, translator.abstract_params(), aligner,
               aligner.abstract_params())


def abstract_batch(sign: SignEncoderConfig, batch_size: int, frames: int, text_len: int):
  """The pipeline's batch format at a given size, as shapes (a one-row batch, widened)."""
  row = slt.dummy_batch(sign, batch_size=1, frames=frames, text_len=text_len)
  return {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype) for k, v in row.items()}


# -- The configs --------------------------------------------------------------------------------


@names
def test_check_passes_on_64_devices(name):
  config = get(name)
  build.check(config, stages=build.STAGES, num_devices=NUM_DEVICES)
  sizes = build.mesh_shape(config, NUM_DEVICES)
  assert sizes['fsdp'] > 1 and math.prod(sizes.values()) == NUM_DEVICES


@names
@pytest.mark.parametrize('ablation', ['skeleton_only', 'visual_only'])
def test_ablations_pass_check(name, ablation):
  config = get(name, ablation)
  build.check(config, stages=build.STAGES, num_devices=NUM_DEVICES)
  fuse = build.sign_config(config).fusion
  assert (fuse.skeleton_only, fuse.visual_only) == (ablation == 'skeleton_only',
                                                   ablation == 'visual_only')


@names
def test_only_ablations_are_arguments(name):
  with pytest.raises(ValueError, match='ablation'):
    get(name, 'tiny')  # synthsign's tiny variant would shrink a real-size recipe


@names
def test_keys_are_synthsigns(name):
  """The launcher reads the same keys whatever the experiment; only the documented extras."""
  assert flat_keys(get(name)) == flat_keys(synthsign.get_config()) | EXTRA_KEYS


@names
def test_settings(name):
  config = get(name)
  dataset, lang, _, _ = EXPECTED[name]
  assert (config.data.dataset, config.data.lang) == (dataset, lang)
  assert config.data.root == '' and '{id}' in config.data.pose_pattern
  assert config.data.annotations and len(config.data.splits) == 3
  assert bool(config.data.split_file) == (dataset == 'csl_daily')
  assert max(config.data.frame_buckets) >= 256
  assert 64 <= max(config.data.token_buckets) <= 128
  assert config.tokenizer.kind == 'hf'
  assert config.tokenizer.vocab_size == build.decoder_config(config, None).vocab_size
  assert config.sft.lora and config.model.decoder.hf_path == ''
  assert (config.eval.decode, config.eval.beam_size) == ('beam', 5)
  assert config.eval.max_new_tokens == config.grpo.max_new_tokens == max(
      config.data.token_buckets)
  for stage in build.STAGES:
    assert config[stage].steps >= 500 and config[stage].batch_size >= 32, stage


@names
def test_decoder_is_the_preset(name):
  config = get(name)
  preset = EXPECTED[name][2]
  decoder = build.decoder_config(config, None)
  assert decoder == getattr(DecoderConfig, preset)()
  # The sizes written in the config for the reader are the preset's.
  for key in ('family', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
              'num_kv_heads', 'head_dim', 'max_position_embeddings'):
    assert config.model.decoder[key] == getattr(decoder, key), key
  total, body = decoder_counts(decoder)
  assert total == decoder.num_params()
  published_total, published_body = PUBLISHED_DECODER[preset]
  assert total == pytest.approx(published_total, rel=0.01)
  if published_body is not None:
    assert body == pytest.approx(published_body, rel=0.01)


@names
def test_sign_encoder_is_base(name):
  config = get(name)
  width = build.vit_config(config).hidden_size * len(config.visual.feature_keys)
  base = SignEncoderConfig.base(visual_dim=width, dtype='bfloat16')
  assert build.sign_config(config) == base.replace(
      skeleton=SkeletonConfig.base(dtype='bfloat16'))


@names
def test_dinov2_has_the_published_size(name):
  config = get(name)
  preset = EXPECTED[name][3]
  cfg = build.vit_config(config)
  assert cfg == getattr(vit.VitConfig, preset)()
  for key in ('patch_size', 'hidden_size', 'num_layers', 'num_heads'):
    assert config.visual[key] == getattr(cfg, key), key
  model = vit.VisionTransformer(cfg)
  side = config.visual.image_size
  pixels = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
  params = nn.meta.unbox(
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x), pixels)['params'])
  assert_abstract(params)
  assert count(params) == vit_count(cfg) == PUBLISHED_VIT[preset]
  # Frames at visual.image_size: each pooled feature is D wide, so the cached features are as
  # wide as the fusion expects.
  out = jax.eval_shape(lambda p, x: model.apply({'params': p}, x), params, pixels)
  assert out.cls.shape == (2, cfg.hidden_size)
  assert out.patch_tokens.shape == (2, (side // cfg.patch_size)**2, cfg.hidden_size)
  assert (cfg.hidden_size * len(config.visual.feature_keys)
          == build.sign_config(config).fusion.visual_dim)


# -- The models at real size --------------------------------------------------------------------


@names
def test_translator_params(name):
  m = built(name)
  params = m.translator_params
  assert_abstract(params)
  assert set(params) == {'sign_encoder', 'projector', 'decoder'}
  total, _ = decoder_counts(m.decoder)
  assert count(params['decoder']) == total + lora_count(m.decoder, m.lora)
  d_sign, d_llm = m.translator.config.sign.d_model, m.decoder.hidden_size
  assert count(params['projector']) == d_sign * d_llm + d_llm + d_llm * d_llm + d_llm
  assert 20e6 < count(params['sign_encoder']) < 40e6  # SkeletonConfig.base() alone is ~17M
  assert params['decoder']['embedder']['embedding'].shape == (m.decoder.vocab_size, d_llm)


@names
def test_aligner_params(name):
  m = built(name)
  params, cfg = m.aligner_params, m.aligner.config
  assert_abstract(params)
  # Stage 2 starts from stage 1's sign encoder: the same tree, leaf for leaf.
  same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                      params['sign_encoder'], m.translator_params['sign_encoder'])
  assert all(jax.tree.leaves(same))
  layers = m.config.represent.caption_layers
  # A 512-wide captioner of the LLM's vocabulary with tied embeddings and 64-wide heads.
  width = m.config.represent.caption_width
  assert width == 512
  caption = m.decoder.replace(
      num_layers=layers, hidden_size=width, intermediate_size=3 * width, num_heads=width // 64,
      num_kv_heads=width // 64, head_dim=64, tie_embeddings=True, remat='none',
      layer_types=None if m.decoder.layer_types is None else m.decoder.layer_types[:layers])
  assert cfg.caption == caption.replace(scan_layers=False)
  text, d_sign, e, h = cfg.text, cfg.sign.d_model, cfg.embed_dim, caption.hidden_size
  assert text.num_layers == m.config.represent.text_layers
  assert e == m.config.represent.embed_dim
  expected = {
      'sign_encoder': count(m.translator_params['sign_encoder']),
      'text_embed': m.decoder.vocab_size * text.d_model,
      'text_encoder': text_encoder_count(text),
      'text_norm': text.d_model,
      'sign_head': d_sign * e,
      'text_head': text.d_model * e,
      'logit_scale': 1,
      'caption_proj': d_sign * h + h,
      'caption_start': h,
      'caption_decoder': decoder_counts(caption)[0],
  }
  assert {k: count(v) for k, v in params.items()} == expected


@names
def test_sft_loss_traces_at_the_largest_bucket(name):
  m = built(name)
  config, decoder = m.config, m.decoder
  frames, text_len = max(config.data.frame_buckets), max(config.data.token_buckets)
  b = config.sft.batch_size
  batch = abstract_batch(m.translator.config.sign, b, frames, text_len)
  prompt = slt.Prompt(jax.ShapeDtypeStruct((PROMPT_BEFORE,), jnp.int32),
                      jax.ShapeDtypeStruct((PROMPT_AFTER,), jnp.int32))
  loss, metrics = jax.eval_shape(m.translator.loss, m.translator_params, batch, prompt,
                                 jax.random.key(0))
  assert loss.shape == () and loss.dtype == jnp.float32
  assert set(metrics) == {'loss', 'accuracy', 'num_tokens'}
  embeds, positions = jax.eval_shape(m.translator.prefill, m.translator_params, batch, prompt)
  prefix = PROMPT_BEFORE + m.translator.config.sign.num_tokens(frames) + PROMPT_AFTER
  assert embeds.shape == (b, prefix, decoder.hidden_size)
  assert positions.shape == (b, prefix)
  assert prefix + config.eval.max_new_tokens <= decoder.max_position_embeddings


@names
def test_represent_loss_traces_at_the_largest_bucket(name):
  m = built(name)
  config = m.config
  batch = abstract_batch(m.aligner.config.sign, config.represent.batch_size,
                         max(config.data.frame_buckets), max(config.data.token_buckets))
  loss, metrics = jax.eval_shape(m.aligner.loss, m.aligner_params, batch, jax.random.key(0))
  assert loss.shape == ()
  assert {'contrastive_loss', 'caption_loss'} <= set(metrics)


# -- Bad values name their key ------------------------------------------------------------------


@names
def test_unknown_presets_name_their_key(name):
  config = get(name)
  config.model.decoder.preset = 'qwen9_800b'
  with pytest.raises(build.ConfigError, match=r'model\.decoder\.preset'):
    build.decoder_config(config, None)
  config = get(name)
  config.visual.preset = 'dinov2_huge'
  with pytest.raises(build.ConfigError, match=r'visual\.preset'):
    build.vit_config(config)


@names
def test_mesh_must_divide_the_devices(name):
  # FSDP is 4 or 8 ways in these configs; 6 devices hold neither.
  with pytest.raises(build.ConfigError, match=r'mesh.*does not divide the 6 devices'):
    build.check(get(name), stages=build.STAGES, num_devices=6)


@names
def test_batch_must_divide_over_the_mesh(name):
  config = get(name)
  config.sft.batch_size = 48
  with pytest.raises(build.ConfigError, match=r'sft\.batch_size=48'):
    build.check(config, stages=build.STAGES, num_devices=NUM_DEVICES)


@names
def test_unknown_sign_encoder_key_is_named(name):
  config = get(name)
  config.model.skeleton.part_width = 128
  with pytest.raises(build.ConfigError, match=r'model\.skeleton.*part_width'):
    build.check(config, stages=build.STAGES, num_devices=NUM_DEVICES)


def test_rla_ablation_keeps_its_fusion_mode():
  config = get('phoenix2014t', 'rla')
  build.check(config, stages=build.STAGES, num_devices=NUM_DEVICES)
  fuse = build.sign_config(config).fusion
  assert fuse.mode == 'rla' and fuse.uses_rla


def test_frame_loader_processes_are_for_synthsign_rendering(tmp_path):
  assert synthsign.get_config().visual.loader_processes == 2
  assert phoenix2014t.get_config().visual.loader_processes == 0  # videos decode in a thread
  config = synthsign.get_config()
  config.data.dataset = 'phoenix'
  with pytest.raises(build.ConfigError, match='loader_processes is for SynthSign'):
    data_lib.prepare(config, str(tmp_path), log=lambda _: None)
