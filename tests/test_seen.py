"""The seen-item term (`seen.py`, `model.seen_bias`) against slow NumPy references: which inputs
count for each query and their recency buckets, the next-item and LMP losses over the whole
catalogue with the offsets (values and gradients), the evaluation's ranks, and the config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heterrec_jax import lmp, losses, negatives as negatives_lib, retrieval, seen
from heterrec_jax.config import Config, ConfigError, LossConfig, ModelConfig, apply_overrides

B, T, D, N_ITEMS = 4, 9, 5, 7  # few items: inputs repeat


def _batch(seed, w):
  """Random right-aligned windows of `w` events over few items (repeats), left padding."""
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[w], rng.integers(2, w, B - 1)])
  mask = np.arange(w)[None] >= (w - lengths)[:, None]
  items = np.where(mask, rng.integers(1, N_ITEMS + 1, (B, w)), 0).astype(np.int32)
  return items, mask


def _ref_offsets(items, mask, w_K, t):
  """{item: offset} for the query at input position t: the latest occurrence j <= t of each
  real input item, offset w[min(floor(log2(t - j + 1)), BUCKETS - 1)]."""
  out = {}
  for j in range(t + 1):
    if mask[j]:
      d = t - j + 1
      out[int(items[j])] = w_K[min(int(math.floor(math.log2(d))), seen.BUCKETS - 1)]
  return out


def test_bucket_is_floor_log2_capped():
  d = np.arange(1, 300)
  want = np.minimum(np.floor(np.log2(d)), seen.BUCKETS - 1)
  np.testing.assert_array_equal(seen.bucket(jnp.asarray(d)), want)


def test_query_history_matches_a_loop():
  items, mask = _batch(0, T)
  counted, bucket = seen.query_history(jnp.asarray(items), jnp.asarray(mask))
  for b in range(B):
    for t in range(T):
      for j in range(T):
        latest = (j <= t and mask[b, j]
                  and not any(items[b, k] == items[b, j] for k in range(j + 1, t + 1)))
        assert bool(counted[b, t, j]) == latest, (b, t, j)
        if latest:
          assert int(bucket[b, t, j]) == min(int(math.log2(t - j + 1)), seen.BUCKETS - 1)


class _SeenTableModel:
  """A stand-in model: fixed queries, item vectors = rows of a table, seen offsets w."""

  def __init__(self, queries, table, w_K):
    self.queries, self.table, self.w_K, self.token_kinds = queries, table, w_K, ()

  def forward(self, batch):
    return {'queries': self.queries, 'targets': self.table[batch['items']],
            'seen_bias': self.w_K}

  def encode_items(self, items, tokens):
    del tokens
    return self.table[items], None


def _random_model(seed, t):
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(B, t, D)).astype(np.float32)
  table = rng.normal(size=(N_ITEMS + 1, D)).astype(np.float32)
  w_K = rng.normal(size=seen.BUCKETS).astype(np.float32) * 2
  return queries, table, w_K


@pytest.mark.parametrize('eps', (0.0, 0.3))
def test_next_item_loss_with_seen_offsets_matches_numpy(eps):
  """SASRec's catalogue softmax with the offsets: logits <q, E_i> + w on the query's inputs,
  targets (1 - eps) on the next item + eps / n, against a NumPy loop; gradients w.r.t. the
  queries, the table and w against autodiff of a dense form."""
  t = T
  items, mask = _batch(1, t + 1)
  queries, table, w_K = _random_model(2, t)
  batch = {'items': items, 'tokens': np.zeros((B, t + 1, 1), np.int32), 'mask': mask}
  cfg = Config(model=ModelConfig(name='sasrec', seen_bias=True),
               loss=LossConfig(negatives='all', scoring='dot', tau=1.0, label_smoothing=eps))
  loss_fn = losses.make(cfg, None, np.zeros((N_ITEMS + 1, 1), np.int32))
  run = lambda q, tab, w: loss_fn(_SeenTableModel(q, tab, w), batch, jax.random.key(0))[0]
  got = float(run(jnp.asarray(queries), jnp.asarray(table), jnp.asarray(w_K)))

  total, count, bias = 0.0, 0, np.zeros((B, t, N_ITEMS), np.float32)
  for b in range(B):
    for i in range(t):
      for item, off in _ref_offsets(items[b], mask[b], w_K, i).items():
        bias[b, i, item - 1] = off
      if mask[b, i] and mask[b, i + 1]:
        logits = table[1:] @ queries[b, i] + bias[b, i]
        log_p = logits - np.logaddexp.reduce(logits)
        y = np.full(N_ITEMS, eps / N_ITEMS)
        y[items[b, i + 1] - 1] += 1.0 - eps
        total += -np.sum(y * log_p)
        count += 1
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  assert abs(got - float(run(jnp.asarray(queries), jnp.asarray(table),
                             jnp.zeros(seen.BUCKETS)))) > 1e-3  # the offsets count

  # Gradients: the offsets enter as w[bucket] on a fixed (b, t, item) pattern.
  index = np.full((B, t, N_ITEMS), -1)
  for b in range(B):
    for i in range(t):
      for j in range(i + 1):
        if mask[b, j]:
          index[b, i, items[b, j] - 1] = min(int(math.log2(i - j + 1)), seen.BUCKETS - 1)

  def dense(q, tab, w):
    offsets = jnp.where(index >= 0, w[np.maximum(index, 0)], 0.0)
    log_p = jax.nn.log_softmax(jnp.einsum('btd,nd->btn', q, tab[1:]) + offsets, axis=-1)
    y = (1.0 - eps) * jax.nn.one_hot(items[:, 1:t + 1] - 1, N_ITEMS) + eps / N_ITEMS
    counted = jnp.asarray(mask[:, :t] & mask[:, 1:t + 1])
    return jnp.sum(jnp.where(counted, -jnp.sum(y * log_p, -1), 0.0)) / jnp.sum(counted)

  args = (jnp.asarray(queries), jnp.asarray(table), jnp.asarray(w_K))
  np.testing.assert_allclose(float(dense(*args)), got, rtol=1e-5)
  for a, b in zip(jax.grad(run, argnums=(0, 1, 2))(*args),
                  jax.grad(dense, argnums=(0, 1, 2))(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lmp_item_level_with_seen_offsets_matches_numpy():
  """HeterRec's LMP item level over the whole catalogue at N_step 2, tau 0.5 and a null
  logit: each step's query at t scores every item with <q, v_i> / tau + w on t's inputs (the
  inputs of the window up to t, not the later targets)."""
  n, tau, c = 2, 0.5, 1.5
  items, mask = _batch(3, T + n)
  rng = np.random.default_rng(4)
  vectors = rng.normal(size=(N_ITEMS, D)).astype(np.float32)
  q = rng.normal(size=(n, B, T, D)).astype(np.float32)
  w_K = rng.normal(size=seen.BUCKETS).astype(np.float32)
  outputs = {'queries': q, 'targets': vectors[np.maximum(items - 1, 0)],
             'token_queries': np.zeros((n, 0, B, T, 1), np.float32),
             'token_targets': np.zeros((0, B, T + n, 1), np.float32), 'seen_bias': w_K}
  batch = {'items': items, 'tokens': items[..., None], 'mask': mask}
  cfg = LossConfig(negatives='all', tau=tau, n_step=n, gate=False, null_logit_c=c, w_tok=0.0)
  negatives = negatives_lib.sample(cfg, jnp.asarray(mask), N_ITEMS, jax.random.key(0))
  _, aux = lmp.lmp_loss(outputs, batch, (), cfg, negatives,
                        {'vectors': vectors, 'slots': None, 'tokens': None})
  for i in range(1, n + 1):
    total, count = 0.0, 0
    for b in range(B):
      for t in range(T):
        if not (mask[b, t] and mask[b, t + i]):
          continue
        logits = vectors @ q[i - 1, b, t] / tau
        for item, off in _ref_offsets(items[b], mask[b], w_K, t).items():
          logits[item - 1] += off
        total += np.logaddexp.reduce(np.append(logits, math.log(c))) - logits[items[b, t + i] - 1]
        count += 1
    np.testing.assert_allclose(float(aux[f'item_loss_step{i}']), total / count, rtol=1e-5)


def test_target_ranks_add_the_offsets_of_the_last_query():
  """Evaluation: every input item's score gets w of its latest occurrence (counted from the
  last input); ranks against a NumPy loop, with and without exclude_history."""
  items, mask = _batch(5, T)
  rng = np.random.default_rng(6)
  user = rng.normal(size=(B, D)).astype(np.float32)
  table = rng.normal(size=(N_ITEMS + 1, D)).astype(np.float32)
  w_K = rng.normal(size=seen.BUCKETS).astype(np.float32) * 3
  target = rng.integers(1, N_ITEMS + 1, B).astype(np.int32)
  seen_BxT = seen.last_query_offsets(jnp.asarray(w_K), jnp.asarray(items), jnp.asarray(mask))
  for exclude in (False, True):
    got = retrieval.target_ranks(jnp.asarray(user), jnp.asarray(table), jnp.asarray(target),
                                 jnp.asarray(items), exclude, seen_BxT)
    for b in range(B):
      scores = table @ user[b]
      for item, off in _ref_offsets(items[b], mask[b], w_K, T - 1).items():
        scores[item] += off
        if exclude and item != target[b]:
          scores[item] = -np.inf
      scores[0] = -np.inf
      want = np.sum(scores >= scores[target[b]]) - 1
      assert int(got[b]) == want, (exclude, b)


@pytest.mark.parametrize('overrides', [['model.seen_bias=true', 'loss.negatives=in_batch'],
                                       ['model.seen_bias=true', 'model.name=bert4rec']])
def test_seen_bias_needs_the_whole_catalogue_and_a_next_item_model(overrides):
  with pytest.raises(ConfigError, match="model.seen_bias=True needs loss.negatives='all'"):
    apply_overrides(Config(), overrides)


@pytest.mark.parametrize('name', ('heterrec', 'sasrec'))  # the baselines share _Baseline's code
def test_models_carry_the_offsets_only_when_on(name):
  """With model.seen_bias the model holds w (zeros at start), puts it in its training outputs
  and `seen_weights()`; without it neither (a model's state and checkpoints stay as before)."""
  from flax import nnx
  from heterrec_jax import baselines
  from heterrec_jax.data.dataset import Feature, Schema
  from heterrec_jax.model import HeterRec
  schema = Schema((Feature('item_id', 'categorical', 0, 1, 12),), n_users=3, n_items=10,
                  n_events=20)
  for on in (False, True):
    cfg = ModelConfig(name=name, d_f=8, d_k=8, heads=2, n1=1, n2=1, ffn_mult=1, time_buckets=4,
                      seen_bias=on)
    loss = LossConfig(n_step=1)
    model = (HeterRec(schema, cfg, loss, rngs=nnx.Rngs(0), max_len=4) if name == 'heterrec'
             else baselines.build_baseline(schema, cfg, loss, nnx.Rngs(0), 4))
    items = jnp.array([[0, 3, 4, 3, 5]], jnp.int32)
    batch = {'items': items, 'tokens': items[..., None], 'timestamps': jnp.zeros_like(items),
             'mask': items > 0}
    out = model.forward(batch)
    params = nnx.state(model, nnx.Param)
    if on:
      np.testing.assert_array_equal(out['seen_bias'], np.zeros(seen.BUCKETS))
      np.testing.assert_array_equal(model.seen_weights(), np.zeros(seen.BUCKETS))
      assert 'seen' in params
    else:
      assert 'seen_bias' not in out and model.seen_weights() is None and 'seen' not in params


def test_evaluation_uses_the_models_offsets():
  """`evaluate`'s rank step reads w from the model: a large negative w sends every input item
  (the target among them) to the bottom of the ranking."""
  from flax import nnx
  from heterrec_jax import baselines, evaluate
  from heterrec_jax.data.dataset import Feature, Schema
  schema = Schema((Feature('item_id', 'categorical', 0, 1, 40),), n_users=3, n_items=38,
                  n_events=20)
  cfg = ModelConfig(name='sasrec', d_f=8, d_k=8, heads=2, n1=1, n2=1, ffn_mult=1, seen_bias=True)
  model = baselines.build_baseline(schema, cfg, LossConfig(n_step=1), nnx.Rngs(0), 4)
  model.eval()
  items = jnp.array([[0, 3, 4, 5], [6, 7, 8, 9]], jnp.int32)
  batch = {'items': items, 'tokens': items[..., None], 'timestamps': jnp.zeros_like(items),
           'mask': items > 0, 'target': jnp.array([4, 9], jnp.int32)}
  vectors, _ = model.encode_items(jnp.arange(39, dtype=jnp.int32), None)
  graphdef, state = nnx.split(model)
  before = evaluate._batch_ranks(graphdef, False, None, state, vectors, batch)
  model.seen.theta[...] = jnp.full((seen.BUCKETS,), -1e4 / seen.SCALE)
  graphdef, state = nnx.split(model)
  after = evaluate._batch_ranks(graphdef, False, None, state, vectors, batch)
  # 38 candidates; the target is one of the 3 / 4 penalised inputs: at least 35 / 34 ahead.
  assert int(after[0]) >= 35 and int(after[1]) >= 34
  assert int(before[0]) < 35 or int(before[1]) < 34
