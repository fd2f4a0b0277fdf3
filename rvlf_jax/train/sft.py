"""Stage 2, SLT-SFT: instruction tuning of sign encoder + projector + decoder (LoRA or full).

`make_step` returns the pure step `step(state, batch, rng) -> (state, metrics)`: token-level
cross-entropy on the target text only, gradients for the trained part of the parameters
(`state.params`), the frozen part (`state.frozen`, e.g. the decoder's base weights under LoRA)
untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from rvlf_jax.models import lora as lora_lib
from rvlf_jax.models import slt
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


def make_step(model: slt.SLTModel, tx: optax.GradientTransformation,
              prompt: slt.Prompt) -> Callable:
  """The SFT step for `model`, optimizer `tx` (over the trained part) and instruction `prompt`."""

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    def loss_fn(trained):
      return model.loss(params_lib.merge(trained, state.frozen), batch, prompt, rng)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state_lib.apply_gradients(state, grads, tx)
    return state, {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return step


def make_eval_loss(model: slt.SLTModel, prompt: slt.Prompt) -> Callable:
  """Deterministic loss on a batch: eval_loss(state, batch) -> metrics."""

  def eval_loss(state: state_lib.TrainState, batch: dict):
    _, metrics = model.loss(params_lib.merge(state.params, state.frozen), batch, prompt)
    return metrics

  return eval_loss
