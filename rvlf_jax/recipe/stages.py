"""The three RVLF stages wired on `train.loop.run_stage`, plus their evaluations.

Each stage function builds its model from the config, starts from what the stage before it saved
(`restore_*`), trains with `run_stage` (which resumes, checkpoints and logs) and returns its
result. The stages' checkpoints are the only hand-over between them, so `--stage=sft` after an
earlier `--stage=represent` run computes exactly what `--stage=all` would.

Every stage runs sharded over `Context.mesh` (the config's mesh section over all devices of all
processes): its state is created already sharded (`StateSetup`), its step is
`sharding.shard_step`, and each process feeds its own rows of every batch (grain shards the
training data by process; the config's batch sizes are global). Checkpoints restore onto the
current mesh whatever mesh wrote them.

Evaluation with several processes: every process reads the whole evaluation split and turns each
batch into one global batch split over the data axes (`sharding.shared_batch`); the translations
come back replicated, so every process scores all of them and gets the same numbers (early
stopping and the best checkpoint agree everywhere). Only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rvlf_jax import sharding
from rvlf_jax.data import pipeline, tokenizers
from rvlf_jax.eval import evaluate as evaluate_lib
from rvlf_jax.models import lora as lora_lib
from rvlf_jax.models import slt
from rvlf_jax.models.decoder import DecoderConfig
from rvlf_jax.recipe import build
from rvlf_jax.recipe.data import Data
from rvlf_jax.train import grpo as grpo_lib
from rvlf_jax.train import loop, optimizers, represent, sft
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib

Log = Callable[[str], None]


@dataclasses.dataclass
class Context:
  """What every stage reads.

  Attributes:
    config: the recipe config.
    workdir: the run's folder.
    data: tokenizer, featurizer and sources.
    decoder: the pretrained decoder's config and parameters (the LLM the SFT stage tunes).
    prompt: the instruction around the sign tokens.
    log: progress lines.
    mesh: the devices every stage runs on; default: the config's mesh section over all devices
      (`sharding.mesh_from_config`).
  """

  config: ml_collections.ConfigDict
  workdir: str
  data: Data
  decoder: tuple[DecoderConfig, Any]
  prompt: slt.Prompt
  log: Log = print
  mesh: jax.sharding.Mesh | None = None

  def __post_init__(self):
    if self.mesh is None:
      self.mesh = sharding.mesh_from_config(self.config)

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  def train_batches(self, section: ml_collections.ConfigDict, seed: int):
    """This process's training pipeline for a stage: its share of the stage's (global)
    batch_size, from its shard of the train split."""
    return self.data.train(int(section.batch_size) // jax.process_count(), seed)


class MissingCheckpointError(FileNotFoundError):
  """A stage was asked to start from a stage that has not been run in this workdir."""


def prompt_template(config: ml_collections.ConfigDict) -> tokenizers.PromptTemplate:
  """The config's instruction (prompt.instruction, prompt.system), the library's default when
  the config has no prompt section."""
  section = config.get('prompt')
  if section is None:
    return tokenizers.PromptTemplate()
  try:
    return tokenizers.PromptTemplate(instruction=str(section.instruction),
                                     system=section.get('system') or None)
  except ValueError as e:
    raise build.ConfigError(f'prompt.instruction: {e}') from e


def prompt_for(data: Data, config: ml_collections.ConfigDict) -> slt.Prompt:
  """The instruction ids around the sign tokens, for the data's tokenizer and the config's
  instruction and data.language."""
  ids = prompt_template(config).prompt(data.tokenizer, config.data.language)
  return slt.Prompt(np.asarray(ids.before, np.int32), np.asarray(ids.after, np.int32))


def _stage_kwargs(section: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  return dict(num_steps=int(section.steps), seed=int(config.seed),
              checkpoint_every=int(section.checkpoint_every), keep=int(config.checkpoint.keep),
              log_every=int(section.log_every))


@dataclasses.dataclass(frozen=True)
class StateSetup:
  """A stage's train state over the mesh.

  Attributes:
    init: init() -> the initial TrainState, created already sharded.
    target: its abstract form (`jax.ShapeDtypeStruct`s with their shardings): what a checkpoint
      of the stage restores onto, whatever mesh wrote it.
    shardings: the `NamedSharding` of each leaf of the state.
  """

  init: Callable[[], state_lib.TrainState]
  target: Any
  shardings: Any


def _state_setup(ctx: Context, boxed: Any, make_state: Callable[[Any], state_lib.TrainState],
                 inputs: Any) -> StateSetup:
  """The state `make_state(inputs)` builds, sharded over ctx.mesh by the model's logical axes.

  Args:
    ctx: the context (its mesh).
    boxed: the model's boxed abstract parameters (`model.abstract_params(boxed=True)`).
    make_state: inputs -> TrainState; random initialisation happens inside it, so that it runs
      in one jit whose outputs are already sharded.
    inputs: pretrained parameters under their paths in the model ({'decoder': ...}), placed with
      the same shardings before the jit; may be abstract when only `target` is needed.
  """
  abstract = jax.eval_shape(make_state, inputs)
  shardings = sharding.state_shardings(abstract, boxed, ctx.mesh)

  def init():
    placed = jax.device_put(inputs, sharding.state_shardings(inputs, boxed, ctx.mesh))
    with sharding.mesh_context(ctx.mesh):
      return jax.jit(make_state, out_shardings=shardings)(placed)

  return StateSetup(init, state_lib.abstract(abstract, shardings), shardings)


def _sharded_step(ctx: Context, step: Callable, setup: StateSetup) -> Callable:
  """A stage's pure step over the mesh, fed this process's pipeline batches (the host-only
  fields 'id' and 'text' dropped)."""
  rows = sharding.batch_sharding(ctx.mesh)
  sharded = sharding.shard_step(step, setup.shardings, rows, ctx.mesh)
  return lambda state, batch, rng: sharded(
      state, sharding.global_batch(pipeline.device_batch(batch), rows), rng)


def require(workdir: str, stage: str, needed_by: str) -> None:
  if not os.path.isdir(os.path.join(workdir, stage, loop.CHECKPOINTS_DIR)):
    raise MissingCheckpointError(
        f'{os.path.join(workdir, stage)}: no {stage!r} checkpoint, which stage {needed_by!r} '
        f'starts from; run --stage={stage} (or --stage=all) in this workdir first.')


def _rl_state(sign: slt.SignEncoderConfig) -> Any:
  """`TrainState.rl` for a sign encoder with RLA gates (their REINFORCE baselines), else None."""
  fuse = sign.fusion
  return state_lib.rl_state(fuse.rla_layers) if fuse.uses_rla else None


# -- Stage 1 -------------------------------------------------------------------------------------


def aligner(ctx: Context) -> slt.SignTextAligner:
  return slt.SignTextAligner(build.aligner_config(ctx.config, ctx.decoder[0],
                                                  ctx.data.visual_width))


def _represent_setup(ctx: Context):
  model = aligner(ctx)
  tx = optimizers.make_optimizer(build.optimizer_config(ctx.config, 'represent'))
  make_state = lambda _: state_lib.create(model.init_params(jax.random.key(ctx.seed)), tx,
                                          rl=_rl_state(model.config.sign))
  return model, tx, _state_setup(ctx, model.abstract_params(boxed=True), make_state, {})


def run_represent(ctx: Context) -> tuple[Any, loop.History]:
  """Stage 1: returns (the sign encoder's parameters, history)."""
  cfg = ctx.config.represent
  model, tx, setup = _represent_setup(ctx)
  step = _sharded_step(ctx, represent.make_step(model, tx), setup)
  state, history = loop.run_stage(
      'represent', setup.init, step, lambda: ctx.train_batches(cfg, ctx.seed), ctx.workdir,
      target=setup.target, **_stage_kwargs(cfg, ctx.config))
  return state.params['sign_encoder'], history


def restore_represent(ctx: Context, needed_by: str) -> Any:
  require(ctx.workdir, 'represent', needed_by)
  _, _, setup = _represent_setup(ctx)
  return loop.restore_state(ctx.workdir, 'represent', setup.target,
                            'latest').params['sign_encoder']


# -- Stage 2 -------------------------------------------------------------------------------------


def sft_model(ctx: Context) -> slt.SLTModel:
  decoder_cfg = ctx.decoder[0]
  return slt.SLTModel(build.slt_config(ctx.config, decoder_cfg, ctx.data.visual_width,
                                       build.lora_config(ctx.config)))


def _sft_setup(ctx: Context, sign_params: Any | None):
  """(model, tx, StateSetup): random sign encoder and projector (the sign encoder replaced by
  stage 1's when given), the pretrained decoder, fresh adapters when LoRA is on."""
  model = sft_model(ctx)
  lora = ctx.config.sft.lora
  tx = optimizers.make_optimizer(build.optimizer_config(ctx.config, 'sft'))

  def make_state(inputs):
    params = model.init_params(jax.random.key(ctx.seed))
    params['decoder'] = lora_lib.add_adapters(inputs['decoder'], params['decoder'])
    if inputs['sign_encoder'] is not None:
      params['sign_encoder'] = inputs['sign_encoder']
    trained, frozen = params_lib.partition(params, sft.trained_mask(params, lora=lora))
    return state_lib.create(trained, tx, frozen=frozen, rl=_rl_state(model.config.sign))

  inputs = {'decoder': ctx.decoder[1], 'sign_encoder': sign_params}
  return model, tx, _state_setup(ctx, model.abstract_params(boxed=True), make_state, inputs)


def _dev_eval(ctx: Context, model: slt.SLTModel, section: ml_collections.ConfigDict,
              params_of: Callable[[Any, Any], Any] = params_lib.merge):
  """eval_fn(state) -> dev scores of greedy translations of the first eval_examples, by the
  model's parameters `params_of(state.params, state.frozen)`."""
  batches = lambda: ctx.data.eval('dev', int(ctx.config.eval.batch_size),
                                  int(section.eval_examples))

  def eval_fn(state):
    return translate_scores(ctx, model, params_of(state.params, state.frozen), batches(),
                            decode='greedy')

  return eval_fn


def run_sft(ctx: Context, sign_params: Any | None) -> tuple[slt.SLTModel, Any, loop.History]:
  """Stage 2: returns (model, the best state's full parameters, history)."""
  cfg = ctx.config.sft
  model, tx, setup = _sft_setup(ctx, sign_params)
  step = _sharded_step(ctx, sft.make_step(model, tx, ctx.prompt), setup)
  state, history = loop.run_stage(
      'sft', setup.init, step, lambda: ctx.train_batches(cfg, ctx.seed), ctx.workdir,
      target=setup.target, eval_fn=_dev_eval(ctx, model, cfg), eval_every=int(cfg.eval_every),
      best_metric='bleu4', early_stopping_patience=int(cfg.patience) or None,
      early_stopping_window=int(cfg.stop_window), early_stopping_min_steps=int(cfg.min_steps),
      **_stage_kwargs(cfg, ctx.config))
  return model, params_lib.merge(state.params, state.frozen), history


def restore_sft(ctx: Context, needed_by: str, which: str = 'best'
                ) -> tuple[slt.SLTModel, state_lib.TrainState]:
  require(ctx.workdir, 'sft', needed_by)
  model, _, setup = _sft_setup(ctx, None)
  return model, loop.restore_state(ctx.workdir, 'sft', setup.target, which)


def run_control(ctx: Context, seconds: float) -> tuple[slt.SLTModel, Any, loop.History]:
  """SFT continued from its best checkpoint for `seconds` of training (the GRPO stage's wall
  time): the control that tells GRPO's gain from more training."""
  cfg = ctx.config.sft
  require(ctx.workdir, 'sft', 'control')
  model, tx, setup = _sft_setup(ctx, None)
  best = loop.restore_state(ctx.workdir, 'sft', setup.target, 'best')
  step = _sharded_step(ctx, sft.make_step(model, tx, ctx.prompt), setup)
  kwargs = _stage_kwargs(cfg, ctx.config)
  kwargs['num_steps'] = 10 * kwargs['num_steps']  # the time limit ends it
  state, history = loop.run_stage(
      'control', lambda: best, step, lambda: ctx.train_batches(cfg, ctx.seed + 1), ctx.workdir,
      target=setup.target, time_limit_s=seconds, return_best=False, **kwargs)
  return model, params_lib.merge(state.params, state.frozen), history


# -- Stage 3 -------------------------------------------------------------------------------------


def grpo_model(ctx: Context) -> slt.SLTModel:
  return slt.SLTModel(build.slt_config(ctx.config, ctx.decoder[0], ctx.data.visual_width,
                                       build.grpo_lora(ctx.config)))


def merged_sft_params(ctx: Context, sft_params: Any) -> Any:
  """The SFT translator with its adapters folded into the decoder's kernels."""
  lora = build.lora_config(ctx.config)
  if lora is None:
    return sft_params
  return {**sft_params, 'decoder': lora_lib.merge(sft_params['decoder'], lora)}


def _grpo_setup(ctx: Context, sft_params: Any | None):
  """(model, tx, StateSetup): the SFT translator (adapters merged) with fresh adapters; random
  when sft_params is None (a restore target only)."""
  model = grpo_model(ctx)
  tx = optimizers.make_optimizer(build.optimizer_config(ctx.config, 'grpo'))
  sign_encoder = build.grpo_config(ctx.config).train_sign_encoder
  if sign_encoder:
    tx = optimizers.scale_part(tx, float(ctx.config.grpo.sign_encoder_lr_factor),
                               lambda path: path[0] in grpo_lib.SIGN_PARTS)

  def make_state(sft_params):
    params = model.init_params(jax.random.key(ctx.seed + 1))
    if sft_params is not None:
      merged = merged_sft_params(ctx, sft_params)
      params = {**merged, 'decoder': lora_lib.add_adapters(merged['decoder'],
                                                           params['decoder'])}
    trained, frozen = grpo_lib.split_params(params, sign_encoder=sign_encoder)
    return state_lib.create(trained, tx, frozen=frozen)

  return model, tx, _state_setup(ctx, model.abstract_params(boxed=True), make_state, sft_params)


def run_grpo(ctx: Context, sft_params: Any) -> tuple[slt.SLTModel, Any, loop.History]:
  """Stage 3 from the SFT translator: returns (model, best full parameters, history)."""
  cfg = ctx.config.grpo
  model, tx, setup = _grpo_setup(ctx, sft_params)
  trainer = grpo_lib.GRPOTrainer(model, tx, ctx.prompt, ctx.data.tokenizer,
                                 build.grpo_config(ctx.config), mesh=ctx.mesh,
                                 state_shardings=setup.shardings)
  state, history = loop.run_stage(
      'grpo', setup.init, trainer.step, lambda: ctx.train_batches(cfg, ctx.seed + 2),
      ctx.workdir, target=setup.target,
      eval_fn=_dev_eval(ctx, model, cfg, grpo_lib.policy_params),
      eval_every=int(cfg.eval_every), best_metric='bleu4', **_stage_kwargs(cfg, ctx.config))
  return model, grpo_lib.policy_params(state.params, state.frozen), history


def restore_grpo(ctx: Context, which: str = 'best') -> tuple[slt.SLTModel, Any]:
  require(ctx.workdir, 'grpo', 'evaluation')
  model, _, setup = _grpo_setup(ctx, None)
  state = loop.restore_state(ctx.workdir, 'grpo', setup.target, which)
  return model, grpo_lib.policy_params(state.params, state.frozen)


# -- Evaluation ----------------------------------------------------------------------------------


def translate_scores(ctx: Context, model: slt.SLTModel, params: Any, batches, *,
                     decode: str | None = None, output_dir: str | None = None
                     ) -> dict[str, float]:
  e = ctx.config.eval
  return evaluate_lib.evaluate(
      model, params, batches, ctx.prompt, ctx.data.tokenizer, lang=ctx.config.data.lang,
      decode=decode or e.decode, beam_size=int(e.beam_size), max_new_tokens=int(e.max_new_tokens),
      length_penalty=float(e.length_penalty), output_dir=output_dir, mesh=ctx.mesh)


def eval_loss(ctx: Context, model: slt.SLTModel, params: Any, split: str,
              limit: int | None = None) -> dict[str, float]:
  """Teacher-forced loss and token accuracy of the translator on a split (its first `limit`
  examples), over all its target tokens; split over ctx.mesh like the evaluation, the same
  numbers on every process.

  Returns:
    {'loss', 'accuracy', 'num_tokens'}.
  """
  rep = sharding.replicated(ctx.mesh)
  loss = jax.jit(lambda p, batch: model.loss(p, batch, ctx.prompt)[1], out_shardings=rep)
  total, correct, count = 0.0, 0.0, 0.0
  for batch in ctx.data.eval(split, int(ctx.config.eval.batch_size), limit):
    batch = pipeline.device_batch(batch)
    rows = sharding.rows_sharding(len(batch['text_ids']), ctx.mesh)
    with sharding.mesh_context(ctx.mesh):
      metrics = jax.device_get(loss(params, sharding.shared_batch(batch, rows)))
    n = float(metrics['num_tokens'])
    total, correct, count = (total + n * float(metrics['loss']),
                             correct + n * float(metrics['accuracy']), count + n)
  return {'loss': total / max(count, 1.0), 'accuracy': correct / max(count, 1.0),
          'num_tokens': count}


def zero_sign_tokens(params: Any) -> Any:
  """The same translator with every projected sign token zero (the projector's output layer
  zeroed): what the decoder says from the prompt alone, its language prior."""
  fc2 = params['projector']['fc2']
  return {**params, 'projector': {**params['projector'],
                                  'fc2': jax.tree.map(jnp.zeros_like, fc2)}}


def score_splits(ctx: Context, model: slt.SLTModel, params: Any, name: str,
                 splits: tuple[str, ...] = ('dev', 'test')) -> dict[str, dict[str, float]]:
  """{split: scores} of the full splits; hypotheses written to WORKDIR/eval/<name>/<split>/."""
  out = {}
  for split in splits:
    start = time.perf_counter()
    folder = os.path.join(ctx.workdir, 'eval', name, split)
    out[split] = translate_scores(
        ctx, model, params, ctx.data.eval(split, int(ctx.config.eval.batch_size)),
        output_dir=folder)
    ctx.log(f'{name} {split}: ' + ' '.join(f'{k}={v:.2f}' for k, v in out[split].items())
            + f' ({time.perf_counter() - start:.0f} s)')
  return out
