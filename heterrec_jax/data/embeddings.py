"""Item embedding matrices for preparation (`prepare --embedding NAME=FILE.npy`): read without
pickles, checked (shape, dtype, finite rows), and aligned to the item table's rows, by position
or by the item ids listed in `--embedding-ids`. Bad files raise `PrepareError` naming them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from heterrec_jax.data import readers
from heterrec_jax.data.raw import ItemTable, PrepareError


def load_embeddings(specs: Sequence[str], ids_file: str | None,
                    table: ItemTable) -> dict[str, np.ndarray]:
  """NAME=FILE.npy matrices aligned to the item table's rows (nan rows: no embedding). Rows
  follow the table, or the item ids listed one per line in `ids_file`."""
  ids = _read_ids(ids_file) if ids_file else None
  embeddings = {}
  for spec in specs:
    name, sep, file = spec.partition('=')
    if not sep or not name or not file:
      raise PrepareError(f'--embedding {spec!r} must be NAME=FILE.npy')
    matrix = _load_matrix(file)
    if ids is None and matrix.shape[0] != len(table.keys):
      raise PrepareError(f'--embedding {file} has {matrix.shape[0]} rows but the item table '
                         f'has {len(table.keys)} items; pass --embedding-ids FILE to align them')
    if ids is not None:
      matrix = _align(matrix, ids, table, file, ids_file)
    embeddings[name] = matrix
  return embeddings


def _read_ids(file: str) -> list[str]:
  return [line for _, line in readers.numbered_lines(file, progress=False)]


def _load_matrix(file: str) -> np.ndarray:
  try:
    matrix = np.load(file, allow_pickle=False)
  except EOFError:
    raise PrepareError(f'{file}: empty file, not a .npy matrix') from None
  except (OSError, ValueError) as e:
    raise PrepareError(f'{file}: not a readable .npy matrix ({e})') from None
  if not isinstance(matrix, np.ndarray):  # an NpzFile
    matrix.close()
    raise PrepareError(f'{file}: a .npz archive, not a .npy matrix; save the matrix alone '
                       'with numpy.save')
  if (matrix.ndim != 2 or not matrix.size or not np.issubdtype(matrix.dtype, np.number)
      or np.issubdtype(matrix.dtype, np.complexfloating)):
    raise PrepareError(f'{file}: expected a non-empty real [n, d] matrix, found '
                       f'{matrix.dtype} {matrix.shape}')
  return matrix


def _align(matrix: np.ndarray, ids: list[str], table: ItemTable, file: str,
           ids_file: str) -> np.ndarray:
  if matrix.shape[0] != len(ids):
    raise PrepareError(f'--embedding {file} has {matrix.shape[0]} rows but --embedding-ids '
                       f'{ids_file} lists {len(ids)} ids')
  row = {key.strip(): i for i, key in enumerate(ids)}
  aligned = np.full((len(table.keys), matrix.shape[1]), np.nan)
  rows = [(t, row[k]) for t, k in enumerate(table.keys) if k in row]
  if rows:
    to_rows, from_rows = (np.array(r) for r in zip(*rows))
    aligned[to_rows] = matrix[from_rows]
  return aligned
