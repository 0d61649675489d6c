"""What a HeterRec model costs: an analytic estimate of its training FLOPs (the formula of the
architecture's matmuls) and its trainable parameters, counted from shapes."""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable

import jax
from flax import nnx

from heterrec_jax import run as run_lib
from heterrec_jax.config import Config
from heterrec_jax.data.dataset import Dataset


def stack_flops(blocks: int, length: int, width: int, ffn_mult: int) -> float:
  """Forward matmul FLOPs of `blocks` transformer blocks over `length` positions: Q, K, V, O
  and the FFN (2 FLOPs per multiply-add), plus Q K^T and A V over the full length x length."""
  dense = 2.0 * length * (4 + 2 * ffn_mult) * width * width
  attention = 4.0 * length * length * width
  return blocks * (dense + attention)


def analytic_train_flops(cfg: Config, n_kinds: int, steps: int) -> float:
  """An estimate of the training FLOPs of HeterRec: 3 x forward (the backward pass ~ 2 x) of the
  matmuls of the blocks, the fusion MLP, the item tower and the LMP heads and logits, per
  sequence of T = data.max_len items with K = n_kinds tokens, x batch size x steps. Embedding
  lookups, layer norms, softmax and the evaluation are left out."""
  m, t, k = cfg.model, cfg.data.max_len, n_kinds
  b, n_step = cfg.train.batch_size, cfg.loss.n_step
  if m.variant == 'no_hct':
    user = stack_flops(m.n1 + m.n2, t * k, m.d_f, m.ffn_mult) + 2.0 * t * m.d_f * m.d_k
  else:
    token = 0.0 if m.variant == 'no_htfl' else stack_flops(m.n1, t * k, m.d_f, m.ffn_mult)
    fusion = 2.0 * t * (k * m.d_f * m.d_k + m.d_k * m.d_k)
    user = token + fusion + stack_flops(m.n2, t, m.d_k, m.ffn_mult)
  items = 2.0 * t * (2 * k * m.d_f * m.d_f + k * m.d_f * m.d_k + m.d_k * m.d_k)
  heads = n_step * 2.0 * t * (m.d_k * m.d_k + b * m.d_k)
  return 3.0 * b * (user + items + heads) * steps


def count_params(build: Callable[[], nnx.Module]) -> int:
  """Trainable parameters (`nnx.Param` leaves) of the module `build()` returns, counted from
  shapes only (`nnx.eval_shape`: nothing is allocated)."""
  abstract = nnx.eval_shape(build)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def model_size(cfg: Config, run_dir: pathlib.Path) -> dict[str, Any]:
  """{'params', 'n_kinds'} of the model of `cfg` on its dataset (data.path, or the run's own
  synthetic data), or {'error': why} when the dataset or the model cannot be built."""
  try:
    dataset = Dataset.load(cfg.data.path or run_dir / 'data')
    params = count_params(lambda: run_lib.build_model(cfg, dataset, 0))
    return {'params': params, 'n_kinds': dataset.schema.n_kinds}
  except Exception as e:  # pylint: disable=broad-except  # the size is optional information
    return {'error': f'{type(e).__name__}: {e}'}
