"""The parameter average (`optim.ema`): the transformation against a NumPy loop, the state
evaluation reads, and its config check."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from heterrec_jax import averaging
from heterrec_jax.config import ConfigError, OptimConfig


def test_ema_params_is_the_debiased_average_of_the_iterates():
  rng = np.random.default_rng(0)
  decay = 0.7
  params = {'a': rng.normal(size=(3, 2)).astype(np.float32), 'b': [rng.normal(size=4)
                                                                   .astype(np.float32)]}
  tx = averaging.ema_params(decay)
  state = tx.init(params)
  iterates = []
  for _ in range(6):
    updates = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    out, state = tx.update(updates, state, params)
    jax.tree.map(np.testing.assert_array_equal, out, updates)  # passed through unchanged
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    iterates.append(params)
  # slow reference: weights (1 - d) d^(t - s) over the iterates, divided by their sum
  weights = [(1 - decay) * decay ** (len(iterates) - 1 - s) for s in range(len(iterates))]
  for path in (('a',), ('b', 0)):
    get = lambda tree: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
    want = sum(w * get(p) for w, p in zip(weights, iterates)) / sum(weights)
    got = np.asarray(get(state.ema)) / float(state.weight)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(state.weight), 1 - decay ** 6, rtol=1e-6)


def _trained(decay, steps=4):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
  optimizer = nnx.Optimizer(model, averaging.with_ema(tx, decay), wrt=nnx.Param)
  kernels = []
  for i in range(steps):
    x = jnp.full((2, 3), float(i + 1))
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(model)
    optimizer.update(model, grads)
    kernels.append(np.asarray(model.kernel[...]))
  return nnx.state((model, optimizer)), kernels


def test_model_state_reads_the_average_and_leaves_the_state_alone():
  decay = 0.5
  state, kernels = _trained(decay)
  averaged = averaging.model_state(state)
  weights = [(1 - decay) * decay ** (len(kernels) - 1 - s) for s in range(len(kernels))]
  want = sum(w * k for w, k in zip(weights, kernels)) / sum(weights)
  np.testing.assert_allclose(np.asarray(averaged['kernel'][...]), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(state[0]['kernel'][...]), kernels[-1])  # untouched


def test_without_an_average_model_state_is_the_model_part():
  state, kernels = _trained(0.0)
  assert averaging._average(state) is None
  np.testing.assert_array_equal(np.asarray(averaging.model_state(state)['kernel'][...]),
                                kernels[-1])


def test_before_the_first_update_the_raw_parameters():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, averaging.with_ema(optax.adam(0.1), 0.9), wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  np.testing.assert_array_equal(np.asarray(averaging.model_state(state)['kernel'][...]),
                                np.asarray(model.kernel[...]))


@pytest.mark.parametrize('value', [1.0, -0.1])
def test_ema_outside_zero_one_is_refused_naming_the_field(value):
  with pytest.raises(ConfigError, match=r'optim\.ema'):
    OptimConfig(ema=value)
