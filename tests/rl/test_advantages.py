"""Advantage estimators on hand-made reward groups."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.rl import advantages

REWARDS = jnp.asarray([[1.0, 0.0, 0.0, 1.0],
                       [0.5, 0.5, 0.5, 0.5],
                       [0.0, 0.0, 0.0, 0.6]])


def test_grpo_normalises_by_the_unbiased_group_std():
  adv = advantages.compute('grpo', REWARDS)
  # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 1: constant; group 2: mean 0.15,
  # std sqrt((3 * 0.15^2 + 0.45^2) / 3).
  s0, s2 = math.sqrt(1 / 3), math.sqrt((3 * 0.15**2 + 0.45**2) / 3)
  expected = [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0],
              [0.0] * 4,
              [-0.15 / s2, -0.15 / s2, -0.15 / s2, 0.45 / s2]]
  np.testing.assert_allclose(adv, expected, rtol=1e-5)
  np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-6)


def test_grpo_population_std_and_eps():
  adv = advantages.get('grpo')(REWARDS[:1], ddof=0, eps=0.5)
  np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5]], rtol=1e-6)  # 0.5 / (0.5 + 0.5)
  with pytest.raises(ValueError, match='G=1'):
    advantages.compute('grpo', REWARDS[:, :1])


def test_dr_grpo_only_centres():
  adv = advantages.compute('dr_grpo', REWARDS)
  np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.15, -0.15, -0.15, 0.45]],
                             atol=1e-6)


def test_zero_std_fraction_and_shape_errors():
  assert float(advantages.zero_std_fraction(REWARDS)) == pytest.approx(1 / 3)
  assert float(advantages.zero_std_fraction(REWARDS, atol=0.7)) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=r'float\[B, G\]'):
    advantages.compute('grpo', REWARDS.reshape(-1))
  with pytest.raises(KeyError, match="Unknown advantage estimator 'ppo'"):
    advantages.compute('ppo', REWARDS)
  assert {'grpo', 'dr_grpo'} <= set(advantages.names())
