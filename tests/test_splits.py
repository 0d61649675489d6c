"""splits.py against per-user Python loops on random CSR data, both split kinds."""

import numpy as np
import pytest

from heterrec_jax.data import splits
from heterrec_jax.data.dataset import DatasetError


def random_csr(seed: int, n_users: int = 60, max_events: int = 12):
  """(offsets, timestamps): random lengths (0 included), times sorted per user, with ties."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_events + 1, n_users)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ts = [np.sort(rng.integers(0, 50, n)) for n in lengths]
  return offsets, np.concatenate(ts).astype(np.int64)


def reference(offsets, ts, split):
  """train_end, valid, test of every user, one user at a time."""
  out = []
  for u in range(len(offsets) - 1):
    lo, hi = int(offsets[u]), int(offsets[u + 1])
    events = list(range(lo, hi))
    if split['kind'] == 'loo':
      test = events[-1] if events else -1
      valid = events[-2] if len(events) >= 2 else -1
    else:
      before = [e for e in events if ts[e] < split['cutoff']]
      after = [e for e in events if ts[e] >= split['cutoff']]
      test = after[0] if after else -1
      valid = before[-1] if before else -1
    out.append((valid if valid >= 0 else lo, valid, test))
  return [np.array(column) for column in zip(*out)]


SPLITS = [{'kind': 'loo'}, {'kind': 'time', 'cutoff': -1}, {'kind': 'time', 'cutoff': 0},
          {'kind': 'time', 'cutoff': 25}, {'kind': 'time', 'cutoff': 49},
          {'kind': 'time', 'cutoff': 1000}]


@pytest.mark.parametrize('split', SPLITS, ids=lambda s: f'{s["kind"]}{s.get("cutoff", "")}')
@pytest.mark.parametrize('seed', range(5))
def test_matches_reference(seed, split):
  offsets, ts = random_csr(seed)
  got = splits.compute_split(offsets, ts, split)
  train_end, valid, test = reference(offsets, ts, split)
  np.testing.assert_array_equal(got.train_start, offsets[:-1])
  np.testing.assert_array_equal(got.train_end, train_end)
  np.testing.assert_array_equal(got.valid, valid)
  np.testing.assert_array_equal(got.test, test)
  np.testing.assert_array_equal(got.target('valid'), valid)
  want = [u for u in range(len(offsets) - 1) if train_end[u] - offsets[u] >= 2]
  np.testing.assert_array_equal(splits.train_users(got), want)
  np.testing.assert_array_equal(splits.target_users(got, 'test'), np.flatnonzero(test >= 0))


def test_time_split_edges():
  # user 0: all before the cutoff; user 1: all at/after; user 2: straddles, tie at the cutoff.
  offsets = np.array([0, 3, 5, 9])
  ts = np.array([1, 2, 3, 10, 11, 4, 5, 10, 10])
  got = splits.time_split(offsets, ts, cutoff=10)
  assert got.test.tolist() == [-1, 3, 7]
  assert got.valid.tolist() == [2, -1, 6]
  assert got.train_end.tolist() == [2, 3, 6]
  assert splits.train_users(got).tolist() == [0]  # user 2 has 1 training event


def test_loo_short_users():
  got = splits.leave_one_out(np.array([0, 0, 1, 3, 6]))
  assert got.test.tolist() == [-1, 0, 2, 5]
  assert got.valid.tolist() == [-1, -1, 1, 4]
  assert got.n_train().tolist() == [0, 0, 0, 1]


def test_bad_split():
  offsets, ts = random_csr(0)
  with pytest.raises(DatasetError, match='kind'):
    splits.compute_split(offsets, ts, {'kind': 'random'})
  with pytest.raises(DatasetError, match='cutoff'):
    splits.compute_split(offsets, ts, {'kind': 'time'})
  with pytest.raises(ValueError, match='valid or test'):
    splits.leave_one_out(offsets).target('train')


def test_training_events_marks_exactly_the_training_parts():
  rng = np.random.default_rng(7)
  counts = rng.integers(0, 6, 40)
  offsets = np.concatenate([[0], np.cumsum(counts)])
  split = splits.leave_one_out(offsets)
  got = splits.training_events(split, int(offsets[-1]))
  want = np.zeros(int(offsets[-1]), bool)
  for u in range(40):
    for e in range(split.train_start[u], split.train_end[u]):
      want[e] = True
  np.testing.assert_array_equal(got, want)
