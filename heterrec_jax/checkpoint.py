"""Orbax checkpoints of the training state, the data iterator and a small JSON record.

One `Checkpointer` per folder (`WORKDIR/checkpoints` for the latest states, `WORKDIR/best` for
the best validated one). Every process writes its own shards and its own Grain iterator state;
restores go straight into a sharded abstract target.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, data iterator, record)` under numbered steps."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
    self.directory = pathlib.Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster announced a preemption (multi-host TPU/GPU jobs)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, record: dict[str, Any],
           data_iter: Any | None = None) -> None:
    """Saves under `step`; a step already saved (the same state) is left as it is."""
    if step in self._manager.all_steps():
      return
    items = {'state': ocp.args.StandardSave(state), 'record': ocp.args.JsonSave(record)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target: Any, data_iter: Any | None = None,
              ) -> tuple[Any, dict[str, Any]]:
    """Restores into `target` (arrays or `jax.ShapeDtypeStruct`s carrying shardings).

    `data_iter`, when given, is set to the saved position in place.
    """
    abstract = jax.tree.map(_abstract, target)
    items = {'state': ocp.args.StandardRestore(abstract), 'record': ocp.args.JsonRestore()}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored['record']

  def read_record(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']

  def close(self) -> None:
    self._manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
