"""Frozen configuration dataclasses, one per concern, and dotted command-line overrides.

Every field has a comment; every check in `__post_init__` names the field and the allowed values.
A config file is a Python file exporting `get_config() -> Config` (see `configs/`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import typing
from typing import Any


class ConfigError(ValueError):
  """A bad configuration value: the message names the field and what is allowed."""


def _check_in(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not allowed; use one of {allowed}')


def _check_positive(field: str, value: float, allow_zero: bool = False) -> None:
  if not math.isfinite(value):
    raise ConfigError(f'{field}={value!r} is not allowed; it must be a finite number')
  if value < 0 or (value == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    raise ConfigError(f'{field}={value!r} is not allowed; it must be {bound}')


def _check_fraction(field: str, value: float, closed: bool = False) -> None:
  """`value` in [0, 1) (AdamW's moments), or in [0, 1] with `closed`."""
  if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
    raise ConfigError(f'{field}={value!r} is not allowed; it must be in '
                      f'[0, 1{"]" if closed else ")"}')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Prepared dataset folder (see `python -m heterrec_jax.data.prepare`). Empty: the built-in
  # synthetic data, prepared once into WORKDIR/data with the synthetic_* settings below.
  path: str = ''
  # Items per input sequence (T); a training window holds T + h events, h = the model's horizon
  # (1 for next-item models, loss.n_step for LMP and PinnerFormer, 0 for BERT4Rec's Cloze).
  max_len: int = 50
  # Training examples: 'all' (every training target of every user once per epoch, SPEC 2),
  # 'last' (one window per user: the most recent T + h events) or 'random' (one window per
  # user per epoch, ending at a random training event).
  window: str = 'all'
  # 'all' windows: stride S between windows (0: max_len); a window counts the targets of its
  # last S inputs only, so every target has >= max_len - S events of context, at max_len / S
  # times the compute per epoch (RecBole trains every target with its full context, S = 1).
  stride: int = 0
  # 'all' windows: move the windows' grid each epoch (offsets 0..S-1 in turn, a seeded order),
  # so each epoch reads a target with another context (every length in [T - S, T)); every
  # target is still counted once an epoch. False: the same windows every epoch.
  jitter: bool = False
  # Seed of the shuffling and of random windows.
  seed: int = 0
  # Built-in synthetic data: number of users, items and latent topics, and the generator seed.
  synthetic_users: int = 2000
  synthetic_items: int = 1000
  synthetic_topics: int = 16
  synthetic_seed: int = 0
  # Background processes that prepare batches (0: in the training process).
  workers: int = 0

  def __post_init__(self):
    _check_positive('data.max_len', self.max_len)
    if not 0 <= self.stride <= self.max_len:
      raise ConfigError(f'data.stride={self.stride} must be in [0, data.max_len={self.max_len}] '
                        '(0: data.max_len)')
    _check_in('data.window', self.window, ('all', 'last', 'random'))
    if self.jitter and self.window != 'all':
      raise ConfigError(f"data.jitter=True needs data.window='all', not {self.window!r}")
    _check_positive('data.workers', self.workers, allow_zero=True)
    _check_positive('data.seed', self.seed, allow_zero=True)
    _check_positive('data.synthetic_seed', self.synthetic_seed, allow_zero=True)
    for name in ('synthetic_users', 'synthetic_items', 'synthetic_topics'):
      _check_positive(f'data.{name}', getattr(self, name))


MODEL_NAMES = ('heterrec', 'sasrec', 'bert4rec', 'pinnerformer', 'hstu')
# HeterRec's ablation variants (the paper's Table 2), 'full' first.
VARIANTS = ('full', 'no_htfl', 'no_mfk', 'no_hct', 'no_lmp', 'no_tlmp')
HEAD_INITS = ('lecun', 'identity')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Which model: 'heterrec', or a baseline: 'sasrec', 'bert4rec', 'pinnerformer', 'hstu'.
  name: str = 'heterrec'
  # HeterRec ablation: 'full', 'no_htfl', 'no_mfk', 'no_hct', 'no_lmp', 'no_tlmp'.
  variant: str = 'full'
  # Token width d_f and item width d_k.
  d_f: int = 64
  d_k: int = 64
  # Attention heads (both levels); d_f and d_k must be divisible by it.
  heads: int = 2
  # Token-level blocks N1 and item-level blocks N2.
  n1: int = 2
  n2: int = 2
  # FFN hidden width as a multiple of the block width.
  ffn_mult: int = 4
  # Dropout on attention outputs and FFNs.
  dropout: float = 0.2
  # Number of log time-gap buckets B_t of the learned time-gap bias.
  time_buckets: int = 128
  # Dtype of the activations: 'float32' or 'bfloat16' (parameters stay float32).
  compute_dtype: str = 'float32'
  # HeterRec options (SPEC 5 and issue 11; off = the paper): a free per-item vector of width
  # d_k added to the item tower's V; the same (tied) vector added to the item-level input of the
  # user tower, as SASRec ties its input and output embeddings (no effect on 'no_hct', which has
  # no item-level input); and learned positions (right-aligned, data.max_len of them) added to
  # the item-level input beside the time-gap bias.
  item_id_vector: bool = False
  item_id_input: bool = False
  # HeterRec option (off = the paper): the item-id token's own HTFL row (the table the user
  # tower reads) added straight to V, as SASRec's V is its input table's row. Needs d_f == d_k
  # and an 'item_id' feature.
  item_id_row_in_v: bool = False
  item_positions: bool = False
  # HeterRec option (True = the paper): the item tower's feature MLP output in V. False: V is the
  # per-item part alone (the free vector of item_id_vector, as SASRec's output table, or the id
  # token's row of item_id_row_in_v; one of the two is needed), while the user tower still
  # reads every feature token and the token-level loss still predicts the next item's tokens
  # from the item tower's per-slot embeddings. For catalogues whose items all have training
  # events: an item never seen in training keeps its random vector.
  v_features: bool = True
  # Initial std of the HTFL feature tables (categorical, multi-valued, multimodal): 0 means
  # 1/sqrt(d_f) (variance scaling over the row width); > 0 means N(0, table_std), e.g. 0.02 as
  # RecBole's item table and this model's free per-item vector.
  table_std: float = 0.0
  # Initial std of every Linear kernel of HeterRec (blocks, fusion, item tower, LMP heads): 0
  # means lecun normal (the paper is silent); > 0 means N(0, linear_std), e.g. 0.02 as RecBole's
  # SASRec and BERT initialise theirs.
  linear_std: float = 0.0
  # HeterRec option (off = the paper): dropout on the block stacks' inputs, i.e. on the HTFL
  # tokens H0 and on the item-level input (after the fusion, the free vector and the positions),
  # as SASRec drops its input embeddings; the blocks keep `dropout`.
  input_dropout: float = 0.0
  # HeterRec option: the token-level blocks' own dropout rate (the item-level blocks keep
  # `dropout`); negative, the default, is `dropout` at both levels, as the paper.
  token_dropout: float = -1.0
  # HeterRec option (off = the paper): a LayerNorm on the item-level input (after the fusion, the
  # free vector and the positions, before input dropout), as SASRec normalises E + P.
  item_input_norm: bool = False
  # HeterRec option (off = the paper): dropout on the attention probabilities of every block, as
  # RecBole's SASRec; the blockwise attention of long sequences draws it per block pair, so its
  # memory stays linear in T.
  attention_dropout: float = 0.0
  # Initial kernels of the LMP step heads (item and token level): 'lecun' (the paper is silent;
  # `linear_std` applies) or 'identity' (kernel I, bias 0: each step's query starts as U itself,
  # the next-item query of SASRec, and the heads learn from there).
  head_init: str = 'lecun'
  # Any model but BERT4Rec (off = the paper and the reference baselines): a learned score
  # offset for the items of the query's own input, by how recently it read them (`seen.py`):
  # negative where users rarely come back to an item, positive where they often do. Needs
  # loss.negatives='all'; evaluation adds it to the inputs' scores.
  seen_bias: bool = False

  @property
  def token_level_dropout(self) -> float:
    """The token-level blocks' rate: `token_dropout`, or `dropout` where it is negative."""
    return self.dropout if self.token_dropout < 0 else self.token_dropout

  def __post_init__(self):
    _check_in('model.name', self.name, MODEL_NAMES)
    _check_in('model.variant', self.variant, VARIANTS)
    _check_in('model.compute_dtype', self.compute_dtype, ('float32', 'bfloat16'))
    _check_in('model.head_init', self.head_init, HEAD_INITS)
    for name in ('d_f', 'd_k', 'heads', 'ffn_mult', 'time_buckets'):
      _check_positive(f'model.{name}', getattr(self, name))
    _check_positive('model.n1', self.n1, allow_zero=True)
    _check_positive('model.n2', self.n2, allow_zero=True)
    for name in ('d_f', 'd_k'):
      if getattr(self, name) % self.heads:
        raise ConfigError(f'model.{name}={getattr(self, name)} must be divisible by '
                          f'model.heads={self.heads}')
    for name in ('dropout', 'input_dropout', 'attention_dropout'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f'model.{name}={getattr(self, name)} must be in [0, 1)')
    if not (self.token_dropout < 0 or 0.0 <= self.token_dropout < 1.0):
      raise ConfigError(f'model.token_dropout={self.token_dropout} must be in [0, 1), or '
                        'negative for model.dropout')
    _check_positive('model.table_std', self.table_std, allow_zero=True)
    _check_positive('model.linear_std', self.linear_std, allow_zero=True)
    if self.item_id_row_in_v and self.d_f != self.d_k:
      raise ConfigError(f'model.item_id_row_in_v needs model.d_f == model.d_k (got d_f='
                        f'{self.d_f}, d_k={self.d_k})')
    if not self.v_features and not (self.item_id_vector or self.item_id_row_in_v):
      raise ConfigError('model.v_features=False leaves V empty: it needs model.item_id_vector=True '
                        '(or model.item_id_row_in_v=True) to give V a per-item vector')


NEGATIVES = ('all', 'uniform', 'in_batch', 'mixed', 'same_position', 'batch_pool')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  # Which loss: 'default' (the model's own: LMP for HeterRec, Cloze for BERT4Rec, the dense
  # all-action loss for PinnerFormer, sampled softmax for SASRec and HSTU) or 'sampled_softmax'
  # (the in-batch sampled softmax of HSTU's public SASRec, to compare architectures under one loss).
  name: str = 'default'
  # Prediction steps N_step of the LMP loss.
  n_step: int = 3
  # Softmax temperature tau (logits are score / tau).
  tau: float = 0.05
  # Score of a (query, item) pair: 'cosine' (L2-normalised vectors, the paper's form) or 'dot'
  # (raw dot products, as RecBole's SASRec).
  scoring: str = 'cosine'
  # The null logit c in the denominator: 1.0 as printed in the paper, 0.0 to drop it.
  null_logit_c: float = 1.0
  # Negative source (SPEC 6), for every model: 'all' (softmax over the whole catalogue),
  # 'uniform' (n_uniform items drawn uniformly per step, shared by every query), 'in_batch'
  # (every real target position of the batch), 'mixed' (in_batch + uniform), and the paper's
  # 'same_position' (the items at the same target position of the other sequences) and
  # 'batch_pool' (pool_size positions drawn from the batch). Accidental hits are masked.
  negatives: str = 'all'
  # Size M of the shared pool for negatives='batch_pool'.
  pool_size: int = 1024
  # Items drawn per step for negatives='uniform' and 'mixed'.
  n_uniform: int = 128
  # negatives='all': the catalogue's logits are reduced in chunks of at most this many MiB
  # of float32 per step (forward and backward), whatever the catalogue's size.
  logits_budget_mb: int = 256
  # Subtract log(expected count in the candidate set) from every logit of in-batch candidates
  # and positives (log-Q correction of the popularity bias of in-batch negatives).
  log_q: bool = False
  # Margin lambda_m of the gate of steps i > 1.
  lambda_m: float = 1.0
  # Apply the margin gate (False: plain multi-step prediction, the 'w/o LMP' ablation).
  gate: bool = True
  # Weight w_tok of the token-level loss (0: the 'w/o t-LMP' ablation).
  w_tok: float = 1.0
  # Token kinds (feature names) of the token-level loss; empty: every kind but the item id.
  token_kinds: tuple[str, ...] = ()
  # Negative source of the token-level loss ('' = loss.negatives). Under 'all' each kind's
  # softmax runs over its distinct tokens in chunks (`lmp.TokenVocab`), so it costs about one
  # item-level softmax per kind at most; 'uniform' is cheaper when a kind has about as many
  # distinct tokens as the catalogue has items (an id-like or text-code kind).
  token_negatives: str = ''
  # Label smoothing eps of the item-level softmax over the whole catalogue (negatives='all',
  # and BERT4Rec's full Cloze softmax): the target is (1 - eps) on the positive and eps spread
  # evenly over the catalogue's items, i.e. the loss (1 - eps) * CE + eps * mean_c(-log p_c).
  # Exact and cheap (the mean logit is the query against the mean item vector); the token
  # level and the sampled sources are not smoothed. 0: off.
  label_smoothing: float = 0.0

  def __post_init__(self):
    _check_in('loss.name', self.name, ('default', 'sampled_softmax'))
    _check_positive('loss.n_step', self.n_step)
    _check_positive('loss.tau', self.tau)
    _check_positive('loss.null_logit_c', self.null_logit_c, allow_zero=True)
    _check_in('loss.negatives', self.negatives, NEGATIVES)
    _check_in('loss.token_negatives', self.token_negatives, ('',) + NEGATIVES)
    _check_in('loss.scoring', self.scoring, ('cosine', 'dot'))
    _check_positive('loss.pool_size', self.pool_size)
    _check_positive('loss.n_uniform', self.n_uniform)
    _check_positive('loss.logits_budget_mb', self.logits_budget_mb)
    if self.log_q and self.negatives not in ('in_batch', 'mixed'):
      raise ConfigError(f'loss.log_q=True corrects in-batch sampling; it needs loss.negatives '
                        f"'in_batch' or 'mixed', not {self.negatives!r}")
    _check_positive('loss.lambda_m', self.lambda_m, allow_zero=True)
    _check_positive('loss.w_tok', self.w_tok, allow_zero=True)
    _check_fraction('loss.label_smoothing', self.label_smoothing)
    if self.label_smoothing and self.negatives != 'all':
      raise ConfigError(f'loss.label_smoothing={self.label_smoothing} spreads the target over '
                        "the whole catalogue; it needs loss.negatives='all', not "
                        f'{self.negatives!r} (add loss.label_smoothing=0 to train on that '
                        'source)')


SCHEDULES = ('constant', 'cosine', 'plateau')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  # Peak learning rate of AdamW.
  lr: float = 1e-3
  # Linear warm-up steps, then the schedule: 'constant' (the peak until training stops, as
  # RecBole; pairs with early stopping), 'cosine' (decay to lr * final_lr_fraction at
  # train.steps) or 'plateau' (the peak, multiplied by plateau_factor each time plateau_patience
  # validations in a row bring no new best, at most plateau_cuts times: Keras' and PyTorch's
  # ReduceLROnPlateau; early stopping's count is not reset by a cut).
  warmup_steps: int = 100
  schedule: str = 'constant'
  final_lr_fraction: float = 0.0
  plateau_patience: int = 3
  plateau_factor: float = 0.3
  plateau_cuts: int = 2
  # AdamW weight decay.
  weight_decay: float = 0.0
  # Decoupled decay of the free per-item vector table alone (model.item_id_vector /
  # item_id_input), added to weight_decay there: a pull towards 0 of the rows of rarely seen
  # items, which the catalogue softmax otherwise keeps pushing (docs/results.md, Toys).
  vector_decay: float = 0.0
  # Learning-rate multiplier of the free per-item vector table alone (1: the shared rate): its
  # Adam step is scaled by it before the decays, so a row of a rarely seen item can move away
  # from the feature path's shared direction faster than the shared weights move.
  vector_lr_scale: float = 1.0
  # Global gradient-norm clipping (0: off).
  clip_norm: float = 1.0
  # AdamW moments.
  b1: float = 0.9
  b2: float = 0.98
  # Decay of an exponential moving average of the parameters (0: off). Validation, the best
  # checkpoint's choice, `evaluate` and `export` read the debiased average; training steps the
  # raw parameters (averaging.py). 0.99 averages over about the last 100 steps.
  ema: float = 0.0

  def __post_init__(self):
    _check_positive('optim.lr', self.lr)
    _check_in('optim.schedule', self.schedule, SCHEDULES)
    _check_positive('optim.plateau_patience', self.plateau_patience)
    if not 0.0 < self.plateau_factor < 1.0:
      raise ConfigError(f'optim.plateau_factor={self.plateau_factor!r} is not allowed; it must '
                        'be in (0, 1)')
    _check_positive('optim.plateau_cuts', self.plateau_cuts, allow_zero=True)
    _check_positive('optim.warmup_steps', self.warmup_steps, allow_zero=True)
    _check_positive('optim.weight_decay', self.weight_decay, allow_zero=True)
    _check_positive('optim.vector_decay', self.vector_decay, allow_zero=True)
    _check_positive('optim.vector_lr_scale', self.vector_lr_scale)
    _check_positive('optim.clip_norm', self.clip_norm, allow_zero=True)
    _check_fraction('optim.final_lr_fraction', self.final_lr_fraction, closed=True)
    _check_fraction('optim.b1', self.b1)
    _check_fraction('optim.b2', self.b2)
    _check_fraction('optim.ema', self.ema)


# Logical axis -> mesh axis. Parameters and activations name logical axes only.
DEFAULT_RULES = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', None),
    ('buckets', None),
    ('items', 'model'),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  # Devices on the ("data", "model") axes; -1 on one axis takes the remaining devices.
  data: int = -1
  model: int = 1
  # Logical-axis rules: pairs (logical name, mesh axis or None).
  rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

  def __post_init__(self):
    if (self.data == -1) and (self.model == -1):
      raise ConfigError('mesh.data and mesh.model cannot both be -1')
    for name in ('data', 'model'):
      value = getattr(self, name)
      if value != -1 and value < 1:
        raise ConfigError(f'mesh.{name}={value} must be >= 1 or -1')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Optimiser steps at most (training stops earlier when early stopping says so).
  steps: int = 20000
  # Global batch size (sequences per step); must divide by the data-parallel devices.
  batch_size: int = 128
  # Gradient accumulation: each step's batch is taken in this many equal parts, one after the
  # other, and their gradients averaged, weighted by the next-item pairs each counts, before
  # one optimiser update (train.py `accumulate_gradients`: the whole batch's update for a loss
  # that is one mean over those pairs). The step's temporary memory is one part's (on a CPU
  # host also the pages XLA maps afresh every step: docs/benchmarks.md). The batch per
  # data-parallel device must divide by it.
  microbatches: int = 1
  # Seed of parameter initialisation and dropout.
  seed: int = 0
  # Validate every this many steps (0: only at the end).
  eval_every: int = 500
  # Early stopping: metric to watch and validations without improvement before stopping (0: off).
  early_stop_metric: str = 'ndcg@10'
  patience: int = 5
  # Checkpoint every this many steps (also on SIGTERM and at the end); checkpoints kept.
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  # Log metrics every this many steps.
  log_every: int = 50
  # Persistent XLA compilation cache shared by runs (a resumed or repeated run and the seeds of
  # a sweep skip compilation); '' turns it off. JAX_COMPILATION_CACHE_DIR, when set, wins.
  compile_cache_dir: str = '~/.cache/heterrec_jax/xla'
  # The host allocator under XLA's CPU runtime (host_allocator.py): 'system' leaves glibc's
  # defaults; 'reuse' keeps the memory a step frees for the next one (one malloc arena, no
  # per-allocation mappings, no trimming), so a CPU step stops faulting its temporaries in
  # afresh: faster steps, more resident memory (docs/benchmarks.md); 'auto' is 'reuse' where
  # JAX can only run on the CPU, else 'system'. Set as the run starts, before JAX's backend;
  # Linux with glibc only. No effect on the numbers.
  host_allocator: str = 'auto'
  # XLA devices a CPU-only host is split into (sharding.configure_cpu_devices; the mesh's
  # "data" axis takes them, one part of each batch per device): 1 keeps the process's devices;
  # 0 takes one per core the process may run on (at most, and a count that divides both batch
  # sizes). XLA's CPU runtime runs a batched matmul of small matrices (the token level's
  # attention at d_head 32) on one thread; split in N devices, N such parts run side by side.
  # Set as the run starts, before JAX's backend; the gradient is then summed over devices, so
  # figures move by float32 rounding. No effect where an accelerator is present.
  cpu_devices: int = 1

  def __post_init__(self):
    _check_positive('train.steps', self.steps)
    _check_positive('train.batch_size', self.batch_size)
    _check_positive('train.microbatches', self.microbatches)
    if self.batch_size % self.microbatches:
      raise ConfigError(f'train.microbatches={self.microbatches} must divide train.batch_size='
                        f'{self.batch_size}')
    for name in ('eval_every', 'patience', 'checkpoint_every', 'log_every'):
      _check_positive(f'train.{name}', getattr(self, name), allow_zero=True)
    _check_positive('train.keep_checkpoints', self.keep_checkpoints)
    _check_positive('train.seed', self.seed, allow_zero=True)
    _check_in('train.early_stop_metric', self.early_stop_metric, METRIC_NAMES)
    _check_in('train.host_allocator', self.host_allocator, HOST_ALLOCATORS)
    _check_positive('train.cpu_devices', self.cpu_devices, allow_zero=True)


HOST_ALLOCATORS = ('auto', 'system', 'reuse')
CUTOFFS = (10, 50, 100, 200)
METRIC_NAMES = tuple(f'{m}@{k}' for k in CUTOFFS for m in ('recall', 'ndcg')) + ('mrr',)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  # Users scored per evaluation batch.
  batch_size: int = 256
  # Remove the items of the input sequence from the candidates (HSTU: on; RecBole: off).
  exclude_history: bool = False
  # Items per chunk when computing all item vectors.
  item_batch_size: int = 4096
  # Evaluate at most this many users (0: all); for quick validation on big data.
  max_users: int = 0

  def __post_init__(self):
    _check_positive('eval.batch_size', self.batch_size)
    _check_positive('eval.item_batch_size', self.item_batch_size)
    _check_positive('eval.max_users', self.max_users, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()

  def __post_init__(self):
    m = self.model
    has_vector = m.name == 'heterrec' and (m.item_id_vector or m.item_id_input)
    o = self.optim
    for field, set_, what in (('vector_decay', o.vector_decay != 0.0, 'decays'),
                              ('vector_lr_scale', o.vector_lr_scale != 1.0, 'scales the rate of')):
      if set_ and not has_vector:
        raise ConfigError(f'optim.{field}={getattr(o, field)} {what} the free per-item vector, '
                          'which only HeterRec with model.item_id_vector=true (or item_id_input) '
                          f'has; this config has model.name={m.name!r}, item_id_vector='
                          f'{m.item_id_vector}, item_id_input={m.item_id_input}')
    if m.seen_bias and (m.name == 'bert4rec' or self.loss.negatives != 'all'):
      raise ConfigError("model.seen_bias=True needs loss.negatives='all' (the whole catalogue's "
                        f'softmax) and a next-item model; this config has model.name={m.name!r}, '
                        f'loss.negatives={self.loss.negatives!r}')
    if self.loss.label_smoothing and m.name == 'bert4rec' and self.loss.name != 'default':
      raise ConfigError(f'loss.label_smoothing={self.loss.label_smoothing} smooths BERT4Rec\'s '
                        "full Cloze softmax (loss.name='default'); its in-batch loss "
                        f"(loss.name={self.loss.name!r}) is not smoothed")


def horizon(model_name: str, loss: LossConfig) -> int:
  """Events after the input that a training window of `model_name` needs: 0 for BERT4Rec's
  Cloze, 1 for next-item models (SASRec, HSTU, any model under loss.name='sampled_softmax'),
  loss.n_step for LMP and PinnerFormer's dense all-action loss."""
  if model_name == 'bert4rec':
    return 0
  if loss.name == 'sampled_softmax' or model_name in ('sasrec', 'hstu'):
    return 1
  return loss.n_step


def _parse_value(field: str, text: str, kind: Any) -> Any:
  """Parses `text` as a value of the annotated type `kind`."""
  kind_text = str(kind)
  try:
    if kind is bool or kind_text == 'bool':
      if text.lower() in ('1', 'true', 'yes'):
        return True
      if text.lower() in ('0', 'false', 'no'):
        return False
      raise ValueError('expected true or false')
    if kind is int or kind_text == 'int':
      return int(text)
    if kind is float or kind_text == 'float':
      return float(text)
    if kind_text.startswith('tuple'):
      return tuple(x for x in text.split(',') if x)
    return text
  except ValueError as e:
    raise ConfigError(f'{field}={text!r}: {e}') from None


def _parse_override(config: Config, item: str) -> tuple[list[str], Any]:
  """(field path, typed value) of one 'a.b=value' string, checked against the config's fields
  (not yet against the other fields' values)."""
  if '=' not in item:
    raise ConfigError(f'override {item!r} must look like field.name=value')
  key, _, text = item.partition('=')
  key, text = key.strip(), text.strip()
  path = key.split('.')
  node = config
  for depth, name in enumerate(path, 1):
    fields = {f.name for f in dataclasses.fields(node)}
    if name not in fields:
      raise ConfigError(f'unknown config field {key!r}; fields here: {sorted(fields)}')
    node, kind = getattr(node, name), typing.get_type_hints(type(node))[name]
    if depth < len(path) and not dataclasses.is_dataclass(node):
      raise ConfigError(f'config field {".".join(path[:depth])!r} has no sub-field '
                        f'{".".join(path[depth:])!r}')
  if dataclasses.is_dataclass(node):
    raise ConfigError(f'config field {key!r} is a group; set one of its fields')
  return path, _parse_value(key, text, kind)


def _with_values(config: Any, values: dict[str, Any]) -> Any:
  """`config` rebuilt once per group with all of its new `values` (name -> value, or a dict for
  a sub-group), so each group's checks see its new values together."""
  changes = {name: _with_values(getattr(config, name), value) if isinstance(value, dict)
             else value for name, value in values.items()}
  return dataclasses.replace(config, **changes)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
  """Applies 'a.b=value' strings together: each is checked against the fields first, then
  every group is rebuilt once with all of its new values, so a combination that is valid as a
  whole is accepted in any order (e.g. `loss.negatives=all loss.log_q=false` from a log-Q
  config). A field given twice takes its last value."""
  values: dict[str, Any] = {}
  for item in overrides:
    path, value = _parse_override(config, item)
    node = values
    for group in path[:-1]:
      node = node.setdefault(group, {})
    node[path[-1]] = value
  return _with_values(config, values)


def load_config(path: str | None) -> Config:
  """Loads `get_config()` from a Python config file; None gives the default Config."""
  if path is None:
    return Config()
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location(f'_heterrec_config_{file.stem}', file)
  if spec is None:
    raise ConfigError(f'config file {path} is not a Python file (name it *.py)')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'config file {e.filename}:{e.lineno}: syntax error: {e.msg}') from None
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's code, any error
    raise ConfigError(f'config file {path} failed to load: {type(e).__name__}: {e}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path} does not define get_config()')
  return _call_get_config(module.get_config, path)


# ------------------------------------------------------------------------------------------------
# Config files and the config a run saves in its workdir.

# The config `train`, `bench` and `experiments` use when given none.
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'default.py')

# Config groups and fields that may change between a run and its resumption.
# (train.microbatches: a run that no longer fits resumes in more parts; the model, its loss and
# its update stay, only the parts' draws of negatives and dropout differ.)
RESUMABLE_CHANGES = ('train.steps', 'train.eval_every', 'train.patience', 'train.log_every',
                     'train.checkpoint_every', 'train.keep_checkpoints', 'train.compile_cache_dir',
                     'train.microbatches', 'train.host_allocator', 'train.cpu_devices', 'eval.',
                     'data.workers')


def save_config(cfg: Config, workdir: pathlib.Path) -> None:
  (workdir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + '\n')


def load_saved_config(workdir: pathlib.Path) -> Config:
  """The config a run in `workdir` was trained with."""
  file = workdir / 'config.json'
  if not file.is_file():
    raise ConfigError(f'{file} does not exist: is {workdir} a training workdir?')
  try:
    data = json.loads(file.read_text())
    groups = {f.name: f.type for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, values in data.items():
      cls = globals()[groups[name]] if isinstance(groups[name], str) else groups[name]
      if name == 'mesh':
        values['rules'] = tuple(tuple(r) for r in values['rules'])
      values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
      kwargs[name] = cls(**values)
    return Config(**kwargs)
  except ConfigError as e:
    raise ConfigError(f'{file}: {e}') from None
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConfigError(f'{file} is damaged or from another version ({type(e).__name__}: {e})'
                      ) from None


def check_resumable(cfg: Config, workdir: pathlib.Path) -> None:
  """Refuses to resume a run in `workdir` whose saved config differs in what shapes the state
  or the data stream (the model, the loss, the optimiser, the data, the batch, the seed).
  A field the saved config lacks (a run of a version before the field existed) counts as its
  default, which is what that version did."""
  if not (workdir / 'config.json').is_file():
    return
  saved = _flatten(json.loads(json.dumps(dataclasses.asdict(load_saved_config(workdir)))))
  new = _flatten(json.loads(json.dumps(dataclasses.asdict(cfg))))
  changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k)
                   and not k.startswith(RESUMABLE_CHANGES))
  if changed:
    diffs = ', '.join(f'{k}: {saved.get(k)!r} -> {new.get(k)!r}' for k in changed[:6])
    raise ConfigError(f'{workdir} holds a run with another config ({diffs}); resume it with its '
                      'own config, or train into another --workdir')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _call_get_config(get_config: Any, path: str) -> Config:
  """`get_config()` of a config file, checked to be a `Config`."""
  try:
    cfg = get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's code, any error
    raise ConfigError(f'config file {path}: get_config() failed: {type(e).__name__}: {e}'
                      ) from None
  if not isinstance(cfg, Config):
    raise ConfigError(f'config file {path}: get_config() returned a {type(cfg).__name__}, '
                      'not a heterrec_jax.config.Config')
  return cfg

