"""Text-only GRPO on a tiny decoder: teacher forcing with a shared prefix, and one full step."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rvlf_jax.models import decoder
from rvlf_jax.rl.sampler import SamplingConfig
from rvlf_jax.train import grpo_text, optimizers

EOS, PAD = 1, 0


class WordTokenizer:
  """Id i reads as the word 'w{i}'; text ends at the first eos, pad is dropped."""

  eos_id, pad_id = EOS, PAD

  def decode_batch(self, ids):
    texts = []
    for row in np.asarray(ids).tolist():
      row = row[:row.index(EOS)] if EOS in row else row
      texts.append(' '.join(f'w{i}' for i in row if i != PAD))
    return texts


@pytest.fixture(scope='module')
def setup():
  config = decoder.DecoderConfig.tiny('llama', vocab_size=32)
  model = decoder.Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (3, 6), 2, 32), np.int32)
  valid = np.ones((3, 6), bool)
  valid[1, :2] = False  # left padding
  valid[2, 4:] = False  # right padding
  return model, params, jnp.asarray(prompt), jnp.asarray(valid)


def test_shared_prefix_equals_whole_sequences(setup):
  model, params, prompt, valid = setup
  tokens = jax.random.randint(jax.random.key(2), (3, 4, 5), 0, 32)
  weights = jax.random.normal(jax.random.key(3), tokens.shape)

  def objective(p, share):
    logp = grpo_text.completion_logp(model, p, prompt, valid, tokens, temperature=0.7,
                                     share_prefix=share)
    return (logp * weights).sum(), logp

  grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
  (_, shared), g_shared = grad(params, True)
  (_, whole), g_whole = grad(params, False)
  assert shared.shape == (3, 4, 5)
  np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               g_shared, g_whole)


def test_sampler_logp_is_the_teacher_forced_logp(setup):
  model, params, prompt, valid = setup
  config = grpo_text.TextGRPOConfig(group_size=4,
                                    sampling=SamplingConfig(temperature=1.0, max_new_tokens=6))
  out = jax.jit(grpo_text.make_sample(model, config, EOS, PAD))(params, prompt, valid,
                                                               jax.random.key(4))
  logp = jax.jit(grpo_text.completion_logp, static_argnums=0)(model, params, prompt, valid,
                                                              out['tokens'])
  mask = np.asarray(out['mask'])
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(out['logp'])[mask], atol=1e-4)
  # The G samples of a prompt are distinct draws, not copies.
  for row in np.asarray(out['tokens']):
    assert len({tuple(sample) for sample in row.tolist()}) == 4


def test_one_step_trains_the_policy_not_the_reference(setup):
  model, params, prompt, valid = setup
  config = grpo_text.TextGRPOConfig(group_size=4, rewards=(('bleu', 0.5), ('rouge_l', 0.5)),
                                    sampling=SamplingConfig(temperature=1.0, max_new_tokens=6))
  tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0))
  trainer = grpo_text.TextGRPOTrainer(model, tx, WordTokenizer(), config)
  before = jax.tree.map(np.asarray, params)
  state = trainer.init_state(params)
  batch = {'prompt': prompt, 'prompt_mask': valid,
           'reference': ['w5 w6 w7 w8', 'w9 w10 w11', 'w2 w3 w4 w5 w6']}
  for i in range(2):
    state, metrics = trainer.step(state, batch, jax.random.key(10 + i))
    assert np.isfinite(metrics['loss'])
    assert 0.0 <= metrics['reward_total_mean'] <= 1.0 and 'reward_bleu_mean' in metrics
    assert 1 <= metrics['completion_length_mean'] <= 6
  assert int(state.step) == 2
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(state.params))
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get(state.frozen['reference']))
