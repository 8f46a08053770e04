r"""8-bit blockwise state (``accumulator_dtype="int8"``), after bitsandbytes' 8-bit RMSprop.

The second-moment slot ``v`` (the mean of :math:`|g|^2`, non-negative) of every
leaf with at least :data:`MIN_QUANTIZED_SIZE` elements is stored as a
:class:`QuantizedArray`: the leaf is flattened and cut into blocks of
:func:`block_size` elements (the largest divisor of its size from 128 to
256, else 256 with the last block short); each block keeps one float32
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
arithmetic as every other path (:func:`rmsprop_jax.rmsprop_leaf_update`),
encode the new ``v`` (:func:`quantize_step`) and divide by it *as stored*
(:func:`stored`), as the bfloat16 path reads its slot (and Keras and PyTorch
their low-precision optimizer variables). The new scale is the power of two
just above the block's largest new value, found without any array of the
leaf's size in memory (one loop computes the new values and reduces each
block's scale, in code steps, from their bits: :func:`block_maxima`), so
the encode is an exponent subtraction on the bits (exact, one rounding) and the step has no
branch: three loops over the leaf (the block maxima, the codes, the
parameter update) and one over its blocks (the new scales, after the encode
has read the old ones). The update reads the codes the encode wrote,
so with the state donated XLA overwrites the old codes and scales in place; an update
reading the old codes (the unrounded new ``v``, bitsandbytes' order) made
XLA copy them every step, and codes stored as blocks (2-D) made it copy the
new ones: the codes keep the leaf's own shape (the plain step at 16M params
in one leaf: 1.41x of the float32 floor with the codes' copy, 1.17x to 1.35x without
in three runs of ``python -m rmsprop_jax bench``). The range
thus ends 15 to 16 octaves below the block's maximum. Each step moves the
grid up by a random fraction of a code step (:func:`grid_shift`), which
keeps round to nearest unbiased over the steps. Zero stays exactly zero, so
a zero gradient keeps a zero state (no NaN); a positive value below the
range keeps the smallest code (its ``v`` is overstated, its step smaller).

**Outliers stay in their element.** A non-finite new ``v`` (a gradient
element whose square overflows float32, such as 1e20, or an inf or NaN
gradient) is stored with the top code, i.e. as its block's scale (2**127
when the block has no finite non-zero value); the block's scale counts only
its finite values, so the block's other codes and its scale are what they
would be without it. The step that met it reads the non-finite value, not
the saturated code: that element moves as with float32 state (not at all
for 1e20; NaN for an inf or NaN gradient).

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
0.7 %, max 11 %; ``rho=0.99`` 1.2 %, 8 %.) Each step divides by ``v`` as
stored, so the parameters carry these errors: after the 200 steps of lr
0.01, ``rho=0.9``, they differ from float32 state's by 1.4 % (median,
relative) and at most 4.6 % of the largest parameter (``rho=0.99``: 2.1 %
and 6.5 %). Training: ``python -m rmsprop_jax parity`` gives final losses
within 0.59 % (digits MLP) and 0.04 % (character MLP) of float32 state
(test accuracy and held-out loss the same to the digits printed), where the
step that divided by the unrounded ``v`` gave 0.37 % and 0.03 % and the
dynamic map 0.51 % and 0.04 %.

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
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _fusion

__all__ = [
    "BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "MIN_ORDERED_SIZE",
    "MIN_QUANTIZED_SIZE",
    "STEPS_PER_OCTAVE",
    "GridShift",
    "QuantizedArray",
    "block_maxima",
    "block_size",
    "check_dense_gradient",
    "decode",
    "dequantize",
    "encode",
    "full",
    "grid_shift",
    "is_ordered_size",
    "is_quantized_size",
    "ordered_after",
    "quantize",
    "quantize_step",
    "restore",
    "state_bytes_per_param",
    "stored",
    "structure_view",
    "tree_nbytes",
]

#: Elements per block (at most; see :func:`block_size`); each block has its own float32 scale.
BLOCK_SIZE = 256
#: Leaves with fewer elements keep a float32 ``v`` (bitsandbytes' ``min_8bit_size``).
MIN_QUANTIZED_SIZE = 4096
#: Codes per octave (4 mantissa bits): code ``c`` is ``255 - c`` such steps below the scale.
STEPS_PER_OCTAVE = 16

_SHIFT = 23 - 4  # float32 mantissa bits below the 4 a code keeps
_ONE_BITS = 0x3F800000  # bits of 1.0
_DECODE_BASE = _ONE_BITS - (255 << _SHIFT)  # code 0's place on the grid (1.0625 * 2**-16)
# Added to a value's bits before they are counted in code steps: half a step (round to nearest)
# and the 255 steps from code 0 to the scale.
_HALF_STEP_AND_TOP = (1 << (_SHIFT - 1)) + (255 << _SHIFT)
_LARGEST_POWER_OF_TWO = np.float32(2.0**127)


class QuantizedArray(NamedTuple):
    """A non-negative array stored as 8-bit codes relative to one float32 scale per block.

    ``value = decode(codes) * block_scale[k // B]`` for the element at flat
    index ``k`` (``B = block_size(size)``; the last block may be short). The
    codes have the array's own shape, so the step's loops over them are
    elementwise: XLA then writes the new codes in place of the old ones and
    reads them in the update loop as written (see :func:`stored`).
    """

    #: uint8, the array's shape: 0 is 0; ``c > 0`` is ``255 - c`` steps of 1/16 octave below 1.
    codes: jax.Array
    #: float32 [n_blocks]: at or above the block's largest value, within an octave (0: all zero).
    block_scale: jax.Array


def _select(which: jax.Array, on_true: Any, on_false: Any) -> jax.Array:
    """``jnp.where`` for same-dtype operands (a Python scalar takes the other operand's dtype),
    as one ``select``: ``jnp.where`` traces a nested function per call (compile time)."""
    shape = np.broadcast_shapes(jnp.shape(which), jnp.shape(on_true), jnp.shape(on_false))
    dtype = on_true.dtype if hasattr(on_true, "dtype") else on_false.dtype

    def spread(x: Any, dtype: Any) -> jax.Array:
        x = jnp.asarray(x, dtype)
        if x.shape == shape:
            return x
        return jax.lax.broadcast_in_dim(x, shape, tuple(range(len(shape) - x.ndim, len(shape))))

    return jax.lax.select(spread(which, jnp.bool_), spread(on_true, dtype), spread(on_false, dtype))


def encode(y: jax.Array) -> jax.Array:
    """uint8 codes of ``y`` in [0, 1] (round to nearest): 0 for 0, at least 1 for ``y > 0``.

    Values above 1 (and NaN) give 255, negative ones 0; positive values below
    the 16-octave range give 1 (the smallest non-zero value, 2**-16 * 1.125).
    """
    y = jnp.asarray(y, jnp.float32)
    # the scale 1.0; _codes_against reads magnitudes, so negative values are set apart after
    codes = _codes_against(y, jnp.int32(STEPS_PER_OCTAVE * (_ONE_BITS >> 23)))
    return jnp.where(y < 0, jnp.uint8(0), codes)


def decode(codes: jax.Array) -> jax.Array:
    """The value in [0, 1] of each code (exact inverse of :func:`encode` on its outputs)."""
    c = codes.astype(jnp.uint32)
    # bits(1.0) - (255 - c) steps, as one shift and one add: written as the difference, it
    # compiled to a shift, an or and an add (the object code of the step's three loops that
    # decode: 3 to 18 instructions fewer each; the plain step at 16M params 3.6 % and 9 %
    # faster in two A/Bs with the float32 floor, centered + momentum the same). Code 0 is
    # 0 through an unsigned minimum with 0 - c, which wraps above every other code's bits: a
    # select on c == 0 compared the bytes, then widened the comparison to 32 bits in every
    # loop that decodes (plain step at 16M params, A/B in one process: 1.291x -> 1.179x of
    # the floor on one leaf, 1.463x -> 1.375x on 160; each of the three loops 5-11 % faster).
    bits = jax.lax.min(jnp.uint32(0) - c, (c << _SHIFT) + jnp.uint32(_DECODE_BASE))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def is_quantized_size(size: int) -> bool:
    """Whether a leaf of ``size`` elements gets 8-bit state (``size >= MIN_QUANTIZED_SIZE``)."""
    return size >= MIN_QUANTIZED_SIZE


#: The smallest block :func:`block_size` picks to avoid padding.
MIN_BLOCK_SIZE = 128


def block_size(size: int) -> int:
    """Elements per block of a leaf of ``size`` elements: a divisor of ``size`` in [128, 256]
    (else 256, the last block short).

    A divisor makes the blocks a reshape of the leaf, with no short last
    block (whose maxima the step reduces in a loop of their own: padded into
    the block maxima's loop, it made that loop check every index). Among the
    divisors, the largest that is a multiple of 8 and
    leaves an even number of blocks, else the largest multiple of 8, else the
    largest: XLA:CPU's loops over the blocks ran 1.6-1.8x slower otherwise
    (measured on 160 leaves of 100,000 elements: blocks of 250 or 160, the
    latter 625 of them, 15 ms per encode; of 200, 9 ms). At rest: at most
    1 + 4/128 = 1.031 bytes per element; 1.016 for blocks of 256, 1.02 for
    200.
    """
    divisors = [b for b in range(BLOCK_SIZE, MIN_BLOCK_SIZE - 1, -1) if size % b == 0]
    for fits in (lambda b: b % 8 == 0 and size // b % 2 == 0, lambda b: b % 8 == 0, bool):
        for candidate in divisors:
            if fits(candidate):
                return candidate
    return BLOCK_SIZE


def _blocks(size: int) -> int:
    return -(-size // block_size(size))


def _as_blocks(x: jax.Array) -> jax.Array:
    """``x`` flattened and cut into its blocks (zero-padded): [n_blocks, B]."""
    x = jnp.ravel(jnp.asarray(x))
    size, n_blocks = block_size(x.size), _blocks(x.size)
    if n_blocks * size != x.size:
        x = jnp.pad(x, (0, n_blocks * size - x.size))
    return x.reshape(n_blocks, size)


def _per_element(per_block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A per-block value [n_blocks] spread over the elements of a leaf of ``shape``."""
    size = math.prod(shape)
    n_blocks, b = per_block.shape[0], block_size(size)
    spread = jax.lax.broadcast_in_dim(per_block, (n_blocks, b), (0,)).reshape(-1)
    if n_blocks * b != size:
        spread = spread[:size]
    return spread.reshape(shape)


def _relative(values: jax.Array, scale: jax.Array) -> jax.Array:
    """``values / scale`` per block (``scale`` [n_blocks] > 0), exact in range for huge scales too.

    The reciprocal of a scale above 2**126 is subnormal (flushed to 0 on
    XLA:CPU): huge scales are divided by 2**64 first (exact). A product may
    exceed 1 by an ulp; it then gets the top code.
    """
    shrink = jnp.where(scale > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
    inverse = 1 / (scale * shrink)  # per block: one multiply per element, not a division
    shape = jnp.shape(values)
    return (values * _per_element(shrink, shape)) * _per_element(inverse, shape)


class GridShift(NamedTuple):
    """A step's move of the code grid (:func:`grid_shift`): ``down = 2**(-u/16)``, ``up = 2**(u/16)``.

    The codes are those of ``v * down`` and the stored scale is multiplied by
    ``up``: both factors come from the step count, so no reciprocal is taken
    in the step (XLA rewrites ``1 / exp2(-t)`` as ``exp2(t)`` where it sees the
    ``exp2``, and only there, so a reciprocal gave leaves ordered by
    :func:`ordered_after` other bits than the rest).
    """

    #: float32 scalar in (2**(-1/16), 1]: multiplies each new ``v`` before it is encoded.
    down: jax.Array
    #: float32 scalar in [1, 2**(1/16)): multiplies the stored scale (``1 / down`` within an ulp).
    up: jax.Array


def grid_shift(count: jax.Array) -> GridShift:
    """The step's :class:`GridShift`: ``2**(-u/16)`` and ``2**(u/16)``, ``u`` in [0, 1) a hash of the
    step ``count``.

    Each step's codes lie on the 4-bit-mantissa grid moved up by ``u`` of a
    step (:func:`quantize_step`), so that round to nearest is unbiased over
    the steps. On the fixed grid it would ratchet when ``rho`` is close to 1:
    a step then lowers ``v`` by less than half a code step, so ``v`` could rise
    but never fall (``rho=0.99``: 25 % high after 200 steps). One draw per
    step (not per leaf, so that the result does not depend on how a wrapper
    such as ``nnx.State`` names the leaves); each element's error is its own
    distance to the moved grid.
    """
    h = jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):  # murmur3 fmix32
        h = h ^ (h >> shift)
        if multiplier is not None:
            h = h * jnp.uint32(multiplier)
    u = (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    return GridShift(down=jnp.exp2(-u / STEPS_PER_OCTAVE), up=jnp.exp2(u / STEPS_PER_OCTAVE))


def _as_grid_shift(shift: GridShift | jax.Array | float) -> GridShift:
    if isinstance(shift, GridShift):
        return shift
    down = jnp.asarray(shift, jnp.float32)
    return GridShift(down=down, up=1 / down)


# A scale's place on the code grid: its exponent field in code steps (16 per octave). A block's
# scale is the power of two above its largest finite value, so its steps are 16 * (e + 1), e
# that value's exponent field; at most 16 * 254 (2**127: the largest power of two in float32).
_LARGEST_SCALE_STEPS = 16 * 254
_LOWEST_SCALE_STEPS = 16 * 2  # 2**-125 (e = 1): a block whose largest value is normal
_FINITE_BITS = 0x7FFFFFFF  # all bits but the sign: a NaN's sign is arbitrary
_INF_BITS = 0x7F800000  # the smallest magnitude of a non-finite float32


def _largest_pair(a: tuple, b: tuple) -> tuple:
    return jax.lax.max(a[0], b[0]), jax.lax.max(a[1], b[1])


def block_maxima(first: jax.Array, second: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest element of each row (the last axis) of two integer arrays of one shape, in
    one loop that computes them: no array of their size is written.

    One reduction with two outputs: XLA:CPU fuses the loop that computes its
    operands into it, so the operands are never written out, where a
    reduction with one output goes to YNNPACK, which reads its operand from
    memory (the step then wrote the operand out in a loop of its own: at 16M
    elements 16 MB of temporaries and a second kernel). Both results must be
    read, or XLA drops one and sends the other to YNNPACK. (A one-output
    maximum of int32 bits read from memory took 34 ms at 16M elements; this
    form, over the same bits, 2.1-2.5 ms.)
    """
    kind = first.dtype
    lowest = jnp.array(jnp.iinfo(kind).min, kind)
    return jax.lax.reduce((first, second), (lowest, lowest), _largest_pair, (first.ndim - 1,))


def _block_maxima_of(first: jax.Array, second: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`block_maxima` of two integer arrays of a leaf's shape, cut into the leaf's blocks.

    A short last block is reduced on its own: padded to a full block in the
    reduction's loop, the whole loop checked each element's index (160
    leaves of 100,006 elements, plain step: 3.57x the float32 floor with
    the padding, 2.03x without; 160 leaves of 100,000 in blocks of 256: the
    reductions' kernel times 48 ms with the padding, 10.6 ms without).
    """
    first, second = jnp.ravel(first), jnp.ravel(second)
    size, b = first.size, block_size(first.size)
    whole = size - size % b

    rows = block_maxima(first[:whole].reshape(-1, b), second[:whole].reshape(-1, b))
    if whole == size:
        return rows
    last = block_maxima(first[whole:][None], second[whole:][None])
    return jnp.concatenate([rows[0], last[0]]), jnp.concatenate([rows[1], last[1]])


def _scale_steps(magnitude: jax.Array) -> jax.Array:
    """Each magnitude's own scale in code steps: ``16 * (e + 1)`` (at most
    :data:`_LARGEST_SCALE_STEPS`), ``e`` its exponent field; negative for a non-finite value.

    Adding one exponent step wraps a non-finite magnitude's bits (exponent
    field 255) to a negative int32, so that a block's largest excludes them;
    zeros and subnormals give 16 (below :data:`_LOWEST_SCALE_STEPS`).
    """
    lifted = magnitude + jnp.int32(1 << 23)
    steps = jax.lax.shift_right_arithmetic(lifted, jnp.int32(_SHIFT)) & -STEPS_PER_OCTAVE
    return jnp.minimum(steps, _LARGEST_SCALE_STEPS)


def _codes_against(values: jax.Array, scale_steps: jax.Array) -> jax.Array:
    """The codes of non-negative float32 ``values`` relative to a power of two per element, given
    as its exponent field in code steps (``scale_steps = 16 * exponent field``).

    ``encode(values / scale)`` on the bits: the nearest code is the value's
    bits, plus half a code step, in code steps (2**19 bits), counted from the
    scale's (255 code steps above code 0: added before the shift, a multiple
    of it, below 2**32 with any magnitude). A non-finite value's bits lie at
    least 16 steps above the largest scale's, so it gets the top code (255)
    from the clip; zero gets 0, a value below the range 1. The sum is shifted
    as unsigned (it passes 2**31 for large values).
    """
    magnitude = jax.lax.bitcast_convert_type(values, jnp.int32) & _FINITE_BITS
    above_code_0 = jax.lax.shift_right_logical(magnitude + _HALF_STEP_AND_TOP, _SHIFT)
    code = jax.lax.clamp(jnp.int32(1), above_code_0 - scale_steps, jnp.int32(255))
    # Zero (and subnormals) to 0 by a byte mask (0 or 255), on uint8: in int32 (a select or an
    # and), XLA recomputed the codes in the update's loop from the old codes, which it then
    # copied to keep them for it; a uint8 select packed its int32 comparison into bytes for a
    # blend in every iteration (plain step at 16M params, A/B with the floor in one process:
    # 1.476x with the select, 1.376x with the mask).
    keep = (magnitude >= (1 << 23)).astype(jnp.uint8) * jnp.uint8(255)
    return code.astype(jnp.uint8) & keep


def quantize_step(x: jax.Array, shift: GridShift | jax.Array | float) -> QuantizedArray:
    """Blockwise codes of a non-negative ``x`` (a step's new ``v``) on the grid moved by ``shift``
    (a :class:`GridShift`, or its ``down`` factor alone: ``up`` is then ``1 / down``).

    Two passes and no branch: each block's scale as a power of two in code
    steps (reduced in the loop that computes the values:
    :func:`block_maxima`), and the codes of ``x * shift.down`` against that
    power of two, the one above the block's largest finite value (within one
    octave of it), computed on the bits (the division is an exponent
    subtraction: exact; one rounding to nearest). The scale stored is
    that power of two times ``shift.up``. Non-finite values get the top code; a
    block with no finite positive value but a non-finite one gets 2**127 (as
    :func:`quantize`); values of 2**127 and above keep the top code. The
    codes have ``x``'s shape: only the per-block values are reshaped, so the
    codes' loop is elementwise (see :class:`QuantizedArray`).
    """
    shape = jnp.shape(x)
    shift = _as_grid_shift(shift)
    shifted = jnp.asarray(x, jnp.float32) * shift.down
    magnitude = jax.lax.bitcast_convert_type(shifted, jnp.int32) & _FINITE_BITS
    # One loop: each block's scale in code steps (the largest of its values' own; a block of
    # zeros and non-finite values gets 2**-126 or less here, which codes them as 2**127 would:
    # 0 and 255) and its largest magnitude (which tells such a block's scale). The codes' loop
    # reads the first as it is. Derived there from the block's largest bits, per run of 8
    # elements, it took 12 of the loop's 40 instructions; in a kernel of its own, one kernel
    # more per leaf (16M params, plain step, A/B in one process: the codes' loop 3.65 -> 3.51
    # ms against that kernel; 4.55 ms in the loop).
    scale_steps, largest = _block_maxima_of(_scale_steps(magnitude), magnitude)
    codes = _codes_against(shifted, _per_element(scale_steps, shape))
    normal = scale_steps >= _LOWEST_SCALE_STEPS
    power = jax.lax.bitcast_convert_type(
        jax.lax.shift_right_logical(_select(normal, scale_steps, 0), 4) << 23, jnp.float32
    )
    scale = _select(
        normal,
        power * shift.up,
        _select(largest >= _INF_BITS, _LARGEST_POWER_OF_TWO, jnp.float32(0)),
    )
    return QuantizedArray(codes=codes, block_scale=scale)


#: 8-bit leaves of at least this many elements run their step's loops one leaf after another.
MIN_ORDERED_SIZE = 2**18


def is_ordered_size(size: int) -> bool:
    """Whether an 8-bit leaf of ``size`` elements is ordered after the previous such leaf."""
    return size >= MIN_ORDERED_SIZE


def ordered_after(shift: GridShift, previous_codes: jax.Array) -> GridShift:
    """``shift`` unchanged, its ``down`` (which each loop that reads the gradient reads) as a value
    that depends on ``previous_codes`` (another leaf's new codes).

    Each step reads a leaf's gradient in three loops (the block maxima, the
    codes, the parameter update). XLA:CPU runs the leaves' loops pass by pass
    (every leaf's block maxima, then every leaf's codes, ...), so each
    pass reads every gradient from memory again. Made to depend on the previous
    leaf's new codes, a leaf's loops start once the previous leaf's encode is
    done: the loops of one leaf then run back to back and read its gradient from cache
    (a leaf of 2**18 to a few million elements; a leaf of 16M elements does not
    fit). Measured (16M parameters, plain, 16 and 40 leaves, ordered and
    unordered steps interleaved in one process): the int8 step 4-9 % faster
    (centered+momentum at 40 leaves: 7 %); at 160 leaves of 100,000 elements
    no difference beyond the noise, so smaller leaves (below
    :data:`MIN_ORDERED_SIZE`) stay unordered. The dependency is a uint8
    shifted right by 7 compared with 1 (always false): no arithmetic on the
    result.
    """
    return shift._replace(down=_after(shift.down, previous_codes))


def _after(value: jax.Array, codes: jax.Array) -> jax.Array:
    """``value`` unchanged, computed after ``codes``: a select on a uint8 test that is always
    false (a code shifted right by 7 is 0 or 1), so XLA orders it after the codes' loop."""
    never = jax.lax.shift_right_logical(jnp.ravel(codes)[0], jnp.uint8(7)) > 1
    return _select(never, jnp.zeros_like(value), value)


def stored(x: jax.Array, shift: GridShift) -> tuple[QuantizedArray, jax.Array]:
    """A step's new ``v`` as stored (:func:`quantize_step`) and as read back (float32, ``x``'s shape).

    The step divides by ``v`` as stored, as the bfloat16 path does (and Keras
    and PyTorch with low-precision optimizer variables). This also orders the
    step's loops: the update reads the codes the encode wrote, so the encode
    may overwrite the old codes in place (donated state) with no copy of them
    (with the update reading the old codes, XLA copied them each step).

    The new block scales are computed after the encode, which reads the old
    ones, in a kernel of their own that the update reads: they then overwrite
    the old scales in place too. Computed before the encode, they made XLA
    copy the old scales every step, one more kernel per leaf (A/B in one
    process, plain config: 3-10 % slower at 16M parameters in one leaf, 8-16 %
    in 160 leaves; the same within the noise in 16 leaves).

    ``shift`` is the step's :func:`grid_shift` (``up`` below 2**(1/16): every
    scale stays finite). A hand-made one whose ``up`` takes a scale past
    float32's largest value (2 or more on a block near 2**127) makes that
    scale NaN here, where :func:`quantize_step` alone gives inf.
    """
    q = quantize_step(x, shift)
    q = q._replace(block_scale=_fusion.computed_once(_after(q.block_scale, q.codes)))
    return q, dequantize(q, jnp.shape(x))


def quantize(x: jax.Array) -> QuantizedArray:
    """Blockwise 8-bit codes of a NON-NEGATIVE real array (any shape; computed in float32).

    The scale is each block's largest finite value; non-finite values get the
    top code (their block's scale).
    """
    x = jnp.asarray(x, jnp.float32)
    blocks = _as_blocks(x)
    finite = jnp.isfinite(blocks)
    largest = jnp.max(jnp.where(finite, blocks, 0), axis=1)
    # No finite non-zero value but a non-finite one: saturate at float32's largest power of 2.
    scale = jnp.where((largest == 0) & ~jnp.all(finite, axis=1), _LARGEST_POWER_OF_TWO, largest)
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: 0 / 1, not 0 / 0
    codes = jnp.where(jnp.isfinite(x), encode(_relative(x, safe)), jnp.uint8(255))
    return QuantizedArray(codes=codes, block_scale=scale)


def dequantize(q: QuantizedArray, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The array of ``shape`` that ``q`` stands for: ``decode(codes) * block_scale``."""
    size = math.prod(shape)
    n_blocks = q.block_scale.shape[0]
    if tuple(q.codes.shape) != tuple(shape) or n_blocks != _blocks(size):
        raise ValueError(
            f"a QuantizedArray with codes of shape {tuple(q.codes.shape)} and {n_blocks} "
            f"block scales does not hold an array of shape {tuple(shape)} (codes of that "
            f"shape and {_blocks(size)} blocks of {block_size(size)})"
        )
    return (decode(q.codes) * _per_element(q.block_scale, tuple(shape))).astype(dtype)


def full(shape: tuple[int, ...], fill_value: Any) -> QuantizedArray:
    """``quantize(jnp.full(shape, fill_value))`` for ``fill_value >= 0``, without the float array.

    Every element is exactly ``fill_value`` (code 255, scale ``fill_value``;
    code 0 when it is 0).
    """
    fill = jnp.asarray(fill_value, jnp.float32)
    code = jnp.where(fill > 0, jnp.uint8(255), jnp.uint8(0))
    n_blocks = _blocks(math.prod(shape))
    return QuantizedArray(
        codes=jnp.full(shape, code, jnp.uint8), block_scale=jnp.full((n_blocks,), fill, jnp.float32)
    )


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
