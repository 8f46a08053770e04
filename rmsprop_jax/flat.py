r"""``rj.contiguous(tx)``: the same optimizer with its state stored flat, one buffer per dtype.

This module (``rmsprop_jax.flat``, ``rj.flat``) holds :func:`contiguous`, the flat
data it works on (:func:`flatten`, :class:`FlatParams`, :class:`Layout`,
:class:`ContiguousState`, :func:`ema_params`) and the two declarations a user
may need (:func:`chain`, :func:`elementwise`).

A model with many small leaves (an RL agent, a small MLP: 100K parameters in
200 tensors) spends most of an optimizer step on per-leaf overhead, not on
arithmetic: every leaf of the parameters, the gradients and every slot of the
state is a separate buffer, a separate kernel and a separate argument of the
jitted step. ``rj.contiguous(tx)`` keeps the semantics of ``tx`` over the same
pytrees and stores every per-parameter slot (RMSprop's ``v``, ``a``, ``m``, the
weight EMA, the gradient accumulators) as ONE 1-D buffer per dtype. A step
concatenates the gradients of each dtype (one concatenate), runs the
transformation once over the flat buffers (one fused loop) and splits the
update back into the tree.

Two ways to use it:

* **Tree in, tree out** (drop-in): ``tx = rj.contiguous(rj.rmsprop(...))``
  with the parameters and gradients as usual. The state shrinks to one buffer
  per dtype and slot; the parameters stay a tree, so the step still reads and
  writes one buffer per leaf.
* **Flat parameters** (fastest): ``flat, unflatten = rj.flat.flatten(params)``
  keeps the parameters themselves in one buffer per dtype; the loss reads
  ``unflatten(flat)`` (slices, free), ``jax.grad`` with respect to ``flat``
  returns flat gradients (the backward of the slices is the one
  concatenate), and ``tx.update`` / :func:`rmsprop_jax.apply_updates` work on
  the buffers directly: the optimizer step is the floor's single fused loop.

  >>> import jax, jax.numpy as jnp, rmsprop_jax as rj
  >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  >>> flat, unflatten = rj.flat.flatten(params)
  >>> tx = rj.contiguous(rj.rmsprop(0.1, exclude_from_weight_decay="b", weight_decay=0.1))
  >>> state = tx.init(flat)
  >>> loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum((p["b"] - 1) ** 2)
  >>> grads = jax.grad(lambda f: loss(unflatten(f)))(flat)
  >>> updates, state = tx.update(grads, state, flat)
  >>> flat = rj.apply_updates(flat, updates)
  >>> unflatten(flat)["b"].round(4)
  Array([0.3162, 0.3162, 0.3162], dtype=float32)

Why, and what each path buys (2-core CPU shared with other jobs, load 4-8, so
the ratios move by 2x between runs; float32; jit + donation; median of 21-31
interleaved repeats). On XLA:CPU the cost of a small step is per BUFFER: a
jitted call passing 200 donated arrays through untouched takes ~270 us (one
array: ~4 us), one trivial kernel per leaf adds ~260 us more. Per-leaf
optimizers pay that for the parameters, the gradients and every slot;
``contiguous`` on a tree pays it for the parameters and gradients only (it
cannot do less while they are trees: ``tree p+g`` below, a step with no
optimizer at all, is the bound); flat parameters pay it for one buffer per
dtype. Optimizer step alone, 100K parameters in 200 leaves, ratio to the
floor (one fused loop over one flat buffer; one run, flat path 0.8-1.4x over
five runs)::

                                 plain   centered+momentum   full Keras set
    rj.rmsprop, per leaf          7.9x         10.7x              39x
    optax                         7.5x         10.6x              39x
    rj.contiguous, tree           7.9x          4.0x              9.0x
    tree p+g, no optimizer        4.1x          2.6x              6.1x
    rj.contiguous, flat params    1.01x         0.98x             1.01x

(the issue's target, <= 2x, needs the flat parameters). **The tree path is
for small leaves only.** Every step it concatenates the gradients and splits
the flat update: parameter-sized temporaries allocated per step. At 1M
parameters in 100 leaves it gains little (``python -m rmsprop_jax bench``:
2.66x vs rj's 2.32x plain, 1.69x vs 2.29x full), and at 16M in 160 leaves it
LOSES (8.3x plain, 4.8x full, where per-leaf rj is 1.06x / 1.02x: 122 MB of
temporaries, and XLA:CPU's concatenate is slow); flat parameters stay at
0.8-1.2x everywhere. A whole
training step of an MLP (100 residual layers of a 31x31 kernel and a bias:
99,200 parameters, 200 leaves, batch 32, forward + backward + optimizer)::

                                 plain     full Keras set
    p - lr*g per leaf (no state)  2.5 ms      1.6 ms
    rj.rmsprop, per leaf          4.2 ms      8.5 ms
    optax.rmsprop                 4.4 ms
    rj.contiguous, tree           3.7 ms      2.8 ms
    rj.contiguous, flat params    2.3 ms      1.6 ms

The trade-off of flat parameters: the model must read its weights through
``unflatten(flat)`` (free slices) and checkpoints hold the buffers (or
``unflatten(flat)``); in exchange the whole step costs what the model costs.

What keeps its per-leaf meaning (each is a flat, segment-aware version):

* Keras ``clipnorm`` (:func:`rmsprop_jax.clip_by_norm`): the norm of every
  tensor is a segment sum over the flat buffer;
* ``exclude_from_weight_decay`` (regexes on leaf paths, bool pytrees,
  callables): evaluated on the original tree and applied as a flat mask
  (ranges of an iota, or a constant mask when there are many ranges);
* ``None`` gradients: the leaf's slots stay untouched and its update is
  ``None``, exactly as the per-leaf transforms do (with a weight EMA the
  update is zero and the average still moves, as per leaf);
* global norms, weight EMA, accumulation, loss scaling, value clipping and
  the RMSprop arithmetic are elementwise or tree-global: unchanged.

How it knows: every rmsprop_jax factory declares, next to its code, the form
its transformation takes over flat buffers (``rmsprop_jax/_flat_forms.py``
describes the forms); ``contiguous`` runs the declared forms and inspects no
code. Other libraries' transformations are opaque, an ``optax.chain``
included: build chains with :func:`chain` (``optax.chain``'s signature) and
mark an elementwise transformation with :func:`elementwise`
(``rj.flat.elementwise(optax.clip(1.0))``), or vouch for every undeclared
piece with ``assume_elementwise=True``.

What is rejected with an error: :class:`~rmsprop_jax.IndexedSlices`
gradients (a row-sparse update of a table would become a dense one; keep the
table per-leaf, e.g. with :func:`rmsprop_jax.param_groups`), gradients whose
dtype differs from their parameter's, ``None`` gradients together with
undeclared transformations, slots that are not one array per parameter (e.g.
blockwise quantized state, whose blocks are per tensor), and any undeclared
transformation without ``assume_elementwise=True``.

Not meant for sharded models (the concatenation gathers the leaves) nor for
huge leaves (no gain: per-leaf overhead is already negligible there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _checks, _flat_forms, _trees, transforms
from rmsprop_jax._flat_buffers import (
    FlatParams,
    Layout,
    concat,
    make_layout,
    static_flags,
    unflatten,
)
from rmsprop_jax.sparse import IndexedSlices

__all__ = [
    "ContiguousState",
    "FlatParams",
    "Layout",
    "chain",
    "contiguous",
    "elementwise",
    "ema_params",
    "flatten",
]


def flatten(params: Any) -> tuple[FlatParams, Callable[[FlatParams], Any]]:
    """``params`` as one buffer per dtype, and the function that gives the tree back.

    Keep the parameters in this form across training steps so that no step
    concatenates or splits them: differentiate ``loss(unflatten(flat))`` with
    respect to ``flat`` and give ``flat`` to ``rj.contiguous(tx)``. Leaves of
    the same dtype are stored in tree order.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> flat, unflatten = rj.flat.flatten({"a": jnp.ones(2), "b": jnp.zeros((1, 2))})
      >>> flat
      FlatParams(float32: float32[4]; 2 leaves)
      >>> unflatten(flat)["b"]
      Array([[0., 0.]], dtype=float32)
    """
    if isinstance(params, FlatParams):
        return params, _unflatten_fn(params.layout)
    layout = make_layout(params)
    leaves = [leaf for _, leaf in _trees.flatten_with_none(params)[0]]
    return FlatParams(concat(layout, leaves), layout), _unflatten_fn(layout)


def _unflatten_fn(layout: Layout) -> Callable[[FlatParams], Any]:
    def unflatten(flat: FlatParams) -> Any:
        """The pytree of ``flat`` (slices of its buffers)."""
        if not isinstance(flat, FlatParams) or flat.layout != layout:
            raise ValueError("unflatten: expected a FlatParams with the layout it was made for")
        return flat.unflatten()

    return unflatten


# --------------------------------------------------------------------------- state


@jax.tree_util.register_pytree_with_keys_class
class ContiguousState:
    """State of ``rj.contiguous(tx)``: ``inner`` is ``tx``'s state over :class:`FlatParams`."""

    __slots__ = ("inner", "layout")

    def __init__(self, inner: Any, layout: Layout):
        self.inner = inner
        self.layout = layout

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("inner"), self.inner)], self.layout

    def tree_flatten(self):
        return (self.inner,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)

    def __repr__(self):
        return f"ContiguousState({self.layout!r}, inner={self.inner!r})"


def ema_params(opt_state: Any) -> Any:
    """The EMA weights held in a ``rj.contiguous`` state, as the parameters' tree.

    (:func:`rmsprop_jax.ema_params` returns them as :class:`FlatParams`.)
    """
    found = transforms.ema_params(opt_state)
    return found.unflatten() if isinstance(found, FlatParams) else found


# --------------------------------------------------------------------------- declaring transforms


def chain(*transformations: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*transformations)`` that ``rj.contiguous`` can see into.

    ``rj.contiguous`` does not look inside other libraries' transformations, so
    an ``optax.chain`` is one opaque transformation to it; this chain declares
    its pieces (each is then converted on its own, and must be declared too).

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.flat.chain(rj.flat.elementwise(optax.clip(1.0)), rj.rmsprop(0.1))
      >>> rj.contiguous(tx).init({"w": jnp.ones(3)}).layout
      Layout(1 leaves -> float32[3])
    """
    return _flat_forms.chain(*transformations)


def elementwise(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``tx``, declared right over flat buffers as it is (the user vouches for it).

    For a transformation that treats every element alike or reduces only over
    the whole tree (``optax.clip``, ``optax.scale_by_adam``,
    ``optax.clip_by_global_norm``), whose state is scalars and one slot per
    parameter, and that maps a None gradient to None. ``rj.contiguous`` then
    feeds it zeros where a gradient is None, gives such leaves a None update
    and keeps their slots, as per leaf. Not for per-tensor reductions, masks
    by path or per-leaf shapes (``optax.clip_by_block_rms``, ``optax.masked``).
    """
    return _flat_forms.declare(optax.with_extra_args_support(tx), _flat_forms.per_leaf)


# --------------------------------------------------------------------------- the wrapper


def contiguous(
    tx: optax.GradientTransformation, *, assume_elementwise: bool = False
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its per-parameter state stored as one flat buffer per dtype.

    Same ``init`` / ``update`` over the same pytrees as ``tx`` (updates agree
    to float rounding: sums such as global norms are taken in another order),
    with :class:`ContiguousState` holding ``tx``'s state over
    :class:`FlatParams`. ``init`` and ``update`` also accept the
    :class:`FlatParams` of :func:`flatten` (then ``update`` returns
    :class:`FlatParams` updates and nothing is concatenated or split).

    Every piece of ``tx`` runs in the flat form its factory declares (see
    ``rmsprop_jax/_flat_forms.py``); nothing is inferred from code.

    Args:
      tx: ``rj.rmsprop(...)``, any preset, ``rj.rmsprop_update(...)``, the
        ``rj`` transforms, and :func:`chain` / :func:`elementwise` for the
        rest. Per-leaf features keep their per-leaf meaning (see the module
        docstring); anything undeclared raises ``NotImplementedError`` at once.
      assume_elementwise: run undeclared transformations (an ``optax.chain``,
        optax's transforms) as they are, vouching that they are elementwise or
        reduce only over the whole tree; None gradients are then refused.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> tx = rj.contiguous(rj.rmsprop(0.1, momentum=0.9, centered=True))
      >>> state = tx.init(params)
      >>> state.inner.momentum
      FlatParams(float32: float32[6]; 2 leaves)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["bias"].round(4)
      Array([-0.3333, -0.3333], dtype=float32)
    """
    start = _flat_forms.FlatContext(assume_elementwise=assume_elementwise)
    # Built now, so that an undeclared piece is refused at once; init uses it (the state does
    # not depend on which leaves have a gradient), update rebuilds it per trace.
    init_tx, init_context = _flat_forms.to_flat(tx, start)

    def init_fn(params):
        if isinstance(params, FlatParams):
            return ContiguousState(init_tx.init(params), params.layout)
        first = None
        if init_context.leading is not None:  # e.g. the decayed leaves: one mask range then
            order = static_flags(
                init_context.leading(params), make_layout(params), "the leaf order"
            )
            first = order.__getitem__
        layout = make_layout(params, first)
        leaves = [p for _, p in _trees.flatten_with_none(params)[0]]
        return ContiguousState(init_tx.init(FlatParams(concat(layout, leaves), layout)), layout)

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, ContiguousState):
            raise TypeError("rj.contiguous: the state was not made by this transformation's init")
        layout = state.layout
        flat_g, flat_p, present = _flat_inputs(layout, updates, params)
        # The flat form depends on which leaves have a gradient: built per trace (Python only).
        flat_tx, context = _flat_forms.to_flat(tx, start._replace(present=present))
        new_flat, inner_state = flat_tx.update(flat_g, state.inner, flat_p, **extra_args)
        new_state = ContiguousState(inner_state, layout)
        if isinstance(updates, FlatParams):
            return new_flat, new_state
        return (
            unflatten(layout, new_flat.buffers, context.present, for_output=True),
            new_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flat_inputs(layout: Layout, updates, params) -> tuple[FlatParams, Any, tuple | None]:
    """The gradients and parameters as FlatParams of ``layout``, and which leaves have a gradient."""
    if not isinstance(updates, FlatParams):
        flat_g, present = _flatten_grads(layout, updates)
        return flat_g, None if params is None else _flatten_params(layout, params), present
    if updates.layout != layout:
        raise ValueError(
            "rj.contiguous: the FlatParams gradients have another layout than the state; "
            "initialise with the same FlatParams (tx.init(flat))"
        )
    if params is not None and not (isinstance(params, FlatParams) and params.layout == layout):
        raise ValueError("rj.contiguous: with FlatParams gradients, pass the FlatParams parameters")
    return updates, params, None


def _leaves_like_layout(layout: Layout, tree, what: str) -> list:
    """``(path, leaf)`` of ``tree`` (None leaves included), which must have the layout's structure."""
    leaves, treedef = _trees.flatten_with_none(tree)
    if treedef != layout.treedef:
        _checks.check_same_structure(tree, layout.treedef.unflatten([0] * len(layout.leaves)))
        raise ValueError(
            f"rj.contiguous: {what} have structure {treedef}, the state {layout.treedef}"
        )
    return leaves


def _flatten_grads(layout: Layout, grads) -> tuple[FlatParams, tuple | None]:
    leaves = _leaves_like_layout(layout, grads, "grads")
    values: list[Any] = []
    present = []
    for (path, g), spec in zip(leaves, layout.leaves):
        name = _trees.path_name(path)
        if isinstance(g, IndexedSlices):
            raise TypeError(
                f"rj.contiguous: grads leaf {name!r} is an IndexedSlices; row-sparse updates "
                "need the per-leaf optimizer (flat state would update the whole table densely). "
                "Keep the table out of the contiguous transform, e.g. with rj.param_groups / "
                "optax.partition"
            )
        if spec is None:
            if g is not None:
                raise ValueError(
                    f"rj.contiguous: grads leaf {name!r} is set but the parameter was None"
                )
            values.append(None)
            present.append(False)
            continue
        present.append(g is not None)
        if g is not None:
            _check_leaf(layout, spec, g, name, "grads")
        values.append(g)
    flat = FlatParams(concat(layout, values), layout)
    real = [p for p, spec in zip(present, layout.leaves) if spec is not None]
    return flat, (None if all(real) else tuple(present))


def _flatten_params(layout: Layout, params) -> FlatParams:
    leaves = _leaves_like_layout(layout, params, "params")
    values: list[Any] = []
    for (path, p), spec in zip(leaves, layout.leaves):
        if spec is not None:
            if p is None:
                raise ValueError(f"rj.contiguous: params leaf {_trees.path_name(path)!r} is None")
            _check_leaf(layout, spec, p, _trees.path_name(path), "params")
        values.append(p)
    return FlatParams(concat(layout, values), layout)


def _check_leaf(layout: Layout, spec, leaf, name: str, what: str) -> None:
    group, _, shape = spec
    dtype = jnp.dtype(jnp.result_type(leaf)).name
    expected = layout.groups[group][0]
    if tuple(np.shape(leaf)) != shape:
        raise ValueError(
            f"rj.contiguous: {what} leaf {name!r} has shape {tuple(np.shape(leaf))}, "
            f"the parameter {shape}"
        )
    if dtype != expected:
        raise TypeError(
            f"rj.contiguous: {what} leaf {name!r} has dtype {dtype} but the parameter is "
            f"{expected}; the flat state is grouped by the parameters' dtypes (cast the "
            "gradients to them, or use the per-leaf optimizer)"
        )
