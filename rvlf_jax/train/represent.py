"""Stage 1, semantic representation learning: sign-text alignment.

The sign encoder learns from a symmetric token-level contrastive loss between sign tokens and
text tokens plus a captioning loss (sign -> text), as in GFSLT-VLP / RVLF stage 1
(`slt.SignTextAligner`). Everything is trained; its 'sign_encoder' subtree initialises stage 2.
With RLA fusion the step adds the gate policies' REINFORCE term, as SFT does
(`sft.gate_objective`).
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from rvlf_jax.models import slt
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import sft
from rvlf_jax.train import state as state_lib


def make_step(model: slt.SignTextAligner, tx: optax.GradientTransformation) -> Callable:
  """The stage-1 step: step(state, batch, rng) -> (state, metrics)."""

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    def loss_fn(trained):
      return model.loss(params_lib.merge(trained, state.frozen), batch, rng)

    return sft.apply_step(state, loss_fn, tx)  # With the RLA gates' REINFORCE term, if any.

  return step
