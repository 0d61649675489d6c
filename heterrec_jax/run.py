"""A run: its config, dataset, mesh, and the model and optimiser state with its shardings, built
in one place from a config (`start_run`) or from a workdir and its checkpoint (`restore_run`).

Training (`train.py`), evaluation (`evaluate.py`) and export (`export.py`) all start here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from heterrec_jax import averaging, baselines, compile_cache, sharding
from heterrec_jax import workdir as workdir_lib
from heterrec_jax.checkpoint import CheckpointError, Checkpointer
from heterrec_jax.config import Config, ConfigError, load_saved_config
from heterrec_jax.data.dataset import Dataset
from heterrec_jax.interface import RetrievalModel
from heterrec_jax.model import HeterRec


def load_dataset(cfg: Config, workdir: pathlib.Path, progress: bool = True) -> Dataset:
  """The prepared folder of `data.path`, or the built-in synthetic data prepared into
  WORKDIR/data on first use (by process 0; the others wait)."""
  if cfg.data.path:
    return Dataset.load(cfg.data.path)
  folder = workdir / 'data'
  if jax.process_index() == 0 and not (folder / 'schema.json').is_file():
    from heterrec_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
    d = cfg.data
    raw = synthetic.generate(d.synthetic_users, d.synthetic_items, d.synthetic_topics,
                             d.synthetic_seed)
    prepare.prepare_dataset(raw, folder, progress=progress)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthetic data prepared')
  return Dataset.load(folder)


def build_model(cfg: Config, dataset: Dataset, seed: int) -> RetrievalModel:
  """HeterRec, or the baseline named by `model.name` (`baselines.py`)."""
  if cfg.model.name != 'heterrec':
    return baselines.build_baseline(dataset.schema, cfg.model, cfg.loss, nnx.Rngs(seed),
                                    cfg.data.max_len)
  embeddings = dict(dataset.embeddings) if cfg.model.variant == 'no_mfk' else None
  return HeterRec(dataset.schema, cfg.model, cfg.loss, rngs=nnx.Rngs(seed),
                  embeddings=embeddings, max_len=cfg.data.max_len)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW with linear warm-up, then a constant rate, cosine decay or the constant rate times a
  multiplier the trainer cuts on a plateau (`set_lr_scale`), after global-norm clipping; with
  `optim.ema`, followed by the parameter average (averaging.py)."""
  o = cfg.optim
  warmup = min(o.warmup_steps, max(cfg.train.steps - 1, 0))
  if o.schedule in ('constant', 'plateau'):
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else o.lr, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(cfg.train.steps, warmup + 1), end_value=o.lr * o.final_lr_fraction)
  if o.vector_decay or o.vector_lr_scale != 1.0:  # AdamW, the free vector table apart
    adamw = optax.chain(
        optax.scale_by_adam(b1=o.b1, b2=o.b2),
        optax.masked(optax.scale(o.vector_lr_scale), _free_vector_mask),
        optax.add_decayed_weights(o.weight_decay),
        optax.add_decayed_weights(o.vector_decay, mask=_free_vector_mask),
        optax.scale_by_learning_rate(schedule))
  else:
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
  if o.schedule == 'plateau':  # the cuts' multiplier, in the state: set by `set_lr_scale`
    tx = optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0))
  return averaging.with_ema(tx, o.ema)


def set_lr_scale(state: Any, scale: float) -> Any:
  """`state` with the learning-rate multiplier of `optim.schedule='plateau'` set to `scale`
  (the optimiser's `step_size` hyperparameter; its dtype and sharding kept)."""
  found = []

  def put(path, leaf):
    if any(getattr(key, 'key', None) == 'step_size' for key in path):
      found.append(path)
      value = np.asarray(scale, leaf.dtype)  # every process holds the same value
      return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda _: value)
    return leaf

  state = jax.tree_util.tree_map_with_path(put, state)
  if len(found) != 1:
    raise ValueError(f'expected one learning-rate multiplier in the optimiser state, found '
                     f"{len(found)}: set_lr_scale needs optim.schedule='plateau'")
  return state


def _free_vector_mask(params: Any) -> Any:
  """True at the free per-item vector table (`HeterRec.item_vectors`), False elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'item_vectors' in jax.tree_util.keystr(path), params)


@dataclasses.dataclass
class Run:
  """One run: its config and dataset, and `nnx.split((model, optimizer))` laid out over `mesh`."""
  cfg: Config
  dataset: Dataset
  mesh: jax.sharding.Mesh
  graphdef: Any
  state: Any
  shardings: Any

  def model(self, state: Any | None = None) -> nnx.Module:
    """The model of `state` (default: the current one)."""
    model, _ = nnx.merge(self.graphdef, self.state if state is None else state)
    return model

  def abstract(self) -> Any:
    """The state's shapes, dtypes and shardings: the target a checkpoint is restored into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.state, self.shardings)


def build_run(cfg: Config, dataset: Dataset, mesh: jax.sharding.Mesh) -> Run:
  """Creates model and optimiser state directly sharded (built from shapes first)."""
  tx = make_optimizer(cfg)

  def build():
    model = build_model(cfg, dataset, cfg.train.seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, state, shardings = sharding.create_sharded(build, cfg.mesh.rules, mesh)
  return Run(cfg, dataset, mesh, graphdef, state, shardings)


def start_run(cfg: Config, workdir: pathlib.Path, progress: bool = True) -> Run:
  """A freshly initialised run of `cfg` (its synthetic data, if any, prepared in `workdir`)."""
  compile_cache.enable(cfg.train.compile_cache_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  check_batch_sizes(cfg, mesh)
  dataset = load_dataset(cfg, workdir, progress)
  return build_run(cfg, dataset, mesh)


def check_batch_sizes(cfg: Config, mesh: jax.sharding.Mesh) -> None:
  """Global batches are split over the mesh's "data" axis: their sizes must divide by it."""
  data = mesh.shape['data']
  for field, size in (('train.batch_size', cfg.train.batch_size),
                      ('eval.batch_size', cfg.eval.batch_size)):
    if size % data:
      raise ConfigError(f'{field}={size} must divide by the {data} devices of the mesh\'s '
                        '"data" axis (set mesh.data, or a multiple of it as the batch size)')
  per_device = cfg.train.batch_size // data
  if per_device % cfg.train.microbatches:
    raise ConfigError(f'train.microbatches={cfg.train.microbatches} must divide the '
                      f'{per_device} windows per device (train.batch_size='
                      f'{cfg.train.batch_size} over {data} "data" devices)')


def restore_run(workdir: pathlib.Path, checkpoint: str = 'best') -> Run:
  """The state of a finished or interrupted run, from its `best` (falling back to its latest)
  or its `latest` checkpoint; the newest step of a folder that restores (`Checkpointer.
  restore_newest`). Refuses a workdir whose recorded dataset differs from its data's."""
  workdir_lib.check_is_folder(workdir)
  run = start_run(load_saved_config(workdir), workdir, progress=False)
  workdir_lib.check_dataset(workdir, run.dataset, 'use')
  folders = ['best', 'checkpoints'] if checkpoint == 'best' else ['checkpoints']
  for folder in folders:
    if not (workdir / folder).is_dir():
      continue
    ckpt = Checkpointer(workdir / folder)
    try:
      restored = ckpt.restore_newest(run.abstract())
    except CheckpointError as e:
      if folder == folders[-1]:
        raise
      print(f'warning: {e}; trying {workdir}/{folders[-1]}', file=sys.stderr)
      continue
    finally:
      ckpt.close()
    if restored is not None:
      run.state = restored[1]
      return run
  raise FileNotFoundError(f'no checkpoint in {workdir}/{" or ".join(folders)}')
