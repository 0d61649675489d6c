"""The paper's Table 1 (compare) and Table 2 (ablation) from the finished runs of a sweep:
mean ± std per row and column, the best other row per column and the proposed row's gain over it,
the per-row tuning, wall times and the budget; written as OUT/table.json and OUT/table.md."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from heterrec_jax.experiments.gather import (STD_DDOF, Reference, Stat, WallTime, budget, collect,
                                             gate_shares, metric_label, row_budgets, stat,
                                             step_number, summarize, wall_seconds, wall_times)
from heterrec_jax.experiments.sweep import (DISPLAY, POPULARITY, Sweep, TuningRow, tuned,
                                            tuning_choices, tuning_runs)

# Table columns: the paper's Recall/nDCG@{50,100,200}, plus @10 and MRR.
COLUMNS = ('recall@10', 'recall@50', 'recall@100', 'recall@200',
           'ndcg@10', 'ndcg@50', 'ndcg@100', 'ndcg@200', 'mrr')


@dataclasses.dataclass(frozen=True)
class Best:
  """The best row other than the proposed one in a column, and its mean."""
  row: str
  mean: float


@dataclasses.dataclass(frozen=True)
class TuningSummary:
  """How the tuned field was chosen per row (table.json's 'tuning')."""
  field: str
  values: list[str]
  metric: str  # the validation metric the choice is made on
  rows: dict[str, TuningRow]
  missing: list[str]  # unfinished tuning runs, then every other missing run (see build_table)
  wall_time_s: dict[str, float]  # per row, the summed wall time of its tuning runs
  at_grid_edge: list[str]  # the rows whose chosen value is the first or last value tried


@dataclasses.dataclass(frozen=True)
class Table:
  """Table 1 or Table 2; `dataclasses.asdict` of it is table.json."""
  columns: list[str]
  rows: dict[str, dict[str, Stat]]  # rows[ROW][METRIC], rows in sweep order
  proposed: str  # the row the gains are for
  best_baseline: dict[str, Best]  # per column
  gain_percent: dict[str, float | None]  # per column, over the best other row
  gain_over_percent: dict[str, dict[str, float | None]]  # [ROW][METRIC], over every other row
  kind: str  # 'compare' or 'ablation'
  split: str
  seeds: dict[str, list[int]]  # per row, the seeds gathered (none for popularity)
  missing: list[str]  # the runs not finished (and 'popularity' when its floor is unknown)
  budget: dict[str, Any]  # the planned train.* budget fields
  warnings: list[str]  # finished runs trained with another budget
  config: str
  overrides: list[str]  # the overrides every run shares
  std_ddof: int
  wall_time_s: dict[str, WallTime]
  tuning: TuningSummary | None
  # Per row with an LMP margin gate, the open share of each step's queries (gather.gate_share).
  gate_open: dict[str, dict[str, Stat]]
  # Rows whose own config (--model-config) plans another budget than `budget`: row -> its
  # config file ('config') and budget fields.
  row_budgets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  # Rows measured outside the sweep (--reference): row -> the results.json files it gathers.
  # They count as baselines (the best other row per column may be one).
  references: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def gain_percent(proposed: float | None, baseline: float | None) -> float | None:
  """Relative gain (proposed - baseline) / baseline in percent, sign kept; None if undefined."""
  if proposed is None or baseline is None or baseline == 0:
    return None
  return (proposed - baseline) / baseline * 100.0


def best_baselines(rows: dict[str, dict[str, Stat]], proposed: str) -> dict[str, Best]:
  """Per column, the row other than `proposed` with the highest mean (popularity included)."""
  best = {}
  for column in COLUMNS:
    candidates = [(r[column].mean, name) for name, r in rows.items()
                  if name != proposed and column in r]
    if candidates:
      mean, name = max(candidates)
      best[column] = Best(name, mean)
  return best


def _mean(row: dict[str, Stat], column: str) -> float | None:
  return row[column].mean if column in row else None


def gains(rows: dict[str, dict[str, Stat]], proposed: str,
          best: dict[str, Best]) -> tuple[dict[str, float | None], dict[str, dict]]:
  """The proposed row's gain over the best other row per column, and over every other row."""
  mine = rows.get(proposed, {})
  gain = {c: gain_percent(_mean(mine, c), best[c].mean if c in best else None) for c in COLUMNS}
  gain_over = {name: {c: gain_percent(_mean(mine, c), _mean(row, c)) for c in COLUMNS}
               for name, row in rows.items() if name != proposed}
  return gain, gain_over


def tuning_summary(sweep: Sweep) -> TuningSummary | None:
  """The tuned field, its values and metric, per row the validation score of each value and the
  chosen one, the unfinished tuning runs, and the summed wall time of each row's tuning runs."""
  if sweep.tuning is None:
    return None
  runs = tuning_runs(sweep)
  seconds: dict[str, float] = {}
  for run in runs:
    s, _ = wall_seconds(sweep.run_dir(run))
    if s is not None:
      seconds[run.group] = seconds.get(run.group, 0.0) + s
  missing = [r.name for r in runs if not (sweep.run_dir(r) / 'results.json').is_file()]
  rows = tuning_choices(sweep)
  ends = (sweep.tuning.values[0], sweep.tuning.values[-1])
  edge = [name for name, row in rows.items() if row.chosen in ends]
  return TuningSummary(sweep.tuning.field, list(sweep.tuning.values), sweep.tuning.metric, rows,
                       missing, seconds, edge)


def _rows(sweep: Sweep, split: str, floor: dict | None) -> tuple[
    dict[str, dict[str, Stat]], dict[str, list[int]], list[str]]:
  """Per row of `sweep` (tuned), the Stat of each metric and the seeds gathered; and the missing
  runs, with 'popularity' when it is a row and `floor` has no `split`."""
  found, missing = collect(sweep, split)
  rows, seeds = {}, {}
  for group in sweep.groups:
    if group == POPULARITY:
      if floor and split in floor:
        rows[group], seeds[group] = summarize([floor[split]]), []
      else:
        missing.append(POPULARITY)
    elif found.get(group):
      rows[group] = summarize([m for _, m in found[group]])
      seeds[group] = sorted(s for s, _ in found[group])
  return rows, seeds, missing


def _add_references(references: tuple[Reference, ...], rows: dict[str, dict[str, Stat]],
                    seeds: dict[str, list[int]],
                    walls: dict[str, WallTime]) -> dict[str, list[str]]:
  """Adds each --reference row (named unlike every other: `gather.parse_references`) after the
  sweep's rows, in place; returns row -> files."""
  files = {}
  for ref in references:
    rows[ref.name], seeds[ref.name] = summarize(ref.metrics), ref.seeds
    if ref.wall_seconds:
      walls[ref.name] = WallTime(**dataclasses.asdict(stat(ref.wall_seconds)),
                                 source=['results.json'])
    files[ref.name] = ref.files
  return files


def build_table(sweep: Sweep, split: str, floor: dict | None,
                references: tuple[Reference, ...] = ()) -> Table:
  """Gathers the finished runs of a compare/ablation sweep (`floor`: the popularity floor's
  results, or None) and the `references` rows into the table."""
  tuning = tuning_summary(sweep)
  # One list, extended in place: table.json has always listed every missing run (not only the
  # unfinished tuning runs) under tuning.missing too.
  missing = tuning.missing if tuning else []
  sweep = tuned(sweep)
  rows, seeds, missing_runs = _rows(sweep, split, floor)
  missing.extend(missing_runs)
  walls = wall_times(sweep)
  files = _add_references(references, rows, seeds, walls)
  best = best_baselines(rows, sweep.proposed)
  gain, gain_over = gains(rows, sweep.proposed, best)
  plan, warnings = budget(sweep)
  return Table(list(COLUMNS), rows, sweep.proposed, best, gain, gain_over, sweep.kind, split,
               seeds, missing, plan, warnings, sweep.config, list(sweep.common), STD_DDOF,
               walls, tuning, gate_shares(sweep), row_budgets(sweep, plan), files)


def format_gain(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:+.2f}%'


def _display(row: str) -> str:
  return DISPLAY.get(row, row)


def _with_spread(mean: float, spread: float, n: int, digits: int) -> str:
  """`mean ± spread`; one run has no spread, so its value stands alone (a '± 0.0000' would read
  as an exact figure)."""
  text = f'{mean:.{digits}f}'
  return f'{text} ± {spread:.{digits}f}' if n > 1 else text


def _cell(table: Table, name: str, column: str) -> str:
  stat = table.rows[name].get(column)
  if stat is None:
    return 'n/a'
  spread = stat.se if table.kind == 'ablation' else stat.std
  text = _with_spread(stat.mean, spread, stat.n, 4)
  best = table.best_baseline.get(column)
  return f'_{text}_' if best and best.row == name else text


def _row_order(table: Table) -> list[str]:
  """The other rows in sweep order, then the proposed row (as in the paper's tables)."""
  others = [n for n in table.rows if n != table.proposed]
  return others + ([table.proposed] if table.proposed in table.rows else [])


def _budget_text(b: dict[str, Any]) -> str:
  stop = (f'early stopping after {b.get("patience")} validations without a better '
          f'{b.get("early_stop_metric")}' if b.get('patience') else 'no early stopping')
  return (f'at most {b.get("steps")} steps of batch {b.get("batch_size")}, validation every '
          f'{b.get("eval_every")} steps, {stop}')


def _budget_line(table: Table) -> str:
  b = table.budget
  if not b:
    return 'Budget: no trained rows.'
  own = ''.join(f' {_display(row)} (`{rb["config"]}`): {_budget_text(rb)}.'
                for row, rb in table.row_budgets.items())
  scope = 'every run' if not own else 'every run but the rows named after it'
  return (f'Budget ({scope}): {_budget_text(b)}; the best validation checkpoint is tested. '
          f'Config `{table.config}`, overrides `{" ".join(table.overrides) or "none"}`.{own}')


def _method(table: Table, name: str) -> str:
  """The row's display name, with its tuned value when the sweep tuned one."""
  row = table.tuning.rows.get(name) if table.tuning else None
  if row is None or not row.chosen:
    return _display(name)
  return f'{_display(name)}, {table.tuning.field.rpartition(".")[2]}={row.chosen}'


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table, the first column left-aligned and the others right-aligned."""
  return (['| ' + ' | '.join(head) + ' |', '| --- |' + ' ---: |' * (len(head) - 1)]
          + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _main_lines(table: Table) -> list[str]:
  """The title, the budget, the rows, the best other row and the gain per column."""
  what = 'Ablation' if table.kind == 'ablation' else 'Comparison'
  other = 'variant' if table.kind == 'ablation' else 'baseline'
  rows = [[_method(table, name), *[_cell(table, name, c) for c in COLUMNS],
           str(len(table.seeds[name]) if table.seeds[name] else 1)]
          for name in _row_order(table)]
  best = [_display(table.best_baseline[c].row) if c in table.best_baseline else 'n/a'
          for c in COLUMNS]
  gain = [format_gain(table.gain_percent[c]) for c in COLUMNS]
  spread = 'standard error' if table.kind == 'ablation' else 'std'
  return ([f'# {what} ({table.split} split, mean ± {spread} over seeds)', '',
           _budget_line(table), '']
          + _markdown_table(['Method', *[metric_label(c) for c in COLUMNS], 'n'], rows)
          + [f'| Best {other} | ' + ' | '.join(best) + ' | |',  # no n: an empty last cell
             '| Improvement | ' + ' | '.join(gain) + ' | |']
          + ['', f'Improvement: (HeterRec - best {other}) / best {other} x 100, per column, on '
             f'the means; the best {other} is in italics. std: ddof={table.std_ddof} over '
             'seeds' + ('; standard error: std / sqrt(n)' if table.kind == 'ablation' else '')
             + '; n: runs gathered (popularity is deterministic: one evaluation).']
          + _reference_lines(table))


def _reference_lines(table: Table) -> list[str]:
  """Where each --reference row comes from (its columns that are n/a were not measured)."""
  lines = []
  for name, files in table.references.items():
    lines += ['', f'{name}: measured outside this sweep, from '
              f'{", ".join(f"`{f}`" for f in files)}; n/a: a metric those files do not hold.']
  return lines


def _gate_lines(table: Table) -> list[str]:
  """The open-gate share per LMP step of the rows that have a margin gate."""
  if not table.gate_open:
    return []
  steps = sorted({k for row in table.gate_open.values() for k in row}, key=step_number)
  rows = []
  for name in _row_order(table) + [n for n in table.gate_open if n not in table.rows]:
    if name in table.gate_open:
      cells = [_gate_cell(table.gate_open[name].get(k)) for k in steps]
      rows.append([_display(name), *cells])
  return (['', '## Margin gate: share of queries whose step-k loss is counted', '',
           'Mean over the logged training steps in the second half of training up to the '
           'tested checkpoint, then mean ± standard error over seeds (SPEC 6: a position counts '
           'at step k > 1 only where exp(s+_{k-1} / tau) > exp(s+_k / tau) + lambda_m).', '']
          + _markdown_table(['Method', *[f'step {step_number(k)}' for k in steps]], rows))


def _tuning_lines(tuning: TuningSummary | None) -> list[str]:
  """The validation score of every tuning run, the chosen value in bold."""
  if not tuning:
    return []
  rows = []
  for name, row in tuning.rows.items():
    cells = []
    for value in tuning.values:
      score = row.scores.get(value)
      text = 'n/a' if score is None else f'{score:.4f}'
      cells.append(f'**{text}**' if value == row.chosen else text)
    seconds = tuning.wall_time_s.get(name)
    rows.append([_display(name), *cells, 'n/a' if seconds is None else f'{seconds:.0f}'])
  metric = metric_label(tuning.metric)
  lines = (['', f'## Tuning: validation {metric} of each row\'s seed-0 run', '',
            f'Each row is trained with the value of `{tuning.field}` whose seed-0 run has the '
            f'best validation {metric} (`train.early_stop_metric`); that run is also the row\'s '
            'seed 0 above.', '']
           + _markdown_table(['Method', *[f'{tuning.field}={v}' for v in tuning.values],
                              'tuning wall time (s)'], rows))
  if tuning.at_grid_edge:
    lines += ['', 'Chosen at an end of the values tried: '
              f'{", ".join(_display(n) for n in tuning.at_grid_edge)}. The best value may '
              'lie beyond it: widen `--tune` (finished runs are reused).']
  return lines


def _gate_cell(share: Stat | None) -> str:
  """One step's open-gate share: mean ± standard error."""
  return 'n/a' if share is None else _with_spread(share.mean, share.se, share.n, 3)


def _footer(table: Table) -> list[str]:
  """Wall time per row, the missing runs and the budget warnings."""
  lines = ['', '## Wall time per run (s)', '', '| Method | mean ± std | n | source |',
           '| --- | ---: | ---: | --- |']
  for name, w in table.wall_time_s.items():
    lines.append(f'| {_display(name)} | {_with_spread(w.mean, w.std, w.n, 1)} | {w.n} | '
                 f'{", ".join(w.source)} |')
  if table.missing:
    lines += ['', f'Missing runs (not finished): {", ".join(table.missing)}']
  for warning in table.warnings:
    lines += ['', f'Warning: {warning}']
  return lines


def markdown(table: Table) -> str:
  """The table in the layout of the paper's Table 1 (compare) or Table 2 (ablation)."""
  return '\n'.join(_main_lines(table) + _gate_lines(table) + _tuning_lines(table.tuning)
                   + _footer(table)) + '\n'


def write_table(out: pathlib.Path, table: Table) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / 'table.json').write_text(json.dumps(dataclasses.asdict(table), indent=1) + '\n')
  (out / 'table.md').write_text(markdown(table))
