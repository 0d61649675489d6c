"""Building blocks of the Hierarchical Causal Transformer (SPEC section 4).

Pure functions (time-gap buckets, masks, attention) and the small modules built on them
(multi-head attention, FFN, post-LN block, a stack of blocks with its own time-gap table).

Every sequence here has the layout `[B, T, K, D]`: T items of K tokens each. The token level
of HCT uses K = the number of token kinds; the item level uses K = 1. The dense attention
(`block_attention`, the reference, and the path of short or non-causal sequences) computes
`[B, H, T, K, T, K]` logits; the causal stacks of HCT run `causal_attention`, which over more
than `DENSE_MAX_ITEMS` items is blockwise (`attention.py`: online softmax over blocks of whole
items, no `L x L` logits in the forward or backward pass). The time-gap bias lives on the T x T
item grid, `bias_BxHxTxT`, broadcast over the K x K token blocks: a per-token `[B, H, L, L]` table
(L = T*K) is never built. Masks are booleans (True = may attend) broadcastable to
`[B, T, K, T, K]` (query item, query kind, key item, key kind).

Parameters name LOGICAL axes only (see `config.DEFAULT_RULES`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from heterrec_jax import attention as attention_lib

# The log base of the time-gap buckets (as HSTU): bucket = floor(ln(gap) / LOG_STEP).
LOG_STEP = 0.301
# A finite "minus infinity" for masked logits (finite so that no row can become NaN).
NEG_INF = attention_lib.NEG_INF
# Items per block of the blockwise attention (`attention.blockwise_attention`): at least
# BLOCK_ITEMS items and at least BLOCK_TOKENS tokens (`block_items_for`), so that a K = 1 item
# level runs 128-item blocks (its attention 1.5x faster than in 32-item ones at the paper's
# T = 256, forward and backward; docs/benchmarks.md) while the K = 6 token level keeps 32.
BLOCK_ITEMS = 32
BLOCK_TOKENS = 128
# 'auto' runs a causal attention over more items than this blockwise, over at most this many
# dense: at two blocks or fewer, blockwise skips little and costs its loop (a whole train step
# of configs/ml100k.py, T = 50: 0.70 s blockwise against 0.65 s dense; at the paper's T = 256
# blockwise is 2.3x faster; docs/benchmarks.md, "Dense or blockwise").
DENSE_MAX_ITEMS = 2 * BLOCK_ITEMS
# Which attention causal blocks use: 'auto' (blockwise above DENSE_MAX_ITEMS items), 'dense'
# or 'blockwise'; set by `attention_impl` (benchmarks compare the two in one process).
ATTENTION_IMPLS = ('auto', 'dense', 'blockwise')
_attention_impl = 'auto'
_block_items: int | None = None  # None: `block_items_for`, read when a function is traced

default_kernel_init = nnx.initializers.lecun_normal()


def block_items_for(kinds: int) -> int:
  """The blockwise attention's default items per block for items of `kinds` tokens."""
  return max(BLOCK_ITEMS, BLOCK_TOKENS // kinds)


def kernel_init(std: float = 0.0):
  """A Linear kernel's init: lecun normal when `std` is 0, else N(0, std) (RecBole's and BERT's
  0.02; `model.linear_std`)."""
  return nnx.initializers.normal(std) if std else default_kernel_init


def time_gap_buckets(ts_BxT: jax.Array, n_buckets: int) -> jax.Array:
  """`clip(floor(ln(max(|ts_a - ts_b|, 1)) / 0.301), 0, n_buckets - 1)`, int32 `[B, T, T]`.

  The gap is taken in the integer dtype of the timestamps (exact), then logged in float32.
  """
  gap_BxTxT = jnp.abs(ts_BxT[:, :, None] - ts_BxT[:, None, :])
  gap_BxTxT = jnp.maximum(gap_BxTxT, 1).astype(jnp.float32)
  bucket_BxTxT = jnp.floor(jnp.log(gap_BxTxT) / LOG_STEP)
  return jnp.clip(bucket_BxTxT, 0, n_buckets - 1).astype(jnp.int32)


def time_gap_bias(table_BtxH: jax.Array, ts_BxT: jax.Array) -> jax.Array:
  """The learned per-head bias of every item pair, `bias_BxHxTxT` (on the item grid)."""
  buckets_BxTxT = time_gap_buckets(ts_BxT, table_BtxH.shape[0])
  return jnp.moveaxis(table_BtxH[buckets_BxTxT], -1, 1)


def item_causal_mask(mask_BxT: jax.Array) -> jax.Array:
  """`allowed_BxTxT[b, t, s]`: item t may attend item s.

  True where s <= t and s is a real item, and always on the diagonal: a padded item attends
  itself only, so no row is fully masked (no NaN) and no real item ever sees a padded one.
  """
  n = mask_BxT.shape[1]
  lower_TxT = jnp.tril(jnp.ones((n, n), bool))
  eye_TxT = jnp.eye(n, dtype=bool)
  return (lower_TxT[None] & mask_BxT[:, None, :].astype(bool)) | eye_TxT[None]


def block_causal_mask(mask_BxT: jax.Array) -> jax.Array:
  """Token (t, k) sees every token of the real items t' <= t (its own item always):
  `[B, T, 1, T, 1]`, broadcast over the K x K token blocks. With K = 1 it is the item-level
  causal mask."""
  return item_causal_mask(mask_BxT)[:, :, None, :, None]


def token_causal_mask(mask_BxT: jax.Array, n_kinds: int) -> jax.Array:
  """The standard causal mask over the flat tokens (the 'w/o HCT' ablation), `[B, T, K, T, K]`.

  Token (t, k) sees the tokens of real items t' < t and the tokens (t, k' <= k) of its own item.
  """
  n = mask_BxT.shape[1]
  strict_TxT = jnp.tril(jnp.ones((n, n), bool), k=-1)
  earlier_BxTxT = strict_TxT[None] & mask_BxT[:, None, :].astype(bool)
  own_KxK = jnp.tril(jnp.ones((n_kinds, n_kinds), bool))
  same_TxKxTxK = jnp.eye(n, dtype=bool)[:, None, :, None] & own_KxK[None, :, None, :]
  return earlier_BxTxT[:, :, None, :, None] | same_TxKxTxK[None]


def block_attention(q_BxTxKxHxD: jax.Array, k_BxTxKxHxD: jax.Array, v_BxTxKxHxD: jax.Array,
                    bias_BxHxTxT: jax.Array, allowed: jax.Array,
                    probs_dropout: nnx.Dropout | None = None) -> jax.Array:
  """Softmax((Q K^T + P_tg) / sqrt(d_head) + M) V over the flattened (item, kind) key axes.

  `bias_BxHxTxT` is added to every K x K token block of its item pair by broadcasting;
  `allowed` (bool, broadcastable to `[B, T, K, T, K]`) is the mask M; `probs_dropout`, if given,
  drops attention probabilities (as RecBole's SASRec). Logits and softmax are float32 whatever
  the input dtype. Returns `[B, T, K, H, D]` in the dtype of `v`.
  """
  b, t, k, h, d = q_BxTxKxHxD.shape
  logits_BxHxTxKxTxK = jnp.einsum('btkhd,bsjhd->bhtksj', q_BxTxKxHxD, k_BxTxKxHxD,
                                  preferred_element_type=jnp.float32)
  bias_BxHxTx1xTx1 = bias_BxHxTxT.astype(jnp.float32)[:, :, :, None, :, None]
  logits_BxHxTxKxTxK = (logits_BxHxTxKxTxK + bias_BxHxTx1xTx1) / math.sqrt(d)
  logits_BxHxTxKxTxK = jnp.where(allowed[:, None], logits_BxHxTxKxTxK, NEG_INF)
  probs_BxHxTxKxL = jax.nn.softmax(logits_BxHxTxKxTxK.reshape(b, h, t, k, t * k), axis=-1)
  if probs_dropout is not None:
    probs_BxHxTxKxL = probs_dropout(probs_BxHxTxKxL)
  probs_BxHxTxKxTxK = probs_BxHxTxKxL.reshape(b, h, t, k, t, k).astype(v_BxTxKxHxD.dtype)
  return jnp.einsum('bhtksj,bsjhd->btkhd', probs_BxHxTxKxTxK, v_BxTxKxHxD)


@contextlib.contextmanager
def attention_impl(name: str, block_items: int | None = None) -> Iterator[None]:
  """Within the context, causal blocks TRACED use attention `name` (one of ATTENTION_IMPLS),
  the blockwise one over blocks of `block_items` items at every level (None: each level's
  `block_items_for`; where 'auto' switches stays DENSE_MAX_ITEMS).

  The choice is made when a function is traced: wrap the first call (or the `lower`) of a
  jitted function, not later calls.
  """
  global _attention_impl, _block_items
  if name not in ATTENTION_IMPLS:
    raise ValueError(f'attention implementation {name!r} is not one of {ATTENTION_IMPLS}')
  if block_items is not None and block_items < 1:
    raise ValueError(f'block_items={block_items} must be >= 1')
  previous = _attention_impl, _block_items
  _attention_impl, _block_items = name, block_items
  try:
    yield
  finally:
    _attention_impl, _block_items = previous


def causal_attention(q_BxTxKxHxD: jax.Array, k_BxTxKxHxD: jax.Array, v_BxTxKxHxD: jax.Array,
                     bias_BxHxTxT: jax.Array, allowed: jax.Array,
                     probs_dropout: nnx.Dropout | None = None) -> jax.Array:
  """`block_attention` for item-causal masks (`allowed[b, t, :, s, :]` False for s > t):
  blockwise over blocks of `block_items_for(K)` items (or `attention_impl`'s; no L x L logits,
  memory linear in T, key blocks after the query block skipped) when the sequence has more than
  DENSE_MAX_ITEMS items, else dense (faster at that length). `probs_dropout` drops attention
  probabilities on either path (blockwise: per block pair, from one key of its stream)."""
  n_items = q_BxTxKxHxD.shape[1]
  blockwise = (_attention_impl == 'blockwise'
               or (_attention_impl == 'auto' and n_items > DENSE_MAX_ITEMS))
  if not blockwise:
    return block_attention(q_BxTxKxHxD, k_BxTxKxHxD, v_BxTxKxHxD, bias_BxHxTxT, allowed,
                           probs_dropout)
  rate, key = 0.0, None
  if probs_dropout is not None and probs_dropout.rate and not probs_dropout.deterministic:
    rate, key = probs_dropout.rate, probs_dropout.rngs()
  block_items = _block_items or block_items_for(q_BxTxKxHxD.shape[2])
  return attention_lib.blockwise_attention(q_BxTxKxHxD, k_BxTxKxHxD, v_BxTxKxHxD, bias_BxHxTxT,
                                           allowed, block_items=block_items,
                                           dropout_rate=rate, dropout_key=key)


class Dense(nnx.Linear):
  """`nnx.Linear` computed on its input flattened to `[N, d_in]` (a free reshape).

  The same parameters and checkpoints as `nnx.Linear`, and the same values (bitwise on its own,
  forward and gradients: `tests/test_layers.py`; inside a compiled step XLA may fuse it with
  its neighbours differently, so a training run's figures can move by float32 rounding), but
  the kernel's gradient is one matmul over the N rows of both operands as they lie: on a
  `[B, T, K, d]` input XLA's CPU backend computes `nnx.Linear`'s from a transposed copy of the
  output gradient (an `[N, d_out]` buffer and a copying pass per layer;
  `tests/test_layers.py`). The paper's-width train step is 12% faster with it (`bench train`,
  docs/benchmarks.md, thirtieth session).
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    *lead, d_in = inputs.shape
    return super().__call__(inputs.reshape(-1, d_in)).reshape(*lead, self.out_features)


def dense(d_in: int, d_out: int, axes: tuple[str | None, str | None], dtype, rngs: nnx.Rngs,
          use_bias: bool = True, std: float = 0.0) -> Dense:
  """A `Dense` layer whose kernel names the logical axes `axes` (its bias: the output axis);
  the kernel starts at `kernel_init(std)`."""
  return Dense(
      d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(kernel_init(std), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


def layer_norm(d: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)))


class Mlp(nnx.Module):
  """Linear -> ReLU -> Linear, `d_in -> d_hidden -> d_out`."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, dtype, rngs: nnx.Rngs,
               std: float = 0.0):
    self.fc1 = dense(d_in, d_hidden, ('embed', 'mlp'), dtype, rngs, std=std)
    self.fc2 = dense(d_hidden, d_out, ('mlp', 'embed'), dtype, rngs, std=std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(x)))


class MultiHeadAttention(nnx.Module):
  """Multi-head self-attention over `[B, T, K, D]` with an item-grid bias (eq. 1, 4, 5).

  `causal=True` promises item-causal masks and lets it run `causal_attention` (blockwise for
  long sequences); otherwise it runs the dense `block_attention` (any mask). Either drops
  attention probabilities when `attention_dropout` > 0.
  """

  def __init__(self, d: int, heads: int, *, dtype, rngs: nnx.Rngs, causal: bool = False,
               std: float = 0.0, attention_dropout: float = 0.0):
    self.heads = heads
    self.causal = causal
    # Only when on: a model without it keeps the state (and checkpoints) it always had.
    self.probs_drop = nnx.Dropout(attention_dropout, rngs=rngs) if attention_dropout else None
    self.query = dense(d, d, ('embed', 'mlp'), dtype, rngs, std=std)
    self.key = dense(d, d, ('embed', 'mlp'), dtype, rngs, std=std)
    self.value = dense(d, d, ('embed', 'mlp'), dtype, rngs, std=std)
    self.out = dense(d, d, ('mlp', 'embed'), dtype, rngs, std=std)

  def __call__(self, x_BxTxKxD: jax.Array, bias_BxHxTxT: jax.Array,
               allowed: jax.Array) -> jax.Array:
    *lead, d = x_BxTxKxD.shape
    split = lambda y: y.reshape(*lead, self.heads, d // self.heads)
    q, k, v = (split(f(x_BxTxKxD)) for f in (self.query, self.key, self.value))
    attend = causal_attention if self.causal else block_attention
    out_BxTxKxHxDh = attend(q, k, v, bias_BxHxTxT, allowed, self.probs_drop)
    return self.out(out_BxTxKxHxDh.reshape(*lead, d))


class TransformerBlock(nnx.Module):
  """Post-LN block (eq. 6-7): `x = LN(x + Drop(MHA(x))); x = LN(x + Drop(FFN(x)))`."""

  def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float, *, dtype,
               rngs: nnx.Rngs, causal: bool = False, std: float = 0.0,
               attention_dropout: float = 0.0):
    self.attention = MultiHeadAttention(d, heads, dtype=dtype, rngs=rngs, causal=causal, std=std,
                                        attention_dropout=attention_dropout)
    self.ffn = Mlp(d, ffn_mult * d, d, dtype=dtype, rngs=rngs, std=std)
    self.norm1 = layer_norm(d, dtype, rngs)
    self.norm2 = layer_norm(d, dtype, rngs)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x_BxTxKxD: jax.Array, bias_BxHxTxT: jax.Array,
               allowed: jax.Array) -> jax.Array:
    x = self.norm1(x_BxTxKxD + self.drop1(self.attention(x_BxTxKxD, bias_BxHxTxT, allowed)))
    return self.norm2(x + self.drop2(self.ffn(x)))


class CausalStack(nnx.Module):
  """`n_blocks` transformer blocks of width `d` sharing one learned time-gap table `[B_t, h]`.

  The bias is computed once per call on the item grid and reused by every block. Its masks must
  be item-causal (every mask of this module is): the blocks run `causal_attention`.
  """

  def __init__(self, d: int, n_blocks: int, *, heads: int, ffn_mult: int, dropout: float,
               time_buckets: int, dtype, rngs: nnx.Rngs, std: float = 0.0,
               attention_dropout: float = 0.0):
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ('buckets', 'heads'))
    self.time_gap = nnx.Param(init(rngs.params(), (time_buckets, heads), jnp.float32))
    self.blocks = nnx.List([TransformerBlock(d, heads, ffn_mult, dropout, dtype=dtype, rngs=rngs,
                                             causal=True, std=std,
                                             attention_dropout=attention_dropout)
                            for _ in range(n_blocks)])

  def __call__(self, x_BxTxKxD: jax.Array, ts_BxT: jax.Array, allowed: jax.Array) -> jax.Array:
    bias_BxHxTxT = time_gap_bias(self.time_gap[...], ts_BxT)
    for block in self.blocks:
      x_BxTxKxD = block(x_BxTxKxD, bias_BxHxTxT, allowed)
    return x_BxTxKxD


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, computed and returned in float32.

  Written with `rsqrt` of the clamped squared norm so the gradient is finite at x = 0 too.
  """
  x = x.astype(jnp.float32)
  squared = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def stacked_init(lead: Sequence[int], std: float = 0.0):
  """lecun_normal over the last two axes of a stack of `lead` kernels (N(0, std) if `std`)."""
  if 0 in lead:  # an empty stack (e.g. no token-loss kinds): nothing to draw
    return nnx.initializers.zeros_init()
  if std:
    return nnx.initializers.normal(std)
  batch_axis = tuple(range(len(lead)))
  return nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=batch_axis)
