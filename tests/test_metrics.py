"""Metrics from ranks against a slow NumPy loop, summing over batches, and the Markdown table."""

import functools
import math

import chex
import numpy as np
import pytest
from absl.testing import parameterized

from heterrec_jax import metrics
from heterrec_jax.config import CUTOFFS, METRIC_NAMES


def names(cutoffs):
  return tuple(f'{m}@{k}' for k in cutoffs for m in ('recall', 'ndcg')) + ('mrr',)


def reference_sums(rank_B, valid_B, cutoffs=CUTOFFS):
  """One user at a time, straight from the definitions."""
  sums = {name: 0.0 for name in names(cutoffs)}
  sums['count'] = 0.0
  for rank, valid in zip(rank_B, valid_B):
    if not valid:
      continue
    for k in cutoffs:
      if rank < k:
        sums[f'recall@{k}'] += 1.0
        sums[f'ndcg@{k}'] += 1.0 / math.log2(rank + 2)
    sums['mrr'] += 1.0 / (rank + 1)
    sums['count'] += 1.0
  return sums


def random_batch(seed, size=257, max_rank=400):
  rng = np.random.default_rng(seed)
  rank_B = rng.integers(0, max_rank, size).astype(np.int32)
  rank_B[:8] = [0, 1, 9, 10, 49, 50, 199, 200]  # both sides of every cutoff
  valid_B = rng.random(size) < 0.8
  rank_B[~valid_B & (rng.random(size) < 0.5)] = -7  # garbage on padding rows must not leak
  return rank_B, valid_B


class MetricsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((10, 50, 100, 200),), ((1, 5),))
  def test_matches_loop_reference(self, cutoffs):
    rank_B, valid_B = random_batch(0)
    fn = self.variant(functools.partial(metrics.metrics_from_ranks, cutoffs=cutoffs))
    sums = fn(rank_B, valid_B)
    expect = reference_sums(rank_B, valid_B, cutoffs)
    self.assertEqual(set(sums), set(expect))  # jit returns dicts with sorted keys
    for name, value in expect.items():
      np.testing.assert_allclose(float(sums[name]), value, rtol=1e-5, err_msg=name)

  def test_per_row_matches_the_loop_reference_row_by_row(self):
    rank_B, _ = random_batch(1)
    rank_B = np.abs(rank_B).reshape(1, -1).repeat(2, axis=0)  # any shape: [runs, users] here
    values = metrics.per_row(rank_B, (10, 50))
    self.assertEqual(tuple(values), names((10, 50)))
    for r in range(2):
      for u in range(rank_B.shape[1]):
        expect = reference_sums([rank_B[r, u]], [True], (10, 50))
        for name, value in values.items():
          np.testing.assert_allclose(float(value[r, u]), expect[name], rtol=1e-6, err_msg=name)

  def test_default_keys_are_config_metric_names(self):
    sums = metrics.metrics_from_ranks(np.zeros(3, np.int32), np.ones(3, bool))
    self.assertEqual(tuple(sums), METRIC_NAMES + ('count',))
    wanted = names((5, 20, 100))  # 'ndcg@100' < 'ndcg@20' as strings
    self.assertEqual(metrics.ordered(sorted(wanted) + ['count']), list(wanted) + ['count'])

  @chex.variants(with_jit=True, without_jit=True)
  def test_sums_add_up_across_batches(self):
    rank_B, valid_B = random_batch(1, size=300)
    fn = self.variant(metrics.metrics_from_ranks)
    totals = {}
    for lo in range(0, 300, 64):  # uneven last batch
      totals = metrics.add(totals, fn(rank_B[lo:lo + 64], valid_B[lo:lo + 64]))
    whole = fn(rank_B, valid_B)
    for name in whole:
      np.testing.assert_allclose(totals[name], float(whole[name]), rtol=1e-5, err_msg=name)
    means = metrics.finalize(totals)
    expect = reference_sums(rank_B, valid_B)
    self.assertEqual(list(means), list(METRIC_NAMES))  # report order, though jit sorted keys
    for name in METRIC_NAMES:
      np.testing.assert_allclose(means[name], expect[name] / expect['count'], rtol=1e-5)

  def test_known_values(self):
    sums = metrics.metrics_from_ranks(np.array([0, 3, 120]), np.array([True, True, False]))
    means = metrics.finalize(sums)
    self.assertEqual(means['recall@10'], 1.0)
    np.testing.assert_allclose(means['ndcg@10'], (1.0 + 1.0 / math.log2(5)) / 2, rtol=1e-6)
    np.testing.assert_allclose(means['mrr'], (1.0 + 0.25) / 2, rtol=1e-6)

  def test_finalize_without_rows_is_a_clear_error(self):
    sums = metrics.metrics_from_ranks(np.array([1, 2]), np.array([False, False]))
    with pytest.raises(ValueError, match='0 valid rows'):
      metrics.finalize(sums)

  def test_format_table(self):
    row = {name: 0.5 for name in METRIC_NAMES}
    table = metrics.format_table({'HeterRec (test)': {**row, 'mrr': 0.123456},
                                  'other (test)': {'mrr': 0.25, 'ndcg@10': 0.5},
                                  'popularity (test)': {**row, 'count': 9.0}})
    lines = table.splitlines()
    self.assertLen(lines, 5)
    self.assertEqual(lines[0], '| model | ' + ' | '.join(METRIC_NAMES) + ' |')
    self.assertTrue(lines[2].startswith('| HeterRec (test) | 0.5000 |'))
    self.assertTrue(lines[2].endswith('| 0.1235 |'))
    self.assertNotIn('count', table)
    self.assertEqual(lines[3], '| other (test) | - | 0.5000 | ' + '- | ' * 6 + '0.2500 |')
    self.assertEqual(lines[4].count('|'), len(METRIC_NAMES) + 2)
