"""Few-shot episodes: class and signer splits, N-way K-shot sampling, accuracy with 95% CIs.

Everything here is numpy on integer label arrays over a pool of E examples (e.g. isolated sign
clips): `classes` int[E] names each example's class (gloss) and `signers` int[E] its signer. An
episode draws N classes, then K support and Q query examples of each, without replacement, so
support and query never share an example. Episode labels are 0..N-1 in the order the classes were
drawn; `Episode.classes` maps them back.

Splits follow the usual few-shot protocol with one addition for signs: classes are split into
disjoint base / validation / novel sets, and signers into two disjoint sets, so that no signer of
the base (training) examples is seen at novel (test) time. Validation examples use the held-out
signers too, so validation measures what the test measures (unseen signs by unseen signers).

Accuracy over many episodes is reported as mean +- 1.96 * std / sqrt(episodes), the 95% interval
of the mean used by ProtoNet / MAML-style papers (std with ddof=0, as numpy's default there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Episode:
  """Indices into the pool for one N-way K-shot episode with Q queries per class.

  Attributes:
    support: int[N * K] pool indices, class-major (the K examples of label 0, then label 1, ...).
    query: int[N * Q] pool indices, class-major.
    support_labels: int[N * K] episode labels in 0..N-1.
    query_labels: int[N * Q] episode labels in 0..N-1.
    classes: int[N] the pool class of each episode label.
  """

  support: np.ndarray
  query: np.ndarray
  support_labels: np.ndarray
  query_labels: np.ndarray
  classes: np.ndarray


@dataclasses.dataclass(frozen=True)
class Split:
  """Disjoint class sets and signer sets, and the pool indices of each split's examples.

  Attributes:
    base_classes, val_classes, novel_classes: int[...] sorted class ids, pairwise disjoint.
    base_signers, novel_signers: int[...] sorted signer ids, disjoint.
    base: int[...] pool indices of base-class examples by base signers.
    val: int[...] pool indices of validation-class examples by novel (held-out) signers.
    novel: int[...] pool indices of novel-class examples by novel signers.
  """

  base_classes: np.ndarray
  val_classes: np.ndarray
  novel_classes: np.ndarray
  base_signers: np.ndarray
  novel_signers: np.ndarray
  base: np.ndarray
  val: np.ndarray
  novel: np.ndarray


def _as_labels(name: str, values) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f'{name} must be a 1-D integer array, got {values.dtype}{list(values.shape)}.')
  return values


def split_classes(classes, signers, *, num_val_classes: int, num_novel_classes: int,
                  num_novel_signers: int, rng: np.random.Generator) -> Split:
  """Splits classes into base / validation / novel and signers into base / novel, at random.

  Args:
    classes: int[E] class of each pool example.
    signers: int[E] signer of each pool example.
    num_val_classes: classes held out for validation (may be 0).
    num_novel_classes: classes held out for the test (>= 1); the rest are base classes.
    num_novel_signers: signers held out for validation and test (>= 1); the rest are base.
    rng: the shuffling source (the split is a function of its state).

  Returns:
    The `Split`. Examples of a base class by a novel signer, or of a novel class by a base
    signer, belong to no split: that is what keeps signers disjoint between base and novel.

  Raises:
    ValueError: on mismatched arrays or when a set would be empty.
  """
  classes, signers = _as_labels('classes', classes), _as_labels('signers', signers)
  if classes.shape != signers.shape:
    raise ValueError(f'classes {classes.shape} and signers {signers.shape} differ in length.')
  class_ids, signer_ids = np.unique(classes), np.unique(signers)
  if num_val_classes < 0 or num_novel_classes < 1:
    raise ValueError(f'Need num_val_classes >= 0 and num_novel_classes >= 1, got '
                     f'{num_val_classes} and {num_novel_classes}.')
  if num_val_classes + num_novel_classes >= len(class_ids):
    raise ValueError(f'{num_val_classes} validation + {num_novel_classes} novel classes leave no '
                     f'base class among {len(class_ids)}.')
  if not 1 <= num_novel_signers < len(signer_ids):
    raise ValueError(f'num_novel_signers must be in [1, {len(signer_ids)}) so that base and novel '
                     f'both have signers, got {num_novel_signers}.')
  class_perm, signer_perm = rng.permutation(class_ids), rng.permutation(signer_ids)
  novel_classes = np.sort(class_perm[:num_novel_classes])
  val_classes = np.sort(class_perm[num_novel_classes:num_novel_classes + num_val_classes])
  base_classes = np.sort(class_perm[num_novel_classes + num_val_classes:])
  novel_signers = np.sort(signer_perm[:num_novel_signers])
  base_signers = np.sort(signer_perm[num_novel_signers:])

  def members(class_set, signer_set):
    return np.flatnonzero(np.isin(classes, class_set) & np.isin(signers, signer_set))

  return Split(base_classes, val_classes, novel_classes, base_signers, novel_signers,
               base=members(base_classes, base_signers), val=members(val_classes, novel_signers),
               novel=members(novel_classes, novel_signers))


def eligible_classes(classes, pool, min_examples: int) -> np.ndarray:
  """Sorted ids of the classes with at least `min_examples` examples among pool indices `pool`."""
  ids, counts = np.unique(_as_labels('classes', classes)[np.asarray(pool)], return_counts=True)
  return ids[counts >= min_examples]


def sample_episode(classes, pool, n_way: int, k_shot: int, n_query: int,
                   rng: np.random.Generator) -> Episode:
  """Draws one N-way K-shot episode with Q queries per class from the examples `pool`.

  Args:
    classes: int[E] class of each pool example.
    pool: int[P] the indices of the examples allowed (a split's `base`, `val` or `novel`), so
      only their classes can appear.
    n_way: N distinct classes per episode.
    k_shot: K support examples per class (>= 1).
    n_query: Q query examples per class (>= 1).
    rng: the sampling source.

  Returns:
    An `Episode` whose support and query are disjoint and drawn from `pool` only.

  Raises:
    ValueError: when fewer than N classes of the pool have K + Q examples each (the message
      names the short classes).
  """
  classes = _as_labels('classes', classes)
  pool = np.asarray(pool)
  if n_way < 1 or k_shot < 1 or n_query < 1:
    raise ValueError(f'n_way, k_shot and n_query must be >= 1, got {n_way}, {k_shot}, {n_query}.')
  need = k_shot + n_query
  pool_classes = classes[pool]
  ids, counts = np.unique(pool_classes, return_counts=True)
  ok = ids[counts >= need]
  if len(ok) < n_way:
    short = {int(c): int(n) for c, n in zip(ids, counts) if n < need}
    raise ValueError(f'{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes '
                     f'with >= {need} examples each; the pool has {len(ok)} such classes of '
                     f'{len(ids)} (classes with too few examples, as class: count: {short}).')
  chosen = rng.choice(ok, size=n_way, replace=False)
  support, query = [], []
  for c in chosen:
    picked = rng.choice(pool[pool_classes == c], size=need, replace=False)
    support.append(picked[:k_shot])
    query.append(picked[k_shot:])
  labels = np.arange(n_way)
  return Episode(support=np.concatenate(support), query=np.concatenate(query),
                 support_labels=np.repeat(labels, k_shot),
                 query_labels=np.repeat(labels, n_query), classes=chosen)


def confidence_interval(accuracies, z: float = 1.96) -> tuple[float, float]:
  """(mean, half width) of the 95% interval of the mean: z * std / sqrt(n), std with ddof=0.

  Args:
    accuracies: float[n] one accuracy per episode (n >= 1).
    z: the normal quantile (1.96 for 95%).
  """
  acc = np.asarray(accuracies, np.float64)
  if acc.ndim != 1 or acc.size == 0:
    raise ValueError(f'Expected a non-empty 1-D array of accuracies, got shape {acc.shape}.')
  return float(acc.mean()), float(z * acc.std() / np.sqrt(acc.size))


def evaluate(episode_accuracy: Callable[[Episode], float], classes, pool, *, n_way: int,
             k_shot: int, n_query: int, num_episodes: int = 2000,
             rng: np.random.Generator) -> dict[str, float]:
  """Mean accuracy and its 95% interval over `num_episodes` random episodes of `pool`.

  Args:
    episode_accuracy: Episode -> query accuracy in [0, 1] (e.g. a jitted embed + prototype
      classifier, fed the episode's examples).
    classes, pool, n_way, k_shot, n_query: as `sample_episode`.
    num_episodes: episodes to average (2,000 in the usual protocol).
    rng: the sampling source.

  Returns:
    {'accuracy': mean, 'ci95': half width, 'episodes': num_episodes}.
  """
  accs = [float(episode_accuracy(sample_episode(classes, pool, n_way, k_shot, n_query, rng)))
          for _ in range(num_episodes)]
  mean, half = confidence_interval(accs)
  return {'accuracy': mean, 'ci95': half, 'episodes': num_episodes}
