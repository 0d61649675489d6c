"""prepare_dataset and the prepare command: layout, determinism, filtering, failures."""

import json
import os
import stat

import numpy as np
import pytest

from heterrec_jax.data import prepare, tokenizer
from heterrec_jax.data.dataset import Dataset, DatasetError, write_dataset
from heterrec_jax.data.raw import FLOAT, TOKEN, TOKEN_SEQ, Column, ItemTable, PrepareError, RawData

OPTIONS = tokenizer.Options(groups=2, n_bins=4)


def _raw(events, keys=('a', 'b', 'c', 'd', 'e', 'f'), embedding=True):
  """RawData from (user, item, ts) triples and a small item table."""
  users, items, times = zip(*events)
  n = len(keys)
  table = ItemTable(keys=list(keys), columns={
      'genre': Column(TOKEN_SEQ, [('x', 'y'), ('y',), None, ('x',), ('y',), ('x',)][:n]),
      'brand': Column(TOKEN, ['p', 'q', 'p', 'p', None, 'q'][:n]),
      'price': Column(FLOAT, [1.0, 2.0, np.nan, 4.0, 5.0, 6.0][:n])})
  embeddings = {'text': np.random.default_rng(0).normal(size=(n, 4))} if embedding else {}
  return RawData(users=np.array(users), items=np.array(items),
                 timestamps=np.array(times, np.int64), item_table=table,
                 embeddings=embeddings, source='test')


EVENTS = [('u2', 'b', 5), ('u1', 'a', 3), ('u2', 'a', 1), ('u1', 'c', 3), ('u3', 'a', 1),
          ('u1', 'b', 2), ('u2', 'd', 5), ('u2', 'e', 0)]


def test_layout_sorting_and_filtering(tmp_path):
  out = prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'ds', options=OPTIONS, progress=False)
  ds = Dataset.load(out)
  assert (out / 'user_keys.txt').read_text().split() == ['u2', 'u1']  # first appearance
  assert (out / 'item_keys.txt').read_text().split() == ['<pad>', 'a', 'b', 'c', 'd', 'e', 'f']
  # u2: ties at ts 5 keep file order (b before d); u3 (1 event) dropped.
  assert ds.user_events(0)[0].tolist() == [5, 1, 2, 4]
  assert ds.user_events(0)[1].tolist() == [0, 1, 5, 5]
  assert ds.user_events(1)[0].tolist() == [2, 1, 3]
  assert ds.offsets.tolist() == [0, 4, 7]
  assert ds.item_tokens[0].tolist() == [0] * ds.schema.n_sub
  assert [f.name for f in ds.schema.features] == ['item_id', 'genre', 'brand', 'price', 'text']
  assert ds.embeddings['text'].shape == (7, 4) and not ds.embeddings['text'][0].any()
  report = json.loads((out / 'report.json').read_text())
  assert (report['users'], report['items'], report['events']) == (2, 6, 7)
  assert (report['dropped_users'], report['dropped_user_events']) == (1, 1)
  assert report['items_without_events'] == 1  # 'f' stays in the corpus
  assert report['features']['text']['codes_used'] and report['features']['price']['bins'] >= 1
  assert json.loads((out / 'schema.json').read_text())['split'] == {'kind': 'loo'}


def _folder_bytes(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_input_gives_byte_identical_folders(tmp_path):
  raw = _raw(EVENTS)
  raw.embeddings['text'] = np.random.default_rng(0).normal(size=(6, 8))
  opts = tokenizer.Options(groups=2, pca_dim=4)
  a = prepare.prepare_dataset(raw, tmp_path / 'a', options=opts, progress=False)
  raw_b = _raw(EVENTS)
  raw_b.embeddings['text'] = np.random.default_rng(0).normal(size=(6, 8))
  b = prepare.prepare_dataset(raw_b, tmp_path / 'b', options=opts, progress=False)
  assert 'tokenizer_text_pca_components.npy' in _folder_bytes(a)
  assert _folder_bytes(a) == _folder_bytes(b)


@pytest.mark.parametrize('mode', ['keep', 'drop'])
def test_unknown_items_keep_or_drop(tmp_path, mode):
  events = EVENTS + [('u1', 'zz', 9), ('u2', 'yy', 9), ('u1', 'zz', 10)]
  out = prepare.prepare_dataset(_raw(events), tmp_path / 'ds', unknown_items=mode,
                                options=OPTIONS, progress=False)
  report = json.loads((out / 'report.json').read_text())
  assert (report['unknown_item_events'], report['unknown_items']) == (3, 2)
  keys = (out / 'item_keys.txt').read_text().split()
  ds = Dataset.load(out)
  if mode == 'keep':
    assert keys[7:] == ['zz', 'yy'] and report['events'] == 10  # first-seen order
    row = ds.item_tokens[7]
    assert row[0] == 8 and row[-2:].tolist() == [0, 0]  # known id, no embedding
  else:
    assert len(keys) == 7 and report['events'] == 7


def test_all_users_dropped_leaves_existing_output_untouched(tmp_path):
  out = prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'ds', options=OPTIONS, progress=False)
  before = _folder_bytes(out)
  with pytest.raises(PrepareError, match='every user has fewer than --min-events=9'):
    prepare.prepare_dataset(_raw(EVENTS), out, min_events=9, options=OPTIONS, progress=False,
                            overwrite=True)
  assert _folder_bytes(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds']  # no temporary folder left


def test_failed_tokenizer_leaves_output_untouched(tmp_path):
  out = prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'ds', options=OPTIONS, progress=False)
  before = _folder_bytes(out)
  with pytest.raises(PrepareError, match='--groups=3'):
    prepare.prepare_dataset(_raw(EVENTS), out, options=tokenizer.Options(groups=3),
                            progress=False, overwrite=True)
  assert _folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ['ds']


def test_time_split_cutoff(tmp_path):
  out = prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'ds', split='time',
                                cutoff='3', options=OPTIONS, progress=False)
  assert json.loads((out / 'schema.json').read_text())['split'] == {'kind': 'time', 'cutoff': 3}
  assert prepare.parse_cutoff('2020-01-02') == 1577923200
  for outside in ('1970-01-01', '0', '6'):  # events run from 0 to 5: no validation / no test
    with pytest.raises(PrepareError, match='outside the time range of the events, 0..5'):
      prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'x', split='time', cutoff=outside,
                              options=OPTIONS, progress=False)
  with pytest.raises(PrepareError, match='--split time needs --cutoff'):
    prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'x', split='time', progress=False)


# ---------------------------------------------------------------------------------------------
# The command line.


def _recbole(tmp_path, rows):
  folder = tmp_path / 'toy'
  folder.mkdir()
  (folder / 'toy.inter').write_text('user_id:token\titem_id:token\ttimestamp:float\n'
                                    + ''.join(r + '\n' for r in rows))
  (folder / 'toy.item').write_text('item_id:token\tyear:token\tclass:token_seq\n'
                                   'i1\t1990\tA B\ni2\tunkonwn\tB\ni3\t1999\tC\n')
  return folder


ROWS = ['u1\ti1\t1', 'u1\ti2\t2', 'u1\ti3\t3', 'u2\ti2\t1', 'u2\ti3\t2', 'u2\ti1\t4']


def test_cli_twice_is_byte_identical(tmp_path, capsys):
  folder = _recbole(tmp_path, ROWS)
  np.save(tmp_path / 'emb.npy', np.arange(48, dtype=np.float32).reshape(3, 16) % 7)
  args = ['--format', 'recbole', '--input', str(folder), '--embedding',
          f'title={tmp_path / "emb.npy"}', '--groups', '4', '--quiet',
          '--numerical', 'year', '--multi', 'class']  # 3 items: too few to trust detection
  assert prepare.main(args + ['--output', str(tmp_path / 'a')]) == 0
  assert prepare.main(args + ['--output', str(tmp_path / 'b')]) == 0
  assert _folder_bytes(tmp_path / 'a') == _folder_bytes(tmp_path / 'b')
  ds = Dataset.load(tmp_path / 'a')
  assert [(f.name, f.kind) for f in ds.schema.features] == [
      ('item_id', 'categorical'), ('year', 'numerical'), ('class', 'multi'),
      ('title', 'multimodal')]
  assert ds.item_tokens[2, 1] == 0  # 'unkonwn' year: the missing bin
  assert capsys.readouterr().out == ''


def test_cli_malformed_line_is_one_line_exit_2(tmp_path, capsys):
  folder = _recbole(tmp_path, ROWS[:2] + ['u1\ti3'])
  assert prepare.main(['--format', 'recbole', '--input', str(folder), '--output',
                       str(tmp_path / 'out'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'Traceback' not in err
  assert f'{folder / "toy.inter"}:4: expected 3 tab-separated fields' in err
  assert not (tmp_path / 'out').exists()


def test_cli_embedding_rows_must_match(tmp_path, capsys):
  folder = _recbole(tmp_path, ROWS)
  emb = tmp_path / 'emb.npy'
  np.save(emb, np.ones((5, 8)))
  assert prepare.main(['--format', 'recbole', '--input', str(folder), '--output',
                       str(tmp_path / 'out'), '--embedding', f'e={emb}', '--quiet']) == 2
  err = capsys.readouterr().err
  assert f'--embedding {emb} has 5 rows but the item table has 3 items' in err


def test_cli_embedding_ids_align_rows(tmp_path):
  folder = _recbole(tmp_path, ROWS)
  np.save(tmp_path / 'emb.npy', np.array([[3.0, 3.0], [1.0, 1.0]]))
  (tmp_path / 'ids.txt').write_text('i3\ni1\n')
  assert prepare.main(['--format', 'recbole', '--input', str(folder), '--output',
                       str(tmp_path / 'out'), '--embedding', f'e={tmp_path / "emb.npy"}',
                       '--embedding-ids', str(tmp_path / 'ids.txt'), '--groups', '2',
                       '--quiet']) == 0
  ds = Dataset.load(tmp_path / 'out')
  np.testing.assert_array_equal(ds.embeddings['e'], [[0, 0], [1, 1], [0, 0], [3, 3]])
  f = ds.schema.feature('e')
  assert ds.item_tokens[2, f.offset:].tolist() == [0, 0]  # i2 has no embedding row


def test_cli_synthetic(tmp_path):
  pytest.importorskip('heterrec_jax.data.synthetic')
  assert prepare.main(['--format', 'synthetic', '--users', '40', '--items-count', '30',
                       '--topics', '3', '--output', str(tmp_path / 'syn'), '--quiet']) == 0
  assert Dataset.load(tmp_path / 'syn').schema.n_items >= 30


# ---------------------------------------------------------------------------------------------
# Safe outputs, ids, duplicates and timestamp units.


def test_overwrite_replaces_only_a_prepared_folder(tmp_path):
  folder = _recbole(tmp_path, ROWS)
  args = ['--format', 'recbole', '--input', str(folder), '--output', str(tmp_path / 'ds'),
          '--quiet']
  assert prepare.main(args) == 0
  (tmp_path / 'ds' / 'items.npy').write_bytes(b'damaged')  # a prepared folder, damaged
  assert prepare.main(args) == 2  # no --overwrite
  assert prepare.main(args + ['--overwrite']) == 0
  Dataset.load(tmp_path / 'ds')
  foreign = tmp_path / 'mine'
  (foreign / 'sub').mkdir(parents=True)
  with pytest.raises(DatasetError, match='not a prepared dataset'):
    write_dataset(foreign, schema=Dataset.load(tmp_path / 'ds').schema, arrays={}, texts={},
                  jsons={}, overwrite=True)
  assert (foreign / 'sub').is_dir()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds', 'mine', 'toy']  # no temp left


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_folder_mode_follows_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    out = prepare.prepare_dataset(_raw(EVENTS), tmp_path / 'ds', options=OPTIONS,
                                  progress=False)
  finally:
    os.umask(old)
  assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
  assert stat.S_IMODE((out / 'items.npy').stat().st_mode) == 0o666 & ~umask


def test_duplicates_reported_and_dropped_with_dedupe(tmp_path):
  events = EVENTS + [('u1', 'a', 3), ('u1', 'a', 3), ('u1', 'a', 4)]  # 2 exact repeats
  kept = prepare.prepare_dataset(_raw(events), tmp_path / 'a', options=OPTIONS, progress=False)
  dropped = prepare.prepare_dataset(_raw(events), tmp_path / 'b', options=OPTIONS,
                                    progress=False, dedupe=True)
  report_a = json.loads((kept / 'report.json').read_text())
  report_b = json.loads((dropped / 'report.json').read_text())
  assert (report_a['duplicate_events'], report_a['dedupe'], report_a['events']) == (2, False, 10)
  assert (report_b['duplicate_events'], report_b['dedupe'], report_b['events']) == (2, True, 8)
  assert Dataset.load(dropped).user_events(1)[0].tolist() == [2, 1, 3, 1]  # u1: b a c a@4


def test_drop_missing_ids_counts_rows(tmp_path):
  events = tmp_path / 'e.csv'
  events.write_text('user,item,ts\nu1,a,1\nu1,,2\n,b,3\nu1,b,4\nu1,c,5\n')
  (tmp_path / 'items.csv').write_text('item,colour\na,red\n,blue\nb,red\nc,blue\n')
  args = ['--format', 'csv', '--input', str(events), '--items', str(tmp_path / 'items.csv'),
          '--user-col', 'user', '--item-col', 'item', '--time-col', 'ts', '--quiet',
          '--categorical', 'colour', '--output', str(tmp_path / 'ds')]
  assert prepare.main(args) == 2
  assert prepare.main(args + ['--drop-missing-ids']) == 0
  report = json.loads((tmp_path / 'ds' / 'report.json').read_text())
  assert (report['missing_id_events'], report['missing_id_item_rows']) == (2, 1)
  assert (report['events'], report['items']) == (3, 3)


@pytest.mark.parametrize('unit, scale', [('auto', 1), ('auto', 1000), ('auto', 10 ** 6),
                                         ('ms', 1000), ('us', 10 ** 6)])
def test_time_unit(tmp_path, unit, scale):
  base = 1_600_000_000
  events = tmp_path / 'e.csv'
  events.write_text('user,item,ts\n' + ''.join(f'u1,{i},{(base + 7 * k) * scale}\n'
                                               for k, i in enumerate('abc')))
  assert prepare.main(['--format', 'csv', '--input', str(events), '--user-col', 'user',
                       '--item-col', 'item', '--time-col', 'ts', '--quiet', '--time-unit',
                       unit, '--output', str(tmp_path / 'ds')]) == 0
  ds = Dataset.load(tmp_path / 'ds')
  assert ds.timestamps.dtype == np.int64
  assert ds.timestamps.tolist() == [base, base + 7, base + 14]
  report = json.loads((tmp_path / 'ds' / 'report.json').read_text())
  assert report['time_unit'] == {1: 's', 1000: 'ms', 10 ** 6: 'us'}[scale]
