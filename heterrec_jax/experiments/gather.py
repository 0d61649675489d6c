"""What the finished runs of a sweep say: their metrics per row (mean ± std over seeds), their
wall times and the training budget they were planned with."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import pathlib
from typing import Any

import numpy as np

from heterrec_jax.config import METRIC_NAMES, ConfigError
from heterrec_jax.experiments.sweep import Sweep, read_json, run_config

# Sample standard deviation over seeds (ddof = 1); a single seed gets 0.
STD_DDOF = 1
BUDGET_FIELDS = ('steps', 'batch_size', 'eval_every', 'patience', 'early_stop_metric')


@dataclasses.dataclass(frozen=True)
class Stat:
  """One number over the seeds of a row: mean, std (ddof = STD_DDOF; 0 for one value), count,
  and the standard error of the mean, std / sqrt(n) (0 for one value)."""
  mean: float
  std: float
  n: int
  se: float


@dataclasses.dataclass(frozen=True)
class WallTime(Stat):
  """A row's wall time per run, and where the seconds came from ('recorded', 'trainer',
  'file times')."""
  source: list[str]


def stat(xs: list[float]) -> Stat:
  xs = np.asarray(xs, np.float64)
  std = float(np.std(xs, ddof=STD_DDOF)) if xs.size > 1 else 0.0
  return Stat(float(np.mean(xs)), std, int(xs.size), std / math.sqrt(xs.size))


def summarize(values: list[dict[str, float]]) -> dict[str, Stat]:
  """The Stat of each metric present in `values` (one dict of metrics per run)."""
  out = {}
  for metric in METRIC_NAMES:
    xs = [v[metric] for v in values if metric in v]
    if xs:
      out[metric] = stat(xs)
  return out


def metric_label(metric: str) -> str:
  """'ndcg@50' -> 'nDCG@50', as the paper writes it."""
  kind, _, k = metric.partition('@')
  return {'recall': 'Recall', 'ndcg': 'nDCG', 'mrr': 'MRR'}[kind] + (f'@{k}' if k else '')


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


GATE_PREFIX = 'gate_fraction_step'


def step_number(key: str) -> int:
  """The LMP step of a gate key, 'step3' -> 3 (sorts 'step10' after 'step9')."""
  return int(key[len('step'):])


def train_records(run_dir: pathlib.Path) -> list[dict]:
  """The 'train' records of RUN/metrics.jsonl in file order (unreadable lines skipped)."""
  records = []
  try:
    with open(run_dir / 'metrics.jsonl', encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get('split') == 'train' and 'step' in record:
          records.append(record)
  except OSError:
    pass
  return records


def gate_share(run_dir: pathlib.Path) -> dict[str, float]:
  """A finished LMP run's open-gate share per step ('step2', 'step3', ...): the mean of the
  logged `gate_fraction_stepK` over the training records in the second half of training up to
  the tested (best) checkpoint, `best_step / 2 < step <= best_step`; the last half of the
  records when results.json has no training record. Empty for runs without a gate."""
  records = [r for r in train_records(run_dir) if any(k.startswith(GATE_PREFIX) for k in r)]
  best = ((read_json(run_dir / 'results.json') or {}).get('training') or {}).get('best_step')
  if best is not None:
    kept = [r for r in records if best / 2 < r['step'] <= best]
  else:
    kept = records[len(records) // 2:]
  kept = kept or records[-1:]
  logged = {k for r in kept for k in r if k.startswith(GATE_PREFIX)}
  shares = {f'step{k[len(GATE_PREFIX):]}': float(np.mean([r[k] for r in kept if k in r]))
            for k in logged}
  return {k: shares[k] for k in sorted(shares, key=step_number)}


def gate_shares(sweep: Sweep) -> dict[str, dict[str, Stat]]:
  """Per group, the Stat over its finished runs of each step's open-gate share (`gate_share`);
  groups without a gate are left out."""
  out: dict[str, dict[str, Stat]] = {}
  for group in sweep.groups:
    shares = [gate_share(sweep.run_dir(r)) for r in sweep.runs if r.group == group
              and (sweep.run_dir(r) / 'results.json').is_file()]
    steps = sorted({k for s in shares for k in s}, key=step_number)
    if steps:
      out[group] = {k: stat([s[k] for s in shares if k in s]) for k in steps}
  return out


def wall_seconds(run_dir: pathlib.Path) -> tuple[float | None, str]:
  """A finished run's wall time: wall_time.json (written by the runner or launch/sweep.py), else
  the trainer's own `training.wall_seconds` in results.json (a run trained by `train` and copied
  into the sweep; a resumed run: its last attempt), else an estimate from the file times
  (config.json is written at start, results.json at end; a copy or a resume moves them)."""
  record = read_json(run_dir / 'wall_time.json')
  if record and 'seconds' in record:
    return float(record['seconds']), 'recorded'
  training = (read_json(run_dir / 'results.json') or {}).get('training')
  if isinstance(training, dict) and isinstance(training.get('wall_seconds'), (int, float)):
    return float(training['wall_seconds']), 'trainer'
  start, end = run_dir / 'config.json', run_dir / 'results.json'
  if start.is_file() and end.is_file():
    return end.stat().st_mtime - start.stat().st_mtime, 'file times'
  return None, 'unknown'


def wall_times(sweep: Sweep) -> dict[str, WallTime]:
  """The wall time per run of the finished runs of each group."""
  out = {}
  for group in sweep.groups:
    runs = [r for r in sweep.runs if r.group == group
            and (sweep.run_dir(r) / 'results.json').is_file()]
    timed = [wall_seconds(sweep.run_dir(r)) for r in runs]
    seconds = [s for s, _ in timed if s is not None]
    if seconds:
      sources = sorted({src for s, src in timed if s is not None})
      out[group] = WallTime(**dataclasses.asdict(stat(seconds)), source=sources)
  return out


def _planned(sweep: Sweep, run) -> dict[str, Any]:
  """The train.* budget fields of `run`'s own config (its --model-config file, if any)."""
  train = dataclasses.asdict(run_config(sweep, run).train)
  return {k: train[k] for k in BUDGET_FIELDS if k in train}


def _base_run(sweep: Sweep):
  """The run whose budget the table states: the first trained under the sweep's --config
  (not a --model-config file), else the first run; None for no runs."""
  return next((r for r in sweep.runs if not r.config), sweep.runs[0] if sweep.runs else None)


def budget(sweep: Sweep) -> tuple[dict[str, Any], list[str]]:
  """The planned training budget of the sweep's config, and a warning for every finished run
  trained with another budget than its own config plans (e.g. an earlier sweep into the same
  OUT with other --steps)."""
  base = _base_run(sweep)
  planned = _planned(sweep, base) if base is not None else {}
  warnings = []
  for run in sweep.runs:
    saved = (read_json(sweep.run_dir(run) / 'config.json') or {}).get('train')
    if not saved or not (sweep.run_dir(run) / 'results.json').is_file():
      continue
    own = _planned(sweep, run)
    diff = {k: saved.get(k) for k in own if saved.get(k) != own[k]}
    if diff:
      warnings.append(f'{run.name} was trained with train.{diff} instead of the planned budget')
  return planned, warnings


def row_budgets(sweep: Sweep, planned: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """The rows whose own config file (--model-config) plans another budget than `planned` (the
  sweep config's, from `budget`): row -> its config file ('config') and budget fields."""
  out = {}
  for run in sweep.runs:
    if run.config and run.group not in out:
      own = _planned(sweep, run)
      if own != planned:
        out[run.group] = {'config': run.config, **own}
  return out


@dataclasses.dataclass(frozen=True)
class Reference:
  """A row measured outside this project (e.g. launch/recbole_reference.py): one results.json per
  run, each with a `split` dict of metrics named as ours ('recall@50', 'ndcg@10'; others, such
  as RecBole's 'mrr@10', are not ours and are dropped), an optional 'seed' and 'wall_seconds'."""
  name: str
  files: list[str]
  seeds: list[int]
  metrics: list[dict[str, float]]
  wall_seconds: list[float]


def parse_reference(spec: str, split: str) -> Reference:
  """`NAME=GLOB` (a --reference flag) -> its runs; a one-line ConfigError when the flag is
  malformed, matches no file, or a file is unreadable or lacks the split."""
  name, sep, pattern = spec.partition('=')
  name, pattern = name.strip(), pattern.strip()
  if not sep or not name or not pattern:
    raise ConfigError(f'--reference {spec!r}: give NAME=GLOB, e.g. '
                      "'RecBole SASRec=runs/recbole/seed*/results.json'")
  files = [pathlib.Path(f) for f in sorted(glob.glob(pattern))]
  if not files:
    raise ConfigError(f'--reference {name}: no file matches {pattern!r}')
  keys = (split, 'best_valid') if split == 'valid' else (split,)
  seeds, metrics, walls = [], [], []
  for i, path in enumerate(files):
    record = read_json(path)
    found = next((record[k] for k in keys if isinstance(record, dict)
                  and isinstance(record.get(k), dict)), None)
    if found is None:
      raise ConfigError(f'--reference {name}: {path} is not a JSON object with a '
                        f'{" or ".join(repr(k) for k in keys)} dict of metrics')
    try:
      kept = {k: float(v) for k, v in found.items() if k in METRIC_NAMES}
      seed = int(record.get('seed', i))
    except (TypeError, ValueError):
      raise ConfigError(f'--reference {name}: {path}: a metric or the seed is not a number') \
          from None
    if not kept:
      raise ConfigError(f'--reference {name}: {path} has none of the metrics '
                        f'{", ".join(METRIC_NAMES)} under {keys[0]!r}')
    metrics.append(kept)
    seeds.append(seed)
    if isinstance(record.get('wall_seconds'), (int, float)):
      walls.append(float(record['wall_seconds']))
  return Reference(name, [str(f) for f in files], seeds, metrics, walls)


def parse_references(specs: list[str], split: str, rows: tuple[str, ...]) -> tuple[Reference, ...]:
  """Every --reference flag (`parse_reference`), each named unlike `rows` and the others."""
  references, names = [], list(rows)
  for spec in specs:
    ref = parse_reference(spec, split)
    if ref.name in names:
      raise ConfigError(f'--reference {ref.name}: a row of that name is already in the table')
    references.append(ref)
    names.append(ref.name)
  return tuple(references)
