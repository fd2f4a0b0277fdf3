"""OpenASL (American Sign Language news and vlogs): DINOv2-L frame features + Qwen3-8B with LoRA.

The real-size recipe for OpenASL (96,476 train / 966 dev / 975 test clips from YouTube).
configs/real_size.py builds it and says what the four real-size recipes share: the sign encoder,
how visual.hf_path and model.decoder.hf_path are used, the ablation argument and why there is no
expected score.

  python -m launch.train --config=configs/openasl.py --workdir=/ckpt/rvlf-openasl \
      --config.data.root=/data/openasl \
      --config.visual.hf_path=/models/dinov2-large \
      --config.model.decoder.hf_path=/models/Qwen3-8B

data.root holds openasl-v1.0.tsv with the clips cut by OpenASL's prep/crop_video.py beside it,
and the RTMPose pickles of data.pose_pattern under it, '{id}' being the tsv's vid. The tokenizer
is Qwen3's; visual.hf_path should name facebook/dinov2-large.
"""

import ml_collections

from configs import real_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real_size.get_config(
      arg,
      name='openasl',
      data=dict(
          dataset='openasl',
          annotations='openasl-v1.0.tsv',
          splits=('train', 'valid', 'test'),
          pose_pattern='poses/{id}.pkl',
          lang='en',
          language='English',
          # Clips longer than the largest bucket (16 s at 25 fps) are subsampled to 400 frames.
          frame_buckets=(64, 128, 192, 256, 320, 400),
          token_buckets=(32, 64, 128),  # Qwen3 tokens of a sentence, eos included
      ),
      dinov2='dinov2_large',
      decoder='qwen3_8b',
      dev_clips=966,
      # 256 clips a step, about 32 epochs.
      represent=dict(steps=12000, batch_size=256, warmup_steps=1000, log_every=100,
                     checkpoint_every=1000),
      # 1,507 steps an epoch: about 8 epochs.
      sft=dict(steps=12000, warmup_steps=300, eval_every=1000, log_every=50),
      grpo=dict(steps=1000),
  )
