"""train.cpu_devices: a CPU-only host split into several XLA devices, data-parallel.

The split is process-wide and must precede JAX's backend, so it is checked in fresh
subprocesses; in this (test) process the backend has started with conftest's 8 devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from heterrec_jax import sharding
from heterrec_jax.config import apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'configs' / 'tiny.py')


def tiny(*overrides):
  return apply_overrides(load_config(TINY), list(overrides))


@pytest.mark.parametrize('overrides, cores, want', [
    (['train.cpu_devices=3'], 2, 3),               # an explicit count is taken as it is
    (['train.cpu_devices=1'], 8, 1),
    (['train.cpu_devices=0'], 2, 2),               # one per core
    (['train.cpu_devices=0'], 8, 8),               # batch 16, eval batch 32: 8 divides both
    (['train.cpu_devices=0'], 3, 2),               # 3 does not divide 16
    (['train.cpu_devices=0', 'eval.batch_size=20'], 8, 4),
    (['train.cpu_devices=0', 'train.microbatches=4'], 8, 4),   # 16 / 8 = 2 windows: not 4 parts
    (['train.cpu_devices=0', 'mesh.data=1', 'mesh.model=2'], 8, 2),
    (['train.cpu_devices=0', 'train.batch_size=15', 'eval.batch_size=15'], 2, 1),
])
def test_cpu_devices_for(overrides, cores, want):
  assert sharding.cpu_devices_for(tiny(*overrides), cores) == want


# Configures the devices of a fresh process from configs/tiny.py with argv[1] as an override,
# then prints the device count.
PROGRAM = """
import sys
from heterrec_jax import sharding
from heterrec_jax.config import apply_overrides, load_config
sharding.configure_cpu_devices(apply_overrides(load_config('configs/tiny.py'), [sys.argv[1]]))
import jax
print(jax.device_count())
"""


def _fresh(args, check=True, **env) -> subprocess.CompletedProcess:
  """`python ARGS` in a fresh process without the suite's 8 fake devices."""
  env = {**os.environ, 'PYTHONPATH': str(ROOT), **env}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  fake_devices = '--xla_force_host_platform_device_count=8'
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(fake_devices, '')
  return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=check)


@pytest.mark.parametrize('override, platforms, want', [
    ('train.cpu_devices=2', 'cpu', '2'),
    ('train.cpu_devices=1', 'cpu', '1'),
    ('train.cpu_devices=2', 'cuda,cpu', '1'),     # an accelerator may be present: unchanged
])
def test_a_fresh_process_gets_the_devices(override, platforms, want):
  assert _fresh(['-c', PROGRAM, override], JAX_PLATFORMS=platforms).stdout.split()[-1] == want


def test_train_runs_data_parallel_on_two_cpu_devices(tmp_path):
  """The whole command: the trainer splits the CPU before its backend starts, the mesh takes
  both devices, and the run finishes and says so."""
  workdir = tmp_path / 'run'
  _fresh(['-m', 'heterrec_jax.train', '--config', TINY, '--workdir', str(workdir),
          'train.cpu_devices=2', 'train.steps=2', 'train.eval_every=2'], JAX_PLATFORMS='cpu')
  results = json.loads((workdir / 'results.json').read_text())
  assert results['training']['devices'] == 2


def test_after_the_backend_started_a_different_count_warns(capsys):
  assert jax.device_count() == 8
  sharding.configure_cpu_devices(tiny('train.cpu_devices=2'))
  assert jax.device_count() == 8
  assert 'train.cpu_devices=2 (2 devices) not applied' in capsys.readouterr().err
  sharding.configure_cpu_devices(tiny('train.cpu_devices=8'))   # the count it has: quiet
  assert capsys.readouterr().err == ''


def test_a_count_that_does_not_divide_the_batch_is_one_clear_error(tmp_path):
  """train.cpu_devices=3 with batches of 16: one error naming the field, no traceback, and no
  workdir left behind."""
  workdir = tmp_path / 'run'
  done = _fresh(['-m', 'heterrec_jax.train', '--config', TINY, '--workdir', str(workdir),
                 'train.cpu_devices=3'], check=False, JAX_PLATFORMS='cpu')
  assert done.returncode == 2, done.stderr
  assert 'train.batch_size=16 must divide by the 3 devices' in done.stderr
  assert 'Traceback' not in done.stderr
  assert not workdir.exists()
