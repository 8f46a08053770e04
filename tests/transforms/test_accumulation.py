"""``rj.accumulate_gradients`` (rmsprop_jax.transforms.accumulation), each alone in ``optax.chain``.

Expectations are independent of the code under test: float64 NumPy written from the
Keras 3 formulas of ``docs/semantics.md`` section 1, or the real Keras / optax functions
run on the same input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transform_helpers import close, f64, keras_rmsprop_np, run_chain

import rmsprop_jax as rj

# gradient accumulation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_accumulate_gradients_keras_semantics(n):
    lr = 0.1
    inner = rj.rmsprop_update(lr)
    tx = optax.chain(rj.accumulate_gradients(inner, n))
    w = jnp.array([1.0, 2.0])
    state = tx.init(w)
    rng = np.random.default_rng(n)
    gs = [rng.normal(size=2).astype(np.float32) for _ in range(2 * n)]
    w_np, v, acc = f64(w), np.zeros(2), np.zeros(2)
    for call, g in enumerate(gs):
        before = state[0].inner_state
        u, state = tx.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, u)
        if (call + 1) % n == 0:
            mean = (f64(g) + acc) / n  # Keras: (g + sum) / N
            acc = np.zeros(2)
            v = 0.9 * v + 0.1 * mean * mean
            w_np = w_np - lr * mean / np.sqrt(v + 1e-7)
            close(state[0].accumulators, 0.0, rtol=0, atol=0)
        else:
            acc = acc + f64(g)
            np.testing.assert_array_equal(u, 0.0)  # zero update
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state[0].inner_state)):
                np.testing.assert_array_equal(a, b)  # inner state unchanged
            close(state[0].accumulators, acc)  # raw sum
        close(w, w_np)
        assert int(state[0].count) == call + 1


def test_accumulate_gradients_matches_multisteps_constant_lr():
    n = 3
    rng = np.random.default_rng(0)
    gs = [jnp.asarray(rng.normal(size=(2, 2)).astype(np.float32)) for _ in range(3 * n)]
    w0 = jnp.ones((2, 2))
    ours, _ = run_chain(rj.accumulate_gradients(rj.rmsprop_update(0.05), n), w0, gs)
    multi = optax.MultiSteps(rj.rmsprop_update(0.05), every_k_schedule=n)
    theirs, _ = run_chain(multi, w0, gs)
    for cycle in range(1, 4):
        close(ours[cycle * n - 1], theirs[cycle * n - 1], rtol=1e-6, atol=1e-6)


def test_accumulate_gradients_documented_differences_from_multisteps():
    """Mean: sum/N (Keras) vs running mean (MultiSteps): equal up to rounding.
    Schedules: rj.rmsprop reads them at Keras' raw call count (j+1)*N-1, MultiSteps'
    inner optimizer at its own update count j."""
    n = 3
    gs = [jnp.array([0.1, 1e-3]), jnp.array([0.2, 3.0]), jnp.array([0.7, -2.0])]
    exact = sum(f64(g) for g in gs) / n
    ours, _ = run_chain(rj.accumulate_gradients(optax.identity(), n), jnp.zeros(2), gs)
    theirs, _ = run_chain(optax.MultiSteps(optax.identity(), n), jnp.zeros(2), gs)
    close(ours[-1], exact, rtol=1e-6, atol=0)
    close(theirs[-1], exact, rtol=1e-6, atol=0)
    close(ours[-1], theirs[-1], rtol=1e-6, atol=0)

    # schedule counting: step-dependent lr with constant gradients
    def schedule(count):
        return 0.1 * (count + 1.0)

    g = jnp.array([1.0])
    seq = [g] * (2 * n)
    ours_k, _ = run_chain(rj.rmsprop(schedule, gradient_accumulation_steps=n), jnp.zeros(1), seq)
    theirs_m, _ = run_chain(optax.MultiSteps(rj.rmsprop(schedule), n), jnp.zeros(1), seq)
    keras_lrs = [schedule((j + 1) * n - 1) for j in range(2)]  # 0.3, 0.6
    optax_lrs = [schedule(j) for j in range(2)]  # 0.1, 0.2
    close(ours_k[-1], keras_rmsprop_np([0.0], [[1.0]] * 2, keras_lrs)[-1])
    close(theirs_m[-1], keras_rmsprop_np([0.0], [[1.0]] * 2, optax_lrs)[-1])
    assert not np.allclose(ours_k[-1], theirs_m[-1])


def test_accumulate_gradients_float32_grads_for_bfloat16_params():
    tx = rj.accumulate_gradients(optax.sgd(1.0), 2)
    p = jnp.ones(2, jnp.bfloat16)
    s = tx.init(p)
    g = jnp.array([0.5, 0.25], jnp.float32)
    u, s = tx.update(g, s, p)
    u, s = tx.update(g, s, p)
    close(u, [-0.5, -0.25], rtol=1e-2)


def test_accumulate_gradients_under_jit_and_none_grads():
    tx = rj.accumulate_gradients(optax.sgd(1.0), 2)
    p = {"a": jnp.ones(2), "b": jnp.ones(1)}
    s = tx.init(p)
    step = jax.jit(tx.update)
    u, s = step({"a": jnp.array([1.0, 2.0]), "b": jnp.array([4.0])}, s, p)
    np.testing.assert_array_equal(u["a"], 0.0)
    u, s = step({"a": jnp.array([3.0, 4.0]), "b": jnp.array([2.0])}, s, p)
    close(u["a"], [-2.0, -3.0])
    close(u["b"], [-3.0])
    g_none = {"a": jnp.array([1.0, 1.0]), "b": None}
    u, s = tx.update(g_none, s, p)
    assert u["b"] is None
    with pytest.raises(ValueError):
        rj.accumulate_gradients(optax.sgd(1.0), 0)
    with pytest.raises(ValueError):
        rj.accumulate_gradients(optax.sgd(1.0), 2.5)


#
