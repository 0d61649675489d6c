"""The host's memory allocator under XLA's CPU runtime: keep the memory one step frees for the next.

XLA's CPU runtime allocates a step's temporary buffer (the whole forward and backward: tens of
megabytes on ml-100k, about a gigabyte at the paper's widths) afresh every step with `malloc`,
from one of its worker threads. glibc serves a worker thread from a per-thread arena whose heaps
hold at most 64 MiB, so a larger request becomes its own `mmap`, unmapped again at `free`; the
kernel then zeroes and faults in every page of it on the next step (a third of the CPU time of a
small step, docs/benchmarks.md). `reuse` sets three of glibc's `mallopt` parameters so that the
pages stay with the process: one arena (M_ARENA_MAX = 1: every thread allocates from the main
heap, which can grow without bound), no per-allocation mappings (M_MMAP_MAX = 0) and no
trimming of the heap's top ever (M_TRIM_THRESHOLD -1, which glibc stores as the largest size:
INT_MAX, 2 GiB, let it trim at the paper's widths, where two steps in flight hold more than
that, and every step faulted the trimmed pages in again). The cost is resident memory: the
heap keeps its high-water mark, with some fragmentation on top (measured in
docs/benchmarks.md). Nothing numerical changes.

glibc fixes a thread's arena at its first allocation, so the parameters count only when set
before JAX starts its backend (the first `jax.devices()` or computation of the process):
`train`, `bench` and `experiments` set them as the run starts. Later in a process that already
ran JAX they cannot take effect: 'reuse' then warns and changes nothing. Linux with glibc only
('reuse' warns elsewhere too).

'auto' (the default) is 'reuse' where JAX can only run on the CPU (`JAX_PLATFORMS` names the
CPU alone, or no accelerator plugin is installed: no `jax_plugins` package or entry point, no
`libtpu`), and where it can apply; otherwise it silently stays 'system'. Accelerator hosts keep
glibc's defaults: their step's buffers live in the device's own memory pool.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int; glibc keeps the trim threshold as a size_t, so -1 is "never trim".
_NEVER_TRIM = -1

# What this process runs with: mallopt's parameters are the process's, set at most once.
_in_effect = 'system'


def in_effect() -> str:
  """The allocator setting this process runs with: 'system' or 'reuse'."""
  return _in_effect


def configure(setting: str) -> str:
  """Applies `setting` ('system': leave glibc's defaults; 'reuse': see the module docstring;
  'auto': 'reuse' on a CPU-only JAX where it can apply) to this process and returns the
  setting in effect afterwards. 'reuse' after JAX's backend has started, or without glibc,
  warns and leaves the allocator as it is."""
  global _in_effect
  if setting == 'system' or _in_effect == 'reuse':
    return _in_effect
  libc = _glibc()
  reason = _why_not(libc)
  if setting == 'auto':
    if reason or not cpu_only():
      return _in_effect
  elif reason:
    print(f'warning: train.host_allocator=reuse not applied: {reason}; the allocator stays '
          f'as it is ({_in_effect})', file=sys.stderr)
    return _in_effect
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
    if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
      print(f'warning: train.host_allocator=reuse: mallopt({param}, {value}) refused',
            file=sys.stderr)
  _in_effect = 'reuse'
  return _in_effect


def cpu_only(platforms: str | None = None, plugins: bool | None = None) -> bool:
  """Whether JAX can only run on the CPU: `platforms` (comma-separated; default: JAX's
  `jax_platforms`, i.e. `JAX_PLATFORMS`) names the CPU alone, or, when it is unset, no
  accelerator plugin is installed (`plugins`; default: looked up)."""
  if platforms is None:
    jax = sys.modules.get('jax')  # jax.config.update('jax_platforms', ...) too, once imported
    platforms = (jax.config.jax_platforms if jax else os.environ.get('JAX_PLATFORMS')) or ''
  names = {p.strip().lower() for p in platforms.split(',') if p.strip()}
  if names:
    return names == {'cpu'}
  return not (_accelerator_plugins() if plugins is None else plugins)


def _accelerator_plugins() -> bool:
  """Whether an accelerator backend is installed: a JAX PJRT plugin (the `jax_plugins`
  namespace or entry points: CUDA, ROCm, ...) or libtpu."""
  return bool(importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('jax_plugins')
              or importlib.util.find_spec('libtpu'))


def _glibc() -> ctypes.CDLL | None:
  """This process's glibc, or None (not Linux, or another C library)."""
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.gnu_get_libc_version  # glibc's own symbol: present in glibc, absent in musl
  except (OSError, AttributeError):
    return None
  return libc


def _why_not(libc: ctypes.CDLL | None) -> str:
  """Why 'reuse' cannot be applied now ('' when it can)."""
  if libc is None:
    return 'it needs Linux with glibc'
  if backend_started():
    return ("JAX's backend already started in this process (it must be set before the "
            'first JAX computation or jax.devices())')
  return ''


def backend_started() -> bool:
  """Whether JAX's backend has started in this process (`jax.devices()` or a computation ran)."""
  if 'jax' not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()
