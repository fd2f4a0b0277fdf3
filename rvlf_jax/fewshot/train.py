"""The DVLA-RL objective: prototype cross-entropy plus REINFORCE on the RLA gates, in one step.

Shape vocabulary: B = S + Q examples of one episode (support first, then queries), C classes of
the episode, D embedding dim, R class-text dim, G gates per RLA layer (1 per episode or B), L RLA
layers (gate records).

  L = L_sup + rl_coef * L_RL + align_coef * L_align
  L_sup   = prototype cross-entropy of the queries (`protonet.loss`)
  L_RL    = mean over layers of mean_G[-(r - b) log pi(a) - entropy_coef * H(pi)]
  r       = cos_weight * cos(U GAP(H), t*) + acc_weight * (acc_t - acc_{t-1})
  b       <- decay * b + (1 - decay) * mean(r)        one exponential-moving-average per layer
  L_align = mean(1 - cos(U GAP(stop_gradient(H)), t*))

with t* the text embedding of each example's true class, acc_t the episode's query accuracy and
acc_{t-1} the previous step's (the first step uses acc_t, i.e. no accuracy term, and starts the
baseline at its reward). Defaults follow the paper: rl_coef 0.1, entropy_coef 0.2, weights 0.5
and 1.0. Gradients: the gate enters the backbone as stop_gradient(a), so L_sup trains the
backbone only; L_RL trains the policies only (their state is stop-gradiented too); L_align trains
U only. U is this module's addition: the paper calls it learned but gives the reward no
gradient, so a U trained by nothing would stay at its random initialisation.

The backbone is generic. `make_step` takes an embedding function

  embed(params, inputs, rng) -> (embeddings float[B, D], records)

where `records` lists one dict per RLA layer as `rla.GatedRLA` sows them ('gate', 'log_prob',
'entropy' float32[G], 'projected' float32[B, R]); `rng` is None for evaluation (the policies'
modes, no sampling). `module_embed(model)` builds it from any flax module whose
`__call__(inputs)` returns the embeddings and uses `GatedRLA` blocks anywhere inside, so a
backbone with no RLA block (prototypes without text) works too (no records, L_RL = 0).

A batch is one episode:
  'inputs'          pytree of arrays with leading dim B (support examples, then queries),
  'support_labels'  int[S] episode labels 0..C-1,
  'query_labels'    int[Q],
  'class_text'      float[C, R] text embedding of each episode class (t* is its row per example).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rvlf_jax.fewshot import protonet
from rvlf_jax.models import gates as policy_lib
from rvlf_jax.models import rla
from rvlf_jax.rl.reinforce import ema_baseline, reinforce_loss

Array = jax.Array
Embed = Callable[[Any, Any, Array | None], tuple[Array, list[dict[str, Array]]]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Weights of the combined loss (module docstring).

  Attributes:
    rl_coef: weight of L_RL in L (0.1).
    entropy_coef: entropy bonus inside L_RL (0.2).
    baseline_decay: EMA decay of the reward baselines.
    cos_weight: weight of cos(U GAP(H), t*) in the reward (0.5).
    acc_weight: weight of the accuracy change in the reward (1.0).
    align_coef: weight of L_align, which fits U alone (its scale only matters relative to a
      plain SGD learning rate; 0 freezes U).
    metric, scale: the prototype classifier's (`protonet.logits`).
  """

  rl_coef: float = 0.1
  entropy_coef: float = 0.2
  baseline_decay: float = 0.9
  cos_weight: float = 0.5
  acc_weight: float = 1.0
  align_coef: float = 1.0
  metric: str = 'euclidean'
  scale: float = 10.0


@flax.struct.dataclass
class FewShotState:
  """Arrays of a few-shot training run.

  Attributes:
    step: int32[] updates applied.
    params: everything trained (backbone, RLA blocks, policies, reward projections U).
    opt_state: the optax state of `tx.init(params)`.
    baseline: float32[L] the reward baseline of each RLA layer.
    prev_accuracy: float32[] the query accuracy of the previous step (acc_{t-1}).
  """

  step: Array
  params: Any
  opt_state: Any
  baseline: Array
  prev_accuracy: Array


def create_state(params: Any, tx: optax.GradientTransformation, num_layers: int) -> FewShotState:
  """A fresh state at step 0 for a backbone with `num_layers` RLA layers (gate records)."""
  return FewShotState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      baseline=jnp.zeros((num_layers,), jnp.float32),
                      prev_accuracy=jnp.zeros((), jnp.float32))


def module_embed(model: nn.Module) -> Embed:
  """`embed(params, inputs, rng)` of a flax module returning float[B, D] embeddings.

  With an rng, the module gets 'gate' (sampled gates) and 'dropout' streams; without, none
  (policy modes; the module must then run its dropout deterministically).
  """

  def embed(params, inputs, rng=None):
    rngs = {}
    if rng is not None:
      gate_rng, dropout_rng = jax.random.split(rng)
      rngs = {'gate': gate_rng, 'dropout': dropout_rng}
    emb, collections = model.apply({'params': params}, inputs, rngs=rngs, mutable=['gates'])
    return emb, rla.gate_records(collections)

  return embed


def gate_reward(projected_br: Array, target_br: Array, accuracy: Array, prev_accuracy: Array,
                cos_weight: float = 0.5, acc_weight: float = 1.0) -> Array:
  """float32[B]: cos_weight * cos(U GAP(H), t*) + acc_weight * (acc_t - acc_{t-1}).

  Args:
    projected_br: U GAP(H), the fused context projected into the class-text space.
    target_br: t*, the text embedding of each example's true class.
    accuracy: acc_t, this episode's query accuracy.
    prev_accuracy: acc_{t-1}.
    cos_weight, acc_weight: the two weights (0.5 and 1.0 in the paper).
  """
  cos_b = policy_lib.cosine(projected_br, target_br)
  return jax.lax.stop_gradient(cos_weight * cos_b + acc_weight * (accuracy - prev_accuracy))


def _per_gate(values_b: Array, num_gates: int) -> Array:
  """float[G]: per-example values for per-example gates, their mean for one episode gate."""
  return values_b if num_gates == values_b.shape[0] else values_b.mean(keepdims=True)


def objective(params: Any, state: FewShotState, batch: dict, rng: Array | None, embed: Embed,
              config: ObjectiveConfig) -> tuple[Array, dict[str, Array]]:
  """The combined loss L of one episode and its parts (module docstring).

  Returns:
    (L, aux) with aux holding float32 metrics and 'rewards' float32[L] (mean reward per layer)
    for the baseline update.
  """
  s = batch['support_labels'].shape[0]
  labels_b = jnp.concatenate([batch['support_labels'], batch['query_labels']])
  target_br = batch['class_text'][labels_b]
  emb_bd, records = embed(params, batch['inputs'], rng)
  if len(records) != state.baseline.shape[0]:
    raise ValueError(f'The backbone sowed {len(records)} gate records but the state has '
                     f'{state.baseline.shape[0]} baselines; build it with '
                     f'create_state(..., num_layers={len(records)}).')
  sup, sup_metrics = protonet.loss(emb_bd[:s], batch['support_labels'], emb_bd[s:],
                                   batch['query_labels'], batch['class_text'].shape[0],
                                   config.metric, config.scale)
  acc = jax.lax.stop_gradient(sup_metrics['accuracy'])
  prev_acc = jnp.where(state.step == 0, acc, state.prev_accuracy)
  rl_terms, align_terms, rewards, metrics = [], [], [], {}
  for i, rec in enumerate(records):
    reward_b = gate_reward(rec['projected'], target_br, acc, prev_acc, config.cos_weight,
                           config.acc_weight)
    reward_g = _per_gate(reward_b, rec['gate'].shape[0])
    baseline = jnp.where(state.step == 0, reward_g.mean(), state.baseline[i])
    rl_terms.append(reinforce_loss(rec['log_prob'], rec['entropy'], reward_g, baseline,
                                   config.entropy_coef))
    align_terms.append(jnp.mean(1.0 - policy_lib.cosine(rec['projected'], target_br)))
    rewards.append(reward_g.mean())
    metrics[f'gate_{i}'] = rec['gate'].mean()
    metrics[f'entropy_{i}'] = rec['entropy'].mean()
  zero = jnp.zeros((), jnp.float32)
  rl = jnp.mean(jnp.stack(rl_terms)) if rl_terms else zero
  align = jnp.mean(jnp.stack(align_terms)) if align_terms else zero
  total = sup + config.rl_coef * rl + config.align_coef * align
  rewards_l = jnp.stack(rewards) if rewards else jnp.zeros((0,), jnp.float32)
  metrics.update(loss=total, sup_loss=sup, rl_loss=rl, align_loss=align, accuracy=acc,
                 reward=rewards_l.mean() if rewards else zero)
  return total, {'metrics': metrics, 'rewards': rewards_l}


def make_step(embed: Embed, tx: optax.GradientTransformation,
              config: ObjectiveConfig = ObjectiveConfig()) -> Callable:
  """The training step `step(state, batch, rng) -> (state, metrics)` (pure; jit it).

  One backward pass of L updates backbone, policies and U together with `tx`; then each layer's
  baseline moves toward its reward (started at the first reward) and acc_t is kept for the next
  step's reward.
  """

  def step(state: FewShotState, batch: dict, rng: Array):
    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state, batch, rng,
                                                                  embed, config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    rewards_l = aux['rewards']
    start = jnp.where(state.step == 0, rewards_l, state.baseline)
    metrics = {**aux['metrics'], 'grad_norm': optax.tree.norm(grads)}
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state,
                          baseline=ema_baseline(start, rewards_l, config.baseline_decay),
                          prev_accuracy=metrics['accuracy'])
    return state, metrics

  return step


def make_eval(embed: Embed, config: ObjectiveConfig = ObjectiveConfig()) -> Callable:
  """`evaluate(params, batch) -> {'loss', 'accuracy'}` of one episode with the policies' modes
  (no sampling); jit it, and feed `episodes.evaluate` its accuracy."""

  def evaluate(params, batch):
    s = batch['support_labels'].shape[0]
    emb_bd, _ = embed(params, batch['inputs'], None)
    _, metrics = protonet.loss(emb_bd[:s], batch['support_labels'], emb_bd[s:],
                               batch['query_labels'], batch['class_text'].shape[0],
                               config.metric, config.scale)
    return metrics

  return evaluate
