"""Smoke demo of the model zoo: tiny random DINOv2 + decoder, frames in, tokens out.

  python -m launch.smoke --config=configs/smoke.py            # Qwen3-style decoder
  python -m launch.smoke --config=configs/smoke.py:gemma3     # any of llama qwen2 qwen3 gemma2 gemma3

Expected (random weights, so the tokens mean nothing): parameter counts, the shapes of the frame
features, 16 greedy tokens, whether the full forward picks the same tokens as cached decoding
(True) and whether an HF export/import round trip is bit-exact (True); seconds on 2 CPU cores.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.family = arg or 'qwen3'
  config.seed = 0
  config.batch = 2
  config.frames = 4
  config.image_size = 28  # not the encoder's 14x14 position grid: exercises interpolation
  config.prompt_tokens = 6
  config.new_tokens = 16
  return config
