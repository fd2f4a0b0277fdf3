"""Stage 3, SLT-GRPO: sample a group of translations per video, reward them, update the policy.

One step on a batch of B videos:
  1. sampling: the prompt and sign tokens of each video are encoded and prefilled once; G
     translations are sampled per video, vmapped over the group (`rl.sampler.sample_group`);
  2. reward (host): the translations are detokenized and scored against the reference with the
     registered rewards (default 0.5 sentence BLEU + 0.5 ROUGE-L); advantages are normalised
     within each group;
  3. update: `mu` policy iterations of the clipped GRPO loss with a k3 KL penalty to the frozen
     SFT policy (`rl.losses.grpo_loss`), the sampling policy's log-probs kept as old_logp.

The policy is the SFT model with a fresh LoRA on its (merged) decoder; the reference policy is the
same model without the adapters, so it needs no second copy of the weights. The sign encoder and
projector stay frozen, so the prompt embeddings are computed once per step and shared by the
sampling, the reference and every policy iteration.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvlf_jax.data import pipeline
from rvlf_jax.models import decoder as dec
from rvlf_jax.models import slt
from rvlf_jax.rl import advantages as advantages_lib
from rvlf_jax.rl import losses, rewards, sampler
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO settings (defaults as in the RVLF recipe).

  Attributes:
    group_size: G samples per video.
    sampling: temperature / top-k / top-p / max_new_tokens of the group sampler.
    rewards: (name, weight) pairs of registered rewards.
    advantage: registered advantage estimator ('grpo' or 'dr_grpo').
    epsilon, epsilon_high: clip range of the importance ratio.
    beta: weight of the KL penalty to the reference (SFT) policy.
    aggregation: registered loss aggregation.
    mu: policy iterations per sampled batch.
    lang: tokenisation of the rewards ('en', 'de', 'zh').
  """

  group_size: int = 8
  sampling: sampler.SamplingConfig = sampler.SamplingConfig(temperature=1.0, max_new_tokens=32)
  rewards: tuple[tuple[str, float], ...] = (('bleu', 0.5), ('rouge_l', 0.5))
  advantage: str = 'grpo'
  epsilon: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.04
  aggregation: str = 'seq_mean_token_mean'
  mu: int = 1
  lang: str = 'en'


def trained_mask(params: Any) -> Any:
  """GRPO trains the decoder's LoRA adapters only."""
  return params_lib.mask_from(
      params, lambda path: path[0] == 'decoder' and path[-1] in ('lora_a', 'lora_b'))


def _completion_logp(llm: dec.Decoder, prefix_btd, prefix_valid_bt, tokens_bl, mask_bl,
                     temperature: float):
  """float32[B, L]: log-probabilities of completion tokens after a prefix (teacher forcing)."""
  logits = slt.decode_targets(llm, prefix_btd, prefix_valid_bt, tokens_bl, mask_bl)
  if temperature > 0:
    logits = logits / temperature
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_bl[..., None], axis=-1)[..., 0]


class GRPOTrainer:
  """The GRPO step for one SLT model: `step(state, batch, rng) -> (state, metrics)`.

  `state.params` holds the adapters (see `trained_mask`), `state.frozen` everything else.
  """

  def __init__(self, model: slt.SLTModel, tx, prompt: slt.Prompt, tokenizer,
               config: GRPOConfig = GRPOConfig()):
    if model.config.lora is None:
      raise ValueError('GRPO trains LoRA adapters: give the SLT model a LoraConfig.')
    self.model, self.tx, self.prompt = model, tx, prompt
    self.tokenizer, self.config = tokenizer, config
    policy = model.decoder
    reference = dec.Decoder(model.config.decoder)  # no adapters: the SFT policy
    temperature = config.sampling.temperature

    def logp_fn(llm):
      return nn.apply(lambda m, *a: _completion_logp(m, *a, temperature), llm)

    policy_logp, reference_logp = logp_fn(policy), logp_fn(reference)

    def prefix(params, batch):
      embeds, valid = model.apply({'params': params}, batch, prompt.before, prompt.after,
                                  method=slt.SLTModel.prefix)
      return embeds, valid

    def reference_fn(frozen, embeds, valid, tokens, mask):
      return reference_logp({'params': frozen['decoder']}, embeds, valid, tokens, mask)

    def update(state, embeds, valid, tokens, mask, adv, old_logp, ref_logp):
      def loss_fn(trained):
        decoder_params = params_lib.merge(trained, state.frozen)['decoder']
        logp = policy_logp({'params': decoder_params}, embeds, valid, tokens, mask)
        return losses.grpo_loss(
            logp, adv, mask, old_logp=old_logp, ref_logp=ref_logp, epsilon=config.epsilon,
            epsilon_high=config.epsilon_high, beta=config.beta,
            aggregation=config.aggregation, max_len=config.sampling.max_new_tokens)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return state_lib.apply_gradients(state, grads, tx), {**metrics, 'loss': loss}

    self._prefix = jax.jit(prefix)
    self._reference = jax.jit(reference_fn)
    self._update = jax.jit(update, donate_argnums=0)

  def step(self, state: state_lib.TrainState, batch: dict, rng: jax.Array):
    """One GRPO step on a pipeline batch (host fields 'text' and 'example_mask' are used)."""
    cfg, g = self.config, self.config.group_size
    timings = {}
    start = time.perf_counter()
    params = params_lib.merge(state.params, state.frozen)
    device = pipeline.device_batch(batch)
    embeds, valid = self._prefix(params, device)
    positions = dec.positions_from_mask(valid)
    out = sampler.sample_group(self.model.decoder, params['decoder'], embeds, positions, rng,
                               group_size=g, config=cfg.sampling,
                               eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
    tokens = np.asarray(out['tokens'])  # [B, G, N]; waits for the sampler
    timings['time_sampling'] = time.perf_counter() - start

    start = time.perf_counter()
    b, _, n = tokens.shape
    hyps = self.tokenizer.decode_batch(tokens.reshape(b * g, n))
    refs = [str(t) for t in batch['text']]
    scored = rewards.compute(dict(cfg.rewards), hyps, refs, group_size=g, lang=cfg.lang)
    rewards_bg = np.asarray(scored['total'], np.float32).reshape(b, g)
    adv_bg = np.asarray(advantages_lib.compute(cfg.advantage, jnp.asarray(rewards_bg)))
    real = np.asarray(batch.get('example_mask', np.ones(b, bool)), bool)
    adv_bg = np.where(real[:, None], adv_bg, 0.0)  # filler rows teach nothing
    timings['time_reward'] = time.perf_counter() - start

    start = time.perf_counter()
    tile = lambda x: jnp.repeat(x, g, axis=0)  # prompt of video b for its G samples
    embeds_n, valid_n = tile(embeds), tile(valid)
    tokens_n = jnp.asarray(tokens.reshape(b * g, n))
    mask_n = jnp.asarray(out['mask']).reshape(b * g, n) & jnp.asarray(real).repeat(g)[:, None]
    old_logp = jnp.asarray(out['logp']).reshape(b * g, n) if cfg.mu > 1 else None
    ref_logp = self._reference(state.frozen, embeds_n, valid_n, tokens_n, mask_n)
    adv_n = jnp.asarray(adv_bg.reshape(-1), jnp.float32)
    for _ in range(cfg.mu):
      state, metrics = self._update(state, embeds_n, valid_n, tokens_n, mask_n, adv_n, old_logp,
                                    ref_logp)
    metrics = jax.device_get(metrics)
    timings['time_update'] = time.perf_counter() - start

    lengths = np.asarray(out['lengths'])[real]
    report = {f'reward_{k}_mean': float(np.mean(np.asarray(v).reshape(b, g)[real]))
              for k, v in scored.items()}
    real_rewards = rewards_bg[real]
    report.update(
        reward_std=float(real_rewards.std()), reward_min=float(real_rewards.min()),
        reward_max=float(real_rewards.max()),
        zero_std_fraction=float(advantages_lib.zero_std_fraction(jnp.asarray(real_rewards))),
        completion_length_mean=float(lengths.mean()), completion_length_max=int(lengths.max()))
    return state, {**{k: float(v) for k, v in metrics.items()}, **report, **timings}
