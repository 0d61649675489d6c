"""Softmax losses of the baselines (SPEC section 8) that are not LMP's one-step case, as pure,
vectorised JAX functions: BERT4Rec's Cloze (full and in-batch) and PinnerFormer's dense
all-action loss with in-batch negatives, and the in-batch next-item softmax they share (the
reference that `losses.make`'s 'in_batch' next-item loss is tested against).

Shapes: B sequences, T query positions, W = window length (T + n_step), D width, C = B*W
candidate positions, N corpus rows. Queries and targets are L2-normalised; logits are
`<q, v> / tau`. A sampled-softmax term is, in log space,

  -log( e^{s+/tau} / (e^{s+/tau} + sum_neg e^{s-/tau}) )       (no null logit)

Choices where SPEC is silent:
  * In-batch negatives are every real target position (c, w >= 1) of the batch, each position
    counted once (a popular item present twice is two negatives, as in-batch softmax usually
    is); a negative whose item equals the positive's is masked (accidental hit), the positive's
    own position included.
  * Every loss is a mean over its counted terms; none counted gives 0, never NaN. Masked logits
    are the finite `layers.NEG_INF`.
  * The dense all-action loss averages over all valid (t, t + j) pairs of every offset j at
    once (not per offset); it loops over the n_step offsets in Python (static, small), each
    offset one batched op against the candidate logits computed once.
  * `cloze_loss` is the full softmax over the whole item corpus (rows 1..n_items, padding
    excluded), as in the BERT4Rec paper.
  * BERT4Rec under loss.name='sampled_softmax': the positive of a [MASK]ed position is the
    original item at that position; its negatives are every real position of the batch's
    Cloze windows (position 0 included: no next-item shift here), accidental hits masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from heterrec_jax import layers
from heterrec_jax.config import LossConfig

def masked_mean(x_BxT: jax.Array, counted_BxT: jax.Array) -> jax.Array:
  """Mean of `x` where counted (0 when nothing is counted)."""
  total = jnp.sum(jnp.where(counted_BxT, x_BxT, 0.0))
  return total / jnp.maximum(jnp.sum(counted_BxT), 1).astype(jnp.float32)


def candidates(targets_BxWxD: jax.Array, items_BxW: jax.Array, real_BxW: jax.Array,
               first: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The flattened in-batch candidates: (vectors `[C, D]`, items `[C]`, usable `[C]`), usable
  where the position is real and its index w >= `first`."""
  b, w, d = targets_BxWxD.shape
  usable_BxW = real_BxW.astype(bool) & (jnp.arange(w) >= first)[None]
  return targets_BxWxD.reshape(b * w, d), items_BxW.reshape(-1), usable_BxW.reshape(-1)


def in_batch_nll(pos_BxT: jax.Array, pos_items_BxT: jax.Array, neg_BxTxC: jax.Array,
                 cand_items_C: jax.Array, usable_C: jax.Array, tau: float) -> jax.Array:
  """`logaddexp(s+/tau, logsumexp(s-/tau)) - s+/tau` per position, `[B, T]`; the negatives are
  the usable candidates whose item is not the positive's."""
  ok_BxTxC = usable_C[None, None] & (cand_items_C[None, None] != pos_items_BxT[..., None])
  neg_BxTxC = jnp.where(ok_BxTxC, neg_BxTxC.astype(jnp.float32) / tau, layers.NEG_INF)
  pos_BxT = pos_BxT.astype(jnp.float32) / tau
  return jnp.logaddexp(pos_BxT, jax.nn.logsumexp(neg_BxTxC, axis=-1)) - pos_BxT


def _offset_terms(q_BxTxD, targets_BxWxD, items_BxW, mask_BxW, neg_BxTxC, cand, j, tau):
  """(nll `[B, T]`, valid `[B, T]`) of the pairs (t, t + j)."""
  t = q_BxTxD.shape[1]
  pos_BxT = jnp.einsum('btd,btd->bt', q_BxTxD, targets_BxWxD[:, j:t + j])
  valid_BxT = mask_BxW[:, :t].astype(bool) & mask_BxW[:, j:t + j].astype(bool)
  nll_BxT = in_batch_nll(pos_BxT, items_BxW[:, j:t + j], neg_BxTxC, cand[1], cand[2], tau)
  return nll_BxT, valid_BxT


def _check_window(q_BxTxD: jax.Array, targets_BxWxD: jax.Array, n_step: int) -> None:
  t, w = q_BxTxD.shape[1], targets_BxWxD.shape[1]
  if w < t + n_step:
    raise ValueError(f'targets cover {w} positions; queries of {t} positions need at least '
                     f'{t} + {n_step}')


def sampled_softmax_loss(queries_BxTxD: jax.Array, targets_BxWxD: jax.Array,
                         items_BxW: jax.Array, mask_BxW: jax.Array, tau: float) -> jax.Array:
  """Next-item in-batch sampled softmax (HSTU's public SASRec): positive `<q[b,t], v[b,t+1]>`
  where t and t+1 are real; negatives every real target position (c, w >= 1) of the batch
  but the positive's item; mean over the counted positions."""
  _check_window(queries_BxTxD, targets_BxWxD, 1)
  cand = candidates(targets_BxWxD, items_BxW, mask_BxW)
  neg_BxTxC = jnp.einsum('btd,cd->btc', queries_BxTxD, cand[0])
  nll_BxT, valid_BxT = _offset_terms(queries_BxTxD, targets_BxWxD, items_BxW, mask_BxW,
                                     neg_BxTxC, cand, 1, tau)
  return masked_mean(nll_BxT, valid_BxT)


def dense_all_action_loss(queries_BxTxD: jax.Array, targets_BxWxD: jax.Array,
                          items_BxW: jax.Array, mask_BxW: jax.Array, n_step: int,
                          tau: float) -> jax.Array:
  """PinnerFormer: the query at t predicts EVERY real event of (t, t + n_step], each pair a
  sampled softmax against the in-batch candidates (w >= 1, accidental hits masked); the mean
  over all valid pairs."""
  _check_window(queries_BxTxD, targets_BxWxD, n_step)
  cand = candidates(targets_BxWxD, items_BxW, mask_BxW)
  neg_BxTxC = jnp.einsum('btd,cd->btc', queries_BxTxD, cand[0])
  total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  for j in range(1, n_step + 1):
    nll_BxT, valid_BxT = _offset_terms(queries_BxTxD, targets_BxWxD, items_BxW, mask_BxW,
                                       neg_BxTxC, cand, j, tau)
    total += jnp.sum(jnp.where(valid_BxT, nll_BxT, 0.0))
    count += jnp.sum(valid_BxT)
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def cloze_loss(queries_BxTxD: jax.Array, corpus_NxD: jax.Array, items_BxT: jax.Array,
               cloze_mask_BxT: jax.Array, tau: float,
               label_smoothing: float = 0.0) -> jax.Array:
  """BERT4Rec's masked-item loss, the FULL softmax of its paper: at every [MASK]ed position,
  cross-entropy of the original item against every item of the corpus (rows 1..n_items of
  `corpus_NxD`; row 0, the padding item, excluded), logits `<q, v> / tau`; with
  `label_smoothing` eps the target puts eps evenly on the corpus's items."""
  logits_BxTxN = jnp.einsum('btd,nd->btn', queries_BxTxD, corpus_NxD[1:],
                            preferred_element_type=jnp.float32) / tau
  label_BxT = jnp.clip(items_BxT - 1, 0, corpus_NxD.shape[0] - 2)
  picked_BxT = jnp.take_along_axis(logits_BxTxN, label_BxT[..., None], axis=-1)[..., 0]
  if label_smoothing:
    picked_BxT = ((1.0 - label_smoothing) * picked_BxT
                  + label_smoothing * jnp.mean(logits_BxTxN, axis=-1))
  return masked_mean(jax.nn.logsumexp(logits_BxTxN, axis=-1) - picked_BxT,
                     cloze_mask_BxT.astype(bool))


def masked_sampled_softmax_loss(queries_BxTxD: jax.Array, targets_BxTxD: jax.Array,
                                items_BxT: jax.Array, real_BxT: jax.Array,
                                cloze_mask_BxT: jax.Array, tau: float) -> jax.Array:
  """BERT4Rec under the in-batch sampled softmax: positive `<q[b,t], v[b,t]>` at the masked
  positions; negatives every real position of the batch (w >= 0) but the positive's item."""
  cand = candidates(targets_BxTxD, items_BxT, real_BxT, first=0)
  pos_BxT = jnp.einsum('btd,btd->bt', queries_BxTxD, targets_BxTxD)
  neg_BxTxC = jnp.einsum('btd,cd->btc', queries_BxTxD, cand[0])
  nll_BxT = in_batch_nll(pos_BxT, items_BxT, neg_BxTxC, cand[1], cand[2], tau)
  return masked_mean(nll_BxT, cloze_mask_BxT.astype(bool))
