"""Shared by the transform tests: float64 helpers, an eager chain runner, float64 Keras RMSprop."""

from __future__ import annotations

import numpy as np
import optax

F64 = np.float64


def f64(x):
    return np.asarray(x, dtype=F64)


def close(actual, expected, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(f64(actual), f64(expected), rtol=rtol, atol=atol)


def run_chain(tx, params, grads_seq):
    """Eager steps of ``tx``; returns the params after each step and the last state."""
    state = tx.init(params)
    history = []
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def keras_rmsprop_np(w0, grads_seq, lrs, rho=0.9, epsilon=1e-7):
    """Float64 Keras 3 RMSprop (no momentum, not centered); ``lrs[t]`` the lr of step t."""
    w, v, out = f64(w0).copy(), np.zeros_like(f64(w0)), []
    for t, g in enumerate(grads_seq):
        g = f64(g)
        v = rho * v + (1 - rho) * g * g
        w = w - (lrs[t] * g) / np.sqrt(v + epsilon)
        out.append(w.copy())
    return out
