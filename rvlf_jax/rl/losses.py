"""GRPO policy loss: clipped importance-weighted advantages plus a k3 KL penalty to the SFT model.

Shapes: N = B * G completions, L completion tokens (padded); `mask` float/bool[N, L] marks the
tokens that count (the completion up to and including EOS).

Per token, with ratio = exp(logp - old_logp) and A the advantage of its sequence:
  pg  = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)        (PPO / GRPO)
  kl  = exp(ref_logp - logp) - (ref_logp - logp) - 1                          (k3, Schulman 2020)
  loss_token = pg + beta * kl
then an aggregation, registered by name, reduces float[N, L] to a scalar:
  'seq_mean_token_mean'  mean over each sequence's tokens, then over the N sequences (GRPO paper)
  'token_mean'           mean over all unmasked tokens of the batch (DAPO)
  'dr_grpo'              sum over all tokens / (N * max_len), a constant denominator (Dr. GRPO)

Clamps, as verl's 'low_var_kl': the log-ratios inside both exponentials are clamped to
[-log_ratio_clip, log_ratio_clip] (default 20) so that exp cannot overflow, and the k3 value is
clamped to at most kl_clip (default 10; k3 >= 0) so that one token whose policy has drifted far from
the reference cannot dominate the loss. A clamped token passes no gradient through that term.

With one optimisation step per sampling (mu = 1), old_logp is logp itself (pass None): the ratio is
1 but its gradient is that of the policy gradient. With mu > 1, pass the sampling policy's logp.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rvlf_jax.rl import registry

Array = jax.Array

AGGREGATIONS: registry.Registry[Callable[..., Array]] = registry.Registry('loss aggregation')
register_aggregation = AGGREGATIONS.register
get_aggregation = AGGREGATIONS.get


@register_aggregation('seq_mean_token_mean')
def seq_mean_token_mean(values_nl: Array, mask_nl: Array, max_len: int | None = None) -> Array:
  """Mean over each sequence's unmasked tokens, then mean over all N sequences.

  A sequence without unmasked tokens contributes 0 (and still counts in N).
  """
  del max_len
  per_seq = (values_nl * mask_nl).sum(axis=1) / jnp.maximum(mask_nl.sum(axis=1), 1.0)
  return per_seq.mean()


@register_aggregation('token_mean')
def token_mean(values_nl: Array, mask_nl: Array, max_len: int | None = None) -> Array:
  """Mean over all unmasked tokens of the batch: long completions weigh more than short ones."""
  del max_len
  return (values_nl * mask_nl).sum() / jnp.maximum(mask_nl.sum(), 1.0)


@register_aggregation('dr_grpo')
def dr_grpo(values_nl: Array, mask_nl: Array, max_len: int | None = None) -> Array:
  """Sum over unmasked tokens / (N * max_len): no length normalisation bias (Dr. GRPO).

  Args:
    values_nl: float[N, L] per-token values.
    mask_nl: float[N, L] token mask.
    max_len: the constant denominator per sequence, e.g. the generation budget; None means L.
  """
  n, length = values_nl.shape
  return (values_nl * mask_nl).sum() / (n * (length if max_len is None else max_len))


def k3_kl(logp: Array, ref_logp: Array, log_ratio_clip: float = 20.0,
          kl_clip: float = 10.0) -> Array:
  """Per-token k3 estimate of KL(policy || ref): exp(d) - d - 1 with d = ref_logp - logp, clamped.

  Unbiased for samples of the policy, always >= 0, and with lower variance than -d (k1).
  """
  d = jnp.clip(ref_logp - logp, -log_ratio_clip, log_ratio_clip)
  return jnp.minimum(jnp.exp(d) - d - 1.0, kl_clip)


def grpo_loss(logp: Array, advantages: Array, mask: Array, *, old_logp: Array | None = None,
              ref_logp: Array | None = None, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.04,
              aggregation: str = 'seq_mean_token_mean', max_len: int | None = None,
              log_ratio_clip: float = 20.0,
              kl_clip: float = 10.0) -> tuple[Array, dict[str, Array]]:
  """GRPO policy loss of a batch of completions (to minimise).

  Args:
    logp: float[N, L] log-probabilities of the sampled tokens under the current policy.
    advantages: float[N] one advantage per completion (e.g. advantages_bg.reshape(-1)).
    mask: bool/float[N, L], 1 on completion tokens.
    old_logp: float[N, L] under the sampling policy; None means stop_gradient(logp) (mu = 1).
    ref_logp: float[N, L] under the frozen reference (SFT) policy; needed when beta > 0, and
      reported in the 'kl' metric whenever given.
    epsilon: lower clip range, ratio >= 1 - epsilon.
    epsilon_high: upper clip range, ratio <= 1 + epsilon_high; None means epsilon (symmetric).
      DAPO's clip-higher uses e.g. 0.28 with epsilon 0.2.
    beta: weight of the KL penalty, a Python number (0 leaves the KL out of the loss).
    aggregation: name of a registered aggregation (module docstring).
    max_len: the 'dr_grpo' denominator per sequence; None means L.
    log_ratio_clip, kl_clip: clamps described in the module docstring.

  Returns:
    (loss scalar, metrics): 'pg_loss' and 'kl_loss' (aggregated as the loss is), and token means
    over the mask of 'kl', 'ratio', 'clip_frac' (tokens whose clip is active, i.e. that pass no
    gradient), 'clip_frac_low' and 'clip_frac_high'.
  """
  if logp.ndim != 2 or advantages.shape != logp.shape[:1] or mask.shape != logp.shape:
    raise ValueError(f'Expected logp [N, L], advantages [N], mask [N, L]; got {logp.shape}, '
                     f'{advantages.shape}, {mask.shape}.')
  if beta and ref_logp is None:
    raise ValueError(f'beta={beta} needs ref_logp (or set beta=0).')
  aggregate = get_aggregation(aggregation)
  eps_high = epsilon if epsilon_high is None else epsilon_high
  mask = mask.astype(jnp.float32)
  logp = logp.astype(jnp.float32)
  old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp.astype(jnp.float32)
  adv = advantages.astype(jnp.float32)[:, None]

  ratio = jnp.exp(jnp.clip(logp - old, -log_ratio_clip, log_ratio_clip))
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  if ref_logp is None:
    kl = jnp.zeros_like(logp)
  else:
    kl = k3_kl(logp, ref_logp.astype(jnp.float32), log_ratio_clip, kl_clip)
  pg_loss = aggregate(pg, mask, max_len)
  kl_loss = aggregate(kl, mask, max_len)
  loss = pg_loss + beta * kl_loss

  # The clip binds (min picks the clipped, constant term) only in the direction A pushes the ratio.
  ratio_sg = jax.lax.stop_gradient(ratio)
  low = (ratio_sg < 1.0 - epsilon) & (adv < 0)
  high = (ratio_sg > 1.0 + eps_high) & (adv > 0)
  metrics = {
      'pg_loss': jax.lax.stop_gradient(pg_loss),
      'kl_loss': jax.lax.stop_gradient(kl_loss),
      'kl': masked_mean(jax.lax.stop_gradient(kl), mask),
      'ratio': masked_mean(ratio_sg, mask),
      'clip_frac': masked_mean(low | high, mask),
      'clip_frac_low': masked_mean(low, mask),
      'clip_frac_high': masked_mean(high, mask),
  }
  return loss, metrics


def entropy_from_logits(logits: Array) -> Array:
  """Entropy of the softmax over the last axis, in float32: float[..., V] -> float[..., ].

  Computed as logsumexp(z) - sum(softmax(z) z), which needs no log of small probabilities.
  """
  z = logits.astype(jnp.float32)
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def masked_mean(values: Array, mask: Array) -> Array:
  """Mean of values over the mask (0 when the mask is empty), e.g. for entropy over completions."""
  return token_mean(values.astype(jnp.float32), mask.astype(jnp.float32))
