"""Bad inputs to `prepare` and to loading a prepared folder: each case runs the command's
`main([...])` in-process (a few run a real subprocess) and asserts a non-zero exit, one line on
stderr naming the problem without a traceback, and that nothing that existed before was changed
(every file and folder under tmp_path is hashed before and after)."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from heterrec_jax.data import check, prepare
from heterrec_jax.data.dataset import AGAIN, Dataset, DatasetError

HEADER = 'user_id:token\titem_id:token\ttimestamp:float\n'
ROWS = ['u1\ti1\t1', 'u1\ti2\t2', 'u1\ti3\t3', 'u2\ti2\t1', 'u2\ti3\t2', 'u2\ti1\t4']
ITEMS = 'item_id:token\tclass:token_seq\ni1\tA B\ni2\tB\ni3\tC\n'


def tree_hash(root: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of the bytes (files) or 'dir' (folders), with the file modes."""
  state = {}
  for path in sorted(root.rglob('*')):
    rel = str(path.relative_to(root))
    kind = 'dir' if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    state[rel] = f'{kind} {oct(path.stat().st_mode)}'
  return state


def write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def recbole(tmp, rows=ROWS, items=ITEMS, header=HEADER) -> pathlib.Path:
  folder = tmp / 'toy'
  write(folder / 'toy.inter', header + ''.join(r + '\n' for r in rows))
  if items:
    write(folder / 'toy.item', items)
  return folder


def recbole_args(folder, out, *extra):
  return ['--format', 'recbole', '--input', str(folder), '--output', str(out), '--quiet',
          *extra]


def csv_args(events, out, *extra):
  return ['--format', 'csv', '--input', str(events), '--user-col', 'user', '--item-col',
          'item', '--time-col', 'ts', '--output', str(out), '--quiet', *extra]


def csv_events(tmp, rows: list[str], name='e.csv') -> pathlib.Path:
  return write(tmp / name, 'user,item,ts\n' + ''.join(r + '\n' for r in rows))


GOOD_CSV = ['u1,a,1', 'u1,b,2', 'u1,c,3', 'u2,a,1', 'u2,b,2', 'u2,c,5']


def amazon_args(reviews, out, *extra):
  return ['--format', 'amazon', '--input', str(reviews), '--output', str(out), '--quiet',
          *extra]


def reviews(tmp, records: list) -> pathlib.Path:
  good = [{'reviewerID': u, 'asin': i, 'unixReviewTime': t} for u, i, t in
          [('A', 'x', 1), ('A', 'y', 2), ('A', 'z', 3)]]
  lines = [json.dumps(r) if not isinstance(r, str) else r for r in good + records]
  return write(tmp / 'r.json', '\n'.join(lines) + '\n')


def prepared(tmp) -> pathlib.Path:
  """A valid prepared folder (recbole toy, with an embedding) at tmp/ds."""
  folder = recbole(tmp)
  np.save(tmp / 'emb.npy', np.arange(12, dtype=np.float32).reshape(3, 4) % 5)
  assert prepare.main(recbole_args(folder, tmp / 'ds', '--embedding',
                                   f'title={tmp / "emb.npy"}', '--groups', '2')) == 0
  return tmp / 'ds'


# ---------------------------------------------------------------------------------------------
# prepare: each case builds its inputs in tmp and returns (argv, text expected on stderr).


def out_is_input(tmp):
  folder = recbole(tmp)
  return recbole_args(folder, folder), 'is or contains the input'


def out_inside_input(tmp):
  folder = recbole(tmp)
  return recbole_args(folder, folder / 'ds'), 'lies inside the input'


def out_contains_input(tmp):
  folder = recbole(tmp / 'data')
  return recbole_args(folder, tmp / 'data'), 'is or contains the input'


def out_is_embedding_file(tmp):
  folder = recbole(tmp)
  np.save(tmp / 'emb.npy', np.ones((3, 4)))
  return (recbole_args(folder, tmp / 'emb.npy', '--embedding', f't={tmp / "emb.npy"}'),
          'is or contains the input')


def out_is_a_file(tmp):
  folder = recbole(tmp)
  write(tmp / 'notes.txt', 'mine')
  return recbole_args(folder, tmp / 'notes.txt'), 'is an existing file'


def out_is_foreign_folder(tmp):
  folder = recbole(tmp)
  write(tmp / 'mine' / 'thesis.tex', 'years of work')
  return recbole_args(folder, tmp / 'mine'), 'non-empty folder that is not a prepared dataset'


def out_is_dataset_with_extra_file(tmp):
  ds = prepared(tmp)
  write(ds / 'notes.md', 'mine')  # no longer only a prepared folder: never replaced
  return recbole_args(tmp / 'toy', ds, '--overwrite'), 'not a prepared dataset'


def out_is_dataset_without_overwrite(tmp):
  ds = prepared(tmp)
  return recbole_args(tmp / 'toy', ds), 'pass --overwrite'


def out_parent_is_file(tmp):
  folder = recbole(tmp)
  write(tmp / 'f', 'x')
  return recbole_args(folder, tmp / 'f' / 'ds'), 'is a file, not a folder'


def input_missing(tmp):
  return recbole_args(tmp / 'nope', tmp / 'ds'), 'no such file or folder'


def csv_empty_user(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + [',a,9']), tmp / 'ds'), 'e.csv:8: empty or null user'


def csv_empty_item(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1, ,9']), tmp / 'ds'), 'e.csv:8: empty or null item'


def csv_null_item(tmp):
  events = csv_events(tmp, ['u1,NULL,9'] + GOOD_CSV)
  return csv_args(events, tmp / 'ds'), 'e.csv:2: empty or null item'


def parquet_null_user(tmp):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({'user': ['u1', None, 'u2'], 'item': ['a', 'b', 'c'], 'ts': [1, 2, 3]})
  pq.write_table(table, tmp / 'e.parquet')
  return csv_args(tmp / 'e.parquet', tmp / 'ds'), 'e.parquet: row 2: empty or null user'


def amazon_null_item(tmp):
  path = reviews(tmp, [{'reviewerID': 'B', 'asin': None, 'unixReviewTime': 4}])
  return amazon_args(path, tmp / 'ds'), 'r.json:4: empty or null item'


def amazon_empty_user(tmp):
  path = reviews(tmp, [{'reviewerID': '', 'asin': 'x', 'unixReviewTime': 4}])
  return amazon_args(path, tmp / 'ds'), 'r.json:4: empty or null user'


def recbole_empty_item(tmp):
  folder = recbole(tmp, ROWS + ['u3\t\t5'])
  return recbole_args(folder, tmp / 'ds'), 'toy.inter:8: empty or null item'


def recbole_item_file_empty_key(tmp):
  folder = recbole(tmp, items=ITEMS + '\tC\n')
  return recbole_args(folder, tmp / 'ds'), 'toy.item:5: empty or null item'


def movielens_empty_user(tmp):
  write(tmp / 'ml' / 'u.data', '1\t1\t5\t10\n\t2\t5\t11\n')
  return (['--format', 'movielens', '--input', str(tmp / 'ml'), '--output', str(tmp / 'ds'),
           '--quiet'], 'u.data:2: empty or null user')


def items_csv_empty_key(tmp):
  events = csv_events(tmp, GOOD_CSV)
  write(tmp / 'items.csv', 'item,colour\na,red\n,blue\n')
  return (csv_args(events, tmp / 'ds', '--items', str(tmp / 'items.csv')),
          'items.csv:3: empty or null item')


def json_id_with_newline(tmp):
  path = reviews(tmp, [{'reviewerID': 'B', 'asin': 'x\ny', 'unixReviewTime': 4}])
  return amazon_args(path, tmp / 'ds'), "r.json:4: item id 'x\\ny' holds a line break"


def csv_quoted_id_with_newline(tmp):
  events = write(tmp / 'e.csv', 'user,item,ts\nu1,a,1\n"u\n2",b,2\n')
  return csv_args(events, tmp / 'ds'), 'e.csv:4: user id'


def csv_id_with_unicode_line_separator(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1,a\u2028b,9']), tmp / 'ds'), 'holds a line break'


def ts_negative(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1,a,-5']), tmp / 'ds'), 'e.csv:8: timestamp'


def ts_nan(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1,a,nan']), tmp / 'ds'), 'e.csv:8: timestamp'


def ts_not_numeric(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1,a,soon']), tmp / 'ds'), 'e.csv:8: timestamp'


def ts_1e30(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV + ['u1,a,1e30']), tmp / 'ds'), 'e.csv:8: timestamp'


def ts_beyond_2200_in_seconds(tmp):
  events = csv_events(tmp, GOOD_CSV + ['u1,a,100000000000'])  # 1e11 s: the year 5138
  return csv_args(events, tmp / 'ds', '--time-unit', 's'), 'outside 1970..2200'


def ts_json_infinite(tmp):
  path = reviews(tmp, ['{"reviewerID": "B", "asin": "x", "unixReviewTime": 1e999}'])
  return amazon_args(path, tmp / 'ds'), 'r.json:4: timestamp inf is not a finite number'


def cutoff_after_data(tmp):
  return recbole_args(recbole(tmp), tmp / 'ds', '--split', 'time', '--cutoff', '2030-01-01'), \
      'outside the time range of the events'


def cutoff_before_data(tmp):
  return recbole_args(recbole(tmp), tmp / 'ds', '--split', 'time', '--cutoff', '1'), \
      'outside the time range of the events'


def cutoff_garbage(tmp):
  return recbole_args(recbole(tmp), tmp / 'ds', '--split', 'time', '--cutoff', 'soon'), \
      "--cutoff='soon' is neither"


def multi_wrong_separator(tmp):
  events = csv_events(tmp, GOOD_CSV)
  write(tmp / 'items.csv', 'item,tags\na,x;y\nb,y;z\nc,x\n')
  return (csv_args(events, tmp / 'ds', '--items', str(tmp / 'items.csv'), '--multi', 'tags'),
          "--multi column 'tags': no value contains --multi-sep '|' but 2 values contain ';'")


def multi_token_column_joined(tmp):
  folder = recbole(tmp, items='item_id:token\ttags:token\ni1\tA|B\ni2\tB|C\ni3\tC\n')
  return (recbole_args(folder, tmp / 'ds', '--multi', 'tags'),
          "--multi tags: 2 of 3 values contain '|'")


def embedding_npz(tmp):
  np.savez(tmp / 'emb.npz', m=np.ones((3, 4)))
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "emb.npz"}'),
          'a .npz archive, not a .npy matrix')


def embedding_empty_file(tmp):
  write(tmp / 'emb.npy', '')
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "emb.npy"}'),
          'emb.npy: empty file')


def embedding_zero_rows(tmp):
  np.save(tmp / 'emb.npy', np.ones((0, 4)))
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "emb.npy"}'),
          'expected a non-empty real [n, d] matrix')


def embedding_wrong_rows(tmp):
  np.save(tmp / 'emb.npy', np.ones((5, 4)))
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "emb.npy"}'),
          'has 5 rows but the item table has 3 items')


def embedding_pickled(tmp):
  np.save(tmp / 'emb.npy', np.array([[1, 'a']], object), allow_pickle=True)
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "emb.npy"}'),
          'not a readable .npy matrix')


def embedding_missing(tmp):
  return (recbole_args(recbole(tmp), tmp / 'ds', '--embedding', f't={tmp / "no.npy"}'),
          'no.npy: no such file')


def json_deeply_nested(tmp):
  path = reviews(tmp, ['[' * 200_000 + ']' * 200_000])
  return amazon_args(path, tmp / 'ds'), 'r.json:4: not a JSON object'


def json_not_an_object(tmp):
  return amazon_args(reviews(tmp, ['[1, 2]']), tmp / 'ds'), 'r.json:4: expected an object'


def embedding_spec_without_name(tmp):
  return recbole_args(recbole(tmp), tmp / 'ds', '--embedding', 'emb.npy'), 'must be NAME=FILE.npy'


def empty_multi_sep(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV), tmp / 'ds', '--multi-sep', ''), 'must not be empty'


def long_sep(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV), tmp / 'ds', '--sep', ';;'), 'not one character'


def bad_time_unit(tmp):
  return csv_args(csv_events(tmp, GOOD_CSV), tmp / 'ds', '--time-unit', 'h'), '--time-unit'


PREPARE_CASES = [
    out_is_input, out_inside_input, out_contains_input, out_is_embedding_file, out_is_a_file,
    out_is_foreign_folder, out_is_dataset_with_extra_file, out_is_dataset_without_overwrite,
    out_parent_is_file, input_missing, csv_empty_user, csv_empty_item, csv_null_item,
    parquet_null_user, amazon_null_item, amazon_empty_user, recbole_empty_item,
    recbole_item_file_empty_key, movielens_empty_user, items_csv_empty_key,
    json_id_with_newline, csv_quoted_id_with_newline, csv_id_with_unicode_line_separator,
    ts_negative, ts_nan, ts_not_numeric, ts_1e30, ts_beyond_2200_in_seconds, ts_json_infinite,
    cutoff_after_data, cutoff_before_data, cutoff_garbage, multi_wrong_separator,
    multi_token_column_joined, embedding_npz, embedding_empty_file, embedding_zero_rows,
    embedding_wrong_rows, embedding_pickled, embedding_missing, json_deeply_nested,
    json_not_an_object, embedding_spec_without_name, empty_multi_sep, long_sep, bad_time_unit]


def run_main(main, argv, capsys) -> tuple[int, str]:
  try:
    code = main(argv)
  except SystemExit as e:  # argparse
    code = e.code
  return code, capsys.readouterr().err


def assert_one_line_error(code, err, expected):
  assert code == 2, err
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert expected in err, err


@pytest.mark.parametrize('case', PREPARE_CASES, ids=lambda c: c.__name__)
def test_prepare_bad_input(tmp_path, capsys, case):
  argv, expected = case(tmp_path)
  capsys.readouterr()
  before = tree_hash(tmp_path)
  code, err = run_main(prepare.main, argv, capsys)
  assert_one_line_error(code, err, expected)
  assert tree_hash(tmp_path) == before  # no input, output or temporary folder touched


# ---------------------------------------------------------------------------------------------
# Loading a prepared folder: each case damages a valid folder; `check` and `Dataset.load`
# refuse it with the file and the fix.


def _save(ds, stem, array, **kw):
  np.save(ds / f'{stem}.npy', array, **kw)


def _schema(ds, **change):
  data = json.loads((ds / 'schema.json').read_text())
  data.update(change)
  (ds / 'schema.json').write_text(json.dumps(data))


def schema_not_json(ds):
  (ds / 'schema.json').write_text('{"version": 1,')
  return 'schema.json: not valid JSON'


def schema_future_version(ds):
  _schema(ds, version=9)
  return 'schema version 9 is not supported (this code reads versions [1])'


def schema_version_not_an_int(ds):
  _schema(ds, version=True)
  return 'schema version True is not supported'


def schema_missing_key(ds):
  data = json.loads((ds / 'schema.json').read_text())
  del data['n_events']
  (ds / 'schema.json').write_text(json.dumps(data))
  return "['n_events'] missing or not valid"


def schema_bad_feature_kind(ds):
  data = json.loads((ds / 'schema.json').read_text())
  data['features'][1]['kind'] = 'colour'
  (ds / 'schema.json').write_text(json.dumps(data))
  return 'feature 1 is not valid'


def schema_bad_split(ds):
  _schema(ds, split={'kind': 'time'})
  return "split {'kind': 'time'} is neither"


def items_truncated(ds):
  data = (ds / 'items.npy').read_bytes()
  (ds / 'items.npy').write_bytes(data[:-8])
  return 'items.npy: not a readable .npy array'


def offsets_empty(ds):
  (ds / 'offsets.npy').write_bytes(b'')
  return 'offsets.npy: not a readable .npy array'


def timestamps_garbage(ds):
  (ds / 'timestamps.npy').write_bytes(b'\x00garbage' * 20)
  return 'timestamps.npy: not a readable .npy array'


def items_float(ds):
  _save(ds, 'items', np.load(ds / 'items.npy').astype(np.float32))
  return 'items.npy: expected a 1-d integer array, found float32'


def item_tokens_object(ds):
  _save(ds, 'item_tokens', np.load(ds / 'item_tokens.npy').astype(object), allow_pickle=True)
  return 'item_tokens.npy: not a readable .npy array'


def items_out_of_range(ds):
  items = np.load(ds / 'items.npy')
  items[3] = 4  # 3 items
  _save(ds, 'items', items)
  return 'items.npy: item index 4 at position 3 is outside [1, 3]'


def items_zero(ds):
  items = np.load(ds / 'items.npy')
  items[0] = 0
  _save(ds, 'items', items)
  return 'item index 0 at position 0'


def offsets_decreasing(ds):
  _save(ds, 'offsets', np.array([0, 4, 3, 6], np.int64)[:len(np.load(ds / 'offsets.npy'))])
  return 'offsets.npy: offsets must start at 0, never decrease'


def offsets_wrong_end(ds):
  offsets = np.load(ds / 'offsets.npy')
  offsets[-1] -= 1
  _save(ds, 'offsets', offsets)
  return 'end at n_events=6'


def token_beyond_table(ds):
  tokens = np.load(ds / 'item_tokens.npy')
  tokens[1, -1] = 10_000
  _save(ds, 'item_tokens', tokens)
  return "feature 'title' sub-id 10000"


def padding_row_not_zero(ds):
  tokens = np.load(ds / 'item_tokens.npy')
  tokens[0, 0] = 1
  _save(ds, 'item_tokens', tokens)
  return 'row 0 (the padding item) must be all zeros'


def timestamps_reversed(ds):
  times = np.load(ds / 'timestamps.npy')
  _save(ds, 'timestamps', times[::-1].copy())
  return 'non-decreasing within each user (user 0 is not)'


def item_keys_extra_line(ds):
  with open(ds / 'item_keys.txt', 'a') as f:
    f.write('shifted\n')
  return 'item_keys.txt: 5 lines, schema.json says 4'


def report_deeply_nested(ds):
  (ds / 'report.json').write_text('[' * 100_000 + ']' * 100_000)
  return 'report.json: not valid JSON'


def shape_mismatch(ds):
  _schema(ds, n_events=7)
  return 'items.npy has shape (6,), schema.json says (7,)'


def embedding_rows(ds):
  _save(ds, 'embedding_title', np.zeros((2, 2), np.float32))
  return 'embedding_title.npy: expected 4 finite rows'


def schema_missing(ds):
  (ds / 'schema.json').unlink()
  return 'is not a prepared dataset folder (no schema.json)'


LOAD_CASES = [
    schema_not_json, schema_future_version, schema_version_not_an_int, schema_missing_key,
    schema_bad_feature_kind, schema_bad_split, items_truncated, offsets_empty,
    timestamps_garbage, items_float, item_tokens_object, items_out_of_range, items_zero,
    offsets_decreasing, offsets_wrong_end, token_beyond_table, padding_row_not_zero,
    timestamps_reversed, item_keys_extra_line, report_deeply_nested, shape_mismatch,
    embedding_rows, schema_missing]


@pytest.mark.parametrize('case', LOAD_CASES, ids=lambda c: c.__name__)
def test_load_bad_folder(tmp_path, capsys, case):
  ds = prepared(tmp_path)
  assert check.main([str(ds)]) == 0
  expected = case(ds)
  capsys.readouterr()
  before = tree_hash(tmp_path)
  code, err = run_main(check.main, [str(ds)], capsys)
  assert_one_line_error(code, err, expected)
  if case is not schema_missing:
    assert AGAIN in err  # the fix
  with pytest.raises(DatasetError, match='prepare'):
    Dataset.load(ds)
  assert tree_hash(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# A few as real subprocesses, and what the flags do instead of failing.


def _subprocess(module, *argv):
  env = {**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])}
  return subprocess.run([sys.executable, '-m', module, *argv], capture_output=True,
                        text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize('case', [out_is_input, ts_1e30, out_is_dataset_without_overwrite],
                         ids=lambda c: c.__name__)
def test_prepare_subprocess(tmp_path, case):
  argv, expected = case(tmp_path)
  before = tree_hash(tmp_path)
  proc = _subprocess('heterrec_jax.data.prepare', *argv)
  assert_one_line_error(proc.returncode, proc.stderr, expected)
  assert tree_hash(tmp_path) == before


def test_check_subprocess_truncated(tmp_path):
  ds = prepared(tmp_path)
  expected = items_truncated(ds)
  before = tree_hash(tmp_path)
  proc = _subprocess('heterrec_jax.data.check', str(ds))
  assert_one_line_error(proc.returncode, proc.stderr, expected)
  assert tree_hash(tmp_path) == before
