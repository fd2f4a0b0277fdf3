"""From a recipe config (an ml_collections ConfigDict, `configs/*.py`) to the models' dataclasses.

Every builder checks the config as it goes and raises `ConfigError` naming the key at fault, so a
bad config fails before any data is read or any model is built. `check` runs all of them plus the
cross-field rules (stages, mesh against devices and batch sizes); `launch.train` calls it first.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

from rvlf_jax.data import keypoints
from rvlf_jax.hf import io as hf_io
from rvlf_jax.models import fusion, skeleton, slt, vit
from rvlf_jax.models.decoder import DecoderConfig
from rvlf_jax.models.layers import LoraConfig
from rvlf_jax.rl import advantages, losses, rewards as rewards_lib, sampler
from rvlf_jax.train import optimizers
# A module import, read at call time: train.grpo imports rvlf_jax.sharding, which imports this.
from rvlf_jax.train import grpo as grpo_lib

STAGES = ('represent', 'sft', 'grpo')
DATASETS = ('synthsign', 'phoenix', 'csl_daily', 'how2sign', 'openasl')
MESH_AXES = ('data', 'fsdp', 'tensor')
# The sections that hold a batch size and the stage they train.
_BATCHED = (('represent', 'represent'), ('sft', 'sft'), ('grpo', 'grpo'))


class ConfigError(ValueError):
  """A recipe config that cannot run, with the key at fault in the message."""


def _section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  if name not in config:
    raise ConfigError(f'the config has no {name!r} section (see configs/synthsign.py).')
  return config[name]


def _fields(cls: type, values: Mapping[str, Any], where: str, **extra) -> Any:
  """cls(**values, **extra), naming unknown keys and bad values with their config path."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f'{where}: unknown key(s) {unknown}; {cls.__name__} takes {sorted(known)}.')
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  try:
    return cls(**kwargs, **extra)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{where}: {e}') from e


def _dict(section: ml_collections.ConfigDict | Mapping[str, Any], drop: Sequence[str] = ()):
  values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  return {k: v for k, v in values.items() if k not in drop}


def visual_dim(config: ml_collections.ConfigDict, encoder_width: int | None = None) -> int:
  """Width of the per-frame visual features: encoder width x number of pooled feature keys."""
  v = _section(config, 'visual')
  width = encoder_width if encoder_width is not None else vit_config(config).hidden_size
  return width * len(v.feature_keys)


def vit_config(config: ml_collections.ConfigDict) -> vit.VitConfig:
  """The frozen frame encoder: read from visual.hf_path, or a preset with the section's sizes."""
  v = _section(config, 'visual')
  runtime = {k: v[k] for k in RUNTIME_FIELDS if k in v}
  if v.hf_path:
    return vit.VitConfig.from_hf_config(hf_io.read_config(v.hf_path), **runtime)
  preset = getattr(vit.VitConfig, v.preset, None)
  if preset is None or v.preset.startswith('_'):
    raise ConfigError(f'visual.preset: no VitConfig preset {v.preset!r}.')
  sizes = {k: v[k] for k in ('image_size', 'patch_size', 'hidden_size', 'num_layers',
                             'num_heads') if k in v}
  try:
    return preset(**sizes, **runtime) if v.preset == 'tiny' else preset(**runtime)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'visual: {e}') from e


def sign_config(config: ml_collections.ConfigDict, visual_width: int | None = None
                ) -> fusion.SignEncoderConfig:
  """The sign encoder (skeleton stream, visual stream, fusion)."""
  m = _section(config, 'model')
  skel = _fields(skeleton.SkeletonConfig, _dict(m.skeleton), 'model.skeleton')
  joints = config.data.get('joints', '')
  if joints:
    if joints not in keypoints.SUBSETS:
      raise ConfigError(f'data.joints: unknown subset {joints!r}; one of '
                        f'{sorted(keypoints.SUBSETS)}.')
    skel = skel.replace(parts=skeleton.subset_parts(joints, selected=True),
                        num_joints=len(keypoints.SUBSETS[joints].indices))
  fusion_values = _dict(m.fusion)
  if 'visual_dim' not in fusion_values:
    fusion_values['visual_dim'] = (visual_width if visual_width is not None
                                   else visual_dim(config))
  fuse = _fields(fusion.FusionConfig, fusion_values, 'model.fusion')
  if not fuse.skeleton_only and not config.visual.enabled:
    raise ConfigError('model.fusion uses the visual stream but visual.enabled is False; set '
                      'model.fusion.skeleton_only=True or enable the visual features.')
  return _fields(fusion.SignEncoderConfig, {}, 'model', skeleton=skel, fusion=fuse)


# Fields of a preset or HF config that say how, not what, the model computes: settable on top.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'scan_layers')


def _runtime(values: dict[str, Any]) -> dict[str, Any]:
  return {k: values.pop(k) for k in RUNTIME_FIELDS if k in values}


def decoder_config(config: ml_collections.ConfigDict, vocab_size: int | None) -> DecoderConfig:
  """The LLM: read from model.decoder.hf_path, a preset (model.decoder.preset, a DecoderConfig
  class method), or the small decoder of the section's sizes. dtype, param_dtype, remat and
  scan_layers apply on top of a preset or HF config; other sizes must agree with it."""
  d = _dict(_section(config, 'model').decoder)
  hf_path = d.pop('hf_path', '')
  preset = d.pop('preset', '')
  runtime = _runtime(d)
  if hf_path or preset:
    if hf_path:
      if not os.path.isdir(hf_path):
        raise ConfigError(f'model.decoder.hf_path: {hf_path} is not a folder.')
      base = DecoderConfig.from_hf_config(hf_io.read_config(hf_path))
      origin = f'model.decoder.hf_path={hf_path}'
    else:
      make = getattr(DecoderConfig, preset, None)
      if make is None or preset.startswith('_') or preset == 'tiny':
        raise ConfigError(f'model.decoder.preset: no DecoderConfig preset {preset!r}.')
      base = make()
      origin = f'model.decoder.preset={preset}'
    d.pop('family', None)
    for key, value in d.items():
      if not hasattr(base, key):
        raise ConfigError(f'model.decoder.{key}: not a DecoderConfig field.')
      if getattr(base, key) != value:
        raise ConfigError(f'model.decoder.{key}={value!r} disagrees with {origin} '
                          f'({getattr(base, key)!r}); drop the key or change the source.')
    try:
      return dataclasses.replace(base, **runtime)
    except (TypeError, ValueError) as e:
      raise ConfigError(f'model.decoder: {e}') from e
  if vocab_size is None:
    raise ConfigError('model.decoder: a decoder built from sizes needs the tokenizer\'s vocab '
                      'size.')
  family = d.pop('family', 'llama')
  try:
    return DecoderConfig.tiny(family, vocab_size=vocab_size, **d, **runtime)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'model.decoder: {e}') from e


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
  """SFT's adapters, or None for full fine-tuning (sft.lora False)."""
  if not config.sft.lora:
    return None
  return _fields(LoraConfig, _dict(config.model.lora), 'model.lora')


def slt_config(config: ml_collections.ConfigDict, decoder: DecoderConfig,
               visual_width: int | None = None, lora: LoraConfig | None = None) -> slt.SLTConfig:
  return slt.SLTConfig(sign_config(config, visual_width), decoder, lora)


def aligner_config(config: ml_collections.ConfigDict, decoder: DecoderConfig,
                   visual_width: int | None = None) -> slt.AlignerConfig:
  """Stage 1: the sign encoder, a text encoder and a small captioning decoder of the LLM's
  vocabulary (the decoder's sizes, `represent.caption_layers` layers)."""
  r = _section(config, 'represent')
  sign = sign_config(config, visual_width)
  text = _fields(skeleton.EncoderConfig, dict(
      d_model=sign.d_model, num_layers=r.text_layers, num_heads=sign.fusion.num_heads,
      mlp_dim=sign.fusion.mlp_dim, dropout=sign.fusion.dropout), 'represent.text_layers')
  caption = None
  if r.caption_weight > 0:
    if r.caption_layers < 1:
      raise ConfigError('represent.caption_layers must be >= 1 when caption_weight > 0.')
    width = int(r.get('caption_width', 0)) or decoder.hidden_size
    sizes = {}
    if width != decoder.hidden_size:
      # A narrow captioner of the LLM's vocabulary (tied embeddings, 64-wide heads), as in
      # AlignerConfig.base: a full-width one would be mostly an untrained embedding table.
      heads = max(1, width // 64)
      sizes = dict(hidden_size=width, intermediate_size=3 * width, num_heads=heads,
                   num_kv_heads=heads, head_dim=width // heads, tie_embeddings=True)
    try:
      caption = dataclasses.replace(decoder, num_layers=r.caption_layers, scan_layers=False,
                                    remat='none', layer_types=None if decoder.layer_types is None
                                    else decoder.layer_types[:r.caption_layers], **sizes)
    except (TypeError, ValueError) as e:
      raise ConfigError(f'represent.caption_width: {e}') from e
  return _fields(slt.AlignerConfig, dict(
      vocab_size=decoder.vocab_size, embed_dim=r.embed_dim, temperature=r.temperature,
      caption_weight=r.caption_weight), 'represent', sign=sign, text=text, caption=caption)


def optimizer_config(config: ml_collections.ConfigDict, stage: str,
                     total_steps: int | None = None) -> optimizers.OptimizerConfig:
  s = _section(config, stage)
  return _fields(optimizers.OptimizerConfig, dict(
      learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
      total_steps=total_steps or s.steps, weight_decay=s.get('weight_decay', 0.0),
      schedule=s.get('schedule', 'cosine'), end_factor=s.get('end_factor', 0.1)), stage)


def grpo_config(config: ml_collections.ConfigDict) -> grpo_lib.GRPOConfig:
  g = _section(config, 'grpo')
  sampling = _fields(sampler.SamplingConfig, dict(
      temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
      max_new_tokens=g.max_new_tokens), 'grpo')
  rewards = tuple((str(name), float(w)) for name, w in g.rewards)
  for name, _ in rewards:
    if name not in rewards_lib.REWARDS:
      raise ConfigError(f'grpo.rewards: unknown reward {name!r}; registered: '
                        f'{rewards_lib.REWARDS.names()}.')
  if g.advantage not in advantages.ESTIMATORS:
    raise ConfigError(f'grpo.advantage: unknown estimator {g.advantage!r}; registered: '
                      f'{advantages.ESTIMATORS.names()}.')
  if g.aggregation not in losses.AGGREGATIONS:
    raise ConfigError(f'grpo.aggregation: unknown mode {g.aggregation!r}; registered: '
                      f'{losses.AGGREGATIONS.names()}.')
  return _fields(grpo_lib.GRPOConfig, dict(
      group_size=g.group_size, rewards=rewards, advantage=g.advantage, epsilon=g.epsilon,
      epsilon_high=g.epsilon_high or None, beta=g.beta, aggregation=g.aggregation, mu=g.mu,
      lang=config.data.lang, train_sign_encoder=bool(g.train_sign_encoder)),
      'grpo', sampling=sampling)


def grpo_lora(config: ml_collections.ConfigDict) -> LoraConfig:
  """GRPO's fresh adapters on the merged SFT decoder."""
  g = _section(config, 'grpo')
  return _fields(LoraConfig, dict(rank=g.lora_rank, alpha=g.lora_alpha,
                                  targets=tuple(config.model.lora.targets)), 'grpo.lora_rank')


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{'data', 'fsdp', 'tensor'} sizes with one -1 filled so the product is num_devices."""
  m = _section(config, 'mesh')
  unknown = sorted(set(m.keys()) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f'mesh: unknown axes {unknown}; axes are {MESH_AXES}.')
  sizes = {axis: int(m.get(axis, 1)) for axis in MESH_AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ConfigError(f'mesh: sizes must be positive, with at most one -1; got {sizes}.')
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f'mesh: the fixed axes {sizes} use {fixed} devices, which does not '
                        f'divide the {num_devices} devices present.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f'mesh: {sizes} needs {fixed} devices but {num_devices} are present.')
  return sizes


def parse_stages(value: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
  """A --stage flag: 'all' -> STAGES; 'sft,grpo' -> ('sft', 'grpo'), in recipe order; `extra`
  names more stages the caller accepts (launch.train's 'control')."""
  if value == 'all':
    return STAGES
  known = STAGES + tuple(extra)
  names = tuple(s.strip() for s in value.split(',') if s.strip())
  for name in names:
    if name not in known:
      raise ConfigError(f'--stage: unknown stage {name!r}; use all or some of {known}.')
  if not names:
    raise ConfigError('--stage is empty.')
  return tuple(s for s in known if s in names)


def check(config: ml_collections.ConfigDict, *, stages: Sequence[str], num_devices: int,
          num_processes: int = 1) -> None:
  """Every rule a run needs before it starts; raises ConfigError on the first broken one."""
  for stage in stages:
    if stage not in STAGES:
      raise ConfigError(f'unknown stage {stage!r}; stages are {STAGES} (or "all").')
  if config.data.dataset not in DATASETS:
    raise ConfigError(f'data.dataset: unknown dataset {config.data.dataset!r}; one of '
                      f'{DATASETS}.')
  sizes = mesh_shape(config, num_devices)
  data_ways = sizes['data'] * sizes['fsdp']
  for section, stage in _BATCHED:
    batch = int(config[section].batch_size)
    if batch % data_ways:
      raise ConfigError(f'{section}.batch_size={batch} is not divisible by the mesh\'s data x '
                        f'fsdp = {data_ways} ways (mesh {sizes}).')
    if batch % num_processes:
      raise ConfigError(f'{section}.batch_size={batch} is not divisible by the {num_processes} '
                        'processes.')
    if int(config[section].steps) < 1:
      raise ConfigError(f'{section}.steps must be >= 1, got {config[section].steps}.')
  if config.eval.decode not in ('greedy', 'beam'):
    raise ConfigError(f"eval.decode must be 'greedy' or 'beam', got {config.eval.decode!r}.")
  sign_config(config, visual_width=1)  # checks the model sections (width filled later)
  if config.visual.enabled and not config.visual.hf_path:
    vit_config(config)
  if config.model.decoder.get('preset') or config.model.decoder.hf_path:
    decoder_config(config, None)
  optimizer_config(config, 'represent')
  optimizer_config(config, 'sft')
  optimizer_config(config, 'grpo')
  sft = config.sft
  if int(sft.patience) < 0 or int(sft.stop_window) < 1 or int(sft.min_steps) < 0:
    raise ConfigError(f'sft early stopping: patience ({sft.patience}) and min_steps '
                      f'({sft.min_steps}) must be >= 0 and stop_window ({sft.stop_window}) >= 1.')
  if grpo_config(config).train_sign_encoder and not config.grpo.sign_encoder_lr_factor > 0:
    raise ConfigError('grpo.sign_encoder_lr_factor must be > 0 with grpo.train_sign_encoder, '
                      f'got {config.grpo.sign_encoder_lr_factor}.')
  if config.sft.lora:
    lora_config(config)
  grpo_lora(config)


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved by `to_json`, lists turned back into tuples."""
  import json

  def tuples(value):
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return value

  return ml_collections.ConfigDict(tuples(json.loads(text)))
