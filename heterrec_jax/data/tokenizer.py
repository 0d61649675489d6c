"""HTFL offline: item features -> the int32 item token table (SPEC section 3).

`Tokenizer.fit` learns, once, from the item table (one row per item index 1..n_items):
  item_id      always the first feature: token = item index + 1 (table n_items + 2)
  categorical  a vocabulary (0 pad, 1 unknown or missing, 2.. values by descending item count,
               then value); values in fewer than `min_count` items are unknown; a vocabulary
               larger than `hash_buckets` (when set) is hashed: 2 + crc32(value) % buckets
  multi        the same vocabulary over the values of each item (de-duplicated, first
               `max_values` kept in order); unused slots 0; an item without values: [1, 0, ...]
  numerical    quantile bin edges over the items' finite values: code = 1 + #edges <= x;
               missing, NaN and inf -> 0
  multimodal   optional PCA to d', per-dimension quantile edges into q levels, groups of
               g = d'/Z dimensions read as one mixed-radix number in [0, q^g), stored + 1;
               an item without an embedding row (or a non-finite one) -> 0 in every group
`detect_kinds` decides which kind an item-table column becomes (see its docstring);
`Tokenizer.transform` writes the sub-id columns in `dataset.py`'s conventions, and
`Tokenizer.state`/`from_state` round-trip the fitted state through JSON (+ .npy PCA matrices).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import re
import zlib
from typing import Any

import numpy as np
import threadpoolctl

from heterrec_jax.data.dataset import Feature, dump_json
from heterrec_jax.data.raw import FLOAT, TOKEN, TOKEN_SEQ, Column, ItemTable, PrepareError

STATE_VERSION = 1
NUMERIC_FRACTION = 0.9  # a TOKEN column this numeric (over present values) is numerical
FREE_TEXT_FRACTION = 0.5  # more distinct values than this fraction of items: free text, skipped
GROUP_DIMS = 4  # default g: dimensions per multimodal group when PCA is automatic
MAX_GROUP_CODES = 1 << 24  # q^g above this would not fit a sane embedding table
PCA_ARRAYS = ('pca_mean', 'pca_components')  # arrays of a multimodal feature with PCA
JOINING_SEPS = ('|', ',', ';')  # a --multi token column mostly holding these is an error
_SAFE_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')


@dataclasses.dataclass(frozen=True)
class Options:
  """Tokenizer settings; each check names its command-line flag."""
  # Numerical features: quantile bins (duplicate edges collapse, so there may be fewer).
  n_bins: int = 16
  # Multimodal features: Z groups and q levels per dimension.
  groups: int = 8
  levels: int = 4
  # Multimodal PCA width d': None = groups * 4 when the embedding is wider, else no PCA;
  # 0 = never PCA; N = PCA to N dimensions.
  pca_dim: int | None = None
  # Multi-valued features: at most this many values per item (the max seen, capped here).
  max_values: int = 8
  # Categorical values present in fewer items are unknown (1).
  min_count: int = 1
  # Hash vocabularies larger than this into this many buckets (0: never).
  hash_buckets: int = 0
  # Overrides of the kind detection, by item-table column name.
  categorical: tuple[str, ...] = ()
  multi: tuple[str, ...] = ()
  numerical: tuple[str, ...] = ()
  skip: tuple[str, ...] = ()

  def __post_init__(self):
    for flag, value, low in (('--n-bins', self.n_bins, 2), ('--groups', self.groups, 1),
                             ('--levels', self.levels, 2), ('--max-values', self.max_values, 1),
                             ('--min-count', self.min_count, 1),
                             ('--hash-buckets', self.hash_buckets, 0)):
      if not isinstance(value, int) or value < low:
        raise PrepareError(f'{flag}={value!r} is not allowed; it must be an integer >= {low}')
    if self.pca_dim is not None and (not isinstance(self.pca_dim, int) or self.pca_dim < 0):
      raise PrepareError(f'--pca-dim={self.pca_dim!r} is not allowed; it must be >= 0')
    flags = [(n, f) for f in ('categorical', 'multi', 'numerical', 'skip')
             for n in getattr(self, f)]
    twice = sorted({n for n, _ in flags if sum(m == n for m, _ in flags) > 1})
    if twice:
      raise PrepareError(f'columns {twice} are named by more than one of --categorical, '
                         '--multi, --numerical, --skip')


# ---------------------------------------------------------------------------------------------
# Pure vectorised functions.


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
  """Inner bin edges: the (1..n_bins-1)/n_bins quantiles of the finite values (linear
  interpolation), duplicates collapsed and edges <= the minimum dropped (no empty bin 1)."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    return np.zeros(0)
  edges = np.unique(np.quantile(finite, np.arange(1, n_bins) / n_bins))
  return edges[edges > finite.min()]


def bin_codes(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """int32 codes: 1 + the number of edges <= x; 0 for NaN, inf and missing."""
  values = np.asarray(values, np.float64)
  codes = 1 + np.searchsorted(edges, values, side='right')
  return np.where(np.isfinite(values), codes, 0).astype(np.int32)


def level_edges(x_NxD: np.ndarray, levels: int) -> np.ndarray:
  """[levels - 1, D] per-dimension quantile edges (kept as they are, even if equal)."""
  return np.quantile(np.asarray(x_NxD, np.float64), np.arange(1, levels) / levels, axis=0)


def level_codes(x_NxD: np.ndarray, edges_QxD: np.ndarray) -> np.ndarray:
  """[N, D] levels in [0, Q]: the number of a dimension's edges <= x."""
  levels_NxD = np.zeros(x_NxD.shape, np.int64)
  for edge_D in edges_QxD:
    levels_NxD += x_NxD >= edge_D
  return levels_NxD


def mixed_radix_codes(levels_NxZxG: np.ndarray, radix: int) -> np.ndarray:
  """[N, Z] codes in [0, radix^G): the G levels of a group as digits, the first most
  significant."""
  g = levels_NxZxG.shape[-1]
  weights_G = radix ** np.arange(g - 1, -1, -1, dtype=np.int64)
  return np.einsum('nzg,g->nz', levels_NxZxG.astype(np.int64), weights_G)


def stable_hash(value: str) -> int:
  """A hash that is the same in every process and Python version (unlike `hash`)."""
  return zlib.crc32(value.encode('utf-8'))


def one_blas_thread():
  """A context in which BLAS and LAPACK run on one thread: their results then do not depend
  on the thread count (a threaded matmul may sum in another order), and they stay fast when
  other processes compete for the cores (an oversubscribed threaded BLAS spins)."""
  return threadpoolctl.threadpool_limits(limits=1, user_api='blas')


def pca_fit(x_NxD: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], components [dim, D]) of the top principal directions, each signed so that its
  largest-magnitude entry is positive (a deterministic choice of the eigenvector sign).
  Float64 on one BLAS thread: the same bytes whatever the thread count."""
  x_NxD = np.asarray(x_NxD, np.float64)
  mean_D = x_NxD.mean(0)
  centred_NxD = x_NxD - mean_D
  with one_blas_thread():
    _, vectors_DxD = np.linalg.eigh(centred_NxD.T @ centred_NxD)
  comps_KxD = vectors_DxD[:, ::-1][:, :dim].T
  signs_K = np.sign(comps_KxD[np.arange(dim), np.abs(comps_KxD).argmax(1)])
  return mean_D, comps_KxD * np.where(signs_K == 0, 1, signs_K)[:, None]


# ---------------------------------------------------------------------------------------------
# Kind detection and column conversion.


def _numeric_fraction(values: list[str]) -> float:
  parsed = sum(math.isfinite(v) for v in _parse_floats(values))
  return parsed / len(values)


def _parse_floats(values: list) -> np.ndarray:
  out = np.full(len(values), np.nan)
  for i, value in enumerate(values):
    try:
      out[i] = float(value)
    except (TypeError, ValueError):
      pass
  return out


def _detect(column: Column, n_items: int) -> tuple[str | None, str]:
  """(kind or None, why) of a column nobody named in a flag."""
  if column.type == FLOAT:
    return 'numerical', 'float column'
  present = [v for v in column.values if v is not None]
  if not present:
    return None, 'no values'
  if column.type == TOKEN and _numeric_fraction(present) >= NUMERIC_FRACTION:
    return 'numerical', f'token column, >= {NUMERIC_FRACTION:.0%} numeric'
  distinct = len(set(present) if column.type == TOKEN else {x for v in present for x in v})
  if distinct > FREE_TEXT_FRACTION * n_items:
    return None, f'{distinct} distinct values for {n_items} items (free text?)'
  return ('categorical', 'token column') if column.type == TOKEN else ('multi', 'token_seq')


def detect_kinds(table: ItemTable, options: Options) -> tuple[dict[str, str], dict[str, str]]:
  """(kind by feature column, in table order; why, by skipped column).

  FLOAT -> numerical. TOKEN whose present values parse as finite numbers for >= 90% of the
  items that have one -> numerical (the rest go to the missing bin). TOKEN/TOKEN_SEQ with more
  distinct values (TOKEN_SEQ: distinct single values) than half the items -> skipped as free
  text. Else TOKEN -> categorical, TOKEN_SEQ -> multi. The flags override all of this.
  """
  forced = {n: kind for kind in ('categorical', 'multi', 'numerical', 'skip')
            for n in getattr(options, kind)}
  unknown = sorted(set(forced) - set(table.columns))
  if unknown:
    raise PrepareError(f'feature flags name columns {unknown} that the item table does not '
                       f'have; columns found: {list(table.columns)}')
  kinds, skipped = {}, {}
  for name, column in table.columns.items():
    kind, why = (forced[name], 'flag') if name in forced else _detect(column, len(table.keys))
    if kind in (None, 'skip'):
      skipped[name] = 'skipped by --skip' if kind == 'skip' else why
    elif column.type == TOKEN_SEQ and kind == 'numerical':
      raise PrepareError(f'--numerical {name}: a multi-valued (token_seq) column cannot be '
                         'numerical')
    else:
      if column.type == TOKEN and kind == 'multi':
        _check_single_values(name, column)
      kinds[name] = kind
  return kinds, skipped


def _check_single_values(name: str, column: Column) -> None:
  """A token column made --multi keeps one value per item: an error when its values look
  joined by a separator (the reader, not the tokenizer, splits values)."""
  present = [v for v in column.values if v is not None]
  for sep in JOINING_SEPS:
    joined = sum(sep in v for v in present)
    if present and joined * 2 > len(present):
      raise PrepareError(f'--multi {name}: {joined} of {len(present)} values contain {sep!r} '
                         'but this column holds single values; for --format csv pass '
                         f"--multi-sep '{sep}', for recbole declare it {name}:token_seq with "
                         'space-separated values')


def _float_text(value: float) -> str | None:
  if not math.isfinite(value):
    return None
  return str(int(value)) if value.is_integer() else repr(value)


def column_values(column: Column, kind: str) -> list[tuple[str, ...]] | np.ndarray:
  """A column as the kind needs it: per item a tuple of values (categorical: at most one;
  empty = missing), or float64 values (numerical; nan = missing)."""
  if kind == 'numerical':
    return (np.asarray(column.values, np.float64) if column.type == FLOAT
            else _parse_floats(column.values))
  if column.type == FLOAT:
    texts = [_float_text(v) for v in column.values]
    return [(t,) if t is not None else () for t in texts]
  if column.type == TOKEN:
    return [(v,) if v is not None else () for v in column.values]
  if kind == 'categorical':
    return [(' '.join(v),) if v else () for v in column.values]
  return [tuple(dict.fromkeys(v)) if v else () for v in column.values]


# ---------------------------------------------------------------------------------------------
# Fitting and transforming one feature.


@dataclasses.dataclass
class FittedFeature:
  """One fitted feature: JSON parameters, and arrays (multimodal PCA) saved as .npy."""
  name: str
  kind: str
  params: dict[str, Any]
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def n_sub(self) -> int:
    return {'multi': self.params.get('max_values', 1),
            'multimodal': self.params.get('groups', 1)}.get(self.kind, 1)

  @property
  def table_size(self) -> int:
    p = self.params
    if 'n_items' in p:
      return p['n_items'] + 2
    if self.kind in ('categorical', 'multi'):
      return 2 + (p['hash_buckets'] if 'hash_buckets' in p else len(p['vocab']))
    if self.kind == 'numerical':
      return len(p['edges']) + 2
    return p['levels'] ** (p['dim'] // p['groups']) + 1


def fit_vocabulary(values: list[tuple[str, ...]], options: Options) -> dict[str, Any]:
  """{'vocab': values by descending item count then value} or {'hash_buckets': B}."""
  counts = collections.Counter(v for item in values for v in set(item))
  kept = sorted((v for v, c in counts.items() if c >= options.min_count),
                key=lambda v: (-counts[v], v))
  if options.hash_buckets and len(kept) > options.hash_buckets:
    return {'hash_buckets': options.hash_buckets, 'distinct_values': len(kept)}
  return {'vocab': kept}


def vocabulary_ids(values: list[tuple[str, ...]], params: dict[str, Any],
                   width: int) -> np.ndarray:
  """int32 [N, width]: the first `width` values' ids (2.. known, 1 unknown), 0 pads; an item
  without values gets [1, 0, ...]."""
  ids = np.zeros((len(values), width), np.int32)
  if 'hash_buckets' in params:
    buckets = params['hash_buckets']
    lookup = lambda v: 2 + stable_hash(v) % buckets
  else:
    index = {v: i + 2 for i, v in enumerate(params['vocab'])}
    lookup = lambda v: index.get(v, 1)
  for row, item in enumerate(values):
    ids[row, :min(len(item), width)] = [lookup(v) for v in item[:width]]
    if not item:
      ids[row, 0] = 1
  return ids


def _multimodal_dim(name: str, d_in: int, options: Options) -> int:
  """d': the width after PCA, checked against Z and q (errors name the flags)."""
  dim = options.pca_dim
  if dim is None:
    dim = options.groups * GROUP_DIMS if d_in > options.groups * GROUP_DIMS else d_in
  dim = dim or d_in
  if dim > d_in:
    raise PrepareError(f'--pca-dim={dim} exceeds the width {d_in} of embedding {name!r}')
  if dim % options.groups:
    raise PrepareError(f'--groups={options.groups} does not divide the width d\'={dim} of '
                       f'embedding {name!r}; choose --pca-dim as a multiple of --groups')
  if options.levels ** (dim // options.groups) > MAX_GROUP_CODES:
    raise PrepareError(f'embedding {name!r}: --levels={options.levels} to the power '
                       f'g = d\'/Z = {dim}/{options.groups} is too many codes per group; '
                       'lower --pca-dim or raise --groups')
  return dim


def fit_multimodal(name: str, matrix_NxD: np.ndarray, options: Options) -> FittedFeature:
  if not _SAFE_NAME.match(name):
    raise PrepareError(f'embedding name {name!r} must be letters, digits, _ . - only')
  matrix_NxD = np.asarray(matrix_NxD, np.float64)
  present_N = np.isfinite(matrix_NxD).all(1)
  if not present_N.any():
    raise PrepareError(f'embedding {name!r}: no item has a (finite) row')
  dim = _multimodal_dim(name, matrix_NxD.shape[1], options)
  feature = FittedFeature(name, 'multimodal', {
      'dim_in': matrix_NxD.shape[1], 'dim': dim, 'groups': options.groups,
      'levels': options.levels, 'pca': dim != matrix_NxD.shape[1]})
  if feature.params['pca']:
    mean_D, comps_KxD = pca_fit(matrix_NxD[present_N], dim)
    feature.arrays = {'pca_mean': mean_D, 'pca_components': comps_KxD}
  x_NxK = project(feature, matrix_NxD[present_N])
  feature.params['edges'] = level_edges(x_NxK, options.levels).tolist()
  return feature


def project(feature: FittedFeature, matrix_NxD: np.ndarray) -> np.ndarray:
  """float64 [N, d']: the (PCA'd) embedding rows."""
  matrix_NxD = np.asarray(matrix_NxD, np.float64)
  if not feature.params['pca']:
    return matrix_NxD
  with one_blas_thread():
    return (matrix_NxD - feature.arrays['pca_mean']) @ feature.arrays['pca_components'].T


def multimodal_ids(feature: FittedFeature, matrix_NxD: np.ndarray) -> np.ndarray:
  """int32 [N, Z] group codes + 1; 0 for every group of a row that is not finite."""
  p = feature.params
  present_N = np.isfinite(matrix_NxD).all(1)
  x_NxK = project(feature, np.where(present_N[:, None], matrix_NxD, 0.0))
  levels_NxK = level_codes(x_NxK, np.asarray(p['edges']))
  codes_NxZ = mixed_radix_codes(levels_NxK.reshape(len(x_NxK), p['groups'], -1), p['levels'])
  return np.where(present_N[:, None], codes_NxZ + 1, 0).astype(np.int32)


def fit_column(name: str, column: Column, kind: str, options: Options) -> FittedFeature:
  values = column_values(column, kind)
  if kind == 'numerical':
    return FittedFeature(name, kind, {'edges': quantile_edges(values, options.n_bins).tolist()})
  params = fit_vocabulary(values, options)
  if kind == 'multi':
    longest = max((len(v) for v in values), default=1)
    params.update(max_seen=longest, max_values=max(1, min(longest, options.max_values)))
  return FittedFeature(name, kind, params)


def column_ids(feature: FittedFeature, column: Column) -> np.ndarray:
  values = column_values(column, feature.kind)
  if feature.kind == 'numerical':
    return bin_codes(values, np.asarray(feature.params['edges']))[:, None]
  return vocabulary_ids(values, feature.params, feature.n_sub)


# ---------------------------------------------------------------------------------------------
# The tokenizer: all features of an item table.


@dataclasses.dataclass
class Tokenizer:
  """The fitted HTFL offline state: the features in token order, item_id first."""
  features: list[FittedFeature]
  options: Options
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)

  @classmethod
  def fit(cls, table: ItemTable, embeddings: dict[str, np.ndarray],
          options: Options) -> Tokenizer:
    """Fits every kept column of `table` and every embedding matrix (rows in table order)."""
    kinds, skipped = detect_kinds(table, options)
    features = [FittedFeature('item_id', 'categorical', {'n_items': len(table.keys)})]
    features += [fit_column(n, table.columns[n], k, options) for n, k in kinds.items()]
    for name, matrix in embeddings.items():
      check_rows(name, matrix, len(table.keys))
      features.append(fit_multimodal(name, matrix, options))
    names = [f.name for f in features]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
      raise PrepareError(f'feature names {clash} are used twice (item_id, item-table columns, '
                         '--embedding names); rename the embedding or --skip the column')
    return cls(features, options, skipped)

  def transform(self, table: ItemTable, embeddings: dict[str, np.ndarray]) -> np.ndarray:
    """int32 [n_items, S]: the sub-ids of each item row (no padding row)."""
    blocks = []
    for feature in self.features:
      if 'n_items' in feature.params:
        if len(table.keys) != feature.params['n_items']:
          raise PrepareError(f'the item table has {len(table.keys)} rows, the tokenizer was '
                             f'fitted on {feature.params["n_items"]}')
        blocks.append(np.arange(2, len(table.keys) + 2, dtype=np.int32)[:, None])
      elif feature.kind == 'multimodal':
        blocks.append(multimodal_ids(feature, np.asarray(embeddings[feature.name], np.float64)))
      else:
        blocks.append(column_ids(feature, table.columns[feature.name]))
    return np.concatenate(blocks, axis=1).astype(np.int32)

  def report(self, tokens_NxS: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per feature: its kind, table size and how the items' tokens came out."""
    report = {}
    for f, spec in zip(self.features, self.schema_features()):
      ids_NxV = tokens_NxS[:, spec.offset:spec.offset + spec.n_sub]
      entry = {'kind': f.kind, 'table_size': f.table_size}
      if f.kind in ('categorical', 'multi') and 'n_items' not in f.params:
        entry.update({k: v for k, v in f.params.items() if k != 'vocab'},
                     vocab=len(f.params.get('vocab', ())),
                     unknown_or_missing_items=int((ids_NxV[:, 0] == 1).sum()))
      elif f.kind == 'numerical':
        entry.update(bins=len(f.params['edges']) + 1, missing_items=int((ids_NxV == 0).sum()))
      elif f.kind == 'multimodal':
        entry.update({k: v for k, v in f.params.items() if k != 'edges'},
                     codes_per_group=f.table_size - 1,
                     codes_used=[len(np.unique(c[c > 0])) for c in ids_NxV.T],
                     missing_items=int((ids_NxV[:, 0] == 0).sum()))
      report[f.name] = entry
    return report

  def schema_features(self) -> tuple[Feature, ...]:
    offsets = np.cumsum([0] + [f.n_sub for f in self.features])
    return tuple(Feature(name=f.name, kind=f.kind, offset=int(o), n_sub=f.n_sub,
                         table_size=f.table_size) for f, o in zip(self.features, offsets))

  def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON data, arrays by file stem): what `from_state` needs; deterministic."""
    data = {'version': STATE_VERSION, 'options': dataclasses.asdict(self.options),
            'skipped': self.skipped,
            'features': [{'name': f.name, 'kind': f.kind, **f.params} for f in self.features]}
    arrays = {f'tokenizer_{f.name}_{key}': a for f in self.features for key, a in
              sorted(f.arrays.items())}
    return data, arrays

  @classmethod
  def from_state(cls, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> Tokenizer:
    options = Options(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in data['options'].items()})
    features = []
    for entry in data['features']:
      params = {k: v for k, v in entry.items() if k not in ('name', 'kind')}
      stems = {key: f'tokenizer_{entry["name"]}_{key}' for key in PCA_ARRAYS}
      mine = {key: arrays[stem] for key, stem in stems.items() if stem in arrays}
      features.append(FittedFeature(entry['name'], entry['kind'], params, mine))
    return cls(features, options, data.get('skipped', {}))

  def save(self, folder: str | pathlib.Path) -> None:
    """Writes tokenizer.json and the tokenizer_*.npy arrays into `folder`."""
    folder = pathlib.Path(folder)
    data, arrays = self.state()
    dump_json(folder / 'tokenizer.json', data)
    for stem, array in arrays.items():
      np.save(folder / f'{stem}.npy', array, allow_pickle=False)

  @classmethod
  def load(cls, folder: str | pathlib.Path) -> Tokenizer:
    folder = pathlib.Path(folder)
    data = json.loads((folder / 'tokenizer.json').read_text())
    arrays = {p.stem: np.load(p) for p in sorted(folder.glob('tokenizer_*.npy'))}
    return cls.from_state(data, arrays)


def check_rows(name: str, matrix: np.ndarray, n_items: int) -> None:
  shape = np.shape(matrix)
  if len(shape) != 2 or shape[0] != n_items:
    raise PrepareError(f'embedding {name!r} has shape {shape}; the item table has {n_items} '
                       'rows (expected [n_items, d])')
