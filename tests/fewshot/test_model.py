"""The few-shot encoder: shapes, the text-free baseline, fused tokens for one layer, config checks."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from rvlf_jax.fewshot import model as model_lib
from rvlf_jax.models import gates
from rvlf_jax.models.skeleton import SkeletonConfig

B, T, M, E = 4, 12, 3, 8


def _config(**changes):
  fields = dict(skeleton=SkeletonConfig.tiny(), num_layers=2, rla_at=(0, 1), text_dim=E,
                gate=gates.GateConfig(fixed=0.5))
  return model_lib.FewShotModelConfig(**{**fields, **changes})


def _inputs(seed=0, text=True):
  rng = np.random.default_rng(seed)
  out = {'keypoints': rng.standard_normal((B, T, 133, 3)).astype(np.float32),
         'frame_mask': np.arange(T)[None, :] < np.array([[T], [T], [8], [5]])}
  if text:
    out['text'] = rng.standard_normal((B, M, E)).astype(np.float32)
    out['text_mask'] = np.ones((B, M), bool)
  return out


def _params(module, inputs):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), inputs)['params'])


def test_embeddings_shape_and_text_use():
  module = model_lib.FewShotEncoder(_config())
  inputs = _inputs()
  params = _params(module, inputs)
  assert {'stem', 'text_proj', 'rla_0', 'rla_1', 'layers_0', 'layers_1'} <= set(params)
  apply = jax.jit(lambda p, x: module.apply({'params': p}, x, mutable=['gates'])[0])
  emb = np.asarray(apply(params, inputs))
  assert emb.shape == (B, 32) and np.all(np.isfinite(emb))
  other_text = {**inputs, 'text': inputs['text'] + 1.0}
  assert not np.allclose(apply(params, other_text), emb, atol=1e-5)  # the text is read


def test_text_free_encoder_needs_no_text_and_has_no_rla():
  module = model_lib.FewShotEncoder(_config(rla_at=()))
  inputs = _inputs(text=False)
  params = _params(module, inputs)
  assert not any(k.startswith('rla') or k.startswith('text') for k in params)
  assert module.apply({'params': params}, inputs).shape == (B, 32)


def test_fused_tokens_join_only_the_next_layer():
  inputs = _inputs()
  with_h = model_lib.FewShotEncoder(_config(rla_at=(0,)))
  without = model_lib.FewShotEncoder(_config(rla_at=(0,), append_fused=False))
  params = _params(with_h, inputs)
  run = lambda m: np.asarray(m.apply({'params': params}, inputs, mutable=['gates'])[0])
  assert not np.allclose(run(with_h), run(without), atol=1e-5)
  # After the last layer nothing is appended: an RLA block there gives the same either way.
  last = _config(rla_at=(1,))
  params = _params(model_lib.FewShotEncoder(last), inputs)
  a = model_lib.FewShotEncoder(last).apply({'params': params}, inputs, mutable=['gates'])[0]
  b = model_lib.FewShotEncoder(last.replace(append_fused=False)).apply(
      {'params': params}, inputs, mutable=['gates'])[0]
  np.testing.assert_array_equal(a, b)


def test_padded_frames_do_not_change_a_clip_embedding():
  module = model_lib.FewShotEncoder(_config())
  inputs = _inputs()
  params = _params(module, inputs)
  changed = {**inputs, 'keypoints': inputs['keypoints'].copy()}
  changed['keypoints'][3, 5:] = 7.0  # clip 3 has 5 valid frames
  apply = lambda x: np.asarray(module.apply({'params': params}, x, mutable=['gates'])[0])
  np.testing.assert_allclose(apply(changed), apply(inputs), atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match='do not exist'):
    _config(rla_at=(2,))
  with pytest.raises(ValueError, match='twice'):
    _config(rla_at=(1, 1))
  module = model_lib.FewShotEncoder(_config())
  with pytest.raises(KeyError, match="inputs\\['text'\\]"):
    module.init(jax.random.key(0), _inputs(text=False))
