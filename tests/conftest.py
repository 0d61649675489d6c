"""Test setup: 8 fake CPU devices, set before JAX creates its backends, and a persistent
compilation cache private to this test session (tests build the same programs in several
modules; the cache compiles each once, and never touches the user's own cache)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='heterrec-test-xla-')
atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import chex  # noqa: E402

chex.set_n_cpu_devices(8)
