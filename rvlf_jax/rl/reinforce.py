"""REINFORCE with a moving-average baseline and an entropy bonus: the gradient estimator of the
RL-gated attention policies (`rvlf_jax.models.rla`), used by the few-shot objective
(`rvlf_jax.fewshot.train`) and by the SLT sign encoder's 'rla' fusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def ema_baseline(baseline: Array, reward: Array, decay: float = 0.9) -> Array:
  """decay * baseline + (1 - decay) * reward: the new baseline (elementwise, e.g. float32[L] for
  the mean reward of each layer)."""
  return decay * baseline + (1.0 - decay) * reward.astype(jnp.float32)


def reinforce_loss(log_prob_g: Array, entropy_g: Array, reward_g: Array, baseline: Array,
                   entropy_coef: float = 0.2) -> Array:
  """mean_G[-(r - b) log pi(a) - entropy_coef * H(pi)], the advantage held constant.

  Args:
    log_prob_g: float[G] log-probability of the drawn actions (differentiable in the policy).
    entropy_g: float[G] policy entropy (differentiable in the policy).
    reward_g: float[G] rewards.
    baseline: float[] (or float[G]) the reward baseline.
    entropy_coef: weight of the entropy bonus.
  """
  advantage = jax.lax.stop_gradient(reward_g.astype(jnp.float32) - baseline)
  return jnp.mean(-advantage * log_prob_g - entropy_coef * entropy_g)
