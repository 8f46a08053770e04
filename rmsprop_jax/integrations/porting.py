"""Optimizer-state import / export for porting mid-training (PyTorch and Keras).

PyTorch: ``torch.optim.RMSprop.state_dict()`` keeps per-parameter
``square_avg`` (our ``velocity``), ``grad_avg`` (``average_gradient``),
``momentum_buffer`` (``momentum``) and ``step``, indexed by the order of the
optimizer's parameters. Here that order is the leaf order of ``params``
(``jax.tree.leaves``), or an explicit list of path names. Works for any state
holding :class:`~rmsprop_jax.RMSpropState` (``rj.presets.torch``, chains,
``rj.param_groups``).

Keras: an optimizer's ``variables`` in Keras order are exactly what
:meth:`rmsprop_jax.RMSprop.set_weights` / ``get_weights`` read and write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _trees, core

__all__ = [
    "TORCH_SLOTS",
    "export_keras_state",
    "export_torch_state",
    "import_keras_state",
    "import_torch_state",
]

# torch.optim.RMSprop state keys -> RMSpropState fields
TORCH_SLOTS = {
    "square_avg": "velocity",
    "grad_avg": "average_gradient",
    "momentum_buffer": "momentum",
}


def _is_slot_leaf(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _leaf_index(params: Any, order: Sequence[str] | None) -> list[int]:
    """For each leaf of ``params`` (tree order), its index in the torch parameter list."""
    paths = [_trees.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if order is None:
        if paths and all(p.isdigit() for p in paths):
            # {"0": w0, ..., "11": w11}: the numbers are torch's indices; the tree's own order
            # is the string order "0", "1", "10", "11", "2", ... (same-shaped slots would swap).
            return [int(p) for p in paths]
        return list(range(len(paths)))
    position = {name: i for i, name in enumerate(order)}
    missing = [p for p in paths if p not in position]
    if missing:
        raise ValueError(f"order does not list the leaves {missing}; it lists {list(order)}")
    return [position[p] for p in paths]


def _map_rmsprop_states(opt_state: Any, fn) -> Any:
    return jax.tree.map(
        lambda s: fn(s) if isinstance(s, core.RMSpropState) else s,
        opt_state,
        is_leaf=lambda x: isinstance(x, core.RMSpropState),
    )


def import_torch_state(
    opt_state: Any, state_dict: dict, params: Any, order: Sequence[str] | None = None
) -> Any:
    """``opt_state`` with its RMSprop slots and step count taken from a torch ``state_dict()``.

    Args:
      opt_state: a state of ours built with ``tx.init(params)`` for the matching config.
      state_dict: ``torch.optim.RMSprop(...).state_dict()`` (tensors or arrays).
      params: the params pytree; its leaf order is torch's parameter order
        unless ``order`` lists the leaves' path names in torch's order.

    Raises:
      ValueError: a slot present on one side only (e.g. momentum in torch but
        not in our config), or a shape mismatch, naming the parameter.
    """
    index = _leaf_index(params, order)
    # Keys are ints in torch, strings after a JSON round trip: the same parameter numbers.
    torch_state = {int(k): v for k, v in state_dict["state"].items()}
    paths = [_trees.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def fill(s: core.RMSpropState) -> core.RMSpropState:
        fields = {}
        steps = set()
        for key, field in TORCH_SLOTS.items():
            ours = getattr(s, field)
            if ours is None:
                mine = jax.tree_util.tree_leaves(s.velocity, is_leaf=_is_slot_leaf)
                for leaf, i, path in zip(mine, index, paths):
                    if not _is_slot_leaf(leaf) and key in torch_state.get(i, {}):
                        raise ValueError(
                            f"torch state of parameter {i} ({path!r}) has {key!r} but this "
                            f"config keeps no {field}"
                        )
                continue
            leaves, treedef = jax.tree_util.tree_flatten(ours, is_leaf=_is_slot_leaf)
            new = []
            for leaf, i, path in zip(leaves, index, paths):
                if _is_slot_leaf(leaf):  # another param group's leaf
                    new.append(leaf)
                    continue
                entry = torch_state.get(i, {})
                if key not in entry:
                    raise ValueError(f"torch state of parameter {i} ({path!r}) has no {key!r}")
                value = np.asarray(_to_numpy(entry[key]))
                if value.shape != leaf.shape:
                    raise ValueError(
                        f"{key} of parameter {i} ({path!r}) has shape {value.shape}, "
                        f"ours {leaf.shape}"
                    )
                new.append(jnp.asarray(value, leaf.dtype))
                if "step" in entry:
                    steps.add(int(np.asarray(_to_numpy(entry["step"]))))
            fields[field] = jax.tree_util.tree_unflatten(treedef, new)
        if s.count is not None and steps:
            fields["count"] = jnp.asarray(max(steps), s.count.dtype)
        return s._replace(**fields)

    return _map_rmsprop_states(opt_state, fill)


def export_torch_state(
    opt_state: Any,
    params: Any,
    param_groups: list[dict] | None = None,
    order: Sequence[str] | None = None,
    step: int | None = None,
) -> dict:
    """A torch ``state_dict`` (for ``torch.optim.RMSprop.load_state_dict``) from ``opt_state``.

    Tensors are ``torch.Tensor`` when torch is installed, NumPy arrays otherwise.
    ``param_groups`` default to one group over every parameter; pass the
    target optimizer's ``state_dict()["param_groups"]`` to keep its
    hyperparameters. ``step`` (torch's per-parameter step count, which its
    RMSprop does not use in the math) defaults to our count where the config
    keeps one (a schedule), else 0.
    """
    index = _leaf_index(params, order)
    states: dict[int, dict] = {}
    found = []

    def collect(s: core.RMSpropState) -> core.RMSpropState:
        found.append(s)
        for key, field in TORCH_SLOTS.items():
            slot = getattr(s, field)
            if slot is None:
                continue
            leaves = jax.tree_util.tree_leaves(slot, is_leaf=_is_slot_leaf)
            for leaf, i in zip(leaves, index):
                if not _is_slot_leaf(leaf):
                    states.setdefault(i, {})[key] = _to_tensor(np.asarray(leaf))
        count = s.count if s.count is not None and step is None else (step or 0)
        for leaf, i in zip(jax.tree_util.tree_leaves(s.velocity, is_leaf=_is_slot_leaf), index):
            if not _is_slot_leaf(leaf):
                states[i]["step"] = _to_tensor(np.asarray(count, np.float32))
        return s

    _map_rmsprop_states(opt_state, collect)
    if not found:
        raise ValueError("export_torch_state: no RMSpropState in opt_state")
    if param_groups is None:
        param_groups = [{"params": sorted(states)}]
    return {"state": states, "param_groups": param_groups}


def import_keras_state(rj_optimizer: Any, opt_state: Any, keras_optimizer: Any) -> Any:
    """``opt_state`` (of an ``rj.RMSprop``) holding a built Keras optimizer's variables."""
    return rj_optimizer.set_weights(
        opt_state,
        [np.asarray(v.value if hasattr(v, "value") else v) for v in keras_optimizer.variables],
    )


def export_keras_state(rj_optimizer: Any, opt_state: Any, keras_optimizer: Any) -> None:
    """Assigns ``opt_state`` (of an ``rj.RMSprop``) into a built Keras optimizer's variables."""
    weights = rj_optimizer.get_weights(opt_state)
    if len(weights) != len(keras_optimizer.variables):
        raise ValueError(
            f"the Keras optimizer has {len(keras_optimizer.variables)} variables, ours "
            f"{len(weights)}: build it on the same variables with the same config"
        )
    for variable, value in zip(keras_optimizer.variables, weights):
        variable.assign(value.astype(np.dtype(variable.dtype)))


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _to_tensor(x: np.ndarray) -> Any:
    try:
        import torch
    except ImportError:
        return x
    return torch.from_numpy(np.array(x))
