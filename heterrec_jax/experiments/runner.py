"""Runs a sweep in this process: every unfinished run through `train.train` (a finished one is
reused), its wall time recorded; and the popularity floor, reused from any run or evaluated."""

from __future__ import annotations

import json
import pathlib
import sys
import time

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import run as run_lib
from heterrec_jax import train as train_lib
from heterrec_jax.experiments.sweep import (POPULARITY, Run, Sweep, load_with, read_json,
                                            run_config, tuned, tuning_choices, tuning_runs)


def record_wall_time(run_dir: pathlib.Path, seconds: float, status: str) -> None:
  """Adds this attempt's seconds to RUN/wall_time.json (a resumed run sums its attempts)."""
  previous = read_json(run_dir / 'wall_time.json') or {}
  record = {'seconds': float(previous.get('seconds', 0.0)) + seconds, 'status': status,
            'attempts': int(previous.get('attempts', 0)) + 1}
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / 'wall_time.json').write_text(json.dumps(record, indent=1) + '\n')


def run_one(sweep: Sweep, run: Run, progress: bool) -> str:
  """Trains `run` unless its results.json exists; returns 'skipped', 'done' or the failure."""
  run_dir = sweep.run_dir(run)
  if (run_dir / 'results.json').is_file():
    return 'skipped'
  cfg = run_config(sweep, run)
  start = time.perf_counter()
  try:
    out = train_lib.train(cfg, run_dir, progress=progress)
    status = out.get('status', 'done')
  except Exception as e:  # pylint: disable=broad-except  # one failed run must not end a sweep
    status = f'failed: {type(e).__name__}: {e}'
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'error.txt').write_text(status + '\n')
  record_wall_time(run_dir, time.perf_counter() - start, status)
  return status


def execute_runs(sweep: Sweep, runs: list[Run], progress: bool) -> tuple[list[str], bool]:
  """Runs every unfinished run of `runs` in order; returns the names of those that did not
  finish, and whether a run was preempted (SIGTERM: it checkpointed and returned), which ends
  the sweep: the machine is going away; running the same command again resumes."""
  unfinished = []
  for i, run in enumerate(runs):
    print(f'[{i + 1}/{len(runs)}] {run.name}', file=sys.stderr)
    status = run_one(sweep, run, progress)
    if status not in ('done', 'skipped'):
      print(f'  {run.name}: {status}', file=sys.stderr)
      unfinished.append(run.name)
    if status == 'preempted':
      return unfinished + [r.name for r in runs[i + 1:]], True
  return unfinished, False


def execute(sweep: Sweep, progress: bool = True) -> list[str]:
  """Trains the sweep (with --tune: the tuning runs, then the other seeds at each row's chosen
  value); returns the names of the runs that did not finish."""
  if sweep.tuning is None:
    return execute_runs(sweep, list(sweep.runs), progress)[0]
  print(f'tuning {sweep.tuning.field} over {", ".join(sweep.tuning.values)} on validation '
        f'{sweep.tuning.metric}', file=sys.stderr)
  unfinished, preempted = execute_runs(sweep, tuning_runs(sweep), progress)
  if preempted:
    return unfinished
  final = tuned(sweep)
  for group, row in tuning_choices(sweep).items():
    if row.chosen is not None:
      print(f'  {group}: {sweep.tuning.field}={row.chosen}', file=sys.stderr)
  return unfinished + execute_runs(final, list(final.runs), progress)[0]


def popularity_floor(sweep: Sweep, compute: bool, progress: bool) -> dict | None:
  """The popularity floor: any run's popularity.json (every run of a sweep shares data and
  evaluation settings), else OUT/popularity.json, else (if `compute`) evaluated and saved there."""
  for path in sorted((sweep.out / 'runs').glob('*/popularity.json')):
    found = read_json(path)
    if found:
      return found
  cached = read_json(sweep.out / 'popularity.json')
  if cached or not compute:
    return cached
  try:
    return compute_popularity(sweep, progress)
  except Exception as e:  # pylint: disable=broad-except  # the table is still written without it
    print(f'popularity floor not computed: {type(e).__name__}: {e}', file=sys.stderr)
    return None


def compute_popularity(sweep: Sweep, progress: bool) -> dict:
  """Evaluates the popularity floor on the sweep's data; saves it to OUT/popularity.json."""
  cfg = load_with(sweep.config, list(sweep.common))
  dataset = run_lib.load_dataset(cfg, sweep.out / POPULARITY, progress)
  floor = {s: evaluate_lib.popularity(cfg, dataset, s) for s in ('valid', 'test')}
  sweep.out.mkdir(parents=True, exist_ok=True)
  (sweep.out / 'popularity.json').write_text(json.dumps(floor, indent=1) + '\n')
  return floor
