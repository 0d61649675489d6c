"""Full-corpus retrieval evaluation (SPEC section 7) and the `evaluate` command.

    python -m heterrec_jax.evaluate --workdir DIR [--split test|valid|both] [--checkpoint best|latest]

re-evaluates a saved run and prints its Markdown table beside the popularity floor.
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

from heterrec_jax import averaging, metrics, retrieval, sharding
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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_step(graphdef, exclude_history, mesh, state, items_NxD, batch):
  """Metric sums of one batch; with a "model" axis the items are scored shard by shard."""
  model = nnx.merge(graphdef, state)
  user_BxD = model.user_vector(batch['items'], batch['tokens'], batch['timestamps'],
                               batch['mask']).astype(jnp.float32)
  if mesh is not None and mesh.shape['model'] > 1:
    rank_B = retrieval.sharded_target_ranks(mesh, user_BxD, items_NxD, batch['target'],
                                            batch['items'], exclude_history)
  else:
    rank_B = retrieval.target_ranks(user_BxD, items_NxD, batch['target'],
                                    batch['items'], exclude_history)
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
  state = averaging.model_state(run.state if state is None else state)
  graphdef = eval_graphdef(run)
  items_NxD = item_vectors(graphdef, state, run.dataset, cfg.eval.item_batch_size)
  batches = _eval_batches(cfg, run.dataset, split)
  totals: dict[str, float] = {}
  for batch in tqdm(batches, desc=f'eval {split}', disable=not progress, leave=False):
    sums = _eval_step(graphdef, cfg.eval.exclude_history, run.mesh, state, items_NxD,
                      sharding.global_batch(batch, run.mesh))
    totals = metrics.add(totals, sums)
  non_finite = totals.pop(NON_FINITE)
  if non_finite:
    raise NonFiniteScores(
        f'the model scores {non_finite:g} of {totals[metrics.COUNT]:g} {split} users NaN or '
        'infinite: its state has diverged and has no rank to report; train again with a '
        'lower optim.lr (or evaluate an earlier checkpoint)')
  return metrics.finalize(totals)


def _eval_batches(cfg: Config, dataset: Dataset, split: str):
  per_process = cfg.eval.batch_size // jax.process_count()
  return pipeline.eval_dataset(
      dataset, split=split, max_len=cfg.data.max_len, batch_size=per_process,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_users=cfg.eval.max_users)


def popularity(cfg: Config, dataset: Dataset, split: str) -> dict[str, float]:
  """The floor: every user gets the items ranked by their training-event counts (validation
  and test targets are not counted)."""
  items_E = np.asarray(dataset.items)
  train_E = splits.training_events(splits.dataset_split(dataset), items_E.size)
  scores = retrieval.popularity_scores(items_E[train_E], dataset.schema.n_items)
  scores = jnp.asarray(scores, jnp.float32)
  totals: dict[str, float] = {}
  for batch in _eval_batches(cfg, dataset, split):
    rank = _popularity_ranks(scores, jnp.asarray(batch['target']), jnp.asarray(batch['items']),
                             cfg.eval.exclude_history)
    totals = metrics.add(totals, metrics.metrics_from_ranks(rank, jnp.asarray(batch['valid'])))
  return metrics.finalize(totals)


_popularity_ranks = jax.jit(retrieval.popularity_ranks, static_argnums=(3,))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--split', default='both', choices=('valid', 'test', 'both'))
  parser.add_argument('--checkpoint', default='best', choices=('best', 'latest'),
                      help='which saved state to evaluate (best falls back to latest)')
  args = parser.parse_args(argv)
  sharding.maybe_initialize_distributed()
  try:
    run = restore_run(pathlib.Path(args.workdir), args.checkpoint)
    splits = ('valid', 'test') if args.split == 'both' else (args.split,)
    results = {s: evaluate(run, s, progress=True) for s in splits}
    floor = {s: popularity(run.cfg, run.dataset, s) for s in splits}
  except (ConfigError, DatasetError, CheckpointError, NonFiniteScores, WorkdirError,
          OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(metrics.format_table({**{f'{run.cfg.model.name} ({s})': r for s, r in results.items()},
                              **{f'popularity ({s})': r for s, r in floor.items()}}))
  print(json.dumps(results))
  return 0


if __name__ == '__main__':
  sys.exit(main())
