"""Runs that are killed, preempted, corrupted or diverge: a real `python -m heterrec_jax.train`
killed at several points finishes bit-identical to an uninterrupted run; a damaged newest
checkpoint falls back to the previous one; a diverged state is never saved or ranked."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import export as export_lib
from heterrec_jax import run as run_lib
from heterrec_jax import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'configs' / 'tiny.py')


def start_train(workdir: pathlib.Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'heterrec_jax.train', '--config', TINY,
                           '--workdir', str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def metric_lines(workdir: pathlib.Path) -> list[dict]:
  file = workdir / 'metrics.jsonl'
  if not file.is_file():
    return []
  rows = []
  for line in file.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:  # a line being written
      pass
  return rows


def run_until(workdir: pathlib.Path, seen, sig: int, timeout: float = 300) -> int:
  """Starts training, sends `sig` once `seen(metric lines)` holds, returns the exit code."""
  proc = start_train(workdir)
  deadline = time.monotonic() + timeout
  while proc.poll() is None and not seen(metric_lines(workdir)):
    assert time.monotonic() < deadline, 'the run never reached the kill point'
    time.sleep(0.05)
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.communicate(timeout=timeout)
  return proc.returncode


def without_speed(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != 'steps_per_s'} for r in rows]


def without_wall(path: pathlib.Path) -> dict:
  """A results file without its wall time (everything else must be bit-identical)."""
  data = json.loads(path.read_text())
  data.get('training', {}).pop('wall_seconds', None)
  return data


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  proc = start_train(workdir)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  return workdir


def test_killed_at_three_points_finishes_bit_identical(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  train_at = lambda n: lambda rows: any(r['split'] == 'train' and r['step'] >= n for r in rows)
  # SIGKILL before the first checkpoint (step 3), SIGTERM after it, SIGKILL after validation 6.
  assert run_until(workdir, train_at(2), signal.SIGKILL) == -signal.SIGKILL
  assert run_until(workdir, train_at(4), signal.SIGTERM) == train_lib.EXIT_PREEMPTED
  valid_6 = lambda rows: any(r['split'] == 'valid' and r['step'] == 6 for r in rows)
  run_until(workdir, valid_6, signal.SIGKILL)
  proc = start_train(workdir)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  for name in ('results.json', 'popularity.json'):
    assert without_wall(workdir / name) == without_wall(uninterrupted / name), name
  # No line is written twice, and the lines are those of the uninterrupted run.
  assert without_speed(metric_lines(workdir)) == without_speed(metric_lines(uninterrupted))


def test_sigterm_saves_and_exits_75(tmp_path):
  workdir = tmp_path / 'run'
  train_at_1 = lambda rows: any(r['split'] == 'train' for r in rows)
  assert run_until(workdir, train_at_1, signal.SIGTERM) == train_lib.EXIT_PREEMPTED
  steps = [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert steps, 'no checkpoint saved on SIGTERM'


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  assert train_lib.main(['--config', TINY, '--workdir', str(workdir)]) == 0
  return workdir


def corrupt(step_dir: pathlib.Path, how: str) -> None:
  if how == 'truncated':
    for f in (step_dir / 'state').rglob('*'):
      if f.is_file():
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  elif how == 'deleted':
    shutil.rmtree(step_dir / 'state')
  elif how == 'garbled':
    (step_dir / 'record' / 'metadata').write_text('{garbage')


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'garbled'])
def test_corrupt_latest_checkpoint_falls_back(finished, tmp_path, capsys, how):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  corrupt(workdir / 'checkpoints' / '6', how)
  capsys.readouterr()
  assert evaluate_lib.main(['--workdir', str(workdir), '--checkpoint', 'latest']) == 0
  err = capsys.readouterr().err
  assert f'cannot restore {workdir.resolve()}/checkpoints/6' in err and 'Traceback' not in err
  assert 'Event loop is closed' not in err
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names == ['3', '6.corrupt-1'], names
  # Training resumes from step 3 and finishes with the results of the undamaged run.
  assert train_lib.main(['--config', TINY, '--workdir', str(workdir)]) == 0
  for name in ('results.json', 'popularity.json'):
    assert without_wall(workdir / name) == without_wall(finished / name), name


def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(finished, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns('best'))
  for step in ('3', '6'):
    corrupt(workdir / 'checkpoints' / step, 'garbled')
  capsys.readouterr()
  assert evaluate_lib.main(['--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l.startswith('error:')][0].startswith(
      f'error: no checkpoint in {workdir.resolve()}/checkpoints can be restored')
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3', '6']


def test_diverged_training_saves_nothing_and_exits_2(tmp_path, capsys):
  workdir = tmp_path / 'nan'
  capsys.readouterr()
  rc = train_lib.main(['--config', TINY, '--workdir', str(workdir), 'optim.lr=1e6',
                       'train.checkpoint_every=2', 'train.eval_every=2'])
  err = capsys.readouterr().err
  assert rc == 2
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'diverged' in errors[0] and 'Traceback' not in err, err
  for folder in ('checkpoints', 'best'):
    assert not any(p.name.isdigit() for p in (workdir / folder).iterdir()), folder


def test_non_finite_state_is_an_error_not_a_rank(finished, tmp_path):
  run = run_lib.restore_run(finished)
  nan_state = jax.tree.map(lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, np.floating)
                           else x, run.state)
  with pytest.raises(evaluate_lib.NonFiniteScores, match='NaN or infinite'):
    evaluate_lib.evaluate(run, 'test', nan_state)
  assert 0 < evaluate_lib.evaluate(run, 'test')['recall@10'] < 1  # the real state still ranks


def test_export_of_a_nan_state_writes_nothing(finished, tmp_path, monkeypatch):
  real = export_lib.restore_run

  def nan_run(*args):
    run = real(*args)
    run.state = jax.tree.map(lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, np.floating)
                             else x, run.state)
    return run

  monkeypatch.setattr(export_lib, 'restore_run', nan_run)
  with pytest.raises(evaluate_lib.NonFiniteScores, match='nothing was written'):
    export_lib.export_run(finished, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out')]
