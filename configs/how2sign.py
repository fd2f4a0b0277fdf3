"""How2Sign (American Sign Language instructional videos): DINOv2-L features + Llama 3.2 3B, LoRA.

The real-size recipe for How2Sign's realigned sentences (31,128 train / 1,741 val / 2,322 test
clips, about 6 s on average). configs/real_size.py builds it and says what the four real-size
recipes share: the sign encoder, how visual.hf_path and model.decoder.hf_path are used, the
ablation argument and why there is no expected score.

  python -m launch.train --config=configs/how2sign.py --workdir=/ckpt/rvlf-how2sign \
      --config.data.root=/data/how2sign \
      --config.visual.hf_path=/models/dinov2-large \
      --config.model.decoder.hf_path=/models/Llama-3.2-3B-Instruct

data.root holds how2sign_realigned_{train,val,test}.csv with the sentence clips
<SENTENCE_NAME>.mp4 beside them (the release ships the clips in per-split folders: link them into
one), and the RTMPose pickles of data.pose_pattern under it, '{id}' being the SENTENCE_NAME. The
tokenizer is Llama 3's; visual.hf_path should name facebook/dinov2-large.
"""

import ml_collections

from configs import real_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real_size.get_config(
      arg,
      name='how2sign',
      data=dict(
          dataset='how2sign',
          annotations='how2sign_realigned_{split}.csv',
          splits=('train', 'val', 'test'),
          pose_pattern='poses/{id}.pkl',
          lang='en',
          language='English',
          # Clips longer than the largest bucket (16 s at 25 fps) are subsampled to 400 frames.
          frame_buckets=(64, 128, 192, 256, 320, 400),
          token_buckets=(32, 64, 128),  # Llama 3 tokens of a sentence, eos included
      ),
      dinov2='dinov2_large',
      decoder='llama3_2_3b',
      dev_clips=1741,  # the val split
      # About 33 epochs.
      represent=dict(steps=8000, warmup_steps=500, checkpoint_every=1000),
      # 486 steps an epoch: about 12 epochs.
      sft=dict(steps=6000, warmup_steps=200, eval_every=500),
      grpo=dict(steps=1000),
  )
