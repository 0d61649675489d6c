"""HCT building blocks against plain NumPy loop references (per-token tables, flat attention)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heterrec_jax import layers


def _timestamps(rng, b, t):
  gaps = rng.choice([0, 1, 5, 60, 3600, 86_400, 10**6, 10**8], size=(b, t))
  return np.cumsum(gaps, axis=1).astype(np.int32) + 1_600_000_000


def _bucket_ref(a, b, n_buckets):
  gap = max(abs(int(a) - int(b)), 1)
  return min(max(math.floor(math.log(gap) / 0.301), 0), n_buckets - 1)


def _per_token_bias_ref(table, ts, k):
  """The full per-token [B, H, L, L] time-gap table, built token pair by token pair."""
  b, t = ts.shape
  ts_tok = np.repeat(ts, k, axis=1)  # every token carries its item's timestamp
  out = np.zeros((b, table.shape[1], t * k, t * k), np.float32)
  for bi in range(b):
    for i in range(t * k):
      for j in range(t * k):
        out[bi, :, i, j] = table[_bucket_ref(ts_tok[bi, i], ts_tok[bi, j], table.shape[0])]
  return out


def _flat_mask_ref(mask, k, token_causal):
  """allowed[b, i, j] over flat tokens i = t*K + kk, by explicit rules."""
  b, t = mask.shape
  out = np.zeros((b, t * k, t * k), bool)
  for bi in range(b):
    for i in range(t * k):
      for j in range(t * k):
        ti, tj = i // k, j // k
        if token_causal:
          out[bi, i, j] = (tj < ti and mask[bi, tj]) or (ti == tj and j <= i)
        else:
          out[bi, i, j] = (tj <= ti and mask[bi, tj]) or ti == tj
  return out


def _flat_attention_ref(q, k, v, bias_full, allowed_flat, keep=None, rate=0.0):
  """Plain softmax attention over L flat tokens. q, k, v: [B, L, H, D]. `keep` [B, H, L, L]:
  the attention probabilities kept by dropout at `rate` (the rest zeroed, the kept scaled)."""
  d = q.shape[-1]
  logits = (np.einsum('blhd,bmhd->bhlm', q, k) + bias_full) / np.sqrt(d)
  logits = np.where(allowed_flat[:, None], logits, -1e9)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  if keep is not None:
    probs = np.where(keep, probs / (1 - rate), 0.0)
  return np.einsum('bhlm,bmhd->blhd', probs, v)


class TimeGapTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_buckets_match_loop_reference(self):
    rng = np.random.default_rng(0)
    ts = _timestamps(rng, 2, 6)
    ts[0, 0] = 0  # a padding timestamp far from the others
    got = np.asarray(self.variant(layers.time_gap_buckets, static_argnums=1)(ts, 16))
    want = np.array([[[_bucket_ref(ts[b, i], ts[b, j], 16) for j in range(6)]
                      for i in range(6)] for b in range(2)])
    np.testing.assert_array_equal(got, want)
    assert got.max() == 15 and got.min() == 0  # both clips are exercised

  def test_item_grid_bias_equals_per_token_table(self):
    rng = np.random.default_rng(1)
    b, t, k, h, n_buckets = 2, 4, 3, 2, 16
    ts = _timestamps(rng, b, t)
    table = rng.normal(size=(n_buckets, h)).astype(np.float32)
    bias_BxHxTxT = np.asarray(layers.time_gap_bias(jnp.asarray(table), ts))
    chex.assert_shape(bias_BxHxTxT, (b, h, t, t))
    full = _per_token_bias_ref(table, ts, k)
    expanded = np.repeat(np.repeat(bias_BxHxTxT, k, axis=2), k, axis=3)
    np.testing.assert_allclose(expanded, full, rtol=0, atol=0)
    # Tokens of one item share their item's bias: every K x K block is constant.
    blocks = full.reshape(b, h, t, k, t, k)
    np.testing.assert_array_equal(blocks, blocks[:, :, :, :1, :, :1] + 0 * blocks)


class MaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_causal_mask_matches_rules(self):
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    k = 3
    got = self.variant(layers.block_causal_mask)(mask)
    got = np.broadcast_to(np.asarray(got), (2, 5, k, 5, k)).reshape(2, 5 * k, 5 * k)
    np.testing.assert_array_equal(got, _flat_mask_ref(mask, k, token_causal=False))

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_causal_mask_matches_rules(self):
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
    k = 3
    got = np.asarray(self.variant(layers.token_causal_mask, static_argnums=1)(mask, k))
    np.testing.assert_array_equal(got.reshape(2, 4 * k, 4 * k),
                                  _flat_mask_ref(mask, k, token_causal=True))


class AttentionTest(chex.TestCase):

  def _inputs(self, seed, b=2, t=4, k=3, h=2, d=4):
    rng = np.random.default_rng(seed)
    q, kk, v = (rng.normal(size=(b, t, k, h, d)).astype(np.float32) for _ in range(3))
    table = rng.normal(size=(16, h)).astype(np.float32)
    ts = _timestamps(rng, b, t)
    mask = np.ones((b, t), bool)
    mask[0, :2] = False  # left padding
    return q, kk, v, table, ts, mask

  def _check_against_flat(self, token_causal):
    q, k, v, table, ts, mask = self._inputs(2)
    b, t, kinds, h, d = q.shape
    bias = layers.time_gap_bias(jnp.asarray(table), ts)
    allowed = (layers.token_causal_mask(mask, kinds) if token_causal
               else layers.block_causal_mask(mask))
    got = np.asarray(jax.jit(layers.block_attention)(q, k, v, bias, allowed))
    flat = lambda x: x.reshape(b, t * kinds, h, d)
    want = _flat_attention_ref(flat(q), flat(k), flat(v), _per_token_bias_ref(table, ts, kinds),
                               _flat_mask_ref(mask, kinds, token_causal))
    np.testing.assert_allclose(got.reshape(b, t * kinds, h, d), want, rtol=1e-5, atol=1e-5)

  def test_broadcast_bias_equals_flat_attention_block_causal(self):
    self._check_against_flat(token_causal=False)

  def test_broadcast_bias_equals_flat_attention_token_causal(self):
    self._check_against_flat(token_causal=True)

  def test_probability_dropout_equals_flat_reference(self):
    """`probs_dropout` acts on the softmax probabilities over the flat keys: a fixed keep-mask
    (standing in for nnx.Dropout's random one) equals the reference that zeroes the same
    probabilities and rescales the kept ones."""
    q, k, v, table, ts, mask = self._inputs(6)
    b, t, kinds, h, d = q.shape
    rate = 0.3
    keep = np.random.default_rng(7).random((b, h, t * kinds, t * kinds)) > rate
    drop = lambda probs: jnp.where(keep.reshape(probs.shape), probs / (1 - rate), 0.0)
    bias = layers.time_gap_bias(jnp.asarray(table), ts)
    got = layers.block_attention(q, k, v, bias, layers.block_causal_mask(mask), drop)
    flat = lambda x: x.reshape(b, t * kinds, h, d)
    want = _flat_attention_ref(flat(q), flat(k), flat(v), _per_token_bias_ref(table, ts, kinds),
                               _flat_mask_ref(mask, kinds, token_causal=False), keep, rate)
    np.testing.assert_allclose(np.asarray(got).reshape(b, t * kinds, h, d), want, rtol=1e-5,
                               atol=1e-5)

  def test_fully_padded_sequence_is_finite(self):
    q, k, v, table, ts, _ = self._inputs(3)
    mask = np.zeros(ts.shape, bool)
    bias = layers.time_gap_bias(jnp.asarray(table), ts)
    out = layers.block_attention(q, k, v, bias, layers.block_causal_mask(mask))
    chex.assert_tree_all_finite(out)
    # A padded item attends only its own tokens.
    probs_ref = _flat_attention_ref(
        q.reshape(2, 12, 2, 4), k.reshape(2, 12, 2, 4), v.reshape(2, 12, 2, 4),
        _per_token_bias_ref(table, ts, 3), _flat_mask_ref(mask, 3, token_causal=False))
    np.testing.assert_allclose(np.asarray(out).reshape(2, 12, 2, 4), probs_ref, atol=1e-5)


class ModuleTest(chex.TestCase):

  def _stack(self, dropout=0.0, dtype=jnp.float32):
    with nnx.use_eager_sharding(False):
      return layers.CausalStack(8, 2, heads=2, ffn_mult=2, dropout=dropout, time_buckets=8,
                                dtype=dtype, rngs=nnx.Rngs(0))

  def test_stack_shapes_and_logical_axes(self):
    stack = self._stack()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    ts = _timestamps(rng, 2, 4)
    out = stack(x, ts, layers.block_causal_mask(np.ones((2, 4), bool)))
    chex.assert_shape(out, (2, 4, 3, 8))
    chex.assert_tree_all_finite(out)
    assert stack.time_gap.get_metadata()['out_sharding'] == ('buckets', 'heads')
    kernel = stack.blocks[0].ffn.fc1.kernel
    assert kernel.get_metadata()['out_sharding'] == ('embed', 'mlp')

  def test_bfloat16_compute_keeps_float32_params(self):
    stack = self._stack(dtype=jnp.bfloat16)
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    out = stack(x, jnp.arange(3)[None], layers.block_causal_mask(jnp.ones((1, 3), bool)))
    assert out.dtype == jnp.bfloat16
    params = jax.tree.leaves(nnx.state(stack, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)

  def test_dropout_switches_with_train_and_eval(self):
    stack = self._stack(dropout=0.5)
    x = np.random.default_rng(5).normal(size=(1, 3, 2, 8)).astype(np.float32)
    args = (x, jnp.arange(3)[None], layers.block_causal_mask(jnp.ones((1, 3), bool)))
    assert not np.allclose(stack(*args), stack(*args))  # training: fresh masks
    stack.eval()
    np.testing.assert_array_equal(stack(*args), stack(*args))

  def test_attention_dropout_only_in_training_and_unbiased(self):
    """model.attention_dropout: eval output equals the same block without it; training output
    is random, and its mean over draws is near the eval output (inverted dropout)."""
    with nnx.use_eager_sharding(False):
      mha = layers.MultiHeadAttention(8, 2, dtype=jnp.float32, rngs=nnx.Rngs(0), causal=True,
                                      attention_dropout=0.5)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 6, 1, 8)).astype(np.float32)
    bias = jnp.zeros((2, 2, 6, 6))
    allowed = layers.block_causal_mask(jnp.ones((2, 6), bool))
    draws = np.stack([np.asarray(mha(x, bias, allowed)) for _ in range(400)])
    assert not np.allclose(draws[0], draws[1])
    mha.eval()
    want = np.asarray(mha(x, bias, allowed))
    mha.probs_drop = None
    np.testing.assert_allclose(want, np.asarray(mha(x, bias, allowed)), rtol=1e-6)
    # 400 draws: the mean's error is about 1/20 of one draw's.
    assert np.abs(draws.mean(0) - want).mean() < 0.15 * np.abs(draws[0] - want).mean()

  def test_l2_normalize(self):
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]], jnp.bfloat16)
    y = layers.l2_normalize(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


def test_dense_equals_nnx_linear_bitwise_forward_and_gradients():
  """`layers.Dense` flattens its input to 2-d for speed; on 1-d to 4-d inputs it has the same
  parameters as `nnx.Linear` and the same values, forward and gradients, to the bit (XLA CPU)."""
  with nnx.use_eager_sharding(False):
    ours = layers.dense(16, 24, ('embed', 'mlp'), jnp.float32, nnx.Rngs(3))
    ref = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
  nnx.update(ref, nnx.state(ours, nnx.Param))
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(ref))
  rng = np.random.default_rng(11)
  for shape in [(16,), (5, 16), (3, 7, 16), (2, 3, 5, 16)]:
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    cos = jnp.asarray(rng.normal(size=shape[:-1] + (24,)).astype(np.float32))

    def grads(module):
      graph, params = nnx.split(module)
      loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x)) * cos)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (value, (d_params, d_x)), (value_ref, (d_params_ref, d_x_ref)) = grads(ours), grads(ref)
    assert ours(x).shape == shape[:-1] + (24,)
    np.testing.assert_array_equal(ours(x), ref(x))
    np.testing.assert_array_equal(value, value_ref)
    np.testing.assert_array_equal(d_x, d_x_ref)
    chex.assert_trees_all_equal(d_params, d_params_ref)


def _gradient_temp_bytes(module, x) -> int:
  """Temporaries of the compiled gradient (parameters and input) of `sum(module(x) ** 2)`."""
  graph, params = nnx.split(module)
  loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x) ** 2)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_dense_gradient_holds_no_transposed_copy_where_nnx_linear_does():
  """Why `Dense` exists: on a `[B, T, K, d]` input XLA's CPU backend computes `nnx.Linear`'s
  kernel gradient from a transposed copy of the output gradient (one more `[N, d_out]` float32
  buffer, N = B*T*K, and its copying pass); `Dense`'s compiled gradient holds none."""
  with nnx.use_eager_sharding(False):
    ours = layers.dense(16, 64, ('embed', 'mlp'), jnp.float32, nnx.Rngs(0))
    ref = nnx.Linear(16, 64, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 8, 6, 16))
  one_buffer = 4 * 8 * 6 * 64 * 4
  assert _gradient_temp_bytes(ref, x) - _gradient_temp_bytes(ours, x) >= one_buffer
