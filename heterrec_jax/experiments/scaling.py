"""The scaling study (the paper's Figure 3): per (variant, N1, N2) point, the layers, parameters,
training FLOPs and metrics of its finished runs; written as OUT/scaling.json and OUT/scaling.png."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from heterrec_jax import flops
from heterrec_jax.config import Config
from heterrec_jax.experiments.gather import (STD_DDOF, budget, collect, metric_label, summarize,
                                             train_records)
from heterrec_jax.experiments.sweep import DISPLAY, Sweep, read_json, run_config

# The x axes of the plot: a ScalingPoint field and its label.
PLOT_AXES = (('layers', 'total layers N1 + N2'), ('params', 'trainable parameters'),
             ('train_flops', 'training FLOPs'))


@dataclasses.dataclass(frozen=True)
class ScalingPoint:
  """One (variant, N1, N2) point over its finished seeds."""
  variant: str
  n1: int
  n2: int
  layers: int  # n1 + n2
  params: int | None  # None when the model cannot be built (see params_error)
  params_error: str | None
  train_flops: float | None  # mean over the seeds
  flops_source: list[str]  # 'recorded', 'analytic' or 'unavailable'
  seeds: list[int]  # the seeds gathered
  metrics: dict[str, float]  # mean over the seeds
  std: dict[str, float]
  missing: list[str]  # the point's runs not finished


@dataclasses.dataclass(frozen=True)
class Scaling:
  """scaling.json: the points, and what every run of the study shares."""
  split: str
  config: str
  overrides: list[str]
  budget: dict[str, Any]
  std_ddof: int
  points: list[ScalingPoint]
  missing: list[str]


def steps_trained(run_dir: pathlib.Path, planned: int) -> int:
  """The last training step in RUN/metrics.jsonl (early stopping may end a run early)."""
  records = train_records(run_dir)
  return int(records[-1]['step']) if records else planned


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
  return flops.analytic_train_flops(cfg, n_kinds, steps), 'analytic'


def scaling_point(sweep: Sweep, group: str, found: list[tuple[int, dict]]) -> ScalingPoint:
  """The layers, parameters, training FLOPs and metrics of a group's finished runs."""
  runs = [r for r in sweep.runs if r.group == group]
  cfg = run_config(sweep, runs[0])
  size = flops.model_size(cfg, sweep.run_dir(runs[0]))
  done = {s for s, _ in found}
  costs = [train_flops(cfg, sweep.run_dir(r), size.get('n_kinds')) for r in runs
           if r.seed in done] or [train_flops(cfg, sweep.run_dir(runs[0]), size.get('n_kinds'))]
  values = [f for f, _ in costs if f is not None]
  summary = summarize([m for _, m in found])
  return ScalingPoint(
      cfg.model.variant, cfg.model.n1, cfg.model.n2, cfg.model.n1 + cfg.model.n2,
      size.get('params'), size.get('error'), float(np.mean(values)) if values else None,
      sorted({src for _, src in costs}), sorted(done), {k: v.mean for k, v in summary.items()},
      {k: v.std for k, v in summary.items()}, [r.name for r in runs if r.seed not in done])


def build_scaling(sweep: Sweep, split: str) -> Scaling:
  found, missing = collect(sweep, split)
  points = [scaling_point(sweep, g, found.get(g, [])) for g in sweep.groups]
  return Scaling(split, sweep.config, list(sweep.common), budget(sweep)[0], STD_DDOF, points,
                 missing)


def _panel(ax: Axes, points: list[ScalingPoint], metric: str, key: str, xlabel: str,
           split: str) -> None:
  """One subplot: `metric` against the field `key`, one line per variant, std as error bars."""
  for variant in dict.fromkeys(p.variant for p in points):
    pts = sorted((p for p in points if p.variant == variant and getattr(p, key) is not None
                  and metric in p.metrics), key=lambda p: getattr(p, key))
    if pts:
      ax.errorbar([getattr(p, key) for p in pts], [p.metrics[metric] for p in pts],
                  yerr=[p.std[metric] for p in pts], marker='o', capsize=3,
                  label=DISPLAY.get(variant, variant))
  if key == 'layers':
    ax.xaxis.get_major_locator().set_params(integer=True)
  else:
    ax.set_xscale('log')
    # Within a decade or so matplotlib labels the minor ticks too (2x10^12, 3x10^12, ...):
    # slanted and smaller, they do not run into each other.
    ax.tick_params(axis='x', which='both', labelsize=8, labelrotation=30)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f'{metric_label(metric)} ({split})')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()


def plot_scaling(scaling: Scaling, metrics: list[str], path: pathlib.Path) -> None:
  """scaling.png: a row per metric, against layers, parameters and training FLOPs. A bare
  `Figure` renders to the file without pyplot (no backend to choose, no global figure state)."""
  fig = Figure(figsize=(13, 3.6 * len(metrics)))
  axes = fig.subplots(len(metrics), len(PLOT_AXES), squeeze=False)
  for r, metric in enumerate(metrics):
    for c, (key, xlabel) in enumerate(PLOT_AXES):
      _panel(axes[r][c], scaling.points, metric, key, xlabel, scaling.split)
  fig.suptitle('HeterRec scaling, with and without HTFL')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_scaling(out: pathlib.Path, scaling: Scaling, metrics: list[str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / 'scaling.json').write_text(json.dumps(dataclasses.asdict(scaling), indent=1) + '\n')
  plot_scaling(scaling, metrics, out / 'scaling.png')
