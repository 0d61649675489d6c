"""Training: the jitted sharded step, the loop, checkpoints, validation and the final test.

    python -m heterrec_jax.train [--config FILE] [--workdir DIR] [key=value ...]

With no arguments it trains `configs/default.py`'s setting (the built-in synthetic data) into
`runs/default`. Overrides are dotted config fields, e.g. `model.n1=3 train.steps=200`. A run
resumes from the newest checkpoint of its workdir that restores. It writes WORKDIR/metrics.jsonl,
TensorBoard events, checkpoints, WORKDIR/results.json, and prints the results beside the
popularity floor. Exit status: 0 done, 2 a one-line `error:` (bad input, diverged), 75 preempted
with the checkpoint saved (run the same command again); see docs/failure.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import host_allocator, lmp, losses, metrics, negatives, sharding
from heterrec_jax import run as run_lib
from heterrec_jax import workdir as workdir_lib
from heterrec_jax.checkpoint import CheckpointError, Checkpointer
from heterrec_jax.config import (DEFAULT_CONFIG, Config, ConfigError, apply_overrides,
                                 check_resumable, horizon, load_config, save_config)
from heterrec_jax.data import pipeline, splits
from heterrec_jax.data.dataset import DatasetError
from heterrec_jax.writers import MetricWriter


# Exit codes of `main` (documented in docs/failure.md).
EXIT_OK = 0
EXIT_ERROR = 2  # a clear one-line error: bad input, a diverged run, no restorable checkpoint
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted (SIGTERM), checkpoint saved; run again to resume

ERRORS = (ConfigError, DatasetError, CheckpointError, evaluate_lib.NonFiniteScores, OSError,
          workdir_lib.WorkdirError)


class TrainingDiverged(RuntimeError):
  """The loss or the state became NaN or infinite; nothing was checkpointed after it."""


def batch_shardings(run: run_lib.Run, batch: dict[str, Any]) -> dict[str, Any]:
  return {k: sharding.batch_sharding(run.mesh, np.ndim(v)) for k, v in batch.items()}


def make_train_step(run: run_lib.Run, example_batch: dict[str, Any],
                    decorate: Callable = lambda f: f) -> Callable:
  """One jitted step `(state, batch) -> (state, aux)` with in/out shardings, state donated.

  `decorate` wraps the Python step before jit (tests pass `chex.assert_max_traces`).
  """
  graphdef, cfg = run.graphdef, run.cfg
  compute_loss = make_loss(run)
  microbatches = cfg.train.microbatches

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), optimizer.step[...])
    if microbatches == 1:
      (loss, aux), grads = nnx.value_and_grad(
          lambda model: compute_loss(model, batch, rng), has_aux=True)(model)
    else:
      loss, aux, grads = accumulate_gradients(compute_loss, model, batch, rng, microbatches,
                                               cfg.data.max_len)
    optimizer.update(model, grads)
    aux = {**aux, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return nnx.state((model, optimizer)), aux

  return jax.jit(decorate(step), in_shardings=(run.shardings, batch_shardings(run, example_batch)),
                 out_shardings=(run.shardings, None), donate_argnums=0)


def split_microbatches(batch: dict[str, Any], microbatches: int) -> dict[str, Any]:
  """`[B, ...] -> [M, B / M, ...]`: microbatch m holds rows m, m + M, m + 2M, ... so that
  each device's contiguous rows of a data-sharded batch feed every microbatch equally."""
  def split(x):
    x = jnp.asarray(x)
    return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def counted_pairs(batch: dict[str, Any], max_len: int) -> jax.Array:
  """`[B]`: the next-item pairs each window counts (a real query at or after its `count_from`
  whose next event is real; the real counted positions when the window has no next event)."""
  mask_BxW = batch['mask'].astype(bool)
  t = min(max_len, mask_BxW.shape[1])
  counted_BxT = lmp.counted_queries(mask_BxW, t, batch.get('count_from'))
  if mask_BxW.shape[1] > t:
    counted_BxT = counted_BxT & mask_BxW[:, 1:t + 1]
  return jnp.sum(counted_BxT, axis=1)


def accumulate_gradients(compute_loss: losses.LossFn, model: nnx.Module, batch: dict[str, Any],
                         rng: jax.Array, microbatches: int,
                         max_len: int) -> tuple[jax.Array, dict, Any]:
  """(loss, aux, gradients) of `batch` taken in `microbatches` equal parts, one after the
  other (`lax.scan`), each part's gradient with respect to the model's `nnx.Param`s.

  The parts' losses, aux figures and gradients are averaged with weights proportional to the
  next-item pairs each counts (`counted_pairs`; equal weights when none counts any), so a loss
  that is one mean over those pairs gets the whole batch's gradient: SASRec's and HSTU's
  cross-entropy, LMP at N_step 1 with its token level (tests/test_train.py). LMP at N_step > 1
  (a later step's mean runs over the pairs its gate opens) and BERT4Rec's random Cloze masks get
  the parts' pair-weighted mean, not the whole batch's gradient (5% apart in norm at N_step 2
  on configs/tiny.py in 4 parts). The step's temporaries are those of one part. Part m draws
  its negatives from `fold_in(rng, m)`; the dropout streams (the model's other state) run on
  from part to part.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  parts = split_microbatches(batch, microbatches)
  pairs_M = jax.vmap(lambda part: jnp.sum(counted_pairs(part, max_len)))(parts)
  total = jnp.sum(pairs_M)
  weight_M = jnp.where(total > 0, pairs_M / jnp.maximum(total, 1),
                       1.0 / microbatches).astype(jnp.float32)

  def part(carry, xs):  # the parameters ride in the carry: nnx merges only this trace's values
    params, rest, grads_sum = carry
    micro, index, weight = xs
    part_model = nnx.merge(graphdef, params, rest)
    (loss, aux), grads = nnx.value_and_grad(
        lambda model: compute_loss(model, micro, jax.random.fold_in(rng, index)),
        has_aux=True)(part_model)
    grads_sum = jax.tree.map(lambda acc, g: acc + weight * g, grads_sum, grads)
    return (params, nnx.split(part_model, nnx.Param, ...)[2], grads_sum), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (_, rest, grads), (loss_M, aux_M) = jax.lax.scan(
      part, (params, rest, zeros), (parts, jnp.arange(microbatches), weight_M))
  nnx.update(model, rest)
  weighted = lambda x_M: jnp.tensordot(weight_M, x_M.astype(jnp.float32), axes=1)
  return weighted(loss_M), jax.tree.map(weighted, aux_M), grads


def compile_step(step: Callable, run: run_lib.Run, example_batch: dict[str, Any],
                 report: bool = True) -> Callable:
  """`step` compiled ahead of time for the run's state and `example_batch`; with `report`,
  its memory use (per device) printed once to stderr, as MaxText does."""
  compiled = step.lower(run.state, example_batch).compile()
  memory = compiled.memory_analysis()
  if report and memory is not None:
    mib = lambda n: f'{n / 2**20:.1f} MiB'
    print(f'train step compiled: arguments {mib(memory.argument_size_in_bytes)}, outputs '
          f'{mib(memory.output_size_in_bytes)}, temporaries {mib(memory.temp_size_in_bytes)} '
          'per device', file=sys.stderr)
  return compiled


def make_probe(run: run_lib.Run, example_batch: dict[str, Any]) -> Callable:
  """`(state, batch) -> (loss, finite)`: the loss of the state a step produced (the step's
  own loss is that of the state before its update) and whether every float in the state
  (parameters and optimiser moments) is finite. Called before anything is saved."""
  graphdef, cfg = run.graphdef, run.cfg
  compute_loss = make_loss(run)

  def probe(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), optimizer.step[...])
    loss, _ = compute_loss(model, batch, rng)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return loss, jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))

  return jax.jit(probe, in_shardings=(run.shardings, batch_shardings(run, example_batch)))


def make_loss(run: run_lib.Run) -> losses.LossFn:
  """The run's loss (`losses.make`), with the training log-frequencies for log-Q."""
  return losses.make(run.cfg, run.model(), run.dataset.item_tokens,
                     training_log_freq(run.dataset))


def training_log_freq(dataset) -> np.ndarray:
  """log of each item's share of the training events (the log-Q correction's popularity)."""
  split = splits.dataset_split(dataset)
  train_E = splits.training_events(split, dataset.schema.n_events)
  return negatives.training_log_freq(dataset.items, train_E, dataset.schema.n_items)


def train_iterator(cfg: Config, run: run_lib.Run):
  dataset = pipeline.train_dataset(
      run.dataset, max_len=cfg.data.max_len, horizon=horizon(cfg.model.name, cfg.loss),
      batch_size=per_process_batch(cfg), seed=cfg.data.seed, window=cfg.data.window,
      stride=cfg.data.stride, jitter=cfg.data.jitter,
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
  # optim.schedule='plateau': the cuts made (the multiplier itself is in the optimiser state).
  lr_cuts: int = 0

  def check_patience(self, patience: int) -> bool:
    """Sets and returns `stopped_early`: `patience` validations (0: never) without a new best.
    Run after each validation and on resume (train.patience may change there)."""
    self.stopped_early = bool(patience and self.bad_evals >= patience)
    return self.stopped_early


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


class Action(enum.Enum):
  """What the loop does after a step's boundary work (checkpoint, validation, preemption)."""
  CONTINUE = 'continue'  # take the next step
  LEAVE = 'leave'  # preempted or told to stop: the checkpoint is saved, return now
  STOP_EARLY = 'stop_early'  # early stopping fired: finish the run as done


class Trainer:
  """The training loop of one run in one workdir."""

  def __init__(self, cfg: Config, workdir: pathlib.Path, progress: bool = True):
    self.cfg, self.workdir, self.progress = cfg, workdir, progress
    host_allocator.configure(cfg.train.host_allocator)  # before anything starts JAX's backend
    sharding.configure_cpu_devices(cfg)
    workdir_lib.check_is_folder(workdir)
    created = not workdir.exists()
    self.preemption = _Preemption()  # from here on SIGTERM only sets a flag
    self.lock = self.latest = self.best = self.writer = None
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      self.lock = workdir_lib.Lock(workdir) if jax.process_index() == 0 else None
      self._open()
    except BaseException:
      self.close()
      if created and workdir.is_dir():
        workdir_lib.remove_if_empty(workdir)  # a run that never started leaves no folder
      raise

  def _open(self) -> None:
    cfg, workdir = self.cfg, self.workdir
    resuming = (workdir / 'checkpoints').is_dir()
    if resuming:
      check_resumable(cfg, workdir)
    self.run = run_lib.start_run(cfg, workdir, self.progress)
    if jax.process_index() == 0:
      workdir_lib.record_dataset(workdir, self.run.dataset, resuming)
      save_config(cfg, workdir)
    self.data_iter = train_iterator(cfg, self.run)
    self.latest = Checkpointer(workdir / 'checkpoints', keep=cfg.train.keep_checkpoints)
    self.best = Checkpointer(workdir / 'best', keep=1)
    self.record = Progress()
    self._resume()
    if jax.process_index() == 0:
      workdir_lib.trim_metrics(workdir, self.record.step)
    self.writer = MetricWriter(workdir)

  def _resume(self) -> None:
    """Restores the newest checkpoint that can be (an unreadable newer one is moved aside)."""
    restored = self.latest.restore_newest(self.run.abstract(), self.data_iter)
    if restored is None:
      return
    step, self.run.state, record = restored
    self.record = Progress(**record)
    self.record.check_patience(self.cfg.train.patience)  # a larger one goes on after a stop
    if self.progress:
      print(f'resumed from {self.latest.directory}/{step}', file=sys.stderr)

  def save(self) -> None:
    self.latest.save(self.record.step, self.run.state, dataclasses.asdict(self.record),
                     self.data_iter)

  def validate(self) -> bool:
    """Validates; saves the best state; returns True when early stopping says stop."""
    cfg, rec = self.cfg.train, self.record
    results = evaluate_lib.evaluate(self.run, 'valid')
    self.writer.write(rec.step, 'valid', results)
    if results[cfg.early_stop_metric] > rec.best_metric:
      rec.best_metric, rec.best_step, rec.bad_evals = results[cfg.early_stop_metric], rec.step, 0
      self.best.save(rec.step, self.run.state, dataclasses.asdict(rec))
    else:
      rec.bad_evals += 1
      self._maybe_cut_lr()
    return rec.check_patience(cfg.patience)

  def _maybe_cut_lr(self) -> None:
    """`optim.schedule='plateau'`: after `plateau_patience` validations without a new best
    (counted from the last best or cut: early stopping's count reaching a multiple of
    `plateau_patience`), the learning rate is multiplied by `plateau_factor`, at most
    `plateau_cuts` times."""
    o, rec = self.cfg.optim, self.record
    if (o.schedule != 'plateau' or rec.bad_evals % o.plateau_patience
        or rec.lr_cuts >= o.plateau_cuts):
      return
    rec.lr_cuts += 1
    scale = o.plateau_factor ** rec.lr_cuts
    self.run.state = run_lib.set_lr_scale(self.run.state, scale)
    self.writer.write(rec.step, 'schedule', {'lr_scale': scale, 'lr': o.lr * scale})
    if self.progress:
      tqdm.write(f'step {rec.step}: no new best in {o.plateau_patience} validations; learning '
                 f'rate cut to {o.lr * scale:.3g} (cut {rec.lr_cuts} of {o.plateau_cuts})',
                 file=sys.stderr)  # above the progress bar, not inside its line

  def _next_batch(self) -> dict[str, jax.Array]:
    return sharding.global_batch(next(self.data_iter), self.run.mesh)

  def loop(self, stop_after: int | None = None) -> str:
    """Trains to train.steps (or early stop); `stop_after` steps at most in this call, as if
    killed there (for tests). Returns 'done', 'preempted' or 'interrupted'."""
    cfg = self.cfg.train
    if self.record.step >= cfg.steps or self.record.stopped_early:
      self.save()
      return 'done'
    batch = self._next_batch()  # the first step's batch, also the example the step compiles for
    step_fn = compile_step(make_train_step(self.run, batch), self.run, batch, self.progress)
    self.probe = make_probe(self.run, batch)
    self._bar = tqdm(total=cfg.steps, initial=self.record.step, disable=not self.progress,
                     desc='train', dynamic_ncols=True)
    self._t0, self._steps_done, self._pending = time.perf_counter(), 0, None
    try:
      while True:
        self.run.state, aux = step_fn(self.run.state, batch)
        self.record.step += 1
        self._steps_done += 1
        self._log_pending()  # step N-1's metrics, read after step N was dispatched
        self._pending = (self.record.step, aux)
        action = self._boundary(batch, stop_after)
        if action is Action.LEAVE:
          return 'preempted' if self.preemption.requested else 'interrupted'
        if action is Action.STOP_EARLY or self.record.step >= cfg.steps:
          break
        batch = self._next_batch()
      self._log_pending()
      self.save()
      return 'done'
    finally:
      self._bar.close()

  def _boundary(self, batch, stop_after) -> Action:
    """Checkpoints, validates and handles preemption after a step; says what the loop does.

    Before anything is validated or saved, the step's metrics line is written (so a checkpoint
    of step N implies metrics up to N) and the loss and the new state are checked finite.
    """
    step, cfg = self.record.step, self.cfg.train
    leave = (self.preemption.requested or (stop_after is not None and self._steps_done >= stop_after)
             or self.latest.reached_preemption(step))
    at_eval = bool((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
    at_ckpt = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    if leave or at_eval or at_ckpt:
      self._log_pending()  # raises TrainingDiverged on a non-finite loss
      self._check_state(step, batch)
    if at_eval and self.validate():
      return Action.STOP_EARLY
    if leave or at_ckpt:
      self.save()
    return Action.LEAVE if leave else Action.CONTINUE

  def _check_state(self, step: int, batch: dict[str, jax.Array]) -> None:
    """Raises TrainingDiverged unless the state after `step` is finite and its loss on the
    step's batch is too."""
    loss, finite = (float(x) for x in self.probe(self.run.state, batch))
    if not (finite and math.isfinite(loss)):
      what = f'its loss is {loss}' if finite else 'a parameter or optimiser moment is not finite'
      raise TrainingDiverged(
          f'the state after step {step} has diverged ({what}); stopping before it is checkpointed. '
          'Try a lower optim.lr, a larger loss.tau or model.compute_dtype=float32.')

  def _log_pending(self) -> None:
    """Writes the metrics of the step awaiting its line (if any); raises on a non-finite loss."""
    if self._pending is None:
      return
    (step, aux), self._pending = self._pending, None
    values = _finite_or_raise(step, aux)
    steps_per_s = self._steps_done / max(time.perf_counter() - self._t0, 1e-9)
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f'{values["loss"]:.4f}', refresh=False)
    if step % max(self.cfg.train.log_every, 1) == 0 or step == self.cfg.train.steps:
      self.writer.write(step, 'train', {**values, 'steps_per_s': steps_per_s})

  def final_results(self) -> dict[str, dict[str, float]]:
    """Validation and test of the best state (the latest when never validated)."""
    state = self.run.state
    best = self.best.restore_newest(self.run.abstract())
    if best is not None:
      state = best[1]
    return {split: evaluate_lib.evaluate(self.run, split, state, progress=self.progress)
            for split in ('valid', 'test')}

  def close(self) -> None:
    for part in (self.writer, self.latest, self.best):
      if part is not None:
        part.close()
    if self.lock is not None:
      self.lock.release()
    self.preemption.restore()


def train(cfg: Config, workdir: pathlib.Path, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the results written to results.json."""
  start = time.perf_counter()
  trainer = Trainer(cfg, workdir, progress)
  try:
    status = trainer.loop(stop_after)
    if status == 'done' and trainer.preemption.requested:
      status = 'preempted'  # after the loop's last save: the final evaluation is left to a rerun
    if status != 'done':
      return {'status': status, 'step': trainer.record.step}
    results = trainer.final_results()
    floor = {s: evaluate_lib.popularity(cfg, trainer.run.dataset, s) for s in results}
    trainer.writer.write(trainer.record.step, 'test', results['test'])
    results['training'] = training_summary(cfg, trainer, time.perf_counter() - start)
  finally:
    trainer.close()
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    (workdir / 'popularity.json').write_text(json.dumps(floor, indent=1) + '\n')
  return {'status': 'done', 'step': trainer.record.step, **results, 'popularity': floor}


def training_summary(cfg: Config, trainer: Trainer, seconds: float) -> dict[str, Any]:
  """Steps, epochs (global batches x batch size / training examples per epoch), the best
  validated step, whether early stopping ended the run, this process's wall time (a resumed
  run: its last attempt only), the learning-rate cuts of `optim.schedule='plateau'`, the
  host allocator it ran with (host_allocator.py) and its devices (`train.cpu_devices`)."""
  d, rec = cfg.data, trainer.record
  per_epoch = pipeline.windows_per_epoch(trainer.run.dataset, d.max_len,
                                         horizon(cfg.model.name, cfg.loss), d.window, d.stride,
                                         d.jitter)
  epochs = lambda step: round(step * cfg.train.batch_size / per_epoch, 3)
  return {'steps': rec.step, 'epochs': epochs(rec.step), 'best_step': rec.best_step,
          'best_epoch': epochs(max(rec.best_step, 0)), 'stopped_early': rec.stopped_early,
          'examples_per_epoch': per_epoch, 'wall_seconds': round(seconds, 1),
          'lr_cuts': rec.lr_cuts, 'host_allocator': host_allocator.in_effect(),
          'devices': jax.device_count()}


def results_table(cfg: Config, out: dict[str, Any]) -> str:
  rows = {}
  for split in ('valid', 'test'):
    rows[f'{cfg.model.name} ({split})'] = out[split]
    rows[f'popularity ({split})'] = out['popularity'][split]
  return metrics.format_table(rows)


def parse_args(argv: list[str] | None) -> tuple[Config, pathlib.Path]:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.train', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=DEFAULT_CONFIG,
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
  except (*ERRORS, TrainingDiverged) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_ERROR
  if out['status'] != 'done':
    print(f'{out["status"]} at step {out["step"]}; checkpoint saved in {workdir}/checkpoints; '
          f'run the same command again to resume (exit {EXIT_PREEMPTED})', file=sys.stderr)
    return EXIT_PREEMPTED
  if jax.process_index() == 0:
    print(results_table(cfg, out))
    print(f'results: {workdir}/results.json', file=sys.stderr)
  return EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
