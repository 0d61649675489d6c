"""Negative sources (SPEC 6): which items every query of a step is contrasted with.

One `Negatives` per step, shared by every query (the paper's 'same_position' is the one
per-query source; it is `None` here and handled inside the LMP loss):

  'all'         every item of the catalogue (rows 1..n_items): a full softmax
  'uniform'     `n_uniform` items drawn uniformly (with replacement) from the catalogue
  'in_batch'    every real target position (w >= 1) of the batch
  'mixed'       'in_batch' and 'uniform' together
  'batch_pool'  `pool_size` real target positions drawn without replacement from the batch

Batch candidates are positions of the batch (their vectors are the model's targets there);
catalogue candidates are item ids (their vectors come from the item tower inside the step).
Masking accidental hits is the loss's job: it compares the candidates' keys (item id, tokens)
with the positive's.

log-Q (`loss.log_q`): every logit, the positive's included, is reduced by the log of the item's
expected number of copies in the candidate set, `E(i) = p(i) * C_batch + n_uniform / n_items`
(p = the item's share of training targets, C_batch = usable batch candidates), which removes
the popularity bias of in-batch sampling (Yi et al., RecSys 2019).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from heterrec_jax.config import LossConfig

BATCH_SOURCES = ('in_batch', 'mixed', 'batch_pool')
CATALOGUE_SOURCES = ('all', 'uniform', 'mixed')


@dataclasses.dataclass(frozen=True)
class Negatives:
  """The candidates of one step: batch positions `index [Cb]` (usable where `index_ok`) and
  catalogue `items [Cu]`; `log_freq [n_items + 1]` (log training share of each item) is set
  when log-Q is on."""
  index: jax.Array | None = None
  index_ok: jax.Array | None = None
  items: jax.Array | None = None
  n_uniform: int = 0
  n_items: int = 0
  log_freq: jax.Array | None = None

  def log_expected(self, items: jax.Array) -> jax.Array:
    """log E(i) of `items` (any shape): expected copies of each item in the candidate set."""
    parts = []
    if self.index is not None:
      n_batch = jnp.maximum(jnp.sum(self.index_ok), 1).astype(jnp.float32)
      parts.append(self.log_freq[items] + jnp.log(n_batch))
    if self.n_uniform:
      parts.append(jnp.full(items.shape, np.log(self.n_uniform / self.n_items), jnp.float32))
    return jax.nn.logsumexp(jnp.stack(parts), axis=0)


def sample_pool(mask_BxW: jax.Array, pool_size: int, rng: jax.Array) -> tuple[jax.Array,
                                                                               jax.Array]:
  """The 'batch_pool': M = min(pool_size, B*(W-1)) distinct positions drawn uniformly
  without replacement among the real positions w >= 1; slots beyond the number of candidates
  hold non-candidates and are marked not usable. Returns (index `[M]`, usable `[M]`)."""
  b, w = mask_BxW.shape
  m = min(pool_size, b * (w - 1))
  cand_BW = batch_candidates(mask_BxW)
  score_BW = jnp.where(cand_BW, jax.random.uniform(rng, (b * w,)), -1.0)
  _, index_M = jax.lax.top_k(score_BW, m)
  return index_M.astype(jnp.int32), cand_BW[index_M]


def batch_candidates(mask_BxW: jax.Array, first: int = 1) -> jax.Array:
  """Usable flat positions `[B*W]`: real, at index w >= `first`."""
  w = mask_BxW.shape[1]
  return (mask_BxW.astype(bool) & (jnp.arange(w) >= first)[None]).reshape(-1)


def sample(cfg: LossConfig, mask_BxW: jax.Array, n_items: int, rng: jax.Array,
           log_freq: jax.Array | None = None) -> Negatives | None:
  """The negatives of `cfg.negatives` for a batch with mask `[B, W]` (None: same_position)."""
  source = cfg.negatives
  if source == 'same_position':
    return None
  fields = {'n_items': n_items, 'log_freq': log_freq if cfg.log_q else None}
  if source == 'batch_pool':
    index, ok = sample_pool(mask_BxW, cfg.pool_size, rng)
    fields.update(index=index, index_ok=ok)
  if source in ('in_batch', 'mixed'):
    fields.update(index=jnp.arange(mask_BxW.size, dtype=jnp.int32),
                  index_ok=batch_candidates(mask_BxW))
  if source == 'all':
    fields['items'] = jnp.arange(1, n_items + 1, dtype=jnp.int32)
  if source in ('uniform', 'mixed'):
    fields['items'] = jax.random.randint(rng, (cfg.n_uniform,), 1, n_items + 1, jnp.int32)
    fields['n_uniform'] = cfg.n_uniform
  return Negatives(**fields)


def training_log_freq(items_E: np.ndarray, train_E: np.ndarray, n_items: int) -> np.ndarray:
  """log of each item's share of the training events `[n_items + 1]` (float32; an item never
  seen in training gets the share of one event, so its log is finite)."""
  counts = np.bincount(np.asarray(items_E)[np.asarray(train_E, bool)], minlength=n_items + 1)
  counts = np.maximum(counts[:n_items + 1].astype(np.float64), 1.0)
  return np.log(counts / counts[1:].sum()).astype(np.float32)
