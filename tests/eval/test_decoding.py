"""Greedy decoding: the compiled loop against step-by-step argmax over full forwards."""

import numpy as np

import jax
import jax.numpy as jnp

from rvlf_jax.eval import decoding
from rvlf_jax.models import decoder


def test_greedy_matches_full_forward_argmax_with_padding_and_eos():
  config = decoder.DecoderConfig.tiny('llama')
  model = decoder.Decoder(config)
  params = decoder.init_params(config, jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, config.vocab_size)
  valid = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding in row 1
  positions = decoder.positions_from_mask(valid)
  embeds = model.apply({'params': params}, prompt, method=model.embed)
  tokens, lengths = decoding.greedy_decode(model, params, embeds, positions, max_new_tokens=6)
  assert tokens.shape == (2, 6) and np.all(np.asarray(lengths) == 6)

  full = jax.jit(lambda e, p: model.apply({'params': params}, embeds_btd=e, positions_bt=p).logits)
  seq, pos = embeds, positions
  for i in range(6):
    expected = jnp.argmax(full(seq, pos)[:, -1], axis=-1)
    np.testing.assert_array_equal(tokens[:, i], expected)
    seq = jnp.concatenate([seq, model.apply({'params': params}, expected[:, None],
                                            method=model.embed)], axis=1)
    pos = jnp.concatenate([pos, pos[:, -1:] + 1], axis=1)

  # Taking row 0's second token as eos stops row 0 at its first occurrence, then pads with eos.
  eos = int(tokens[0, 1])
  stopped, lengths = decoding.greedy_decode(model, params, embeds, positions, max_new_tokens=6,
                                            eos_id=eos)
  first = int(np.argmax(np.asarray(tokens[0]) == eos))
  assert int(lengths[0]) == first + 1
  np.testing.assert_array_equal(stopped[0, :first + 1], tokens[0, :first + 1])
  assert np.all(np.asarray(stopped[0, first + 1:]) == eos)
