"""The default recipe: all three RVLF stages on SynthSign, sized for 2 CPU cores.

  python -m launch.train --config=configs/synthsign.py --workdir=/tmp/rvlf
  python -m launch.train --config=configs/synthsign.py --workdir=/tmp/rvlf --config.seed=1
  python -m launch.train --config=configs/synthsign.py:skeleton_only --workdir=/tmp/rvlf-sk

The argument after ':' is a comma-separated list of variants: an ablation of the sign encoder,
'fused' (default, gated-sum fusion), 'skeleton_only', 'visual_only' or 'rla' (both streams fused
by RL-gated attention: model.fusion.mode 'rla', its gates trained by REINFORCE in stages 1 and 2,
e.g. `--config=configs/synthsign.py:rla --stage=represent,sft`); and 'tiny', a run of a few
minutes on the tiny SynthSign with tiny models (for a first look, the notebook and the tests),
e.g. `configs/synthsign.py:skeleton_only,tiny`.

There are no pretrained weights on the development machine, so the run builds what a real run
downloads: the SynthSign data (generated into WORKDIR/data unless data.root names a cache), a
sentencepiece tokenizer of its spoken side, a small decoder pretrained on that text alone and
saved in HuggingFace format (then loaded back through the HF import, as a real checkpoint
would be), and the frame features of a frozen, randomly initialised small DINOv2.
"""

import ml_collections

ABLATIONS = ('fused', 'skeleton_only', 'visual_only', 'rla')
VARIANTS = ABLATIONS + ('tiny',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = [v.strip() for v in (arg or '').split(',') if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'configs/synthsign.py: unknown variant {v!r}; one of {VARIANTS}.')
  ablations = [v for v in variants if v in ABLATIONS]
  if len(ablations) > 1:
    raise ValueError(f'configs/synthsign.py: choose one ablation, got {ablations}.')
  ablation = ablations[0] if ablations else 'fused'
  c = ml_collections.ConfigDict()
  c.name = 'synthsign'
  c.seed = 0
  c.stages = ('represent', 'sft', 'grpo')

  c.data = ml_collections.ConfigDict(dict(
      dataset='synthsign',   # synthsign | phoenix | csl_daily | how2sign | openasl
      size='default',        # SynthSign size: tiny | default | large
      root='',               # SynthSign cache or dataset root; '' generates into WORKDIR/data
      annotations='',        # real datasets: annotation file under root, '{split}' filled in
      split_file='',         # CSL-Daily: split_1.txt under root
      splits=('train', 'dev', 'test'),  # the dataset's names of train, dev and test
      pose_pattern='',       # real datasets: pose file per clip under root, '{split}' and '{id}'
      lang='en',             # metric tokenisation: en | de | zh
      language='English',    # fills the prompt's {language}
      frame_buckets=(48, 72, 96),
      token_buckets=(24,),
      # Batches of clips of similar length (sorted within windows of this many batches; 0: off):
      # most clips are 40-75 frames, so random batches padded nearly all to 96.
      group_by_length=16,
      joints='',             # '' keeps all 133; or a subset name (cosign77, unisign69)
      standardize=True,      # per-joint mean/std of the normalised train keypoints
      stats_examples=1000,   # train clips the statistics are computed over
      workers=0,             # grain worker processes (0: featurize in the main process)
      in_memory=True,        # keep featurized clips in memory (~0.6 GB here) after epoch 1
      strict=False,          # raise on a bad example instead of skipping it
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      kind='sentencepiece',  # sentencepiece (trained on the train split) | hf (the decoder's)
      vocab_size=600,
  ))

  # The instruction around the sign tokens. SynthSign's 600-piece vocabulary spells the
  # library's default instruction in 33 pieces, 40% of each training sequence; this one takes 17.
  c.prompt = ml_collections.ConfigDict(dict(
      instruction='{sign}\nTranslate into {language}:', system=''))

  # Frame features: a frozen DINOv2 over every frame, cached once (data/features.py).
  c.visual = ml_collections.ConfigDict(dict(
      enabled=ablation != 'skeleton_only',
      hf_path='',            # a DINOv2 HF folder; '' builds the random encoder below
      preset='tiny',         # VitConfig class method when hf_path is ''
      image_size=64,
      # 16 patches of 16x16 pixels rather than 64 of 8x8: the feature cache of SynthSign default
      # took 152 s rather than 206 s (2 CPU cores), most of it now rendering the frames.
      patch_size=16,
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      feature_keys=('cls', 'mean_patch'),
      batch_frames=512,
      # Processes rendering SynthSign's frames for the cache (0: one thread). The rendering is
      # numpy that holds the GIL and took most of the cache's time.
      loader_processes=2,
      cache='',              # '' -> WORKDIR/features
      init_seed=0,           # the random encoder's weights (fixed across the run's seeds)
  ))

  c.model = ml_collections.ConfigDict()
  c.model.skeleton = ml_collections.ConfigDict(dict(
      part_dim=32, d_model=128, num_layers=2, num_heads=4, mlp_dim=256, dropout=0.1,
      temporal_kernel=5, temporal_strides=(2, 2), dtype='float32'))
  c.model.fusion = ml_collections.ConfigDict(dict(
      mode='rla' if ablation == 'rla' else 'gated_sum', skeleton_only=ablation == 'skeleton_only',
      visual_only=ablation == 'visual_only', d_model=128, visual_kernel=5, num_layers=0,
      num_heads=4, mlp_dim=256, dropout=0.1, visual_drop=0.0, dtype='float32',
      # Mode 'rla' only: RLA layers (one gate policy each), the gate distribution (beta |
      # categorical), the Beta's concentration, and a constant gate instead of the policies.
      rla_layers=2, gate_kind='beta', gate_concentration=10.0,
      gate_fixed=ml_collections.config_dict.placeholder(float)))
  c.model.decoder = ml_collections.ConfigDict(dict(
      hf_path='',            # an HF decoder folder; '' pretrains the small decoder below on text
      preset='',             # or a DecoderConfig preset (qwen3_8b, ...): sizes, random weights
      family='llama', hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, max_position_embeddings=256))
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=8, alpha=16.0,
      targets=('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')))

  # Text-only pretraining of the small decoder (only when model.decoder.hf_path is '').
  c.lm = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=50,
      seed=0))               # fixed across the run's seeds, like a downloaded checkpoint

  # Stage 1: sign-text alignment (FILIP contrastive + captioning).
  # A longer stage 1 is the cheapest way to a better translator here: from 1,600 stage-1 steps
  # rather than 800, SFT reached dev BLEU-4 10.7 rather than 7.1 at its step 800 (README).
  c.represent = ml_collections.ConfigDict(dict(
      steps=1600, batch_size=32, learning_rate=1e-3, warmup_steps=50, weight_decay=0.01,
      text_layers=2, embed_dim=128, temperature=0.07, caption_weight=1.0, caption_layers=1,
      caption_width=0,       # 0: the decoder's width
      log_every=50, checkpoint_every=400))

  # Stage 2: instruction tuning.
  c.sft = ml_collections.ConfigDict(dict(
      # The whole decoder is tuned: at this width, LoRA learned more slowly (dev BLEU-4 7.0 vs
      # 8.7 after 1,000 steps). The rate decays linearly to 1e-4 within the run's budget; dev
      # BLEU-4 still rose at the last step (README).
      steps=1100, batch_size=32, learning_rate=1e-3, warmup_steps=50, weight_decay=0.01,
      schedule='linear',     # cosine | linear (to end_factor x peak at `steps`) | constant
      end_factor=0.1,
      lora=False,            # True: LoRA adapters on the decoder (model.lora), base frozen
      eval_every=100, eval_examples=300, log_every=50, checkpoint_every=100,
      # Stop after `patience` evaluations without a new best mean of the last `stop_window`
      # dev BLEU-4s: on 300 clips it moves 1-2 points between nearby checkpoints. Not before
      # step `min_steps`: most of the dev gain comes late, as the rate decays (a run of 2,200
      # steps stopped at step 900 on such noise). Raise it with a longer `steps`.
      patience=3, stop_window=3, min_steps=1000))

  # Stage 3: GRPO.
  c.grpo = ml_collections.ConfigDict(dict(
      steps=200, batch_size=8, group_size=8, learning_rate=1e-3, warmup_steps=10,
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24,
      rewards=(('bleu', 0.5), ('rouge_l', 0.5)), advantage='grpo', epsilon=0.2,
      epsilon_high=0.0,      # 0: symmetric clipping
      beta=0.04, aggregation='seq_mean_token_mean', mu=1, lora_rank=8, lora_alpha=16.0,
      # True: the policy gradient also trains the sign encoder and projector (the reference
      # policy keeps their SFT values), at sign_encoder_lr_factor x the learning rate (1e-4
      # peak here, SFT's final rate); False: only the decoder's fresh adapters train.
      train_sign_encoder=False, sign_encoder_lr_factor=0.1,
      eval_every=40, eval_examples=300, log_every=10, checkpoint_every=40))

  c.eval = ml_collections.ConfigDict(dict(
      decode='greedy', beam_size=4, length_penalty=1.0, max_new_tokens=24, batch_size=100))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2))
  if 'tiny' in variants:
    _tiny(c)
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Tiny data, models and step counts: every stage runs, nothing learns much."""
  c.data.size = 'tiny'
  c.data.frame_buckets = (96,)
  c.tokenizer.vocab_size = 200
  c.visual.update(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                  batch_frames=256, loader_processes=0)  # spawning costs more than it renders
  c.model.skeleton.update(part_dim=8, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  c.model.fusion.update(d_model=32, num_heads=2, mlp_dim=64)
  c.model.decoder.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16)
  c.model.lora.rank = 4
  c.lm.update(steps=20, batch_size=16, warmup_steps=5)
  c.represent.update(steps=6, batch_size=8, warmup_steps=2, text_layers=1, embed_dim=32,
                     log_every=2, checkpoint_every=3)
  c.sft.update(steps=8, batch_size=8, warmup_steps=2, eval_every=4, eval_examples=8,
               log_every=2, checkpoint_every=4)
  c.grpo.update(steps=4, batch_size=8, group_size=2, warmup_steps=1, max_new_tokens=8,
                lora_rank=4, eval_every=2, eval_examples=8, log_every=1, checkpoint_every=2)
  c.eval.update(max_new_tokens=8, batch_size=16)
