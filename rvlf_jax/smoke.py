"""The model-zoo smoke demo behind `launch.smoke`: every piece once, on random weights."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.eval import decoding
from rvlf_jax.hf import load_hf, save_hf
from rvlf_jax.models import decoder, vit


def run(config) -> dict[str, float]:
  """Encodes random frames, decodes greedily from them, checks the cache and the HF round trip.

  Args:
    config: see configs/smoke.py.

  Returns:
    The measured figures (also printed): cache_gap, roundtrip_equal, seconds.
  """
  start = time.perf_counter()
  k_vit, k_dec, k_proj, k_frames, k_prompt = jax.random.split(jax.random.key(config.seed), 5)
  vit_config = vit.VitConfig.tiny()
  dec_config = decoder.DecoderConfig.tiny(config.family)
  encoder = vit.VisionTransformer(vit_config)
  model = decoder.Decoder(dec_config)
  frames = jax.random.normal(
      k_frames, (config.batch, config.frames, config.image_size, config.image_size, 3))
  vit_params = jax.jit(encoder.init)(k_vit, frames[:, 0])['params']
  dec_params = decoder.init_params(dec_config, k_dec)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  print(f'encoder: DINOv2-style, {count(vit_params):,} parameters; decoder: {config.family}, '
        f'{count(dec_params):,} parameters')

  feats = jax.jit(lambda p, f: encoder.apply({'params': p}, f, method=encoder.encode_frames))(
      vit_params, frames)
  print(f'frames {frames.shape} -> CLS features {feats.cls.shape}, patch tokens '
        f'{feats.patch_tokens.shape}')
  # A random linear map stands in for the trained projector: one sign token per frame.
  proj = jax.random.normal(k_proj, (vit_config.hidden_size, dec_config.hidden_size)) * 0.1
  prompt = jax.random.randint(k_prompt, (config.batch, config.prompt_tokens), 0,
                              dec_config.vocab_size)
  embeds = jnp.concatenate([feats.cls @ proj, model.apply({'params': dec_params}, prompt,
                                                          method=model.embed)], axis=1)
  positions = jnp.broadcast_to(jnp.arange(embeds.shape[1]), embeds.shape[:2])
  tokens, _ = decoding.greedy_decode(model, dec_params, embeds, positions,
                                     max_new_tokens=config.new_tokens)
  print(f'greedy tokens: {np.asarray(tokens).tolist()}')

  # The full forward over prompt + generated tokens must pick the same tokens.
  full = jnp.concatenate([embeds, model.apply({'params': dec_params}, tokens, method=model.embed)],
                         axis=1)
  logits = jax.jit(lambda p, e: model.apply({'params': p}, embeds_btd=e).logits)(dec_params, full)
  p = embeds.shape[1]
  agree = bool(jnp.all(jnp.argmax(logits[:, p - 1:-1], -1) == tokens))
  print(f'cached decoding agrees with the full forward: {agree}')

  with tempfile.TemporaryDirectory() as tmp:
    save_hf(dec_config, dec_params, os.path.join(tmp, 'decoder'))
    _, again = load_hf(os.path.join(tmp, 'decoder'))
    equal = all(np.array_equal(a, b) for a, b in
                zip(jax.tree.leaves(jax.device_get(dec_params)), jax.tree.leaves(again)))
  print(f'HF export -> import is bit-exact: {equal}')
  seconds = time.perf_counter() - start
  print(f'done in {seconds:.1f} s')
  return {'cached_agrees': agree, 'roundtrip_equal': equal, 'seconds': seconds}
