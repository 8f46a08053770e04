r"""The RMSprop arithmetic: one transform, every convention.

Everything that differs between the RMSprop implementations people use is an
option of :func:`rmsprop_update`; presets and aliases only choose options.
(:func:`scale_by_rmsprop` is its optax-convention form: no learning rate, no sign.)
Per leaf, with ``g`` the gradient, ``t`` the number of steps taken before this
one and :math:`\rho` = ``rho``:

.. math::

  g &\leftarrow -g \quad \text{if maximize} \\
  v &\leftarrow \rho v + (1-\rho)\,|g|^2
      \qquad (v_0 = \text{initial\_accumulator\_value}) \\
  a &\leftarrow \rho a + (1-\rho)\,g \qquad \text{(centered only)} \\
  \hat v, \hat a &= v / (1-\rho^{t+1}),\ a / (1-\rho^{t+1})
      \qquad \text{(bias\_correction only)} \\
  \sigma^2 &= \max(\hat v - |\hat a|^2,\ 0) \ \text{(centered)}
      \quad\text{or}\quad \hat v \\
  d &= \sqrt{\sigma^2 + \epsilon} \ \text{(eps\_in\_sqrt)}
      \quad\text{or}\quad \sqrt{\sigma^2} + \epsilon

and the step, with :math:`\eta` the learning rate evaluated at ``t``:

* no momentum: :math:`w \leftarrow w - \eta g / d`;
* ``lr_in_momentum=True`` (Keras, TF, optax):
  :math:`m \leftarrow \mu m + \eta g/d,\ w \leftarrow w - m`;
* ``lr_in_momentum=False`` (PyTorch): :math:`m \leftarrow \mu m + g/d,\
  w \leftarrow w - \eta m`;
* ``nesterov``: the step is :math:`s + \mu m` instead of :math:`m`
  (:math:`s` the quantity added to the buffer), as ``optax.trace``.

Numerics that other implementations get wrong, guaranteed here:

* **Real accumulators for complex parameters.** ``v`` holds :math:`|g|^2`
  in the real dtype (optax stores it complex, twice the memory).
* **float32 arithmetic for half-precision parameters.** float16 / bfloat16
  leaves get float32 slots and float32 arithmetic (``accumulator_dtype`` can
  pick bfloat16 storage; arithmetic stays float32), so ``epsilon=1e-7`` does
  not underflow and a zero gradient gives a zero step, not NaN
  (optax issue #1784).
* **Centered variance clamped at 0.** :math:`v - a^2 \ge 0` holds exactly
  but can round to a tiny negative number; it is clamped at 0 so the
  denominator never takes the square root of a negative number (NaN). Where
  the difference is non-negative the clamp changes nothing, bit for bit.
* **epsilon = 0.** A zero denominator (then ``v`` and ``g`` are zero) is
  replaced by 1, so a step on a zero gradient is 0, not 0/0 = NaN.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _flat_forms, _fusion, _schedules, _trees, quantization
from rmsprop_jax.sparse import IndexedSlices

__all__ = [
    "SUPPORTED_ACCUMULATOR_DTYPES",
    "RMSpropState",
    "abs_sq",
    "canonical_accumulator_dtype",
    "rmsprop_leaf_update",
    "rmsprop_rows_update",
    "rmsprop_update",
    "scale_by_rmsprop",
]

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

#: Storage dtypes ``accumulator_dtype`` accepts (None: the arithmetic dtype).
SUPPORTED_ACCUMULATOR_DTYPES = ("float32", "bfloat16")


class RMSpropState(NamedTuple):
    """State of :func:`rmsprop_update` and :func:`scale_by_rmsprop`; absent slots are None (no memory, no work)."""

    # int32 scalar: steps taken; only when a schedule, bias correction or an 8-bit leaf reads it.
    count: chex.Array | None  # type: ignore[assignment]  # shadows tuple.count, as optax's states
    # Mean of |g|^2, real dtype (float32 for float16 / bfloat16 / float32 / complex64 params).
    velocity: optax.Updates
    # Mean of g (centered only): g's dtype, float32 at least.
    average_gradient: optax.Updates | None
    # Momentum buffer (momentum > 0 only): g's dtype, float32 at least.
    momentum: optax.Updates | None


def _arithmetic_dtype(dtype) -> jnp.dtype:
    """float32 at least; complex stays complex."""
    return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype) -> jnp.dtype:
    return jnp.finfo(dtype).dtype


def _storage_dtype(dtype, accumulator_dtype, *, real: bool) -> jnp.dtype:
    """The dtype a slot is stored in, for a leaf of ``dtype``."""
    arithmetic = _arithmetic_dtype(dtype)
    if real:
        arithmetic = _real_dtype(arithmetic)
    if accumulator_dtype is None:
        return arithmetic
    if jnp.issubdtype(arithmetic, jnp.complexfloating):
        return jnp.promote_types(accumulator_dtype, jnp.complex64)
    return jnp.dtype(accumulator_dtype)


@functools.partial(jax.jit, inline=True)
def _bias_denominator(rho: Any, count: jax.Array) -> jax.Array:
    """``1 - rho**count``, compiled as optax compiles its bias correction (eager == jit)."""
    return 1 - rho**count


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` in the real dtype (``x*x`` for real x, ``re^2 + im^2`` for complex x)."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return x * x


def canonical_accumulator_dtype(accumulator_dtype: Any) -> jnp.dtype | str | None:
    """Validates ``accumulator_dtype`` and returns it as a dtype, ``"int8"`` or None."""
    if accumulator_dtype is None:
        return None
    if isinstance(accumulator_dtype, str) and accumulator_dtype == "int8":
        return "int8"  # blockwise 8-bit velocity: rmsprop_jax.quantization
    try:
        dtype = jnp.dtype(accumulator_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in SUPPORTED_ACCUMULATOR_DTYPES:
        raise ValueError(
            f"accumulator_dtype must be one of None, jnp.float32, jnp.bfloat16, 'int8', "
            f"got {accumulator_dtype!r}"
        )
    return dtype


def _as_stored(x: jax.Array, slot: jax.Array) -> jax.Array:
    """``x`` rounded to the slot's storage dtype (still in ``x``'s dtype): the step reads the
    slot as it will be stored, as Keras and PyTorch do with low-precision optimizer variables."""
    if jnp.dtype(slot.dtype) == jnp.dtype(x.dtype):
        return x
    return x.astype(slot.dtype).astype(x.dtype)


def rmsprop_leaf_update(
    g: jax.Array,
    velocity: jax.Array,
    average_gradient: jax.Array | None,
    momentum_buffer: jax.Array | None,
    learning_rate: jax.Array,
    bias_correction_denominator: jax.Array | None,
    *,
    rho: Any,
    epsilon: Any,
    momentum: Any,
    centered: bool,
    eps_in_sqrt: bool,
    nesterov: bool,
    lr_in_momentum: bool,
    maximize: bool,
    guard_zero_denominator: bool,
    store_velocity: Callable[[jax.Array], tuple[Any, jax.Array]] | None = None,
):
    """THE RMSprop arithmetic, for one leaf; every path of the package calls it.

    Takes the slots as stored and returns ``(update, velocity, average_gradient,
    momentum_buffer)``: the update to ADD to the parameter (optax convention)
    in ``g``'s dtype, and the new slots in their stored dtypes. Absent slots
    (None) stay None. The order of operations follows Keras 3 (``(1 - rho)`` in
    Python double, ``(lr * g) / sqrt(v + eps)``, ``m = momentum * m + inc``), so
    that the default configuration agrees with Keras to the ulp. Every slot is
    read as stored: ``store_velocity(new_v) -> (stored, as_read)`` stores the
    new ``v`` in another form (8-bit: :func:`rmsprop_jax.quantization.stored`);
    by default it is rounded to the slot's dtype.
    """
    out_dtype = g.dtype
    x = g.astype(_arithmetic_dtype(g.dtype))
    if maximize:
        x = -x
    one_minus_rho = 1 - rho  # Python double when rho is a float, as Keras
    added = one_minus_rho * abs_sq(x)
    new_v = rho * velocity.astype(_real_dtype(x.dtype)) + added
    if store_velocity is None:
        stored_v, v = new_v.astype(velocity.dtype), _as_stored(new_v, velocity)
    else:  # 8-bit: the codes, and the values they stand for
        stored_v, v = store_velocity(new_v)
        # A non-finite |g|**2 term (an inf or NaN gradient, or one whose square overflows)
        # is stored saturated; read as itself, its element steps as with float32 state (0 for
        # g = 1e20, NaN for inf or NaN). (From g alone: the new v would need the old codes.)
        v = jnp.where(jnp.isfinite(added), v, added)
    variance = v
    a = None
    if centered:
        assert average_gradient is not None, "centered RMSprop has an average_gradient slot"
        a = _as_stored(rho * average_gradient.astype(x.dtype) + one_minus_rho * x, average_gradient)
    if bias_correction_denominator is not None:
        variance = variance / bias_correction_denominator.astype(v.dtype)
        a_hat = None if a is None else a / bias_correction_denominator.astype(v.dtype)
    else:
        a_hat = a
    if centered:
        assert a_hat is not None
        variance = jnp.maximum(variance - abs_sq(a_hat), 0)
    denominator = jnp.sqrt(variance + epsilon) if eps_in_sqrt else jnp.sqrt(variance) + epsilon
    if guard_zero_denominator:
        denominator = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)

    new_m = None
    if momentum_buffer is None:
        step = (learning_rate * x) / denominator
    else:
        added = (learning_rate * x) / denominator if lr_in_momentum else x / denominator
        new_m = _as_stored(momentum * momentum_buffer.astype(x.dtype) + added, momentum_buffer)
        step = added + momentum * new_m if nesterov else new_m
        if not lr_in_momentum:
            step = learning_rate * step

    return (
        (-step).astype(out_dtype),
        stored_v,
        None
        if a is None
        else a.astype(a.dtype if average_gradient is None else average_gradient.dtype),
        None if new_m is None or momentum_buffer is None else new_m.astype(momentum_buffer.dtype),
    )


def rmsprop_rows_update(
    g: IndexedSlices,
    velocity: jax.Array,
    average_gradient: jax.Array | None,
    momentum_buffer: jax.Array | None,
    learning_rate: jax.Array,
    bias_correction_denominator: jax.Array | None,
    *,
    decay_all_rows: bool = False,
    **options: Any,
):
    """:func:`rmsprop_leaf_update` on the touched rows of a table (row-sparse gradient).

    Duplicate rows are summed first. The touched rows of the slots are gathered,
    updated by the one arithmetic function and scattered back; the update is an
    :class:`~rmsprop_jax.IndexedSlices` over the same rows. With
    ``decay_all_rows`` (TF 2.0, momentum 0) the moving averages of every row
    first decay by ``rho``, as TF's sparse path scales the whole slot.
    """
    g = g.deduplicate()
    v_rows, a_rows, m_rows = (
        None if slot is None else g.gather(slot)
        for slot in (velocity, average_gradient, momentum_buffer)
    )
    assert v_rows is not None  # the velocity slot always exists
    update, *new_rows = rmsprop_leaf_update(
        g.values, v_rows, a_rows, m_rows, learning_rate, bias_correction_denominator, **options
    )
    slots: list[jax.Array | None] = []
    for position, (slot, new) in enumerate(
        zip((velocity, average_gradient, momentum_buffer), new_rows)
    ):
        if slot is None:
            slots.append(None)
            continue
        if decay_all_rows and position < 2:  # v and a decay everywhere; there is no momentum then
            slot = (options["rho"] * slot).astype(slot.dtype)
        slots.append(g.scatter(slot, new))
    return (g.replace_values(update), *slots)


def rmsprop_update(
    learning_rate: ScalarOrSchedule = 0.001,
    rho: float = 0.9,
    epsilon: float = 1e-7,
    centered: bool = False,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    lr_in_momentum: bool = True,
    eps_in_sqrt: bool = True,
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    maximize: bool = False,
    accumulator_dtype: Any = None,
    sparse_mode: str = "lazy",
) -> optax.GradientTransformation:
    r"""RMSprop with every convention, learning rate and momentum included.

    The output is the update to add to the parameters (``optax.apply_updates``):
    the learning rate and the sign are already applied, so this is a complete
    optimizer. See the module docstring for the math. Defaults are Keras 3's.

    Args:
      learning_rate: a non-negative float, or a schedule ``count -> lr``
        evaluated at the number of steps taken before this one (0 first), as
        Keras and optax do.
      rho: discounting factor of the moving averages, in [0, 1).
      epsilon: non-negative constant added to the denominator.
      centered: divide by the estimated standard deviation (Graves 2013)
        instead of the root mean square.
      momentum: momentum coefficient in [0, 1); 0 keeps no momentum slot.
      nesterov: Nesterov momentum (as ``optax.trace``); needs momentum > 0.
      lr_in_momentum: True (Keras, TF, optax): the buffer accumulates
        ``lr * g / d``. False (PyTorch): it accumulates ``g / d`` and the step
        is ``lr * m``, so a changed learning rate acts at once on the buffer.
      eps_in_sqrt: True (Keras, TF fused kernels, optax, OneFlow):
        ``sqrt(v + eps)``. False (PyTorch, TF 2 momentum-free path):
        ``sqrt(v) + eps``.
      initial_accumulator_value: non-negative start value of ``v`` (TF1: 1.0,
        optax: ``initial_scale``).
      bias_correction: divide ``v`` (and ``a``) by ``1 - rho**(t+1)`` as optax.
      maximize: ascend the objective (PyTorch ``maximize``).
      sparse_mode: how :class:`~rmsprop_jax.IndexedSlices` gradients update
        the table: ``"lazy"`` (only the touched rows of the parameter and of
        every slot change) or ``"tf2"`` (TF 2.0: with ``momentum == 0`` the
        mean-square and mean-gradient slots of ALL rows decay by ``rho``;
        with momentum it is lazy, as TF's sparse kernels).
      accumulator_dtype: None (the arithmetic dtype: float32 for float16,
        bfloat16 and float32 leaves; the real part's dtype for ``v`` of complex
        leaves), ``jnp.float32`` or ``jnp.bfloat16`` (arithmetic is float32;
        each new slot is rounded to the storage dtype and the step reads it as
        stored, as Keras and PyTorch do with bfloat16 optimizer variables, so
        the step moves 2 bytes per slot and needs no copy), or ``"int8"``: ``v`` of leaves with >= 4096 elements stored
        blockwise in 8 bits as bitsandbytes (about 1.016 bytes per element, see
        :mod:`rmsprop_jax.quantization`); the other slots and smaller leaves keep
        the arithmetic dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`RMSpropState`.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.rmsprop_update(learning_rate=0.1)
      >>> params = jnp.array([10.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)  # g = w
      >>> optax.apply_updates(params, updates)
      Array([9.683772], dtype=float32)

    References:
      Hinton, Neural Networks for Machine Learning, lecture 6e, 2012.
      Graves, Generating Sequences With Recurrent Neural Networks, 2013.

    Long because ``init_fn`` and ``update_fn`` are closures over the validated
    options, as in every optax factory; the arithmetic itself is
    :func:`rmsprop_leaf_update`.
    """
    _checks.check_range("rho", rho, 0.0, 1.0, high_open=True)
    _checks.check_range("epsilon", epsilon, 0.0)
    _checks.check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    _checks.check_range("initial_accumulator_value", initial_accumulator_value, 0.0)
    schedule = _schedules.as_schedule(learning_rate)
    has_momentum = not _checks.is_static_zero(momentum)
    if nesterov and not has_momentum:
        raise ValueError(f"nesterov=True needs momentum in (0, 1), got momentum={momentum!r}")
    if sparse_mode not in ("lazy", "tf2"):
        raise ValueError(f"sparse_mode must be 'lazy' or 'tf2', got {sparse_mode!r}")
    decay_all_rows = sparse_mode == "tf2" and not has_momentum
    storage = canonical_accumulator_dtype(accumulator_dtype)
    quantized = isinstance(storage, str)  # "int8": only the velocity of large leaves
    if quantized:
        storage = None
    keeps_count = schedule is not None or bias_correction
    leaf_options = dict(
        rho=rho,
        epsilon=epsilon,
        momentum=momentum,
        centered=centered,
        eps_in_sqrt=eps_in_sqrt,
        nesterov=nesterov,
        lr_in_momentum=lr_in_momentum,
        maximize=maximize,
        # A traced epsilon (optax.inject_hyperparams) may be 0: keep the 0/0 guard then.
        guard_zero_denominator=_checks.concrete_float(epsilon) in (None, 0.0),
    )

    def slots_like(params, fill, *, real, quantize=False):
        @_fusion.traced_once  # traced (the state check's eval_shape): once per leaf signature
        def make(p):
            if p is None:
                return None
            if quantize and quantization.is_quantized_size(math.prod(jnp.shape(p))):
                return quantization.full(jnp.shape(p), fill)
            # full_like keeps the param's sharding (FSDP / explicit meshes).
            return jnp.full_like(p, fill, _storage_dtype(jnp.result_type(p), storage, real=real))

        return jax.tree.map(make, params, is_leaf=lambda x: x is None)

    def init_fn(params):
        _checks.check_inexact_leaves(params, "params")
        velocity = slots_like(params, initial_accumulator_value, real=True, quantize=quantized)
        # 8-bit leaves count steps too: each step moves their grid (quantization.grid_shift).
        counts = keeps_count or any(
            isinstance(v, quantization.QuantizedArray)
            for v in jax.tree.leaves(
                velocity, is_leaf=lambda x: isinstance(x, quantization.QuantizedArray)
            )
        )
        return RMSpropState(
            count=jnp.zeros([], jnp.int32) if counts else None,
            velocity=velocity,
            average_gradient=slots_like(params, 0, real=False) if centered else None,
            momentum=slots_like(params, 0, real=False) if has_momentum else None,
        )

    def update_fn(updates, state, params=None):
        if quantized:
            state = state._replace(velocity=quantization.restore(state.velocity))
        if params is not None:
            _checks.check_same_structure(updates, params, "params")
        _checks.check_same_structure(
            updates, quantization.structure_view(state.velocity), "the optimizer state"
        )
        _checks.check_inexact_leaves(updates, "grads")
        lr = schedule(state.count) if schedule is not None else learning_rate
        bias_denominator = None
        if bias_correction:
            bias_denominator = _bias_denominator(rho, optax.safe_increment(state.count))

        # The codes of the last 8-bit leaf large enough to be ordered after (see
        # quantization.ordered_after): a one-element list, rebound as leaves are traced.
        previous_codes: list[jax.Array] = []
        # The step's grid shift, traced once for all 8-bit leaves (a one-element list).
        step_shift: list[quantization.GridShift] = []

        @_fusion.traced_once  # one trace per leaf signature, not per leaf (under jit)
        def dense_leaf(g, v, a, m, shift):
            store = None
            if shift is not None:  # 8-bit v: decoded, float32 arithmetic, encoded
                v = quantization.dequantize(v, jnp.shape(g))
                store = lambda new_v: quantization.stored(new_v, shift)
            return rmsprop_leaf_update(
                g, v, a, m, lr, bias_denominator, store_velocity=store, **leaf_options
            )

        def leaf(path, g, v, a, m):
            if g is None:
                return None, v, a, m
            if v is None:
                raise ValueError(
                    f"grads leaf {_trees.path_name(path)!r} has a gradient, but its parameter "
                    "was None when the state was built, so it has no slots: pass None as its "
                    "gradient (a frozen leaf), or build the state with the parameter present"
                )
            if isinstance(v, quantization.QuantizedArray):  # 8-bit v: float32 arithmetic
                quantization.check_dense_gradient(g, _trees.path_name(path))
                if not step_shift:
                    step_shift.append(quantization.grid_shift(state.count))
                shift = step_shift[0]
                ordered = quantization.is_ordered_size(math.prod(jnp.shape(g)))
                if ordered and previous_codes:
                    shift = quantization.ordered_after(shift, previous_codes.pop())
                result = dense_leaf(g, v, a, m, shift)
                if ordered:
                    previous_codes.append(result[1].codes)
                return result
            if isinstance(g, IndexedSlices):
                if g.dense_shape != v.shape:
                    raise ValueError(
                        f"grads leaf {_trees.path_name(path)!r} is an IndexedSlices of "
                        f"dense_shape {g.dense_shape} but the parameter has shape {v.shape}"
                    )
                return rmsprop_rows_update(
                    g, v, a, m, lr, bias_denominator, decay_all_rows=decay_all_rows, **leaf_options
                )
            return dense_leaf(g, v, a, m, None)

        results, treedef = _trees.map_leaves(
            leaf, updates, state.velocity, state.average_gradient, state.momentum
        )
        columns = (
            [treedef.unflatten(col) for col in zip(*results)]
            if results
            else [treedef.unflatten([])] * 4
        )
        new_updates, velocity, average_gradient, momentum_buffer = columns
        new_state = RMSpropState(
            count=None if state.count is None else optax.safe_increment(state.count),
            velocity=velocity,
            average_gradient=average_gradient if centered else None,
            momentum=momentum_buffer if has_momentum else None,
        )
        return new_updates, new_state

    tx = _flat_forms.declare(optax.GradientTransformation(init_fn, update_fn), _flat_forms.per_leaf)
    return _checks.with_state_check(tx, "rj.rmsprop_update")


def scale_by_rmsprop(
    *,
    rho: float = 0.9,
    epsilon: float = 1e-7,
    centered: bool = False,
    eps_in_sqrt: bool = True,
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    accumulator_dtype: Any = None,
    sparse_mode: str = "lazy",
    **unsupported: Any,
) -> optax.GradientTransformation:
    r"""RMSprop's scaling in optax's convention: ``g / sqrt(v + eps)``, no learning rate, no sign.

    Like every optax ``scale_by_*`` (``optax.scale_by_rms``), the output is to
    be followed by a learning rate, e.g. ``optax.scale_by_learning_rate(lr)``,
    which also turns it into a descent direction; momentum is ``optax.trace``
    after it. It is :func:`rmsprop_update` with ``learning_rate=1`` and the
    sign flipped (bit for bit the same arithmetic). Keyword-only, so that a
    call written for the complete :func:`rmsprop_update` cannot pass a learning
    rate as ``rho``.

    Args:
      rho: as :func:`rmsprop_update`; so are ``epsilon``, ``centered``,
        ``eps_in_sqrt``, ``initial_accumulator_value``, ``bias_correction``,
        ``accumulator_dtype`` and ``sparse_mode``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`RMSpropState`.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = optax.chain(rj.scale_by_rmsprop(), optax.scale_by_learning_rate(0.1))
      >>> params = jnp.array([10.0])
      >>> updates, _ = tx.update(params, tx.init(params), params)  # g = w
      >>> optax.apply_updates(params, updates)
      Array([9.683772], dtype=float32)
    """
    if unsupported:
        raise TypeError(
            f"rj.scale_by_rmsprop got {sorted(unsupported)}: it follows optax's scale_by_* "
            "convention (no learning rate, no sign, no momentum; chain "
            "optax.scale_by_learning_rate and optax.trace after it). The complete step, with "
            "learning_rate, momentum and the other conventions, is rj.rmsprop_update(...)"
        )
    return rmsprop_update(
        1.0,
        rho,
        epsilon,
        centered,
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=initial_accumulator_value,
        bias_correction=bias_correction,
        maximize=True,  # -(1 * (-g) / d): the positive scaled gradient, as optax
        accumulator_dtype=accumulator_dtype,
        sparse_mode=sparse_mode,
    )
