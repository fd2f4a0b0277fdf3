"""A trained translator read back from its workdir: translating one clip, scoring.

    translator = load_translator('/tmp/rvlf')               # GRPO's best if trained, else SFT's
    text = translate_clip(translator, pose='clip.pose', frames='clip_frames/')

`load_translator` reads only what a finished run left in its workdir (see `recipe.run`):
config.json, the tokenizer, the config of the decoder (WORKDIR/decoder or model.decoder.hf_path)
and of the frame encoder (WORKDIR/dinov2 or visual.hf_path), and the stage's checkpoint, which
holds every parameter of the translator, the frozen decoder included. It generates no data,
trains no tokenizer and builds no feature cache; the decoder's weights are not even read, since
the checkpoint has them (only the shapes are needed to restore it).

One clip becomes a batch exactly as the pipeline makes one: keypoints from a pose file go
through `poses.load_pose` and `keypoints.to_wholebody` (as `PoseFileSource` reads real data),
frames through `video.load_frames` and the frozen encoder with the feature cache's
preprocessing (`features.build_feature_cache`'s resize, ImageNet statistics and float16
storage), then the recipe's `Featurizer` (joints, normalisation, frame buckets) and `collate`.
We ship no pose estimator: a model that reads keypoints needs a pose file.

`recipe.export` writes a translator as a folder that other code can use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from rvlf_jax import sharding
from rvlf_jax.data import features, keypoints, pipeline, poses, tokenizers, video
from rvlf_jax.eval import evaluate as evaluate_lib
from rvlf_jax.hf import api as hf_api
from rvlf_jax.hf import io as hf_io
from rvlf_jax.hf.convert import ConversionError
from rvlf_jax.models import slt, vit
from rvlf_jax.recipe import build, run
from rvlf_jax.recipe import data as data_lib
from rvlf_jax.recipe import stages as stages_lib
from rvlf_jax.train import grpo as grpo_lib
from rvlf_jax.train import loop
from rvlf_jax.train import params as params_lib

Log = Callable[[str], None]
# Translator stages, in the order `load_translator` prefers them.
STAGES = ('grpo', 'sft')
# Scored when asked for, never picked by default: SFT continued for the GRPO stage's time.
CONTROL = 'control'
DECODER_DIR, ENCODER_DIR = 'decoder', 'dinov2'
# What `recipe.data.prepare` leaves to `build_feature_cache`'s defaults: ImageNet's pixel
# statistics, and float16 storage (the cached features are rounded to it; so are ours).
CACHE_MEAN, CACHE_STD, CACHE_DTYPE = features.IMAGENET_MEAN, features.IMAGENET_STD, 'float16'


class FrameEncoder(NamedTuple):
  """The frozen DINOv2 that turns frames into the model's 'visual' features.

  Attributes:
    config: its architecture.
    params: its parameters (on the default device).
    path: the HF folder it was read from.
  """

  config: vit.VitConfig
  params: Any
  path: str


@dataclasses.dataclass
class Translator:
  """A trained translator and everything needed to run it on a new clip.

  Attributes:
    config: the run's recipe config (from WORKDIR/config.json).
    workdir: the run's folder.
    stage: 'sft' or 'grpo', the stage whose checkpoint was restored.
    which: which checkpoint of the stage: 'best', 'latest' or a step.
    model: the translator module (its config carries the stage's LoRA adapters, if any).
    params: its full parameters {'sign_encoder', 'projector', 'decoder'}, adapters unmerged.
    tokenizer: the decoder's tokenizer.
    prompt: the instruction ids around the sign tokens.
    featurizer: the recipe's example -> model inputs transform (no feature cache).
    encoder: the frame encoder, when the model reads visual features; else None.
    log: receives progress lines.
  """

  config: ml_collections.ConfigDict
  workdir: str
  stage: str
  which: str | int
  model: slt.SLTModel
  params: Any
  tokenizer: tokenizers.Tokenizer
  prompt: slt.Prompt
  featurizer: pipeline.Featurizer
  encoder: FrameEncoder | None
  log: Log = logging.info

  @property
  def uses_keypoints(self) -> bool:
    return self.model.config.sign.fusion.uses_skeleton

  @property
  def uses_frames(self) -> bool:
    return self.model.config.sign.fusion.uses_visual


# -- Reading a workdir ---------------------------------------------------------------------------


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in WORKDIR/config.json.

  Raises:
    FileNotFoundError: the workdir or its config.json is missing.
  """
  path = os.path.join(workdir, run.CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such folder (expected the --workdir of a '
                            'launch.train run).')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing; {workdir} is not the workdir of a launch.train run '
                            '(or that run has not started).')
  with open(path) as f:
    return build.from_json(json.dumps(run.with_added_keys(json.load(f))))


def _has_checkpoints(workdir: str, stage: str) -> bool:
  folder = os.path.join(workdir, stage, loop.CHECKPOINTS_DIR)
  # orbax names each step's folder by its step number.
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def pick_stage(workdir: str, stage: str | None = None) -> str:
  """`stage` checked to have checkpoints, or (None) 'grpo' if it has any, else 'sft'.

  Raises:
    ValueError: an unknown stage.
    stages.MissingCheckpointError: the stage (or neither) has checkpoints in the workdir.
  """
  if stage is not None and stage not in (*STAGES, CONTROL):
    raise ValueError(f'stage must be one of {(*STAGES, CONTROL)} (the stages that train a '
                     f'translator), got {stage!r}.')
  for name in (stage,) if stage else STAGES:
    if _has_checkpoints(workdir, name):
      return name
  if stage:
    raise stages_lib.MissingCheckpointError(
        f'{os.path.join(workdir, stage, loop.CHECKPOINTS_DIR)}: no {stage!r} checkpoint in the '
        f'workdir {workdir}; run launch.train --stage={stage} there first.')
  raise stages_lib.MissingCheckpointError(
      f'{workdir}: neither a grpo nor an sft checkpoint (looked in '
      f'{{grpo,sft}}/{loop.CHECKPOINTS_DIR}); train the run first (launch.train --stage=all).')


def _hf_model(path: str, what: str) -> tuple[Any, hf_api.Family]:
  """(our config, its family) of an HF folder, as `load_hf` builds the config, no weights read."""
  try:
    hf_config = hf_io.read_config(path)
  except ConversionError as e:
    raise ConversionError(f'{what}: {e}') from e
  family = hf_api.family_for(hf_config.get('model_type'), os.path.join(path, 'config.json'))
  return family.config_from_hf(hf_config), family


def encoder_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The frame encoder's HF folder: visual.hf_path, or the one the run wrote."""
  return config.visual.hf_path or os.path.join(workdir, data_lib.ENCODER_DIR)


def decoder_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The pretrained decoder's HF folder: model.decoder.hf_path, or the one the run wrote."""
  return config.model.decoder.hf_path or os.path.join(workdir, run.DECODER_DIR)


def light_context(config: ml_collections.ConfigDict, workdir: str,
                  log: Log = logging.info) -> stages_lib.Context:
  """A stages.Context for restoring, from what the workdir holds and nothing else.

  Its data has no sources (nothing to train or score on) and a featurizer without feature
  cache; its decoder is the pretrained decoder's config with abstract parameters
  (`jax.ShapeDtypeStruct`s): the checkpoints hold the decoder, so its weights are not read.
  Its mesh is this process's first device, whatever mesh trained the checkpoint: translating a
  clip or exporting needs no more. Use `restore` with it.
  """
  tokenizer = data_lib.load_tokenizer(config, workdir)
  frames_dir, visual_width = None, None
  if config.visual.enabled:
    frames_dir = encoder_dir(config, workdir)
    width = _hf_model(frames_dir, 'the frame encoder')[0].hidden_size
    visual_width = build.visual_dim(config, width)
  stats = data_lib.load_keypoint_stats(config, workdir)
  data = data_lib.Data(tokenizer, data_lib.featurizer(config, tokenizer, stats=stats),
                       sources={}, texts={}, visual_width=visual_width,
                       encoder_dir=frames_dir)
  path = decoder_dir(config, workdir)
  decoder_cfg, family = _hf_model(path, 'the pretrained decoder')
  decoder = (decoder_cfg, family.abstract_params(decoder_cfg))
  one_device = sharding.mesh_from_config((1, 1, 1), jax.local_devices()[:1])
  return stages_lib.Context(config, workdir, data, decoder,
                            stages_lib.prompt_for(data, config), log, one_device)


def _fit_mesh(config: ml_collections.ConfigDict, log: Log) -> None:
  """Replaces a config's mesh that does not fit this machine's devices by data parallelism over
  all of them: a checkpoint restores onto any mesh."""
  try:
    sharding.mesh_from_config(config)
  except build.ConfigError as e:
    log(f'{str(e).rstrip(".")}; evaluating data-parallel over the {jax.device_count()} '
        'devices instead.')
    config.mesh.update(data=-1, fsdp=1, tensor=1)


def restore(ctx: stages_lib.Context, stage: str, which: str | int = 'best'
            ) -> tuple[slt.SLTModel, Any]:
  """(model, full parameters) of a stage's checkpoint, onto ctx.mesh; ctx.decoder's params may
  be abstract.

  The restore target is the stage's own (`stages._sft_setup` / `_grpo_setup`): shapes traced
  from its initialiser, shardings over ctx.mesh, so nothing of the decoder is materialised but
  what the checkpoint holds.
  """
  # pylint: disable=protected-access
  params_of = params_lib.merge
  if stage in ('sft', CONTROL):
    make_setup = stages_lib._sft_setup
  elif stage == 'grpo':
    make_setup, params_of = stages_lib._grpo_setup, grpo_lib.policy_params
  else:
    raise ValueError(f'stage must be one of {(*STAGES, CONTROL)}, got {stage!r}.')
  # pylint: enable=protected-access
  pick_stage(ctx.workdir, stage)
  model, _, setup = make_setup(ctx, None)
  state = loop.restore_state(ctx.workdir, stage, setup.target, which)
  return model, params_of(state.params, state.frozen)


def load_frame_encoder(config: ml_collections.ConfigDict, workdir: str) -> FrameEncoder:
  path = encoder_dir(config, workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: missing; the model reads frame features and this is where '
                            'its frozen frame encoder should be.')
  cfg, params = hf_api.load_hf(path)
  return FrameEncoder(cfg, jax.device_put(params), path)


def load_translator(workdir: str, stage: str | None = None, which: str | int = 'best', *,
                    log: Log = logging.info) -> Translator:
  """The translator a launch.train run trained, restored from its workdir.

  Args:
    workdir: the run's folder.
    stage: 'grpo' or 'sft'; None takes 'grpo' if the workdir has GRPO checkpoints, else 'sft'.
    which: 'best' (by dev BLEU-4), 'latest', or a step.
    log: receives progress lines.

  Returns:
    The Translator.

  Raises:
    FileNotFoundError: no config.json, tokenizer, decoder or frame encoder folder in the workdir,
      or (stages.MissingCheckpointError) no checkpoint of the stage.
  """
  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  stage = pick_stage(workdir, stage)
  ctx = light_context(config, workdir, log)
  model, params = restore(ctx, stage, which)
  encoder = None
  if model.config.sign.fusion.uses_visual:
    encoder = load_frame_encoder(config, workdir)
  log(f'{workdir}: restored the {which} {stage} checkpoint'
      + (f' and the frame encoder {encoder.path}' if encoder else ''))
  return Translator(config, workdir, stage, which, model, params, ctx.data.tokenizer, ctx.prompt,
                    ctx.data.featurizer, encoder, log)


# -- One clip ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
  """One clip's inputs before featurizing.

  Attributes:
    clip_id: a name for messages and the batch's 'id'.
    keypoints: float32[T, 133, 2] COCO-WholeBody points (zeros when the model reads none).
    scores: float32[T, 133] their confidences.
    visual: {feature key: float32[T, D]} frame features, or None.
  """

  clip_id: str
  keypoints: np.ndarray
  scores: np.ndarray
  visual: dict[str, np.ndarray] | None = None

  @property
  def num_frames(self) -> int:
    return self.keypoints.shape[0]


class _OneClip:
  """A feature cache of one clip, for the Featurizer (which reads features by clip id)."""

  def __init__(self, visual: Mapping[str, np.ndarray]):
    self.visual = visual

  def get(self, clip_id: str) -> Mapping[str, np.ndarray]:
    del clip_id
    return self.visual


def frame_size(config: ml_collections.ConfigDict) -> int | None:
  """The size frames are loaded at, as the run's feature cache got them.

  SynthSign clips reach the cache at their rendered size and are resized inside the encoder's
  jitted function; real datasets' frames are resized on loading (`pipeline.annotation_clips`).
  """
  return None if config.data.dataset == 'synthsign' else int(config.visual.image_size)


def frame_features(encoder: FrameEncoder, frames: np.ndarray, config: ml_collections.ConfigDict
                   ) -> dict[str, np.ndarray]:
  """Per-frame features of one clip, computed as the run's feature cache computed them.

  The same jitted function as `features.build_feature_cache` (same resize, pixel statistics,
  pooling and batch of `visual.batch_frames` images, padded with black frames), rounded to the
  cache's dtype.

  Args:
    encoder: the frozen frame encoder.
    frames: uint8[T, H, W, C].
    config: the run's config (visual.feature_keys, image_size, batch_frames).

  Returns:
    {feature key: float32[T, D]}.
  """
  frames = np.asarray(frames)
  channels = encoder.config.num_channels
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != channels:
    raise ValueError(f'frames must be uint8[T, H, W, {channels}], got '
                     f'{frames.dtype}{list(frames.shape)}.')
  if not len(frames):
    raise ValueError('the clip has no frames.')
  v = config.visual
  names = tuple(v.feature_keys)
  # pylint: disable=protected-access
  encode = features._encode_fn(encoder.config, names, features._image_size(int(v.image_size)),
                               CACHE_MEAN, CACHE_STD, CACHE_DTYPE)
  # pylint: enable=protected-access
  size = int(v.batch_frames)
  pieces = {name: [] for name in names}
  for start in range(0, len(frames), size):
    chunk = frames[start:start + size]
    n = len(chunk)
    if n < size:
      chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), np.uint8)])
    out = jax.device_get(encode(encoder.params, chunk))
    for name in names:
      pieces[name].append(np.asarray(out[name][:n]))
  return {name: np.concatenate(p).astype(np.float32) for name, p in pieces.items()}


def _resample(frames: np.ndarray, length: int) -> np.ndarray:
  """`length` frames taken uniformly over the clip (the Featurizer's temporal subsampling)."""
  keep = np.linspace(0, len(frames) - 1, length).round().astype(np.int64)
  return frames[keep]


def read_clip(translator: Translator, *, pose: str | poses.Pose | None = None,
              video: str | None = None, frames: str | np.ndarray | None = None) -> Clip:
  """Reads the inputs of one clip that the translator's model needs.

  Args:
    translator: the loaded translator.
    pose: a `.pose` file or RTMPose `.pkl` (or a loaded `poses.Pose`), for the keypoints.
    video: a video file, for the frames.
    frames: a folder of frame images (PNG, JPEG), or uint8[T, H, W, 3] frames.

  Returns:
    The Clip. When both keypoints and frames are used and their frame counts differ, the frames
    are resampled uniformly to the pose's count (and a line is logged).

  Raises:
    ValueError: an input the model needs is missing (we ship no pose estimator, so a model that
      reads keypoints needs a pose file), video and frames are both given, or an input is bad.
    PoseError, VideoError (ValueErrors): an unreadable pose file, video or frame folder.
  """
  if video is not None and frames is not None:
    raise ValueError('give the clip\'s frames once: either video= (a video file) or frames= (a '
                     'frame folder), not both.')
  config, log = translator.config, translator.log
  strict = bool(config.data.strict)
  clip_id = 'clip'
  for source in (pose, video, frames):
    if isinstance(source, (str, os.PathLike)):
      clip_id = os.path.basename(os.path.normpath(os.fspath(source)))
      break
  if translator.uses_keypoints and pose is None:
    raise ValueError(f'the {translator.stage} model of {translator.workdir} reads keypoints: '
                     'give a pose file (pose=, --pose; .pose or RTMPose .pkl). rvlf_jax ships no '
                     'pose estimator, so keypoints cannot be computed from the video.')
  if translator.uses_frames and video is None and frames is None:
    raise ValueError(f'the {translator.stage} model of {translator.workdir} reads frame '
                     'features: give the clip\'s video (video=, --video) or frame folder '
                     '(frames=, --frames).')

  kp = scores = None
  if pose is not None and translator.uses_keypoints:
    if not isinstance(pose, poses.Pose):
      pose = poses.load_pose(pose, strict=strict)
    body = keypoints.to_wholebody(pose, strict=strict)
    kp, scores = body.keypoints, body.scores
  elif pose is not None:
    log(f'{clip_id}: the model reads no keypoints; the pose is not used.')

  visual = None
  if translator.uses_frames:
    source = video if video is not None else frames
    if isinstance(source, np.ndarray):
      images = source
    else:
      images = load_clip_frames(source, config)
    if kp is not None and len(images) != len(kp):
      log(f'{clip_id}: {len(images)} frames but {len(kp)} pose frames; resampled the frames '
          f'uniformly to {len(kp)}.')
      images = _resample(images, len(kp))
    visual = frame_features(translator.encoder, images, config)
  elif video is not None or frames is not None:
    log(f'{clip_id}: the model reads no frame features; the frames are not used.')

  if kp is None:  # a visual-only model: the Featurizer still wants (unread) keypoints
    t = len(next(iter(visual.values())))
    kp = np.zeros((t, keypoints.NUM_KEYPOINTS, 2), np.float32)
    scores = np.zeros((t, keypoints.NUM_KEYPOINTS), np.float32)
  return Clip(clip_id, kp, scores, visual)


def load_clip_frames(path: str | os.PathLike, config: ml_collections.ConfigDict) -> np.ndarray:
  """uint8[T, H, W, 3] frames of a video file or frame folder, at `frame_size(config)`."""
  return video.load_frames(path, size=frame_size(config))


def clip_batch(translator: Translator, clip: Clip) -> dict[str, np.ndarray]:
  """The model batch of one clip: the recipe's Featurizer (joints, normalisation, at most the
  largest frame bucket) and `collate` into one row padded to its frame bucket."""
  featurize = dataclasses.replace(
      translator.featurizer, tokenizer=None, strict=True,
      feature_cache=None if clip.visual is None else _OneClip(clip.visual))
  example = featurize({'id': clip.clip_id, 'keypoints': clip.keypoints, 'scores': clip.scores,
                       'text': ''})
  if example.get('truncated'):
    translator.log(f'{clip.clip_id}: {clip.num_frames} frames, more than the largest frame '
                   f'bucket; subsampled uniformly to {translator.featurizer.buckets.frames[-1]}.')
  return pipeline.collate([example], translator.featurizer.buckets,
                          pad_id=translator.tokenizer.pad_id, batch_size=1)


def translate_batches(translator: Translator, batches, *, decode: str | None = None,
                      beam_size: int | None = None) -> list[tuple[str, str]]:
  """[(id, translation)] of pipeline batches with the config's eval decoding (decode and
  beam_size override it)."""
  e = translator.config.eval
  return evaluate_lib.translate(
      translator.model, translator.params, batches, translator.prompt, translator.tokenizer,
      decode=decode or e.decode, beam_size=int(beam_size or e.beam_size),
      max_new_tokens=int(e.max_new_tokens), length_penalty=float(e.length_penalty))


def translate_clip(translator: Translator, *, pose: str | poses.Pose | None = None,
                   video: str | None = None, frames: str | np.ndarray | None = None,
                   decode: str | None = None, beam_size: int | None = None) -> str:
  """The translation of one clip.

  Args:
    translator: from `load_translator`.
    pose, video, frames: the clip's inputs (see `read_clip`): a pose file when the model reads
      keypoints, a video or frame folder when it reads frame features.
    decode: 'greedy' or 'beam'; None uses the config's eval.decode.
    beam_size: for beam search; None uses eval.beam_size.

  Raises:
    ValueError: a missing or bad input (see `read_clip`).
  """
  clip = read_clip(translator, pose=pose, video=video, frames=frames)
  [(_, text)] = translate_batches(translator, [clip_batch(translator, clip)], decode=decode,
                                  beam_size=beam_size)
  return text


# -- Scoring a split -----------------------------------------------------------------------------


def evaluate_checkpoint(workdir: str, split: str, stage: str | None = None,
                        which: str | int = 'best', *, decode: str | None = None,
                        beam_size: int | None = None, output_dir: str | None = None,
                        synthsign_size: str | None = None,
                        log: Log = logging.info) -> dict[str, float]:
  """Scores a stage's checkpoint on a split, as the run scored it (`stages.score_splits`).

  Prepares the data through `run.context`, which reuses what the workdir holds (dataset cache,
  tokenizer, feature cache, pretrained decoder).

  Args:
    workdir: the run's folder.
    split: 'dev' or 'test' (or 'train').
    stage: as for `load_translator`.
    which: 'best', 'latest' or a step.
    decode, beam_size: override eval.decode and eval.beam_size.
    output_dir: where to write hyps.txt, refs.txt and ids.txt (None: nowhere).
    synthsign_size: a SynthSign run only: score `split` of this larger SynthSign instead (its
      first clips are the run's own; `data_lib.larger_synthsign`).
    log: receives progress lines.

  Returns:
    {'bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l'}.
  """
  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  if split not in data_lib.SPLITS:
    raise ValueError(f'split must be one of {data_lib.SPLITS}, got {split!r}.')
  stage = pick_stage(workdir, stage)
  if decode is not None:
    config.eval.decode = decode
  if beam_size is not None:
    config.eval.beam_size = int(beam_size)
  _fit_mesh(config, log)
  ctx = run.context(config, workdir, log)
  where = split
  if synthsign_size:
    ctx = dataclasses.replace(ctx, data=data_lib.larger_synthsign(
        config, workdir, ctx.data, synthsign_size, split, log))
    where = f'{split} of SynthSign {synthsign_size!r} ({len(ctx.data.sources[split])} clips)'
  model, params = restore(ctx, stage, which)
  log(f'{workdir}: scoring the {which} {stage} checkpoint on {where} '
      f'({config.eval.decode} decoding)')
  return stages_lib.translate_scores(ctx, model, params,
                                     ctx.data.eval(split, int(config.eval.batch_size)),
                                     output_dir=output_dir)
