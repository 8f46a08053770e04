"""``rj.unscale_gradients`` / ``loss_scale`` / ``dynamic_loss_scale`` (rmsprop_jax.transforms.loss_scaling), each alone in ``optax.chain``.

Expectations are independent of the code under test: float64 NumPy written from the
Keras 3 formulas of ``docs/semantics.md`` section 1, or the real Keras / optax functions
run on the same input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from _transform_helpers import close, f64, keras_rmsprop_np, run_chain

import rmsprop_jax as rj
from rmsprop_jax.transforms import (
    DynamicLossScaleState,
)

# loss scaling
# ----------------------------------------------------------------------------------------


def test_unscale_gradients_divides():
    tx = optax.chain(rj.unscale_gradients(4.0), optax.sgd(1.0))
    (new,), _ = run_chain(tx, jnp.zeros(2), [jnp.array([2.0, -6.0])])
    close(new, [-0.5, 1.5], rtol=0, atol=0)
    with pytest.raises(ValueError):
        rj.unscale_gradients(0.0)


def test_dynamic_loss_scale_keras_semantics():
    lr = 0.1
    tx = optax.chain(
        rj.dynamic_loss_scale(rj.rmsprop_update(lr), initial_scale=8.0, dynamic_growth_steps=2)
    )
    w = jnp.array([1.0, 2.0])
    state = tx.init(w)
    w_np, v, scale, counter = f64(w), np.zeros(2), 8.0, 0
    seq = [
        jnp.array([0.8, 1.6]),
        jnp.array([2.4, -3.2]),  # growth step: still unscaled by 8, then scale -> 16
        jnp.array([jnp.inf, 1.0]),  # skipped: scale -> 8, counter 0
        jnp.array([0.4, jnp.nan]),  # skipped: scale -> 4
        jnp.array([4.0, 4.0]),
    ]
    for g in seq:
        before = state[0].inner_state
        u, state = tx.update(g, state, w)
        w = optax.apply_updates(w, u)
        gn = f64(g)
        if np.all(np.isfinite(gn)):
            gu = gn / scale  # scale before this step's change
            v = 0.9 * v + 0.1 * gu * gu
            w_np = w_np - lr * gu / np.sqrt(v + 1e-7)
            if counter == 2 - 1:
                counter, scale = 0, scale * 2
            else:
                counter += 1
        else:
            np.testing.assert_array_equal(u, 0.0)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state[0].inner_state)):
                np.testing.assert_array_equal(a, b)  # bit-identical inner state
            counter, scale = 0, scale * 0.5
        close(w, w_np)
        assert float(rj.loss_scale(state)) == scale
        assert int(state[0].counter) == counter
    assert isinstance(state[0], DynamicLossScaleState)


def test_dynamic_loss_scale_matches_keras_loss_scale_optimizer():
    seq = [
        [jnp.array([0.8, 1.6])],
        [jnp.array([2.4, -3.2])],
        [jnp.array([jnp.inf, 1.0])],
        [jnp.array([0.4, 0.2])],
        [jnp.array([4.0, 4.0])],
    ]
    kv = keras.Variable(np.array([1.0, 2.0], np.float32))
    kopt = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.RMSprop(0.1), initial_scale=8.0, dynamic_growth_steps=2
    )
    kopt.build([kv])  # on JAX, Keras' LossScaleOptimizer only runs statelessly
    kvars = [v.value for v in kopt.variables]
    scale_index = [v.name for v in kopt.variables].index("dynamic_scale")
    kw = [kv.value]
    tx = rj.dynamic_loss_scale(rj.rmsprop(0.1), initial_scale=8.0, dynamic_growth_steps=2)
    w = [jnp.array([1.0, 2.0])]
    s = tx.init(w)
    for g in seq:
        kw, kvars = kopt.stateless_apply(kvars, g, kw)
        u, s = tx.update(g, s, w)
        w = optax.apply_updates(w, u)
        close(w[0], np.asarray(kw[0]), rtol=1e-6, atol=1e-7)
        assert float(rj.loss_scale(s)) == float(np.asarray(kvars[scale_index]))


def test_dynamic_loss_scale_float16_grads_large_scale():
    scale = 2.0**16
    tx = rj.dynamic_loss_scale(optax.sgd(1.0), initial_scale=scale)
    p = jnp.zeros(2, jnp.float16)
    g = jnp.array([1000.0, 2000.0], jnp.float16)  # finite scaled gradients
    u, _ = tx.update(g, tx.init(p), p)
    close(u, -f64(g) / scale, rtol=1e-3, atol=0)


def test_loss_scale_inside_jit_scales_the_loss():
    tx = rj.dynamic_loss_scale(rj.rmsprop(0.1), initial_scale=2.0**10)
    p = jnp.array([3.0, -1.0])
    s = tx.init(p)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: rj.loss_scale(s) * 0.5 * jnp.sum(q**2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g

    new, s, g = step(p, s)
    close(g, f64(p) * 2.0**10)  # the loss was scaled inside jit
    # the step is the unscaled RMSprop step: g/scale = p
    close(new, keras_rmsprop_np(p, [p], [0.1])[0])


def test_apply_if_finite_composes_and_nan_propagates_without_it():
    p = jnp.array([1.0, 2.0])
    tx = optax.apply_if_finite(rj.rmsprop(0.1), max_consecutive_errors=2)
    s = tx.init(p)
    u, s = tx.update(jnp.array([jnp.nan, 1.0]), s, p)
    np.testing.assert_array_equal(optax.apply_updates(p, u), p)  # skipped
    assert int(s.notfinite_count) == 1
    g = jnp.array([0.1, 0.2])
    u, s = tx.update(g, s, p)
    close(optax.apply_updates(p, u), keras_rmsprop_np(p, [g], [0.1])[0])  # first real step

    # Keras semantics without loss scaling: non-finite gradients PROPAGATE into the params.
    (bad,), _ = run_chain(rj.rmsprop(0.1), p, [jnp.array([jnp.nan, 0.2])])
    assert np.isnan(np.asarray(bad)[0])
    kv = keras.Variable(np.array([1.0, 2.0], np.float32))
    kopt = keras.optimizers.RMSprop(0.1)
    kopt.apply([jnp.array([jnp.nan, 0.2])], [kv])
    assert np.isnan(np.asarray(kv.value)[0])


def test_dynamic_loss_scale_validation():
    with pytest.raises(ValueError):
        rj.dynamic_loss_scale(optax.sgd(1.0), initial_scale=0.0)
    with pytest.raises(ValueError):
        rj.dynamic_loss_scale(optax.sgd(1.0), dynamic_growth_steps=0)
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        rj.loss_scale(rj.rmsprop().init(jnp.ones(1)))


#
