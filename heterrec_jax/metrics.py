"""Ranking metrics from target ranks (SPEC section 7): Recall@k, nDCG@k and MRR.

The input is the 0-based rank of each user's held-out target among all candidates (see
`retrieval.target_ranks`). With one relevant item per user (leave-one-out):

  Recall@k = hit rate = [rank < k]
  nDCG@k   = 1 / log2(rank + 2) if rank < k else 0     (the ideal DCG is 1)
  MRR      = 1 / (rank + 1) over the full ranking (no cutoff)

`metrics_from_ranks` returns SUMS over the valid rows plus their 'count', so that batches (and
processes) are combined by adding; `finalize` turns the totals into means. `per_row` gives each
user's own values (the paired comparison of `experiments paired` resamples them).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from heterrec_jax.config import CUTOFFS

COUNT = 'count'


def per_row(rank_B: jax.Array, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, jax.Array]:
  """Every metric of each row (one user) from its target's 0-based rank: float32 arrays of
  `rank_B`'s shape (any), keyed `recall@k`, `ndcg@k` (for each k) and `mrr`."""
  rank_B = jnp.asarray(rank_B).astype(jnp.float32)
  gain_B = 1.0 / jnp.log2(rank_B + 2.0)
  values = {}
  for k in cutoffs:
    hit_B = (rank_B < k).astype(jnp.float32)
    values[f'recall@{k}'] = hit_B
    values[f'ndcg@{k}'] = hit_B * gain_B
  values['mrr'] = 1.0 / (rank_B + 1.0)
  return values


def metrics_from_ranks(rank_B: jax.Array, valid_B: jax.Array,
                       cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, jax.Array]:
  """Sums of every metric (`per_row`) over the rows where `valid_B` is true, plus 'count'.

  Args:
    rank_B: 0-based rank of the target among the candidates (integer or float).
    valid_B: which rows are real users (padding rows of the last batch are False).
    cutoffs: the k of Recall@k and nDCG@k.
  Returns:
    float32 scalars keyed `recall@k`, `ndcg@k` (for each k), `mrr` and `count`.
  """
  valid_B = jnp.asarray(valid_B).astype(bool)
  # Invalid rows may hold anything (even negative ranks): replace them before any log.
  rank_B = jnp.where(valid_B, jnp.asarray(rank_B).astype(jnp.float32), 0.0)
  weight_B = valid_B.astype(jnp.float32)
  sums = {name: jnp.sum(value_B * weight_B) for name, value_B in per_row(rank_B, cutoffs).items()}
  sums[COUNT] = jnp.sum(weight_B)
  return sums


def _report_order(name: str) -> tuple:
  """Sort key: recall@k, ndcg@k by increasing k, then mrr, then any other key by name."""
  kind, _, cutoff = name.partition('@')
  if kind in ('recall', 'ndcg') and cutoff.isdigit():
    return (0, int(cutoff), kind == 'ndcg', '')
  return (1, 0, False, '') if name == 'mrr' else (2, 0, False, name)


def ordered(names) -> list[str]:
  """Metric names in report order, whatever order they came in (a jitted dict comes sorted)."""
  return sorted(names, key=_report_order)


def add(totals: Mapping[str, float], sums: Mapping[str, jax.Array | float]) -> dict[str, float]:
  """`totals + sums` key by key, as Python floats (an empty `totals` starts the count)."""
  out = dict(totals)
  for name, value in sums.items():
    out[name] = out.get(name, 0.0) + float(value)
  return out


def finalize(sums: Mapping[str, jax.Array | float]) -> dict[str, float]:
  """Means of the summed metrics: every key but 'count', divided by 'count'.

  Raises:
    ValueError: when 'count' is missing or zero (no valid row was evaluated).
  """
  count = float(sums.get(COUNT, 0.0))
  if count <= 0:
    raise ValueError(f'cannot average metrics over {count:g} valid rows; the evaluated split '
                     'holds no user (check eval.max_users and the data split)')
  return {name: float(sums[name]) / count for name in ordered(sums) if name != COUNT}


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
  """A Markdown table: one row per named result, one column per metric (`digits` decimals).

  Columns are every metric of any row in report order ('count' is left out); a metric missing
  from a row prints as '-'.
  """
  columns = ordered({name for row in results.values() for name in row} - {COUNT})
  lines = ['| model | ' + ' | '.join(columns) + ' |',
           '|---|' + '---:|' * len(columns)]
  for label, row in results.items():
    cells = [f'{float(row[c]):.{digits}f}' if c in row else '-' for c in columns]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
