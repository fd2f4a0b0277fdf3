r"""Cost growth (issue item 6): each stage's step time as frames, tokens, G and batch double.

  python -m benchmarks.bench_growth            # scales 1x, 2x, 4x; 2 warm-up steps
  python -m benchmarks.bench_growth --quick    # scales 1x, 2x; 1 warm-up step

For each recipe stage (stage 1 'represent', 'sft', 'grpo') the model and step are built from
`configs/synthsign.py` (the SynthSign default sizes) as `rvlf_jax.recipe.stages` builds them,
float32, random weights (numpy normal, std 0.02: this is about speed), on one device (plain
`jax.jit` with the state donated; GRPOTrainer without a mesh). From a base point (the
config's batch size, G and max_new_tokens, its smallest frame bucket and its token bucket) one
dimension at a time is doubled:

  frames   frames per video (keypoints and visual features; the sign tokens are frames / 4);
  tokens   tokens per sentence: the target text for represent and sft, the completion length
           (max_new_tokens, and the reference text) for grpo;
  group    G, completions per video (grpo only);
  batch    videos per batch.

Batches are synthetic, of the pipeline's layout (`slt.dummy_batch`): random keypoints, visual
features and token ids, every frame and token valid. The GRPO step is `GRPOTrainer.step` (group
sampling, host rewards: 0.5 BLEU + 0.5 ROUGE-L, reference log-probs, update) with a word
tokenizer whose eos id lies outside the vocabulary, so every completion runs to max_new_tokens
and every scale does the same work per token (the issue's "exactly N new tokens").

FLOPs are the matmuls and convolutions of the step's jaxpr (`launch.plan.jaxpr_flops`'s rules),
scans times their length and the sampler's while loop times its trip count (max_new_tokens: XLA's
cost_analysis counts a loop body once). The check: time grows no faster than FLOPs, i.e.
time ratio <= TOLERANCE x FLOP ratio against the stage's base point. Where it fails, the report
gives the evidence: XLA's cost analysis of the compiled step (bytes accessed and all flops,
elementwise included) for represent and sft, the time of each phase of the GRPO step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import statistics
import time
import types
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import common

# The stages and the dimensions each one doubles.
STAGE_DIMS = {'represent': ('frames', 'tokens', 'batch'), 'sft': ('frames', 'tokens', 'batch'),
              'grpo': ('frames', 'tokens', 'group', 'batch')}
TOLERANCE = 1.15  # time ratio <= TOLERANCE x FLOP ratio
PLOT = 'growth.png'  # in the benchmarks folder
# Instruction tokens before and after the sign tokens: configs/synthsign.py's instruction takes
# 17 pieces of its 600-piece vocabulary.
PROMPT_TOKENS = (1, 16)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One measured point: batch B, frames T, tokens L (grpo: completion length N), group G."""

  batch: int
  frames: int
  tokens: int
  group: int = 1

  def scaled(self, dim: str, factor: int) -> 'Shape':
    return dataclasses.replace(self, **{dim: getattr(self, dim) * factor})

  def describe(self, stage: str) -> str:
    text = f'B={self.batch} T={self.frames} L={self.tokens}'
    return text + f' G={self.group}' if stage == 'grpo' else text


def default_config():
  from configs import synthsign
  return synthsign.get_config()


def base_shape(config, stage: str) -> Shape:
  """The stage's base point: its batch size, the smallest frame bucket, the token bucket (grpo:
  max_new_tokens) and G."""
  frames = int(min(config.data.frame_buckets))
  if stage == 'grpo':
    g = config.grpo
    return Shape(int(g.batch_size), frames, int(g.max_new_tokens), int(g.group_size))
  return Shape(int(config[stage].batch_size), frames, int(max(config.data.token_buckets)))


# -- FLOPs ---------------------------------------------------------------------------------------


def loop_flops(jaxpr: Any, while_trips: int | None = None) -> float:
  """Matmul and convolution FLOPs of a jaxpr, loops included: a scan's body times its length, a
  while loop's body `while_trips` times (its condition once more), a cond's costliest branch.

  The formulas for dot_general and conv are `launch.plan.jaxpr_flops`'s (which counts a while
  body once). Raises ValueError on a while loop when `while_trips` is None, so that no loop is
  ever silently counted once.
  """
  from jax.extend import core as jex_core
  from launch import plan

  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # a ClosedJaxpr's
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('dot_general', 'conv_general_dilated'):
      total += plan.jaxpr_flops(types.SimpleNamespace(eqns=[eqn]))
    elif name == 'while':
      if while_trips is None:
        raise ValueError('a while loop whose trip count was not given (while_trips).')
      total += (while_trips * loop_flops(eqn.params['body_jaxpr'], while_trips)
                + (while_trips + 1) * loop_flops(eqn.params['cond_jaxpr'], while_trips))
    elif name == 'scan':
      total += eqn.params['length'] * loop_flops(eqn.params['jaxpr'], while_trips)
    elif name == 'cond':
      total += max(loop_flops(b, while_trips) for b in eqn.params['branches'])
    else:
      total += sum(loop_flops(sub, while_trips) for sub in jex_core.jaxprs_in_params(eqn.params))
  return total


# -- The stages ----------------------------------------------------------------------------------


@dataclasses.dataclass
class StageRun:
  """One stage at one shape, ready to time.

  Attributes:
    call: runs one step and blocks until it is done; returns the step's host metrics (grpo) or
      None.
    flops: matmul + conv FLOPs of one step.
    phase_flops: FLOPs by phase of the step (grpo: sampling, reward, update), else {}.
    xla: the compiled step's cost analysis ('flops', 'bytes accessed'; loop bodies once); for
      grpo, filled after its first step by `sampler_cost`.
    compile_s: seconds of lowering and compiling (represent, sft), 0 for grpo (compiled in its
      first step).
    sampler_cost: grpo: () -> the group sampler's cost analysis ('sampling flops', 'sampling
      bytes accessed': the prefill and one decoding step, XLA counting the loop body once).
  """

  call: Callable[[], Any]
  flops: float
  phase_flops: dict[str, float] = dataclasses.field(default_factory=dict)
  xla: dict[str, float] = dataclasses.field(default_factory=dict)
  compile_s: float = 0.0
  sampler_cost: Callable[[], dict[str, float]] | None = None


def _models(config):
  from rvlf_jax.recipe import build
  decoder = build.decoder_config(config, int(config.tokenizer.vocab_size))
  width = build.visual_dim(config) if config.visual.enabled else None
  return decoder, width


def synthetic_batch(sign, shape: Shape, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A pipeline batch of `shape` (`slt.dummy_batch`'s layout) of random values, all valid, with
  the host field 'text' (the target ids as words of `WordTokenizer`)."""
  from rvlf_jax.models import slt
  rng = np.random.default_rng(seed)
  batch = slt.dummy_batch(sign, shape.batch, shape.frames, shape.tokens)
  kp = batch['keypoints']
  kp[..., :2] = rng.normal(size=kp[..., :2].shape)
  kp[..., 2] = rng.uniform(0.5, 1.0, size=kp.shape[:-1])
  if 'visual' in batch:
    batch['visual'] = rng.normal(size=batch['visual'].shape).astype(np.float32)
  batch['text_ids'] = rng.integers(3, vocab_size, size=batch['text_ids'].shape, dtype=np.int32)
  batch['text'] = np.asarray([' '.join(f'w{i}' for i in row) for row in batch['text_ids']])
  return batch


def make_tokenizer(vocab: int):
  """A word tokenizer ('w17' <-> 17) whose eos id (= vocab) is never sampled."""
  from rvlf_jax.data import tokenizers

  class WordTokenizer(tokenizers.Tokenizer):
    vocab_size = vocab
    bos_id = None
    eos_id = vocab
    pad_id = 0

    def encode(self, text):
      return [int(w[1:]) for w in text.split()]

    def _decode(self, ids):
      return ' '.join(f'w{i}' for i in ids)

  return WordTokenizer()


def _prompt(vocab_size: int, seed: int = 0):
  from rvlf_jax.models import slt
  rng = np.random.default_rng(seed + 1)
  before, after = PROMPT_TOKENS
  return slt.Prompt(rng.integers(3, vocab_size, before, dtype=np.int32),
                    rng.integers(3, vocab_size, after, dtype=np.int32))


def random_params(model, seed: int = 0) -> Any:
  """Random float32 parameters of the model's shapes (normal, std 0.02), drawn with numpy: this
  benchmark is about speed, and it spares compiling each model's initialiser."""
  import jax
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                      model.abstract_params())


def _cost(compiled: Any, prefix: str = '') -> dict[str, float]:
  """'flops' and 'bytes accessed' of XLA's cost analysis of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {prefix + k: float(cost[k]) for k in ('flops', 'bytes accessed') if k in (cost or {})}


def _jitted_run(step: Callable, state: Any, batch: dict[str, np.ndarray],
                compile_step: bool = True) -> StageRun:
  """A pure step jitted with its state (host arrays, put on the device here) donated; FLOPs
  from the traced jaxpr, XLA's cost analysis of the compiled step. Without compile_step, only
  the FLOPs (call is None)."""
  import jax
  from rvlf_jax.data import pipeline
  state = jax.device_put(state)
  batch = jax.device_put(pipeline.device_batch(batch))
  rng = jax.random.key(0)
  traced = jax.jit(step, donate_argnums=0).trace(state, batch, rng)
  flops = loop_flops(traced.jaxpr)
  if not compile_step:
    return StageRun(None, flops)
  start = time.perf_counter()
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start
  xla = _cost(compiled)
  box = [state]

  def call():
    box[0], metrics = compiled(box[0], batch, rng)
    jax.block_until_ready((box[0], metrics))

  return StageRun(call, flops, xla=xla, compile_s=compile_s)


def _represent(config, seed: int) -> Callable[..., StageRun]:
  import jax
  from rvlf_jax.models import slt
  from rvlf_jax.recipe import build
  from rvlf_jax.train import optimizers, represent
  from rvlf_jax.train import state as state_lib
  decoder, width = _models(config)
  model = slt.SignTextAligner(build.aligner_config(config, decoder, width))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'represent'))
  state = jax.device_get(state_lib.create(random_params(model, seed), tx))
  step = represent.make_step(model, tx)

  def at(shape: Shape, compile_step: bool = True) -> StageRun:
    batch = synthetic_batch(model.config.sign, shape, decoder.vocab_size, seed)
    return _jitted_run(step, state, batch, compile_step)

  return at


def _sft(config, seed: int) -> Callable[..., StageRun]:
  import jax
  from rvlf_jax.models import slt
  from rvlf_jax.recipe import build
  from rvlf_jax.train import optimizers, sft
  from rvlf_jax.train import params as params_lib
  from rvlf_jax.train import state as state_lib
  decoder, width = _models(config)
  model = slt.SLTModel(build.slt_config(config, decoder, width, build.lora_config(config)))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'sft'))
  params = random_params(model, seed)
  trained, frozen = params_lib.partition(
      params, sft.trained_mask(params, lora=bool(config.sft.lora)))
  state = jax.device_get(state_lib.create(trained, tx, frozen=frozen))
  step = sft.make_step(model, tx, _prompt(decoder.vocab_size, seed))

  def at(shape: Shape, compile_step: bool = True) -> StageRun:
    batch = synthetic_batch(model.config.sign, shape, decoder.vocab_size, seed)
    return _jitted_run(step, state, batch, compile_step)

  return at


def _grpo(config, seed: int) -> Callable[..., StageRun]:
  """`GRPOTrainer.step` at a shape (G = shape.group, max_new_tokens = shape.tokens); its
  pieces compile on the first call. With compile_step=False only the FLOPs are counted."""
  import jax
  from rvlf_jax.data import pipeline
  from rvlf_jax.models import decoder as dec
  from rvlf_jax.models import slt
  from rvlf_jax.recipe import build
  from rvlf_jax.rl import sampler
  from rvlf_jax.train import grpo, optimizers
  from rvlf_jax.train import params as params_lib
  from rvlf_jax.train import state as state_lib
  decoder, width = _models(config)
  model = slt.SLTModel(build.slt_config(config, decoder, width, build.grpo_lora(config)))
  tx = optimizers.make_optimizer(build.optimizer_config(config, 'grpo'))
  params = random_params(model, seed)
  trained, frozen = params_lib.partition(params, grpo.trained_mask(params))
  state = jax.device_get(state_lib.create(trained, tx, frozen=frozen))
  tokenizer = make_tokenizer(decoder.vocab_size)
  prompt = _prompt(decoder.vocab_size, seed)
  prefix = grpo.make_prefix(model, prompt)

  def at(shape: Shape, compile_step: bool = True) -> StageRun:
    cfg = build.grpo_config(config)
    cfg = dataclasses.replace(cfg, group_size=shape.group, sampling=dataclasses.replace(
        cfg.sampling, max_new_tokens=shape.tokens))
    batch = synthetic_batch(model.config.sign, shape, decoder.vocab_size, seed)
    rng = jax.random.key(0)

    # FLOPs of the pieces GRPOTrainer.step runs: prefix + group sampling, then on the B x G
    # completions the reference log-probs and mu policy updates.
    n, rows = shape.tokens, shape.batch * shape.group

    sampling_kwargs = dict(group_size=shape.group, config=cfg.sampling, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id)

    def sample(params, batch, rng):
      embeds, valid = prefix(params, batch)
      return sampler.sample_group(model.decoder, params['decoder'], embeds,
                                  dec.positions_from_mask(valid), rng, **sampling_kwargs)

    device_batch = pipeline.device_batch(batch)
    embeds, valid = jax.eval_shape(prefix, params, device_batch)
    sds = lambda dtype, *dims: jax.ShapeDtypeStruct((rows, *dims), dtype)
    completions = (dict(embeds=sds(embeds.dtype, *embeds.shape[1:]),
                        valid=sds(valid.dtype, *valid.shape[1:])),
                   sds(np.int32, n), sds(np.bool_, n))
    logp = sds(np.float32, n)
    sampling = loop_flops(jax.make_jaxpr(sample)(params, device_batch, rng), while_trips=n)
    reference = loop_flops(jax.make_jaxpr(grpo.make_reference(model, cfg))(frozen, *completions))
    update = loop_flops(jax.make_jaxpr(grpo.make_update(model, tx, cfg))(
        state, *completions, sds(np.float32), logp if cfg.mu > 1 else None, logp))
    phase_flops = {'sampling': sampling, 'reward': 0.0, 'update': reference + cfg.mu * update}
    if not compile_step:
      return StageRun(None, sum(phase_flops.values()), phase_flops=phase_flops)

    trainer = grpo.GRPOTrainer(model, tx, prompt, tokenizer, cfg)
    box = [jax.device_put(state)]

    def call():
      box[0], metrics = trainer.step(box[0], batch, rng)  # blocks: its metrics are host floats
      return metrics

    def sampler_cost():
      # The same avals as the step's call of the (module-level) jitted sampler: after that
      # call, jit's caches hand back its executable without compiling again.
      avals = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
      compiled = sampler.sample_group.lower(
          model.decoder, avals(params['decoder']), avals(embeds),
          jax.ShapeDtypeStruct(valid.shape, np.int32), rng, **sampling_kwargs).compile()
      return _cost(compiled, 'sampling ')

    return StageRun(call, sum(phase_flops.values()), phase_flops=phase_flops,
                    sampler_cost=sampler_cost)

  return at


STAGES = {'represent': _represent, 'sft': _sft, 'grpo': _grpo}
PHASES = ('sampling', 'reward', 'update')  # GRPOTrainer.step's time_* metrics


def stage_runner(config, stage: str, seed: int = 0) -> Callable[..., StageRun]:
  """The stage built once from the config (model, optimizer, initial state: random init of
  `seed`): `at(shape, compile_step=True) -> StageRun`, each shape starting from that state."""
  return STAGES[stage](config, seed)


# -- Measuring -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
  """One stage at one shape.

  Attributes:
    stage, dim, scale: 'base' and 1 for a stage's base point.
    shape: the measured shape.
    timing: seconds per step.
    flops: matmul + conv FLOPs of a step.
    phases: median seconds by phase (grpo), else {}; phase_flops: their FLOPs.
    xla: the compiled step's cost analysis (represent, sft).
    compile_s: lowering + compile seconds (represent, sft).
  """

  stage: str
  dim: str
  scale: int
  shape: Shape
  timing: common.Timing
  flops: float
  phases: dict[str, float] = dataclasses.field(default_factory=dict)
  phase_flops: dict[str, float] = dataclasses.field(default_factory=dict)
  xla: dict[str, float] = dataclasses.field(default_factory=dict)
  compile_s: float = 0.0


def prepare(at: Callable[..., StageRun], shape: Shape, warmup: int) -> StageRun:
  """The stage (`stage_runner`'s `at`) at `shape`, traced, compiled and stepped `warmup` times
  (GRPO's pieces compile in its first step)."""
  run_ = at(shape)
  for _ in range(warmup):
    run_.call()
  return run_


def timed(run_: StageRun, stage: str, dim: str, scale: int, shape: Shape, *, reps: int = 5,
          warmup: int = 1) -> Measurement:
  """`reps` steps of a prepared stage timed after `warmup` more."""
  outputs = []
  timing = common.time_fn(lambda: outputs.append(run_.call()), reps=reps, warmup=warmup)
  phases, xla = {}, dict(run_.xla)
  if stage == 'grpo':
    phases = {p: statistics.median(m[f'time_{p}'] for m in outputs[-reps:]) for p in PHASES}
  if run_.sampler_cost is not None:
    xla.update(run_.sampler_cost())
  return Measurement(stage, dim, scale, shape, timing, run_.flops, phases, run_.phase_flops,
                     xla, run_.compile_s)


def measure(at: Callable[..., StageRun], stage: str, dim: str, scale: int, shape: Shape, *,
            reps: int = 5, warmup: int = 2) -> Measurement:
  """The stage at `shape`: `reps` steps timed after `warmup` (compilation is not timed)."""
  return timed(prepare(at, shape, 0), stage, dim, scale, shape, reps=reps, warmup=warmup)


def measure_all(config, scales: Sequence[int], *, stages: Sequence[str] = tuple(STAGE_DIMS),
                reps: int = 5, warmup: int = 2, threads: int | None = None,
                log: Callable[[str], None] = print) -> list[Measurement]:
  """Every stage at its base point and at each scale > 1 of each of its dimensions.

  A stage's points are first prepared (traced, compiled, `warmup` steps) by `threads` threads
  at once (default: the CPU count, at most 4; XLA compiles outside the GIL, and compiling is
  most of this benchmark's time), then timed one after the other with nothing else running,
  after one more warm-up step each.
  """
  threads = threads or max(1, min(4, os.cpu_count() or 1))
  out = []
  for stage in stages:
    at = stage_runner(config, stage)
    base = base_shape(config, stage)
    points = [('base', 1, base)] + [(dim, s, base.scaled(dim, s)) for dim in STAGE_DIMS[stage]
                                    for s in scales if s > 1]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      runs = list(pool.map(lambda point: prepare(at, point[2], warmup), points))
    log(f'  growth {stage}: {len(points)} points compiled and warmed up in '
        f'{time.perf_counter() - start:.0f} s ({threads} threads)')
    for (dim, scale, shape), run_ in zip(points, runs):
      m = timed(run_, stage, dim, scale, shape, reps=reps, warmup=1)
      log(f'  growth {stage} {dim} x{scale} ({shape.describe(stage)}): {m.timing}, '
          f'{m.flops / 1e9:.3g} GFLOP')
      out.append(m)
    del runs  # the stage's states and executables
  return out


# -- Rows and the check --------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """One line of the table: a measurement against its stage's base point."""

  stage: str
  dim: str
  scale: int
  shape: str
  seconds: float
  seconds_min: float
  seconds_max: float
  gflop: float
  time_ratio: float
  flop_ratio: float
  holds: bool | None  # None at the base point
  evidence: str = ''


def _ratio(a: float, b: float) -> float:
  return a / b if b else float('nan')


# XLA cost-analysis keys (Measurement.xla) and how the evidence names them.
XLA_LABELS = {
    'bytes accessed': 'XLA bytes accessed',
    'flops': 'XLA flops (elementwise included)',
    'sampling bytes accessed': 'sampler XLA bytes accessed (prefill + one decoding step)',
    'sampling flops': 'sampler XLA flops (prefill + one decoding step)',
}


def evidence(m: Measurement, base: Measurement) -> str:
  """Why time grew as it did relative to FLOPs, from what the run measured: achieved GFLOP/s,
  XLA's cost analysis against the base point, and GRPO's phases."""
  parts = [f'achieved {base.flops / base.timing.median / 1e9:.1f} -> '
           f'{m.flops / m.timing.median / 1e9:.1f} GFLOP/s']
  costs = [f'{label} x{_ratio(m.xla[key], base.xla[key]):.2f}'
           for key, label in XLA_LABELS.items() if key in m.xla and key in base.xla]
  if costs:
    parts.append(', '.join(costs) + f' vs matmul FLOPs x{_ratio(m.flops, base.flops):.2f}')
  if m.phases and base.phases:
    phase = []
    for p in PHASES:
      t = _ratio(m.phases[p], base.phases[p])
      pf = _ratio(m.phase_flops.get(p, 0.0), base.phase_flops.get(p, 0.0))
      phase.append(f'{p} {base.phases[p]:.3g} -> {m.phases[p]:.3g} s (x{t:.2f}'
                   + (f', FLOPs x{pf:.2f})' if p != 'reward' else ', host)'))
    per_token = lambda x: 1e3 * x.phases['sampling'] / x.shape.tokens
    phase.append(f'sampling per new token {per_token(base):.3g} -> {per_token(m):.3g} ms')
    parts.append('; '.join(phase))
  return '; '.join(parts)


def growth_rows(measurements: Sequence[Measurement], tolerance: float = TOLERANCE) -> list[Row]:
  """Each measurement against its stage's base point: time and FLOP ratios, and whether time
  grew no faster than FLOPs (time ratio <= tolerance x FLOP ratio)."""
  bases = {m.stage: m for m in measurements if m.dim == 'base'}
  rows = []
  for m in measurements:
    base = bases[m.stage]
    t, f = _ratio(m.timing.median, base.timing.median), _ratio(m.flops, base.flops)
    holds = None if m is base else bool(t <= tolerance * f)
    rows.append(Row(m.stage, m.dim, m.scale, m.shape.describe(m.stage), m.timing.median,
                    m.timing.min, m.timing.max, m.flops / 1e9, t, f, holds,
                    '' if m is base else evidence(m, base)))
  return rows


def plot(rows: Sequence[Row], path: str, tolerance: float = TOLERANCE) -> None:
  """Time ratio against FLOP ratio, one panel per stage, one line per dimension (from 1x)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.ticker
  from matplotlib import pyplot as plt

  stages = list(dict.fromkeys(r.stage for r in rows))
  fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 4), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    stage_rows = [r for r in rows if r.stage == stage]
    top = max([2.0] + [max(r.time_ratio, r.flop_ratio) for r in stage_rows]) * 1.2
    lo = min([1.0] + [min(r.time_ratio, r.flop_ratio) for r in stage_rows]) / 1.2
    grid = np.geomspace(lo, top, 50)
    ax.plot(grid, grid, 'k--', lw=1, label='time = FLOPs')
    ax.plot(grid, tolerance * grid, 'k:', lw=1, label=f'time = {tolerance:g} x FLOPs')
    for dim in STAGE_DIMS.get(stage, ()):
      points = sorted((r.scale, r.flop_ratio, r.time_ratio) for r in stage_rows
                      if r.dim == dim)
      if not points:
        continue
      xs = [1.0] + [p[1] for p in points]
      ys = [1.0] + [p[2] for p in points]
      ax.plot(xs, ys, 'o-', label=dim)
    ticks = [t for t in (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16) if lo <= t <= top]
    for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
      scale('log', base=2)
      axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
      axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
      axis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(lo, top)
    ax.set_ylim(lo, top)
    ax.set_xlabel('FLOP ratio vs 1x')
    ax.set_ylabel('step time ratio vs 1x')
    ax.set_title(stage)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle('Cost growth: step time vs FLOPs as one dimension doubles')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(rows: Sequence[Row], measurements: Sequence[Measurement], env: common.Env | None,
           scales: Sequence[int], reps: int, warmup: int = 2,
           tolerance: float = TOLERANCE) -> str:
  """The section's markdown: setup, table, the check row by row, GRPO phases, failures' why."""
  peak = env.matmul_gflops if env else None
  header = ['stage', 'dimension', 'scale', 'shape', 'seconds (median)', 'min / max', 'GFLOP',
            'time ratio vs 1x', 'FLOP ratio vs 1x', 'GFLOP/s'] + (['% of matmul peak'] if peak
                                                               else []) + ['time <= 1.15 x FLOPs']
  header[-1] = f'time <= {tolerance:g} x FLOPs'
  body = []
  for r in rows:
    gflops = r.gflop / r.seconds
    verdict = '(base)' if r.holds is None else ('yes' if r.holds else '**no**')
    body.append([r.stage, r.dim, f'{r.scale}x', r.shape, r.seconds,
                 f'{r.seconds_min:.4g} / {r.seconds_max:.4g}', r.gflop, r.time_ratio,
                 r.flop_ratio, gflops] + ([f'{100 * gflops / peak:.1f}%'] if peak else [])
                + [verdict])
  checked = [r for r in rows if r.holds is not None]
  failed = [r for r in checked if not r.holds]
  lines = [
      'Step time of each recipe stage as one dimension doubles from a base point (SynthSign '
      'default model sizes of `configs/synthsign.py`, random init, float32, synthetic batches '
      'of the pipeline\'s layout, every frame and token valid; grpo: `GRPOTrainer.step` with '
      'G samples per video, every completion exactly max_new_tokens long, host rewards '
      f'included). Scales {", ".join(f"{s}x" for s in scales)}; median of {reps} timed steps '
      f'after {warmup} warm-up step(s) (compilation excluded). GFLOP: matmuls and convolutions '
      "of the step's jaxpr, scans x length, the sampler's while loop x max_new_tokens. Dimensions: "
      'frames per video (T), tokens per sentence (L: target text; grpo: completion length), '
      'G (grpo), batch (B).',
      '',
      common.table(header, body),
      '',
      f'Check (time ratio <= {tolerance:g} x FLOP ratio): {len(checked) - len(failed)} of '
      f'{len(checked)} rows hold.',
  ]
  if failed:
    lines += ['', 'Where time grew faster than FLOPs, and what the run measured about it:']
    lines += [f'- {r.stage} {r.dim} {r.scale}x: time x{r.time_ratio:.2f} vs FLOPs '
              f'x{r.flop_ratio:.2f} ({r.time_ratio / r.flop_ratio:.2f}x the FLOP growth; '
              f'missed by {100 * (r.time_ratio / (tolerance * r.flop_ratio) - 1):.0f}%). '
              f'{r.evidence}.' for r in failed]
  grpo = [m for m in measurements if m.phases]
  if grpo:
    lines += ['', 'GRPO step by phase (median seconds; sampling: prefix, prefill and the '
              'sampling loop; reward: detokenizing and scoring on the host; update: reference '
              'log-probs and the policy update):', '',
              common.table(['dimension', 'scale', 'shape', 'sampling s',
                            'sampling ms per new token', 'sampling GFLOP', 'reward s',
                            'update s', 'update GFLOP'],
                           [[m.dim, f'{m.scale}x', m.shape.describe('grpo'),
                             m.phases['sampling'], 1e3 * m.phases['sampling'] / m.shape.tokens,
                             m.phase_flops['sampling'] / 1e9, m.phases['reward'],
                             m.phases['update'], m.phase_flops['update'] / 1e9]
                            for m in grpo])]
  lines += ['', f'Plot: `benchmarks/{PLOT}` (time ratio against FLOP ratio per stage and '
            'dimension; dashed: equal growth, dotted: the tolerance).']
  return '\n'.join(lines)


def run(env: common.Env, quick: bool, *, config=None, stages: Sequence[str] = tuple(STAGE_DIMS),
        reps: int = 5, plot_path: str | None = None,
        log: Callable[[str], None] = print) -> common.Section:
  """Measures every stage and dimension and returns the report section (and writes the plot).

  Args:
    env: the machine (its matmul peak gives the '% of matmul peak' column).
    quick: scales 1x and 2x, 1 warm-up step (else 1x, 2x, 4x and 2 warm-up steps).
    config: the recipe config; default configs/synthsign.py.
    stages: which stages.
    reps: timed steps per point.
    plot_path: where the PNG goes; default benchmarks/growth.png.
    log: progress lines.
  """
  config = default_config() if config is None else config
  scales, warmup = ((1, 2), 1) if quick else ((1, 2, 4), 2)
  measurements = measure_all(config, scales, stages=stages, reps=reps, warmup=warmup, log=log)
  rows = growth_rows(measurements)
  plot_path = plot_path or os.path.join(os.path.dirname(os.path.abspath(__file__)), PLOT)
  plot(rows, plot_path)
  checked = [r for r in rows if r.holds is not None]
  figures = {'growth_rows_holding': float(sum(r.holds for r in checked)),
             'growth_rows_checked': float(len(checked))}
  for r in checked:
    if r.scale == max(scales):
      figures[f'growth_{r.stage}_{r.dim}_{r.scale}x_time_over_flops'] = r.time_ratio / r.flop_ratio
  # `warmup` steps when the point is prepared, one more just before it is timed.
  return common.Section('Cost growth', report(rows, measurements, env, scales, reps, warmup + 1),
                        figures, [os.path.relpath(plot_path, os.path.dirname(
                            os.path.abspath(__file__)))])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='scales 1x and 2x only')
  args = parser.parse_args()
  section = run(common.measure_env(), args.quick)
  print(f'## {section.title}\n\n{section.markdown}')


if __name__ == '__main__':
  main()
