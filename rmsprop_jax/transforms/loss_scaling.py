"""Loss scaling with Keras 3 semantics: ``loss_scale_factor`` and ``LossScaleOptimizer``."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_forms, _trees
from rmsprop_jax.sparse import dense_parts, map_gradients
from rmsprop_jax.utils import zeros_like_shape

__all__ = [
    "DynamicLossScaleState",
    "dynamic_loss_scale",
    "loss_scale",
    "unscale_gradients",
]


def unscale_gradients(loss_scale_factor: float) -> optax.GradientTransformation:
    """Keras ``loss_scale_factor``: ``g = g / loss_scale_factor`` (a division, as Keras).

    The loss is multiplied by the same factor before differentiation
    (:meth:`rmsprop_jax.RMSprop.scale_loss`), so small float16 gradients do
    not underflow.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.unscale_gradients(4.0).update(jnp.array([2.0]), None)[0]
      Array([0.5], dtype=float32)
    """
    _checks.check_range("loss_scale_factor", loss_scale_factor, 0.0, low_open=True)

    def update_fn(updates, state, params=None):
        del params
        return map_gradients(lambda g: _divide(g, loss_scale_factor), updates), state

    return _flat_forms.declare(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        _flat_forms.per_leaf,
    )


def _divide(g: jax.Array, scale) -> jax.Array:
    """``g / scale`` in float32 at least, back in ``g``'s dtype.

    A scale of 2**16 or more is inf in float16, where ``g / scale`` in float16
    would zero every gradient; Keras divides by its float32 scale variable.
    """
    return (g.astype(jnp.promote_types(g.dtype, jnp.float32)) / scale).astype(g.dtype)


class DynamicLossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`."""

    scale: chex.Array  # float32 scalar: the current loss scale
    counter: chex.Array  # int32 scalar: finite steps since the last change of scale
    inner_state: optax.OptState  # the wrapped transform's state, untouched on skipped steps


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    initial_scale: float = 2.0**15,
    dynamic_growth_steps: int = 2000,
) -> optax.GradientTransformationExtraArgs:
    """Keras 3 ``LossScaleOptimizer`` around any transformation.

    The caller multiplies the loss by :func:`loss_scale` ``(state)`` before
    differentiating. Then, per call:

    * all gradients finite: ``g / scale`` (the scale before this call's
      change) goes to ``inner``; the counter grows, and when it reaches
      ``dynamic_growth_steps`` the scale doubles and the counter resets;
    * any non-finite gradient: the step is skipped entirely (zero update,
      ``inner``'s state unchanged: no iteration, no EMA, no accumulation), the
      scale halves and the counter resets.

    No bounds are put on the scale (Keras has none).

    Args:
      inner: the wrapped transformation (e.g. ``rj.rmsprop(...)``).
      initial_scale: positive starting scale (Keras: 2**15).
      dynamic_growth_steps: integer >= 1, finite steps between doublings.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.dynamic_loss_scale(rj.rmsprop(0.1))
      >>> p = jnp.array([1.0]); s = tx.init(p)
      >>> g = jax.grad(lambda p: rj.loss_scale(s) * jnp.sum(p ** 2))(p)
      >>> u, s = tx.update(g, s, p)
      >>> float(rj.loss_scale(s)), u.round(4)
      (32768.0, Array([-0.3162], dtype=float32))
    """
    _checks.check_range("initial_scale", initial_scale, 0.0, low_open=True)
    _checks.check_positive_int("dynamic_growth_steps", dynamic_growth_steps)
    declared_inner = inner
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return DynamicLossScaleState(
            scale=jnp.asarray(initial_scale, jnp.float32),
            counter=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        leaves = dense_parts(updates, deduplicate=False)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves else True

        def step(_):
            unscaled = map_gradients(lambda g: _divide(g, state.scale), updates)
            new_updates, inner_state = inner.update(
                unscaled, state.inner_state, params, **extra_args
            )
            grow = state.counter == dynamic_growth_steps - 1
            return (
                new_updates,
                inner_state,
                jnp.where(grow, state.scale * 2, state.scale),
                jnp.where(grow, 0, state.counter + 1).astype(jnp.int32),
            )

        def skip(_):
            shapes, _ = jax.eval_shape(
                lambda: inner.update(updates, state.inner_state, params, **extra_args)
            )
            zeros = jax.tree.map(zeros_like_shape, shapes)
            return zeros, state.inner_state, state.scale * 0.5, jnp.zeros([], jnp.int32)

        new_updates, inner_state, scale, counter = jax.lax.cond(finite, step, skip, None)
        return new_updates, DynamicLossScaleState(
            scale=scale, counter=counter, inner_state=inner_state
        )

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def flat_form(_, context):
        # Fed zeros where a gradient is None: a skipped step must stay skipped.
        flat_inner, after = _flat_forms.to_flat(declared_inner, context)
        flat_tx = dynamic_loss_scale(flat_inner, initial_scale, dynamic_growth_steps)
        return _flat_forms.zero_fed(flat_tx, context.present), after

    return _flat_forms.declare(tx, flat_form)


def loss_scale(opt_state: Any) -> jax.Array:
    """The current dynamic loss scale held in ``opt_state`` (however nested); jittable.

    Multiply the loss by it inside the jitted step, before ``jax.grad``.
    """
    return _trees.find_state(
        opt_state, DynamicLossScaleState, "loss_scale", "; wrap the optimizer in dynamic_loss_scale"
    ).scale
