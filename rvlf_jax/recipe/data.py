"""The recipe's data: dataset, tokenizer, frame features and pipelines, prepared under a workdir.

`prepare(config, workdir)` makes (or reuses) everything a run reads and returns a `Data`:
  WORKDIR/data/synthsign/   the generated SynthSign cache (unless data.root names one)
  WORKDIR/tokenizer/        spm.model, trained on the train split's translations
  WORKDIR/dinov2/           the frozen frame encoder as a HuggingFace folder
  WORKDIR/features/         its per-frame features of every clip (`data.features`)
  WORKDIR/keypoint_stats.npz  per-joint mean and std of the normalised train keypoints
Each step is skipped when its output is already there, so a resumed run prepares nothing twice.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from rvlf_jax.data import annotations, features, keypoints, pipeline, tokenizers
from rvlf_jax.data.errors import DataError
from rvlf_jax.data.synthsign import SIZES as SYNTHSIGN_SIZES
from rvlf_jax.data.synthsign import SynthSign, SynthSignConfig
from rvlf_jax.data.synthsign.describe import prepare as prepare_synthsign
from rvlf_jax.hf import api as hf_api
from rvlf_jax.models import vit
from rvlf_jax.recipe import build

SPLITS = ('train', 'dev', 'test')
TOKENIZER_DIR, ENCODER_DIR, FEATURES_DIR = 'tokenizer', 'dinov2', 'features'
KEYPOINT_STATS = 'keypoint_stats.npz'


@dataclasses.dataclass
class Data:
  """Everything the stages read.

  Attributes:
    tokenizer: the text tokenizer (the decoder's vocabulary).
    featurizer: example -> model inputs (keypoints, visual features, text ids).
    sources: split -> random-access examples.
    texts: split -> the translations, for the tokenizer and the text-only pretraining.
    visual_width: width of the 'visual' features, or None without the visual stream.
    encoder_dir: the frame encoder's HF folder (None without the visual stream).
    workers: grain worker processes.
    in_memory: featurize each example once and keep it in memory for the rest of the run
      (`pipeline.FeaturizedSource`), instead of featurizing it again in every epoch.
    group_by_length: training batches of clips of similar length, sorted within windows of this
      many batches (`pipeline.length_grouped_order`; 0: off; only where the source knows its
      clips' lengths, e.g. SynthSign).
  """

  tokenizer: tokenizers.Tokenizer
  featurizer: pipeline.Featurizer
  sources: dict[str, Sequence[Any]]
  texts: dict[str, list[str]]
  visual_width: int | None
  encoder_dir: str | None
  workers: int = 0
  in_memory: bool = False
  group_by_length: int = 0
  _featurized: dict[str, pipeline.FeaturizedSource] = dataclasses.field(
      default_factory=dict, repr=False)

  def _source(self, split: str) -> tuple[Sequence[Any], pipeline.Featurizer | None]:
    """(source, featurizer) for a pipeline: the split's shared in-memory source when on."""
    if not self.in_memory:
      return self.sources[split], self.featurizer
    if split not in self._featurized:
      self._featurized[split] = pipeline.FeaturizedSource(self.sources[split], self.featurizer)
    return self._featurized[split], None

  def train(self, batch_size: int, seed: int, report: pipeline.SkipReport | None = None):
    """An endless, shuffled, checkpointable stream of training batches of `batch_size` rows
    (per process) from this process's shard of the train split."""
    source, featurize = self._source('train')
    return pipeline.train_pipeline(source, featurize, batch_size, seed=seed,
                                   pad_id=self.tokenizer.pad_id, workers=self.workers,
                                   report=report, group_by_length=self.group_by_length)

  def eval(self, split: str, batch_size: int, limit: int | None = None):
    """Every example of `split` (its first `limit`) once, in order, in padded batches.

    Every process reads the whole split: evaluation splits each batch over all devices
    (`sharding.shared_batch`) and every process scores all of it (see `recipe.stages`).
    """
    source, featurize = self._source(split)
    return pipeline.eval_pipeline(source, featurize, batch_size, pad_id=self.tokenizer.pad_id,
                                  limit=limit, shard=(0, 1))


def synthsign_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.root or os.path.join(workdir, 'data', 'synthsign')


def _synthsign(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]):
  root = synthsign_dir(config, workdir)
  if not os.path.exists(os.path.join(root, 'meta.json')):
    if config.data.root:
      raise DataError(root, 'data.root names no SynthSign cache (meta.json missing); generate '
                      'one with python -m launch.synthsign, or leave data.root empty.')
    log(f'generating SynthSign {config.data.size!r} into {root}')
    prepare_synthsign(config.data.size, root, seed=0, describe_too=False)
  ds = SynthSign.load(root)
  if ds.config.size != config.data.size:
    raise DataError(root, f'holds SynthSign {ds.config.size!r}, the config asks for '
                          f'{config.data.size!r}.')
  sources = {s: pipeline.SplitSource(ds, s) for s in SPLITS}
  texts = {s: [ds.example_text(s, i) for i in range(ds.num_examples(s))] for s in SPLITS}

  def clips():
    for split in SPLITS:
      for i in range(ds.num_examples(split)):
        # Rendered only when the feature cache lacks the clip (picklable, for loader processes).
        yield ds.example_id(split, i), functools.partial(render_frames, root, split, i)

  num_clips = sum(ds.num_examples(s) for s in SPLITS)
  return sources, texts, clips, num_clips


@functools.lru_cache(maxsize=4)
def _synthsign_at(root: str) -> SynthSign:
  return SynthSign.load(root)


def render_frames(root: str, split: str, index: int) -> np.ndarray:
  """The RGB frames of one SynthSign clip (a loader of the feature cache; the dataset is loaded
  once per process)."""
  return _synthsign_at(root).example(split, index, frames=True)['frames']


@functools.lru_cache(maxsize=4)
def _synthsign_of(config: SynthSignConfig) -> SynthSign:
  return SynthSign.from_config(config)


def render_generated(config: SynthSignConfig, split: str, index: int) -> np.ndarray:
  """The RGB frames of one clip of a SynthSign generated on demand, with no cache on disk (a
  picklable loader of the feature cache)."""
  return _synthsign_of(config).example(split, index, frames=True)['frames']


def larger_synthsign(config: ml_collections.ConfigDict, workdir: str, data: Data, size: str,
                     split: str, log: Callable[[str], None] = logging.info) -> Data:
  """A Data reading `split` of a larger SynthSign than the run's, for scoring only.

  SynthSign's sizes are prefixes of each other ('tiny' of 'default', 'default' of 'large'), so
  the larger split holds the run's own clips first and more held-out clips after them: 'large'
  scores a translator on 3,000 test clips rather than the default's 300, where BLEU-4 rests on a
  few dozen matching 4-grams and moves by a point between seeds. The clips are generated on
  demand with the run's dataset seed and frame size; their frame features are cached once under
  WORKDIR/features_<size>, by the run's frozen frame encoder, and reused.

  Returns:
    `data` with the larger `split` as its only source and a featurizer reading its features
    (its texts, the tokenizer's and pretraining's corpus, stay the run's).

  Raises:
    build.ConfigError: the run is not on SynthSign.
    ValueError: `size` is not a SynthSign size larger than the run's.
  """
  if config.data.dataset != 'synthsign':
    raise build.ConfigError(f'a larger SynthSign split scores SynthSign runs; this run read '
                            f'data.dataset={config.data.dataset!r}.')
  ran = SynthSign.load(synthsign_dir(config, workdir)).config
  sizes = list(SYNTHSIGN_SIZES)
  if size not in sizes or sizes.index(size) <= sizes.index(ran.size):
    larger = sizes[sizes.index(ran.size) + 1:]
    raise ValueError(f'SynthSign size {size!r}: this run trained on {ran.size!r}; a larger '
                     f'split is one of {larger or "none (it is the largest)"}.')
  bigger = dataclasses.replace(ran, size=size)
  dataset = _synthsign_of(bigger)
  count = dataset.num_examples(split)
  cache = None
  if config.visual.enabled:
    out = os.path.join(workdir, f'{FEATURES_DIR}_{size}')
    log(f'frame features of the {count} {split} clips of SynthSign {size!r} -> {out}')
    clips = ((dataset.example_id(split, i), functools.partial(render_generated, bigger, split, i))
             for i in range(count))
    cache = _feature_cache(config, clips, frame_encoder(config, workdir, log), out, count)
  stats = load_keypoint_stats(config, workdir)
  return dataclasses.replace(
      data, featurizer=featurizer(config, data.tokenizer, cache, stats),
      sources={split: pipeline.SplitSource(dataset, split)}, _featurized={})


def _real(config: ml_collections.ConfigDict):
  """Sources of PHOENIX-2014T / CSL-Daily / How2Sign / OpenASL annotations with pose files."""
  d = config.data
  if not d.root or not d.annotations or not d.pose_pattern:
    raise build.ConfigError(f'data.dataset={d.dataset!r} needs data.root, data.annotations and '
                            'data.pose_pattern (see the config file\'s docstring).')
  under = lambda name: os.path.join(d.root, name)
  names = dict(zip(SPLITS, d.splits))
  records = {}
  for split, name in names.items():
    path = under(d.annotations.format(split=name))
    if d.dataset == 'phoenix':
      rows, _ = annotations.read_phoenix(path, split=split, strict=d.strict)
    elif d.dataset == 'how2sign':
      rows, _ = annotations.read_how2sign(path, split=split, strict=d.strict)
    elif d.dataset == 'csl_daily':
      rows, _ = annotations.read_csl_daily(path, under(d.split_file), splits=(name,),
                                           strict=d.strict)
    else:
      rows, _ = annotations.read_openasl(path, splits=(name,), strict=d.strict)
    records[split] = rows
  pattern = under(d.pose_pattern)
  sources = {s: pipeline.PoseFileSource(r, pattern, strict=d.strict) for s, r in records.items()}
  texts = {s: [r.text for r in rs] for s, rs in records.items()}
  size = int(config.visual.image_size)

  def clips():
    for split in SPLITS:
      yield from pipeline.annotation_clips(records[split], size=size, strict=d.strict)

  return sources, texts, clips, sum(len(r) for r in records.values())


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizers.Tokenizer:
  """The run's tokenizer: WORKDIR/tokenizer/spm.model, or the decoder's for tokenizer.kind='hf'.

  Unlike `recipe.data.prepare`, never trains one.
  """
  kind = config.tokenizer.kind
  if kind == 'hf':
    if not config.model.decoder.hf_path:
      raise build.ConfigError("tokenizer.kind='hf' reads the decoder's tokenizer, but "
                              'model.decoder.hf_path is empty.')
    return tokenizers.HFTokenizer.load(config.model.decoder.hf_path)
  if kind != 'sentencepiece':
    raise build.ConfigError(f"tokenizer.kind must be 'sentencepiece' or 'hf', got {kind!r}.")
  path = os.path.join(workdir, TOKENIZER_DIR, 'spm.model')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing; the workdir {workdir} has no tokenizer (the run '
                            'stopped before preparing its data?).')
  return tokenizers.SentencePieceTokenizer.load(path)


def load_keypoint_stats(config: ml_collections.ConfigDict,
                        workdir: str) -> keypoints.KeypointStats | None:
  """The run's keypoint statistics (None when data.standardize is off)."""
  if not config.data.get('standardize', False):
    return None
  path = os.path.join(workdir, KEYPOINT_STATS)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing; the workdir {workdir} has no keypoint statistics '
                            '(the run stopped before preparing its data?).')
  return keypoints.KeypointStats.load(path)


def _keypoint_stats(config: ml_collections.ConfigDict, workdir: str, train: Sequence[Any],
                    log: Callable[[str], None]) -> keypoints.KeypointStats | None:
  """Fits (the first time) the per-joint statistics of up to data.stats_examples train clips."""
  path = os.path.join(workdir, KEYPOINT_STATS)
  if not config.data.get('standardize', False) or os.path.exists(path):
    return load_keypoint_stats(config, workdir)
  plain = featurizer(config, None, stats=None)
  n = min(len(train), int(config.data.stats_examples))
  log(f'keypoint statistics of {n} train clips -> {path}')

  def clips():
    for i in range(n):
      example = plain(train[i])
      if pipeline.SKIPPED not in example:
        kp = example['keypoints']
        yield kp[..., :2], kp[..., 2]

  stats = keypoints.KeypointStats.fit(clips())
  stats.save(path)
  return stats


def featurizer(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer | None,
               feature_cache: Any = None,
               stats: keypoints.KeypointStats | None = None) -> pipeline.Featurizer:
  """The recipe's Featurizer (as `recipe.data.prepare` builds it) with the given cache and
  keypoint statistics."""
  joints = None
  if config.data.joints:
    joints = tuple(keypoints.SUBSETS[config.data.joints].indices)
  return pipeline.Featurizer(
      tokenizer=tokenizer,
      buckets=pipeline.Buckets(frames=tuple(config.data.frame_buckets),
                               tokens=tuple(config.data.token_buckets)),
      feature_cache=feature_cache, feature_keys=tuple(config.visual.feature_keys), joints=joints,
      normalize=keypoints.Normalizer(stats), strict=bool(config.data.strict))


def _tokenizer(config: ml_collections.ConfigDict, workdir: str, train_texts: list[str],
               log: Callable[[str], None]) -> tokenizers.Tokenizer:
  """The run's tokenizer, trained on the train split's translations the first time."""
  path = os.path.join(workdir, TOKENIZER_DIR, 'spm.model')
  if config.tokenizer.kind == 'sentencepiece' and not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log(f'training a {config.tokenizer.vocab_size}-piece sentencepiece model -> {path}')
    return tokenizers.SentencePieceTokenizer.train(train_texts, config.tokenizer.vocab_size, path)
  return load_tokenizer(config, workdir)


def frame_encoder(config: ml_collections.ConfigDict, workdir: str,
                  log: Callable[[str], None]) -> tuple[str, vit.VitConfig, Any]:
  """(HF folder, config, params) of the frozen frame encoder.

  visual.hf_path is read as it is; otherwise a DINOv2 of the configured sizes is initialised
  from visual.init_seed and written to WORKDIR/dinov2 in HF format (no pretrained weights exist
  on this machine, so its features are random projections of the frames). That seed is not the
  run's: like a pretrained checkpoint, the frozen encoder is the same for every seed of a run.
  """
  if config.visual.hf_path:
    cfg, params = hf_api.load_hf(config.visual.hf_path)
    return config.visual.hf_path, cfg, params
  path = os.path.join(workdir, ENCODER_DIR)
  cfg = build.vit_config(config)
  if os.path.exists(os.path.join(path, 'config.json')):
    saved, params = hf_api.load_hf(path)
    return path, saved, params
  log(f'initialising a random {cfg.num_layers}-layer, {cfg.hidden_size}-wide DINOv2 -> {path}')
  model = vit.VisionTransformer(cfg)
  image = np.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32)
  params = jax.jit(lambda key: nn.meta.unbox(model.init(key, image)['params']))(
      jax.random.key(int(config.visual.get('init_seed', 0)) + 7919))
  hf_api.save_hf(cfg, params, path)
  saved, params = hf_api.load_hf(path)
  return path, saved, params


def _feature_cache(config: ml_collections.ConfigDict, clips: Any, encoder: tuple[str, Any, Any],
                   out: str, num_clips: int) -> features.FeatureCache:
  """The frame features of `clips` ((id, frame loader) pairs) by `encoder` (`frame_encoder`'s
  folder, config and params), cached under `out`: clips already there are not rendered again."""
  encoder_dir, encoder_cfg, encoder_params = encoder
  return features.build_feature_cache(
      clips, encoder_cfg, encoder_params, out, batch_frames=config.visual.batch_frames,
      pooling=tuple(config.visual.feature_keys), image_size=int(config.visual.image_size),
      encoder_name=encoder_dir, num_clips=num_clips,
      loader_processes=int(config.visual.get('loader_processes', 0)))


def prepare(config: ml_collections.ConfigDict, workdir: str,
            log: Callable[[str], None] = logging.info) -> Data:
  """Makes or reuses the dataset, tokenizer and feature cache of a run; see the module doc."""
  os.makedirs(workdir, exist_ok=True)
  loader_processes = int(config.visual.get('loader_processes', 0))
  if config.data.dataset == 'synthsign':
    sources, texts, clips, num_clips = _synthsign(config, workdir, log)
  elif loader_processes:
    raise build.ConfigError('visual.loader_processes is for SynthSign\'s rendering; a real '
                            'dataset\'s videos decode in a thread beside the encoder (set 0).')
  else:
    sources, texts, clips, num_clips = _real(config)
  tokenizer = _tokenizer(config, workdir, texts['train'], log)
  cache, encoder_dir, visual_width = None, None, None
  if config.visual.enabled:
    encoder = frame_encoder(config, workdir, log)
    encoder_dir, encoder_cfg, _ = encoder
    out = config.visual.cache or os.path.join(workdir, FEATURES_DIR)
    log(f'frame features of {num_clips} clips -> {out}')
    cache = _feature_cache(config, clips(), encoder, out, num_clips)
    visual_width = build.visual_dim(config, encoder_cfg.hidden_size)
  stats = _keypoint_stats(config, workdir, sources['train'], log)
  return Data(tokenizer, featurizer(config, tokenizer, cache, stats), sources, texts,
              visual_width, encoder_dir, workers=config.data.workers,
              in_memory=bool(config.data.get('in_memory', False)),
              group_by_length=int(config.data.get('group_by_length', 0)))
