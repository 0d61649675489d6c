"""Training: the jitted sharded step, the loop, checkpoints, validation and the final test.

    python -m heterrec_jax.train [--config FILE] [--workdir DIR] [key=value ...]

With no arguments it trains `configs/default.py`'s setting (the built-in synthetic data) into
`runs/default`. Overrides are dotted config fields, e.g. `model.n1=3 train.steps=200`. A run
resumes from the latest checkpoint in its workdir. It writes WORKDIR/metrics.jsonl, TensorBoard
events, checkpoints, WORKDIR/results.json, and prints the results beside the popularity floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from heterrec_jax import compile_cache, evaluate as evaluate_lib
from heterrec_jax import losses, metrics, negatives, sharding, state as state_lib
from heterrec_jax.checkpoint import Checkpointer
from heterrec_jax.config import Config, ConfigError, apply_overrides, horizon, load_config
from heterrec_jax.data import pipeline, splits
from heterrec_jax.data.dataset import DatasetError
from heterrec_jax.writers import MetricWriter

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'default.py'


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; nothing was checkpointed after it."""


def batch_shardings(tstate: state_lib.TrainState, batch: dict[str, Any]) -> dict[str, Any]:
  return {k: sharding.batch_sharding(tstate.mesh, np.ndim(v)) for k, v in batch.items()}


def make_train_step(tstate: state_lib.TrainState, example_batch: dict[str, Any],
                    decorate: Callable = lambda f: f) -> Callable:
  """One jitted step `(state, batch) -> (state, aux)` with in/out shardings, state donated.

  `decorate` wraps the Python step before jit (tests pass `chex.assert_max_traces`).
  """
  graphdef, cfg = tstate.graphdef, tstate.cfg
  compute_loss = losses.make(cfg, tstate.model(), tstate.dataset.item_tokens,
                             training_log_freq(tstate.dataset))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), optimizer.step[...])

    def loss_fn(model):
      return compute_loss(model, batch, rng)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    aux = {**aux, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return nnx.state((model, optimizer)), aux

  return jax.jit(decorate(step), in_shardings=(tstate.shardings, batch_shardings(tstate, example_batch)),
                 out_shardings=(tstate.shardings, None), donate_argnums=0)


def training_log_freq(dataset) -> np.ndarray:
  """log of each item's share of the training events (the log-Q correction's popularity)."""
  split = splits.dataset_split(dataset)
  train_E = splits.training_events(split, dataset.schema.n_events)
  return negatives.training_log_freq(dataset.items, train_E, dataset.schema.n_items)


def train_iterator(cfg: Config, tstate: state_lib.TrainState):
  dataset = pipeline.train_dataset(
      tstate.dataset, max_len=cfg.data.max_len, horizon=horizon(cfg.model.name, cfg.loss),
      batch_size=per_process_batch(cfg), seed=cfg.data.seed, window=cfg.data.window,
      stride=cfg.data.stride,
      process_index=jax.process_index(), process_count=jax.process_count(),
      workers=cfg.data.workers)
  return iter(dataset)


def per_process_batch(cfg: Config) -> int:
  if cfg.train.batch_size % jax.process_count():
    raise ConfigError(f'train.batch_size={cfg.train.batch_size} must divide by the '
                      f'{jax.process_count()} processes')
  return cfg.train.batch_size // jax.process_count()


@dataclasses.dataclass
class Progress:
  """What a checkpoint records beside the state: enough to resume the loop exactly."""
  step: int = 0
  best_metric: float = -math.inf
  best_step: int = -1
  bad_evals: int = 0
  stopped_early: bool = False


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _finite_or_raise(step: int, aux: dict[str, Any]) -> dict[str, float]:
  values = {k: float(v) for k, v in aux.items()}
  if not math.isfinite(values['loss']):
    raise TrainingDiverged(
        f'loss is {values["loss"]} at step {step}; stopping before anything is checkpointed. '
        'Try a lower optim.lr, a larger loss.tau or model.compute_dtype=float32.')
  return values


class Trainer:
  """The training loop of one run in one workdir."""

  def __init__(self, cfg: Config, workdir: pathlib.Path, progress: bool = True):
    self.cfg, self.workdir, self.progress = cfg, workdir, progress
    compile_cache.enable(cfg.train.compile_cache_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / 'checkpoints').is_dir():
      state_lib.check_resumable(cfg, workdir)
    if jax.process_index() == 0:
      state_lib.save_config(cfg, workdir)
    dataset = state_lib.load_dataset(cfg, workdir, progress)
    mesh = sharding.make_mesh(cfg.mesh)
    self.tstate = state_lib.build_state(cfg, dataset, mesh)
    self.data_iter = train_iterator(cfg, self.tstate)
    self.latest = Checkpointer(workdir / 'checkpoints', keep=cfg.train.keep_checkpoints)
    self.best = Checkpointer(workdir / 'best', keep=1)
    self.writer = MetricWriter(workdir)
    self.record = Progress()
    self._resume()

  def _resume(self) -> None:
    step = self.latest.latest_step()
    if step is None:
      return
    self.tstate.state, record = self.latest.restore(step, self.tstate.abstract(), self.data_iter)
    self.record = Progress(**record)
    if self.progress:
      print(f'resumed from {self.latest.directory}/{step}', file=sys.stderr)

  def save(self) -> None:
    self.latest.save(self.record.step, self.tstate.state, dataclasses.asdict(self.record),
                     self.data_iter)

  def validate(self) -> bool:
    """Validates; saves the best state; returns True when early stopping says stop."""
    cfg, rec = self.cfg.train, self.record
    results = evaluate_lib.evaluate(self.tstate, 'valid')
    self.writer.write(rec.step, 'valid', results)
    if results[cfg.early_stop_metric] > rec.best_metric:
      rec.best_metric, rec.best_step, rec.bad_evals = results[cfg.early_stop_metric], rec.step, 0
      self.best.save(rec.step, self.tstate.state, dataclasses.asdict(rec))
    else:
      rec.bad_evals += 1
    rec.stopped_early = bool(cfg.patience and rec.bad_evals >= cfg.patience)
    return rec.stopped_early

  def run(self, stop_after: int | None = None) -> str:
    """Trains to train.steps (or early stop); `stop_after` steps at most in this call, as if
    killed there (for tests). Returns 'done', 'preempted' or 'interrupted'."""
    cfg = self.cfg.train
    step_fn, pending = None, None
    preemption = _Preemption()
    bar = tqdm(total=cfg.steps, initial=self.record.step, disable=not self.progress,
               desc='train', dynamic_ncols=True)
    t0, steps_done = time.perf_counter(), 0
    try:
      while self.record.step < cfg.steps and not self.record.stopped_early:
        batch = sharding.global_batch(next(self.data_iter), self.tstate.mesh)
        step_fn = step_fn or make_train_step(self.tstate, batch)
        self.tstate.state, aux = step_fn(self.tstate.state, batch)
        self.record.step += 1
        steps_done += 1
        if pending is not None:  # step N-1's metrics, read after step N was dispatched
          self._log(*pending, steps_done / (time.perf_counter() - t0), bar)
        pending = (self.record.step, aux)
        if self._boundary(pending, preemption, stop_after, steps_done):
          return 'preempted' if preemption.requested else 'interrupted'
      if pending is not None:
        self._log(*pending, steps_done / max(time.perf_counter() - t0, 1e-9), bar)
      self.save()
      return 'done'
    finally:
      preemption.restore()
      bar.close()

  def _boundary(self, pending, preemption, stop_after, steps_done) -> bool:
    """Checkpoints, validates and handles preemption after a step; True means leave now."""
    step, cfg = self.record.step, self.cfg.train
    leave = preemption.requested or (stop_after is not None and steps_done >= stop_after)
    leave = leave or self.latest.reached_preemption(step)
    at_eval = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
    at_ckpt = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
    if leave or at_eval or at_ckpt:
      _finite_or_raise(step, pending[1])  # never checkpoint a diverged state
    if at_eval and self.validate():
      return False
    if leave or at_ckpt:
      self.save()
    return leave

  def _log(self, step: int, aux: dict[str, Any], steps_per_s: float, bar) -> None:
    values = _finite_or_raise(step, aux)
    bar.update(step - bar.n)
    bar.set_postfix(loss=f'{values["loss"]:.4f}', refresh=False)
    if step % max(self.cfg.train.log_every, 1) == 0 or step == self.cfg.train.steps:
      self.writer.write(step, 'train', {**values, 'steps_per_s': steps_per_s})

  def final_results(self) -> dict[str, dict[str, float]]:
    """Validation and test of the best state (the latest when never validated)."""
    state = self.tstate.state
    if self.best.latest_step() is not None:
      state, _ = self.best.restore(self.best.latest_step(), self.tstate.abstract())
    return {split: evaluate_lib.evaluate(self.tstate, split, state, progress=self.progress)
            for split in ('valid', 'test')}

  def close(self) -> None:
    self.writer.close()
    self.latest.close()
    self.best.close()


def train(cfg: Config, workdir: pathlib.Path, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the results written to results.json."""
  trainer = Trainer(cfg, workdir, progress)
  try:
    status = trainer.run(stop_after)
    if status != 'done':
      return {'status': status, 'step': trainer.record.step}
    results = trainer.final_results()
    floor = {s: evaluate_lib.popularity(cfg, trainer.tstate.dataset, s) for s in results}
    trainer.writer.write(trainer.record.step, 'test', results['test'])
  finally:
    trainer.close()
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    (workdir / 'popularity.json').write_text(json.dumps(floor, indent=1) + '\n')
  return {'status': 'done', 'step': trainer.record.step, **results, 'popularity': floor}


def results_table(cfg: Config, out: dict[str, Any]) -> str:
  rows = {}
  for split in ('valid', 'test'):
    rows[f'{cfg.model.name} ({split})'] = out[split]
    rows[f'popularity ({split})'] = out['popularity'][split]
  return metrics.format_table(rows)


def parse_args(argv: list[str] | None) -> tuple[Config, pathlib.Path]:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.train', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=str(DEFAULT_CONFIG),
                      help='a Python file exporting get_config() (default: configs/default.py)')
  parser.add_argument('--workdir', default=None,
                      help='where checkpoints, metrics and results go (default: runs/CONFIG_NAME)')
  parser.add_argument('overrides', nargs='*', help='dotted overrides such as model.n1=3')
  args = parser.parse_args(argv)
  cfg = apply_overrides(load_config(args.config), args.overrides)
  workdir = pathlib.Path(args.workdir or f'runs/{pathlib.Path(args.config).stem}')
  return cfg, workdir


def main(argv: list[str] | None = None) -> int:
  sharding.maybe_initialize_distributed()
  try:
    cfg, workdir = parse_args(argv)
    out = train(cfg, workdir)
  except (ConfigError, DatasetError, TrainingDiverged) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if out['status'] != 'done':
    print(f'{out["status"]} at step {out["step"]}; checkpoint saved in {workdir}/checkpoints; '
          'run the same command again to resume', file=sys.stderr)
    return 0
  if jax.process_index() == 0:
    print(results_table(cfg, out))
    print(f'results: {workdir}/results.json', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
