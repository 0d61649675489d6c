"""Test setup: 8 fake CPU devices, set before JAX creates its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import chex  # noqa: E402

chex.set_n_cpu_devices(8)
