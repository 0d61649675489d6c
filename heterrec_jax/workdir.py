"""What a training workdir guards: one run at a time (a lock), the dataset it was trained on (a
fingerprint in WORKDIR/dataset.json), and metrics.jsonl without the lines of replayed steps.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib

from heterrec_jax.data.dataset import Dataset

DATASET_FILE = 'dataset.json'
LOCK_FILE = '.lock'


class WorkdirError(ValueError):
  """A workdir that cannot be used: a file, locked by another run, or for another dataset."""


def check_is_folder(workdir: pathlib.Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir {workdir} is a file, not a folder; give a folder')


class Lock:
  """An exclusive `flock` on WORKDIR/.lock, held while a run trains there.

  The kernel drops the lock when its process dies, so the lock of a killed run is simply taken
  over; the file holds the pid of the holder, for the message.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK_FILE
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 32, 0).decode(errors='replace').strip() or '?'
      os.close(self._fd)
      raise WorkdirError(f'{workdir} is in use by another run (pid {holder}, {self.path}); '
                         'wait for it to finish, or train into another --workdir') from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f'{os.getpid()}\n'.encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def remove_if_empty(workdir: pathlib.Path) -> None:
  """Removes `workdir` if it holds nothing but the lock file."""
  if {p.name for p in workdir.iterdir()} <= {LOCK_FILE}:
    (workdir / LOCK_FILE).unlink(missing_ok=True)
    workdir.rmdir()


def record_dataset(workdir: pathlib.Path, dataset: Dataset, resuming: bool) -> None:
  """Writes the dataset's fingerprint to WORKDIR/dataset.json; when `resuming`, first checks
  that a recorded one matches."""
  if resuming:
    check_dataset(workdir, dataset, 'resume')
  record = {'fingerprint': dataset.fingerprint(), 'path': str(dataset.path.resolve())}
  (workdir / DATASET_FILE).write_text(json.dumps(record, indent=1) + '\n')


def check_dataset(workdir: pathlib.Path, dataset: Dataset, action: str) -> None:
  """Refuses to `action` the run in `workdir` on a dataset other than the one it recorded (a
  run from before dataset.json existed is not checked)."""
  file = workdir / DATASET_FILE
  if not file.is_file():
    return
  try:
    recorded = json.loads(file.read_text())['fingerprint']
  except (ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f'{file} is damaged ({e}); restore it or delete it to skip the check'
                       ) from None
  if recorded != dataset.fingerprint():
    raise WorkdirError(f'cannot {action} {workdir}: it was trained on another dataset '
                       f'(fingerprint {recorded}, recorded in {file}) than {dataset.path} '
                       f'(fingerprint {dataset.fingerprint()}); give the run its own data')


def trim_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops the lines of metrics.jsonl after `step` (the steps a resumed run replays), the final
  'test' lines, and any partial line of a killed writer, so replayed steps are not written twice.
  """
  file = workdir / 'metrics.jsonl'
  if not file.is_file():
    return
  kept = []
  for line in file.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get('step', step + 1) <= step and row.get('split') != 'test':
      kept.append(line + '\n')
  tmp = file.with_name(f'.{file.name}.tmp-{os.getpid()}')
  tmp.write_text(''.join(kept))
  os.replace(tmp, file)
