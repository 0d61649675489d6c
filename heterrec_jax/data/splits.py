"""Per-user train/validation/test boundaries of a prepared dataset (SPEC section 2).

Every index here is an absolute event index into the CSR arrays (`items`, `timestamps`); a
user's events are `offsets[u]:offsets[u + 1]`, sorted by time.

  {'kind': 'loo'}  leave-one-out (the default, as SASRec/BERT4Rec/HSTU/RecBole): the test
                   target is the user's last event, the validation target the second last,
                   the training part every event before the validation target.
  {'kind': 'time', 'cutoff': T}
                   a global-time split at unix second T: the test target is the user's first
                   event at or after T (users with none have no test example), the validation
                   target the user's last event before T (users with none have no validation
                   example), the training part every event before the validation target. So
                   no training or validation event is at or after T, and the test input (the
                   events before the test target) is the training part plus the validation
                   target, as with leave-one-out.

A user without a validation target has an empty training part. A user whose training part
holds fewer than 2 events gives no training window (a window needs an input and a next item);
`train_users` lists the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from heterrec_jax.data.dataset import DatasetError

SPLIT_KINDS = ('loo', 'time')
MIN_TRAIN_EVENTS = 2


@dataclasses.dataclass(frozen=True)
class Split:
  """Per-user boundaries, each int64 `[n_users]`."""
  train_start: np.ndarray  # first event of the user (= offsets[:-1])
  train_end: np.ndarray  # end (exclusive) of the training part; == train_start when empty
  valid: np.ndarray  # event index of the validation target, -1 when the user has none
  test: np.ndarray  # event index of the test target, -1 when the user has none

  def target(self, name: str) -> np.ndarray:
    """The `valid` or `test` target index of every user (-1: none)."""
    if name not in ('valid', 'test'):
      raise ValueError(f'split={name!r} is not allowed; use valid or test')
    return getattr(self, name)

  def n_train(self) -> np.ndarray:
    """Events in each user's training part."""
    return self.train_end - self.train_start


def leave_one_out(offsets: np.ndarray) -> Split:
  """Test = last event, validation = second last, training = the events before."""
  lo, hi = _bounds(offsets)
  n = hi - lo
  test = np.where(n >= 1, hi - 1, -1)
  valid = np.where(n >= 2, hi - 2, -1)
  return Split(train_start=lo, train_end=np.where(valid >= 0, valid, lo), valid=valid, test=test)


def time_split(offsets: np.ndarray, timestamps: np.ndarray, cutoff: int) -> Split:
  """Test = first event at or after `cutoff`, validation = last event before it."""
  lo, hi = _bounds(offsets)
  before_E = np.asarray(timestamps) < cutoff
  cum = np.concatenate([[0], np.cumsum(before_E, dtype=np.int64)])
  first_after = lo + (cum[hi] - cum[lo])  # events are sorted in time within a user
  test = np.where(first_after < hi, first_after, -1)
  valid = np.where(first_after > lo, first_after - 1, -1)
  return Split(train_start=lo, train_end=np.where(valid >= 0, valid, lo), valid=valid, test=test)


def compute_split(offsets: np.ndarray, timestamps: np.ndarray, split: dict[str, Any]) -> Split:
  """The `Split` that `Schema.split` describes."""
  kind = split.get('kind')
  if kind == 'loo':
    return leave_one_out(offsets)
  if kind == 'time':
    if 'cutoff' not in split:
      raise DatasetError(f"schema split {split!r} has no 'cutoff'")
    return time_split(offsets, timestamps, int(split['cutoff']))
  raise DatasetError(f'schema split kind {kind!r} is not one of {SPLIT_KINDS}')


def dataset_split(dataset) -> Split:
  """The `Split` of a prepared `Dataset`, from its schema."""
  return compute_split(dataset.offsets, dataset.timestamps, dataset.schema.split)


def training_events(split: Split, n_events: int) -> np.ndarray:
  """bool `[n_events]`: True for the events of the users' training parts."""
  delta_E = np.zeros(n_events + 1, np.int64)
  np.add.at(delta_E, split.train_start, 1)
  np.add.at(delta_E, split.train_end, -1)
  return np.cumsum(delta_E[:-1]) > 0


def train_users(split: Split) -> np.ndarray:
  """The users (int64, ascending) whose training part holds at least 2 events."""
  return np.flatnonzero(split.n_train() >= MIN_TRAIN_EVENTS)


def target_users(split: Split, name: str) -> np.ndarray:
  """The users (int64, ascending) that have a `valid` or `test` target."""
  return np.flatnonzero(split.target(name) >= 0)


def _bounds(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  offsets = np.asarray(offsets, dtype=np.int64)
  return offsets[:-1], offsets[1:]
