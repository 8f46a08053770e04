"""Parameter groups: different hyperparameters for different parts of the pytree.

The JAX form of PyTorch / OneFlow ``param_groups``, built on
``optax.partition``: each group is any transformation (a preset, ``rj.rmsprop``,
a chain), and each leaf gets a group label by path regex or by a label pytree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from rmsprop_jax import _trees

__all__ = [
    "label_leaves",
    "param_groups",
]


def label_leaves(params: Any, rules: Mapping[str, str], default: str | None = None) -> Any:
    """A label pytree for ``params``: the first regex in ``rules`` that ``re.search``-es a path wins.

    Path names are ``"dense/bias"`` style (``keystr(simple=True, separator="/")``).
    A leaf no rule matches gets ``default``; without a default it is an error
    naming the leaf.
    """
    compiled = []
    for pattern, group_name in rules.items():
        try:
            compiled.append((re.compile(pattern), group_name))
        except re.error as err:
            raise ValueError(f"param_groups: invalid regex {pattern!r}: {err}") from None

    def label(path, _):
        name = _trees.path_name(path)
        for pattern, group in compiled:
            if pattern.search(name):
                return group
        if default is None:
            raise ValueError(
                f"param_groups: no rule matches leaf {name!r}; rules: {list(rules)} "
                "(pass default=... or add a catch-all rule such as '.*')"
            )
        return default

    # optax.partition labels the updates too: a row-sparse gradient is one leaf.
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_trees.is_leaf_gradient)


def param_groups(
    groups: Mapping[str, optax.GradientTransformation],
    labels: Mapping[str, str] | Any | Callable[[Any], Any],
    default: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Per-group transformations, like ``torch.optim.RMSprop([{...}, {...}])``.

    Args:
      groups: group label -> transformation, e.g.
        ``{"decay": rj.presets.torch(lr=0.1, weight_decay=1e-4), "no_decay": rj.presets.torch(lr=0.1)}``.
      labels: ``{regex: label}`` (first match on each leaf's path name wins), a
        pytree of labels like params (a flat dict with exactly the params' keys
        is read as a label pytree), or a callable ``params -> label pytree``.
      default: the label of leaves no regex matches (regex form only).

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.param_groups(
      ...     {"fast": rj.presets.torch(lr=0.1), "slow": rj.presets.torch(lr=0.001)},
      ...     {"bias": "slow"}, default="fast")
      >>> params = {"kernel": jnp.ones(2), "bias": jnp.ones(2)}
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates["kernel"][0] / updates["bias"][0]
      Array(100., dtype=float32)
    """
    label_fn: Any
    if isinstance(labels, Mapping) and all(isinstance(v, str) for v in labels.values()):
        rules = dict(labels)

        def label_fn(params: Any) -> Any:
            # A flat dict with exactly the params' keys is a label pytree, not regexes
            # ({"w": ..., "w_bias": ...}: the regex "w" would also match "w_bias").
            flat = jax.tree.structure(params, is_leaf=_trees.is_leaf_gradient)
            if jax.tree.structure(rules) == flat:  # type: ignore[operator]  # PyTreeDef stub
                return rules
            return label_leaves(params, rules, default)
    else:
        label_fn = labels
    if default is not None and default not in groups:
        raise ValueError(
            f"param_groups: default {default!r} is not a group; groups: {list(groups)}"
        )
    return optax.with_extra_args_support(optax.partition(dict(groups), label_fn))
