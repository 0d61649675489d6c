"""JAX's persistent compilation cache, pointed at a directory shared by runs.

Compiling HeterRec's train step takes tens of seconds on a CPU (minutes for big models on
TPU); with the cache a resumed run, a re-run, `evaluate`, `export` and the seeds of a sweep
load the compiled programs instead (`docs/benchmarks.md` has the measured saving). JAX keys an
entry on the program, the compile options and the backend, so a changed model or config simply
misses. The cache is trusted code: keep it in a directory only you can write.
"""

from __future__ import annotations

import os
import sys

import jax


def enable(path: str) -> str | None:
  """Points the cache at `path` (`~` expanded, created) unless a directory is already set
  (`JAX_COMPILATION_CACHE_DIR`, or an earlier call: JAX reads it once per process). Returns
  the directory in use, or None when the cache is off (`path` empty and nothing set, or a
  directory that cannot be created: a warning, not an error)."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not path:
    return None
  directory = os.path.expanduser(path)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f'warning: compilation cache off, cannot create {directory}: {e}', file=sys.stderr)
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory
