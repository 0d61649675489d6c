"""The one loss factory: `make(cfg, model, item_tokens, log_freq)` returns the run's loss,
built once before the train step, so the step itself has no branch on a model or loss name:

    loss_fn = losses.make(cfg, model, dataset.item_tokens, log_freq)
    loss, aux = loss_fn(model, batch, rng)

The loss takes the model (not only its forward outputs) because the catalogue negative
sources ('all', 'uniform', 'mixed') need the item tower inside the differentiated function.

Which loss (SPEC 6 and 8), every one under `loss.negatives` (`negatives.py`):
  * HeterRec: LMP (`lmp.lmp_loss`), its ablations' settings from `lmp.ablated`.
  * SASRec, HSTU, and every model under loss.name='sampled_softmax': the next-item softmax,
    LMP's one-step case without gate or null logit (with 'all' and 'dot' scoring this is
    RecBole's cross-entropy over all items).
  * PinnerFormer: the dense all-action loss, the query at t against every real event of
    (t, t + n_step], pooled over all (t, t + j) pairs (LMP's steps without the gate, weighted
    by their number of pairs).
  * BERT4Rec: the Cloze loss, a full softmax over the corpus (its paper's) under 'default';
    under 'sampled_softmax' the in-batch softmax of its masked positions (`softmax.py`). Cloze
    targets sit inside the input, so the next-item sources do not apply to it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from heterrec_jax import lmp, negatives as negatives_lib, softmax
from heterrec_jax.config import Config, LossConfig
from heterrec_jax.interface import RetrievalModel

LossFn = Callable[[RetrievalModel, dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


def catalogue(model: RetrievalModel, negatives: negatives_lib.Negatives | None,
              item_tokens: jax.Array) -> dict[str, jax.Array] | None:
  """The item tower on the catalogue candidates: vectors `[Cu, d]`, slots `[Cu, K, d_f]` (or
  None for models without token-level vectors) and tokens `[Cu, S]`."""
  if negatives is None or negatives.items is None:
    return None
  tokens_CxS = item_tokens[negatives.items]
  vectors_CxD, slots = model.encode_items(negatives.items, tokens_CxS)
  return {'vectors': vectors_CxD, 'slots': slots, 'tokens': tokens_CxS}


def _one_step(cfg: LossConfig) -> LossConfig:
  """The next-item softmax as LMP's one-step case: no gate, no null logit, no token level."""
  return dataclasses.replace(cfg, n_step=1, gate=False, null_logit_c=0.0, w_tok=0.0)


def _multi_step(queries_BxTxD: jax.Array, targets: jax.Array, batch: dict[str, jax.Array],
                cfg: LossConfig, negatives, cat,
                seen_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(pooled loss over the steps, per-step losses `[N]`): LMP's item level with the same
  query at every step, each step weighted by its number of valid pairs; `seen_bias`: the
  model's seen-item offsets (`seen.py`) or None."""
  n = cfg.n_step
  queries_NxBxTxD = jnp.broadcast_to(queries_BxTxD, (n, *queries_BxTxD.shape))
  outputs = {'queries': queries_NxBxTxD, 'targets': targets,
             'token_queries': jnp.zeros((n, 0, 1, 1, 1)), 'token_targets': jnp.zeros((0, 1, 1, 1))}
  if seen_bias is not None:
    outputs['seen_bias'] = seen_bias
  _, aux = lmp.lmp_loss(outputs, batch, (), cfg, negatives, cat)
  steps_N = jnp.stack([aux[f'item_loss_step{i}'] for i in range(1, n + 1)])
  mask_BxW = batch['mask'].astype(bool)
  t = queries_BxTxD.shape[1]
  queries_BxT = lmp.counted_queries(mask_BxW, t, batch.get('count_from'))
  pairs_N = jnp.stack([jnp.sum(queries_BxT & mask_BxW[:, i:t + i]) for i in range(1, n + 1)])
  pooled = jnp.sum(steps_N * pairs_N) / jnp.maximum(jnp.sum(pairs_N), 1).astype(jnp.float32)
  return pooled, steps_N


def make(cfg: Config, model: RetrievalModel, item_tokens: np.ndarray,
         log_freq: np.ndarray | None = None) -> LossFn:
  """The loss of `cfg.model.name` under `cfg.loss` (module docstring).

  `item_tokens`: the dataset's token table `[n_items + 1, S]` (the catalogue sources encode
  items from it); `log_freq`: `negatives.training_log_freq` (needed when loss.log_q is on).
  """
  tokens = jnp.asarray(item_tokens)
  n_items = int(item_tokens.shape[0]) - 1
  freq = None if log_freq is None else jnp.asarray(log_freq)
  if cfg.loss.log_q and freq is None:
    raise ValueError('loss.log_q needs the training log-frequencies (log_freq)')
  name = cfg.model.name

  def draw(loss_cfg: LossConfig, model, batch, rng):
    negatives = negatives_lib.sample(loss_cfg, batch['mask'], n_items, rng, freq)
    return negatives, catalogue(model, negatives, tokens)

  if name == 'bert4rec':
    def cloze(model, batch, rng):
      del rng
      out = model.forward(batch)
      # Only the [MASK]ed positions a window counts (its context positions are inputs only).
      masked_BxT = lmp.counted_queries(out['cloze_mask'], out['cloze_mask'].shape[1],
                                       batch.get('count_from'))
      if cfg.loss.name == 'default':
        loss = softmax.cloze_loss(out['queries'], out['corpus'], out['window_items'],
                                  masked_BxT, cfg.loss.tau, cfg.loss.label_smoothing)
        return loss, {'cloze_loss': loss}
      loss = softmax.masked_sampled_softmax_loss(out['queries'], out['targets'],
                                                 out['window_items'], out['window_mask'],
                                                 masked_BxT, cfg.loss.tau)
      return loss, {'sampled_softmax_loss': loss}
    return cloze

  if name == 'heterrec' and cfg.loss.name == 'default':
    loss_cfg = lmp.ablated(cfg.loss, cfg.model.variant)
    token_columns = tuple(model.token_kinds)
    token_cfg = None
    if loss_cfg.token_negatives not in ('', loss_cfg.negatives) and token_columns:
      token_cfg = dataclasses.replace(loss_cfg, negatives=loss_cfg.token_negatives, log_q=False,
                                      label_smoothing=0.0)  # the token level is not smoothed
    # The token level over the whole catalogue runs over each kind's distinct tokens.
    vocab = None
    if (token_cfg or loss_cfg).negatives == 'all' and token_columns:
      vocab = tuple(lmp.token_vocab(item_tokens, offset, n_sub, model.kind_reads_items(k))
                    for _, k, offset, n_sub in token_columns)

    def lmp_fn(model, batch, rng):
      outputs = model.forward(batch)
      negatives, cat = draw(loss_cfg, model, batch, rng)
      token_draw = None
      if token_cfg is not None:
        token_draw = draw(token_cfg, model, batch, jax.random.fold_in(rng, 1))
      return lmp.lmp_loss(outputs, batch, token_columns, loss_cfg, negatives, cat, token_draw,
                          vocab)
    return lmp_fn

  if name == 'pinnerformer' and cfg.loss.name == 'default':
    def dense_all_action(model, batch, rng):
      outputs = model.forward(batch)
      negatives, cat = draw(cfg.loss, model, batch, rng)
      loss_cfg = dataclasses.replace(cfg.loss, gate=False, null_logit_c=0.0, w_tok=0.0)
      loss, _ = _multi_step(outputs['queries'], outputs['targets'], batch, loss_cfg, negatives,
                            cat, outputs.get('seen_bias'))
      return loss, {'dense_all_action_loss': loss}
    return dense_all_action

  loss_cfg = _one_step(cfg.loss)
  # HeterRec's queries carry a leading step axis: its step-1 head is the next-item query.
  first_step = (lambda q: q[0]) if name == 'heterrec' else (lambda q: q)

  def next_item(model, batch, rng):
    outputs = model.forward(batch)
    queries_BxTxD = first_step(outputs['queries'])
    negatives, cat = draw(loss_cfg, model, batch, rng)
    t = queries_BxTxD.shape[1]
    one = {**batch, **{k: batch[k][:, :t + 1] for k in ('items', 'tokens', 'mask')}}
    loss, _ = _multi_step(queries_BxTxD, outputs['targets'][:, :t + 1], one, loss_cfg, negatives,
                          cat, outputs.get('seen_bias'))
    return loss, {'softmax_loss': loss}
  return next_item
