"""The runs of a sweep: their names and overrides, the per-row tuning of one field, the train
commands and OUT/plan.txt. Nothing here trains or gathers."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import sys
from typing import Any, Iterable

from heterrec_jax.config import Config, ConfigError, apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# The default config as written in plan commands: config.DEFAULT_CONFIG relative to the repository.
COMMAND_CONFIG = 'configs/default.py'
POPULARITY = 'popularity'
DEFAULT_MODELS = 'heterrec,sasrec,bert4rec,pinnerformer,hstu,popularity'
# How the rows (models and variants) are named in tables and plots.
DISPLAY = {'heterrec': 'HeterRec (ours)', 'sasrec': 'SASRec', 'bert4rec': 'BERT4Rec',
           'pinnerformer': 'PinnerFormer', 'hstu': 'HSTU', POPULARITY: 'Popularity',
           'full': 'HeterRec', 'no_htfl': 'w/o HTFL', 'no_mfk': '— w/o MFK',
           'no_hct': 'w/o HCT', 'no_lmp': 'w/o LMP', 'no_tlmp': 'w/o t-LMP',
           'no_id_vector': 'w/o free vector', 'no_positions': 'w/o item positions',
           'no_smoothing': 'w/o label smoothing', 'no_seen_bias': 'w/o seen-item term'}
# Ablation rows beside the paper's variants: the full model with one option that the config turns
# on switched off (issue 11: every kept change has its own row). Row -> (field, value when off).
OPTION_ABLATIONS = {'no_id_vector': ('model.item_id_vector', 'false'),
                    'no_positions': ('model.item_positions', 'false'),
                    'no_smoothing': ('loss.label_smoothing', '0'),
                    'no_seen_bias': ('model.seen_bias', 'false')}
# Config groups --tune may choose per row (not the data, budget or selection metric).
TUNABLE = ('model.', 'loss.', 'optim.')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str  # its folder, OUT/runs/NAME
  group: str  # the table row (model or variant) or the scaling point 'VARIANT-N1xN2'
  seed: int
  overrides: tuple[str, ...]  # the overrides only this run has, in command order
  config: str = ''  # its own config file (compare --model-config); '' = the sweep's


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
class TuningRow:
  """The tuning of one row: the validation score of its seed-0 run at each value (None while
  unfinished) and the chosen value (None until every value has finished)."""
  scores: dict[str, float | None]
  chosen: str | None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The runs of one experiment and what they share."""
  kind: str  # 'compare', 'ablation' or 'scaling'
  config: str  # the config file, as written in the commands
  out: pathlib.Path
  common: tuple[str, ...]  # overrides every run gets: data.path, train.steps, the user's
  # One run per (row, seed) without the tuned field: with no tuning these are the runs; with a
  # Tuning, `tuning_runs` and `tuned` derive the real ones from them.
  base_runs: tuple[Run, ...]
  groups: tuple[str, ...]  # rows (models or variants) or scaling points, in order
  proposed: str = 'heterrec'  # the row the gain is computed for ('full' in the ablation)
  tuning: Tuning | None = None

  @property
  def runs(self) -> tuple[Run, ...]:
    """The runs to train and gather; a sweep still tuning has none yet (see `tuned`)."""
    if self.tuning is not None:
      raise ValueError('a tuning sweep has no final runs before `tuned(sweep)` chooses values')
    return self.base_runs

  def run_dir(self, run: Run) -> pathlib.Path:
    return self.out / 'runs' / run.name


def read_json(path: pathlib.Path) -> Any:
  """The JSON in `path`, or None when it is missing or unreadable (a run still writing it)."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


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


def compare_runs(models: list[str], seeds: int,
                 configs: dict[str, str] | None = None) -> list[Run]:
  """One run per (model, seed); popularity is not trained. `configs` maps a model to its own
  config file (its reference settings), used instead of the sweep's."""
  configs = configs or {}
  return [Run(f'{m}-seed{s}', m, s, (f'model.name={m}', f'train.seed={s}'), configs.get(m, ''))
          for m in models if m != POPULARITY for s in range(seeds)]


def parse_model_configs(items: list[str], models: list[str]) -> dict[str, str]:
  """'NAME=FILE' pairs of --model-config; NAME must be a row, FILE a readable config."""
  out = {}
  for item in items:
    name, sep, path = item.partition('=')
    if not sep or not path:
      raise ConfigError(f'--model-config {item!r} must look like NAME=CONFIG_FILE')
    if name not in models or name == POPULARITY:
      raise ConfigError(f'--model-config {item!r}: {name!r} is not a trained row of --models '
                        f'{models}')
    load_config(resolve_config(path))  # a missing or bad file fails before anything runs
    out[name] = path
  return out


def _option_off(row: str) -> str:
  """The override of an OPTION_ABLATIONS row, e.g. 'model.item_positions=false'."""
  field, off = OPTION_ABLATIONS[row]
  return f'{field}={off}'


def _ablation_overrides(row: str) -> tuple[str, ...]:
  """A paper variant, or the full model with the option of an OPTION_ABLATIONS row off."""
  if row in OPTION_ABLATIONS:
    return ('model.variant=full', _option_off(row))
  return (f'model.variant={row}',)


def ablation_runs(variants: list[str], seeds: int) -> list[Run]:
  return [Run(f'heterrec-{v}-seed{s}', v, s,
              ('model.name=heterrec', *_ablation_overrides(v), f'train.seed={s}'))
          for v in variants for s in range(seeds)]


def check_options_on(config: Config, rows: list[str]) -> None:
  """Every OPTION_ABLATIONS row among `rows` must switch off an option `config` has on: a row
  whose option is already off would train the full model again under another name."""
  for row in rows:
    if row in OPTION_ABLATIONS and apply_overrides(config, [_option_off(row)]) == config:
      field, off = OPTION_ABLATIONS[row]
      raise ConfigError(f'--variants {row}: the config has {field}={off} already (off), so the '
                        f'row would repeat the full model; drop the row or turn {field} on')


def point_name(variant: str, n1: int, n2: int) -> str:
  return f'{variant}-{n1}x{n2}'


def scaling_runs(grid: list[tuple[int, int]], variants: list[str], seeds: int) -> list[Run]:
  return [Run(f'{point_name(v, n1, n2)}-seed{s}', point_name(v, n1, n2), s,
              ('model.name=heterrec', f'model.variant={v}', f'model.n1={n1}',
               f'model.n2={n2}', f'train.seed={s}'))
          for v in variants for n1, n2 in grid for s in range(seeds)]


def with_value(run: Run, tuning: Tuning, value: str) -> Run:
  """`run` with the tuned field set to `value` (its name says the value)."""
  stem = run.name.rpartition('-seed')[0]
  return dataclasses.replace(run, name=f'{stem}-{tuning.tag(value)}-seed{run.seed}',
                             overrides=run.overrides + (f'{tuning.field}={value}',))


def tuning_runs(sweep: Sweep) -> list[Run]:
  """The seed-0 run of every row at every value of the tuned field (none without --tune)."""
  if sweep.tuning is None:
    return []
  return [with_value(run, sweep.tuning, value) for run in sweep.base_runs if run.seed == 0
          for value in sweep.tuning.values]


def _chosen(scores: dict[str, float | None]) -> str | None:
  """The value with the best score (the first listed on a tie); None while one is unfinished."""
  if any(v is None for v in scores.values()):
    return None
  return max(scores, key=lambda v: (scores[v], -list(scores).index(v)))


def tuning_choices(sweep: Sweep) -> dict[str, TuningRow]:
  """Per row, the validation score of its seed-0 run at each value and the chosen value."""
  scores: dict[str, dict[str, float | None]] = {}
  for run in sweep.base_runs:
    if run.seed != 0:
      continue
    for value in sweep.tuning.values:
      results = read_json(sweep.run_dir(with_value(run, sweep.tuning, value)) / 'results.json')
      score = (results or {}).get('valid', {}).get(sweep.tuning.metric)
      scores.setdefault(run.group, {})[value] = score
  return {group: TuningRow(row, _chosen(row)) for group, row in scores.items()}


def tuned(sweep: Sweep) -> Sweep:
  """The sweep whose runs are the table's: every seed of a row at its chosen value. A row whose
  tuning has not finished keeps no runs (the table lists its tuning runs as missing)."""
  if sweep.tuning is None:
    return sweep
  choices = tuning_choices(sweep)
  runs = [with_value(run, sweep.tuning, choices[run.group].chosen) for run in sweep.base_runs
          if run.group in choices and choices[run.group].chosen is not None]
  return dataclasses.replace(sweep, base_runs=tuple(runs), tuning=None)


def resolve_config(path: str) -> str:
  """The config file to load: as given, else relative to the repository root."""
  if pathlib.Path(path).is_file() or not (ROOT / path).is_file():
    return path
  return str(ROOT / path)


def run_overrides(sweep: Sweep, run: Run) -> list[str]:
  """Per-run overrides first, then the shared ones (data.path, train.steps, the user's)."""
  return list(run.overrides) + list(sweep.common)


def load_with(config: str, overrides: list[str]) -> Config:
  """The config file `config` (see `resolve_config`) with `overrides` applied."""
  return apply_overrides(load_config(resolve_config(config)), overrides)


def run_config(sweep: Sweep, run: Run) -> Config:
  return load_with(run.config or sweep.config, run_overrides(sweep, run))


def command(sweep: Sweep, run: Run) -> str:
  """The shell command that trains `run` (what plan.txt holds)."""
  argv = ['python', '-m', 'heterrec_jax.train', '--config', run.config or sweep.config,
          '--workdir', str(sweep.run_dir(run)), *run_overrides(sweep, run)]
  return shlex.join(argv)


def check_configs(sweep: Sweep) -> None:
  """Builds every run's config, so that a bad override fails before anything runs."""
  for run in sweep.base_runs + tuple(tuning_runs(sweep)):
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
