"""Parameter averaging (`optim.ema`): an exponential moving average of the parameters, kept in
the optimiser state, and the model state that evaluation, early stopping and export read.

With `optim.ema = beta > 0` the optimiser ends in `ema_params(beta)`, which passes the updates
through unchanged and tracks, after every update t,

    ema_t = beta * ema_{t-1} + (1 - beta) * params_t,  weight_t = beta * weight_{t-1} + (1 - beta)

from zeros, so `ema_t / weight_t` is the debiased average of the iterates (weight_t =
1 - beta^t). Training keeps stepping the raw parameters; everything that READS a state
(validation, the best checkpoint's choice, `evaluate`, `export`) reads `model_state(state)`,
the model with its parameters replaced by the average. Because the average lives in the
optimiser state it is sharded like the AdamW moments, checkpointed and resumed with them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class EmaState(NamedTuple):
  weight: jax.Array  # 1 - beta^t: the sum of the average's weights, its debiasing denominator
  ema: optax.Params  # sum_s (1 - beta) beta^(t - s) params_s


def ema_params(decay: float) -> optax.GradientTransformation:
  """Updates unchanged; the state follows the EMA of the parameters after each update."""

  def init(params):
    return EmaState(weight=jnp.zeros([], jnp.float32),
                    ema=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params):
    if params is None:
      raise ValueError('ema_params needs the parameters (optax passes them to update)')
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new_params)
    return updates, EmaState(weight=decay * state.weight + (1.0 - decay), ema=ema)

  return optax.GradientTransformation(init, update)


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """`tx` then the parameter average (outermost, where `_average` finds it); `tx` alone at 0."""
  return optax.chain(tx, ema_params(decay)) if decay else tx


def _average(state: Any) -> Any | None:
  """The `EmaState` of a `(model, optimizer)` state whose optimiser is `with_ema(...)`, or None."""
  try:
    last = state[1]['opt_state'][1]
  except (KeyError, IndexError, TypeError):
    return None
  if isinstance(last, nnx.State) and set(last.keys()) == {'weight', 'ema'}:
    return last
  return None


def model_state(state: Any) -> Any:
  """The model part of a `(model, optimizer)` state; where the optimiser keeps a parameter
  average, a copy with every parameter replaced by its debiased average (`state` is left as
  it is). Before the first update (weight 0) the raw parameters."""
  model = state[0]
  average = _average(state)
  if average is None:
    return model
  weight = average['weight'][...]
  if float(weight) == 0.0:
    return model
  copy = jax.tree.map(lambda x: x, model)
  nnx.replace_by_pure_dict(copy, jax.tree.map(lambda e: e / weight,
                                              nnx.to_pure_dict(average['ema'])))
  return copy
