"""CSL-Daily (Chinese daily-life sentences): DINOv2-B frame features + Gemma 3 4B with LoRA.

The real-size recipe for CSL-Daily (18,401 train / 1,077 dev / 1,176 test clips at 30 fps).
configs/real_size.py builds it and says what the four real-size recipes share: the sign encoder,
how visual.hf_path and model.decoder.hf_path are used, the ablation argument and why there is no
expected score. Metrics and rewards tokenise Chinese by character (data.lang 'zh').

  python -m launch.train --config=configs/csl_daily.py --workdir=/ckpt/rvlf-csl \
      --config.data.root=/data/CSL-Daily \
      --config.visual.hf_path=/models/dinov2-base \
      --config.model.decoder.hf_path=/models/gemma-3-4b-text

data.root is the release folder: data.annotations, data.split_file and the frames
(sentence/frames_512x512/<name>/) are read under it, and so are the RTMPose pickles of
data.pose_pattern, '{id}' being the sample 'name' (CSL-Daily keeps every split in one folder).
The tokenizer is Gemma's, and model.decoder.hf_path must hold Gemma 3 4B's language model alone: a
config.json of model_type 'gemma3_text', e.g. google/gemma-3-4b-it's text tower saved as
Gemma3ForCausalLM (the multimodal checkpoint is not read). visual.hf_path should name
facebook/dinov2-base.
"""

import ml_collections

from configs import real_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real_size.get_config(
      arg,
      name='csl_daily',
      data=dict(
          dataset='csl_daily',
          annotations='sentence_label/csl2020ct_v2.pkl',
          split_file='sentence_label/split_1.txt',
          splits=('train', 'dev', 'test'),
          pose_pattern='poses/{id}.pkl',
          lang='zh',
          language='Chinese',
          # 30 fps clips of about 4 s on average; those over 10.7 s are subsampled to 320 frames.
          frame_buckets=(64, 128, 192, 256, 320),
          token_buckets=(32, 64),  # Gemma tokens of a sentence (mostly one per word)
      ),
      dinov2='dinov2_base',
      decoder='gemma3_4b',
      dev_clips=1077,
      # About 28 epochs.
      represent=dict(steps=4000, warmup_steps=400, checkpoint_every=500),
      # 288 steps an epoch: about 14 epochs.
      sft=dict(steps=4000, warmup_steps=150, eval_every=400),
      grpo=dict(steps=800),
  )
