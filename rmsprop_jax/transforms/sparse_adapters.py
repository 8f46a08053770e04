"""Row-sparse gradients meet foreign transforms: ``on_touched_rows`` and ``densify``.

An :class:`~rmsprop_jax.IndexedSlices` is refused by every optax transform
that maps over array leaves (its row numbers are opaque to arithmetic, see
:mod:`rmsprop_jax.sparse`). For an *elementwise* transform the right result is
known: the dense computation restricted to the touched rows. This wrapper
gives exactly that, and proves at trace time that the transform is
elementwise, so it never returns a number the dense computation would not.

The proof reads the jaxpr of ``inner.update``: starting from the touched rows
(the deduplicated gradient values and the gathered parameter rows), every
operation they flow into must be elementwise (``mul``, ``max``, ``select_n``,
``sqrt``, ...; calls such as ``pjit`` and ``custom_jvp_call`` are followed
inside). A reduction (a norm, a mean), a reshape, a gather, a sort, a matrix
product, or state that would keep values of the rows makes it refuse with an
error naming the leaf and the operation: ``clip_by_block_rms`` on the rows
alone would divide by the RMS of the rows, not of the table.

Transforms that need the dense gradient (``optax.MultiSteps``,
``optax.lookahead``, ``optax.clip_by_block_rms``) get it from :func:`densify`,
at the cost of a table-sized gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.extend.core import Literal

from rmsprop_jax import _trees
from rmsprop_jax.sparse import IndexedSlices, check_sparse_leaves

__all__ = ["densify", "on_touched_rows"]

# Primitives whose every output element depends on the same element of each input.
_ELEMENTWISE = frozenset(
    [
        "abs",
        "acos",
        "acosh",
        "add",
        "and",
        "asin",
        "asinh",
        "atan",
        "atan2",
        "atanh",
        "cbrt",
        "ceil",
        "clamp",
        "conj",
        "convert_element_type",
        "copy",
        "copy_p",
        "cos",
        "cosh",
        "digamma",
        "div",
        "eq",
        "erf",
        "erf_inv",
        "erfc",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "ge",
        "gt",
        "imag",
        "integer_pow",
        "is_finite",
        "le",
        "lgamma",
        "log",
        "log1p",
        "logistic",
        "lt",
        "max",
        "min",
        "mul",
        "ne",
        "neg",
        "nextafter",
        "not",
        "or",
        "pow",
        "real",
        "reduce_precision",
        "rem",
        "round",
        "rsqrt",
        "select_n",
        "sign",
        "sin",
        "sinh",
        "sqrt",
        "square",
        "stop_gradient",
        "sub",
        "tan",
        "tanh",
        "xor",
    ]
)
# Call-like primitives whose body is followed (inputs map one to one onto its inputs).
_CALLS = frozenset(
    [
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "remat",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
    ]
)


def _first_mixing(jaxpr: Any, sources: dict) -> tuple[Any, Any]:
    """Follows ``sources`` (var -> leaf ids) through ``jaxpr``.

    Returns the first non-elementwise primitive they reach and its leaf ids,
    or ``(None, var -> leaf ids)`` for every var that depends on them.
    """
    depends = dict(sources)
    for eqn in jaxpr.eqns:
        used = [
            (i, depends[v])
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, Literal) and v in depends
        ]
        if not used:
            continue
        origin = frozenset().union(*(ids for _, ids in used))
        name = eqn.primitive.name
        body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if name in _CALLS and body is not None:
            body = getattr(body, "jaxpr", body)
            found, inner = _first_mixing(body, {body.invars[i]: ids for i, ids in used})
            if found is not None:
                return found, inner
            for outer_var, inner_var in zip(eqn.outvars, body.outvars):
                if not isinstance(inner_var, Literal) and inner_var in inner:
                    depends[outer_var] = inner[inner_var]
            continue
        same_shape = (
            name == "broadcast_in_dim" and eqn.invars[0].aval.shape == eqn.outvars[0].aval.shape
        )
        if name not in _ELEMENTWISE and not same_shape:
            return name, origin
        for v in eqn.outvars:
            depends[v] = origin
    return None, depends


def on_touched_rows(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs an elementwise optax transform on the touched rows of row-sparse gradients.

    Each :class:`~rmsprop_jax.IndexedSlices` leaf of ``updates`` is
    deduplicated; ``inner`` sees its rows ``values[k, ...]`` as a dense leaf,
    with the same rows of the parameter as that leaf's ``params``, and its
    result becomes the slice's values again. Dense leaves pass through
    ``inner`` unchanged. The result equals ``inner`` on the dense gradient, on
    the touched rows; untouched rows get no update (lazy, as rmsprop_jax's own
    sparse path: ``add_decayed_weights`` decays only the touched rows).

    ``inner`` must be elementwise in the rows; this is checked on its jaxpr at
    trace time (see the module docstring) and a transform that is not (a
    norm, a mean, per-parameter state) raises ``ValueError`` naming the leaf
    and the operation. Trees without sparse leaves go to ``inner`` as they are.

    Args:
      inner: the transform to run, e.g. ``optax.scale(0.5)``, ``optax.clip(1.0)``,
        ``optax.scale_by_schedule(s)``, ``optax.add_decayed_weights(1e-4)``.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> g = {"embed": rj.IndexedSlices(jnp.array([1, 5]), jnp.ones((2, 3)), (10, 3))}
      >>> tx = optax.chain(rj.on_touched_rows(optax.scale(0.5)), rj.rmsprop(0.1))
      >>> u, _ = tx.update(g, tx.init({"embed": jnp.zeros((10, 3))}))
      >>> u["embed"].indices
      Array([1, 5], dtype=int32)
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        check_sparse_leaves(updates, "grads")
        flat, treedef = _trees.flatten_with_none(updates)
        positions = [i for i, (_, g) in enumerate(flat) if isinstance(g, IndexedSlices)]
        if not positions:
            return inner.update(updates, state, params, **extra_args)
        names = {i: _trees.path_name(flat[i][0]) for i in positions}
        rows = {i: flat[i][1].deduplicate() for i in positions}
        param_leaves = None if params is None else treedef.flatten_up_to(params)

        def run(values, param_rows):
            grads = [g for _, g in flat]
            tables = None if param_leaves is None else list(param_leaves)
            for i in positions:
                grads[i] = values[i]
                if tables is not None and tables[i] is not None:
                    tables[i] = param_rows[i]
            return inner.update(
                treedef.unflatten(grads),
                state,
                None if tables is None else treedef.unflatten(tables),
                **extra_args,
            )

        values = {i: rows[i].values for i in positions}
        param_rows = {
            i: rows[i].gather(param_leaves[i])
            for i in positions
            if param_leaves is not None and param_leaves[i] is not None
        }
        _check_elementwise(run, values, param_rows, treedef, names)
        new_updates, new_state = run(values, param_rows)
        new_flat = treedef.flatten_up_to(new_updates)
        for i in positions:
            new_flat[i] = rows[i].replace_values(new_flat[i].astype(rows[i].dtype))
        return treedef.unflatten(new_flat), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def densify() -> optax.GradientTransformation:
    """Turns every :class:`~rmsprop_jax.IndexedSlices` into its dense gradient (table-sized).

    For transforms that need dense trees, e.g. ``optax.chain(rj.densify(),
    optax.MultiSteps(rj.rmsprop(), 4).gradient_transformation())`` or
    ``optax.lookahead(optax.chain(rj.rmsprop(), rj.densify()), 5, 0.5)``. The
    result is the dense computation (duplicate rows summed); the cost is that
    of a dense gradient.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> g = rj.IndexedSlices(jnp.array([1, 1]), jnp.ones((2, 1)), (3, 1))
      >>> rj.densify().update(g, None)[0]
      Array([[0.],
             [2.],
             [0.]], dtype=float32)
    """

    def update_fn(updates, state, params=None):
        del params
        check_sparse_leaves(updates, "grads")
        dense = jax.tree.map(
            lambda g: g.to_dense() if isinstance(g, IndexedSlices) else g,
            updates,
            is_leaf=lambda x: isinstance(x, IndexedSlices),
        )
        return dense, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_elementwise(run, values, param_rows, treedef, names) -> None:
    """Raises ValueError unless ``run``'s outputs depend elementwise on each leaf's own rows."""
    try:
        closed, out_shapes = jax.make_jaxpr(run, return_shape=True)(values, param_rows)
    except (TypeError, ValueError) as error:
        leaves = ", ".join(repr(name) for name in names.values())
        raise ValueError(
            f"rj.on_touched_rows: the wrapped transform fails on the touched rows of grads "
            f"leaves {leaves} ({type(error).__name__}: {str(error).splitlines()[0]}). It is not "
            "elementwise: its state is shaped like the whole table. rmsprop_jax's transforms "
            "(rj.rmsprop, rj.clip_by_global_norm, ...) take IndexedSlices directly: chain them "
            "without this wrapper."
        ) from error
    jaxpr = closed.jaxpr
    # make_jaxpr flattens (values, param_rows) dicts in sorted-key order.
    in_leaves = jax.tree_util.tree_flatten_with_path((values, param_rows))[0]
    sources = {var: frozenset([path[1].key]) for var, (path, _) in zip(jaxpr.invars, in_leaves)}
    operation, found = _first_mixing(jaxpr, sources)
    if operation is not None:
        leaf = names[min(found)]
        raise ValueError(
            f"rj.on_touched_rows: the wrapped transform is not elementwise on the rows of "
            f"grads leaf {leaf!r} (it applies {operation!r} to them), so running it on the "
            "touched rows alone would not equal the dense computation. Use rmsprop_jax's "
            "sparse-aware transforms (rj.clip_by_global_norm, rj.clip_by_norm, "
            "rj.global_norm, rj.add_decoupled_weight_decay), or give this leaf a dense gradient."
        )
    update_shapes, _ = out_shapes
    n_updates = len(jax.tree.leaves(update_shapes))
    update_positions = [
        i for i, leaf in enumerate(treedef.flatten_up_to(update_shapes)) if leaf is not None
    ]
    for index, var in enumerate(jaxpr.outvars):
        if isinstance(var, Literal) or var not in found:
            continue
        owner = update_positions[index] if index < n_updates else None
        stray = found[var] - {owner}
        if stray:
            where = (
                "the transform's state"
                if owner is None
                else f"grads leaf {names.get(owner, owner)!r}"
            )
            raise ValueError(
                f"rj.on_touched_rows: the rows of grads leaf {names[min(stray)]!r} flow into "
                f"{where}: the wrapped transform keeps per-parameter or data-dependent state, "
                "or mixes leaves, so it cannot run on the touched rows alone. Use rmsprop_jax's "
                "own transforms for this leaf, or give it a dense gradient."
            )
