"""Argument validation and the state-vs-options check shared by every factory.

Pytree helpers (paths, None-keeping flattening, finding a state) are in
:mod:`rmsprop_jax._trees`.

Hyperparameters are checked when the optimizer is built, with a message that
names the argument, the value and the valid range. Values that are traced
(e.g. under ``optax.inject_hyperparams`` inside ``jit``) cannot be inspected and
are accepted as they are.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _flat_forms, quantization
from rmsprop_jax._trees import (
    flatten_with_none,
    is_leaf_gradient,
    path_name,
)

__all__ = [
    "check_inexact_leaves",
    "check_positive_int",
    "check_range",
    "check_same_structure",
    "check_state_matches",
    "concrete_float",
    "is_static_zero",
    "learning_rate_value",
    "params_required",
    "with_state_check",
]


def concrete_float(value: Any) -> float | None:
    """``value`` as a Python float, or None when it is traced or not a scalar."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # any non-numeric object
        return None
    if array.size != 1 or not jnp.issubdtype(array.dtype, jnp.number):  # bfloat16 too
        return None
    return float(array.reshape(()))


def learning_rate_value(value: Any) -> float:
    """A concrete learning rate as a float: a real, finite number >= 0, or a clear error.

    For the places that set a learning rate after construction (Keras'
    ``optimizer.learning_rate = x``, ``rj.RMSprop.set_learning_rate``).
    """
    number = concrete_float(value)
    if isinstance(value, (str, bytes, bool)) or number is None:
        raise TypeError(f"learning_rate must be a float, got {value!r}")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"learning_rate must be a finite number >= 0, got {value!r}")
    return number


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
    from rmsprop_jax.sparse import check_sparse_leaves  # sparse imports nothing of ours

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


def check_positive_int(name: str, value: Any) -> None:
    """None, or an integer >= 1 (bools rejected)."""
    if value is None:
        return
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise ValueError(
            f"{name} must be None or a Python integer >= 1, got the array {value!r}: it decides "
            "the structure of the state, so it cannot be traced (with optax.inject_hyperparams, "
            f"list it in static_args: inject_hyperparams(rj.rmsprop, static_args=({name!r},)))"
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


# The options that decide each state field: named in the error when the field differs.
_STATE_FIELD_OPTIONS = {
    "momentum": "momentum",
    "average_gradient": "centered",
    "count": "learning_rate (a schedule keeps a step count) / bias_correction",
    "velocity": "accumulator_dtype",
    "codes": "accumulator_dtype",
    "block_scale": "accumulator_dtype",
    "ema": "use_ema",
    "accumulators": "gradient_accumulation_steps",
    "inner_state": "gradient_accumulation_steps / loss scaling",
    "scale": "loss_scale_factor / dynamic loss scaling",
}


def _describe_leaf(x: Any) -> str:
    if x is None:
        return "None (no slot)"
    return f"{jnp.dtype(x.dtype).name}{list(np.shape(x))}"


def _options_deciding(paths: Any) -> str:
    """The options that decide the state fields on ``paths`` ("" when none is known)."""
    options = []
    for path in paths:
        for name in path.split("/"):
            option = _STATE_FIELD_OPTIONS.get(name)
            if option and option not in options:
                options.append(option)
    return f" (decided by: {', '.join(options)})" if options else ""


def _state_mismatch(where: str, what: str, options: str) -> ValueError:
    return ValueError(
        f"{where}: the optimizer state was not built by a transform with these options: "
        f"{what}{options}. A state from another configuration (a checkpoint from before an "
        "option changed, an int8 <-> float state swap, a checkpoint restored without its "
        "target) would be silently reinterpreted. Build the state with tx.init(params), "
        "restore checkpoints into that target (orbax: StandardRestore(tx.init(params))), or "
        "convert the old state explicitly."
    )


def check_state_matches(state: Any, expected: Any, where: str, *, dtypes: bool = True) -> None:
    """Raises ValueError unless ``state`` has ``expected``'s containers, slots, shapes (and dtypes).

    ``expected`` is ``jax.eval_shape(tx.init, params)``: the state these options
    build. Trace-time facts only, no run-time cost. The error names the first
    differing leaf and the options that decide it.
    """
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: x is None)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(
        expected, is_leaf=lambda x: x is None
    )
    if got_def != want_def:  # type: ignore[operator]  # PyTreeDef's stub lacks __ne__
        got_paths = [path_name(p) for p, _ in got_leaves]
        want_paths = [path_name(p) for p, _ in want_leaves]
        only_got = [p for p in got_paths if p not in want_paths]
        only_want = [p for p in want_paths if p not in got_paths]
        if only_got or only_want:
            what = (
                f"the state has {only_got[:3] or 'no other leaves'} where this transform's "
                f"init has {only_want[:3] or 'nothing'}"
            )
            # Fields present on one side only name the option best (an EMA state, an
            # accumulation wrapper); else the fields on the differing paths.
            fields = {name for path in got_paths for name in path.split("/")}
            fields ^= {name for path in want_paths for name in path.split("/")}
            options = _options_deciding(fields) or _options_deciding(only_got + only_want)
            raise _state_mismatch(where, what, options)
        raise _state_mismatch(
            where,
            f"same leaves, other containers: the state is {got_def}, init gives {want_def}",
            "",
        )
    for (path, got), (_, want) in zip(got_leaves, want_leaves):
        mismatch = (got is None) != (want is None) or (
            want is not None
            and (
                tuple(np.shape(got)) != tuple(want.shape)
                or (dtypes and jnp.dtype(got.dtype) != jnp.dtype(want.dtype))
            )
        )
        if mismatch:
            name = path_name(path)
            what = (
                f"at {name!r} the state has {_describe_leaf(got)} where this transform's init "
                f"gives {_describe_leaf(want)}"
            )
            raise _state_mismatch(where, what, _options_deciding([name]))


def _scalars_as_arrays(tree: Any) -> Any:
    """Python and NumPy scalar leaves as arrays (optax accepts them; every slot needs a dtype)."""
    return jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, (int, float, complex, np.number)) else x,
        tree,
        is_leaf=is_leaf_gradient,
    )


def with_state_check(tx: Any, where: str) -> Any:
    """``tx`` whose ``update`` first checks the state against ``tx.init`` (:func:`check_state_matches`).

    The expected state comes from ``jax.eval_shape(tx.init, params)`` (the
    gradients stand in when ``params`` is None; dtypes are then not compared),
    cached per tree structure, shapes and dtypes.
    """
    original, tx = tx, optax.with_extra_args_support(tx)
    cache: dict = {}

    def update_fn(updates, state, params=None, **extra_args):
        # 8-bit slots that a wrapper (nnx.Optimizer) handed back as mappings of their
        # fields are QuantizedArrays again: the same data, not another configuration.
        state = quantization.restore(state)
        updates, params = _scalars_as_arrays(updates), _scalars_as_arrays(params)
        template = updates if params is None else params
        leaves, treedef = jax.tree.flatten(template, is_leaf=is_leaf_gradient)
        # Python scalars are leaves too (as in optax): shapes and dtypes through jnp.
        key = (
            treedef,
            tuple(None if x is None else (jnp.shape(x), jnp.result_type(x)) for x in leaves),
        )
        if key not in cache:
            stand_in = [None if k is None else jax.ShapeDtypeStruct(*k) for k in key[1]]
            cache[key] = jax.eval_shape(tx.init, treedef.unflatten(stand_in))
        check_state_matches(
            state,
            cache[key],
            where if params is not None else f"{where} (params shaped like grads)",
            dtypes=params is not None,
        )
        return tx.update(updates, state, params, **extra_args)

    checked = optax.GradientTransformationExtraArgs(tx.init, update_fn)
    # Over flat buffers the state is rj.contiguous's, not this one: the flat form is the original's.
    return _flat_forms.declare(checked, _flat_forms.wraps(original))
