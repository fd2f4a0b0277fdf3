"""The prototype classifier against direct numpy computations and on separable clusters."""

import jax.numpy as jnp
import numpy as np
import pytest

from rvlf_jax.fewshot import protonet


def _clusters(n_way=4, k_shot=3, n_query=5, d=8, spread=0.1, seed=0):
  rng = np.random.default_rng(seed)
  centres = 5.0 * rng.standard_normal((n_way, d))
  s_labels = np.repeat(np.arange(n_way), k_shot)
  q_labels = np.repeat(np.arange(n_way), n_query)
  support = centres[s_labels] + spread * rng.standard_normal((s_labels.size, d))
  query = centres[q_labels] + spread * rng.standard_normal((q_labels.size, d))
  return (support.astype(np.float32), s_labels, query.astype(np.float32), q_labels)


def test_prototypes_and_logits_match_direct_computation():
  support, s_labels, query, _ = _clusters(spread=1.0)
  protos = protonet.prototypes(jnp.asarray(support), jnp.asarray(s_labels), 4)
  expected = np.stack([support[s_labels == c].mean(axis=0) for c in range(4)])
  np.testing.assert_allclose(protos, expected, rtol=1e-5, atol=1e-5)
  z = protonet.logits(jnp.asarray(query), protos)
  direct = -((query[:, None, :] - expected[None]) ** 2).sum(-1)
  np.testing.assert_allclose(z, direct, rtol=1e-4, atol=1e-3)
  zc = protonet.logits(jnp.asarray(query), protos, 'cosine', scale=7.0)
  qn = query / np.linalg.norm(query, axis=1, keepdims=True)
  pn = expected / np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(zc, 7.0 * qn @ pn.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='Unknown metric'):
    protonet.logits(jnp.asarray(query), protos, 'manhattan')


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_well_separated_clusters_are_classified_perfectly(metric):
  support, s_labels, query, q_labels = _clusters()
  loss, metrics = protonet.loss(jnp.asarray(support), jnp.asarray(s_labels), jnp.asarray(query),
                                jnp.asarray(q_labels), 4, metric, scale=30.0)
  assert float(metrics['accuracy']) == 1.0
  assert float(loss) < 0.05
  # Shuffling the query labels breaks it: the accuracy is that of the permuted labels.
  wrong = (q_labels + 1) % 4
  _, metrics = protonet.loss(jnp.asarray(support), jnp.asarray(s_labels), jnp.asarray(query),
                             jnp.asarray(wrong), 4, metric, scale=30.0)
  assert float(metrics['accuracy']) == 0.0
