"""Every stage's step runs and reduces its loss on SynthSign tiny (skeleton view)."""

import dataclasses

import numpy as np
import pytest

import jax
import optax

from rvlf_jax import sharding
from rvlf_jax.data import pipeline
from rvlf_jax.data.synthsign import SynthSign
from rvlf_jax.data.tokenizers import PromptTemplate, SentencePieceTokenizer
from rvlf_jax.models import decoder, slt
from rvlf_jax.models.layers import LoraConfig
from rvlf_jax.rl.sampler import SamplingConfig
from rvlf_jax.train import grpo, optimizers, represent, sft
from rvlf_jax.train import params as params_lib
from rvlf_jax.train import state as state_lib


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  ds = SynthSign('tiny', seed=0)
  tokenizer = SentencePieceTokenizer.train(ds.text_corpus('train'), vocab_size=96,
                                           path=str(tmp_path_factory.mktemp('spm') / 'spm.model'))
  featurize = pipeline.Featurizer(tokenizer=tokenizer,
                                  buckets=pipeline.Buckets(frames=(96,), tokens=(24,)))
  source = pipeline.SplitSource(ds, 'train')
  batch = next(iter(pipeline.eval_pipeline(source, featurize, 4, shard=(0, 1))))
  batch = pipeline.device_batch(batch)
  prompt_ids = PromptTemplate().prompt(tokenizer, 'English')
  prompt = slt.Prompt(np.asarray(prompt_ids.before, np.int32),
                      np.asarray(prompt_ids.after, np.int32))
  return tokenizer, batch, prompt


def run(step, state, batch, steps):
  step = jax.jit(step, compiler_options={'xla_backend_optimization_level': 0})
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i, impl='rbg'))
    losses.append(float(metrics['loss']))
  return state, losses


def lora_translator(family, vocab_size, trained_mask, learning_rate):
  """A tiny skeleton-only translator with LoRA, its optimizer and a state split by the mask."""
  config = slt.SLTConfig(slt.SignEncoderConfig.tiny(skeleton_only=True),
                         decoder.DecoderConfig.tiny(family, vocab_size=vocab_size),
                         LoraConfig(rank=4))
  model = slt.SLTModel(config)
  params = model.init_params(jax.random.key(0))
  trained, frozen = params_lib.partition(params, trained_mask(params))
  tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=learning_rate, warmup_steps=0, total_steps=100))
  return model, tx, state_lib.create(trained, tx, frozen=frozen)


def test_sft_step_with_lora_reduces_loss_and_freezes_the_base(data):
  tokenizer, batch, prompt = data
  model, tx, state = lora_translator(
      'qwen3', tokenizer.vocab_size, lambda p: sft.trained_mask(p, lora=True), 3e-3)
  frozen = state.frozen
  state, losses = run(sft.make_step(model, tx, prompt), state, batch, 12)
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 12
  # The decoder's base weights are the frozen part, unchanged; its adapters moved.
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  assert 'kernel' not in str(jax.tree_util.tree_structure(state.params['decoder']))
  lora_b = jax.tree.leaves(state.params['decoder'])
  assert any(np.abs(np.asarray(x)).max() > 0 for x in lora_b)


def test_represent_step_reduces_loss(data):
  tokenizer, batch, _ = data
  config = slt.AlignerConfig.tiny(vocab_size=tokenizer.vocab_size,
                                  sign=slt.SignEncoderConfig.tiny(skeleton_only=True))
  model = slt.SignTextAligner(config)
  params = model.init_params(jax.random.key(0))
  tx = optimizers.make_optimizer(optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                                            total_steps=100))
  state = state_lib.create(params, tx)
  _, losses = run(represent.make_step(model, tx), state, batch, 12)
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(np.isfinite(losses))


def test_grpo_step_updates_only_adapters_from_group_rewards(data):
  tokenizer, batch, prompt = data
  host_batch = {**batch, 'text': np.asarray(['you go home today'] * len(batch['text_ids']))}
  model, tx, state = lora_translator('llama', tokenizer.vocab_size, grpo.trained_mask, 1e-2)
  before = jax.tree.map(np.asarray, state.params)
  # Length is a dense reward even for a random policy, so groups have spread and advantages.
  trainer = grpo.GRPOTrainer(model, tx, prompt, tokenizer, grpo.GRPOConfig(
      group_size=4, sampling=SamplingConfig(temperature=1.0, max_new_tokens=12),
      rewards=(('length_penalty', 1.0), ('bleu', 0.0))))
  state, metrics = trainer.step(state, host_batch, jax.random.key(3))
  assert int(state.step) == 1
  assert all(np.isfinite(v) for v in metrics.values())
  assert metrics['zero_std_fraction'] < 1.0
  assert abs(metrics['kl']) < 1e-6  # a fresh LoRA (B = 0) is the reference policy itself
  for key in ('time_sampling', 'time_reward', 'time_update', 'reward_bleu_mean',
              'reward_length_penalty_mean', 'clip_frac', 'completion_length_mean'):
    assert key in metrics
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(state.params),
                                                jax.tree.leaves(before))]
  assert max(moved) > 0


def test_grpo_step_can_train_the_sign_encoder_against_the_sft_reference(data):
  """With train_sign_encoder the policy gradient also moves the sign encoder and projector, the
  reference policy keeps their SFT values, and the first step is the adapters-only step in all
  they share (the same policy samples the same completions and gets the same adapter update)."""
  tokenizer, batch, prompt = data
  host_batch = {**batch, 'text': np.asarray(['you go home today'] * len(batch['text_ids']))}
  model, tx, _ = lora_translator('llama', tokenizer.vocab_size, grpo.trained_mask, 1e-2)
  params = jax.tree.map(np.asarray, model.init_params(jax.random.key(0)))
  config = grpo.GRPOConfig(group_size=4, sampling=SamplingConfig(temperature=1.0,
                                                                 max_new_tokens=12),
                           rewards=(('length_penalty', 1.0), ('bleu', 0.0)))
  steps = {}
  for sign_encoder in (False, True):
    trained, frozen = grpo.split_params(params, sign_encoder=sign_encoder)
    trainer = grpo.GRPOTrainer(model, tx, prompt, tokenizer, dataclasses.replace(
        config, train_sign_encoder=sign_encoder))
    state = state_lib.create(trained, tx, frozen=frozen)
    state, first = trainer.step(state, host_batch, jax.random.key(3))
    state, second = trainer.step(state, host_batch, jax.random.key(4))
    steps[sign_encoder] = (jax.tree.map(np.asarray, state), first, second)

  (adapters, first, _), (encoder, first_enc, second_enc) = steps[False], steps[True]
  assert set(encoder.params) == {'decoder', *grpo.SIGN_PARTS}
  assert set(encoder.frozen[grpo.REFERENCE]) == set(grpo.SIGN_PARTS)
  for part in grpo.SIGN_PARTS:
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(encoder.params[part]),
                                                  jax.tree.leaves(params[part]))]
    assert max(moved) > 0, part
    for a, b in zip(jax.tree.leaves(encoder.frozen[grpo.REFERENCE][part]),
                    jax.tree.leaves(params[part])):
      np.testing.assert_array_equal(a, b)
  for key in ('loss', 'kl', 'reward_total_mean', 'completion_length_mean'):
    np.testing.assert_allclose(first_enc[key], first[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert abs(first_enc['kl']) < 1e-6  # step 0's policy is the reference
  assert np.isfinite(second_enc['kl']) and second_enc['kl'] != 0.0  # now it is not
  # The policy's full parameters: the model's own tree, without the reference copy.
  policy = grpo.policy_params(encoder.params, encoder.frozen)
  assert set(policy) == set(params)
  assert jax.tree.structure(policy) == jax.tree.structure(
      grpo.policy_params(adapters.params, adapters.frozen))


@pytest.mark.parametrize('sign_encoder', [False, True])
def test_grpo_trainer_on_a_mesh_matches_plain_jit(data, sign_encoder):
  """GRPOTrainer(mesh=...) shards prefix, sampling, reference and update over the mesh (rows
  over data x fsdp, parameters by their logical axes) and computes the plain-jit step, with
  the sign encoder frozen or trained."""
  tokenizer, batch, prompt = data
  host_batch = {**batch, 'text': np.asarray(['you go home today'] * len(batch['text_ids']))}
  model, _, _ = lora_translator('llama', tokenizer.vocab_size, grpo.trained_mask, 1e-2)
  # SGD, whose update is the gradient's: Adam moves a weight whose gradient is near zero (there
  # are such in the sign encoder) by about its learning rate either way on float noise alone.
  tx = optax.sgd(0.1)
  trained, frozen = grpo.split_params(model.init_params(jax.random.key(0)),
                                      sign_encoder=sign_encoder)
  state = state_lib.create(trained, tx, frozen=frozen)
  config = grpo.GRPOConfig(group_size=2, sampling=SamplingConfig(temperature=1.0,
                                                                 max_new_tokens=8),
                           rewards=(('length_penalty', 1.0), ('bleu', 0.0)), mu=2,
                           train_sign_encoder=sign_encoder)
  fresh = lambda: jax.tree.map(np.asarray, state)
  want_state, want = grpo.GRPOTrainer(model, tx, prompt, tokenizer, config).step(
      jax.tree.map(jax.numpy.asarray, fresh()), host_batch, jax.random.key(3))

  mesh = sharding.mesh_from_config((2, 2, 2))
  shardings = sharding.state_shardings(fresh(), model.abstract_params(boxed=True), mesh)
  trainer = grpo.GRPOTrainer(model, tx, prompt, tokenizer, config, mesh=mesh,
                             state_shardings=shardings)
  got_state, got = trainer.step(jax.device_put(fresh(), shardings), host_batch,
                                jax.random.key(3))
  assert jax.tree.map(lambda x: x.sharding, got_state) == shardings
  for key in ('loss', 'kl', 'reward_total_mean', 'completion_length_mean'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
