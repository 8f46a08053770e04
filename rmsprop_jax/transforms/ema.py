"""Weight EMA with Keras 3 semantics (``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_forms, _fusion, _trees
from rmsprop_jax.sparse import IndexedSlices, check_sparse_leaves

__all__ = [
    "EmaState",
    "ema_params",
    "overwrites_weights",
    "weight_ema",
]


class EmaState(NamedTuple):
    """State of :func:`weight_ema`."""

    count: chex.Array  # int32 scalar: calls so far (Keras' raw ``iterations``)
    ema: optax.Params  # the moving averages of the parameters, params' dtypes


def weight_ema(
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> optax.GradientTransformation:
    r"""Keras 3 exponential moving average of the weights, as the LAST transform of a chain.

    On every call, after the update ``w' = w + u`` (computed here as
    ``optax.apply_updates`` would):

    .. math::

      k = \begin{cases} 0 & i = 0 \\ \text{ema\_momentum} & i > 0 \end{cases},
      \qquad \bar w \leftarrow k \bar w + (1 - k) w'

    with ``i`` Keras' ``iterations`` property (``calls // N`` under gradient
    accumulation of ``N`` steps), so the first step copies the weights and
    there is no warm-up. When ``(i + 1) % ema_overwrite_frequency == 0`` the
    update is replaced so that the weights become the averages
    (``u = avg - w``; ``w + u`` equals the average up to one rounding, and
    :meth:`rmsprop_jax.RMSprop.stateless_apply` writes it exactly). The
    averages are read with :func:`rmsprop_jax.ema_params` (Keras'
    ``finalize_variable_values``).

    Args:
      ema_momentum: in [0, 1].
      ema_overwrite_frequency: None (never overwrite) or an integer >= 1.
      gradient_accumulation_steps: the ``N`` of an accumulation wrapper earlier
        in the chain, so ``i`` counts update steps as in Keras.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = optax.chain(optax.sgd(1.0), rj.weight_ema(0.5))
      >>> p = jnp.array([1.0]); s = tx.init(p)
      >>> for _ in range(2):
      ...     u, s = tx.update(jnp.array([1.0]), s, p); p = optax.apply_updates(p, u)
      >>> p, rj.ema_params(s)
      (Array([-1.], dtype=float32), Array([-0.5], dtype=float32))
    """
    _checks.check_range("ema_momentum", ema_momentum, 0.0, 1.0)
    _checks.check_positive_int("ema_overwrite_frequency", ema_overwrite_frequency)
    _checks.check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    steps = gradient_accumulation_steps or 1

    def init_fn(params):
        return EmaState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(_copy, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise _checks.params_required("ema")
        check_sparse_leaves(updates, "updates")
        # steps == 1: no division (XLA keeps jnp's floor-division logic in every leaf's kernel)
        iterations = state.count if steps == 1 else state.count // steps
        k = jnp.where(iterations != 0, ema_momentum, 0.0)
        overwrite = None
        if ema_overwrite_frequency is not None:
            overwrite = overwrites_weights(state.count, ema_overwrite_frequency, steps)

        def step(u, avg, w):
            """New (update, average) of one leaf; row-sparse updates touch their rows only."""
            if w is None:  # a frozen (None) parameter has no average
                return u, avg
            if isinstance(u, IndexedSlices):
                new_u, new_rows = step(u.values, u.gather(avg), u.gather(w))
                return u.replace_values(new_u), u.scatter(avg, new_rows)
            return dense_step(jnp.zeros_like(w) if u is None else u, avg, w)

        @_fusion.traced_once  # one trace per leaf signature, not per leaf (under jit)
        def dense_step(u, avg, w):
            new_w = optax.apply_updates(w, u)
            # The step-wide factor in one kernel, not copied into every leaf's loop (XLA's CSE
            # merges the leaves' identical ones). 1 - k_ is one subtraction in each loop: in a
            # kernel of its own it was one more distinct kernel to compile, for the same bits.
            k_ = _fusion.computed_once(k.astype(w.dtype))
            new_avg = k_ * avg + (1 - k_) * new_w
            if overwrite is not None:
                u = jnp.where(overwrite, (new_avg - w).astype(u.dtype), u)
            return u, new_avg

        is_leaf = lambda x: x is None or isinstance(x, IndexedSlices)
        pairs = jax.tree.map(step, updates, state.ema, params, is_leaf=is_leaf)
        treedef = jax.tree.structure(updates, is_leaf=is_leaf)
        columns = list(zip(*treedef.flatten_up_to(pairs))) or [(), ()]  # no leaves: nothing to do
        new_updates, new_ema = (treedef.unflatten(column) for column in columns)
        return new_updates, EmaState(count=optax.safe_increment(state.count), ema=new_ema)

    # Over flat buffers: elementwise, and (as per leaf) a leaf without a gradient still moves.
    tx = optax.GradientTransformation(init_fn, update_fn)
    return _flat_forms.declare(tx, _flat_forms.fills_every_leaf)


def overwrites_weights(calls: Any, frequency: int, gradient_accumulation_steps: int = 1) -> Any:
    """Whether call number ``calls`` (0-based, Keras' raw ``iterations``) ends with the weights
    replaced by their averages: ``(i + 1) % frequency == 0`` with ``i = calls // N``."""
    return (calls // gradient_accumulation_steps + 1) % frequency == 0


def _copy(p: Any) -> Any:
    """The EMA's start: a copy of the parameter, never weak-typed (its type must not change).

    A ``jax.ShapeDtypeStruct`` (shape-only init, as optax's sharding tests do)
    gives zeros of its shape, dtype and sharding: the first step overwrites the
    average with the weights anyway.
    """
    if isinstance(p, jax.ShapeDtypeStruct):
        return jnp.zeros(p.shape, p.dtype, out_sharding=p.sharding)
    return jnp.array(p, dtype=jnp.result_type(p))


def ema_params(opt_state: Any) -> Any:
    """The EMA weights held in ``opt_state`` (Keras' ``finalize_variable_values``).

    Works on any state that contains an :class:`EmaState`, however nested
    (``optax.chain``, ``rj.rmsprop``, ``rj.RMSprop``, loss-scale wrappers).

    Raises:
      ValueError: when the state holds no EMA, or more than one.
    """
    return _trees.find_state(
        opt_state, EmaState, "ema_params", "; build the optimizer with use_ema=True"
    ).ema
