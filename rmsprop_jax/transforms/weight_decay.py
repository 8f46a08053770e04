"""Decoupled weight decay with Keras 3 semantics and ``exclude_from_weight_decay``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_buffers, _flat_forms, _fusion, _schedules, _trees
from rmsprop_jax.sparse import IndexedSlices, check_sparse_leaves

__all__ = [
    "WeightDecayState",
    "add_decoupled_weight_decay",
    "compile_exclusion",
]

Exclusion = str | Sequence[str] | Callable[[Any], Any] | Any | None


class WeightDecayState(NamedTuple):
    """State of :func:`add_decoupled_weight_decay`."""

    # int32 scalar, calls so far; only when the learning rate is a schedule.
    count: chex.Array | None  # type: ignore[assignment]  # shadows tuple.count, as optax's states


def compile_exclusion(exclude: Exclusion) -> Callable[[Any], Any]:
    """Turns ``exclude_from_weight_decay`` into ``params -> bool pytree`` (True: decayed).

    ``exclude`` is one of: None (decay every leaf); a regex string or a list of
    them, joined with ``|`` and ``re.search``-ed in each leaf's path name
    (``"dense/bias"``, built with ``jax.tree_util.keystr(path, simple=True,
    separator="/")``), as Keras searches ``var_names`` in variable names; a
    pytree of bools like params (True: EXCLUDED); or a callable ``params ->``
    such a pytree.
    """
    if exclude is None:
        return lambda params: jax.tree.map(lambda _: True, params)
    if isinstance(exclude, str):
        exclude = [exclude]
    if isinstance(exclude, (list, tuple)) and all(isinstance(s, str) for s in exclude):
        if not exclude:
            return compile_exclusion(None)
        joined = "|".join(exclude)
        try:
            pattern = re.compile(joined)
        except re.error as err:
            raise ValueError(
                f"exclude_from_weight_decay: invalid regex {joined!r}: {err}"
            ) from None

        def by_name(params):
            leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
            return treedef.unflatten(
                [pattern.search(_trees.path_name(path)) is None for path, _ in leaves]
            )

        return by_name
    if callable(exclude):
        return lambda params: jax.tree.map(lambda e: not e, exclude(params))
    return lambda params: jax.tree.map(lambda e: not e, exclude)


def add_decoupled_weight_decay(
    weight_decay: float,
    learning_rate: Any = 0.001,
    exclude_from_weight_decay: Exclusion = None,
) -> optax.GradientTransformation:
    r"""Keras 3 decoupled weight decay: :math:`w \leftarrow w - w \cdot \lambda \cdot \eta_t`.

    ``\eta_t`` is the learning rate (float, schedule or zero-argument callable)
    at the number of calls before this one, as Keras applies
    ``variable - variable * weight_decay * learning_rate`` before each update
    step. Place it right after the optimizer in a chain: it adds
    ``-w * wd * lr`` to the incoming update (the decay is a function of the
    parameters, not of the gradients, so it commutes with the RMSprop step).
    Not L2: the decay is not normalised by the RMSprop denominator (for
    PyTorch/OneFlow's coupled L2 use ``optax.add_decayed_weights`` before the
    optimizer).

    Args:
      weight_decay: non-negative coefficient ``\lambda``.
      learning_rate: the optimizer's learning rate (the same object).
      exclude_from_weight_decay: leaves left undecayed: regex strings searched
        in each leaf's path name ("dense/bias"), a bool pytree (True:
        excluded) or a callable ``params -> bool pytree``.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.add_decoupled_weight_decay(0.1, 0.5, exclude_from_weight_decay="bias")
      >>> p = {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}
      >>> u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
      >>> u
      {'bias': Array([0.], dtype=float32), 'kernel': Array([-0.1], dtype=float32)}
    """
    _checks.check_range("weight_decay", weight_decay, 0.0)
    schedule = _schedules.as_schedule(learning_rate)
    decayed_mask = compile_exclusion(exclude_from_weight_decay)

    def init_fn(params):
        return WeightDecayState(count=jnp.zeros([], jnp.int32) if schedule else None)

    def update_fn(updates, state, params=None):
        if params is None:
            raise _checks.params_required("add_decoupled_weight_decay")
        check_sparse_leaves(updates, "grads")
        lr = learning_rate if schedule is None else schedule(state.count)

        def decay(u, w):
            if isinstance(u, IndexedSlices):  # lazy: the touched rows only
                return u.replace_values(decay(u.values, u.gather(w)))
            return dense_decay(u, w)

        @_fusion.traced_once  # one trace per leaf signature, not per leaf (under jit)
        def dense_decay(u, w):
            return (u - (w * weight_decay * jnp.asarray(lr, w.dtype))).astype(u.dtype)

        if isinstance(params, _flat_buffers.FlatParams):  # rj.contiguous: the mask of each leaf
            flags = _flat_buffers.static_flags(
                decayed_mask(params.unflatten()), params.layout, "exclude_from_weight_decay"
            )
            decayed = jax.tree.map(decay, updates, params)
            updates = _flat_buffers.select(flags, decayed, updates)
        else:
            updates = jax.tree.map(
                lambda u, w, on: u if u is None or not on else decay(u, w),
                updates,
                params,
                decayed_mask(params),
                is_leaf=lambda x: x is None or isinstance(x, IndexedSlices),
            )
        count = None if schedule is None else optax.safe_increment(state.count)
        return updates, WeightDecayState(count=count)

    def flat_form(tx, context):
        # Decayed leaves are stored first, so that the flat mask is one range (an iota compare).
        return _flat_forms.per_leaf(tx, context._replace(leading=context.leading or decayed_mask))

    return _flat_forms.declare(optax.GradientTransformation(init_fn, update_fn), flat_form)
