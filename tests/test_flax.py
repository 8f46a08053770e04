"""Flax integration: linen ``TrainState`` and ``nnx.Optimizer`` with ``rj.rmsprop``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import rmsprop_jax as rj

CONFIGS = {
    "plain": {"learning_rate": 0.01},
    "features": {
        "learning_rate": 0.01,
        "momentum": 0.9,
        "centered": True,
        "use_ema": True,
        "gradient_accumulation_steps": 2,
    },
}
STEPS = 6


def _data():
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (32, 5))
    y = jnp.sin(x @ jax.random.normal(ky, (5, 1)))
    return x, y


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(1)(x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linen_train_state_equals_manual(name):
    x, y = _data()
    model = LinenMLP()
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    tx = rj.rmsprop(**CONFIGS[name])

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def ts_step(state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
        )(state.params)
        return state.apply_gradients(grads=grads), loss

    @jax.jit
    def manual_step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    p, s = params, tx.init(params)
    losses = []
    for _ in range(STEPS):
        state, loss = ts_step(state)
        p, s, _ = manual_step(p, s)
        losses.append(float(loss))
    assert int(state.step) == STEPS
    _assert_trees_equal(state.params, p)
    _assert_trees_equal(state.opt_state, s)
    assert losses[-1] < losses[0]
    # The params really moved.
    assert not np.array_equal(
        np.asarray(state.params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["kernel"])
    )


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nnx_optimizer_equals_functional(name):
    x, y = _data()
    model = NnxMLP(nnx.Rngs(0))
    tx = rj.rmsprop(**CONFIGS[name])
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, params0 = nnx.split(model, nnx.Param)
    params0 = jax.tree.map(jnp.array, params0)  # an independent copy (an nnx.State pytree)

    def loss_of(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def ref_step(p, s):
        grads = jax.grad(lambda pp: loss_of(nnx.merge(graphdef, pp)))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    p, s = params0, tx.init(params0)
    losses = []
    for _ in range(STEPS):
        losses.append(float(train_step(model, optimizer)))
        p, s = ref_step(p, s)
    losses.append(float(loss_of(model)))
    assert losses[-1] < losses[0]
    _, got = nnx.split(model, nnx.Param)
    _assert_trees_equal(nnx.to_pure_dict(got), nnx.to_pure_dict(p))
    assert int(optimizer.step[...]) == STEPS
