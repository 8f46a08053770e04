"""Gradient accumulation with Keras 3 semantics (``gradient_accumulation_steps``)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_forms
from rmsprop_jax.sparse import IndexedSlices, check_sparse_leaves
from rmsprop_jax.utils import zeros_like_shape

__all__ = [
    "AccumulationState",
    "accumulate_gradients",
]


class AccumulationState(NamedTuple):
    """State of :func:`accumulate_gradients`."""

    count: chex.Array  # int32 scalar: calls so far (Keras' raw ``iterations``)
    accumulators: optax.Updates  # raw SUM of the gradients since the last update, grads' dtypes
    inner_state: optax.OptState  # the wrapped transform's state, advanced on update steps only


def accumulate_gradients(
    inner: optax.GradientTransformation, gradient_accumulation_steps: int
) -> optax.GradientTransformationExtraArgs:
    r"""Keras 3 gradient accumulation around ``inner``.

    With ``N = gradient_accumulation_steps`` and ``i`` the number of calls
    before this one, call ``i`` is an update step when ``(i + 1) % N == 0``:

    * update step: ``inner`` receives ``(g + acc) / N`` (the mean of the last
      ``N`` gradients, summed then divided, as Keras) and its update is
      returned; the accumulators are reset to zero;
    * other steps: ``acc += g``, the update is zero and ``inner``'s state is
      unchanged.

    The difference from ``optax.MultiSteps``: Keras semantics count every
    call (the counter here, and Keras schedules and EMA, advance on every
    micro-step; ``rj.rmsprop`` evaluates the learning-rate schedule at the raw
    call count ``(j + 1) * N - 1`` of the ``j``-th update, via
    ``rmsprop_jax._schedules.shifted``), and the mean is
    ``(sum) / N``; ``MultiSteps`` keeps a running mean
    ``acc += (g - acc) / (k + 1)`` and its inner schedules see update steps.
    Both are usable with every transform here; pick ``MultiSteps`` to match
    optax-based code, this one to match Keras.

    The inner transform runs under ``lax.cond``: non-update steps cost one
    pass over the gradients (the accumulation) and nothing else.

    Args:
      inner: the transformation applied on update steps.
      gradient_accumulation_steps: integer ``N >= 1`` (1 accumulates nothing).
    """
    _checks.check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    steps = gradient_accumulation_steps
    declared_inner = inner
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return AccumulationState(
            count=jnp.zeros([], jnp.int32),
            # Explicit dtype: weak-typed params must not give weak-typed sums (a second compile).
            accumulators=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.result_type(p)), params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        check_sparse_leaves(updates, "grads")
        is_update_step = (state.count + 1) % steps == 0

        # The running sum, touched rows only for row-sparse gradients; the
        # inner transform always sees the dense mean (an update step is dense).
        sums = _map(_add, updates, state.accumulators, none=lambda acc: acc)
        mean = _map(lambda g, total: total / steps, updates, sums)  # None grads stay None

        def apply(_):
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new_updates, inner_state, jax.tree.map(jnp.zeros_like, sums)

        def accumulate(_):
            shapes, state_types = jax.eval_shape(
                lambda: inner.update(mean, state.inner_state, params, **extra_args)
            )
            zeros = jax.tree.map(zeros_like_shape, shapes)  # None stays
            # Both branches return one type: a state built from unsharded params and
            # stepped with sharded gradients (explicit mesh axes) takes the step's sharding.
            kept = jax.tree.map(_with_type_of, state.inner_state, state_types)
            return zeros, kept, sums

        new_updates, inner_state, accumulators = jax.lax.cond(
            is_update_step, apply, accumulate, None
        )
        return new_updates, AccumulationState(
            count=optax.safe_increment(state.count),
            accumulators=accumulators,
            inner_state=inner_state,
        )

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def flat_form(_, context):
        # Fed zeros where a gradient is None: the sum of such a leaf is kept (its mean is not).
        flat_inner, after = _flat_forms.to_flat(declared_inner, context)
        return _flat_forms.zero_fed(accumulate_gradients(flat_inner, steps), context.present), after

    return _flat_forms.declare(tx, flat_form)


def _with_type_of(x: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """``x`` resharded to ``target``'s sharding where their explicit-axis shardings differ."""
    sharding = getattr(target, "sharding", None)
    if sharding is None or jax.typeof(x).sharding == sharding:
        return x
    return jax.sharding.reshard(x, sharding)


def _add(g, acc):
    """``acc + g`` in the accumulator's dtype; an IndexedSlices adds its rows only."""
    if isinstance(g, IndexedSlices):
        return g.add_to(acc)
    return (acc + g).astype(acc.dtype)


def _map(fn, grads, accumulators, none=lambda acc: None):
    """``fn(g, acc)`` per leaf; a None gradient gives ``none(acc)``."""
    return jax.tree.map(
        lambda g, acc: none(acc) if g is None else fn(g, acc),
        grads,
        accumulators,
        is_leaf=lambda x: x is None or isinstance(x, IndexedSlices),
    )
