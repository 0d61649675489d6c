"""Full-corpus ranks and top-k against NumPy references, sharded against unsharded."""

import functools

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh

from heterrec_jax import metrics, retrieval

N_ITEMS = 37  # item rows incl. padding row 0: not a multiple of 2, 4 or 8 shards


def make_inputs(seed, n_users=12, n_items=N_ITEMS, dim=8, hist=6, integer=True):
  """Users, items, targets and histories. Integer-valued vectors give exact float scores with
  many ties; some histories hold their own target, some repeat items, some are padded with 0."""
  rng = np.random.default_rng(seed)
  draw = ((lambda *s: rng.integers(-2, 3, s)) if integer else (lambda *s: rng.normal(size=s)))
  user_BxD = draw(n_users, dim).astype(np.float32)
  items_NxD = draw(n_items, dim).astype(np.float32)
  target_B = rng.integers(1, n_items, n_users).astype(np.int32)
  history_BxT = rng.integers(0, n_items, (n_users, hist)).astype(np.int32)
  history_BxT[::3, 0] = target_B[::3]
  history_BxT[1::4, 1] = history_BxT[1::4, 2]
  history_BxT[2::5, -2:] = 0
  return user_BxD, items_NxD, target_B, history_BxT


def reference_scores(user_BxD, items_NxD, target_B, history_BxT, exclude_history):
  """float64 scores, one user and item at a time; -inf for the non-candidates."""
  scores = np.full((user_BxD.shape[0], items_NxD.shape[0]), -np.inf)
  for b in range(user_BxD.shape[0]):
    for j in range(1, items_NxD.shape[0]):
      if exclude_history and j in history_BxT[b] and j != target_B[b]:
        continue
      with np.errstate(invalid='ignore'):  # inf * 0 is NaN on purpose in some tests
        scores[b, j] = float(np.dot(user_BxD[b].astype(np.float64), items_NxD[j]))
  return scores


def reference_ranks_loop(scores_BxN, target_B):
  """Other candidates scored >= the target (ties count against it); -1 (no rank) when the
  target's score or any candidate's is NaN or +inf."""
  ranks = []
  for row, t in zip(scores_BxN, target_B):
    if not np.isfinite(row[t]) or any(np.isnan(s) or s == np.inf for s in row):
      ranks.append(-1)
      continue
    ranks.append(sum(s >= row[t] for j, s in enumerate(row) if j != t))
  return np.array(ranks)


def reference_ranks_argsort(scores_BxN, target_B):
  """Position of the target in the descending order (exact when there are no ties)."""
  order_BxN = np.argsort(-scores_BxN, axis=1, kind='stable')
  return np.array([np.flatnonzero(o == t)[0] for o, t in zip(order_BxN, target_B)])


def reference_top_k(scores_BxN, k):
  ids_Bxk = np.argsort(-scores_BxN, axis=1, kind='stable')[:, :k]  # ties: lower id first
  values_Bxk = np.take_along_axis(scores_BxN, ids_Bxk, axis=1)
  return values_Bxk, np.where(values_Bxk == -np.inf, 0, ids_Bxk)


def make_mesh(shape):
  return Mesh(np.asarray(jax.devices()).reshape(shape), ('data', 'model'))


class RanksTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_ranks_with_ties_match_loop(self, exclude):
    user, items, target, history = make_inputs(0)
    fn = self.variant(functools.partial(retrieval.target_ranks, exclude_history=exclude))
    rank_B = fn(user, items, target, history)
    expect = reference_ranks_loop(reference_scores(user, items, target, history, exclude), target)
    np.testing.assert_array_equal(rank_B, expect)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_ranks_match_argsort(self, exclude):
    user, items, target, history = make_inputs(1, n_users=16, n_items=200, integer=False)
    fn = self.variant(functools.partial(retrieval.target_ranks, exclude_history=exclude))
    scores = reference_scores(user, items, target, history, exclude)
    np.testing.assert_array_equal(fn(user, items, target, history),
                                  reference_ranks_argsort(scores, target))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_random_ties_and_non_finite_rows_match_loop(self, exclude):
    for seed in range(3):
      user, items, target, history = make_inputs(20 + seed, n_users=24)
      user[3, 0] = np.nan  # one user's scores are all NaN
      user[5, 1] = np.inf  # +inf, -inf and NaN scores
      items[7, 2] = np.nan  # one item NaN for every user: every row has no rank
      fn = self.variant(functools.partial(retrieval.target_ranks, exclude_history=exclude))
      for it in (items, np.nan_to_num(items)):
        scores = reference_scores(user, it, target, history, exclude)
        np.testing.assert_array_equal(fn(user, it, target, history),
                                      reference_ranks_loop(scores, target))

  def test_ties_count_against_the_target(self):
    user = np.ones((1, 1), np.float32)
    items = np.array([[0.0], [2.0], [2.0], [2.0], [1.0]], np.float32)  # 1, 2, 3 tie
    np.testing.assert_array_equal(retrieval.target_ranks(user, items, np.array([2])), [2])
    np.testing.assert_array_equal(retrieval.target_ranks(user, items, np.array([4])), [3])
    flat = np.zeros((5, 1), np.float32)  # a model that scores every item alike: last, not first
    np.testing.assert_array_equal(retrieval.target_ranks(user, flat, np.array([1])), [3])

  def test_exclusion_keeps_the_target(self):
    user = np.ones((2, 1), np.float32)
    items = np.array([[9.0], [1.0], [2.0], [3.0], [4.0]], np.float32)  # item 0 would be best
    history = np.array([[4, 2, 0], [4, 3, 3]], np.int32)
    target = np.array([2, 1], np.int32)
    np.testing.assert_array_equal(retrieval.target_ranks(user, items, target), [2, 3])
    # Row 0: 4 is removed, 2 (its target) stays; row 1: 4 and 3 are removed.
    np.testing.assert_array_equal(retrieval.target_ranks(user, items, target, history, True),
                                  [1, 1])

  def test_padding_item_is_never_a_candidate(self):
    user, items, target, history = make_inputs(2)
    base = retrieval.target_ranks(user, items, target, history, True)
    items[0] = 100.0 * user.mean(0)  # the best-scoring row for most users
    np.testing.assert_array_equal(retrieval.target_ranks(user, items, target, history, True),
                                  base)
    _, ids = retrieval.top_k(user, items, 10, history, True, target)
    self.assertFalse(np.any(np.asarray(ids) == 0))
    self.assertTrue(np.all(np.asarray(base) <= N_ITEMS - 2))

  def test_bad_arguments_are_clear_errors(self):
    user, items, target, _ = make_inputs(3)
    with pytest.raises(ValueError, match='needs history_BxT'):
      retrieval.target_ranks(user, items, target, None, True)
    with pytest.raises(ValueError, match='1 <= k <= '):
      retrieval.top_k(user, items, N_ITEMS + 1)


class TopKTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_top_k_with_ties_matches_numpy(self, exclude):
    user, items, target, history = make_inputs(4)
    fn = self.variant(functools.partial(retrieval.top_k, k=10, exclude_history=exclude))
    values, ids = fn(user, items, history_BxT=history, target_B=target)
    expect_values, expect_ids = reference_top_k(
        reference_scores(user, items, target, history, exclude), 10)
    np.testing.assert_array_equal(ids, expect_ids)
    np.testing.assert_array_equal(values, expect_values)

  def test_slots_beyond_the_candidates_are_minus_inf_and_id_0(self):
    user, items, _, history = make_inputs(5)
    values, ids = retrieval.top_k(user, items, N_ITEMS, history, True)
    expect_values, expect_ids = reference_top_k(
        reference_scores(user, items, np.zeros(12, int), history, True), N_ITEMS)
    np.testing.assert_array_equal(values, expect_values)
    np.testing.assert_array_equal(ids, expect_ids)
    self.assertTrue(np.all(np.asarray(ids)[:, -1] == 0))  # at least item 0 is never a candidate

  @parameterized.parameters(False, True)
  def test_recall_from_ranks_agrees_with_top_k_membership(self, exclude):
    user, items, target, history = make_inputs(6, n_users=64, n_items=400, dim=16,
                                               hist=20, integer=False)
    items[target[::2]] += 3.0 * user[::2]  # half the users score their target high
    rank_B = np.asarray(retrieval.target_ranks(user, items, target, history, exclude))
    _, ids = retrieval.top_k(user, items, 200, history, exclude, target)
    sums = metrics.metrics_from_ranks(rank_B, np.ones(64, bool))
    for k in (10, 50, 100, 200):
      hit_B = np.any(np.asarray(ids)[:, :k] == target[:, None], axis=1)
      np.testing.assert_array_equal(rank_B < k, hit_B, err_msg=f'k={k}')
      self.assertEqual(float(sums[f'recall@{k}']), hit_B.sum())
      self.assertTrue(0 < hit_B.mean() < 1, f'k={k}: the test must see hits and misses')


class ShardedTest(parameterized.TestCase):

  @parameterized.product(shape=((4, 2), (1, 8), (8, 1)), exclude=(False, True),
                         n_users=(12, 10))
  def test_sharded_equals_unsharded(self, shape, exclude, n_users):
    mesh = make_mesh(shape)
    user, items, target, history = make_inputs(7, n_users=n_users)  # ties: tests the merge order
    for k in (3, 10, N_ITEMS):  # k above the 5 rows per shard of (1, 8); k = every row
      expect = retrieval.top_k(user, items, k, history, exclude, target)
      got = retrieval.sharded_top_k(mesh, user, items, k, history, exclude, target)
      np.testing.assert_array_equal(got[1], expect[1], err_msg=f'ids, k={k}')
      np.testing.assert_array_equal(got[0], expect[0], err_msg=f'scores, k={k}')
    np.testing.assert_array_equal(
        retrieval.sharded_target_ranks(mesh, user, items, target, history, exclude),
        retrieval.target_ranks(user, items, target, history, exclude))

  def test_sharded_non_finite_rows_have_no_rank(self):
    mesh = make_mesh((4, 2))
    user, items, target, history = make_inputs(11, n_users=12)
    user[2, 0], items[9, 0] = np.nan, np.nan
    got = retrieval.sharded_target_ranks(mesh, user, items, target, history)
    np.testing.assert_array_equal(got, retrieval.target_ranks(user, items, target, history))
    self.assertTrue(np.all(np.asarray(got) == retrieval.NO_RANK))

  def test_sharded_users_replicated_and_continuous_scores(self):
    mesh = make_mesh((2, 4))
    user, items, target, history = make_inputs(8, n_users=9, n_items=301, integer=False)
    expect = retrieval.top_k(user, items, 50, history, True, target)
    got = retrieval.sharded_top_k(mesh, user, items, 50, history, True, target, user_axis=None)
    np.testing.assert_array_equal(got[1], expect[1])
    np.testing.assert_allclose(got[0], expect[0], rtol=1e-6)
    np.testing.assert_array_equal(
        retrieval.sharded_target_ranks(mesh, user, items, target, history, True,
                                       item_axis='data', user_axis='model'),
        retrieval.target_ranks(user, items, target, history, True))


class PopularityTest(chex.TestCase, parameterized.TestCase):

  def test_scores_count_training_events(self):
    events = np.array([3, 1, 3, 0, 5, 3, 1], np.int32)
    counts = retrieval.popularity_scores(events, n_items=6)
    np.testing.assert_array_equal(counts, [0, 2, 0, 3, 0, 1, 0])
    self.assertEqual(counts.dtype, np.float32)
    with pytest.raises(ValueError, match=r'\[0, 6\]'):
      retrieval.popularity_scores(np.array([1, 7]), n_items=6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_ranks_match_loop(self, exclude):
    rng = np.random.default_rng(9)
    scores_N = retrieval.popularity_scores(rng.integers(0, N_ITEMS, 200), N_ITEMS - 1)
    _, _, target, history = make_inputs(9)
    fn = self.variant(functools.partial(retrieval.popularity_ranks, exclude_history=exclude))
    expect = reference_ranks_loop(
        reference_scores(np.ones((12, 1)), scores_N[:, None], target, history, exclude), target)
    np.testing.assert_array_equal(fn(scores_N, target, history), expect)
