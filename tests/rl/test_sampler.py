"""The vmapped group sampler with a shared prefix against sampling each member on its own."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rvlf_jax.models import decoder
from rvlf_jax.rl import sampler
from rvlf_jax.rl.sampler import SamplingConfig


def sample_member_alone(model, params, embeds, positions, key, config, eos_id, pad_id=0):
  """One sample per prompt, prefix and continuation in one ordinary cache: the reference."""
  b, p = positions.shape
  n = config.max_new_tokens
  cache = decoder.init_cache(model.config, b, p + n)
  out = model.apply({'params': params}, embeds_btd=embeds, positions_bt=positions, cache=cache)
  logits = out.logits[jnp.arange(b), jnp.argmax(positions, axis=1)]
  cache, next_pos = out.cache, positions.max(axis=1) + 1
  done = jnp.zeros((b,), bool)
  tokens, logps = [], []
  step = jax.jit(lambda t, pos, c: model.apply({'params': params}, t, positions_bt=pos, cache=c))
  for i in range(n):
    token, logp = sampler.sample_token(logits, jax.random.fold_in(key, i), config)
    token = jnp.where(done, pad_id, token)
    tokens.append(token)
    logps.append(jnp.where(done, 0.0, logp))
    done = done | (token == eos_id)
    out = step(token[:, None], (next_pos + i)[:, None], cache)
    cache, logits = out.cache, out.logits[:, 0]
  return jnp.stack(tokens, 1), jnp.stack(logps, 1)


@pytest.fixture(scope='module')
def setup():
  config = decoder.DecoderConfig.tiny('gemma3')  # sliding + full layers, QK-norm
  model = decoder.Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(1), (3, 7), 0, config.vocab_size)
  embeds = model.apply({'params': params}, prompt, method=model.embed)
  valid = np.ones((3, 7), bool)
  valid[1, :2] = False  # left padding
  valid[2, 5:] = False  # right padding
  return model, params, embeds, decoder.positions_from_mask(jnp.asarray(valid))


@pytest.mark.parametrize('config', [SamplingConfig(temperature=1.0, max_new_tokens=10),
                                    SamplingConfig(temperature=0.7, top_k=20, top_p=0.9,
                                                   max_new_tokens=10)])
def test_group_equals_members_sampled_alone(setup, config):
  model, params, embeds, positions = setup
  rng = jax.random.key(42)
  group, eos = 4, 5
  out = sampler.sample_group(model, params, embeds, positions, rng, group_size=group,
                             config=config, eos_id=eos)
  assert out['tokens'].shape == (3, group, 10)
  for g, key in enumerate(jax.random.split(rng, group)):
    tokens, logp = sample_member_alone(model, params, embeds, positions, key, config, eos)
    np.testing.assert_array_equal(out['tokens'][:, g], tokens)
    np.testing.assert_allclose(out['logp'][:, g], logp, atol=1e-5)
  # Members differ from each other (different keys), and masks end at eos.
  assert len({tuple(np.asarray(out['tokens'][0, g])) for g in range(group)}) > 1
  for row in np.asarray(out['tokens']).reshape(-1, 10):
    mask_len = np.argmax(row == eos) + 1 if (row == eos).any() else 10
    assert np.all(row[mask_len:] == 0)
  np.testing.assert_array_equal(out['mask'].sum(-1), out['lengths'])


def test_greedy_group_members_agree_and_stop_early(setup):
  model, params, embeds, positions = setup
  config = SamplingConfig(temperature=0.0, max_new_tokens=8)
  out = sampler.sample_group(model, params, embeds, positions, jax.random.key(0), group_size=3,
                             config=config, eos_id=-1)
  tokens = np.asarray(out['tokens'])
  assert np.all(tokens == tokens[:, :1])  # greedy: every member is the same
  # Taking the first greedy token as eos ends every sample after one token.
  eos = int(tokens[0, 0, 0])
  stopped = sampler.sample_group(model, params, embeds[:1], positions[:1], jax.random.key(0),
                                 group_size=2, config=config, eos_id=eos)
  assert np.all(np.asarray(stopped['lengths']) == 1)
  assert np.all(np.asarray(stopped['tokens'][..., 1:]) == 0)


def test_top_k_and_top_p_restrict_the_draw():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: sampler.sample_token(logits, k, SamplingConfig(top_k=2))[0])(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.asarray(draws).ravel()) == {0, 1}
  draws = jax.vmap(lambda k: sampler.sample_token(logits, k, SamplingConfig(top_p=0.7))[0])(
      jax.random.split(jax.random.key(1), 200))
  assert set(np.asarray(draws).ravel()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  _, logp = sampler.sample_token(logits, jax.random.key(0), SamplingConfig(top_k=1))
  np.testing.assert_allclose(logp, np.log(0.5), rtol=1e-6)  # the policy's, not the truncated one
  with pytest.raises(ValueError):
    SamplingConfig(top_p=0.0)


def test_draws_are_those_of_jax_random_categorical():
  """sample_token's Gumbel-max with two plain reductions draws what jax.random.categorical does
  with the same key, and greedy picks the first maximum as jnp.argmax."""
  logits = 3 * jax.random.normal(jax.random.key(0), (16, 300))
  logits = logits.at[:, 7].set(logits.max(axis=-1))  # ties: the first index wins
  config = SamplingConfig(temperature=1.0)
  for seed in range(5):
    key = jax.random.key(seed)
    tokens, logp = sampler.sample_token(logits, key, config)
    np.testing.assert_array_equal(tokens, jax.random.categorical(key, logits, axis=-1))
    np.testing.assert_allclose(
        logp, jax.nn.log_softmax(logits)[jnp.arange(16), tokens], rtol=1e-6)
  greedy, _ = sampler.sample_token(logits, key, SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, axis=-1))
