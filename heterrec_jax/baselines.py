"""The baselines of SPEC section 8 (SASRec, BERT4Rec, PinnerFormer, HSTU) as Flax NNX modules.

Every model has HeterRec's interface, which the trainer and the evaluator call:
  `Model(schema, model_cfg, loss_cfg, *, rngs, max_len)`; `token_kinds = ()`; `horizon`;
  `forward(batch) -> dict`; `user_vector(items, tokens, timestamps, mask) -> [B, d]`;
  `encode_items(items, tokens) -> ([..., d], None)`; `train()` / `eval()`.
Every returned vector is float32, L2-normalised under loss.scoring='cosine' and raw under
'dot'; logits are divided by tau in the loss (`losses.py`). Inputs are right-aligned.

`forward` returns (shapes: B sequences, W = T + h window, h = `horizon`, d = d_k):
  * SASRec, HSTU, PinnerFormer: 'queries' `[B, T, d]` (the user tower's outputs at the first T
    positions), 'targets' `[B, W, d]` (item vectors of the W positions).
  * BERT4Rec: its input is the whole window (h = 0: the Cloze objective predicts items inside
    its input, so it needs no future window).
    'queries' `[B, T, d]` (outputs on the Cloze-masked input), 'targets' `[B, T, d]` (vectors
    of the original items), 'window_items' `[B, T]` int32 and 'window_mask' `[B, T]` bool (the
    items and mask of those positions), 'cloze_mask' `[B, T]` bool (positions replaced by
    [MASK]), 'corpus' `[n_items + 1, d]` (the vector of every item; row 0 is padding).

Choices where SPEC and the papers' code differ or are silent:
  * Width d = d_k; blocks = n1 + n2 (ModelConfig has no baseline block count); heads, ffn_mult
    and dropout from ModelConfig.
  * SASRec and BERT4Rec are RecBole 1.2.1's (its `TransformerEncoder`): input
    `Drop(LN(E[item] + P[pos]))`, post-LN blocks with dropout on the attention probabilities
    and on the attention and FFN outputs, a GELU FFN of ffn_mult * d, every Linear and
    embedding drawn from N(0, 0.02), LayerNorm eps 1e-12. The item tower is the table E (tied).
  * PinnerFormer uses HeterRec's post-LN blocks (`layers.TransformerBlock`) with a zero time
    bias. HSTU's id input is its public code's: `E[item] * sqrt(d) + P[pos]`, zeroed at
    padding, then dropout; the item tower is the table E.
  * Learned positions are right-aligned: the latest event always takes the last row of
    `P [max_len, d]`, so a shorter input (T < max_len) keeps the meaning of positions.
  * BERT4Rec: Cloze probability `CLOZE_PROB` = 0.2 per real position, drawn from the module's
    own `cloze_rngs` stream (it advances in the train state); no masking after `eval()`.
    [MASK] is row n_items + 1 of the id table (never a retrieval candidate). No output
    projection or per-item output bias (a bias cannot enter a dot-product retrieval).
  * PinnerFormer: HTFL's token embeddings (`model.TokenEmbedder`, variant ignored) concatenated
    `[K*d_f]`, a Linear to d plus positions for the user side; item tower
    `Mlp(K*d_f -> d -> d)` over the same concatenation. No time bias (the paper feeds time as
    features, which this data has not).
  * HSTU layer: `U, V, Q, K = split(SiLU(f1(LN(X))))`, `A = SiLU(Q K^T + rab) / n` with n = T
    (the padded length, as HSTU's code) and causal key mask, `Y = X + f2(Drop(LN(A V) * U))`;
    no 1/sqrt(d) scaling and no FFN. `rab` = a learned per-head relative-position table over
    the offset t - s (causal offsets 0..max_len-1) plus a learned per-head table over the
    log time-gap buckets (`layers.time_gap_buckets`), one of each per layer.
  * Parameters carry logical axis names only and the modules are built with eager sharding off.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from heterrec_jax import layers, model, seen
from heterrec_jax.config import ConfigError, LossConfig, ModelConfig, horizon
from heterrec_jax.data.dataset import Schema

BASELINES = ('sasrec', 'bert4rec', 'pinnerformer', 'hstu')


# ---- pure functions ---------------------------------------------------------------------------

def bidirectional_mask(mask_BxT: jax.Array) -> jax.Array:
  """`allowed_BxTxT[b, t, s]`: every item sees every real item (and itself, so that a padded
  row is never fully masked)."""
  n = mask_BxT.shape[1]
  return mask_BxT[:, None, :].astype(bool) | jnp.eye(n, dtype=bool)[None]


def hstu_attention_weights(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, bias_BxHxTxT: jax.Array,
                           allowed_BxTxT: jax.Array) -> jax.Array:
  """HSTU's pointwise weights `SiLU(Q K^T + rab) / n` (n = T), zero where not allowed:
  `[B, H, T, T]` float32. No softmax: rows do not sum to 1."""
  n = q_BxTxHxD.shape[1]
  logits_BxHxTxT = jnp.einsum('bthd,bshd->bhts', q_BxTxHxD, k_BxTxHxD,
                              preferred_element_type=jnp.float32)
  weights_BxHxTxT = jax.nn.silu(logits_BxHxTxT + bias_BxHxTxT.astype(jnp.float32)) / n
  return jnp.where(allowed_BxTxT[:, None], weights_BxHxTxT, 0.0)


def hstu_attention(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array,
                   bias_BxHxTxT: jax.Array, allowed_BxTxT: jax.Array) -> jax.Array:
  """`A V` with HSTU's pointwise weights A: `[B, T, H, D]` in the dtype of `v`."""
  weights_BxHxTxT = hstu_attention_weights(q_BxTxHxD, k_BxTxHxD, bias_BxHxTxT, allowed_BxTxT)
  return jnp.einsum('bhts,bshd->bthd', weights_BxHxTxT.astype(v_BxTxHxD.dtype), v_BxTxHxD)


def relative_offsets(t: int, max_len: int) -> jax.Array:
  """`clip(t_query - t_key, 0, max_len - 1)`, int32 `[T, T]` (non-causal offsets clip to 0;
  they are masked anyway)."""
  pos_T = jnp.arange(t)
  return jnp.clip(pos_T[:, None] - pos_T[None, :], 0, max_len - 1).astype(jnp.int32)


# ---- shared modules ---------------------------------------------------------------------------

class Positions(nnx.Module):
  """Learned absolute positions `P [max_len, d]`, right-aligned: `P[max_len - T:]`."""

  def __init__(self, max_len: int, d: int, *, dtype, rngs: nnx.Rngs, std: float | None = None):
    std = 1.0 / math.sqrt(d) if std is None else std
    init = nnx.with_partitioning(nnx.initializers.normal(std), (None, 'embed'))
    self.embedding = nnx.Param(init(rngs.params(), (max_len, d), jnp.float32))
    self.max_len, self.dtype = max_len, dtype

  def __call__(self, t: int) -> jax.Array:
    if t > self.max_len:
      raise ValueError(f'sequences of {t} positions are longer than the {self.max_len} '
                       'learned positions (data.max_len)')
    return self.embedding[...][self.max_len - t:].astype(self.dtype)


class IdInput(nnx.Module):
  """Item ids -> `Drop((E[item] * sqrt(d) + P[pos]) * mask)`; `vectors` = normalised E rows."""

  def __init__(self, n_rows: int, d: int, max_len: int, dropout: float, *, dtype,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(model.table_rows(n_rows), d, dtype=dtype, rngs=rngs,
                           embedding_init=model.table_init())
    self.positions = Positions(max_len, d, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.scale = math.sqrt(d)

  def __call__(self, items_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.embed(items_BxT) * self.scale + self.positions(items_BxT.shape[1])
    return self.drop(x_BxTxD * mask_BxT[..., None].astype(x_BxTxD.dtype))

  def vectors(self, items: jax.Array) -> jax.Array:
    return self.embed(items)


class Blocks(nnx.Module):
  """`n_blocks` HeterRec transformer blocks over `[B, T, d]` with a zero time bias."""

  def __init__(self, cfg: ModelConfig, d: int, n_blocks: int, *, dtype, rngs: nnx.Rngs):
    self.blocks = nnx.List([layers.TransformerBlock(d, cfg.heads, cfg.ffn_mult, cfg.dropout,
                                                    dtype=dtype, rngs=rngs)
                            for _ in range(n_blocks)])

  def __call__(self, x_BxTxD: jax.Array, allowed_BxTxT: jax.Array) -> jax.Array:
    zero_bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
    allowed = allowed_BxTxT[:, :, None, :, None]
    x_BxTx1xD = x_BxTxD[:, :, None]
    for block in self.blocks:
      x_BxTx1xD = block(x_BxTx1xD, zero_bias, allowed)
    return x_BxTx1xD[:, :, 0]


# ---- RecBole's transformer encoder (SASRec, BERT4Rec) -----------------------------------------

RECBOLE_INIT_STD = 0.02
RECBOLE_LN_EPS = 1e-12


def _recbole_linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], dtype,
                    rngs: nnx.Rngs) -> layers.Dense:
  return layers.Dense(
      d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(RECBOLE_INIT_STD), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def _recbole_norm(d: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      d, epsilon=RECBOLE_LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)))


class RecBoleBlock(nnx.Module):
  """RecBole's post-LN `TransformerLayer`: `x = LN(x + Drop(Wo Attn(x)))` with dropout on the
  attention probabilities, then `x = LN(x + Drop(W2 GELU(W1 x)))` (exact GELU)."""

  def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float, *, dtype,
               rngs: nnx.Rngs):
    self.heads = heads
    self.query, self.key, self.value = (_recbole_linear(d, d, ('embed', 'mlp'), dtype, rngs)
                                        for _ in range(3))
    self.out = _recbole_linear(d, d, ('mlp', 'embed'), dtype, rngs)
    self.fc1 = _recbole_linear(d, ffn_mult * d, ('embed', 'mlp'), dtype, rngs)
    self.fc2 = _recbole_linear(ffn_mult * d, d, ('mlp', 'embed'), dtype, rngs)
    self.norm1, self.norm2 = _recbole_norm(d, dtype, rngs), _recbole_norm(d, dtype, rngs)
    self.attn_drop, self.out_drop, self.ffn_drop = (nnx.Dropout(dropout, rngs=rngs)
                                                    for _ in range(3))

  def attention(self, x_BxTxD: jax.Array, allowed_BxTxT: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    heads = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = (heads(f(x_BxTxD)) for f in (self.query, self.key, self.value))
    logits_BxHxTxT = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32)
    logits_BxHxTxT = jnp.where(allowed_BxTxT[:, None], logits_BxHxTxT / math.sqrt(d // self.heads),
                               layers.NEG_INF)
    probs_BxHxTxT = self.attn_drop(jax.nn.softmax(logits_BxHxTxT, axis=-1)).astype(v.dtype)
    return self.out(jnp.einsum('bhts,bshd->bthd', probs_BxHxTxT, v).reshape(b, t, d))

  def __call__(self, x_BxTxD: jax.Array, allowed_BxTxT: jax.Array) -> jax.Array:
    x = self.norm1(x_BxTxD + self.out_drop(self.attention(x_BxTxD, allowed_BxTxT)))
    ffn = self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
    return self.norm2(x + self.ffn_drop(ffn))


class RecBoleEncoder(nnx.Module):
  """Item ids -> `Drop(LN(E[item] + P[pos]))` zeroed at padding -> RecBole blocks. The item
  vectors are the rows of E (tied)."""

  def __init__(self, n_rows: int, cfg: ModelConfig, max_len: int, n_blocks: int, *, dtype,
               rngs: nnx.Rngs):
    d = cfg.d_k
    self.embed = nnx.Embed(model.table_rows(n_rows), d, dtype=dtype, rngs=rngs,
                           embedding_init=model.table_init(RECBOLE_INIT_STD))
    self.positions = Positions(max_len, d, dtype=dtype, rngs=rngs, std=RECBOLE_INIT_STD)
    self.norm = _recbole_norm(d, dtype, rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.blocks = nnx.List([RecBoleBlock(d, cfg.heads, cfg.ffn_mult, cfg.dropout, dtype=dtype,
                                         rngs=rngs) for _ in range(n_blocks)])

  def embed_ids(self, items_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.norm(self.embed(items_BxT) + self.positions(items_BxT.shape[1]))
    return self.drop(x_BxTxD * mask_BxT[..., None].astype(x_BxTxD.dtype))

  def __call__(self, x_BxTxD: jax.Array, allowed_BxTxT: jax.Array) -> jax.Array:
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, allowed_BxTxT)
    return x_BxTxD

  def vectors(self, items: jax.Array) -> jax.Array:
    return self.embed(items)


class _Baseline(nnx.Module):
  """The entry points shared by the causal baselines. A subclass defines `_build`,
  `embed(items, tokens, mask) -> x [B, T, d]`, `encode_embedded(x, timestamps, mask) ->
  [B, T, d]` (the blocks, split out so tests can differentiate w.r.t. the embedded input)
  and `encode_items`."""

  def __init__(self, schema: Schema, model_cfg: ModelConfig, loss_cfg: LossConfig, *,
               rngs: nnx.Rngs, max_len: int):
    self.token_kinds = ()
    self.horizon = horizon(model_cfg.name, loss_cfg)
    self.cosine = loss_cfg.scoring == 'cosine'
    with nnx.use_eager_sharding(False):
      self._build(schema, model_cfg, jnp.dtype(model_cfg.compute_dtype), rngs, max_len)
      # Only when on: a model without it keeps the state (and checkpoints) it always had.
      self.seen = seen.SeenBias() if model_cfg.seen_bias else None

  def seen_weights(self) -> jax.Array | None:
    """The seen-item offsets `[seen.BUCKETS]` (`model.seen_bias`), None when off."""
    return None if self.seen is None else self.seen()

  def normalize(self, x: jax.Array) -> jax.Array:
    """L2-normalised under cosine scoring, raw under 'dot'; float32 either way."""
    return layers.l2_normalize(x) if self.cosine else x.astype(jnp.float32)

  def user_outputs(self, items_BxT: jax.Array, tokens_BxTxS: jax.Array, timestamps_BxT: jax.Array,
                   mask_BxT: jax.Array) -> jax.Array:
    """The user tower's output at every position, `[B, T, d]`, not normalised."""
    x_BxTxD = self.embed(items_BxT, tokens_BxTxS, mask_BxT)
    return self.encode_embedded(x_BxTxD, timestamps_BxT, mask_BxT)

  def forward(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """'queries' `[B, T, d]` at the first T positions and 'targets' `[B, W, d]`."""
    t = batch['items'].shape[1] - self.horizon
    user_BxTxD = self.user_outputs(*(batch[k][:, :t]
                                     for k in ('items', 'tokens', 'timestamps', 'mask')))
    targets_BxWxD, _ = self.encode_items(batch['items'], batch['tokens'])
    out = {'queries': self.normalize(user_BxTxD), 'targets': targets_BxWxD}
    if self.seen is not None:
      out['seen_bias'] = self.seen()
    return out

  def user_vector(self, items_BxT: jax.Array, tokens_BxTxS: jax.Array, timestamps_BxT: jax.Array,
                  mask_BxT: jax.Array) -> jax.Array:
    """The normalised output at the last (latest) position, `[B, d]`."""
    user_BxTxD = self.user_outputs(items_BxT, tokens_BxTxS, timestamps_BxT, mask_BxT)
    return self.normalize(user_BxTxD[:, -1])


# ---- SASRec -----------------------------------------------------------------------------------

class SASRec(_Baseline):
  """RecBole's SASRec: item ids + learned positions, causal RecBole blocks, tied item table."""

  def _build(self, schema: Schema, cfg: ModelConfig, dtype, rngs: nnx.Rngs, max_len: int):
    self.input = RecBoleEncoder(schema.n_items + 1, cfg, max_len, cfg.n1 + cfg.n2, dtype=dtype,
                                rngs=rngs)

  def embed(self, items_BxT, tokens_BxTxS, mask_BxT):
    del tokens_BxTxS
    return self.input.embed_ids(items_BxT, mask_BxT)

  def encode_embedded(self, x_BxTxD, timestamps_BxT, mask_BxT):
    del timestamps_BxT
    return self.input(x_BxTxD, layers.item_causal_mask(mask_BxT))

  def encode_items(self, items_N: jax.Array, tokens_NxS: jax.Array) -> tuple[jax.Array, None]:
    del tokens_NxS
    return self.normalize(self.input.vectors(items_N)), None


# ---- BERT4Rec ---------------------------------------------------------------------------------

class BERT4Rec(_Baseline):
  """Bidirectional blocks over item ids with Cloze masking (see the module docstring)."""

  # Probability that a real input position is replaced by [MASK] during training.
  CLOZE_PROB = 0.2

  def _build(self, schema: Schema, cfg: ModelConfig, dtype, rngs: nnx.Rngs, max_len: int):
    self.n_items = schema.n_items
    self.mask_id = schema.n_items + 1
    self.input = RecBoleEncoder(schema.n_items + 2, cfg, max_len, cfg.n1 + cfg.n2, dtype=dtype,
                                rngs=rngs)
    self.cloze_rngs = rngs['cloze'].fork()
    self.deterministic = False  # set by train() / eval(): Cloze masking on / off

  def embed(self, items_BxT, tokens_BxTxS, mask_BxT):
    del tokens_BxTxS
    return self.input.embed_ids(items_BxT, mask_BxT)

  def encode_embedded(self, x_BxTxD, timestamps_BxT, mask_BxT):
    del timestamps_BxT
    return self.input(x_BxTxD, bidirectional_mask(mask_BxT))

  def encode_items(self, items_N: jax.Array, tokens_NxS: jax.Array) -> tuple[jax.Array, None]:
    del tokens_NxS
    return self.normalize(self.input.vectors(items_N)), None

  def cloze(self, items_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(input with [MASK] at the drawn positions, drawn `[B, T]` bool); none after eval()."""
    if self.deterministic:
      return items_BxT, jnp.zeros(items_BxT.shape, bool)
    draw_BxT = jax.random.bernoulli(self.cloze_rngs(), self.CLOZE_PROB, items_BxT.shape)
    masked_BxT = draw_BxT & mask_BxT.astype(bool)
    return jnp.where(masked_BxT, self.mask_id, items_BxT), masked_BxT

  def forward(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Cloze outputs over the LAST T positions of the window (keys: module docstring)."""
    t = batch['items'].shape[1] - self.horizon
    items_BxT, mask_BxT = batch['items'][:, -t:], batch['mask'][:, -t:].astype(bool)
    inputs_BxT, masked_BxT = self.cloze(items_BxT, mask_BxT)
    user_BxTxD = self.user_outputs(inputs_BxT, None, batch['timestamps'][:, -t:], mask_BxT)
    corpus_NxD, _ = self.encode_items(jnp.arange(self.n_items + 1, dtype=jnp.int32), None)
    targets_BxTxD, _ = self.encode_items(items_BxT, None)
    return {'queries': self.normalize(user_BxTxD), 'targets': targets_BxTxD,
            'window_items': items_BxT, 'window_mask': mask_BxT, 'cloze_mask': masked_BxT,
            'corpus': corpus_NxD}

  def user_vector(self, items_BxT, tokens_BxTxS, timestamps_BxT, mask_BxT):
    """BERT4Rec inference: shift left by one, [MASK] at the last position, read it there."""
    del tokens_BxTxS
    b = items_BxT.shape[0]
    items_BxT = jnp.concatenate([items_BxT[:, 1:], jnp.full((b, 1), self.mask_id, jnp.int32)], 1)
    mask_BxT = jnp.concatenate([mask_BxT[:, 1:].astype(bool), jnp.ones((b, 1), bool)], 1)
    user_BxTxD = self.user_outputs(items_BxT, None, timestamps_BxT, mask_BxT)
    return self.normalize(user_BxTxD[:, -1])


# ---- PinnerFormer -----------------------------------------------------------------------------

class PinnerFormer(_Baseline):
  """A causal transformer over concatenated HTFL item features; item tower: an MLP over them."""

  def _build(self, schema: Schema, cfg: ModelConfig, dtype, rngs: nnx.Rngs, max_len: int):
    htfl_cfg = dataclasses.replace(cfg, variant='full')  # the baseline has no HeterRec ablation
    k_d_f = schema.n_kinds * cfg.d_f
    self.htfl = model.TokenEmbedder(schema, htfl_cfg, None, dtype=dtype, rngs=rngs)
    self.proj = layers.dense(k_d_f, cfg.d_k, ('embed', 'mlp'), dtype, rngs)
    self.positions = Positions(max_len, cfg.d_k, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.blocks = Blocks(cfg, cfg.d_k, cfg.n1 + cfg.n2, dtype=dtype, rngs=rngs)
    self.item_mlp = layers.Mlp(k_d_f, cfg.d_k, cfg.d_k, dtype=dtype, rngs=rngs)

  def features(self, items: jax.Array, tokens_xS: jax.Array) -> jax.Array:
    """The concatenated HTFL token embeddings of items, `[..., K*d_f]`."""
    tok_xKxD = self.htfl(items, tokens_xS)
    return tok_xKxD.reshape(*tok_xKxD.shape[:-2], -1)

  def embed(self, items_BxT, tokens_BxTxS, mask_BxT):
    x_BxTxD = self.proj(self.features(items_BxT, tokens_BxTxS))
    x_BxTxD = x_BxTxD + self.positions(items_BxT.shape[1])
    return self.drop(x_BxTxD * mask_BxT[..., None].astype(x_BxTxD.dtype))

  def encode_embedded(self, x_BxTxD, timestamps_BxT, mask_BxT):
    del timestamps_BxT
    return self.blocks(x_BxTxD, layers.item_causal_mask(mask_BxT))

  def encode_items(self, items_N: jax.Array, tokens_NxS: jax.Array) -> tuple[jax.Array, None]:
    return self.normalize(self.item_mlp(self.features(items_N, tokens_NxS))), None


# ---- HSTU -------------------------------------------------------------------------------------

class HstuLayer(nnx.Module):
  """One HSTU layer: pointwise aggregated attention with relative bias, gating, residual."""

  def __init__(self, cfg: ModelConfig, d: int, max_len: int, *, dtype, rngs: nnx.Rngs):
    self.heads, self.max_len = cfg.heads, max_len
    self.norm_in = layers.layer_norm(d, dtype, rngs)
    self.f1 = layers.dense(d, 4 * d, ('embed', 'mlp'), dtype, rngs)
    self.norm_attn = layers.layer_norm(d, dtype, rngs)
    self.f2 = layers.dense(d, d, ('mlp', 'embed'), dtype, rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.position_bias = nnx.Param(init(rngs.params(), (max_len, cfg.heads), jnp.float32),
                                   out_sharding=(None, 'heads'))
    self.time_bias = nnx.Param(init(rngs.params(), (cfg.time_buckets, cfg.heads), jnp.float32),
                               out_sharding=('buckets', 'heads'))

  def relative_bias(self, timestamps_BxT: jax.Array) -> jax.Array:
    """`rab = P_pos[t - s] + P_time[bucket(|ts_t - ts_s|)]`, `[B, H, T, T]` float32."""
    offsets_TxT = relative_offsets(timestamps_BxT.shape[1], self.max_len)
    pos_HxTxT = jnp.moveaxis(self.position_bias[...][offsets_TxT], -1, 0)
    return layers.time_gap_bias(self.time_bias[...], timestamps_BxT) + pos_HxTxT[None]

  def __call__(self, x_BxTxD: jax.Array, timestamps_BxT: jax.Array,
               allowed_BxTxT: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    u, v, q, k = jnp.split(jax.nn.silu(self.f1(self.norm_in(x_BxTxD))), 4, axis=-1)
    heads = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    av_BxTxHxD = hstu_attention(heads(q), heads(k), heads(v), self.relative_bias(timestamps_BxT),
                                allowed_BxTxT)
    return x_BxTxD + self.f2(self.drop(self.norm_attn(av_BxTxHxD.reshape(b, t, d)) * u))


class HSTU(_Baseline):
  """Item ids + learned positions, HSTU layers (causal); the item tower is the id table."""

  def _build(self, schema: Schema, cfg: ModelConfig, dtype, rngs: nnx.Rngs, max_len: int):
    self.input = IdInput(schema.n_items + 1, cfg.d_k, max_len, cfg.dropout, dtype=dtype, rngs=rngs)
    self.hstu_layers = nnx.List([HstuLayer(cfg, cfg.d_k, max_len, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.n1 + cfg.n2)])

  def embed(self, items_BxT, tokens_BxTxS, mask_BxT):
    del tokens_BxTxS
    return self.input(items_BxT, mask_BxT)

  def encode_embedded(self, x_BxTxD, timestamps_BxT, mask_BxT):
    allowed_BxTxT = layers.item_causal_mask(mask_BxT)
    for layer in self.hstu_layers:
      x_BxTxD = layer(x_BxTxD, timestamps_BxT, allowed_BxTxT)
    return x_BxTxD

  def encode_items(self, items_N: jax.Array, tokens_NxS: jax.Array) -> tuple[jax.Array, None]:
    del tokens_NxS
    return self.normalize(self.input.vectors(items_N)), None


MODELS = {'sasrec': SASRec, 'bert4rec': BERT4Rec, 'pinnerformer': PinnerFormer, 'hstu': HSTU}


def build_baseline(schema: Schema, model_cfg: ModelConfig, loss_cfg: LossConfig, rngs: nnx.Rngs,
                   max_len: int) -> nnx.Module:
  """The baseline named by `model_cfg.name`, `max_len` learned positions (data.max_len)."""
  if model_cfg.name not in MODELS:
    raise ConfigError(f'model.name={model_cfg.name!r} is not a baseline; use one of {BASELINES}')
  return MODELS[model_cfg.name](schema, model_cfg, loss_cfg, rngs=rngs, max_len=max_len)
