"""Text-only GRPO for a plain decoder: G completions per prompt, a text reward, a KL-anchored
update.

The text counterpart of `train.grpo` (which does this for the SLT model, whose prompt is a sign
prefix): here a prompt is a row of token ids. One step on B prompts:
  1. sampling: each prompt's token embeddings are prefilled once and G completions are sampled
     per prompt (`rl.sampler.sample_group`);
  2. reference: the completions' log-probabilities under the frozen reference parameters; it is
     dispatched before the rewards are computed, so the device works while the host scores;
  3. reward (host): the completions are detokenized and scored against each prompt's reference
     with registered rewards (`rl.rewards`); advantages are normalised within each group;
  4. update: `mu` iterations of the clipped GRPO loss with a k3 KL penalty to the reference
     (`rl.losses.grpo_loss`), the sampling policy's log-probs kept as old_logp when mu > 1.

Every parameter of the decoder is trained (what TRL's GRPOTrainer and Tunix's GRPOLearner do by
default); the reference policy is a frozen copy of the initial parameters, kept in
`state.frozen['reference']` (none when beta == 0).

Teacher forcing shares each prompt across its group as the sampler does (`share_prefix=True`):
the prompt runs through the decoder once, and its G completions attend to its keys and values,
so the gradients of the G completions add up in the shared prefix. The loss and its gradient
are those of running the B x G prompt + completion sequences whole (`share_prefix=False`), with
the prompt's FLOPs divided by G.

Shape vocabulary: B prompts, G completions per prompt, P prompt length, N completion tokens,
V vocabulary, D model width.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rvlf_jax.models import decoder as dec
from rvlf_jax.rl import advantages as advantages_lib
from rvlf_jax.rl import losses, rewards, sampler
from rvlf_jax.train import grpo
from rvlf_jax.train import state as state_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TextGRPOConfig(grpo.GRPOConfig):
  """GRPO settings for a text decoder: those of `train.grpo.GRPOConfig` (64 completion tokens and
  a sentence-BLEU reward by default), and

  Attributes:
    share_prefix: teacher-force each prompt once per group (see the module docstring).
  """

  sampling: sampler.SamplingConfig = sampler.SamplingConfig(temperature=1.0, max_new_tokens=64)
  rewards: tuple[tuple[str, float], ...] = (('bleu', 1.0),)
  share_prefix: bool = True


def completion_logp(model: dec.Decoder, params: Any, prompt_bp: Array, prompt_valid_bp: Array,
                    tokens_bgn: Array, *, temperature: float = 1.0,
                    share_prefix: bool = True) -> Array:
  """float32[B, G, N]: log-probabilities of G completions of each prompt (teacher forcing).

  Args:
    model: the decoder.
    params: its parameters.
    prompt_bp: int[B, P] prompt ids; prompt_valid_bp: bool[B, P], False on padding (either side).
    tokens_bgn: int[B, G, N] completion ids (whatever follows eos is scored too; mask it out).
    temperature: logits are divided by it (as the sampler did); 0 or 1 leaves them.
    share_prefix: run each prompt once and let its G completions attend to its keys and values
      (True), or run every prompt + completion sequence whole (False); the values are the same.
  """
  b, g, n = tokens_bgn.shape
  variables = {'params': params}
  positions_bp = dec.positions_from_mask(prompt_valid_bp)
  last = jnp.argmax(positions_bp, axis=1)  # the last valid prompt slot predicts token 0
  if share_prefix:
    embeds = model.apply(variables, prompt_bp, method=dec.Decoder.embed)
    out = model.apply(variables, embeds_btd=embeds, positions_bt=positions_bp,
                      cache=dec.init_cache(model.config, b, prompt_bp.shape[1]),
                      return_hidden_states=True)
    first_bd = out.hidden_states[-1][jnp.arange(b), last]
    first_logits_bv = model.apply(variables, first_bd[:, None], method=dec.Decoder.logits)[:, 0]
    # The prompt's keys and values repeated for its G completions (a few MB): one decoder pass
    # over the B x G completions then runs every projection as one matmul, and the backward
    # sums the G completions' gradients in these [L, B, P, K, H] arrays. (A vmap over the group
    # with the prefix unbatched, as the sampler does, computes the same values but leaves the
    # group as a batch dimension of every weight gradient: G partial [D, F] products, summed.)
    prefix = {'k': jnp.repeat(out.cache['k'], g, axis=1),
              'v': jnp.repeat(out.cache['v'], g, axis=1),
              'pos': jnp.repeat(out.cache['pos'], g, axis=0), 'index': out.cache['index']}
    first = jnp.broadcast_to(first_logits_bv[:, None, None], (b, g, 1, first_logits_bv.shape[-1]))
    if n == 1:
      logits_bgnv = first
    else:
      next_pos = jnp.repeat(positions_bp.max(axis=1) + 1, g)
      rest = model.apply(variables, tokens_bgn.reshape(b * g, n)[:, :-1],
                         positions_bt=next_pos[:, None] + jnp.arange(n - 1, dtype=jnp.int32),
                         prefix_cache=prefix).logits
      logits_bgnv = jnp.concatenate([first, rest.reshape(b, g, n - 1, -1)], axis=2)
  else:
    p = prompt_bp.shape[1]
    inputs = jnp.concatenate([jnp.repeat(prompt_bp, g, axis=0),
                              tokens_bgn.reshape(b * g, n)[:, :-1]], axis=1)
    valid = jnp.concatenate([jnp.repeat(prompt_valid_bp.astype(bool), g, axis=0),
                             jnp.ones((b * g, n - 1), bool)], axis=1)
    out = model.apply(variables, inputs, positions_bt=dec.positions_from_mask(valid),
                      return_hidden_states=True)
    hidden = out.hidden_states[-1]
    first = hidden[jnp.arange(b * g), jnp.repeat(last, g)][:, None]
    hidden = jnp.concatenate([first, hidden[:, p:]], axis=1)
    logits_bgnv = model.apply(variables, hidden, method=dec.Decoder.logits).reshape(b, g, n, -1)
  logits_bgnv = logits_bgnv.astype(jnp.float32)
  if temperature > 0:
    logits_bgnv = logits_bgnv / temperature
  logp = jax.nn.log_softmax(logits_bgnv, axis=-1)
  return jnp.take_along_axis(logp, tokens_bgn[..., None], axis=-1)[..., 0]


def make_sample(model: dec.Decoder, config: TextGRPOConfig, eos_id: int,
                pad_id: int) -> Callable:
  """sample(params, prompt int[B, P], valid bool[B, P], rng) -> `sampler.sample_group` output."""

  def sample(params, prompt_bp, valid_bp, rng):
    embeds = model.apply({'params': params}, prompt_bp, method=dec.Decoder.embed)
    return sampler.sample_group(model, params, embeds, dec.positions_from_mask(valid_bp), rng,
                                group_size=config.group_size, config=config.sampling,
                                eos_id=eos_id, pad_id=pad_id)

  return sample


def make_reference(model: dec.Decoder, config: TextGRPOConfig) -> Callable:
  """reference(frozen, prompt, valid, tokens int[B, G, N]) -> float32[B, G, N] under the frozen
  reference parameters."""

  def reference(frozen, prompt_bp, valid_bp, tokens_bgn):
    return completion_logp(model, frozen['reference'], prompt_bp, valid_bp, tokens_bgn,
                           temperature=config.sampling.temperature,
                           share_prefix=config.share_prefix)

  return reference


def make_update(model: dec.Decoder, tx: optax.GradientTransformation,
                config: TextGRPOConfig) -> Callable:
  """The pure policy update, one of the `mu` iterations of a step:

    update(state, prompt, valid, tokens, mask, adv, old_logp, ref_logp) -> (state, metrics)

  with prompt int[B, P], valid bool[B, P], tokens int[B, G, N], mask bool[B, G, N] (completion
  tokens, eos included), adv float32[B, G], old_logp float32[B, G, N] or None (mu == 1: the
  policy's own, detached), ref_logp float32[B, G, N] or None (beta == 0). Jit it with the state
  donated; `TextGRPOTrainer` does.
  """

  def update(state, prompt_bp, valid_bp, tokens_bgn, mask_bgn, adv_bg, old_logp, ref_logp):
    b, g, n = tokens_bgn.shape
    flat = lambda x: None if x is None else x.reshape(b * g, n)

    def loss_fn(params):
      logp = completion_logp(model, params, prompt_bp, valid_bp, tokens_bgn,
                             temperature=config.sampling.temperature,
                             share_prefix=config.share_prefix)
      return losses.grpo_loss(
          flat(logp), adv_bg.reshape(-1), flat(mask_bgn), old_logp=flat(old_logp),
          ref_logp=flat(ref_logp), epsilon=config.epsilon, epsilon_high=config.epsilon_high,
          beta=config.beta, aggregation=config.aggregation,
          max_len=config.sampling.max_new_tokens)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return state_lib.apply_gradients(state, grads, tx), metrics

  return update


class TextGRPOTrainer:
  """The GRPO step of a text decoder: `step(state, batch, rng) -> (state, metrics)`.

  `state.params` holds every decoder parameter; `state.frozen['reference']` the reference policy
  (see `init_state`). The pieces are plain `jax.jit`s, the update with the state donated.

  `tokenizer` needs `decode_batch(int[M, N]) -> list[str]` (text up to the first eos, pad
  dropped) and `eos_id` / `pad_id`, as `rvlf_jax.data.tokenizers.Tokenizer` has.
  """

  def __init__(self, model: dec.Decoder, tx: optax.GradientTransformation, tokenizer,
               config: TextGRPOConfig = TextGRPOConfig()):
    if config.mu < 1:
      raise ValueError(f'mu must be >= 1, got {config.mu}.')
    self.model, self.tx, self.tokenizer, self.config = model, tx, tokenizer, config
    self._sample = jax.jit(make_sample(model, config, tokenizer.eos_id, tokenizer.pad_id))
    self._reference = jax.jit(make_reference(model, config))
    self._update = jax.jit(make_update(model, tx, config), donate_argnums=0)

  def init_state(self, params: Any) -> state_lib.TrainState:
    """Step 0: `params` trained with AdamW state, a copy of them frozen as the reference.

    The reference is a copy, not the same buffers, because the update donates the parameters.
    """
    frozen = {'reference': jax.tree.map(jnp.copy, params)} if self.config.beta else {}
    return state_lib.create(params, self.tx, frozen=frozen)

  def step(self, state: state_lib.TrainState, batch: dict, rng: Array):
    """One GRPO step.

    Args:
      state: from `init_state` (or a previous step).
      batch: {'prompt': int[B, P] ids, 'prompt_mask': bool[B, P] (optional, all valid),
        'reference': B reference texts}.
      rng: the sampling key.

    Returns:
      (state, metrics): the loss terms, the statistics of the B x G completions
      (`train.grpo.reward_report`: 'reward_total_mean', 'reward_<name>_mean', 'reward_std',
      completion lengths, ...) and the seconds spent sampling, scoring and updating.
    """
    cfg, g = self.config, self.config.group_size
    timings = {}
    start = time.perf_counter()
    prompt = jnp.asarray(batch['prompt'], jnp.int32)
    valid = jnp.asarray(batch.get('prompt_mask', np.ones(prompt.shape, bool)), bool)
    out = self._sample(state.params, prompt, valid, rng)
    # Queued behind the sampler: it runs while the host detokenizes and scores below.
    ref_logp = self._reference(state.frozen, prompt, valid, out['tokens']) if cfg.beta else None
    tokens = np.asarray(out['tokens'])  # [B, G, N]; waits for the sampler only
    timings['time_sampling'] = time.perf_counter() - start

    start = time.perf_counter()
    b, _, n = tokens.shape
    refs: Sequence[str] = [str(t) for t in batch['reference']]
    scored = rewards.compute(dict(cfg.rewards), self.tokenizer.decode_batch(
        tokens.reshape(b * g, n)), refs, group_size=g, lang=cfg.lang)
    rewards_bg = np.asarray(scored['total'], np.float32).reshape(b, g)
    adv_bg = advantages_lib.compute(cfg.advantage, jnp.asarray(rewards_bg))
    timings['time_reward'] = time.perf_counter() - start

    start = time.perf_counter()
    old_logp = out['logp'] if cfg.mu > 1 else None
    for _ in range(cfg.mu):
      state, metrics = self._update(state, prompt, valid, out['tokens'], out['mask'], adv_bg,
                                    old_logp, ref_logp)
    metrics = jax.device_get(metrics)
    timings['time_update'] = time.perf_counter() - start

    report = grpo.reward_report(
        {k: np.asarray(v, np.float32).reshape(b, g) for k, v in scored.items()},
        np.asarray(out['lengths']))
    return state, {**{k: float(v) for k, v in metrics.items()}, **report, **timings}
