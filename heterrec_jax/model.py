"""HeterRec: the HTFL token embedder, the Hierarchical Causal Transformer, the item tower and the
LMP heads (SPEC sections 3-6), as one Flax NNX module.

Choices where the paper and SPEC are silent:
  * Fusion MLP (token level -> item level): the K token outputs of an item are concatenated
    (`K*d_f`) and mapped by Linear(K*d_f -> d_k) -> ReLU -> Linear(d_k -> d_k). The paper says
    "an MLP layer"; two layers give the fusion a non-linearity, as the item tower has.
  * Item tower: per-slot MLP Linear(d_f -> d_f) -> ReLU -> Linear(d_f -> d_f) (one per kind,
    stacked kernels), concatenated, then Linear(K*d_f -> d_k) -> ReLU -> Linear(d_k -> d_k).
  * One time-gap table per level (token level, item level; 'no_hct': one for its single stack),
    shared by the blocks of that level, as the paper's single `E_tg`.
  * 'no_htfl': the same fusion MLP applied to the concatenated HTFL embeddings `[K*d_f]`, then the
    item-level blocks: the ablation removes exactly the token-level stage.
  * 'no_hct': N1+N2 blocks of width d_f over the flat tokens, standard causal mask; the item's
    output is its last token through Linear(d_f -> d_k); the token outputs are returned as the
    token-level output (the token loss can still use them).
  * A padded item (mask False) attends its own tokens only (no NaN); no real item sees it.
  * Normalised outputs (queries, targets, user vectors) are float32 whatever `compute_dtype`.
  * Embedding-table rows are rounded up to a multiple of 8 (never-indexed rows) so that the
    'vocab' axis divides by common "model" mesh sizes and tables really shard.
  * The token set of the token-level loss is empty for 'no_htfl', for 'no_tlmp' and when
    `loss.w_tok == 0`.
  * The model is built with Flax eager sharding off: parameters carry logical names only,
    so the model can be built anywhere and `sharding.create_sharded` lays it out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heterrec_jax import layers, seen
from heterrec_jax.config import ConfigError, LossConfig, ModelConfig, horizon
from heterrec_jax.data.dataset import Feature, Schema

ROW_MULTIPLE = 8


class FrozenEmbedding(nnx.Variable):
  """A fixed pre-trained matrix (the 'w/o MFK' raw multimodal embedding): not an `nnx.Param`,
  so an optimiser built with `wrt=nnx.Param` never updates it."""


def table_rows(n: int) -> int:
  """`n` rounded up to a multiple of ROW_MULTIPLE (rows of an embedding table)."""
  return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


def table_init(std: float | None = None):
  """Embedding-table init, named (vocab, embed): N(0, std), or variance scaling over the row
  width when `std` is None."""
  init = (nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=-1, out_axis=-2)
          if std is None else nnx.initializers.normal(std))
  return nnx.with_partitioning(init, ('vocab', 'embed'))


class CategoricalToken(nnx.Module):
  """One sub-id -> one row of the table (categorical and numerical features)."""

  reads_items = False

  def __init__(self, feature: Feature, d_f: int, *, dtype, rngs: nnx.Rngs,
               std: float | None = None):
    self.embed = nnx.Embed(table_rows(feature.table_size), d_f, dtype=dtype, rngs=rngs,
                           embedding_init=table_init(std))

  def __call__(self, items: jax.Array, ids_xS: jax.Array) -> jax.Array:
    del items
    return self.embed(ids_xS[..., 0])


class MultiToken(nnx.Module):
  """`max_values` sub-ids -> the mean of the embeddings of the non-padding ones (zeros if none)."""

  reads_items = False

  def __init__(self, feature: Feature, d_f: int, *, dtype, rngs: nnx.Rngs,
               std: float | None = None):
    self.embed = nnx.Embed(table_rows(feature.table_size), d_f, dtype=dtype, rngs=rngs,
                           embedding_init=table_init(std))

  def __call__(self, items: jax.Array, ids_xV: jax.Array) -> jax.Array:
    del items
    real_xV = (ids_xV != 0)
    emb_xVxD = self.embed(ids_xV)
    total_xD = jnp.einsum('...v,...vd->...d', real_xV.astype(emb_xVxD.dtype), emb_xVxD)
    count_x1 = jnp.maximum(real_xV.sum(-1, keepdims=True), 1)
    return (total_xD / count_x1).astype(emb_xVxD.dtype)


class MultimodalToken(nnx.Module):
  """Z group codes -> Z group tables `[rows, d_f/Z]` (stacked `[Z, rows, d_f/Z]`), concatenated."""

  reads_items = False

  def __init__(self, feature: Feature, d_f: int, *, dtype, rngs: nnx.Rngs,
               std: float | None = None):
    z = feature.n_sub
    if d_f % z:
      raise ConfigError(f'model.d_f={d_f} must be divisible by the {z} groups of multimodal '
                        f'feature {feature.name!r}')
    init = nnx.with_partitioning(nnx.initializers.normal(std or 1.0 / np.sqrt(d_f)),
                                 (None, 'vocab', 'embed'))
    self.embedding = nnx.Param(init(rngs.params(), (z, table_rows(feature.table_size), d_f // z),
                                    jnp.float32))
    self.dtype = dtype

  def __call__(self, items: jax.Array, ids_xZ: jax.Array) -> jax.Array:
    del items
    z = ids_xZ.shape[-1]
    groups_xZxG = jnp.asarray(self.embedding[...])[jnp.arange(z), ids_xZ]
    return groups_xZxG.reshape(*ids_xZ.shape[:-1], -1).astype(self.dtype)


class RawModalToken(nnx.Module):
  """'w/o MFK': the raw (PCA'd) embedding of the ITEM through Linear(d' -> d_f)."""

  # The token depends on the item itself, not only on its sub-ids (`lmp.TokenVocab`).
  reads_items = True

  def __init__(self, matrix: np.ndarray, d_f: int, *, dtype, rngs: nnx.Rngs, std: float = 0.0):
    self.raw_embedding = FrozenEmbedding(jnp.asarray(np.asarray(matrix, np.float32)),
                                         out_sharding=('vocab', None))
    self.proj = layers.dense(matrix.shape[1], d_f, ('embed', 'mlp'), dtype, rngs, std=std)

  def __call__(self, items: jax.Array, ids_xZ: jax.Array) -> jax.Array:
    del ids_xZ
    return self.proj(jnp.asarray(self.raw_embedding[...])[items])


def _raw_matrix(feature: Feature, embeddings: dict | None, n_items: int) -> np.ndarray:
  if not embeddings or feature.name not in embeddings:
    raise ConfigError(
        f"model.variant='no_mfk' needs the raw embedding of multimodal feature "
        f"{feature.name!r} (embedding_{feature.name}.npy in the dataset folder); got "
        f"{sorted(embeddings or {})}")
  matrix = np.asarray(embeddings[feature.name])
  if matrix.ndim != 2 or matrix.shape[0] != n_items + 1:
    raise ConfigError(f'embedding of feature {feature.name!r} has shape {matrix.shape}; '
                      f'expected [n_items + 1 = {n_items + 1}, d]')
  return matrix


def _feature_token(feature: Feature, schema: Schema, cfg: ModelConfig, embeddings, dtype,
                   rngs: nnx.Rngs) -> nnx.Module:
  """The token embedder of one feature; its table starts at N(0, model.table_std), or at
  1/sqrt(d_f) when that is 0."""
  std = cfg.table_std or None
  if feature.kind == 'multi':
    return MultiToken(feature, cfg.d_f, dtype=dtype, rngs=rngs, std=std)
  if feature.kind == 'multimodal' and cfg.variant == 'no_mfk':
    matrix = _raw_matrix(feature, embeddings, schema.n_items)
    return RawModalToken(matrix, cfg.d_f, dtype=dtype, rngs=rngs, std=cfg.linear_std)
  if feature.kind == 'multimodal':
    return MultimodalToken(feature, cfg.d_f, dtype=dtype, rngs=rngs, std=std)
  return CategoricalToken(feature, cfg.d_f, dtype=dtype, rngs=rngs, std=std)


class TokenEmbedder(nnx.Module):
  """HTFL (online part): item row of sub-ids `[..., S]` -> K tokens `[..., K, d_f]`, each the
  feature's embedding plus the learned slot embedding of its kind."""

  def __init__(self, schema: Schema, cfg: ModelConfig, embeddings: dict | None, *, dtype,
               rngs: nnx.Rngs):
    self.columns = tuple((f.offset, f.n_sub) for f in schema.features)
    self.features = nnx.List([_feature_token(f, schema, cfg, embeddings, dtype, rngs)
                              for f in schema.features])
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, 'embed'))
    self.slot_embedding = nnx.Param(init(rngs.params(), (schema.n_kinds, cfg.d_f), jnp.float32))
    self.dtype = dtype

  def __call__(self, items: jax.Array, tokens_xS: jax.Array) -> jax.Array:
    per_kind = [embed(items, tokens_xS[..., lo:lo + n])
                for embed, (lo, n) in zip(self.features, self.columns)]
    tok_xKxD = jnp.stack(per_kind, axis=-2).astype(self.dtype)
    return tok_xKxD + self.slot_embedding[...].astype(self.dtype)


class ItemTower(nnx.Module):
  """K token embeddings -> per-slot MLP (d_f -> d_f, one per kind) -> concat -> MLP -> d_k."""

  def __init__(self, n_kinds: int, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, std = cfg.d_f, cfg.linear_std
    self.w1 = nnx.Param(nnx.with_partitioning(layers.stacked_init((n_kinds,), std),
                                              (None, 'embed', 'mlp'))(
        rngs.params(), (n_kinds, d, d), jnp.float32))
    self.w2 = nnx.Param(nnx.with_partitioning(layers.stacked_init((n_kinds,), std),
                                              (None, 'mlp', 'embed'))(
        rngs.params(), (n_kinds, d, d), jnp.float32))
    self.b1 = nnx.Param(jnp.zeros((n_kinds, d)), out_sharding=(None, 'mlp'))
    self.b2 = nnx.Param(jnp.zeros((n_kinds, d)), out_sharding=(None, 'embed'))
    self.mlp = layers.Mlp(n_kinds * d, cfg.d_k, cfg.d_k, dtype=dtype, rngs=rngs, std=std)
    self.dtype = dtype

  def __call__(self, tok_xKxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (V `[..., d_k]`, per-slot token embeddings `[..., K, d_f]`), not normalised."""
    cast = lambda p: p[...].astype(self.dtype)
    hidden = jax.nn.relu(jnp.einsum('...kd,kde->...ke', tok_xKxD, cast(self.w1)) + cast(self.b1))
    slots_xKxD = jnp.einsum('...kd,kde->...ke', hidden, cast(self.w2)) + cast(self.b2)
    flat_xKD = slots_xKxD.reshape(*slots_xKxD.shape[:-2], -1)
    return self.mlp(flat_xKD), slots_xKxD


class StackedHeads(nnx.Module):
  """Independent linear heads `d -> d`, kernels stacked `[*lead, d, d]` (LMP step heads)."""

  def __init__(self, lead: tuple[int, ...], d: int, *, dtype, rngs: nnx.Rngs, std: float = 0.0,
               identity: bool = False):
    none = (None,) * len(lead)
    # `model.head_init='identity'`: every head starts as the identity map.
    eye = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
    init = nnx.with_partitioning(eye if identity else layers.stacked_init(lead, std),
                                 none + ('embed', 'mlp'))
    self.kernel = nnx.Param(init(rngs.params(), (*lead, d, d), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((*lead, d)), out_sharding=none + ('mlp',))
    self.dtype = dtype

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel `[*lead, d, d]`, bias `[*lead, d]`) in the compute dtype."""
    return self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)


def resolve_token_kinds(schema: Schema, model_cfg: ModelConfig,
                        loss_cfg: LossConfig) -> tuple[tuple[str, int, int, int], ...]:
  """(feature name, kind index k, column offset, n_sub) of each kind of the token-level loss."""
  if model_cfg.variant in ('no_htfl', 'no_tlmp') or loss_cfg.w_tok == 0:
    return ()
  names = [f.name for f in schema.features]
  chosen = loss_cfg.token_kinds or tuple(n for n in names if n != 'item_id')
  unknown = [n for n in chosen if n not in names]
  if unknown:
    raise ConfigError(f'loss.token_kinds={loss_cfg.token_kinds!r} names unknown features '
                      f'{unknown}; the features are {names}')
  return tuple((n, names.index(n), schema.feature(n).offset, schema.feature(n).n_sub)
               for n in chosen)


def _stack(cfg: ModelConfig, d: int, n_blocks: int, dropout: float, dtype,
           rngs: nnx.Rngs) -> layers.CausalStack:
  return layers.CausalStack(d, n_blocks, heads=cfg.heads, ffn_mult=cfg.ffn_mult,
                            dropout=dropout, time_buckets=cfg.time_buckets, dtype=dtype,
                            rngs=rngs, std=cfg.linear_std,
                            attention_dropout=cfg.attention_dropout)


class HeterRec(nnx.Module):
  """The HeterRec user tower (HTFL + HCT), item tower and LMP heads.

  Call `model.train()` / `model.eval()` to switch dropout on / off.
  """

  def __init__(self, schema: Schema, model_cfg: ModelConfig, loss_cfg: LossConfig, *,
               rngs: nnx.Rngs, embeddings: dict | None = None, max_len: int = 0):
    # Parameters carry logical axis names, mapped to the mesh by `sharding.create_sharded`;
    # Flax must not try to place them itself (that would fail outside a mesh).
    with nnx.use_eager_sharding(False):
      self._build(schema, model_cfg, loss_cfg, rngs, embeddings)
      self._build_options(schema, model_cfg, rngs, max_len)

  def _build(self, schema, cfg: ModelConfig, loss_cfg: LossConfig, rngs, embeddings):
    dtype = jnp.dtype(cfg.compute_dtype)
    k = schema.n_kinds
    self.variant, self.n_kinds, self.n_step = cfg.variant, k, loss_cfg.n_step
    self.horizon = horizon('heterrec', loss_cfg)
    self.cosine = loss_cfg.scoring == 'cosine'
    self.token_kinds = resolve_token_kinds(schema, cfg, loss_cfg)
    self.htfl = TokenEmbedder(schema, cfg, embeddings, dtype=dtype, rngs=rngs)
    if cfg.variant == 'no_hct':
      self.flat_stage = _stack(cfg, cfg.d_f, cfg.n1 + cfg.n2, cfg.dropout, dtype, rngs)
      self.flat_out = layers.dense(cfg.d_f, cfg.d_k, ('embed', 'mlp'), dtype, rngs,
                                   std=cfg.linear_std)
    else:
      self.token_stage = (None if cfg.variant == 'no_htfl'
                          else _stack(cfg, cfg.d_f, cfg.n1, cfg.token_level_dropout, dtype,
                                      rngs))
      self.fusion = layers.Mlp(k * cfg.d_f, cfg.d_k, cfg.d_k, dtype=dtype, rngs=rngs,
                               std=cfg.linear_std)
      self.item_stage = _stack(cfg, cfg.d_k, cfg.n2, cfg.dropout, dtype, rngs)
    self.item_tower = ItemTower(k, cfg, dtype=dtype, rngs=rngs)
    identity = cfg.head_init == 'identity'
    self.heads = StackedHeads((loss_cfg.n_step,), cfg.d_k, dtype=dtype, rngs=rngs,
                              std=cfg.linear_std, identity=identity)
    # No token-level loss (no_htfl, no_tlmp, w_tok = 0): no heads (Orbax cannot save
    # zero-size arrays).
    self.token_heads = (StackedHeads((loss_cfg.n_step, len(self.token_kinds)), cfg.d_f,
                                     dtype=dtype, rngs=rngs, std=cfg.linear_std,
                                     identity=identity)
                        if self.token_kinds else None)

  def normalize(self, x: jax.Array) -> jax.Array:
    """L2-normalised under cosine scoring, raw under 'dot'; float32 either way."""
    return layers.l2_normalize(x) if self.cosine else x.astype(jnp.float32)

  def _build_options(self, schema: Schema, cfg: ModelConfig, rngs: nnx.Rngs, max_len: int):
    """The optional free per-item vector (in V, at the item-level input, or both: one table),
    item-level positions, the item-level input's LayerNorm and input dropout (ModelConfig). The
    vector starts at N(0, 0.02), as RecBole's item table: beside the feature path it starts as a
    small correction (at the 0.125 of the feature tables it slowed learning on a sparse 12k-item
    catalogue; docs/results.md)."""
    if cfg.item_positions and max_len < 1:
      raise ConfigError('model.item_positions needs the learned positions of data.max_len')
    self.item_vectors = (nnx.Embed(table_rows(schema.n_items + 1), cfg.d_k, rngs=rngs,
                                   dtype=jnp.dtype(cfg.compute_dtype),
                                   embedding_init=table_init(0.02))
                         if cfg.item_id_vector or cfg.item_id_input else None)
    self.vector_in_v, self.vector_at_input = cfg.item_id_vector, cfg.item_id_input
    self.v_features = cfg.v_features
    self.id_row_kind = None
    if cfg.item_id_row_in_v:
      names = [f.name for f in schema.features]
      if 'item_id' not in names:
        raise ConfigError(f'model.item_id_row_in_v needs an item_id feature; the data has {names}')
      self.id_row_kind = names.index('item_id')
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, 'embed'))
    self.positions = (nnx.Param(init(rngs.params(), (max_len, cfg.d_k), jnp.float32))
                      if cfg.item_positions else None)
    # Only when on: a model without it keeps the state (and checkpoints) it always had.
    self.seen = seen.SeenBias() if cfg.seen_bias else None
    self.input_drop = (nnx.Dropout(cfg.input_dropout, rngs=rngs) if cfg.input_dropout
                       else None)
    self.item_input_norm = (layers.layer_norm(cfg.d_k, jnp.dtype(cfg.compute_dtype), rngs)
                            if cfg.item_input_norm else None)

  # ---- user tower -------------------------------------------------------------------------

  def encode_user(self, items_BxT: jax.Array, tokens_BxTxS: jax.Array, timestamps_BxT: jax.Array,
                  mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """HCT outputs: (U `[B, T, d_k]`, final token-level output `[B, T, K, d_f]` or None)."""
    h0_BxTxKxDf = self.htfl(items_BxT, tokens_BxTxS)
    return self.encode_tokens(h0_BxTxKxDf, timestamps_BxT, mask_BxT, items_BxT)

  def encode_tokens(self, h0_BxTxKxDf: jax.Array, timestamps_BxT: jax.Array,
                    mask_BxT: jax.Array,
                    items_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """HCT from the HTFL output H0 (split out so tests can differentiate w.r.t. H0).
    `items_BxT` feeds the free per-item vector to the item-level input (`item_id_input`)."""
    if self.input_drop is not None:
      h0_BxTxKxDf = self.input_drop(h0_BxTxKxDf)
    if self.variant == 'no_hct':
      return self._flat_tokens(h0_BxTxKxDf, timestamps_BxT, mask_BxT)
    tok_BxTxKxDf = None
    if self.token_stage is not None:
      tok_BxTxKxDf = self.token_stage(h0_BxTxKxDf, timestamps_BxT,
                                      layers.block_causal_mask(mask_BxT))
    fused = h0_BxTxKxDf if tok_BxTxKxDf is None else tok_BxTxKxDf
    item_BxTxDk = self.fusion(fused.reshape(*fused.shape[:2], -1))
    if self.vector_at_input and items_BxT is not None:
      item_BxTxDk = item_BxTxDk + self.item_vectors(items_BxT).astype(item_BxTxDk.dtype)
    if self.positions is not None:
      t = item_BxTxDk.shape[1]
      if t > self.positions.shape[0]:
        raise ValueError(f'sequences of {t} positions are longer than the '
                         f'{self.positions.shape[0]} learned positions (data.max_len)')
      item_BxTxDk = item_BxTxDk + self.positions[...][-t:].astype(item_BxTxDk.dtype)
    if self.item_input_norm is not None:
      item_BxTxDk = self.item_input_norm(item_BxTxDk)
    if self.input_drop is not None:
      item_BxTxDk = self.input_drop(item_BxTxDk)
    return self.encode_item_level(item_BxTxDk, timestamps_BxT, mask_BxT), tok_BxTxKxDf

  def encode_item_level(self, x_BxTxDk: jax.Array, timestamps_BxT: jax.Array,
                        mask_BxT: jax.Array) -> jax.Array:
    """The N2 item-level blocks (causal, key mask): `[B, T, d_k] -> [B, T, d_k]`."""
    out = self.item_stage(x_BxTxDk[:, :, None], timestamps_BxT, layers.block_causal_mask(mask_BxT))
    return out[:, :, 0]

  def _flat_tokens(self, h0_BxTxKxDf, timestamps_BxT, mask_BxT):
    """'w/o HCT': one causal stack over the flat tokens; an item's output is its last token."""
    allowed = layers.token_causal_mask(mask_BxT, self.n_kinds)
    tok_BxTxKxDf = self.flat_stage(h0_BxTxKxDf, timestamps_BxT, allowed)
    return self.flat_out(tok_BxTxKxDf[:, :, -1]), tok_BxTxKxDf

  # ---- item tower and heads ---------------------------------------------------------------

  def encode_items(self, items_N: jax.Array, tokens_NxS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(V `[..., d_k]`, per-slot token embeddings `[..., K, d_f]`), both L2-normalised float32.

    Any leading shape: `items [...]`, `tokens [..., S]`.
    """
    tok_NxKxDf = self.htfl(items_N, tokens_NxS)
    item_NxDk, slots_NxKxDf = self.item_tower(tok_NxKxDf)
    if not self.v_features:  # V from the per-item parts below alone (config checks one is on)
      item_NxDk = jnp.zeros_like(item_NxDk)
    if self.vector_in_v:
      item_NxDk = item_NxDk + self.item_vectors(items_N)
    if self.id_row_kind is not None:
      item_NxDk = item_NxDk + tok_NxKxDf[..., self.id_row_kind, :]
    return self.normalize(item_NxDk), self.normalize(slots_NxKxDf)

  def step_queries(self, user_BxTxDk: jax.Array) -> jax.Array:
    """The N_step heads on U, L2-normalised: `[n_step, B, T, d_k]`."""
    kernel_NxDxD, bias_NxD = self.heads.weights()
    out = jnp.einsum('btd,nde->nbte', user_BxTxDk, kernel_NxDxD) + bias_NxD[:, None, None]
    return self.normalize(out)

  def token_queries(self, tok_BxTxKxDf: jax.Array) -> jax.Array:
    """Head (step i, loss kind s) on the token output of kind s, L2-normalised:
    `[n_step, n_tok, B, T, d_f]`. Needs a token-level output and a non-empty token set."""
    kernel_NxSxDxD, bias_NxSxD = self.token_heads.weights()
    tok_BxTxSxDf = tok_BxTxKxDf[:, :, self._token_kind_index()]
    out = jnp.einsum('btsd,nsde->nsbte', tok_BxTxSxDf, kernel_NxSxDxD)
    return self.normalize(out + bias_NxSxD[:, :, None, None])

  def kind_reads_items(self, k: int) -> bool:
    """Whether token kind k's vector depends on the item itself, not only on its sub-ids."""
    return self.htfl.features[k].reads_items

  def _token_kind_index(self) -> jax.Array:
    return jnp.array([k for _, k, _, _ in self.token_kinds], jnp.int32)

  # ---- entry points -----------------------------------------------------------------------

  def forward(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Training outputs of a batch of windows of W = T + h events (h = `self.horizon`).

    `batch`: items `[B, W]`, tokens `[B, W, S]`, timestamps `[B, W]`, mask `[B, W]`; the user
    tower reads the first T positions, the item tower all W. Returns (float32, L2-normalised
    under cosine scoring):
    queries `[n_step, B, T, d_k]`, targets `[B, W, d_k]`, token_queries
    `[n_step, n_tok, B, T, d_f]`, token_targets `[n_tok, B, W, d_f]` (n_tok may be 0).
    """
    items_BxW, tokens_BxWxS = batch['items'], batch['tokens']
    b, w = items_BxW.shape
    t = w - self.horizon
    user_BxTxDk, tok_BxTxKxDf = self.encode_user(items_BxW[:, :t], tokens_BxWxS[:, :t],
                                                 batch['timestamps'][:, :t], batch['mask'][:, :t])
    targets_BxWxDk, slots_BxWxKxDf = self.encode_items(items_BxW, tokens_BxWxS)
    d_f = slots_BxWxKxDf.shape[-1]
    if self.token_kinds and tok_BxTxKxDf is not None:
      token_queries = self.token_queries(tok_BxTxKxDf)
      token_targets = jnp.moveaxis(slots_BxWxKxDf[:, :, self._token_kind_index()], 2, 0)
    else:
      token_queries = jnp.zeros((self.n_step, 0, b, t, d_f), jnp.float32)
      token_targets = jnp.zeros((0, b, w, d_f), jnp.float32)
    out = {'queries': self.step_queries(user_BxTxDk), 'targets': targets_BxWxDk,
           'token_queries': token_queries, 'token_targets': token_targets}
    if self.seen is not None:
      out['seen_bias'] = self.seen()
    return out

  def seen_weights(self) -> jax.Array | None:
    """The seen-item offsets `[seen.BUCKETS]` (`model.seen_bias`), None when off."""
    return None if self.seen is None else self.seen()

  def user_vector(self, items_BxT: jax.Array, tokens_BxTxS: jax.Array, timestamps_BxT: jax.Array,
                  mask_BxT: jax.Array) -> jax.Array:
    """`normalise(head_1(U_T))` at the last position (inputs right-aligned): `[B, d_k]`."""
    user_BxTxDk, _ = self.encode_user(items_BxT, tokens_BxTxS, timestamps_BxT, mask_BxT)
    kernel_NxDxD, bias_NxD = self.heads.weights()
    return self.normalize(user_BxTxDk[:, -1] @ kernel_NxDxD[0] + bias_NxD[0])
