"""The prototype classifier (ProtoNet): class means of support embeddings, distance logits.

Shape vocabulary: S support examples, Q query examples, C classes of the episode (N-way: C = N),
D embedding dim.

Logits are -||q - p||^2 (Snell et al. 2017) or, with metric 'cosine', scale * cos(q, p) (a fixed
temperature, as in cosine few-shot classifiers); the loss is the mean cross-entropy of the
queries over the C prototypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
METRICS = ('euclidean', 'cosine')


def prototypes(support_sd: Array, labels_s: Array, num_classes: int) -> Array:
  """float[C, D]: the mean support embedding of each class (labels in 0..C-1, each present)."""
  onehot_sc = jax.nn.one_hot(labels_s, num_classes, dtype=jnp.float32)
  sums_cd = jnp.einsum('sc,sd->cd', onehot_sc, support_sd.astype(jnp.float32))
  return sums_cd / jnp.maximum(onehot_sc.sum(axis=0), 1.0)[:, None]


def logits(query_qd: Array, protos_cd: Array, metric: str = 'euclidean',
           scale: float = 10.0) -> Array:
  """float32[Q, C] class scores of the queries.

  Args:
    query_qd: query embeddings.
    protos_cd: class prototypes.
    metric: 'euclidean' (negative squared distance) or 'cosine' (scale * cosine similarity).
    scale: the cosine temperature (unused for 'euclidean').
  """
  q, p = query_qd.astype(jnp.float32), protos_cd.astype(jnp.float32)
  if metric == 'euclidean':
    # ||q - p||^2 expanded, one matmul instead of a [Q, C, D] difference tensor.
    sq = (jnp.sum(q * q, axis=-1)[:, None] - 2.0 * jnp.einsum('qd,cd->qc', q, p) +
          jnp.sum(p * p, axis=-1)[None, :])
    return -jnp.maximum(sq, 0.0)
  if metric == 'cosine':
    qn = q * jax.lax.rsqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-12)
    pn = p * jax.lax.rsqrt(jnp.sum(p * p, axis=-1, keepdims=True) + 1e-12)
    return scale * jnp.einsum('qd,cd->qc', qn, pn)
  raise ValueError(f'Unknown metric {metric!r}; choose among {METRICS}.')


def accuracy(logits_qc: Array, labels_q: Array) -> Array:
  """float32[]: fraction of queries whose highest-scoring class is their label."""
  return jnp.mean((jnp.argmax(logits_qc, axis=-1) == labels_q).astype(jnp.float32))


def loss(support_sd: Array, support_labels_s: Array, query_qd: Array, query_labels_q: Array,
         num_classes: int, metric: str = 'euclidean',
         scale: float = 10.0) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy of the queries against the support prototypes.

  Args:
    support_sd, support_labels_s: support embeddings and their episode labels (0..C-1).
    query_qd, query_labels_q: query embeddings and their episode labels.
    num_classes: C (static).
    metric, scale: as `logits`.

  Returns:
    (mean cross-entropy, {'loss', 'accuracy'}).
  """
  protos = prototypes(support_sd, support_labels_s, num_classes)
  z_qc = logits(query_qd, protos, metric, scale)
  ce = optax.softmax_cross_entropy_with_integer_labels(z_qc, query_labels_q).mean()
  return ce, {'loss': ce, 'accuracy': accuracy(z_qc, query_labels_q)}
