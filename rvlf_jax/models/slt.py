"""Sign-language translation models: the stage-2/3 translator and the stage-1 sign-text aligner.

Shape vocabulary: see `rvlf_jax.models.layers` and `rvlf_jax.models.fusion` (B, T, T', D, V),
plus P1 / P2 the prompt lengths before / after the sign tokens, P = P1 + T' + P2 the prefix
length, L the target length (text_ids, target tokens + eos), E the contrastive embedding width.

`SLTModel`: the decoder reads `[prompt_before][sign tokens][prompt_after][target text]`. Padded
sign tokens and padded text are invalid: their positions are -1 (`decoder.positions_from_mask`),
so they are invisible to attention and leave no gap in the positions of the tokens after them.
The logits that predict text_ids[:, i] are the decoder's outputs at the token before it: the last
valid prefix token for i = 0, text token i - 1 after that. Only those L rows go through the
output projection (the vocabulary matmul is the biggest one of a small LLM).

    model = SLTModel(SLTConfig(SignEncoderConfig.base(), DecoderConfig.qwen3_0_6b(), lora))
    params = model.init_params(jax.random.key(0))      # then params['decoder'] <- load_hf(...)
    prompt = Prompt(before=jnp.asarray(ids_before), after=jnp.asarray(ids_after))
    loss, metrics = model.loss(params, batch, prompt, rng)           # jit-able, pure
    embeds, positions = model.prefill(params, batch, prompt)
    tokens, lengths = decoding.greedy_decode(model.decoder, params['decoder'], embeds, positions,
                                             max_new_tokens=64, eos_id=eos)

`SignTextAligner` (stage 1): the same sign encoder, a small text encoder and a small captioning
decoder; loss = FILIP token-level contrastive loss (both directions) + caption_weight * caption
cross-entropy. Its params['sign_encoder'] has exactly the structure of SLTModel's, so stage 2
starts from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rvlf_jax.models import decoder as dec
from rvlf_jax.models import layers
from rvlf_jax.models import rla
from rvlf_jax.models import skeleton as skel
from rvlf_jax.models.decoder import Decoder, DecoderConfig
from rvlf_jax.models.fusion import Projector, SignEncoder, SignEncoderConfig
from rvlf_jax.models.layers import LoraConfig

Array = jax.Array
Batch = Mapping[str, Array]
_NEG = -1e9  # finite fill for masked similarities / logits: no inf - inf, no NaN.


class Prompt(NamedTuple):
  """The instruction around the sign tokens, the same for the whole batch (a pytree).

  Attributes:
    before: int32[P1] token ids before the sign tokens (may be empty).
    after: int32[P2] token ids after them (may be empty).
  """

  before: Array
  after: Array


def dummy_batch(sign: SignEncoderConfig, batch_size: int = 1, frames: int | None = None,
                text_len: int = 2) -> dict[str, np.ndarray]:
  """An all-valid zero batch of the pipeline's format, for initialisation and shape checks."""
  t = frames or sign.downsample
  batch = {
      'keypoints': np.zeros((batch_size, t, sign.skeleton.num_joints, 3), np.float32),
      'frame_mask': np.ones((batch_size, t), bool),
      'text_ids': np.zeros((batch_size, text_len), np.int32),
      'text_mask': np.ones((batch_size, text_len), bool),
      'example_mask': np.ones((batch_size,), bool),
  }
  if sign.fusion.uses_visual:
    batch['visual'] = np.zeros((batch_size, t, sign.fusion.visual_dim), np.float32)
  return batch


def target_weights(batch: Batch) -> Array:
  """float32[B, L]: 1 on target tokens of real examples (text_mask & example_mask), else 0."""
  w = jnp.asarray(batch['text_mask']).astype(bool)
  if 'example_mask' in batch:
    w &= jnp.asarray(batch['example_mask']).astype(bool)[:, None]
  return w.astype(jnp.float32)


def token_cross_entropy(logits_blv: Array, targets_bl: Array,
                        weights_bl: Array) -> tuple[Array, dict[str, Array]]:
  """Mean cross-entropy over weighted target tokens, and token accuracy.

  Args:
    logits_blv: float[B, L, V] logits that predict targets.
    targets_bl: int[B, L].
    weights_bl: float[B, L], 0 on tokens that do not count.

  Returns:
    (loss, {'loss', 'accuracy', 'num_tokens'}); 0 loss and accuracy when nothing counts.
  """
  logits = logits_blv.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_bl)
  correct = (jnp.argmax(logits, axis=-1) == targets_bl).astype(jnp.float32)
  count = weights_bl.sum()
  denom = jnp.maximum(count, 1.0)
  loss = (nll * weights_bl).sum() / denom
  return loss, {'loss': loss, 'accuracy': (correct * weights_bl).sum() / denom,
                'num_tokens': count}


def decode_targets(llm: Decoder, prefix_btd: Array, prefix_valid_bt: Array, text_ids_bl: Array,
                   text_mask_bl: Array) -> Array:
  """Teacher-forced logits float32[B, L, V] predicting text_ids after a prefix of embeddings.

  Runs `llm` (a bound Decoder submodule) over [prefix][text_ids[:, :-1]] and projects to the
  vocabulary only the L outputs that predict text: the last valid prefix token's, then those of
  text tokens 0..L-2.
  """
  b, p = prefix_valid_bt.shape
  inputs = text_ids_bl[:, :-1]
  embeds = jnp.concatenate([prefix_btd, llm.embed(inputs).astype(prefix_btd.dtype)], axis=1)
  valid = jnp.concatenate([prefix_valid_bt.astype(bool), text_mask_bl[:, :-1].astype(bool)], 1)
  positions = dec.positions_from_mask(valid)
  # The full-vocabulary logits of every position are never used, so XLA drops them; only the
  # last layer's hidden states feed the L rows we need.
  out = llm(embeds_btd=embeds, positions_bt=positions, return_hidden_states=True)
  hidden = out.hidden_states[-1]
  last = jnp.argmax(positions[:, :p], axis=1)  # last valid prefix slot (valid ones count up)
  first = hidden[jnp.arange(b), last][:, None]
  return llm.logits(jnp.concatenate([first, hidden[:, p:]], axis=1))


# Metrics key of the RLA gate records (a list of {'gate', 'log_prob', 'entropy'} float32[B], one
# per layer, in call order) that a training step pops for its REINFORCE term (`train.sft`).
GATE_RECORDS = '_gate_records'


def _apply_train(model: nn.Module, sign: SignEncoderConfig, params: Any, rng: Array | None,
                 *args) -> tuple[Any, list[dict[str, Array]] | None]:
  """model.apply on params: (output, gate records or None).

  Without rng: deterministic, no records. With rng: dropout, and when the sign encoder has RLA
  gates (`FusionConfig.uses_rla`) also a 'gate' rng split from it and the sown records.
  """
  variables = {'params': params}
  if rng is None:
    return model.apply(variables, *args, deterministic=True, rngs={}), None
  if not sign.fusion.uses_rla:
    return model.apply(variables, *args, deterministic=False, rngs={'dropout': rng}), None
  dropout_rng, gate_rng = jax.random.split(rng)
  out, collections = model.apply(variables, *args, deterministic=False,
                                 rngs={'dropout': dropout_rng, 'gate': gate_rng},
                                 mutable=['gates'])
  return out, rla.gate_records(collections)


# -- Stage 2/3: the translator -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SLTConfig:
  """Sign encoder + projector + decoder LLM.

  Attributes:
    sign: the sign encoder.
    decoder: the LLM.
    lora: adapters on the LLM's projections, or None (full tuning or frozen LLM).
    projector_hidden: the projector's middle width (None: the LLM's hidden size).
  """

  sign: SignEncoderConfig = SignEncoderConfig()
  decoder: DecoderConfig = DecoderConfig()
  lora: LoraConfig | None = None
  projector_hidden: int | None = None

  def replace(self, **changes) -> 'SLTConfig':
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, family: str = 'llama', lora: LoraConfig | None = None,
           **fusion) -> 'SLTConfig':
    """Tiny sign encoder + `DecoderConfig.tiny(family)`, for tests."""
    return cls(SignEncoderConfig.tiny(**fusion), DecoderConfig.tiny(family), lora)


class SLTModel(nn.Module):
  """The translator. Params: {'sign_encoder', 'projector', 'decoder'} (the last one is exactly
  a `decoder.Decoder`'s tree, so HF checkpoints load into it)."""

  config: SLTConfig

  def setup(self):
    cfg = self.config
    dtype = layers.dtype_of(cfg.decoder.dtype)
    param_dtype = layers.dtype_of(cfg.decoder.param_dtype)
    self.sign_encoder = SignEncoder(cfg.sign)
    self.projector = Projector(cfg.decoder.hidden_size, cfg.projector_hidden, dtype=dtype,
                               param_dtype=param_dtype)
    self.llm = Decoder(cfg.decoder, cfg.lora, name='decoder')

  @property
  def decoder(self) -> Decoder:
    """The LLM as a standalone module, to run with params['decoder'] (e.g. `greedy_decode`)."""
    return Decoder(self.config.decoder, self.config.lora)

  def prefix(self, batch: Batch, prompt_before: Array, prompt_after: Array,
             deterministic: bool = True) -> tuple[Array, Array]:
    """The prefix `[prompt_before][sign tokens][prompt_after]` as embeddings.

    Returns:
      (embeds float[B, P, D_llm], valid bool[B, P]), invalid on padded sign tokens.
    """
    sign_btd, sign_mask = self.sign_encoder(batch, deterministic)
    b = sign_btd.shape[0]
    ids = lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.int32), (b, len(p)))
    before = self.llm.embed(ids(prompt_before))
    after = self.llm.embed(ids(prompt_after))
    sign = self.projector(sign_btd).astype(before.dtype)
    embeds = jnp.concatenate([before, sign, after], axis=1)
    ones = lambda p: jnp.ones((b, len(p)), bool)
    valid = jnp.concatenate([ones(prompt_before), sign_mask, ones(prompt_after)], axis=1)
    return embeds, valid

  def prefill_inputs(self, batch: Batch, prompt_before: Array,
                     prompt_after: Array) -> tuple[Array, Array]:
    """(embeds float[B, P, D_llm], positions int32[B, P] with -1 on padded sign tokens)."""
    embeds, valid = self.prefix(batch, prompt_before, prompt_after, deterministic=True)
    return embeds, dec.positions_from_mask(valid)

  def __call__(self, batch: Batch, prompt_before: Array, prompt_after: Array,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits float32[B, L, V]: row i predicts batch['text_ids'][:, i].

    Args:
      batch: the sign encoder's inputs plus 'text_ids' int[B, L] and 'text_mask' bool[B, L].
      prompt_before: int[P1]; prompt_after: int[P2].
      deterministic: disables dropout (otherwise an rng named 'dropout' is needed).
    """
    embeds, valid = self.prefix(batch, prompt_before, prompt_after, deterministic)
    return decode_targets(self.llm, embeds, valid, jnp.asarray(batch['text_ids']),
                          jnp.asarray(batch['text_mask']))

  # -- Pure helpers (not flax methods: they take params) -----------------------------------------

  @nn.nowrap
  def loss(self, params: Any, batch: Batch, prompt: Prompt,
           rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Token-level cross-entropy on target tokens only (mean over valid ones).

    Args:
      params: {'sign_encoder', 'projector', 'decoder'}.
      batch: pipeline batch ('example_mask' False rows count for nothing).
      prompt: the instruction ids.
      rng: dropout key; None runs deterministically.

    Returns:
      (loss, {'loss', 'accuracy', 'num_tokens'}), plus GATE_RECORDS when the sign encoder has
      RLA gates and rng is given (`_apply_train`).
    """
    logits, records = _apply_train(self, self.config.sign, params, rng, batch, prompt.before,
                                   prompt.after)
    loss, metrics = token_cross_entropy(logits, jnp.asarray(batch['text_ids']),
                                        target_weights(batch))
    if records is not None:
      metrics[GATE_RECORDS] = records
    return loss, metrics

  @nn.nowrap
  def prefill(self, params: Any, batch: Batch, prompt: Prompt) -> tuple[Array, Array]:
    """(embeds [B, P, D_llm], positions [B, P]) for `decoding.greedy_decode(self.decoder,
    params['decoder'], embeds, positions, ...)`."""
    return self.apply({'params': params}, batch, prompt.before, prompt.after,
                      method=SLTModel.prefill_inputs)

  @nn.nowrap
  def init_params(self, rng: Array, *, boxed: bool = False) -> Any:
    """Random parameters (boxed: with their logical axis names, as `nn.Partitioned`)."""
    batch = dummy_batch(self.config.sign)
    prompt = (np.zeros((1,), np.int32), np.zeros((1,), np.int32))
    params = jax.jit(lambda key: self.init(key, batch, *prompt)['params'])(rng)
    return params if boxed else nn.meta.unbox(params)

  @nn.nowrap
  def abstract_params(self, *, boxed: bool = False) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(lambda: self.init_params(jax.random.key(0), boxed=boxed))


# -- Stage 1: sign-text alignment ----------------------------------------------------------------


def filip_similarity(sign_bse: Array, sign_mask_bs: Array, text_ble: Array,
                     text_mask_bl: Array) -> tuple[Array, Array]:
  """Token-level (FILIP) similarities of every (video i, text j) pair of a batch.

  Args:
    sign_bse: float[B, S, E] L2-normalised sign tokens; sign_mask_bs: bool[B, S].
    text_ble: float[B, L, E] L2-normalised text tokens; text_mask_bl: bool[B, L].

  Returns:
    (v2t float32[B, B], t2v float32[B, B]), both indexed [video i, text j]:
      v2t: mean over video i's valid tokens of the max over text j's valid tokens of the cosine;
      t2v: mean over text j's valid tokens of the max over video i's valid tokens.
    A pair with an empty side gets 0.
  """
  sim_ijsl = jnp.einsum('ise,jle->ijsl', sign_bse.astype(jnp.float32),
                        text_ble.astype(jnp.float32))
  sm = sign_mask_bs.astype(bool)[:, None, :, None]  # [i, 1, s, 1]
  tm = text_mask_bl.astype(bool)[None, :, None, :]  # [1, j, 1, l]
  best_text_ijs = jnp.where(tm, sim_ijsl, _NEG).max(axis=3)
  best_sign_ijl = jnp.where(sm, sim_ijsl, _NEG).max(axis=2)
  sign_valid = jnp.broadcast_to(sm[..., 0], best_text_ijs.shape) & tm.any(axis=3)
  text_valid = jnp.broadcast_to(tm[:, :, 0], best_sign_ijl.shape) & sm.any(axis=2)
  mean = lambda x, m: jnp.where(m, x, 0.0).sum(-1) / jnp.maximum(m.sum(-1), 1)
  return mean(best_text_ijs, sign_valid), mean(best_sign_ijl, text_valid)


def contrastive_loss(v2t_ij: Array, t2v_ij: Array, logit_scale: Array,
                     valid_b: Array) -> tuple[Array, dict[str, Array]]:
  """Symmetric InfoNCE over the batch, matched pairs on the diagonal.

  Args:
    v2t_ij, t2v_ij: float[B, B] similarities [video i, text j] (see `filip_similarity`).
    logit_scale: multiplies the similarities (1 / temperature).
    valid_b: bool[B]; invalid rows are neither anchors nor negatives.

  Returns:
    (loss, {'contrastive_loss', 'v2t_accuracy', 't2v_accuracy'}): mean of the video->text and
    text->video cross-entropies; accuracies are in-batch top-1 retrieval.
  """
  valid = valid_b.astype(bool)
  b = valid.shape[0]
  count = jnp.maximum(valid.sum(), 1)

  def one_way(logits):  # rows: anchors, columns: candidates
    logits = jnp.where(valid[None, :], logit_scale * logits.astype(jnp.float32), _NEG)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(b))
    hit = jnp.argmax(logits, axis=-1) == jnp.arange(b)
    return (jnp.where(valid, nll, 0.0).sum() / count,
            jnp.where(valid, hit, False).sum() / count)

  loss_v, acc_v = one_way(v2t_ij)
  loss_t, acc_t = one_way(t2v_ij.T)
  loss = 0.5 * (loss_v + loss_t)
  return loss, {'contrastive_loss': loss, 'v2t_accuracy': acc_v, 't2v_accuracy': acc_t}


@dataclasses.dataclass(frozen=True)
class AlignerConfig:
  """Stage-1 model: sign encoder, text encoder, captioning decoder.

  Attributes:
    sign: the sign encoder (shared with `SLTConfig.sign`).
    vocab_size: the text vocabulary (the translator's tokenizer).
    text: the bidirectional text encoder (its d_model is the text token width).
    caption: the captioning decoder (vocab_size must match), or None for contrastive only.
    embed_dim: E, the joint space of the contrastive loss.
    temperature: initial (or fixed) softmax temperature.
    learn_temperature: learn log(1 / temperature) (clipped at max_logit_scale, as in CLIP).
    max_logit_scale: upper bound of 1 / temperature.
    caption_weight: lambda in loss = contrastive + lambda * caption.
  """

  sign: SignEncoderConfig = SignEncoderConfig()
  vocab_size: int = 32000
  text: skel.EncoderConfig = skel.EncoderConfig()
  caption: DecoderConfig | None = None
  embed_dim: int = 256
  temperature: float = 0.07
  learn_temperature: bool = True
  max_logit_scale: float = 100.0
  caption_weight: float = 1.0

  def __post_init__(self):
    if self.caption is not None and self.caption.vocab_size != self.vocab_size:
      raise ValueError(f'caption vocab_size {self.caption.vocab_size} != text vocab_size '
                       f'{self.vocab_size}.')
    if not self.temperature > 0:
      raise ValueError(f'temperature must be positive, got {self.temperature}.')

  def replace(self, **changes) -> 'AlignerConfig':
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, vocab_size: int = 64, **changes) -> 'AlignerConfig':
    """Tiny everything, for tests."""
    text = skel.EncoderConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64, dropout=0.1)
    caption = DecoderConfig.tiny('llama', vocab_size=vocab_size, hidden_size=32,
                                 intermediate_size=64, num_layers=1, num_heads=2,
                                 num_kv_heads=2, head_dim=16)
    fields = dict(sign=SignEncoderConfig.tiny(), vocab_size=vocab_size, text=text,
                  caption=caption, embed_dim=32)
    return cls(**{**fields, **changes})

  @classmethod
  def base(cls, vocab_size: int, **changes) -> 'AlignerConfig':
    """`SignEncoderConfig.base()` with a 4-layer text encoder and a 2-layer caption decoder."""
    text = skel.EncoderConfig(d_model=512, num_layers=4, num_heads=8, mlp_dim=1536, dropout=0.1)
    # Tied embeddings: with a 150k+ LLM vocabulary the untied output matrix alone would be ~78M.
    caption = DecoderConfig(family='llama', vocab_size=vocab_size, hidden_size=512,
                            intermediate_size=1536, num_layers=2, num_heads=8, num_kv_heads=8,
                            head_dim=64, tie_embeddings=True, max_position_embeddings=1024)
    fields = dict(sign=SignEncoderConfig.base(), vocab_size=vocab_size, text=text,
                  caption=caption, embed_dim=512)
    return cls(**{**fields, **changes})


class AlignerOutput(NamedTuple):
  """Outputs of `SignTextAligner`.

  Attributes:
    sign_emb: float32[B, T', E] L2-normalised sign tokens; sign_mask: bool[B, T'].
    text_emb: float32[B, L, E] L2-normalised text tokens; text_mask: bool[B, L].
    logit_scale: float32[] 1 / temperature.
    caption_logits: float32[B, L, V] predicting text_ids, or None without a caption decoder.
  """

  sign_emb: Array
  sign_mask: Array
  text_emb: Array
  text_mask: Array
  logit_scale: Array
  caption_logits: Array | None


class SignTextAligner(nn.Module):
  """Stage-1 sign-text alignment. Params: {'sign_encoder', 'text_embed', 'text_encoder',
  'text_norm', 'sign_head', 'text_head', ['logit_scale'], ['caption_proj', 'caption_start',
  'caption_decoder']}."""

  config: AlignerConfig

  def setup(self):
    cfg = self.config
    t = cfg.text
    dtype, param_dtype = layers.dtype_of(t.dtype), layers.dtype_of(t.param_dtype)
    d_sign = cfg.sign.d_model
    self.sign_encoder = SignEncoder(cfg.sign)
    self.text_embed = nn.Embed(
        cfg.vocab_size, t.d_model, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                    ('vocab', 'embed')))
    self.text_encoder = skel.TransformerEncoder(t)
    self.text_norm = layers.RMSNorm(t.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.sign_head = layers.Linear((d_sign,), (cfg.embed_dim,), ('embed', None), dtype=dtype,
                                   param_dtype=param_dtype)
    self.text_head = layers.Linear((t.d_model,), (cfg.embed_dim,), ('embed', None), dtype=dtype,
                                   param_dtype=param_dtype)
    if cfg.learn_temperature:
      self.logit_scale = self.param(
          'logit_scale', nn.with_logical_partitioning(
              nn.initializers.constant(math.log(1.0 / cfg.temperature)), ()), (), jnp.float32)
    if cfg.caption is not None:
      c = cfg.caption
      c_dtype, c_param_dtype = layers.dtype_of(c.dtype), layers.dtype_of(c.param_dtype)
      self.caption_proj = layers.Linear((d_sign,), (c.hidden_size,), (None, 'embed'),
                                        use_bias=True, dtype=c_dtype, param_dtype=c_param_dtype)
      # A learned separator after the sign tokens: it is always valid, so it predicts the first
      # text token even when the last sign slots are padding.
      self.caption_start = self.param(
          'caption_start', nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                        ('embed',)),
          (c.hidden_size,), c_param_dtype)
      self.caption_decoder = Decoder(c)

  def encode_sign(self, batch: Batch, deterministic: bool = True):
    """(sign tokens float[B, T', D], their L2-normalised embeddings float32[B, T', E], mask)."""
    tokens, mask = self.sign_encoder(batch, deterministic)
    return tokens, _l2_normalize(self.sign_head(tokens)), mask

  def encode_text(self, text_ids: Array, text_mask: Array, deterministic: bool = True):
    """L2-normalised text token embeddings float32[B, L, E]."""
    x = self.text_embed(jnp.asarray(text_ids, jnp.int32))
    x = self.text_encoder(x, jnp.asarray(text_mask).astype(bool), deterministic)
    return _l2_normalize(self.text_head(self.text_norm(x)))

  def caption_logits(self, sign_tokens: Array, sign_mask: Array, text_ids: Array,
                     text_mask: Array) -> Array:
    """Teacher-forced caption logits float32[B, L, V] after `[sign tokens][start]`."""
    prefix = self.caption_proj(sign_tokens)
    b = prefix.shape[0]
    start = jnp.broadcast_to(self.caption_start.astype(prefix.dtype), (b, 1, prefix.shape[-1]))
    prefix = jnp.concatenate([prefix, start], axis=1)
    valid = jnp.concatenate([sign_mask, jnp.ones((b, 1), bool)], axis=1)
    return decode_targets(self.caption_decoder, prefix, valid, text_ids, text_mask)

  def __call__(self, batch: Batch, deterministic: bool = True) -> AlignerOutput:
    """Runs both encoders and the caption decoder on a batch (keys as for SLTModel)."""
    cfg = self.config
    text_ids = jnp.asarray(batch['text_ids'], jnp.int32)
    text_mask = jnp.asarray(batch['text_mask']).astype(bool)
    tokens, sign_emb, sign_mask = self.encode_sign(batch, deterministic)
    text_emb = self.encode_text(text_ids, text_mask, deterministic)
    if cfg.learn_temperature:
      scale = jnp.exp(jnp.minimum(self.logit_scale, math.log(cfg.max_logit_scale)))
    else:
      scale = jnp.asarray(1.0 / cfg.temperature, jnp.float32)
    captions = None
    if cfg.caption is not None:
      captions = self.caption_logits(tokens, sign_mask, text_ids, text_mask)
    return AlignerOutput(sign_emb, sign_mask, text_emb, text_mask, scale, captions)

  @nn.nowrap
  def loss(self, params: Any, batch: Batch,
           rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """contrastive + caption_weight * caption cross-entropy, pure and jit-able.

    Args:
      params: the aligner's parameters.
      batch: pipeline batch; rows with example_mask False, no valid frame or no valid text token
        take no part (neither as anchors nor as negatives).
      rng: dropout key; None runs deterministically.

    Returns:
      (loss, {'loss', 'contrastive_loss', 'caption_loss', 'caption_accuracy', 'v2t_accuracy',
      't2v_accuracy', 'temperature'}), plus GATE_RECORDS when the sign encoder has RLA gates and
      rng is given (`_apply_train`).
    """
    cfg = self.config
    out, records = _apply_train(self, cfg.sign, params, rng, batch)
    v2t, t2v = filip_similarity(out.sign_emb, out.sign_mask, out.text_emb, out.text_mask)
    valid = out.sign_mask.any(axis=1) & out.text_mask.any(axis=1)
    if 'example_mask' in batch:
      valid &= jnp.asarray(batch['example_mask']).astype(bool)
    loss, metrics = contrastive_loss(v2t, t2v, out.logit_scale, valid)
    metrics['temperature'] = 1.0 / out.logit_scale
    if out.caption_logits is not None:
      cap, cap_metrics = token_cross_entropy(out.caption_logits, jnp.asarray(batch['text_ids']),
                                             target_weights(batch))
      loss = loss + cfg.caption_weight * cap
      metrics.update(caption_loss=cap, caption_accuracy=cap_metrics['accuracy'])
    metrics['loss'] = loss
    if records is not None:
      metrics[GATE_RECORDS] = records
    return loss, metrics

  @nn.nowrap
  def init_params(self, rng: Array, *, boxed: bool = False) -> Any:
    """Random parameters (boxed: with their logical axis names, as `nn.Partitioned`)."""
    batch = dummy_batch(self.config.sign)
    params = jax.jit(lambda key: self.init(key, batch)['params'])(rng)
    return params if boxed else nn.meta.unbox(params)

  @nn.nowrap
  def abstract_params(self, *, boxed: bool = False) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(lambda: self.init_params(jax.random.key(0), boxed=boxed))


def _l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)
