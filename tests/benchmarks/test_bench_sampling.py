"""The logic of benchmarks.bench_sampling and benchmarks.bench_prefix, on tiny models."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_prefix, bench_sampling, common

# A tiny Llama in model M's format: d=32, f=64, L=2, 4 heads of 8, 2 kv heads, V=64, untied.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ENV = common.Env(cpu='test', cores=2, device='cpu', matmul_gflops=100.0, bandwidth_gbs=10.0,
                 versions={})


@pytest.fixture(scope='module')
def tiny():
  path = common.model_m_dir(**TINY)
  model, params = bench_sampling.load_ours(path)
  return path, model, params, bench_sampling.load_hf_model(path)


def test_roofline_bytes_by_hand(tiny):
  config = {**common.MODEL_M, **TINY}
  # Per layer: q, o 32x32; k, v 32x16; MLP 3 x 32x64; two norms of 32. Then the final norm, the
  # 32x64 output matrix and the one embedding row a step looks up.
  per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
  weights = 2 * per_layer + 32 + 32 * 64 + 32
  assert bench_sampling.weight_bytes(config) == 4 * weights
  # The same count from the checkpoint itself: all parameters less the embedding table but a row.
  hf_model = tiny[3]
  total = sum(p.numel() for p in hf_model.parameters())
  assert bench_sampling.weight_bytes(config) == 4 * (total - 64 * 32 + 32)
  # KV: keys and values of positions 0..p, 2 layers x 2 kv heads x 8 dims, 4 bytes each.
  assert bench_sampling.kv_bytes(config, 9) == 2 * 2 * 10 * 2 * 8 * 4
  # Prompt of 4, 3 new tokens: the measured steps are at positions 4 and 5 (5 and 6 keys).
  assert bench_sampling.roofline_bytes(config, 4, 3) == 4 * weights + 2 * 2 * 5.5 * 2 * 8 * 4


def test_both_sides_generate_exactly_n_tokens(tiny):
  _, model, params, hf_model = tiny
  # The shapes of test_sampling_run_reports_every_figure, so its programs are compiled once.
  tokens = bench_sampling.prompt_tokens(64, 2, 4)
  ours = bench_sampling.our_sample(model, params, jnp.asarray(tokens), jax.random.key(0),
                                   group_size=2, new_tokens=4)
  theirs = bench_sampling.hf_sample(hf_model, tokens, group_size=2, new_tokens=4)
  bench_sampling.check_sampled(jax.device_get(ours), theirs, batch=2, group_size=2,
                               prompt_len=4, new_tokens=4)
  with pytest.raises(AssertionError, match='HF: output'):
    bench_sampling.check_sampled(jax.device_get(ours), theirs[:, :-1], batch=2, group_size=2,
                                 prompt_len=4, new_tokens=4)
  # Same weights: the same logits and the same greedy continuation.
  assert bench_sampling.logits_gap(model, params, hf_model, tokens) < 1e-4
  greedy = np.asarray(bench_sampling.our_greedy(model, params, jnp.asarray(tokens[:1]),
                                                new_tokens=4))
  hf_greedy = bench_sampling.hf_greedy(hf_model, tokens[:1], new_tokens=4)[:, 4:].numpy()
  np.testing.assert_array_equal(greedy, hf_greedy)


def test_sampling_run_reports_every_figure(tiny):
  section = bench_sampling.run(ENV, quick=True, model_dir=tiny[0], reps=1, prompts=2,
                               group_size=2, prompt_len=4, new_tokens=4)
  assert 'Speedup' in section.markdown and 'roofline' in section.markdown
  # Both profiles were read and classified.
  assert len(re.findall(r'trace\): [^.]*weight matmuls', section.markdown)) == 2
  # Every figure is measured; the greedy ones are differences of tiny timings here (any sign).
  assert all(np.isfinite(v) for v in section.figures.values()), section.figures
  assert section.figures['sampling_speedup_vs_hf'] > 0
  # A missed goal says what caps it: decode steps whose weight matmuls run at the peak.
  missed = section.figures['sampling_speedup_vs_hf'] < bench_sampling.SAMPLING_GOAL
  assert ('What limits it' in section.markdown) == missed
  if missed:
    assert re.search(r'would take [\d.e+-]+ s, [\d.]+x faster than HF', section.markdown)


@pytest.fixture(scope='module')
def prefix_setup():
  return bench_prefix.make_setup('tiny', batch_size=2, group_size=3, temperature=0.0)


def test_prefix_paths_give_the_same_greedy_samples(prefix_setup):
  setup = prefix_setup
  shared, repeated = bench_prefix.shared_and_repeated(setup)
  assert repeated.batch['keypoints'].shape[0] == 6 and repeated.group_size == 1
  a, b = shared.samples(jax.random.key(1)), repeated.samples(jax.random.key(2))
  n = setup.sampling.max_new_tokens
  assert a['tokens'].shape == b['tokens'].shape == (2, 3, n)
  np.testing.assert_array_equal(a['lengths'], n)  # eos outside the vocabulary: never drawn
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  np.testing.assert_allclose(a['logp'], b['logp'], atol=1e-5)


def test_prefix_run_reports_the_breakdown(prefix_setup):
  section = bench_prefix.run(ENV, quick=True, setup=prefix_setup, reps=1)
  for part in ('sign encoder ms', 'prefill ms', 'decode loop ms'):
    assert part in section.markdown
  assert section.figures['prefix_sharing_speedup'] > 0
