"""Key table of LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (one layout, optional parts).

Biases (Qwen2, Llama with attention_bias/mlp_bias) and QK-norms (Qwen3) appear in the table once;
the converter uses a row only when the config gives our model that parameter.
"""

from __future__ import annotations

from rvlf_jax.hf import api, convert
from rvlf_jax.hf.convert import IDENTITY, RESHAPE, Rule, linear
from rvlf_jax.models import decoder

L = 'model.layers.{i}.'
OURS = 'transformer/layers/'

EMBEDDING_RULES = (
    Rule('model.embed_tokens.weight', 'embedder/embedding'),
    Rule('model.norm.weight', 'final_norm/scale'),
    Rule('lm_head.weight', 'lm_head/kernel', linear()),
)

ATTENTION_RULES = tuple(
    r for name in ('q_proj', 'k_proj', 'v_proj') for r in (
        Rule(f'{L}self_attn.{name}.weight', f'{OURS}attn/{name}/kernel', linear()),
        Rule(f'{L}self_attn.{name}.bias', f'{OURS}attn/{name}/bias', RESHAPE),
    )) + (
        Rule(f'{L}self_attn.o_proj.weight', f'{OURS}attn/o_proj/kernel', linear(n_in=2)),
        Rule(f'{L}self_attn.o_proj.bias', f'{OURS}attn/o_proj/bias', IDENTITY),
        Rule(f'{L}self_attn.q_norm.weight', f'{OURS}attn/q_norm/scale'),
        Rule(f'{L}self_attn.k_norm.weight', f'{OURS}attn/k_norm/scale'),
    )

MLP_RULES = tuple(
    r for name in ('gate_proj', 'up_proj', 'down_proj') for r in (
        Rule(f'{L}mlp.{name}.weight', f'{OURS}mlp/{name}/kernel', linear()),
        Rule(f'{L}mlp.{name}.bias', f'{OURS}mlp/{name}/bias'),
    ))

# Keys some checkpoints carry without being parameters: rotary buffers of older exports, and a
# copy of the tied output matrix.
IGNORE = (r'model\.rotary_emb\.inv_freq', r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq',
          r'lm_head\.weight')

TABLE = convert.Table(EMBEDDING_RULES + ATTENTION_RULES + MLP_RULES + (
    Rule(f'{L}input_layernorm.weight', f'{OURS}attn_norm/scale'),
    Rule(f'{L}post_attention_layernorm.weight', f'{OURS}mlp_norm/scale'),
), ignore=IGNORE)


def family(*model_types: str) -> api.Family:
  """The api.Family of decoder model types sharing `TABLE`-like layouts."""
  return api.Family(
      model_types=model_types,
      config_from_hf=decoder.DecoderConfig.from_hf_config,
      table=lambda config: TABLE,
      abstract_params=decoder.abstract_params,
      num_layers=lambda config: config.num_layers,
  )


FAMILIES = (family('llama', 'qwen2', 'qwen3'),)
