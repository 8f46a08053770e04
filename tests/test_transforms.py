"""The Keras 3 feature transforms of rmsprop_jax, each alone in ``optax.chain``, and
``rj.rmsprop``'s assembly of them.

Expectations are independent of the code under test: float64 NumPy written from the
Keras 3 formulas of ``docs/semantics.md`` section 1, or the real Keras / optax
functions run on the same input. Shapes are tiny and most steps run eagerly, to keep
compile time low.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import rmsprop_jax as rj
from rmsprop_jax.transforms import (
    AccumulationState,
    DynamicLossScaleState,
    EmaState,
    WeightDecayState,
)

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


# ----------------------------------------------------------------------------------------
# clipping
# ----------------------------------------------------------------------------------------


def test_clip_by_value_alone_in_chain():
    tx = optax.chain(rj.clip_by_value(0.5), optax.sgd(1.0))
    p = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
    g = {"a": jnp.array([-3.0, -0.25, 0.25, 3.0]), "b": jnp.array([[0.7, -0.7], [0.5, -0.5]])}
    (new,), _ = run_chain(tx, p, [g])
    for k, gk in g.items():
        close(new[k], -np.clip(f64(gk), -0.5, 0.5), rtol=0, atol=0)


def test_clip_by_norm_keras_formula_per_tensor():
    c = 1.0
    g = {
        "big": np.array([3.0, 4.0], np.float32),  # norm 5 > c: scaled to norm c
        "small": np.array([[0.1, -0.2], [0.2, 0.1]], np.float32),  # norm < c: kept
        "zero": np.zeros(3, np.float32),  # zero stays exactly zero, no NaN
    }
    tx = optax.chain(rj.clip_by_norm(c), optax.sgd(1.0))
    p = jax.tree.map(lambda x: jnp.zeros_like(jnp.asarray(x)), g)
    (new,), _ = run_chain(tx, p, [jax.tree.map(jnp.asarray, g)])
    for k, gk in g.items():
        n = np.sqrt(np.sum(f64(gk) ** 2))
        expected = f64(gk) * c / max(n, c)  # Keras: g*c/max(n, c), always applied
        close(-f64(new[k]), expected)
    assert np.all(np.asarray(new["zero"]) == 0)
    # Per tensor, not global: the small tensor is NOT scaled by the big one's norm.
    close(-f64(new["small"]), g["small"])


def test_clip_by_norm_matches_keras_method():
    opt = keras.optimizers.RMSprop(clipnorm=0.7)
    for g in (np.array([[0.3, -2.0], [1.0, 0.5]], np.float32), np.array([0.1, 0.2], np.float32)):
        ours, _ = rj.clip_by_norm(0.7).update(jnp.asarray(g), optax.EmptyState())
        close(ours, np.asarray(opt._clip_by_norm(jnp.asarray(g))), rtol=1e-6, atol=0)


def test_clip_by_norm_bf16_keeps_dtype():
    g = jnp.array([3.0, 4.0], jnp.bfloat16)
    out, _ = rj.clip_by_norm(1.0).update(g, optax.EmptyState())
    assert out.dtype == jnp.bfloat16
    close(out, [0.6, 0.8], rtol=1e-2)
    gz = jnp.zeros(2, jnp.bfloat16)
    outz, _ = rj.clip_by_norm(1.0).update(gz, optax.EmptyState())
    assert outz.dtype == jnp.bfloat16 and np.all(np.asarray(outz, np.float32) == 0)


def test_clip_by_global_norm_keras_formula_and_keras_function():
    from keras.src.optimizers.base_optimizer import clip_by_global_norm as keras_cgn

    c = 2.0
    g = [np.array([1.0, -2.0, 3.0], np.float32), np.array([[4.0], [0.5]], np.float32)]
    n = np.sqrt(sum(np.sum(f64(x) ** 2) for x in g))
    tx = optax.chain(rj.clip_by_global_norm(c), optax.sgd(1.0))
    p = [jnp.zeros_like(jnp.asarray(x)) for x in g]
    (new,), _ = run_chain(tx, p, [[jnp.asarray(x) for x in g]])
    keras_out = keras_cgn([jnp.asarray(x) for x in g], c)
    for x, ours, ref in zip(g, new, keras_out):
        close(-f64(ours), f64(x) * c / max(n, c))
        close(-f64(ours), np.asarray(ref), rtol=1e-6, atol=0)
    # Below the threshold: unchanged (scale 1).
    small = [jnp.array([0.1, 0.2]), jnp.array([[0.3], [0.0]])]
    out, _ = rj.clip_by_global_norm(c).update(small, optax.EmptyState())
    for a, b in zip(out, small):
        close(a, b, rtol=1e-7, atol=0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_clip_by_global_norm_nonfinite_makes_everything_nan_like_keras(bad):
    from keras.src.optimizers.base_optimizer import clip_by_global_norm as keras_cgn

    g = [jnp.array([1.0, bad]), jnp.array([[0.5], [0.25]])]  # only one element is bad
    ours, _ = rj.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    ref = keras_cgn(list(g), 1.0)
    for o, r in zip(ours, ref):
        assert np.all(np.isnan(np.asarray(o)))
        assert np.all(np.isnan(np.asarray(r)))  # Keras' (n - n) term


def test_clip_none_gradients_pass_through():
    g = {"a": jnp.array([3.0, 4.0]), "b": None}
    for tx in (rj.clip_by_norm(1.0), rj.clip_by_global_norm(1.0), rj.clip_by_value(1.0)):
        out, _ = tx.update(g, tx.init({"a": jnp.zeros(2), "b": None}))
        assert out["b"] is None


@pytest.mark.parametrize("factory", [rj.clip_by_norm, rj.clip_by_global_norm])
def test_clip_norms_of_complex_gradients(factory):
    g = jnp.array([3 + 4j, 0j], jnp.complex64)  # |g| = 5
    out, _ = factory(1.0).update(g, optax.EmptyState())
    close(np.abs(np.asarray(out)), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(out), np.array([0.6 + 0.8j, 0]), rtol=1e-6, atol=1e-7)


def test_clip_by_value_rejects_complex_gradients():
    with pytest.raises(TypeError, match="complex"):
        rj.clip_by_value(1.0).update(jnp.array([3 + 4j]), optax.EmptyState())


def test_two_clip_options_follow_keras_even_when_one_is_zero():
    # Keras counts the arguments that are not None: clipnorm=0 still counts.
    with pytest.raises(ValueError, match="Only one of"):
        keras.optimizers.RMSprop(clipnorm=0.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="Only one of"):
        rj.rmsprop(clipnorm=0.0, clipvalue=1.0)


def test_feature_arguments_must_be_static_numbers():
    with pytest.raises(TypeError, match="static_args"):
        rj.rmsprop(weight_decay=jnp.asarray(0.1))


def test_clip_factories_reject_non_positive():
    for factory in (rj.clip_by_norm, rj.clip_by_global_norm, rj.clip_by_value):
        with pytest.raises(ValueError):
            factory(0.0)
        with pytest.raises(ValueError):
            factory(-1.0)


# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# learning-rate forms in rj.rmsprop
# ----------------------------------------------------------------------------------------

W0 = np.array([1.0, 2.0], np.float32)
GRADS = [
    np.array([0.1, 0.2], np.float32),
    np.array([0.3, -0.4], np.float32),
    np.array([-0.5, 0.6], np.float32),
]


def _three_steps(tx, jit=False):
    w = jnp.asarray(W0)
    s = tx.init(w)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in GRADS:
        u, s = update(jnp.asarray(g), s, w)
        w = optax.apply_updates(w, u)
        out.append(w)
    return out


def _decay_lr(step):
    return 0.1 * 0.5 ** (step / 2.0)


@pytest.mark.parametrize("form", ["float", "optax", "keras", "callable"])
@pytest.mark.parametrize("jit", [False, True])
def test_learning_rate_forms(form, jit):
    if form == "float":
        lr, lrs = 0.1, [0.1] * 3
    elif form == "optax":
        lr = optax.exponential_decay(0.1, transition_steps=2, decay_rate=0.5)
        lrs = [_decay_lr(t) for t in range(3)]
    elif form == "keras":
        lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
        lrs = [_decay_lr(t) for t in range(3)]
    else:
        lr, lrs = (lambda: 0.05), [0.05] * 3
    got = _three_steps(rj.rmsprop(lr), jit=jit)
    for a, b in zip(got, keras_rmsprop_np(W0, GRADS, lrs)):
        close(a, b)
    # the spec's reference values (Keras, float32)
    if form == "float":
        close(got[-1], [0.65380049, 1.7104261], rtol=2e-7, atol=0)


def test_zero_arg_callable_lr_eager_vs_jit():
    box = {"lr": 0.1}
    tx = rj.rmsprop(lambda: box["lr"])
    w = jnp.asarray(W0)
    g = jnp.asarray(GRADS[0])
    # Eagerly the callable is called on every step (Keras semantics).
    s = tx.init(w)
    u1, _s1 = tx.update(g, s, w)
    box["lr"] = 0.2
    u2, _ = tx.update(g, s, w)
    close(u2, 2 * f64(u1))
    # Under jit it is called when the step is traced: the value is frozen in the
    # compiled step (documented in rmsprop_jax._schedules); a change needs a retrace.
    box["lr"] = 0.1
    step = jax.jit(tx.update)
    j1, _ = step(g, s, w)
    box["lr"] = 0.2
    j2, _ = step(g, s, w)
    close(j2, j1, rtol=0, atol=0)
    close(j1, u1)


def test_schedule_at_raw_call_count_under_accumulation():
    n = 2

    def schedule(count):
        return 0.1 / (1.0 + count)

    tx = rj.rmsprop(schedule, gradient_accumulation_steps=n)
    gs = [jnp.asarray(g) for g in GRADS] + [jnp.array([0.7, 0.8])]
    hist, _ = run_chain(tx, jnp.asarray(W0), gs)
    means = [(f64(gs[0]) + f64(gs[1])) / 2, (f64(gs[2]) + f64(gs[3])) / 2]
    lrs = [schedule((j + 1) * n - 1) for j in range(2)]  # Keras: schedule(iterations)
    expected = keras_rmsprop_np(W0, means, lrs)
    close(hist[1], expected[0])
    close(hist[3], expected[1])
    close(hist[0], W0, rtol=0, atol=0)
    close(hist[2], hist[1], rtol=0, atol=0)


def test_spec_reference_gradient_accumulation():
    gs = [jnp.asarray(g) for g in GRADS] + [jnp.array([0.7, 0.8])]
    hist, _ = run_chain(rj.rmsprop(0.1, gradient_accumulation_steps=2), jnp.asarray(W0), gs)
    spec = [[1, 2], [0.68377614, 2.3162119], [0.68377614, 2.3162119], [0.53633577, 2.0028491]]
    for a, b in zip(hist, spec):
        close(a, b, rtol=3e-7, atol=0)


# ----------------------------------------------------------------------------------------
# rj.rmsprop assembles only what a config needs
# ----------------------------------------------------------------------------------------


def _lowered_update(tx, p):
    s = tx.init(p)

    def step(g, s, p):
        return tx.update(g, s, p)

    return jax.jit(step).lower(p, s, p).as_text()


def test_plain_config_is_exactly_rmsprop_update():
    p = {"w": jnp.ones(3), "b": jnp.ones(())}
    state = rj.rmsprop().init(p)
    assert type(state) is rj.RMSpropState
    assert _lowered_update(rj.rmsprop(), p) == _lowered_update(rj.rmsprop_update(), p)
    assert _lowered_update(rj.rmsprop(0.1, momentum=0.9, centered=True), p) == _lowered_update(
        rj.rmsprop_update(0.1, centered=True, momentum=0.9), p
    )


def _state_types(state):
    def is_named(x):
        return isinstance(x, tuple) and hasattr(x, "_fields")

    leaves = jax.tree.leaves(state, is_leaf=is_named)
    found = set()

    def walk(x):
        if is_named(x):
            found.add(type(x))
            for f in x:
                walk(f)
        elif isinstance(x, (tuple, list)):
            for f in x:
                walk(f)

    for leaf in leaves:
        walk(leaf)
    walk(state)
    return found


@pytest.mark.parametrize(
    "kwargs, extra",
    [
        ({"clipnorm": 1.0}, {optax.EmptyState}),
        ({"global_clipnorm": 1.0}, {optax.EmptyState}),
        ({"clipvalue": 1.0}, {optax.EmptyState}),
        ({"weight_decay": 0.1}, {WeightDecayState}),
        ({"use_ema": True}, {EmaState}),
        ({"gradient_accumulation_steps": 2}, {AccumulationState}),
        ({"loss_scale_factor": 4.0}, {optax.EmptyState}),
    ],
)
def test_each_feature_adds_its_own_state(kwargs, extra):
    p = {"w": jnp.ones(2)}
    state = rj.rmsprop(**kwargs).init(p)
    assert type(state) is not rj.RMSpropState
    types = _state_types(state)
    assert rj.RMSpropState in types
    assert extra <= types
    others = {WeightDecayState, EmaState, AccumulationState, DynamicLossScaleState} - extra
    assert not (others & types)
    # and each still runs
    u, _ = rj.rmsprop(**kwargs).update({"w": jnp.ones(2)}, state, p)
    assert u["w"].shape == (2,)


# ----------------------------------------------------------------------------------------
# bad input at construction
# ----------------------------------------------------------------------------------------


def test_positional_arguments_in_keras_order():
    import inspect

    keras_params = list(inspect.signature(keras.optimizers.RMSprop.__init__).parameters)[1:]
    keras_params = [p for p in keras_params if p not in ("name", "kwargs")]
    ours = list(inspect.signature(rj.rmsprop).parameters)
    assert ours[: len(keras_params)] == keras_params


KERAS_CLIP_MESSAGE = "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clipnorm": 1.0, "clipvalue": 1.0}, re.escape(KERAS_CLIP_MESSAGE)),
        ({"clipnorm": 1.0, "global_clipnorm": 1.0}, re.escape(KERAS_CLIP_MESSAGE)),
        ({"clipvalue": 1.0, "global_clipnorm": 1.0}, re.escape(KERAS_CLIP_MESSAGE)),
        ({"use_ema": True, "ema_momentum": 1.5}, "ema_momentum"),
        ({"use_ema": True, "ema_momentum": -0.1}, "ema_momentum"),
        ({"use_ema": True, "ema_overwrite_frequency": 0}, "ema_overwrite_frequency"),
        ({"use_ema": True, "ema_overwrite_frequency": 2.5}, "ema_overwrite_frequency"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps"),
        ({"loss_scale_factor": 0.0}, "loss_scale_factor"),
        ({"loss_scale_factor": -2.0}, "loss_scale_factor"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": 0.1, "exclude_from_weight_decay": ["bias", "(x"]}, "invalid regex"),
    ],
)
def test_bad_input_raises_valueerror_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.rmsprop(**kwargs)
    with pytest.raises(ValueError, match=match):
        rj.RMSprop(**kwargs)


def test_keras_raises_the_same_clip_message():
    with pytest.raises(ValueError, match=re.escape(KERAS_CLIP_MESSAGE)):
        keras.optimizers.RMSprop(clipnorm=1.0, clipvalue=1.0)


def test_ema_arguments_unchecked_without_use_ema():
    # Keras validates ema_momentum / ema_overwrite_frequency only when use_ema=True.
    rj.rmsprop(ema_momentum=1.5, ema_overwrite_frequency=0)
    keras.optimizers.RMSprop(ema_momentum=1.5, ema_overwrite_frequency=0)
