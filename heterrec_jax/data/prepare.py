"""The prepare command: read -> index items and users -> sort and filter events -> tokenise ->
write a dataset folder (SPEC sections 2-3; the folder format is `dataset.py`'s docstring).

    python -m heterrec_jax.data.prepare --format recbole --input ../shared/data/ml-100k \\
        --embedding title=../shared/data/ml-100k/ml-100k.title_minilm384.npy --output data/ml100k

Every flag is described in docs/data.md. The library entry is `prepare_dataset(raw, output)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

from heterrec_jax.data import readers, tokenizer
from heterrec_jax.data.embeddings import load_embeddings
from heterrec_jax.data.dataset import DatasetError, Schema, check_output, write_dataset
from heterrec_jax.data.raw import FLOAT, Column, ItemTable, PrepareError, RawData

FORMATS = ('recbole', 'movielens', 'amazon', 'amazon2023', 'csv', 'synthetic')


@dataclasses.dataclass
class Corpus:
  """The items in index order (index = row + 1) and each event's item index."""
  table: ItemTable
  embeddings: dict[str, np.ndarray]  # rows in table order; nan rows: no embedding
  items_E: np.ndarray  # int64 item index of each raw event; 0: dropped (unknown item)
  duplicate_rows: int  # item-table rows whose key repeats an earlier row (left out)
  unknown_items: int  # distinct event items absent from the item table
  unknown_item_events: int  # events of those items


@dataclasses.dataclass
class Events:
  """Users in index order and their events in CSR form, sorted by time within each user."""
  user_keys: list[str]
  offsets: np.ndarray  # int64 [n_users + 1]
  items: np.ndarray  # int32 [n_events]
  timestamps: np.ndarray  # int64 [n_events]
  dropped_users: int
  dropped_events: int


# ---------------------------------------------------------------------------------------------
# Items.


def _missing(column: Column, n: int) -> list:
  return [np.nan if column.type == FLOAT else None] * n


def _dedupe_table(raw: RawData) -> tuple[ItemTable, dict[str, np.ndarray], int]:
  """The item table and embeddings with only the first row of each repeated key."""
  keys = raw.item_table.keys
  for name, matrix in raw.embeddings.items():
    tokenizer.check_rows(name, matrix, len(keys))
  first = {}
  for row, key in enumerate(keys):
    first.setdefault(str(key), row)
  rows = np.fromiter(first.values(), np.int64, len(first))
  columns = {n: Column(c.type, [c.values[r] for r in rows])
             for n, c in raw.item_table.columns.items()}
  embeddings = {n: np.asarray(m, np.float64)[rows] for n, m in raw.embeddings.items()}
  return ItemTable(list(first), columns), embeddings, len(keys) - len(rows)


def index_items(raw: RawData, unknown_items: str) -> Corpus:
  """Items of the table get indices 1..n in table order; event items absent from it are
  appended in first-seen order with missing features ('keep') or their events dropped."""
  table, embeddings, duplicates = _dedupe_table(raw)
  uniq_U, first_U, inverse_E = np.unique(np.asarray(raw.items, str), return_index=True,
                                         return_inverse=True)
  index = {k: i + 1 for i, k in enumerate(table.keys)}
  index_U = np.array([index.get(k, 0) for k in uniq_U], np.int64)
  unknown_U = np.flatnonzero(index_U == 0)
  n_unknown_events = int(np.isin(inverse_E, unknown_U).sum())
  if unknown_items == 'keep' and unknown_U.size:
    unknown_U = unknown_U[np.argsort(first_U[unknown_U], kind='stable')]
    index_U[unknown_U] = len(table.keys) + 1 + np.arange(unknown_U.size)
    new_keys = [str(k) for k in uniq_U[unknown_U]]
    table = ItemTable(table.keys + new_keys, {
        n: Column(c.type, c.values + _missing(c, len(new_keys)))
        for n, c in table.columns.items()})
    embeddings = {n: np.concatenate([m, np.full((len(new_keys), m.shape[1]), np.nan)])
                  for n, m in embeddings.items()}
  return Corpus(table, embeddings, index_U[inverse_E.reshape(-1)], duplicates,
                int(unknown_U.size), n_unknown_events)


# ---------------------------------------------------------------------------------------------
# Users and events.


def first_seen_index(keys_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct keys in first-appearance order, index of each event's key in it)."""
  uniq_U, first_U, inverse_E = np.unique(keys_E, return_index=True, return_inverse=True)
  order_U = np.argsort(first_U, kind='stable')
  rank_U = np.empty_like(order_U)
  rank_U[order_U] = np.arange(order_U.size)
  return uniq_U[order_U], rank_U[inverse_E.reshape(-1)]


def group_events(users_E: np.ndarray, items_E: np.ndarray, times_E: np.ndarray,
                 min_events: int) -> Events:
  """Users indexed by first appearance; each user's events stable-sorted by time (ties keep
  file order); users with fewer than `min_events` events dropped. items_E == 0: dropped."""
  kept_E = items_E > 0
  users_E, items_E, times_E = users_E[kept_E], items_E[kept_E], times_E[kept_E]
  keys_U, user_E = first_seen_index(np.asarray(users_E, str))
  counts_U = np.bincount(user_E, minlength=len(keys_U))
  keep_U = counts_U >= min_events
  keep_E = keep_U[user_E]
  user_E = (np.cumsum(keep_U) - 1)[user_E[keep_E]]
  order = np.argsort(times_E[keep_E], kind='stable')
  order = order[np.argsort(user_E[order], kind='stable')]
  offsets = np.concatenate([[0], np.cumsum(counts_U[keep_U])]).astype(np.int64)
  return Events([str(k) for k in keys_U[keep_U]], offsets,
                items_E[keep_E][order].astype(np.int32),
                times_E[keep_E][order].astype(np.int64), int((~keep_U).sum()),
                int(counts_U[~keep_U].sum()))


def duplicate_events(raw: RawData) -> np.ndarray:
  """bool [E]: True for an event whose (user, item, timestamp) repeats an earlier event's."""
  _, user_E = np.unique(np.asarray(raw.users, str), return_inverse=True)
  _, item_E = np.unique(np.asarray(raw.items, str), return_inverse=True)
  keys_Ex3 = np.stack([user_E.reshape(-1), item_E.reshape(-1),
                       np.asarray(raw.timestamps, np.int64)], 1)
  _, first = np.unique(keys_Ex3, axis=0, return_index=True)
  repeat_E = np.ones(len(keys_Ex3), bool)
  repeat_E[first] = False
  return repeat_E


def _keep_events(raw: RawData, keep_E: np.ndarray) -> RawData:
  return dataclasses.replace(raw, users=np.asarray(raw.users)[keep_E],
                             items=np.asarray(raw.items)[keep_E],
                             timestamps=np.asarray(raw.timestamps, np.int64)[keep_E])


def _utc_text(seconds: int) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime('%Y-%m-%d')


def check_cutoff(split: dict[str, Any], timestamps: np.ndarray) -> None:
  """A time split needs events on both sides of its cutoff: some before (validation and
  training) and some at or after it (test)."""
  if split['kind'] != 'time':
    return
  first, last, cutoff = int(timestamps.min()), int(timestamps.max()), split['cutoff']
  if not first < cutoff <= last:
    raise PrepareError(f'--cutoff {cutoff} ({_utc_text(cutoff)}) is outside the time range '
                       f'of the events, {first}..{last} ({_utc_text(first)} to '
                       f'{_utc_text(last)}): it must lie after the first event and at or '
                       'before the last')


# ---------------------------------------------------------------------------------------------
# The whole preparation.


def parse_cutoff(value: int | str) -> int:
  """Unix seconds from an integer or a YYYY-MM-DD date (UTC midnight)."""
  text = str(value).strip()
  if text.lstrip('-').isdigit():
    return int(text)
  try:
    day = datetime.date.fromisoformat(text)
  except ValueError:
    raise PrepareError(f'--cutoff={value!r} is neither unix seconds nor YYYY-MM-DD') from None
  return int(datetime.datetime(day.year, day.month, day.day,
                               tzinfo=datetime.timezone.utc).timestamp())


def _split_json(split: str, cutoff: int | str | None) -> dict[str, Any]:
  if split == 'loo':
    if cutoff is not None:
      raise PrepareError('--cutoff is only for --split time')
    return {'kind': 'loo'}
  if split == 'time':
    if cutoff is None:
      raise PrepareError('--split time needs --cutoff UNIX_SECONDS or YYYY-MM-DD')
    return {'kind': 'time', 'cutoff': parse_cutoff(cutoff)}
  raise PrepareError(f'--split={split!r} is not allowed; use loo or time')


def _check_args(min_events: int, unknown_items: str) -> None:
  if not isinstance(min_events, int) or min_events < 1:
    raise PrepareError(f'--min-events={min_events!r} is not allowed; it must be >= 1')
  if unknown_items not in ('keep', 'drop'):
    raise PrepareError(f'--unknown-items={unknown_items!r} is not allowed; use keep or drop')


def _embedding_arrays(tok: tokenizer.Tokenizer, embeddings: dict[str, np.ndarray]):
  """embedding_NAME: float32 [n_items + 1, d'], the (PCA'd) rows; zeros for padding/missing."""
  arrays = {}
  for feature in tok.features:
    if feature.kind == 'multimodal':
      matrix_NxD = embeddings[feature.name]
      present_N = np.isfinite(matrix_NxD).all(1)
      x_NxK = tokenizer.project(feature, np.where(present_N[:, None], matrix_NxD, 0.0))
      x_NxK[~present_N] = 0.0
      arrays[f'embedding_{feature.name}'] = np.concatenate(
          [np.zeros((1, x_NxK.shape[1])), x_NxK]).astype(np.float32)
  return arrays


def _report(raw, corpus: Corpus, events: Events, tok, tokens, split, min_events,
            duplicates: int, dedupe: bool) -> dict:
  report = {'source': raw.source, 'users': len(events.user_keys),
            'time_unit': raw.time_unit, 'missing_id_events': raw.missing_id_events,
            'missing_id_item_rows': raw.missing_id_item_rows,
            'duplicate_events': duplicates, 'dedupe': dedupe,
            'items': len(corpus.table.keys), 'events': int(events.items.size),
            'min_events': min_events, 'dropped_users': events.dropped_users,
            'dropped_user_events': events.dropped_events,
            'unknown_items': corpus.unknown_items,
            'unknown_item_events': corpus.unknown_item_events,
            'duplicate_item_rows': corpus.duplicate_rows, 'split': split,
            'items_without_events': len(corpus.table.keys) - np.unique(events.items).size,
            'features': tok.report(tokens), 'skipped_columns': tok.skipped}
  if split['kind'] == 'time':
    report['events_before_cutoff'] = int((events.timestamps < split['cutoff']).sum())
  return report


def prepare_dataset(raw: RawData, output: str | pathlib.Path, *, min_events: int = 3,
                    split: str = 'loo', cutoff: int | str | None = None,
                    unknown_items: str = 'keep', options: tokenizer.Options | None = None,
                    progress: bool = True, dedupe: bool = False,
                    overwrite: bool = False) -> pathlib.Path:
  """Prepares `raw` into the dataset folder `output` (written atomically) and returns its path.

  Same input, same bytes. Raises PrepareError on bad input or when every user is dropped, and
  DatasetError, before any work, for an `output` that is a file, a non-empty folder that is
  not a prepared dataset, or a prepared dataset without `overwrite`; an existing `output` is
  left untouched on any failure. `dedupe` drops events repeating an earlier (user, item,
  timestamp); they are counted in the report either way. `progress` is accepted for the
  callers' sake: preparation itself prints nothing (the readers draw the progress bars).
  """
  del progress
  check_output(output, overwrite)
  options = options or tokenizer.Options()
  _check_args(min_events, unknown_items)
  split_json = _split_json(split, cutoff)
  repeat_E = duplicate_events(raw)
  if dedupe:
    raw = _keep_events(raw, ~repeat_E)
  corpus = index_items(raw, unknown_items)
  events = group_events(np.asarray(raw.users), corpus.items_E,
                        np.asarray(raw.timestamps, np.int64), min_events)
  if not events.user_keys:
    raise PrepareError(f'{raw.source or "input"}: every user has fewer than --min-events='
                       f'{min_events} events ({events.dropped_users} users dropped); nothing '
                       'to write')
  check_cutoff(split_json, events.timestamps)
  tok = tokenizer.Tokenizer.fit(corpus.table, corpus.embeddings, options)
  tokens = tok.transform(corpus.table, corpus.embeddings)
  schema = Schema(features=tok.schema_features(), n_users=len(events.user_keys),
                  n_items=len(corpus.table.keys), n_events=int(events.items.size),
                  split=split_json)
  state, tok_arrays = tok.state()
  arrays = {'offsets': events.offsets, 'items': events.items, 'timestamps': events.timestamps,
            'item_tokens': np.concatenate([np.zeros((1, tokens.shape[1]), np.int32), tokens]),
            **_embedding_arrays(tok, corpus.embeddings), **tok_arrays}
  report = _report(raw, corpus, events, tok, tokens, split_json, min_events,
                   int(repeat_E.sum()), dedupe)
  return write_dataset(output, schema=schema, arrays=arrays,
                       texts={'item_keys': ['<pad>'] + corpus.table.keys,
                              'user_keys': events.user_keys},
                       jsons={'report': report, 'tokenizer': state}, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# The command line.


def _names(text: str) -> tuple[str, ...]:
  return tuple(n.strip() for n in text.split(',') if n.strip())


def _sep(text: str) -> str:
  sep = '\t' if text in ('\\t', 'tab', 'TAB') else text
  if len(sep) != 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not one character')
  return sep


def _multi_sep(text: str) -> str:
  if not text:
    raise argparse.ArgumentTypeError('the separator must not be empty')
  return text


_TOKENIZER_FLAGS = (
    ('--n-bins', 16, 'numerical features: quantile bins'),
    ('--groups', 8, 'multimodal features: groups Z (tokens per embedding)'),
    ('--levels', 4, 'multimodal features: quantile levels q per dimension'),
    ('--pca-dim', None, "multimodal PCA width d' (default groups*4 when wider; 0: no PCA)"),
    ('--max-values', 8, 'multi-valued features: most values kept per item'),
    ('--min-count', 1, 'categorical values in fewer items are unknown'),
    ('--hash-buckets', 0, 'hash vocabularies larger than this into this many buckets'))


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line (exit 2), not the usage block."""

  def error(self, message: str):
    self.exit(2, f'prepare: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m heterrec_jax.data.prepare',
              description='Prepare a dataset folder (docs/data.md).')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--input', help='interactions: file or folder (not for synthetic)')
  p.add_argument('--output', required=True,
                 help='dataset folder, written atomically: new, empty, or (with --overwrite) '
                 'a prepared dataset')
  p.add_argument('--overwrite', action='store_true',
                 help='replace the prepared dataset at --output')
  p.add_argument('--items', help='item file (amazon, amazon2023, csv)')
  p.add_argument('--embedding', action='append', default=[], metavar='NAME=FILE.npy',
                 help='a multimodal feature (repeatable); rows in item-table order')
  p.add_argument('--embedding-ids', metavar='FILE', help='item id of each embedding row')
  p.add_argument('--min-events', type=int, default=3, help='drop users with fewer events')
  p.add_argument('--split', default='loo', choices=('loo', 'time'))
  p.add_argument('--cutoff', help='--split time: unix seconds or YYYY-MM-DD (UTC)')
  p.add_argument('--unknown-items', default='keep', choices=('keep', 'drop'),
                 help='events of items absent from the item table')
  p.add_argument('--drop-missing-ids', action='store_true',
                 help='drop rows with an empty or null user/item id (else an error)')
  p.add_argument('--dedupe', action='store_true',
                 help='drop events repeating an earlier (user, item, timestamp)')
  p.add_argument('--time-unit', default='auto', choices=readers.TIME_UNITS,
                 help='unit of numeric timestamps (auto: from the largest one)')
  for flag, default, text in _TOKENIZER_FLAGS:
    p.add_argument(flag, type=int, default=default, help=text)
  for flag, text in (('--categorical', 'made categorical'), ('--multi', 'made multi-valued'),
                     ('--numerical', 'made numerical'), ('--skip', 'left out')):
    p.add_argument(flag, type=_names, default=(), metavar='COL[,COL...]',
                   help=f'item columns {text} (overrides the kind detection)')
  tab = p.add_argument_group('csv')
  for flag in ('--user-col', '--item-col', '--time-col', '--item-key-col'):
    tab.add_argument(flag)
  tab.add_argument('--sep', type=_sep, help='delimiter (default: from the extension)')
  tab.add_argument('--multi-sep', type=_multi_sep, default='|',
                   help='separator inside --multi columns')
  syn = p.add_argument_group('synthetic')
  for flag, default in (('--users', 2000), ('--items-count', 1000), ('--topics', 16),
                        ('--seed', 0)):
    syn.add_argument(flag, type=int, default=default)
  p.add_argument('--quiet', action='store_true', help='no progress bars, no summary line')
  return p


def read_raw(args: argparse.Namespace) -> RawData:
  """The RawData of the command line's format and files."""
  progress = not args.quiet
  if args.format == 'synthetic':
    from heterrec_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.generate(args.users, args.items_count, args.topics, args.seed)
  if not args.input:
    raise PrepareError(f'--format {args.format} needs --input')
  common = {'progress': progress, 'drop_missing_ids': args.drop_missing_ids,
            'time_unit': args.time_unit}
  if args.format in ('recbole', 'movielens'):
    if args.items:
      raise PrepareError(f'--items is not used by --format {args.format} (the item file is '
                         'in the --input folder)')
    return readers.READERS[args.format](args.input, **common)
  if args.format in ('amazon', 'amazon2023'):
    return readers.READERS[args.format](args.input, items=args.items, **common)
  missing = [f for f in ('user_col', 'item_col', 'time_col') if not getattr(args, f)]
  if missing:
    flags = ', '.join('--' + f.replace('_', '-') for f in missing)
    raise PrepareError(f'--format csv needs {flags}')
  return readers.csv(args.input, user_col=args.user_col, item_col=args.item_col,
                     time_col=args.time_col, items=args.items, item_key_col=args.item_key_col,
                     sep=args.sep, multi=args.multi, multi_sep=args.multi_sep, **common)


def options_from_args(args: argparse.Namespace) -> tokenizer.Options:
  return tokenizer.Options(
      n_bins=args.n_bins, groups=args.groups, levels=args.levels, pca_dim=args.pca_dim,
      max_values=args.max_values, min_count=args.min_count, hash_buckets=args.hash_buckets,
      categorical=args.categorical, multi=args.multi, numerical=args.numerical,
      skip=args.skip)


def _inputs(args: argparse.Namespace) -> list[pathlib.Path]:
  files = [args.input, args.items, args.embedding_ids]
  for spec in args.embedding:
    name, sep, file = spec.partition('=')
    if not sep or not name or not file:
      raise PrepareError(f'--embedding {spec!r} must be NAME=FILE.npy')
    files.append(file)
  return [pathlib.Path(f) for f in files if f]


def check_paths(args: argparse.Namespace) -> pathlib.Path:
  """The resolved --output, once every input exists and --output may be written without
  touching an input or anything that is not a prepared dataset (`dataset.check_output`)."""
  output = pathlib.Path(args.output).resolve()
  for given in _inputs(args):
    path = given.resolve()
    if not path.exists():
      raise PrepareError(f'{given}: no such file or folder')
    if path == output or output in path.parents:
      raise PrepareError(f'--output {args.output} is or contains the input {given}; choose '
                         'another folder')
    if path in output.parents:
      raise PrepareError(f'--output {args.output} lies inside the input {given}; choose a '
                         'folder outside it')
  return check_output(output, args.overwrite)


def run(args: argparse.Namespace) -> pathlib.Path:
  check_paths(args)  # before reading anything: never write over an input or a stranger
  options = options_from_args(args)  # bad flags fail before a long read
  raw = read_raw(args)
  if args.embedding:
    raw.embeddings.update(load_embeddings(args.embedding, args.embedding_ids, raw.item_table))
  elif args.embedding_ids:
    raise PrepareError('--embedding-ids without any --embedding')
  return prepare_dataset(raw, args.output, min_events=args.min_events, split=args.split,
                         cutoff=args.cutoff, unknown_items=args.unknown_items,
                         options=options, progress=not args.quiet, dedupe=args.dedupe,
                         overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  try:
    output = run(args)
  except (PrepareError, DatasetError, OSError) as e:
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  if not args.quiet:
    schema = Schema.from_json(json.loads((output / 'schema.json').read_text()))
    print(f'{output}: {schema.n_users} users, {schema.n_items} items, {schema.n_events} '
          f'events; {schema.n_kinds} tokens per item ({", ".join(f.name for f in schema.features)}'
          f'), {schema.n_sub} sub-ids; {time.perf_counter() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
