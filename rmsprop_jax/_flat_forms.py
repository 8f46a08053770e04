"""How a transformation declares its form over flat buffers (what ``rj.contiguous`` runs).

``rj.contiguous(tx)`` runs a *flat form* of ``tx`` over
:class:`~rmsprop_jax.flat.FlatParams`. It never inspects code: every
rmsprop_jax factory declares the form of the transformation it builds, next to
it (:func:`declare`), and a transformation without a declaration is refused
unless the user vouches for it. A form is a function ``form(tx, context) ->
(flat_tx, context_after)``; :class:`FlatContext` carries the static facts a
form may need, explicitly (no global state): which leaves have a gradient in
the update being traced, and which leaves should be stored first.

The forms, by what a transformation does over a flat buffer:

* :func:`per_leaf`: its arithmetic is already right over the buffers
  (elementwise, tree-global, or made segment-aware in its own module, as
  ``clip_by_norm``'s per-tensor norm). A leaf without a gradient is fed
  zeros, gets a zero update and keeps its per-parameter state, as the
  per-leaf transformation leaves a None gradient's slots untouched.
* :func:`fills_every_leaf`: as :func:`per_leaf`, but every leaf gets an update
  and its state moves (Keras' weight EMA averages every weight every step);
  from there on every leaf counts as present.
* a wrapper's own form (:func:`chain`, ``accumulate_gradients``,
  ``dynamic_loss_scale``) rebuilds the wrapper around its pieces' forms,
  through :func:`to_flat`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from rmsprop_jax._flat_buffers import FlatParams, select

__all__ = [
    "FORM_ATTRIBUTE",
    "FlatContext",
    "chain",
    "declare",
    "fills_every_leaf",
    "per_leaf",
    "to_flat",
    "with_extra_args",
    "wraps",
    "zero_fed",
]

#: Attribute of a transformation's ``update`` function holding its flat form.
FORM_ATTRIBUTE = "rj_flat_form"


class FlatContext(NamedTuple):
    """The static facts a flat form reads, threaded from one piece of a chain to the next."""

    present: tuple[bool, ...] | None = None  # per leaf of the layout: has a gradient (None: all)
    leading: Callable[[Any], Any] | None = None  # params -> bool tree: leaves to store first
    assume_elementwise: bool = False  # undeclared transformations are run as they are
    foreign: tuple[str, ...] = ()  # the undeclared transformations accepted so far


Form = Callable[[Any, FlatContext], "tuple[optax.GradientTransformationExtraArgs, FlatContext]"]


def declare(tx: Any, form: Form) -> Any:
    """``tx`` (same type, same functions) with ``form`` declared as its flat form."""
    update = tx.update

    def declared_update(*args, **kwargs):
        return update(*args, **kwargs)

    setattr(declared_update, FORM_ATTRIBUTE, form)
    declared_update.__wrapped__ = update  # type: ignore[attr-defined]
    return type(tx)(tx.init, declared_update)


def to_flat(tx: Any, context: FlatContext) -> tuple[optax.GradientTransformationExtraArgs, Any]:
    """The flat form of ``tx`` and the context after it; undeclared ``tx`` is refused."""
    form = getattr(tx.update, FORM_ATTRIBUTE, None)
    if form is not None:
        flat_tx, context = form(tx, context)
        return optax.with_extra_args_support(flat_tx), context
    label = f"the transformation whose update is {tx.update!r}"
    if not context.assume_elementwise:
        raise NotImplementedError(
            f"rj.contiguous cannot tell whether {label} keeps its meaning over flat buffers "
            "(a per-tensor norm, a mask by path or a per-leaf shape would change), and it does "
            "not look inside other libraries' transformations (an optax.chain is opaque). "
            "Build chains with rj.flat.chain (optax.chain's signature); mark a transformation "
            "that is elementwise or reduces only over the whole tree with rj.flat.elementwise(tx), "
            "or vouch for all of them with rj.contiguous(tx, assume_elementwise=True)."
        )
    if context.present is not None:
        raise ValueError(
            "rj.contiguous: None gradients need every transformation's flat form declared "
            f"({label} was accepted by assume_elementwise=True, which cannot say what it does "
            "with a leaf that has no gradient); pass zeros instead, or mark it with "
            "rj.flat.elementwise"
        )
    return optax.with_extra_args_support(tx), context._replace(foreign=(*context.foreign, label))


def zero_fed(tx: Any, present: tuple[bool, ...] | None) -> optax.GradientTransformationExtraArgs:
    """``tx`` fed zeros, not whatever an earlier piece left, on the leaves without a gradient."""
    tx = optax.with_extra_args_support(tx)
    if present is None:
        return tx

    def update_fn(updates, state, params=None, **extra_args):
        return tx.update(select(present, updates, 0), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def per_leaf(tx: Any, context: FlatContext) -> tuple[Any, FlatContext]:
    """The form of a transformation whose arithmetic is right over the buffers as it is.

    Its state must be scalars and per-parameter slots (one 1-D array per
    dtype: checked at ``init``). A leaf without a gradient is fed zeros, its
    update is zero and its slots keep their values.
    """
    present = context.present
    inner = zero_fed(tx, present)

    def init_fn(params):
        state = inner.init(params)
        if isinstance(params, FlatParams):
            _check_per_parameter(state, params)
        return state

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        if present is None:
            return new_updates, new_state
        keep = lambda new, old: select(present, new, old) if isinstance(new, FlatParams) else new
        is_flat = lambda x: isinstance(x, FlatParams)
        return select(present, new_updates, 0), jax.tree.map(
            keep, new_state, state, is_leaf=is_flat
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn), context


def fills_every_leaf(tx: Any, context: FlatContext) -> tuple[Any, FlatContext]:
    """The form of an elementwise transformation that updates every leaf, gradient or not."""
    return zero_fed(tx, context.present), context._replace(present=None)


def wraps(inner: Any) -> Form:
    """The form of a wrapper whose flat version is ``inner``'s (a check of the per-leaf state)."""
    return lambda tx, context: to_flat(inner, context)


def chain(*pieces: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*pieces)``, with its flat form: the chain of the pieces' flat forms."""

    def form(tx, context):
        flat_pieces = []
        for piece in pieces:
            flat_piece, context = to_flat(piece, context)
            flat_pieces.append(flat_piece)
        return optax.chain(*flat_pieces), context

    return declare(optax.chain(*pieces), form)


def with_extra_args(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.with_extra_args_support(tx)``, keeping ``tx``'s flat form."""
    wrapped = optax.with_extra_args_support(tx)
    return wrapped if wrapped is tx else declare(wrapped, wraps(tx))


def _check_per_parameter(state: Any, params: FlatParams) -> None:
    """Every non-scalar leaf of ``state`` is a 1-D buffer of ``params``' layout."""
    sizes = [(size,) for _, size in params.layout.groups]
    is_flat = lambda x: isinstance(x, FlatParams)
    for path, value in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_flat)[0]:
        if not isinstance(value, FlatParams) and np.ndim(value) == 0:
            continue  # the step count, hyperparameters
        ok = isinstance(value, FlatParams) and all(
            len(jax.tree.leaves(b)) == 1 and tuple(getattr(b, "shape", ())) == size
            for b, size in zip(value.buffers, sizes)
        )
        if not ok:
            raise NotImplementedError(
                f"rj.contiguous: the state field {jax.tree_util.keystr(path)} is not one 1-D "
                "array per dtype (blockwise-quantized int8 state is per tensor: its blocks and "
                "its small-tensor rule would change under flattening); use the per-leaf "
                "optimizer, or accumulator_dtype=None / jnp.bfloat16"
            )
