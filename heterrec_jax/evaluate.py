"""Full-corpus retrieval evaluation (SPEC section 7) and the `evaluate` command.

    python -m heterrec_jax.evaluate --workdir DIR [--split test|valid|both] [--checkpoint best|latest]
                                    [--by-popularity N]

re-evaluates a saved run and prints its Markdown table beside the popularity floor; with
--by-popularity N, also the metrics within N groups of users split by how often their target
appears in training (where a model wins or loses: head or tail items).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from heterrec_jax import averaging, metrics, retrieval, seen, sharding
from heterrec_jax.config import Config, ConfigError
from heterrec_jax.data import pipeline, splits
from heterrec_jax.data.dataset import Dataset, DatasetError
from heterrec_jax.checkpoint import CheckpointError
from heterrec_jax.run import Run, restore_run
from heterrec_jax.workdir import WorkdirError


NON_FINITE = 'non_finite'  # users whose scores hold NaN or +inf (summed beside the metrics)


class NonFiniteScores(ValueError):
  """The model scored some user's candidates NaN or infinite: an error, never a rank."""


def eval_graphdef(run: Run) -> Any:
  """The graph of the model alone, in evaluation mode (no dropout)."""
  model = run.model()
  model.eval()
  return nnx.split(model)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _item_chunk(graphdef, state, items_N, tokens_NxS):
  vectors, _ = nnx.merge(graphdef, state).encode_items(items_N, tokens_NxS)
  return vectors.astype(jnp.float32)


def item_vectors(graphdef: Any, state: Any, dataset: Dataset, chunk: int) -> jax.Array:
  """V of every item, `[n_items + 1, d_k]`; row 0 (padding) is never a candidate."""
  tokens = np.asarray(dataset.item_tokens)
  n = tokens.shape[0]
  chunk = min(chunk, n)
  out = []
  for start in range(0, n, chunk):
    ids = np.arange(start, start + chunk, dtype=np.int32)
    ids = np.where(ids < n, ids, 0)
    out.append(_item_chunk(graphdef, state, jnp.asarray(ids), jnp.asarray(tokens[ids])))
  return jnp.concatenate(out)[:n]


def _batch_ranks(graphdef, exclude_history, mesh, state, items_NxD, batch) -> jax.Array:
  """The targets' ranks of one batch; with a "model" axis the items are scored shard by shard."""
  model = nnx.merge(graphdef, state)
  user_BxD = model.user_vector(batch['items'], batch['tokens'], batch['timestamps'],
                               batch['mask']).astype(jnp.float32)
  w_K = model.seen_weights()
  seen_BxT = None if w_K is None else seen.last_query_offsets(w_K, batch['items'],
                                                             batch['mask'])
  if mesh is not None and mesh.shape['model'] > 1:
    return retrieval.sharded_target_ranks(mesh, user_BxD, items_NxD, batch['target'],
                                          batch['items'], exclude_history, seen_BxT=seen_BxT)
  return retrieval.target_ranks(user_BxD, items_NxD, batch['target'], batch['items'],
                                exclude_history, seen_BxT)


_rank_step = jax.jit(_batch_ranks, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_step(graphdef, exclude_history, mesh, state, items_NxD, batch):
  """Metric sums of one batch (and the count of users without a finite rank)."""
  rank_B = _batch_ranks(graphdef, exclude_history, mesh, state, items_NxD, batch)
  sums = metrics.metrics_from_ranks(rank_B, batch['valid'])
  no_rank_B = batch['valid'].astype(bool) & (rank_B == retrieval.NO_RANK)
  sums[NON_FINITE] = jnp.sum(no_rank_B, dtype=jnp.float32)
  return sums


def evaluate(run: Run, split: str, state: Any | None = None,
             progress: bool = False) -> dict[str, float]:
  """Recall/nDCG@{10,50,100,200} and MRR of the model in `state` on `split`.

  Ties count against the target (`retrieval.target_ranks`). Raises NonFiniteScores when any
  user's scores are NaN or +inf: a diverged model has no rank, it never reports perfect metrics.
  """
  cfg = run.cfg
  graphdef, state, items_NxD = _scoring(run, state)
  batches = _eval_batches(cfg, run.dataset, split)
  totals: dict[str, float] = {}
  for batch in tqdm(batches, desc=f'eval {split}', disable=not progress, leave=False):
    sums = _eval_step(graphdef, cfg.eval.exclude_history, run.mesh, state, items_NxD,
                      sharding.global_batch(batch, run.mesh))
    totals = metrics.add(totals, sums)
  non_finite = totals.pop(NON_FINITE)
  if non_finite:
    raise _non_finite(non_finite, totals[metrics.COUNT], split)
  return metrics.finalize(totals)


def _scoring(run: Run, state: Any | None) -> tuple[Any, Any, jax.Array]:
  """(eval graph, the model state to score with, every item's vector) of `run`."""
  state = averaging.model_state(run.state if state is None else state)
  graphdef = eval_graphdef(run)
  return graphdef, state, item_vectors(graphdef, state, run.dataset,
                                       run.cfg.eval.item_batch_size)


def _non_finite(count: float, total: float, split: str) -> NonFiniteScores:
  return NonFiniteScores(
      f'the model scores {count:g} of {total:g} {split} users NaN or infinite: its state has '
      'diverged and has no rank to report; train again with a lower optim.lr (or evaluate an '
      'earlier checkpoint)')


def target_ranks(run: Run, split: str, state: Any | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(rank, target) of every user of `split`, int64 `[U]` each, in the order of the split.

  The ranks are `evaluate`'s (ties count against the target); raises NonFiniteScores as it does.
  One process only: the ranks come back to this host.
  """
  cfg = run.cfg
  graphdef, state, items_NxD = _scoring(run, state)
  rows = []
  for batch in tqdm(_eval_batches(cfg, run.dataset, split), desc=f'ranks {split}',
                    disable=not progress, leave=False):
    rank_B = _rank_step(graphdef, cfg.eval.exclude_history, run.mesh, state, items_NxD,
                        sharding.global_batch(batch, run.mesh))
    rows.append(_valid_rows(rank_B, batch))
  rank_U, target_U = _concatenate(rows)
  if np.any(rank_U == retrieval.NO_RANK):
    raise _non_finite(int(np.sum(rank_U == retrieval.NO_RANK)), rank_U.size, split)
  return rank_U, target_U


def _valid_rows(rank_B, batch) -> tuple[np.ndarray, np.ndarray]:
  """(rank, target) of the batch's real users (its padding rows dropped)."""
  valid_B = np.asarray(batch['valid']).astype(bool)
  return np.asarray(rank_B)[valid_B], np.asarray(batch['target'])[valid_B]


def _concatenate(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  ranks, targets = zip(*rows)
  return np.concatenate(ranks).astype(np.int64), np.concatenate(targets).astype(np.int64)


def mean_metrics(rank_U: np.ndarray) -> dict[str, float]:
  """`evaluate`'s metrics of a set of users' ranks (every rank a real user's)."""
  return metrics.finalize(metrics.add({}, metrics.metrics_from_ranks(
      jnp.asarray(rank_U), jnp.ones(len(rank_U), bool))))


def training_counts(dataset: Dataset) -> np.ndarray:
  """Training-event count of every item id, int64 `[n_items + 1]` (validation and test targets
  are not counted; row 0, the padding item, is 0)."""
  items_E = np.asarray(dataset.items)
  train_E = splits.training_events(splits.dataset_split(dataset), items_E.size)
  return retrieval.popularity_scores(items_E[train_E], dataset.schema.n_items).astype(np.int64)


def popularity_groups(count_U: np.ndarray, n_groups: int) -> list[tuple[int, int]]:
  """Bounds `(lo, hi)` (inclusive) of at most `n_groups` ranges of training counts that split
  the users by their target's count into groups of about equal size. Users with the same count
  stay in one group, so fewer groups come back where one count holds many users. The ranges
  cover [min, max] of `count_U` without gaps."""
  if n_groups < 1:
    raise ValueError(f'n_groups={n_groups} must be >= 1')
  values, users = np.unique(np.asarray(count_U), return_counts=True)
  groups, lo, i, left = [], None, 0, int(users.sum())
  while i < values.size:
    # Take counts in ascending order until this group holds its share of the users left.
    share = left / (n_groups - len(groups))
    taken = 0
    while i < values.size and (taken < share or len(groups) == n_groups - 1):
      taken += int(users[i])
      i += 1
    groups.append((int(values[0]) if lo is None else lo, int(values[i - 1])))
    lo, left = int(values[i - 1]) + 1, left - taken
  return groups


def metrics_by_popularity(rank_U: np.ndarray, target_U: np.ndarray, counts_N: np.ndarray,
                          n_groups: int) -> dict[str, dict[str, float]]:
  """`evaluate`'s metrics within each group of `popularity_groups` over the targets' training
  counts, keyed 'targets with lo-hi training events'; each adds 'users', its share of users."""
  count_U = np.asarray(counts_N)[target_U]
  out = {}
  for lo, hi in popularity_groups(count_U, n_groups):
    in_group_U = (count_U >= lo) & (count_U <= hi)
    row = mean_metrics(rank_U[in_group_U])
    row['users'] = float(in_group_U.mean())
    out[f'targets with {lo}-{hi} training events'] = row
  return out


def _eval_batches(cfg: Config, dataset: Dataset, split: str):
  per_process = cfg.eval.batch_size // jax.process_count()
  return pipeline.eval_dataset(
      dataset, split=split, max_len=cfg.data.max_len, batch_size=per_process,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_users=cfg.eval.max_users)


def popularity(cfg: Config, dataset: Dataset, split: str) -> dict[str, float]:
  """The floor: every user gets the items ranked by their training-event counts (validation
  and test targets are not counted)."""
  return mean_metrics(popularity_target_ranks(cfg, dataset, split)[0])


def popularity_target_ranks(cfg: Config, dataset: Dataset,
                            split: str) -> tuple[np.ndarray, np.ndarray]:
  """(rank, target) of every user of `split` under the popularity floor, as `target_ranks`."""
  scores = jnp.asarray(training_counts(dataset), jnp.float32)
  return _concatenate([
      _valid_rows(_popularity_ranks(scores, jnp.asarray(batch['target']),
                                    jnp.asarray(batch['items']), cfg.eval.exclude_history),
                  batch)
      for batch in _eval_batches(cfg, dataset, split)])


_popularity_ranks = jax.jit(retrieval.popularity_ranks, static_argnums=(3,))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--split', default='both', choices=('valid', 'test', 'both'))
  parser.add_argument('--checkpoint', default='best', choices=('best', 'latest'),
                      help='which saved state to evaluate (best falls back to latest)')
  parser.add_argument('--by-popularity', type=int, default=0, metavar='N',
                      help='also print the metrics within N groups of users of about equal '
                           'size, split by how many training events their target has (the '
                           'popularity floor beside each); 0 (default): off')
  args = parser.parse_args(argv)
  if args.by_popularity < 0:
    parser.error(f'--by-popularity must be >= 0 (0: off); got {args.by_popularity}')
  sharding.maybe_initialize_distributed()
  if args.by_popularity and jax.process_count() > 1:
    print(f'error: --by-popularity gathers every user\'s rank on one host; run it in one '
          f'process (this job has {jax.process_count()})', file=sys.stderr)
    return 2
  try:
    run = restore_run(pathlib.Path(args.workdir), args.checkpoint)
    splits = ('valid', 'test') if args.split == 'both' else (args.split,)
    results, floor, groups = {}, {}, {}
    for s in splits:
      if args.by_popularity:  # one pass per split: the whole split's metrics from the same ranks
        results[s], floor[s], groups[s] = _by_popularity(run, s, args.by_popularity)
      else:
        results[s] = evaluate(run, s, progress=True)
        floor[s] = popularity(run.cfg, run.dataset, s)
  except (ConfigError, DatasetError, CheckpointError, NonFiniteScores, WorkdirError,
          OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(metrics.format_table({**{f'{run.cfg.model.name} ({s})': r for s, r in results.items()},
                              **{f'popularity ({s})': r for s, r in floor.items()}}))
  for s, table in groups.items():
    print(f'\n{s}, by the target\'s training events (users: the group\'s share of the split)')
    print(metrics.format_table(table))
  print(json.dumps(results))
  return 0


def _by_popularity(run: Run, split: str, n_groups: int):
  """(the model's metrics, the popularity floor's, the table of both within each popularity
  group of `split`), all from one set of per-user ranks of each."""
  counts_N = training_counts(run.dataset)
  model_ranks = target_ranks(run, split, progress=True)
  floor_ranks = popularity_target_ranks(run.cfg, run.dataset, split)
  model = metrics_by_popularity(*model_ranks, counts_N, n_groups)
  floor = metrics_by_popularity(*floor_ranks, counts_N, n_groups)
  table = {}
  for group in model:
    table[f'{run.cfg.model.name}, {group}'] = model[group]
    table[f'popularity, {group}'] = floor[group]
  return mean_metrics(model_ranks[0]), mean_metrics(floor_ranks[0]), table


if __name__ == '__main__':
  sys.exit(main())
