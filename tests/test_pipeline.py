"""pipeline.py against slow per-row Python references on a small random dataset."""

import math

import numpy as np
import pytest

from heterrec_jax.config import ConfigError
from heterrec_jax.data import pipeline, splits
from heterrec_jax.data.dataset import Dataset, Feature, Schema, write_dataset

N_USERS, N_ITEMS, MAX_LEN, N_STEP = 50, 1000, 6, 2
CUTOFF = 1_000_500


def make_dataset(folder, split) -> Dataset:
  """Random users (lengths 1..25, plus a user entirely after CUTOFF), ties in time included."""
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(1, 26, N_USERS - 1), [4]])
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ts = [np.sort(rng.integers(1_000_000, 1_001_000, n)) for n in lengths[:-1]]
  ts.append(np.array([CUTOFF + 1, CUTOFF + 2, CUTOFF + 2, CUTOFF + 9]))
  tokens = np.concatenate([[0], rng.permutation(N_ITEMS) + 2]).astype(np.int32)[:, None]
  schema = Schema(features=(Feature('item_id', 'categorical', 0, 1, N_ITEMS + 2),),
                  n_users=N_USERS, n_items=N_ITEMS, n_events=int(offsets[-1]), split=split)
  arrays = {'offsets': offsets, 'timestamps': np.concatenate(ts).astype(np.int64),
            'items': rng.integers(1, N_ITEMS + 1, offsets[-1]).astype(np.int32),
            'item_tokens': tokens}
  return Dataset.load(write_dataset(folder, schema=schema, arrays=arrays, texts={}, jsons={}))


@pytest.fixture(scope='module', params=['loo', 'time'])
def dataset(request, tmp_path_factory):
  split = {'kind': 'loo'} if request.param == 'loo' else {'kind': 'time', 'cutoff': CUTOFF}
  return make_dataset(tmp_path_factory.mktemp(request.param) / 'ds', split)


@pytest.fixture(scope='module')
def loo(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('loo') / 'ds', {'kind': 'loo'})


def ref_window(ds, lo, end, length):
  """One right-aligned row, built event by event."""
  events = list(range(max(lo, end - length), end))
  pad = length - len(events)
  items = [0] * pad + [int(ds.items[e]) for e in events]
  ts = [0] * pad + [int(ds.timestamps[e] - ds.timestamps[events[0]]) for e in events]
  return {'items': np.array(items), 'tokens': ds.item_tokens[np.array(items)],
          'timestamps': np.array(ts), 'mask': np.array([False] * pad + [True] * len(events))}


def ref_train_users(ds):
  """(user, lo, train_end) of users with >= 2 training events, by the split's definition."""
  out = []
  for u in range(ds.schema.n_users):
    lo, hi = int(ds.offsets[u]), int(ds.offsets[u + 1])
    if ds.schema.split['kind'] == 'loo':
      valid = hi - 2 if hi - lo >= 2 else -1
    else:
      before = [e for e in range(lo, hi) if ds.timestamps[e] < CUTOFF]
      valid = before[-1] if before else -1
    if valid - lo >= 2:
      out.append((u, lo, valid))
  return out


def ref_eval(ds, split):
  """(user, target event) of users with a target and >= 1 event before it."""
  out = []
  for u in range(ds.schema.n_users):
    lo, hi = int(ds.offsets[u]), int(ds.offsets[u + 1])
    if ds.schema.split['kind'] == 'loo':
      target = hi - 1 if split == 'test' else hi - 2
    else:
      after = [e for e in range(lo, hi) if ds.timestamps[e] >= CUTOFF]
      before = [e for e in range(lo, hi) if ds.timestamps[e] < CUTOFF]
      target = (after[0] if after else -1) if split == 'test' else (before[-1] if before else -1)
    if target > lo:
      out.append((u, target))
  return out


def rows(batch):
  """The rows of a batch as hashable keys (items, timestamps, mask, tokens)."""
  keys = ('items', 'timestamps', 'mask', 'tokens')
  return [tuple(np.asarray(batch[k][i], np.int64).tobytes() for k in keys)
          for i in range(len(batch['items']))]


def assert_row(batch, i, want):
  for k, v in want.items():
    np.testing.assert_array_equal(batch[k][i], v, err_msg=k)


def train_ds(ds, **kw):
  args = dict(max_len=MAX_LEN, horizon=N_STEP, batch_size=8, seed=0, window='last')
  return pipeline.train_dataset(ds, **{**args, **kw})


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_windows_match_reference(loo):
  rng = np.random.default_rng(1)
  n = loo.schema.n_events
  starts = rng.integers(0, n + 1, 40)
  ends = np.minimum(starts + rng.integers(0, 15, 40), n)
  ends[:3] = starts[:3]  # empty rows
  got = pipeline.windows(loo, starts, ends, 7)
  assert got['items'].dtype == np.int32 and got['timestamps'].dtype == np.int32
  assert got['tokens'].shape == (40, 7, 1) and got['mask'].dtype == bool
  for i in range(40):
    assert_row(got, i, ref_window(loo, starts[i], ends[i], 7))


def test_last_windows_one_epoch(dataset):
  """The first epoch of the stream is every training user's last window, once."""
  users = ref_train_users(dataset)
  want = sorted(r for u, lo, end in users
                for r in rows({k: v[None] for k, v in
                               ref_window(dataset, lo, end, MAX_LEN + N_STEP).items()}))
  assert len(set(want)) == len(want)  # distinct users have distinct windows here
  batches = take(iter(train_ds(dataset)), math.ceil(2 * len(users) / 8))
  got = [r for b in batches for r in rows(b)]
  assert sorted(got[:len(users)]) == want
  assert sorted(got[len(users):2 * len(users)]) == want
  assert got[:len(users)] != got[len(users):2 * len(users)]  # reshuffled each epoch
  b = batches[0]
  assert b['items'].shape == (8, MAX_LEN + N_STEP) and b['tokens'].shape == (8, MAX_LEN + N_STEP, 1)
  np.testing.assert_array_equal(b['tokens'][..., 0], dataset.item_tokens[b['items']][..., 0])


def test_random_windows(loo):
  """Each row is the window ending at some end point in [lo + 2, train_end]; the end varies."""
  candidates = {}
  for _, lo, end in ref_train_users(loo):
    for k in range(lo + 2, end + 1):
      row = ref_window(loo, lo, k, MAX_LEN + N_STEP)
      candidates.setdefault(rows({key: v[None] for key, v in row.items()})[0], (lo, k, end))
  seen: dict[tuple[int, int], set] = {}
  for b in take(iter(train_ds(loo, window='random', batch_size=16)), 30):
    for row in rows(b):
      assert row in candidates, 'a row is no window of any training part'
      lo, k, end = candidates[row]
      seen.setdefault((lo, end), set()).add(k)
  assert any(len(ends) > 2 for ends in seen.values())
  assert any(min(ends) == lo + 2 for (lo, _), ends in seen.items())  # both bounds are drawn
  assert any(max(ends) == end for (_, end), ends in seen.items())


def test_train_transform_matches_reference(loo):
  users = ref_train_users(loo)
  split = splits.dataset_split(loo)
  gather = pipeline.TrainWindows(loo, split, 5)
  got = gather(np.array([u for u, _, _ in users]))
  for i, (_, lo, end) in enumerate(users):
    assert_row(got, i, ref_window(loo, lo, end, 5))


def test_shuffled_users_epochs():
  users = np.arange(10, 17)
  stream = np.concatenate([pipeline.ShuffledExamples(users, 3, seed=4)(s) for s in range(7)])
  epochs = stream.reshape(3, 7)
  for e in epochs:
    assert sorted(e) == users.tolist()
  assert len({tuple(e) for e in epochs}) == 3
  one = pipeline.ShuffledExamples(users, 1, seed=4)  # the stream does not depend on B
  big = pipeline.ShuffledExamples(users, 20, seed=4)  # a batch longer than an epoch
  np.testing.assert_array_equal(big(1), [one(s)[0] for s in range(20, 40)])
  np.testing.assert_array_equal(stream, [one(s)[0] for s in range(21)])


@pytest.mark.parametrize('window,jitter', [(w, False) for w in pipeline.WINDOWS] + [('all', True)])
def test_checkpoint_resume(loo, window, jitter):
  it = iter(train_ds(loo, window=window, jitter=jitter, stride=2 if jitter else 0))
  take(it, 5)
  state = it.get_state()
  want = take(it, 9)  # crosses an epoch boundary
  again = iter(train_ds(loo, window=window, jitter=jitter, stride=2 if jitter else 0))
  again.set_state(state)
  assert_same_batches(take(again, 9), want)


@pytest.mark.parametrize('window', pipeline.WINDOWS)
def test_deterministic_seed(loo, window):
  a = take(iter(train_ds(loo, window=window, seed=3)), 6)
  assert_same_batches(a, take(iter(train_ds(loo, window=window, seed=3)), 6))
  b = take(iter(train_ds(loo, window=window, seed=4)), 6)
  assert any(not np.array_equal(x['items'], y['items']) for x, y in zip(a, b))


@pytest.mark.parametrize('count', [2, 3])
def test_process_shards(dataset, count):
  """Each process's first epoch: the shards are disjoint and together cover the users."""
  users = ref_train_users(dataset)
  want = sorted(r for _, lo, end in users
                for r in rows({k: v[None] for k, v in
                               ref_window(dataset, lo, end, MAX_LEN + N_STEP).items()}))
  got = []
  for p in range(count):
    n = len(users[p::count])
    batches = take(iter(train_ds(dataset, process_index=p, process_count=count, batch_size=4)),
                   math.ceil(n / 4))
    got += [r for b in batches for r in rows(b)][:n]
  assert sorted(got) == want


def test_workers_match_in_process(loo):
  want = take(iter(train_ds(loo, window='random')), 4)
  it = iter(train_ds(loo, window='random', workers=1))
  try:
    assert_same_batches(take(it, 4), want)
  finally:
    it.close()


@pytest.mark.parametrize('split', pipeline.EVAL_SPLITS)
def test_eval_examples(dataset, split):
  want = ref_eval(dataset, split)
  batches = pipeline.eval_dataset(dataset, split=split, max_len=MAX_LEN, batch_size=8)
  assert len(batches) == math.ceil(len(want) / 8)
  got = list(batches)
  assert len(got) == len(batches)
  valid = np.concatenate([b['valid'] for b in got])
  assert valid.sum() == len(want) and valid[:len(want)].all()
  for r, (u, target) in enumerate(want):
    b, i = got[r // 8], r % 8
    assert_row(b, i, ref_window(dataset, int(dataset.offsets[u]), target, MAX_LEN))
    assert b['target'][i] == dataset.items[target]
  last = got[-1]
  for k in ('items', 'timestamps', 'mask', 'target', 'tokens'):
    assert not last[k][~last['valid']].any(), k
  assert all(b['items'].shape == (8, MAX_LEN) and b['target'].dtype == np.int32 for b in got)


def test_time_split_skips_user_without_input(tmp_path):
  ds = make_dataset(tmp_path / 'ds', {'kind': 'time', 'cutoff': CUTOFF})
  users, targets = pipeline.eval_users(ds, 'test')
  assert targets[N_USERS - 1] == ds.offsets[N_USERS - 1]  # a test target with nothing before
  assert N_USERS - 1 not in users


@pytest.mark.parametrize('count', [2, 3])
def test_eval_process_shards(loo, count):
  want = ref_eval(loo, 'test')[:29]
  per = [pipeline.eval_dataset(loo, split='test', max_len=MAX_LEN, batch_size=4,
                               process_index=p, process_count=count, max_users=29)
         for p in range(count)]
  assert {len(b) for b in per} == {math.ceil(math.ceil(29 / count) / 4)}
  for p, batches in enumerate(per):
    got = list(batches)
    valid = np.concatenate([b['valid'] for b in got])
    mine = want[p::count]
    assert valid.sum() == len(mine)
    for r, (u, target) in enumerate(mine):
      assert_row(got[r // 4], r % 4, ref_window(loo, int(loo.offsets[u]), target, MAX_LEN))


def test_bad_arguments(loo):
  with pytest.raises(ConfigError, match='window'):
    train_ds(loo, window='first')
  with pytest.raises(ConfigError, match='process_index'):
    train_ds(loo, process_index=2, process_count=2)
  with pytest.raises(ConfigError, match='split'):
    pipeline.eval_dataset(loo, split='train', max_len=4, batch_size=2)


def ref_coverage_targets(ds, horizon):
  """Every (user, target event) a next-item (h >= 1) or Cloze (h = 0) model is trained on."""
  first = 1 if horizon else 0
  return sorted((u, e) for u, lo, end in ref_train_users(ds) for e in range(lo + first, end))


@pytest.mark.parametrize('horizon,stride,offset', [(0, 0, 0), (1, 0, 0), (3, 0, 0), (1, 2, 0),
                                                   (0, 1, 0), (3, 4, 0), (1, 0, 5), (0, 0, 2),
                                                   (1, 2, 1), (3, 4, 3), (0, 4, 1)])
def test_all_windows_cover_every_target_once(dataset, horizon, stride, offset):
  """One epoch of 'all' windows: every training target counted exactly once (a window counts
  its queries from `count_from` on), inputs right-aligned (the last input column of every
  window is a real event), rows equal to a slow reference; with a stride S < T every counted
  target but a user's first T has >= T - S events of context in its window; the same for a
  grid moved by an offset (`data.jitter`)."""
  split = splits.dataset_split(dataset)
  coverage = pipeline.coverage_windows(split, MAX_LEN, horizon, stride, offset)
  user_E, start_E, count_from_E = coverage
  length = MAX_LEN + horizon
  got = []
  for w, (u, s, first) in enumerate(zip(user_E, start_E, count_from_E)):
    lo, end = int(split.train_start[u]), int(split.train_end[u])
    events = [e for e in range(s, s + length)]
    real = [lo <= e < end for e in events]
    assert real[MAX_LEN - 1], 'the input must end at a real event'
    shift = 1 if horizon else 0
    # A target counts where it and (h >= 1) the input before it are real, as in the losses,
    # and its query position is >= count_from.
    counted = [(q, events[q + shift]) for q in range(first, MAX_LEN)
               if real[q + shift] and real[q]]
    got += [(int(u), e) for _, e in counted]
    if first > 0:
      assert all(q >= MAX_LEN - (stride or MAX_LEN) for q, _ in counted)
    batch = pipeline.CoverageWindows(dataset, split, coverage, length)(np.array([w]))
    assert batch['count_from'][0] == first
    first = next(e for e, r in zip(events, real) if r)
    want_items = [int(dataset.items[e]) if r else 0 for e, r in zip(events, real)]
    want_ts = [int(dataset.timestamps[e] - dataset.timestamps[first]) if r else 0
               for e, r in zip(events, real)]
    np.testing.assert_array_equal(batch['items'][0], want_items)
    np.testing.assert_array_equal(batch['timestamps'][0], want_ts)
    np.testing.assert_array_equal(batch['mask'][0], real)
  assert sorted(got) == ref_coverage_targets(dataset, horizon)


def test_all_windows_one_epoch_in_the_stream(loo):
  """The first epoch of the 'all' stream is every window once (then the next epoch)."""
  split = splits.dataset_split(loo)
  coverage = pipeline.coverage_windows(split, MAX_LEN, N_STEP)
  n = len(coverage[0])
  want = sorted(r for w in range(n) for r in rows(pipeline.CoverageWindows(
      loo, split, coverage, MAX_LEN + N_STEP)(np.array([w]))))
  batches = take(iter(train_ds(loo, window='all', batch_size=n)), 2)
  assert sorted(rows(batches[0])) == want
  assert batches[0]['items'].shape == (n, MAX_LEN + N_STEP)
  assert sorted(rows(batches[1])) == want  # the second epoch: the same windows, another order
  assert rows(batches[1]) != rows(batches[0])
  assert pipeline.windows_per_epoch(loo, MAX_LEN, N_STEP, 'all') == n


def test_jitter_takes_every_grid_once_a_round(loo):
  """`jitter`: one round of S epochs (batch 1) is the windows of the grids of offsets
  0..S-1, each exactly once; the grids differ, so targets are read with other contexts."""
  stride, horizon = 3, 1
  split = splits.dataset_split(loo)
  grids = [pipeline.coverage_windows(split, MAX_LEN, horizon, stride, o) for o in range(stride)]
  sizes = [len(g[0]) for g in grids]
  assert len(set(sizes)) > 1  # the offsets give epochs of different sizes
  gather = pipeline.CoverageWindows(loo, split, tuple(np.concatenate(p) for p in zip(*grids)),
                                    MAX_LEN + horizon)
  want = sorted(rows(gather(np.arange(sum(sizes)))))
  assert sorted(rows(gather(np.arange(sizes[0])))) != sorted(
      rows(gather(np.arange(sizes[0], sizes[0] + sizes[1]))))
  it = iter(train_ds(loo, window='all', horizon=horizon, stride=stride, batch_size=1,
                     jitter=True))
  got = sorted(r for b in take(it, sum(sizes)) for r in rows(b))
  assert got == want
  mean = pipeline.windows_per_epoch(loo, MAX_LEN, horizon, 'all', stride, jitter=True)
  assert mean == round(np.mean(sizes))


def test_shuffled_examples_over_several_blocks():
  """Blocks of examples (`jitter`'s grids): each epoch is a permutation of one block, every
  block once in a round, the rounds in the same block order; the stream does not depend on
  the batch size."""
  blocks = [np.arange(5), np.arange(5, 8), np.arange(8, 15)]
  one = pipeline.ShuffledExamples(blocks, 1, seed=4)
  stream = [int(one(s)[0]) for s in range(2 * 15)]
  epochs, pos = [], 0
  while pos < len(stream):
    block = next(b for b in blocks if stream[pos] in b)
    epochs.append(stream[pos:pos + len(block)])
    assert sorted(epochs[-1]) == block.tolist()
    pos += len(block)
  which = [next(i for i, b in enumerate(blocks) if e[0] in b) for e in epochs]
  assert sorted(which[:3]) == [0, 1, 2] and which[3:] == which[:3]
  assert epochs[3:] != epochs[:3]  # each epoch its own order
  big = pipeline.ShuffledExamples(blocks, 7, seed=4)
  np.testing.assert_array_equal(np.concatenate([big(s) for s in range(3)]), stream[:21])


def test_jitter_needs_all_windows(loo):
  with pytest.raises(ConfigError, match="jitter=True needs window='all'"):
    train_ds(loo, window='last', jitter=True)
  with pytest.raises(ConfigError, match=r'offset=3 must be in \[0, stride=3\)'):
    pipeline.coverage_windows(splits.dataset_split(loo), MAX_LEN, 1, 3, 3)
