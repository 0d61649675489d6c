"""The LMP loss and its negative sources against slow NumPy references written from the
formulas."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from heterrec_jax import lmp as loss_lib
from heterrec_jax import negatives as negatives_lib
from heterrec_jax import softmax
from heterrec_jax.config import LossConfig as _LossConfig

# The paper's same-position negatives unless a test names another source.
LossConfig = functools.partial(_LossConfig, negatives='same_position')

B, T, N, D, DF = 4, 6, 3, 8, 8
W = T + N
# Item -> [item_id, cat, tag, tag, tag]: 5 items, every item shares its category with others,
# items 1/2 and 3/5 share all three tags (a multi-valued token, n_sub = 3).
ITEM_TOKENS = np.array([[0, 0, 0, 0, 0],
                        [1, 2, 1, 2, 1],
                        [2, 1, 1, 2, 1],
                        [3, 2, 2, 2, 1],
                        [4, 1, 1, 1, 1],
                        [5, 2, 2, 2, 1]], np.int32)
COLUMNS = (('cat', 1, 1, 1), ('tags', 2, 2, 3))


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _mask(rng, holes=False):
  lengths = np.concatenate([[W], rng.integers(2, W, B - 1)])
  mask = np.arange(W)[None] >= (W - lengths)[:, None]  # right-aligned
  if holes:
    mask &= rng.random((B, W)) > 0.25
  return mask


def _example(seed=0, n_tok=2, holes=False):
  rng = np.random.default_rng(seed)
  mask = _mask(rng, holes)
  items = np.where(mask, rng.integers(1, 6, (B, W)), 0).astype(np.int32)
  outputs = {'queries': _unit(rng, (N, B, T, D)), 'targets': _unit(rng, (B, W, D)),
             'token_queries': _unit(rng, (N, n_tok, B, T, DF)),
             'token_targets': _unit(rng, (n_tok, B, W, DF))}
  batch = {'items': items, 'tokens': ITEM_TOKENS[items], 'mask': mask,
           'timestamps': np.cumsum(np.ones((B, W), np.int32), axis=1)}
  return outputs, batch


# ---- NumPy references: loops over steps, sequences, positions and negatives -----------------

def _ref_level(q, tgt, same, mask, cfg, pool=None):
  """Step losses and gate fractions of one level; `same(b, w, c, v)` marks accidental hits."""
  q, tgt = q.astype(np.float64), tgt.astype(np.float64)
  e = lambda s: math.exp(s / cfg.tau)
  losses, fractions = [], []
  for i in range(1, q.shape[0] + 1):
    total, counted, valid = 0.0, 0, 0
    for b in range(B):
      for t in range(q.shape[2]):
        if not (mask[b, t] and mask[b, t + i]):
          continue
        valid += 1
        sp = q[i - 1, b, t] @ tgt[b, t + i]
        if cfg.gate and i > 1:
          if not mask[b, t + i - 1]:
            continue
          s_prev = q[i - 2, b, t] @ tgt[b, t + i - 1]
          if not e(s_prev) > e(sp) + cfg.lambda_m:
            continue
        if pool is None:
          negatives = [(c, t + i) for c in range(B) if c != b]
        else:
          negatives = [divmod(int(m), W) for m, real in zip(*pool) if real]
        denominator = cfg.null_logit_c + e(sp)
        for c, v in negatives:
          if mask[c, v] and not same(b, t + i, c, v):
            denominator += e(q[i - 1, b, t] @ tgt[c, v])
        total += -math.log(e(sp) / denominator)
        counted += 1
    losses.append(total / counted if counted else 0.0)
    fractions.append(counted / valid if valid else 0.0)
  return losses, fractions


def _ref_loss(outputs, batch, columns, cfg, pool=None, mask_hits=True, token_item_hits=True):
  items, tokens, mask = batch['items'], batch['tokens'], batch['mask']
  same_item = lambda b, w, c, v: mask_hits and items[b, w] == items[c, v]
  item, fractions = _ref_level(outputs['queries'], outputs['targets'], same_item, mask, cfg,
                               pool)
  token = [0.0] * len(item)
  for s, (_, _, lo, n) in enumerate(columns):
    def same(b, w, c, v, lo=lo, n=n):
      tok = all(tokens[b, w, lo + j] == tokens[c, v, lo + j] for j in range(n))
      return mask_hits and (tok or (token_item_hits and items[b, w] == items[c, v]))
    steps, _ = _ref_level(outputs['token_queries'][:, s], outputs['token_targets'][s], same,
                          mask, cfg, pool)
    token = [a + b for a, b in zip(token, steps)]
  ref = {'loss': sum(item) + cfg.w_tok * sum(token), 'item_loss': sum(item),
         'token_loss': sum(token)}
  for i in range(1, len(item) + 1):
    ref[f'item_loss_step{i}'], ref[f'token_loss_step{i}'] = item[i - 1], token[i - 1]
    if i > 1:
      ref[f'gate_fraction_step{i}'] = fractions[i - 1]
  return ref


def _ref_sampled_softmax(q, v, items, mask, tau, mask_hits=True):
  q, v = q.astype(np.float64), v.astype(np.float64)
  total, count = 0.0, 0
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      if not (mask[b, t] and mask[b, t + 1]):
        continue
      sp = math.exp(q[b, t] @ v[b, t + 1] / tau)
      denominator = sp
      for c in range(v.shape[0]):
        for w in range(1, v.shape[1]):
          if mask[c, w] and not (mask_hits and items[c, w] == items[b, t + 1]):
            denominator += math.exp(q[b, t] @ v[c, w] / tau)
      total += -math.log(sp / denominator)
      count += 1
  return total / count if count else 0.0


def _n_item_hits(batch):
  items, mask = batch['items'], batch['mask']
  return sum(int(mask[b, w] and mask[c, w] and items[b, w] == items[c, w])
             for b in range(B) for c in range(B) if b != c for w in range(1, W))


def _assert_matches(got, ref, rtol=1e-5):
  _, aux = got
  np.testing.assert_allclose(float(got[0]), ref['loss'], rtol=rtol, atol=1e-6)
  for key, value in ref.items():
    if key != 'loss':
      np.testing.assert_allclose(float(aux[key]), value, rtol=rtol, atol=1e-6, err_msg=key)


# ---- tests ---------------------------------------------------------------------------------

class LmpLossTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ('same_gate_margin_null', 'same_position', True, 1.0, 1.0, 0.1, False, 8),
      ('same_gate_plain_no_null', 'same_position', True, 0.0, 0.0, 0.05, False, 8),
      ('same_no_gate', 'same_position', False, 1.0, 1.0, 0.2, False, 8),
      ('same_holes', 'same_position', True, 1.0, 1.0, 0.1, True, 8),
      ('pool_small', 'batch_pool', True, 1.0, 0.0, 0.1, False, 10),
      ('pool_padded_slots', 'batch_pool', True, 0.0, 1.0, 0.1, True, 1000),
  )
  def test_matches_reference(self, negatives, gate, lambda_m, c, tau, holes, pool_size):
    cfg = LossConfig(negatives=negatives, gate=gate, lambda_m=lambda_m, null_logit_c=c, tau=tau,
                     pool_size=pool_size, w_tok=0.5, n_step=N)
    self._check_against_reference(cfg, holes, loss_lib.heterrec_loss)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('same_position', 'batch_pool')
  def test_variants_match_reference(self, negatives):
    cfg = LossConfig(negatives=negatives, pool_size=10, tau=0.1, n_step=N)
    self._check_against_reference(cfg, True, self.variant(loss_lib.heterrec_loss,
                                                          static_argnums=(2, 3)))

  def _check_against_reference(self, cfg, holes, loss_fn):
    outputs, batch = _example(seed=1, holes=holes)
    rng = jax.random.key(3)
    pool = None
    if cfg.negatives == 'batch_pool':
      pool = tuple(np.asarray(x) for x in negatives_lib.sample_pool(batch['mask'], cfg.pool_size, rng))
    got = loss_fn(outputs, batch, COLUMNS, cfg, rng)
    chex.assert_shape(got[0], ())
    _assert_matches(got, _ref_loss(outputs, batch, COLUMNS, cfg, pool))

  def test_accidental_hits_are_masked(self):
    outputs, batch = _example(seed=2)
    assert _n_item_hits(batch) > 0
    cfg = LossConfig(n_step=N, tau=0.1)
    loss, aux = loss_lib.heterrec_loss(outputs, batch, COLUMNS, cfg, jax.random.key(0))
    unmasked = _ref_loss(outputs, batch, COLUMNS, cfg, mask_hits=False)
    assert abs(float(aux['item_loss']) - unmasked['item_loss']) > 1e-2
    assert abs(float(loss) - unmasked['loss']) > 1e-2

  def test_token_negatives_masked_by_token_and_item(self):
    outputs, batch = _example(seed=3)
    # Tokens drawn per position (not from the item) so that a same item can carry other tokens.
    rng = np.random.default_rng(0)
    tokens = np.where(batch['mask'][..., None], rng.integers(1, 3, (B, W, 5)), 0)
    batch = {**batch, 'tokens': tokens.astype(np.int32)}
    cfg = LossConfig(n_step=N, tau=0.1)
    _, aux = loss_lib.heterrec_loss(outputs, batch, COLUMNS, cfg, jax.random.key(0))
    full = _ref_loss(outputs, batch, COLUMNS, cfg)
    np.testing.assert_allclose(float(aux['token_loss']), full['token_loss'], rtol=1e-5)
    no_item_mask = _ref_loss(outputs, batch, COLUMNS, cfg, token_item_hits=False)
    assert abs(no_item_mask['token_loss'] - full['token_loss']) > 1e-3
    # Masking by item alone (as the item level) would give another value.
    item_mask_only = [_ref_loss({**outputs, 'queries': outputs['token_queries'][:, s],
                                 'targets': outputs['token_targets'][s]}, batch, (), cfg)
                      for s in range(len(COLUMNS))]
    assert abs(sum(r['item_loss'] for r in item_mask_only) - full['token_loss']) > 1e-2

  def test_gate_and_margin_change_the_loss(self):
    outputs, batch = _example(seed=4, n_tok=0)
    base = LossConfig(n_step=N, tau=0.1)
    values = {}
    for name, cfg in (('gate', base), ('plain', dataclasses.replace(base, lambda_m=0.0)),
                      ('off', dataclasses.replace(base, gate=False))):
      _, values[name] = loss_lib.heterrec_loss(outputs, batch, (), cfg, jax.random.key(0))
    fraction = float(values['gate']['gate_fraction_step2'])
    assert 0.0 < fraction < 1.0
    assert float(values['off']['gate_fraction_step2']) == 1.0
    assert float(values['plain']['gate_fraction_step2']) > fraction
    np.testing.assert_allclose(values['off']['item_loss_step1'], values['gate']['item_loss_step1'])
    assert abs(float(values['off']['item_loss_step2'] - values['gate']['item_loss_step2'])) > 1e-3

  def test_gate_has_no_gradient(self):
    """queries[0] enters step 2 only through the gate: its gradient is step 1's alone."""
    outputs, batch = _example(seed=5, n_tok=0)
    cfg = LossConfig(n_step=2, tau=0.1, lambda_m=1.0)
    outputs = {**outputs, 'queries': outputs['queries'][:2]}

    def total(queries, n):
      o = {**outputs, 'queries': queries[:n]}
      loss, aux = loss_lib.heterrec_loss(o, batch, (), dataclasses.replace(cfg, n_step=n),
                                         jax.random.key(0))
      return loss, aux

    grads = jax.jit(lambda q: (jax.value_and_grad(total, has_aux=True)(q, 2),
                               jax.grad(lambda q: total(q, 1)[0])(q)))
    ((_, aux), grad), grad_step1 = grads(outputs['queries'])
    assert 0.0 < float(aux['gate_fraction_step2']) < 1.0
    np.testing.assert_allclose(grad[0], grad_step1[0], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad[1]).max()) > 1e-3

  def test_no_token_kinds(self):
    outputs, batch = _example(seed=6, n_tok=0)
    cfg = LossConfig(n_step=N, tau=0.1)
    loss, aux = jax.jit(lambda o, b: loss_lib.heterrec_loss(o, b, (), cfg, jax.random.key(0)))(
        outputs, batch)
    assert float(aux['token_loss']) == 0.0
    np.testing.assert_allclose(float(loss), float(aux['item_loss']), rtol=1e-6)
    _assert_matches((loss, aux), _ref_loss(outputs, batch, (), cfg))

  def test_no_valid_position_gives_zero(self):
    outputs, batch = _example(seed=7)
    batch = {**batch, 'mask': np.zeros((B, W), bool), 'items': np.zeros((B, W), np.int32)}
    for negatives in ('same_position', 'batch_pool'):
      cfg = LossConfig(n_step=N, negatives=negatives, pool_size=10)
      loss, aux = loss_lib.heterrec_loss(outputs, batch, COLUMNS, cfg, jax.random.key(0))
      assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in aux.values())

  def test_token_columns_must_match_outputs(self):
    outputs, batch = _example(seed=0, n_tok=1)
    with pytest.raises(ValueError, match='token kinds'):
      loss_lib.heterrec_loss(outputs, batch, COLUMNS, LossConfig(n_step=N), jax.random.key(0))


class SamplePoolTest(parameterized.TestCase):

  @parameterized.parameters(5, 20, 1000)
  def test_distinct_real_candidates(self, pool_size):
    _, batch = _example(seed=8, holes=True)
    mask = batch['mask']
    index, real = map(np.asarray, negatives_lib.sample_pool(mask, pool_size, jax.random.key(1)))
    candidates = {b * W + w for b in range(B) for w in range(1, W) if mask[b, w]}
    assert index.shape == real.shape == (min(pool_size, B * (W - 1)),)
    assert len(set(index.tolist())) == len(index)  # without replacement
    assert all((int(m) in candidates) == bool(r) for m, r in zip(index, real))
    assert int(real.sum()) == min(pool_size, len(candidates))

  def test_depends_on_rng_only(self):
    mask = _example(seed=8)[1]['mask']
    a = np.asarray(negatives_lib.sample_pool(mask, 5, jax.random.key(1))[0])
    b = np.asarray(negatives_lib.sample_pool(mask, 5, jax.random.key(1))[0])
    c = np.asarray(negatives_lib.sample_pool(mask, 5, jax.random.key(2))[0])
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) != set(c.tolist())


class SampledSoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference(self):
    outputs, batch = _example(seed=9, holes=True)
    q, v = outputs['queries'][0], outputs['targets']
    fn = self.variant(lambda *a: softmax.sampled_softmax_loss(*a, tau=0.1))
    got = fn(q, v, batch['items'], batch['mask'])
    ref = _ref_sampled_softmax(q, v, batch['items'], batch['mask'], 0.1)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    unmasked = _ref_sampled_softmax(q, v, batch['items'], batch['mask'], 0.1, mask_hits=False)
    assert abs(ref - unmasked) > 1e-2


@pytest.mark.parametrize('tau,lambda_m', [(2.0, 1.0), (0.05, 1.0), (0.2, 0.1), (1.0, 0.0)])
def test_gate_at_several_tau(tau, lambda_m):
  """The gate against NumPy on cosine-range logits. At tau = 2, lambda_m = 1 it opens only for
  a cosine drop >= 1.87 (SPEC 6: almost never); at smaller tau or margin it opens often."""
  rng = np.random.default_rng(0)
  prev, pos = (rng.uniform(-1, 1, (4000,)) for _ in range(2))
  gate = np.asarray(loss_lib.margin_gate(jnp.asarray(prev), jnp.asarray(pos), tau, lambda_m))
  np.testing.assert_array_equal(gate, np.exp(prev / tau) > np.exp(pos / tau) + lambda_m)
  if tau == 2.0:
    assert np.all(prev[gate] - pos[gate] >= 1.87) and gate.mean() < 0.01
  else:
    assert gate.mean() > 0.2
