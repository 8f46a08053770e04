"""``rj.weight_ema`` and ``rj.ema_params`` (rmsprop_jax.transforms.ema), each alone in ``optax.chain``.

Expectations are independent of the code under test: float64 NumPy written from the
Keras 3 formulas of ``docs/semantics.md`` section 1, or the real Keras / optax functions
run on the same input.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transform_helpers import close, f64, run_chain

import rmsprop_jax as rj

# EMA
# ----------------------------------------------------------------------------------------


def _ema_np(ws, k, steps=1, overwrite=None):
    """Keras EMA of the weight sequence ``ws`` (weights after each call, before overwrite)."""
    avg, out = None, []
    for call, w in enumerate(ws):
        iters = call // steps
        kk = k if iters != 0 else 0.0
        avg = f64(w) if avg is None and kk == 0 else kk * avg + (1 - kk) * f64(w)
        out.append(avg.copy())
    return out


def test_ema_first_step_copies_then_momentum():
    k = 0.9
    tx = optax.chain(optax.sgd(1.0), rj.weight_ema(k))
    w0 = np.array([1.0, 2.0], np.float32)
    gs = [
        np.array([0.5, -1.0], np.float32),
        np.array([0.25, 0.5], np.float32),
        np.array([-1.0, 1.0], np.float32),
    ]
    hist, state = run_chain(tx, jnp.asarray(w0), [jnp.asarray(g) for g in gs])
    ws, w = [], f64(w0)
    for g in gs:
        w = w - f64(g)
        ws.append(w)
    for got, expected_w in zip(hist, ws):  # weights unaffected (no overwrite)
        close(got, expected_w)
    expected_avg = _ema_np(ws, k)
    close(rj.ema_params(state), expected_avg[-1])
    # first step: an exact copy of the new weights
    s1 = tx.init(jnp.asarray(w0))
    u, s1 = tx.update(jnp.asarray(gs[0]), s1, jnp.asarray(w0))
    np.testing.assert_array_equal(rj.ema_params(s1), optax.apply_updates(jnp.asarray(w0), u))
    assert int(state[1].count) == 3


def test_ema_overwrite_every_nth_call():
    k, freq = 0.5, 2
    tx = optax.chain(optax.sgd(1.0), rj.weight_ema(k, ema_overwrite_frequency=freq))
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    w_np, avg = f64(w), None
    for call in range(5):
        g = jnp.array([0.5 * (call + 1), 1.0])
        u, state = tx.update(g, state, w)
        w = optax.apply_updates(w, u)
        w_np = w_np - f64(g)
        kk = k if call != 0 else 0.0
        avg = w_np.copy() if avg is None else kk * avg + (1 - kk) * w_np
        if (call + 1) % freq == 0:  # Keras: (iterations + 1) % freq == 0
            w_np = avg.copy()
            close(w, rj.ema_params(state), rtol=1e-6, atol=1e-7)  # weights := averages
        close(w, w_np)
        close(rj.ema_params(state), avg)


def test_ema_with_gradient_accumulation_counts_update_steps():
    k, n = 0.5, 2
    tx = optax.chain(optax.sgd(1.0), rj.weight_ema(k, gradient_accumulation_steps=n))
    w0 = jnp.array([4.0])
    gs = [jnp.array([1.0]) * (i + 1) for i in range(5)]
    hist, state = run_chain(tx, w0, gs)
    ws = [f64(h) for h in hist]
    close(rj.ema_params(state), _ema_np(ws, k, steps=n)[-1])
    # calls 0 and 1 have iterations == 0: both copy the weights
    s = tx.init(w0)
    w = w0
    for g in gs[:2]:
        u, s = tx.update(g, s, w)
        w = optax.apply_updates(w, u)
        np.testing.assert_array_equal(rj.ema_params(s), w)


def test_ema_params_finds_the_ema_everywhere():
    p = {"w": jnp.array([1.0, 2.0])}
    g = {"w": jnp.array([0.1, -0.2])}
    holders = {
        "chain": optax.chain(optax.sgd(0.1), rj.weight_ema(0.9)),
        "rmsprop": rj.rmsprop(0.1, use_ema=True),
        "rmsprop+accumulation": rj.rmsprop(0.1, use_ema=True, gradient_accumulation_steps=2),
        "dynamic_loss_scale": rj.dynamic_loss_scale(rj.rmsprop(0.1, use_ema=True), 1.0),
    }
    for tx in holders.values():
        s = tx.init(p)
        u, s = tx.update(g, s, p)
        new = optax.apply_updates(p, u)
        # first step copies the new weights (to the ulp: under lax.cond XLA may fuse
        # the internal w + u differently from the returned update)
        close(rj.ema_params(s)["w"], new["w"], rtol=2e-7, atol=0)
    opt = rj.RMSprop(0.1, use_ema=True)
    s = opt.init(p)
    new, s = opt.stateless_apply(s, g, p)
    np.testing.assert_array_equal(rj.ema_params(s)["w"], new["w"])
    for tx in (rj.rmsprop(0.1), optax.chain(optax.sgd(1.0))):
        with pytest.raises(ValueError, match="use_ema=True"):
            rj.ema_params(tx.init(p))
    with pytest.raises(ValueError, match="use_ema=True"):
        rj.ema_params(rj.RMSprop().init(p))


def test_ema_needs_params():
    tx = rj.weight_ema(0.9)
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones(1), tx.init(jnp.ones(1)))


def test_ema_validates_arguments():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ema_momentum"):
            rj.weight_ema(bad)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="ema_overwrite_frequency"):
            rj.weight_ema(0.9, ema_overwrite_frequency=bad)


#
