"""Metrics as JSON lines and TensorBoard events, written by process 0 only."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax


class MetricWriter:
  """Appends `{"step": N, "split": ..., name: value, ...}` lines to WORKDIR/metrics.jsonl and
  the same scalars to TensorBoard event files under WORKDIR/tensorboard."""

  def __init__(self, workdir: pathlib.Path):
    self._active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._file = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    if not self._active:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
    self._file.flush()
    for name, value in values.items():
      self._tb.add_scalar(f'{split}/{name}', value, step)

  def close(self) -> None:
    if self._active:
      self._file.close()
      self._tb.close()
