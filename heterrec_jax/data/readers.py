"""Readers of interaction logs and item tables, one function per format (SPEC section 2).

Every reader returns a `raw.RawData`: the events in file order and the item table with its
feature columns typed TOKEN, TOKEN_SEQ or FLOAT (`prepare.py` decides the token kinds from
these types, see `tokenizer.detect_kinds`). Formats:

  recbole     a folder with RecBole atomic files `NAME.inter` and `NAME.item` (`.user` ignored)
  movielens   raw ml-100k (`u.data`, `u.item`) or ml-1m (`ratings.dat`, `movies.dat`)
  amazon      Amazon reviews 2014/2018 JSON lines (+ meta with `items=`)
  amazon2023  Amazon reviews 2023 JSON lines (+ meta with `items=`)
  csv         CSV, TSV or Parquet with the column names given by the caller

Files ending in `.gz` are read through gzip. Titles are free text and never read as features
(a title embedding comes in as a multimodal matrix instead). Without an item file the item
table holds the items of the events, in first-seen order, with no feature columns. Bad input
raises `PrepareError` with `FILE:LINE: reason`, or naming the missing column and those found.
"""

from __future__ import annotations

import ast
import contextlib
import csv as csv_lib
import json
import math
import pathlib
import re
from typing import Any, Callable, Iterator

import numpy as np

from heterrec_jax.data.raw import (FLOAT, TOKEN, TOKEN_SEQ, Column, ItemTable, PrepareError,
                                   RawData)
# Re-exported for the callers of the readers (prepare's flags, tests): the shared fields.
from heterrec_jax.data.fields import (MULTI_SEPS, TIME_UNITS, EventLog, clean_id, column_index,  # noqa: F401
                                      detect_unit, item_key, numbered_lines, parse_number,
                                      parse_price, parse_stamp, table_from_records, to_seconds,
                                      token_value, token_values)

__all__ = ['PrepareError', 'READERS', 'amazon', 'amazon2023', 'csv', 'movielens', 'recbole']

RECBOLE_TYPES = ('token', 'token_seq', 'float', 'float_seq')
ML100K_GENRES = ('unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
                 'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical',
                 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western')
# ---------------------------------------------------------------------------------------------
# RecBole atomic files.


def _recbole_header(line: str, path: pathlib.Path) -> list[tuple[str, str]]:
  header = []
  for field in line.split('\t'):
    name, sep, kind = field.strip().partition(':')
    if not sep or kind not in RECBOLE_TYPES:
      raise PrepareError(f'{path}:1: header field {field!r} is not name:type with type one of '
                         f'{RECBOLE_TYPES}')
    header.append((name, kind))
  return header


def _atomic_file(path: pathlib.Path, progress: bool):
  """(header [(name, type)], iterator of (line number, fields)) of a RecBole atomic file."""
  lines = numbered_lines(path, progress=progress)
  first = next(lines, None)
  if first is None:
    raise PrepareError(f'{path}: empty file (no header line)')
  header = _recbole_header(first[1], path)

  def rows():
    for line_no, line in lines:
      if not line.strip():
        continue
      fields = line.split('\t')
      if len(fields) != len(header):
        raise PrepareError(f'{path}:{line_no}: expected {len(header)} tab-separated fields '
                           f'({", ".join(n for n, _ in header)}), found {len(fields)}')
      yield line_no, fields
  return header, rows()


def _recbole_files(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """The .inter file and its .item file (or None) of a folder or of a given .inter file."""
  if path.is_dir():
    inters = sorted(path.glob('*.inter')) + sorted(path.glob('*.inter.gz'))
    named = [p for p in inters if p.name.split('.inter')[0] == path.name]
    if len(inters) != 1 and len(named) != 1:
      raise PrepareError(f'{path}: expected one .inter file (or {path.name}.inter), found '
                         f'{[p.name for p in inters]}')
    inter = named[0] if named else inters[0]
  elif path.is_file():
    inter = path
  else:
    raise PrepareError(f'{path}: no such file or folder')
  stem = inter.name.split('.inter')[0]
  items = [inter.with_name(f'{stem}.item{gz}') for gz in ('', '.gz')]
  return inter, next((p for p in items if p.is_file()), None)


def _recbole_value(text: str, kind: str, where: str) -> Any:
  if kind == 'token':
    return token_value(text)
  if kind == 'token_seq':
    return tuple(dict.fromkeys(text.split())) or None
  if not text.strip():
    return math.nan
  number = parse_number(text)
  if number is None:
    raise PrepareError(f'{where}: {text!r} is not a number (the column is float)')
  return number


def _recbole_items(path: pathlib.Path, progress: bool, drop_missing_ids: bool) -> ItemTable:
  header, rows = _atomic_file(path, progress)
  names = [n for n, _ in header]
  key = column_index(names, 'item_id', path)
  features = [(i, n, k) for i, (n, k) in enumerate(header) if i != key and k != 'float_seq']
  keys, records, missing = [], {n: [] for _, n, _ in features}, 0
  for line_no, fields in rows:
    key_text = item_key(fields[key], f'{path}:{line_no}', drop_missing_ids)
    if key_text is None:
      missing += 1
      continue
    keys.append(key_text)
    for i, name, kind in features:
      records[name].append(_recbole_value(fields[i], kind, f'{path}:{line_no}'))
  types = {n: {'token': TOKEN, 'token_seq': TOKEN_SEQ, 'float': FLOAT}[k]
           for _, n, k in features}
  return table_from_records(keys, records, types, path, missing)


def recbole(path: str | pathlib.Path, *, progress: bool = True, drop_missing_ids: bool = False,
            time_unit: str = 'auto') -> RawData:
  """RecBole atomic files: `user_id`, `item_id`, `timestamp` of the .inter file; the .item
  file's token/token_seq/float columns as features (float_seq columns are ignored)."""
  inter, item_file = _recbole_files(pathlib.Path(path))
  header, rows = _atomic_file(inter, progress)
  names = [n for n, _ in header]
  cols = [column_index(names, c, inter) for c in ('user_id', 'item_id', 'timestamp')]
  log = EventLog(inter, drop_missing_ids, time_unit)
  for line_no, fields in rows:
    log.add(*(fields[c] for c in cols), line_no)
  table = _recbole_items(item_file, progress, drop_missing_ids) if item_file else None
  return log.raw_data(table)


# ---------------------------------------------------------------------------------------------
# MovieLens raw files.


def _split_lines(path: pathlib.Path, sep: str, n_fields: int, progress: bool,
                 encoding: str = 'latin-1') -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, fields) of a separated file with exactly `n_fields` per line."""
  for line_no, line in numbered_lines(path, encoding=encoding, progress=progress):
    if not line.strip():
      continue
    fields = line.split(sep)
    if len(fields) != n_fields:
      raise PrepareError(f'{path}:{line_no}: expected {n_fields} {sep!r}-separated fields, '
                         f'found {len(fields)}')
    yield line_no, fields


def _events(path: pathlib.Path, sep: str, progress: bool, log: EventLog) -> EventLog:
  """The events of a `user SEP item SEP rating SEP timestamp` file, added to `log`."""
  for line_no, (user, item, _, stamp) in _split_lines(path, sep, 4, progress):
    log.add(user, item, stamp, line_no)
  return log


def _ml_items(path: pathlib.Path, sep: str, n_fields: int, progress: bool, drop: bool,
              parse: Callable[[str, list[str]], tuple[tuple[str, ...] | None, float]]):
  """The item table of u.item or movies.dat: `parse(where, fields)` gives (genres, year)."""
  keys, genres, years, missing = [], [], [], 0
  for line_no, fields in _split_lines(path, sep, n_fields, progress):
    key = item_key(fields[0], f'{path}:{line_no}', drop)
    if key is None:
      missing += 1
      continue
    keys.append(key)
    genre, year = parse(f'{path}:{line_no}', fields)
    genres.append(genre)
    years.append(year)
  return table_from_records(keys, {'genres': genres, 'year': years},
                             {'genres': TOKEN_SEQ, 'year': FLOAT}, path, missing)


def _ml100k_item(where: str, fields: list[str]) -> tuple[tuple[str, ...] | None, float]:
  flags = fields[5:]
  if any(f not in ('0', '1') for f in flags):
    raise PrepareError(f'{where}: genre flags must be 0 or 1, found {flags}')
  year = re.search(r'(\d{4})\s*$', fields[2])
  return (tuple(g for g, f in zip(ML100K_GENRES, flags) if f == '1') or None,
          float(year.group(1)) if year else math.nan)


def _ml1m_item(_: str, fields: list[str]) -> tuple[tuple[str, ...] | None, float]:
  year = re.search(r'\((\d{4})\)\s*$', fields[1])
  return (tuple(g for g in fields[2].strip().split('|') if g) or None,
          float(year.group(1)) if year else math.nan)


def _ml100k_items(path: pathlib.Path, progress: bool, drop: bool) -> ItemTable:
  return _ml_items(path, '|', 5 + len(ML100K_GENRES), progress, drop, _ml100k_item)


def _ml1m_items(path: pathlib.Path, progress: bool, drop: bool) -> ItemTable:
  return _ml_items(path, '::', 3, progress, drop, _ml1m_item)


def movielens(path: str | pathlib.Path, *, progress: bool = True,
              drop_missing_ids: bool = False, time_unit: str = 'auto') -> RawData:
  """MovieLens raw files: a folder with ml-100k's `u.data` + `u.item` or ml-1m's `ratings.dat`
  + `movies.dat`. Features: `genres` (multi-valued) and `year` (release year, numerical)."""
  folder = pathlib.Path(path)
  if (folder / 'u.data').is_file():
    log = EventLog(folder / 'u.data', drop_missing_ids, time_unit)
    events = _events(folder / 'u.data', '\t', progress, log)
    item_file, read_items = folder / 'u.item', _ml100k_items
  elif (folder / 'ratings.dat').is_file():
    log = EventLog(folder / 'ratings.dat', drop_missing_ids, time_unit)
    events = _events(folder / 'ratings.dat', '::', progress, log)
    item_file, read_items = folder / 'movies.dat', _ml1m_items
  else:
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise PrepareError(f'{folder}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found; '
                       f'files found: {found}')
  table = read_items(item_file, progress, drop_missing_ids) if item_file.is_file() else None
  return events.raw_data(table, str(folder))


# ---------------------------------------------------------------------------------------------
# Amazon reviews (JSON lines).


def _parse_record(line: str, where: str) -> dict:
  """One JSON object, or a Python literal dict (the 2014 meta files are written that way)."""
  try:
    record = json.loads(line)
  except (ValueError, RecursionError):
    try:
      record = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      raise PrepareError(f'{where}: not a JSON object (nor a Python literal)') from None
  if not isinstance(record, dict):
    raise PrepareError(f'{where}: expected an object, found {type(record).__name__}')
  return record


def _records(path: pathlib.Path, progress: bool) -> Iterator[tuple[int, str, dict]]:
  """Yields (line number, 'FILE:LINE', record) of a JSON-lines file."""
  for line_no, line in numbered_lines(path, progress=progress):
    if line.strip():
      yield line_no, f'{path}:{line_no}', _parse_record(line, f'{path}:{line_no}')


def _field(record: dict, name: str, where: str) -> Any:
  if name not in record:
    raise PrepareError(f'{where}: no field {name!r}; fields found: {sorted(record)}')
  return record[name]


def _json_events(path: pathlib.Path, fields: tuple[str, str, str], progress: bool,
                 log: EventLog) -> EventLog:
  for line_no, where, record in _records(path, progress):
    log.add(*(_field(record, f, where) for f in fields), line_no)
  return log


# column -> (types, [record fields tried in order], converter)
_Spec = dict[str, tuple[str, tuple[str, ...], Callable[[Any], Any]]]
AMAZON_META: _Spec = {
    'categories': (TOKEN_SEQ, ('categories', 'category'), token_values),
    'main_cat': (TOKEN, ('main_cat',), token_value),
    'brand': (TOKEN, ('brand',), token_value),
    'price': (FLOAT, ('price',), parse_price),
}
AMAZON2023_META: _Spec = {
    'main_category': (TOKEN, ('main_category',), token_value),
    'categories': (TOKEN_SEQ, ('categories',), token_values),
    'store': (TOKEN, ('store',), token_value),
    'price': (FLOAT, ('price',), parse_price),
}


def _json_items(path: pathlib.Path, key: str, spec: _Spec, progress: bool,
                drop: bool) -> ItemTable:
  keys, records, missing = [], {name: [] for name in spec}, 0
  for _, where, record in _records(path, progress):
    key_text = item_key(_field(record, key, where), where, drop)
    if key_text is None:
      missing += 1
      continue
    keys.append(key_text)
    for name, (_, fields, convert) in spec.items():
      value = next((record[f] for f in fields if f in record), None)
      records[name].append(convert(value))
  return table_from_records(keys, records, {n: s[0] for n, s in spec.items()}, path, missing)


def amazon(path: str | pathlib.Path, *, items: str | pathlib.Path | None = None,
           progress: bool = True, drop_missing_ids: bool = False,
           time_unit: str = 'auto') -> RawData:
  """Amazon reviews 2014/2018: `reviewerID, asin, unixReviewTime`; the meta file `items`
  gives `categories` (2014, list of lists, flattened) or `category` (2018), `main_cat`, `brand`
  and `price` (numbers or strings like '$12.99')."""
  path = pathlib.Path(path)
  log = _json_events(path, ('reviewerID', 'asin', 'unixReviewTime'), progress,
                     EventLog(path, drop_missing_ids, time_unit))
  table = (_json_items(pathlib.Path(items), 'asin', AMAZON_META, progress, drop_missing_ids)
           if items else None)
  return log.raw_data(table)


def amazon2023(path: str | pathlib.Path, *, items: str | pathlib.Path | None = None,
               progress: bool = True, drop_missing_ids: bool = False,
               time_unit: str = 'ms') -> RawData:
  """Amazon reviews 2023: `user_id, parent_asin, timestamp` (milliseconds unless `time_unit`
  says otherwise); the meta file `items` gives `main_category`, `categories`, `store` and
  `price`."""
  path = pathlib.Path(path)
  log = _json_events(path, ('user_id', 'parent_asin', 'timestamp'), progress,
                     EventLog(path, drop_missing_ids, time_unit))
  table = (_json_items(pathlib.Path(items), 'parent_asin', AMAZON2023_META, progress,
                       drop_missing_ids) if items else None)
  return log.raw_data(table)


# ---------------------------------------------------------------------------------------------
# CSV, TSV and Parquet.


def _tabular_kind(path: pathlib.Path, sep: str | None) -> str:
  """'parquet' or the delimiter of a tabular file, from `sep` or the file's extension."""
  suffixes = [s for s in path.suffixes if s != '.gz']
  suffix = suffixes[-1].lower() if suffixes else ''
  if suffix in ('.parquet', '.pq'):
    return 'parquet'
  if sep is not None:
    return sep
  if suffix in ('.tsv', '.tab'):
    return '\t'
  if suffix == '.csv':
    return ','
  raise PrepareError(f'{path}: cannot tell the delimiter from the extension {suffix!r}; '
                     'name the file .csv/.tsv/.parquet or pass --sep')


def _read_csv(path: pathlib.Path, sep: str, progress: bool) -> tuple[dict[str, list], list]:
  """Columns by header name, and the line number of each row."""
  with contextlib.closing(numbered_lines(path, progress=progress)) as lines:
    # Ends put back: a quoted field spanning lines keeps its line break (an id is then refused).
    reader = csv_lib.reader((line + '\n' for _, line in lines), delimiter=sep)
    try:
      header = next(reader, None)
      if header is None:
        raise PrepareError(f'{path}: empty file (no header line)')
      columns, lines = {name: [] for name in header}, []
      for row in reader:
        if not row:
          continue
        if len(row) != len(header):
          raise PrepareError(f'{path}:{reader.line_num}: expected {len(header)} {sep!r}-'
                             f'separated fields, found {len(row)}')
        for values, value in zip(columns.values(), row):
          values.append(value)
        lines.append(reader.line_num)
    except csv_lib.Error as e:
      raise PrepareError(f'{path}:{reader.line_num}: {e}') from None
  return columns, lines


def _read_parquet(path: pathlib.Path) -> tuple[dict[str, list], range]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except
    raise PrepareError(f'{path}: not a readable Parquet file ({e})') from None
  columns = {name: table.column(name).to_pylist() for name in table.column_names}
  return columns, range(1, table.num_rows + 1)


def _read_tabular(path: pathlib.Path, sep: str | None, progress: bool):
  if not path.is_file():
    raise PrepareError(f'{path}: no such file')
  kind = _tabular_kind(path, sep)
  return _read_parquet(path) if kind == 'parquet' else _read_csv(path, kind, progress)


def check_multi_sep(values: list, name: str, multi_sep: str, path: pathlib.Path) -> None:
  """A --multi column none of whose values holds `multi_sep`, while some hold another common
  separator, is an error naming the separator to pass."""
  texts = [v for v in values if isinstance(v, str)]
  if not texts or any(multi_sep in v for v in texts):
    return
  found = {sep: sum(sep in v for v in texts) for sep in MULTI_SEPS if sep != multi_sep}
  sep, count = max(found.items(), key=lambda kv: kv[1])
  if count:
    raise PrepareError(f'{path}: --multi column {name!r}: no value contains --multi-sep '
                       f'{multi_sep!r} but {count} values contain {sep!r}; pass --multi-sep '
                       f"'{sep}'")


def _infer_column(values: list, multi_sep: str | None) -> Column:
  """A feature column from tabular values: lists (or `multi_sep`-joined text for a --multi
  column) -> TOKEN_SEQ, numbers -> FLOAT, anything else -> TOKEN (text; '' is missing)."""
  if multi_sep is not None:
    return Column(TOKEN_SEQ, [token_values(v.split(multi_sep) if isinstance(v, str) else v)
                              for v in values])
  present = [v for v in values if v is not None]
  if any(isinstance(v, (list, tuple, np.ndarray)) for v in present):
    return Column(TOKEN_SEQ, [token_values(v) for v in values])
  if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
    return Column(FLOAT, [math.nan if v is None else float(v) for v in values])
  return Column(TOKEN, [token_value(v) for v in values])


def _tabular_items(path: pathlib.Path, key_col: str, sep: str | None, multi: tuple[str, ...],
                   multi_sep: str, progress: bool, drop: bool) -> ItemTable:
  columns, lines = _read_tabular(path, sep, progress)
  column_index(list(columns), key_col, path)
  rows = isinstance(lines, range)  # Parquet: row numbers
  keys = [item_key(k, f'{path}: row {n}' if rows else f'{path}:{n}', drop)
          for k, n in zip(columns.pop(key_col), lines)]
  kept = [i for i, k in enumerate(keys) if k is not None]
  if not kept:
    raise PrepareError(f'{path}: no items found (empty item file)')
  for name in multi:
    if name in columns:
      check_multi_sep(columns[name], name, multi_sep, path)
  return ItemTable(keys=[keys[i] for i in kept], missing=len(keys) - len(kept), columns={
      name: _infer_column([values[i] for i in kept], multi_sep if name in multi else None)
      for name, values in columns.items()})


def csv(path: str | pathlib.Path, *, user_col: str, item_col: str, time_col: str,
        items: str | pathlib.Path | None = None, item_key_col: str | None = None,
        sep: str | None = None, multi: tuple[str, ...] = (), multi_sep: str = '|',
        time_unit: str = 'auto', progress: bool = True,
        drop_missing_ids: bool = False) -> RawData:
  """CSV/TSV (delimiter from the extension or `sep`) or Parquet with named columns; the item
  file `items` (same kinds of file) is keyed by `item_key_col` (default `item_col`), and its
  other columns are the features; `multi` columns hold `multi_sep`-joined values."""
  path = pathlib.Path(path)
  columns, lines = _read_tabular(path, sep, progress)
  for col in (user_col, item_col, time_col):
    column_index(list(columns), col, path)
  log = EventLog(path, drop_missing_ids, time_unit, rows=isinstance(lines, range))
  for row in zip(columns[user_col], columns[item_col], columns[time_col], lines):
    log.add(*row)
  table = (_tabular_items(pathlib.Path(items), item_key_col or item_col, sep, tuple(multi),
                          multi_sep, progress, drop_missing_ids) if items else None)
  return log.raw_data(table)


READERS = {'recbole': recbole, 'movielens': movielens, 'amazon': amazon,
           'amazon2023': amazon2023, 'csv': csv}
