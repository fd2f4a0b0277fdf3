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
same model without the adapters, so it needs no second copy of the decoder. By default the sign
encoder and projector stay frozen, so the prompt embeddings are computed once per step and shared
by the sampling, the reference and every policy iteration. With `train_sign_encoder` the policy
gradient also reaches the sign encoder and projector: the update encodes the videos itself, and
their SFT values stay in the frozen part under `REFERENCE` for the reference policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from rvlf_jax import sharding
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
    train_sign_encoder: also train the sign encoder and projector (default: adapters only).
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
  train_sign_encoder: bool = False


def reward_report(scored_bg: dict[str, np.ndarray], lengths_bg: np.ndarray) -> dict[str, float]:
  """The logged statistics of a step's completions.

  Args:
    scored_bg: reward name -> float[B, G] per completion, 'total' the weighted sum.
    lengths_bg: int[B, G] completion lengths.

  Returns:
    'reward_<name>_mean' per reward (and for 'total'), std / min / max of the total, the
    fraction of groups whose totals are all equal (no advantage), completion length mean / max.
  """
  total = np.asarray(scored_bg['total'], np.float32)
  report = {f'reward_{k}_mean': float(np.mean(v)) for k, v in scored_bg.items()}
  report.update(
      reward_std=float(total.std()), reward_min=float(total.min()),
      reward_max=float(total.max()),
      zero_std_fraction=float(advantages_lib.zero_std_fraction(jnp.asarray(total))),
      completion_length_mean=float(lengths_bg.mean()),
      completion_length_max=int(lengths_bg.max()))
  return report


# The parts of the translator before the decoder, which GRPO trains with `train_sign_encoder`.
SIGN_PARTS = ('sign_encoder', 'projector')
# Key of the frozen part holding their SFT values (the reference policy's) when they train.
REFERENCE = 'reference'


def trained_mask(params: Any, *, sign_encoder: bool = False) -> Any:
  """GRPO trains the decoder's LoRA adapters, and with sign_encoder the SIGN_PARTS too."""

  def trained(path):
    if path[0] == 'decoder':
      return path[-1] in ('lora_a', 'lora_b')
    return sign_encoder and path[0] in SIGN_PARTS

  return params_lib.mask_from(params, trained)


def split_params(params: Any, *, sign_encoder: bool = False) -> tuple[dict, dict]:
  """(trained, frozen) of the GRPO state from the policy's full parameters: with sign_encoder,
  frozen also keeps a copy of the SIGN_PARTS under REFERENCE (the reference policy's)."""
  trained, frozen = params_lib.partition(params, trained_mask(params, sign_encoder=sign_encoder))
  if sign_encoder:
    frozen[REFERENCE] = {k: params[k] for k in SIGN_PARTS if k in params}
  return trained, frozen


def policy_params(trained: Any, frozen: Any) -> dict:
  """The policy's full parameters (`SLTModel`'s tree) from the GRPO state's two parts."""
  params = params_lib.merge(trained, frozen)
  params.pop(REFERENCE, None)
  return params


def reference_params(frozen: Any) -> dict:
  """The reference (SFT) policy's parameters: the frozen decoder without adapters, and the SFT
  sign encoder and projector (frozen themselves, or their copy under REFERENCE)."""
  return {k: v for k, v in {**frozen, **frozen.get(REFERENCE, {})}.items() if k != REFERENCE}


def _completion_logp(llm: dec.Decoder, prefix_btd, prefix_valid_bt, tokens_bl, mask_bl,
                     temperature: float):
  """float32[B, L]: log-probabilities of completion tokens after a prefix (teacher forcing)."""
  logits = slt.decode_targets(llm, prefix_btd, prefix_valid_bt, tokens_bl, mask_bl)
  if temperature > 0:
    logits = logits / temperature
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_bl[..., None], axis=-1)[..., 0]


def make_prefix(model: slt.SLTModel, prompt: slt.Prompt) -> Callable:
  """prefix(params, batch) -> (embeds float[B, P, D], valid bool[B, P]): the instruction and
  sign tokens of each video, encoded once per step for the sampling, the reference and the
  update."""

  def prefix(params, batch):
    return model.apply({'params': params}, batch, prompt.before, prompt.after,
                       method=slt.SLTModel.prefix)

  return prefix


def _logp_fn(llm: dec.Decoder, temperature: float) -> Callable:
  return nn.apply(lambda m, *a: _completion_logp(m, *a, temperature), llm)


def make_prompts(model: slt.SLTModel, prompt: slt.Prompt | None, config: GRPOConfig
                 ) -> Callable:
  """prompts(params, inputs) -> (embeds float[N, P, D], valid bool[N, P]): the prefix of each of
  the N = B x G completions.

  With the sign encoder frozen, `inputs` is {'embeds', 'valid'}: the step's prefixes, already
  repeated for the G samples of each video. With `config.train_sign_encoder` it is the batch of
  B videos, encoded here by `params`' sign encoder and projector (so gradients reach them) and
  repeated G times; `prompt` is then required.
  """
  if not config.train_sign_encoder:
    return lambda params, inputs: (inputs['embeds'], inputs['valid'])
  if prompt is None:
    raise ValueError('train_sign_encoder: give the prompt, the update encodes the videos.')
  prefix = make_prefix(model, prompt)

  def prompts(params, batch):
    embeds, valid = prefix(params, batch)
    repeat = lambda x: jnp.repeat(x, config.group_size, axis=0)
    return repeat(embeds), repeat(valid)

  return prompts


def make_reference(model: slt.SLTModel, config: GRPOConfig,
                   prompt: slt.Prompt | None = None) -> Callable:
  """reference(frozen, prompts, tokens, mask) -> float32[N, L]: the completions'
  log-probabilities under the reference (SFT) policy, the decoder without its adapters after
  the SFT sign encoder's prefix (`prompts`: the inputs of `make_prompts`)."""
  reference_logp = _logp_fn(dec.Decoder(model.config.decoder), config.sampling.temperature)
  prompts_of = make_prompts(model, prompt, config)

  def reference(frozen, prompts, tokens, mask):
    params = reference_params(frozen)
    embeds, valid = prompts_of(params, prompts)
    return reference_logp({'params': params['decoder']}, embeds, valid, tokens, mask)

  return reference


def make_update(model: slt.SLTModel, tx: optax.GradientTransformation,
                config: GRPOConfig, prompt: slt.Prompt | None = None) -> Callable:
  """The pure GRPO policy update, one of the `mu` iterations of a step:

    update(state, prompts, tokens, mask, adv, old_logp, ref_logp) -> (state, metrics)

  on N = B x G completions: prompts their prefixes (the inputs of `make_prompts`: the prefixes
  repeated for each video's G samples, or with `train_sign_encoder` the videos themselves),
  tokens int32[N, L], mask bool[N, L], adv float32[N], old_logp float32[N, L] or None (mu == 1:
  the policy's own, detached), ref_logp float32[N, L]. Jit it (or shard it) with the state
  donated; `GRPOTrainer` does.
  """
  policy_logp = _logp_fn(model.decoder, config.sampling.temperature)
  prompts_of = make_prompts(model, prompt, config)

  def update(state, prompts, tokens, mask, adv, old_logp, ref_logp):
    def loss_fn(trained):
      params = policy_params(trained, state.frozen)
      embeds, valid = prompts_of(params, prompts)
      logp = policy_logp({'params': params['decoder']}, embeds, valid, tokens, mask)
      return losses.grpo_loss(
          logp, adv, mask, old_logp=old_logp, ref_logp=ref_logp, epsilon=config.epsilon,
          epsilon_high=config.epsilon_high, beta=config.beta,
          aggregation=config.aggregation, max_len=config.sampling.max_new_tokens)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state_lib.apply_gradients(state, grads, tx), {**metrics, 'loss': loss}

  return update


class GRPOTrainer:
  """The GRPO step for one SLT model: `step(state, batch, rng) -> (state, metrics)`.

  `state.params` holds what trains (see `trained_mask`), `state.frozen` everything else
  (`split_params` builds the two).

  Without a mesh the pieces are plain `jax.jit`s. With one, they run sharded over it: the state
  laid out by `state_shardings` (donated to the update), every per-video or per-completion array
  split by rows over the data axes (`sharding.batch_sharding`), the models' activation
  constraints in effect. Multi-process, each process passes its own rows of the batch (grain
  sharded by process) and scores its own completions; the logged reward statistics are over all
  processes' rows.
  """

  def __init__(self, model: slt.SLTModel, tx, prompt: slt.Prompt, tokenizer,
               config: GRPOConfig = GRPOConfig(), *, mesh: jax.sharding.Mesh | None = None,
               state_shardings: Any = None, rules: sharding.Rules | None = None):
    if model.config.lora is None:
      raise ValueError('GRPO trains LoRA adapters: give the SLT model a LoraConfig.')
    if (mesh is None) != (state_shardings is None):
      raise ValueError('give both mesh and state_shardings (sharded), or neither (plain jit).')
    self.model, self.tx, self.prompt = model, tx, prompt
    self.tokenizer, self.config = tokenizer, config
    # Not a default argument: rvlf_jax.sharding may still be loading (it imports recipe.build,
    # which imports this module).
    self.mesh, self.rules = mesh, sharding.RULES if rules is None else rules
    prefix = make_prefix(model, prompt)
    reference = make_reference(model, config, prompt)
    update = make_update(model, tx, config, prompt)
    if mesh is None:
      self._rows = None
      self._prefix = jax.jit(prefix)
      self._reference = jax.jit(reference)
      self._update = jax.jit(update, donate_argnums=0)
      return
    rows, rep = sharding.batch_sharding(mesh, self.rules), sharding.replicated(mesh)
    params_sh = policy_params(state_shardings.params, state_shardings.frozen)
    self._rows = rows
    self._prefix = jax.jit(prefix, in_shardings=(params_sh, rows), out_shardings=rows)
    self._reference = jax.jit(reference, in_shardings=(state_shardings.frozen,) + (rows,) * 3,
                              out_shardings=rows)
    self._update = jax.jit(update, in_shardings=(state_shardings,) + (rows,) * 6,
                           out_shardings=(state_shardings, rep), donate_argnums=0)

  def _context(self):
    """Where the pieces are traced: under the mesh and rules when sharded."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.mesh_context(self.mesh, self.rules)

  def _to_device(self, local):
    """This process's rows -> the arrays the pieces take (global ones when sharded)."""
    if self._rows is None:
      return jax.tree.map(jnp.asarray, local)
    return sharding.global_batch(local, self._rows)

  def _to_host(self, tree):
    """Arrays of the pieces -> numpy of this process's rows."""
    if self._rows is None:
      return jax.tree.map(np.asarray, tree)
    return sharding.local_rows(tree, self._rows)

  def step(self, state: state_lib.TrainState, batch: dict, rng: jax.Array):
    """One GRPO step on a pipeline batch (host fields 'text' and 'example_mask' are used).

    Multi-process, `batch` is this process's rows of the step's batch.
    """
    with self._context():
      return self._step(state, batch, rng)

  def _step(self, state, batch, rng):
    cfg, g = self.config, self.config.group_size
    timings = {}
    start = time.perf_counter()
    params = policy_params(state.params, state.frozen)
    videos = self._to_device(pipeline.device_batch(batch))
    embeds, valid = self._prefix(params, videos)
    positions = dec.positions_from_mask(valid)
    out = sampler.sample_group(self.model.decoder, params['decoder'], embeds, positions, rng,
                               group_size=g, config=cfg.sampling,
                               eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
    out = self._to_host(out)  # this process's [B, G, N]; waits for the sampler
    tokens = out['tokens']
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
    mask_n = out['mask'].reshape(b * g, n) & real.repeat(g)[:, None]
    completions = self._to_device(dict(
        tokens=tokens.reshape(b * g, n), mask=mask_n,
        adv=adv_bg.reshape(-1).astype(np.float32),
        old_logp=out['logp'].reshape(b * g, n) if cfg.mu > 1 else None))
    tokens_n, mask_n, adv_n, old_logp = (
        completions[k] for k in ('tokens', 'mask', 'adv', 'old_logp'))
    if cfg.train_sign_encoder:
      prompts = videos  # encoded again inside, by the policy and by the reference
    else:  # the prompt of video b for its G samples
      prompts = self._to_device(dict(embeds=np.repeat(self._to_host(embeds), g, axis=0),
                                     valid=np.repeat(self._to_host(valid), g, axis=0)))
    ref_logp = self._reference(state.frozen, prompts, tokens_n, mask_n)
    for _ in range(cfg.mu):
      state, metrics = self._update(state, prompts, tokens_n, mask_n, adv_n, old_logp, ref_logp)
    metrics = jax.device_get(metrics)
    timings['time_update'] = time.perf_counter() - start

    # Statistics over every process's real rows.
    gathered = self._gather(dict(real=real, lengths=out['lengths'],
                                 **{k: np.asarray(v, np.float32).reshape(b, g)
                                    for k, v in scored.items()}))
    real = gathered.pop('real')
    lengths = gathered.pop('lengths')[real]
    report = reward_report({k: v[real] for k, v in gathered.items()}, lengths)
    return state, {**{k: float(v) for k, v in metrics.items()}, **report, **timings}

  def _gather(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows of host arrays, in process order (the arrays themselves when there
    is one process)."""
    if jax.process_count() == 1:
      return local
    return {k: np.asarray(v) for k, v in
            multihost_utils.process_allgather(local, tiled=True).items()}
