"""Test setup: 8 fake CPU devices, set before JAX creates its backends, and a persistent
compilation cache private to this test session (tests build the same programs in several
modules; the cache compiles each once, and never touches the user's own cache), and XLA's
backend optimisation off: the suite's programs are tiny and most are run a few times, so
compiling is much of its time (configs/tiny.py's sharded state init compiles in 3 s instead of
15 s and its train step in 8 s instead of 17 s; the five slowest test files took 820 s against
1,009 s, run side by side). It changes how XLA's CPU code is optimised, not what it computes;
training and benchmarks outside the tests keep XLA's default."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()
os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='heterrec-test-xla-')
atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import chex  # noqa: E402

chex.set_n_cpu_devices(8)
