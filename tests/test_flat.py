"""rj.contiguous(tx): same updates as tx over the same pytrees, state one flat buffer per dtype."""

from __future__ import annotations

import pickle

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj
import rmsprop_jax.flat as contiguous_module  # a module, not the function rj.contiguous
from rmsprop_jax.flat import ContiguousState, FlatParams

STEPS = 5
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_params(bf16: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)

    def leaf(shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    params = {
        "dense": {"kernel": leaf((3, 4)), "bias": leaf((4,))},
        "out": {"kernel": leaf((4, 2)), "bias": leaf((2,))},
        "scale": leaf(()),
        "blocks": [leaf((2, 3))],
    }
    if bf16:
        params["embed"] = leaf((6, 3), jnp.bfloat16)
        params["norm"] = {"bias": leaf((3,), jnp.bfloat16)}
    return params


def make_grads(params, steps=STEPS, seed=1, none=()):
    """Random gradients; leaves whose path contains a name in ``none`` are None on odd steps."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):

        def leaf(path, p, t=t):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            if t % 2 == 1 and any(n in name for n in none):
                return None
            return jnp.asarray(rng.standard_normal(np.shape(p)) * (1 + t), jnp.result_type(p))

        out.append(jax.tree_util.tree_map_with_path(leaf, params))
    return out


def run(tx, params, grads_list, jit=True):
    """Per step: (updates, params after the step); and the final state."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return updates, rj.apply_updates(params, updates), state

    # LLVM -O0: a third less compile time, same arithmetic (no fast-math either way).
    step = jax.jit(step, compiler_options=FAST_COMPILE) if jit else step
    state = tx.init(params)
    history = []
    for grads in grads_list:
        updates, params, state = step(params, state, grads)
        history.append((updates, params))
    return history, state


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7, bf16_rtol=None):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb
    for x, y in zip(la, lb):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        r = rtol
        if x.dtype == jnp.bfloat16 and bf16_rtol is not None:
            r = bf16_rtol
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=r, atol=atol
        )


def assert_same_run(tx, params, grads_list, wrap=rj.contiguous, **tol):
    ref, ref_state = run(tx, params, grads_list)
    got, got_state = run(wrap(tx), params, grads_list)
    for t, ((u_ref, p_ref), (u_got, p_got)) in enumerate(zip(ref, got)):
        try:
            assert_trees_close(u_got, u_ref, **tol)
            assert_trees_close(p_got, p_ref, **tol)
        except AssertionError as err:
            raise AssertionError(f"step {t}: {err}") from None
    return ref_state, got_state


def rmsprop_state(state):
    is_rms = lambda x: isinstance(x, rj.RMSpropState)
    (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_rms) if is_rms(x)]
    return found


KERAS_FULL = dict(
    learning_rate=optax.linear_schedule(0.05, 0.01, 10),
    rho=0.8,
    momentum=0.9,
    centered=True,
    global_clipnorm=1.0,
    weight_decay=0.1,
    exclude_from_weight_decay=["bias"],
    use_ema=True,
    ema_momentum=0.7,
    ema_overwrite_frequency=2,
    gradient_accumulation_steps=2,
    loss_scale_factor=4.0,
)

CONFIGS = {
    "plain": dict(learning_rate=0.01),
    "centered+momentum": dict(learning_rate=0.01, centered=True, momentum=0.9),
    "nesterov+torch conventions": dict(
        learning_rate=0.01,
        momentum=0.5,
        nesterov=True,
        eps_in_sqrt=False,
        lr_in_momentum=False,
        bias_correction=True,
        maximize=True,
        initial_accumulator_value=0.1,
    ),
    "keras full": KERAS_FULL,
    "bfloat16 state": dict(
        learning_rate=0.01, centered=True, momentum=0.9, accumulator_dtype=jnp.bfloat16
    ),
    "clipnorm (per tensor)": dict(learning_rate=0.01, clipnorm=0.7, momentum=0.9),
    "clipvalue": dict(learning_rate=0.01, clipvalue=0.5, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_updates_as_per_leaf(name):
    params = make_params()
    assert_same_run(rj.rmsprop(**CONFIGS[name]), params, make_grads(params))


def test_mixed_dtypes_two_buffers():
    params = make_params(bf16=True)
    grads = make_grads(params)
    tx = rj.rmsprop(learning_rate=0.01, centered=True, momentum=0.9)
    ref_state, got_state = assert_same_run(tx, params, grads)  # elementwise: same to the ulp
    assert sorted(name for name, _ in got_state.layout.groups) == ["bfloat16", "float32"]
    flat_v = got_state.inner.velocity
    assert isinstance(flat_v, FlatParams) and len(flat_v.buffers) == 2
    assert {str(b.dtype) for b in flat_v.buffers} == {"float32"}  # bf16 slots are float32
    # The flat slots are the per-leaf slots, laid out flat.
    assert_trees_close(flat_v.unflatten(), ref_state.velocity)
    assert_trees_close(got_state.inner.momentum.unflatten(), ref_state.momentum)
    # The Keras feature set over both dtypes: test_none_grads.


def test_none_grads():
    params = make_params(bf16=True)
    grads = make_grads(params, steps=4, none=("bias", "blocks", "scale"))
    assert grads[1]["dense"]["bias"] is None and grads[0]["dense"]["bias"] is not None
    # Keras full (over float32 and bfloat16 buffers): accumulation keeps the sums,
    # RMSprop keeps the slots, EMA gives zero updates and moves the average.
    ref_state, got_state = assert_same_run(
        rj.rmsprop(**KERAS_FULL), params, grads, bf16_rtol=1e-2, atol=1e-6
    )
    got_slots, ref_slots = rmsprop_state(got_state), rmsprop_state(ref_state)
    for field in ("velocity", "average_gradient", "momentum"):
        assert_trees_close(
            getattr(got_slots, field).unflatten(), getattr(ref_slots, field), atol=1e-6
        )
    assert_trees_close(
        rj.flat.ema_params(got_state), rj.ema_params(ref_state), bf16_rtol=1e-2, atol=1e-6
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(
            0.01, clipnorm=0.5, momentum=0.9, weight_decay=0.1, exclude_from_weight_decay=["bias"]
        ),
        lambda: rj.rmsprop(
            0.01, clipvalue=0.5, weight_decay=0.1, use_ema=True, ema_overwrite_frequency=3
        ),
        lambda: rj.presets.torch(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=True),
    ],
    ids=["clipnorm+decay", "clipvalue+decay+ema", "torch preset (optax pieces)"],
)
def test_none_grads_through_per_tensor_clipping_decay_and_ema(make):
    """Which leaves have a gradient reaches every piece's flat form explicitly (per trace)."""
    params = make_params()
    grads = make_grads(params, steps=4, none=("bias", "scale"))
    assert_same_run(make(), params, grads, atol=1e-6)


def test_all_grads_none_and_none_params():
    params = {"a": jnp.ones(3), "frozen": None, "b": jnp.ones((2, 2))}
    tx = rj.rmsprop(0.1, momentum=0.9)
    grads = [
        {"a": jnp.full(3, 2.0), "frozen": None, "b": jnp.ones((2, 2))},
        {"a": None, "frozen": None, "b": None},
        {"a": jnp.full(3, -1.0), "frozen": None, "b": None},
    ]
    assert_same_run(tx, params, grads)


def test_state_is_one_buffer_per_dtype_and_slot():
    params = make_params(bf16=True)
    n_leaves = len(jax.tree.leaves(params))
    tx = rj.rmsprop(**KERAS_FULL)

    def slots(state):  # every array but the int32 step counters
        return [x for x in jax.tree.leaves(state) if x.dtype != jnp.int32]

    per_leaf = slots(tx.init(params))
    flat = slots(rj.contiguous(tx).init(params))
    n_slots = 5  # v, a (centered), m (momentum), the EMA, the accumulators
    assert len(per_leaf) == n_slots * n_leaves
    assert len(flat) == n_slots * 2  # float32 and bfloat16 buffers
    assert all(x.ndim == 1 for x in flat)
    n_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    assert sum(x.size for x in flat) == sum(x.size for x in per_leaf) == n_slots * n_params


def test_no_recompilation():
    params = make_params(bf16=True)
    tx = rj.contiguous(rj.rmsprop(**KERAS_FULL))
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state

    state = tx.init(params)
    for grads in make_grads(params, steps=6):
        params, state = step(params, state, grads)
    assert len(traces) == 1
    # A state made by a second init (same layout) hits the same cache entry.
    params, state = step(params, tx.init(params), make_grads(params, steps=1)[0])
    assert len(traces) == 1


def test_dynamic_loss_scale_inside():
    params = make_params()
    grads = make_grads(params)
    grads[2] = jax.tree.map(lambda g: g.at[...].set(jnp.inf) if g.ndim == 0 else g, grads[2])
    tx = rj.dynamic_loss_scale(
        rj.rmsprop(0.01, momentum=0.9), initial_scale=8.0, dynamic_growth_steps=2
    )
    ref_state, got_state = assert_same_run(tx, params, grads)
    assert float(rj.loss_scale(got_state)) == float(rj.loss_scale(ref_state))


def test_optax_transforms_vouched_for_by_the_user():
    """Other libraries' transformations are opaque: the user declares them (rj.flat.chain,
    rj.flat.elementwise) or vouches for all of them (assume_elementwise=True)."""
    params = make_params()
    grads = make_grads(params)
    vouched = lambda tx: rj.contiguous(tx, assume_elementwise=True)
    assert_same_run(optax.rmsprop(0.01, momentum=0.9, centered=True), params, grads, wrap=vouched)
    declared = rj.flat.chain(
        rj.flat.elementwise(optax.clip_by_global_norm(1.0)), rj.flat.elementwise(optax.adam(1e-2))
    )
    assert_same_run(declared, params, grads, rtol=2e-6)
    with pytest.raises(NotImplementedError, match=r"rj\.flat\.chain"):
        rj.contiguous(optax.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01)))


def test_user_flat_params_path():
    params = make_params(bf16=True)
    flat, unflatten = rj.flat.flatten(params)
    assert isinstance(flat, FlatParams) and len(jax.tree.leaves(flat)) == 2
    assert_trees_close(unflatten(flat), params, rtol=0, atol=0)
    targets = make_grads(params, steps=1, seed=3)[0]

    def loss(p):
        return sum(
            jnp.sum((x.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
            for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(targets))
        )

    config = dict(KERAS_FULL, gradient_accumulation_steps=None, loss_scale_factor=None)
    tx = rj.contiguous(rj.rmsprop(**config))

    @jax.jit
    def tree_step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return rj.apply_updates(params, updates), state

    @jax.jit
    def flat_step(flat, state):
        grads = jax.grad(lambda f: loss(unflatten(f)))(flat)
        assert isinstance(grads, FlatParams)
        updates, state = tx.update(grads, state, flat)
        assert isinstance(updates, FlatParams)
        return rj.apply_updates(flat, updates), state

    tree_state, flat_state = tx.init(params), tx.init(flat)
    tree_params = params
    for _ in range(5):
        tree_params, tree_state = tree_step(tree_params, tree_state)
        flat, flat_state = flat_step(flat, flat_state)
    assert_trees_close(unflatten(flat), tree_params, bf16_rtol=1e-2, atol=1e-6)
    assert_trees_close(
        rj.flat.ema_params(flat_state),
        rj.flat.ema_params(tree_state),
        bf16_rtol=1e-2,
        atol=1e-6,
    )


def test_user_flat_step_is_one_fusion_and_donates():
    params = {f"layer{i}": jnp.ones((10,)) for i in range(20)}
    flat, _ = rj.flat.flatten(params)
    tx = rj.contiguous(rj.rmsprop(0.01))

    def step(flat, state, grads):
        updates, state = tx.update(grads, state, flat)
        return rj.apply_updates(flat, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(flat, tx.init(flat), flat).compile()
    assert compiled.as_text().count(" fusion(") <= 2


def test_exclusion_forms_and_layout_order():
    params = make_params()
    grads = make_grads(params, steps=3)
    by_tree = jax.tree_util.tree_map_with_path(
        lambda path, _: "bias" in jax.tree_util.keystr(path), params
    )
    for exclude in (by_tree, lambda p: by_tree, "dense/kernel|scale"):
        tx = rj.rmsprop(0.01, weight_decay=0.3, exclude_from_weight_decay=exclude)
        assert_same_run(tx, params, grads)
    # Decayed leaves are stored first, so the decay mask is a single range.
    layout = (
        rj.contiguous(rj.rmsprop(0.01, weight_decay=0.3, exclude_from_weight_decay="bias"))
        .init(params)
        .layout
    )
    offsets = {path: leaf[1] for path, leaf in zip(layout.paths, layout.leaves)}
    assert max(offsets["dense/kernel"], offsets["out/kernel"]) < min(
        offsets["dense/bias"], offsets["out/bias"]
    )


def test_many_exclusion_ranges_with_flat_params():
    # flatten() keeps tree order: kernel/bias alternate, more ranges than iota compares.
    params = {
        f"l{i}": {"bias": jnp.full((2,), 1.0), "kernel": jnp.full((3,), 1.0)} for i in range(9)
    }
    grads = [jax.tree.map(jnp.ones_like, params)] * 2
    tx = rj.rmsprop(0.01, weight_decay=0.5, exclude_from_weight_decay="bias")
    ref, _ = run(tx, params, grads)
    flat, unflatten = rj.flat.flatten(params)
    got, _ = run(rj.contiguous(tx), flat, [rj.flat.flatten(g)[0] for g in grads])
    for (_, p_got), (_, p_ref) in zip(got, ref):
        assert_trees_close(unflatten(p_got), p_ref)


def test_errors():
    params = make_params()
    tx = rj.contiguous(rj.rmsprop(0.01))
    state = tx.init(params)
    grads = make_grads(params, steps=1)[0]

    sparse = dict(
        grads,
        out=dict(grads["out"], kernel=rj.IndexedSlices(jnp.array([1]), jnp.ones((1, 2)), (4, 2))),
    )
    with pytest.raises(TypeError, match="IndexedSlices"):
        tx.update(sparse, state, params)

    with pytest.raises(TypeError, match="dtype bfloat16 but the parameter is float32"):
        tx.update(dict(grads, scale=grads["scale"].astype(jnp.bfloat16)), state, params)

    with pytest.raises(ValueError, match="shape"):
        tx.update(dict(grads, scale=jnp.ones(2)), state, params)

    with pytest.raises(ValueError, match="different tree structures"):
        tx.update({k: v for k, v in grads.items() if k != "scale"}, state, params)

    with pytest.raises(TypeError, match="int32"):
        tx.init({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})

    with pytest.raises(NotImplementedError, match="assume_elementwise"):
        rj.contiguous(optax.chain(optax.clip_by_block_rms(1.0), rj.rmsprop(0.01)))
    with pytest.raises(NotImplementedError, match="masked"):
        rj.contiguous(optax.add_decayed_weights(0.1, mask=lambda p: p))

    with pytest.raises(NotImplementedError, match="assume_elementwise"):
        rj.contiguous(optax.rmsprop(0.01))
    otx = rj.contiguous(optax.rmsprop(0.01), assume_elementwise=True)
    with pytest.raises(ValueError, match="None gradients need every transformation"):
        otx.update(dict(grads, scale=None), otx.init(params), params)

    with pytest.raises(TypeError, match="not made by"):
        tx.update(grads, rj.rmsprop(0.01).init(params), params)

    try:
        int8 = rj.rmsprop(0.01, accumulator_dtype="int8")
    except NotImplementedError:  # blockwise 8-bit state not built yet
        return
    with pytest.raises(NotImplementedError, match="blockwise-quantized"):
        rj.contiguous(int8).init({"w": jnp.ones((3000, 4)), "b": jnp.ones(4)})


def test_assume_elementwise():
    def scale_by_two():  # elementwise, but unknown to rj.contiguous
        return optax.GradientTransformation(
            lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(lambda g: 2 * g, u), s)
        )

    params = make_params()
    with pytest.raises(NotImplementedError):
        rj.contiguous(optax.chain(scale_by_two(), rj.rmsprop(0.01)))
    tx = optax.chain(scale_by_two(), rj.rmsprop(0.01))
    ref, _ = run(tx, params, make_grads(params, steps=3))
    got, _ = run(rj.contiguous(tx, assume_elementwise=True), params, make_grads(params, steps=3))
    for (u_ref, _), (u_got, _) in zip(ref, got):
        assert_trees_close(u_got, u_ref)


def test_module_and_function_exports():
    import types

    assert isinstance(contiguous_module, types.ModuleType) and rj.flat is contiguous_module
    assert callable(rj.contiguous) and rj.contiguous is contiguous_module.contiguous
    assert rj.flat.flatten is contiguous_module.flatten
    assert not hasattr(rj.contiguous, "flatten")  # nothing glued onto the function
    assert isinstance(rj.contiguous(rj.rmsprop()).init({"a": jnp.ones(1)}), ContiguousState)


def test_inside_param_groups_next_to_a_sparse_table():
    # The dense layers flat, the embedding table per leaf with row-sparse gradients.
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "embed": jnp.ones((6, 2))}
    labels = {"dense": {"kernel": "dense", "bias": "dense"}, "embed": "table"}

    def make(wrap):
        return rj.param_groups(
            {"dense": wrap(rj.rmsprop(0.1, momentum=0.9)), "table": rj.rmsprop(0.01)}, labels
        )

    ref_tx, tx = make(lambda t: t), make(rj.contiguous)
    ref_state, state = ref_tx.init(params), tx.init(params)
    for t in range(3):
        grads = {
            "dense": {"kernel": jnp.full((3, 2), 0.5 + t), "bias": jnp.full(2, -1.0)},
            "embed": rj.IndexedSlices(jnp.array([1, 4, 1]), jnp.ones((3, 2)) * (t + 1), (6, 2)),
        }
        ref_u, ref_state = ref_tx.update(grads, ref_state, params)
        u, state = tx.update(grads, state, params)
        params_ref = rj.apply_updates(params, ref_u)
        assert_trees_close(rj.apply_updates(params, u), params_ref)
        params = params_ref


def test_user_declared_elementwise_transform_with_none_gradients_and_pickling():
    import pickle

    def double():
        def update(u, s, p=None):
            return jax.tree.map(lambda g: 2 * g, u), s

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    params = make_params()
    grads = make_grads(params, steps=2, none=("bias",))
    tx = rj.flat.chain(rj.flat.elementwise(double()), rj.rmsprop(0.01, momentum=0.5))
    assert_same_run(tx, params, grads)
    state = rj.contiguous(rj.rmsprop(0.01)).init(params)
    loaded = pickle.loads(pickle.dumps(state))
    assert loaded.layout is state.layout
    assert_trees_close(loaded.inner.velocity.unflatten(), state.inner.velocity.unflatten())


@pytest.mark.parametrize("preset", ["keras", "torch", "tf1"])
def test_rj_transforms_run_their_declared_flat_forms_not_their_closures(monkeypatch, preset):
    """Every rmsprop_jax factory declares its flat form next to it: rj.contiguous reads no
    closure, so a change to a factory's code cannot silently change what it builds."""
    import inspect

    def no_closures(fn):
        raise AssertionError(f"rj.contiguous inspected the closure of {fn.__qualname__}")

    tx = {
        "keras": lambda: rj.rmsprop(**KERAS_FULL),
        "torch": lambda: rj.presets.torch(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
        "tf1": lambda: rj.presets.tf1(learning_rate=0.01, momentum=0.5),
    }[preset]()
    monkeypatch.setattr(inspect, "getclosurevars", no_closures)
    params = make_params()
    assert_same_run(tx, params, make_grads(params, steps=2))


SMALL_P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
SMALL_G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}


def test_contiguous_clipnorm_with_huge_gradients_equals_the_tree_path():
    g = {"a": jnp.full((4,), 1e30), "b": jnp.full((3,), 0.3)}
    params = jax.tree.map(jnp.zeros_like, g)
    tree, flat = rj.rmsprop(0.1, clipnorm=1.0), rj.contiguous(rj.rmsprop(0.1, clipnorm=1.0))
    want, _ = tree.update(g, tree.init(params), params)
    got, _ = flat.update(g, flat.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_contiguous_transform_pickles_with_cloudpickle():
    tx = rj.contiguous(rj.rmsprop(0.1, momentum=0.9, use_ema=True, weight_decay=0.1))
    clone = pickle.loads(cloudpickle.dumps(tx))
    jax.tree.map(
        np.testing.assert_array_equal,
        clone.update(SMALL_G, clone.init(SMALL_P), SMALL_P),
        tx.update(SMALL_G, tx.init(SMALL_P), SMALL_P),
    )


# --------------------------------------------------------------------------- many small leaves
# On XLA:CPU with one device, small leaves are concatenated and split in runs
# (rmsprop_jax/_flat_buffers.py), so that the compiled step has one kernel per
# run shape instead of one per leaf. These tests pin the values (bit for bit)
# and the program's shape; the compile time itself is `python -m rmsprop_jax
# bench --cases 10x64,1000x64`.

RUN_SIZES = [64] * 37 + [5000, 0, 3, 64, 2048, 2047, 1] + [64] * 20


@pytest.fixture
def one_device(monkeypatch):
    """The runs are for one device (also when the suite forces several host devices)."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)


def _bits(x) -> bytes:
    return np.asarray(x).tobytes()


def test_runs_group_up_to_16_small_leaves_and_leave_large_ones_alone():
    from rmsprop_jax._flat_buffers import _runs

    assert _runs([64] * 20 + [5000] + [64] * 3 + [2047, 2048]) == [
        (0, 16), (16, 20), (20, 21), (21, 25), (25, 26)
    ]  # fmt: skip
    assert _runs([0] * 17) == [(0, 16), (16, 17)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "complex64"])
def test_runs_concatenate_and_split_bit_for_bit(one_device, dtype):
    from rmsprop_jax._flat_buffers import _concatenate, _split

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(n) * 100 for n in RUN_SIZES]
    parts[0][:3] = [-0.0, np.nan, -np.inf]  # signed zeros and NaN survive a copy, not arithmetic
    parts = [jnp.asarray(p, dtype) for p in parts]
    concatenate = jax.jit(_concatenate)
    assert "optimization_barrier" in concatenate.lower(parts).as_text()  # the runs' path
    joined = concatenate(parts)
    assert _bits(joined) == _bits(np.concatenate([np.asarray(p) for p in parts]))
    split = jax.jit(lambda x: _split(x, RUN_SIZES))
    assert "dynamic_slice" in split.lower(joined).as_text()
    pieces = split(joined)
    assert [_bits(p) for p in pieces] == [_bits(p) for p in parts]


def test_a_short_run_is_cut_from_a_full_runs_length(one_device):
    """40 leaves of 64: runs of 16, 16 and 8; the last run's slice reaches back over 8 leaves of
    the run before, so every run is one slice of 16 leaves and the last run's pieces reuse the
    kernels of the other runs' last 8. After a large leaf a short run keeps its own length."""
    from rmsprop_jax._flat_buffers import _split

    def slice_sizes(sizes):
        text = jax.jit(lambda x: _split(x, sizes)).lower(jnp.zeros(sum(sizes))).as_text()
        return [
            line.split("sizes = [", 1)[1].split("]", 1)[0]
            for line in text.splitlines()
            if "stablehlo.dynamic_slice" in line
        ]

    assert slice_sizes([64] * 40) == ["1024"] * 3
    assert slice_sizes([64] * 20 + [5000] + [64] * 3) == ["1024", "1024", "192"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_contiguous_step_through_runs_is_the_plain_ops_step(one_device, monkeypatch, momentum):
    from rmsprop_jax import _flat_buffers

    rng = np.random.default_rng(3)
    sizes = [64] * 30 + [3, 5000] + [17] * 20 + [(4, 3)] * 10
    params = {f"l{i:02d}": jnp.asarray(rng.standard_normal(n)) for i, n in enumerate(sizes)}
    grads = {k: jnp.asarray(rng.standard_normal(p.shape)) for k, p in params.items()}
    grads["l05"] = None
    options = dict(momentum=momentum, weight_decay=0.1, global_clipnorm=1.0)
    tx = rj.contiguous(rj.rmsprop(1e-2, **options))

    def two_steps():
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        first, state = step(grads, state, params)
        return first, step(grads, state, params)

    through_runs = two_steps()
    assert (
        "dynamic_slice"
        in jax.jit(lambda g, s, p: tx.update(g, s, p))
        .lower(grads, tx.init(params), params)
        .as_text()
    )
    monkeypatch.setattr(
        _flat_buffers, "_on_cpu", lambda fallback, _, *operands: fallback(*operands)
    )
    plain = two_steps()
    # The runs are copies (bit for bit above), but XLA may fuse the step's arithmetic
    # into other loops and round differently in the last bits (momentum=0: most leaves).
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)
    jax.tree.map(check, through_runs, plain)
    per_leaf = rj.rmsprop(1e-2, **options)
    want, _ = per_leaf.update(grads, per_leaf.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6), through_runs[0], want)


def _step_hlo(n_leaves: int) -> str:
    params = {f"l{i:03d}": jnp.full((64,), 0.5 + i) for i in range(n_leaves)}
    tx = rj.contiguous(rj.rmsprop(1e-3, weight_decay=0.1))
    step = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
    return step.lower(params, tx.init(params), params).compile().as_text()


def _static_slices_and_concatenate_width(hlo: str) -> tuple[set, int]:
    import re

    slices = set(re.findall(r"slice=\{\[(\d+):(\d+)\]\}", hlo))
    widths = [args.count("%") for args in re.findall(r" concatenate\(([^)]*)\)", hlo)]
    return slices, max(widths)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the runs are for XLA:CPU")
def test_many_small_leaves_are_cut_and_joined_in_runs(one_device, monkeypatch):
    from rmsprop_jax._flat_buffers import _RUN

    slices, width = _static_slices_and_concatenate_width(_step_hlo(80))
    # Pieces are cut inside a run (the run's offset is a runtime value), so every
    # static slice lies in the first run's span, and no concatenate joins more than a run.
    assert slices and max(int(stop) for _, stop in slices) <= _RUN * 64
    assert len(slices - {("0", "1")}) <= _RUN  # [0:1]: the element the cond's predicate reads
    assert width <= _RUN
    # Each run's concatenate is fused into a loop kernel (XLA:CPU compiles a concatenate
    # once per instruction, a fused kernel once per distinct kernel): the step's only
    # concatenates join the runs, one for the gradients and one for the parameters.
    hlo = _step_hlo(80)
    entry = hlo[hlo.index("ENTRY") :]
    assert entry.count(" concatenate(") == 2
    # With several devices, plain slices and one concatenate (the partitioner must see offsets).
    monkeypatch.setattr(jax, "device_count", lambda *a: 4)
    slices, width = _static_slices_and_concatenate_width(_step_hlo(80))
    assert max(int(stop) for _, stop in slices) == 80 * 64
    assert width == 80


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_runs_are_only_for_cpu(one_device, platform):
    params = {f"l{i:02d}": jnp.ones(64) for i in range(40)}
    tx = rj.contiguous(rj.rmsprop(1e-3))
    step = jax.jit(lambda g, s: tx.update(g, s)[0])

    def lowered(platforms):
        return jax.export.export(step, platforms=platforms)(params, tx.init(params)).mlir_module()

    for op in ("stablehlo.dynamic_slice", "optimization_barrier"):
        assert op in lowered(["cpu"])
        assert op not in lowered([platform])
