"""The translator (sign prefix + prompt + text through a decoder) and the stage-1 aligner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from rvlf_jax.eval import decoding
from rvlf_jax.models import decoder, lora, slt
from rvlf_jax.models.decoder import DecoderConfig
from rvlf_jax.models.fusion import SignEncoderConfig
from rvlf_jax.models.layers import LoraConfig
from tests.helpers import assert_all_named, fast_jit, keypoint_batch, numpy_params

DV, T, L = 24, 16, 6
DECODER = DecoderConfig.tiny('llama')
CONFIG = slt.SLTConfig(SignEncoderConfig.tiny(DV), DECODER, LoraConfig(rank=4, alpha=8.0))
PROMPT = slt.Prompt(before=jnp.asarray([1, 2, 3], jnp.int32), after=jnp.asarray([4, 5], jnp.int32))
# No instruction after the sign tokens: the first target is then predicted by the last *valid*
# sign token, wherever the padding puts it.
PROMPT_NO_AFTER = slt.Prompt(before=jnp.asarray([1, 2], jnp.int32),
                             after=jnp.zeros((0,), jnp.int32))


def make_batch(seed=0, frames=(16, 9, 5), text_lengths=(6, 4, 2), vocab=DECODER.vocab_size):
  rng = np.random.RandomState(seed)
  b = len(frames)
  kp, mask = keypoint_batch(rng, b, T, frames)
  text_mask = np.arange(L)[None] < np.asarray(text_lengths)[:, None]
  return {
      'keypoints': kp,
      'frame_mask': mask,
      'visual': (rng.randn(b, T, DV) * mask[..., None]).astype(np.float32),
      'text_ids': np.where(text_mask, rng.randint(6, vocab, (b, L)), 0).astype(np.int32),
      'text_mask': text_mask,
      'example_mask': np.ones((b,), bool),
  }


def garbage_in_padding(batch, seed=1):
  """The batch with random values wherever a mask says padding."""
  rng = np.random.RandomState(seed)
  out = {k: v.copy() for k, v in batch.items()}
  pad = ~out['frame_mask']
  out['keypoints'][pad] = rng.randn(pad.sum(), 133, 3) * 50.0
  out['visual'][pad] = rng.randn(pad.sum(), DV) * 50.0
  text_pad = ~out['text_mask']
  out['text_ids'][text_pad] = rng.randint(0, DECODER.vocab_size, text_pad.sum())
  return out


# -- The translator ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def translator():
  model = slt.SLTModel(CONFIG)
  batch = make_batch()
  params = numpy_params(model, batch, PROMPT.before, PROMPT.after)
  return model, params


@pytest.fixture(scope='module')
def lora_grads(translator):
  """value_and_grad of the loss w.r.t. sign encoder, projector and decoder adapters; the decoder's
  base weights are frozen by `lora.split` / `lora.combine`."""
  model, _ = translator

  def loss_fn(trainable, base, batch, prompt):
    params = {'sign_encoder': trainable['sign_encoder'], 'projector': trainable['projector'],
              'decoder': lora.combine(trainable['adapters'], base)}
    return model.loss(params, batch, prompt)

  return fast_jit(jax.value_and_grad(loss_fn, has_aux=True))


def split_params(params):
  adapters, base = lora.split(params['decoder'])
  trainable = {'sign_encoder': params['sign_encoder'], 'projector': params['projector'],
               'adapters': adapters}
  return trainable, base


@pytest.fixture(scope='module')
def forward(translator):
  """jit(params, batch, prompt) -> (teacher-forced logits [B, L, V], prefill embeds, positions)."""
  model, _ = translator

  @fast_jit
  def run(params, batch, prompt):
    logits = model.apply({'params': params}, batch, prompt.before, prompt.after)
    return (logits, *model.prefill(params, batch, prompt))

  return run


def test_loss_counts_only_valid_targets(translator, lora_grads):
  _, params = translator
  batch = make_batch()
  trainable, base = split_params(params)
  (loss, metrics), _ = lora_grads(trainable, base, batch, PROMPT)
  assert np.isfinite(loss) and loss > 0
  assert int(metrics['num_tokens']) == batch['text_mask'].sum() == 12
  # Garbage in padded frames and padded target ids changes nothing.
  (loss2, _), _ = lora_grads(trainable, base, garbage_in_padding(batch), PROMPT)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  # A row marked invalid by example_mask counts for nothing, whatever its text.
  dropped = {**batch, 'example_mask': np.array([True, True, False])}
  other = {**dropped, 'text_ids': dropped['text_ids'].copy()}
  other['text_ids'][2] = (other['text_ids'][2] + 7) % DECODER.vocab_size
  (a, ma), _ = lora_grads(trainable, base, dropped, PROMPT)
  (b, _), _ = lora_grads(trainable, base, other, PROMPT)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(ma['num_tokens']) == 10
  # ... while a valid target does count.
  changed = {**batch, 'text_ids': batch['text_ids'].copy()}
  changed['text_ids'][1, 3] = (changed['text_ids'][1, 3] + 1) % DECODER.vocab_size
  (c, _), _ = lora_grads(trainable, base, changed, PROMPT)
  assert abs(float(c) - float(loss)) > 1e-4


def test_gradients_reach_sign_encoder_projector_and_adapters_only(translator, lora_grads):
  _, params = translator
  trainable, base = split_params(params)
  _, grads = lora_grads(trainable, base, make_batch(), PROMPT)
  for part in ('sign_encoder', 'projector'):
    flat = traverse_util.flatten_dict(grads[part])
    dead = [k for k, g in flat.items() if not np.any(np.asarray(g))]
    assert not dead, f'{part} params without gradient: {dead}'
  adapters = traverse_util.flatten_dict(grads['adapters'])
  assert adapters and all(k[-1] in lora.ADAPTER_NAMES for k in adapters)
  # B starts at zero (the adapter is a no-op), so A's gradient is zero and B's is not.
  assert all(np.any(np.asarray(g)) for k, g in adapters.items() if k[-1] == 'lora_b')
  # The frozen base is exactly the rest of the decoder.
  flat_params = traverse_util.flatten_dict(params['decoder'])
  flat_base = traverse_util.flatten_dict(base)
  assert set(flat_base) | set(traverse_util.flatten_dict(trainable['adapters'])) == set(flat_params)
  assert not any(k[-1] in lora.ADAPTER_NAMES for k in flat_base)


def test_padding_changes_no_logits_and_positions_have_no_gap(translator, forward):
  _, params = translator
  batch = make_batch()
  logits, embeds, positions = forward(params, batch, PROMPT_NO_AFTER)
  logits2, _, positions2 = forward(params, garbage_in_padding(batch), PROMPT_NO_AFTER)
  valid = batch['text_mask']
  assert logits.shape == (3, L, DECODER.vocab_size)
  np.testing.assert_allclose(np.asarray(logits2)[valid], np.asarray(logits)[valid], atol=1e-5)
  np.testing.assert_array_equal(positions, positions2)
  tokens = CONFIG.sign.num_tokens(T)
  assert embeds.shape == (3, 2 + tokens, DECODER.hidden_size)
  positions = np.asarray(positions)
  for row, frames in enumerate((16, 9, 5)):
    n_valid = 2 + CONFIG.sign.num_tokens(frames)
    # Valid prefix tokens count 0..n-1 without gaps; padded sign slots are -1.
    np.testing.assert_array_equal(np.sort(positions[row][positions[row] >= 0]), np.arange(n_valid))
    assert (positions[row] == -1).sum() == tokens + 2 - n_valid


def test_greedy_decoding_from_prefill_equals_full_forward_argmax(translator, forward):
  model, params = translator
  batch = make_batch()
  _, embeds, positions = forward(params, batch, PROMPT_NO_AFTER)
  tokens, lengths = decoding.greedy_decode(model.decoder, params['decoder'], embeds, positions,
                                           max_new_tokens=L)
  assert tokens.shape == (3, L) and np.all(np.asarray(lengths) == L)
  # Teacher-force the generated tokens: the model must predict each of them itself.
  forced = {**batch, 'text_ids': np.asarray(tokens), 'text_mask': np.ones((3, L), bool)}
  logits, _, _ = forward(params, forced, PROMPT_NO_AFTER)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), np.asarray(tokens))


def test_params_named_and_decoder_tree_is_a_decoders(translator):
  model, _ = translator
  boxed = model.abstract_params(boxed=True)
  assert set(boxed) == {'sign_encoder', 'projector', 'decoder'}
  assert_all_named(boxed)
  want = decoder.abstract_params(DECODER, CONFIG.lora)
  got = model.abstract_params()['decoder']
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.map(lambda x: x.shape, got) == jax.tree.map(lambda x: x.shape, want)
  assert model.decoder == decoder.Decoder(DECODER, CONFIG.lora)


@pytest.mark.parametrize('family', ['gemma3', 'qwen2'])
def test_other_decoder_families_trace(family):
  """Gemma's scaled, tied embeddings and Qwen's biases fit the same assembly (shapes only)."""
  model = slt.SLTModel(slt.SLTConfig.tiny(family, visual_dim=DV))
  batch = make_batch()
  logits, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), batch, PROMPT.before,
                             PROMPT.after)
  assert logits.shape == (3, L, DECODER.vocab_size) and logits.dtype == jnp.float32


# -- The stage-1 aligner -------------------------------------------------------------------------

# Skeleton only: fusion is covered by the translator's tests, and compiling less keeps this fast.
ALIGNER = slt.AlignerConfig.tiny(vocab_size=DECODER.vocab_size,
                                 sign=SignEncoderConfig.tiny(DV, skeleton_only=True),
                                 caption_weight=0.5)


def test_filip_similarity_and_contrastive_loss_by_hand():
  e = np.eye(3, dtype=np.float32)
  # Video 0: tokens x, y; video 1: z, z (the second padded).
  sign = jnp.asarray(np.stack([e[[0, 1]], e[[2, 2]]]))
  sign_mask = jnp.asarray([[True, True], [True, False]])
  # Text 0: x, x, z (the z padded); text 1: y, z, z.
  text = jnp.asarray(np.stack([e[[0, 0, 2]], e[[1, 2, 2]]]))
  text_mask = jnp.asarray([[True, True, False], [True, True, True]])
  v2t, t2v = fast_jit(slt.filip_similarity)(sign, sign_mask, text, text_mask)
  # v2t[i, j]: mean over video i's tokens of their best text-j match.
  np.testing.assert_allclose(v2t, [[0.5, 0.5], [0.0, 1.0]], atol=1e-6)
  # t2v[i, j]: mean over text j's tokens of their best video-i match.
  np.testing.assert_allclose(t2v, [[1.0, 1 / 3], [0.0, 2 / 3]], atol=1e-6)
  contrastive = fast_jit(slt.contrastive_loss)
  loss, metrics = contrastive(v2t, t2v, 10.0, jnp.asarray([True, True]))
  assert np.isfinite(loss) and metrics['t2v_accuracy'] == 1.0
  # An invalid row is neither anchor nor negative: one valid row leaves nothing to contrast.
  loss, _ = contrastive(v2t, t2v, 10.0, jnp.asarray([True, False]))
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@pytest.fixture(scope='module')
def aligner_step():
  model = slt.SignTextAligner(ALIGNER)
  batch = make_batch(seed=3, frames=(16, 12, 9, 14), text_lengths=(6, 5, 4, 6))
  params = numpy_params(model, batch)
  optimizer = optax.flatten(optax.adam(3e-3))  # one fused update: compiles faster

  @fast_jit
  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return model, params, optimizer.init(params), batch, step


def test_aligner_respects_masks(aligner_step):
  _, params, opt_state, batch, step = aligner_step
  _, _, m = step(params, opt_state, batch)
  _, _, m2 = step(params, opt_state, garbage_in_padding(batch))
  for key in ('loss', 'contrastive_loss', 'caption_loss'):
    np.testing.assert_allclose(m2[key], m[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(m['loss'], m['contrastive_loss'] + 0.5 * m['caption_loss'],
                             rtol=1e-6)


def test_aligner_learns_to_match_pairs(aligner_step):
  """After 20 Adam steps, matched pairs score a lower contrastive loss than shuffled ones."""
  _, params, opt_state, batch, step = aligner_step
  shuffled = {**batch, 'text_ids': np.roll(batch['text_ids'], 1, axis=0),
              'text_mask': np.roll(batch['text_mask'], 1, axis=0)}
  for _ in range(20):
    params, opt_state, _ = step(params, opt_state, batch)
  _, _, matched = step(params, opt_state, batch)
  _, _, mismatched = step(params, opt_state, shuffled)
  assert matched['contrastive_loss'] < 0.5 * mismatched['contrastive_loss']
  assert matched['v2t_accuracy'] == 1.0 and matched['t2v_accuracy'] == 1.0
  assert mismatched['v2t_accuracy'] < 1.0


def test_aligner_sign_encoder_transfers_to_translator():
  assert_all_named(slt.SignTextAligner(ALIGNER).abstract_params(boxed=True))
  aligner = slt.SignTextAligner(ALIGNER).abstract_params()
  translator = slt.SLTModel(slt.SLTConfig(ALIGNER.sign, DECODER)).abstract_params()
  assert (jax.tree.structure(aligner['sign_encoder'])
          == jax.tree.structure(translator['sign_encoder']))
