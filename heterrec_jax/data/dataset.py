"""The prepared dataset folder: its schema, its atomic writer and its memory-mapped reader.

`Dataset.load` validates every folder it opens (schema, dtypes, shapes, offsets, id ranges,
sorted timestamps: `Dataset.check`) and refuses a damaged one with a one-line `DatasetError`
naming the file and the fix; `python -m heterrec_jax.data.check FOLDER` runs the same checks.
`write_dataset` replaces only a prepared folder, and only when asked (`check_output`).

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
import re
import shutil
import tempfile
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)  # schema.json versions this code reads
KINDS = ('categorical', 'multi', 'numerical', 'multimodal')


class DatasetError(ValueError):
  """A prepared folder that is missing, incomplete or inconsistent, or an output path that
  must not be written: the message is one line naming the file and the fix."""


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


# ---------------------------------------------------------------------------------------------
# Validation of a folder on load: cheap vectorised checks, each a one-line DatasetError.

AGAIN = 'prepare the folder again with python -m heterrec_jax.data.prepare'
_CHUNK = 1 << 24  # elements per step of the checks that read a whole array
_FEATURE_KEYS = ('name', 'kind', 'offset', 'n_sub', 'table_size')


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json(file: pathlib.Path) -> Any:
  """The JSON data of `file`, or a DatasetError naming it."""
  try:
    return json.loads(file.read_text())
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise DatasetError(f'{file}: not valid JSON ({str(e)[:80]}); {AGAIN}') from None


def read_schema(path: pathlib.Path) -> Schema:
  """The checked schema.json of the folder `path`."""
  file = path / 'schema.json'
  data = read_json(file)
  if not isinstance(data, dict):
    raise DatasetError(f'{file}: expected a JSON object; {AGAIN}')
  if type(data.get('version')) is not int or data['version'] not in SUPPORTED_VERSIONS:
    raise DatasetError(f'{file}: schema version {data.get("version")!r} is not supported '
                       f'(this code reads versions {list(SUPPORTED_VERSIONS)}); {AGAIN}')
  bad = [k for k in ('n_users', 'n_items', 'n_events') if not _is_count(data.get(k))]
  if bad or not isinstance(data.get('features'), list) or not data['features']:
    raise DatasetError(f'{file}: {bad or "features"} missing or not valid (counts must be '
                       f'integers >= 0, features a non-empty list); {AGAIN}')
  _check_features(file, data['features'])
  _check_split(file, data.get('split', {'kind': 'loo'}))
  return Schema.from_json(data)


def _check_features(file: pathlib.Path, features: list) -> None:
  offset = 0
  for i, f in enumerate(features):
    if (not isinstance(f, dict) or set(f) != set(_FEATURE_KEYS) or f['kind'] not in KINDS
        or not isinstance(f['name'], str) or f['offset'] != offset
        or not all(_is_count(f[k]) and f[k] >= 1 for k in ('n_sub', 'table_size'))):
      raise DatasetError(f'{file}: feature {i} is not valid (keys {list(_FEATURE_KEYS)}, kind '
                         f'in {KINDS}, offsets contiguous, n_sub and table_size >= 1); {AGAIN}')
    offset += f['n_sub']
  if features[0]['name'] != 'item_id':
    raise DatasetError(f'{file}: the first feature must be item_id; {AGAIN}')


def _check_split(file: pathlib.Path, split: Any) -> None:
  ok = isinstance(split, dict) and (
      split == {'kind': 'loo'} or (split.get('kind') == 'time' and set(split) == {'kind', 'cutoff'}
                                   and isinstance(split['cutoff'], int)))
  if not ok:
    raise DatasetError(f"{file}: split {split!r} is neither {{'kind': 'loo'}} nor "
                       f"{{'kind': 'time', 'cutoff': INT}}; {AGAIN}")


def load_array(file: pathlib.Path, ndim: int, kind: str) -> np.ndarray:
  """`file` memory-mapped read-only, checked to be a .npy of `ndim` dimensions whose dtype is
  of `kind` ('i': integer, 'f': floating)."""
  if not file.is_file():
    raise DatasetError(f'{file} is missing; {AGAIN}')
  try:
    array = np.load(file, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DatasetError(f'{file}: not a readable .npy array ({e}); {AGAIN}') from None
  ok = (np.issubdtype(array.dtype, np.integer) if kind == 'i'
        else np.issubdtype(array.dtype, np.floating))
  if array.ndim != ndim or not ok:
    want = 'integer' if kind == 'i' else 'float'
    raise DatasetError(f'{file}: expected a {ndim}-d {want} array, found {array.dtype} '
                       f'{array.shape}; {AGAIN}')
  return array


def _chunks(n: int):
  return ((lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK))


def _check_range(file: pathlib.Path, array: np.ndarray, lo: int, hi: int, what: str) -> None:
  """Every value of `array` in [lo, hi]."""
  flat = array.reshape(-1)
  for a, b in _chunks(flat.size):
    part = flat[a:b]
    if part.min() < lo or part.max() > hi:
      bad = a + int(np.flatnonzero((part < lo) | (part > hi))[0])
      raise DatasetError(f'{file}: {what} {int(flat[bad])} at position {bad} is outside '
                         f'[{lo}, {hi}]; {AGAIN}')


def _check_offsets(file: pathlib.Path, offsets: np.ndarray, n_events: int) -> None:
  steps = np.diff(offsets)
  if offsets[0] != 0 or offsets[-1] != n_events or (steps < 0).any():
    raise DatasetError(f'{file}: offsets must start at 0, never decrease and end at n_events='
                       f'{n_events} (found {int(offsets[0])}..{int(offsets[-1])}); {AGAIN}')


def _check_times(file: pathlib.Path, times: np.ndarray, offsets: np.ndarray) -> None:
  """Timestamps >= 0 and non-decreasing within each user (a user starts at an offset)."""
  starts = np.zeros(times.size + 1, bool)
  starts[offsets] = True
  for a, b in _chunks(times.size):
    part = np.asarray(times[max(a - 1, 0):b], np.int64)
    down = np.flatnonzero(np.diff(part) < 0) + max(a - 1, 0) + 1
    down = down[~starts[down]]
    if down.size or part.min() < 0:
      user = int(np.searchsorted(offsets, down[0], 'right') - 1) if down.size else -1
      raise DatasetError(f'{file}: timestamps must be >= 0 and non-decreasing within each user '
                         f'(user {user} is not); {AGAIN}')


def _check_tokens(file: pathlib.Path, schema: Schema, tokens: np.ndarray) -> None:
  if tokens[0].any():
    raise DatasetError(f'{file}: row 0 (the padding item) must be all zeros; {AGAIN}')
  for f in schema.features:
    _check_range(file, tokens[:, f.offset:f.offset + f.n_sub], 0, f.table_size - 1,
                 f'feature {f.name!r} sub-id')


def _check_lines(path: pathlib.Path, stem: str, n: int) -> None:
  """item_keys.txt / user_keys.txt, when present, hold exactly `n` lines."""
  file = path / f'{stem}.txt'
  if file.is_file():
    found = file.read_bytes().count(b'\n')
    if found != n:
      raise DatasetError(f'{file}: {found} lines, schema.json says {n}; {AGAIN}')


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
    """The folder `path`, validated (`check`): a DatasetError names the file and the fix."""
    path = pathlib.Path(path)
    if not (path / 'schema.json').is_file():
      raise DatasetError(f'{path} is not a prepared dataset folder (no schema.json); '
                         'make one with python -m heterrec_jax.data.prepare')
    schema = read_schema(path)
    arrays = {name: load_array(path / f'{name}.npy', ndim, 'i') for name, ndim in
              (('offsets', 1), ('items', 1), ('timestamps', 1), ('item_tokens', 2))}
    embeddings = {f.name: load_array(path / f'embedding_{f.name}.npy', 2, 'f')
                  for f in schema.features if f.kind == 'multimodal'
                  and (path / f'embedding_{f.name}.npy').is_file()}
    for stem in ('report', 'tokenizer'):
      if (path / f'{stem}.json').is_file():
        read_json(path / f'{stem}.json')
    dataset = cls(path=path, schema=schema, embeddings=embeddings, **arrays)
    dataset.check()
    return dataset

  def check(self) -> None:
    """Shapes, offsets, item ids, token sub-ids, timestamps and key files against the schema."""
    s, path = self.schema, self.path
    expect = {'offsets': (s.n_users + 1,), 'items': (s.n_events,),
              'timestamps': (s.n_events,), 'item_tokens': (s.n_items + 1, s.n_sub)}
    for name, shape in expect.items():
      if getattr(self, name).shape != shape:
        raise DatasetError(f'{path / name}.npy has shape {getattr(self, name).shape}, '
                           f'schema.json says {shape}; {AGAIN}')
    for name, matrix in self.embeddings.items():
      if matrix.shape[0] != s.n_items + 1 or not np.isfinite(matrix).all():
        raise DatasetError(f'{path}/embedding_{name}.npy: expected {s.n_items + 1} finite '
                           f'rows, found {matrix.shape}; {AGAIN}')
    _check_offsets(path / 'offsets.npy', self.offsets, s.n_events)
    if s.n_events:
      _check_range(path / 'items.npy', self.items, 1, s.n_items, 'item index')
      _check_times(path / 'timestamps.npy', self.timestamps, self.offsets)
    _check_tokens(path / 'item_tokens.npy', s, self.item_tokens)
    _check_lines(path, 'item_keys', s.n_items + 1)
    _check_lines(path, 'user_keys', s.n_users)

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


# ---------------------------------------------------------------------------------------------
# Writing, without ever replacing what is not a prepared folder.

# The files a prepared folder may hold: write_dataset replaces a folder only if it holds
# schema.json and nothing but these.
_DATASET_FILE = re.compile(r'^(schema\.json|report\.json|tokenizer\.json|item_keys\.txt|'
                           r'user_keys\.txt|[A-Za-z0-9_.-]+\.npy)$')


def is_dataset_folder(path: str | os.PathLike) -> bool:
  """True for a folder holding schema.json and only the files a prepared folder holds."""
  path = pathlib.Path(path)
  if path.is_symlink() or not path.is_dir() or not (path / 'schema.json').is_file():
    return False
  return all(p.is_file() and not p.is_symlink() and _DATASET_FILE.match(p.name)
             for p in path.iterdir())


def check_output(output: str | os.PathLike, overwrite: bool) -> pathlib.Path:
  """The resolved `output` if a dataset may be written there: absent, an empty folder, or a
  prepared folder when `overwrite`. Anything else is a DatasetError (nothing is touched)."""
  output = pathlib.Path(output).resolve()
  for parent in output.parents:
    if parent.exists() and not parent.is_dir():
      raise DatasetError(f'--output {output}: {parent} is a file, not a folder')
  if not output.exists():
    return output
  if not output.is_dir():
    raise DatasetError(f'--output {output} is an existing file; choose a folder path')
  if is_dataset_folder(output):
    if not overwrite:
      raise DatasetError(f'--output {output} already holds a prepared dataset; pass '
                         '--overwrite to replace it')
  elif any(output.iterdir()):
    raise DatasetError(f'--output {output} is a non-empty folder that is not a prepared '
                       'dataset; choose an empty or new folder (nothing was changed)')
  return output


def _umask() -> int:
  mask = os.umask(0o22)
  os.umask(mask)
  return mask


def write_dataset(output: str | os.PathLike, *, schema: Schema, arrays: dict[str, np.ndarray],
                  texts: dict[str, list[str]], jsons: dict[str, Any],
                  overwrite: bool = False) -> pathlib.Path:
  """Writes a dataset folder atomically: into a temporary sibling, then renamed over `output`.

  `arrays` maps file stems to arrays (saved as .npy), `texts` file stems to lines (saved as
  .txt), `jsons` file stems to JSON data. `output` must be absent, an empty folder, or (with
  `overwrite`) a prepared folder (`check_output`); nothing else is ever renamed or deleted. A
  failure leaves any existing `output` untouched. Folders get the modes of the user's umask.
  """
  output = check_output(output, overwrite)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.tmp-', dir=output.parent))
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    dump_json(tmp / 'schema.json', schema.to_json())
    for stem, array in arrays.items():
      np.save(tmp / f'{stem}.npy', np.ascontiguousarray(array), allow_pickle=False)
    for stem, lines in texts.items():
      (tmp / f'{stem}.txt').write_text(''.join(f'{line}\n' for line in lines))
    for stem, data in jsons.items():
      dump_json(tmp / f'{stem}.json', data)
    Dataset.load(tmp)  # never rename an inconsistent folder into place
    _replace(tmp, check_output(output, overwrite))  # checked again: it may have changed
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output


def _replace(tmp: pathlib.Path, output: pathlib.Path) -> None:
  """Renames `tmp` to `output`; an existing `output` (checked: empty or a prepared folder) is
  moved aside first and removed after."""
  if not output.exists():
    os.rename(tmp, output)
    return
  old = output.with_name(f'.{output.name}.old-{os.getpid()}')
  os.rename(output, old)
  os.rename(tmp, output)
  shutil.rmtree(old)
