"""Row-sparse gradients: TF 2.0 numbers, lazy/dense equivalence, interactions, cost, errors.

And at every seam with optax (the README's table): never a moved, dropped or
miscounted row. Each optax seam either gives the dense computation on the
touched rows (untouched rows get no update: lazy), or fails at trace time. The
reference there is optax itself run on the dense gradient
(``IndexedSlices.to_dense()``, duplicates summed), not our own numbers. The
adapters ``rj.on_touched_rows`` and ``rj.densify``: tests/transforms/test_sparse_adapters.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sparse_helpers import (
    PARAMS,
    D,
    V,
    assert_touched_rows_equal,
    dense,
    run,
    sparse_grads,
)

import rmsprop_jax as rj

W0 = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
DENSE_G = jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
SPARSE_G = rj.IndexedSlices(
    jnp.array([0, 2, 0]), jnp.array([[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]]), (3, 2)
)

# spec section 2: TF 2.0, lr=0.1, one dense step then the IndexedSlices above.
TF2_REFERENCE = {
    0.0: (
        [[0.99146533, 1.3760806], [2.6837726, 3.6837726], [4.5147419, 5.8655906]],
        [[0.016900005, 0.067600019], [0.0081000021, 0.014400003], [0.031500008, 0.048400015]],
    ),
    0.9: (
        [[0.70688868, 1.0914829], [2.683774, 3.6837733], [4.2301383, 5.580986]],
        [[0.016900005, 0.067600019], [0.0090000024, 0.016000004], [0.031500008, 0.048400015]],
    ),
}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tf2_sparse_reference_numbers(momentum):
    tx = rj.presets.tf2(learning_rate=0.1, momentum=momentum)
    update = jax.jit(tx.update)
    state = tx.init(W0)
    u, state = update(DENSE_G, state, W0)
    w = rj.apply_updates(W0, u)
    u, state = update(SPARSE_G, state, w)
    w = rj.apply_updates(w, u)
    expected_w, expected_rms = TF2_REFERENCE[momentum]
    np.testing.assert_allclose(w, expected_w, rtol=4e-7)
    np.testing.assert_allclose(state.velocity, expected_rms, rtol=4e-7)
    # Row 1 was not touched: with momentum 0 TF decays its rms (0.009 -> 0.0081), else it stays.
    assert float(state.velocity[1, 0]) == pytest.approx(
        0.0081 if momentum == 0 else 0.009, rel=1e-6
    )


CONFIGS = [
    {},
    dict(centered=True),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.5, lr_in_momentum=False, eps_in_sqrt=False, maximize=True),
    dict(bias_correction=True, initial_accumulator_value=0.1),
    dict(weight_decay=0.05, use_ema=True, ema_overwrite_frequency=2),
    dict(clipnorm=0.5),
    dict(clipvalue=0.05),
    dict(global_clipnorm=0.3, loss_scale_factor=8.0),
]


def _run(tx, params, grads):
    update = jax.jit(tx.update)
    state = tx.init(params)
    trajectory = []
    for g in grads:
        u, state = update(g, state, params)
        params = rj.apply_updates(params, u)
        trajectory.append(params)
    return trajectory, state


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(c) or "plain")
def test_lazy_equals_dense_when_every_row_is_touched_once(cfg):
    rng = np.random.default_rng(0)
    params = {"table": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "w": jnp.ones(2)}
    dense, sparse = [], []
    for _ in range(4):
        g = rng.normal(size=(6, 3)).astype(np.float32) * 0.1
        order = rng.permutation(6)
        gw = jnp.asarray(rng.normal(size=2), jnp.float32)
        dense.append({"table": jnp.asarray(g), "w": gw})
        sparse.append(
            {"table": rj.IndexedSlices(jnp.asarray(order), jnp.asarray(g[order]), (6, 3)), "w": gw}
        )
    tx = rj.rmsprop(learning_rate=0.01, **cfg)
    for d, s in zip(_run(tx, params, dense)[0], _run(tx, params, sparse)[0]):
        np.testing.assert_allclose(s["table"], d["table"], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(s["w"], d["w"], rtol=2e-6)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=lambda c: "-".join(c) or "plain")
def test_lazy_touches_only_the_rows_it_gets(cfg):
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    tx = rj.rmsprop(learning_rate=0.01, **cfg)
    state = tx.init(table)
    update = jax.jit(tx.update)
    u, state = update(
        jnp.asarray(rng.normal(size=(8, 2)), jnp.float32), state, table
    )  # dense warm-up
    table = rj.apply_updates(table, u)
    before_state, before = state, table
    g = rj.IndexedSlices(
        jnp.array([1, 5, 1]), jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), (8, 2)
    )
    u, state = update(g, state, table)
    table = rj.apply_updates(table, u)
    untouched = np.array([0, 2, 3, 4, 6, 7])
    np.testing.assert_array_equal(np.asarray(table)[untouched], np.asarray(before)[untouched])
    changed = 0
    for old, new in zip(jax.tree.leaves(before_state), jax.tree.leaves(state)):
        if np.ndim(old) == 2:
            np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(old)[untouched])
            changed += not np.array_equal(np.asarray(new)[[1, 5]], np.asarray(old)[[1, 5]])
    assert changed >= 1  # the touched rows of the slots did move


def test_duplicates_are_summed_and_padding_is_ignored():
    tx = rj.rmsprop(learning_rate=0.1, momentum=0.9, centered=True)
    table = jnp.ones((5, 2))
    sparse = rj.IndexedSlices(
        jnp.array([3, 1, 3, 5, 5]),  # 5 == num_rows: padding, ignored
        jnp.array([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5], [9.0, 9.0], [7.0, 7.0]]),
        (5, 2),
    )
    dense = jnp.zeros((5, 2)).at[3].set([1.5, 2.5]).at[1].set([3.0, 4.0])
    ours, _ = _run(tx, table, [sparse, sparse])
    ref, _ = _run(tx, table, [dense, dense])
    touched = [1, 3]
    np.testing.assert_allclose(
        np.asarray(ours[-1])[touched], np.asarray(ref[-1])[touched], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(ours[-1])[[0, 2, 4]], 1.0)
    padded = rj.sparse.pad([3, 1], [[1.0, 2.0], [3.0, 4.0]], (5, 2), k=4)
    assert padded.indices.tolist() == [3, 1, 5, 5]


def test_mixed_tree_global_norm_uses_deduplicated_values():
    """Clipping norms are those of the dense gradient: duplicates summed before squaring."""
    sparse = rj.IndexedSlices(
        jnp.array([0, 0]), jnp.array([[3.0], [1.0]]), (2, 1)
    )  # dense row 0 = 4
    grads = {"table": sparse, "w": jnp.array([3.0])}
    np.testing.assert_allclose(rj.transforms.global_norm(grads), 5.0)
    clipped, _ = rj.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(clipped["table"].to_dense(), [[0.8], [0.0]], rtol=1e-6)
    np.testing.assert_allclose(clipped["w"], [0.6], rtol=1e-6)
    by_value, _ = rj.clip_by_value(3.5).update(sparse, optax.EmptyState())
    np.testing.assert_allclose(by_value.to_dense(), [[3.5], [0.0]])


def test_accumulation_with_sparse_gradients_equals_dense():
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    tx = rj.rmsprop(learning_rate=0.01, gradient_accumulation_steps=2, momentum=0.9)
    sparse = [
        rj.IndexedSlices(
            jnp.array([0, 3]), jnp.asarray(rng.normal(size=(2, 2)), jnp.float32), (5, 2)
        )
        for _ in range(4)
    ]
    dense = [g.to_dense() for g in sparse]
    for a, b in zip(_run(tx, table, sparse)[0], _run(tx, table, dense)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_dynamic_loss_scale_with_sparse_gradients():
    tx = rj.dynamic_loss_scale(rj.rmsprop(0.1), initial_scale=4.0)
    table = jnp.ones((3, 2))
    state = tx.init(table)
    g = rj.IndexedSlices(jnp.array([1]), jnp.array([[4.0, 8.0]]), (3, 2))
    u, state = tx.update(g, state, table)
    assert isinstance(u, rj.IndexedSlices) and u.indices.dtype == jnp.int32
    ref, _ = rj.rmsprop(0.1).update(
        jnp.zeros((3, 2)).at[1].set([1.0, 2.0]), rj.rmsprop(0.1).init(table)
    )
    np.testing.assert_allclose(u.to_dense(), ref, rtol=1e-6)
    bad = rj.IndexedSlices(jnp.array([1]), jnp.array([[jnp.inf, 1.0]]), (3, 2))
    u, state = tx.update(bad, state, table)
    np.testing.assert_array_equal(u.to_dense(), 0.0)
    assert float(rj.loss_scale(state)) == 2.0


def test_sparse_step_has_no_table_sized_temporaries():
    rows, dim, k = 50_000, 16, 256
    table = jnp.zeros((rows, dim))
    tx = rj.rmsprop(learning_rate=0.01, momentum=0.9, centered=True)
    state = tx.init(table)
    g = rj.IndexedSlices(jnp.arange(k) * 7, jnp.ones((k, dim)), (rows, dim))

    def step(table, state, g):
        u, state = tx.update(g, state, table)
        return rj.apply_updates(table, u), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(table, state, g).compile()
    memory = compiled.memory_analysis()
    table_bytes = rows * dim * 4
    assert memory.temp_size_in_bytes < table_bytes / 4, memory  # only k-row temporaries
    dense = jax.jit(step, donate_argnums=(0, 1)).lower(table, state, jnp.ones_like(table)).compile()
    assert "scatter" in compiled.as_text() and "scatter" not in dense.as_text()


def test_embedding_mlp_trained_with_sparse_gradients():
    rng = np.random.default_rng(3)
    vocab, dim = 1000, 8
    ids = rng.integers(0, vocab, size=(64, 4))
    labels = (ids.sum(axis=1) % 2).astype(np.float32)
    params = {
        "embed": jnp.asarray(rng.normal(size=(vocab, dim)) * 0.1, jnp.float32),
        "w": jnp.asarray(rng.normal(size=(dim, 1)) * 0.1, jnp.float32),
    }

    def loss(p, rows, batch_ids, y):
        logits = (rows.reshape(batch_ids.shape + (dim,)).mean(axis=1) @ p["w"])[:, 0]
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    grad_fn = rj.value_and_sparse_grad(loss, "embed")
    tx = rj.rmsprop(learning_rate=0.05, momentum=0.9)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch_ids, y):
        value, grads = grad_fn(params, batch_ids, y)
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state, value

    losses = []
    for _ in range(60):
        params, state, value = step(params, state, jnp.asarray(ids), jnp.asarray(labels))
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
    untouched = np.setdiff1d(np.arange(vocab), ids.reshape(-1))
    assert np.all(np.asarray(state.velocity["embed"])[untouched] == 0)


def test_bad_sparse_input():
    with pytest.raises(ValueError, match="negative index -1"):
        rj.IndexedSlices(jnp.array([0, -1]), jnp.ones((2, 3)), (4, 3))
    with pytest.raises(
        ValueError, match=r"values must have shape \(k, \*dense_shape\[1:\]\) = \(2, 3\)"
    ):
        rj.IndexedSlices(jnp.array([0, 1]), jnp.ones((2, 4)), (4, 3))
    with pytest.raises(ValueError, match="1-D integer"):
        rj.IndexedSlices(jnp.array([0.0, 1.0]), jnp.ones((2, 3)), (4, 3))
    tx = rj.rmsprop()
    params = {"table": jnp.ones((4, 3))}
    g = {"table": rj.IndexedSlices(jnp.array([0]), jnp.ones((1, 3)), (5, 3))}
    with pytest.raises(
        ValueError, match=r"'table' is an IndexedSlices of dense_shape \(5, 3\).*\(4, 3\)"
    ):
        tx.update(g, tx.init(params), params)


def test_traced_out_of_range_and_negative_indices_are_dropped():
    table = jnp.ones((3, 1))
    tx = rj.rmsprop(0.1)
    state = tx.init(table)

    @jax.jit
    def step(indices):
        g = rj.IndexedSlices(indices, jnp.ones((3, 1)), (3, 1))
        u, _ = tx.update(g, state, table)
        return rj.apply_updates(table, u)

    out = step(jnp.array([-1, 7, 1]))
    assert out[0, 0] == 1.0 and out[2, 0] == 1.0 and out[1, 0] < 1.0


# -- optax.apply_updates, linen TrainState and nnx.Optimizer (tests/integrations/test_flax.py) ---


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


# -- rj's norms: the dense gradient's (optax's refuse an IndexedSlices) -----------------------


def test_rj_clip_by_global_norm_equals_optax_on_the_dense_gradient():
    g = sparse_grads(3.0)
    ours, _ = rj.clip_by_global_norm(1.0).update(g, None)
    theirs, _ = optax.clip_by_global_norm(1.0).update(dense(g), optax.EmptyState())
    assert_touched_rows_equal(ours, theirs)


def test_global_norm_optax_refuses_rj_counts_values_once():
    g = sparse_grads()
    with pytest.raises(NotImplementedError):
        optax.tree.norm(g)
    np.testing.assert_allclose(rj.global_norm(g), optax.tree.norm(dense(g)), rtol=1e-6)


# -- wrappers around rj.rmsprop ---------------------------------------------------------------


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


# -- malformed slices, index dtypes, empty slices ---------------------------------------------

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


# -- rj.RMSprop equals rj.rmsprop on sparse gradients, every feature --------------------------

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


# -- value_and_sparse_grad: a path into nested params -----------------------------------------

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
