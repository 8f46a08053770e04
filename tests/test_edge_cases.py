"""Nothing silently wrong: each edge case gives the right result or an error that says what to do.

The cases a demanding user met (issue 13): restored state vs config, int8
outliers, optax.inject_hyperparams, shape-only init, weak types, overflowing
norms, pickling, the Keras-shaped object's setters, unclear errors.
References: the float64 NumPy model (tests/reference.py), optax, numpy.
"""

import copy
import pickle

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jit import CountingJit

import rmsprop_jax as rj
from rmsprop_jax.integrations import porting

P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}

# -- a state built with other options is refused at trace time, naming the option -------------

MISMATCHES = [
    ("momentum", dict(momentum=0.9), {}),
    ("momentum", {}, dict(momentum=0.9)),
    ("centered", dict(centered=True), {}),
    ("learning_rate", dict(learning_rate=optax.constant_schedule(0.1)), {}),
    ("bias_correction", dict(bias_correction=True), {}),
    ("accumulator_dtype", dict(accumulator_dtype="int8"), {}),
    ("accumulator_dtype", {}, dict(accumulator_dtype="int8")),
    ("accumulator_dtype", dict(accumulator_dtype=jnp.bfloat16), {}),
    ("use_ema", dict(use_ema=True), {}),
    ("gradient_accumulation_steps", dict(gradient_accumulation_steps=2), {}),
]


@pytest.mark.parametrize("option, ours, theirs", MISMATCHES)
@pytest.mark.parametrize("jitted", [False, True])
def test_state_from_other_options_is_refused_naming_the_option(option, ours, theirs, jitted):
    tx, other = rj.rmsprop(**ours), rj.rmsprop(**theirs)
    update = jax.jit(tx.update) if jitted else tx.update
    with pytest.raises(ValueError, match=rf"not built by a transform with these options.*{option}"):
        update(G, other.init(P), P)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: rj.rmsprop_update(**kw),
        lambda **kw: rj.presets.torch(**kw),
        lambda **kw: rj.presets.tf1(0.1, **kw),
    ],
)
def test_every_entry_point_checks_the_state(make):
    with pytest.raises(ValueError, match="decided by: momentum"):
        make(momentum=0.9).update(G, make().init(P), P)


def test_same_options_still_update_and_cost_nothing_at_run_time():
    tx = rj.rmsprop(0.1, momentum=0.9, use_ema=True)
    state = tx.init(P)
    step = CountingJit(tx.update)
    for _ in range(3):
        _, state = step(G, state, P)
    assert step.traces == 1
    # Trace-time only: the compiled step is the unchecked transform's, op for op.
    _, arguments = getattr(tx.update, rj._flat_rules.RULE_ATTRIBUTE)
    unchecked = optax.with_extra_args_support(arguments["inner"])

    def ops(update):
        text = jax.jit(update).lower(G, state, P).compile().as_text()
        return sorted(
            line.split("=")[1].split("(")[0].strip()
            for line in text.splitlines()
            if " = " in line and "ENTRY" not in line
        )

    assert ops(tx.update) == ops(unchecked.update)


def test_orbax_checkpoint_restored_without_target_is_refused(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = rj.rmsprop(0.1, momentum=0.9)
    state = tx.init(P)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(tmp_path / "state")  # no target: dicts and lists
        with pytest.raises(ValueError, match="not built by a transform with these options"):
            tx.update(G, raw, P)
        # Restored into the target it continues as the saved state does.
        restored = checkpointer.restore(tmp_path / "state", tx.init(P))
    jax.tree.map(np.testing.assert_array_equal, tx.update(G, restored, P), tx.update(G, state, P))
    with pytest.raises(ValueError, match="decided by: momentum"):
        rj.rmsprop(0.1).update(G, restored, P)  # a checkpoint of another config


# -- int8 state: an outlier stays in its element --------------------------------------------


def _two_steps(tx, first):
    params, state = {"w": jnp.zeros((64, 64))}, None
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in (first, {"w": jnp.full((64, 64), 0.1)}):
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params["w"], state


@pytest.mark.parametrize("outlier", [1e20, float("inf"), float("nan")])
def test_int8_outlier_never_reaches_the_other_elements_of_its_block(outlier):
    base = jnp.full((64, 64), 0.1)
    int8 = rj.rmsprop(0.01, accumulator_dtype="int8")
    with_outlier, _ = _two_steps(int8, {"w": base.at[0, 3].set(outlier)})
    without, _ = _two_steps(int8, {"w": base.at[0, 3].set(0.0)})
    others = np.ones((64, 64), bool)
    others[0, 3] = False
    np.testing.assert_array_equal(with_outlier[others], without[others])
    float32, _ = _two_steps(rj.rmsprop(0.01), {"w": base.at[0, 3].set(outlier)})
    # Where float32 state is finite, int8 state is finite too (the element itself included).
    assert bool(jnp.all(jnp.isfinite(with_outlier) | ~jnp.isfinite(float32)))
    if outlier == 1e20:  # g**2 overflows: the step is 0 as with float32, then finite steps
        assert float32[0, 3] == 0 and bool(jnp.isfinite(with_outlier[0, 3]))


def test_int8_codec_saturates_non_finite_values_at_the_block_maximum():
    q = rj.quantization
    v = jnp.linspace(0.0, 2.0, 512).at[7].set(jnp.inf).at[300].set(jnp.nan)
    stored = q.dequantize(q.quantize(v), v.shape)
    clean = q.dequantize(q.quantize(v.at[7].set(0.0).at[300].set(0.0)), v.shape)
    keep = np.ones(512, bool)
    keep[[7, 300]] = False
    np.testing.assert_array_equal(stored[keep], clean[keep])
    block_max = [float(jnp.max(jnp.where(keep, v, 0)[i : i + 256])) for i in (0, 256)]
    np.testing.assert_allclose([stored[7], stored[300]], block_max, rtol=0)
    lonely = q.dequantize(q.quantize(jnp.zeros(256).at[0].set(jnp.inf)), (256,))
    assert float(lonely[0]) == float(jnp.finfo(jnp.float32).max) and float(lonely[1:].max()) == 0


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


@pytest.mark.parametrize(
    "factory, kwargs, reference",
    [
        (rj.presets.optax, dict(learning_rate=0.1, momentum=0.9), optax.rmsprop),
        (rj.presets.torch, dict(lr=0.1, momentum=0.9), None),
        (rj.presets.oneflow, dict(lr=0.1), None),
    ],
)
def test_inject_hyperparams_presets_under_jit(factory, kwargs, reference):
    tx = optax.inject_hyperparams(factory)(**kwargs)
    u, _ = jax.jit(tx.update)(G, tx.init(P), P)
    plain = factory(**kwargs)
    want, _ = plain.update(G, plain.init(P), P)
    # Injected hyperparameters are float32 arrays (1 - alpha is then a float32 difference):
    # a few ulps from the Python-float transform.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, want)
    if reference is not None:
        theirs = reference(**kwargs)
        ref, _ = theirs.update(G, theirs.init(P), P)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6), u, ref)


def test_inject_hyperparams_traced_accumulation_steps_names_static_args():
    with pytest.raises(ValueError, match="static_args"):
        tx = optax.inject_hyperparams(rj.rmsprop)(gradient_accumulation_steps=2)
        jax.jit(tx.update)(G, tx.init(P), P)


# -- shape-only init, weak types, None and empty trees ---------------------------------------


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


def test_gradient_for_a_none_param_names_the_leaf():
    tx = rj.rmsprop()
    with pytest.raises(
        ValueError, match=r"grads leaf 'w' has a gradient, but its parameter was None"
    ):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": None}), {"w": None})


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


def test_contiguous_clipnorm_with_huge_gradients_equals_the_tree_path():
    g = {"a": jnp.full((4,), 1e30), "b": jnp.full((3,), 0.3)}
    params = jax.tree.map(jnp.zeros_like, g)
    tree, flat = rj.rmsprop(0.1, clipnorm=1.0), rj.contiguous(rj.rmsprop(0.1, clipnorm=1.0))
    want, _ = tree.update(g, tree.init(params), params)
    got, _ = flat.update(g, flat.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


# -- pickling, the Keras-shaped object, porting ------------------------------------------------


def test_contiguous_transform_pickles_with_cloudpickle():
    tx = rj.contiguous(rj.rmsprop(0.1, momentum=0.9, use_ema=True, weight_decay=0.1))
    clone = pickle.loads(cloudpickle.dumps(tx))
    jax.tree.map(
        np.testing.assert_array_equal,
        clone.update(G, clone.init(P), P),
        tx.update(G, tx.init(P), P),
    )


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


def test_import_torch_state_with_numeric_keys_keeps_torch_order():
    torch = pytest.importorskip("torch")
    shapes = [(2,)] * 12  # same-shaped: a permutation would go unnoticed
    torch_params = [torch.nn.Parameter(torch.full(s, float(i))) for i, s in enumerate(shapes)]
    opt = torch.optim.RMSprop(torch_params, lr=0.01, momentum=0.5)
    for p in torch_params:
        p.grad = p.detach() + 1.0
    opt.step()
    params = {str(i): jnp.asarray(p.detach().numpy()) for i, p in enumerate(torch_params)}
    tx = rj.presets.torch(lr=0.01, momentum=0.5)
    for state_dict in (
        opt.state_dict(),
        {"state": {str(k): v for k, v in opt.state_dict()["state"].items()}},
    ):
        velocity = porting.import_torch_state(tx.init(params), state_dict, params).velocity
        for i in range(12):
            want = opt.state[torch_params[i]]["square_avg"].numpy()
            np.testing.assert_allclose(velocity[str(i)], want, rtol=1e-7)


def test_int8_codes_survive_values_near_the_float32_maximum():
    q = rj.quantization
    v = jnp.full(256, 1e38).at[1].set(5e37)  # XLA:CPU's reciprocal of 1e38 would flush to 0
    np.testing.assert_allclose(q.dequantize(q.quantize(v), (256,)), v, rtol=0.01)
