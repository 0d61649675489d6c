"""Exports a trained run for serving with an approximate-nearest-neighbour index.

    python -m heterrec_jax.export --workdir DIR --output DIR2 [--checkpoint best|latest]

DIR2 receives
  item_embeddings.npy  float32 [n_items, d_k]  L2-normalised item vectors V, row i = item_keys line i
  item_keys.txt        the original item id of each row
  user_embeddings.npy  float32 [n_users, d_k]  each user's vector from his latest T events
  user_keys.txt        the original user id of each row
  user_tower.jaxexport the jitted user tower (`jax.export`, parameters inside), called as
                       f(items[B,T] int32, tokens[B,T,S] int32, timestamps[B,T] int32, mask[B,T] bool)
                       -> [B, d_k]; load with `jax.export.deserialize(bytes).call(...)`
  manifest.json        shapes, dtypes and where the run came from
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import sharding
from heterrec_jax.config import ConfigError
from heterrec_jax.data import pipeline
from heterrec_jax.data.dataset import Dataset, DatasetError
from heterrec_jax.run import restore_run


def latest_windows(dataset: Dataset, users: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
  """The latest `max_len` events of each user, right-aligned: the user tower's input."""
  offsets = np.asarray(dataset.offsets)
  return pipeline.windows(dataset, offsets[users], offsets[users + 1], max_len)


def user_tower(graphdef, state):
  """A function of the batch arrays alone, the parameters closed over."""
  def tower(items, tokens, timestamps, mask):
    return nnx.merge(graphdef, state).user_vector(items, tokens, timestamps, mask).astype(
        jnp.float32)
  return jax.jit(tower)


def export_run(workdir: pathlib.Path, output: pathlib.Path, which: str = 'best',
               batch_size: int = 256) -> dict:
  run = restore_run(workdir, which)
  cfg, dataset = run.cfg, run.dataset
  graphdef = evaluate_lib.eval_graphdef(run)
  # One device, jax arrays: the exported tower closes over them as constants.
  state = jax.tree.map(jnp.asarray, jax.device_get(evaluate_lib.model_state(run.state)))
  items = evaluate_lib.item_vectors(graphdef, state, dataset, cfg.eval.item_batch_size)
  tower = user_tower(graphdef, state)
  n_users, t, s = dataset.schema.n_users, cfg.data.max_len, dataset.schema.n_sub
  users = [np.asarray(tower(**latest_windows(dataset, np.arange(lo, min(lo + batch_size, n_users)),
                                                t)))
           for lo in range(0, n_users, batch_size)]
  b = jax.export.symbolic_shape('b')[0]
  spec = (jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t, s), jnp.int32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.bool_))
  exported = jax.export.export(tower)(*spec)
  output.mkdir(parents=True, exist_ok=True)
  np.save(output / 'item_embeddings.npy', np.asarray(items)[1:])
  np.save(output / 'user_embeddings.npy', np.concatenate(users))
  keys = (dataset.path / 'item_keys.txt').read_text().splitlines()[1:]
  (output / 'item_keys.txt').write_text(''.join(f'{k}\n' for k in keys))
  (output / 'user_keys.txt').write_text((dataset.path / 'user_keys.txt').read_text())
  (output / 'user_tower.jaxexport').write_bytes(exported.serialize())
  manifest = {'workdir': str(workdir), 'checkpoint': which, 'n_items': len(keys),
              'n_users': n_users, 'd_k': int(items.shape[1]), 'max_len': t, 'n_sub': s}
  (output / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--output', required=True, help='folder to write the export into')
  parser.add_argument('--checkpoint', default='best', choices=('best', 'latest'))
  args = parser.parse_args(argv)
  sharding.maybe_initialize_distributed()
  try:
    manifest = export_run(pathlib.Path(args.workdir), pathlib.Path(args.output), args.checkpoint)
  except (ConfigError, DatasetError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(manifest))
  return 0


if __name__ == '__main__':
  sys.exit(main())
