"""Learning rates as Keras and optax accept them, normalised to ``count -> lr``.

Accepted forms:

* a float (or a scalar array): constant;
* a schedule ``step -> lr``: an optax schedule, or a Keras
  ``keras.optimizers.schedules.LearningRateSchedule`` object (any callable with
  one positional parameter), evaluated at the number of steps taken before
  this one, as Keras evaluates ``learning_rate(iterations)``;
* a callable with no arguments (Keras semantics: called on every step).
  Under ``jax.jit`` it is called when the step is traced, so a value it reads
  from a Python variable is frozen into the compiled step; to change a value
  between steps without recompiling use a schedule, ``rj.RMSprop``'s
  state-held learning rate, or ``optax.inject_hyperparams``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax

from rmsprop_jax import _checks

__all__ = [
    "as_schedule",
    "shifted",
    "takes_no_arguments",
]

Schedule = Callable[[jax.Array], Any]


def takes_no_arguments(fn: Callable) -> bool:
    """True for a Keras-style ``() -> lr`` callable, False for a ``step -> lr`` schedule."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume step -> lr
        return False
    required = [
        p
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    accepts_any = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    return not required and not accepts_any


def as_schedule(learning_rate: Any, name: str = "learning_rate") -> Schedule | None:
    """Validates ``learning_rate``; returns a ``count -> lr`` schedule, or None for a constant."""
    if callable(learning_rate):
        if takes_no_arguments(learning_rate):
            return lambda count: learning_rate()
        return learning_rate
    _checks.check_range(name, learning_rate, 0.0)
    return None


def shifted(schedule: Schedule | None, steps: int) -> Schedule | None:
    """``schedule`` for a transform called once every ``steps`` calls, read at micro-steps.

    Under Keras gradient accumulation the inner update runs on calls
    ``steps-1, 2*steps-1, ...`` and schedules see those raw call counts; an
    inner transform counts its own calls ``0, 1, 2, ...``. This maps one onto
    the other: ``count -> schedule(count * steps + steps - 1)``.
    """
    if schedule is None or steps in (None, 1):
        return schedule
    return lambda count: schedule(count * steps + (steps - 1))
