"""Shared by the row-sparse gradient tests (tests/test_sparse.py, tests/transforms/test_sparse_adapters.py).

A table ``e`` with row-sparse gradients on rows 1, 5, 9 (row 5 twice: summed) and a
dense leaf ``w``; ``dense`` is the reference's view of a gradient
(``IndexedSlices.to_dense()``, duplicates summed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
