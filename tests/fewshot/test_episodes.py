"""Class/signer splits, episode sampling and the confidence interval, on made-up label arrays."""

import numpy as np
import pytest

from rvlf_jax.fewshot import episodes


def _pool(num_classes=20, num_signers=6, per_pair=3, seed=0):
  """Every (class, signer) pair with `per_pair` examples, shuffled."""
  classes = np.repeat(np.arange(num_classes), num_signers * per_pair)
  signers = np.tile(np.repeat(np.arange(num_signers), per_pair), num_classes)
  perm = np.random.default_rng(seed).permutation(classes.size)
  return classes[perm], signers[perm]


def test_split_keeps_classes_and_signers_disjoint():
  classes, signers = _pool()
  split = episodes.split_classes(classes, signers, num_val_classes=4, num_novel_classes=6,
                                 num_novel_signers=2, rng=np.random.default_rng(1))
  assert (len(split.base_classes), len(split.val_classes), len(split.novel_classes)) == (10, 4, 6)
  sets = [set(split.base_classes), set(split.val_classes), set(split.novel_classes)]
  assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
  assert set().union(*sets) == set(range(20))
  assert not set(split.base_signers) & set(split.novel_signers)
  assert len(split.novel_signers) == 2 and len(split.base_signers) == 4
  assert set(classes[split.base]) == sets[0] and set(signers[split.base]) <= set(split.base_signers)
  assert set(classes[split.novel]) == sets[2]
  assert set(signers[split.novel]) <= set(split.novel_signers)
  assert set(classes[split.val]) == sets[1]
  assert set(signers[split.val]) <= set(split.novel_signers)
  # Each split holds exactly the pool examples of its classes by its signers (3 per pair).
  assert split.base.size == 10 * 4 * 3 and split.novel.size == 6 * 2 * 3


def test_split_rejects_impossible_requests():
  classes, signers = _pool(num_classes=5, num_signers=2)
  with pytest.raises(ValueError, match='leave no base class'):
    episodes.split_classes(classes, signers, num_val_classes=2, num_novel_classes=3,
                           num_novel_signers=1, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match='num_novel_signers'):
    episodes.split_classes(classes, signers, num_val_classes=1, num_novel_classes=1,
                           num_novel_signers=2, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match='differ in length'):
    episodes.split_classes(classes, signers[:-1], num_val_classes=1, num_novel_classes=1,
                           num_novel_signers=1, rng=np.random.default_rng(0))


def test_episodes_of_the_novel_split_are_well_formed_and_never_mix_in_base_classes():
  classes, signers = _pool()
  split = episodes.split_classes(classes, signers, num_val_classes=4, num_novel_classes=6,
                                 num_novel_signers=2, rng=np.random.default_rng(1))
  rng = np.random.default_rng(2)
  n, k, q = 5, 2, 3
  seen = set()
  for _ in range(100):
    ep = episodes.sample_episode(classes, split.novel, n, k, q, rng)
    assert ep.support.shape == (n * k,) and ep.query.shape == (n * q,)
    assert len(set(ep.classes)) == n
    assert set(ep.classes) <= set(split.novel_classes)
    assert not set(classes[np.concatenate([ep.support, ep.query])]) & set(split.base_classes)
    assert set(np.concatenate([ep.support, ep.query])) <= set(split.novel)
    assert not set(ep.support) & set(ep.query)
    assert len(set(ep.support)) == n * k and len(set(ep.query)) == n * q
    np.testing.assert_array_equal(np.bincount(ep.support_labels, minlength=n), [k] * n)
    np.testing.assert_array_equal(np.bincount(ep.query_labels, minlength=n), [q] * n)
    # Episode labels name the pool classes through `classes`.
    np.testing.assert_array_equal(classes[ep.support], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(classes[ep.query], ep.classes[ep.query_labels])
    seen |= set(ep.classes)
  assert seen == set(split.novel_classes)  # Every novel class gets drawn over 100 episodes.


def test_sampling_reports_classes_with_too_few_examples():
  classes = np.array([0] * 5 + [1] * 5 + [2] * 2)
  pool = np.arange(classes.size)
  with pytest.raises(ValueError, match=r'needs 3 classes with >= 4 examples.*\{2: 2\}'):
    episodes.sample_episode(classes, pool, 3, 1, 3, np.random.default_rng(0))
  ep = episodes.sample_episode(classes, pool, 2, 1, 3, np.random.default_rng(0))
  assert set(ep.classes) == {0, 1}
  np.testing.assert_array_equal(episodes.eligible_classes(classes, pool, 4), [0, 1])
  with pytest.raises(ValueError, match='>= 1'):
    episodes.sample_episode(classes, pool, 2, 0, 3, np.random.default_rng(0))


def test_confidence_interval_on_known_values():
  mean, half = episodes.confidence_interval([0.0, 1.0, 0.0, 1.0])
  assert mean == pytest.approx(0.5)
  assert half == pytest.approx(1.96 * 0.5 / 2.0)  # std 0.5 (ddof=0), sqrt(4) = 2.
  mean, half = episodes.confidence_interval([0.8] * 10)
  assert (mean, half) == (pytest.approx(0.8), 0.0)
  with pytest.raises(ValueError, match='non-empty'):
    episodes.confidence_interval([])


def test_evaluate_averages_episode_accuracies():
  classes, _ = _pool(num_classes=6, num_signers=1, per_pair=6)
  pool = np.arange(classes.size)
  # The accuracy of an episode: the fraction of its classes below 3, so the mean is 0.5 and
  # the interval follows from the values drawn.
  accs = []

  def acc(ep):
    accs.append(float(np.mean(ep.classes < 3)))
    return accs[-1]

  out = episodes.evaluate(acc, classes, pool, n_way=2, k_shot=1, n_query=2, num_episodes=400,
                          rng=np.random.default_rng(0))
  assert out['episodes'] == 400 and len(accs) == 400
  assert out['accuracy'] == pytest.approx(np.mean(accs))
  assert out['ci95'] == pytest.approx(1.96 * np.std(accs) / 20.0)
  assert abs(out['accuracy'] - 0.5) < 3 * out['ci95']
