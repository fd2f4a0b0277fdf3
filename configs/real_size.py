"""What the real-size recipes share: phoenix2014t.py, csl_daily.py, how2sign.py and openasl.py.

Each of them translates one public benchmark with configs/synthsign.py's three stages at the size
of a real run: RTMPose keypoints and frozen DINOv2 frame features, fused by the base sign encoder
(SkeletonConfig.base() and SignEncoderConfig.base(): D = 512, 4x temporal downsampling, bf16
compute with float32 parameters), into a pretrained decoder tuned with rank-16 LoRA on every
projection. A recipe file keeps what is its own (the launch command and the data layout in its
docstring, the data keys, its DINOv2 and decoder presets, its step counts) and `get_config` below
fills in the rest, over configs/synthsign.py's keys: the launcher reads the same keys whatever the
experiment.

Weights. model.decoder.hf_path is required for a run: it names the decoder's HuggingFace folder,
whose config.json then wins over the sizes here and whose tokenizer is the recipe's (tokenizer.kind
'hf', tokenizer.vocab_size its embedding rows). visual.hf_path should name the facebook/dinov2-*
folder of the recipe's preset, or the frame features come from a random DINOv2 of that shape. Left
empty, as here, the presets give the shapes alone, which is what the tests use; the sizes written
out in DINOV2 and DECODERS repeat the presets' for the reader.

Data. data.root, the release folder, is set on the command line; the annotations are read under
it, and data.pose_pattern names one RTMPose pickle per clip there (the Uni-Sign layout, see
rvlf_jax.data.poses).

The argument after ':' selects the sign-encoder ablation, as in configs/synthsign.py: 'fused' (the
default), 'skeleton_only' or 'visual_only'. synthsign's 'tiny' is refused: it would shrink a
real-size recipe.

Not trained here (no data, weights or accelerators on the development machine), so there is no
expected score: tests/recipe/test_real_configs.py checks that each config passes `build.check` on
64 devices and that every model of the three stages builds and runs under `jax.eval_shape` at
these sizes. Step counts assume the global batch sizes set here.
"""

from typing import Any, NamedTuple

import ml_collections

from configs import synthsign

# VitConfig presets for the frame features, with the sizes they give and the frames a DINOv2 call
# takes (half as many for the large model).
DINOV2 = {
    'dinov2_base': dict(hidden_size=768, num_layers=12, num_heads=12, batch_frames=1024),
    'dinov2_large': dict(hidden_size=1024, num_layers=24, num_heads=16, batch_frames=512),
}


class Decoder(NamedTuple):
  """A DecoderConfig preset as a recipe uses it."""

  sizes: dict[str, Any]  # model.decoder's keys; with preset '' they build a random decoder
  vocab_size: int        # the tokenizer's: the decoder's embedding rows
  fsdp: int              # FSDP ways that hold the decoder; the data axis takes the other devices


DECODERS = {
    'qwen3_8b': Decoder(
        dict(family='qwen3', hidden_size=4096, intermediate_size=12288, num_layers=36,
             num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960),
        vocab_size=151936, fsdp=8),
    # Gemma 3 4B's text decoder; from the sizes alone, without the sliding-window layers.
    'gemma3_4b': Decoder(
        dict(family='gemma3', hidden_size=2560, intermediate_size=10240, num_layers=34,
             num_heads=8, num_kv_heads=4, head_dim=256, max_position_embeddings=131072),
        vocab_size=262208, fsdp=4),
    # Llama 3.2 3B; from the sizes alone, without tied embeddings and llama3 RoPE scaling.
    'llama3_2_3b': Decoder(
        dict(family='llama', hidden_size=3072, intermediate_size=8192, num_layers=28,
             num_heads=24, num_kv_heads=8, head_dim=128, max_position_embeddings=131072),
        vocab_size=128256, fsdp=4),
}


def get_config(arg: str | None, *, name: str, data: dict[str, Any], dinov2: str, decoder: str,
               dev_clips: int, represent: dict[str, Any], sft: dict[str, Any],
               grpo: dict[str, Any]) -> ml_collections.ConfigDict:
  """configs/synthsign.py's recipe at real size, on one dataset.

  Args:
    arg: the argument after ':', one of synthsign.ABLATIONS, or None for 'fused'.
    name: the experiment, also its file name: configs/<name>.py.
    data: the dataset's data keys (dataset, annotations, splits, pose_pattern, lang, language,
      frame_buckets, token_buckets, ...); GRPO and evaluation generate up to the largest token
      bucket.
    dinov2: a DINOV2 preset for the frame features.
    decoder: a DECODERS preset.
    dev_clips: the size of the dev split, which every evaluation decodes in full.
    represent: stage 1's settings that differ from the ones below, its steps at least.
    sft: stage 2's, its steps and eval_every at least; it saves a checkpoint at each evaluation.
    grpo: stage 3's, its steps at least; it too saves a checkpoint at each evaluation.

  Returns:
    The experiment's config, with configs/synthsign.py's keys.

  Raises:
    ValueError: arg is not an ablation.
  """
  if arg and arg not in synthsign.ABLATIONS:
    raise ValueError(f'configs/{name}.py: the argument is an ablation, one of '
                     f'{synthsign.ABLATIONS}; got {arg!r}.')
  c = synthsign.get_config(arg)
  c.name = name
  c.data.update(root='', workers=8,   # root: the release folder, set on the command line
                in_memory=False)  # tens of GB of keypoints at real sizes
  c.data.update(data)
  max_new_tokens = max(c.data.token_buckets)
  c.tokenizer.update(kind='hf', vocab_size=DECODERS[decoder].vocab_size)
  c.prompt.instruction = '{sign}\nTranslate the sign language video into {language}.'

  # image_size is the frame side meant for DINOv2: 224 (16 x 16 patches, the 37 x 37 position
  # grid interpolated); recipe/data.py resizes the frames to it.
  c.visual.update(hf_path='', preset=dinov2, image_size=224, patch_size=14,
                  feature_keys=('cls', 'mean_patch'), loader_processes=0, **DINOV2[dinov2])

  # The base sign encoder (SkeletonConfig.base(), SignEncoderConfig.base()), computing in bf16
  # with float32 parameters.
  c.model.skeleton.update(
      part_dim=128, d_model=512, num_layers=4, num_heads=8, mlp_dim=1536, dropout=0.1,
      temporal_kernel=5, temporal_strides=(2, 2), dtype='bfloat16')
  c.model.fusion.update(
      mode='rla' if c.model.fusion.mode == 'rla' else 'gated_sum', d_model=512, visual_kernel=5,
      num_layers=2, num_heads=8, mlp_dim=1536, dropout=0.1, dtype='bfloat16')
  c.model.decoder.update(preset=decoder, hf_path='', **DECODERS[decoder].sizes)
  c.model.lora.update(rank=16, alpha=32.0)

  # Stage 1: sign-text alignment, 128 clips a step unless the recipe says otherwise.
  c.represent.update(
      batch_size=128, learning_rate=3e-4, weight_decay=0.05, text_layers=4, embed_dim=512,
      temperature=0.07, caption_weight=1.0, caption_layers=1, caption_width=512, log_every=50)
  c.represent.update(represent)
  # Stage 2: LoRA instruction tuning, early stopping on dev BLEU.
  c.sft.update(
      batch_size=64, learning_rate=2e-4, weight_decay=0.0, schedule='cosine', lora=True, patience=4,
      stop_window=1, min_steps=0, eval_examples=dev_clips, log_every=20)
  c.sft.update(sft)
  c.sft.checkpoint_every = c.sft.eval_every
  # Stage 3: GRPO, 64 clips x 8 samples a step, fresh rank-16 adapters on the merged SFT model.
  c.grpo.update(
      batch_size=64, group_size=8, learning_rate=2e-5, warmup_steps=20, temperature=1.0, top_k=0,
      top_p=1.0, max_new_tokens=max_new_tokens, beta=0.04, lora_rank=16, lora_alpha=32.0,
      eval_every=100, eval_examples=dev_clips, log_every=5)
  c.grpo.update(grpo)
  c.grpo.checkpoint_every = c.grpo.eval_every

  c.eval.update(
      decode='beam', beam_size=5, length_penalty=1.0, max_new_tokens=max_new_tokens,
      batch_size=64)
  c.mesh.update(data=-1, fsdp=DECODERS[decoder].fsdp, tensor=1)
  return c
