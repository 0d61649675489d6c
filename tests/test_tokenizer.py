"""HTFL offline: the vectorised functions against slow loop references, detection, the state."""

import math
import zlib

import numpy as np
import pytest

from heterrec_jax.data import tokenizer
from heterrec_jax.data.raw import FLOAT, TOKEN, TOKEN_SEQ, Column, ItemTable, PrepareError

# ---------------------------------------------------------------------------------------------
# Slow, obvious references.


def _ref_quantile(sorted_values, p):
  """Linear interpolation between order statistics (numpy's default 'linear' method)."""
  pos = p * (len(sorted_values) - 1)
  lo = math.floor(pos)
  hi = min(lo + 1, len(sorted_values) - 1)
  return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def _ref_edges(values, n_bins):
  finite = sorted(v for v in values if math.isfinite(v))
  edges = []
  for j in range(1, n_bins):
    e = _ref_quantile(finite, j / n_bins)
    if e > finite[0] and all(abs(e - f) > 1e-12 for f in edges):
      edges.append(e)
  return sorted(edges)


def _ref_code(x, edges):
  if not math.isfinite(x):
    return 0
  return 1 + sum(1 for e in edges if e <= x)


def _ref_mixed_radix(levels, q):
  code = 0
  for level in levels:
    code = code * q + int(level)
  return code


# ---------------------------------------------------------------------------------------------
# Pure functions.


@pytest.mark.parametrize('seed', range(5))
def test_quantile_edges_and_codes_match_reference(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 300))
  values = rng.choice([rng.normal(size=n), rng.integers(0, 6, n).astype(float)])
  values[rng.random(n) < 0.1] = np.nan
  values[rng.random(n) < 0.05] = np.inf
  n_bins = int(rng.integers(2, 20))
  if not np.isfinite(values).any():
    values[0] = 1.0
  edges = tokenizer.quantile_edges(values, n_bins)
  np.testing.assert_allclose(edges, _ref_edges(values, n_bins), rtol=1e-12)
  assert np.all(np.diff(edges) > 0)
  codes = tokenizer.bin_codes(values, edges)
  assert codes.dtype == np.int32
  assert codes.tolist() == [_ref_code(x, edges) for x in values]
  assert codes.max() <= len(edges) + 1


def test_nan_and_inf_go_to_the_missing_bin():
  values = np.array([1.0, np.nan, np.inf, -np.inf, 2.0, 3.0])
  edges = tokenizer.quantile_edges(values, 4)
  codes = tokenizer.bin_codes(values, edges)
  assert codes[1:4].tolist() == [0, 0, 0] and (codes[[0, 4, 5]] >= 1).all()
  assert tokenizer.quantile_edges(np.array([np.nan, np.inf]), 4).size == 0
  assert tokenizer.bin_codes(np.array([np.nan, 5.0]), np.zeros(0)).tolist() == [0, 1]


@pytest.mark.parametrize('seed', range(3))
def test_level_and_mixed_radix_codes_match_loops(seed):
  rng = np.random.default_rng(seed)
  n, z, g, q = 50, 3, int(rng.integers(1, 5)), int(rng.integers(2, 6))
  x = rng.normal(size=(n, z * g))
  edges = tokenizer.level_edges(x, q)
  assert edges.shape == (q - 1, z * g)
  levels = tokenizer.level_codes(x, edges)
  for i in range(n):
    for d in range(z * g):
      assert levels[i, d] == sum(1 for e in edges[:, d] if e <= x[i, d])
  codes = tokenizer.mixed_radix_codes(levels.reshape(n, z, g), q)
  for i in range(n):
    for k in range(z):
      assert codes[i, k] == _ref_mixed_radix(levels[i, k * g:(k + 1) * g], q)
  assert codes.min() >= 0 and codes.max() < q ** g


def test_stable_hash_is_crc32():
  assert tokenizer.stable_hash('brand') == zlib.crc32(b'brand') == 475199832


def test_pca_signs_and_orthonormality():
  x = np.random.default_rng(0).normal(size=(40, 6)) * np.arange(1, 7)
  mean, comps = tokenizer.pca_fit(x, 3)
  np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-10)
  assert (comps[np.arange(3), np.abs(comps).argmax(1)] > 0).all()
  variances = ((x - mean) @ comps.T).var(0)
  assert variances[0] >= variances[1] >= variances[2]


# ---------------------------------------------------------------------------------------------
# Detection, vocabularies, multimodal codes.


def _table(n=20):
  years = [str(1990 + i % 5) for i in range(n)]
  years[0], years[1] = 'unkonwn', 'V'
  return ItemTable(keys=[f'i{i}' for i in range(n)], columns={
      'title': Column(TOKEN_SEQ, [(f'w{i}', f'v{i}') for i in range(n)]),
      'year': Column(TOKEN, years),
      'brand': Column(TOKEN, ['a', 'b', 'a', None] * (n // 4)),
      'genres': Column(TOKEN_SEQ, [('x', 'y', 'x'), ('y',), None, ('z',)] * (n // 4)),
      'price': Column(FLOAT, [float(i) if i % 3 else math.nan for i in range(n)]),
      'serial': Column(TOKEN, [f's{i}' for i in range(n)])})


def test_detect_kinds():
  kinds, skipped = tokenizer.detect_kinds(_table(), tokenizer.Options())
  assert kinds == {'year': 'numerical', 'brand': 'categorical', 'genres': 'multi',
                   'price': 'numerical'}
  assert set(skipped) == {'title', 'serial'}
  kinds, skipped = tokenizer.detect_kinds(_table(), tokenizer.Options(
      categorical=('year', 'serial'), multi=('brand',), skip=('price',)))
  assert kinds == {'year': 'categorical', 'brand': 'multi', 'genres': 'multi',
                   'serial': 'categorical'}
  assert skipped['price'] == 'skipped by --skip'


def test_flags_naming_absent_columns_fail():
  with pytest.raises(PrepareError, match=r"columns \['colour'\].*columns found: \['title'"):
    tokenizer.detect_kinds(_table(), tokenizer.Options(multi=('colour',)))
  with pytest.raises(PrepareError, match='more than one'):
    tokenizer.Options(multi=('a',), skip=('a',))


def test_vocabulary_order_min_count_and_hashing():
  values = [('b',), ('a',), ('b',), ('c',), ('a',), ('b',), ()]
  params = tokenizer.fit_vocabulary(values, tokenizer.Options())
  assert params == {'vocab': ['b', 'a', 'c']}  # by count, then value
  ids = tokenizer.vocabulary_ids(values + [('zzz',)], params, 1)
  assert ids[:, 0].tolist() == [2, 3, 2, 4, 3, 2, 1, 1]
  params = tokenizer.fit_vocabulary(values, tokenizer.Options(min_count=2))
  assert params == {'vocab': ['b', 'a']}
  params = tokenizer.fit_vocabulary(values, tokenizer.Options(hash_buckets=2))
  ids = tokenizer.vocabulary_ids(values, params, 1)
  assert ids[0, 0] == 2 + zlib.crc32(b'b') % 2 and set(ids[:6, 0]) <= {2, 3}


def test_tokenizer_transform_layout():
  table = _table()
  tok = tokenizer.Tokenizer.fit(table, {}, tokenizer.Options(max_values=8))
  tokens = tok.transform(table, {})
  features = tok.schema_features()
  assert [f.name for f in features] == ['item_id', 'year', 'brand', 'genres', 'price']
  assert tokens.shape == (20, sum(f.n_sub for f in features)) and tokens.dtype == np.int32
  assert tokens[:, 0].tolist() == list(range(2, 22)) and features[0].table_size == 22
  assert tokens[:2, 1].tolist() == [0, 0]  # 'unkonwn', 'V': the missing bin
  genres = features[3]
  assert genres.n_sub == 2  # the longest de-duplicated list
  assert tokens[2, genres.offset:genres.offset + 2].tolist() == [1, 0]  # no values: unknown
  for f in features:
    block = tokens[:, f.offset:f.offset + f.n_sub]
    assert block.min() >= 0 and block.max() < f.table_size


def test_multimodal_codes_and_missing_rows():
  rng = np.random.default_rng(0)
  table = ItemTable(keys=[str(i) for i in range(30)], columns={})
  matrix = rng.normal(size=(30, 16))
  matrix[3] = np.nan
  opts = tokenizer.Options(groups=4, levels=4)
  tok = tokenizer.Tokenizer.fit(table, {'img': matrix}, opts)
  feature = tok.schema_features()[1]
  assert (feature.n_sub, feature.table_size) == (4, 4 ** 4 + 1)
  tokens = tok.transform(table, {'img': matrix})[:, 1:]
  assert tokens[3].tolist() == [0, 0, 0, 0]
  assert tokens[np.arange(30) != 3].min() >= 1 and tokens.max() <= 4 ** 4
  edges = np.asarray(tok.features[1].params['edges'])
  levels = tokenizer.level_codes(matrix[:1], edges)
  assert tokens[0, 0] == 1 + _ref_mixed_radix(levels[0, :4], 4)


def test_multimodal_width_errors_name_the_flag():
  table = ItemTable(keys=['a', 'b'], columns={})
  with pytest.raises(PrepareError, match='--groups=8 does not divide'):
    tokenizer.Tokenizer.fit(table, {'e': np.ones((2, 12))}, tokenizer.Options())
  with pytest.raises(PrepareError, match='--pca-dim=40 exceeds'):
    tokenizer.Tokenizer.fit(table, {'e': np.ones((2, 12))}, tokenizer.Options(pca_dim=40))
  with pytest.raises(PrepareError, match='too many codes'):
    tokenizer.Tokenizer.fit(table, {'e': np.ones((2, 384))}, tokenizer.Options(pca_dim=0))


def test_state_round_trip_is_byte_identical(tmp_path):
  rng = np.random.default_rng(1)
  table = _table()
  embeddings = {'text': rng.normal(size=(20, 48))}
  tok = tokenizer.Tokenizer.fit(table, embeddings, tokenizer.Options(groups=4, pca_dim=8))
  assert tok.features[-1].params['pca']
  for folder in ('a', 'b'):
    (tmp_path / folder).mkdir()
    tok.save(tmp_path / folder)
  names = sorted(p.name for p in (tmp_path / 'a').iterdir())
  assert names == ['tokenizer.json', 'tokenizer_text_pca_components.npy',
                   'tokenizer_text_pca_mean.npy']
  for name in names:
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
  loaded = tokenizer.Tokenizer.load(tmp_path / 'a')
  np.testing.assert_array_equal(loaded.transform(table, embeddings),
                                tok.transform(table, embeddings))
  assert loaded.schema_features() == tok.schema_features()


def test_pca_runs_on_one_blas_thread(monkeypatch):
  """The PCA's bytes must not depend on the BLAS thread count: eigh and the projection run
  with BLAS limited to one thread, whatever the process allows."""
  threadpoolctl = pytest.importorskip('threadpoolctl')
  seen = []
  eigh = np.linalg.eigh

  def spy(matrix):
    seen.append(max((p['num_threads'] for p in threadpoolctl.threadpool_info()
                     if p['user_api'] == 'blas'), default=1))
    return eigh(matrix)

  monkeypatch.setattr(np.linalg, 'eigh', spy)
  x = np.random.default_rng(0).normal(size=(50, 16))
  with threadpoolctl.threadpool_limits(limits=2, user_api='blas'):
    mean, comps = tokenizer.pca_fit(x, 4)
  assert seen == [1]
  single = tokenizer.pca_fit(x, 4)
  assert mean.tobytes() == single[0].tobytes() and comps.tobytes() == single[1].tobytes()
