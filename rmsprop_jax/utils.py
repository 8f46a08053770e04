"""Small pytree helpers for users of the transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
    """``optax.apply_updates`` that also accepts ``None`` updates (leaf unchanged).

    rmsprop_jax passes ``None`` gradients through as ``None`` updates (Keras
    drops ``None`` gradients the same way: the variable and its slots are left
    untouched). ``optax.apply_updates`` only accepts ``None`` where the param
    itself is ``None``; this keeps the param instead.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.apply_updates({"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": -jnp.ones(2), "b": None})
      {'a': Array([0., 0.], dtype=float32), 'b': Array([1.], dtype=float32)}
    """
    return jax.tree.map(
        lambda p, u: p if u is None or p is None else jnp.asarray(p + u).astype(jnp.result_type(p)),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )
