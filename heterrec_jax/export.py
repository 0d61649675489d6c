"""Exports a trained run for serving with an approximate-nearest-neighbour index.

    python -m heterrec_jax.export --workdir DIR --output DIR2 [--checkpoint best|latest]

DIR2 receives
  item_embeddings.npy  float32 [n_items, d_k]  item vectors V as the model scores them, row i =
                       item_keys line i: unit length under loss.scoring='cosine', raw under 'dot'
  item_keys.txt        the original item id of each row
  user_embeddings.npy  float32 [n_users, d_k]  each user's vector from his latest T events
  user_keys.txt        the original user id of each row
  user_tower.jaxexport the jitted user tower (`jax.export`, parameters inside), called as
                       f(items[B,T] int32, tokens[B,T,S] int32, timestamps[B,T] int32, mask[B,T] bool)
                       -> [B, d_k]; load with `jax.export.deserialize(bytes).call(...)`
  manifest.json        shapes, dtypes, where the run came from, `scoring`, and `seen_offsets`
A user's score for an item is the inner product of their rows under either scoring, so an ANN
index over this export is a maximum-inner-product index; a cosine index ranks a 'dot' model's
items differently from its evaluation. A model trained with `model.seen_bias` adds its
`seen_offsets` to the items of the user's own input (`seen.py`): apply them to the index's
candidates after the search (null: no such model).

DIR2 must be a new or empty folder, or an earlier export (it holds manifest.json), which is
replaced; a file, the workdir itself, a folder holding the workdir, or any other non-empty
folder is refused before anything is computed. The export is written into a temporary sibling
and renamed into place, so a failure leaves DIR2 as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heterrec_jax import averaging
from heterrec_jax import evaluate as evaluate_lib
from heterrec_jax import sharding
from heterrec_jax.checkpoint import CheckpointError
from heterrec_jax.config import ConfigError
from heterrec_jax.data import pipeline
from heterrec_jax.data.dataset import Dataset, DatasetError
from heterrec_jax.run import restore_run
from heterrec_jax.workdir import WorkdirError


class OutputError(ValueError):
  """An --output that export must not write into."""


def check_output(output: pathlib.Path, workdir: pathlib.Path) -> None:
  """Refuses an --output that is a file, is the workdir or holds it, or is a non-empty folder
  other than an earlier export."""
  out, run = output.resolve(), workdir.resolve()
  if out.exists() and not out.is_dir():
    raise OutputError(f'--output {output} is a file; give a new folder or an earlier export')
  if out == run or out in run.parents:
    raise OutputError(f'--output {output} is (or holds) the workdir {workdir}; '
                      'give a folder of its own')
  if out.is_dir() and any(out.iterdir()) and not (out / 'manifest.json').is_file():
    raise OutputError(f'--output {output} is a non-empty folder that is not an export '
                      '(no manifest.json); give a new or empty folder')


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
  """Writes the export of the run in `workdir` to `output` (see the module docstring)."""
  check_output(output, workdir)
  run = restore_run(workdir, which)
  cfg, dataset = run.cfg, run.dataset
  graphdef = evaluate_lib.eval_graphdef(run)
  # One device, jax arrays: the exported tower closes over them as constants.
  state = jax.tree.map(jnp.asarray, jax.device_get(averaging.model_state(run.state)))
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
  users = np.concatenate(users)
  if not (np.isfinite(users).all() and np.isfinite(np.asarray(items)[1:]).all()):
    raise evaluate_lib.NonFiniteScores(f'the {which} state of {workdir} gives NaN or infinite '
                                       'vectors: its training diverged; nothing was written')
  keys = (dataset.path / 'item_keys.txt').read_text().splitlines()[1:]
  w_K = nnx.merge(graphdef, state).seen_weights()
  score = 'inner product of user and item rows'
  if w_K is not None:
    score += (' + seen_offsets[min(floor(log2(d)), len - 1)] for an item the user read d >= 1 '
              'events back (its latest occurrence among the T inputs; model.seen_bias)')
  manifest = {'workdir': str(workdir), 'checkpoint': which, 'n_items': len(keys),
              'n_users': n_users, 'd_k': int(items.shape[1]), 'max_len': t, 'n_sub': s,
              'scoring': cfg.loss.scoring, 'score': score,
              'seen_offsets': None if w_K is None else np.asarray(w_K).round(6).tolist(),
              'dataset_fingerprint': dataset.fingerprint()}
  files = {'item_embeddings.npy': np.asarray(items)[1:], 'user_embeddings.npy': users,
           'item_keys.txt': ''.join(f'{k}\n' for k in keys),
           'user_keys.txt': (dataset.path / 'user_keys.txt').read_text(),
           'user_tower.jaxexport': exported.serialize(),
           'manifest.json': json.dumps(manifest, indent=1) + '\n'}
  _write_atomically(output, files)
  return manifest


def _write_atomically(output: pathlib.Path, files: dict) -> None:
  """Writes `files` (name -> array, text or bytes) into a temporary sibling of `output`, then
  renames it over `output` (an earlier export there is replaced)."""
  output = output.resolve()
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.tmp-', dir=output.parent))
  try:
    for name, data in files.items():
      if isinstance(data, np.ndarray):
        np.save(tmp / name, data, allow_pickle=False)
      elif isinstance(data, str):
        (tmp / name).write_text(data)
      else:
        (tmp / name).write_bytes(data)
    os.chmod(tmp, 0o777 & ~_umask())
    old = output.with_name(f'.{output.name}.old-{os.getpid()}')
    if output.exists():
      os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


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
  except (ConfigError, DatasetError, CheckpointError, OutputError, WorkdirError, OSError,
          evaluate_lib.NonFiniteScores) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(manifest))
  return 0


if __name__ == '__main__':
  sys.exit(main())
