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


# -- row-sparse embeddings: value_and_sparse_grad + TrainState / nnx.Optimizer ------------------

VOCAB, DIM = 12, 4


def _id_batches(steps=6):
    """Each batch holds every row at least once (duplicates too), so lazy == dense exactly."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        ids = rng.permutation(np.concatenate([np.arange(VOCAB), rng.integers(0, VOCAB, 6)]))
        target = np.sin(ids)[:, None]  # a function of the id: learnable
        batches.append((jnp.asarray(ids, jnp.int32), jnp.asarray(target, jnp.float32)))
    return batches


class LinenEmbedModel(nn.Module):
    @nn.compact
    def __call__(self, ids=None, rows=None):
        embed = nn.Embed(VOCAB, DIM, name="embed")
        rows = embed(ids) if rows is None else rows
        return nn.Dense(1, name="head")(jnp.tanh(rows))


def test_linen_train_state_trains_an_embedding_with_sparse_gradients():
    model = LinenEmbedModel()
    params = model.init(jax.random.PRNGKey(1), ids=jnp.zeros(3, jnp.int32))["params"]
    tx = rj.rmsprop(0.05, momentum=0.5)

    def sparse_loss(p, rows, ids, y):
        return jnp.mean((model.apply({"params": p}, rows=rows) - y) ** 2)

    @jax.jit
    def sparse_step(state, ids, y):
        loss, grads = rj.value_and_sparse_grad(sparse_loss, "embed/embedding")(state.params, ids, y)
        assert isinstance(grads["embed"]["embedding"], rj.IndexedSlices)
        return state.apply_gradients(grads=grads), loss

    @jax.jit
    def dense_step(state, ids, y):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, ids=ids) - y) ** 2)
        )(state.params)
        return state.apply_gradients(grads=grads), loss

    sparse = dense = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    losses = []
    for ids, y in _id_batches():
        sparse, loss = sparse_step(sparse, ids, y)
        dense, _ = dense_step(dense, ids, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
        sparse.params,
        dense.params,
    )
    assert not np.array_equal(sparse.params["embed"]["embedding"], params["embed"]["embedding"])


class NnxEmbedModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, 1, rngs=rngs)

    def from_rows(self, rows):
        return self.head(jnp.tanh(rows))

    def __call__(self, ids):
        return self.from_rows(self.embed(ids))


def test_nnx_optimizer_trains_an_embedding_with_sparse_gradients():
    sparse_model, dense_model = NnxEmbedModel(nnx.Rngs(0)), NnxEmbedModel(nnx.Rngs(0))
    tx = rj.rmsprop(0.05, centered=True)
    sparse_opt = nnx.Optimizer(sparse_model, tx, wrt=nnx.Param)
    dense_opt = nnx.Optimizer(dense_model, tx, wrt=nnx.Param)

    @nnx.jit
    def sparse_step(model, optimizer, ids, y):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params, rows, ids, y):
            return jnp.mean((nnx.merge(graphdef, params).from_rows(rows) - y) ** 2)

        value, grads = rj.value_and_sparse_grad(loss, "embed/embedding")(params, ids, y)
        optimizer.update(model, grads)
        return value

    @nnx.jit
    def dense_step(model, optimizer, ids, y):
        value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(ids) - y) ** 2))(model)
        optimizer.update(model, grads)
        return value

    losses = []
    for ids, y in _id_batches():
        losses.append(float(sparse_step(sparse_model, sparse_opt, ids, y)))
        dense_step(dense_model, dense_opt, ids, y)
    assert losses[-1] < losses[0]
    got, want = nnx.state(sparse_model, nnx.Param), nnx.state(dense_model, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), got, want)


def test_nnx_optimizer_with_int8_state_equals_functional():
    model = nnx.Linear(64, 64, rngs=nnx.Rngs(0))  # 4096 weights: the kernel's v is int8
    tx = rj.rmsprop(0.01, accumulator_dtype="int8")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, p = nnx.split(model, nnx.Param)
    p = jax.tree.map(jnp.array, p)
    s = tx.init(p)
    assert any(
        isinstance(x, rj.quantization.QuantizedArray)
        for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, rj.quantization.QuantizedArray))
    )
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 64))

    def loss_of(m):
        return jnp.mean(jnp.tanh(m(x)) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        optimizer.update(model, nnx.grad(loss_of)(model))

    @jax.jit
    def ref_step(p, s):
        grads = jax.grad(lambda pp: loss_of(nnx.merge(graphdef, pp)))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(3):  # the second update used to fail: nnx hands the NamedTuple back as a State
        train_step(model, optimizer)
        p, s = ref_step(p, s)
    _, got = nnx.split(model, nnx.Param)
    _assert_trees_equal(nnx.to_pure_dict(got), nnx.to_pure_dict(p))


def test_int8_state_rebuilt_as_dicts_still_updates():
    params = {"w": jnp.linspace(-1, 1, 4096).reshape(64, 64)}
    tx = rj.rmsprop(0.01, accumulator_dtype="int8")
    state = tx.init(params)
    grads = {"w": jnp.full((64, 64), 0.3)}
    as_dicts = jax.tree.map(
        lambda q: dict(q._asdict()) if isinstance(q, rj.quantization.QuantizedArray) else q,
        state,
        is_leaf=lambda q: isinstance(q, rj.quantization.QuantizedArray),
    )
    want = tx.update(grads, state, params)
    got = tx.update(grads, as_dicts, params)
    _assert_trees_equal(got, want)
