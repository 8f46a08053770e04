"""``rj.on_touched_rows`` / ``rj.densify`` (rmsprop_jax.transforms.sparse_adapters): optax transforms on row-sparse gradients.

optax's elementwise transforms are refused on an ``IndexedSlices`` bare, and give
the dense computation on the touched rows through ``rj.on_touched_rows``
(untouched rows get no update: lazy); a norm or per-parameter state is refused
at trace time. Wrappers that need the whole gradient (``optax.MultiSteps``,
``optax.lookahead``) get it through ``rj.densify()``. The reference is optax itself
run on the dense gradient (``IndexedSlices.to_dense()``, duplicates summed).
"""

import jax
import numpy as np
import optax
import pytest
from _sparse_helpers import PARAMS, assert_touched_rows_equal, dense, run, sparse_grads

import rmsprop_jax as rj

# -- optax's elementwise transforms: refused bare, exact through rj.on_touched_rows -----------

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


def test_clip_by_block_rms_through_densify_equals_dense():
    g = sparse_grads(3.0)
    ours, _ = optax.chain(rj.densify(), optax.clip_by_block_rms(0.1)).update(g, ((), ()))
    theirs, _ = optax.clip_by_block_rms(0.1).update(dense(g), ())
    np.testing.assert_array_equal(ours["e"], theirs["e"])


def test_on_touched_rows_refuses_stateful_transforms_with_a_clear_error():
    tx = rj.on_touched_rows(rj.rmsprop(0.1))
    with pytest.raises(ValueError, match="its state is shaped like the whole table"):
        tx.update(sparse_grads(), tx.init(PARAMS), PARAMS)


def test_on_touched_rows_passes_dense_trees_through():
    g = dense(sparse_grads())
    ours, _ = rj.on_touched_rows(optax.clip(0.2)).update(g, ())
    theirs, _ = optax.clip(0.2).update(g, ())
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


# -- optax wrappers that need the whole gradient: refused, exact through rj.densify -----------


def test_multisteps_is_refused_and_densify_gives_the_dense_result():
    grads = [sparse_grads(1.0), sparse_grads(-2.0)] * 2
    with pytest.raises(ValueError, match="IndexedSlices"):
        run(optax.MultiSteps(rj.rmsprop(0.1), 2), grads)
    multi = optax.MultiSteps(rj.rmsprop(0.1), 2).gradient_transformation()
    ours, _, _ = run(optax.chain(rj.densify(), multi), grads)
    theirs, _, _ = run(optax.MultiSteps(rj.rmsprop(0.1), 2), [dense(g) for g in grads])
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


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
