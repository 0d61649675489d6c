"""Full-corpus retrieval (SPEC section 7): scores, target ranks and top-k over every item.

Candidate rules, shared by every function here:
  * score(user, item) = <user, item>, accumulated in float32;
  * item 0 is the padding item and is never a candidate (score -inf);
  * with seen-item offsets (`seen.py`, `model.seen_bias`), `<user, item> + w` for the items of
    the user's input (each once, at its latest occurrence; `seen.last_query_offsets`);
  * with `exclude_history`, the non-zero items of the user's input sequence are removed
    (score -inf) EXCEPT the target itself, which stays a candidate (HSTU-style exclusion: a
    repeated purchase can still be hit). Off by default (RecBole-style; repeats are real).
  * rank of the target = the number of OTHER candidates whose score is GREATER THAN OR EQUAL TO
    the target's: ties are broken against the target (a pessimistic rank, so a model that
    scores every item alike ranks its target last, not first; with continuous learned scores
    ties have probability ~0, but the popularity baseline has many).
  * a row whose target score, or any candidate's score, is NaN or +inf has no rank: it comes out
    as NO_RANK (-1), and the caller must treat it as an error, never as a rank (`evaluate`
    raises). -inf marks a non-candidate and is never an error among the other candidates.
  * top-k slots beyond the number of candidates hold score -inf and id 0.

`sharded_top_k` / `sharded_target_ranks` split the item vectors over one mesh axis (and the
users over another): each shard scores its items, keeps a local top-k (or counts the items above
the target), then an all-gather + second top-k (or a psum of the counts) merges the shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

NO_RANK = -1  # the rank of a row whose scores are not finite: an error, never a rank


def _local_cells(ids_BxT: jax.Array, keep_BxT: jax.Array, offset: jax.Array | int,
                 n_local: int) -> tuple[jax.Array, jax.Array]:
  """(row, local column) of each kept item id `[B, T]` among items `offset ..
  offset + n_local - 1`; ids elsewhere get column n_local, which a `mode='drop'` scatter skips."""
  local_BxT = ids_BxT - offset
  keep_BxT = keep_BxT & (ids_BxT != 0) & (local_BxT >= 0) & (local_BxT < n_local)
  rows_BxT = jnp.broadcast_to(jnp.arange(ids_BxT.shape[0])[:, None], ids_BxT.shape)
  return rows_BxT, jnp.where(keep_BxT, local_BxT, n_local)


def _history_mask(history_BxT: jax.Array, target_B: jax.Array, offset: jax.Array | int,
                  n_local: int) -> jax.Array:
  """True at local column j when item `offset + j` is in the history and is not the target."""
  cells = _local_cells(history_BxT, history_BxT != target_B[:, None], offset, n_local)
  mask_Bxn = jnp.zeros((history_BxT.shape[0], n_local), bool)
  return mask_Bxn.at[cells].set(True, mode='drop')


def _scores(user_BxD: jax.Array, items_nxD: jax.Array, offset: jax.Array | int, n_items: int,
            target_B: jax.Array, history_BxT: jax.Array | None,
            exclude_history: bool, seen_BxT: tuple[jax.Array, jax.Array] | None = None
            ) -> jax.Array:
  """Scores of items `offset .. offset + n - 1` (float32), -inf where not a candidate.

  `n_items` is the true corpus size (padding id 0 included); rows at ids >= n_items are padding
  rows added for sharding and are never candidates either. `seen_BxT`: (item ids, offsets) of
  `seen.last_query_offsets` (id 0: none), added to those items' scores.
  """
  scores_Bxn = jnp.einsum('bd,nd->bn', user_BxD, items_nxD,
                          preferred_element_type=jnp.float32)
  if seen_BxT is not None:
    ids_BxT, offsets_BxT = seen_BxT
    cells = _local_cells(ids_BxT, ids_BxT > 0, offset, items_nxD.shape[0])
    scores_Bxn = scores_Bxn.at[cells].add(offsets_BxT.astype(jnp.float32), mode='drop')
  ids_n = offset + jnp.arange(items_nxD.shape[0])
  candidate_n = (ids_n > 0) & (ids_n < n_items)
  scores_Bxn = jnp.where(candidate_n[None, :], scores_Bxn, -jnp.inf)
  if exclude_history:
    if history_BxT is None:
      raise ValueError('exclude_history=True needs history_BxT (the input item ids)')
    excluded_Bxn = _history_mask(history_BxT, target_B, offset, items_nxD.shape[0])
    scores_Bxn = jnp.where(excluded_Bxn, -jnp.inf, scores_Bxn)
  return scores_Bxn


def _target_score(scores_Bxn: jax.Array, target_B: jax.Array,
                  offset: jax.Array | int) -> jax.Array:
  """The score of each target, read from `scores_Bxn` (-inf when the target is not local)."""
  n_local = scores_Bxn.shape[1]
  local_B = target_B - offset
  inside_B = (local_B >= 0) & (local_B < n_local)
  score_B = jnp.take_along_axis(scores_Bxn, jnp.clip(local_B, 0, n_local - 1)[:, None], 1)[:, 0]
  return jnp.where(inside_B, score_B, -jnp.inf)


def _count_ahead(scores_Bxn: jax.Array, score_B: jax.Array) -> jax.Array:
  """Candidates scored >= the target's score (the target itself among them, where local)."""
  return jnp.sum(scores_Bxn >= score_B[:, None], axis=1, dtype=jnp.int32)


def _count_non_finite(scores_Bxn: jax.Array) -> jax.Array:
  """Candidates scored NaN or +inf (-inf marks a non-candidate)."""
  return jnp.sum(jnp.isnan(scores_Bxn) | (scores_Bxn == jnp.inf), axis=1, dtype=jnp.int32)


def _rank(ahead_B: jax.Array, score_B: jax.Array, non_finite_B: jax.Array) -> jax.Array:
  """The target's rank from the candidates ahead of it (itself included), or NO_RANK."""
  ok_B = jnp.isfinite(score_B) & (non_finite_B == 0)
  return jnp.where(ok_B, ahead_B - 1, NO_RANK).astype(jnp.int32)


def target_ranks(user_BxD: jax.Array, items_NxD: jax.Array, target_B: jax.Array,
                 history_BxT: jax.Array | None = None,
                 exclude_history: bool = False,
                 seen_BxT: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """0-based rank of each target among all candidate items (int32 `[B]`).

  Args:
    user_BxD: user vectors.
    items_NxD: vectors of every item; row i is item id i, row 0 the padding item.
    target_B: the held-out item id of each user.
    history_BxT: the input item ids (0 = padding); used only with `exclude_history`.
    exclude_history: remove the history items other than the target from the candidates.
    seen_BxT: (item ids, offsets) added to those items' scores (`seen.last_query_offsets`).
  Returns:
    rank_B: the number of other candidates scored >= the target (ties count against the
      target), or NO_RANK (-1) where a score is NaN or +inf.
  """
  target_B = jnp.asarray(target_B)
  scores_BxN = _scores(user_BxD, items_NxD, 0, items_NxD.shape[0], target_B, history_BxT,
                       exclude_history, seen_BxT)
  score_B = _target_score(scores_BxN, target_B, 0)
  return _rank(_count_ahead(scores_BxN, score_B), score_B, _count_non_finite(scores_BxN))


def _top_k_of(scores_Bxn: jax.Array, ids_Bxn: jax.Array | None, k: int):
  """`lax.top_k` of the scores with their item ids (default: the column); -inf slots get id 0."""
  values_Bxk, index_Bxk = jax.lax.top_k(scores_Bxn, k)
  ids_Bxk = index_Bxk if ids_Bxn is None else jnp.take_along_axis(ids_Bxn, index_Bxk, axis=1)
  return values_Bxk, jnp.where(values_Bxk == -jnp.inf, 0, ids_Bxk).astype(jnp.int32)


def _check_k(k: int, n_items: int) -> None:
  if not 1 <= k <= n_items:
    raise ValueError(f'top-k needs 1 <= k <= the number of item rows ({n_items}); got k={k}')


def top_k(user_BxD: jax.Array, items_NxD: jax.Array, k: int,
          history_BxT: jax.Array | None = None, exclude_history: bool = False,
          target_B: jax.Array | None = None,
          seen_BxT: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """The k best candidates of each user: `(scores_Bxk, ids_Bxk)`, best first.

  Same candidate rules as `target_ranks`; `target_B` (optional) keeps each user's target a
  candidate under `exclude_history`. Equal scores come out lower id first (`lax.top_k`).
  """
  _check_k(k, items_NxD.shape[0])
  target_B = jnp.zeros(user_BxD.shape[:1], jnp.int32) if target_B is None else target_B
  scores_BxN = _scores(user_BxD, items_NxD, 0, items_NxD.shape[0], jnp.asarray(target_B),
                       history_BxT, exclude_history, seen_BxT)
  return _top_k_of(scores_BxN, None, k)


# ------------------------------------------------------------------------------------------------
# Sharded over a mesh: items over `item_axis`, users over `user_axis`.


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[0] % multiple
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _sharded_inputs(mesh: Mesh, item_axis: str, user_axis: str | None, user_BxD, items_NxD,
                    target_B, history_BxT, seen_BxT=None):
  """Pads users to the user-axis size and items to the item-axis size (padding rows are never
  candidates: their ids are >= N); a missing target/history/seen offset becomes zeros."""
  n_users = user_BxD.shape[0]
  target_B = jnp.zeros((n_users,), jnp.int32) if target_B is None else jnp.asarray(target_B)
  history_BxT = (jnp.zeros((n_users, 1), jnp.int32) if history_BxT is None
                 else jnp.asarray(history_BxT))
  seen_ids_BxT, seen_offsets_BxT = ((jnp.zeros((n_users, 1), jnp.int32),
                                     jnp.zeros((n_users, 1), jnp.float32))
                                    if seen_BxT is None else seen_BxT)
  user_mult = 1 if user_axis is None else mesh.shape[user_axis]
  per_user = (_pad_rows(jnp.asarray(x), user_mult)
              for x in (user_BxD, target_B, history_BxT, seen_ids_BxT, seen_offsets_BxT))
  user_BxD, target_B, history_BxT, seen_ids_BxT, seen_offsets_BxT = per_user
  return (user_BxD, _pad_rows(jnp.asarray(items_NxD), mesh.shape[item_axis]), target_B,
          history_BxT, seen_ids_BxT, seen_offsets_BxT)


def _local(item_axis, n_items, exclude_history, user_bxD, items_nxD, target_b, history_bxT,
           seen_ids_bxT, seen_offsets_bxT):
  """Inside shard_map: this shard's id offset and the scores of its items."""
  offset = jax.lax.axis_index(item_axis) * items_nxD.shape[0]
  scores_bxn = _scores(user_bxD, items_nxD, offset, n_items, target_b, history_bxT,
                       exclude_history, (seen_ids_bxT, seen_offsets_bxT))
  return offset, scores_bxn


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _sharded_top_k(mesh, item_axis, user_axis, k, exclude_history, n_items, user_BxD,
                   items_NxD, target_B, history_BxT, seen_ids_BxT, seen_offsets_BxT):
  def shard(user_bxD, items_nxD, target_b, history_bxT, seen_ids_bxT, seen_offsets_bxT):
    offset, scores_bxn = _local(item_axis, n_items, exclude_history, user_bxD, items_nxD,
                                target_b, history_bxT, seen_ids_bxT, seen_offsets_bxT)
    values_bxk, index_bxk = jax.lax.top_k(scores_bxn, min(k, items_nxD.shape[0]))
    ids_bxk = (index_bxk + offset).astype(jnp.int32)
    # Shards are concatenated in order, so equal scores still come out lower id first.
    all_values = jax.lax.all_gather(values_bxk, item_axis, axis=1, tiled=True)
    all_ids = jax.lax.all_gather(ids_bxk, item_axis, axis=1, tiled=True)
    return _top_k_of(all_values, all_ids, k)

  users, items = P(user_axis, None), P(item_axis, None)
  return jax.shard_map(shard, mesh=mesh,
                       in_specs=(users, items, P(user_axis), users, users, users),
                       # all_gather's result is equal on every item shard, but the varying-axes
                       # check cannot infer it (no public all_gather_invariant): check off.
                       out_specs=(users, users), check_vma=False)(
                           user_BxD, items_NxD, target_B, history_BxT, seen_ids_BxT,
                           seen_offsets_BxT)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sharded_ranks(mesh, item_axis, user_axis, exclude_history, n_items, user_BxD, items_NxD,
                   target_B, history_BxT, seen_ids_BxT, seen_offsets_BxT):
  def shard(user_bxD, items_nxD, target_b, history_bxT, seen_ids_bxT, seen_offsets_bxT):
    offset, scores_bxn = _local(item_axis, n_items, exclude_history, user_bxD, items_nxD,
                                target_b, history_bxT, seen_ids_bxT, seen_offsets_bxT)
    # Only the shard holding the target has its score; every other shard contributes -inf.
    score_b = jax.lax.pmax(_target_score(scores_bxn, target_b, offset), item_axis)
    ahead_b = jax.lax.psum(_count_ahead(scores_bxn, score_b), item_axis)
    return _rank(ahead_b, score_b, jax.lax.psum(_count_non_finite(scores_bxn), item_axis))

  users = P(user_axis, None)
  return jax.shard_map(shard, mesh=mesh,
                       in_specs=(users, P(item_axis, None), P(user_axis), users, users, users),
                       out_specs=P(user_axis))(
                           user_BxD, items_NxD, target_B, history_BxT, seen_ids_BxT,
                           seen_offsets_BxT)


def sharded_top_k(mesh: Mesh, user_BxD: jax.Array, items_NxD: jax.Array, k: int,
                  history_BxT: jax.Array | None = None, exclude_history: bool = False,
                  target_B: jax.Array | None = None, *, item_axis: str = 'model',
                  user_axis: str | None = 'data',
                  seen_BxT: tuple[jax.Array, jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """`top_k` with the item vectors sharded over `item_axis` and users over `user_axis`.

  Any item count and user count work: both are padded to a multiple of their axis size (padded
  items are never candidates, padded users are cut off). Returns global item ids, equal to
  `top_k`'s (up to float rounding of the per-shard matmuls).
  """
  _check_k(k, items_NxD.shape[0])
  args = _sharded_inputs(mesh, item_axis, user_axis, user_BxD, items_NxD, target_B, history_BxT,
                         seen_BxT)
  values_Bxk, ids_Bxk = _sharded_top_k(mesh, item_axis, user_axis, k, exclude_history,
                                       items_NxD.shape[0], *args)
  return values_Bxk[:user_BxD.shape[0]], ids_Bxk[:user_BxD.shape[0]]


def sharded_target_ranks(mesh: Mesh, user_BxD: jax.Array, items_NxD: jax.Array,
                         target_B: jax.Array, history_BxT: jax.Array | None = None,
                         exclude_history: bool = False, *, item_axis: str = 'model',
                         user_axis: str | None = 'data',
                         seen_BxT: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """`target_ranks` with the item vectors sharded over `item_axis`, users over `user_axis`:
  per-shard counts of the candidates ahead of the target, summed over the shards."""
  args = _sharded_inputs(mesh, item_axis, user_axis, user_BxD, items_NxD, target_B, history_BxT,
                         seen_BxT)
  rank_B = _sharded_ranks(mesh, item_axis, user_axis, exclude_history, items_NxD.shape[0], *args)
  return rank_B[:user_BxD.shape[0]]


# ------------------------------------------------------------------------------------------------
# The popularity baseline: every user gets the same score vector.


def popularity_scores(items_E: np.ndarray, n_items: int) -> np.ndarray:
  """Training-event counts per item id, float32 `[n_items + 1]`; index 0 (padding) is 0.

  Args:
    items_E: the item id of every training event (any shape; 0 = padding, ignored).
    n_items: the number of real items (ids 1..n_items).
  """
  items_E = np.asarray(items_E).reshape(-1)
  if items_E.size and (items_E.min() < 0 or items_E.max() > n_items):
    raise ValueError(f'item ids must lie in [0, {n_items}]; got [{items_E.min()}, '
                     f'{items_E.max()}]')
  counts_N = np.bincount(items_E, minlength=n_items + 1).astype(np.float32)
  counts_N[0] = 0.0
  return counts_N


def popularity_ranks(scores_N: jax.Array, target_B: jax.Array,
                     history_BxT: jax.Array | None = None,
                     exclude_history: bool = False) -> jax.Array:
  """Ranks of the targets when every user's scores are `scores_N` (same rules as
  `target_ranks`: items with as many training events as the target rank ahead of it)."""
  target_B = jnp.asarray(target_B)
  user_Bx1 = jnp.ones((target_B.shape[0], 1), jnp.float32)
  items_Nx1 = jnp.asarray(scores_N, jnp.float32)[:, None]
  return target_ranks(user_Bx1, items_Nx1, target_B, history_BxT, exclude_history)
