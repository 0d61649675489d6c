"""Two models on the same users: each metric's relative difference with a paired bootstrap over
the users (`python -m heterrec_jax.experiments paired`).

    python -m heterrec_jax.experiments paired --a runs/het_s0 runs/het_s1 runs/het_s2 \\
        --b runs/sas_s0 runs/sas_s1 runs/sas_s2 --labels HeterRec,SASRec [--split test]

Each side is one or more finished runs (its seeds): every run's best checkpoint ranks the
split's users (`evaluate.target_ranks`), each user's metric is averaged over the side's runs,
and the difference of the two sides' means is reported with an interval from resampling the
users with replacement, the same users for both sides (so what both models find hard cancels).
The interval is over users only: it says how much the figure would move on another draw of
users like these, not on other seeds (`experiments compare` gives the seeds' spread; here more
seeds per side shrink the seeds' share of the difference).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from heterrec_jax import evaluate, metrics, run as run_lib
from heterrec_jax.checkpoint import CheckpointError
from heterrec_jax.config import CUTOFFS, ConfigError
from heterrec_jax.data.dataset import DatasetError
from heterrec_jax.workdir import WorkdirError

CHUNK = 256  # resamples drawn at once: a [CHUNK, users] index array


class MismatchedRuns(ValueError):
  """The runs compared do not rank the same users' targets (other data, split or max_users)."""


@dataclasses.dataclass(frozen=True)
class PairedDiff:
  """One metric: both sides' means over the users, `a / b - 1`, its bootstrap interval and the
  share of resamples where side A's mean is above side B's."""
  a: float
  b: float
  relative: float
  low: float
  high: float
  a_ahead: float


def user_values(rank_RU: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, np.ndarray]:
  """Each metric of each user averaged over runs: float64 `[U]` arrays from the ranks `[R, U]`
  of R runs on the same users (`metrics.per_row`)."""
  rank_RU = np.asarray(rank_RU)
  if rank_RU.ndim != 2 or rank_RU.shape[0] < 1:
    raise ValueError(f'ranks must be [runs >= 1, users]; got shape {rank_RU.shape}')
  return {name: np.asarray(value_RU, np.float64).mean(axis=0)
          for name, value_RU in metrics.per_row(rank_RU, cutoffs).items()}


def paired_bootstrap(a_U: np.ndarray, b_U: np.ndarray, resamples: int, seed: int = 0,
                     level: float = 0.95) -> PairedDiff:
  """`mean(a) / mean(b) - 1` and its percentile interval at `level` over `resamples` draws of
  the users with replacement (resample r takes users `rng.integers(0, U, U)`, the r-th draw of
  `np.random.default_rng(seed)`, for both sides). Undefined ratios (a side-B mean of 0) are NaN,
  and so is an interval that holds one."""
  a_U, b_U = np.asarray(a_U, np.float64), np.asarray(b_U, np.float64)
  if a_U.shape != b_U.shape or a_U.ndim != 1 or a_U.size == 0:
    raise ValueError(f'a and b must be the same users\' values, [U >= 1]; got {a_U.shape} and '
                     f'{b_U.shape}')
  problem = resampling_problem(resamples, level)
  if problem:
    raise ValueError(problem)
  rng = np.random.default_rng(seed)
  users = a_U.size
  relative_R, ahead_R = [], []
  for start in range(0, resamples, CHUNK):
    draw_CU = rng.integers(0, users, size=(min(CHUNK, resamples - start), users))
    mean_a_C, mean_b_C = a_U[draw_CU].mean(axis=1), b_U[draw_CU].mean(axis=1)
    relative_R.append(_relative(mean_a_C, mean_b_C))
    ahead_R.append(mean_a_C > mean_b_C)
  relative_R = np.concatenate(relative_R)
  tail = (1.0 - level) / 2.0
  if np.isnan(relative_R).any():
    low = high = math.nan
  else:
    low, high = (float(q) for q in np.quantile(relative_R, [tail, 1.0 - tail]))
  return PairedDiff(a=float(a_U.mean()), b=float(b_U.mean()),
                    relative=float(_relative(a_U.mean(), b_U.mean())), low=low, high=high,
                    a_ahead=float(np.concatenate(ahead_R).mean()))


def resampling_problem(resamples: int, level: float) -> str | None:
  """What is wrong with a bootstrap's resample count or interval level, or None."""
  if resamples < 1:
    return f'resamples={resamples} must be >= 1'
  if not 0.0 < level < 1.0:
    return f'level={level} must be in (0, 1)'
  return None


def _relative(a, b):
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(b > 0, np.asarray(a) / np.where(b > 0, b, 1.0) - 1.0, np.nan)


def compare_sides(rank_a_RU: np.ndarray, rank_b_RU: np.ndarray, resamples: int, seed: int = 0,
                  level: float = 0.95) -> dict[str, PairedDiff]:
  """`paired_bootstrap` of every metric, side A's runs against side B's, on the same users
  (the same draws of users for every metric)."""
  a, b = user_values(rank_a_RU), user_values(rank_b_RU)
  return {name: paired_bootstrap(a[name], b[name], resamples, seed, level)
          for name in metrics.ordered(a)}


def ranks_of_runs(workdirs: Sequence[pathlib.Path], split: str,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(ranks `[R, U]`, targets `[U]`) of the runs' best checkpoints on `split`; raises
  MismatchedRuns when two runs do not rank the same targets in the same order."""
  ranks, first = [], None
  for workdir in tqdm(workdirs, desc=f'ranking {split}', disable=not progress, leave=False):
    rank_U, target_U = evaluate.target_ranks(run_lib.restore_run(workdir, 'best'), split)
    if first is None:
      first = (workdir, target_U)
    elif not np.array_equal(target_U, first[1]):
      raise MismatchedRuns(
          f'{workdir} ranks other {split} targets than {first[0]} ({target_U.size} users '
          f'against {first[1].size}): compare runs trained on the same prepared dataset with '
          'the same eval.max_users')
    ranks.append(rank_U)
  return np.stack(ranks), first[1]


def markdown(diffs: dict[str, PairedDiff], labels: tuple[str, str], level: float) -> str:
  a, b = labels
  lines = [f'| metric | {a} | {b} | {a} vs {b} | {level:.0%} interval (users) | '
           f'resamples with {a} ahead |', '|---|---:|---:|---:|---:|---:|']
  for name, d in diffs.items():
    interval = '-' if math.isnan(d.low) else f'{d.low:+.1%} to {d.high:+.1%}'
    relative = '-' if math.isnan(d.relative) else f'{d.relative:+.1%}'
    lines.append(f'| {name} | {d.a:.4f} | {d.b:.4f} | {relative} | {interval} | '
                 f'{d.a_ahead:.1%} |')
  return '\n'.join(lines)


def _bad_flags(args) -> str | None:
  """What is wrong with the command's flags, or None."""
  if not args.labels or len(args.labels.split(',')) != 2 or not all(args.labels.split(',')):
    return f'--labels takes two names, A,B; got {args.labels!r}'
  problem = resampling_problem(args.resamples, args.level)
  if problem:
    return f'--{problem}'
  if args.out and pathlib.Path(args.out).is_dir():
    return f'--out {args.out} is a folder; name a file (e.g. {args.out}/paired.json)'
  if jax.process_count() > 1:
    return (f'paired gathers every user\'s rank on one host; run it in one process (this job '
            f'has {jax.process_count()})')
  return None


def run_command(args) -> int:
  """`experiments paired`: ranks both sides, prints the table, writes --out when given."""
  problem = _bad_flags(args)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  try:
    # Both sides in one pass: every run must rank the first run's targets.
    rank_RU, target_U = ranks_of_runs([pathlib.Path(w) for w in args.a + args.b], args.split,
                                      progress=not args.quiet)
  except (MismatchedRuns, evaluate.NonFiniteScores, ConfigError, DatasetError, CheckpointError,
          WorkdirError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  labels = tuple(args.labels.split(','))
  runs_a = len(args.a)  # the first runs_a rows of rank_RU are side A's
  diffs = compare_sides(rank_RU[:runs_a], rank_RU[runs_a:], args.resamples, args.seed, args.level)
  print(f'{args.split}, {target_U.size} users; {labels[0]}: {runs_a} run(s), '
        f'{labels[1]}: {len(args.b)} run(s), each user\'s metric averaged over its side\'s runs; '
        f'{args.resamples} paired resamples of the users (seed {args.seed})')
  print(markdown(diffs, labels, args.level))
  if args.out:
    write_json(pathlib.Path(args.out), args, labels, int(target_U.size), diffs)
    print(f'wrote {args.out}', file=sys.stderr)
  return 0


def write_json(out: pathlib.Path, args, labels: tuple[str, str], users: int,
               diffs: dict[str, PairedDiff]) -> None:
  """The command's figures as JSON (null where a ratio is undefined)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'split': args.split, 'users': users, 'labels': list(labels), 'a': list(args.a),
      'b': list(args.b), 'resamples': args.resamples, 'seed': args.seed, 'level': args.level,
      'metrics': {name: {k: None if math.isnan(v) else v for k, v in dataclasses.asdict(d).items()}
                  for name, d in diffs.items()}}, indent=2))
