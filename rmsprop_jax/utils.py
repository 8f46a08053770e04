"""Small pytree helpers for users of the transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax.sparse import IndexedSlices, check_sparse_leaves

__all__ = [
    "apply_updates",
    "zeros_like_shape",
]


def zeros_like_shape(shape: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros for an ``eval_shape`` result, keeping its sharding (and ``shard_map``'s varying axes).

    Used for the "no update" branch of a ``lax.cond`` (accumulation, skipped
    loss-scale steps), whose output type must equal the other branch's.
    """
    zeros = jnp.zeros(shape.shape, shape.dtype, out_sharding=getattr(shape, "sharding", None))
    varying = getattr(getattr(shape, "manual_axis_type", None), "varying", None)
    return jax.lax.pcast(zeros, tuple(varying), to="varying") if varying else zeros


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
    """``optax.apply_updates`` that also accepts ``None`` and :class:`IndexedSlices` updates.

    rmsprop_jax passes ``None`` gradients through as ``None`` updates (Keras
    drops ``None`` gradients the same way: the variable and its slots are left
    untouched). ``optax.apply_updates`` only accepts ``None`` where the param
    itself is ``None``; this keeps the param instead. A row-sparse update is
    scattered into the touched rows only (``table.at[rows].add``), so with
    donated params no table-sized temporary is made.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.apply_updates({"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": -jnp.ones(2), "b": None})
      {'a': Array([0., 0.], dtype=float32), 'b': Array([1.], dtype=float32)}
    """

    check_sparse_leaves(updates, "updates")

    def apply(p, u):
        if u is None or p is None:
            return p
        if isinstance(u, IndexedSlices):  # touched rows only: no table-sized temporary
            return u.add_to(p)
        return jnp.asarray(p + u).astype(jnp.result_type(p))

    return jax.tree.map(
        apply,
        params,
        updates,
        is_leaf=lambda x: x is None or isinstance(x, IndexedSlices),
    )
