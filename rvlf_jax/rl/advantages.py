"""Group-relative advantage estimators: rewards float[B, G] -> advantages float[B, G].

B prompts, G sampled completions per prompt. Each estimator is a pure jax function registered by
name, so a variant is one more registration:
  'grpo'     (r - group mean) / (group std + eps)   (DeepSeekMath; std with ddof=1 as in TRL/verl)
  'dr_grpo'  r - group mean                          (Dr. GRPO: no std, which up-weights easy and
                                                      hard prompts whose rewards barely vary)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rvlf_jax.rl import registry

Array = jax.Array

ESTIMATORS = registry.Registry('advantage estimator')
register = ESTIMATORS.register
get = ESTIMATORS.get
names = ESTIMATORS.names


def _check_groups(rewards_bg: Array) -> Array:
  if rewards_bg.ndim != 2:
    raise ValueError(f'Expected rewards float[B, G], got shape {rewards_bg.shape}; reshape '
                     'flat rewards with .reshape(-1, group_size).')
  return jnp.asarray(rewards_bg, jnp.float32)


@register('grpo')
def grpo(rewards_bg: Array, *, eps: float = 1e-6, ddof: int = 1) -> Array:
  """(r - mean) / (std + eps) within each group of G samples.

  Args:
    rewards_bg: float[B, G] rewards.
    eps: keeps groups with equal rewards (std 0) at advantage 0 rather than 0 / 0.
    ddof: 1 (unbiased std, as torch.std in TRL and verl) or 0 (population std).

  Returns:
    float32[B, G] advantages.
  """
  r = _check_groups(rewards_bg)
  if r.shape[1] <= ddof:
    raise ValueError(f'A std with ddof={ddof} needs groups larger than {ddof}; got G={r.shape[1]}.')
  centred = r - r.mean(axis=1, keepdims=True)
  return centred / (r.std(axis=1, keepdims=True, ddof=ddof) + eps)


@register('dr_grpo')
def dr_grpo(rewards_bg: Array) -> Array:
  """r - mean within each group (no std normalisation). Returns float32[B, G]."""
  r = _check_groups(rewards_bg)
  return r - r.mean(axis=1, keepdims=True)


def compute(name: str, rewards_bg: Array, **kwargs) -> Array:
  """Advantages float32[B, G] from the estimator registered as `name`."""
  return get(name)(rewards_bg, **kwargs)


def zero_std_fraction(rewards_bg: Array, atol: float = 0.0) -> Array:
  """Fraction of groups whose G rewards are all equal (max - min <= atol), float32 scalar.

  Such groups give every sample advantage 0, hence no policy gradient: a high fraction means the
  prompts are too easy or too hard for the sampler (or the reward is too coarse).
  """
  r = _check_groups(rewards_bg)
  return jnp.mean((r.max(axis=1) - r.min(axis=1) <= atol).astype(jnp.float32))
