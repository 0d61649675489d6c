"""The seen-item term (`model.seen_bias`; off by default, in neither the paper nor the reference
baselines): a learned score offset for a candidate that is in the query's own input,

    score(u, i) = <u, v_i> + w[k]   if item i is among u's inputs, k = the recency bucket of its
                                    latest occurrence (1, 2-3, 4-7, ... events back);
    score(u, i) = <u, v_i>          otherwise.

Why: a dot-product user tower cannot take the items of its own input out of its ranking. The
next item is near the inputs in the vector space, so the inputs score high too, and under the
history-kept evaluation of RecBole (and this project, SPEC 7) they take places in the top-k.
w is learned from the data, one scalar per bucket: negative where users rarely come back to an
item (ml-100k rates a movie once), positive where they often do (repeat purchases, music).

Training: the term enters the whole-catalogue softmax at the item level (`loss.negatives='all'`).
With the catalogue's logsumexp L over raw logits (`lmp.catalogue_logsumexp`) and
a_j = exp(s_j - L) the softmax mass of input j, the biased logsumexp is

    L' = L + log((1 - sum_j a_j) + sum_j a_j e^{w_j}),

the non-input mass floored at `FLOOR` (it can only vanish when the inputs hold all of the
softmax's mass). Evaluation adds w to the inputs' scores (`retrieval`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

BUCKETS = 8  # 1, 2-3, 4-7, ..., 64-127, >= 128 events back
FLOOR = 1e-6  # the least non-input softmax mass the biased logsumexp keeps
# w = SCALE * theta, theta the parameter. Adam moves a parameter by about the learning rate a
# step, so w itself would move by about 1e-3 a step: on ml-100k it was still at that limit
# when early stopping ended the run (|w| 1.5 after 1,600 steps, 2.9 after 4,000).
SCALE = 10.0


class SeenBias(nnx.Module):
  """The offsets w = SCALE * theta `[BUCKETS]`, float32, starting at 0 (the model without the
  term)."""

  def __init__(self):
    init = nnx.with_partitioning(nnx.initializers.zeros_init(), (None,))
    self.theta = nnx.Param(init(jax.random.key(0), (BUCKETS,), jnp.float32))

  def __call__(self) -> jax.Array:
    return SCALE * self.theta[...]


def bucket(distance: jax.Array) -> jax.Array:
  """The recency bucket of an input `distance` >= 1 events back: floor(log2(d)), capped."""
  d = jnp.maximum(distance, 1).astype(jnp.float32)
  return jnp.minimum(jnp.floor(jnp.log2(d)).astype(jnp.int32), BUCKETS - 1)


def query_history(items_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(counted `[B, T, T]` bool, bucket `[B, T, T]` int32) of the query at input position t
  over the inputs j: j counts where j <= t, it is real and its item does not occur again in
  (j, t] (each item once, at its latest occurrence); its bucket is that of t - j + 1."""
  t = items_BxT.shape[1]
  real_BxT = mask_BxT.astype(bool)
  pos_T = jnp.arange(t)
  same_BxJxK = ((items_BxT[:, :, None] == items_BxT[:, None, :])
                & real_BxT[:, :, None] & real_BxT[:, None, :])
  later_JxK = pos_T[None, :] > pos_T[:, None]
  next_BxJ = jnp.min(jnp.where(same_BxJxK & later_JxK, pos_T, t), axis=-1)
  q_T1, j_1T = pos_T[:, None], pos_T[None, :]
  counted_BxTxJ = ((j_1T <= q_T1)[None] & real_BxT[:, None, :]
                   & (q_T1[None] < next_BxJ[:, None, :]))
  return counted_BxTxJ, jnp.broadcast_to(bucket(q_T1 - j_1T + 1), counted_BxTxJ.shape)


def input_offsets(w_K: jax.Array, items_BxT: jax.Array,
                  mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(offsets `[B, T, T]` float32: w of input j for the query at t where j counts, else 0;
  counted `[B, T, T]` bool, `query_history`'s)."""
  counted_BxTxJ, bucket_BxTxJ = query_history(items_BxT, mask_BxT)
  return jnp.where(counted_BxTxJ, w_K[bucket_BxTxJ], 0.0), counted_BxTxJ


def biased_logsumexp(lse_xBxT: jax.Array, s_xBxTxJ: jax.Array, offset_BxTxJ: jax.Array,
                     counted_BxTxJ: jax.Array) -> jax.Array:
  """The catalogue's logsumexp `[..., B, T]` (over raw logits) with the inputs' logits
  `s_xBxTxJ` (already / tau) raised by `offset_BxTxJ` where counted (module docstring)."""
  a_xBxTxJ = jnp.where(counted_BxTxJ, jnp.exp(s_xBxTxJ - lse_xBxT[..., None]), 0.0)
  rest_xBxT = jnp.maximum(1.0 - jnp.sum(a_xBxTxJ, axis=-1), FLOOR)
  seen_xBxT = jnp.sum(a_xBxTxJ * jnp.exp(offset_BxTxJ), axis=-1)
  return lse_xBxT + jnp.log(rest_xBxT + seen_xBxT)


def last_query_offsets(w_K: jax.Array, items_BxT: jax.Array,
                       mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(item ids `[B, T]` (0 where not counted), offsets `[B, T]`) of the query after the last,
  right-aligned, input: each input item once, at its latest occurrence."""
  offset_BxTxJ, counted_BxTxJ = input_offsets(w_K, items_BxT, mask_BxT)
  counted_BxJ = counted_BxTxJ[:, -1]
  return jnp.where(counted_BxJ, items_BxT, 0), offset_BxTxJ[:, -1]
