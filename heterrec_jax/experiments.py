"""Experiment sweeps: the baseline comparison (the paper's Table 1), the ablation (Table 2) and
the layer-scaling study (Figure 3), made only of `train.train` runs and their results.json.

    python -m heterrec_jax.experiments compare --data DIR --out OUT \\
        --models heterrec,sasrec,bert4rec,pinnerformer,hstu,popularity --seeds 3
    python -m heterrec_jax.experiments compare --data DIR --out OUT \\
        --variants full,no_htfl,no_mfk,no_hct,no_lmp,no_tlmp --seeds 3
    python -m heterrec_jax.experiments scaling --data DIR --out OUT --grid 1x1,1x2,2x2,3x3

Every run of a sweep gets the same config file and the same overrides (so the same train.steps,
batch size, validation schedule and early stopping); only the model, variant, layers and seed
differ. Runs go to OUT/runs/NAME; a run whose results.json exists is skipped, so running the
same command again resumes a sweep. `--plan-only` writes OUT/plan.txt (one train command per run,
for `launch/sweep.py`) and nothing else; `--gather` only builds the tables or the plot from the
finished runs. See docs/experiments.md.

`--tune loss.tau=0.05,0.1,0.2,0.5` (compare and ablation) gives every row its own value of one
field, chosen on validation: first the seed-0 run of each row at every value (OUT/runs/ROW-tauV-
seed0), then the value with the best validation `train.early_stop_metric` is trained with the
other seeds; the seed-0 run at the chosen value is reused, so tuning costs (values - 1) extra runs
per row. The table reports the chosen value per row and every tuning run's validation score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shlex
import sys
import time
from typing import Any, Iterable

import numpy as np

from heterrec_jax.config import (METRIC_NAMES, MODEL_NAMES, Config, ConfigError,
                                 apply_overrides, load_config)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = 'configs/default.py'
POPULARITY = 'popularity'
VARIANTS = ('full', 'no_htfl', 'no_mfk', 'no_hct', 'no_lmp', 'no_tlmp')
DEFAULT_MODELS = 'heterrec,sasrec,bert4rec,pinnerformer,hstu,popularity'
# Table columns: the paper's Recall/nDCG@{50,100,200}, plus @10 and MRR.
COLUMNS = ('recall@10', 'recall@50', 'recall@100', 'recall@200',
           'ndcg@10', 'ndcg@50', 'ndcg@100', 'ndcg@200', 'mrr')
DISPLAY = {'heterrec': 'HeterRec (ours)', 'sasrec': 'SASRec', 'bert4rec': 'BERT4Rec',
           'pinnerformer': 'PinnerFormer', 'hstu': 'HSTU', POPULARITY: 'Popularity',
           'full': 'HeterRec', 'no_htfl': 'w/o HTFL', 'no_mfk': '— w/o MFK',
           'no_hct': 'w/o HCT', 'no_lmp': 'w/o LMP', 'no_tlmp': 'w/o t-LMP'}
# Config groups --tune may choose per row (not the data, budget or selection metric).
TUNABLE = ('model.', 'loss.', 'optim.')
# Sample standard deviation over seeds (ddof = 1); a single seed gets 0.
STD_DDOF = 1


# ---- planning -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str  # its folder, OUT/runs/NAME
  group: str  # the table row (model or variant) or the scaling point 'VARIANT-N1xN2'
  seed: int
  overrides: tuple[str, ...]  # the overrides only this run has, in command order


@dataclasses.dataclass(frozen=True)
class Tuning:
  """One config field tuned per row on validation, over `values` (as written on the command
  line), by the validation `metric` of each row's seed-0 runs (higher is better)."""
  field: str  # e.g. 'loss.tau'
  values: tuple[str, ...]
  metric: str

  def tag(self, value: str) -> str:
    """The part of a run name that says the value: 'tau0.05' for loss.tau=0.05."""
    return f'{self.field.rpartition(".")[2]}{value}'


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The runs of one experiment and what they share."""
  kind: str  # 'compare', 'ablation' or 'scaling'
  config: str  # the config file, as written in the commands
  out: pathlib.Path
  common: tuple[str, ...]  # overrides every run gets: data.path, train.steps, the user's
  runs: tuple[Run, ...]
  groups: tuple[str, ...]  # rows (models or variants) or scaling points, in order
  proposed: str = 'heterrec'  # the row the gain is computed for ('full' in the ablation)
  # With a Tuning, `runs` are the untuned runs: `tuning_runs` and `tuned` give the real ones.
  tuning: Tuning | None = None

  def run_dir(self, run: Run) -> pathlib.Path:
    return self.out / 'runs' / run.name


def parse_list(flag: str, text: str, allowed: Iterable[str] | None = None) -> list[str]:
  """Splits 'a,b,c'; every name must be in `allowed` (when given) and appear once."""
  names = [x.strip() for x in text.split(',') if x.strip()]
  if not names:
    raise ConfigError(f'{flag} is empty; give a comma-separated list')
  if len(set(names)) != len(names):
    raise ConfigError(f'{flag}={text!r} names something twice')
  allowed = tuple(allowed) if allowed is not None else None
  for name in names:
    if allowed is not None and name not in allowed:
      raise ConfigError(f'{flag}: {name!r} is not allowed; use some of {allowed}')
  return names


def parse_grid(text: str) -> list[tuple[int, int]]:
  """'1x1,1x2,2x2' -> [(1, 1), (1, 2), (2, 2)] (N1 token-level, N2 item-level blocks)."""
  grid = []
  for item in parse_list('--grid', text):
    n1, sep, n2 = item.partition('x')
    if not sep or not n1.isdigit() or not n2.isdigit() or int(n2) < 1:
      raise ConfigError(f'--grid: {item!r} must look like N1xN2 with N1 >= 0, N2 >= 1 (e.g. 2x2)')
    grid.append((int(n1), int(n2)))
  return grid


def common_overrides(data: str | None, steps: int | None, extra: list[str],
                     reserved: tuple[str, ...]) -> tuple[str, ...]:
  """The overrides every run gets; fields the sweep sets per run cannot be overridden."""
  for item in extra:
    key = item.partition('=')[0].strip()
    if '=' not in item:
      raise ConfigError(f'override {item!r} must look like field.name=value')
    if key in reserved or (key == 'data.path' and data is not None):
      raise ConfigError(f'override {item!r}: the sweep sets {key} itself (use its flags)')
  out = [f'data.path={data}'] if data is not None else []
  if steps is not None:
    out.append(f'train.steps={steps}')
  return tuple(out + list(extra))


def compare_runs(models: list[str], seeds: int) -> list[Run]:
  """One run per (model, seed); popularity is not trained."""
  return [Run(f'{m}-seed{s}', m, s, (f'model.name={m}', f'train.seed={s}'))
          for m in models if m != POPULARITY for s in range(seeds)]


def ablation_runs(variants: list[str], seeds: int) -> list[Run]:
  return [Run(f'heterrec-{v}-seed{s}', v, s,
              ('model.name=heterrec', f'model.variant={v}', f'train.seed={s}'))
          for v in variants for s in range(seeds)]


def point_name(variant: str, n1: int, n2: int) -> str:
  return f'{variant}-{n1}x{n2}'


def scaling_runs(grid: list[tuple[int, int]], variants: list[str], seeds: int) -> list[Run]:
  return [Run(f'{point_name(v, n1, n2)}-seed{s}', point_name(v, n1, n2), s,
              ('model.name=heterrec', f'model.variant={v}', f'model.n1={n1}',
               f'model.n2={n2}', f'train.seed={s}'))
          for v in variants for n1, n2 in grid for s in range(seeds)]


def parse_tune(text: str) -> tuple[str, tuple[str, ...]]:
  """'loss.tau=0.05,0.2' -> ('loss.tau', ('0.05', '0.2')); at least two distinct values."""
  field, sep, values = text.partition('=')
  if not sep or not field.strip():
    raise ConfigError(f'--tune={text!r} must look like field.name=V1,V2 (e.g. '
                      'loss.tau=0.05,0.1,0.2,0.5)')
  names = parse_list('--tune', values)
  if len(names) < 2:
    raise ConfigError(f'--tune={text!r}: give at least two values to choose from')
  return field.strip(), tuple(names)


def with_value(run: Run, tuning: Tuning, value: str) -> Run:
  """`run` with the tuned field set to `value` (its name says the value)."""
  stem = run.name.rpartition('-seed')[0]
  return Run(f'{stem}-{tuning.tag(value)}-seed{run.seed}', run.group, run.seed,
             run.overrides + (f'{tuning.field}={value}',))


def tuning_runs(sweep: Sweep) -> list[Run]:
  """The seed-0 run of every row at every value of the tuned field (none without --tune)."""
  if sweep.tuning is None:
    return []
  return [with_value(run, sweep.tuning, value) for run in sweep.runs if run.seed == 0
          for value in sweep.tuning.values]


def tuning_choices(sweep: Sweep) -> dict[str, dict[str, Any]]:
  """Per row: {'scores': {value: validation metric or None while unfinished}, 'chosen': the
  best value (the first listed on a tie), or None until every value of the row has finished}."""
  out = {}
  for run in sweep.runs:
    if run.seed != 0:
      continue
    for value in sweep.tuning.values:
      results = read_json(sweep.run_dir(with_value(run, sweep.tuning, value)) / 'results.json')
      score = (results or {}).get('valid', {}).get(sweep.tuning.metric)
      out.setdefault(run.group, {'scores': {}})['scores'][value] = score
  for row in out.values():
    scores = row['scores']
    done = all(v is not None for v in scores.values())
    row['chosen'] = max(scores, key=lambda v: (scores[v], -list(scores).index(v))) if done else None
  return out


def tuned(sweep: Sweep) -> Sweep:
  """The sweep whose runs are the table's: every seed of a row at its chosen value. A row whose
  tuning has not finished keeps no runs (the table lists its tuning runs as missing)."""
  if sweep.tuning is None:
    return sweep
  choices = tuning_choices(sweep)
  runs = [with_value(run, sweep.tuning, choices[run.group]['chosen']) for run in sweep.runs
          if choices.get(run.group, {}).get('chosen') is not None]
  return dataclasses.replace(sweep, runs=tuple(runs), tuning=None)


def resolve_config(path: str) -> str:
  """The config file to load: as given, else relative to the repository root."""
  if pathlib.Path(path).is_file() or not (ROOT / path).is_file():
    return path
  return str(ROOT / path)


def run_overrides(sweep: Sweep, run: Run) -> list[str]:
  """Per-run overrides first, then the shared ones (data.path, train.steps, the user's)."""
  return list(run.overrides) + list(sweep.common)


def run_config(sweep: Sweep, run: Run) -> Config:
  return apply_overrides(load_config(resolve_config(sweep.config)), run_overrides(sweep, run))


def command(sweep: Sweep, run: Run) -> str:
  """The shell command that trains `run` (what plan.txt holds)."""
  argv = ['python', '-m', 'heterrec_jax.train', '--config', sweep.config,
          '--workdir', str(sweep.run_dir(run)), *run_overrides(sweep, run)]
  return shlex.join(argv)


def check_configs(sweep: Sweep) -> None:
  """Builds every run's config, so that a bad override fails before anything runs."""
  for run in sweep.runs + tuple(tuning_runs(sweep)):
    run_config(sweep, run)


def planned_runs(sweep: Sweep) -> tuple[list[Run], list[str]]:
  """The runs that can be planned now (the tuning runs, then the seeds of every row whose value
  is chosen, each run once) and the rows still waiting on their tuning runs."""
  if sweep.tuning is None:
    return list(sweep.runs), []
  final = tuned(sweep)
  runs = list({r.name: r for r in tuning_runs(sweep) + list(final.runs)}.values())
  waiting = [g for g in sweep.groups if g != POPULARITY
             and all(r.group != g for r in final.runs)]
  return runs, waiting


def write_plan(sweep: Sweep) -> pathlib.Path:
  """OUT/plan.txt: one command per run (configs are checked first, nothing is run). With
  --tune, the seeds of a row are planned once its tuning runs have finished: run --plan-only
  again then."""
  check_configs(sweep)
  runs, waiting = planned_runs(sweep)
  sweep.out.mkdir(parents=True, exist_ok=True)
  path = sweep.out / 'plan.txt'
  path.write_text(''.join(command(sweep, run) + '\n' for run in runs))
  if waiting:
    print(f'rows waiting on their tuning runs ({", ".join(waiting)}): once those have finished, '
          'run the same command again for the plan of their other seeds', file=sys.stderr)
  return path


# ---- running --------------------------------------------------------------------------------

def _train_fn():
  """`train.train`, imported only when something is trained (tests replace this)."""
  from heterrec_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  return train_lib.train


def read_json(path: pathlib.Path) -> Any:
  """The JSON in `path`, or None when it is missing or unreadable (a run still writing it)."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


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
    out = _train_fn()(cfg, run_dir, progress=progress)
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
    if row['chosen'] is not None:
      print(f'  {group}: {sweep.tuning.field}={row["chosen"]}', file=sys.stderr)
  return unfinished + execute_runs(final, list(final.runs), progress)[0]


# ---- gathering ------------------------------------------------------------------------------

def summarize(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
  """Mean and standard deviation (ddof = STD_DDOF; 0 for one value) of each metric."""
  out = {}
  for metric in METRIC_NAMES:
    xs = np.asarray([v[metric] for v in values if metric in v], np.float64)
    if xs.size:
      std = float(np.std(xs, ddof=STD_DDOF)) if xs.size > 1 else 0.0
      out[metric] = {'mean': float(np.mean(xs)), 'std': std, 'n': int(xs.size)}
  return out


def collect(sweep: Sweep, split: str) -> tuple[dict[str, list[tuple[int, dict]]], list[str]]:
  """The finished runs' `split` metrics per group as (seed, metrics), and the missing runs."""
  found: dict[str, list[tuple[int, dict]]] = {g: [] for g in sweep.groups}
  missing = []
  for run in sweep.runs:
    results = read_json(sweep.run_dir(run) / 'results.json')
    if results is None or split not in results:
      missing.append(run.name)
    else:
      found.setdefault(run.group, []).append((run.seed, results[split]))
  return found, missing


def wall_seconds(run_dir: pathlib.Path) -> tuple[float | None, str]:
  """A finished run's wall time: wall_time.json (written by this module or launch/sweep.py),
  else an estimate from the file times (config.json is written at start, results.json at end)."""
  record = read_json(run_dir / 'wall_time.json')
  if record and 'seconds' in record:
    return float(record['seconds']), 'recorded'
  start, end = run_dir / 'config.json', run_dir / 'results.json'
  if start.is_file() and end.is_file():
    return end.stat().st_mtime - start.stat().st_mtime, 'file times'
  return None, 'unknown'


def wall_times(sweep: Sweep) -> dict[str, dict[str, Any]]:
  """Mean and std of the wall time of the finished runs of each group."""
  out = {}
  for group in sweep.groups:
    runs = [r for r in sweep.runs if r.group == group
            and (sweep.run_dir(r) / 'results.json').is_file()]
    timed = [wall_seconds(sweep.run_dir(r)) for r in runs]
    seconds = [s for s, _ in timed if s is not None]
    if seconds:
      std = float(np.std(seconds, ddof=STD_DDOF)) if len(seconds) > 1 else 0.0
      out[group] = {'mean': float(np.mean(seconds)), 'std': std, 'n': len(seconds),
                    'source': sorted({src for s, src in timed if s is not None})}
  return out


BUDGET_FIELDS = ('steps', 'batch_size', 'eval_every', 'patience', 'early_stop_metric')


def budget(sweep: Sweep) -> tuple[dict[str, Any], list[str]]:
  """The planned training budget, and a warning for every finished run trained with another
  (e.g. an earlier sweep into the same OUT with other --steps)."""
  planned = dataclasses.asdict(run_config(sweep, sweep.runs[0]).train) if sweep.runs else {}
  planned = {k: planned[k] for k in BUDGET_FIELDS if k in planned}
  warnings = []
  for run in sweep.runs:
    saved = (read_json(sweep.run_dir(run) / 'config.json') or {}).get('train')
    if not saved or not (sweep.run_dir(run) / 'results.json').is_file():
      continue
    diff = {k: saved.get(k) for k in planned if saved.get(k) != planned[k]}
    if diff:
      warnings.append(f'{run.name} was trained with train.{diff} instead of the planned budget')
  return planned, warnings


def popularity_results(sweep: Sweep, compute: bool, progress: bool) -> dict | None:
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
  from heterrec_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from heterrec_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = apply_overrides(load_config(resolve_config(sweep.config)), list(sweep.common))
  dataset = state_lib.load_dataset(cfg, sweep.out / POPULARITY, progress)
  floor = {s: evaluate_lib.popularity(cfg, dataset, s) for s in ('valid', 'test')}
  sweep.out.mkdir(parents=True, exist_ok=True)
  (sweep.out / 'popularity.json').write_text(json.dumps(floor, indent=1) + '\n')
  return floor


# ---- tables ---------------------------------------------------------------------------------

def gain_percent(proposed: float | None, baseline: float | None) -> float | None:
  """Relative gain (proposed - baseline) / baseline in percent, sign kept; None if undefined."""
  if proposed is None or baseline is None or baseline == 0:
    return None
  return (proposed - baseline) / baseline * 100.0


def best_baselines(rows: dict[str, dict], proposed: str) -> dict[str, dict[str, Any]]:
  """Per column, the row other than `proposed` with the highest mean (popularity included)."""
  best = {}
  for column in COLUMNS:
    candidates = [(r[column]['mean'], name) for name, r in rows.items()
                  if name != proposed and column in r]
    if candidates:
      mean, name = max(candidates)
      best[column] = {'row': name, 'mean': mean}
  return best


def comparison(rows: dict[str, dict], proposed: str) -> dict[str, Any]:
  """Table 1 / Table 2: rows, the best other row per column, the proposed row's relative gain
  over it, and its gain over every row."""
  best = best_baselines(rows, proposed)
  mine = rows.get(proposed, {})

  def mean(row, column):
    return row[column]['mean'] if column in row else None

  gain = {c: gain_percent(mean(mine, c), best[c]['mean'] if c in best else None)
          for c in COLUMNS}
  gain_over = {name: {c: gain_percent(mean(mine, c), mean(row, c)) for c in COLUMNS}
               for name, row in rows.items() if name != proposed}
  return {'columns': list(COLUMNS), 'rows': rows, 'proposed': proposed,
          'best_baseline': best, 'gain_percent': gain, 'gain_over_percent': gain_over}


def build_table(sweep: Sweep, split: str, compute_popularity: bool,
                progress: bool) -> dict[str, Any]:
  """Gathers the finished runs of a compare/ablation sweep into the table dict (table.json)."""
  tuning = tuning_summary(sweep)
  missing = tuning['missing'] if tuning else []
  sweep = tuned(sweep)
  found, missing_runs = collect(sweep, split)
  missing += missing_runs
  rows, seeds = {}, {}
  for group in sweep.groups:
    if group == POPULARITY:
      floor = popularity_results(sweep, compute_popularity, progress)
      if floor and split in floor:
        rows[group], seeds[group] = summarize([floor[split]]), []
      else:
        missing.append(POPULARITY)
    elif found.get(group):
      rows[group] = summarize([m for _, m in found[group]])
      seeds[group] = sorted(s for s, _ in found[group])
  plan, warnings = budget(sweep)
  table = comparison(rows, sweep.proposed)
  table.update(kind=sweep.kind, split=split, seeds=seeds, missing=missing, budget=plan,
               warnings=warnings, config=sweep.config, overrides=list(sweep.common),
               std_ddof=STD_DDOF, wall_time_s=wall_times(sweep), tuning=tuning)
  return table


def tuning_summary(sweep: Sweep) -> dict[str, Any] | None:
  """table.json's 'tuning': the field, values and metric, per row the validation score of each
  value and the chosen one, the unfinished tuning runs, and the summed wall time of each row's
  tuning runs."""
  if sweep.tuning is None:
    return None
  runs = tuning_runs(sweep)
  seconds: dict[str, float] = {}
  for run in runs:
    s, _ = wall_seconds(sweep.run_dir(run))
    if s is not None:
      seconds[run.group] = seconds.get(run.group, 0.0) + s
  missing = [r.name for r in runs if not (sweep.run_dir(r) / 'results.json').is_file()]
  summary = {'field': sweep.tuning.field, 'values': list(sweep.tuning.values),
             'metric': sweep.tuning.metric, 'rows': tuning_choices(sweep), 'missing': missing,
             'wall_time_s': seconds}
  summary['at_grid_edge'] = at_grid_edge(summary)
  return summary


def label(column: str) -> str:
  kind, _, k = column.partition('@')
  return {'recall': 'Recall', 'ndcg': 'nDCG', 'mrr': 'MRR'}[kind] + (f'@{k}' if k else '')


def format_gain(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:+.2f}%'


def _cell(table: dict, name: str, column: str) -> str:
  stat = table['rows'][name].get(column)
  if stat is None:
    return 'n/a'
  text = f'{stat["mean"]:.4f} ± {stat["std"]:.4f}'
  best = table['best_baseline'].get(column)
  return f'_{text}_' if best and best['row'] == name else text


def _row_order(table: dict) -> list[str]:
  """The other rows in sweep order, then the proposed row (as in the paper's tables)."""
  others = [n for n in table['rows'] if n != table['proposed']]
  return others + ([table['proposed']] if table['proposed'] in table['rows'] else [])


def _budget_line(table: dict) -> str:
  b = table['budget']
  if not b:
    return 'Budget: no trained rows.'
  stop = (f'early stopping after {b.get("patience")} validations without a better '
          f'{b.get("early_stop_metric")}' if b.get('patience') else 'no early stopping')
  return (f'Budget (every run): at most {b.get("steps")} steps of batch {b.get("batch_size")}, '
          f'validation every {b.get("eval_every")} steps, {stop}; the best validation '
          f'checkpoint is tested. Config `{table["config"]}`, overrides '
          f'`{" ".join(table["overrides"]) or "none"}`.')


def markdown(table: dict) -> str:
  """The table in the layout of the paper's Table 1 (compare) or Table 2 (ablation)."""
  what = 'Ablation' if table['kind'] == 'ablation' else 'Comparison'
  other = 'variant' if table['kind'] == 'ablation' else 'baseline'
  head = ['Method', *[label(c) for c in COLUMNS], 'n']
  lines = [f'# {what} ({table["split"]} split, mean ± std over seeds)', '', _budget_line(table),
           '', '| ' + ' | '.join(head) + ' |', '| --- |' + ' ---: |' * (len(head) - 1)]
  for name in _row_order(table):
    n = len(table['seeds'][name]) if table['seeds'][name] else 1
    cells = [_cell(table, name, c) for c in COLUMNS]
    lines.append(f'| {_method(table, name)} | ' + ' | '.join(cells) + f' | {n} |')
  best = [DISPLAY.get(table['best_baseline'][c]['row'], '?') if c in table['best_baseline']
          else 'n/a' for c in COLUMNS]
  lines.append(f'| Best {other} | ' + ' | '.join(best) + ' | |')
  gains = [format_gain(table['gain_percent'][c]) for c in COLUMNS]
  lines.append('| Improvement | ' + ' | '.join(gains) + ' | |')
  lines += ['', f'Improvement: (HeterRec - best {other}) / best {other} x 100, per column, on the '
            f'means; the best {other} is in italics. std: ddof={table["std_ddof"]} over seeds; '
            'n: runs gathered (popularity is deterministic: one evaluation).']
  return '\n'.join(lines + _tuning_lines(table) + _footer(table)) + '\n'


def _method(table: dict, name: str) -> str:
  """The row's display name, with its tuned value when the sweep tuned one."""
  tuning = table.get('tuning')
  chosen = tuning and tuning['rows'].get(name, {}).get('chosen')
  short = tuning['field'].rpartition('.')[2] if tuning else ''
  return f'{DISPLAY.get(name, name)}, {short}={chosen}' if chosen else DISPLAY.get(name, name)


def _tuning_lines(table: dict) -> list[str]:
  """The validation score of every tuning run, the chosen value in bold."""
  tuning = table.get('tuning')
  if not tuning:
    return []
  head = ['Method', *[f'{tuning["field"]}={v}' for v in tuning['values']], 'tuning wall time (s)']
  lines = ['', f'## Tuning: validation {label(tuning["metric"])} of each row\'s seed-0 run', '',
           f'Each row is trained with the value of `{tuning["field"]}` whose seed-0 run has the '
           f'best validation {label(tuning["metric"])} (`train.early_stop_metric`); that run is '
           'also the row\'s seed 0 above.', '',
           '| ' + ' | '.join(head) + ' |', '| --- |' + ' ---: |' * (len(head) - 1)]
  for name, row in tuning['rows'].items():
    cells = []
    for value in tuning['values']:
      score = row['scores'].get(value)
      text = 'n/a' if score is None else f'{score:.4f}'
      cells.append(f'**{text}**' if value == row['chosen'] else text)
    seconds = tuning['wall_time_s'].get(name)
    cells.append('n/a' if seconds is None else f'{seconds:.0f}')
    lines.append(f'| {DISPLAY.get(name, name)} | ' + ' | '.join(cells) + ' |')
  edge = [DISPLAY.get(n, n) for n in tuning['at_grid_edge']]
  if edge:
    lines += ['', f'Chosen at an end of the values tried: {", ".join(edge)}. The best value may '
              'lie beyond it: widen `--tune` (finished runs are reused).']
  return lines


def at_grid_edge(tuning: dict) -> list[str]:
  """The rows whose chosen value is the first or the last of the values tried."""
  ends = (tuning['values'][0], tuning['values'][-1])
  return [name for name, row in tuning['rows'].items() if row['chosen'] in ends]


def _footer(table: dict) -> list[str]:
  lines = ['', '## Wall time per run (s)', '', '| Method | mean ± std | n | source |',
           '| --- | ---: | ---: | --- |']
  for name, w in table['wall_time_s'].items():
    lines.append(f'| {DISPLAY.get(name, name)} | {w["mean"]:.1f} ± {w["std"]:.1f} | {w["n"]} | '
                 f'{", ".join(w["source"])} |')
  if table['missing']:
    lines += ['', f'Missing runs (not finished): {", ".join(table["missing"])}']
  for warning in table['warnings']:
    lines += ['', f'Warning: {warning}']
  return lines


def write_table(out: pathlib.Path, table: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / 'table.json').write_text(json.dumps(table, indent=1) + '\n')
  (out / 'table.md').write_text(markdown(table))


# ---- scaling --------------------------------------------------------------------------------

def _stack_flops(blocks: int, length: int, width: int, ffn_mult: int) -> float:
  """Forward matmul FLOPs of `blocks` transformer blocks over `length` positions: Q, K, V, O
  and the FFN (2 FLOPs per multiply-add), plus Q K^T and A V over the full length x length."""
  dense = 2.0 * length * (4 + 2 * ffn_mult) * width * width
  attention = 4.0 * length * length * width
  return blocks * (dense + attention)


def analytic_train_flops(cfg: Config, n_kinds: int, steps: int) -> float:
  """An estimate of the training FLOPs of HeterRec: 3 x forward (the backward pass ~ 2 x) of the
  matmuls of the blocks, the fusion MLP, the item tower and the LMP heads and logits, per
  sequence of T = data.max_len items with K = n_kinds tokens, x batch size x steps. Embedding
  lookups, layer norms, softmax and the evaluation are left out."""
  m, t, k = cfg.model, cfg.data.max_len, n_kinds
  b, n_step = cfg.train.batch_size, cfg.loss.n_step
  if m.variant == 'no_hct':
    user = _stack_flops(m.n1 + m.n2, t * k, m.d_f, m.ffn_mult) + 2.0 * t * m.d_f * m.d_k
  else:
    token = 0.0 if m.variant == 'no_htfl' else _stack_flops(m.n1, t * k, m.d_f, m.ffn_mult)
    fusion = 2.0 * t * (k * m.d_f * m.d_k + m.d_k * m.d_k)
    user = token + fusion + _stack_flops(m.n2, t, m.d_k, m.ffn_mult)
  items = 2.0 * t * (2 * k * m.d_f * m.d_f + k * m.d_f * m.d_k + m.d_k * m.d_k)
  heads = n_step * 2.0 * t * (m.d_k * m.d_k + b * m.d_k)
  return 3.0 * b * (user + items + heads) * steps


def steps_trained(run_dir: pathlib.Path, planned: int) -> int:
  """The last training step in RUN/metrics.jsonl (early stopping may end a run early)."""
  last = None
  try:
    with open(run_dir / 'metrics.jsonl', encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if record.get('split') == 'train':
          last = int(record['step'])
  except OSError:
    pass
  return planned if last is None else last


def recorded_flops_per_step(run_dir: pathlib.Path) -> float | None:
  """`flops_per_step` from RUN/flops.json, or from a line of RUN/metrics.jsonl, if recorded."""
  record = read_json(run_dir / 'flops.json')
  if record and record.get('flops_per_step'):
    return float(record['flops_per_step'])
  try:
    with open(run_dir / 'metrics.jsonl', encoding='utf-8') as f:
      for line in f:
        if 'flops_per_step' in line:
          return float(json.loads(line)['flops_per_step'])
  except (OSError, ValueError, KeyError):
    pass
  return None


def count_params(build) -> int:
  """Trainable parameters (`nnx.Param` leaves) of the module `build()` returns, counted from
  shapes only (`nnx.eval_shape`: nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(build)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def model_size(cfg: Config, run_dir: pathlib.Path) -> dict[str, Any]:
  """{'params', 'n_kinds'} of the model of `cfg` on its dataset (data.path, or the run's own
  synthetic data), or {'error': why} when the dataset or the model cannot be built."""
  try:
    from heterrec_jax import state as state_lib  # pylint: disable=g-import-not-at-top
    from heterrec_jax.data.dataset import Dataset  # pylint: disable=g-import-not-at-top
    dataset = Dataset.load(cfg.data.path or run_dir / 'data')
    params = count_params(lambda: state_lib.build_model(cfg, dataset, 0))
    return {'params': params, 'n_kinds': dataset.schema.n_kinds}
  except Exception as e:  # pylint: disable=broad-except  # the size is optional information
    return {'error': f'{type(e).__name__}: {e}'}


def train_flops(cfg: Config, run_dir: pathlib.Path,
                n_kinds: int | None) -> tuple[float | None, str]:
  """Training FLOPs of a run: recorded flops_per_step x steps trained, else the analytic estimate
  (with the planned steps when the run has not trained)."""
  steps = steps_trained(run_dir, cfg.train.steps)
  per_step = recorded_flops_per_step(run_dir)
  if per_step is not None:
    return per_step * steps, 'recorded'
  if n_kinds is None:
    return None, 'unavailable'
  return analytic_train_flops(cfg, n_kinds, steps), 'analytic'


def scaling_point(sweep: Sweep, group: str, found: list[tuple[int, dict]]) -> dict[str, Any]:
  """One point of scaling.json: layers, parameters, training FLOPs and metrics of a group."""
  runs = [r for r in sweep.runs if r.group == group]
  cfg = run_config(sweep, runs[0])
  size = model_size(cfg, sweep.run_dir(runs[0]))
  done = {s for s, _ in found}
  flops = [train_flops(cfg, sweep.run_dir(r), size.get('n_kinds')) for r in runs
           if r.seed in done] or [train_flops(cfg, sweep.run_dir(runs[0]), size.get('n_kinds'))]
  values = [f for f, _ in flops if f is not None]
  summary = summarize([m for _, m in found])
  return {'variant': cfg.model.variant, 'n1': cfg.model.n1, 'n2': cfg.model.n2,
          'layers': cfg.model.n1 + cfg.model.n2, 'params': size.get('params'),
          'params_error': size.get('error'),
          'train_flops': float(np.mean(values)) if values else None,
          'flops_source': sorted({src for _, src in flops}), 'seeds': sorted(done),
          'metrics': {k: v['mean'] for k, v in summary.items()},
          'std': {k: v['std'] for k, v in summary.items()},
          'missing': [r.name for r in runs if r.seed not in done]}


def build_scaling(sweep: Sweep, split: str) -> dict[str, Any]:
  found, missing = collect(sweep, split)
  points = [scaling_point(sweep, g, found.get(g, [])) for g in sweep.groups]
  return {'split': split, 'config': sweep.config, 'overrides': list(sweep.common),
          'budget': budget(sweep)[0], 'std_ddof': STD_DDOF, 'points': points, 'missing': missing}


AXES = (('layers', 'total layers N1 + N2'), ('params', 'trainable parameters'),
        ('train_flops', 'training FLOPs'))


def _panel(ax, points: list[dict], metric: str, key: str, xlabel: str, split: str) -> None:
  """One subplot: `metric` against `key`, one line per variant, std as error bars."""
  variants = list(dict.fromkeys(p['variant'] for p in points))
  for variant in variants:
    pts = sorted((p for p in points if p['variant'] == variant and p[key] is not None
                  and metric in p['metrics']), key=lambda p: p[key])
    if pts:
      ax.errorbar([p[key] for p in pts], [p['metrics'][metric] for p in pts],
                  yerr=[p['std'][metric] for p in pts], marker='o', capsize=3,
                  label=DISPLAY.get(variant, variant))
  if key == 'layers':
    ax.xaxis.get_major_locator().set_params(integer=True)
  else:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f'{label(metric)} ({split})')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()


def plot_scaling(scaling: dict, metrics: list[str], path: pathlib.Path) -> None:
  """scaling.png: a row per metric, against layers, parameters and training FLOPs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(metrics), len(AXES), figsize=(13, 3.6 * len(metrics)),
                           squeeze=False)
  for r, metric in enumerate(metrics):
    for c, (key, xlabel) in enumerate(AXES):
      _panel(axes[r][c], scaling['points'], metric, key, xlabel, scaling['split'])
  fig.suptitle('HeterRec scaling, with and without HTFL')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_scaling(out: pathlib.Path, scaling: dict, metrics: list[str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / 'scaling.json').write_text(json.dumps(scaling, indent=1) + '\n')
  plot_scaling(scaling, metrics, out / 'scaling.png')


# ---- command line ---------------------------------------------------------------------------

def _common_flags(parser: argparse.ArgumentParser, seeds: int) -> None:
  parser.add_argument('--data', default=None,
                      help='prepared dataset folder, given to every run as data.path '
                           '(default: the config\'s data.path)')
  parser.add_argument('--out', required=True, help='sweep folder: runs/, plan.txt, tables')
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help=f'config file of every run (default: {DEFAULT_CONFIG})')
  parser.add_argument('--seeds', type=int, default=seeds,
                      help=f'runs per setting, train.seed = 0..N-1 (default: {seeds})')
  parser.add_argument('--steps', type=int, default=None,
                      help='train.steps of every run (default: the config\'s)')
  parser.add_argument('--split', default='test', choices=('test', 'valid'),
                      help='the split the table or plot reports (default: test)')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--plan-only', action='store_true',
                    help='write OUT/plan.txt (one train command per run) and nothing else')
  mode.add_argument('--gather', action='store_true',
                    help='train nothing: build the outputs from the finished runs')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  parser.add_argument('overrides', nargs='*', help='dotted overrides for every run, e.g. '
                      'model.d_f=32')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.experiments', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  compare = sub.add_parser('compare', help='baselines (Table 1) or ablation (Table 2)')
  compare.add_argument('--models', default=None,
                       help=f'rows of the comparison (default: {DEFAULT_MODELS})')
  compare.add_argument('--variants', default=None,
                       help='HeterRec variants: the ablation table instead (e.g. '
                            f'{",".join(VARIANTS)})')
  compare.add_argument('--tune', default=None, metavar='FIELD=V1,V2,...',
                       help='choose one config field per row on validation, e.g. '
                            'loss.tau=0.05,0.1,0.2,0.5 (seed-0 runs at every value, then the '
                            'other seeds at the best; default: no tuning)')
  _common_flags(compare, seeds=3)
  scaling = sub.add_parser('scaling', help='the (N1, N2) grid with and without HTFL (Figure 3)')
  scaling.add_argument('--grid', default='1x1,1x2,2x2,3x3', help='N1xN2 points (default: '
                       '1x1,1x2,2x2,3x3)')
  scaling.add_argument('--variants', default='full,no_htfl',
                       help='one line per variant (default: full,no_htfl)')
  scaling.add_argument('--metrics', default='recall@50,ndcg@50',
                       help='metrics plotted (default: recall@50,ndcg@50)')
  _common_flags(scaling, seeds=1)
  return parser


def make_sweep(args: argparse.Namespace) -> Sweep:
  """The sweep the command line describes (checked: names, grid, overrides)."""
  if args.seeds < 1:
    raise ConfigError(f'--seeds={args.seeds} must be >= 1')
  if args.steps is not None and args.steps < 1:
    raise ConfigError(f'--steps={args.steps} must be >= 1')
  reserved = ('model.name', 'model.variant', 'train.seed')
  out = pathlib.Path(args.out)
  if args.command == 'scaling':
    grid, variants = parse_grid(args.grid), parse_list('--variants', args.variants, VARIANTS)
    common = common_overrides(args.data, args.steps, args.overrides,
                              reserved + ('model.n1', 'model.n2'))
    runs = scaling_runs(grid, variants, args.seeds)
    groups = tuple(dict.fromkeys(r.group for r in runs))
    return Sweep('scaling', args.config, out, common, tuple(runs), groups, 'full')
  field, values = parse_tune(args.tune) if args.tune is not None else (None, ())
  if field is not None and not field.startswith(TUNABLE):
    raise ConfigError(f'--tune {field}: the data, budget and selection metric are the same for '
                      f'every row; tune a field of {", ".join(TUNABLE)}')
  common = common_overrides(args.data, args.steps, args.overrides,
                            reserved + ((field,) if field else ()))
  tuning = None
  if field is not None:
    base = apply_overrides(load_config(resolve_config(args.config)), list(common))
    tuning = Tuning(field, values, base.train.early_stop_metric)
  if args.variants is not None:
    if args.models is not None:
      raise ConfigError('give --models (the baseline table) or --variants (the ablation), '
                        'not both')
    variants = parse_list('--variants', args.variants, VARIANTS)
    return Sweep('ablation', args.config, out, common, tuple(ablation_runs(variants, args.seeds)),
                 tuple(variants), 'full', tuning)
  models = parse_list('--models', args.models or DEFAULT_MODELS, MODEL_NAMES + (POPULARITY,))
  return Sweep('compare', args.config, out, common, tuple(compare_runs(models, args.seeds)),
               tuple(models), 'heterrec', tuning)


def report(sweep: Sweep, args: argparse.Namespace, compute_popularity: bool) -> list[str]:
  """Builds the outputs of a sweep from its finished runs; returns the missing runs."""
  if sweep.kind == 'scaling':
    scaling = build_scaling(sweep, args.split)
    metrics = parse_list('--metrics', args.metrics, METRIC_NAMES)
    write_scaling(sweep.out, scaling, metrics)
    print(f'wrote {sweep.out}/scaling.json and {sweep.out}/scaling.png', file=sys.stderr)
    return scaling['missing']
  table = build_table(sweep, args.split, compute_popularity, progress=not args.quiet)
  write_table(sweep.out, table)
  print(markdown(table))
  print(f'wrote {sweep.out}/table.md and {sweep.out}/table.json', file=sys.stderr)
  return table['missing']


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """Flags and overrides in any order (overrides may come before and after flags)."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  unknown = [x for x in rest if x.startswith('-')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  args.overrides = list(args.overrides) + rest
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    sweep = make_sweep(args)
    if args.plan_only:
      path = write_plan(sweep)
      print(f'wrote {path} ({len(path.read_text().splitlines())} runs)', file=sys.stderr)
      return 0
    failed = []
    if not args.gather:
      check_configs(sweep)
      failed = execute(sweep, progress=not args.quiet)
    missing = report(sweep, args, compute_popularity=not args.gather)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if missing:
    print(f'missing runs ({len(missing)}): {", ".join(missing)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
