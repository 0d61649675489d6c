"""`evaluate --by-popularity`: the popularity groups and the metrics within each, against slow
NumPy references on random inputs."""

import math

import numpy as np
import pytest

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax.config import CUTOFFS


def slow_metrics(ranks):
  """Recall@k, nDCG@k and MRR of a list of 0-based ranks, one user at a time."""
  out = {}
  for k in CUTOFFS:
    out[f'recall@{k}'] = sum(1.0 for r in ranks if r < k) / len(ranks)
    out[f'ndcg@{k}'] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
  out['mrr'] = sum(1.0 / (r + 1) for r in ranks) / len(ranks)
  return out


@pytest.mark.parametrize('n_groups', [1, 3, 5])
def test_groups_partition_the_users_by_count(n_groups):
  rng = np.random.default_rng(n_groups)
  count_U = rng.permutation(300)  # distinct counts: groups of equal size up to rounding
  groups = evaluate_lib.popularity_groups(count_U, n_groups)
  assert len(groups) == n_groups
  assert groups[0][0] == 0 and groups[-1][1] == 299
  for (_, hi), (lo, _) in zip(groups, groups[1:]):
    assert lo == hi + 1  # contiguous, no gaps, no overlaps
  sizes = [int(np.sum((count_U >= lo) & (count_U <= hi))) for lo, hi in groups]
  assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 2, sizes


def test_tied_counts_give_fewer_groups_and_stay_together():
  count_U = np.array([1] * 80 + [2] * 10 + [50] * 10)
  groups = evaluate_lib.popularity_groups(count_U, 4)
  # 80% of the users share the count 1: it cannot be split, so it is one group.
  assert groups[0] == (1, 1)
  covered = [c for c in count_U if any(lo <= c <= hi for lo, hi in groups)]
  assert len(covered) == count_U.size
  assert evaluate_lib.popularity_groups(np.full(7, 3), 5) == [(3, 3)]
  assert evaluate_lib.popularity_groups(np.array([], np.int64), 3) == []
  with pytest.raises(ValueError, match='n_groups=0'):
    evaluate_lib.popularity_groups(count_U, 0)


@pytest.mark.parametrize('seed', [0, 1])
def test_metrics_by_popularity_match_a_slow_reference(seed):
  rng = np.random.default_rng(seed)
  n_items, n_users = 60, 400
  counts_N = rng.integers(0, 40, n_items + 1)
  counts_N[0] = 0
  target_U = rng.integers(1, n_items + 1, n_users)
  rank_U = rng.integers(0, 300, n_users)
  table = evaluate_lib.metrics_by_popularity(rank_U, target_U, counts_N, 4)
  assert sum(row['users'] for row in table.values()) == pytest.approx(1.0)
  seen = 0
  for label, row in table.items():
    lo, hi = (int(x) for x in label.split()[2].split('-'))
    ranks = [r for r, t in zip(rank_U, target_U) if lo <= counts_N[t] <= hi]
    seen += len(ranks)
    assert row['users'] == pytest.approx(len(ranks) / n_users)
    for name, value in slow_metrics(ranks).items():
      assert row[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (label, name)
  assert seen == n_users
  # One group is the whole split: the overall metrics.
  (whole,) = evaluate_lib.metrics_by_popularity(rank_U, target_U, counts_N, 1).values()
  for name, value in slow_metrics(list(rank_U)).items():
    assert whole[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
