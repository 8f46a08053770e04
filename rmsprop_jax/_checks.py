"""Argument validation and pytree checks shared by every factory.

Hyperparameters are checked when the optimizer is built, with a message that
names the argument, the value and the valid range. Values that are traced
(e.g. under ``optax.inject_hyperparams`` inside ``jit``) cannot be inspected and
are accepted as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
    """``value`` as a Python float, or None when it is traced or not a scalar."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - any non-numeric object
        return None
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError unless ``low <= value <= high`` (open ends as asked)."""
    number = concrete_float(value)
    if number is None:
        if isinstance(value, jax.core.Tracer) or callable(value):
            return
        raise TypeError(f"{name} must be a real number, got {value!r}")
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if math.isnan(number) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def is_static_zero(value: Any) -> bool:
    """True when ``value`` is a Python number equal to 0, or None.

    Arrays (concrete or traced) count as non-zero: under
    ``optax.inject_hyperparams`` the same hyperparameter is a concrete array at
    ``init`` and a tracer at ``update``, and both must build the same state.
    """
    if value is None:
        return True
    return isinstance(value, (int, float)) and value == 0


def params_required(transform: str) -> ValueError:
    """The error raised when a transform that reads the parameters gets none."""
    return ValueError(f"{transform} reads the parameters: call update(grads, state, params)")


def is_leaf_gradient(x: Any) -> bool:
    """Leaves that must not be descended into: None (a missing gradient) and IndexedSlices."""
    from rmsprop_jax.sparse import IndexedSlices  # noqa: PLC0415 - sparse imports nothing of ours

    return x is None or isinstance(x, IndexedSlices)


def flatten_with_none(tree: Any):
    """Flattens ``tree`` keeping ``None`` as a leaf, so a missing gradient keeps its slot."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf_gradient)


def path_name(path) -> str:
    """A leaf's path as ``"dense/bias"``, the name used in messages and regexes."""
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def check_same_structure(grads: Any, reference: Any, reference_name: str = "params") -> None:
    """Raises ValueError naming the first path where ``grads`` and ``reference`` differ."""
    grad_leaves, grad_def = flatten_with_none(grads)
    ref_leaves, ref_def = flatten_with_none(reference)
    if grad_def == ref_def:
        return
    grad_paths = [path_name(p) for p, _ in grad_leaves]
    ref_paths = [path_name(p) for p, _ in ref_leaves]
    for i, (gp, rp) in enumerate(zip(grad_paths, ref_paths)):
        if gp != rp:
            raise ValueError(
                f"grads and {reference_name} have different tree structures: first "
                f"difference at leaf {i}: grads has {gp!r}, {reference_name} has {rp!r}"
            )
    if len(grad_paths) != len(ref_paths):
        longer, name = (
            (grad_paths, "grads")
            if len(grad_paths) > len(ref_paths)
            else (ref_paths, reference_name)
        )
        raise ValueError(
            f"grads and {reference_name} have different tree structures: only "
            f"{name} has {longer[min(len(grad_paths), len(ref_paths))]!r}"
        )
    raise ValueError(
        f"grads and {reference_name} have different tree structures (same leaf "
        f"paths, different containers):\n grads: {grad_def}\n "
        f"{reference_name}: {ref_def}"
    )


def check_inexact_leaves(tree: Any, what: str) -> None:
    """Raises TypeError naming the first leaf that is not float or complex (or a malformed IndexedSlices)."""
    from rmsprop_jax.sparse import check_sparse_leaves  # noqa: PLC0415 - sparse imports nothing of ours

    check_sparse_leaves(tree, what)
    for path, leaf in flatten_with_none(tree)[0]:
        if leaf is None:
            continue
        dtype = jnp.result_type(getattr(leaf, "values", leaf))
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{what} leaf {path_name(path)!r} has dtype {dtype}; RMSprop needs "
                "float or complex leaves. Leave non-trainable leaves out of the tree, "
                "use None for them, or mask them with optax.masked / optax.partition."
            )


def map_leaves(fn: Callable, grads: Any, *trees: Any) -> list:
    """Applies ``fn(path, g, *slots)`` to each leaf of ``grads``; None grads give None.

    Slot trees that are None (an absent slot) are passed as None for every leaf.
    Returns the flat list of results; rebuild with ``unflatten``.
    """
    leaves, treedef = flatten_with_none(grads)
    flat = [treedef.flatten_up_to(t) if t is not None else [None] * len(leaves) for t in trees]
    return [fn(path, g, *slots) for (path, g), *slots in zip(leaves, *flat)], treedef


def find_state(opt_state: Any, cls: type, purpose: str, hint: str = "") -> Any:
    """The single instance of state class ``cls`` nested anywhere in ``opt_state``.

    Raises ValueError (starting with ``purpose``) when there is none or several.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
        if isinstance(s, cls)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{purpose}: expected exactly one {cls.__name__} in the optimizer state, "
            f"found {len(found)}" + (hint if not found else "")
        )
    return found[0]


def check_positive_int(name: str, value: Any) -> None:
    """None, or an integer >= 1 (bools rejected)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
