"""One test per reader and per bad-input case, on small files the tests write themselves."""

import gzip
import json
import math

import numpy as np
import pytest

from heterrec_jax.data import readers
from heterrec_jax.data.raw import FLOAT, TOKEN, TOKEN_SEQ, PrepareError


def _write(path, text, encoding='utf-8'):
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wt', encoding=encoding, newline='') as f:
    f.write(text)
  return path


def _recbole_folder(tmp_path, inter_rows, item_rows=None):
  folder = tmp_path / 'toy'
  folder.mkdir()
  _write(folder / 'toy.inter', '\ufeffuser_id:token\titem_id:token\trating:float\ttimestamp:float\n'
         + ''.join(r + '\n' for r in inter_rows))
  if item_rows is not None:
    _write(folder / 'toy.item', 'item_id:token\tmovie_title:token_seq\trelease_year:token\t'
           'class:token_seq\tvec:float_seq\tscore:float\n' + ''.join(r + '\n' for r in item_rows))
  _write(folder / 'toy.user', 'user_id:token\tage:token\nu1\t20\n')
  return folder


def test_recbole(tmp_path):
  folder = _recbole_folder(
      tmp_path, ['u1\ti1\t3\t100', 'u2\ti2\t4\t99.0', 'u1\ti3\t5\t101'],
      ['i1\tToy Story\t1995\tAnimation Comedy\t0.1 0.2\t1.5',
       'i2\tunkonwn\tunkonwn\t\t0 0\t', 'i3\tHeat\t1995\tAction Crime Action\t1 1\t2'])
  raw = readers.recbole(folder, progress=False)
  assert raw.users.tolist() == ['u1', 'u2', 'u1']
  assert raw.items.tolist() == ['i1', 'i2', 'i3']
  assert raw.timestamps.tolist() == [100, 99, 101] and raw.timestamps.dtype == np.int64
  table = raw.item_table
  assert table.keys == ['i1', 'i2', 'i3']
  assert list(table.columns) == ['movie_title', 'release_year', 'class', 'score']  # no float_seq
  assert table.columns['release_year'].type == TOKEN
  assert table.columns['release_year'].values == ['1995', 'unkonwn', '1995']
  assert table.columns['class'].type == TOKEN_SEQ
  assert table.columns['class'].values == [('Animation', 'Comedy'), None, ('Action', 'Crime')]
  score = table.columns['score']
  assert score.type == FLOAT and score.values[0] == 1.5 and math.isnan(score.values[1])


def test_movielens_100k(tmp_path):
  _write(tmp_path / 'u.data', '1\t10\t3\t881250949\n2\t20\t4\t881250950\n')
  flags = ['0'] * 19
  action = flags.copy()
  action[1] = action[16] = '1'
  _write(tmp_path / 'u.item',
         '10|Café (1995)|01-Jan-1995||http://x|' + '|'.join(action) + '\n'
         '20|unknown||||' + '|'.join(flags) + '\n', encoding='latin-1')
  raw = readers.movielens(tmp_path, progress=False)
  assert raw.users.tolist() == ['1', '2'] and raw.items.tolist() == ['10', '20']
  assert raw.timestamps.tolist() == [881250949, 881250950]
  columns = raw.item_table.columns
  assert list(columns) == ['genres', 'year']  # titles are never features
  assert columns['genres'].values == [('Action', 'Thriller'), None]
  assert columns['year'].values[0] == 1995.0 and math.isnan(columns['year'].values[1])


def test_movielens_1m(tmp_path):
  _write(tmp_path / 'ratings.dat', '1::1193::5::978300760\n1::661::3::978302109\n')
  _write(tmp_path / 'movies.dat', '1193::One Flew (1975)::Drama\n'
         '661::James and the Giant Peach (1996)::Animation|Children\'s|Musical\n',
         encoding='latin-1')
  raw = readers.movielens(tmp_path, progress=False)
  assert raw.items.tolist() == ['1193', '661']
  assert raw.item_table.columns['genres'].values == [('Drama',),
                                                     ('Animation', "Children's", 'Musical')]
  assert raw.item_table.columns['year'].values == [1975.0, 1996.0]


def test_amazon_2014_gzipped_python_literal_meta(tmp_path):
  reviews = _write(tmp_path / 'reviews.json.gz', ''.join(json.dumps(r) + '\n' for r in [
      {'reviewerID': 'A1', 'asin': 'B1', 'unixReviewTime': 1400000000, 'overall': 5.0},
      {'reviewerID': 'A2', 'asin': 'B2', 'unixReviewTime': 1400000001}]))
  meta = _write(tmp_path / 'meta.json.gz',
                "{'asin': 'B1', 'title': 'X', 'price': 12.5, 'brand': 'Acme', "
                "'categories': [['Beauty', 'Skin'], ['Beauty', 'Face']]}\n"
                "{'asin': 'B2', 'categories': [['Tools']]}\n")
  raw = readers.amazon(reviews, items=meta, progress=False)
  assert raw.users.tolist() == ['A1', 'A2'] and raw.timestamps.tolist() == [1400000000,
                                                                             1400000001]
  columns = raw.item_table.columns
  assert 'title' not in columns and 'main_cat' not in columns  # absent everywhere: left out
  assert columns['categories'].values == [('Beauty', 'Skin', 'Face'), ('Tools',)]
  assert columns['brand'].values == ['Acme', None]
  assert columns['price'].values[0] == 12.5 and math.isnan(columns['price'].values[1])


def test_amazon_2018(tmp_path):
  reviews = _write(tmp_path / 'reviews.json', json.dumps(
      {'reviewerID': 'A1', 'asin': 'B1', 'unixReviewTime': 1500000000}) + '\n')
  meta = _write(tmp_path / 'meta.json', ''.join(json.dumps(r) + '\n' for r in [
      {'asin': 'B1', 'category': ['Books', 'Fiction'], 'brand': '', 'price': '$1,212.99',
       'main_cat': 'Books'},
      {'asin': 'B3', 'category': [], 'price': '$1.99 - $5.99'}]))
  raw = readers.amazon(reviews, items=meta, progress=False)
  columns = raw.item_table.columns
  assert raw.item_table.keys == ['B1', 'B3']
  assert columns['categories'].values == [('Books', 'Fiction'), None]
  assert columns['price'].values == [1212.99, 1.99]
  assert columns['main_cat'].values == ['Books', None]
  assert 'brand' not in columns  # only empty strings


def test_amazon_without_meta_lists_event_items(tmp_path):
  reviews = _write(tmp_path / 'r.json', ''.join(json.dumps(
      {'reviewerID': 'A', 'asin': a, 'unixReviewTime': 1}) + '\n' for a in ('B2', 'B1', 'B2')))
  raw = readers.amazon(reviews, progress=False)
  assert raw.item_table.keys == ['B2', 'B1'] and not raw.item_table.columns


def test_amazon2023_milliseconds(tmp_path):
  reviews = _write(tmp_path / 'r.jsonl', json.dumps(
      {'user_id': 'U1', 'parent_asin': 'P1', 'asin': 'X', 'timestamp': 1588687728923}) + '\n')
  meta = _write(tmp_path / 'm.jsonl', json.dumps(
      {'parent_asin': 'P1', 'title': 't', 'main_category': 'All Beauty', 'store': 'S',
       'categories': ['A', 'B'], 'price': None}) + '\n')
  raw = readers.amazon2023(reviews, items=meta, progress=False)
  assert raw.items.tolist() == ['P1'] and raw.timestamps.tolist() == [1588687728]
  columns = raw.item_table.columns
  assert columns['main_category'].values == ['All Beauty']
  assert columns['categories'].values == [('A', 'B')] and columns['store'].values == ['S']
  assert 'price' not in columns


def _check_tabular(raw):
  assert raw.users.tolist() == ['u1', 'u2', 'u1']
  assert raw.items.tolist() == ['a', 'b', 'c']
  assert raw.timestamps.tolist() == [10, 20, 86400]
  columns = raw.item_table.columns
  assert raw.item_table.keys == ['a', 'b']
  assert columns['tags'].type == TOKEN_SEQ and columns['tags'].values == [('x', 'y'), None]
  assert columns['brand'].type == TOKEN and columns['brand'].values == ['acme', None]


@pytest.mark.parametrize('ext,sep', [('csv', ','), ('tsv', '\t')])
def test_csv_and_tsv(tmp_path, ext, sep):
  events = _write(tmp_path / f'events.{ext}', sep.join(['user', 'item', 'ts']) + '\n' + ''.join(
      sep.join(r) + '\n' for r in [('u1', 'a', '10'), ('u2', 'b', '20'),
                                   ('u1', 'c', '1970-01-02')]))
  items = _write(tmp_path / f'items.{ext}.gz', sep.join(['id', 'tags', 'brand', 'price']) + '\n'
                 + sep.join(['a', 'x|y', 'acme', '1.5']) + '\n' + sep.join(['b', '', '', '']) + '\n')
  raw = readers.csv(events, user_col='user', item_col='item', time_col='ts', items=items,
                    item_key_col='id', multi=('tags',), progress=False)
  _check_tabular(raw)
  assert raw.item_table.columns['price'].values == ['1.5', None]  # text: detection decides


def test_parquet(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  pq.write_table(pa.table({'user': ['u1', 'u2', 'u1'], 'item': ['a', 'b', 'c'],
                           'ts': [10, 20, 86400]}), tmp_path / 'events.parquet')
  pq.write_table(pa.table({'item': ['a', 'b'], 'tags': [['x', 'y'], []],
                           'brand': ['acme', None], 'price': [1.5, None]}),
                 tmp_path / 'items.parquet')
  raw = readers.csv(tmp_path / 'events.parquet', user_col='user', item_col='item',
                    time_col='ts', items=tmp_path / 'items.parquet', progress=False)
  _check_tabular(raw)
  price = raw.item_table.columns['price']
  assert price.type == FLOAT and price.values[0] == 1.5 and math.isnan(price.values[1])


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_malformed_line_names_file_and_line(tmp_path):
  folder = _recbole_folder(tmp_path, ['u1\ti1\t3\t100', 'u1\ti2\t100', 'u1\ti3\t3\t102'])
  with pytest.raises(PrepareError, match=r'toy\.inter:3: expected 4 tab-separated fields'):
    readers.recbole(folder, progress=False)


def test_bad_timestamp_names_file_and_line(tmp_path):
  folder = _recbole_folder(tmp_path, ['u1\ti1\t3\t100', 'u1\ti2\t3\tyesterday'])
  with pytest.raises(PrepareError, match=r'toy\.inter:3: timestamp .yesterday.'):
    readers.recbole(folder, progress=False)


def test_malformed_json_line_names_file_and_line(tmp_path):
  reviews = _write(tmp_path / 'r.json.gz', json.dumps(
      {'reviewerID': 'A', 'asin': 'B', 'unixReviewTime': 1}) + '\n{"reviewerID": \n')
  with pytest.raises(PrepareError, match=r'r\.json\.gz:2: not a JSON object'):
    readers.amazon(reviews, progress=False)


def test_malformed_csv_row(tmp_path):
  events = _write(tmp_path / 'e.csv', 'user,item,ts\nu1,a,1\nu1,a\n')
  with pytest.raises(PrepareError, match=r'e\.csv:3: expected 3'):
    readers.csv(events, user_col='user', item_col='item', time_col='ts', progress=False)


def test_missing_column_names_it_and_the_columns_found(tmp_path):
  folder = tmp_path / 'toy'
  folder.mkdir()
  _write(folder / 'toy.inter', '\ufeffuser_id:token\titem_id:token\nu1\ti1\n')
  with pytest.raises(PrepareError, match=r"no column 'timestamp'; columns found: "
                     r"\['user_id', 'item_id'\]"):
    readers.recbole(folder, progress=False)
  events = _write(tmp_path / 'e.tsv', 'uid\titem\tts\nu1\ta\t1\n')
  with pytest.raises(PrepareError, match=r"no column 'user'; columns found: \['uid'"):
    readers.csv(events, user_col='user', item_col='item', time_col='ts', progress=False)


def test_missing_json_field_names_it(tmp_path):
  reviews = _write(tmp_path / 'r.json', json.dumps({'reviewerID': 'A', 'asin': 'B'}) + '\n')
  with pytest.raises(PrepareError, match=r"r\.json:1: no field 'unixReviewTime'; fields "
                     r"found: \['asin', 'reviewerID'\]"):
    readers.amazon(reviews, progress=False)


@pytest.mark.parametrize('case', ['recbole', 'amazon', 'csv', 'empty_file'])
def test_empty_input(tmp_path, case):
  if case == 'recbole':
    folder = _recbole_folder(tmp_path, [])
    call = lambda: readers.recbole(folder, progress=False)
  elif case == 'amazon':
    reviews = _write(tmp_path / 'r.json', '\n')
    call = lambda: readers.amazon(reviews, progress=False)
  elif case == 'csv':
    events = _write(tmp_path / 'e.csv', 'user,item,ts\n')
    call = lambda: readers.csv(events, user_col='user', item_col='item', time_col='ts')
  else:
    events = _write(tmp_path / 'e.csv', '')
    call = lambda: readers.csv(events, user_col='user', item_col='item', time_col='ts')
  with pytest.raises(PrepareError, match='empty'):
    call()


def test_unknown_extension_asks_for_sep(tmp_path):
  events = _write(tmp_path / 'e.txt', 'user;item;ts\nu;a;1\n')
  with pytest.raises(PrepareError, match='--sep'):
    readers.csv(events, user_col='user', item_col='item', time_col='ts')
  raw = readers.csv(events, user_col='user', item_col='item', time_col='ts', sep=';')
  assert raw.items.tolist() == ['a']


def test_parse_price_and_seconds():
  assert readers.parse_price('$12.99') == 12.99
  assert math.isnan(readers.parse_price('.a-color-price'))
  assert math.isnan(readers.parse_price(None))
  assert readers.to_seconds('1970-01-01T00:01:00', 'x') == 60
  assert readers.to_seconds(1500, 'x', 'ms') == 1


def test_clean_id_missing_and_line_breaks():
  assert readers.clean_id(' a1 ', 'item', 'f:1') == 'a1'
  assert readers.clean_id(7, 'item', 'f:1') == '7'
  for missing in (None, math.nan, '', '  ', 'NULL', 'None', 'nan', 'N/A'):
    assert readers.clean_id(missing, 'item', 'f:1') is None
  for broken in ('a\nb', 'a\rb', 'a\x0bb', 'a\u2028b', 'a\x85b'):
    with pytest.raises(PrepareError, match='f:3: user id .* holds a line break'):
      readers.clean_id(broken, 'user', 'f:3')


def test_detect_unit_and_range():
  assert readers.detect_unit(np.array([1.6e9, 1.7e9])) == 's'
  assert readers.detect_unit(np.array([1.6e9, 1.7e12])) == 'ms'
  assert readers.detect_unit(np.array([1.7e15])) == 'us'
  assert readers.to_seconds(1_700_000_000_123_456, 'x', 'us') == 1_700_000_000
  for bad in (-1, 1e30, float('nan'), 'soon', '2201-01-01'):
    with pytest.raises(PrepareError, match='x: timestamp'):
      readers.to_seconds(bad, 'x')


def test_multi_sep_mismatch_names_the_separator(tmp_path):
  events = _write(tmp_path / 'e.csv', 'user,item,ts\nu,a,1\nu,b,2\n')
  items = _write(tmp_path / 'i.csv', 'item,tags\na,"x,y"\nb,y\n')
  with pytest.raises(PrepareError, match="--multi column 'tags'.*pass --multi-sep ','"):
    readers.csv(events, user_col='user', item_col='item', time_col='ts', items=items,
                multi=('tags',), progress=False)
  raw = readers.csv(events, user_col='user', item_col='item', time_col='ts', items=items,
                    multi=('tags',), multi_sep=',', progress=False)
  assert raw.item_table.columns['tags'].values == [('x', 'y'), ('y',)]
