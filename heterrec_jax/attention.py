"""Blockwise (flash-style) attention for item-causal masks with an item-grid bias.

`blockwise_attention` computes exactly what `layers.block_attention` computes,
`softmax((Q K^T + P_tg) / sqrt(d_head) + M) V` over `[B, T, K, H, D]` sequences, without ever
building the `[B, H, T, K, T, K]` logits: the T items are cut into blocks of `block_items`
whole items, and for each query block an online softmax (running max, running sum, running
output) visits the key blocks at or before it. The bias `[B, H, T, T]` and the mask are sliced
per (query block, key block) pair from the item grid. The backward pass is a custom VJP that
recomputes each block's probabilities from the saved log-sum-exp (FlashAttention-2), so the
memory of both passes is linear in T for a fixed block size (plus the item-grid bias and mask,
T x T, which the caller holds anyway and which are K^2 times smaller than the logits).
The 1/sqrt(d_head) scale is applied once to Q and to the bias, and an item-grid mask (every
mask but 'w/o HCT''s token-causal one) is folded into the bias as `NEG_INF`, so a block pair's
logits are one matmul plus one broadcast add, with no mask or scale pass over them. Blocks are
held as `[G, L, D]` (G = B * H, L = block tokens) so that every product is a 3-d batched matmul,
and the backward pass produces dK and dV transposed (`[G, D, L]`): XLA's CPU dot runs the 6-d
einsums of the item grid and the contractions over a matrix's leading axis markedly slower.
Together 1.5x on the paper's token-level attention, forward and backward (`bench train
--profile`, docs/benchmarks.md).
Attention dropout, when asked for, is drawn per block pair from one key and drawn again in the
backward pass, so it keeps that bound (`dropout_keep`).

Contract: the mask is item-causal (`allowed[b, t, :, s, :]` is False for s > t); key blocks after
the query block are skipped, not computed. Every mask of `layers` obeys it (block-causal,
item-causal, token-causal); a bidirectional mask (BERT4Rec) must use the dense path.
Masked logits are the same finite `NEG_INF` as the dense path, so a padded item that attends
its own tokens only gives the same result, and no row is ever NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e9  # = layers.NEG_INF (layers imports this module, so it cannot import layers)


def blockwise_attention(q_BxTxKxHxD: jax.Array, k_BxTxKxHxD: jax.Array, v_BxTxKxHxD: jax.Array,
                        bias_BxHxTxT: jax.Array, allowed: jax.Array, *,
                        block_items: int = 32, dropout_rate: float = 0.0,
                        dropout_key: jax.Array | None = None) -> jax.Array:
  """Drop-in for `layers.block_attention` (same arguments and result) for item-causal masks.

  `bias_BxHxTxT` broadcastable to `[B, H, T, T]`; `allowed` a 5-d bool broadcastable to
  `[B, T, K, T, K]`. T is padded up to a multiple of `block_items` (padded keys are masked).
  With `dropout_rate` > 0 the attention probabilities are dropped (kept ones scaled by
  1 / (1 - rate)) with the keep-mask of each (query block i, key block j) pair drawn from
  `fold_in(dropout_key, i * n_blocks + j)` (`dropout_keep`), in the forward pass and again,
  the same, in the backward pass: no mask larger than one block pair is ever held.
  """
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate={dropout_rate} must be in [0, 1)')
  if dropout_rate and dropout_key is None:
    raise ValueError('dropout_rate > 0 needs a dropout_key')
  b, t, k, h, d = q_BxTxKxHxD.shape
  bt = min(block_items, t)
  n = -(-t // bt)
  pad = n * bt - t
  bias_BxHxTpxTp = jnp.pad(jnp.broadcast_to(bias_BxHxTxT.astype(jnp.float32), (b, h, t, t)),
                           ((0, 0), (0, 0), (0, pad), (0, pad)))
  allowed = jnp.broadcast_to(allowed, (b, t, allowed.shape[2], t, allowed.shape[4]))
  allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0), (0, pad), (0, 0)))

  def to_blocks(x_BxTxKxHxD):  # -> [n, B*H, bt*K, D]: every einsum below is a 3-d matmul
    x = jnp.pad(x_BxTxKxHxD, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    return x.reshape(b, n, bt, k, h, d).transpose(1, 0, 4, 2, 3, 5).reshape(n, b * h, bt * k, d)

  key = dropout_key if dropout_rate else None
  scale = 1.0 / math.sqrt(d)
  q_scaled = (q_BxTxKxHxD.astype(jnp.float32) * scale).astype(q_BxTxKxHxD.dtype)
  bias_BxHxTpxTp = bias_BxHxTpxTp * scale
  if allowed.shape[2] == 1 and allowed.shape[4] == 1:  # an item-grid mask goes into the bias
    bias_BxHxTpxTp = jnp.where(allowed[:, None, :, 0, :, 0], bias_BxHxTpxTp, NEG_INF)
    allowed = None
  out_NxGxLxD = _flash(to_blocks(q_scaled), to_blocks(k_BxTxKxHxD), to_blocks(v_BxTxKxHxD),
                       bias_BxHxTpxTp, allowed, key, dropout_rate, k)
  out_BxTxKxHxD = (out_NxGxLxD.reshape(n, b, h, bt, k, d).transpose(1, 0, 3, 4, 2, 5)
                   .reshape(b, n * bt, k, h, d))
  return out_BxTxKxHxD[:, :t]


def _block_logits(q_GxLxD, k_GxLxD, bias_BxHxTxT, allowed, i, j, kinds):
  """Float32 logits of query block i against key block j, `[G, L, L]` (G = B*H groups, L =
  t*K tokens a block), and the mask block (same shape, or None). Q and the bias arrive
  scaled; with `allowed` None the bias already holds the mask (`NEG_INF`)."""
  b, h = bias_BxHxTxT.shape[:2]
  g, l, _ = q_GxLxD.shape
  bt = l // kinds
  logits = jnp.einsum('gtd,gsd->gts', q_GxLxD, k_GxLxD, preferred_element_type=jnp.float32)
  bias_BxHxtxt = lax.dynamic_slice(bias_BxHxTxT, (0, 0, i * bt, j * bt), (b, h, bt, bt))
  logits = (logits.reshape(b, h, bt, kinds, bt, kinds)
            + bias_BxHxtxt[:, :, :, None, :, None]).reshape(g, l, l)
  if allowed is None:
    return logits, None
  a, c = allowed.shape[2], allowed.shape[4]
  ok = lax.dynamic_slice(allowed, (0, i * bt, 0, j * bt, 0), (b, bt, a, bt, c))[:, None]
  ok = jnp.broadcast_to(ok, (b, h, bt, kinds, bt, kinds)).reshape(g, l, l)
  return jnp.where(ok, logits, NEG_INF), ok


def dropout_keep(key: jax.Array, rate: float, i, j, n_blocks: int, shape) -> jax.Array:
  """The dropout multipliers of the (query block i, key block j) pair, float32 `shape`
  (`[B, H, t, K, t, K]`): 1 / (1 - rate) where kept, 0 where dropped."""
  keep = jax.random.bernoulli(jax.random.fold_in(key, i * n_blocks + j), 1.0 - rate, shape)
  return keep.astype(jnp.float32) / (1.0 - rate)


def _keep(key, rate, i, j, n_blocks, bias, kinds, shape_GxLxL):
  """`dropout_keep` of the pair, drawn as `[B, H, t, K, t, K]`, as `[G, L, L]`."""
  b, h = bias.shape[:2]
  bt = shape_GxLxL[1] // kinds
  return dropout_keep(key, rate, i, j, n_blocks, (b, h, bt, kinds, bt, kinds)).reshape(
      shape_GxLxL)


def _forward_block(q_GxLxD, i, k_NxGxLxD, v_NxGxLxD, bias, allowed, key, rate, kinds):
  """Online softmax of query block i over key blocks 0..i: (output `[G, L, D]` in v's dtype,
  log-sum-exp `[G, L]` float32). The sum runs over the undropped probabilities; the output
  over the dropped ones."""
  shape = q_GxLxD.shape[:-1]
  v_dtype = v_NxGxLxD.dtype
  n = k_NxGxLxD.shape[0]

  def body(j, carry):
    m, l, acc = carry
    s, _ = _block_logits(q_GxLxD, k_NxGxLxD[j], bias, allowed, i, j, kinds)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    scale = jnp.exp(m - m_new)
    kept = p if key is None else p * _keep(key, rate, i, j, n, bias, kinds, p.shape)
    pv = jnp.einsum('gts,gsd->gtd', kept.astype(v_dtype), v_NxGxLxD[j],
                    preferred_element_type=jnp.float32)
    return m_new, l * scale + p.sum(axis=-1), acc * scale[..., None] + pv

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(q_GxLxD.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, i + 1, body, init)
  return (acc / l[..., None]).astype(v_dtype), m + jnp.log(l)


def _forward(q, k, v, bias, allowed, key, rate, kinds):
  def step(_, xs):
    q_i, i = xs
    return None, _forward_block(q_i, i, k, v, bias, allowed, key, rate, kinds)

  _, (out, lse) = lax.scan(step, None, (q, jnp.arange(q.shape[0])))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, bias, allowed, key, rate, kinds):
  return _forward(q, k, v, bias, allowed, key, rate, kinds)[0]


def _flash_fwd(q, k, v, bias, allowed, key, rate, kinds):
  out, lse = _forward(q, k, v, bias, allowed, key, rate, kinds)
  return out, (q, k, v, bias, allowed, key, out, lse)


def _backward_pair(q_i, do_i, lse_i, delta_i, k_j, v_j, bias, allowed, i, j, key, rate, n,
                   kinds):
  """Gradients of one (query block i, key block j) pair: (dq_i, dk_j^T, dv_j^T, dbias_ij), dk
  and dv transposed (`[G, D, L]`: XLA's CPU dot runs that form faster than `[G, L, D]`, which
  contracts over the matrices' leading axis).

  With dropout (multipliers z): out = (p z) v, so dv = (p z)^T do, dp = (do v^T) z, and the
  softmax's `delta = rowsum(do * out)` is the same expression on the dropped output."""
  s, ok = _block_logits(q_i, k_j, bias, allowed, i, j, kinds)
  p = jnp.exp(s - lse_i[..., None])
  f32 = jnp.float32
  z = None if key is None else _keep(key, rate, i, j, n, bias, kinds, p.shape)
  kept = p if z is None else p * z
  dv_t = jnp.einsum('gtd,gts->gds', do_i, kept.astype(do_i.dtype), preferred_element_type=f32)
  dp = jnp.einsum('gtd,gsd->gts', do_i, v_j, preferred_element_type=f32)
  if z is not None:
    dp = dp * z
  ds = p * (dp - delta_i[..., None])
  if ok is not None:
    ds = jnp.where(ok, ds, 0.0)
  dq_i = jnp.einsum('gts,gsd->gtd', ds.astype(k_j.dtype), k_j, preferred_element_type=f32)
  dk_t = jnp.einsum('gtd,gts->gds', q_i, ds.astype(q_i.dtype), preferred_element_type=f32)
  b, h = bias.shape[:2]
  bt = s.shape[1] // kinds
  dbias = ds.reshape(b, h, bt, kinds, bt, kinds).sum(axis=(3, 5))
  return dq_i, dk_t, dv_t, dbias


def _flash_bwd(rate, kinds, res, do):
  q, k, v, bias, allowed, key, out, lse = res
  n, bt = q.shape[0], q.shape[2] // kinds
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def outer(i, carry):
    dq, dk_t, dv_t, dbias = carry

    def inner(j, c):
      dq_i, dk_t, dv_t, dbias = c
      dq_ij, dk_tj, dv_tj, dbias_ij = _backward_pair(q[i], do[i], lse[i], delta[i], k[j], v[j],
                                                     bias, allowed, i, j, key, rate, n, kinds)
      dk_t = dk_t.at[j].add(dk_tj)
      dv_t = dv_t.at[j].add(dv_tj)
      dbias = lax.dynamic_update_slice(dbias, dbias_ij, (0, 0, i * bt, j * bt))
      return dq_i + dq_ij, dk_t, dv_t, dbias

    init = (jnp.zeros(q.shape[1:], jnp.float32), dk_t, dv_t, dbias)
    dq_i, dk_t, dv_t, dbias = lax.fori_loop(0, i + 1, inner, init)
    return dq.at[i].set(dq_i), dk_t, dv_t, dbias

  zeros = lambda shape: jnp.zeros(shape, jnp.float32)
  transposed = (n, k.shape[1], k.shape[3], k.shape[2])  # [n, G, D, L]
  dq, dk_t, dv_t, dbias = lax.fori_loop(
      0, n, outer, (zeros(q.shape), zeros(transposed), zeros(transposed), zeros(bias.shape)))
  return (dq.astype(q.dtype), dk_t.swapaxes(2, 3).astype(k.dtype),
          dv_t.swapaxes(2, 3).astype(v.dtype), dbias.astype(bias.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
