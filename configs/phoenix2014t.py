"""PHOENIX-2014T (German weather forecasts): DINOv2-B frame features + Qwen3-8B with LoRA.

The real-size recipe for the PHOENIX-2014T translation benchmark (7,096 train / 519 dev / 642 test
clips at 25 fps). configs/real_size.py builds it and says what the four real-size recipes share:
the sign encoder, how visual.hf_path and model.decoder.hf_path are used, the ablation argument and
why there is no expected score.

  python -m launch.train --config=configs/phoenix2014t.py --workdir=/ckpt/rvlf-phoenix \
      --config.data.root=/data/PHOENIX-2014-T-release-v3/PHOENIX-2014-T \
      --config.visual.hf_path=/models/dinov2-base \
      --config.model.decoder.hf_path=/models/Qwen3-8B

data.root is the release folder: data.annotations and the frames (features/fullFrame-210x260px/)
are read under it, and so are the RTMPose pickles of data.pose_pattern, '{split}' being train /
dev / test and '{id}' the corpus 'name'. The tokenizer is Qwen3's; visual.hf_path should name
facebook/dinov2-base.
"""

import ml_collections

from configs import real_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real_size.get_config(
      arg,
      name='phoenix2014t',
      data=dict(
          dataset='phoenix',
          annotations='annotations/manual/PHOENIX-2014-T.{split}.corpus.csv',
          splits=('train', 'dev', 'test'),
          pose_pattern='poses/{split}/{id}.pkl',
          lang='de',
          language='German',
          # 25 fps clips of 1-19 s (mean 4.6 s); those over 12.8 s are subsampled to 320 frames.
          frame_buckets=(64, 128, 192, 256, 320),
          token_buckets=(32, 64, 96),  # Qwen3 tokens of a translation, eos included
      ),
      dinov2='dinov2_base',
      decoder='qwen3_8b',
      dev_clips=519,
      # About 54 epochs.
      represent=dict(steps=3000, warmup_steps=300, checkpoint_every=500),
      # 111 steps an epoch: about 22 epochs.
      sft=dict(steps=2500, warmup_steps=100, eval_every=250),
      grpo=dict(steps=600, eval_every=50),
  )
