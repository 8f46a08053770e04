"""``rj.add_decoupled_weight_decay`` (rmsprop_jax.transforms.weight_decay), each alone in ``optax.chain``.

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
from _transform_helpers import close, f64, run_chain

import rmsprop_jax as rj
from rmsprop_jax.transforms import (
    WeightDecayState,
)

# decoupled weight decay
# ----------------------------------------------------------------------------------------


def test_weight_decay_float_lr():
    wd, lr = 0.1, 0.5
    tx = optax.chain(optax.sgd(lr), rj.add_decoupled_weight_decay(wd, lr))
    w0 = np.array([2.0, -1.0, 0.5], np.float32)
    gs = [np.array([0.1, 0.2, -0.3], np.float32), np.array([1.0, 0.0, 0.5], np.float32)]
    hist, state = run_chain(tx, jnp.asarray(w0), [jnp.asarray(g) for g in gs])
    w = f64(w0)
    for g, got in zip(gs, hist):
        w = w - w * wd * lr  # Keras: before update_step
        w = w - lr * f64(g)
        close(got, w)
    assert state[1] == WeightDecayState(count=None)  # no counter for a float lr


def test_weight_decay_schedule_evaluated_before_step():
    wd = 0.2

    def schedule(count):
        return 0.1 * (count + 1.0)  # 0.1, 0.2, 0.3 at counts 0, 1, 2

    tx = optax.chain(rj.add_decoupled_weight_decay(wd, schedule))  # alone: u = g - w*wd*lr
    w0 = np.array([1.0, -3.0], np.float32)
    zero = jnp.zeros(2)
    hist, state = run_chain(tx, jnp.asarray(w0), [zero, zero, zero])
    w = f64(w0)
    for t, got in enumerate(hist):
        w = w - w * wd * (0.1 * (t + 1))
        close(got, w)
    assert int(state[0].count) == 3


def _nested_params():
    return {
        "dense": {"bias": jnp.array([1.0, 2.0]), "kernel": jnp.array([[1.0, -1.0]])},
        "out": {"kernel": jnp.array([4.0])},
    }


def _decayed(after, before, wd_lr):
    """Which leaves were decayed by w -> w*(1 - wd*lr) (zero gradient)."""
    return jax.tree.map(
        lambda a, b: bool(
            np.allclose(f64(a), f64(b) * (1 - wd_lr), rtol=1e-6, atol=0)
            and not np.allclose(f64(a), f64(b))
        ),
        after,
        before,
    )


@pytest.mark.parametrize(
    "exclude, expected",
    [
        (None, {"dense": {"bias": True, "kernel": True}, "out": {"kernel": True}}),
        (["bias"], {"dense": {"bias": False, "kernel": True}, "out": {"kernel": True}}),
        ("bias", {"dense": {"bias": False, "kernel": True}, "out": {"kernel": True}}),
        (["dense/k", "^out"], {"dense": {"bias": True, "kernel": False}, "out": {"kernel": False}}),
        (["dense/bias$"], {"dense": {"bias": False, "kernel": True}, "out": {"kernel": True}}),
        (  # bool pytree: True = excluded
            {"dense": {"bias": True, "kernel": False}, "out": {"kernel": True}},
            {"dense": {"bias": False, "kernel": True}, "out": {"kernel": False}},
        ),
        (  # callable params -> bool pytree (True = excluded): exclude 1-d leaves
            lambda params: jax.tree.map(lambda x: x.ndim == 1, params),
            {"dense": {"bias": False, "kernel": True}, "out": {"kernel": False}},
        ),
    ],
)
def test_weight_decay_exclusion(exclude, expected):
    wd, lr = 0.5, 0.1
    tx = optax.chain(rj.add_decoupled_weight_decay(wd, lr, exclude_from_weight_decay=exclude))
    p = _nested_params()
    zeros = jax.tree.map(jnp.zeros_like, p)
    (new,), _ = run_chain(tx, p, [zeros])
    assert _decayed(new, p, wd * lr) == expected
    # undecayed leaves are untouched, bit for bit
    for (path, a), b, dec in zip(
        jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(p), jax.tree.leaves(expected)
    ):
        if not dec:
            np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_weight_decay_under_jit_with_regex():
    tx = rj.add_decoupled_weight_decay(0.5, 0.1, exclude_from_weight_decay=["bias"])
    p = _nested_params()
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    np.testing.assert_array_equal(u["dense"]["bias"], 0.0)
    close(u["out"]["kernel"], [-4.0 * 0.05])


def test_weight_decay_invalid_regex_raises_at_construction():
    with pytest.raises(ValueError, match="invalid regex"):
        rj.add_decoupled_weight_decay(0.1, 0.1, exclude_from_weight_decay=["bias", "("])
    with pytest.raises(ValueError, match="invalid regex"):
        rj.rmsprop(weight_decay=0.1, exclude_from_weight_decay="[unclosed")
    # validated even when weight decay is off, so the mistake is not hidden
    with pytest.raises(ValueError, match="invalid regex"):
        rj.rmsprop(exclude_from_weight_decay="(")


NO_PARAMS_BUG = (
    "BUG: weight_decay.py / ema.py raise ValueError(optax.NO_PARAMS_MSG), but optax 0.2.8 "
    "has no NO_PARAMS_MSG: an AttributeError escapes instead of the ValueError"
)


def test_weight_decay_needs_params():
    tx = rj.add_decoupled_weight_decay(0.1, 0.1)
    p = jnp.ones(2)
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))


def test_weight_decay_rejects_negative():
    with pytest.raises(ValueError, match="weight_decay"):
        rj.add_decoupled_weight_decay(-0.1, 0.1)


#
