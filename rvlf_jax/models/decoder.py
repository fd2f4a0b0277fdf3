"""LLaMA / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 decoders: one config dataclass, one module.

Shape vocabulary: see `rvlf_jax.models.layers` (B, T, S, D, N, K, H, F, V, L).

The families differ only in switches of `DecoderConfig` (biases, QK-norm, Gemma's (1 + w) norms,
sandwich norms, embedding scale, soft-capping, sliding-window layers, per-layer-type RoPE), so
one `Decoder` serves them all; `from_hf_config` / `to_hf_config` translate HF config dicts.

Usage:
  model = Decoder(DecoderConfig.qwen3_0_6b())
  out = model.apply({'params': params}, tokens)                      # full forward
  cache = init_cache(config, batch=B, max_len=S)
  out = model.apply({'params': params}, prompt, cache=cache)         # prefill
  out = model.apply({'params': params}, next_token, positions=p, cache=out.cache)  # extend
  embeds = model.apply({'params': params}, tokens, method=Decoder.embed)  # build a prefix
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rvlf_jax.models import attention, layers
from rvlf_jax.models.layers import LoraConfig, RopeConfig

Array = jax.Array

FULL, SLIDING = 'full_attention', 'sliding_attention'

# Structure that each HF family fixes; everything else (sizes, rope, windows) is free.
_FAMILY_STRUCTURE = {
    'llama': dict(qk_norm=False, norm_unit_offset=False, sandwich_norm=False, embed_scale=False),
    'qwen2': dict(qk_norm=False, norm_unit_offset=False, sandwich_norm=False, embed_scale=False,
                  attention_bias=True, o_bias=False, mlp_bias=False),
    'qwen3': dict(qk_norm=True, norm_unit_offset=False, sandwich_norm=False, embed_scale=False,
                  mlp_bias=False),
    'gemma2': dict(qk_norm=False, norm_unit_offset=True, sandwich_norm=True, embed_scale=True,
                   mlp_bias=False),
    'gemma3': dict(qk_norm=True, norm_unit_offset=True, sandwich_norm=True, embed_scale=True,
                   mlp_bias=False),
}
_HF_MODEL_TYPE = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'gemma2': 'gemma2',
                  'gemma3': 'gemma3_text'}
_HF_ARCH = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
            'gemma2': 'Gemma2ForCausalLM', 'gemma3': 'Gemma3ForCausalLM'}
_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder-only language model.

  Attributes:
    family: 'llama', 'qwen2', 'qwen3', 'gemma2' or 'gemma3' (the HF family it converts to).
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
      V, D, F, L, N, K, H.
    rms_norm_eps: RMSNorm epsilon.
    activation: MLP gate activation, as named in HF configs.
    rope: RoPE of full-attention layers.
    rope_local: RoPE of sliding-window layers (Gemma 3); None means same as `rope`.
    layer_types: per layer, 'full_attention' or 'sliding_attention'; None means all full.
    sliding_window: window of sliding layers (keys fewer than this many positions back).
    attention_bias, o_bias, mlp_bias: biases on q/k/v, on o, on the MLP projections.
    qk_norm: RMSNorm on each head of q and k before RoPE (Qwen3, Gemma 3).
    norm_unit_offset: norms apply (1 + w) (Gemma).
    sandwich_norm: extra norms after attention and MLP (Gemma 2/3).
    embed_scale: token embeddings multiplied by sqrt(D) (Gemma).
    query_pre_attn_scalar: attention scale is this ** -0.5 (Gemma); None means H ** -0.5.
    attn_logit_softcap, final_logit_softcap: tanh soft-capping of attention / output logits.
    tie_embeddings: output projection shares the embedding matrix.
    max_position_embeddings, bos_token_id, eos_token_id, pad_token_id: carried to HF configs.
    dtype: computation dtype; param_dtype: parameter dtype (strings, e.g. 'bfloat16').
    scan_layers: stack layers with nn.scan (fast compiles, params with a leading L axis).
    remat: 'none', 'full', 'dots' or 'dots_no_batch' (jax.checkpoint policy per layer).
  """

  family: str = 'llama'
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  activation: str = 'silu'
  rope: RopeConfig = RopeConfig()
  rope_local: RopeConfig | None = None
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  attention_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  norm_unit_offset: bool = False
  sandwich_norm: bool = False
  embed_scale: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'

  def __post_init__(self):
    if self.family not in _FAMILY_STRUCTURE:
      raise ValueError(f'Unknown decoder family {self.family!r}; known: {sorted(_FAMILY_STRUCTURE)}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
                       f'({self.num_kv_heads}).')
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f'layer_types has {len(self.layer_types)} entries for {self.num_layers} '
                         'layers.')
      if set(self.layer_types) - {FULL, SLIDING}:
        raise ValueError(f'layer_types may hold {FULL!r} and {SLIDING!r}, got '
                         f'{sorted(set(self.layer_types))}.')
      if SLIDING in self.layer_types and not self.sliding_window:
        raise ValueError('sliding_attention layers need sliding_window.')
    if self.remat not in ('none', *_REMAT_POLICIES):
      raise ValueError(f"remat must be one of {('none', *_REMAT_POLICIES)}, got {self.remat!r}.")
    if self.head_dim % 2:
      raise ValueError(f'head_dim must be even for RoPE, got {self.head_dim}.')

  # -- Derived -----------------------------------------------------------------------------------

  @property
  def types(self) -> tuple[str, ...]:
    return self.layer_types or (FULL,) * self.num_layers

  def rope_for(self, layer_type: str) -> RopeConfig:
    return self.rope_local if layer_type == SLIDING and self.rope_local else self.rope

  def replace(self, **changes) -> 'DecoderConfig':
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embedding included once when tied)."""
    d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                     self.head_dim)
    attn = d * (n + 2 * k) * h + n * h * d
    attn += (n + 2 * k) * h * self.attention_bias + d * self.o_bias + 2 * h * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    norms = d * (4 if self.sandwich_norm else 2)
    per_layer = attn + mlp + norms
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  # -- Presets -----------------------------------------------------------------------------------

  @classmethod
  def _family(cls, family: str, **kwargs) -> 'DecoderConfig':
    kwargs = {**_FAMILY_STRUCTURE[family], **kwargs}
    if family.startswith('gemma'):
      kwargs.setdefault('activation', 'gelu_pytorch_tanh')
    return cls(family=family, **kwargs)

  @classmethod
  def llama2_7b(cls):
    return cls._family('llama', vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                       rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=2)

  @classmethod
  def llama3_8b(cls):
    return cls._family('llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
                       max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)

  @classmethod
  def llama3_1_8b(cls):
    rope = RopeConfig(theta=500000.0, kind='llama3', factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    return cls.llama3_8b().replace(rope=rope, max_position_embeddings=131072)

  @classmethod
  def _llama3_2(cls, **kwargs):
    rope = RopeConfig(theta=500000.0, kind='llama3', factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    return cls._family('llama', vocab_size=128256, intermediate_size=8192, num_kv_heads=8,
                       rms_norm_eps=1e-5, rope=rope, tie_embeddings=True,
                       max_position_embeddings=131072, bos_token_id=128000,
                       eos_token_id=128001, **kwargs)

  @classmethod
  def llama3_2_1b(cls):
    return cls._llama3_2(hidden_size=2048, num_layers=16, num_heads=32, head_dim=64)

  @classmethod
  def llama3_2_3b(cls):
    return cls._llama3_2(hidden_size=3072, num_layers=28, num_heads=24, head_dim=128)

  @classmethod
  def qwen2_5_0_5b(cls):
    return cls._family('qwen2', vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                       rope=RopeConfig(theta=1e6), tie_embeddings=True,
                       max_position_embeddings=32768, eos_token_id=151643)

  @classmethod
  def qwen2_5_7b(cls):
    return cls._family('qwen2', vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                       rope=RopeConfig(theta=1e6), max_position_embeddings=32768,
                       eos_token_id=151643)

  @classmethod
  def qwen3_0_6b(cls):
    return cls._family('qwen3', vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       rope=RopeConfig(theta=1e6), tie_embeddings=True,
                       max_position_embeddings=40960, bos_token_id=151643,
                       eos_token_id=151645)

  @classmethod
  def qwen3_8b(cls):
    return cls._family('qwen3', vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                       rope=RopeConfig(theta=1e6), max_position_embeddings=40960,
                       bos_token_id=151643, eos_token_id=151645)

  @classmethod
  def _gemma2(cls, num_layers, **kwargs):
    types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers))
    return cls._family('gemma2', vocab_size=256000, num_layers=num_layers, head_dim=256,
                       query_pre_attn_scalar=256, layer_types=types, sliding_window=4096,
                       attn_logit_softcap=50.0, final_logit_softcap=30.0, tie_embeddings=True,
                       max_position_embeddings=8192, bos_token_id=2, eos_token_id=1,
                       pad_token_id=0, **kwargs)

  @classmethod
  def gemma2_2b(cls):
    return cls._gemma2(26, hidden_size=2304, intermediate_size=9216, num_heads=8, num_kv_heads=4)

  @classmethod
  def gemma2_9b(cls):
    return cls._gemma2(42, hidden_size=3584, intermediate_size=14336, num_heads=16,
                       num_kv_heads=8)

  @classmethod
  def _gemma3(cls, num_layers, sliding_window, rope, **kwargs):
    types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(num_layers))
    return cls._family('gemma3', num_layers=num_layers, head_dim=256, query_pre_attn_scalar=256,
                       layer_types=types, sliding_window=sliding_window, rope=rope,
                       rope_local=RopeConfig(theta=10000.0), tie_embeddings=True,
                       bos_token_id=2, eos_token_id=1, pad_token_id=0, **kwargs)

  @classmethod
  def gemma3_1b(cls):
    return cls._gemma3(26, 512, RopeConfig(theta=1e6), vocab_size=262144, hidden_size=1152,
                       intermediate_size=6912, num_heads=4, num_kv_heads=1,
                       max_position_embeddings=32768)

  @classmethod
  def gemma3_4b(cls):
    return cls._gemma3(34, 1024, RopeConfig(theta=1e6, kind='linear', factor=8.0),
                       vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                       num_heads=8, num_kv_heads=4, max_position_embeddings=131072)

  @classmethod
  def tiny(cls, family: str = 'llama', **kwargs):
    """A small random-init-sized model of any family, for tests and demos."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    if family == 'gemma2':
      base.update(layer_types=(SLIDING, FULL), sliding_window=4, query_pre_attn_scalar=16,
                  attn_logit_softcap=50.0, final_logit_softcap=30.0, tie_embeddings=True)
    if family == 'gemma3':
      base.update(layer_types=(SLIDING, FULL), sliding_window=4, query_pre_attn_scalar=16,
                  rope=RopeConfig(theta=1e6), rope_local=RopeConfig(theta=1e4),
                  tie_embeddings=True)
    return cls._family(family, **{**base, **kwargs})

  # -- HF configs --------------------------------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> 'DecoderConfig':
    """Our config from an HF config dict (transformers 5 or legacy rope fields)."""
    model_type = hf['model_type']
    family = {v: k for k, v in _HF_MODEL_TYPE.items()}.get(model_type)
    if family is None:
      raise ValueError(f'model_type {model_type!r} is not a decoder family we read '
                       f'({sorted(_HF_MODEL_TYPE.values())}).')
    d, n = hf['hidden_size'], hf['num_attention_heads']
    num_layers = hf['num_hidden_layers']
    kw = dict(
        vocab_size=hf['vocab_size'], hidden_size=d, intermediate_size=hf['intermediate_size'],
        num_layers=num_layers, num_heads=n,
        num_kv_heads=hf.get('num_key_value_heads') or n,
        head_dim=hf.get('head_dim') or d // n,
        rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
        activation=hf.get('hidden_activation') or hf.get('hidden_act') or 'silu',
        tie_embeddings=hf.get('tie_word_embeddings', family not in ('llama', 'qwen2', 'qwen3')),
        max_position_embeddings=hf.get('max_position_embeddings', 4096),
        bos_token_id=hf.get('bos_token_id'), pad_token_id=hf.get('pad_token_id'),
        eos_token_id=(tuple(hf['eos_token_id']) if isinstance(hf.get('eos_token_id'), list)
                      else hf.get('eos_token_id')),
    )
    if family in ('llama', 'qwen3', 'gemma2', 'gemma3'):
      kw.update(attention_bias=hf.get('attention_bias', False),
                o_bias=hf.get('attention_bias', False))
    if family == 'llama':
      kw.update(mlp_bias=hf.get('mlp_bias', False))
    if family.startswith('gemma'):
      kw.update(query_pre_attn_scalar=hf.get('query_pre_attn_scalar', 256),
                attn_logit_softcap=hf.get('attn_logit_softcapping',
                                          50.0 if family == 'gemma2' else None),
                final_logit_softcap=hf.get('final_logit_softcapping',
                                           30.0 if family == 'gemma2' else None))
      if hf.get('use_bidirectional_attention'):
        raise ValueError('use_bidirectional_attention (embedding-model Gemma) is not supported.')
    kw.update(_layer_types_from_hf(family, hf, num_layers))
    kw.update(_rope_from_hf(family, hf))
    dtype = hf.get('dtype') or hf.get('torch_dtype')
    if dtype in ('float32', 'bfloat16', 'float16'):
      kw.update(param_dtype=dtype)
    kw.update(overrides)
    return cls._family(family, **kw)

  def to_hf_config(self) -> dict[str, Any]:
    """The HF config dict (transformers 5 format) of this architecture."""
    expected = _FAMILY_STRUCTURE[self.family]
    wrong = {k: getattr(self, k) for k, v in expected.items() if getattr(self, k) != v}
    if not self.family.startswith('qwen2') and self.o_bias != self.attention_bias:
      wrong['o_bias'] = self.o_bias
    if wrong:
      raise ValueError(f'{self.family} checkpoints cannot express {wrong}.')
    hf = dict(
        architectures=[_HF_ARCH[self.family]], model_type=_HF_MODEL_TYPE[self.family],
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=(list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                      else self.eos_token_id),
        pad_token_id=self.pad_token_id, dtype=self.param_dtype,
    )
    if self.family != 'llama':
      hf.update(layer_types=list(self.types))
    if self.family.startswith('gemma'):
      hf.update(hidden_activation=self.activation, attention_bias=self.attention_bias,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                sliding_window=self.sliding_window)
    else:
      hf.update(hidden_act=self.activation)
    if self.family in ('llama', 'qwen3'):
      hf.update(attention_bias=self.attention_bias)
    if self.family == 'llama':
      hf.update(mlp_bias=self.mlp_bias)
      if SLIDING in self.types:
        raise ValueError('llama checkpoints cannot express sliding-window layers.')
    if self.family.startswith('qwen'):
      sliding = SLIDING in self.types
      hf.update(use_sliding_window=sliding, sliding_window=self.sliding_window if sliding else None)
    if self.family == 'gemma3':
      hf.update(rope_parameters={FULL: _rope_to_hf(self.rope),
                                 SLIDING: _rope_to_hf(self.rope_for(SLIDING))})
    else:
      if self.rope_local and self.rope_local != self.rope:
        raise ValueError(f'{self.family} checkpoints have one RoPE for all layers.')
      hf.update(rope_parameters=_rope_to_hf(self.rope))
    return hf


def _rope_from_hf(family: str, hf: dict[str, Any]) -> dict[str, RopeConfig]:
  """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""

  def parse(params: dict | None, theta: float) -> RopeConfig:
    params = dict(params or {})
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind == 'default':
      return RopeConfig(theta=params.get('rope_theta', theta))
    if kind == 'linear':
      return RopeConfig(theta=params.get('rope_theta', theta), kind=kind, factor=params['factor'])
    if kind == 'llama3':
      return RopeConfig(theta=params.get('rope_theta', theta), kind=kind, factor=params['factor'],
                        low_freq_factor=params['low_freq_factor'],
                        high_freq_factor=params['high_freq_factor'],
                        original_max_position_embeddings=params['original_max_position_embeddings'])
    raise ValueError(f"RoPE type {kind!r} is not supported (default, linear, llama3 are).")

  params = hf.get('rope_parameters')
  if family == 'gemma3':
    if params and FULL in params:
      return {'rope': parse(params[FULL], 1e6), 'rope_local': parse(params.get(SLIDING), 1e4)}
    return {'rope': parse(hf.get('rope_scaling'), hf.get('rope_theta', 1e6)),
            'rope_local': RopeConfig(theta=hf.get('rope_local_base_freq', 1e4))}
  if params:
    return {'rope': parse(params, hf.get('rope_theta', 10000.0))}
  return {'rope': parse(hf.get('rope_scaling'), hf.get('rope_theta', 10000.0))}


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
  out: dict[str, Any] = {'rope_type': rope.kind, 'rope_theta': rope.theta}
  if rope.kind in ('linear', 'llama3'):
    out['factor'] = rope.factor
  if rope.kind == 'llama3':
    out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


def _layer_types_from_hf(family: str, hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """layer_types and sliding_window, with each family's defaults when the config omits them."""
  types = hf.get('layer_types')
  window = hf.get('sliding_window')
  if family.startswith('qwen') and not hf.get('use_sliding_window', False):
    window = None
    types = None if types is None or SLIDING not in types else types
  if types is None:
    if family == 'gemma2':
      types = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    elif family == 'gemma3':
      pattern = hf.get('sliding_window_pattern', 6)
      types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    elif family.startswith('qwen') and window is not None:
      first = hf.get('max_window_layers', num_layers)
      types = [SLIDING if i >= first else FULL for i in range(num_layers)]
  if types is not None and SLIDING not in types:
    types, window = None, None
  return {'layer_types': tuple(types) if types else None,
          'sliding_window': window if types else None}


class DecoderOutput(NamedTuple):
  """What the decoder returns.

  Attributes:
    logits: float32[B, T, V].
    cache: the updated KV cache, or None when none was given.
    hidden_states: with return_hidden_states, [embeddings, output of layer 0, ..., of layer L-1]
      (before the final norm), each [B, T, D]; else None.
  """

  logits: Array
  cache: dict[str, Array] | None
  hidden_states: tuple[Array, ...] | None


class Block(nn.Module):
  """One decoder layer: (sandwich-)normed attention and gated MLP with residuals.

  Its call has nn.scan's shape, (carry, per-layer inputs, shared inputs) -> (carry, outputs), so
  the same module is scanned or looped.
  """

  config: DecoderConfig
  lora: LoraConfig | None = None
  keep_hidden: bool = False

  @nn.compact
  def __call__(self, x_btd, per_layer, shared):
    """One layer.

    Args:
      x_btd: the residual stream.
      per_layer: (type_id int32[], (k, v) of this layer's cache [B, S, K, H] each, or None,
        (k, v) of this layer's shared prefix cache [B, P, K, H] each, or None).
      shared: (sin, cos float32[kinds, B, T, H], masks bool[kinds, B, 1, T, S], cache index,
        prefix masks bool[kinds, B, 1, T, P] or None).

    Returns:
      (x_btd, ((k, v) updated or None, x_btd if keep_hidden else None)).
    """
    cfg = self.config
    type_id, kv, prefix_kv = per_layer
    sin, cos, masks, index, prefix_masks = shared
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, cfg.norm_unit_offset, 'norm',
                                       dtype=dtype, param_dtype=param_dtype, name=name)
    x_btd = nn.with_logical_constraint(x_btd, ('batch', 'length', 'embed'))
    kv_cache = None if kv is None else (kv[0], kv[1], index)
    prefix = None if prefix_kv is None else (*prefix_kv, prefix_masks[type_id])
    h, kv = attention.Attention(cfg, self.lora, name='attn')(
        norm('attn_norm')(x_btd), sin[type_id], cos[type_id], masks[type_id], kv_cache, prefix)
    if cfg.sandwich_norm:
      h = norm('attn_out_norm')(h)
    x_btd = x_btd + h
    h = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.mlp_bias,
                        self.lora, dtype=dtype, param_dtype=param_dtype,
                        name='mlp')(norm('mlp_norm')(x_btd))
    if cfg.sandwich_norm:
      h = norm('mlp_out_norm')(h)
    x_btd = x_btd + h
    return x_btd, (kv, x_btd if self.keep_hidden else None)


class Transformer(nn.Module):
  """The L blocks, scanned (params under 'layers', leading axis L) or looped ('layers_i')."""

  config: DecoderConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_btd, type_ids, kv, prefix_kv, shared, keep_hidden: bool):
    cfg = self.config
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(0, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x_btd, (new_kv, hidden) = scanned(cfg, self.lora, keep_hidden, name='layers')(
          x_btd, (type_ids, kv, prefix_kv), shared)
      hidden = None if hidden is None else tuple(hidden[i] for i in range(cfg.num_layers))
      return x_btd, new_kv, hidden
    new_k, new_v, hidden = [], [], []
    for i in range(cfg.num_layers):
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      layer_prefix = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
      x_btd, (layer_kv, h) = block(cfg, self.lora, keep_hidden, name=f'layers_{i}')(
          x_btd, (type_ids[i], layer_kv, layer_prefix), shared)
      hidden.append(h)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    new_kv = (jnp.stack(new_k), jnp.stack(new_v)) if kv is not None else None
    return x_btd, new_kv, tuple(hidden) if keep_hidden else None


class Decoder(nn.Module):
  """A decoder-only LM over token ids or given input embeddings.

  Attributes:
    config: the architecture.
    lora: LoRA adapters on the projections lora.targets, or None.
  """

  config: DecoderConfig
  lora: LoraConfig | None = None

  def setup(self):
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    self.embedder = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                    ('vocab', 'embed')))
    self.transformer = Transformer(cfg, self.lora)
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, cfg.norm_unit_offset, 'norm',
                                     dtype=dtype, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Linear((cfg.hidden_size,), (cfg.vocab_size,), ('embed', 'vocab'),
                                   dtype=dtype, param_dtype=param_dtype)

  def embed(self, tokens_bt: Array) -> Array:
    """Token embeddings [B, T, D] as the model's first layer sees them (Gemma: x sqrt(D))."""
    x = self.embedder(tokens_bt)
    if self.config.embed_scale:
      # HF rounds sqrt(D) to the parameter dtype before multiplying.
      scale = jnp.asarray(self.config.hidden_size**0.5, layers.dtype_of(self.config.param_dtype))
      x = x * scale.astype(x.dtype)
    return x

  def logits(self, x_btd: Array) -> Array:
    """Output logits float32[B, T, V] from final hidden states (before the final norm)."""
    cfg = self.config
    x = self.final_norm(x_btd)
    logits = self.embedder.attend(x) if cfg.tie_embeddings else self.lm_head(x)
    return layers.softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)

  def __call__(self, tokens_bt: Array | None = None, *, embeds_btd: Array | None = None,
               positions_bt: Array | None = None, cache: dict[str, Array] | None = None,
               prefix_cache: dict[str, Array] | None = None,
               return_hidden_states: bool = False) -> DecoderOutput:
    """Runs the decoder.

    Args:
      tokens_bt: int[B, T] token ids, or None when `embeds_btd` is given.
      embeds_btd: float[B, T, D] input embeddings (e.g. `embed(prompt)` concatenated with sign
        tokens); used as given, without Gemma's sqrt(D) scale.
      positions_bt: int[B, T] positions, -1 for padding. Default: 0..T-1, continuing from the
        cache's fill level when a cache is given.
      cache: a KV cache from `init_cache`; the T new keys/values are written at its current
        index. The caller sizes it: writes past its end are clamped by XLA, not checked.
      prefix_cache: a filled, read-only cache (e.g. a prefilled prompt) that the tokens also
        attend to, besides `cache`; with `jax.vmap` over a group of samples and this argument
        unbatched, the group shares the prefix without copying it.
      return_hidden_states: also return every layer's output.

    Returns:
      DecoderOutput(logits, updated cache or None, hidden states or None).
    """
    cfg = self.config
    if (tokens_bt is None) == (embeds_btd is None):
      raise ValueError('Pass exactly one of tokens_bt and embeds_btd.')
    if embeds_btd is None:
      x = self.embed(tokens_bt)
    else:
      x = embeds_btd.astype(layers.dtype_of(cfg.dtype))
    b, t = x.shape[:2]
    if positions_bt is None and prefix_cache is not None:
      # The default would restart at 0 (or at `cache`'s fill level), ignoring the prefix.
      raise ValueError('With prefix_cache, pass positions_bt (the prefix ends at '
                       "prefix_cache['pos'].max(axis=1)).")
    if positions_bt is None:
      start = 0 if cache is None else cache['index']
      positions_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    index = None
    if cache is None:
      k_pos = positions_bt
    else:
      index = cache['index']
      cache = attention.write_positions(cache, positions_bt)
      k_pos = cache['pos']

    # One rotary table and mask per kind of layer present (full / sliding); each layer picks its
    # own by index, so scanned layers can differ in kind.
    kinds = sorted(set(cfg.types))
    sin, cos, masks = [], [], []
    for kind in kinds:
      s, c = layers.rope_sin_cos(positions_bt, cfg.rope_for(kind).inv_freq(cfg.head_dim))
      sin.append(s)
      cos.append(c)
      window = cfg.sliding_window if kind == SLIDING else None
      masks.append(attention.make_mask(positions_bt, k_pos, window))
    prefix_masks, prefix_kv = None, None
    if prefix_cache is not None:
      prefix_masks = jnp.stack([
          attention.make_mask(positions_bt, prefix_cache['pos'],
                              cfg.sliding_window if kind == SLIDING else None) for kind in kinds])
      prefix_kv = (prefix_cache['k'], prefix_cache['v'])
    shared = (jnp.stack(sin), jnp.stack(cos), jnp.stack(masks), index, prefix_masks)
    type_ids = jnp.asarray([kinds.index(k) for k in cfg.types], jnp.int32)
    kv = None if cache is None else (cache['k'], cache['v'])

    x_out, new_kv, hidden = self.transformer(x, type_ids, kv, prefix_kv, shared,
                                             return_hidden_states)
    if cache is not None:
      cache = {**cache, 'k': new_kv[0], 'v': new_kv[1]}
    hidden_states = (x, *hidden) if return_hidden_states else None
    return DecoderOutput(self.logits(x_out), cache, hidden_states)


def unrolled(model: Decoder, params: Any) -> tuple[Decoder, Any]:
  """(model, params) with the layers looped rather than scanned; the same function.

  For decoding loops: a scanned stack slices every layer's weights out of the [L, ...] arrays at
  every token (on CPU, half of batch-1 greedy time), a looped one slices them once, before the
  loop. The KV-cache layout is the same. A model that is not scanned is returned as it is.
  """
  if not model.config.scan_layers:
    return model, params
  transformer = dict(params['transformer'])
  stacked = transformer.pop('layers')
  for i in range(model.config.num_layers):
    transformer[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  config = dataclasses.replace(model.config, scan_layers=False)
  return model.clone(config=config), {**params, 'transformer': transformer}


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: str | None = None):
  """An empty KV cache for `config` (see `attention.init_cache`), in the compute dtype."""
  return attention.init_cache(config.num_layers, batch, max_len, config.num_kv_heads,
                              config.head_dim, layers.dtype_of(dtype or config.dtype))


def positions_from_mask(mask_bt: Array, offset: Array | int = 0) -> Array:
  """Positions int32[B, T] for a validity mask: valid tokens count up from offset, padding is -1."""
  mask_bt = mask_bt.astype(bool)
  pos = jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1 + offset
  return jnp.where(mask_bt, pos, -1)


def abstract_params(config: DecoderConfig, lora: LoraConfig | None = None, boxed: bool = False):
  """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
  model = Decoder(config, lora)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  params = variables['params']
  return params if boxed else nn.meta.unbox(params)


def init_params(config: DecoderConfig, rng: Array, lora: LoraConfig | None = None):
  """Random parameters (unboxed) for `config`."""
  model = Decoder(config, lora)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))['params'])
  return nn.meta.unbox(init(rng))
