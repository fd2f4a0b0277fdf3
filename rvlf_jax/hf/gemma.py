"""Key table of Gemma2ForCausalLM and Gemma3ForCausalLM (text): Llama's plus sandwich norms."""

from __future__ import annotations

import dataclasses

from rvlf_jax.hf import convert, llama
from rvlf_jax.hf.convert import Rule
from rvlf_jax.hf.llama import L, OURS

TABLE = convert.Table(llama.EMBEDDING_RULES + llama.ATTENTION_RULES + llama.MLP_RULES + (
    Rule(f'{L}input_layernorm.weight', f'{OURS}attn_norm/scale'),
    Rule(f'{L}post_attention_layernorm.weight', f'{OURS}attn_out_norm/scale'),
    Rule(f'{L}pre_feedforward_layernorm.weight', f'{OURS}mlp_norm/scale'),
    Rule(f'{L}post_feedforward_layernorm.weight', f'{OURS}mlp_out_norm/scale'),
), ignore=llama.IGNORE)

FAMILIES = (dataclasses.replace(llama.family('gemma2', 'gemma3_text'), table=lambda config: TABLE),)
