"""The prepared dataset folder: its schema, its atomic writer and its memory-mapped reader.

A folder written by `python -m heterrec_jax.data.prepare` holds (SPEC sections 2-3):

  schema.json        features of the item token table, counts, the split (this module's `Schema`)
  report.json        what preparation saw: users, items, events, dropped users, per-feature stats
  tokenizer.json     the fitted HTFL offline state (vocabularies, bin edges, quantile edges)
  offsets.npy        int64 [n_users + 1]  CSR offsets of each user's events
  items.npy          int32 [n_events]     item index of each event (1..n_items; 0 is padding)
  timestamps.npy     int64 [n_events]     unix seconds, sorted within each user (stable)
  item_tokens.npy    int32 [n_items + 1, S] token sub-ids of every item; row 0 is the padding item
  item_keys.txt      the original item id of item index i on line i (line 0: '<pad>')
  user_keys.txt      the original user id of user index u on line u
  embedding_NAME.npy float32 [n_items + 1, d'] the (PCA'd) raw multimodal features, for the
                     'w/o MFK' ablation; row 0 is zeros

Token sub-id conventions (columns of `item_tokens`, per feature, from `Feature.offset`):
  categorical  1 column;  0 = padding, 1 = unknown, 2.. = vocabulary values (hashed ones too)
  multi        max_values columns; each as categorical, 0 also pads unused value slots
  numerical    1 column;  0 = missing or padding, 1..n_bins = quantile bins
  multimodal   Z columns; 0 = missing or padding, 1..q^g = group code + 1
`Feature.table_size` is the number of rows of each sub-table (the embedding table of the
feature, or of one group for multimodal features).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
KINDS = ('categorical', 'multi', 'numerical', 'multimodal')


class DatasetError(ValueError):
  """A prepared folder that is missing, incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Feature:
  name: str  # feature (token kind) name; the first feature is always 'item_id'
  kind: str  # one of KINDS
  offset: int  # first column of this feature in item_tokens
  n_sub: int  # columns of this feature: 1, max_values (multi) or Z (multimodal)
  table_size: int  # rows of the embedding table (of each group's table for multimodal)


@dataclasses.dataclass(frozen=True)
class Schema:
  features: tuple[Feature, ...]
  n_users: int
  n_items: int
  n_events: int
  # {'kind': 'loo'} (leave-one-out) or {'kind': 'time', 'cutoff': unix seconds}
  split: dict[str, Any] = dataclasses.field(default_factory=lambda: {'kind': 'loo'})

  @property
  def n_kinds(self) -> int:
    """K: tokens per item."""
    return len(self.features)

  @property
  def n_sub(self) -> int:
    """S: columns of item_tokens."""
    return sum(f.n_sub for f in self.features)

  def feature(self, name: str) -> Feature:
    for f in self.features:
      if f.name == name:
        return f
    raise KeyError(f'no feature {name!r}; features: {[f.name for f in self.features]}')

  def to_json(self) -> dict[str, Any]:
    return {'version': SCHEMA_VERSION, 'n_users': self.n_users, 'n_items': self.n_items,
            'n_events': self.n_events, 'split': self.split,
            'features': [dataclasses.asdict(f) for f in self.features]}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Schema:
    features = tuple(Feature(**f) for f in data['features'])
    return cls(features=features, n_users=data['n_users'], n_items=data['n_items'],
               n_events=data['n_events'], split=data.get('split', {'kind': 'loo'}))


def dump_json(path: pathlib.Path, data: Any) -> None:
  """Writes JSON deterministically (sorted keys, fixed layout)."""
  path.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')


@dataclasses.dataclass
class Dataset:
  """A prepared folder, its arrays memory-mapped read-only."""
  path: pathlib.Path
  schema: Schema
  offsets: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  item_tokens: np.ndarray
  embeddings: dict[str, np.ndarray]

  @classmethod
  def load(cls, path: str | os.PathLike) -> Dataset:
    path = pathlib.Path(path)
    if not (path / 'schema.json').is_file():
      raise DatasetError(f'{path} is not a prepared dataset folder (no schema.json); '
                         'make one with python -m heterrec_jax.data.prepare')
    schema = Schema.from_json(json.loads((path / 'schema.json').read_text()))
    arrays = {}
    for name in ('offsets', 'items', 'timestamps', 'item_tokens'):
      file = path / f'{name}.npy'
      if not file.is_file():
        raise DatasetError(f'{file} is missing; prepare the folder again')
      arrays[name] = np.load(file, mmap_mode='r')
    embeddings = {f.name: np.load(path / f'embedding_{f.name}.npy', mmap_mode='r')
                  for f in schema.features if f.kind == 'multimodal'
                  and (path / f'embedding_{f.name}.npy').is_file()}
    dataset = cls(path=path, schema=schema, embeddings=embeddings, **arrays)
    dataset.check()
    return dataset

  def check(self) -> None:
    s = self.schema
    expect = {'offsets': (s.n_users + 1,), 'items': (s.n_events,),
              'timestamps': (s.n_events,), 'item_tokens': (s.n_items + 1, s.n_sub)}
    for name, shape in expect.items():
      if getattr(self, name).shape != shape:
        raise DatasetError(f'{self.path}/{name}.npy has shape {getattr(self, name).shape}, '
                           f'schema.json says {shape}')

  def fingerprint(self) -> str:
    """A short hash that changes when the dataset does: schema.json, and the shape, dtype and
    the first and last MiB of every array (cheap on large folders; a run records it and
    refuses to resume, evaluate or export against a folder with another one)."""
    digest = hashlib.sha256(json.dumps(self.schema.to_json(), sort_keys=True).encode())
    arrays = {'offsets': self.offsets, 'items': self.items, 'timestamps': self.timestamps,
              'item_tokens': self.item_tokens, **{f'embedding_{k}': v
                                                  for k, v in sorted(self.embeddings.items())}}
    for name, array in arrays.items():
      raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
      digest.update(f'{name}{array.shape}{array.dtype}'.encode())
      digest.update(raw[:1 << 20].tobytes())
      digest.update(raw[-(1 << 20):].tobytes())
    return digest.hexdigest()[:16]

  def user_events(self, user: int) -> tuple[np.ndarray, np.ndarray]:
    """The (items, timestamps) of one user, in time order."""
    lo, hi = self.offsets[user], self.offsets[user + 1]
    return self.items[lo:hi], self.timestamps[lo:hi]


def write_dataset(output: str | os.PathLike, *, schema: Schema, arrays: dict[str, np.ndarray],
                  texts: dict[str, list[str]], jsons: dict[str, Any]) -> pathlib.Path:
  """Writes a dataset folder atomically: into a temporary sibling, then renamed over `output`.

  `arrays` maps file stems to arrays (saved as .npy), `texts` file stems to lines (saved as
  .txt), `jsons` file stems to JSON data. A failure leaves any existing `output` untouched.
  """
  output = pathlib.Path(output).resolve()
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.tmp-', dir=output.parent))
  try:
    dump_json(tmp / 'schema.json', schema.to_json())
    for stem, array in arrays.items():
      np.save(tmp / f'{stem}.npy', np.ascontiguousarray(array), allow_pickle=False)
    for stem, lines in texts.items():
      (tmp / f'{stem}.txt').write_text(''.join(f'{line}\n' for line in lines))
    for stem, data in jsons.items():
      dump_json(tmp / f'{stem}.json', data)
    Dataset.load(tmp)  # never rename an inconsistent folder into place
    if output.exists():
      old = output.with_name(f'.{output.name}.old-{os.getpid()}')
      os.rename(output, old)
      os.rename(tmp, output)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output
