"""The Listwise Multi-step Prediction (LMP) loss of HeterRec (SPEC section 6) as pure JAX
functions, for every negative source of `negatives.py`. The next-item softmax of the baselines
is its one-step case (`losses.py`).

Shapes: N = n_step, B sequences, T query positions, W = window length (T + N), D width,
S sub-ids of a key, M pool slots. Positions are 0-based: at step i the query at position t
predicts the target at position t + i. Step loss (eq. 8-12), in log space:

  L_i = mean over counted (b, t) of  logsumexp([log c, s+/tau, s-/tau ...]) - s+/tau

with c = `null_logit_c` (c = 0: no term). All steps are computed at once (a leading N axis,
one einsum for all steps); only the token kinds are a Python loop (their n_sub differ). Masks,
not the layout, say which events are real: right-aligned windows are not assumed.

Choices where SPEC is silent:
  * T is read from the queries (`queries.shape[2]`); targets may be longer than T + N.
  * Shared sources ('all', 'uniform', 'in_batch', 'mixed', 'batch_pool'): ONE candidate set
    per call, shared by every step and query; `Shared` is its view at one level (vectors,
    keys, usable). Catalogue candidates carry their item id and tokens as keys, so an
    accidental hit is masked exactly as for batch candidates. log-Q (item level only; the
    token level has no sampling distribution of its own) subtracts log E(i) from the positive
    and from every candidate logit (`negatives.py`).
  * 'batch_pool' (`negatives.sample_pool`): ONE pool per call, shared by every step, query and token kind (the token
    level uses the token vectors and token ids of the same pool positions). Candidates are the
    real positions w >= 1 of the batch. The pool has the static size
    M = min(pool_size, B * (W - 1)) and is drawn uniformly WITHOUT replacement (a uniform random
    key per position, non-candidates keyed below every candidate, then `top_k`); when there
    are fewer candidates than M, the extra slots hold non-candidates and are masked as padding.
    The pool may contain the positive's own position: it is masked as an accidental hit.
  * The margin gate of step i > 1 is not chained: it compares with the step-(i-1) positive
    logit of the same (b, t) whatever the gate of step i-1 decided. It also requires that
    positive to exist (mask[b, t + i - 1]); with right-aligned windows this always holds.
  * Token level, kind s: a negative is masked when it is the positive's item OR has the same
    token of kind s (all n_sub sub-ids equal). The gate of step i uses the token-level positive
    logits of kind s at steps i - 1 and i (each level is gated by its own logits).
  * Token level under 'all' (`TokenVocab`, built by `losses.make`): a kind's vector is a
    function of its token, and every item sharing the positive's token is masked, so the
    softmax over the catalogue's items equals one over the kind's distinct tokens, each
    weighted by its number of items (log count added to its logit), the positive's token
    skipped and the positive counted once; reduced in chunks like the item level. Called
    without the vocabulary, `lmp_loss` takes the item-by-item form (`[N, B, T, C]` logits
    and hit masks), the reference it is tested against.
  * Label smoothing (`loss.label_smoothing` eps, item level under 'all' only): the counted
    term is lse - ((1 - eps) s+ + eps mean_c s_c) / tau, the cross-entropy against a target
    with eps spread evenly over the catalogue; mean_c s_c is the query against the mean item
    vector. The margin gate reads the unsmoothed s+.
  * A step with no counted position contributes 0 (never NaN). Masked logits are the finite
    `layers.NEG_INF`.
  * aux 'token_loss' (and 'token_loss_step{i}') is the UNWEIGHTED sum over kinds and steps;
    the loss is `item_loss + w_tok * token_loss`. 'gate_fraction_step{i}' (i > 1) is of the
    item level: counted / valid positions (1 with the gate off, 0 when nothing is valid).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from heterrec_jax.config import LossConfig
from heterrec_jax.layers import NEG_INF
from heterrec_jax import negatives as negatives_lib, seen
from heterrec_jax.negatives import Negatives

@dataclasses.dataclass(frozen=True)
class Shared:
  """The shared candidates of one level: vectors `[C, D]`, keys (one int `[C, S_j]` per key,
  compared with the positive's for accidental hits), usable `[C]` bool, and the log-Q
  correction `[C]` (or None)."""
  vectors: jax.Array
  keys: tuple[jax.Array, ...]
  ok: jax.Array
  log_q: jax.Array | None = None
  # Every item of the catalogue once, keys = item ids only: the positive is one of the
  # candidates, so the softmax needs no hit mask (denominator = c + sum over all items).
  whole_catalogue: bool = False
  # The token level over the whole catalogue (`TokenVocab`): with `whole_catalogue`, the
  # candidates carry a log multiplicity `[C]` and a key `[C]`; the query at (b, t) of step i
  # skips the candidates whose key is `query_key_BxW[b, t + i]` (its positive's token), and
  # its positive is added once.
  log_weight: jax.Array | None = None
  key: jax.Array | None = None
  query_key_BxW: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class TokenVocab:
  """The whole catalogue at the token level of one kind, each distinct token once.

  A kind's token vector is a function of its sub-ids alone (the same token, the same vector),
  and the loss masks every item that shares the positive's token, so the softmax over the
  catalogue's items is one over its distinct tokens, each weighted by how many items carry it:
  `rows [U]` (the catalogue row of one item per distinct token), `log_count [U]`, `key [U]`
  (the token's index) and `key_of_item [n_items + 1]` (the token index of every item, -1 for
  the padding item). For a kind whose vector reads the item itself (the raw embedding of
  'w/o MFK'), every item is its own candidate (count 1) keyed by its token.
  """
  rows: jax.Array
  log_count: jax.Array
  key: jax.Array
  key_of_item: jax.Array


def token_vocab(item_tokens: np.ndarray, offset: int, n_sub: int,
                reads_items: bool = False) -> TokenVocab:
  """The `TokenVocab` of the kind in columns `offset:offset + n_sub` of the token table
  `[n_items + 1, S]` (row 0 the padding item)."""
  tokens_CxS = np.asarray(item_tokens)[1:, offset:offset + n_sub]
  _, first_U, inverse_C, counts_U = np.unique(tokens_CxS, axis=0, return_index=True,
                                              return_inverse=True, return_counts=True)
  inverse_C = inverse_C.reshape(-1).astype(np.int32)
  key_of_item = np.concatenate([[-1], inverse_C]).astype(np.int32)
  if reads_items:
    rows, log_count, key = np.arange(len(inverse_C)), np.zeros(len(inverse_C)), inverse_C
  else:
    rows, log_count, key = first_U, np.log(counts_U), np.arange(len(counts_U))
  return TokenVocab(jnp.asarray(rows, jnp.int32), jnp.asarray(log_count, jnp.float32),
                    jnp.asarray(key, jnp.int32), jnp.asarray(key_of_item))


def is_whole_catalogue(negatives: Negatives | None) -> bool:
  """The 'all' source: every catalogue item, nothing from the batch, no log-Q."""
  return (negatives is not None and negatives.items is not None and negatives.index is None
          and not negatives.n_uniform and negatives.log_freq is None)


def _gather(x_BxWx: jax.Array, index_M: jax.Array) -> jax.Array:
  """Rows of the flattened B*W positions: `[B, W, ...] -> [M, ...]`."""
  return x_BxWx.reshape(-1, *x_BxWx.shape[2:])[index_M]


def _shifted(x_BxWx: jax.Array, n: int, t: int) -> jax.Array:
  """The target positions of every step: `out[i-1, b, t] = x[b, t + i]`, `[N, B, T, ...]`."""
  return jnp.stack([x_BxWx[:, i:i + t] for i in range(1, n + 1)])


def shared_level(negatives: Negatives, targets_BxWxD: jax.Array, keys: tuple[jax.Array, ...],
                 catalogue_vectors: jax.Array | None,
                 catalogue_keys: tuple[jax.Array, ...] | None) -> Shared:
  """One level's view of a shared candidate set: the batch part (rows `negatives.index` of the
  level's targets and keys) then the catalogue part (the given vectors `[Cu, D]` and keys)."""
  vectors, key_parts, ok = [], [[] for _ in keys], []
  if negatives.index is not None:
    vectors.append(_gather(targets_BxWxD, negatives.index))
    for parts, k in zip(key_parts, keys):
      parts.append(_gather(k, negatives.index))
    ok.append(negatives.index_ok)
  if negatives.items is not None:
    vectors.append(catalogue_vectors.astype(targets_BxWxD.dtype))
    for parts, k in zip(key_parts, catalogue_keys):
      parts.append(k)
    ok.append(jnp.ones(catalogue_vectors.shape[0], bool))
  cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
  return Shared(cat(vectors), tuple(cat(p) for p in key_parts), cat(ok))


def lmp_step_logits(q_NxBxTxD: jax.Array, targets_BxWxD: jax.Array,
                    shared: Shared | None = None) -> tuple[jax.Array, jax.Array]:
  """Dot products (not divided by tau) of every step: positives `[N, B, T]` and negatives,
  `[N, B, T, B]` (target position t + i of every sequence c) or `[N, B, T, C]` (shared)."""
  n, _, t, _ = q_NxBxTxD.shape
  tgt_NxBxTxD = _shifted(targets_BxWxD, n, t)
  pos_NxBxT = jnp.einsum('nbtd,nbtd->nbt', q_NxBxTxD, tgt_NxBxTxD)
  if shared is None:
    return pos_NxBxT, jnp.einsum('nbtd,nctd->nbtc', q_NxBxTxD, tgt_NxBxTxD)
  return pos_NxBxT, jnp.einsum('nbtd,cd->nbtc', q_NxBxTxD, shared.vectors)


def _hits(keys_pos: list[jax.Array], keys_neg: list[jax.Array]) -> jax.Array:
  """True where, for some key, every sub-id of the negative equals the positive's."""
  same = [jnp.all(a == b, axis=-1) for a, b in zip(keys_pos, keys_neg)]
  return functools.reduce(jnp.logical_or, same)


def negative_mask(keys: tuple[jax.Array, ...], mask_BxW: jax.Array, n: int, t: int,
                  shared: Shared | None = None) -> jax.Array:
  """Which negatives count, `[N, B, T, B]` or `[N, B, T, C]`: real, not the query's own
  sequence (same_position), no accidental hit on any of `keys` (each int `[B, W, S_j]`)."""
  keys_pos = [_shifted(k, n, t)[:, :, :, None] for k in keys]
  if shared is None:
    b = mask_BxW.shape[0]
    keys_neg = [jnp.swapaxes(_shifted(k, n, t), 1, 2)[:, None] for k in keys]
    real_Nx1xTxC = jnp.swapaxes(_shifted(mask_BxW, n, t), 1, 2)[:, None]
    ok = real_Nx1xTxC & ~jnp.eye(b, dtype=bool)[:, None, :]
  else:
    keys_neg = [k[None, None, None] for k in shared.keys]
    ok = shared.ok[None, None, None]
  return ok & ~_hits(keys_pos, keys_neg)


def step_loss(pos_xBxT: jax.Array, neg_xBxTxN: jax.Array, neg_ok_xBxTxN: jax.Array,
              counted_xBxT: jax.Array, tau: float, null_logit_c: float,
              pos_log_q: jax.Array | None = None, neg_log_q: jax.Array | None = None
              ) -> jax.Array:
  """`-log(e^{s+/tau} / (c + e^{s+/tau} + sum_ok e^{s-/tau}))` averaged over the counted
  positions (0 when none), computed with logsumexp; leading axes (steps) are kept. With
  log-Q, `pos_log_q` (broadcast to `pos`) and `neg_log_q` `[N]` are subtracted first."""
  pos_xBxT = pos_xBxT / tau
  neg_xBxTxN = neg_xBxTxN / tau
  if pos_log_q is not None:
    pos_xBxT, neg_xBxTxN = pos_xBxT - pos_log_q, neg_xBxTxN - neg_log_q
  parts = [pos_xBxT[..., None], jnp.where(neg_ok_xBxTxN, neg_xBxTxN, NEG_INF)]
  if null_logit_c > 0:
    parts.append(jnp.full_like(parts[0], math.log(null_logit_c)))
  lse_xBxT = jax.nn.logsumexp(jnp.concatenate(parts, axis=-1), axis=-1)
  total = jnp.sum(jnp.where(counted_xBxT, lse_xBxT - pos_xBxT, 0.0), axis=(-2, -1))
  return total / _count(counted_xBxT)


def _catalogue_chunks(vectors_CxD: jax.Array, rows: int, *per_row: jax.Array | None
                      ) -> tuple[jax.Array, ...]:
  """The catalogue in K equal chunks of at most `rows` rows: (`[K, R, D]` zero-padded, real
  `[K, R]`, then each of `per_row` `[C]` as `[K, R]`, None kept); R = ceil(C / K), so the
  padding is under K rows, not up to a whole chunk."""
  c, d = vectors_CxD.shape
  k = -(-c // max(1, min(rows, c)))
  r = -(-c // k)
  chunked = lambda x_C: None if x_C is None else jnp.pad(x_C, (0, k * r - c)).reshape(k, r)
  padded_KxRxD = jnp.pad(vectors_CxD, ((0, k * r - c), (0, 0))).reshape(k, r, d)
  return (padded_KxRxD, (jnp.arange(k * r) < c).reshape(k, r), *map(chunked, per_row))


def catalogue_logsumexp(q_xBxTxD: jax.Array, vectors_CxD: jax.Array, tau: float, rows: int,
                        log_weight_C: jax.Array | None = None, key_C: jax.Array | None = None,
                        query_key_xBxT: jax.Array | None = None) -> jax.Array:
  """`logsumexp_c(<q, v_c> / tau + log_weight_c)` over the candidates c whose `key_C` differs
  from the query's `query_key_xBxT` (all of them when no keys are given; weight 1 when none),
  `[..., B, T]`, `rows` candidate rows at a time (an online logsumexp over chunks,
  `lax.scan`), so at most `[..., B, T, rows]` logits exist at once, forward or backward. A
  query with every candidate excluded gets -inf.

  Its gradient (queries and vectors; none for the weights and keys) is written out
  (`jax.custom_vjp`): with p = the softmax over the counted candidates, the backward pass
  recomputes each chunk's logits once and takes `dq = sum_c g p_c v_c / tau` and
  `dv_c = sum_q g p_c q / tau`, two matmuls per chunk. Autodiff through the online update
  (checkpointed) took 11x as long at Toys's shapes (docs/benchmarks.md).
  """
  if (key_C is None) != (query_key_xBxT is None):
    raise ValueError('catalogue_logsumexp needs both key_C and query_key_xBxT, or neither')
  # The queries are flattened batch-major (`[B, ..., T]`): a batch sharded over devices stays
  # sharded, where flattening `[N, B, T]` would gather the whole batch onto every device and
  # repeat the catalogue's softmax there (with one leading step the two orders are the same).
  q_BxxTxD = jnp.moveaxis(q_xBxTxD, -3, 0)
  query_key_BxxT = None if query_key_xBxT is None else jnp.moveaxis(query_key_xBxT, -2, 0)
  lse_BxxT = _catalogue_lse(q_BxxTxD, vectors_CxD, log_weight_C, key_C, query_key_BxxT, tau,
                            rows)
  return jnp.moveaxis(lse_BxxT, 0, -2)


def _chunk_logits(q_MxD, v_RxD, real_R, log_weight_R, key_R, query_key_M, tau):
  """One chunk's logits `[M, R]` (float32, weights added) and which of them count."""
  logits_MxR = jnp.dot(q_MxD, v_RxD.T, preferred_element_type=jnp.float32) / tau
  if log_weight_R is not None:
    logits_MxR = logits_MxR + log_weight_R[None]
  ok_MxR = real_R[None]
  if key_R is not None:
    ok_MxR = ok_MxR & (key_R[None] != query_key_M[:, None])
  return logits_MxR, ok_MxR


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _catalogue_lse(q_xBxTxD, vectors_CxD, log_weight_C, key_C, query_key_xBxT, tau, rows):
  return _catalogue_lse_fwd(q_xBxTxD, vectors_CxD, log_weight_C, key_C, query_key_xBxT, tau,
                            rows)[0]


def _flat_keys(query_key_xBxT):
  return None if query_key_xBxT is None else query_key_xBxT.reshape(-1)


def _catalogue_lse_fwd(q_xBxTxD, vectors_CxD, log_weight_C, key_C, query_key_xBxT, tau, rows):
  q_MxD = q_xBxTxD.reshape(-1, q_xBxTxD.shape[-1])
  query_key_M = _flat_keys(query_key_xBxT)
  chunks = _catalogue_chunks(vectors_CxD.astype(q_MxD.dtype), rows, log_weight_C, key_C)

  def chunk(carry, xs):
    top_M, total_M = carry
    logits_MxR, ok_MxR = _chunk_logits(q_MxD, *xs, query_key_M, tau)
    logits_MxR = jnp.where(ok_MxR, logits_MxR, NEG_INF)
    new_top_M = jnp.maximum(top_M, jnp.max(logits_MxR, axis=-1))
    kept_MxR = jnp.where(ok_MxR, jnp.exp(logits_MxR - new_top_M[:, None]), 0.0)
    total_M = total_M * jnp.exp(top_M - new_top_M) + jnp.sum(kept_MxR, axis=-1)
    return (new_top_M, total_M), None

  m = q_MxD.shape[0]
  init = (jnp.full((m,), NEG_INF, jnp.float32), jnp.zeros((m,), jnp.float32))
  (top_M, total_M), _ = jax.lax.scan(chunk, init, chunks)
  lse_M = jnp.where(total_M > 0, top_M + jnp.log(total_M), -jnp.inf)
  residuals = (q_xBxTxD, vectors_CxD, log_weight_C, key_C, query_key_xBxT, lse_M)
  return lse_M.reshape(q_xBxTxD.shape[:-1]), residuals


def _catalogue_lse_bwd(tau, rows, residuals, g_xBxT):
  q_xBxTxD, vectors_CxD, log_weight_C, key_C, query_key_xBxT, lse_M = residuals
  q_MxD = q_xBxTxD.reshape(-1, q_xBxTxD.shape[-1])
  query_key_M = _flat_keys(query_key_xBxT)
  scale_M = g_xBxT.reshape(-1).astype(jnp.float32) / tau
  chunks = _catalogue_chunks(vectors_CxD.astype(q_MxD.dtype), rows, log_weight_C, key_C)

  def chunk(dq_MxD, xs):
    v_RxD = xs[0]
    logits_MxR, ok_MxR = _chunk_logits(q_MxD, *xs, query_key_M, tau)
    p_MxR = jnp.where(ok_MxR, jnp.exp(logits_MxR - lse_M[:, None]), 0.0) * scale_M[:, None]
    p_MxR = p_MxR.astype(q_MxD.dtype)
    dq_MxD = dq_MxD + jnp.dot(p_MxR, v_RxD, preferred_element_type=jnp.float32)
    return dq_MxD, jnp.dot(p_MxR.T, q_MxD, preferred_element_type=jnp.float32)

  dq_MxD, dv_KxRxD = jax.lax.scan(chunk, jnp.zeros(q_MxD.shape, jnp.float32), chunks)
  c, d = vectors_CxD.shape
  dv_CxD = dv_KxRxD.reshape(-1, d)[:c]
  return (dq_MxD.reshape(q_xBxTxD.shape).astype(q_xBxTxD.dtype),
          dv_CxD.astype(vectors_CxD.dtype), None, None, None)


_catalogue_lse.defvjp(_catalogue_lse_fwd, _catalogue_lse_bwd)


def catalogue_step_loss(pos_xBxT: jax.Array, lse_xBxT: jax.Array, counted_xBxT: jax.Array,
                        tau: float, null_logit_c: float) -> jax.Array:
  """`step_loss` when the candidates are the whole catalogue (the positive among them):
  `log(c + sum_all e^{s/tau}) - s+/tau` from the catalogue's logsumexp, no mask (the same
  value, one pass cheaper)."""
  if null_logit_c > 0:
    lse_xBxT = jnp.logaddexp(lse_xBxT, math.log(null_logit_c))
  total = jnp.sum(jnp.where(counted_xBxT, lse_xBxT - pos_xBxT / tau, 0.0), axis=(-2, -1))
  return total / _count(counted_xBxT)


def _count(x_xBxT: jax.Array) -> jax.Array:
  """The number of True entries per leading index, at least 1, as float32."""
  return jnp.maximum(jnp.sum(x_xBxT, axis=(-2, -1)), 1).astype(jnp.float32)


def margin_gate(prev_xBxT: jax.Array, pos_xBxT: jax.Array, tau: float,
                lambda_m: float) -> jax.Array:
  """`e^{s_prev/tau} > e^{s/tau} + lambda_m` in log space, bool, no gradient."""
  prev_xBxT, pos_xBxT = jax.lax.stop_gradient((prev_xBxT / tau, pos_xBxT / tau))
  if lambda_m > 0:
    pos_xBxT = jnp.logaddexp(pos_xBxT, math.log(lambda_m))
  return prev_xBxT > pos_xBxT


def lmp_level_losses(queries_NxBxTxD: jax.Array, targets_BxWxD: jax.Array,
                     keys: tuple[jax.Array, ...], mask_BxW: jax.Array, cfg: LossConfig,
                     shared: Shared | None,
                     pos_log_q_BxW: jax.Array | None = None,
                     count_from_B: jax.Array | None = None,
                     seen_bias: tuple[jax.Array, jax.Array] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """The step losses `[N]` of one level (the items or one token kind) and the fraction of
  valid positions each step counted `[N]` (1 where the gate is off). Queries at input
  positions before `count_from_B` (a window's context, `pipeline`) are not counted.
  `seen_bias` (w `[BUCKETS]`, the window's items `[B, W]`; the item level over the whole
  catalogue only): the seen-item term of `seen.py` on the logits."""
  n, b, t, _ = queries_NxBxTxD.shape
  whole = shared is not None and shared.whole_catalogue
  if whole:  # the catalogue's logits are reduced in chunks, never held at once
    pos_NxBxT = jnp.einsum('nbtd,nbtd->nbt', queries_NxBxTxD, _shifted(targets_BxWxD, n, t))
  else:
    pos_NxBxT, neg_NxBxTxC = lmp_step_logits(queries_NxBxTxD, targets_BxWxD, shared)
  if seen_bias is not None:
    if not whole or shared.key is not None:
      raise ValueError("the seen-item term needs the item level over the whole catalogue "
                       "(loss.negatives='all')")
    w_K, items_BxW = seen_bias
    offset_BxTxJ, seen_BxTxJ = seen.input_offsets(w_K, items_BxW[:, :t], mask_BxW[:, :t])
    hit_NxBxTxJ = seen_BxTxJ[None] & (items_BxW[None, :, None, :t]
                                      == _shifted(items_BxW, n, t)[..., None])
    # The positive's raw score gets tau * w (every logit is divided by tau below).
    pos_NxBxT = pos_NxBxT + cfg.tau * jnp.sum(jnp.where(hit_NxBxTxJ, offset_BxTxJ[None], 0.0),
                                              axis=-1)
  valid_NxBxT = counted_queries(mask_BxW, t, count_from_B)[None] & _shifted(mask_BxW, n, t)
  counted_NxBxT = valid_NxBxT
  if cfg.gate and n > 1:
    # Steps 2..N, each against the positive logit of the step before it.
    gate_xBxT = margin_gate(pos_NxBxT[:-1], pos_NxBxT[1:], cfg.tau, cfg.lambda_m)
    later_xBxT = valid_NxBxT[1:] & valid_NxBxT[:-1] & gate_xBxT
    counted_NxBxT = jnp.concatenate([valid_NxBxT[:1], later_xBxT])
  if whole:
    rows = max(1, cfg.logits_budget_mb * 2**20 // (4 * n * b * t))
    if shared.key is None:
      lse_NxBxT = catalogue_logsumexp(queries_NxBxTxD, shared.vectors, cfg.tau, rows)
      if seen_bias is not None:  # the inputs' logits: 'all' has item i in row i - 1
        v_BxJxD = shared.vectors[jnp.maximum(items_BxW[:, :t] - 1, 0)]
        s_NxBxTxJ = jnp.einsum('nbtd,bjd->nbtj', queries_NxBxTxD, v_BxJxD) / cfg.tau
        lse_NxBxT = seen.biased_logsumexp(lse_NxBxT, s_NxBxTxJ, offset_BxTxJ, seen_BxTxJ)
    else:  # the positive's own token is skipped among the candidates and counted once
      others_NxBxT = catalogue_logsumexp(queries_NxBxTxD, shared.vectors, cfg.tau, rows,
                                         shared.log_weight, shared.key,
                                         _shifted(shared.query_key_BxW, n, t))
      lse_NxBxT = jnp.logaddexp(others_NxBxT, pos_NxBxT / cfg.tau)
    target_NxBxT = pos_NxBxT
    if cfg.label_smoothing:  # eps on the mean logit (lmp_loss gives it to the item level only)
      mean_NxBxT = jnp.einsum('nbtd,d->nbt', queries_NxBxTxD, jnp.mean(shared.vectors, axis=0))
      if seen_bias is not None:  # the mean logit over the catalogue includes the offsets
        c = shared.vectors.shape[0]
        mean_NxBxT = mean_NxBxT + cfg.tau * jnp.sum(offset_BxTxJ, axis=-1) / c
      target_NxBxT = (1.0 - cfg.label_smoothing) * pos_NxBxT + cfg.label_smoothing * mean_NxBxT
    losses_N = catalogue_step_loss(target_NxBxT, lse_NxBxT, counted_NxBxT, cfg.tau,
                                   cfg.null_logit_c)
  else:
    ok_NxBxTxC = negative_mask(keys, mask_BxW, n, t, shared)
    pos_log_q = None if pos_log_q_BxW is None else _shifted(pos_log_q_BxW, n, t)
    neg_log_q = None if shared is None else shared.log_q
    losses_N = step_loss(pos_NxBxT, neg_NxBxTxC, ok_NxBxTxC, counted_NxBxT, cfg.tau,
                         cfg.null_logit_c, pos_log_q, neg_log_q)
  fractions_N = jnp.sum(counted_NxBxT, axis=(1, 2)) / _count(valid_NxBxT)
  return losses_N, fractions_N


def counted_queries(mask_BxW: jax.Array, t: int, count_from_B: jax.Array | None) -> jax.Array:
  """`[B, T]`: real query positions at or after the row's `count_from` (all when None)."""
  real_BxT = mask_BxW[:, :t].astype(bool)
  if count_from_B is None:
    return real_BxT
  return real_BxT & (jnp.arange(t)[None] >= count_from_B[:, None])


def _check_outputs(outputs: dict[str, jax.Array], token_columns) -> None:
  """The token-level outputs must match `token_columns` and the number of steps."""
  n, n_tok = outputs['token_queries'].shape[:2]
  if n_tok != len(token_columns):
    raise ValueError(f"outputs['token_queries'] has {n_tok} token kinds but token_columns "
                     f'names {len(token_columns)}: {token_columns}')
  if n_tok and n != outputs['queries'].shape[0]:
    raise ValueError(f"outputs['token_queries'] has {n} steps, outputs['queries'] "
                     f"{outputs['queries'].shape[0]}")


def lmp_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], token_columns,
             cfg: LossConfig, negatives: Negatives | None,
             catalogue: dict[str, jax.Array] | None = None,
             token_draw: tuple[Negatives | None, dict[str, jax.Array] | None] | None = None,
             token_vocab: tuple[TokenVocab, ...] | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The LMP loss (item level + token level) of `HeterRec.forward` outputs.

  `token_columns`: `model.token_kinds`, (name, kind, column offset, n_sub) per token kind, in
  the order of the n_tok axis. `negatives`: the shared candidates (None: 'same_position');
  `catalogue` (when `negatives.items` is set): 'vectors' `[Cu, d]`, 'slots' `[Cu, K, d_f]`
  (the item tower on `negatives.items`) and 'tokens' `[Cu, S]`. `token_draw`: the token
  level's own (negatives, catalogue) when loss.token_negatives differs (None: the same).
  `token_vocab` (one `TokenVocab` per token kind, with the 'all' source at the token level):
  the catalogue's distinct tokens, so each kind's softmax runs over its U distinct tokens in
  chunks (the same value as over the C items with their hit mask, which `[N, B, T, C]` logits
  and masks would hold). Returns (loss, aux of float32 scalars).
  """
  f32 = lambda name: outputs[name].astype(jnp.float32)
  _check_outputs(outputs, token_columns)
  mask_BxW = batch['mask'].astype(bool)
  item_key_BxWx1 = batch['items'][..., None]
  shared, pos_log_q = None, None
  if negatives is not None:
    cat_items = None if negatives.items is None else (negatives.items[:, None],)
    shared = shared_level(negatives, f32('targets'), (item_key_BxWx1,),
                          None if catalogue is None else catalogue['vectors'], cat_items)
    if negatives.log_freq is not None:
      shared = dataclasses.replace(shared, log_q=negatives.log_expected(shared.keys[0][:, 0]))
      pos_log_q = negatives.log_expected(batch['items'])
    elif is_whole_catalogue(negatives):
      shared = dataclasses.replace(shared, whole_catalogue=True)
  count_from_B = batch.get('count_from')
  seen_bias = None if 'seen_bias' not in outputs else (outputs['seen_bias'], batch['items'])
  item_steps, fractions = lmp_level_losses(f32('queries'), f32('targets'), (item_key_BxWx1,),
                                           mask_BxW, cfg, shared, pos_log_q, count_from_B,
                                           seen_bias)
  token_steps = jnp.zeros_like(item_steps)
  queries_NxSxBxTxD, targets_SxBxWxD = f32('token_queries'), f32('token_targets')
  if token_draw is not None:
    negatives, catalogue = token_draw
  token_cfg = dataclasses.replace(cfg, label_smoothing=0.0)  # the token level is not smoothed
  for s, (_, k, offset, n_sub) in enumerate(token_columns):
    keys = (item_key_BxWx1, batch['tokens'][..., offset:offset + n_sub])
    level = None
    if token_vocab is not None and is_whole_catalogue(negatives):
      vocab = token_vocab[s]
      level = Shared(catalogue['slots'][vocab.rows, k], (), jnp.ones(vocab.rows.shape, bool),
                     whole_catalogue=True, log_weight=vocab.log_count, key=vocab.key,
                     query_key_BxW=vocab.key_of_item[batch['items']])
    elif negatives is not None:
      cat_keys = cat_vectors = None
      if negatives.items is not None:
        cat_keys = (negatives.items[:, None], catalogue['tokens'][:, offset:offset + n_sub])
        cat_vectors = catalogue['slots'][:, k]
      level = shared_level(negatives, targets_SxBxWxD[s], keys, cat_vectors, cat_keys)
    steps, _ = lmp_level_losses(queries_NxSxBxTxD[:, s], targets_SxBxWxD[s], keys, mask_BxW,
                                token_cfg, level, count_from_B=count_from_B)
    token_steps = token_steps + steps
  return _total(item_steps, token_steps, fractions, cfg.w_tok)


def _total(item_N: jax.Array, token_N: jax.Array, fraction_N: jax.Array, w_tok: float):
  """`L = sum_i (L_i^item + w_tok * sum_s L_i^{token_s})` and its parts."""
  item_loss, token_loss = jnp.sum(item_N), jnp.sum(token_N)
  aux = {'item_loss': item_loss, 'token_loss': token_loss}
  for i in range(1, item_N.shape[0] + 1):
    aux[f'item_loss_step{i}'] = item_N[i - 1]
    aux[f'token_loss_step{i}'] = token_N[i - 1]
    if i > 1:
      aux[f'gate_fraction_step{i}'] = fraction_N[i - 1]
  return item_loss + w_tok * token_loss, aux


def heterrec_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], token_columns,
                  cfg: LossConfig, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`lmp_loss` with a batch source ('same_position', 'batch_pool', 'in_batch') drawn here;
  the catalogue sources need the item tower inside the step (`losses.make`)."""
  if cfg.negatives in negatives_lib.CATALOGUE_SOURCES:
    raise ValueError(f'loss.negatives={cfg.negatives!r} needs the item tower: use losses.make')
  return lmp_loss(outputs, batch, token_columns, cfg,
                  negatives_lib.sample(cfg, batch['mask'], 0, rng))


def ablated(cfg: LossConfig, variant: str) -> LossConfig:
  """The loss settings of a HeterRec ablation: 'no_lmp' is multi-step prediction without the
  margin gate (plain MTP), 'no_tlmp' drops the token-level term (w_tok = 0); the other
  variants change the model, not the loss."""
  if variant == 'no_lmp':
    return dataclasses.replace(cfg, gate=False)
  if variant == 'no_tlmp':
    return dataclasses.replace(cfg, w_tok=0.0)
  return cfg
