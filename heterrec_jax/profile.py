"""Where a train step's time and memory go (`bench train --profile`).

Each component of the step is compiled and timed ALONE at the step's shapes, forward and
backward (gradients w.r.t. its inputs and parameters), and reported with XLA's cost and memory
analysis of that program: `time_s` (mean of `repeats` calls after one warm-up), `flops` (XLA's
count; a loop body is counted once, so a blockwise attention shows its per-block cost only),
`temp_bytes` (XLA's temporaries) and `calls` (how many times the step runs it). Components
overlap (a stack contains its attention and its LayerNorms; the loss's forward and backward
contain everything but the optimiser), so the table is read against `forward_backward` and
`step`, not summed. Every model gets `forward_backward`, `forward`, `loss` and `optimizer`;
HeterRec's embeddings and token- and item-level stacks are its own.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from heterrec_jax import layers, losses, run as run_lib
from heterrec_jax.model import HeterRec


def measure(fn: Callable, *args, repeats: int = 3, calls: int = 1) -> dict[str, Any]:
  """Compiles `jit(fn)` for `args`, runs it once, then times `repeats` calls."""
  # A fresh function each time: jit caches traces by function, and the attention is chosen
  # when tracing (`layers.attention_impl`).
  compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  return {'time_s': (time.perf_counter() - t0) / repeats, 'calls': calls,
          'flops': float(cost['flops']) if cost and 'flops' in cost else None,
          'temp_bytes': int(mem.temp_size_in_bytes) if mem is not None else None}


def _probe_sum(y: jax.Array) -> jax.Array:
  """A scalar whose gradient reaches every output (a plain sum through a LayerNorm is 0)."""
  w = jax.random.normal(jax.random.key(0), y.shape[-1:], jnp.float32)
  return jnp.sum(y.astype(jnp.float32) * w)


def _module_grad(module: nnx.Module, fn: Callable, n_diff_args: int = 0) -> tuple[Callable, Any]:
  """(`g`, `states`): `g(states, *args)` is the gradient of `fn(module, *args)` w.r.t. the
  module's params and its first `n_diff_args` args (`states`: the module's state, passed in as
  an argument so that nothing is a compile-time constant)."""
  graphdef, states = nnx.split(module)
  argnums = tuple(range(n_diff_args + 1))

  def g(states, *args):
    return nnx.grad(fn, argnums=argnums)(nnx.merge(graphdef, states), *args)

  return g, states


def _attention_grad(q, k, v, table, ts, allowed):
  attend = lambda q, k, v, table: _probe_sum(
      layers.causal_attention(q, k, v, layers.time_gap_bias(table, ts), allowed))
  return jax.grad(attend, argnums=(0, 1, 2, 3))(q, k, v, table)


def _stack_parts(stage, x, ts, mask, repeats) -> dict[str, dict[str, Any]]:
  """A causal stack (all its blocks), one attention core and one LayerNorm, at x's shape."""
  b, t, k, d = x.shape
  h = stage.blocks[0].attention.heads
  allowed = layers.block_causal_mask(mask)
  stack, stack_states = _module_grad(stage, lambda s, x: _probe_sum(s(x, ts, allowed)),
                                     n_diff_args=1)
  qkv = [jax.random.normal(jax.random.key(i), (b, t, k, h, d // h), x.dtype) for i in range(3)]
  norm, norm_states = _module_grad(stage.blocks[0].norm1, lambda n, x: _probe_sum(n(x)),
                                   n_diff_args=1)
  n = len(stage.blocks)
  return {'blocks': measure(stack, stack_states, x, repeats=repeats),
          'attention': measure(_attention_grad, *qkv, stage.time_gap[...], ts, allowed,
                               repeats=repeats, calls=n),
          'layer_norm': measure(norm, norm_states, x, repeats=repeats, calls=2 * n)}


class _FixedOutputs:
  """`model` with its forward outputs fixed: what remains of the loss is the loss's own work
  (and the item tower on catalogue negatives, which the loss runs)."""

  def __init__(self, model: nnx.Module, outputs: dict[str, jax.Array]):
    self.model, self.outputs, self.token_kinds = model, outputs, model.token_kinds

  def forward(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    del batch
    return self.outputs

  def encode_items(self, items: jax.Array, tokens: jax.Array):
    return self.model.encode_items(items, tokens)


def profile_step(cfg, model: nnx.Module, batch: dict[str, jax.Array], item_tokens,
                 log_freq=None, repeats: int = 3) -> dict[str, dict[str, Any]]:
  """The components of a model's train step (see the module docstring); `item_tokens` and
  `log_freq` are the dataset's, as `losses.make` takes them."""
  model.train()
  rng = jax.random.key(0)
  compute_loss = losses.make(cfg, model, item_tokens, log_freq)
  out: dict[str, dict[str, Any]] = {}
  grad_all, states = _module_grad(model, lambda m, b: compute_loss(m, b, rng)[0])
  out['forward_backward'] = measure(grad_all, states, batch, repeats=repeats)
  graphdef = nnx.graphdef(model)
  forward = lambda states, b: nnx.merge(graphdef, states).forward(b)
  out['forward'] = measure(forward, states, batch, repeats=repeats)
  outputs = jax.jit(forward)(states, batch)
  loss_grad = jax.grad(lambda o, b: compute_loss(_FixedOutputs(model, o), b, rng)[0],
                       allow_int=True)  # BERT4Rec's outputs hold its boolean Cloze mask
  out['loss'] = measure(loss_grad, outputs, batch, repeats=repeats)
  if isinstance(model, HeterRec):  # its embedding layer and its two levels
    out.update(_heterrec_parts(model, batch, repeats))
  out['optimizer'] = _optimizer_part(cfg, model, repeats)
  return out


def _heterrec_parts(model, batch, repeats) -> dict[str, dict[str, Any]]:
  out = {}
  embed, embed_states = _module_grad(model.htfl, lambda e, i, s: _probe_sum(e(i, s)))
  out['embeddings'] = measure(embed, embed_states, batch['items'], batch['tokens'],
                              repeats=repeats)
  out.update(_level_parts(model, batch, repeats))
  return out


def _level_parts(model, batch, repeats) -> dict[str, dict[str, Any]]:
  """Token-level and item-level stacks, at the user tower's T = W - n_step positions."""
  t = batch['items'].shape[1] - model.n_step
  ts, mask = batch['timestamps'][:, :t], batch['mask'][:, :t]
  graphdef, states = nnx.split(model.htfl)
  h0 = jax.jit(lambda st, i, s: nnx.merge(graphdef, st)(i, s))(states, batch['items'][:, :t],
                                                               batch['tokens'][:, :t])
  parts = {}
  if getattr(model, 'token_stage', None) is not None:
    for name, value in _stack_parts(model.token_stage, h0, ts, mask, repeats).items():
      parts[f'token_{name}'] = value
  if getattr(model, 'item_stage', None) is not None:
    d_k = model.item_stage.blocks[0].norm1.scale[...].shape[0]
    x = jax.random.normal(jax.random.key(3), (h0.shape[0], t, 1, d_k), h0.dtype)
    for name, value in _stack_parts(model.item_stage, x, ts, mask, repeats).items():
      parts[f'item_{name}'] = value
  return parts


def _optimizer_part(cfg, model, repeats) -> dict[str, Any]:
  """The AdamW update (with clipping) of every parameter, given gradients."""
  tx = run_lib.make_optimizer(cfg)
  params = nnx.state(model, nnx.Param)
  opt_state = jax.jit(tx.init)(params)

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return measure(update, params, opt_state, params, repeats=repeats)


def format_table(parts: dict[str, dict[str, Any]], step_time_s: float) -> str:
  """A human table: component, calls, time per call, time x calls / step, GFLOP, temp MB."""
  lines = [f'{"component":<20} {"calls":>5} {"ms/call":>9} {"x calls/step":>12} '
           f'{"GFLOP":>8} {"temp MB":>9}']
  for name, p in parts.items():
    share = p['time_s'] * p['calls'] / step_time_s
    flops = f'{p["flops"] / 1e9:8.2f}' if p['flops'] is not None else f'{"-":>8}'
    temp = f'{p["temp_bytes"] / 1e6:9.1f}' if p['temp_bytes'] is not None else f'{"-":>9}'
    lines.append(f'{name:<20} {p["calls"]:>5} {p["time_s"] * 1e3:9.1f} {share:12.2f} {flops} '
                 f'{temp}')
  return '\n'.join(lines)
