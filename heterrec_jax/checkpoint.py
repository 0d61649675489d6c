"""Orbax checkpoints of the training state, the data iterator and a small JSON record.

One `Checkpointer` per folder (`WORKDIR/checkpoints` for the latest states, `WORKDIR/best` for
the best validated one). Every process writes its own shards and its own Grain iterator state;
restores go straight into a sharded abstract target.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint of a folder that holds some can be restored."""


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

  def restore_newest(self, target: Any, data_iter: Any | None = None,
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, record)` of the newest step that restores; None when there is none.

    A step that cannot be restored (a truncated, deleted or garbled file) is reported on stderr
    with its path and the reason; once an older step has restored, the newer broken ones are
    moved aside as `STEP.corrupt-N` (kept for inspection, ignored from then on). When no step
    restores, nothing is moved and CheckpointError names the newest one and why.
    """
    broken: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, record = self.restore(step, target, data_iter)
      except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise anything
        broken.append((step, _reason(e)))
        print(f'warning: cannot restore {self.directory / str(step)}: {broken[-1][1]}',
              file=sys.stderr)
        continue
      for bad, _ in broken:
        moved = self._move_aside(bad)
        print(f'warning: moved {self.directory / str(bad)} aside to {moved}; restored step '
              f'{step} instead', file=sys.stderr)
      return step, state, record
    if broken:
      step, reason = broken[0]
      raise CheckpointError(f'no checkpoint in {self.directory} can be restored (the newest, '
                            f'{self.directory / str(step)}: {reason})')
    return None

  def _move_aside(self, step: int) -> pathlib.Path:
    n = 1
    while (self.directory / f'{step}.corrupt-{n}').exists():
      n += 1
    target = self.directory / f'{step}.corrupt-{n}'
    (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target

  def read_record(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']

  def close(self) -> None:
    self._manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))


def _reason(error: BaseException) -> str:
  """The first line of the error's root cause, at most 200 characters."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {text[:200]}'
