"""``rj.RMSprop``: the Keras 3 optimizer API, functional (state in, state out).

Expectations come from a float64 NumPy model of Keras 3's RMSprop written from
``docs/semantics.md`` section 1 (``keras_model`` below), or from the real
``keras.optimizers.RMSprop`` run on the same variables. Shapes are tiny.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from _jit import CountingJit

import rmsprop_jax as rj

F64 = np.float64


def f64(x):
    return np.asarray(x, dtype=F64)


def close(actual, expected, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(f64(actual), f64(expected), rtol=rtol, atol=atol)


def normwise_close(actual, expected, tol=1e-6):
    a = np.concatenate([f64(x).ravel() for x in jax.tree.leaves(actual)])
    b = np.concatenate([f64(x).ravel() for x in jax.tree.leaves(expected)])
    assert np.linalg.norm(a - b) <= tol * max(np.linalg.norm(b), 1.0), (a, b)


def keras_model(
    params,
    grads_seq,
    learning_rate=0.001,
    rho=0.9,
    momentum=0.0,
    epsilon=1e-7,
    centered=False,
    weight_decay=None,
    clipnorm=None,
    clipvalue=None,
    global_clipnorm=None,
    use_ema=False,
    ema_momentum=0.99,
    ema_overwrite_frequency=None,
    loss_scale_factor=None,
    gradient_accumulation_steps=None,
    lr_per_call=None,
):
    """Float64 Keras 3 RMSprop on a list of arrays. ``learning_rate`` a float or a
    ``step -> lr`` function; ``lr_per_call`` overrides it per call (set_learning_rate).
    Returns (params after each call, final EMA averages, final slots dict)."""
    n = gradient_accumulation_steps or 1
    w = [f64(p).copy() for p in params]
    v = [np.zeros_like(x) for x in w]
    a = [np.zeros_like(x) for x in w]
    m = [np.zeros_like(x) for x in w]
    acc = [np.zeros_like(x) for x in w]
    avg = [np.zeros_like(x) for x in w]
    history = []
    for it, grads in enumerate(grads_seq):
        g = [f64(x) for x in grads]
        if loss_scale_factor is not None:
            g = [x / loss_scale_factor for x in g]
        if lr_per_call is not None:
            lr = lr_per_call[it]
        else:
            lr = learning_rate(it) if callable(learning_rate) else learning_rate
        update = True
        if n > 1:
            if (it + 1) % n == 0:
                g = [(x + s) / n for x, s in zip(g, acc)]
                acc = [np.zeros_like(x) for x in w]
            else:
                acc = [s + x for s, x in zip(acc, g)]
                update = False
        if update:
            if clipnorm:
                g = [x * clipnorm / max(np.sqrt(np.sum(x * x)), clipnorm) for x in g]
            elif global_clipnorm:
                nrm = np.sqrt(sum(np.sum(x * x) for x in g))
                g = [x * global_clipnorm / max(nrm, global_clipnorm) for x in g]
            elif clipvalue:
                g = [np.clip(x, -clipvalue, clipvalue) for x in g]
            if weight_decay:
                w = [x - x * weight_decay * lr for x in w]
            for i, x in enumerate(g):
                v[i] = rho * v[i] + (1 - rho) * x * x
                if centered:
                    a[i] = rho * a[i] + (1 - rho) * x
                    den = v[i] - a[i] * a[i] + epsilon
                else:
                    den = v[i] + epsilon
                inc = lr * x / np.sqrt(den)
                if momentum > 0:
                    m[i] = momentum * m[i] + inc
                    w[i] = w[i] - m[i]
                else:
                    w[i] = w[i] - inc
        if use_ema:
            iters = it // n
            k = ema_momentum if iters != 0 else 0.0
            avg = [k * s + (1 - k) * x for s, x in zip(avg, w)]
            if ema_overwrite_frequency and (iters + 1) % ema_overwrite_frequency == 0:
                w = [s.copy() for s in avg]
        history.append([x.copy() for x in w])
    return history, avg, {"velocity": v, "average_gradient": a, "momentum": m}


P0 = [np.array([1.0, 2.0], np.float32), np.array([[0.5, -0.5, 1.5]], np.float32)]


def grads_seq(k, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=p.shape).astype(np.float32) for p in P0] for _ in range(k)]


def run(opt, grads, params=None, state=None, step=None):
    """Steps of ``opt``; the history holds NumPy copies (safe under buffer donation)."""
    params = [jnp.array(p) for p in (P0 if params is None else params)]
    state = opt.init(params) if state is None else state
    step = step or opt.stateless_apply
    history = []
    for g in grads:
        params, state = step(state, [jnp.asarray(x) for x in g], params)
        history.append([np.array(p) for p in params])
    return history, state


def assert_history(ours, expected, rtol=1e-6, atol=1e-7):
    assert len(ours) == len(expected)
    for t, (a, b) in enumerate(zip(ours, expected)):
        for x, y in zip(a, b):
            np.testing.assert_allclose(f64(x), y, rtol=rtol, atol=atol, err_msg=f"step {t}")


FULL = {
    "learning_rate": 0.05,
    "momentum": 0.9,
    "centered": True,
    "weight_decay": 0.01,
    "use_ema": True,
    "ema_momentum": 0.9,
    "gradient_accumulation_steps": 2,
}

# ----------------------------------------------------------------------------------------
# stateless_apply
# ----------------------------------------------------------------------------------------


def test_stateless_apply_jitted_with_donation_compiles_once():
    opt = rj.RMSprop(**FULL, ema_overwrite_frequency=3)
    step = CountingJit(opt.stateless_apply, donate_argnums=(0, 2))
    grads = grads_seq(8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        ours, state = run(opt, grads, step=step)
    assert step.traces == 1
    expected, _avg, _ = keras_model(P0, grads, **FULL, ema_overwrite_frequency=3)
    assert_history(ours, expected, rtol=2e-6, atol=2e-7)
    close(opt.iterations(state), 4, rtol=0, atol=0)


def test_stateless_apply_keras_argument_order_and_equals_rmsprop_transform():
    kwargs = {
        "learning_rate": 0.1,
        "momentum": 0.5,
        "centered": True,
        "weight_decay": 0.1,
        "clipnorm": 0.5,
    }
    opt = rj.RMSprop(**kwargs)
    grads = grads_seq(3)
    params = [jnp.asarray(p) for p in P0]
    state = opt.init(params)
    # Keras order: (optimizer_variables, grads, trainable_variables) -> (params, state)
    new_params, new_state = opt.stateless_apply(state, [jnp.asarray(g) for g in grads[0]], params)
    assert isinstance(new_state, rj.RMSpropOptimizerState)
    assert [p.shape for p in new_params] == [p.shape for p in P0]

    tx = rj.rmsprop(**kwargs)
    s, p = tx.init(params), params
    ours, _ = run(opt, grads)
    for t, g in enumerate(grads):
        u, s = tx.update([jnp.asarray(x) for x in g], s, p)
        p = optax.apply_updates(p, u)
        for a, b in zip(ours[t], p):
            close(a, b, rtol=1e-7, atol=0)
    assert_history(ours, keras_model(P0, grads, **kwargs)[0])


def test_apply_and_apply_gradients():
    opt = rj.RMSprop(0.1, momentum=0.9)
    grads = grads_seq(2)
    params = [jnp.asarray(p) for p in P0]
    state = opt.init(params)
    p1, s1 = opt.apply([jnp.asarray(g) for g in grads[0]], params, state)
    p2, s2 = opt.apply_gradients(list(zip([jnp.asarray(g) for g in grads[1]], p1)), s1)
    assert isinstance(p2, list) and len(p2) == 2
    expected = keras_model(P0, grads, learning_rate=0.1, momentum=0.9)[0]
    assert_history([p1, p2], expected)
    assert int(opt.iterations(s2)) == 2


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------

OUR_KNOBS = {
    "exclude_from_weight_decay",
    "nesterov",
    "eps_in_sqrt",
    "lr_in_momentum",
    "initial_accumulator_value",
    "bias_correction",
    "maximize",
    "accumulator_dtype",
}


def test_get_config_keys_superset_of_keras():
    keras_keys = set(keras.optimizers.RMSprop().get_config().keys())
    cfg = rj.RMSprop().get_config()
    assert keras_keys <= set(cfg)
    assert set(cfg) >= OUR_KNOBS
    for key in keras_keys - {"name", "learning_rate"}:
        assert cfg[key] == keras.optimizers.RMSprop().get_config()[key], key


def test_from_config_round_trip_same_trajectory():
    opt = rj.RMSprop(**FULL, clipvalue=0.5, name="mine")
    cfg = opt.get_config()
    opt2 = rj.RMSprop.from_config(cfg)
    assert opt2.get_config() == cfg
    assert opt2.name == "mine"
    grads = grads_seq(4)
    a, _sa = run(opt, grads)
    b, _sb = run(opt2, grads)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_keras_accepts_our_config_and_we_accept_keras_config():
    cfg = rj.RMSprop(**FULL, global_clipnorm=1.0).get_config()
    keras_keys = keras.optimizers.RMSprop().get_config().keys()
    kopt = keras.optimizers.RMSprop.from_config({k: cfg[k] for k in keras_keys})
    kcfg = kopt.get_config()
    for key in keras_keys - {"name"}:
        if isinstance(cfg[key], float):
            assert kcfg[key] == pytest.approx(cfg[key], rel=1e-7), key
        else:
            assert kcfg[key] == cfg[key], key
    ours = rj.RMSprop.from_config(kcfg)  # Keras' own config in
    grads = grads_seq(4)
    assert_history(run(ours, grads)[0], keras_model(P0, grads, **FULL, global_clipnorm=1.0)[0])


def test_keras_schedule_learning_rate_serializes_and_round_trips():
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    opt = rj.RMSprop(sched)
    cfg = opt.get_config()
    assert isinstance(cfg["learning_rate"], dict)
    assert cfg["learning_rate"] == keras.optimizers.schedules.serialize(sched)
    opt2 = rj.RMSprop.from_config(cfg)
    grads = grads_seq(3)
    expected = keras_model(P0, grads, learning_rate=lambda t: 0.1 * 0.5 ** (t / 2))[0]
    assert_history(run(opt2, grads)[0], expected)
    assert_history(run(opt, grads)[0], expected)
    # and Keras reads our serialized schedule too
    kopt = keras.optimizers.RMSprop.from_config(
        {k: cfg[k] for k in keras.optimizers.RMSprop().get_config()}
    )
    assert isinstance(kopt._learning_rate, keras.optimizers.schedules.ExponentialDecay)


# ----------------------------------------------------------------------------------------
# iterations, learning rate, EMA
# ----------------------------------------------------------------------------------------


def test_iterations_keras_meaning_under_accumulation():
    opt = rj.RMSprop(0.1, gradient_accumulation_steps=3)
    state = opt.init([jnp.asarray(p) for p in P0])
    _, state = run(opt, grads_seq(7), state=state)
    assert int(opt.iterations(state)) == 7 // 3
    assert int(state.iterations) == 7
    plain = rj.RMSprop(0.1)
    _, s = run(plain, grads_seq(3))
    assert int(plain.iterations(s)) == 3


def test_finalize_variable_values():
    opt = rj.RMSprop(0.1, use_ema=True, ema_momentum=0.5)
    grads = grads_seq(3)
    hist, state = run(opt, grads)
    _, avg, _ = keras_model(P0, grads, learning_rate=0.1, use_ema=True, ema_momentum=0.5)
    final = opt.finalize_variable_values(hist[-1], state)
    for a, b in zip(final, avg):
        close(a, b)
    for a, b in zip(rj.ema_params(state), final):
        np.testing.assert_array_equal(a, b)
    no_ema = rj.RMSprop(0.1)
    h, s = run(no_ema, grads)
    assert no_ema.finalize_variable_values(h[-1], s) is h[-1]


def test_set_learning_rate_between_steps_without_recompiling():
    opt = rj.RMSprop(0.1, momentum=0.5, weight_decay=0.1)
    step = CountingJit(opt.stateless_apply)
    params = [jnp.asarray(p) for p in P0]
    state = opt.init(params)
    assert float(opt.learning_rate(state)) == pytest.approx(0.1)
    lrs = [0.1, 0.02, 0.3, 0.3]
    grads = grads_seq(4)
    hist = []
    for t, g in enumerate(grads):
        state = opt.set_learning_rate(state, lrs[t])
        assert float(opt.learning_rate(state)) == pytest.approx(lrs[t])
        params, state = step(state, [jnp.asarray(x) for x in g], params)
        hist.append(params)
    assert step.traces == 1
    expected = keras_model(
        P0, grads, momentum=0.5, weight_decay=0.1, lr_per_call=[np.float32(x) for x in lrs]
    )[0]
    assert_history(hist, expected)


def test_learning_rate_of_a_schedule_and_set_learning_rate_typeerror():
    opt = rj.RMSprop(optax.linear_schedule(0.1, 0.0, 10), gradient_accumulation_steps=2)
    _, state = run(opt, grads_seq(3))
    # Keras evaluates the schedule at the raw iteration counter
    close(opt.learning_rate(state), 0.1 * (1 - 3 / 10))
    with pytest.raises(TypeError, match="schedule"):
        opt.set_learning_rate(state, 0.5)


# ----------------------------------------------------------------------------------------
# minimize, scale_loss
# ----------------------------------------------------------------------------------------


def _loss(params, x):
    return jnp.sum((params[0] * x) ** 2) + jnp.sum(jnp.sin(params[1]))


def test_minimize_equals_grad_then_apply():
    opt = rj.RMSprop(0.1, momentum=0.9)
    params = [jnp.asarray(p) for p in P0]
    state = opt.init(params)
    x = jnp.array([0.5, -1.0])
    loss, p1, s1 = opt.minimize(_loss, params, state, x)
    g = jax.grad(_loss)(params, x)
    p2, s2 = opt.stateless_apply(state, g, params)
    close(loss, _loss(params, x), rtol=0, atol=0)
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(a, b)


def test_minimize_with_loss_scale_factor_unscales():
    factor = 128.0
    scaled = rj.RMSprop(0.1, loss_scale_factor=factor)
    plain = rj.RMSprop(0.1)
    params = [jnp.asarray(p) for p in P0]
    x = jnp.array([0.5, -1.0])
    loss_s, ps, _ = scaled.minimize(_loss, params, scaled.init(params), x)
    loss_p, pp, _ = plain.minimize(_loss, params, plain.init(params), x)
    close(loss_s, loss_p, rtol=1e-7, atol=0)  # the returned loss is unscaled
    for a, b in zip(ps, pp):  # a power-of-two factor: the same step
        close(a, b, rtol=1e-7, atol=0)
    g = [f64(v) for v in jax.grad(_loss)(params, x)]
    expected = keras_model(P0, [g], learning_rate=0.1)[0][0]
    for a, b in zip(ps, expected):
        close(a, b)


def test_scale_loss():
    assert float(rj.RMSprop(loss_scale_factor=4.0).scale_loss(jnp.float32(1.5))) == 6.0
    assert float(rj.RMSprop().scale_loss(jnp.float32(1.5))) == 1.5
    k = keras.optimizers.RMSprop(loss_scale_factor=4.0)
    assert float(k.scale_loss(1.5)) == float(rj.RMSprop(loss_scale_factor=4.0).scale_loss(1.5))


def test_loss_scale_factor_trajectory_matches_keras_model():
    opt = rj.RMSprop(0.1, loss_scale_factor=3.0)
    grads = [[3.0 * g for g in gs] for gs in grads_seq(3)]  # gradients of the scaled loss
    assert_history(run(opt, grads)[0], keras_model(P0, grads, 0.1, loss_scale_factor=3.0)[0])


# ----------------------------------------------------------------------------------------
# slots and Keras variables
# ----------------------------------------------------------------------------------------


def test_get_slot_and_names():
    opt = rj.RMSprop(0.1, momentum=0.9, centered=True)
    grads = grads_seq(3)
    _, state = run(opt, grads)
    _, _, slots = keras_model(P0, grads, learning_rate=0.1, momentum=0.9, centered=True)
    assert opt.get_slot_names() == ["velocity", "momentum", "average_gradient"]
    for name, key in [
        ("velocity", "velocity"),
        ("rms", "velocity"),
        ("momentum", "momentum"),
        ("average_gradient", "average_gradient"),
        ("mg", "average_gradient"),
    ]:
        for a, b in zip(opt.get_slot(state, name), slots[key]):
            close(a, b)
    plain = rj.RMSprop()
    s = plain.init([jnp.asarray(p) for p in P0])
    assert plain.get_slot_names() == ["velocity"]
    for absent in ("momentum", "average_gradient", "mg", "nonsense"):
        with pytest.raises(KeyError):
            plain.get_slot(s, absent)


def _keras_opt(kwargs, params):
    kvars = [keras.Variable(np.asarray(p), name=n) for p, n in zip(params, ["a", "b"])]
    kopt = keras.optimizers.RMSprop(**kwargs)
    kopt.build(kvars)
    return kopt, kvars


def test_variables_order_and_shapes_match_keras():
    kopt, _ = _keras_opt(FULL, P0)
    names = [v.path or v.name for v in kopt.variables]
    kinds = [n.split("/")[-1] for n in names]
    assert kinds == [
        "iteration",
        "learning_rate",
        "a_average",
        "b_average",
        "a_gradient_accumulator",
        "b_gradient_accumulator",
        "a_velocity",
        "b_velocity",
        "a_momentum",
        "b_momentum",
        "a_average_gradient",
        "b_average_gradient",
    ]
    opt = rj.RMSprop(**FULL)
    state = opt.init([jnp.asarray(p) for p in P0])
    ours = opt.variables(state)
    assert [tuple(v.shape) for v in ours] == [tuple(v.shape) for v in kopt.variables]
    assert [str(np.asarray(v).dtype) for v in opt.get_weights(state)] == [
        str(v.dtype) for v in kopt.variables
    ]
    # a schedule has no learning_rate variable, in Keras and here
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    kopt2, _ = _keras_opt({"learning_rate": sched, "momentum": 0.9}, P0)
    opt2 = rj.RMSprop(sched, momentum=0.9)
    assert [tuple(v.shape) for v in opt2.variables(opt2.init(list(map(jnp.asarray, P0))))] == [
        tuple(v.shape) for v in kopt2.variables
    ]


def test_set_weights_and_save_load_round_trip():
    opt = rj.RMSprop(**FULL)
    _hist, state = run(opt, grads_seq(4))  # a full accumulation cycle: counters aligned
    weights = opt.get_weights(state)
    fresh = opt.init([jnp.asarray(p) for p in P0])
    restored = opt.set_weights(fresh, weights)
    for a, b in zip(opt.get_weights(restored), weights):
        np.testing.assert_array_equal(a, b)
    store = {}
    opt.save_own_variables(state, store)
    assert sorted(store, key=int) == [str(i) for i in range(len(weights))]
    loaded = opt.load_own_variables(fresh, store)
    for a, b in zip(opt.get_weights(loaded), weights):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        opt.set_weights(fresh, weights[:-1])
    with pytest.raises(ValueError):
        opt.set_weights(fresh, [np.zeros((7,))] + weights[1:])


def test_loaded_state_continues_like_the_saved_one_plain():
    opt = rj.RMSprop(0.1, momentum=0.9, centered=True, weight_decay=0.1)
    hist, state = run(opt, grads_seq(3))
    loaded = opt.set_weights(opt.init([jnp.asarray(p) for p in P0]), opt.get_weights(state))
    more = grads_seq(3, seed=1)
    a, _ = run(opt, more, params=hist[-1], state=state)
    b, _ = run(opt, more, params=hist[-1], state=loaded)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


HIDDEN_COUNTERS_BUG = (
    "BUG: set_weights/load_own_variables restore Keras' `iteration` variable but not the "
    "hidden counters (AccumulationState.count, EmaState.count, RMSpropState.count, "
    "WeightDecayState.count), which stay at their init values: accumulation phase, EMA "
    "momentum and schedules restart after loading"
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.1, "gradient_accumulation_steps": 2},
        {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.5},
        {"learning_rate": optax.linear_schedule(0.1, 0.0, 10)},
    ],
    ids=["accumulation", "ema", "schedule"],
)
def test_loaded_state_continues_like_the_saved_one_with_counters(kwargs):
    opt = rj.RMSprop(**kwargs)
    hist, state = run(opt, grads_seq(3))  # odd number of calls: mid-cycle
    loaded = opt.set_weights(opt.init([jnp.asarray(p) for p in P0]), opt.get_weights(state))
    more = grads_seq(3, seed=1)
    a, sa = run(opt, more, params=hist[-1], state=state)
    b, sb = run(opt, more, params=hist[-1], state=loaded)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(opt.get_weights(sa), opt.get_weights(sb)):
        np.testing.assert_array_equal(x, y)


def _keras_weights(kopt):
    return [np.array(v.value) for v in kopt.variables]  # Keras 3 has no get_weights()


@pytest.mark.parametrize(
    "kwargs",
    [FULL, {**FULL, "ema_overwrite_frequency": 2}, {"learning_rate": 0.05, "momentum": 0.9}],
    ids=["full", "full+overwrite", "momentum"],
)
def test_get_weights_values_match_keras_variables_after_steps(kwargs):
    """Same steps in Keras and here: every variable, in Keras' order, has Keras' value."""
    kopt, kvars = _keras_opt(kwargs, P0)
    opt = rj.RMSprop(**kwargs)
    grads = grads_seq(5, seed=4)
    ours, state = run(opt, grads)
    for t, g in enumerate(grads):
        kopt.apply([jnp.asarray(x) for x in g], kvars)
        normwise_close(ours[t], [np.array(v.value) for v in kvars])
    kw = _keras_weights(kopt)
    assert len(opt.get_weights(state)) == len(kw)
    for i, (a, b) in enumerate(zip(opt.get_weights(state), kw)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"variable {i}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.05, "momentum": 0.9, "centered": True, "weight_decay": 0.01},
        FULL,
    ],
    ids=["momentum+centered+wd", "ema+accumulation+momentum+centered+wd"],
)
def test_load_keras_weights_then_continue_like_keras(kwargs):
    kopt, kvars = _keras_opt(kwargs, P0)
    grads = grads_seq(6, seed=3)
    for g in grads[:3]:
        kopt.apply([jnp.asarray(x) for x in g], kvars)
    weights = _keras_weights(kopt)
    params = [jnp.array(np.array(v.value)) for v in kvars]

    opt = rj.RMSprop(**kwargs)
    state = opt.set_weights(opt.init(params), weights)
    assert int(state.iterations) == 3
    ours, state = run(opt, grads[3:], params=params, state=state)
    for t, g in enumerate(grads[3:]):
        kopt.apply([jnp.asarray(x) for x in g], kvars)
        normwise_close(ours[t], [np.array(v.value) for v in kvars])
    normwise_close(opt.get_weights(state), _keras_weights(kopt))


# ----------------------------------------------------------------------------------------
# weight decay exclusion
# ----------------------------------------------------------------------------------------


def test_exclude_from_weight_decay_by_name_before_init():
    params = {"dense": {"bias": jnp.array([1.0, 2.0]), "kernel": jnp.array([[1.0, -1.0]])}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt = rj.RMSprop(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias"])
    state = opt.init(params)
    new, _ = opt.stateless_apply(state, zeros, params)
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    close(new["dense"]["kernel"], f64(params["dense"]["kernel"]) * (1 - 0.5 * 0.1))
    assert opt.get_config()["exclude_from_weight_decay"] == ["bias"]
    opt2 = rj.RMSprop(0.1, weight_decay=0.5)
    opt2.exclude_from_weight_decay(var_list={"dense": {"bias": False, "kernel": True}})
    new2, _ = opt2.stateless_apply(opt2.init(params), zeros, params)
    close(new2["dense"]["bias"], f64(params["dense"]["bias"]) * (1 - 0.5 * 0.1))
    np.testing.assert_array_equal(new2["dense"]["kernel"], params["dense"]["kernel"])
    with pytest.raises(ValueError):
        opt2.exclude_from_weight_decay(var_names=["("])


# ----------------------------------------------------------------------------------------
# hyperparameters changed between steps: optax.inject_hyperparams
# ----------------------------------------------------------------------------------------

# Arguments read in Python (`if weight_decay:`, integer checks) must be static.
STATIC_ARGS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "ema_overwrite_frequency",
    "gradient_accumulation_steps",
)


@pytest.mark.parametrize("name", STATIC_ARGS)
def test_inject_hyperparams_needs_static_integer_and_switch_args(name):
    value = 2 if name in ("ema_overwrite_frequency", "gradient_accumulation_steps") else 0.5
    extra = {"use_ema": True} if name.startswith("ema") else {}
    p = jnp.ones(2)
    make = optax.inject_hyperparams(rj.rmsprop, static_args=(name,), hyperparam_dtype=jnp.float32)
    tx = make(learning_rate=0.1, **{name: value}, **extra)
    u, _ = jax.jit(tx.update)(p, tx.init(p), p)  # works when static
    assert u.shape == (2,)
    with pytest.raises(Exception):  # noqa: B017 - traced, it cannot be read in Python
        bad = optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float32)(
            learning_rate=0.1, **{name: value}, **extra
        )
        jax.jit(bad.update)(p, bad.init(p), p)


def test_inject_hyperparams_changes_without_recompiling():
    tx = optax.inject_hyperparams(
        rj.rmsprop, static_args=("centered", "weight_decay"), hyperparam_dtype=jnp.float32
    )(learning_rate=0.1, rho=0.9, momentum=0.5, epsilon=1e-7, centered=True, weight_decay=0.1)
    w = jnp.asarray(P0[0])
    state = tx.init(w)

    def apply(w, state, g):
        u, state = tx.update(g, state, w)
        return optax.apply_updates(w, u), state

    step = CountingJit(apply)

    schedule = [
        {"learning_rate": 0.1, "rho": 0.9, "momentum": 0.5, "epsilon": 1e-7},
        {"learning_rate": 0.05, "rho": 0.8, "momentum": 0.0, "epsilon": 1e-3},
        {"learning_rate": 0.2, "rho": 0.99, "momentum": 0.9, "epsilon": 1e-7},
    ]
    grads = [gs[0] for gs in grads_seq(3)]
    w_np, v, a, m = f64(w), np.zeros(2), np.zeros(2), np.zeros(2)
    for hp, g in zip(schedule, grads):
        for k, val in hp.items():
            state.hyperparams[k] = jnp.asarray(val, jnp.float32)
        w, state = step(w, state, jnp.asarray(g))
        # float64 Keras formulas with this step's values (float32 as stored)
        lr, rho, mom, eps = (
            F64(np.float32(hp[k])) for k in ("learning_rate", "rho", "momentum", "epsilon")
        )
        gg = f64(g)
        w_np = w_np - w_np * 0.1 * lr
        v = rho * v + (1 - rho) * gg * gg
        a = rho * a + (1 - rho) * gg
        m = mom * m + lr * gg / np.sqrt(v - a * a + eps)
        w_np = w_np - m
        close(w, w_np, rtol=2e-6, atol=1e-7)
    assert step.traces == 1


def test_signature_and_attributes_are_keras_rmsprops():
    """``rj.RMSprop`` has Keras RMSprop's parameters (in order) and reads its attributes."""
    keras_parameters = list(inspect.signature(keras.optimizers.RMSprop).parameters)
    ours = inspect.signature(rj.RMSprop).parameters
    assert list(ours)[: len(keras_parameters) - 1] == keras_parameters[:-1]  # then **kwargs
    config = {
        "learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "epsilon": 1e-6, "centered": True,
        "weight_decay": 0.01, "global_clipnorm": 1.0, "use_ema": True, "ema_momentum": 0.9,
        "ema_overwrite_frequency": 5, "loss_scale_factor": 8.0, "gradient_accumulation_steps": 2,
    }  # fmt: skip
    opt, theirs = rj.RMSprop(**config), keras.optimizers.RMSprop(**config)
    for name in [*theirs.get_config(), "rho", "momentum", "epsilon", "centered"]:
        if name not in ("name", "learning_rate"):  # learning_rate(state): it lives in the state
            assert getattr(opt, name) == getattr(theirs, name), name
    with pytest.raises(AttributeError, match=r"momentum is read-only.*rj.RMSprop\(momentum=0.9"):
        opt.momentum = 0.9


# -- setters and copies -----------------------------------------------------------------------

P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "0.1", True])
def test_set_learning_rate_rejects_bad_values(value):
    opt = rj.RMSprop(0.1)
    state = opt.init(P)
    with pytest.raises((TypeError, ValueError), match="learning_rate"):
        opt.set_learning_rate(state, value)


def test_copy_of_rmsprop_owns_its_configuration():
    opt = rj.RMSprop(0.1, weight_decay=0.5)
    for clone in (copy.copy(opt), copy.deepcopy(opt)):
        clone.exclude_from_weight_decay(var_names=["w"])
        assert opt.get_config()["exclude_from_weight_decay"] is None
        ours, _ = opt.stateless_apply(opt.init(P), G, P)
        theirs, _ = clone.stateless_apply(clone.init(P), G, P)
        assert not np.array_equal(ours["w"], theirs["w"])  # only the clone skips w's decay
        np.testing.assert_array_equal(ours["b"], theirs["b"])
