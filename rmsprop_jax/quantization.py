r"""8-bit blockwise state (``accumulator_dtype="int8"``), as bitsandbytes' 8-bit RMSprop.

The second-moment slot ``v`` (the mean of :math:`|g|^2`, non-negative) of every
leaf with at least :data:`MIN_QUANTIZED_SIZE` elements is stored as a
:class:`QuantizedArray`: the leaf is flattened, zero-padded to a multiple of
:data:`BLOCK_SIZE` = 256 and cut into blocks; each block keeps one float32
``absmax`` (its largest value) and one uint8 code per element, an index into
the 256-entry :data:`DYNAMIC_MAP` of values in [0, 1]:

.. math::

  v \approx \text{DYNAMIC\_MAP}[\text{code}] \cdot \text{absmax}_\text{block}

That is 1 + 4/256 = 1.016 bytes per element instead of 4. Each step
dequantizes ``v``, runs the same float32 arithmetic as every other path
(:func:`rmsprop_jax.rmsprop_leaf_update`, so the step itself uses the new
``v`` before rounding), and quantizes the new ``v`` with the block's new
absmax: each element gets the code of the NEAREST map value of
``v / absmax`` (round to nearest, deterministic). The block maximum is
stored exactly (code 255 = 1.0), and so is 0 (code 0), so a zero gradient
keeps a zero state and never makes a NaN (an all-zero block has absmax 0 and
is divided by 1 instead).

**Outliers stay in their element.** A non-finite new ``v`` (a gradient
element whose square overflows float32, such as 1e20, or an inf or NaN
gradient) is stored as its block's largest finite value (float32's largest
value when the block has no other non-zero value); the block's other codes
and its absmax are what they would be without it. The step that met it used
the exact float32 ``v`` (inf: that element does not move, as with float32
state). Afterwards float32 state keeps ``v = inf`` and freezes the element for
good, while 8-bit state holds a large finite ``v`` and lets it move again with
small steps: never a NaN where float32 state is finite, and never a NaN
spread to the 255 other elements of the block (as a plain blockwise absmax
would: ``inf / inf``).

**The dynamic map** (Dettmers, *8-Bit Approximations for Parallelism in Deep
Learning*, 2016; bitsandbytes ``create_dynamic_map(signed=False)``, the map
its 8-bit optimizers use for their non-negative second state): a dynamic
exponent (7 decades) with linear fraction bits, more fraction bits in the
larger decades. For decade ``i = 0 .. 6`` there are ``2**(i+1)`` values,
the centres of ``2**(i+1)`` equal cells of [0.1, 1] scaled by ``10**(i-6)``:

.. math::

  q_{i,j} = 10^{\,i-6}\,\Bigl(0.1 + 0.9\,\frac{j + 1/2}{2^{i+1}}\Bigr),
  \qquad j = 0, \dots, 2^{i+1}-1,

2 + 4 + ... + 128 = 254 values, plus 0 and 1: 256, sorted (decade ``i``
holds codes ``2**(i+1) - 1 .. 2**(i+2) - 2``). The values are computed in
float64 and rounded to float32 (bitsandbytes rounds its linspace in
float32, so a few entries may differ from its table by one ulp).

**Accuracy.** One rounding to the nearest map value makes a relative error
of at most half a cell: 0.35 % near the block maximum, 3.5 % at 1/10 of it,
7 % at 1/100, 14 % at 1/1000 (``4.5 / 2**(i+1)`` at the bottom of decade
``i``); values below about 1.6e-7 of the block maximum round to 0. The
absolute error is at most 0.35 % of the block maximum. Over many steps the
roundings add up like an AR(1) process (``v`` keeps ``rho`` of its rounded
self), so the state drifts from float32 state by a few roundings, more for
``rho`` close to 1. Measured after 200 steps (``tests/test_quantization.py``,
a 256x64 leaf):

* gradients N(0, 1), ``rho=0.9``: relative error of ``v`` median 0.7 %,
  99th percentile 4 %, max 11 %; the denominator :math:`\sqrt{v+\epsilon}`
  median 0.4 %, max 5 % (``rho=0.99``: ``v`` median 1.2 %, max 8 %);
* gradient scales spread over 2 decades inside each block (``v`` over 4),
  ``rho=0.9``: median 3 %; elements above 1/10 of their block's maximum
  within 11 %; the smallest elements can be off by 100 %, but the absolute
  error stays under 2 % of the block maximum, so their steps, which divide
  by a tiny :math:`\sqrt{v}`, are the ones that differ.

Training is robust to this (``python -m rmsprop_jax parity``: final losses
within 0.6 % of float32 state on two tasks).

**What stays float32** (as bitsandbytes): leaves with fewer than
:data:`MIN_QUANTIZED_SIZE` = 4096 elements (biases, norms: little memory,
and most sensitive), and the signed slots -- the centered mean gradient and
the momentum buffer -- of every leaf. (bitsandbytes' 8-bit RMSprop silently
drops momentum; here momentum works and its buffer is float32. A signed
8-bit map for it would be a further saving.) Row-sparse gradients
(:class:`~rmsprop_jax.IndexedSlices`) on a quantized leaf raise
NotImplementedError: a row is not a block, so a lazy row update would have
to requantize whole blocks of untouched rows.

A :class:`QuantizedArray` is a NamedTuple of two arrays, so the state stays
a pytree of fixed shapes: ``jit``, buffer donation, ``jax.tree`` utilities
and checkpointing work unchanged, and the step compiles once. The leaf's
shape is not stored; it is the gradient's (and the parameter's) shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "DYNAMIC_MAP",
    "MIDPOINTS",
    "MIN_QUANTIZED_SIZE",
    "QuantizedArray",
    "check_dense_gradient",
    "create_dynamic_map",
    "dequantize",
    "full",
    "is_quantized_size",
    "quantize",
    "quantize_codes",
    "restore",
    "state_bytes_per_param",
    "structure_view",
    "tree_nbytes",
]

#: Elements per block; each block has its own float32 absmax.
BLOCK_SIZE = 256
#: Leaves with fewer elements keep a float32 ``v`` (bitsandbytes' ``min_8bit_size``).
MIN_QUANTIZED_SIZE = 4096


class QuantizedArray(NamedTuple):
    """A non-negative array stored as 8-bit codes into :data:`DYNAMIC_MAP` plus a scale per block.

    ``value[k] = DYNAMIC_MAP[codes[k]] * absmax[k // BLOCK_SIZE]`` for the
    flattened array, zero-padded to ``n_blocks * BLOCK_SIZE`` elements.
    """

    #: uint8 [n_blocks * BLOCK_SIZE]: index into DYNAMIC_MAP, row-major order.
    codes: jax.Array
    #: float32 [n_blocks]: the largest value of each block (0 for an all-zero block).
    absmax: jax.Array


def create_dynamic_map(max_exponent_bits: int = 7) -> np.ndarray:
    """The unsigned dynamic quantization map (see the module docstring): 256 sorted float32 in [0, 1]."""
    points: list[float] = [0.0, 1.0]
    for i in range(max_exponent_bits):
        cells = 2 ** (i + 1)
        centres = 0.1 + 0.9 * (np.arange(cells) + 0.5) / cells
        points.extend(10.0 ** (i - (max_exponent_bits - 1)) * centres)
    values = np.sort(np.asarray(points, np.float64)).astype(np.float32)
    if values.shape != (256,) or not np.all(np.diff(values) > 0):
        raise AssertionError("the dynamic map must have 256 increasing values")
    return values


#: The 256 values a code stands for, as a fraction of the block's absmax.
DYNAMIC_MAP = create_dynamic_map()
DYNAMIC_MAP.setflags(write=False)
#: Rounding thresholds: ``y`` gets code ``#{MIDPOINTS < y}`` (the nearest map value, ties down).
MIDPOINTS = ((DYNAMIC_MAP[1:].astype(np.float64) + DYNAMIC_MAP[:-1]) / 2).astype(np.float32)
MIDPOINTS.setflags(write=False)

# ``searchsorted(MIDPOINTS, y)`` as a binary search costs 8 dependent gathers
# per element (several times the whole float32 update on CPU). Instead the
# float32 bits of y select one of ~6700 buckets (exponent + top 8 mantissa
# bits, relative width <= 2**-8). A bucket is narrower than the gap between
# any two thresholds (relative gap >= 0.7 %), so it holds at most one, and
# the code is ``#thresholds below the bucket + (y > the bucket's threshold)``:
# two gathers from small tables, identical to searchsorted for every float32
# (checked exhaustively from 0 to 1; the tests check a dense sample). A
# fully arithmetic version (log10 for the decade, a linear cell, a correction
# by one) was measured slower on CPU.
_SHIFT = 15  # keep the sign, 8 exponent and 8 mantissa bits
_FIRST_BUCKET = (
    int(np.float32(2.0**-26).view(np.int32)) >> _SHIFT
)  # far below MIDPOINTS[0] = 1.6e-7
_LAST_BUCKET = (
    int(np.float32(1.0).view(np.int32)) >> _SHIFT
)  # holds 1.0 (larger values clamp to it)


def _bucket_tables() -> tuple[np.ndarray, np.ndarray]:
    buckets = np.arange(_FIRST_BUCKET, _LAST_BUCKET + 1, dtype=np.int32)
    low = (buckets << _SHIFT).view(np.float32)
    high = ((buckets + 1) << _SHIFT).view(np.float32)
    below = np.searchsorted(MIDPOINTS, low, side="left")  # thresholds < low
    inside = np.searchsorted(MIDPOINTS, high, side="left") - below
    if inside.max() > 1:
        raise AssertionError("a bucket holds two thresholds; keep more mantissa bits")
    threshold = np.where(inside == 1, MIDPOINTS[np.minimum(below, len(MIDPOINTS) - 1)], np.inf)
    return below.astype(np.uint8), threshold.astype(np.float32)


_BUCKET_BASE, _BUCKET_THRESHOLD = _bucket_tables()


def quantize_codes(y: jax.Array) -> jax.Array:
    """uint8 code of the map value nearest to each ``y`` in [0, 1] (ties go down).

    Equals ``np.searchsorted(MIDPOINTS, y)``; 0, -0.0 and negative values
    give code 0, values above 1 (and NaN) code 255.
    """
    y = jnp.asarray(y, jnp.float32)
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    bucket = jnp.clip((bits >> _SHIFT) - _FIRST_BUCKET, 0, len(_BUCKET_BASE) - 1)
    up = y > jnp.asarray(_BUCKET_THRESHOLD)[bucket]
    return jnp.asarray(_BUCKET_BASE)[bucket] + up.astype(jnp.uint8)


def is_quantized_size(size: int) -> bool:
    """Whether a leaf of ``size`` elements gets 8-bit state (``size >= MIN_QUANTIZED_SIZE``)."""
    return size >= MIN_QUANTIZED_SIZE


def _blocks(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def quantize(x: jax.Array) -> QuantizedArray:
    """Blockwise 8-bit codes of a NON-NEGATIVE real array (any shape; computed in float32)."""
    x = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
    n_blocks = _blocks(x.size)
    blocks = jnp.pad(x, (0, n_blocks * BLOCK_SIZE - x.size)).reshape(n_blocks, BLOCK_SIZE)
    # A non-finite element (an overflowing g**2, an inf or NaN gradient) saturates at its
    # block's largest finite value, so it never touches the other elements' codes.
    finite = jnp.isfinite(blocks)
    absmax = jnp.max(jnp.where(finite, blocks, 0), axis=1)
    saturate_at = jnp.where(absmax > 0, absmax, jnp.finfo(jnp.float32).max)  # none finite > 0
    absmax = jnp.where(jnp.all(finite, axis=1), absmax, saturate_at)
    scale = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))  # all-zero block: 0 / 1, not 0 / 0
    # XLA:CPU divides through the reciprocal, which flushes to 0 above 2**126: scale huge
    # blocks down by 2**-64 first (exact), so v near float32's maximum keeps its codes.
    shrink = jnp.where(scale > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
    values = jnp.where(finite, blocks, absmax[:, None]) * shrink[:, None]
    codes = quantize_codes(values / (scale * shrink)[:, None])
    return QuantizedArray(codes=codes.reshape(-1), absmax=absmax)


def dequantize(q: QuantizedArray, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The array of ``shape`` that ``q`` stands for: ``DYNAMIC_MAP[codes] * absmax``."""
    size = math.prod(shape)
    n_blocks = q.absmax.shape[0]
    if q.codes.shape != (n_blocks * BLOCK_SIZE,) or n_blocks != _blocks(size):
        raise ValueError(
            f"a QuantizedArray with {n_blocks} blocks and {q.codes.shape[0]} codes does not "
            f"hold an array of shape {tuple(shape)} ({_blocks(size)} blocks of {BLOCK_SIZE})"
        )
    blocks = jnp.asarray(DYNAMIC_MAP)[q.codes].reshape(n_blocks, BLOCK_SIZE)
    values = blocks * q.absmax[:, None]
    return values.reshape(-1)[:size].reshape(shape).astype(dtype)


def full(shape: tuple[int, ...], fill_value: Any) -> QuantizedArray:
    """``quantize(jnp.full(shape, fill_value))`` for ``fill_value >= 0``, without the float array.

    Every element is exactly ``fill_value`` (code 255, absmax ``fill_value``;
    code 0 when it is 0); the padding is 0.
    """
    size = math.prod(shape)
    n_blocks = _blocks(size)
    fill = jnp.asarray(fill_value, jnp.float32)
    code = jnp.where(fill > 0, jnp.uint8(255), jnp.uint8(0))
    codes = jnp.concatenate(
        [jnp.full((size,), code, jnp.uint8), jnp.zeros((n_blocks * BLOCK_SIZE - size,), jnp.uint8)]
    )
    absmax = jnp.full((n_blocks,), fill, jnp.float32)
    return QuantizedArray(codes=codes, absmax=absmax)


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
