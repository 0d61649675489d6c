"""The device mesh, logical-axis rules and sharded construction of NNX state (SPEC section 9).

Modules name LOGICAL axes only (`nnx.with_partitioning(init, ('vocab', 'embed'))`); the rules
table of `MeshConfig` maps them to the mesh axes ("data", "model"). State is built from shapes
first (`nnx.eval_shape`) and then created already sharded by a jitted constructor.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from heterrec_jax import host_allocator
from heterrec_jax.config import Config, ConfigError, MeshConfig

AXES = ('data', 'model')


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment says this is a multi-host job.

  Must run before any other JAX call. Cloud TPU pods, SLURM and explicit coordinator variables
  are recognised; a single-process run does nothing.
  """
  multi_host = ('JAX_COORDINATOR_ADDRESS' in os.environ
                or int(os.environ.get('SLURM_NTASKS', '1')) > 1
                or int(os.environ.get('JAX_NUM_PROCESSES', '1')) > 1
                or 'TPU_WORKER_HOSTNAMES' in os.environ
                and ',' in os.environ['TPU_WORKER_HOSTNAMES'])
  if multi_host:
    jax.distributed.initialize()


def cpu_devices_for(cfg: Config, cores: int | None = None) -> int:
  """The XLA devices `train.cpu_devices` asks for: itself when >= 1; for 0 the largest count
  up to `cores` (default: the cores this process may run on) that the mesh resolves to and
  whose "data" axis divides both batch sizes and leaves `train.microbatches` dividing each
  device's part of the batch (1 when none does)."""
  if cfg.train.cpu_devices:
    return cfg.train.cpu_devices
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()

  def fits(n):
    try:
      data, _ = mesh_shape(cfg.mesh, n)
    except ConfigError:
      return False
    per_device, rest = divmod(cfg.train.batch_size, data)
    return not rest and not cfg.eval.batch_size % data and not per_device % cfg.train.microbatches

  return max([n for n in range(1, (cores or 1) + 1) if fits(n)], default=1)


def configure_cpu_devices(cfg: Config) -> None:
  """Splits a CPU-only host into `cpu_devices_for(cfg)` XLA devices (`jax_num_cpu_devices`)
  when that is not 1. Must run before JAX's backend starts: afterwards a different count warns
  and changes nothing. Where an accelerator may be present it does nothing."""
  n = cpu_devices_for(cfg)
  if n == 1 or not host_allocator.cpu_only():
    return
  if host_allocator.backend_started():
    if jax.device_count() != n:
      print(f'warning: train.cpu_devices={cfg.train.cpu_devices} ({n} devices) not applied: '
            f"JAX's backend already started in this process with {jax.device_count()} (it must "
            'be set before the first JAX computation or jax.devices())', file=sys.stderr)
    return
  jax.config.update('jax_num_cpu_devices', n)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int]:
  """Resolves -1 in the ("data", "model") sizes against the device count."""
  data, model = cfg.data, cfg.model
  if data == -1:
    data = n_devices // model
  if model == -1:
    model = n_devices // data
  if data * model != n_devices:
    raise ConfigError(f'mesh.data={cfg.data} x mesh.model={cfg.model} does not fit '
                      f'{n_devices} devices; their product must equal the device count')
  return data, model


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def logical_to_spec(names: tuple[str | None, ...] | None, shape: tuple[int, ...],
                    rules: tuple[tuple[str, str | None], ...], mesh: Mesh) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once, and a
  dimension that does not divide by its mesh axis size stays replicated."""
  if not names:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, size in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  return P(*spec)


def state_shardings(abstract_state: Any, rules, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of an abstract NNX state, from its variables' metadata."""
  def one(variable):
    value = variable.get_value() if hasattr(variable, 'get_value') else variable.value
    names = variable.get_metadata().get('out_sharding')
    spec = logical_to_spec(names, getattr(value, 'shape', ()), rules, mesh)
    return variable.replace(NamedSharding(mesh, spec))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build: Callable[[], Any], rules, mesh: Mesh) -> tuple[Any, Any, Any]:
  """Builds the NNX object returned by `build` directly sharded over `mesh`.

  Returns (graphdef, state, shardings) with `state` laid out by `shardings`.
  """
  def init():
    return nnx.split(build())[1]

  # Annotations are logical names, mapped here; Flax must not try to place them itself.
  with nnx.use_eager_sharding(False):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract_state, rules, mesh)
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: the leading axis over "data", the rest replicated."""
  return NamedSharding(mesh, P('data', *([None] * (ndim - 1))))


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's part (`jax.make_array_from_process_local_data`)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}
