"""Experiment sweeps: the baseline comparison (the paper's Table 1), the ablation (Table 2) and
the layer-scaling study (Figure 3), made only of `train.train` runs and their results.json.

    python -m heterrec_jax.experiments compare --data DIR --out OUT \\
        --models heterrec,sasrec,bert4rec,pinnerformer,hstu,popularity --seeds 3
    python -m heterrec_jax.experiments compare --data DIR --out OUT \\
        --variants full,no_htfl,no_mfk,no_hct,no_lmp,no_tlmp --seeds 3
    python -m heterrec_jax.experiments scaling --data DIR --out OUT --grid 1x1,1x2,2x2,3x3
    python -m heterrec_jax.experiments paired --a RUN [RUN ...] --b RUN [RUN ...]

Every run of a sweep gets the same config file and the same overrides (so the same train.steps,
batch size, validation schedule and early stopping); only the model, variant, layers and seed
differ. Runs go to OUT/runs/NAME; a run whose results.json exists is skipped, so running the
same command again resumes a sweep. `--plan-only` writes OUT/plan.txt (one train command per run,
for `launch/sweep.py`) and nothing else; `--gather` only builds the tables or the plot from the
finished runs. `paired` trains nothing: it ranks the users with two sets of finished runs and
gives each metric's difference with a bootstrap interval over the users (paired.py). See
docs/experiments.md.

`--tune loss.tau=0.05,0.1,0.2,0.5` (compare and ablation) gives every row its own value of one
field, chosen on validation: first the seed-0 run of each row at every value (OUT/runs/ROW-tauV-
seed0), then the value with the best validation `train.early_stop_metric` is trained with the
other seeds; the seed-0 run at the chosen value is reused, so tuning costs (values - 1) extra runs
per row. The table reports the chosen value per row and every tuning run's validation score.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from heterrec_jax.config import METRIC_NAMES, MODEL_NAMES, VARIANTS, ConfigError
from heterrec_jax.experiments import paired as paired_lib, runner, scaling as scaling_lib, tables
from heterrec_jax.experiments.gather import Reference, parse_references
from heterrec_jax.experiments.sweep import (COMMAND_CONFIG, DEFAULT_MODELS, OPTION_ABLATIONS,
                                            POPULARITY, TUNABLE, Sweep, Tuning, ablation_runs,
                                            check_configs, check_options_on,
                                            common_overrides, compare_runs, load_with, parse_grid,
                                            parse_list, parse_model_configs, parse_tune,
                                            scaling_runs, write_plan)


def _common_flags(parser: argparse.ArgumentParser, seeds: int) -> None:
  parser.add_argument('--data', default=None,
                      help='prepared dataset folder, given to every run as data.path '
                           '(default: the config\'s data.path)')
  parser.add_argument('--out', required=True, help='sweep folder: runs/, plan.txt, tables')
  parser.add_argument('--config', default=COMMAND_CONFIG,
                      help=f'config file of every run (default: {COMMAND_CONFIG})')
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
                            f'{",".join(VARIANTS)}; and the full model with one option '
                            f'of the config off: {",".join(OPTION_ABLATIONS)})')
  compare.add_argument('--tune', default=None, metavar='FIELD=V1,V2,...',
                       help='choose one config field per row on validation, e.g. '
                            'loss.tau=0.05,0.1,0.2,0.5 (seed-0 runs at every value, then the '
                            'other seeds at the best; default: no tuning)')
  compare.add_argument('--model-config', action='append', default=[], metavar='NAME=FILE',
                       help="a row's own config file instead of --config (its reference "
                            'settings), e.g. sasrec=configs/ml100k_sasrec.py; repeatable')
  compare.add_argument('--reference', action='append', default=[], metavar='NAME=GLOB',
                       help='a row measured outside this sweep, from the results.json files '
                            'GLOB matches (e.g. "RecBole SASRec=runs/recbole/seed*/results.json",'
                            ' written by launch/recbole_reference.py); counted as a baseline; '
                            'repeatable')
  _common_flags(compare, seeds=3)
  scaling = sub.add_parser('scaling', help='the (N1, N2) grid with and without HTFL (Figure 3)')
  scaling.add_argument('--grid', default='1x1,1x2,2x2,3x3', help='N1xN2 points (default: '
                       '1x1,1x2,2x2,3x3)')
  scaling.add_argument('--variants', default='full,no_htfl',
                       help='one line per variant (default: full,no_htfl)')
  scaling.add_argument('--metrics', default='recall@50,ndcg@50',
                       help='metrics plotted (default: recall@50,ndcg@50)')
  _common_flags(scaling, seeds=1)
  paired = sub.add_parser('paired', help='two models on the same users: each metric\'s '
                          'difference with a paired bootstrap interval over the users')
  paired.add_argument('--a', nargs='+', required=True, metavar='WORKDIR',
                      help='side A: one or more finished runs (e.g. its seeds)')
  paired.add_argument('--b', nargs='+', required=True, metavar='WORKDIR',
                      help='side B: one or more finished runs, on the same prepared dataset')
  paired.add_argument('--labels', default='A,B', metavar='A,B',
                      help='names of the two sides in the table (default: A,B)')
  paired.add_argument('--split', default='test', choices=('test', 'valid'),
                      help='the split ranked (default: test)')
  paired.add_argument('--resamples', type=int, default=10000,
                      help='bootstrap resamples of the users (default: 10000)')
  paired.add_argument('--level', type=float, default=0.95,
                      help='coverage of the interval (default: 0.95)')
  paired.add_argument('--seed', type=int, default=0, help='seed of the resampling (default: 0)')
  paired.add_argument('--out', default=None, metavar='FILE',
                      help='also write the figures to this JSON file')
  paired.add_argument('--quiet', action='store_true', help='no progress bars')
  return parser


RESERVED = ('model.name', 'model.variant', 'train.seed')  # fields every sweep sets per run


def _scaling_sweep(args: argparse.Namespace) -> Sweep:
  grid, variants = parse_grid(args.grid), parse_list('--variants', args.variants, VARIANTS)
  common = common_overrides(args.data, args.steps, args.overrides,
                            RESERVED + ('model.n1', 'model.n2'))
  runs = scaling_runs(grid, variants, args.seeds)
  groups = tuple(dict.fromkeys(r.group for r in runs))
  return Sweep('scaling', args.config, pathlib.Path(args.out), common, tuple(runs), groups,
               'full')


def _ablation_rows(args: argparse.Namespace) -> list[str]:
  """The rows of --variants (empty for the baseline table), checked against the other flags."""
  if args.variants is None:
    return []
  if args.model_config:
    raise ConfigError('--model-config names rows of --models; the ablation has one config')
  if args.models is not None:
    raise ConfigError('give --models (the baseline table) or --variants (the ablation), '
                      'not both')
  return parse_list('--variants', args.variants, VARIANTS + tuple(OPTION_ABLATIONS))


def _compare_sweep(args: argparse.Namespace) -> Sweep:
  """The baseline comparison (--models) or the ablation (--variants), tuned with --tune."""
  field, values = parse_tune(args.tune) if args.tune is not None else (None, ())
  if field is not None and not field.startswith(TUNABLE):
    raise ConfigError(f'--tune {field}: the data, budget and selection metric are the same for '
                      f'every row; tune a field of {", ".join(TUNABLE)}')
  variants = _ablation_rows(args)
  # The option rows set their fields per run: no shared override or tuning may set them too.
  options = tuple(OPTION_ABLATIONS[v][0] for v in variants if v in OPTION_ABLATIONS)
  if field in options:
    raise ConfigError(f'--tune {field}: a row of --variants switches {field} off itself')
  common = common_overrides(args.data, args.steps, args.overrides,
                            RESERVED + options + ((field,) if field else ()))
  base = load_with(args.config, list(common))
  tuning = Tuning(field, values, base.train.early_stop_metric) if field is not None else None
  out = pathlib.Path(args.out)
  if variants:
    check_options_on(base, variants)
    return Sweep('ablation', args.config, out, common, tuple(ablation_runs(variants, args.seeds)),
                 tuple(variants), 'full', tuning)
  models = parse_list('--models', args.models or DEFAULT_MODELS, MODEL_NAMES + (POPULARITY,))
  configs = parse_model_configs(args.model_config, models)
  return Sweep('compare', args.config, out, common,
               tuple(compare_runs(models, args.seeds, configs)), tuple(models), 'heterrec',
               tuning)


def make_sweep(args: argparse.Namespace) -> Sweep:
  """The sweep the command line describes (checked: names, grid, overrides)."""
  if args.seeds < 1:
    raise ConfigError(f'--seeds={args.seeds} must be >= 1')
  if args.steps is not None and args.steps < 1:
    raise ConfigError(f'--steps={args.steps} must be >= 1')
  return _scaling_sweep(args) if args.command == 'scaling' else _compare_sweep(args)


def report(sweep: Sweep, args: argparse.Namespace, compute_floor: bool,
           references: tuple[Reference, ...] = ()) -> list[str]:
  """Builds the outputs of a sweep from its finished runs and the `references` rows (computing
  the popularity floor when `compute_floor` and no run has it); returns the missing runs."""
  if sweep.kind == 'scaling':
    scaling = scaling_lib.build_scaling(sweep, args.split)
    metrics = parse_list('--metrics', args.metrics, METRIC_NAMES)
    scaling_lib.write_scaling(sweep.out, scaling, metrics)
    print(f'wrote {sweep.out}/scaling.json and {sweep.out}/scaling.png', file=sys.stderr)
    return scaling.missing
  floor = None
  if POPULARITY in sweep.groups:
    floor = runner.popularity_floor(sweep, compute_floor, progress=not args.quiet)
  table = tables.build_table(sweep, args.split, floor, references)
  tables.write_table(sweep.out, table)
  print(tables.markdown(table))
  print(f'wrote {sweep.out}/table.md and {sweep.out}/table.json', file=sys.stderr)
  return table.missing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """Flags and overrides in any order (overrides may come before and after flags)."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  unknown = [x for x in rest if x.startswith('-')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if args.command == 'paired':
    if rest:
      parser.error(f'paired takes no overrides (it trains nothing); got {" ".join(rest)}')
    return args
  args.overrides = list(args.overrides) + rest
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.command == 'paired':
    return paired_lib.run_command(args)
  try:
    sweep = make_sweep(args)
    # Read before any training, so that a bad --reference fails in a second, not after the runs.
    references = parse_references(getattr(args, 'reference', []), args.split, sweep.groups)
    if args.plan_only:
      path = write_plan(sweep)
      print(f'wrote {path} ({len(path.read_text().splitlines())} runs)', file=sys.stderr)
      return 0
    failed = []
    if not args.gather:
      check_configs(sweep)
      failed = runner.execute(sweep, progress=not args.quiet)
    missing = report(sweep, args, compute_floor=not args.gather, references=references)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if missing:
    print(f'missing runs ({len(missing)}): {", ".join(missing)}', file=sys.stderr)
  return 1 if failed else 0

