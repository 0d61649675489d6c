"""host_allocator: 'reuse' stops XLA's CPU runtime from faulting a step's temporaries in afresh.

The effect is process-wide and must precede JAX's backend, so it is measured in fresh
subprocesses; in this (test) process the backend has started, where 'reuse' must refuse."""

import os
import pathlib
import subprocess
import sys

import jax

from heterrec_jax import host_allocator

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Runs one jitted program with a 64 MiB temporary (a 4096 x 4096 float32 product) after
# configuring the allocator, and prints the setting in effect and the median of the minor page
# faults of ten calls after ten warm-up calls.
PROGRAM = """
import resource, statistics, sys
from heterrec_jax import host_allocator
print(host_allocator.configure(sys.argv[1]))
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((4096, 64)), jnp.ones((64, 4096))
for _ in range(10):
  f(x, w).block_until_ready()
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def run_program(program: str, setting: str, timeout: int, **env: str) -> str:
  """`program` in a fresh Python (its allocator not yet set) with `setting` as argv[1]; stdout."""
  env = {**os.environ, 'PYTHONPATH': str(ROOT), **env}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return subprocess.run([sys.executable, '-c', program, setting], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=True).stdout


def faults_per_call(setting: str, platforms: str = 'cpu') -> tuple[str, float]:
  out = run_program(PROGRAM, setting, 300, JAX_PLATFORMS=platforms).split()
  return out[0], float(out[1])


def test_reuse_stops_the_per_call_page_faults():
  system, reuse = faults_per_call('system'), faults_per_call('reuse')
  assert system[0] == 'system' and reuse[0] == 'reuse'
  # 64 MiB / 4 KiB = 16,384 pages mapped and faulted in afresh per call with glibc's defaults
  # (the premise: XLA frees the temporary at the end of each call). With 'reuse' a call
  # faults none, except the odd call where the fragmenting heap grows (a mean over ten calls
  # reached 5,546 once in twelve runs under the suite's XLA flags): hence the median.
  assert system[1] > 8000, system
  assert reuse[1] < 4000, reuse


# Frees a 3 GiB block from the top of the heap (never touched, so it costs address space, not
# memory) after configuring the allocator ('int_max': 'reuse' as it was, with the trim
# threshold at INT_MAX), and prints whether the heap's end moved back.
TRIM_PROGRAM = """
import ctypes, sys
from heterrec_jax import host_allocator
libc = ctypes.CDLL('libc.so.6')
if sys.argv[1] == 'int_max':
  for param, value in ((host_allocator._M_ARENA_MAX, 1), (host_allocator._M_MMAP_MAX, 0),
                       (host_allocator._M_TRIM_THRESHOLD, 2**31 - 1)):
    assert libc.mallopt(param, value) == 1
else:
  host_allocator.configure(sys.argv[1])
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
block = libc.malloc(3 << 30)
assert block, 'malloc failed'
end = libc.sbrk(0)
libc.free(block)
print('trimmed' if libc.sbrk(0) < end else 'kept')
"""


def heap_after_freeing_3_gib(setting: str) -> str:
  return run_program(TRIM_PROGRAM, setting, 60).strip()


def test_reuse_never_trims_the_heap_even_above_2_gib():
  # At the paper's widths two steps in flight hold more than 2 GiB: a trim threshold of INT_MAX
  # let glibc hand that top back after every step, and the next step faulted it in again.
  assert heap_after_freeing_3_gib('int_max') == 'trimmed'
  assert heap_after_freeing_3_gib('reuse') == 'kept'


def test_auto_reuses_on_a_cpu_only_jax():
  setting, faults = faults_per_call('auto')
  assert setting == 'reuse' and faults < 4000, (setting, faults)
  # JAX_PLATFORMS naming an accelerator: 'auto' keeps glibc's defaults (the program still
  # runs, on the CPU fallback of JAX_PLATFORMS=cuda,cpu when no GPU is there).
  setting, faults = faults_per_call('auto', platforms='cuda,cpu')
  assert setting == 'system' and faults > 8000


def test_cpu_only():
  assert host_allocator.cpu_only('cpu', plugins=True)
  assert host_allocator.cpu_only(' CPU ', plugins=True)
  assert not host_allocator.cpu_only('cuda,cpu', plugins=False)
  assert not host_allocator.cpu_only('tpu', plugins=False)
  assert host_allocator.cpu_only('', plugins=False)
  assert not host_allocator.cpu_only('', plugins=True)


def test_reuse_refused_after_the_backend_started(capsys, monkeypatch):
  # (a run earlier in this process may have applied 'auto' before the backend started)
  monkeypatch.setattr(host_allocator, '_in_effect', 'system')
  jax.devices()  # this process's backend has started (conftest's fake devices)
  assert host_allocator.configure('reuse') == 'system'
  assert host_allocator.in_effect() == 'system'
  err = capsys.readouterr().err
  assert "train.host_allocator=reuse not applied: JAX's backend already started" in err
  assert host_allocator.configure('auto') == 'system'  # 'auto' stays quiet
  assert capsys.readouterr().err == ''


def test_system_changes_nothing(capsys, monkeypatch):
  monkeypatch.setattr(host_allocator, '_in_effect', 'system')
  assert host_allocator.configure('system') == 'system'
  assert capsys.readouterr().err == ''
