"""The tag ``rj.contiguous`` reads to rebuild a transformation over flat buffers.

Every rmsprop_jax factory tags the ``update`` function it returns with a rule
(:data:`RULE_ATTRIBUTE`): :data:`ELEMENTWISE` (the transform treats every
element alike or reduces over the whole tree, and maps a None gradient to
None: usable as is over one buffer per dtype), or ``(factory, arguments)``:
the factory's name and the arguments :func:`rmsprop_jax.flat` needs to
build its flat version. So ``contiguous`` never inspects closures of
rmsprop_jax code; only chains a user builds with ``optax.chain`` itself are
recognised from optax's closure. Users may tag their own transforms with
``"elementwise"`` or a callable ``rule(tx, flat)``.
"""

from __future__ import annotations

from typing import Any

import optax

__all__ = [
    "ELEMENTWISE",
    "RULE_ATTRIBUTE",
    "chain",
    "tag",
    "tag_factory",
    "with_extra_args",
]

#: Attribute of a transform's ``update`` function holding its rule.
RULE_ATTRIBUTE = "rj_contiguous"
ELEMENTWISE = "elementwise"


def tag(tx: Any, rule: Any) -> Any:
    """Sets ``tx.update``'s rule and returns ``tx`` (the update function must be tx's own)."""
    setattr(tx.update, RULE_ATTRIBUTE, rule)
    return tx


def tag_factory(tx: Any, factory: str, **arguments: Any) -> Any:
    """Tags ``tx`` as built by ``factory`` from ``arguments``."""
    return tag(tx, (factory, arguments))


def chain(*pieces: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*pieces)``, tagged with its pieces."""
    return tag_factory(optax.chain(*pieces), "chain", pieces=pieces)


def with_extra_args(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.with_extra_args_support(tx)``; a new wrapper is tagged with ``tx``."""
    wrapped = optax.with_extra_args_support(tx)
    if wrapped is not tx:
        tag_factory(wrapped, "with_extra_args_support", inner=tx)
    return wrapped
