"""The one loss factory: `make(cfg, model)` returns the loss of a run, built once before the
train step, so the step itself has no branch on a model or loss name.

    loss_fn = losses.make(cfg, model)
    loss, aux = loss_fn(outputs, batch, rng)   # outputs = model.forward(batch)
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from heterrec_jax import baseline_loss
from heterrec_jax import loss as loss_lib
from heterrec_jax.config import Config

LossFn = Callable[[dict[str, jax.Array], dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


def make(cfg: Config, model: Any) -> LossFn:
  """The loss of `cfg.model.name` under `cfg.loss` for `model`'s forward outputs."""
  if cfg.model.name == 'heterrec':
    token_columns = tuple(model.token_kinds)
    loss_cfg = loss_lib.ablated(cfg.loss, cfg.model.variant)
    return lambda outputs, batch, rng: loss_lib.model_loss(outputs, batch, token_columns,
                                                           loss_cfg, rng)
  name = cfg.model.name
  return lambda outputs, batch, rng: baseline_loss.baseline_loss(name, outputs, batch, cfg.loss,
                                                                 rng)
