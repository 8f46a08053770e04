"""``rj.clip_by_norm`` / ``clip_by_global_norm`` / ``clip_by_value`` (rmsprop_jax.transforms.clipping), each alone in ``optax.chain``.

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
from _transform_helpers import close, f64, run_chain

import rmsprop_jax as rj

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


def test_global_norm_of_a_group_of_complex_and_real_small_leaves():
    """Small leaves are summed as one group; complex ones make it complex (|z|^2 summed), and a
    leaf whose squares overflow float32 sends it through the overflow branch."""
    rng = np.random.default_rng(1)
    tree = {
        f"c{i}": jnp.asarray(
            (rng.standard_normal(5) + 1j * rng.standard_normal(5)) * s, jnp.complex64
        )
        for i, s in enumerate([1.0, 2.0, 1e-3])
    }
    tree["real"] = jnp.asarray(rng.standard_normal(7), jnp.float32)
    norm = jax.jit(rj.global_norm)
    for huge in (None, 1e20):
        if huge is not None:
            tree["huge"] = jnp.asarray(rng.standard_normal(3) * huge * (1 + 1j), jnp.complex64)
        expected = np.sqrt(
            sum(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2) for x in tree.values())
        )
        np.testing.assert_allclose(float(norm(tree)), expected, rtol=2e-7)


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


# -- norms without overflow -------------------------------------------------------------------

HUGE = {"a": jnp.full((4,), 1e30), "b": jnp.full((3,), -3e30)}


def _np_norm(tree, p=2.0):
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
    return np.sum(np.abs(flat) ** p) ** (1 / p)


def test_global_norm_of_finite_huge_gradients_is_finite_and_right():
    np.testing.assert_allclose(rj.global_norm(HUGE), _np_norm(HUGE), rtol=1e-6)
    np.testing.assert_allclose(rj.global_norm({"x": jnp.array([3.0, 4.0])}), 5.0, rtol=0)


@pytest.mark.parametrize(
    "tx, expected",
    [
        (rj.clip_by_global_norm(1.0), lambda g: g / _np_norm(HUGE)),
        (rj.clip_by_norm(1.0), lambda g: g / _np_norm({"x": g})),
        (rj.clip_by_p_norm(1.0, 2.0), lambda g: g / _np_norm(HUGE)),
        (rj.clip_by_p_norm(1.0, 3.0), lambda g: g / _np_norm(HUGE, 3.0)),
    ],
    ids=["global", "per-tensor", "p=2", "p=3"],
)
def test_clipping_huge_finite_gradients(tx, expected):
    out, _ = jax.jit(tx.update)(HUGE, None)
    for key in HUGE:
        want = expected(np.asarray(HUGE[key], np.float64))
        np.testing.assert_allclose(out[key], want, rtol=2e-6)


def test_rmsprop_global_clipnorm_with_huge_finite_gradients_is_finite():
    tx = rj.rmsprop(0.1, global_clipnorm=1.0)
    params = jax.tree.map(jnp.zeros_like, HUGE)
    u, _ = jax.jit(tx.update)(HUGE, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_non_finite_gradients_keep_keras_nan_propagation():
    out, _ = rj.clip_by_global_norm(1.0).update({"x": jnp.array([jnp.inf, 1.0])}, None)
    assert bool(jnp.all(jnp.isnan(out["x"])))  # Keras: (n - n) is NaN


def test_global_norm_of_many_huge_leaves_is_right():
    """Over 16 leaves the overflow branch concatenates them in a tree of concatenations."""
    rng = np.random.default_rng(0)
    tree = {
        f"leaf{i:02d}": jnp.asarray(rng.standard_normal(i % 5 + 1) * 10.0 ** (10 + i), jnp.float32)
        for i in range(40)  # up to 1e49 overflows float32: keep the leaves finite
        if 10 + i < 38
    }
    assert len(tree) == 28
    np.testing.assert_allclose(rj.global_norm(tree), _np_norm(tree), rtol=1e-6)
    out, _ = jax.jit(rj.clip_by_global_norm(1.0).update)(tree, None)
    for key, g in tree.items():
        np.testing.assert_allclose(out[key], np.asarray(g, np.float64) / _np_norm(tree), rtol=2e-6)


def _count_in_compiled_step(tx, leaves: int, op: str) -> int:
    params = {f"w{i}": jnp.ones((8,)) for i in range(leaves)}

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    return text.count(f" {op}(")


def test_step_wide_scalars_are_compiled_once_not_per_leaf():
    """XLA copies a cheap scalar expression into every loop that reads it; the global clip's
    scale (its ``minimum``) and the EMA's ``where`` on the step count are kept in one kernel
    each, so the compiled step does not grow by them with every leaf (compile time)."""
    tx = rj.rmsprop(1e-3, global_clipnorm=1.0, use_ema=True)
    for op in ("minimum", "select"):
        assert _count_in_compiled_step(tx, 2, op) == _count_in_compiled_step(tx, 6, op), op


def test_a_group_of_small_leaves_is_squared_as_concatenated():
    """Every reader of a group of small leaves squares it, so no ``|x|`` pass follows the
    concatenation (it was one more kernel to compile and, as the overflow branch's operand,
    a pass over the group in every step)."""
    tx = rj.clip_by_global_norm(1.0)
    assert _count_in_compiled_step(tx, 10, "concatenate") == 1
    assert _count_in_compiled_step(tx, 10, "abs") == 0
    # over 16 leaves the levels of the tree of concatenations keep theirs
    assert _count_in_compiled_step(tx, 40, "abs") > 0


def test_overflow_branch_copies_no_large_leaf():
    """The never-run branch of an overflowing norm reduces a large leaf where it lies: XLA
    allocates a branch's buffers whether or not it runs, and one concatenation of every leaf
    cost 4 bytes per parameter of temporaries (64 MB at 16M params) in every step."""
    params = {f"w{i}": jnp.ones((70_000,)) for i in range(4)}
    tx = rj.rmsprop(1e-3, global_clipnorm=1.0)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    leaf_bytes = 70_000 * 4  # XLA squares a leaf into a buffer before summing it (optax too)
    assert compiled.compile().memory_analysis().temp_size_in_bytes < 2 * leaf_bytes


def _concatenations_outside_branches(fn, *args) -> int:
    traced = jax.make_jaxpr(lambda *a: fn(*a))(*args)  # a new function: no cached trace
    return sum(e.primitive.name == "concatenate" for e in traced.eqns)


TINY = {f"b{i:02d}": jnp.linspace(-1.0, 1.0 + i, 64) for i in range(40)}


def test_tiny_leaves_are_summed_as_one_group_on_one_device(monkeypatch):
    """On one device the global norm concatenates leaves under 2048 elements (XLA:CPU reduces
    each leaf in three kernels); with several devices, where GSPMD may split a leaf and the
    concatenation would gather it every step, each leaf is summed where it lies."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)  # also under forced host devices
    assert _concatenations_outside_branches(rj.global_norm, TINY) > 0
    np.testing.assert_allclose(rj.global_norm(TINY), _np_norm(TINY), rtol=1e-6)
    large = {"w": jnp.ones((2048,)), "v": jnp.ones((4096,))}  # at and above the size: alone
    assert _concatenations_outside_branches(rj.global_norm, large) == 0
    monkeypatch.setattr(jax, "device_count", lambda *a: 4)
    assert _concatenations_outside_branches(rj.global_norm, TINY) == 0
    np.testing.assert_allclose(rj.global_norm(TINY), _np_norm(TINY), rtol=1e-6)


def test_explicitly_sharded_leaves_are_never_concatenated():
    """A leaf split over explicit mesh axes is reduced where it lies (a concatenation would
    gather it), in the plain sum and in the overflow branch alike."""
    from jax.sharding import AxisType, PartitionSpec

    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        tree = {k: jax.device_put(v, PartitionSpec("d")) for k, v in TINY.items()}
        jaxpr = jax.make_jaxpr(rj.global_norm)(tree)
        assert "concatenate" not in str(jaxpr)
        np.testing.assert_allclose(jax.jit(rj.global_norm)(tree), _np_norm(TINY), rtol=1e-6)
        replicated = {k: jax.device_put(v, PartitionSpec()) for k, v in TINY.items()}
        assert _concatenations_outside_branches(rj.global_norm, replicated) > 0


def test_overflowing_norms_of_one_element_arrays_are_right():
    """XLA rewrites a one-element (x * 2**-80)**2 as x*x * 2**-160, and 2**-160 is 0 in
    float32: the overflow branch squares a one-element array behind a barrier (it gave NaN /
    inf, so a clipped gradient of 1e25 became NaN or 0)."""
    tree = {"w": jnp.full((70_000,), 1e25), "s": jnp.float32(1e25)}
    np.testing.assert_allclose(jax.jit(rj.global_norm)(tree), _np_norm(tree), rtol=1e-6)
    clipped, _ = jax.jit(rj.clip_by_norm(1.0).update)({"s": jnp.float32(1e25)}, None)
    assert float(clipped["s"]) == pytest.approx(1.0, rel=1e-6)
    params = {"s": jnp.float32(1.0)}
    for kw in ({"clipnorm": 1.0}, {"global_clipnorm": 1.0}):  # flat buffers of one element
        tx, flat = rj.rmsprop(1e-3, **kw), rj.contiguous(rj.rmsprop(1e-3, **kw))
        want, _ = jax.jit(tx.update)({"s": jnp.float32(1e25)}, tx.init(params), params)
        got, _ = jax.jit(flat.update)({"s": jnp.float32(1e25)}, flat.init(params), params)
        assert float(want["s"]) == pytest.approx(-1e-3 / np.sqrt(0.1), rel=1e-5), kw
        assert float(got["s"]) == pytest.approx(float(want["s"]), rel=1e-6), kw


def test_overflow_branch_groups_leaves_of_different_ranks(monkeypatch):
    """The branch concatenates small leaves whatever their rank (inside jit their abstract
    shardings differ in length: comparing those kept every leaf apart)."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 4)  # no group in the plain sum
    tree = {"b": jnp.full((8,), 1e25), "w": jnp.full((2, 4), 1e25), "s": jnp.float32(1e25)}
    assert _concatenations_outside_branches(rj.global_norm, tree) == 0
    assert "concatenate" in str(jax.make_jaxpr(lambda t: rj.global_norm(t))(tree))
    np.testing.assert_allclose(jax.jit(rj.global_norm)(tree), _np_norm(tree), rtol=1e-6)


def test_overflowing_float64_norms_are_right():
    """With jax x64, a float64 norm whose squares overflow float64 (|x| above ~1.3e154) is
    recomputed in float64 with a float64 scale (2**-80 left them overflowing: NaN after
    Keras' global clip)."""
    with jax.enable_x64(True):
        tree = {"a": jnp.full((3,), 1e200), "b": jnp.ones(5, jnp.float32), "s": jnp.float64(1e200)}
        norm = jax.jit(rj.global_norm)(tree)
        assert norm.dtype == jnp.float64
        np.testing.assert_allclose(norm, 2e200, rtol=1e-12)
        clipped, _ = jax.jit(rj.clip_by_global_norm(1.0).update)(tree, None)
        np.testing.assert_allclose(clipped["a"], 0.5, rtol=1e-12)
        per_tensor, _ = jax.jit(rj.clip_by_norm(1.0).update)({"s": jnp.float64(1e300)}, None)
        assert float(per_tensor["s"]) == pytest.approx(1.0, rel=1e-12)
