"""Row-sparse gradients at every seam with optax: never a moved, dropped or miscounted row.

Each optax transform named in the README's table either gives the dense
computation on the touched rows (untouched rows get no update: lazy), or fails
at trace time. The reference is optax itself run on the dense gradient
(``IndexedSlices.to_dense()``, duplicates summed), not our own numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax as rj

V, D = 10, 3
ROWS = [1, 5, 9, 5]  # row 5 twice: summed
TOUCHED = np.array([1, 5, 9])
UNTOUCHED = np.setdiff1d(np.arange(V), TOUCHED)
PARAMS = {
    "e": jnp.arange(V * D, dtype=jnp.float32).reshape(V, D) / 10 - 1,
    "w": jnp.linspace(-1, 1, 4),
}
_VALUES = jax.random.normal(jax.random.PRNGKey(0), (len(ROWS), D))


def sparse_grads(scale=1.0, rows=ROWS):
    values = _VALUES[: len(rows)] * scale
    return {"e": rj.IndexedSlices(jnp.array(rows), values, (V, D)), "w": jnp.full(4, 0.3 * scale)}


def dense(tree):
    return jax.tree.map(
        lambda g: g.to_dense() if isinstance(g, rj.IndexedSlices) else g,
        tree,
        is_leaf=lambda x: isinstance(x, rj.IndexedSlices),
    )


def run(tx, grads_list, params=PARAMS):
    """Steps of ``tx`` under jit; returns (params, state, last updates)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_list:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state, u


def assert_touched_rows_equal(sparse_update, dense_update):
    """Sparse result == dense optax result on the touched rows; zero (no update) elsewhere."""
    got = dense(sparse_update)
    np.testing.assert_allclose(got["e"][TOUCHED], dense_update["e"][TOUCHED], rtol=1e-6)
    np.testing.assert_array_equal(got["e"][UNTOUCHED], 0)
    np.testing.assert_allclose(got["w"], dense_update["w"], rtol=1e-6)


# -- optax.apply_updates, linen TrainState and nnx.Optimizer (tests/integrations/test_flax.py) -----------


def test_optax_apply_updates_scatters_eagerly_and_under_jit():
    u = sparse_grads()
    expected = {"e": PARAMS["e"] + u["e"].to_dense(), "w": PARAMS["w"] + u["w"]}
    for apply in (optax.apply_updates, jax.jit(optax.apply_updates)):
        got = apply(PARAMS, u)
        np.testing.assert_array_equal(got["e"], expected["e"])
        np.testing.assert_array_equal(got["w"], expected["w"])


def test_optax_apply_updates_with_donation_is_in_place():
    rows, dim, k = 50_000, 16, 256
    table = jnp.zeros((rows, dim))
    u = rj.IndexedSlices(jnp.arange(k) * 7, jnp.ones((k, dim)), (rows, dim))
    compiled = jax.jit(optax.apply_updates, donate_argnums=0).lower(table, u).compile()
    memory = compiled.memory_analysis()
    table_bytes = rows * dim * 4
    assert memory.temp_size_in_bytes < table_bytes / 16, memory  # k-row temporaries only
    assert memory.alias_size_in_bytes >= table_bytes, memory  # the output is the donated table
    assert "scatter" in compiled.as_text()


def test_embedding_trained_with_optax_apply_updates_equals_dense_training():
    """Every batch touches every row, so the lazy sparse step equals the dense one."""
    params = {"embed": PARAMS["e"], "head": jnp.ones((D, 1))}
    tx = rj.rmsprop(0.05, momentum=0.9, centered=True)

    def loss(p, rows, ids, y):
        return jnp.mean((jnp.tanh(rows) @ p["head"] - y) ** 2)

    @jax.jit
    def sparse_step(p, s, ids, y):
        value, g = rj.value_and_sparse_grad(loss, "embed")(p, ids, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    @jax.jit
    def dense_step(p, s, ids, y):
        g = jax.grad(lambda p: loss(p, p["embed"][ids], ids, y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(1)
    sparse_p, sparse_s, dense_p, dense_s, losses = (
        params,
        tx.init(params),
        params,
        tx.init(params),
        [],
    )
    for _ in range(6):
        ids = jnp.asarray(rng.permutation(np.r_[np.arange(V), rng.integers(0, V, 4)]))
        y = jnp.sin(ids.astype(jnp.float32))[:, None]
        sparse_p, sparse_s, value = sparse_step(sparse_p, sparse_s, ids, y)
        dense_p, dense_s = dense_step(dense_p, dense_s, ids, y)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), sparse_p, dense_p
    )


def test_dense_plus_sparse_checks_the_shape():
    with pytest.raises(ValueError, match=r"shape \(9, 3\).*dense_shape \(10, 3\)"):
        jnp.zeros((9, 3)) + sparse_grads()["e"]


# -- optax's elementwise transforms: refused bare, exact through rj.on_touched_rows -------------

ELEMENTWISE = {
    "scale": lambda: optax.scale(0.5),
    "scale_negative_int": lambda: optax.scale(-1),  # an int factor keeps int indices: refused too
    "scale_by_learning_rate": lambda: optax.scale_by_learning_rate(0.1),
    "scale_by_schedule": lambda: optax.scale_by_schedule(optax.linear_schedule(1.0, 0.1, 4)),
    "clip": lambda: optax.clip(0.3),
    "add_decayed_weights": lambda: optax.add_decayed_weights(0.1),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_foreign_elementwise_transform_is_refused_on_indexed_slices(name):
    tx = optax.chain(ELEMENTWISE[name](), rj.rmsprop(0.1))
    with pytest.raises((TypeError, ValueError), match="IndexedSlices"):
        jax.jit(tx.update)(sparse_grads(), tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_on_touched_rows_equals_dense_on_the_touched_rows(name):
    grads = [sparse_grads(1.0), sparse_grads(-2.0)]  # two steps: schedules advance
    _, _, sparse_u = run(rj.on_touched_rows(ELEMENTWISE[name]()), grads)
    _, _, dense_u = run(ELEMENTWISE[name](), [dense(g) for g in grads])
    assert isinstance(sparse_u["e"], rj.IndexedSlices)
    assert_touched_rows_equal(sparse_u, dense_u)


@pytest.mark.parametrize(
    "name, make",
    [
        ("clip_by_block_rms", lambda: optax.clip_by_block_rms(0.1)),
        ("clip_by_global_norm", lambda: optax.clip_by_global_norm(1.0)),
    ],
)
def test_norm_transforms_are_refused_bare_and_through_on_touched_rows(name, make):
    bare = optax.chain(make(), rj.rmsprop(0.1))
    with pytest.raises((TypeError, NotImplementedError)):
        jax.jit(bare.update)(sparse_grads(), bare.init(PARAMS), PARAMS)
    wrapped = rj.on_touched_rows(make())
    with pytest.raises(
        ValueError, match=r"not elementwise on the rows of grads leaf 'e'.*reduce_sum"
    ):
        jax.jit(wrapped.update)(sparse_grads(), wrapped.init(PARAMS), PARAMS)


def test_rj_clip_by_global_norm_equals_optax_on_the_dense_gradient():
    g = sparse_grads(3.0)
    ours, _ = rj.clip_by_global_norm(1.0).update(g, None)
    theirs, _ = optax.clip_by_global_norm(1.0).update(dense(g), optax.EmptyState())
    assert_touched_rows_equal(ours, theirs)


def test_clip_by_block_rms_through_densify_equals_dense():
    g = sparse_grads(3.0)
    ours, _ = optax.chain(rj.densify(), optax.clip_by_block_rms(0.1)).update(g, ((), ()))
    theirs, _ = optax.clip_by_block_rms(0.1).update(dense(g), ())
    np.testing.assert_array_equal(ours["e"], theirs["e"])


def test_global_norm_optax_refuses_rj_counts_values_once():
    g = sparse_grads()
    with pytest.raises(NotImplementedError):
        optax.tree.norm(g)
    np.testing.assert_allclose(rj.global_norm(g), optax.tree.norm(dense(g)), rtol=1e-6)


def test_on_touched_rows_refuses_stateful_transforms_with_a_clear_error():
    tx = rj.on_touched_rows(rj.rmsprop(0.1))
    with pytest.raises(ValueError, match="its state is shaped like the whole table"):
        tx.update(sparse_grads(), tx.init(PARAMS), PARAMS)


def test_on_touched_rows_passes_dense_trees_through():
    g = dense(sparse_grads())
    ours, _ = rj.on_touched_rows(optax.clip(0.2)).update(g, ())
    theirs, _ = optax.clip(0.2).update(g, ())
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


# -- wrappers around rj.rmsprop ----------------------------------------------------------------


def test_apply_if_finite_equals_rmsprop_and_rejects_non_finite_steps():
    grads = [sparse_grads(1.0), sparse_grads(-2.0)]
    wrapped, wrapped_state, _ = run(optax.apply_if_finite(rj.rmsprop(0.1), 2), grads)
    plain, _plain_state, _ = run(rj.rmsprop(0.1), grads)
    jax.tree.map(np.testing.assert_array_equal, wrapped, plain)
    bad = sparse_grads()
    bad["e"] = bad["e"].replace_values(bad["e"].values.at[0, 0].set(jnp.nan))
    u, after = jax.jit(optax.apply_if_finite(rj.rmsprop(0.1), 2).update)(
        bad, wrapped_state, wrapped
    )
    jax.tree.map(np.testing.assert_array_equal, optax.apply_updates(wrapped, u), wrapped)
    jax.tree.map(np.testing.assert_array_equal, after.inner_state, wrapped_state.inner_state)
    assert int(after.notfinite_count) == 1


def test_multisteps_is_refused_and_densify_gives_the_dense_result():
    grads = [sparse_grads(1.0), sparse_grads(-2.0)] * 2
    with pytest.raises(ValueError, match="IndexedSlices"):
        run(optax.MultiSteps(rj.rmsprop(0.1), 2), grads)
    multi = optax.MultiSteps(rj.rmsprop(0.1), 2).gradient_transformation()
    ours, _, _ = run(optax.chain(rj.densify(), multi), grads)
    theirs, _, _ = run(optax.MultiSteps(rj.rmsprop(0.1), 2), [dense(g) for g in grads])
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_masked():
    g = sparse_grads()
    out, _ = optax.masked(optax.scale(0.5), {"e": False, "w": True}).update(
        g, optax.MaskedState(())
    )
    np.testing.assert_array_equal(out["e"].indices, g["e"].indices)  # passed through untouched
    np.testing.assert_array_equal(out["e"].values, g["e"].values)
    np.testing.assert_array_equal(out["w"], 0.5 * g["w"])
    ours, _, _ = run(optax.masked(rj.rmsprop(0.1), {"e": True, "w": False}), [g])
    theirs, _, _ = run(rj.rmsprop(0.1), [g])
    np.testing.assert_array_equal(ours["e"], theirs["e"])
    with pytest.raises(TypeError, match="IndexedSlices"):
        run(optax.masked(optax.scale(0.5), {"e": True, "w": False}), [g])


@pytest.mark.parametrize("labels", [{"e": "emb", "w": "rest"}, {"^e$": "emb", "^w$": "rest"}])
def test_partition_and_param_groups(labels):
    groups = {"emb": rj.rmsprop(0.1, momentum=0.5), "rest": optax.adam(0.01)}
    grads = [sparse_grads(1.0), sparse_grads(-2.0)]
    ours, _, _ = run(rj.param_groups(groups, labels), grads)
    emb, _, _ = run(rj.rmsprop(0.1, momentum=0.5), grads)
    rest, _, _ = run(optax.adam(0.01), [dense(g) for g in grads])
    np.testing.assert_array_equal(ours["e"], emb["e"])
    np.testing.assert_array_equal(ours["w"], rest["w"])
    multi, _, _ = run(optax.multi_transform(groups, {"e": "emb", "w": "rest"}), grads)
    jax.tree.map(np.testing.assert_array_equal, multi, ours)


def test_inject_hyperparams_equals_rmsprop():
    grads = [sparse_grads(1.0), sparse_grads(-2.0)]
    ours, _, _ = run(optax.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, rho=0.8), grads)
    theirs, _, _ = run(rj.rmsprop(0.1, rho=0.8), grads)
    # Hyperparameters as float32 arrays instead of Python floats: within an ulp.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2.5e-7), ours, theirs)


def test_lookahead_is_refused_and_densify_gives_the_dense_result():
    grads = [sparse_grads(1.0), sparse_grads(-2.0)] * 2
    synced = optax.LookaheadParams.init_synced(PARAMS)
    with pytest.raises(ValueError, match="IndexedSlices"):
        run(optax.lookahead(rj.rmsprop(0.1), 2, 0.5), grads, synced)
    # Rows never touched keep v = 0 and get zero updates, so lazy == dense here.
    ours, _, _ = run(
        optax.lookahead(optax.chain(rj.rmsprop(0.1), rj.densify()), 2, 0.5), grads, synced
    )
    theirs, _, _ = run(optax.lookahead(rj.rmsprop(0.1), 2, 0.5), [dense(g) for g in grads], synced)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


# -- malformed slices, index dtypes, empty slices ----------------------------------------------

MALFORMED = {
    "float indices": (lambda: jnp.array([1.0, 2.0]), lambda: jnp.ones((2, D)), "1-D integer"),
    "rank-2 indices": (lambda: jnp.array([[1, 2]]), lambda: jnp.ones((2, D)), "1-D integer"),
    "one row of values for two indices": (
        lambda: jnp.array([1, 2]),
        lambda: jnp.ones((1, D)),
        r"values must have shape .* \(2, 3\)",
    ),
    "wrong row shape": (lambda: jnp.array([1, 2]), lambda: jnp.ones((2, D + 1)), r"\(2, 3\)"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("jitted", [False, True])
def test_malformed_indexed_slices_is_an_error(name, jitted):
    indices, values, message = MALFORMED[name]

    def build(i, v):
        return rj.IndexedSlices(i, v, (V, D)).values

    with pytest.raises(ValueError, match=message):
        (jax.jit(build) if jitted else build)(indices(), values())


def test_a_slice_rebuilt_malformed_is_an_error_naming_the_leaf():
    g = sparse_grads()
    leaves, treedef = jax.tree.flatten(g)
    broken = jax.tree.unflatten(treedef, [leaves[0], jnp.ones((2, D)), leaves[2]])
    tx = rj.rmsprop(0.1)
    with pytest.raises(ValueError, match=r"grads leaf 'e' is an IndexedSlices.*\(4, 3\)"):
        jax.jit(tx.update)(broken, tx.init(PARAMS), PARAMS)
    int_rows = jax.tree.unflatten(treedef, [jnp.array([1, 5, 9, 5]), leaves[1], leaves[2]])
    with pytest.raises(ValueError, match=r"'e' is an IndexedSlices whose indices are no longer"):
        rj.apply_updates(PARAMS, int_rows)
    with pytest.raises(ValueError, match=r"dense \+ IndexedSlices .* no longer row numbers"):
        optax.apply_updates(PARAMS, int_rows)  # optax gives no path: the operand is named


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64]
)
def test_out_of_range_indices_are_dropped_for_every_integer_dtype(dtype):
    info = np.iinfo(dtype)
    beyond = [int(info.max)] + ([2**32 + 1] if info.max > 2**32 else [])
    indices = np.array([3] + beyond, dtype)
    g = rj.IndexedSlices(indices, jnp.ones((len(indices), D)), (6, D))
    expected = np.zeros((6, D), np.float32)
    expected[3] = 1
    np.testing.assert_array_equal(g.to_dense(), expected)  # 2**32 + 1 is not row 1


def test_int64_indices_under_jit_with_x64_are_dropped_beyond_the_table():
    with jax.enable_x64(True):
        indices = jnp.array([3, 2**32 + 1, 2**40], jnp.int64)

        @jax.jit
        def step(indices):
            return rj.IndexedSlices(indices, jnp.ones((3, D), jnp.float32), (6, D)).to_dense()

        dense_g = step(indices)
    assert float(dense_g.sum()) == D and float(dense_g[3].sum()) == D


SPARSE_FEATURES = [
    {},
    dict(centered=True, momentum=0.9, nesterov=True),
    dict(weight_decay=0.05, use_ema=True, ema_overwrite_frequency=1),
    dict(clipnorm=0.5, loss_scale_factor=8.0),
    dict(clipvalue=0.05),
    dict(global_clipnorm=0.3),
    dict(gradient_accumulation_steps=2, bias_correction=True),
]


@pytest.mark.parametrize("cfg", SPARSE_FEATURES, ids=str)
def test_empty_slice_is_a_no_op(cfg):
    grads = [sparse_grads(1.0), sparse_grads(-2.0)]
    params, state, _ = run(rj.rmsprop(0.1, **cfg), grads)
    empty = {
        "e": rj.IndexedSlices(jnp.zeros((0,), jnp.int32), jnp.zeros((0, D)), (V, D)),
        "w": jnp.zeros(4),
    }
    tx = rj.rmsprop(0.1, **cfg)
    for update in (tx.update, jax.jit(tx.update)):
        u, new_state = update(empty, state, params)
        np.testing.assert_array_equal(optax.apply_updates(params, u)["e"], params["e"])
    slots = [x for x in jax.tree.leaves(state) if np.shape(x) == (V, D)]
    new_slots = [x for x in jax.tree.leaves(new_state) if np.shape(x) == (V, D)]
    assert slots and len(slots) == len(new_slots)
    for a, b in zip(slots, new_slots):
        np.testing.assert_array_equal(a, b)


def test_pad_accepts_an_empty_id_list():
    g = rj.sparse.pad([], np.zeros((0, D), np.float32), (V, D), k=4)
    np.testing.assert_array_equal(g.indices, [V] * 4)
    np.testing.assert_array_equal(g.to_dense(), 0)


# -- rj.RMSprop equals rj.rmsprop on sparse gradients, every feature ---------------------------

RMSPROP_FEATURES = SPARSE_FEATURES + [
    dict(use_ema=True, ema_overwrite_frequency=2),  # rows 5, 9 untouched at an overwrite step
    dict(use_ema=True, ema_overwrite_frequency=2, gradient_accumulation_steps=2),
    dict(momentum=0.5, lr_in_momentum=False, eps_in_sqrt=False, maximize=True),
    dict(initial_accumulator_value=0.1, exclude_from_weight_decay=["e"], weight_decay=0.1),
]


@pytest.mark.parametrize("cfg", RMSPROP_FEATURES, ids=str)
def test_rmsprop_object_equals_function_on_sparse_gradients(cfg):
    grads = [sparse_grads(1.0), sparse_grads(-2.0, rows=[0, 1, 1, 2]), sparse_grads(0.5)] * 2
    function, _, _ = run(rj.rmsprop(0.1, **cfg), grads)
    opt = rj.RMSprop(0.1, **cfg)
    params, state = PARAMS, opt.init(PARAMS)
    step = jax.jit(opt.stateless_apply)
    for g in grads:
        params, state = step(state, g, params)
    # The EMA overwrite writes the average exactly where the function writes w + (avg - w).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-7), params, function
    )


# -- value_and_sparse_grad: a path into nested params -------------------------------------------

NESTED = {"embed": {"embedding": PARAMS["e"]}, "head": {"kernel": jnp.ones((D, 1))}}


def _nested_loss(p, rows, ids):
    return jnp.sum(jnp.tanh(rows @ p["head"]["kernel"]))


def _dense_reference(ids):
    def loss(p):
        return jnp.sum(jnp.tanh(p["embed"]["embedding"][ids] @ p["head"]["kernel"]))

    return jax.value_and_grad(loss)(NESTED)


@pytest.mark.parametrize(
    "table",
    [
        "embed/embedding",
        ("embed", "embedding"),
        (jax.tree_util.DictKey("embed"), jax.tree_util.DictKey("embedding")),
    ],
)
def test_value_and_sparse_grad_takes_a_nested_path(table):
    ids = jnp.array([[1, 5], [9, 5]])
    value, grads = jax.jit(rj.value_and_sparse_grad(_nested_loss, table))(NESTED, ids)
    want_value, want = _dense_reference(ids)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(
        grads["embed"]["embedding"].to_dense(), want["embed"]["embedding"], rtol=1e-6
    )
    np.testing.assert_allclose(
        grads["head"]["kernel"], want["head"]["kernel"], rtol=1e-6, atol=1e-7
    )


def test_value_and_sparse_grad_unknown_path_lists_the_leaves():
    with pytest.raises(
        KeyError, match=r"'embed/weights' matches 0 leaves.*embed/embedding, head/kernel"
    ):
        rj.value_and_sparse_grad(_nested_loss, "embed/weights")(NESTED, jnp.array([1]))


def test_value_and_sparse_grad_drops_ids_beyond_the_table():
    ids = np.array([1, 2**32 + 1], np.int64)  # not row 1 again
    _, grads = rj.value_and_sparse_grad(_nested_loss, "embed/embedding")(NESTED, ids)
    dense_g = np.asarray(grads["embed"]["embedding"].to_dense())
    assert np.count_nonzero(dense_g.any(axis=1)) == 1 and dense_g[1].any()


@pytest.mark.parametrize("rows", [1000, 2**30, 2**32 - 1])  # packed sort keys; binary search
def test_deduplicate_equals_numpy(rows):
    rng = np.random.default_rng(rows % 97)
    ids = rng.integers(0, 50, 64) * (rows // 50) + np.r_[[rows] * 4, np.zeros(60, np.int64)].astype(
        np.int64
    )
    values = rng.standard_normal((64, 2)).astype(np.float32)
    g = jax.jit(lambda g: g.deduplicate())(rj.IndexedSlices(ids, jnp.asarray(values), (rows, 2)))
    kept = ids < rows
    unique, inverse = np.unique(ids[kept], return_inverse=True)
    sums = np.zeros((unique.size, 2), np.float32)
    np.add.at(sums, inverse, values[kept])
    got = np.asarray(g.indices)
    np.testing.assert_array_equal(got[: unique.size], unique)
    assert (got[unique.size :].astype(np.int64) == rows).all()  # padding last
    np.testing.assert_allclose(g.values[: unique.size], sums, rtol=1e-6)
    np.testing.assert_array_equal(g.values[unique.size :], 0)
