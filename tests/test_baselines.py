"""Baselines: causality by gradients, HSTU's pointwise attention, the losses against NumPy loop
references, the Cloze masking, the public interface and a few optimiser steps per model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from heterrec_jax import baselines, layers, losses
from heterrec_jax import softmax as bl
from heterrec_jax.config import Config, ConfigError, LossConfig, ModelConfig, horizon
from heterrec_jax.data.dataset import Feature, Schema

N_ITEMS, B, T, N_STEP, D = 10, 3, 5, 2, 12
FEATURES = (Feature('item_id', 'categorical', 0, 1, N_ITEMS + 2),
            Feature('genre', 'multi', 1, 3, 6),
            Feature('price', 'numerical', 4, 1, 5))
SCHEMA = Schema(FEATURES, n_users=5, n_items=N_ITEMS, n_events=40)
NAMES = baselines.BASELINES
# Test-only: XLA's CPU backend without its LLVM optimisation passes compiles these small graphs
# several times faster; the numerics checked here do not depend on it.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _item_tokens(seed=0):
  rng = np.random.default_rng(seed)
  rows = np.concatenate([np.arange(N_ITEMS + 1)[:, None] + 1, rng.integers(0, 6, (N_ITEMS + 1, 3)),
                         rng.integers(0, 5, (N_ITEMS + 1, 1))], axis=1)
  rows[0] = 0
  return rows.astype(np.int32)


TOKENS = _item_tokens()


def _model(name, dropout=0.0, loss='default', dtype='float32', train=False):
  cfg = ModelConfig(name=name, d_f=8, d_k=D, heads=2, n1=1, n2=1, ffn_mult=2, dropout=dropout,
                    time_buckets=8, compute_dtype=dtype)
  model = baselines.build_baseline(SCHEMA, cfg, LossConfig(name=loss, n_step=N_STEP),
                                   nnx.Rngs(0), T)
  model.train() if train else model.eval()
  return model


def _batch(b=B, w=T + N_STEP, seed=2):
  """Right-aligned windows: sequence 0 is left-padded (2 positions)."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, N_ITEMS + 1, (b, w)).astype(np.int32)
  mask = np.ones((b, w), bool)
  mask[0, :2] = False
  items = np.where(mask, items, 0)
  ts = np.cumsum(rng.integers(1, 10**5, (b, w)), axis=1).astype(np.int32)
  return {'items': items, 'tokens': TOKENS[items], 'timestamps': np.where(mask, ts, 0),
          'mask': mask}


def _user_args(batch, t=T):
  return tuple(batch[k][:, -t:] for k in ('items', 'tokens', 'timestamps', 'mask'))


def _unit_norm(x, real=None):
  """Unit norm (where `real`: a padded position's output may be anything finite)."""
  norms = np.linalg.norm(np.asarray(x), axis=-1)
  np.testing.assert_allclose(norms if real is None else norms[real], 1.0, rtol=1e-5)


# ---- interface ----------------------------------------------------------------------------------

def _entry_points(name, model, batch):
  """In one jitted call: forward, user_vector of the window's first T events, encode_items and
  the dispatcher's {loss.name: (loss, aux)} for 'default' and 'sampled_softmax'."""
  items = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  out = model.forward(batch)
  values = {n: _loss_fn(name, LossConfig(name=n, n_step=N_STEP))(model, batch, jax.random.key(0))
            for n in ('default', 'sampled_softmax')}
  return (out, model.user_vector(*(batch[k][:, :T] for k in ('items', 'tokens', 'timestamps',
                                                             'mask'))),
          model.encode_items(items, jnp.asarray(TOKENS)[items])[0], values)


def _loss_fn(name, loss_cfg):
  return losses.make(Config(model=ModelConfig(name=name), loss=loss_cfg), None, TOKENS)


OWN_LOSS = {'sasrec': 'softmax', 'hstu': 'softmax', 'bert4rec': 'cloze',
            'pinnerformer': 'dense_all_action'}


def _check_losses(name, values):
  own = OWN_LOSS[name]
  assert set(values['default'][1]) == {f'{own}_loss'}
  sampled_key = 'sampled_softmax_loss' if name == 'bert4rec' else 'softmax_loss'
  assert set(values['sampled_softmax'][1]) == {sampled_key}
  default, sampled = float(values['default'][0]), float(values['sampled_softmax'][0])
  assert np.isfinite(default) and np.isfinite(sampled) and sampled > 0
  assert (default == sampled) == (own == 'softmax'), (default, sampled)


@pytest.mark.parametrize('name', NAMES)
def test_entry_points_shapes_normalised_jitted_and_losses(name):
  model = _model(name, train=True)  # Cloze masking on; dropout 0 so that user_vector is exact
  assert model.token_kinds == () and model.horizon == horizon(name, LossConfig(n_step=N_STEP))
  batch = _batch(w=T + model.horizon)
  out, user, vec, losses = jit(functools.partial(_entry_points, name))(model, batch)
  chex.assert_tree_all_finite((out, user, vec))
  window = slice(None, T)
  width = T + model.horizon
  chex.assert_shape((out['queries'], out['targets'], user, vec),
                    ((B, T, D), (B, width, D), (B, D), (2, 3, D)))
  _unit_norm(out['queries'], batch['mask'][:, window])
  for x in (out['targets'], user, vec):
    _unit_norm(x)
  _check_losses(name, losses)
  if name == 'bert4rec':
    chex.assert_shape((out['window_items'], out['window_mask'], out['cloze_mask'],
                       out['corpus']), ((B, T), (B, T), (B, T), (N_ITEMS + 1, D)))
    np.testing.assert_array_equal(out['window_items'], batch['items'][:, window])
    _unit_norm(out['corpus'])
  else:  # training and evaluation read the same tower
    np.testing.assert_allclose(user, out['queries'][:, -1], atol=1e-5)


@pytest.mark.parametrize('name', ('sasrec', 'bert4rec', 'hstu'))
def test_item_tower_is_the_tied_id_table(name):
  model = _model(name)
  table = np.asarray(model.input.embed.embedding[...])
  vec, _ = model.encode_items(jnp.array([3, 7]), None)
  ref = table[[3, 7]] / np.linalg.norm(table[[3, 7]], axis=-1, keepdims=True)
  np.testing.assert_allclose(vec, ref, atol=1e-6)


def test_parameters_name_logical_axes_and_are_float32():
  allowed = {None, 'vocab', 'embed', 'mlp', 'heads', 'buckets', 'items', 'batch'}
  for name in NAMES:
    model = _model(name, dtype='bfloat16')
    for path, var in jax.tree.leaves_with_path(nnx.state(model, nnx.Param),
                                               is_leaf=lambda x: isinstance(x, nnx.Variable)):
      names = var.get_metadata().get('out_sharding')
      assert names is not None and len(names) == var[...].ndim, (name, jax.tree_util.keystr(path))
      assert set(names) <= allowed and var[...].dtype == jnp.float32
    if name == 'hstu':  # bfloat16 through its own attention (the others: layers' blocks)
      chex.assert_tree_all_finite(jit(lambda m, b: m.forward(b))(model, _batch(w=T + 1)))


def test_build_baseline_rejects_heterrec_and_long_inputs():
  cfg = ModelConfig(name='heterrec', d_f=8, d_k=8)
  with pytest.raises(ConfigError, match='model.name'):
    baselines.build_baseline(SCHEMA, cfg, LossConfig(), nnx.Rngs(0), T)
  with pytest.raises(ValueError, match='data.max_len'):
    _model('sasrec').user_vector(*_user_args(_batch(w=T + 1), t=T + 1))


# ---- causality by gradients ---------------------------------------------------------------------

def _grad_norms(model):
  """`norms[b, t, s] = sum |d (out[b, t] . probe) / d x[b, s]|`, `[B, T, T]`, x = the embedded
  input (as tests/test_model.py). Sequence 0 has 2 padded positions whose input is NOT zero
  (embedded with a full mask), sequences 1 and 2 are full."""
  batch = _batch(w=T)
  items, tokens, ts, mask = (batch[k] for k in ('items', 'tokens', 'timestamps', 'mask'))
  x = model.embed(items, tokens, np.ones_like(mask))
  # A random projection, not a plain sum: the sum of a LayerNorm output is constant.
  probe = jax.random.normal(jax.random.key(1), (x.shape[-1],))
  per_bt = lambda x: model.encode_embedded(x, ts, mask) @ probe
  jac = np.abs(np.asarray(jit(jax.jacrev(per_bt))(x))).sum(-1)  # [B, T, B, T]
  assert np.all(jac[0, :, 1:] == 0) and np.all(jac[1:, :, 0] == 0)  # sequences are independent
  return np.stack([jac[b, :, b] for b in range(B)])


@pytest.mark.parametrize('name', ('sasrec', 'hstu', 'pinnerformer'))
def test_causal_models_see_earlier_real_items_only(name):
  norms = _grad_norms(_model(name))
  for b, first in ((0, 2), (1, 0), (2, 0)):
    for t in range(first, T):
      assert np.all(norms[b, t, :first] == 0), (b, t, norms[b, t])  # padding
      assert np.all(norms[b, t, first:t + 1] > 0), (b, t, norms[b, t])
      assert np.all(norms[b, t, t + 1:] == 0), (b, t, norms[b, t])  # later items


def test_bert4rec_sees_later_real_items():
  norms = _grad_norms(_model('bert4rec'))
  for b, first in ((0, 2), (1, 0), (2, 0)):
    for t in range(first, T):
      assert np.all(norms[b, t, :first] == 0), (b, t, norms[b, t])
      assert np.all(norms[b, t, first:] > 0), (b, t, norms[b, t])


# ---- HSTU ---------------------------------------------------------------------------------------

def _silu(x):
  return x / (1.0 + np.exp(-x))


def _hstu_ref(q, k, v, bias, allowed):
  """Weights and output by explicit loops: a = silu(<q_t, k_s> + bias) / T where allowed."""
  b, t, h, _ = q.shape
  weights = np.zeros((b, h, t, t))
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        for j in range(t):
          if allowed[bi, i, j]:
            weights[bi, hi, i, j] = _silu(q[bi, i, hi] @ k[bi, j, hi] + bias[bi, hi, i, j]) / t
  return weights, np.einsum('bhts,bshd->bthd', weights, v)


def test_hstu_attention_is_pointwise_silu_without_softmax():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 6, 2, 4)) for _ in range(3))
  bias = rng.normal(size=(2, 2, 6, 6))
  mask = np.ones((2, 6), bool)
  mask[0, :2] = False
  allowed = np.asarray(layers.item_causal_mask(jnp.asarray(mask)))
  w_ref, out_ref = _hstu_ref(q, k, v, bias, allowed)
  f32 = lambda *a: tuple(jnp.asarray(x, jnp.float32) for x in a)
  weights = jit(baselines.hstu_attention_weights)(*f32(q, k, bias), allowed)
  out = jit(baselines.hstu_attention)(*f32(q, k, v, bias), allowed)
  np.testing.assert_allclose(weights, w_ref, atol=1e-5)
  np.testing.assert_allclose(out, out_ref, atol=1e-5)
  assert np.max(np.abs(np.asarray(weights).sum(-1) - 1.0)) > 0.1


def test_hstu_relative_bias_reference():
  layer = _model('hstu').hstu_layers[0]
  pos, time = np.asarray(layer.position_bias[...]), np.asarray(layer.time_bias[...])
  ts = _batch(w=T)['timestamps']
  got = np.asarray(layer.relative_bias(jnp.asarray(ts)))
  for b in range(B):
    for i in range(T):
      for j in range(i + 1):
        gap = max(abs(int(ts[b, i]) - int(ts[b, j])), 1)
        bucket = min(max(int(np.floor(np.log(gap) / 0.301)), 0), time.shape[0] - 1)
        np.testing.assert_allclose(got[b, :, i, j], pos[i - j] + time[bucket], atol=1e-6)


# ---- losses against NumPy loops -----------------------------------------------------------------

def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _loss_inputs(seed=0, b=3, t=4, n_step=2):
  """Few distinct items (many accidental hits), left padding and a hole."""
  rng = np.random.default_rng(seed)
  w = t + n_step
  items = rng.integers(1, 4, (b, w)).astype(np.int32)
  mask = np.ones((b, w), bool)
  mask[0, :3] = False
  mask[1, 4] = False
  items = np.where(mask, items, 0)
  return _unit(rng, b, t, 6), _unit(rng, b, w, 6), items, mask


def _nll_ref(q, pos_vec, pos_item, cands, tau):
  logits = [q @ pos_vec / tau] + [q @ v / tau for v, item in cands if item != pos_item]
  return np.logaddexp.reduce(logits) - logits[0]


def _pairs_ref(q, v, items, mask, offsets, tau):
  b, t, _ = q.shape
  cands = [(v[c, w], items[c, w]) for c in range(b) for w in range(1, v.shape[1]) if mask[c, w]]
  terms = [_nll_ref(q[i, s], v[i, s + j], items[i, s + j], cands, tau)
           for i in range(b) for s in range(t) for j in offsets if mask[i, s] and mask[i, s + j]]
  return np.mean(terms) if terms else 0.0


def _both(fn, *args, **static):
  """fn(*args) without and with jit (static keyword arguments); asserts they agree."""
  eager = fn(*args, **static)
  jitted = jit(functools.partial(fn, **static))(*args)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5)
  return float(eager)


@pytest.mark.parametrize('seed', (0, 1))
def test_sampled_softmax_loss_reference(seed):
  q, v, items, mask = _loss_inputs(seed)
  got = _both(bl.sampled_softmax_loss, q, v, items, mask, tau=0.1)
  np.testing.assert_allclose(got, _pairs_ref(q, v, items, mask, (1,), 0.1), rtol=1e-5)


@pytest.mark.parametrize('seed', (0, 1))
def test_dense_all_action_loss_reference(seed):
  q, v, items, mask = _loss_inputs(seed, n_step=3)
  got = _both(bl.dense_all_action_loss, q, v, items, mask, n_step=3, tau=0.1)
  np.testing.assert_allclose(got, _pairs_ref(q, v, items, mask, (1, 2, 3), 0.1), rtol=1e-5)
  only_next = _pairs_ref(q, v, items, mask, (1,), 0.1)
  assert abs(got - only_next) > 1e-3  # the later offsets count


@pytest.mark.parametrize('eps', (0.0, 0.1, 0.5))
def test_cloze_loss_reference(eps):
  """The full softmax over the corpus; with label smoothing eps the target is (1 - eps) on the
  item and eps / n over the corpus: -sum_c y_c log p_c."""
  rng = np.random.default_rng(3)
  q, corpus = _unit(rng, 2, 5, 6), _unit(rng, N_ITEMS + 1, 6)
  items = rng.integers(1, N_ITEMS + 1, (2, 5)).astype(np.int32)
  cloze = rng.random((2, 5)) < 0.5
  terms = []
  for b, t in zip(*np.nonzero(cloze)):
    logits = corpus[1:] @ q[b, t] / 0.2
    y = np.full(N_ITEMS, eps / N_ITEMS)
    y[items[b, t] - 1] += 1.0 - eps
    terms.append(-np.sum(y * (logits - np.logaddexp.reduce(logits))))
  got = _both(bl.cloze_loss, q, corpus, items, cloze, tau=0.2, label_smoothing=eps)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_masked_sampled_softmax_loss_reference():
  q, v, items, mask = _loss_inputs(4, t=6, n_step=0)
  cloze = mask & (np.random.default_rng(5).random(mask.shape) < 0.5)
  cands = [(v[c, w], items[c, w]) for c in range(3) for w in range(6) if mask[c, w]]
  ref = np.mean([_nll_ref(q[b, t], v[b, t], items[b, t], cands, 0.1)
                 for b, t in zip(*np.nonzero(cloze))])
  got = _both(bl.masked_sampled_softmax_loss, q, v, items, mask, cloze, tau=0.1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_losses_with_nothing_counted_are_zero_with_finite_gradients():
  q, v, items, mask = _loss_inputs(0)
  mask[:] = False
  for fn in (lambda q: bl.sampled_softmax_loss(q, v, items, mask, 0.1),
             lambda q: bl.dense_all_action_loss(q, v, items, mask, 2, 0.1)):
    loss, grad = jit(jax.value_and_grad(fn))(jnp.asarray(q, jnp.float32))
    assert float(loss) == 0.0
    chex.assert_tree_all_finite(grad)


# ---- BERT4Rec's Cloze masking and inference -----------------------------------------------------

def _cloze_masks(model, batch, n):
  """`n` successive forwards' cloze masks, the model state carried between them (as the
  trainer carries it)."""
  graphdef, state = nnx.split(model)

  @jit
  def cloze(state, batch):
    m = nnx.merge(graphdef, state)
    return m.forward(batch)['cloze_mask'], nnx.state(m)

  masks = []
  for _ in range(n):
    mask, state = cloze(state, batch)
    masks.append(np.asarray(mask))
  return masks


def test_cloze_masks_real_positions_only_and_advances():
  model = _model('bert4rec', train=True)
  batch = _batch(b=64, w=T, seed=7)
  first, second = _cloze_masks(model, batch, 2)
  real = batch['mask'][:, -T:]
  assert not np.any(first & ~real)
  assert 0.1 < first.sum() / real.sum() < 0.3  # CLOZE_PROB = 0.2
  assert np.any(first != second)  # the stream advanced
  model.eval()
  assert not np.any(_cloze_masks(model, batch, 1)[0])


def test_bert4rec_user_vector_shifts_and_reads_mask():
  """The oldest event is shifted out; the output at the appended [MASK] is read."""
  model = _model('bert4rec')
  items, tokens, ts, mask = _user_args(_batch())
  oldest, newest = items.copy(), items.copy()
  oldest[:, 0] = oldest[:, 0] % N_ITEMS + 1
  newest[:, -1] = newest[:, -1] % N_ITEMS + 1
  users = jit(jax.vmap(lambda m, i: m.user_vector(i, tokens, ts, mask), (None, 0)))(
      model, np.stack([items, oldest, newest]))
  np.testing.assert_allclose(users[1], users[0], atol=1e-6)
  assert np.all(np.abs(np.asarray(users[2] - users[0])).max(-1) > 1e-4)
  shifted = np.concatenate([items[:, 1:], np.full((B, 1), N_ITEMS + 1, np.int32)], 1)
  smask = np.concatenate([mask[:, 1:], np.ones((B, 1), bool)], 1)
  outputs = jit(lambda m: m.user_outputs(shifted, None, ts, smask))(model)
  np.testing.assert_allclose(users[0], layers.l2_normalize(outputs[:, -1]), atol=1e-6)


# ---- a few optimiser steps ----------------------------------------------------------------------

def _train_step(graphdef, name, cfg):
  @jit
  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss_fn = lambda m: _loss_fn(name, cfg)(m, batch, jax.random.key(0))
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss
  return step


@pytest.mark.parametrize('name', NAMES)
def test_optimizer_steps_lower_the_loss(name):
  model = _model(name, dropout=0.1, train=True)
  cfg = LossConfig(n_step=N_STEP, tau=0.1)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)))
  step = _train_step(graphdef, name, cfg)
  batch = jax.tree.map(jnp.asarray, _batch(b=8, w=T + model.horizon, seed=3))
  losses = []
  for _ in range(60):
    state, loss = step(state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  if name == 'bert4rec':  # the Cloze stream advanced in the train state
    assert int(nnx.merge(graphdef, state)[0].cloze_rngs.count[...]) == 60
