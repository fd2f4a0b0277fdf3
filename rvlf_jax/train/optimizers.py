"""Optimizers: AdamW with warmup + decay, gradient clipping, and frozen parameters.

Frozen parameters (a LoRA base, a frozen encoder) get `optax.set_to_zero()` through
`optax.multi_transform`, so they carry no optimizer state; weight decay applies to matrices only
(not to norms, biases or scalars).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from rvlf_jax.train import params as params_lib


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW settings.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0.
    total_steps: length of the decay; the schedule stays at its final value afterwards.
    schedule: 'cosine' (to end_factor * peak), 'linear' (likewise) or 'constant' (after warmup).
    end_factor: final learning rate as a fraction of the peak.
    weight_decay, b1, b2, eps: AdamW.
    grad_clip: global-norm clipping threshold (0: off).
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 10_000
  schedule: str = 'cosine'
  end_factor: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.schedule not in ('cosine', 'linear', 'constant'):
      raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}.")
    if self.learning_rate <= 0 or self.total_steps <= 0 or self.warmup_steps < 0:
      raise ValueError(f'Invalid optimizer settings: {self}.')


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  peak, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(config.total_steps - warmup, 1)
  if config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  elif config.schedule == 'linear':
    decay = optax.linear_schedule(peak, peak * config.end_factor, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_factor)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda x: getattr(x, 'ndim', 0) >= 2, params)


def make_optimizer(config: OptimizerConfig, trainable: Any = None) -> optax.GradientTransformation:
  """AdamW for the parameters marked trainable (a tree of bools like params; None: all)."""
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def scale_part(tx: optax.GradientTransformation, factor: float,
               where: Callable[[tuple[str, ...]], bool]) -> optax.GradientTransformation:
  """tx with the updates of the leaves where(path) multiplied by factor: a learning rate (and
  decoupled weight decay) `factor` times tx's for part of the model, e.g. a pretrained encoder
  tuned gently next to fresh adapters."""
  mask = lambda tree: params_lib.mask_from(tree, where)
  return optax.chain(tx, optax.masked(optax.scale(factor), mask))
