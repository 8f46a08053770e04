"""Gradient clipping with Keras 3 semantics (``clipvalue``, ``clipnorm``, ``global_clipnorm``).

Each is a stateless optax transform usable alone in ``optax.chain``. They differ
from optax's clippers in exactly the ways Keras differs:

* :func:`clip_by_norm` always rescales, ``g * c / max(||g||, c)`` (a no-op
  multiply-divide when ``||g|| <= c``), per tensor; a zero tensor stays zero.
* :func:`clip_by_global_norm` uses ``g * (c * min(1/n, 1/c) + (n - n))``: a
  non-finite global norm makes every gradient NaN (optax's version would keep
  the non-finite values as they are).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_buffers, _flat_forms, _fusion
from rmsprop_jax.core import abs_sq
from rmsprop_jax.sparse import dense_parts, map_gradients

__all__ = [
    "OVERFLOW_FALLBACK",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_p_norm",
    "clip_by_value",
    "global_norm",
]


def _tree_map(fn, tree, sum_duplicates: bool = True):
    """``fn`` per gradient; IndexedSlices are deduplicated first (norms of the dense gradient)
    unless ``sum_duplicates`` is False (TF 2.x clips the rows as given)."""
    return map_gradients(fn, tree, deduplicate=sum_duplicates)


def clip_by_value(clipvalue: float, *, sum_duplicates: bool = True) -> optax.GradientTransformation:
    """Keras ``clipvalue``: ``g = clip(g, -c, c)`` elementwise.

    Args:
      clipvalue: positive bound ``c``.
      sum_duplicates: a row-sparse gradient's repeated rows are summed before
        clipping (True: the dense gradient, as Keras 3 and ``rj.rmsprop``), or
        clipped as given and summed later (False: TF 2.x's ``IndexedSlices``
        path, ``rj.presets.tf2``).

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.clip_by_value(1.0).update(jnp.array([-3.0, 0.5, 2.0]), None)[0]
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    _checks.check_range("clipvalue", clipvalue, 0.0, low_open=True)

    def clip(g):
        if jnp.iscomplexobj(g):
            raise TypeError(
                "clip_by_value: clipping complex gradients by value is undefined; "
                "use clip_by_norm or clip_by_global_norm"
            )
        return jnp.clip(g, -clipvalue, clipvalue)

    def update_fn(updates, state, params=None):
        del params
        return _tree_map(clip, updates, sum_duplicates), state

    return _flat_forms.declare(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        _flat_forms.per_leaf,
    )


#: Name scope of the branch that recomputes an overflowing norm (bench leaves its kernels out
#: of the per-step pass count: the branch runs only when a sum of squares overflows).
OVERFLOW_FALLBACK = "rj_overflow_fallback"


def _at_least_float32(g: jax.Array) -> jax.Array:
    return g.astype(jnp.promote_types(g.dtype, jnp.float32))


class _WholeTensor:
    """Reductions of a whole tensor to one value (:class:`rmsprop_jax._flat_buffers.Segments`
    reduces each leaf's segment of a flat buffer instead, with the same interface)."""

    @staticmethod
    def sum(x: jax.Array) -> jax.Array:
        return jnp.sum(x)

    @staticmethod
    def max(x: jax.Array) -> jax.Array:
        return jnp.max(x, initial=0.0)

    @staticmethod
    def spread(value: jax.Array) -> jax.Array:
        return value  # a scalar broadcasts


_WHOLE = _WholeTensor()


def _power_sum(arrays: list[jax.Array], p: float, over: Any = _WHOLE) -> jax.Array:
    """sum(|x|^p) over every element of ``arrays`` (p = 2: sum(|x|^2), real for complex)."""
    power = abs_sq if p == 2 else (lambda x: jnp.abs(x) ** p)
    return cast(jax.Array, sum(over.sum(power(_at_least_float32(x))) for x in arrays))


def _root(total: jax.Array, p: float) -> jax.Array:
    return jnp.sqrt(total) if p == 2 else total ** (1.0 / p)


def _p_norm(
    arrays: list[jax.Array], p: float, plain: jax.Array | None = None, over: Any = _WHOLE
) -> jax.Array:
    """The p-norm of all of ``arrays``' elements, finite for finite inputs (p in (0, inf]).

    The plain ``root(sum(|x|^p))`` (or ``plain``, the caller's form of it) is the
    result whenever the sum is finite: the normal path costs nothing more. Only
    when the sum overflows (|x| above ~1.8e19 for p = 2, or many large values)
    is it recomputed in a branch that otherwise never runs: for p = 2 as
    ``2**80 * sqrt(sum(|x * 2**-80|^2))`` (see :func:`_overflowed_two_norm`),
    for other p as ``m * root(sum(|x / m|^p))`` with ``m = max |x|``; a
    non-finite input keeps the plain (inf / NaN) result, as Keras and PyTorch.
    ``over`` reduces: the whole tensors, or (a ``Segments``) each leaf's
    segment of a flat buffer, giving one norm per leaf. For p = 2 over whole
    tensors on one device, leaves under 2048 elements are summed as one group
    (:func:`_grouped_small_leaves`): the sum's order, and so its last bits,
    differ from a sum per leaf.
    """
    if p == float("inf"):
        return _max_abs(arrays, over)
    if p == 2 and over is _WHOLE and jax.device_count() == 1:
        # Tiny leaves summed as one group: their reductions compile (and launch) as one. Not
        # with several devices, where GSPMD may split a leaf and a concatenation would
        # gather it every step (the branch below runs only on overflow).
        arrays = _grouped_small_leaves(arrays, _TINY_LEAF)
    total = _power_sum(arrays, p, over)
    plain = _root(total, p) if plain is None else plain

    def rescaled(_):
        with jax.named_scope(OVERFLOW_FALLBACK):
            if p == 2:
                scaled = _overflowed_two_norm(arrays, over)
                ok = jnp.isfinite(scaled)
            else:
                m = _max_abs(arrays, over)
                ok = jnp.isfinite(m) & (m > 0)
                safe_m = over.spread(jnp.where(ok, m, 1.0))
                scaled = m * _root(
                    _power_sum([_at_least_float32(x) / safe_m for x in arrays], p, over), p
                )
            # Only the overflowing norms change (every one, for a whole tensor).
            return jnp.where(ok & ~jnp.isfinite(plain), scaled, plain).astype(plain.dtype)

    # Tested on the norm, not the sum: the sum then feeds one consumer and XLA keeps the
    # whole reduction in one fusion, as without the fallback.
    return jax.lax.cond(jnp.all(jnp.isfinite(plain)), lambda _: plain, rescaled, None)


_OVERFLOW_SCALE = 2.0**-80
#: float64's: its squares overflow above |x| ~ 1.3e154, and 2**-600 keeps them below 2**850.
_OVERFLOW_SCALE_FLOAT64 = 2.0**-600


def _overflowed_two_norm(arrays: list[jax.Array], over: Any = _WHOLE) -> jax.Array:
    """``sqrt(sum(|x|^2))`` of finite ``arrays`` whose plain sum of squares overflowed.

    The norm is then at least 2**64, so one fixed power of two does: scaled by
    2**-80 (exact), no square exceeds 2**96 and 2**31 of them still sum below
    float32's largest value, while the squares that flush to 0 (|x| < 2**17)
    add less than ``n * 2**-94`` of the norm's square. One pass, no maximum
    and no division. Small leaves are concatenated in groups (the branch then
    compiles to fewer kernels); a large leaf is reduced alone (no copy of it).
    With a float64 array (jax x64) everything is summed in float64, scaled by
    2**-600 (the norm is then at least 2**511; no square exceeds 2**850).
    """
    parts = _grouped_small_leaves(arrays)
    scale = _OVERFLOW_SCALE
    if any(jnp.finfo(x.dtype).bits > 32 for x in parts):
        parts = [x.astype(jnp.promote_types(x.dtype, jnp.float64)) for x in parts]
        scale = _OVERFLOW_SCALE_FLOAT64
    scaled = [part * scale for part in parts]
    # XLA rewrites a one-element (x*s)*(x*s) as (x*x)*(s*s), and s*s = 2**-160 is 0 in float32:
    # behind a barrier the scaled value is squared as it is.
    scaled = [jax.lax.optimization_barrier(y) if y.size == 1 else y for y in scaled]
    total = sum(over.sum(abs_sq(y)) for y in scaled)
    return jnp.sqrt(total) / scale


#: The fallback concatenates leaves below this many elements, at most this many elements at once.
_SMALL_LEAF = 2**16
_GROUP_ELEMENTS = 2**20
#: The plain sum of squares concatenates leaves below this many elements (see _p_norm).
_TINY_LEAF = 2**11


def _grouped_small_leaves(arrays: list[jax.Array], small: int = _SMALL_LEAF) -> list[jax.Array]:
    """``arrays`` (at least float32), the ones below ``small`` elements concatenated (1-D).

    The ones below ``small`` elements (and not sharded over explicit mesh
    axes) are concatenated in their order (every reader squares them, so the
    signs, or phases, do not matter), at most 2**20 elements per group; the
    others are returned as they are. Fewer kernels for XLA to compile and
    launch: XLA:CPU reduces a leaf in three kernels (squares, partial sums,
    their sum). At 300 leaves of 64
    elements the full config's step compiled in 2.1 s with its tiny leaves
    summed in one group, 2.8 s with a sum per leaf and 2.4 s for optax's chain
    (one process, the median of 3 compiles each). The
    plain sum groups leaves below 2048 elements (``_TINY_LEAF``): a
    concatenation costs about 2.5 ns per element on XLA:CPU and a leaf's
    kernels several microseconds, so 100 leaves of 1024 or 2048 elements step
    faster grouped (0.91 against 1.03 ms, 1.08 against 1.18 ms) and 100 of
    4000 slower (2.3 against 1.4 ms). The overflow branch, which never runs,
    groups leaves below 2**16 elements. A group (at most 2**20 elements: 4 MB
    of temporaries) is concatenated in a tree of at most 16 operands per
    concatenation (one of 1000 operands compiles about 3x slower; the ``abs``
    between the levels keeps XLA from merging them back into one; after the
    last level it was a kernel of its own, which the overflow branch's
    operand kept in every step: 10 leaves of 64, full config, 19 distinct
    kernels to compile with it, 18 without; 100K params in 200 leaves, step
    2.67 -> 2.55 ms); a large leaf is reduced where it lies, and so is a leaf
    sharded over explicit mesh axes (concatenating it would gather it).
    """
    arrays = [_at_least_float32(x) for x in arrays]
    parts: list[jax.Array] = []
    group: list[jax.Array] = []
    group_size = 0
    for x in arrays:
        if x.size >= small or _sharded_explicitly(x):
            parts.append(x)
            continue
        if group and group_size + x.size > _GROUP_ELEMENTS:
            parts.append(_concatenate_in_a_tree(group))
            group, group_size = [], 0
        group.append(jnp.ravel(x))
        group_size += x.size
    if group:
        parts.append(_concatenate_in_a_tree(group))
    return parts


def _sharded_explicitly(x: jax.Array) -> bool:
    """True for an array split over explicit mesh axes (under GSPMD's automatic axes, False)."""
    return any(axis is not None for axis in jax.typeof(x).sharding.spec)


def _concatenate_in_a_tree(flat: list[jax.Array], fan_in: int = 16) -> jax.Array:
    """The 1-D arrays ``flat`` concatenated in a tree of ``fan_in`` operands, ``|x|`` between
    the levels (which keeps XLA from merging them into one concatenate) but not after the last:
    every reader squares the elements."""
    while len(flat) > fan_in:
        flat = [jnp.abs(jnp.concatenate(flat[i : i + fan_in])) for i in range(0, len(flat), fan_in)]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat)


def _max_abs(arrays: list[jax.Array], over: Any = _WHOLE) -> jax.Array:
    maxima = [over.max(jnp.abs(_at_least_float32(x))) for x in arrays]
    return functools.reduce(jnp.maximum, maxima)


def _keras_norm(g: jax.Array, over: Any = _WHOLE) -> jax.Array:
    """sqrt(sum(|g|^2)); 0 stays exactly 0 (Keras' two-tap where); no overflow for finite g."""
    square_sum = _power_sum([g], 2, over)
    plain = jnp.where(
        square_sum > 0, jnp.sqrt(jnp.where(square_sum > 0, square_sum, 1)), square_sum
    )
    return _p_norm([g], 2, plain, over)


def clip_by_norm(clipnorm: float, *, sum_duplicates: bool = True) -> optax.GradientTransformation:
    """Keras ``clipnorm``: each tensor becomes ``g * c / max(||g||_2, c)``.

    Always applied (also when ``||g|| <= c``, where it divides by ``c`` after
    multiplying by ``c``, as Keras does), independently per leaf.

    Args:
      clipnorm: positive maximum norm ``c`` of each tensor.
      sum_duplicates: a row-sparse gradient's repeated rows are summed before
        the norm (True: the dense gradient's norm, as Keras 3 and
        ``rj.rmsprop``), or the norm is taken over the rows as given (False:
        TF 2.x's ``tf.clip_by_norm`` on ``IndexedSlices``, ``rj.presets.tf2``).

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.clip_by_norm(1.0).update(jnp.array([3.0, 4.0]), None)[0]
      Array([0.6, 0.8], dtype=float32)
    """
    _checks.check_range("clipnorm", clipnorm, 0.0, low_open=True)

    def clip(g, over=_WHOLE):
        norm = over.spread(_keras_norm(g, over))
        return ((g * clipnorm) / jnp.maximum(norm, clipnorm)).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        if isinstance(updates, _flat_buffers.FlatParams):  # rj.contiguous: a norm per segment
            layout = updates.layout
            clipped = [
                clip(b, _flat_buffers.Segments.of(layout, g)) for g, b in enumerate(updates.buffers)
            ]
            return _flat_buffers.FlatParams(clipped, layout), state
        return _tree_map(clip, updates, sum_duplicates), state

    tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return _flat_forms.declare(tx, _flat_forms.per_leaf)


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf (None leaves skipped), float32 at least."""
    leaves = dense_parts(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return _p_norm(leaves, 2)


def clip_by_global_norm(global_clipnorm: float) -> optax.GradientTransformation:
    """Keras ``global_clipnorm``: ``g *= c * min(1/n, 1/c) + (n - n)``, ``n`` the global norm.

    The ``(n - n)`` term is Keras' NaN propagation: an infinite or NaN global
    norm turns every gradient into NaN, so a bad step is never silently
    rescaled into a plausible one. Under ``pjit`` / sharded arrays the norm is
    the norm of the whole (global) tree.

    Args:
      global_clipnorm: positive maximum global norm ``c``.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> rj.clip_by_global_norm(1.0).update(g, None)[0]["b"]
      Array([0.8], dtype=float32)
    """
    _checks.check_range("global_clipnorm", global_clipnorm, 0.0, low_open=True)

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = global_clipnorm * jnp.minimum(1.0 / norm, 1.0 / global_clipnorm) + (norm - norm)
        scale = _fusion.computed_once(scale)  # NaN stays NaN; one kernel, not one per leaf
        return _tree_map(lambda g: (g * scale).astype(g.dtype), updates), state

    return _flat_forms.declare(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        _flat_forms.per_leaf,
    )


def clip_by_p_norm(max_norm: float, norm_type: float = 2.0) -> optax.GradientTransformation:
    r"""PyTorch / OneFlow ``clip_grad_norm_``: scale all gradients by ``min(1, c / (n + 1e-6))``.

    ``n`` is the ``norm_type``-norm of the whole tree (the p-norm of the
    per-leaf p-norms; ``norm_type=inf`` takes the largest absolute value), the
    semantics of ``torch.nn.utils.clip_grad_norm_`` and of OneFlow's
    ``clip_grad_max_norm`` / ``clip_grad_norm_type`` param-group options.

    Args:
      max_norm: positive bound ``c``.
      norm_type: ``p`` > 0, or ``float("inf")``.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> rj.clip_by_p_norm(1.0, float("inf")).update(jnp.array([-4.0, 2.0]), None)[0]
      Array([-0.99999976,  0.49999988], dtype=float32)
    """
    _checks.check_range("max_norm", max_norm, 0.0, low_open=True)
    _checks.check_range("norm_type", norm_type, 0.0, low_open=True)
    p = float(norm_type)

    def update_fn(updates, state, params=None):
        del params
        # torch's two levels: the norm of the per-leaf norms (both overflow-safe).
        norms = [_p_norm([g], p) for g in dense_parts(updates)]
        if not norms:
            return updates, state
        total = _p_norm([jnp.stack(norms)], p)
        scale = jnp.minimum(max_norm / (total + 1e-6), 1.0)
        return _tree_map(lambda g: (g * scale).astype(g.dtype), updates), state

    return _flat_forms.declare(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        _flat_forms.per_leaf,
    )
