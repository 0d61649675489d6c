"""The training state: the dataset, the model and its optimiser, built sharded from a config.

Training (`train.py`), evaluation (`evaluate.py`) and export (`export.py`) all start here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import optax
from flax import nnx
from jax.experimental import multihost_utils

from heterrec_jax import baselines, sharding
from heterrec_jax.config import Config, ConfigError
from heterrec_jax.data.dataset import Dataset
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


def build_model(cfg: Config, dataset: Dataset, seed: int) -> nnx.Module:
  """HeterRec, or the baseline named by `model.name` (`baselines.py`)."""
  if cfg.model.name != 'heterrec':
    return baselines.build_baseline(dataset.schema, cfg.model, cfg.loss, nnx.Rngs(seed),
                                    cfg.data.max_len)
  embeddings = dict(dataset.embeddings) if cfg.model.variant == 'no_mfk' else None
  return HeterRec(dataset.schema, cfg.model, cfg.loss, rngs=nnx.Rngs(seed),
                  embeddings=embeddings, max_len=cfg.data.max_len)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW with linear warm-up, then a constant rate or cosine decay, after global-norm
  clipping."""
  o = cfg.optim
  warmup = min(o.warmup_steps, max(cfg.train.steps - 1, 0))
  if o.schedule == 'constant':
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else o.lr, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(cfg.train.steps, warmup + 1), end_value=o.lr * o.final_lr_fraction)
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.clip_norm:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw


@dataclasses.dataclass
class TrainState:
  """`nnx.split((model, optimizer))` laid out over `mesh`."""
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
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.state, self.shardings)


def build_state(cfg: Config, dataset: Dataset, mesh: jax.sharding.Mesh) -> TrainState:
  """Creates model and optimiser state directly sharded (built from shapes first)."""
  tx = make_optimizer(cfg)

  def build():
    model = build_model(cfg, dataset, cfg.train.seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, state, shardings = sharding.create_sharded(build, cfg.mesh.rules, mesh)
  return TrainState(cfg, dataset, mesh, graphdef, state, shardings)


# Config groups and fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ('train.steps', 'train.eval_every', 'train.patience', 'train.log_every',
                     'train.checkpoint_every', 'train.keep_checkpoints', 'train.compile_cache_dir',
                     'eval.', 'data.workers')


def check_resumable(cfg: Config, workdir: pathlib.Path) -> None:
  """Refuses to resume a run in `workdir` whose saved config differs in what shapes the state
  or the data stream (the model, the loss, the optimiser, the data, the batch, the seed)."""
  if not (workdir / 'config.json').is_file():
    return
  saved = _flatten(json.loads((workdir / 'config.json').read_text()))
  new = _flatten(json.loads(json.dumps(dataclasses.asdict(cfg))))
  changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k)
                   and not k.startswith(RESUMABLE_CHANGES))
  if changed:
    diffs = ', '.join(f'{k}: {saved.get(k)!r} -> {new.get(k)!r}' for k in changed[:6])
    raise ConfigError(f'{workdir} holds a run with another config ({diffs}); resume it with its '
                      'own config, or train into another --workdir')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def save_config(cfg: Config, workdir: pathlib.Path) -> None:
  (workdir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + '\n')


def load_saved_config(workdir: pathlib.Path) -> Config:
  """The config a run in `workdir` was trained with."""
  from heterrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  file = workdir / 'config.json'
  if not file.is_file():
    raise ConfigError(f'{file} does not exist: is {workdir} a training workdir?')
  data = json.loads(file.read_text())
  groups = {f.name: f.type for f in dataclasses.fields(Config)}
  kwargs = {}
  for name, values in data.items():
    cls = getattr(config_lib, groups[name]) if isinstance(groups[name], str) else groups[name]
    if name == 'mesh':
      values['rules'] = tuple(tuple(r) for r in values['rules'])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    kwargs[name] = cls(**values)
  return Config(**kwargs)
