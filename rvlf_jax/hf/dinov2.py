"""HF `Dinov2Model` / `Dinov2WithRegistersModel` checkpoints <-> `rvlf_jax.models.vit`.

The keys are those of the safetensors files that `save_pretrained` writes: transformers renames
its modules on load (q_proj, gate_proj/up_proj, ...) and back on save, so checkpoints keep the
original names (attention.attention.query, mlp.weights_in with gate and up stacked, ...).
One table serves both model types and both MLPs: rules whose parameter the config does not
create (register tokens, fc1 vs weights_in, q/k/v biases, mask token) are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from rvlf_jax.hf import api, convert
from rvlf_jax.models import vit


def _unsqueeze(n: int) -> convert.Transform:
  """HF [1, ..., 1, *shape] (n leading ones) <-> our [*shape]."""
  return convert.Transform(
      f'unsqueeze({n})',
      lambda a, shape: a.reshape(shape),
      lambda a: a.reshape((1,) * n + a.shape),
      lambda shape: (1,) * n + tuple(shape))


_LINEAR = convert.linear()
_LAYER = 'encoder.layer.{i}.'

TABLE = convert.Table(rules=(
    convert.Rule('embeddings.cls_token', 'cls_token', _unsqueeze(2)),
    convert.Rule('embeddings.mask_token', 'mask_token', _unsqueeze(1)),
    convert.Rule('embeddings.register_tokens', 'register_tokens', _unsqueeze(1)),
    convert.Rule('embeddings.position_embeddings', 'pos_embed', _unsqueeze(1)),
    convert.Rule('embeddings.patch_embeddings.projection.weight', 'patch_embed/kernel',
                 convert.CONV2D),
    convert.Rule('embeddings.patch_embeddings.projection.bias', 'patch_embed/bias'),
    convert.Rule(_LAYER + 'norm1.weight', 'layers/norm1/scale'),
    convert.Rule(_LAYER + 'norm1.bias', 'layers/norm1/bias'),
    convert.Rule(_LAYER + 'attention.attention.query.weight', 'layers/attn/q_proj/kernel', _LINEAR),
    convert.Rule(_LAYER + 'attention.attention.query.bias', 'layers/attn/q_proj/bias',
                 convert.RESHAPE),
    convert.Rule(_LAYER + 'attention.attention.key.weight', 'layers/attn/k_proj/kernel', _LINEAR),
    convert.Rule(_LAYER + 'attention.attention.key.bias', 'layers/attn/k_proj/bias',
                 convert.RESHAPE),
    convert.Rule(_LAYER + 'attention.attention.value.weight', 'layers/attn/v_proj/kernel', _LINEAR),
    convert.Rule(_LAYER + 'attention.attention.value.bias', 'layers/attn/v_proj/bias',
                 convert.RESHAPE),
    convert.Rule(_LAYER + 'attention.output.dense.weight', 'layers/attn/o_proj/kernel',
                 convert.linear(n_in=2)),
    convert.Rule(_LAYER + 'attention.output.dense.bias', 'layers/attn/o_proj/bias'),
    convert.Rule(_LAYER + 'layer_scale1.lambda1', 'layers/layer_scale1'),
    convert.Rule(_LAYER + 'norm2.weight', 'layers/norm2/scale'),
    convert.Rule(_LAYER + 'norm2.bias', 'layers/norm2/bias'),
    convert.Rule(_LAYER + 'mlp.fc1.weight', 'layers/mlp/fc1/kernel', _LINEAR),
    convert.Rule(_LAYER + 'mlp.fc1.bias', 'layers/mlp/fc1/bias'),
    convert.Rule(_LAYER + 'mlp.fc2.weight', 'layers/mlp/fc2/kernel', _LINEAR),
    convert.Rule(_LAYER + 'mlp.fc2.bias', 'layers/mlp/fc2/bias'),
    # [2F, D] with gate rows first <-> our [D, 2, F] (gate at index 0).
    convert.Rule(_LAYER + 'mlp.weights_in.weight', 'layers/mlp/weights_in/kernel', _LINEAR),
    convert.Rule(_LAYER + 'mlp.weights_in.bias', 'layers/mlp/weights_in/bias', convert.RESHAPE),
    convert.Rule(_LAYER + 'mlp.weights_out.weight', 'layers/mlp/weights_out/kernel', _LINEAR),
    convert.Rule(_LAYER + 'mlp.weights_out.bias', 'layers/mlp/weights_out/bias'),
    convert.Rule(_LAYER + 'layer_scale2.lambda1', 'layers/layer_scale2'),
    convert.Rule('layernorm.weight', 'norm/scale'),
    convert.Rule('layernorm.bias', 'norm/bias'),
))


def table(config: vit.VitConfig) -> convert.Table:
  """The key table; the same for every DINOv2 config."""
  del config
  return TABLE


def abstract_params(config: vit.VitConfig):
  """Our unboxed parameter tree of `jax.ShapeDtypeStruct`s for `config` (nothing allocated)."""
  model = vit.VisionTransformer(config)
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                jnp.float32)
  boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), pixels)
  return nn.unbox(boxed['params'])


FAMILIES = (
    api.Family(
        model_types=vit.MODEL_TYPES,
        config_from_hf=vit.VitConfig.from_hf_config,
        table=table,
        abstract_params=abstract_params,
        num_layers=lambda config: config.num_layers,
    ),
)
