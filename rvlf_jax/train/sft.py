"""Stage 2, SLT-SFT: instruction tuning of sign encoder + projector + decoder (LoRA or full).

`make_step` returns the pure step `step(state, batch, rng) -> (state, metrics)`: token-level
cross-entropy on the target text only, gradients for the trained part of the parameters
(`state.params`), the frozen part (`state.frozen`, e.g. the decoder's base weights under LoRA)
untouched.

With RLA fusion (`FusionConfig.mode == 'rla'`) the loss also carries the gate policies'
REINFORCE term (`gate_objective`), whose reward is the decrease of the task loss since the
previous step; its baselines and that loss live in `state.rl`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rvlf_jax.models import lora as lora_lib
from rvlf_jax.models import slt
from rvlf_jax.rl import reinforce
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib


def trained_mask(params: Any, *, lora: bool, train_sign_encoder: bool = True) -> Any:
  """Which leaves SFT trains: sign encoder and projector, and the decoder's adapters (LoRA) or
  all of the decoder (full fine-tuning)."""

  def trained(path):
    if path[0] == 'decoder':
      return path[-1] in lora_lib.ADAPTER_NAMES if lora else True
    if path[0] == 'sign_encoder':
      return train_sign_encoder
    return True

  return params_lib.mask_from(params, trained)


# The REINFORCE term of the RLA gate policies: weight in the loss, entropy bonus.
GATE_LOSS_WEIGHT = 0.1
GATE_ENTROPY_COEF = 0.2


def gate_objective(loss: jax.Array, records: list[dict[str, jax.Array]], rl: dict[str, Any],
                   step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """The RLA gates' REINFORCE term added to a task loss.

  The reward of every example's gates is stop_gradient(prev_loss - loss), the task loss's
  decrease since the previous step (0 at step 0); each layer i has its own EMA baseline. Only the
  policies get gradients from the term: their log-probabilities and entropies depend on nothing
  else (`fusion._draw_gate`).

  Args:
    loss: float32[] the task loss (differentiable).
    records: one {'gate', 'log_prob', 'entropy'} float32[B] per RLA layer (`slt.GATE_RECORDS`).
    rl: `state.rl`, {'baseline': float32[L], 'prev_loss': float32[]}.
    step: int32[] `state.step`.

  Returns:
    (loss + GATE_LOSS_WEIGHT * mean_i reinforce_i, metrics {'gate_loss', 'gate_reward',
    'gate_{i}' mean gate, 'gate_entropy_{i}'}, the new rl state).
  """
  if rl is None:
    raise ValueError('the model has RLA gates but state.rl is None; create the state with '
                     'rl=state.rl_state(fusion.rla_layers).')
  baseline = rl['baseline']
  if baseline.shape != (len(records),):
    raise ValueError(f'state.rl baseline has shape {baseline.shape}, the model has '
                     f'{len(records)} RLA layers.')
  loss_sg = jax.lax.stop_gradient(loss).astype(jnp.float32)
  reward = jnp.where(step == 0, 0.0, rl['prev_loss'] - loss_sg)
  terms, metrics = [], {}
  for i, rec in enumerate(records):
    reward_b = jnp.broadcast_to(reward, rec['log_prob'].shape)
    terms.append(reinforce.reinforce_loss(rec['log_prob'], rec['entropy'], reward_b, baseline[i],
                                          entropy_coef=GATE_ENTROPY_COEF))
    metrics[f'gate_{i}'] = jnp.mean(rec['gate'])
    metrics[f'gate_entropy_{i}'] = jnp.mean(rec['entropy'])
  gate_loss = jnp.mean(jnp.stack(terms))
  metrics.update(gate_loss=gate_loss, gate_reward=reward)
  new_rl = {'baseline': reinforce.ema_baseline(baseline, jnp.broadcast_to(reward, baseline.shape)),
            'prev_loss': loss_sg}
  return loss + GATE_LOSS_WEIGHT * gate_loss, metrics, new_rl


def with_gate_objective(loss_fn: Callable, state: state_lib.TrainState) -> Callable:
  """Wraps loss_fn(trained) -> (loss, metrics) into trained -> (total, (metrics, rl)): the task
  loss plus `gate_objective` when the metrics carry gate records (rl the new `state.rl`), else
  the loss itself (rl None). metrics['loss'] stays the task loss."""

  def wrapped(trained):
    loss, metrics = loss_fn(trained)
    records = metrics.pop(slt.GATE_RECORDS, None)
    if records is None:
      return loss, ({**metrics, 'loss': loss}, None)
    total, gate_metrics, rl = gate_objective(loss, records, state.rl, state.step)
    return total, ({**metrics, 'loss': loss, **gate_metrics}, rl)

  return wrapped


def apply_step(state: state_lib.TrainState, loss_fn: Callable, tx: optax.GradientTransformation):
  """Differentiates `with_gate_objective(loss_fn, state)`, applies the update, and returns
  (state, metrics with 'loss' (the task loss) and 'grad_norm')."""
  # The value is the total objective; metrics['loss'] is the task loss.
  (_, (metrics, rl)), grads = jax.value_and_grad(
      with_gate_objective(loss_fn, state), has_aux=True)(state.params)
  new_state = state_lib.apply_gradients(state, grads, tx)
  if rl is not None:
    new_state = new_state.replace(rl=rl)
  return new_state, {**metrics, 'grad_norm': optax.tree.norm(grads)}


def make_step(model: slt.SLTModel, tx: optax.GradientTransformation,
              prompt: slt.Prompt) -> Callable:
  """The SFT step for `model`, optimizer `tx` (over the trained part) and instruction `prompt`."""

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    def loss_fn(trained):
      return model.loss(params_lib.merge(trained, state.frozen), batch, prompt, rng)

    return apply_step(state, loss_fn, tx)

  return step


def make_eval_loss(model: slt.SLTModel, prompt: slt.Prompt) -> Callable:
  """Deterministic loss on a batch: eval_loss(state, batch) -> metrics."""

  def eval_loss(state: state_lib.TrainState, batch: dict):
    _, metrics = model.loss(params_lib.merge(state.params, state.frozen), batch, prompt)
    return metrics

  return eval_loss
