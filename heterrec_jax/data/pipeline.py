"""Training and evaluation batches from a prepared dataset folder (SPEC sections 2 and 9).

A batch is a dict of NumPy arrays, the per-process part of the global batch:

  items       int32 [B, L]     item indices, 0 = padding
  tokens      int32 [B, L, S]  `dataset.item_tokens[items]` (row 0 is the padding item)
  timestamps  int32 [B, L]     seconds since the first real event of the row, 0 on padding
  mask        bool  [B, L]     True on real events
  count_from  int32 [B]        (training) the first input position whose query the losses count

Rows are RIGHT-aligned: the most recent event is in the last column, padding on the left.
Training batches have L = max_len + n_step; evaluation batches have L = max_len and also

  target      int32 [B]        the item to retrieve
  valid       bool  [B]        False on the rows that pad the last batch

Training is a Grain pipeline (`train_dataset`): training examples sharded by process, shuffled
each epoch, repeated forever, batched, then one vectorised gather per batch; its iterator has
`get_state`/`set_state` and is checkpointed with the model. A window holds L = max_len + h
events, h = the model's horizon (1 for next-item models, N_step for LMP, 0 for Cloze); the
model reads the first max_len as input. The examples (`window`):

  'all'     every training target of every user once per epoch (SPEC 2): each user's training
            part cut into windows of stride S (`data.stride`, default max_len), the last one's
            input ending just before the last training event (with h > 1 its last h - 1 target
            columns are padding, mask False); a window counts the queries of its last S input
            positions (`count_from`), so S < max_len gives every target more context.
  'last'    one window per user, the most recent L training events (right-aligned).
  'random'  one window per user per epoch, ending at a uniform end point of the training part. Evaluation
(`eval_dataset`) is a plain re-iterable of fixed-size batches, the same count on every process.
Split boundaries come from `splits.py`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import grain
from absl import flags
import numpy as np

from heterrec_jax.config import ConfigError
from heterrec_jax.data import splits
from heterrec_jax.data.dataset import Dataset, DatasetError

WINDOWS = ('all', 'last', 'random')
EVAL_SPLITS = ('valid', 'test')
Batch = dict[str, np.ndarray]
_ENDLESS = 2**62  # batch numbers of the training stream: never exhausted


def windows(dataset: Dataset, starts_B: np.ndarray, ends_B: np.ndarray, length: int) -> Batch:
  """The last `length` events of `[starts_B, ends_B)` (absolute event indices), right-aligned.

  Rows with `starts_B == ends_B` come out as all padding.
  """
  return spans(dataset, ends_B - length, starts_B, ends_B, length)


class _Reloadable:
  """Holds a `Dataset`; pickles as its folder path (Grain workers reload it memory-mapped)
  instead of copying the arrays into every worker process."""

  def __init__(self, dataset: Dataset):
    self.dataset = dataset

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    if (self.dataset.path / 'schema.json').is_file():
      state['dataset'] = self.dataset.path
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    if not isinstance(state['dataset'], Dataset):
      state['dataset'] = Dataset.load(state['dataset'])
    self.__dict__.update(state)


def coverage_windows(split: splits.Split, max_len: int, horizon: int, stride: int = 0,
                     offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user `[E]`, first event index `[E]`, first counted query position `[E]`) of the 'all'
  windows of every training user, `stride` S (0: S = max_len = T) apart, the grid moved by
  `offset` o (0 <= o < S) targets.

  A window of user u starting at event s covers events [s, s + T + h), real where inside the
  training part [start_u, end_u). Its query at input position t predicts event s + t + 1
  (h >= 1; for h = 0, Cloze, the input event s + t itself). The most recent window starts at
  end_u - T - min(h, 1) and counts its last S - o queries (t >= T - S + o); window k = 1, 2,
  ... starts S - o + (k-1) S events earlier and counts its last S queries; the earliest window
  counts all its queries (t >= 0). So every training target is counted in exactly one window,
  and with S < T each one has at least T - S events of context (RecBole's one-prefix-per-target
  protocol is S = 1). Offsets 0..S-1 give each target every context length in [T - S, T)
  (`data.jitter` takes them in turn, one an epoch). The first events of a window may precede
  start_u.
  """
  stride = stride or max_len
  if not 0 <= offset < stride:
    raise ConfigError(f'offset={offset} must be in [0, stride={stride})')
  users = splits.train_users(split)
  start_U, end_U = split.train_start[users], split.train_end[users]
  shift, last = min(horizon, 1), stride - offset
  targets_U = end_U - start_U - shift
  count_U = np.where(targets_U <= max_len, 1,
                     2 + -(-np.maximum(targets_U - last - max_len, 0) // stride))
  user_E = np.repeat(users, count_U)
  k_E = np.arange(count_U.sum()) - np.repeat(np.cumsum(count_U) - count_U, count_U)
  back_E = np.where(k_E > 0, last + (k_E - 1) * stride, 0)
  start_E = np.repeat(end_U, count_U) - max_len - shift - back_E
  earliest_E = k_E == np.repeat(count_U - 1, count_U)
  count_from_E = np.where(earliest_E, 0, np.where(k_E > 0, max_len - stride, max_len - last))
  return user_E.astype(np.int64), start_E.astype(np.int64), count_from_E.astype(np.int32)


def coverage_grids(split: splits.Split, max_len: int, horizon: int, stride: int = 0,
                   jitter: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The 'all' windows of every grid an epoch may take: offset 0 alone, or with `jitter`
  offsets 0..S-1 (`coverage_windows`)."""
  offsets = range(stride or max_len) if jitter else [0]
  return [coverage_windows(split, max_len, horizon, stride, o) for o in offsets]


def spans(dataset: Dataset, first_B: np.ndarray, lo_B: np.ndarray, hi_B: np.ndarray,
          length: int) -> Batch:
  """Events [first_B, first_B + length), real (mask True) where inside [lo_B, hi_B).

  Timestamps are relative to the first real event of the row; padding is 0 everywhere.
  """
  items_E, ts_E = np.asarray(dataset.items), np.asarray(dataset.timestamps)
  pos_BxL = first_B[:, None] + np.arange(length)
  mask_BxL = (pos_BxL >= lo_B[:, None]) & (pos_BxL < hi_B[:, None])
  pos_BxL = np.where(mask_BxL, pos_BxL, 0)
  items_BxL = items_E[pos_BxL] * mask_BxL
  first_real_B = np.clip(np.maximum(first_B, lo_B), 0, max(len(ts_E) - 1, 0))
  ts_BxL = (ts_E[pos_BxL] - ts_E[first_real_B][:, None]).astype(np.int32) * mask_BxL
  tokens_BxLxS = np.take(np.asarray(dataset.item_tokens), items_BxL, axis=0)
  return {'items': items_BxL.astype(np.int32, copy=False), 'tokens': tokens_BxLxS,
          'timestamps': ts_BxL, 'mask': mask_BxL}


class CoverageWindows(_Reloadable):
  """Grain transform: a batch of window ids `[B]` -> a training batch ('all' windows)."""

  def __init__(self, dataset: Dataset, split: splits.Split, windows: tuple[np.ndarray, ...],
               length: int):
    super().__init__(dataset)
    self.lo_U, self.hi_U, self.length = split.train_start, split.train_end, length
    self.user_E, self.start_E, self.count_from_E = windows

  def __call__(self, windows_B: np.ndarray) -> Batch:
    users_B = self.user_E[windows_B]
    batch = spans(self.dataset, self.start_E[windows_B], self.lo_U[users_B],
                  self.hi_U[users_B], self.length)
    return {**batch, 'count_from': self.count_from_E[windows_B]}


class TrainWindows(_Reloadable):
  """Grain transform: a batch of user ids `[B]` -> a training batch of `length` columns.

  Called as `f(users_B)` (the last window of each training part) or, as a Grain random map,
  `f(users_B, rng)` (a window ending at a uniform end point in [2, n_train] of each part).
  """

  def __init__(self, dataset: Dataset, split: splits.Split, length: int):
    super().__init__(dataset)
    self.start_U, self.end_U, self.length = split.train_start, split.train_end, length

  def __call__(self, users_B: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
    starts_B, ends_B = self.start_U[users_B], self.end_U[users_B]
    if rng is not None:
      ends_B = starts_B + rng.integers(splits.MIN_TRAIN_EVENTS, ends_B - starts_B + 1)
    batch = windows(self.dataset, starts_B, ends_B, self.length)
    return {**batch, 'count_from': np.zeros(len(users_B), np.int32)}


class ShuffledExamples:
  """Grain transform: a batch number -> the example ids `[B]` (users or windows) of that batch.

  The stream of examples is epoch after epoch, each epoch in its own seeded order (a
  permutation from `(seed, epoch)`); batch `i` is positions `[i * B, (i + 1) * B)` of that
  stream, so epochs run into each other and no batch is short. `examples` is one array (every
  epoch the same examples) or a list of arrays, one epoch's examples each (`data.jitter`'s
  grids), which the epochs take in turn in a seeded order, every one once in each round of
  `len(examples)` epochs. The order of the current epochs is cached, so a batch costs O(B),
  not O(n_examples).
  """

  def __init__(self, examples: np.ndarray | list[np.ndarray], batch_size: int, seed: int):
    self.blocks = list(examples) if isinstance(examples, (list, tuple)) else [examples]
    self.batch_size, self.seed = batch_size, seed
    self.cycle = np.random.default_rng([seed, len(self.blocks), 1]).permutation(len(self.blocks))
    self.ends = np.cumsum([len(self.blocks[b]) for b in self.cycle])  # of each round's epochs
    self._orders: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_orders': {}}  # workers build their own cache

  def order(self, epoch: int) -> np.ndarray:
    """The examples of `epoch` in their order."""
    if epoch not in self._orders:
      if len(self._orders) >= 4:
        self._orders.pop(min(self._orders))
      block = self.blocks[self.cycle[epoch % len(self.cycle)]]
      rng = np.random.default_rng([self.seed, epoch])
      self._orders[epoch] = block[rng.permutation(len(block))]
    return self._orders[epoch]

  def __call__(self, step: int) -> np.ndarray:
    pos_B = int(step) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    round_B, in_round_B = np.divmod(pos_B, self.ends[-1])
    k_B = np.searchsorted(self.ends, in_round_B, side='right')
    epoch_B = round_B * len(self.cycle) + k_B
    index_B = in_round_B - np.concatenate([[0], self.ends])[k_B]
    examples_B = np.empty(self.batch_size, np.int64)
    for epoch in range(int(epoch_B[0]), int(epoch_B[-1]) + 1):
      rows = epoch_B == epoch
      examples_B[rows] = self.order(epoch)[index_B[rows]]
    return examples_B


def windows_per_epoch(dataset: Dataset, max_len: int, horizon: int, window: str,
                      stride: int = 0, jitter: bool = False) -> int:
  """Training examples in one epoch (all processes): 'all' windows (with `jitter`, the mean
  over its grids, rounded), else training users."""
  split = splits.dataset_split(dataset)
  if window == 'all':
    grids = coverage_grids(split, max_len, horizon, stride, jitter)
    return round(np.mean([len(grid[0]) for grid in grids]))
  return len(splits.train_users(split))


def train_dataset(dataset: Dataset, *, max_len: int, horizon: int, batch_size: int, seed: int,
                  window: str = 'all', stride: int = 0, jitter: bool = False,
                  process_index: int = 0, process_count: int = 1,
                  workers: int = 0) -> grain.IterDataset:
  """The endless, shuffled training batches of this process (`batch_size` rows each), windows
  of `max_len + horizon` events (module docstring).

  The examples ('all': the coverage windows; 'last'/'random': the users with a training
  window, `splits.train_users`) are sharded `[process_index::process_count]` and streamed
  epoch after epoch, each epoch in its own order (`ShuffledExamples`). `jitter` ('all' only)
  moves the windows' grid each epoch: epoch after epoch takes the grids of offsets 0..S-1
  (`coverage_windows`) in a seeded order, so a target is read with a different context in
  each, and each epoch still counts every target once. `window='random'` draws
  each window's end from a generator seeded by `seed` and the batch number (reproducible,
  different in every epoch). `workers > 0` builds batches in that many background processes;
  the batches are the same as with 0.
  """
  _check_train_args(max_len, horizon, batch_size, window, process_index, process_count, workers)
  if not 0 <= seed < 2**32:
    raise ConfigError(f'seed={seed} must be in [0, 2**32)')
  if jitter and window != 'all':
    raise ConfigError(f"jitter=True needs window='all', not {window!r}")
  split = splits.dataset_split(dataset)
  length = max_len + horizon
  if window == 'all':
    if not 0 <= stride <= max_len:
      raise ConfigError(f'stride={stride} must be in [0, max_len={max_len}] (0: max_len)')
    grids = coverage_grids(split, max_len, horizon, stride, jitter)
    coverage = tuple(np.concatenate(parts) for parts in zip(*grids))
    firsts = np.cumsum([0] + [len(grid[0]) for grid in grids])
    examples = [np.arange(lo, hi)[process_index::process_count]
                for lo, hi in zip(firsts[:-1], firsts[1:])]
    gather = CoverageWindows(dataset, split, coverage, length)
  else:
    examples = [splits.train_users(split)[process_index::process_count]]
    gather = TrainWindows(dataset, split, length)
  if not all(len(block) for block in examples):
    raise DatasetError(f'{dataset.path}: no training window for process {process_index} of '
                       f'{process_count} (users need >= {splits.MIN_TRAIN_EVENTS} training events)')
  ds = grain.MapDataset.range(_ENDLESS).seed(seed).map(ShuffledExamples(examples, batch_size, seed))
  ds = ds.random_map(gather) if window == 'random' else ds.map(gather)
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  if workers:
    _allow_unparsed_absl_flags()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ids


def _allow_unparsed_absl_flags() -> None:
  """Grain's `mp_prefetch` reads absl flags, which raise in programs that never parse them
  (ours use argparse; google/grain#1355): their defaults are what we want."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _check_train_args(max_len, horizon, batch_size, window, process_index, process_count,
                      workers) -> None:
  for name, value, least in (('max_len', max_len, 1), ('horizon', horizon, 0),
                             ('batch_size', batch_size, 1), ('workers', workers, 0),
                             ('process_count', process_count, 1)):
    if value < least:
      raise ConfigError(f'{name}={value} must be >= {least}')
  if window not in WINDOWS:
    raise ConfigError(f'window={window!r} is not allowed; use one of {WINDOWS}')
  if not 0 <= process_index < process_count:
    raise ConfigError(f'process_index={process_index} is not in [0, {process_count})')


class EvalBatches:
  """The evaluation batches of one process: re-iterable, `len()` = number of batches."""

  def __init__(self, dataset: Dataset, users: np.ndarray, targets_U: np.ndarray, max_len: int,
               batch_size: int, n_batches: int):
    self.dataset, self.targets_U, self.max_len = dataset, targets_U, max_len
    self.batch_size, self.n_batches = batch_size, n_batches
    self.users = np.full(n_batches * batch_size, -1, np.int64)  # -1: a padding row
    self.users[:len(users)] = users

  def __len__(self) -> int:
    return self.n_batches

  def __iter__(self) -> Iterator[Batch]:
    for b in range(self.n_batches):
      yield self.batch(self.users[b * self.batch_size:(b + 1) * self.batch_size])

  def batch(self, users_B: np.ndarray) -> Batch:
    """The inputs (the `max_len` events before the target) and targets of `users_B`."""
    valid_B = users_B >= 0
    ends_B = np.where(valid_B, self.targets_U[np.maximum(users_B, 0)], 0)
    starts_B = np.where(valid_B, np.asarray(self.dataset.offsets)[np.maximum(users_B, 0)], 0)
    batch = windows(self.dataset, starts_B, ends_B, self.max_len)
    target_B = np.where(valid_B, np.asarray(self.dataset.items)[ends_B], 0).astype(np.int32)
    return {**batch, 'target': target_B, 'valid': valid_B}


def eval_users(dataset: Dataset, split: str, max_users: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(users, target index of every user): the users (ascending) with a `split` target and at
  least one event before it, the first `max_users` of them when `max_users > 0`."""
  if split not in EVAL_SPLITS:
    raise ConfigError(f'split={split!r} is not allowed; use one of {EVAL_SPLITS}')
  targets_U = splits.dataset_split(dataset).target(split)
  users = np.flatnonzero(targets_U > np.asarray(dataset.offsets)[:-1])  # -1 fails too
  return (users[:max_users] if max_users > 0 else users), targets_U


def eval_dataset(dataset: Dataset, *, split: str, max_len: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 max_users: int = 0) -> EvalBatches:
  """The `split` ('valid' or 'test') examples of this process, in fixed-size batches.

  Users are sharded `[process_index::process_count]`; every process yields
  ceil(ceil(n_users / process_count) / batch_size) batches of exactly `batch_size` rows, the
  last ones padded with `valid=False` rows (items 0, mask False, target 0), so a jitted step
  compiles once and hosts stay in lockstep.
  """
  _check_train_args(max_len, 0, batch_size, 'last', process_index, process_count, 0)
  users, targets_U = eval_users(dataset, split, max_users)
  n_batches = math.ceil(math.ceil(len(users) / process_count) / batch_size)
  return EvalBatches(dataset, users[process_index::process_count], targets_U, max_len,
                     batch_size, n_batches)
