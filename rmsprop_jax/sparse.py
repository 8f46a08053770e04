"""Row-sparse gradients (TensorFlow's ``IndexedSlices``) with cost proportional to the rows touched.

An :class:`IndexedSlices` leaf in ``grads`` says "these rows of the table got
these gradients; every other row got zero". rmsprop_jax then updates only the
touched rows of the parameter and of every optimizer slot (``lazy`` mode,
:func:`rmsprop_jax.rmsprop`), or reproduces TF 2.0 exactly
(:func:`rmsprop_jax.presets.tf2`: with ``momentum == 0`` the mean-square slot
of ALL rows decays). The update comes back as an ``IndexedSlices`` too, and
``params + update`` scatters it into the touched rows: ``optax.apply_updates``,
Flax's ``TrainState.apply_gradients`` and ``nnx.Optimizer.update`` apply it
unchanged, and a jitted step with donated params never materialises a
table-sized temporary.

Conventions:

* ``indices``: ``[k]`` row numbers of any integer dtype, duplicates allowed
  (summed, as TF). ``k`` is static under ``jit``; pad variable counts to a fixed
  ``k`` with the index ``dense_shape[0]`` (see :func:`pad`). Every index
  outside ``[0, dense_shape[0])`` is dropped, whatever its dtype (int64 and
  uint64 beyond ``2**31`` included); a negative index is an error when the
  indices are concrete, dropped when traced. ``k = 0`` is a no-op.
* ``values``: ``[k, *dense_shape[1:]]``, the gradient rows.
* Rank, dtypes and shapes are static facts: a malformed ``IndexedSlices`` is
  an error when it is built, eagerly and under ``jit``.

Why the row numbers are opaque. A transform that maps over every array leaf
(``optax.scale``, ``optax.clip``, ``optax.tree.norm``, ...) would treat the
row numbers as values: ``optax.scale(0.5)`` would move rows ``[1, 5, 9]`` to
``[0, 2, 4]`` with no error. So the row numbers are stored as a JAX extended
dtype (a key array of the ``key<rj.IndexedSlices.indices>`` dtype, made with
JAX's public ``jax.extend.random.define_prng_impl``), which JAX refuses in
every arithmetic operation at trace time, while ``jit``, ``lax.cond``,
``vmap``, shardings and donation carry it like any array. Foreign elementwise
transforms run on the touched rows through :func:`on_touched_rows`; the
``indices`` property gives the plain integers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IndexedSlices",
    "check_sparse_leaves",
    "dense_parts",
    "is_sparse",
    "map_gradients",
    "pad",
    "value_and_sparse_grad",
]

_MAX_ROWS = 2**32 - 1  # row numbers and the padding index dense_shape[0] are stored as uint32


def _refuse(*_: Any) -> Any:
    raise TypeError("IndexedSlices row numbers are not a PRNG key")


@functools.cache
def _row_id_impl():
    from jax.extend.random import define_prng_impl  # only when first used

    return define_prng_impl(
        key_shape=(1,),
        seed=_refuse,
        split=_refuse,
        random_bits=_refuse,
        fold_in=_refuse,
        name="rmsprop_jax.row_ids",
        tag="rj.IndexedSlices.indices",
    )


@functools.cache
def _row_id_dtype():
    return jax.random.wrap_key_data(np.zeros((0, 1), np.uint32), impl=_row_id_impl()).dtype


def _is_row_ids(x: Any) -> bool:
    return getattr(x, "dtype", None) == _row_id_dtype() and np.ndim(x) == 1


def _index_dtype(num_rows: int):
    """int32 while the padding index fits, else uint32 (tables of 2**31 rows or more)."""
    return jnp.int32 if num_rows < 2**31 else jnp.uint32


def _encode_rows(indices: Any, num_rows: int) -> jax.Array:
    """Row numbers -> opaque row ids; every index outside [0, num_rows) becomes num_rows."""
    if not isinstance(indices, jax.Array):  # numpy / lists: compare in their own dtype (int64 too)
        host = np.asarray(indices)
        _check_no_negative(host, num_rows)
        rows = jnp.asarray(np.where(host < num_rows, host, num_rows).astype(np.uint32))
    else:
        if not isinstance(indices, jax.core.Tracer):
            _check_no_negative(indices, num_rows)
        dtype = indices.dtype
        fits = num_rows <= jnp.iinfo(dtype).max
        valid = indices < jnp.asarray(num_rows, dtype) if fits else True
        if jnp.issubdtype(dtype, jnp.signedinteger):
            valid = valid & (indices >= 0)
        rows = jnp.where(valid, indices.astype(jnp.uint32), jnp.uint32(num_rows))
    return jax.random.wrap_key_data(rows[:, None], impl=_row_id_impl())


def _check_no_negative(indices: Any, num_rows: int) -> None:
    if indices.size and int(indices.min()) < 0:
        raise ValueError(
            f"IndexedSlices: negative index {int(indices.min())}; pad with "
            f"dense_shape[0] = {num_rows} (dropped) instead"
        )


def _decode_rows(row_ids: jax.Array, num_rows: int) -> jax.Array:
    return jax.random.key_data(row_ids)[:, 0].astype(_index_dtype(num_rows))


def _describe(x: Any) -> str:
    dtype = getattr(x, "dtype", type(x).__name__)
    return f"{dtype}{list(np.shape(x)) if hasattr(x, 'shape') else ''}"


@jax.tree_util.register_pytree_with_keys_class
class IndexedSlices:
    """Gradient rows of a ``dense_shape`` table: ``dense[indices[i]] += values[i]``.

    ``dense + g`` (and so ``optax.apply_updates``) scatters the rows into the
    table; ``g1 + g2`` concatenates the rows of two slices of one table.

    Args:
      indices: ``[k]`` integer row numbers (any integer dtype); indices outside
        ``[0, dense_shape[0])`` are dropped (negative ones are an error when concrete).
      values: ``[k, *dense_shape[1:]]`` gradient rows.
      dense_shape: the table's shape (static).
      unique: a promise that ``indices`` are sorted and duplicate-free with the
        padding last (what :meth:`deduplicate` returns); it lets the scatter skip
        the sort. Not part of the pytree: a rebuilt slice (``tree.map``, ``jit``
        outputs, ``lax.cond``) is treated as not unique, which is always correct.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> g = rj.IndexedSlices(jnp.array([2, 0, 2]), jnp.ones((3, 2)), (4, 2))
      >>> g.to_dense()
      Array([[1., 1.],
             [0., 0.],
             [2., 2.],
             [0., 0.]], dtype=float32)
      >>> jnp.zeros((4, 2)) + g  # what optax.apply_updates does
      Array([[1., 1.],
             [0., 0.],
             [2., 2.],
             [0., 0.]], dtype=float32)
    """

    def __init__(self, indices: Any, values: Any, dense_shape: Sequence[int], unique: bool = False):
        dense_shape = tuple(int(d) for d in dense_shape)
        _check_layout(indices, values, dense_shape)
        self.dense_shape = dense_shape
        self.unique = unique
        self._row_ids = _encode_rows(indices, dense_shape[0])
        self.values = values

    @classmethod
    def _from_row_ids(
        cls, row_ids: jax.Array, values: Any, dense_shape: tuple[int, ...], unique: bool
    ) -> IndexedSlices:
        obj = object.__new__(cls)
        obj._row_ids, obj.values, obj.dense_shape, obj.unique = row_ids, values, dense_shape, unique
        return obj

    # pytree: the row ids and the values are children, the shape is static.
    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey("indices"), jax.tree_util.GetAttrKey("values")
        return tuple(zip(keys, (self._row_ids, self.values))), self.dense_shape

    def tree_flatten(self):
        return (self._row_ids, self.values), self.dense_shape

    @classmethod
    def tree_unflatten(cls, dense_shape, children):
        # No checks here: tree utilities rebuild containers around placeholders,
        # shapes and booleans. Consumers call validate() with the leaf's name.
        return cls._from_row_ids(*children, dense_shape, unique=False)

    def validate(self, name: str) -> None:
        """Raises ValueError, naming the leaf, when this is no longer a well-formed slice.

        A foreign ``jax.tree.map`` can rebuild an IndexedSlices around anything;
        its row numbers are opaque to arithmetic, so what arrives here is either
        intact or visibly not.
        """
        if not _is_row_ids(self._row_ids):
            raise ValueError(
                f"{name} is an IndexedSlices whose indices are no longer row numbers (they are "
                f"{_describe(self._row_ids)}): a transform mapped over it as if its indices "
                "were values. Apply elementwise optax transforms to row-sparse gradients with "
                "rj.on_touched_rows(tx), use rmsprop_jax's transforms (rj.clip_by_global_norm, "
                "rj.global_norm, ...), or route the leaf past the transform with optax.masked "
                "/ optax.partition."
            )
        expected = (self._row_ids.shape[0], *self.dense_shape[1:])
        if tuple(np.shape(self.values)) != expected:
            raise ValueError(
                f"{name} is an IndexedSlices of dense_shape {self.dense_shape} with "
                f"{expected[0]} indices: its values must have shape {expected}, got "
                f"{_describe(self.values)}"
            )

    @property
    def indices(self) -> jax.Array:
        """The row numbers, int32 (uint32 from 2**31 rows); dropped ones read ``dense_shape[0]``."""
        self.validate("this")
        return _decode_rows(self._row_ids, self.num_rows)

    @property
    def dtype(self):
        return jnp.result_type(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense_shape

    @property
    def num_rows(self) -> int:
        return self.dense_shape[0]

    def replace_values(self, values: jax.Array) -> IndexedSlices:
        """The same rows with other values (same shape)."""
        return IndexedSlices._from_row_ids(self._row_ids, values, self.dense_shape, self.unique)

    def deduplicate(self) -> IndexedSlices:
        """Sorted unique rows, duplicate values summed; padding (index ``num_rows``) last, zero values.

        ``k`` stays fixed (static shapes under jit): O(k log k), nothing table-sized.
        """
        k = self._row_ids.shape[0]
        if self.unique or k == 0:
            return IndexedSlices._from_row_ids(self._row_ids, self.values, self.dense_shape, True)
        n = self.num_rows
        indices = self.indices  # already in [0, n]: n is the padding
        # One sort of single keys (a key-value sort is several times slower on
        # CPU); the distinct rows are numbered, and each entry gets its row's
        # number (its segment) for the sum.
        position_bits = (k - 1).bit_length()
        packed = n.bit_length() + position_bits <= 32
        if packed:
            # Pack (row, position) into one uint32 key: the sort yields the permutation too.
            keys = jnp.sort(
                (indices.astype(jnp.uint32) << position_bits) | jnp.arange(k, dtype=jnp.uint32)
            )
            ordered = (keys >> position_bits).astype(indices.dtype)
            permutation = (keys & ((1 << position_bits) - 1)).astype(jnp.int32)
        else:  # find each entry's place in the sorted rows by binary search
            ordered = jnp.sort(indices)
        first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
        position = jnp.cumsum(first.astype(jnp.int32)) - 1
        unique = jnp.full((k,), n, indices.dtype).at[position].set(ordered)
        if packed:
            segment = jnp.zeros((k,), jnp.int32).at[permutation].set(position, unique_indices=True)
        else:
            segment = position[jnp.searchsorted(ordered, indices, side="left", method="scan")]
        summed = jax.ops.segment_sum(self.values, segment, num_segments=k)
        valid = (unique < jnp.asarray(n, unique.dtype)).reshape((k,) + (1,) * (summed.ndim - 1))
        summed = jnp.where(valid, summed, jnp.zeros_like(summed))
        row_ids = jax.random.wrap_key_data(unique.astype(jnp.uint32)[:, None], impl=_row_id_impl())
        return IndexedSlices._from_row_ids(row_ids, summed, self.dense_shape, True)

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

    def __add__(self, other: Any) -> Any:
        if isinstance(other, IndexedSlices):
            if other.dense_shape != self.dense_shape:
                raise ValueError(
                    f"IndexedSlices + IndexedSlices: dense shapes {self.dense_shape} and "
                    f"{other.dense_shape} differ"
                )
            self.validate("the left operand")
            other.validate("the right operand")
            return IndexedSlices._from_row_ids(
                jnp.concatenate([self._row_ids, other._row_ids]),
                jnp.concatenate([self.values, other.values.astype(self.dtype)]),
                self.dense_shape,
                unique=False,
            )
        if not isinstance(other, (jax.Array, np.ndarray)):
            return NotImplemented
        if tuple(other.shape) != self.dense_shape:
            raise ValueError(
                f"dense + IndexedSlices: the dense operand has shape {tuple(other.shape)}, "
                f"the IndexedSlices dense_shape {self.dense_shape}"
            )
        self.validate("the IndexedSlices operand of dense + IndexedSlices")
        return self.add_to(jnp.asarray(other))

    __radd__ = __add__

    def __repr__(self) -> str:
        indices = self.indices if _is_row_ids(self._row_ids) else self._row_ids
        return (
            f"IndexedSlices(indices={indices!r}, values={self.values!r}, "
            f"dense_shape={self.dense_shape})"
        )


def _check_layout(indices: Any, values: Any, dense_shape: tuple[int, ...]) -> None:
    """The static facts of a slice: errors at construction, eagerly and under jit."""
    where = f"IndexedSlices(dense_shape={dense_shape})"
    if not dense_shape:
        raise ValueError("IndexedSlices: dense_shape must have at least one dimension (rows)")
    if not 0 < dense_shape[0] <= _MAX_ROWS:
        raise ValueError(f"{where}: the number of rows must be in [1, 2**32 - 1]")
    dtype = getattr(indices, "dtype", None) or np.asarray(indices).dtype
    if np.ndim(indices) != 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{where}: indices must be a 1-D integer array, got {dtype}{list(np.shape(indices))}"
        )
    expected = (np.shape(indices)[0], *dense_shape[1:])
    if tuple(np.shape(values)) != expected:
        raise ValueError(
            f"{where}: values must have shape (k, *dense_shape[1:]) = {expected} for "
            f"k = {expected[0]} indices, got {list(np.shape(values))}"
        )


def is_sparse(x: Any) -> bool:
    return isinstance(x, IndexedSlices)


def check_sparse_leaves(tree: Any, what: str) -> None:
    """:meth:`IndexedSlices.validate` on every row-sparse leaf of ``tree``, named by its path."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse)[0]:
        if isinstance(leaf, IndexedSlices):
            name = jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"
            leaf.validate(f"{what} leaf {name!r}")


def pad(indices: Any, values: Any, dense_shape: Sequence[int], k: int) -> IndexedSlices:
    """An IndexedSlices with exactly ``k`` entries: extra entries get index ``dense_shape[0]`` (ignored).

    Use it to give a fixed ``k`` to batches with a variable number of ids, so a
    jitted step compiles once.
    """
    indices = np.asarray(indices)
    if indices.size == 0 and not np.issubdtype(indices.dtype, np.integer):
        indices = indices.astype(np.int32)  # np.asarray([]) is float64
    values = np.asarray(values)
    if indices.shape[0] > k:
        raise ValueError(f"pad: {indices.shape[0]} entries do not fit in k={k}")
    extra = k - indices.shape[0]
    padding = np.full(extra, dense_shape[0], np.min_scalar_type(dense_shape[0]))
    indices = np.concatenate(
        [indices, padding.astype(np.promote_types(indices.dtype, padding.dtype))]
    )
    values = np.concatenate([values, np.zeros((extra,) + values.shape[1:], values.dtype)])
    return IndexedSlices(indices, jnp.asarray(values), dense_shape)


KeyPath = Sequence[Any]


def _key_name(key: Any) -> str:
    """One entry of a key path as it reads in ``"embed/embedding"``."""
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attribute) and not isinstance(key, (str, int)):
            return str(getattr(key, attribute))
    return str(key)


def _find_leaf(params: Any, table: str | KeyPath) -> tuple[int, list, Any]:
    """The flat position of ``table`` in ``params`` (a "a/b" path or a key path), leaves, treedef.

    A Flax ``nnx`` Variable's own ``value`` attribute may be left out of the path.
    """
    want = tuple(table.split("/")) if isinstance(table, str) else tuple(map(_key_name, table))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
    names = [tuple(map(_key_name, path)) for path, _ in flat]
    found = [i for i, name in enumerate(names) if name in (want, want + ("value",))]
    if len(found) != 1:
        listed = ", ".join("/".join(name) for name in names[:8])
        raise KeyError(
            f"value_and_sparse_grad: table {table!r} matches {len(found)} leaves of params; "
            f"give the path of one leaf as 'a/b' or a key path. Params leaves: {listed}"
            + (", ..." if len(names) > 8 else "")
        )
    return found[0], [leaf for _, leaf in flat], treedef


def value_and_sparse_grad(
    loss_fn: Callable[..., Any], table: str | KeyPath, *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``jax.value_and_grad`` whose gradient for the ``table`` leaf is an :class:`IndexedSlices`.

    ``loss_fn(params, rows, ids, *args)`` computes the loss from the embedding
    rows ``rows = table[ids]`` (given, so the table itself is never
    differentiated densely) and the other params. ``table`` is the path of the
    embedding in ``params``: ``"embed"``, ``"embed/embedding"`` (Flax linen
    params, an ``nnx.State``; an nnx Variable's ``value`` may be left out), or
    a key path such as ``("embed", "embedding")``. The returned function takes
    ``(params, ids, *args)`` and returns ``(loss, grads)``: ``grads`` has the
    structure of ``params``, with ``IndexedSlices(ids.reshape(-1), d loss / d
    rows, table.shape)`` at ``table``. Ids outside the table give zero rows and
    are dropped from the update.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> params = {"embed": {"embedding": jnp.ones((10, 2))}, "w": jnp.ones(2)}
      >>> loss = lambda p, rows, ids: jnp.sum(rows @ p["w"])
      >>> grad_fn = rj.value_and_sparse_grad(loss, "embed/embedding")
      >>> value, grads = grad_fn(params, jnp.array([3, 3, 7]))
      >>> grads["embed"]["embedding"].indices, grads["w"]
      (Array([3, 3, 7], dtype=int32), Array([3., 3.], dtype=float32))
    """

    def wrapped(params, ids, *args):
        position, leaves, treedef = _find_leaf(params, table)
        weights = leaves[position]
        flat_ids = jnp.reshape(
            jnp.asarray(ids) if isinstance(ids, jax.Array) else np.asarray(ids), -1
        )
        # Out-of-range ids (padding, int64 beyond the table) read zeros and are dropped.
        probe = IndexedSlices(flat_ids, jnp.zeros((flat_ids.shape[0], 0)), (weights.shape[0], 0))
        rows = weights.at[probe.indices].get(mode="fill", fill_value=0)
        rows = rows.reshape(np.shape(ids) + weights.shape[1:])

        def with_table(others):
            flat = treedef.flatten_up_to(others)
            flat[position] = weights
            return treedef.unflatten(flat)

        others = treedef.unflatten([None if i == position else x for i, x in enumerate(leaves)])
        value, (g_others, g_rows) = jax.value_and_grad(
            lambda others, rows: loss_fn(with_table(others), rows, ids, *args),
            argnums=(0, 1),
            has_aux=has_aux,
        )(others, rows)
        grads = treedef.flatten_up_to(g_others)
        row_shape = weights.shape[1:]
        grads[position] = IndexedSlices._from_row_ids(
            probe._row_ids, g_rows.reshape((-1,) + row_shape), weights.shape, unique=False
        )
        return value, treedef.unflatten(grads)

    return wrapped


def map_gradients(
    fn: Callable[[jax.Array], jax.Array], grads: Any, *, deduplicate: bool = False
) -> Any:
    """``fn`` on every dense gradient and on the ``values`` of every IndexedSlices; None stays.

    With ``deduplicate`` the rows are summed first, so an elementwise ``fn``
    (clipping by value) or a norm sees the gradient that the dense table would.
    """

    check_sparse_leaves(grads, "grads")

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
    check_sparse_leaves(grads, "grads")
    leaves = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, IndexedSlices))
    return [
        (g.deduplicate() if deduplicate else g).values if isinstance(g, IndexedSlices) else g
        for g in leaves
        if g is not None
    ]
