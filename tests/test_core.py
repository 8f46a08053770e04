"""The core transform against the float64 reference, its numerics guarantees and its errors."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from _jit import CountingJit
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_rmsprop

import rmsprop_jax as rj

F32_EPS = float(np.finfo(np.float32).eps)


def run(tx, params, grads_seq, jit=True):
    """Applies ``tx`` over ``grads_seq``; returns the params after each step and the state."""
    update = CountingJit(tx.update) if jit else tx.update
    state = tx.init(params)
    trajectory = []
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory, state, update


# ---------------------------------------------------------------------------
# Property test: random shapes, dtypes, configs and step counts vs float64.

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "complex64": jnp.complex64,
}


@st.composite
def configs(draw):
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans())
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    # centered + bias correction: at step 1 the variance is exactly 0 in exact
    # arithmetic, so float32 rounding of v - a^2 (~1e-7 g^2) is only harmless
    # when epsilon dominates it; a tiny epsilon there measures rounding noise.
    # With epsilon outside the sqrt nothing bounds that amplification (the
    # exact step is lr*g/eps, the optax defect the clamp keeps finite).
    ill_conditioned = centered and bias_correction
    min_log_eps = -2 if ill_conditioned else -8
    eps_in_sqrt = True if ill_conditioned else draw(st.booleans())
    # centered with rho=0: the variance of one sample is exactly 0, and XLA
    # contracts v - a*a into an FMA that leaves the rounding error of g*g
    # (~1e-8 g^2), which the square root amplifies: ill-conditioned, not wrong.
    rhos = [0.5, 0.9, 0.99] if centered else [0.0, 0.5, 0.9, 0.99]
    return dict(
        learning_rate=draw(st.sampled_from([1e-3, 0.01, 0.1])),
        rho=draw(st.sampled_from(rhos)),
        epsilon=10.0 ** draw(st.integers(min_log_eps, -1)),
        centered=centered,
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=draw(st.sampled_from([0.0, 0.1, 1.0])),
        bias_correction=bias_correction,
        momentum=momentum,
        nesterov=momentum > 0 and draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def random_array(rng, shape, dtype):
    x = rng.normal(size=shape)
    if dtype == "complex64":
        x = x + 1j * rng.normal(size=shape)
    return jnp.asarray(x, DTYPES[dtype])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    cfg=configs(),
    dtype=st.sampled_from(list(DTYPES)),
    shape=st.sampled_from([(), (3,), (2, 3)]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(cfg, dtype, shape, steps, seed):
    rng = np.random.default_rng(seed)
    params = random_array(rng, shape, dtype)
    grads = [random_array(rng, shape, dtype) for _ in range(steps)]
    trajectory, state, _ = run(rj.rmsprop(**cfg), params, grads)

    to64 = lambda x: np.asarray(x).astype(np.complex128 if dtype == "complex64" else np.float64)
    expected, expected_state = reference_rmsprop(to64(params), [to64(g) for g in grads], **cfg)

    # Params are stored in their own dtype, so each step rounds them (eps_p/2
    # relative); the arithmetic is float32 (a few ulp per step).
    eps_p = float(jnp.finfo(DTYPES[dtype]).eps)
    bound = np.full(shape, 1e-30)
    previous = to64(params)
    for k, (ours, ref) in enumerate(zip(trajectory, expected), start=1):
        step = np.abs(ref - previous)  # the update is rounded to the dtype, then the sum
        bound = bound + eps_p * (np.abs(ref) + step) + 32 * F32_EPS * k * step
        previous = ref
        err = np.abs(to64(ours) - ref)
        assert np.all(err <= bound), (
            f"step {k}: max err {err.max():.3g} > bound {np.max(bound):.3g}; cfg={cfg}"
        )
    velocity = np.asarray(state.velocity, np.float64)
    np.testing.assert_allclose(
        velocity, expected_state["velocity"], rtol=32 * F32_EPS * steps, atol=1e-30
    )


# ---------------------------------------------------------------------------
# Numerics guarantees.


def test_complex_params_keep_real_velocity():
    params = {"z": jnp.ones((4,), jnp.complex64)}
    tx = rj.rmsprop(0.1, centered=True, momentum=0.9)
    state = tx.init(params)
    assert state.velocity["z"].dtype == jnp.float32  # half the bytes of optax's complex nu
    assert state.average_gradient["z"].dtype == jnp.complex64
    assert state.momentum["z"].dtype == jnp.complex64
    g = {"z": jnp.full((4,), 3 + 4j, jnp.complex64)}
    _updates, state = jax.jit(tx.update)(g, state, params)
    assert state.velocity["z"].dtype == jnp.float32
    np.testing.assert_allclose(state.velocity["z"], 0.1 * 25.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_zero_gradient_gives_zero_step(dtype):
    params = jnp.ones((8,), dtype)
    tx = rj.rmsprop(learning_rate=0.01, epsilon=1e-8)
    state = tx.init(params)
    assert state.velocity.dtype == jnp.float32
    updates, state = jax.jit(tx.update)(jnp.zeros_like(params), state, params)
    assert updates.dtype == dtype
    np.testing.assert_array_equal(np.asarray(updates, np.float32), 0.0)


def test_float16_zero_gradient_nan_in_optax_is_fixed():
    """optax issue #1784: eps=1e-8 underflows in float16, 0/0 gives NaN there."""
    params = jnp.ones((3,), jnp.float16)
    grads = jnp.zeros_like(params)
    optax_tx = optax.rmsprop(0.01, eps=1e-8)
    optax_updates, _ = optax_tx.update(grads, optax_tx.init(params), params)
    ours, _ = rj.rmsprop(0.01, epsilon=1e-8).update(grads, rj.rmsprop(0.01).init(params), params)
    assert np.all(np.isfinite(np.asarray(ours, np.float32)))
    # The peer's defect that motivates the guarantee (if optax fixes it, drop this line).
    assert np.any(np.isnan(np.asarray(optax_updates, np.float32)))


def test_bfloat16_storage_float32_arithmetic():
    """bf16 slots: every new slot is rounded to bf16 and the step reads it as stored (as Keras and
    PyTorch with bf16 optimizer variables); the arithmetic is float32."""
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(64,)), jnp.float32) for _ in range(5)]
    for cfg in (
        dict(learning_rate=0.01),
        dict(learning_rate=0.01, centered=True, momentum=0.9),
        dict(learning_rate=0.01, momentum=0.5, nesterov=True, lr_in_momentum=False),
    ):
        tx = rj.rmsprop(**cfg, accumulator_dtype=jnp.bfloat16)
        trajectory, state, _ = run(tx, params, grads)
        for slot in (state.velocity, state.average_gradient, state.momentum):
            assert slot is None or slot.dtype == jnp.bfloat16
        args = np.asarray(params, np.float64), [np.asarray(g, np.float64) for g in grads]
        expected, ref_state = reference_rmsprop(*args, **cfg, slot_dtype=ml_dtypes.bfloat16)
        unrounded, _ = reference_rmsprop(*args, **cfg)
        # float32 arithmetic against float64: a few float32 ulps of the parameter per step
        # (a slot on a bf16 rounding boundary could round the other way: one bf16 ulp, rare;
        # seed 0 has none).
        ours = np.asarray(trajectory[-1], np.float64)
        ulps = np.abs(ours - expected[-1]) / np.spacing(np.abs(expected[-1]).astype(np.float32))
        assert ulps.max() <= 2 * len(grads), ulps.max()
        # ... and the bf16 rounding is real: the unrounded reference is many ulps away.
        off = np.abs(ours - unrounded[-1]) / np.spacing(np.abs(unrounded[-1]).astype(np.float32))
        assert np.median(off) > 2 * len(grads), np.median(off)
        assert np.array_equal(np.asarray(state.velocity, np.float64), ref_state["velocity"])


def test_centered_variance_clamped_at_zero():
    """a^2 > v can happen by rounding; the denominator must stay finite."""
    tx = rj.rmsprop(learning_rate=0.1, rho=0.9, epsilon=0.0, centered=True)
    params = jnp.ones((3,))
    state = tx.init(params)
    # A state where rounding made a^2 exceed v (v - a^2 < 0 by one ulp).
    a = jnp.full((3,), 0.5)
    v = jnp.nextafter(a * a, 0.0)
    state = state._replace(velocity=v, average_gradient=a)
    updates, new_state = jax.jit(tx.update)(jnp.full((3,), 0.5), state, params)
    assert new_state.velocity[0] < new_state.average_gradient[0] ** 2
    assert np.all(np.isfinite(updates))


def test_centered_constant_gradient_never_nan():
    """A constant gradient makes v - a^2 -> 0 exactly; rounding must not give NaN."""
    for rho in (0.9, 0.95, 0.99):
        tx = rj.rmsprop(learning_rate=0.1, rho=rho, epsilon=0.0, centered=True)
        params = jnp.linspace(-3, 3, 64)
        g = jnp.asarray(np.geomspace(1e-3, 1e3, 64), jnp.float32)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(50):
            updates, state = update(g, state, params)
            assert np.all(np.isfinite(updates)), rho


def test_epsilon_zero_and_zero_gradient_gives_zero_step():
    for eps_in_sqrt in (True, False):
        tx = rj.rmsprop(learning_rate=0.1, epsilon=0.0, eps_in_sqrt=eps_in_sqrt)
        params = jnp.ones((2,))
        updates, _ = tx.update(jnp.zeros((2,)), tx.init(params), params)
        np.testing.assert_array_equal(updates, 0.0)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        dict(centered=True, momentum=0.9, nesterov=True),
        dict(learning_rate=optax.exponential_decay(0.1, 10, 0.5), bias_correction=True),
        dict(maximize=True, lr_in_momentum=False, momentum=0.5, accumulator_dtype=jnp.bfloat16),
    ],
)
def test_no_recompilation_after_first_update(cfg):
    tx = rj.rmsprop(**cfg)
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,), jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, _, update = run(tx, params, [grads] * 4)
    assert update.traces == 1
    state = tx.init(params)
    new_state = update(grads, state, params)[1]
    # Same avals (dtype, shape, weak type) in and out: donation and scan work too.
    same = jax.tree.map(
        lambda a, b: (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type),
        state,
        new_state,
    )
    assert all(jax.tree.leaves(same))


def test_schedule_evaluated_at_count_before_step():
    seen = []
    lrs = jnp.array([0.1, 0.0, 0.2])
    tx = rj.rmsprop(learning_rate=lambda count: lrs[count], rho=0.5)
    params = jnp.array([1.0])
    trajectory, state, _ = run(tx, params, [jnp.array([1.0])] * 3, jit=False)
    expected, _ = reference_rmsprop(
        np.array([1.0]), [np.array([1.0])] * 3, learning_rate=[0.1, 0.0, 0.2], rho=0.5
    )
    np.testing.assert_allclose(np.stack(trajectory), np.stack(expected), rtol=1e-6)
    assert trajectory[1] == trajectory[0]  # lr 0 on the second step
    assert int(state.count) == 3
    del seen


def test_plain_config_keeps_minimal_state():
    state = rj.rmsprop().init({"w": jnp.ones(3)})
    assert state.count is None and state.average_gradient is None and state.momentum is None
    assert len(jax.tree.leaves(state)) == 1


def test_works_under_vmap():
    tx = rj.rmsprop(0.1, momentum=0.9)
    params = jnp.ones((4, 3))
    grads = jnp.arange(12.0).reshape(4, 3)
    state = jax.vmap(tx.init)(params)
    batched, _ = jax.vmap(tx.update)(grads, state, params)
    single, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(batched, single, rtol=1e-6)


# ---------------------------------------------------------------------------
# Pytree handling at update time.


def test_none_gradient_leaves_pass_through():
    tx = rj.rmsprop(0.1, momentum=0.9)
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)({"a": jnp.ones(2), "b": None}, state, params)
    assert updates["b"] is None
    np.testing.assert_array_equal(new_state.velocity["b"], state.velocity["b"])
    np.testing.assert_array_equal(new_state.momentum["b"], state.momentum["b"])
    assert not np.array_equal(new_state.velocity["a"], state.velocity["a"])
    new_params = rj.apply_updates(params, updates)
    np.testing.assert_array_equal(new_params["b"], params["b"])
    np.testing.assert_array_equal(new_params["a"], optax.apply_updates(params["a"], updates["a"]))


def test_structure_mismatch_names_first_differing_path():
    tx = rj.rmsprop()
    params = {"dense": {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2))}}
    state = tx.init(params)
    grads = {"dense": {"bias": jnp.ones(2), "kernal": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"dense/kernal.*dense/kernel"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="only params has 'dense/kernel'"):
        tx.update({"dense": {"bias": jnp.ones(2)}}, state, params)
    with pytest.raises(ValueError, match="optimizer state"):
        tx.update({"dense": {"bias": jnp.ones(2)}}, state)


def test_integer_and_boolean_leaves_raise_type_error_naming_path():
    tx = rj.rmsprop()
    params = {"w": jnp.ones(2), "step": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"'step'.*int32"):
        tx.update({"w": jnp.ones(2), "step": jnp.ones(2, jnp.int32)}, state, params)
    with pytest.raises(TypeError, match=r"'mask'.*bool"):
        tx.init({"mask": jnp.ones(2, bool)})


# ---------------------------------------------------------------------------
# Bad hyperparameters fail at construction.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=-0.1), r"learning_rate must be in \[0.0, inf\], got -0.1"),
        (dict(rho=1.0), r"rho must be in \[0.0, 1.0\), got 1.0"),
        (dict(rho=-0.5), r"rho must be in \[0.0, 1.0\), got -0.5"),
        (dict(momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
        (dict(momentum=-0.1), r"momentum must be in \[0.0, 1.0\)"),
        (dict(epsilon=-1e-7), r"epsilon must be in \[0.0, inf\], got -1e-07"),
        (dict(epsilon=math.nan), r"epsilon must be in"),
        (dict(initial_accumulator_value=-1.0), r"initial_accumulator_value must be in"),
        (dict(nesterov=True), r"nesterov=True needs momentum in \(0, 1\), got momentum=0.0"),
        (
            dict(accumulator_dtype=jnp.float16),
            r"accumulator_dtype must be one of None, jnp.float32, jnp.bfloat16",
        ),
        (dict(accumulator_dtype="fp8"), r"accumulator_dtype must be one of"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rj.rmsprop(**kwargs)


def test_rho_must_be_a_number():
    with pytest.raises(TypeError, match="rho must be a real number"):
        rj.rmsprop(rho="0.9")


def test_int8_state_is_available():  # its behaviour: tests/test_quantization.py
    from rmsprop_jax.quantization import QuantizedArray

    state = rj.rmsprop_update(accumulator_dtype="int8").init({"w": jnp.zeros((64, 64))})
    assert isinstance(state.velocity["w"], QuantizedArray)


def test_scale_by_rmsprop_follows_optax_convention():
    """chain(rj.scale_by_rmsprop(), optax.scale_by_learning_rate(lr)) is rj.rmsprop(lr) up to the
    rounding order ((g / d) * lr vs (lr * g) / d: an ulp), and optax's own chain."""
    params = {"w": jnp.linspace(-1.0, 2.0, 7), "b": jnp.ones((2, 3))}
    grads = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)), params) for k in range(4)]
    ours = optax.chain(
        rj.scale_by_rmsprop(rho=0.8, epsilon=1e-6), optax.scale_by_learning_rate(0.1)
    )
    whole, _, _ = run(rj.rmsprop(0.1, rho=0.8, epsilon=1e-6), params, grads)
    chained, _, _ = run(ours, params, grads)
    for a, b in zip(jax.tree.leaves(chained), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    theirs = optax.chain(
        optax.scale_by_rms(decay=0.8, eps=1e-6, eps_in_sqrt=True), optax.scale_by_learning_rate(0.1)
    )
    peer, _, _ = run(theirs, params, grads)
    for a, b in zip(jax.tree.leaves(chained), jax.tree.leaves(peer)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_scale_by_rmsprop_refuses_a_learning_rate():
    with pytest.raises(TypeError, match=r"optax's scale_by_\* convention.*rj\.rmsprop_update"):
        rj.scale_by_rmsprop(learning_rate=0.01)
    with pytest.raises(TypeError, match="positional"):
        rj.scale_by_rmsprop(0.01)  # would have been rho: keyword-only


def test_gradient_for_a_none_param_names_the_leaf():
    tx = rj.rmsprop()
    with pytest.raises(
        ValueError, match=r"grads leaf 'w' has a gradient, but its parameter was None"
    ):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": None}), {"w": None})
