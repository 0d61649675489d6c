"""Blockwise attention (attention.py) against the dense `layers.block_attention`: forward and
gradients (q, k, v, the time-gap table) within 1e-5 on 1 and 8 devices, no L x L buffer, and the
model's causality-by-gradient tests rerun with blockwise attention forced."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from heterrec_jax import attention, layers, sharding
from heterrec_jax.config import MeshConfig
from tests import test_model


def _inputs(seed, b=2, t=7, k=3, h=2, d=4, dtype=np.float32):
  """q, k, v `[B, T, K, H, D]`, a time-gap table, timestamps and a left-padded item mask."""
  rng = np.random.default_rng(seed)
  q, kk, v = (rng.normal(size=(b, t, k, h, d)).astype(dtype) for _ in range(3))
  table = rng.normal(size=(16, h)).astype(np.float32)
  ts = np.cumsum(rng.choice([0, 5, 3600, 10**6], size=(b, t)), axis=1).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[0, :3] = False  # left padding: padded items attend their own tokens only
  return q, kk, v, table, ts, mask


def _loss(attend, q, k, v, table, ts, allowed):
  """A non-linear scalar of the attention output, so every gradient is exercised."""
  out = attend(q, k, v, layers.time_gap_bias(table, ts), allowed)
  return jnp.sum(jnp.sin(out.astype(jnp.float32) + 1.0) * out.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=('block_items',))
def _value_and_grads(q, k, v, table, ts, allowed, block_items):
  """(output, (dq, dk, dv, dtable)); block_items=0: the dense reference."""
  attend = (layers.block_attention if block_items == 0 else
            functools.partial(attention.blockwise_attention, block_items=block_items))
  out = attend(q, k, v, layers.time_gap_bias(table, ts), allowed)
  grads = jax.grad(functools.partial(_loss, attend), argnums=(0, 1, 2, 3))(q, k, v, table, ts,
                                                                           allowed)
  return out, grads


def _assert_close(got, want, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=atol, atol=atol)


@pytest.mark.parametrize('mask_kind', ['block_causal', 'token_causal', 'fully_padded'])
@pytest.mark.parametrize('block_items', [1, 3, 7])  # 3: T = 7 is padded to 9
def test_blockwise_equals_dense_forward_and_gradients(mask_kind, block_items):
  q, k, v, table, ts, mask = _inputs(0)
  if mask_kind == 'fully_padded':
    mask[1] = False
  allowed = (layers.token_causal_mask(mask, 3) if mask_kind == 'token_causal'
             else layers.block_causal_mask(mask))
  want = _value_and_grads(q, k, v, table, ts, allowed, 0)
  got = _value_and_grads(q, k, v, table, ts, allowed, block_items)
  chex.assert_tree_all_finite(got)
  _assert_close(got, want)


def test_blockwise_item_level_k1_equals_dense():
  q, k, v, table, ts, mask = _inputs(1, t=9, k=1)
  allowed = layers.block_causal_mask(mask)
  _assert_close(_value_and_grads(q, k, v, table, ts, allowed, 4),
                _value_and_grads(q, k, v, table, ts, allowed, 0))


def test_blockwise_equals_dense_on_8_devices():
  assert jax.device_count() == 8
  q, k, v, table, ts, mask = _inputs(2, b=8)
  allowed = layers.block_causal_mask(mask)
  want = _value_and_grads(q, k, v, table, ts, allowed, 0)  # one device
  mesh = sharding.make_mesh(MeshConfig(data=8, model=1))  # the trainer's mesh
  batch = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  args = (batch(q), batch(k), batch(v), jax.device_put(table, NamedSharding(mesh, P())),
          batch(ts), batch(allowed))
  got = _value_and_grads(*args, 3)
  assert len(got[0].sharding.device_set) == 8
  _assert_close(got, want)


def test_blockwise_bfloat16_close_to_dense():
  q, k, v, table, ts, mask = _inputs(3, dtype=jnp.bfloat16)
  allowed = layers.block_causal_mask(mask)
  got = _value_and_grads(q, k, v, table, ts, allowed, 3)
  assert got[0].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
  _assert_close(got, _value_and_grads(q, k, v, table, ts, allowed, 0), atol=5e-2)


def test_blockwise_never_builds_the_token_logits():
  """The compiled forward + backward holds less than ONE dense `[B, H, L, L]` float32 logits
  tensor in temporaries (the dense path holds several)."""
  b, t, k, h, d = 1, 64, 6, 1, 8
  args = [jnp.zeros((b, t, k, h, d))] * 3 + [jnp.zeros((b, h, t, t)),
                                             layers.block_causal_mask(jnp.ones((b, t), bool))]
  logits_bytes = 4 * b * h * (t * k) ** 2

  def temp_bytes(attend):
    loss = lambda q, kk, v, bias, allowed: jnp.sum(attend(q, kk, v, bias, allowed))
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(layers.block_attention) > 2 * logits_bytes
  assert temp_bytes(functools.partial(attention.blockwise_attention, block_items=8)) < (
      logits_bytes / 4)


def test_causal_attention_dispatch(monkeypatch):
  q, k, v, table, ts, mask = _inputs(4, t=3)
  args = (q, k, v, layers.time_gap_bias(table, ts), layers.block_causal_mask(mask))
  # A fresh jit each time: the choice is made at tracing, and jit caches traces.
  hlo = lambda: jax.jit(lambda *a: layers.causal_attention(*a)).lower(*args).as_text()
  assert 'while' not in hlo()  # 3 items <= DENSE_MAX_ITEMS: dense
  monkeypatch.setattr(layers, 'DENSE_MAX_ITEMS', 2)
  assert 'while' in hlo()  # 3 items > DENSE_MAX_ITEMS: blockwise
  with layers.attention_impl('blockwise'):
    assert 'while' in hlo()
  with pytest.raises(ValueError, match='attention implementation'):
    with layers.attention_impl('flash'):
      pass
  with pytest.raises(ValueError, match='block_items'):
    with layers.attention_impl('blockwise', block_items=0):
      pass


@pytest.mark.parametrize('test', [test_model.test_token_level_is_block_causal_by_gradients,
                                  test_model.test_user_output_is_causal_by_gradients,
                                  test_model.test_padded_items_are_invisible_by_gradients,
                                  test_model.test_item_level_is_causal_by_gradients,
                                  test_model.test_no_hct_token_does_not_see_later_tokens])
def test_model_causality_by_gradients_with_blockwise_attention(test, monkeypatch):
  """The model tests' T = 4 items in blocks of 3: two blocks, the second one padded."""
  monkeypatch.setattr(layers, 'BLOCK_ITEMS', 3)
  monkeypatch.setattr(layers, 'BLOCK_TOKENS', 1)  # the K = 1 item level in 3-item blocks too
  with layers.attention_impl('blockwise'):
    test()


def test_default_block_holds_block_items_and_block_tokens():
  assert layers.block_items_for(6) == layers.BLOCK_ITEMS == 32  # the token level: 192 tokens
  assert layers.block_items_for(1) == layers.BLOCK_TOKENS == 128  # a K = 1 item level
  assert layers.block_items_for(2) == 64


def test_causal_stack_blockwise_equals_dense_with_parameter_gradients(monkeypatch):
  """A whole CausalStack (projections, bias table, LayerNorms): output and every parameter
  gradient, blockwise (blocks of 2 of the 5 items) against dense."""
  monkeypatch.setattr(layers, 'BLOCK_ITEMS', 2)
  monkeypatch.setattr(layers, 'BLOCK_TOKENS', 1)
  with nnx.use_eager_sharding(False):
    stack = layers.CausalStack(8, 2, heads=2, ffn_mult=2, dropout=0.0, time_buckets=16,
                               dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(5).normal(size=(2, 5, 3, 8)).astype(np.float32)
  _, _, _, _, ts, mask = _inputs(5, t=5)
  allowed = layers.block_causal_mask(mask)
  graphdef, states = nnx.split(stack)

  def run(impl):
    def value_and_grad(states, x):
      loss = lambda s, x: jnp.sum(jnp.sin(s(x, ts, allowed)))
      return nnx.value_and_grad(loss, argnums=(0, 1))(nnx.merge(graphdef, states), x)
    with layers.attention_impl(impl):
      return jax.jit(value_and_grad)(states, x)

  _assert_close(run('blockwise'), run('dense'))


def _dense_with_keep(q, k, v, bias, allowed, keep):
  """The dense reference with a given dropout multiplier on the probabilities
  `[B, H, T, K, T, K]`: softmax over the flat keys, times `keep`, then V."""
  b, t, kk, h, d = q.shape
  logits = (jnp.einsum('btkhd,bsjhd->bhtksj', q, k)
            + bias[:, :, :, None, :, None]) / np.sqrt(d)
  logits = jnp.where(allowed[:, None], logits, layers.NEG_INF).reshape(b, h, t, kk, t * kk)
  probs = jax.nn.softmax(logits, axis=-1).reshape(b, h, t, kk, t, kk) * keep
  return jnp.einsum('bhtksj,bsjhd->btkhd', probs, v)


@pytest.mark.parametrize('block_items', [2, 3])  # 3: T = 7 is padded to 9
def test_blockwise_dropout_equals_dense_with_the_same_mask(block_items):
  """Blockwise attention with dropout on the probabilities: forward and gradients (q, k, v,
  the time-gap table) equal the dense softmax times the keep-mask assembled from the same
  per-block-pair draws (`attention.dropout_keep`); the rate actually drops about its share."""
  q, k, v, table, ts, mask = map(jnp.asarray, _inputs(3))
  allowed = layers.block_causal_mask(mask)
  rate, key = 0.4, jax.random.key(7)
  b, t, kk, h, _ = q.shape
  n = -(-t // block_items)
  tp = n * block_items
  keep = np.zeros((b, h, tp, kk, tp, kk), np.float32)
  for i in range(n):
    for j in range(i + 1):
      shape = (b, h, block_items, kk, block_items, kk)
      rows, cols = slice(i * block_items, (i + 1) * block_items), slice(j * block_items,
                                                                        (j + 1) * block_items)
      keep[:, :, rows, :, cols, :] = attention.dropout_keep(key, rate, i, j, n, shape)
  keep = keep[:, :, :t, :, :t, :]
  dropped = np.mean(keep[np.broadcast_to(np.asarray(allowed)[:, None], keep.shape)] == 0)
  assert 0.3 < dropped < 0.5
  blockwise = functools.partial(attention.blockwise_attention, block_items=block_items,
                                dropout_rate=rate, dropout_key=key)
  dense = functools.partial(_dense_with_keep, keep=jnp.asarray(keep))
  run = lambda attend: (attend(q, k, v, layers.time_gap_bias(table, ts), allowed),
                        jax.grad(functools.partial(_loss, attend), argnums=(0, 1, 2, 3))(
                            q, k, v, table, ts, allowed))
  _assert_close(jax.jit(lambda: run(blockwise))(), run(dense))


def test_attention_dropout_runs_blockwise_in_training_and_off_in_eval(monkeypatch):
  """model.attention_dropout on a long causal sequence runs the blockwise path (the dense
  one is never called) with dropout in training, and equals the block without dropout in
  evaluation."""
  def no_dense(*args, **kwargs):
    raise AssertionError('the dense attention ran')

  monkeypatch.setattr(layers, 'block_attention', no_dense)
  with nnx.use_eager_sharding(False):
    mha = layers.MultiHeadAttention(8, 2, dtype=jnp.float32, rngs=nnx.Rngs(0), causal=True,
                                    attention_dropout=0.5)
  x = np.random.default_rng(9).normal(size=(2, 6, 2, 8)).astype(np.float32)
  bias = jnp.zeros((2, 2, 6, 6))
  allowed = layers.block_causal_mask(jnp.ones((2, 6), bool))
  with layers.attention_impl('blockwise', block_items=2):
    first, second = np.asarray(mha(x, bias, allowed)), np.asarray(mha(x, bias, allowed))
    mha.eval()
    off = np.asarray(mha(x, bias, allowed))
    mha.probs_drop = None
    plain = np.asarray(mha(x, bias, allowed))
  assert np.all(np.isfinite(first)) and not np.allclose(first, second)
  assert not np.allclose(first, off)
  np.testing.assert_allclose(off, plain, rtol=1e-6)


def test_blockwise_dropout_rejects_a_bad_rate_or_a_missing_key():
  q, k, v, table, ts, mask = _inputs(0)
  args = (q, k, v, layers.time_gap_bias(table, ts), layers.block_causal_mask(mask))
  with pytest.raises(ValueError, match='dropout_rate'):
    attention.blockwise_attention(*args, dropout_rate=1.0, dropout_key=jax.random.key(0))
  with pytest.raises(ValueError, match='dropout_key'):
    attention.blockwise_attention(*args, dropout_rate=0.1)
