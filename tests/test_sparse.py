"""Row-sparse gradients: TF 2.0 numbers, lazy/dense equivalence, interactions, cost, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
