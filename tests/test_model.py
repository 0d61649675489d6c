"""HeterRec: shapes for every variant, causality by gradients, HTFL details, the public API."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from heterrec_jax import layers
from heterrec_jax.config import ConfigError, LossConfig, ModelConfig
from heterrec_jax.data.dataset import Feature, Schema
from heterrec_jax.model import HeterRec

N_ITEMS, B, T, N_STEP = 10, 3, 4, 2
FEATURES = (Feature('item_id', 'categorical', 0, 1, N_ITEMS + 2),
            Feature('genre', 'multi', 1, 3, 6),
            Feature('price', 'numerical', 4, 1, 5),
            Feature('image', 'multimodal', 5, 2, 17))
SCHEMA = Schema(FEATURES, n_users=5, n_items=N_ITEMS, n_events=40)
K, S = SCHEMA.n_kinds, SCHEMA.n_sub
VARIANTS = ('full', 'no_htfl', 'no_mfk', 'no_hct', 'no_lmp', 'no_tlmp')


def _item_tokens(seed=0):
  """int32 [n_items + 1, S]; row 0 (the padding item) is all zeros."""
  rng = np.random.default_rng(seed)
  rows = np.concatenate([np.arange(N_ITEMS + 1)[:, None] + 1, rng.integers(0, 6, (N_ITEMS + 1, 3)),
                         rng.integers(0, 6, (N_ITEMS + 1, 1)),
                         rng.integers(1, 17, (N_ITEMS + 1, 2))], axis=1)
  rows[0] = 0
  return rows.astype(np.int32)


TOKENS = _item_tokens()
RAW = {'image': np.random.default_rng(1).normal(size=(N_ITEMS + 1, 6)).astype(np.float32)}


def _model(variant='full', dropout=0.0, **loss):
  cfg = ModelConfig(variant=variant, d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2,
                    dropout=dropout, time_buckets=8)
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=N_STEP, **loss), rngs=nnx.Rngs(0),
                   embeddings=RAW)
  model.eval()
  return model


def _batch(w=T + N_STEP, seed=2):
  """Right-aligned windows: sequence 0 is left-padded, sequence 2 is all padding."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, N_ITEMS + 1, (B, w)).astype(np.int32)
  mask = np.ones((B, w), bool)
  mask[0, :2] = False
  mask[2] = False
  items = np.where(mask, items, 0)
  ts = np.cumsum(rng.integers(1, 10**5, (B, w)), axis=1).astype(np.int32)
  return {'items': items, 'tokens': TOKENS[items], 'timestamps': np.where(mask, ts, 0),
          'mask': mask}


def _user_args(batch, t=T):
  return tuple(batch[k][:, :t] for k in ('items', 'tokens', 'timestamps', 'mask'))


@pytest.mark.parametrize('variant', VARIANTS)
def test_forward_shapes_and_finite_for_every_variant(variant):
  model = _model(variant, dropout=0.1)
  model.train()
  out = jax.jit(lambda m, b: m.forward(b))(model, _batch())
  n_tok = len(model.token_kinds)
  assert n_tok == (0 if variant in ('no_htfl', 'no_tlmp') else 3)
  chex.assert_shape(out['queries'], (N_STEP, B, T, 12))
  chex.assert_shape(out['targets'], (B, T + N_STEP, 12))
  chex.assert_shape(out['token_queries'], (N_STEP, n_tok, B, T, 8))
  chex.assert_shape(out['token_targets'], (n_tok, B, T + N_STEP, 8))
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(jnp.linalg.norm(out['queries'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out['targets'], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('variant', ('full', 'no_htfl', 'no_hct'))
def test_user_vector_is_first_head_at_last_position(variant):
  model = _model(variant)
  batch = _batch()
  user = jax.jit(lambda m, *a: m.user_vector(*a))(model, *_user_args(batch))
  chex.assert_shape(user, (B, 12))
  chex.assert_tree_all_finite(user)
  queries = jax.jit(lambda m, b: m.forward(b)['queries'])(model, batch)
  np.testing.assert_allclose(user, queries[0, :, -1], atol=1e-5)


def test_encode_items_any_leading_shape_and_token_targets():
  model = _model()
  encode = jax.jit(lambda m, i, t: m.encode_items(i, t))
  items = np.arange(6, dtype=np.int32).reshape(2, 3)
  vec, tok = encode(model, items, TOKENS[items])
  chex.assert_shape((vec, tok), ((2, 3, 12), (2, 3, K, 8)))
  flat_vec, _ = encode(model, items.reshape(-1), TOKENS[items.reshape(-1)])
  np.testing.assert_allclose(vec.reshape(6, 12), flat_vec, atol=1e-6)
  batch = _batch()
  out = jax.jit(lambda m, b: m.forward(b))(model, batch)
  _, slots = encode(model, batch['items'], batch['tokens'])
  for s, (_, k, _, _) in enumerate(model.token_kinds):
    np.testing.assert_allclose(out['token_targets'][s], slots[:, :, k], atol=1e-6)


def _full_mask_inputs():
  batch = _batch(w=T)
  batch['mask'][:] = True
  items, tokens, ts, mask = _user_args(batch)
  return items, tokens, ts, mask


def _grad_norms(fn, x):
  """`norms[t, ...] = sum |d sum(fn(x)[:, t]) / dx|` over the batch and feature axes of x:
  `[T, *x.shape[1:-1]]` (one jitted Jacobian instead of a gradient per position)."""
  # A random projection, not a plain sum: the sum of a LayerNorm output over its features is
  # constant (zero gradient) at initialisation.
  probe = lambda y: y * jax.random.normal(jax.random.key(1), y.shape[-1:], y.dtype)
  per_t = lambda x: jnp.sum(probe(fn(x)), axis=(0, -1)).reshape(-1)
  jac = jax.jit(jax.jacrev(per_t))(x)
  return np.abs(np.asarray(jac)).sum(axis=(1, -1))


def test_token_level_is_block_causal_by_gradients():
  """Every token (t, k) depends on ALL K tokens of items <= t (its own item's later kinds too,
  which a plain token-causal mask would hide) and on no token of a later item."""
  model = _model()
  items, tokens, ts, mask = _full_mask_inputs()
  h0 = model.htfl(items, tokens)
  fn = lambda h: model.encode_tokens(h, ts, mask)[1].reshape(B, T * K, -1)
  norms = _grad_norms(fn, h0)  # [T * K query tokens, T, K]
  for i in range(T * K):
    t = i // K
    assert np.all(norms[i, t + 1:] == 0), (i, norms[i])
    assert np.all(norms[i, :t + 1] > 0), (i, norms[i])


def test_user_output_is_causal_by_gradients():
  model = _model()
  items, tokens, ts, mask = _full_mask_inputs()
  h0 = model.htfl(items, tokens)
  norms = _grad_norms(lambda h: model.encode_tokens(h, ts, mask)[0], h0)  # [T, T, K]
  for t in range(T):
    assert np.all(norms[t, t + 1:] == 0), (t, norms[t])
    assert np.all(norms[t, :t + 1] > 0), (t, norms[t])  # every token of items <= t


def test_padded_items_are_invisible_by_gradients():
  model = _model()
  items, tokens, ts, mask = _full_mask_inputs()
  mask[:, :2] = False
  h0 = model.htfl(items, tokens)
  norms_TxK = _grad_norms(lambda h: model.encode_tokens(h, ts, mask)[0], h0)[T - 1]
  assert np.all(norms_TxK[:2] == 0) and np.all(norms_TxK[2:] > 0), norms_TxK


def test_item_level_is_causal_by_gradients():
  model = _model()
  _, _, ts, mask = _full_mask_inputs()
  x = jax.random.normal(jax.random.key(0), (B, T, 12))
  norms = _grad_norms(lambda x: model.encode_item_level(x, ts, mask), x)  # [T, T]
  for t in range(T):
    assert np.all(norms[t, t + 1:] == 0) and np.all(norms[t, :t + 1] > 0), (t, norms[t])


def test_no_hct_token_does_not_see_later_tokens():
  model = _model('no_hct')
  items, tokens, ts, mask = _full_mask_inputs()
  h0 = model.htfl(items, tokens)
  fn = lambda h: model.encode_tokens(h, ts, mask)[1].reshape(B, T * K, -1)
  norms = _grad_norms(fn, h0).reshape(T * K, T * K)  # [query token, key token], flat order
  for i in range(T * K):
    assert np.all(norms[i, i + 1:] == 0) and np.all(norms[i, :i + 1] > 0), (i, norms[i])


def test_no_htfl_has_no_token_stage():
  model = _model('no_htfl')
  user, tok = jax.jit(lambda m, *a: m.encode_user(*a))(model, *_user_args(_batch()))
  assert tok is None
  chex.assert_shape(user, (B, T, 12))
  assert model.token_stage is None
  assert model.token_kinds == ()


def test_padded_items_produce_no_nan():
  for variant in ('full', 'no_hct', 'no_htfl'):
    model = _model(variant)
    user, tok = jax.jit(lambda m, *a: m.encode_user(*a))(model, *_user_args(_batch()))
    chex.assert_tree_all_finite((user, tok))


def test_multi_valued_mean_masks_padding():
  model = _model()
  table = np.asarray(model.htfl.features[1].embed.embedding[...])
  ids = jnp.array([[2, 4, 0], [0, 0, 0], [5, 0, 5]], jnp.int32)
  got = np.asarray(model.htfl.features[1](None, ids))
  np.testing.assert_allclose(got[0], (table[2] + table[4]) / 2, atol=1e-6)
  np.testing.assert_allclose(got[1], 0.0)
  np.testing.assert_allclose(got[2], table[5], atol=1e-6)


def test_htfl_tokens_and_slot_embedding():
  model = _model()
  h0 = np.asarray(model.htfl(jnp.array([3]), TOKENS[[3]]))
  slot = np.asarray(model.htfl.slot_embedding[...])
  item_table = np.asarray(model.htfl.features[0].embed.embedding[...])
  np.testing.assert_allclose(h0[0, 0], item_table[TOKENS[3, 0]] + slot[0], atol=1e-6)
  groups = np.asarray(model.htfl.features[3].embedding[...])  # [Z, rows, d_f / Z]
  image = np.concatenate([groups[z, TOKENS[3, 5 + z]] for z in range(2)])
  np.testing.assert_allclose(h0[0, 3], image + slot[3], atol=1e-6)


def test_no_mfk_uses_frozen_raw_embedding():
  model = _model('no_mfk')
  params = jax.tree_util.keystr(nnx.state(model, nnx.Param))
  assert 'raw_embedding' not in params
  raw = model.htfl.features[3]
  np.testing.assert_allclose(raw.raw_embedding[...], RAW['image'])
  with pytest.raises(ConfigError, match='no_mfk'):
    HeterRec(SCHEMA, ModelConfig(variant='no_mfk', d_f=8, d_k=8), LossConfig(),
             rngs=nnx.Rngs(0))


def test_token_kinds_resolution_and_errors():
  assert [n for n, *_ in _model().token_kinds] == ['genre', 'price', 'image']
  assert _model().token_kinds[0] == ('genre', 1, 1, 3)
  assert _model(token_kinds=('price',)).token_kinds == (('price', 2, 4, 1),)
  assert _model(w_tok=0.0).token_kinds == ()
  with pytest.raises(ConfigError, match='loss.token_kinds'):
    _model(token_kinds=('colour',))
  with pytest.raises(ConfigError, match='model.d_f'):
    HeterRec(SCHEMA, ModelConfig(d_f=9, d_k=8, heads=1), LossConfig(), rngs=nnx.Rngs(0))


def test_parameters_name_logical_axes_and_are_float32():
  cfg = ModelConfig(d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2, time_buckets=8,
                    compute_dtype='bfloat16')
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=N_STEP), rngs=nnx.Rngs(0))
  allowed = {None, 'vocab', 'embed', 'mlp', 'heads', 'buckets', 'items', 'batch'}
  for path, var in jax.tree.leaves_with_path(nnx.state(model, nnx.Param),
                                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var[...].ndim, jax.tree_util.keystr(path)
    assert set(names) <= allowed and var[...].dtype == jnp.float32
  table = model.htfl.features[0].embed.embedding
  assert table.get_metadata()['out_sharding'] == ('vocab', 'embed')
  out = jax.jit(lambda m, b: m.forward(b))(model, _batch())
  chex.assert_tree_all_finite(out)


def _paper_and_option(**option):
  """Two small dot-scoring models from the same seed: the paper's, and one with `option` set."""
  cfg = ModelConfig(d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.0, time_buckets=8)
  loss = LossConfig(n_step=N_STEP, scoring='dot')
  plain = HeterRec(SCHEMA, cfg, loss, rngs=nnx.Rngs(0), embeddings=RAW)
  return plain, HeterRec(SCHEMA, dataclasses.replace(cfg, **option), loss, rngs=nnx.Rngs(0),
                         embeddings=RAW)


def test_item_id_vector_adds_a_free_row_to_v():
  """With dot scoring, V(item_id_vector) - V(paper) is exactly the item's own free row."""
  plain, free = _paper_and_option(item_id_vector=True)
  items = jnp.array([1, 4, 7])
  tokens = jnp.asarray(_batch()['tokens'][0, :3])
  v_plain, _ = plain.encode_items(items, tokens)
  v_free, _ = free.encode_items(items, tokens)
  rows = np.asarray(free.item_vectors.embedding[...])[[1, 4, 7]]
  np.testing.assert_allclose(v_free - v_plain, rows, atol=1e-5)


def test_v_without_features_is_the_free_row_alone():
  """`v_features=False`: V is exactly the item's free row (the feature MLP left out of V), while
  the per-slot token embeddings, which the token-level loss reads, are the paper's."""
  plain, ids_only = _paper_and_option(item_id_vector=True, v_features=False)
  items = jnp.array([1, 4, 7])
  tokens = jnp.asarray(_batch()['tokens'][0, :3])
  v_plain, slots_plain = plain.encode_items(items, tokens)
  v_ids, slots_ids = ids_only.encode_items(items, tokens)
  rows = np.asarray(ids_only.item_vectors.embedding[...])[[1, 4, 7]]
  np.testing.assert_allclose(v_ids, rows, atol=1e-6)
  assert not np.allclose(v_plain, rows, atol=1e-3)  # the paper's V is not the row alone
  np.testing.assert_allclose(slots_ids, slots_plain, atol=1e-6)


def test_v_without_features_needs_a_per_item_vector():
  with pytest.raises(ConfigError, match='model.v_features=False leaves V empty'):
    ModelConfig(v_features=False)


def test_item_id_vector_starts_small_beside_the_feature_path():
  """The free rows start at N(0, 0.02), RecBole's item-table init (not the unit-scale init of
  the feature tables): at the start V is the feature path's, and the rows grow as they learn."""
  _, free = _paper_and_option(item_id_vector=True)
  rows = np.asarray(free.item_vectors.embedding[...])
  assert rows.size >= 100 and 0.015 < rows.std() < 0.025, rows.std()


def _feature_tables(model):
  """(kind, table) of each HTFL feature table: one array per feature."""
  out = []
  for feature, embed in zip(FEATURES, model.htfl.features):
    table = embed.embedding if feature.kind == 'multimodal' else embed.embed.embedding
    out.append((feature.kind, np.asarray(table[...])))
  return out


@pytest.mark.parametrize('table_std', (0.0, 0.02))
def test_table_std_sets_the_init_of_every_feature_table(table_std):
  """model.table_std > 0: every feature table (categorical, numerical, multi-valued,
  multimodal) starts at N(0, table_std); 0 keeps 1/sqrt(d_f) (d_f = 64 here, so 0.125)."""
  cfg = ModelConfig(d_f=64, d_k=64, heads=2, n1=1, n2=1, table_std=table_std)
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=1), rngs=nnx.Rngs(0))
  expected = table_std or 1 / np.sqrt(64)
  for kind, table in _feature_tables(model):
    assert table.size >= 512, (kind, table.shape)
    assert 0.75 * expected < table.std() < 1.25 * expected, (kind, table.std(), expected)


def test_table_std_must_be_a_finite_non_negative_number():
  with pytest.raises(ConfigError, match=r'model.table_std=-0.1 is not allowed; it must be >= 0'):
    ModelConfig(table_std=-0.1)
  with pytest.raises(ConfigError, match=r'model.table_std=nan is not allowed; it must be a finite'):
    ModelConfig(table_std=float('nan'))


def _linear_kernels(model):
  """(path, kernel) of every Linear-like kernel of HeterRec: the blocks' attention and FFN, the
  fusion, the item tower's stacked and flat MLPs, the LMP heads (not tables, LayerNorms or
  biases)."""
  out = []
  for path, param in nnx.iter_graph(model):
    name = '/'.join(str(p) for p in path)
    if isinstance(param, nnx.Param) and (name.endswith('kernel') or name.endswith(('w1', 'w2'))):
      out.append((name, np.asarray(param[...])))
  return out


@pytest.mark.parametrize('linear_std', (0.0, 0.02))
def test_linear_std_sets_the_init_of_every_linear_kernel(linear_std):
  """model.linear_std > 0: every Linear kernel starts at N(0, linear_std) (RecBole's 0.02);
  0 keeps lecun normal, std 1/sqrt(fan_in). Feature tables keep their own init."""
  cfg = ModelConfig(d_f=64, d_k=64, heads=2, n1=1, n2=1, linear_std=linear_std)
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=2), rngs=nnx.Rngs(0))
  kernels = _linear_kernels(model)
  names = ' '.join(name for name, _ in kernels)
  for part in ('token_stage', 'fusion', 'item_stage', 'item_tower', 'heads', 'token_heads'):
    assert part in names, (part, names)
  for name, kernel in kernels:
    expected = linear_std or 1 / np.sqrt(kernel.shape[-2])
    assert 0.8 * expected < kernel.std() < 1.2 * expected, (name, kernel.std(), expected)
  for kind, table in _feature_tables(model):
    assert 0.75 / 8 < table.std() < 1.25 / 8, (kind, table.std())


def test_linear_std_must_be_a_finite_non_negative_number():
  with pytest.raises(ConfigError, match=r'model.linear_std=-0.1 is not allowed; it must be >= 0'):
    ModelConfig(linear_std=-0.1)
  with pytest.raises(ConfigError, match=r'model.linear_std=inf is not allowed; it must be a fin'):
    ModelConfig(linear_std=float('inf'))


def test_item_id_input_adds_the_tied_free_row_to_the_item_level_input_only():
  """item_id_input alone: V is the paper's; the item-level input is fusion + the item's row."""
  plain, tied = _paper_and_option(item_id_input=True)
  tied.eval()
  items, tokens, ts, mask = _full_mask_inputs()
  np.testing.assert_array_equal(plain.encode_items(items, tokens)[0],
                                tied.encode_items(items, tokens)[0])
  h0 = tied.htfl(items, tokens)
  tok = tied.token_stage(h0, ts, layers.block_causal_mask(mask))
  rows = tied.item_vectors.embedding[...][items]
  fused = tied.fusion(tok.reshape(*tok.shape[:2], -1))
  expected = tied.encode_item_level(fused + rows, ts, mask)
  np.testing.assert_allclose(tied.encode_tokens(h0, ts, mask, items)[0], expected, atol=1e-5)
  without = tied.encode_item_level(fused, ts, mask)
  np.testing.assert_allclose(tied.encode_tokens(h0, ts, mask)[0], without, atol=1e-5)
  assert float(jnp.abs(expected - without).max()) > 1e-4
  np.testing.assert_allclose(tied.encode_user(items, tokens, ts, mask)[0], expected, atol=1e-5)


def test_item_positions_are_right_aligned_and_causal():
  cfg = ModelConfig(d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.0, time_buckets=8,
                    item_positions=True)
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=N_STEP), rngs=nnx.Rngs(0), embeddings=RAW,
                   max_len=T)
  model.eval()
  with pytest.raises(ConfigError, match='max_len'):
    HeterRec(SCHEMA, cfg, LossConfig(n_step=N_STEP), rngs=nnx.Rngs(0), embeddings=RAW)
  batch = _batch()
  args = tuple(jnp.asarray(batch[k][:, :T]) for k in ('items', 'tokens', 'timestamps', 'mask'))
  before = model.user_vector(*args)
  model.positions[...] = model.positions[...] + 1.0
  assert float(jnp.abs(model.user_vector(*args) - before).max()) > 1e-4

  items, tokens, ts, mask = _full_mask_inputs()
  norms = _grad_norms(lambda h: model.encode_tokens(h, ts, mask)[0], model.htfl(items, tokens))
  for t in range(T):
    assert np.all(norms[t, t + 1:] == 0), (t, norms[t])


def test_input_dropout_drops_the_stack_inputs_in_training_only():
  """model.input_dropout: same parameters as the paper's model; in eval mode the same outputs;
  in train mode about `rate` of H0's entries get no gradient (they were dropped), and the
  item-level input is dropped too (the no_htfl model, whose token path is H0 alone, changes)."""
  plain, dropped = _paper_and_option(input_dropout=0.5)
  assert plain.input_drop is None
  chex.assert_trees_all_equal(nnx.state(plain, nnx.Param), nnx.state(dropped, nnx.Param))
  items, tokens, ts, mask = _full_mask_inputs()
  plain.eval()
  dropped.eval()
  np.testing.assert_array_equal(plain.encode_user(items, tokens, ts, mask)[0],
                                dropped.encode_user(items, tokens, ts, mask)[0])
  dropped.train()
  h0 = dropped.htfl(items, tokens)
  loss = lambda m, h: jnp.sum(m.encode_tokens(h, ts, mask)[0] ** 2)
  grad = nnx.grad(loss, argnums=1)(dropped, h0)  # nnx.grad: the dropout's RNG state moves
  zero_share = float(jnp.mean(grad == 0))
  assert 0.35 < zero_share < 0.65, zero_share
  plain.train()  # dropout 0 in its blocks: training mode changes nothing
  grad = nnx.grad(loss, argnums=1)(plain, h0)
  assert float(jnp.mean(grad == 0)) < 0.01
  # The item-level input: with the token stage gone, both dropouts still act.
  cfg = ModelConfig(variant='no_htfl', d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2,
                    dropout=0.0, time_buckets=8, input_dropout=0.5)
  model = HeterRec(SCHEMA, cfg, LossConfig(n_step=N_STEP), rngs=nnx.Rngs(0), embeddings=RAW)
  fused = model.fusion(h0.reshape(*h0.shape[:2], -1))
  model.train()
  first = model.encode_item_level(fused, ts, mask)
  out = model.encode_tokens(h0, ts, mask)[0]
  assert float(jnp.abs(out - first).max()) > 1e-4


def test_identity_heads_start_as_the_identity_map():
  """model.head_init='identity': at init every item-level step query is U itself and every
  token-level query the token output of its kind (dot scoring: no normalisation); 'lecun' heads
  are not the identity; a bad name lists the allowed ones."""
  cfg = ModelConfig(d_f=8, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.0, time_buckets=8,
                    head_init='identity')
  loss = LossConfig(n_step=N_STEP, scoring='dot')
  model = HeterRec(SCHEMA, cfg, loss, rngs=nnx.Rngs(0), embeddings=RAW)
  items, tokens, ts, mask = _full_mask_inputs()
  user, tok = model.encode_user(items, tokens, ts, mask)
  queries = model.step_queries(user)
  assert queries.shape[0] == N_STEP > 1
  for step in range(N_STEP):
    np.testing.assert_allclose(queries[step], user, atol=1e-6)
  token_queries = model.token_queries(tok)
  kinds = np.asarray(model._token_kind_index())
  for step in range(N_STEP):
    for s, k in enumerate(kinds):
      np.testing.assert_allclose(token_queries[step, s], tok[:, :, k], atol=1e-6)
  np.testing.assert_allclose(model.user_vector(items, tokens, ts, mask), user[:, -1], atol=1e-6)
  lecun = HeterRec(SCHEMA, dataclasses.replace(cfg, head_init='lecun'), loss, rngs=nnx.Rngs(0),
                   embeddings=RAW)
  assert float(jnp.abs(lecun.step_queries(user)[0] - user).max()) > 0.1
  with pytest.raises(ConfigError, match=r"model.head_init='zeros'.*'lecun', 'identity'"):
    dataclasses.replace(cfg, head_init='zeros')


def test_token_dropout_sets_the_token_level_rate_alone():
  """model.token_dropout: the token-level blocks drop at it, the item-level blocks at `dropout`;
  negative (the default) is `dropout` at both; the parameters are the paper's model's; a rate
  outside [0, 1) that is not negative is a config error naming the field."""
  plain, split = _paper_and_option(dropout=0.5, token_dropout=0.2)
  rates = lambda stage: {d.rate for b in stage.blocks for d in (b.drop1, b.drop2)}
  assert rates(split.token_stage) == {0.2} and rates(split.item_stage) == {0.5}
  assert rates(plain.token_stage) == {0.0} == rates(plain.item_stage)
  _, same = _paper_and_option(dropout=0.5)
  assert rates(same.token_stage) == {0.5} == rates(same.item_stage)
  chex.assert_trees_all_equal(nnx.state(plain, nnx.Param), nnx.state(split, nnx.Param))
  with pytest.raises(ConfigError, match=r'model.token_dropout=1.0 must be in \[0, 1\), or neg'):
    ModelConfig(token_dropout=1.0)


def test_item_input_norm_normalises_the_item_level_input():
  """model.item_input_norm: the item-level stack reads LayerNorm(fusion + the options' rows)
  (zero mean, unit variance per position at init); the paper's model has no such parameters,
  and the option's other parameters are the paper's."""
  plain, normed = _paper_and_option(item_input_norm=True)
  assert plain.item_input_norm is None
  flat = lambda m: {path: v[...] for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  paper, option = flat(plain), flat(normed)
  assert {path[0] for path in set(option) - set(paper)} == {'item_input_norm'}
  chex.assert_trees_all_equal(paper, {path: option[path] for path in paper})
  normed.eval()
  items, tokens, ts, mask = _full_mask_inputs()
  h0 = normed.htfl(items, tokens)
  tok = normed.token_stage(h0, ts, layers.block_causal_mask(mask))
  fused = normed.fusion(tok.reshape(*tok.shape[:2], -1))
  centred = fused - fused.mean(-1, keepdims=True)
  by_hand = centred / jnp.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
  expected = normed.encode_item_level(by_hand, ts, mask)
  np.testing.assert_allclose(normed.encode_tokens(h0, ts, mask)[0], expected, atol=1e-4)
  unnormed = normed.encode_item_level(fused, ts, mask)
  assert float(jnp.abs(expected - unnormed).max()) > 1e-3


def test_input_dropout_must_be_a_rate():
  with pytest.raises(ConfigError, match=r'model.input_dropout=1.0 must be in \[0, 1\)'):
    ModelConfig(input_dropout=1.0)


def test_item_id_row_in_v_adds_the_id_tokens_own_row():
  """model.item_id_row_in_v: with dot scoring V(option) - V(paper) is the item-id token's HTFL
  output (the table the user tower reads); a width mismatch is a config error."""
  cfg = ModelConfig(d_f=12, d_k=12, heads=2, n1=1, n2=1, ffn_mult=2, dropout=0.0, time_buckets=8)
  loss = LossConfig(n_step=N_STEP, scoring='dot')
  plain = HeterRec(SCHEMA, cfg, loss, rngs=nnx.Rngs(0), embeddings=RAW)
  row = HeterRec(SCHEMA, dataclasses.replace(cfg, item_id_row_in_v=True), loss, rngs=nnx.Rngs(0),
                 embeddings=RAW)
  items = jnp.array([1, 4, 7])
  tokens = jnp.asarray(_batch()['tokens'][0, :3])
  expected = row.htfl(items, tokens)[:, 0]  # item_id is the schema's first feature
  difference = row.encode_items(items, tokens)[0] - plain.encode_items(items, tokens)[0]
  np.testing.assert_allclose(difference, expected, atol=1e-6)
  with pytest.raises(ConfigError, match='model.d_f == model.d_k'):
    dataclasses.replace(cfg, d_k=8, item_id_row_in_v=True)
  no_id = Schema(FEATURES[1:], n_users=5, n_items=N_ITEMS, n_events=40)
  with pytest.raises(ConfigError, match='needs an item_id feature'):
    HeterRec(no_id, dataclasses.replace(cfg, item_id_row_in_v=True), loss, rngs=nnx.Rngs(0),
             embeddings=RAW)
