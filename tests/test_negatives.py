"""Every negative source and the log-Q correction against slow NumPy references: the sampled
candidate sets, the LMP loss over shared candidates (batch and catalogue parts, token level),
and `losses.make`'s next-item softmax (RecBole's cross-entropy over all items)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from heterrec_jax import lmp, losses, negatives as negatives_lib, sharding, softmax
from heterrec_jax.config import Config, ConfigError, LossConfig, MeshConfig, ModelConfig

B, T, N, D, DF, N_ITEMS = 3, 5, 2, 6, 4, 9
W = T + N
COLUMNS = (('cat', 1, 1, 1),)
rng0 = np.random.default_rng(0)
# Item -> [item_id, cat]; rows 1..N_ITEMS, row 0 the padding item.
ITEM_TOKENS = np.concatenate([[[0, 0]], np.stack([np.arange(1, N_ITEMS + 1),
                                                  rng0.integers(2, 5, N_ITEMS)], 1)]).astype(np.int32)


def _example(seed):
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[W], rng.integers(2, W, B - 1)])
  mask = np.arange(W)[None] >= (W - lengths)[:, None]
  items = np.where(mask, rng.integers(1, N_ITEMS + 1, (B, W)), 0).astype(np.int32)
  unit = lambda *shape: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=shape)).astype(np.float32)
  outputs = {'queries': unit(N, B, T, D), 'targets': unit(B, W, D),
             'token_queries': unit(N, 1, B, T, DF), 'token_targets': unit(1, B, W, DF)}
  batch = {'items': items, 'tokens': ITEM_TOKENS[items], 'mask': mask}
  catalogue = {'vectors': unit(N_ITEMS, D), 'slots': unit(N_ITEMS, 2, DF)}
  # As in a model: a target is the item tower's vector of its item (the catalogue's row).
  real = mask[..., None]
  outputs['targets'] = np.where(real, catalogue['vectors'][items - 1], outputs['targets'])
  outputs['token_targets'] = np.where(real, catalogue['slots'][items - 1, 1],
                                      outputs['token_targets'][0])[None]
  return outputs, batch, catalogue


def _ref_level(q, tgt, keys, mask, cfg, cands, pos_lq=None, eps=0.0):
  """Step losses of one level; `cands` = [(vector, keys tuple, log_q)] shared by every query;
  `keys[j][b, w]` the positive's keys. Same-key candidates are masked (accidental hits). With
  label smoothing `eps` (whole catalogue: `cands` are its items), the positive's logit in the
  numerator is (1 - eps) s+ + eps mean_c s_c."""
  e = lambda s: math.exp(s)
  out = []
  for i in range(1, N + 1):
    total, counted = 0.0, 0
    for b in range(B):
      for t in range(T):
        if not (mask[b, t] and mask[b, t + i]):
          continue
        sp = q[i - 1, b, t] @ tgt[b, t + i] / cfg.tau - (pos_lq[b, t + i] if pos_lq is not None else 0)
        if cfg.gate and i > 1:
          prev = q[i - 2, b, t] @ tgt[b, t + i - 1] / cfg.tau
          now = q[i - 1, b, t] @ tgt[b, t + i] / cfg.tau
          if not e(prev) > e(now) + cfg.lambda_m:
            continue
        den = cfg.null_logit_c + e(sp)
        for vec, ckeys, lq in cands:
          if any(np.array_equal(np.atleast_1d(ck), np.atleast_1d(k[b, t + i]))
                 for ck, k in zip(ckeys, keys)):
            continue
          den += e(q[i - 1, b, t] @ vec / cfg.tau - lq)
        if eps:
          mean = np.mean([q[i - 1, b, t] @ vec / cfg.tau for vec, _, _ in cands])
          sp = (1 - eps) * sp + eps * mean
        total += math.log(den) - sp
        counted += 1
    out.append(total / counted if counted else 0.0)
  return out


def _ref_candidates(outputs, batch, catalogue, negatives, level):
  """The explicit candidate list of a `Negatives` at one level (-1: items, s: token kind s)."""
  items, tokens, mask = batch['items'], batch['tokens'], batch['mask']
  freq = None if negatives.log_freq is None else np.exp(np.asarray(negatives.log_freq))
  n_batch = 0 if negatives.index is None else int(np.sum(np.asarray(negatives.index_ok)))

  def log_q(item):
    if freq is None:
      return 0.0
    return math.log(freq[item] * n_batch + negatives.n_uniform / max(negatives.n_items, 1))

  out = []
  if negatives.index is not None:
    for m, ok in zip(np.asarray(negatives.index), np.asarray(negatives.index_ok)):
      c, v = divmod(int(m), W)
      if not ok:
        continue
      vec = outputs['targets'][c, v] if level < 0 else outputs['token_targets'][level, c, v]
      keys = (items[c, v],) if level < 0 else (items[c, v], tokens[c, v, 1:2])
      out.append((vec, keys, log_q(items[c, v]) if level < 0 else 0.0))
  if negatives.items is not None:
    for item in np.asarray(negatives.items):
      vec = catalogue['vectors'][item - 1] if level < 0 else catalogue['slots'][item - 1, 1]
      keys = (item,) if level < 0 else (item, ITEM_TOKENS[item, 1:2])
      out.append((vec, keys, log_q(item) if level < 0 else 0.0))
  return out


def _lmp_ref(outputs, batch, catalogue, negatives, cfg):
  items, tokens, mask = batch['items'], batch['tokens'], batch['mask']
  freq = None if negatives.log_freq is None else np.exp(np.asarray(negatives.log_freq))
  pos_lq = None
  if freq is not None:
    n_batch = int(np.sum(np.asarray(negatives.index_ok)))
    pos_lq = np.log(freq[items] * n_batch + negatives.n_uniform / max(negatives.n_items, 1))
  item = _ref_level(outputs['queries'], outputs['targets'], (items,), mask, cfg,
                    _ref_candidates(outputs, batch, catalogue, negatives, -1), pos_lq)
  token = _ref_level(outputs['token_queries'][:, 0], outputs['token_targets'][0],
                     (items, tokens[..., 1:2]), mask, cfg,
                     _ref_candidates(outputs, batch, catalogue, negatives, 0))
  return sum(item) + cfg.w_tok * sum(token)


def _log_freq(seed=0):
  p = np.random.default_rng(seed).dirichlet(np.ones(N_ITEMS))
  return np.log(np.concatenate([[1e-9], p])).astype(np.float32)


@pytest.mark.parametrize('source,log_q', [('all', False), ('uniform', False),
                                          ('in_batch', False), ('mixed', False),
                                          ('in_batch', True), ('mixed', True),
                                          ('batch_pool', False)])
def test_lmp_over_every_source_matches_reference(source, log_q):
  outputs, batch, catalogue = _example(1)
  cfg = LossConfig(negatives=source, log_q=log_q, n_uniform=6, pool_size=8, tau=0.2, n_step=N,
                   w_tok=0.5, lambda_m=0.5)
  negatives = negatives_lib.sample(cfg, jnp.asarray(batch['mask']), N_ITEMS, jax.random.key(2),
                                   jnp.asarray(_log_freq()))
  cat = None
  if negatives.items is not None:
    idx = np.asarray(negatives.items) - 1
    cat = {'vectors': catalogue['vectors'][idx], 'slots': catalogue['slots'][idx],
           'tokens': ITEM_TOKENS[np.asarray(negatives.items)]}
  loss, aux = jax.jit(lambda o, b, c: lmp.lmp_loss(o, b, COLUMNS[:1], cfg, negatives, c))(
      outputs, batch, cat)
  want = _lmp_ref(outputs, batch, catalogue, negatives, cfg)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  assert 0.0 <= float(aux['gate_fraction_step2']) <= 1.0


def test_sources_draw_the_documented_candidates():
  mask = jnp.asarray(_example(3)[1]['mask'])
  cfg = LossConfig(n_uniform=50)
  all_ = negatives_lib.sample(LossConfig(negatives='all'), mask, N_ITEMS, jax.random.key(0))
  np.testing.assert_array_equal(all_.items, np.arange(1, N_ITEMS + 1))
  assert all_.index is None
  uni = negatives_lib.sample(LossConfig(negatives='uniform', n_uniform=50), mask, N_ITEMS,
                             jax.random.key(0))
  drawn = np.asarray(uni.items)
  assert drawn.shape == (50,) and drawn.min() >= 1 and drawn.max() <= N_ITEMS
  assert len(set(drawn.tolist())) > 5  # not one item repeated
  inb = negatives_lib.sample(LossConfig(negatives='in_batch'), mask, N_ITEMS, jax.random.key(0))
  want = np.array([bool(mask[b, w]) and w >= 1 for b in range(B) for w in range(W)])
  np.testing.assert_array_equal(np.asarray(inb.index_ok), want)
  np.testing.assert_array_equal(np.asarray(inb.index), np.arange(B * W))
  mixed = negatives_lib.sample(LossConfig(negatives='mixed', n_uniform=50), mask, N_ITEMS,
                               jax.random.key(0))
  assert mixed.items.shape == (50,) and mixed.index.shape == (B * W,)
  assert negatives_lib.sample(LossConfig(negatives='same_position'), mask, N_ITEMS,
                              jax.random.key(0)) is None
  del cfg


def test_log_expected_count_matches_numpy():
  mask = jnp.asarray(_example(4)[1]['mask'])
  log_freq = _log_freq(1)
  cfg = LossConfig(negatives='mixed', n_uniform=7, log_q=True)
  neg = negatives_lib.sample(cfg, mask, N_ITEMS, jax.random.key(0), jnp.asarray(log_freq))
  n_batch = int(np.sum([bool(mask[b, w]) and w >= 1 for b in range(B) for w in range(W)]))
  items = np.arange(1, N_ITEMS + 1)
  want = np.log(np.exp(log_freq[items]) * n_batch + 7 / N_ITEMS)
  np.testing.assert_allclose(neg.log_expected(jnp.asarray(items)), want, rtol=1e-5)


def test_training_log_freq():
  items = np.array([1, 1, 2, 3, 3, 3, 4])
  train = np.array([1, 1, 1, 1, 1, 0, 0], bool)
  got = negatives_lib.training_log_freq(items, train, 5)
  counts = np.array([1, 2, 1, 2, 1, 1], float)  # unseen items (0, 4, 5) count as one event
  np.testing.assert_allclose(np.exp(got[1:]), counts[1:] / counts[1:].sum(), rtol=1e-6)


@pytest.mark.parametrize('source', ['all', 'uniform', 'same_position', 'batch_pool'])
def test_log_q_needs_an_in_batch_source(source):
  with pytest.raises(ConfigError, match='log_q'):
    LossConfig(negatives=source, log_q=True)


class _TableModel:
  """A stand-in model: fixed user outputs, item vectors = rows of a table (raw, 'dot')."""

  def __init__(self, queries, table):
    self.queries, self.table, self.token_kinds = queries, table, ()

  def forward(self, batch):
    return {'queries': self.queries, 'targets': self.table[batch['items']]}

  def encode_items(self, items, tokens):
    del tokens
    return self.table[items], None


def _table_loss(seed, model_name, loss_cfg, t):
  """`losses.make`'s loss of `model_name` on a stand-in model with random queries `[B, t, D]`
  and a random item table; returns (loss, queries, table, batch)."""
  rng = np.random.default_rng(seed)
  _, batch, _ = _example(seed)
  queries = rng.normal(size=(B, t, D)).astype(np.float32)
  table = rng.normal(size=(N_ITEMS + 1, D)).astype(np.float32)
  cfg = Config(model=ModelConfig(name=model_name), loss=loss_cfg)
  got, _ = losses.make(cfg, None, ITEM_TOKENS)(
      _TableModel(jnp.asarray(queries), jnp.asarray(table)), batch, jax.random.key(0))
  return float(got), queries, table, batch


def test_next_item_all_is_full_cross_entropy():
  """SASRec under 'all' + dot: mean over (b, t) of -log softmax over items 1..N of <q, E>."""
  t = W - 1
  got, queries, table, batch = _table_loss(
      5, 'sasrec', LossConfig(negatives='all', scoring='dot', tau=1.0), t)
  total, count = 0.0, 0
  for b in range(B):
    for i in range(t):
      if batch['mask'][b, i] and batch['mask'][b, i + 1]:
        logits = table[1:] @ queries[b, i]
        target = batch['items'][b, i + 1]
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target - 1]
        count += 1
  np.testing.assert_allclose(got, total / count, rtol=1e-5)


@pytest.mark.parametrize('eps', (0.1, 0.3))
def test_next_item_all_with_label_smoothing_matches_numpy(eps):
  """loss.label_smoothing: the target is (1 - eps) on the next item and eps / n on every
  item, -sum_c y_c log softmax_c(<q, E_c>), against a NumPy loop; its gradient w.r.t. the
  table against the autodiff of that dense form."""
  t = W - 1
  cfg = LossConfig(negatives='all', scoring='dot', tau=1.0, label_smoothing=eps)
  got, queries, table, batch = _table_loss(6, 'sasrec', cfg, t)
  total, count = 0.0, 0
  for b in range(B):
    for i in range(t):
      if batch['mask'][b, i] and batch['mask'][b, i + 1]:
        logits = table[1:] @ queries[b, i]
        log_p = logits - np.logaddexp.reduce(logits)
        y = np.full(N_ITEMS, eps / N_ITEMS)
        y[batch['items'][b, i + 1] - 1] += 1.0 - eps
        total += -np.sum(y * log_p)
        count += 1
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  plain, *_ = _table_loss(6, 'sasrec', LossConfig(negatives='all', scoring='dot', tau=1.0), t)
  assert abs(got - plain) > 1e-3  # the smoothing term counts

  full = losses.make(Config(model=ModelConfig(name='sasrec'), loss=cfg), None, ITEM_TOKENS)
  q = jnp.asarray(queries)
  grad = jax.grad(lambda tab: full(_TableModel(q, tab), batch, jax.random.key(0))[0])(
      jnp.asarray(table))

  def dense(tab):
    log_p = jax.nn.log_softmax(jnp.einsum('btd,nd->btn', q, tab[1:]), axis=-1)
    onehot = jax.nn.one_hot(jnp.asarray(batch['items'])[:, 1:t + 1] - 1, N_ITEMS)
    y = (1.0 - eps) * onehot + eps / N_ITEMS
    counted = jnp.asarray(batch['mask'][:, :t] & batch['mask'][:, 1:t + 1])
    return jnp.sum(jnp.where(counted, -jnp.sum(y * log_p, -1), 0.0)) / jnp.sum(counted)
  np.testing.assert_allclose(grad, jax.grad(dense)(jnp.asarray(table)), rtol=1e-4, atol=1e-6)


def test_lmp_all_with_label_smoothing_matches_reference():
  """HeterRec's LMP over the whole catalogue (cosine, tau, null logit, gate) with
  label_smoothing: each counted item-level term is log(den) - (1 - eps) s+ - eps mean_c s_c;
  the token level is not smoothed."""
  eps = 0.2
  outputs, batch, catalogue = _example(12)
  cfg = LossConfig(negatives='all', tau=0.2, n_step=N, w_tok=0.5, lambda_m=0.5,
                   label_smoothing=eps)
  negatives = negatives_lib.sample(cfg, jnp.asarray(batch['mask']), N_ITEMS, jax.random.key(0))
  cat = {'vectors': catalogue['vectors'], 'slots': catalogue['slots'], 'tokens': ITEM_TOKENS[1:]}
  loss, _ = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, negatives, cat)
  q, tgt, mask = outputs['queries'], outputs['targets'], batch['mask']
  plain_cfg = LossConfig(negatives='all', tau=0.2, n_step=N, w_tok=0.5, lambda_m=0.5)
  cands = _ref_candidates(outputs, batch, catalogue, negatives, -1)
  item = _ref_level(q, tgt, (batch['items'],), mask, plain_cfg, cands, eps=eps)
  token_only = (_lmp_ref(outputs, batch, catalogue, negatives, plain_cfg)
                - sum(_ref_level(q, tgt, (batch['items'],), mask, plain_cfg, cands)))
  np.testing.assert_allclose(float(loss), sum(item) + token_only, rtol=2e-5)
  # The token level over the whole catalogue in chunks (per-item vocabulary): unsmoothed too.
  vocab = (lmp.token_vocab(ITEM_TOKENS, 1, 1, reads_items=True),)
  chunked, _ = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, negatives, cat, token_vocab=vocab)
  np.testing.assert_allclose(float(chunked), sum(item) + token_only, rtol=2e-5)


def test_next_item_in_batch_equals_the_in_batch_softmax():
  """The factory's in-batch next-item loss equals `softmax.sampled_softmax_loss` (itself
  tested against NumPy in test_baselines.py)."""
  got, q, table, batch = _table_loss(6, 'hstu', LossConfig(negatives='in_batch', tau=0.5), W - 1)
  want = softmax.sampled_softmax_loss(q, table[batch['items']], batch['items'], batch['mask'],
                                      0.5)
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_pinnerformer_in_batch_equals_the_dense_all_action_loss():
  """PinnerFormer's pooled multi-step loss (in-batch) equals `softmax.dense_all_action_loss`
  (itself tested against NumPy in test_baselines.py)."""
  got, q, table, batch = _table_loss(
      11, 'pinnerformer', LossConfig(negatives='in_batch', tau=0.5, n_step=N), T)
  want = softmax.dense_all_action_loss(q, table[batch['items']], batch['items'], batch['mask'],
                                       N, 0.5)
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_token_level_draws_its_own_source():
  """token_draw replaces the token level's candidates only: the item level is unchanged and
  the token level equals a run whose only source is the token source."""
  outputs, batch, catalogue = _example(7)
  cfg = LossConfig(negatives='all', tau=0.2, n_step=N, w_tok=1.0)
  tok_cfg = LossConfig(negatives='in_batch', tau=0.2, n_step=N, w_tok=1.0)
  mask = jnp.asarray(batch['mask'])
  item_neg = negatives_lib.sample(cfg, mask, N_ITEMS, jax.random.key(0))
  tok_neg = negatives_lib.sample(tok_cfg, mask, N_ITEMS, jax.random.key(0))
  cat = {'vectors': catalogue['vectors'], 'slots': catalogue['slots'], 'tokens': ITEM_TOKENS[1:]}
  _, mixed = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, item_neg, cat, (tok_neg, None))
  _, item_only = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, item_neg, cat)
  _, token_only = lmp.lmp_loss(outputs, batch, COLUMNS, tok_cfg, tok_neg, None)
  np.testing.assert_allclose(mixed['item_loss'], item_only['item_loss'], rtol=1e-6)
  np.testing.assert_allclose(mixed['token_loss'], token_only['token_loss'], rtol=1e-6)
  assert abs(float(mixed['token_loss'] - item_only['token_loss'])) > 1e-3


def test_count_from_leaves_a_window_s_context_uncounted():
  """Queries before `count_from` are context only: the loss equals the reference computed
  with those queries' input positions treated as not counted."""
  outputs, batch, catalogue = _example(8)
  outputs = {**outputs, 'token_queries': outputs['token_queries'][:, :0],
             'token_targets': outputs['token_targets'][:0]}
  cfg = LossConfig(negatives='in_batch', tau=0.2, n_step=N, w_tok=0.0, gate=False)
  negatives = negatives_lib.sample(cfg, jnp.asarray(batch['mask']), N_ITEMS, jax.random.key(0))
  count_from = np.array([2, 0, 4], np.int32)
  got, _ = lmp.lmp_loss(outputs, {**batch, 'count_from': count_from}, (), cfg, negatives)
  # Reference: the same loss, each query counted only from its row's count_from.
  cands = _ref_candidates(outputs, batch, catalogue, negatives, -1)
  q = outputs['queries'].copy()
  total = 0.0
  for i in range(1, N + 1):
    step, count = 0.0, 0
    for b in range(B):
      for t in range(count_from[b], T):
        if not (batch['mask'][b, t] and batch['mask'][b, t + i]):
          continue
        sp = q[i - 1, b, t] @ outputs['targets'][b, t + i] / cfg.tau
        den = cfg.null_logit_c + math.exp(sp) + sum(
            math.exp(q[i - 1, b, t] @ v / cfg.tau) for v, k, _ in cands
            if k[0] != batch['items'][b, t + i])
        step += math.log(den) - sp
        count += 1
    total += step / count
  np.testing.assert_allclose(float(got), total, rtol=2e-5)
  none, _ = lmp.lmp_loss(outputs, {**batch, 'count_from': np.full(B, T, np.int32)}, (), cfg,
                         negatives)
  assert float(none) == 0.0


@pytest.mark.parametrize('rows', [1, 4, 9, 100])
def test_catalogue_logsumexp_in_chunks_equals_the_full_one(rows):
  """Forward and gradients (queries and item vectors) equal the one-pass logsumexp, for chunk
  sizes that divide the catalogue, do not, and exceed it."""
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.normal(size=(N, B, T, D)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(N_ITEMS, D)), jnp.float32)
  full = lambda q, v: jax.nn.logsumexp(jnp.einsum('nbtd,cd->nbtc', q, v) / 0.3, -1)
  chunked = lambda q, v: lmp.catalogue_logsumexp(q, v, 0.3, rows)
  np.testing.assert_allclose(chunked(q, v), full(q, v), rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.normal(size=(N, B, T)), jnp.float32)
  grads = lambda f: jax.grad(lambda q, v: jnp.sum(f(q, v) * weights), argnums=(0, 1))(q, v)
  for got, want in zip(grads(chunked), grads(full)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_catalogue_logsumexp_on_8_devices_equals_the_full_one():
  """Queries sharded over the trainer's 8-device data axis: forward and both gradients equal
  the one-device one-pass logsumexp (the item vectors' gradient is summed over devices)."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(10)
  q = jnp.asarray(rng.normal(size=(N, 8, T, D)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(N_ITEMS, D)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(N, 8, T)), jnp.float32)
  full = lambda q, v: jax.nn.logsumexp(jnp.einsum('nbtd,cd->nbtc', q, v) / 0.3, -1)
  chunked = lambda q, v: lmp.catalogue_logsumexp(q, v, 0.3, 4)
  value_and_grads = lambda f, q, v, w: jax.jit(jax.value_and_grad(
      lambda q, v: jnp.sum(f(q, v) * w), argnums=(0, 1)))(q, v)
  mesh = sharding.make_mesh(MeshConfig(data=8, model=1))
  steps_first = NamedSharding(mesh, P(None, 'data'))
  got = value_and_grads(chunked, jax.device_put(q, steps_first),
                        jax.device_put(v, NamedSharding(mesh, P())),
                        jax.device_put(weights, steps_first))
  assert len(got[1][0].sharding.device_set) == 8
  want = value_and_grads(full, q, v, weights)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_catalogue_logsumexp_keeps_a_sharded_batch_sharded():
  """With N = 2 steps and the batch sharded over 8 devices, the compiled forward and backward
  gather nothing: each device reduces the catalogue for its own queries (flattening `[N, B, T]`
  step-major gathered the whole batch onto every device and repeated the softmax there)."""
  q = jnp.zeros((N, 8, T, D), jnp.float32)
  v = jnp.zeros((N_ITEMS, D), jnp.float32)
  mesh = sharding.make_mesh(MeshConfig(data=8, model=1))
  steps_first = NamedSharding(mesh, P(None, 'data'))
  step = jax.jit(jax.value_and_grad(
      lambda q, v: jnp.sum(lmp.catalogue_logsumexp(q, v, 0.3, 4)), argnums=(0, 1)))
  hlo = step.lower(jax.device_put(q, steps_first),
                   jax.device_put(v, NamedSharding(mesh, P()))).compile().as_text()
  assert N > 1
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo
  lse = jax.jit(lambda q, v: lmp.catalogue_logsumexp(q, v, 0.3, 4))(
      jax.device_put(q, steps_first), v)
  assert lse.sharding.is_equivalent_to(steps_first, lse.ndim)


def test_catalogue_logsumexp_never_holds_the_whole_logits_matrix():
  """Forward and backward in chunks of 64 rows of a 4,096-row catalogue hold less than ONE
  `[queries, catalogue]` float32 logits matrix in temporaries (the one-pass form holds more)."""
  q, v = jnp.zeros((1, 8, 64, 16)), jnp.zeros((4096, 16))
  logits_bytes = 4 * 8 * 64 * 4096

  def temp_bytes(rows):
    loss = lambda q, v: jnp.sum(lmp.catalogue_logsumexp(q, v, 1.0, rows))
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return step.lower(q, v).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(4096) >= logits_bytes
  assert temp_bytes(64) < logits_bytes / 4


def test_all_source_in_chunks_matches_reference(monkeypatch):
  """The LMP loss over the whole catalogue reduced 2 rows at a time equals the reference."""
  real = lmp.catalogue_logsumexp
  monkeypatch.setattr(lmp, 'catalogue_logsumexp', lambda q, v, tau, rows: real(q, v, tau, 2))
  outputs, batch, catalogue = _example(10)
  cfg = LossConfig(negatives='all', tau=0.2, n_step=N, w_tok=0.5, lambda_m=0.5)
  negatives = negatives_lib.sample(cfg, jnp.asarray(batch['mask']), N_ITEMS, jax.random.key(0))
  cat = {'vectors': catalogue['vectors'], 'slots': catalogue['slots'], 'tokens': ITEM_TOKENS[1:]}
  loss, _ = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, negatives, cat)
  np.testing.assert_allclose(float(loss), _lmp_ref(outputs, batch, catalogue, negatives, cfg),
                             rtol=2e-5)


def _dense_excluding_lse(q, v, log_w, key, query_key, tau):
  """The one-pass form of `catalogue_logsumexp` with weights and keys (autodiff reference)."""
  logits = jnp.einsum('nbtd,cd->nbtc', q, v) / tau + log_w
  return jax.nn.logsumexp(jnp.where(key != query_key[..., None], logits, -jnp.inf), axis=-1)


@pytest.mark.parametrize('rows', [1, 4, 9, 100])
def test_catalogue_logsumexp_with_weights_and_keys_matches_numpy(rows):
  """Weighted, with each query's own key skipped: forward against a NumPy loop, gradients
  (queries and vectors) against autodiff of the one-pass form, for chunk sizes that divide
  the candidates, do not, and exceed them."""
  rng = np.random.default_rng(12)
  q = rng.normal(size=(N, B, T, D)).astype(np.float32)
  v = rng.normal(size=(N_ITEMS, D)).astype(np.float32)
  log_w = np.log(rng.integers(1, 5, N_ITEMS)).astype(np.float32)
  key = rng.integers(0, 4, N_ITEMS).astype(np.int32)
  query_key = rng.integers(0, 5, (N, B, T)).astype(np.int32)
  want = np.zeros((N, B, T))
  for idx in np.ndindex(N, B, T):
    terms = [q[idx] @ v[c] / 0.3 + log_w[c] for c in range(N_ITEMS) if key[c] != query_key[idx]]
    want[idx] = np.log(np.sum(np.exp(terms)))
  chunked = lambda q, v: lmp.catalogue_logsumexp(q, v, 0.3, rows, jnp.asarray(log_w),
                                                 jnp.asarray(key), jnp.asarray(query_key))
  np.testing.assert_allclose(chunked(q, v), want, rtol=1e-5, atol=1e-5)
  dense = lambda q, v: _dense_excluding_lse(q, v, log_w, key, query_key, 0.3)
  weights = jnp.asarray(rng.normal(size=(N, B, T)), jnp.float32)
  grads = lambda f: jax.grad(lambda q, v: jnp.sum(f(q, v) * weights), argnums=(0, 1))(q, v)
  for got, want_grad in zip(grads(chunked), grads(dense)):
    np.testing.assert_allclose(got, want_grad, rtol=1e-5, atol=1e-5)


def test_catalogue_logsumexp_with_every_candidate_skipped_is_minus_infinity():
  """A query whose key every candidate carries: -inf, and a zero (not NaN) gradient."""
  q, v = jnp.ones((1, 1, 2, D)), jnp.ones((3, D))
  key, query_key = jnp.zeros(3, jnp.int32), jnp.array([[[0, 1]]], jnp.int32)
  f = lambda q, v: lmp.catalogue_logsumexp(q, v, 1.0, 2, jnp.zeros(3), key, query_key)
  out = f(q, v)
  assert np.isneginf(out[0, 0, 0]) and np.isfinite(out[0, 0, 1])
  dq, dv = jax.grad(lambda q, v: jnp.sum(jnp.logaddexp(f(q, v), 0.0)), argnums=(0, 1))(q, v)
  assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dv))
  np.testing.assert_array_equal(dq[0, 0, 0], 0.0)


def test_token_vocab_counts_each_distinct_token_once():
  """Distinct sub-id tuples of the kind's columns (multi-column tuples compared whole), one
  representative row each, their counts, every item's token index (-1 for the padding row);
  a kind that reads the item keeps every item as its own candidate."""
  table = np.array([[0, 0, 0], [1, 3, 4], [2, 3, 4], [3, 4, 3], [4, 3, 4], [5, 0, 0]], np.int32)
  vocab = lmp.token_vocab(table, 1, 2)
  tuples = [tuple(table[1 + int(r), 1:]) for r in vocab.rows]
  assert sorted(tuples) == [(0, 0), (3, 4), (4, 3)]
  counts = {t: int(round(float(np.exp(c)))) for t, c in zip(tuples, vocab.log_count)}
  assert counts == {(3, 4): 3, (4, 3): 1, (0, 0): 1}
  for item in range(1, 6):
    k = int(vocab.key_of_item[item])
    assert tuples[list(np.asarray(vocab.key)).index(k)] == tuple(table[item, 1:])
  assert int(vocab.key_of_item[0]) == -1
  own = lmp.token_vocab(table, 1, 2, reads_items=True)
  np.testing.assert_array_equal(own.rows, np.arange(5))
  np.testing.assert_array_equal(own.log_count, 0.0)
  np.testing.assert_array_equal(own.key, vocab.key_of_item[1:])


@pytest.mark.parametrize('reads_items', [False, True])
def test_token_level_over_distinct_tokens_matches_reference(monkeypatch, reads_items):
  """The 'all' token level over the distinct tokens (chunks of 2) equals the reference's
  softmax over every catalogue item with its hit mask. A kind whose vector is its token's
  (reads_items False) is deduplicated; one that reads the item keeps per-item vectors."""
  real = lmp.catalogue_logsumexp
  monkeypatch.setattr(lmp, 'catalogue_logsumexp',
                      lambda q, v, tau, rows, *a: real(q, v, tau, 2, *a))
  outputs, batch, catalogue = _example(13)
  if not reads_items:  # as in HeterRec: the kind's vector is a function of its token
    table = np.random.default_rng(3).normal(size=(8, DF)).astype(np.float32)
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    catalogue['slots'][:, 1] = table[ITEM_TOKENS[1:, 1]]
    outputs['token_targets'][0] = np.where(batch['mask'][..., None],
                                           table[ITEM_TOKENS[batch['items'], 1]],
                                           outputs['token_targets'][0])
  cfg = LossConfig(negatives='all', tau=0.2, n_step=N, w_tok=0.5, lambda_m=0.5)
  negatives = negatives_lib.sample(cfg, jnp.asarray(batch['mask']), N_ITEMS, jax.random.key(0))
  cat = {'vectors': catalogue['vectors'], 'slots': catalogue['slots'], 'tokens': ITEM_TOKENS[1:]}
  vocab = (lmp.token_vocab(ITEM_TOKENS, 1, 1, reads_items),)
  assert vocab[0].rows.shape[0] == (N_ITEMS if reads_items else len(set(ITEM_TOKENS[1:, 1])))
  loss, aux = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, negatives, cat, token_vocab=vocab)
  np.testing.assert_allclose(float(loss), _lmp_ref(outputs, batch, catalogue, negatives, cfg),
                             rtol=2e-5)
  _, dense = lmp.lmp_loss(outputs, batch, COLUMNS, cfg, negatives, cat)  # [N, B, T, C] path
  np.testing.assert_allclose(aux['token_loss'], dense['token_loss'], rtol=1e-5)


@pytest.mark.parametrize('variant', ['full', 'no_mfk'])
def test_heterrec_token_level_all_equals_the_masked_item_softmax(variant):
  """On a HeterRec (multi-valued, numerical and multimodal kinds), the factory's 'all' token
  level (over distinct tokens) has the loss and gradients of the same LMP over every
  catalogue item with the hit mask (`lmp_loss` without the vocabulary)."""
  from tests.test_model import TOKENS, _batch, _model
  model = _model(variant)
  cfg = Config(model=ModelConfig(variant=variant),
               loss=LossConfig(n_step=2, negatives='all', tau=0.5))
  batch = _batch()
  loss_fn = losses.make(cfg, model, TOKENS)
  n_items = TOKENS.shape[0] - 1

  def masked_items(model, batch, rng):
    negatives = negatives_lib.sample(cfg.loss, batch['mask'], n_items, rng)
    return lmp.lmp_loss(model.forward(batch), batch, tuple(model.token_kinds), cfg.loss,
                        negatives, losses.catalogue(model, negatives, jnp.asarray(TOKENS)))

  key = jax.random.key(0)
  grads = lambda fn: nnx.jit(nnx.value_and_grad(lambda m: fn(m, batch, key)[0]))(model)
  (got, got_g), (want, want_g) = grads(loss_fn), grads(masked_items)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_catalogue_logsumexp_needs_both_keys_or_neither():
  q, v = jnp.ones((1, 1, 2, D)), jnp.ones((3, D))
  with pytest.raises(ValueError, match='both key_C and query_key_xBxT'):
    lmp.catalogue_logsumexp(q, v, 1.0, 2, None, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match='both key_C and query_key_xBxT'):
    lmp.catalogue_logsumexp(q, v, 1.0, 2, None, None, jnp.zeros((1, 1, 2), jnp.int32))
