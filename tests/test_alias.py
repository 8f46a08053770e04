"""``rj.rmsprop`` (rmsprop_jax.alias): learning-rate forms, the assembly of the feature transforms, bad input, each alone in ``optax.chain``.

Expectations are independent of the code under test: float64 NumPy written from the
Keras 3 formulas of ``docs/semantics.md`` section 1, or the real Keras / optax functions
run on the same input.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from _jit import CountingJit
from _transform_helpers import close, f64, keras_rmsprop_np, run_chain

import rmsprop_jax as rj
from rmsprop_jax.transforms import (
    AccumulationState,
    DynamicLossScaleState,
    EmaState,
    WeightDecayState,
)

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


P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}

# -- optax.inject_hyperparams -----------------------------------------------------------------


def test_inject_hyperparams_epsilon_zero_keeps_the_zero_denominator_guard():
    zeros = jax.tree.map(jnp.zeros_like, P)
    injected = optax.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, epsilon=0.0)
    u, _ = jax.jit(injected.update)(zeros, injected.init(P), P)
    plain, _ = rj.rmsprop(0.1, epsilon=0.0).update(zeros, rj.rmsprop(0.1, epsilon=0.0).init(P), P)
    jax.tree.map(np.testing.assert_array_equal, u, plain)  # 0, not NaN


def test_inject_hyperparams_bfloat16_hyperparameters():
    tx = optax.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.bfloat16)(learning_rate=0.1)
    state = tx.init(P)
    u, _ = jax.jit(tx.update)(G, state, P)
    lr = float(state.hyperparams["learning_rate"])  # 0.1 rounded to bfloat16
    ref, _ = rj.rmsprop(lr).update(G, rj.rmsprop(lr).init(P), P)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2), u, ref)


def test_inject_hyperparams_traced_accumulation_steps_names_static_args():
    with pytest.raises(ValueError, match="static_args"):
        tx = optax.inject_hyperparams(rj.rmsprop)(gradient_accumulation_steps=2)
        jax.jit(tx.update)(G, tx.init(P), P)


# -- shape-only init, weak types, None and empty trees ----------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(use_ema=True),
        lambda: rj.weight_ema(0.9),
        lambda: rj.rmsprop(gradient_accumulation_steps=2, use_ema=True, momentum=0.5),
    ],
)
def test_init_from_shape_dtype_structs(make):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), P)
    state = make().init(shapes)
    real = jax.eval_shape(make().init, P)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), real
    )


@pytest.mark.parametrize(
    "kwargs", [dict(use_ema=True), dict(gradient_accumulation_steps=2), dict(momentum=0.9)]
)
def test_weak_typed_params_compile_once(kwargs):
    params = {"w": jnp.asarray(1.0)}  # weak-typed
    assert params["w"].weak_type
    tx = rj.rmsprop(0.1, **kwargs)
    state, step = tx.init(params), CountingJit(tx.update)
    for _ in range(3):
        _, state = step({"w": jnp.asarray(0.5)}, state, params)
    assert step.traces == 1


def test_use_ema_with_a_none_param_leaf():
    params = {"w": jnp.ones(3), "frozen": None}
    tx = rj.rmsprop(0.1, use_ema=True, ema_overwrite_frequency=1)
    u, state = jax.jit(tx.update)({"w": jnp.ones(3), "frozen": None}, tx.init(params), params)
    assert u["frozen"] is None and rj.ema_params(state)["frozen"] is None
    ref, _ = rj.rmsprop(0.1).update({"w": jnp.ones(3)}, rj.rmsprop(0.1).init({"w": jnp.ones(3)}))
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)


def test_empty_params_with_every_feature():
    tx = rj.rmsprop(0.1, use_ema=True, gradient_accumulation_steps=2, weight_decay=0.1)
    u, _ = tx.update({}, tx.init({}), {})
    assert u == {}


def test_python_float_leaves_work_as_in_optax():
    tx = rj.rmsprop(0.1, use_ema=True, clipnorm=1.0)
    u, _ = tx.update({"w": 2.0}, tx.init({"w": 1.0}), {"w": 1.0})
    ref, _ = rj.rmsprop(0.1, use_ema=True, clipnorm=1.0).update(
        {"w": jnp.asarray(2.0)}, tx.init({"w": jnp.asarray(1.0)}), {"w": jnp.asarray(1.0)}
    )
    np.testing.assert_array_equal(u["w"], ref["w"])


@pytest.mark.parametrize("accumulator_dtype", [None, "int8"])
def test_per_leaf_arithmetic_is_traced_once_per_leaf_signature(accumulator_dtype):
    """Leaves of one shape share one traced function per transform (trace time at many leaves);
    XLA inlines the calls, so the step is the same program."""
    tx = rj.rmsprop(
        1e-3, momentum=0.9, weight_decay=0.01, use_ema=True, accumulator_dtype=accumulator_dtype
    )
    shapes = {"a": (64, 64), "b": (64, 64), "c": (5,), "d": (64, 64)}
    params = {k: jnp.ones(shape) for k, shape in shapes.items()}
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
    calls: dict[str, list] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("jit", "pjit"):
            calls.setdefault(eqn.params["name"], []).append(id(eqn.params["jaxpr"]))
    # rmsprop's leaf arithmetic, decoupled weight decay, the EMA: one call per leaf, one
    # traced function per distinct leaf shape
    for name in ("dense_leaf", "dense_decay", "dense_step"):
        assert len(calls[name]) == len(shapes), name
        assert len(set(calls[name])) == 2, name
