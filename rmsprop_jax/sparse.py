"""Row-sparse gradients (TensorFlow's ``IndexedSlices``) with cost proportional to the rows touched.

An :class:`IndexedSlices` leaf in ``grads`` says "these rows of the table got
these gradients; every other row got zero". rmsprop_jax then updates only the
touched rows of the parameter and of every optimizer slot (``lazy`` mode,
:func:`rmsprop_jax.rmsprop`), or reproduces TF 2.0 exactly
(:func:`rmsprop_jax.presets.tf2`: with ``momentum == 0`` the mean-square slot
of ALL rows decays). The update comes back as an ``IndexedSlices`` too;
:func:`rmsprop_jax.apply_updates` scatters it into the table, so a jitted step
with donated params and state never materialises a table-sized temporary.

Conventions:

* ``indices``: int32 ``[k]`` row numbers, duplicates allowed (summed, as TF).
  ``k`` is static under ``jit``; pad variable counts to a fixed ``k`` with the
  index ``dense_shape[0]`` (one past the last row, see :func:`pad`): padded
  entries are ignored.
* Out-of-range indices (``>= dense_shape[0]``) are dropped (the padding
  convention). Negative indices are an error at construction when the indices
  are concrete; traced negative indices are dropped too.
* ``values``: ``[k, *dense_shape[1:]]``, the gradient rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_node_class
class IndexedSlices:
    """Gradient rows of a ``dense_shape`` table: ``dense[indices[i]] += values[i]``.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> g = rj.IndexedSlices(jnp.array([2, 0, 2]), jnp.ones((3, 2)), (4, 2))
      >>> g.to_dense()
      Array([[1., 1.],
             [0., 0.],
             [2., 2.],
             [0., 0.]], dtype=float32)
    """

    def __init__(
        self, indices: Any, values: Any, dense_shape: tuple[int, ...], unique: bool = False
    ):
        dense_shape = tuple(int(d) for d in dense_shape)
        if not dense_shape:
            raise ValueError("IndexedSlices: dense_shape must have at least one dimension (rows)")
        self.dense_shape = dense_shape
        self.unique = unique  # static: indices known sorted and duplicate-free (padding last)
        self.indices = indices
        self.values = values
        if _is_concrete(indices) and _is_concrete(values):
            self._check()

    def _check(self) -> None:
        indices, values = np.asarray(self.indices), np.shape(self.values)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"IndexedSlices: indices must be a 1-D integer array, got {indices.dtype}{indices.shape}"
            )
        if values[:1] != indices.shape or tuple(values[1:]) != self.dense_shape[1:]:
            raise ValueError(
                f"IndexedSlices: values must have shape (k, *dense_shape[1:]) = "
                f"({indices.shape[0]}, {', '.join(map(str, self.dense_shape[1:]))}), got {values}"
            )
        if indices.size and indices.min() < 0:
            raise ValueError(
                f"IndexedSlices: negative index {int(indices.min())}; pad with "
                f"dense_shape[0] = {self.dense_shape[0]} (dropped) instead"
            )

    # pytree: indices and values are children, the shape is static.
    def tree_flatten(self):
        return (self.indices, self.values), (self.dense_shape, self.unique)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.indices, obj.values = children
        obj.dense_shape, obj.unique = aux
        return obj

    @property
    def dtype(self):
        return jnp.result_type(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense_shape

    @property
    def num_rows(self) -> int:
        return self.dense_shape[0]

    def replace_values(self, values: jax.Array) -> "IndexedSlices":
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(self), [self.indices, values]
        )

    def deduplicate(self) -> "IndexedSlices":
        """Sorted unique rows, duplicate values summed; padding (index ``num_rows``) last, zero values.

        ``k`` stays fixed (static shapes under jit): O(k log k), nothing table-sized.
        """
        if self.unique:
            return self
        n = self.num_rows
        indices = jnp.asarray(self.indices, jnp.int32)
        indices = jnp.where((indices < 0) | (indices >= n), n, indices)  # padding / dropped
        k = indices.shape[0]
        # Sort the keys alone (a key-value sort is several times slower on CPU),
        # number the distinct rows, and find each entry's row by binary search.
        ordered = jnp.sort(indices)
        first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
        position = jnp.cumsum(first.astype(jnp.int32)) - 1
        unique = jnp.full((k,), n, jnp.int32).at[position].set(ordered)
        segment = position[jnp.searchsorted(ordered, indices, side="left", method="scan")]
        summed = jax.ops.segment_sum(self.values, segment, num_segments=k)
        valid = (unique < n).reshape((k,) + (1,) * (summed.ndim - 1))
        summed = jnp.where(valid, summed, jnp.zeros_like(summed))
        return IndexedSlices(unique, summed, self.dense_shape, unique=True)

    def gather(self, table: jax.Array) -> jax.Array:
        """The rows of ``table`` at ``indices`` (padding rows: zeros, or any row once deduplicated)."""
        if self.unique:  # padding (index num_rows) clamps to the last row; its result is dropped
            return table.at[self.indices].get(
                mode="clip", indices_are_sorted=True, unique_indices=True
            )
        return table.at[self.indices].get(mode="fill", fill_value=0)

    def scatter(self, table: jax.Array, rows: jax.Array) -> jax.Array:
        """``table`` with its rows at ``indices`` SET to ``rows`` (padding dropped; unique indices)."""
        return table.at[self.indices].set(rows.astype(table.dtype), **self._scatter_flags())

    def add_to(self, table: jax.Array) -> jax.Array:
        """``table + dense(self)``, touching only the listed rows."""
        return table.at[self.indices].add(self.values.astype(table.dtype), **self._scatter_flags())

    def _scatter_flags(self) -> dict:
        return dict(mode="drop", indices_are_sorted=self.unique, unique_indices=self.unique)

    def to_dense(self) -> jax.Array:
        """The dense gradient (table-sized: for tests and small tables)."""
        return self.add_to(jnp.zeros(self.dense_shape, self.dtype))

    def __repr__(self) -> str:
        return f"IndexedSlices(indices={self.indices!r}, values={self.values!r}, dense_shape={self.dense_shape})"


def is_sparse(x: Any) -> bool:
    return isinstance(x, IndexedSlices)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def pad(indices: Any, values: Any, dense_shape: tuple[int, ...], k: int) -> IndexedSlices:
    """An IndexedSlices with exactly ``k`` entries: extra entries get index ``dense_shape[0]`` (ignored).

    Use it to give a fixed ``k`` to batches with a variable number of ids, so a
    jitted step compiles once.
    """
    indices = np.asarray(indices, np.int32)
    values = np.asarray(values)
    if indices.shape[0] > k:
        raise ValueError(f"pad: {indices.shape[0]} entries do not fit in k={k}")
    extra = k - indices.shape[0]
    indices = np.concatenate([indices, np.full(extra, dense_shape[0], np.int32)])
    values = np.concatenate([values, np.zeros((extra,) + values.shape[1:], values.dtype)])
    return IndexedSlices(jnp.asarray(indices), jnp.asarray(values), dense_shape)


def value_and_sparse_grad(
    loss_fn: Callable[..., jax.Array], table: str, *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``jax.value_and_grad`` whose gradient for ``params[table]`` is an :class:`IndexedSlices`.

    ``loss_fn(params, rows, ids, *args)`` computes the loss from the embedding
    ``rows = params[table][ids]`` (given, so the table itself is never
    differentiated densely) and the other params. The returned function takes
    ``(params, ids, *args)`` and returns ``(loss, grads)``, with
    ``grads[table] = IndexedSlices(ids.reshape(-1), d loss / d rows, table.shape)``.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> params = {"embed": jnp.ones((10, 2)), "w": jnp.ones(2)}
      >>> loss = lambda p, rows, ids: jnp.sum(rows @ p["w"])
      >>> value, grads = rj.value_and_sparse_grad(loss, "embed")(params, jnp.array([3, 3, 7]))
      >>> grads["embed"].indices, grads["w"]
      (Array([3, 3, 7], dtype=int32), Array([3., 3.], dtype=float32))
    """

    def wrapped(params, ids, *args):
        weights = params[table]
        ids = jnp.asarray(ids, jnp.int32)
        rows = weights.at[ids].get(mode="fill", fill_value=0)
        others = {k: v for k, v in params.items() if k != table}

        def objective(others, rows):
            return loss_fn({**others, table: weights}, rows, ids, *args)

        value, (g_others, g_rows) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=has_aux)(
            others, rows
        )
        row_shape = weights.shape[1:]
        sparse = IndexedSlices(ids.reshape(-1), g_rows.reshape((-1,) + row_shape), weights.shape)
        return value, {**g_others, table: sparse}

    return wrapped


def map_gradients(
    fn: Callable[[jax.Array], jax.Array], grads: Any, *, deduplicate: bool = False
) -> Any:
    """``fn`` on every dense gradient and on the ``values`` of every IndexedSlices; None stays.

    With ``deduplicate`` the rows are summed first, so an elementwise ``fn``
    (clipping by value) or a norm sees the gradient that the dense table would.
    """

    def apply(g):
        if g is None:
            return None
        if isinstance(g, IndexedSlices):
            g = g.deduplicate() if deduplicate else g
            return g.replace_values(fn(g.values))
        return fn(g)

    return jax.tree.map(apply, grads, is_leaf=lambda x: x is None or isinstance(x, IndexedSlices))


def dense_parts(grads: Any, *, deduplicate: bool = True) -> list[jax.Array]:
    """The arrays carrying gradient values (IndexedSlices: its deduplicated values), for norms and finiteness."""
    leaves = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, IndexedSlices))
    return [
        (g.deduplicate() if deduplicate else g).values if isinstance(g, IndexedSlices) else g
        for g in leaves
        if g is not None
    ]
