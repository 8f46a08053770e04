r"""8-bit blockwise state (``accumulator_dtype="int8"``), after bitsandbytes' 8-bit RMSprop.

The second-moment slot ``v`` (the mean of :math:`|g|^2`, non-negative) of every
leaf with at least :data:`MIN_QUANTIZED_SIZE` elements is stored as a
:class:`QuantizedArray`: the leaf is flattened and cut into blocks of
:func:`block_size` elements (the largest divisor of its size from 128 to
256, else 256 with the last block zero-padded); each block keeps one float32
``block_scale`` :math:`s` (at or above its largest value) and one uint8 code
:math:`c` per element, a tiny float relative to the scale (4 mantissa bits, 16
values per octave, 16 octaves):

.. math::

  v \approx s \cdot 2^{-k/16}\text{, linearly interpolated within each octave;}
  \quad k = 255 - c;\quad c = 0 \Leftrightarrow v = 0

Exactly: the code is the float32 bit pattern of :math:`v / s` counted down
from 1.0 in steps of :math:`2^{19}` (``bits(1.0) - k << 19``), so encoding
and decoding are integer arithmetic on the bits: no table, no gather, and
XLA fuses them into the loops of the step. That is 1 + 4/256 = 1.016 bytes
per element instead of 4 (at most 1.031 with smaller blocks).

**One step** of a quantized leaf: decode ``v``, run the same float32
arithmetic as every other path (:func:`rmsprop_jax.rmsprop_leaf_update`, so
the step itself uses the new ``v`` before rounding), and encode the new ``v``.
The new block maximum is not known before the loop that computes the new
``v``; the encode instead uses a scale known beforehand, the power of two at
or above :data:`HEADROOM` (4) times the block's largest stored ``v``
(:func:`speculative_scale`, from a reduction over the uint8 codes). Against a
power of two the encode is an exponent subtraction on the bits (exact), and
the step is three loops that read no float32 ``v``: the parameter update, the
encode, and the codes' block maxima. The scale thus stays within a factor 4
to 8 (2 to 3 octaves) of the block's maximum: the 16-octave range ends 13 to
14 octaves below it, and the relative rounding is the same as against the
maximum itself.

A block whose new ``v`` outgrew the scale (a value more than about 4x its
block's old maximum: the first step from a zero state, a block's first
non-zero gradient, a gradient spike) has a clipped top code 255. When any
block of any leaf has one, one branch for the whole step encodes those blocks
again against an exact bound, :math:`\rho V + (1 - \rho) \max_\text{block}
|g|^2` with :math:`V` the block's largest old value (:func:`velocity_bounds`,
within one octave of the new maximum), from the new ``v`` recomputed in the
branch (a loop of zero or one iteration, which XLA runs in place). Counted
on ``python -m rmsprop_jax parity``'s tasks: the branch ran in 7.5 % of the
digits MLP's 840 steps (0.47 % of its blocks on average) and in 0.15 % of
the character MLP's 2000 steps. Zero stays exactly zero, so a
zero gradient keeps a zero state (no NaN); a positive value below the range
keeps the smallest code (its ``v`` is overstated, its step smaller).

**Outliers stay in their element.** A non-finite new ``v`` (a gradient
element whose square overflows float32, such as 1e20, or an inf or NaN
gradient) is stored with the top code, i.e. as its block's scale (2**126
when the block has no finite non-zero value); its block is encoded again
against the exact bound, which counts only gradients whose square is
finite, so the block's other values keep their precision. The step that met
it used the exact float32 ``v`` (inf: that element does not move, as with
float32 state), and every other parameter moves exactly as without it.

**Accuracy.** One rounding to nearest makes a relative error of at most 1/32 (3.1 %)
at the bottom of an octave, 1/64 at its top, the same at every magnitude
down to :math:`2^{-15} s` (3e-5 of the scale); smaller positive values keep
the smallest code. The previous format (bitsandbytes' dynamic map, through
version 0.1) erred 0.35 % near the block maximum but 3.5 % at 1/10 of it,
7 % at 1/100, 11 % at 1/1000 and 47 % above 1e-6
(``tests/test_quantization.py`` compares the two). Round to nearest on
the fixed grid of a power-of-two scale would ratchet when ``rho`` is close
to 1 (a step then lowers ``v`` by less than half a code step, so ``v`` could
rise but never fall: ``rho=0.99`` measured 25 % high after 200 steps); each
step therefore moves the grid up by a random fraction of a step
(:func:`grid_shift`, one draw per step), which keeps round to nearest and
makes it unbiased over the steps. Over many steps the roundings add up like
an AR(1) process (``v`` keeps ``rho`` of its rounded self). Measured after
200 steps of N(0, 1) gradients on a 256x64 leaf (``_track`` in
``tests/test_quantization.py``, which bounds these numbers): ``rho=0.9``:
relative error of ``v`` median 2.1 %, 99th percentile 8 %, max 15 %; the
denominator :math:`\sqrt{v+\epsilon}` median 1.1 %, max 7 %.
``rho=0.99``: ``v`` median 4.6 %, 99th percentile 18 %, max 29 %; the
denominator median 2.3 %. (The dynamic map: ``rho=0.9`` ``v`` median
0.7 %, max 11 %; ``rho=0.99`` 1.2 %, 8 %.) Training: ``python -m
rmsprop_jax parity`` gives final losses within 0.27 % (digits MLP) and
0.10 % (character MLP) of float32 state, where the dynamic map gave
0.51 % and 0.04 %.

**What stays float32** (as bitsandbytes): leaves with fewer than
:data:`MIN_QUANTIZED_SIZE` = 4096 elements (biases, norms: little memory,
and most sensitive), and the signed slots -- the centered mean gradient and
the momentum buffer -- of every leaf. (bitsandbytes' 8-bit RMSprop silently
drops momentum; here momentum works and its buffer is float32.) Row-sparse
gradients (:class:`~rmsprop_jax.IndexedSlices`) on a quantized leaf raise
NotImplementedError: a row is not a block, so a lazy row update would have
to requantize whole blocks of untouched rows.

A :class:`QuantizedArray` is a NamedTuple of two arrays, so the state stays
a pytree of fixed shapes: ``jit``, buffer donation, ``jax.tree`` utilities
and checkpointing work unchanged, and the step compiles once. The leaf's
shape is not stored; it is the gradient's (and the parameter's) shape. A
state saved by version 0.1 (fields ``codes`` / ``absmax``, the dynamic map)
is refused by name, never reinterpreted.

Reference: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*,
ICLR 2022 (the blockwise scheme; the code here is a 4-bit-mantissa float
instead of their dynamic map).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "HEADROOM",
    "MIN_BLOCK_SIZE",
    "MIN_QUANTIZED_SIZE",
    "STEPS_PER_OCTAVE",
    "QuantizedArray",
    "block_size",
    "check_dense_gradient",
    "decode",
    "dequantize",
    "encode",
    "full",
    "grid_shift",
    "is_quantized_size",
    "quantize",
    "quantize_to_power_of_two",
    "requantize_clipped_blocks",
    "restore",
    "speculative_scale",
    "state_bytes_per_param",
    "stored_max",
    "structure_view",
    "tree_nbytes",
    "velocity_bounds",
]

#: Elements per block (at most; see :func:`block_size`); each block has its own float32 scale.
BLOCK_SIZE = 256
#: Leaves with fewer elements keep a float32 ``v`` (bitsandbytes' ``min_8bit_size``).
MIN_QUANTIZED_SIZE = 4096
#: Codes per octave (4 mantissa bits): code ``c`` is ``255 - c`` such steps below the scale.
STEPS_PER_OCTAVE = 16
#: A step encodes the new ``v`` against this many times the block's largest stored ``v``.
HEADROOM = 4.0

_SHIFT = 23 - 4  # float32 mantissa bits below the 4 a code keeps
_ONE_BITS = 0x3F800000  # bits of 1.0
_MANTISSA_MASK = 0x7FFFFF
_LARGEST_POWER_OF_TWO = np.float32(2.0**127)
_LARGEST_BOUND = np.float32(2.0**126)  # its reciprocal is the smallest normal float32


class QuantizedArray(NamedTuple):
    """A non-negative array stored as 8-bit codes relative to one float32 scale per block.

    ``value[k] = decode(codes[k]) * block_scale[k // B]`` for the flattened
    array, ``B = block_size(size)``, zero-padded to ``n_blocks * B`` elements.
    """

    #: uint8 [n_blocks * BLOCK_SIZE]: 0 is 0; ``c > 0`` is ``255 - c`` steps of 1/16 octave below 1.
    codes: jax.Array
    #: float32 [n_blocks]: the block's largest value, up to one octave more (0: all zero).
    block_scale: jax.Array


def encode(y: jax.Array) -> jax.Array:
    """uint8 codes of ``y`` in [0, 1] (round to nearest): 0 for 0, at least 1 for ``y > 0``.

    Values above 1 (and NaN) give 255, negative ones 0; positive values below
    the 16-octave range give 1 (the smallest non-zero value, 2**-16 * 1.125).
    """
    y = jnp.asarray(y, jnp.float32)
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    steps = (_ONE_BITS - bits + (1 << (_SHIFT - 1)) - 1) >> _SHIFT  # to the nearest step
    code = jnp.clip(255 - steps, 1, 255)
    return jnp.where(y > 0, code, jnp.where(jnp.isnan(y), 255, 0)).astype(jnp.uint8)


def decode(codes: jax.Array) -> jax.Array:
    """The value in [0, 1] of each code (exact inverse of :func:`encode` on its outputs)."""
    c = codes.astype(jnp.int32)
    value = jax.lax.bitcast_convert_type(_ONE_BITS - ((255 - c) << _SHIFT), jnp.float32)
    return jnp.where(c == 0, jnp.float32(0), value)


def is_quantized_size(size: int) -> bool:
    """Whether a leaf of ``size`` elements gets 8-bit state (``size >= MIN_QUANTIZED_SIZE``)."""
    return size >= MIN_QUANTIZED_SIZE


#: The smallest block :func:`block_size` picks to avoid padding.
MIN_BLOCK_SIZE = 128


def block_size(size: int) -> int:
    """Elements per block of a leaf of ``size`` elements: the largest divisor of ``size`` in
    [128, 256], else 256 (the last block zero-padded).

    A divisor makes the blocks a reshape of the leaf: on XLA:CPU a padded (or
    sliced) leaf is a materialised copy, read by every blocked reduction of
    the step (a 100,000-element leaf gets blocks of 250). At rest: at most
    1 + 4/128 = 1.031 bytes per element, 1.016 for blocks of 256.
    """
    for candidate in range(BLOCK_SIZE, MIN_BLOCK_SIZE - 1, -1):
        if size % candidate == 0:
            return candidate
    return BLOCK_SIZE


def _blocks(size: int) -> int:
    return -(-size // block_size(size))


def _as_blocks(x: jax.Array) -> jax.Array:
    x = jnp.ravel(jnp.asarray(x))
    size, n_blocks = block_size(x.size), _blocks(x.size)
    return jnp.pad(x, (0, n_blocks * size - x.size)).reshape(n_blocks, size)


def _relative(values: jax.Array, scale: jax.Array) -> jax.Array:
    """``values / scale`` per block (scale [n_blocks] > 0), exact in range for huge scales too.

    The reciprocal of a scale above 2**126 is subnormal (flushed to 0 on
    XLA:CPU): huge scales are divided by 2**64 first (exact). A product may
    exceed 1 by an ulp; it then gets the top code.
    """
    shrink = jnp.where(scale > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
    inverse = 1 / (scale * shrink)  # per block: one multiply per element, not a division
    return (values * shrink[:, None]) * inverse[:, None]


# |g| from here on squares to inf in float32 (its new v is not finite and gets the top code).
_SQUARABLE = np.float32(np.sqrt(np.finfo(np.float32).max))


def _largest_squarable(a: jax.Array, b: jax.Array) -> jax.Array:
    """max of two magnitudes, counting those whose square overflows (and NaN) as 0."""
    keep = lambda x: jnp.where(jnp.abs(x) < _SQUARABLE, jnp.abs(x), jnp.float32(0))
    return jnp.maximum(keep(a), keep(b))


def stored_max(q: QuantizedArray) -> jax.Array:
    """float32 [n_blocks]: each block's largest stored value (a reduction over the uint8 codes)."""
    n_blocks = q.block_scale.shape[0]
    return q.block_scale * decode(jnp.max(q.codes.reshape(n_blocks, -1), axis=1))


def speculative_scale(q: QuantizedArray) -> jax.Array:
    """float32 [n_blocks]: the power of two at or above :data:`HEADROOM` times each block's
    largest stored value (0 for 0; at most 2**125).

    A step's new ``v`` is encoded against it (:func:`quantize_to_power_of_two`)
    before the new block maximum is known.
    """
    bits = jax.lax.bitcast_convert_type(HEADROOM * stored_max(q), jnp.int32)
    up = (bits + _MANTISSA_MASK) & ~_MANTISSA_MASK  # round up to a power of two
    return jnp.minimum(jax.lax.bitcast_convert_type(up, jnp.float32), _LARGEST_BOUND / 2)


def quantize_to_power_of_two(
    x: jax.Array, scale: jax.Array, shift: jax.Array | None = None
) -> QuantizedArray:
    """Codes of a non-negative ``x`` against ``scale`` [n_blocks], each 0 or a power of two.

    ``encode(x / scale)`` computed on the bits (the division is an exponent
    subtraction: exact, no reciprocal): the same codes as :func:`quantize`
    with ``upper_bound=scale``. Values above the scale (and non-finite ones)
    get 255, so a block whose largest code is 255 may have clipped one.
    With ``shift`` (a float32 scalar in (2**-1/16, 1]: :func:`grid_shift`),
    ``x * shift`` is encoded and the block scale is ``scale / shift``: the
    same codes on a grid of values moved up by a fraction of a step.
    """
    blocks = _as_blocks(x).astype(jnp.float32)
    if shift is not None:
        blocks = blocks * shift
        scale_out = scale / shift
    else:
        scale_out = scale
    bits = jax.lax.bitcast_convert_type(blocks, jnp.int32)
    scale_bits = jax.lax.bitcast_convert_type(scale, jnp.int32)[:, None]
    steps = (scale_bits - bits + (1 << (_SHIFT - 1)) - 1) >> _SHIFT  # as encode(x / scale)
    code = jnp.clip(255 - steps, 1, 255)
    codes = jnp.where(blocks > 0, code, jnp.where(jnp.isnan(blocks), 255, 0)).astype(jnp.uint8)
    codes = jnp.where(jnp.isfinite(blocks), codes, jnp.uint8(255))
    return QuantizedArray(codes=codes.reshape(-1), block_scale=scale_out)


def grid_shift(count: jax.Array) -> jax.Array:
    """float32 scalar ``2**(-u/16)``, ``u`` in [0, 1) a hash of the step ``count``.

    Each step's codes lie on the 4-bit-mantissa grid moved up by ``u`` of a
    step (:func:`quantize_to_power_of_two`), so that round to nearest is
    unbiased over the steps. On the fixed grid of a power-of-two scale it
    would ratchet when ``rho`` is close to 1: a step then lowers ``v`` by less
    than half a code step, so ``v`` could rise but never fall (``rho=0.99``:
    25 % high after 200 steps). One draw per step (not per leaf, so that the
    result does not depend on how a wrapper such as ``nnx.State`` names the
    leaves); each element's error is its own distance to the moved grid.
    """
    h = jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):  # murmur3 fmix32
        h = h ^ (h >> shift)
        if multiplier is not None:
            h = h * jnp.uint32(multiplier)
    u = (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    return jnp.exp2(-u / STEPS_PER_OCTAVE)


def velocity_bounds(pairs: Sequence[tuple[QuantizedArray, jax.Array]], rho: Any) -> list:
    """float32 [n_blocks] per ``(state, gradient)`` pair: at or above every finite new ``v``.

    ``rho * V + (1 - rho) * G^2``: ``V`` the block's :func:`stored_max`,
    ``G`` its largest ``|g|`` whose square is finite. At most twice the
    block's new maximum (one octave), since that maximum is at least each of
    the two terms. An outlier (inf, NaN, or ``|g|`` whose square overflows)
    never inflates its block's bound; a block whose bound would be 0 but that
    holds one gets 2**126 (the scale that stores the outlier's non-finite
    ``v``; its other values are 0). Always finite.

    Two plain (vectorised) reductions of ``g`` per leaf; only when some
    ``|g|`` of some leaf does not square to a finite value does one branch,
    for all the leaves, skip the outliers with a custom reducer (scalar code
    on XLA:CPU).
    """
    if not pairs:
        return []
    blocks = [
        _as_blocks(jnp.abs(g) if jnp.iscomplexobj(g) else g).astype(jnp.float32) for _, g in pairs
    ]
    plain = [jnp.maximum(jnp.max(b, axis=1), -jnp.min(b, axis=1)) for b in blocks]  # NaN if any is
    largest = jax.lax.cond(
        jnp.all(jnp.concatenate(plain) < _SQUARABLE),  # False for NaN too
        lambda blocks, plain: plain,
        lambda blocks, plain: [
            jax.lax.reduce(b, np.float32(0), _largest_squarable, (1,)) for b in blocks
        ],
        blocks,
        plain,
    )
    rho = jnp.asarray(rho, jnp.float32)
    bounds = []
    for (q, _), top_g, with_outliers in zip(pairs, largest, plain):
        bound = rho * stored_max(q) + (1 - rho) * top_g * top_g
        has_outlier = ~(with_outliers < _SQUARABLE)
        bounds.append(jnp.where((bound == 0) & has_outlier, _LARGEST_BOUND, bound))
    return bounds


def requantize_clipped_blocks(
    old: Sequence[QuantizedArray],
    grads: Sequence[jax.Array],
    speculative: Sequence[QuantizedArray],
    new_velocity: Callable[[jax.Array, jax.Array], jax.Array],
    rho: Any,
) -> list:
    """The step's new states: ``speculative``, except blocks whose top code is 255.

    ``speculative[i]`` encodes the new ``v`` of leaf ``i`` against
    :func:`speculative_scale` of ``old[i]``; a block whose largest code is
    255 may have clipped a value above that scale (or holds a non-finite
    one). Only when some block of some leaf does (one branch for all the
    leaves) are those blocks encoded again, against :func:`velocity_bounds`,
    from ``new_velocity(g, dequantized old v)`` recomputed in the branch (so
    that the common path never materialises a float32 ``v``).
    """
    tops = [jnp.max(q.codes.reshape(q.block_scale.shape[0], -1), axis=1) for q in speculative]
    # One reduction for all the leaves (the barrier keeps XLA from splitting it per leaf).
    any_clipped = jnp.max(jax.lax.optimization_barrier(jnp.concatenate(tops))) == 255

    def requantize(old, grads, speculative, tops):
        result = []
        for q, g, fast, top, bound in zip(
            old, grads, speculative, tops, velocity_bounds(list(zip(old, grads)), rho)
        ):
            redo = top == 255
            exact = quantize(new_velocity(g, dequantize(q, jnp.shape(g))), upper_bound=bound)
            n_blocks = q.block_scale.shape[0]
            codes = jnp.where(
                redo[:, None], exact.codes.reshape(n_blocks, -1), fast.codes.reshape(n_blocks, -1)
            )
            scale = jnp.where(redo, exact.block_scale, fast.block_scale)
            result.append(QuantizedArray(codes=codes.reshape(-1), block_scale=scale))
        return result

    # A loop of zero or one iteration, not a cond: XLA updates a loop's carried buffers in
    # place, where a cond's pass-through branch would copy every leaf's codes.
    def body(carry):
        _, fast = carry
        return jnp.array(False), requantize(list(old), list(grads), fast, tops)

    return jax.lax.while_loop(lambda carry: carry[0], body, (any_clipped, list(speculative)))[1]


def quantize(x: jax.Array, upper_bound: jax.Array | None = None) -> QuantizedArray:
    """Blockwise 8-bit codes of a NON-NEGATIVE real array (any shape; computed in float32).

    Args:
      x: the values; non-finite ones get the top code (their block's scale).
      upper_bound: optional float32 [n_blocks], at or above every finite value
        of its block (:func:`velocity_bound`; capped at 2**127). It is then
        the scale: one elementwise pass, no block maximum. Without it, the
        scale is the block's largest finite value.
    """
    blocks = _as_blocks(x).astype(jnp.float32)
    if upper_bound is None:
        return _quantize_exact(blocks)
    # At most 2**126, whose reciprocal is float32-normal: one multiply per element, and the
    # loop reads two per-block arrays (XLA would recompute per element what it may fuse).
    scale = jnp.minimum(jnp.asarray(upper_bound, jnp.float32), _LARGEST_BOUND)
    inverse = 1 / jnp.where(scale > 0, scale, 1.0)
    codes = jnp.where(jnp.isfinite(blocks), encode(blocks * inverse[:, None]), jnp.uint8(255))
    return QuantizedArray(codes=codes.reshape(-1), block_scale=scale)


def _quantize_exact(blocks: jax.Array) -> QuantizedArray:
    finite = jnp.isfinite(blocks)
    largest = jnp.max(jnp.where(finite, blocks, 0), axis=1)
    # No finite non-zero value but a non-finite one: saturate at float32's largest power of 2.
    scale = jnp.where((largest == 0) & ~jnp.all(finite, axis=1), _LARGEST_POWER_OF_TWO, largest)
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: 0 / 1, not 0 / 0
    codes = jnp.where(finite, encode(_relative(blocks, safe)), jnp.uint8(255))
    return QuantizedArray(codes=codes.reshape(-1), block_scale=scale)


def dequantize(q: QuantizedArray, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The array of ``shape`` that ``q`` stands for: ``decode(codes) * block_scale``."""
    size = math.prod(shape)
    n_blocks = q.block_scale.shape[0]
    per_block = block_size(size)
    if q.codes.shape != (n_blocks * per_block,) or n_blocks != _blocks(size):
        raise ValueError(
            f"a QuantizedArray with {n_blocks} blocks and {q.codes.shape[0]} codes does not "
            f"hold an array of shape {tuple(shape)} ({_blocks(size)} blocks of {per_block})"
        )
    values = decode(q.codes.reshape(n_blocks, per_block)) * q.block_scale[:, None]
    return values.reshape(-1)[:size].reshape(shape).astype(dtype)


def full(shape: tuple[int, ...], fill_value: Any) -> QuantizedArray:
    """``quantize(jnp.full(shape, fill_value))`` for ``fill_value >= 0``, without the float array.

    Every element is exactly ``fill_value`` (code 255, scale ``fill_value``;
    code 0 when it is 0); the padding is 0.
    """
    size = math.prod(shape)
    n_blocks = _blocks(size)
    fill = jnp.asarray(fill_value, jnp.float32)
    code = jnp.where(fill > 0, jnp.uint8(255), jnp.uint8(0))
    codes = jnp.concatenate(
        [
            jnp.full((size,), code, jnp.uint8),
            jnp.zeros((n_blocks * block_size(size) - size,), jnp.uint8),
        ]
    )
    return QuantizedArray(codes=codes, block_scale=jnp.full((n_blocks,), fill, jnp.float32))


def check_dense_gradient(grad: Any, leaf_name: str) -> None:
    """Raises NotImplementedError for a row-sparse gradient of a leaf with 8-bit state."""
    from rmsprop_jax.sparse import IndexedSlices

    if isinstance(grad, IndexedSlices):
        raise NotImplementedError(
            f"grads leaf {leaf_name!r} is an IndexedSlices (row-sparse gradient) but its "
            "velocity is stored in 8 bits (accumulator_dtype='int8'); row-sparse updates of "
            "blockwise-quantized state are not supported. Use accumulator_dtype=None or "
            "jnp.bfloat16 for it (e.g. with rj.param_groups), or pass a dense gradient "
            "(grads.to_dense())."
        )


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _is_rebuilt(x: Any) -> bool:
    """A QuantizedArray whose NamedTuple a wrapper rebuilt as a mapping (``nnx.State``, a dict)."""
    return isinstance(x, Mapping) and set(x.keys()) == set(QuantizedArray._fields)


def restore(tree: Any) -> Any:
    """``tree`` with every rebuilt QuantizedArray (see :func:`_is_rebuilt`) a QuantizedArray again.

    ``nnx.Optimizer`` stores the state as ``nnx.State`` containers and hands
    a NamedTuple back as a mapping of its fields; a restored checkpoint without
    a target does the same with dicts. The fields are read by name.
    """
    return jax.tree.map(
        lambda x: (
            QuantizedArray(**{f: x[f] for f in QuantizedArray._fields}) if _is_rebuilt(x) else x
        ),
        tree,
        is_leaf=lambda x: _is_quantized(x) or _is_rebuilt(x),
    )


def structure_view(tree: Any) -> Any:
    """``tree`` with each :class:`QuantizedArray` replaced by None (one leaf, like its parameter).

    For structure checks: a slot tree with 8-bit leaves then has the
    parameters' structure again (None counts as a leaf there).
    """
    return jax.tree.map(lambda x: None if _is_quantized(x) else x, tree, is_leaf=_is_quantized)


def tree_nbytes(tree: Any) -> int:
    """Bytes of all the arrays in ``tree`` (``jax.tree.leaves``; ShapeDtypeStructs count too)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes_per_param(state: Any, params: Any) -> float:
    """Bytes of ``state``'s arrays per parameter element (counters and all)."""
    return tree_nbytes(state) / sum(math.prod(np.shape(p)) for p in jax.tree.leaves(params))
