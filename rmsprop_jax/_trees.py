"""Pytree helpers shared by the transforms: leaf paths, None-keeping flattening, state lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = [
    "find_state",
    "flatten_with_none",
    "is_leaf_gradient",
    "map_leaves",
    "path_name",
]


def is_leaf_gradient(x: Any) -> bool:
    """Leaves that must not be descended into: None (a missing gradient) and IndexedSlices."""
    from rmsprop_jax.sparse import IndexedSlices  # sparse imports nothing of ours

    return x is None or isinstance(x, IndexedSlices)


def flatten_with_none(tree: Any):
    """Flattens ``tree`` keeping ``None`` as a leaf, so a missing gradient keeps its slot."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf_gradient)


def path_name(path) -> str:
    """A leaf's path as ``"dense/bias"``, the name used in messages and regexes."""
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def map_leaves(fn: Callable, grads: Any, *trees: Any) -> tuple[list, Any]:
    """Applies ``fn(path, g, *slots)`` to each leaf of ``grads``; None grads give None.

    Slot trees that are None (an absent slot) are passed as None for every leaf.
    Returns the flat list of results and the treedef to rebuild them with.
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
