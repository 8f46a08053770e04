"""8-bit blockwise optimizer state: ``accumulator_dtype="int8"`` (rmsprop_jax.quantization)."""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jit import CountingJit

import rmsprop_jax as rj
from rmsprop_jax import quantization as Q
from rmsprop_jax.core import RMSpropState


def _rmsprop_state(state):
    return rj._trees.find_state(state, RMSpropState, "test")


# --------------------------------------------------------------------------
# The code and the rounding
# --------------------------------------------------------------------------

ONE_BITS = np.float32(1.0).view(np.int32)


def _all_code_values():
    return np.asarray(Q.decode(jnp.arange(256, dtype=jnp.uint8)))


def test_code_values_are_a_4_bit_mantissa_float_below_one():
    values = _all_code_values()
    assert values.dtype == np.float32 and values[0] == 0.0 and values[255] == 1.0
    assert np.all(np.diff(values) > 0)
    # code c > 0 is the float32 whose bits are bits(1.0) - (255 - c) * 2**19
    codes = np.arange(1, 256)
    np.testing.assert_array_equal(
        values[1:].view(np.int32), ONE_BITS - ((255 - codes) << 19).astype(np.int32)
    )
    # 16 codes per octave: every 16th code halves the value
    np.testing.assert_array_equal(values[255 - 16 * np.arange(16)], 2.0 ** -np.arange(16.0))
    assert values[1] == np.float32(2.0**-16 * (1 + 2 / 16))  # 254 = 15 octaves + 14 steps
    assert values[0].view(np.uint32) == 0  # +0.0


def test_decode_is_integer_arithmetic_without_a_select():
    """Code 0 decodes to 0 through an unsigned minimum: a select on ``c == 0`` compared the
    bytes and widened the comparison in each of the step's three loops that decode."""
    text = jax.jit(Q.decode).lower(jnp.zeros((4096,), jnp.uint8)).compile().as_text()
    assert " select(" not in text and " compare(" not in text


def test_encode_is_the_nearest_code_on_a_dense_sample():
    # every 23rd float32 from 2**-15 to 1 (about 5M values) and every code value +- 2 ulp
    low = np.float32(2.0**-15).view(np.int32)
    bits = np.arange(low, ONE_BITS + 1, 23, dtype=np.int32)
    near = np.concatenate([_all_code_values()[1:].view(np.int32) + d for d in (-2, -1, 0, 1, 2)])
    y = np.concatenate([bits, near]).view(np.float32)
    codes = np.asarray(jax.jit(Q.encode)(y)).astype(np.int64)
    values = _all_code_values().astype(np.float64)
    error = np.abs(values[codes] - y)
    for neighbour in (np.maximum(codes - 1, 1), np.minimum(codes + 1, 255)):
        assert np.all(error <= np.abs(values[neighbour] - y))
    # the worst relative rounding error is 1/32 (half a step at the bottom of an octave)
    assert (error / y).max() <= 1 / 32 + 1e-7


def test_encode_edge_values():
    y = np.array([0.0, -0.0, -1.0, 1e-30, 2.0**-17, 1.0, 1.5, np.inf, np.nan], np.float32)
    np.testing.assert_array_equal(np.asarray(Q.encode(y)), [0, 0, 0, 1, 1, 255, 255, 255, 255])
    np.testing.assert_array_equal(np.asarray(Q.encode(_all_code_values())), np.arange(256))


def _dynamic_map():
    """The 8-bit format through version 0.1: bitsandbytes' unsigned dynamic map (Dettmers 2016).

    Decade i = 0..6 holds 2**(i+1) centres of equal cells of [0.1, 1] * 10**(i-6), plus 0 and 1.
    """
    points = [0.0, 1.0]
    for i in range(7):
        cells = 2 ** (i + 1)
        points.extend(10.0 ** (i - 6) * (0.1 + 0.9 * (np.arange(cells) + 0.5) / cells))
    return np.sort(np.asarray(points, np.float64)).astype(np.float32)


def test_worst_case_relative_error_against_the_previous_dynamic_map():
    """The codec's worst-case relative rounding error, next to the dynamic map's (0.1's format)."""
    old_map = _dynamic_map().astype(np.float64)
    new_values = _all_code_values().astype(np.float64)

    def worst(values, lo, hi):
        y = np.geomspace(lo, hi, 200_001)
        nearest = values[np.abs(values[None, :] - y[:200_001:1000, None]).argmin(axis=1)]
        coarse = np.abs(nearest - y[::1000]) / y[::1000]
        index = np.clip(np.searchsorted(values, y), 1, len(values) - 1)
        below, above = values[index - 1], values[index]
        fine = np.minimum(np.abs(y - below), np.abs(above - y)) / y
        return max(coarse.max(), fine.max())

    # as a fraction of the block scale: [lo, hi]
    ranges = {(0.5, 1.0): (0.007, 0.0313), (0.1, 1.0): (0.035, 0.0313), (1e-3, 1.0): (0.11, 0.0313)}
    for (lo, hi), (old_expected, new_bound) in ranges.items():
        old, new = worst(old_map, lo, hi), worst(new_values, lo, hi)
        assert abs(old - old_expected) < 0.2 * old_expected, (lo, old)
        assert new <= new_bound
    assert worst(new_values, 1e-3, 1.0) < worst(old_map, 1e-3, 1.0) / 3  # 3.1 % vs 11 %
    assert worst(new_values, 2.0**-15, 1.0) <= 1 / 32 + 1e-9  # the same down to the range's end
    assert worst(old_map, 1e-6, 1.0) > 0.4  # the old map's bottom decades: 47 % above 1e-6


@pytest.mark.parametrize("shape", [(4096,), (70, 70), (3, 1000, 7), (256,), (1,)])
def test_quantize_dequantize_round_trip(shape):
    x = jax.random.uniform(jax.random.key(0), shape) ** 4 * 3.0
    q = Q.quantize(x)
    per_block = Q.block_size(math.prod(shape))
    n_blocks = math.ceil(math.prod(shape) / per_block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == shape  # the leaf's own shape
    assert q.block_scale.dtype == jnp.float32 and q.block_scale.shape == (n_blocks,)
    back = Q.dequantize(q, shape)
    assert back.shape == shape and back.dtype == jnp.float32
    x, back = np.asarray(x).ravel(), np.asarray(back).ravel()
    scale = np.repeat(np.asarray(q.block_scale), per_block)[: x.size]
    # relative error <= 1/32 down to 2**-15 of the scale; smaller values keep the smallest code
    inside = x >= 2.0**-15 * scale
    assert np.all(np.abs(back - x)[inside] <= (1 / 32 + 1e-6) * x[inside])
    assert np.all(back[~inside] <= 2.0**-15 * scale[~inside])
    # without a bound, the scale is each block's maximum, stored exactly
    np.testing.assert_array_equal(
        np.asarray(q.block_scale),
        np.pad(x, (0, n_blocks * per_block - x.size)).reshape(-1, per_block).max(1),
    )
    assert np.all(back[x == scale] == x[x == scale])


@pytest.mark.parametrize("shift", [1.0, 2 ** (-0.3 / 16), 2 ** (-0.999 / 16), 7, 12345])
def test_quantize_step_against_a_numpy_reference(shift):
    """The step's encode: codes of x * shift against the power of two above each block's
    largest finite value, computed independently in NumPy (float64 logs, Q.encode of the
    exact quotient). An int is a step count: the step's own GridShift (its ``up`` from its
    own exp2), through ``stored`` as the step calls it."""
    rng = np.random.default_rng(4)
    x = np.exp(rng.uniform(-40.0, 40.0, (64, 256))).astype(np.float32)
    x[0] = 0.0  # an all-zero block
    x[1, :] = 0.0
    x[1, 3] = np.inf  # only a non-finite value: 2**127
    x[2, 5], x[2, 6], x[2, 7] = np.inf, np.nan, 0.0  # non-finite: the top code
    x[3] = np.float32(2.0**-120) * rng.uniform(1, 2, 256)  # tiny, still normal
    x[4, :] = 1e38  # near float32's largest value
    x[5] = np.float32(2.0**-126) * rng.uniform(1.5, 2, 256)  # float32's smallest exponent
    x[6, 9] = np.uint32(0xFFFFFFFF).view(np.float32)  # NaN: the sign bit and every payload bit
    if isinstance(shift, int):
        grid = Q.grid_shift(jnp.int32(shift))
        shift32, up32 = np.float32(grid.down), np.float32(grid.up)
        q = Q.quantize_step(jnp.asarray(x).reshape(-1), grid)
        as_stored, read_back = jax.jit(Q.stored)(jnp.asarray(x).reshape(-1), grid)
        np.testing.assert_array_equal(np.asarray(as_stored.codes), np.asarray(q.codes))
        np.testing.assert_array_equal(np.asarray(as_stored.block_scale), q.block_scale)
        np.testing.assert_array_equal(read_back, Q.dequantize(q, (x.size,)))
    else:
        shift32 = np.float32(shift)
        up32 = np.float32(1) / shift32
        q = Q.quantize_step(jnp.asarray(x).reshape(-1), jnp.float32(shift))
    y = x * shift32
    finite_max = np.where(np.isfinite(y) & (y > 0), y, 0).max(axis=1)
    power = np.where(
        finite_max > 0, 2.0 ** (np.floor(np.log2(np.maximum(finite_max, 1e-45))) + 1), 0.0
    ).astype(np.float32)
    expected_scale = np.where(
        finite_max > 0, power * up32, np.where(np.isinf(x).any(1), 2.0**127, 0.0)
    ).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.block_scale), expected_scale)
    quotient = np.divide(y, power[:, None], out=np.zeros_like(y), where=power[:, None] > 0)
    expected = np.asarray(Q.encode(jnp.asarray(quotient)))
    expected = np.where(np.isfinite(y), np.where(y > 0, expected, 0), 255)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(64, 256), expected)
    # values: within one rounding of x wherever they are inside the 16 octaves below the scale
    back = np.asarray(Q.dequantize(q, (64 * 256,))).reshape(64, 256)
    inside = np.isfinite(x) & (x >= 2.0**-15 * expected_scale[:, None]) & (x > 0)
    np.testing.assert_allclose(back[inside], x[inside], rtol=1 / 32 + 1e-6)


@pytest.mark.parametrize("last", [np.inf, 1e30, 0.0])
def test_a_short_last_block_is_reduced_on_its_own(last):
    """A leaf with no block size that divides it (16,515 = 64 * 256 + 131 elements) has a
    short last block: its scale and codes are those of its own values (NumPy reference, as
    above), and no loop of the step pads it (padded in the block maxima's loop, every index
    was checked: that loop ran 4x slower)."""
    size = 64 * 256 + 131
    assert Q.block_size(size) == 256
    rng = np.random.default_rng(5)
    x = np.exp(rng.uniform(-20.0, 20.0, size)).astype(np.float32)
    x[-5] = last  # the short block's largest, or a non-finite value in it
    q = jax.jit(Q.quantize_step)(jnp.asarray(x), jnp.float32(1))
    blocks = np.pad(x, (0, 65 * 256 - size)).reshape(65, 256)
    finite_max = np.where(np.isfinite(blocks), blocks, 0).max(axis=1)
    power = (2.0 ** (np.floor(np.log2(finite_max)) + 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.block_scale), power)
    expected = np.asarray(Q.encode(jnp.asarray(blocks / power[:, None])))
    # a positive value below the range keeps code 1 (its quotient may be subnormal: encode's 0)
    expected = np.where(blocks > 0, np.maximum(expected, 1), 0)
    expected = np.where(np.isfinite(blocks), expected, 255).reshape(-1)[:size]
    np.testing.assert_array_equal(np.asarray(q.codes), expected)

    tx = rj.rmsprop(0.01, accumulator_dtype="int8")
    params = {"w": jnp.zeros((size,))}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
    text = step.lower(params, tx.init(params), params).compile().as_text()
    assert " pad(" not in text


def test_grid_shift_moves_the_grid_by_less_than_a_step():
    grid = jax.vmap(Q.grid_shift)(jnp.arange(4096))
    shifts, ups = np.asarray(grid.down), np.asarray(grid.up)
    assert np.all((shifts > 2 ** (-1 / 16)) & (shifts <= 1))
    # up undoes down within an ulp (its own exp2, no reciprocal in the step)
    np.testing.assert_allclose(ups.astype(np.float64) * shifts, 1, rtol=2**-23)
    # spread over the whole step: each sixteenth of it is hit about equally often
    fraction = -np.log2(shifts) * 16
    counts = np.histogram(fraction, bins=16, range=(0, 1))[0]
    assert counts.min() > 4096 / 16 * 0.8


def test_block_size_divides_the_leaf_when_it_can():
    # 16M/160's leaves: a reshape, no padded copy; 200 (500 blocks), not 250 or 160 (625)
    assert Q.block_size(100_000) == 200 and Q.block_size(1_000_000) == 200
    assert Q.block_size(96_000) == 240 and Q.block_size(65536) == 256
    assert Q.block_size(4900) == 245  # no divisor is a multiple of 8: the largest
    assert Q.block_size(4099) == 256  # a prime: padded blocks of 256
    q = Q.quantize(jnp.arange(100_000.0))
    assert q.codes.shape == (100_000,) and q.block_scale.shape == (500,)
    np.testing.assert_allclose(Q.dequantize(q, (100_000,)), np.arange(100_000.0), rtol=1 / 32)


def test_zero_blocks_and_padding():
    x = jnp.zeros((600,)).at[300].set(2.0)  # blocks: all-zero, one 2.0, zero + padding
    q = Q.quantize(x)
    np.testing.assert_array_equal(np.asarray(q.block_scale), [0.0, 2.0, 0.0])
    assert not np.any(np.isnan(np.asarray(Q.dequantize(q, (600,)))))
    np.testing.assert_array_equal(np.asarray(Q.dequantize(q, (600,))), np.asarray(x))


@pytest.mark.parametrize("fill", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(4096,), (100, 77)])
def test_full_equals_quantize_of_full(fill, shape):
    a, b = Q.full(shape, fill), Q.quantize(jnp.full(shape, fill))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.block_scale), np.asarray(b.block_scale))


def test_dequantize_checks_the_shape():
    q = Q.quantize(jnp.ones((5000,)))
    with pytest.raises(ValueError, match="does not hold an array of shape"):
        Q.dequantize(q, (6000,))


# --------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------


def _params():
    return {
        "big": jnp.ones((1024, 1024)),  # 1M elements: 8-bit
        "edge": jnp.ones((64, 64)),  # exactly 4096: 8-bit
        "small": jnp.ones((4095,)),  # float32
        "bias": jnp.ones((8,)),
        "half": jnp.ones((128, 64), jnp.bfloat16),  # bfloat16 params: float32 arithmetic, 8-bit v
        "none": None,
    }


def test_state_layout_and_bytes_per_param():
    params = _params()
    state = rj.rmsprop_update(accumulator_dtype="int8", momentum=0.9, centered=True).init(params)
    v = state.velocity
    for name in ("big", "edge", "half"):
        assert isinstance(v[name], Q.QuantizedArray)
        assert v[name].codes.dtype == jnp.uint8 and v[name].block_scale.dtype == jnp.float32
    assert v["small"].dtype == jnp.float32 and v["small"].shape == (4095,)
    assert v["bias"].dtype == jnp.float32 and v["none"] is None
    # signed slots stay float32, for every leaf
    for slot in (state.average_gradient, state.momentum):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(slot))
    # bytes from the state's own arrays: 1 + 4/256 per element of a large tensor
    big = rj.rmsprop_update(accumulator_dtype="int8").init({"w": jnp.ones((4096, 1024))})
    nbytes = sum(x.nbytes for x in jax.tree.leaves(big))
    assert big.count.nbytes == 4  # the step count (the grid shift), an int32 scalar
    assert (nbytes - 4) / (4096 * 1024) == 1 + 4 / 256 <= 1.05
    assert Q.state_bytes_per_param(big, {"w": jnp.ones((4096, 1024))}) == 1.015625 + 4 / 2**22
    # shapes only (eval_shape) give the same count
    shapes = jax.eval_shape(
        rj.rmsprop(accumulator_dtype="int8").init, {"w": jnp.ones((4096, 1024))}
    )
    assert Q.tree_nbytes(shapes) == nbytes


def test_initial_accumulator_value_is_exact():
    params = {"w": jnp.zeros((100, 100))}
    tx = rj.rmsprop_update(accumulator_dtype="int8", initial_accumulator_value=0.1)
    v = tx.init(params).velocity["w"]
    np.testing.assert_array_equal(np.asarray(Q.dequantize(v, (100, 100))), np.float32(0.1))


def _steps(tx, params, grads_fn, n, jit=True):
    state = tx.init(params)

    def step(params, state, i):
        updates, state = tx.update(grads_fn(i), state, params)
        return optax.apply_updates(params, updates), state

    step = CountingJit(step, donate_argnums=(0, 1)) if jit else step
    params = jax.tree.map(jnp.copy, params)
    for i in range(n):
        params, state = step(params, state, i)
    return params, state, step


def _track(rho, scale, n=200, **kw):
    shape = (256, 64)
    key = jax.random.key(0)

    def grads(i):
        return {"w": jax.random.normal(jax.random.fold_in(key, i), shape) * scale}

    params = {"w": jnp.zeros(shape)}
    p8, s8, _ = _steps(
        rj.rmsprop_update(0.01, rho=rho, accumulator_dtype="int8", **kw), params, grads, n
    )
    p32, s32, _ = _steps(rj.rmsprop_update(0.01, rho=rho, **kw), params, grads, n)
    v8 = np.asarray(Q.dequantize(s8.velocity["w"], shape))
    v32 = np.asarray(s32.velocity["w"])
    absmax = np.repeat(np.asarray(s8.velocity["w"].block_scale), 256).reshape(shape)
    return v8, v32, absmax, p8, p32


def test_int8_state_tracks_float32_state():
    """200 steps of N(0, 1) gradients: the documented errors (module docstring)."""
    v8, v32, _, p8, p32 = _track(0.9, 1.0)
    rel = np.abs(v8 - v32) / v32
    assert np.median(rel) < 0.03 and np.percentile(rel, 99) < 0.1 and rel.max() < 0.2
    denominator = np.abs(np.sqrt(v8 + 1e-7) / np.sqrt(v32 + 1e-7) - 1)
    assert np.median(denominator) < 0.015 and denominator.max() < 0.1
    # the parameters (200 steps of lr 0.01, each dividing by v as stored) stay close
    assert np.max(np.abs(p8["w"] - p32["w"])) < 0.06 * np.max(np.abs(p32["w"]))


def test_int8_state_does_not_ratchet_with_rho_near_one():
    """rho=0.99 (torch's default alpha) lowers v by at most 1 % a step, less than half a code
    step: round to nearest on the fixed grid of a power-of-two scale lets v rise but never
    fall (measured 25 % high after 200 steps); on the moved grid it stays unbiased."""
    v8, v32, *_ = _track(0.99, 1.0)
    rel = (v8 - v32) / v32
    assert np.median(np.abs(rel)) < 0.06 and abs(np.mean(rel)) < 0.04 and rel.max() < 0.4


def test_int8_state_tracks_float32_state_over_four_decades():
    scale = jnp.exp(
        jax.random.uniform(jax.random.key(1), (256, 64), minval=np.log(1e-2), maxval=0.0)
    )
    v8, v32, absmax, _, _ = _track(0.9, scale)
    rel = np.abs(v8 - v32) / v32
    assert np.median(rel) < 0.03
    assert rel[v32 >= 0.1 * absmax].max() < 0.15
    assert np.max(np.abs(v8 - v32) / absmax) < 0.12


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(epsilon=0.0),
        dict(momentum=0.9, nesterov=True, centered=True),
        dict(eps_in_sqrt=False, epsilon=0.0, lr_in_momentum=False, momentum=0.5),
        dict(bias_correction=True, learning_rate=optax.linear_schedule(0.1, 0.0, 10)),
    ],
)
def test_zero_gradients_never_give_nan(kw):
    kw = {"learning_rate": 0.1, **kw}
    params = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    half = {"w": jnp.zeros((64, 128)).at[:32].set(1.0), "b": jnp.zeros((128,))}  # zero blocks
    seq = [zero, half, zero, zero, half]
    new, state, _ = _steps(
        rj.rmsprop(**kw, accumulator_dtype="int8"), params, seq.__getitem__, 5, jit=False
    )
    for leaf in jax.tree.leaves((new, state)):
        assert not np.any(np.isnan(np.asarray(leaf, np.float32)))
    v = _rmsprop_state(state).velocity["w"]
    np.testing.assert_array_equal(np.asarray(Q.dequantize(v, (64, 128)))[32:], 0.0)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, centered=True)])
def test_step_divides_by_v_as_stored(kw):
    """The update divides by the new v as stored (decoded from its codes), as the bfloat16 path
    reads its slot as stored: checked against NumPy arithmetic on the decoded v; from v = 0
    the first step is then within half a rounding of v (1/64 in the square root) of float32's."""
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64))}
    g = {"w": jax.random.normal(jax.random.key(1), (128, 64))}
    tx8 = rj.rmsprop(0.1, accumulator_dtype="int8", **kw)
    u8, s8 = jax.jit(tx8.update)(g, tx8.init(params), params)
    v = np.asarray(Q.dequantize(s8.velocity["w"], (128, 64)), np.float64)
    x = np.asarray(g["w"], np.float64)
    # centered: a = (1 - rho) g after one step from 0, and m = lr g / d
    variance = np.maximum(v - (0.1 * x) ** 2, 0) if kw else v
    expected = -0.1 * x / np.sqrt(variance + 1e-7)
    np.testing.assert_allclose(np.asarray(u8["w"]), expected, rtol=2e-6)
    tx32 = rj.rmsprop(0.1, **kw)
    u32, _ = tx32.update(g, tx32.init(params), params)
    ratio = np.asarray(u8["w"], np.float64) / np.asarray(u32["w"], np.float64)
    # inside the 16 octaves below the block's scale (a smaller v keeps the smallest code)
    scale = np.repeat(np.asarray(s8.velocity["w"].block_scale), 256).reshape(128, 64)
    inside = 0.1 * x**2 >= 2.0**-15 * scale
    assert inside.mean() > 0.98
    bound = 1 / 64 + 1e-4 if not kw else 0.02  # centered: v - a**2 is 0.09 of v
    assert np.max(np.abs(ratio - 1)[inside]) <= bound


def test_small_leaves_match_float32_exactly():
    params = {"w": jnp.ones((4095,)), "b": jnp.ones((10,))}

    def grads(i):
        return jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)

    p8, s8, _ = _steps(rj.rmsprop(0.01, momentum=0.9, accumulator_dtype="int8"), params, grads, 20)
    p32, s32, _ = _steps(rj.rmsprop(0.01, momentum=0.9), params, grads, 20)
    for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p32, s32))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_complex_and_half_precision_leaves():
    params = {
        "c": jnp.ones((64, 64), jnp.complex64),
        "h": jnp.ones((64, 64), jnp.bfloat16),
        "f": jnp.ones((64, 64), jnp.float16),
    }

    def grads(i):
        k = jax.random.key(i)
        return {
            "c": (jax.random.normal(k, (64, 64)) + 1j * jax.random.normal(k, (64, 64))).astype(
                jnp.complex64
            ),
            "h": jax.random.normal(k, (64, 64)).astype(jnp.bfloat16),
            "f": jax.random.normal(k, (64, 64)).astype(jnp.float16),
        }

    p8, s8, _ = _steps(rj.rmsprop(0.01, accumulator_dtype="int8"), params, grads, 10)
    p32, _, _ = _steps(rj.rmsprop(0.01), params, grads, 10)
    for name in params:
        assert p8[name].dtype == params[name].dtype
        assert isinstance(_rmsprop_state(s8).velocity[name], Q.QuantizedArray)
        assert _rmsprop_state(s8).velocity[name].block_scale.dtype == jnp.float32
        # 10 steps of lr 0.01, each dividing by v as stored (off by up to 1/64 in the square
        # root, plus the AR(1) carry-over; bfloat16 / float16 params: a rounding of the
        # parameter may flip too); a |g|**2 more than 15 octaves below its block's largest
        # keeps the smallest code, and that element steps less (measured: about 1 % of the
        # elements beyond 3e-3, the largest difference 0.027)
        a, b = np.asarray(p8[name], np.complex64), np.asarray(p32[name], np.complex64)
        tol = max(3e-3, 4 * float(jnp.finfo(params[name].dtype).eps))
        difference = np.abs(a - b)
        assert np.percentile(difference, 98) < tol and difference.max() < 0.04


def test_grid_shift_is_traced_once_per_step():
    """Every 8-bit leaf reads the step's one grid shift: traced per leaf, XLA merged the copies
    only after its passes had run over them (compile time)."""
    params = {f"w{i}": jnp.zeros((4096,)) for i in range(4)}
    tx = rj.rmsprop(1e-3, accumulator_dtype="int8")
    lowered = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    assert lowered.count(str(0x9E3779B1)) == 1  # the hash's first multiplier


def test_jit_donation_and_one_compilation():
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros((256,))}

    def grads(i):
        return jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would fail here
        _, state, step = _steps(
            rj.rmsprop(0.01, momentum=0.9, accumulator_dtype="int8"), params, grads, 5
        )
    assert step.traces == 1
    v = _rmsprop_state(state).velocity["w"]
    assert v.codes.shape == (256, 256) and v.block_scale.shape == (256,)  # 256 blocks of 256


def test_int8_step_has_no_branch_and_no_float32_v():
    """On XLA:CPU a computed gradient passed into a loop or a cond costs ~20 ms per step at
    16M params even when the branch never runs (the design this replaced): the compiled step
    has neither, and its temporaries hold no array of the leaf's size (the block maxima are
    reduced in the loop that computes the new values; the exponent bytes the step wrote out
    for them before took one byte per element)."""
    n = 64 * 256
    params = {"w": jnp.zeros((n,))}
    tx = rj.rmsprop(0.01, accumulator_dtype="int8")

    def step(x, state, params):
        g = {"w": jnp.tanh(x) * 0.5}  # a gradient computed in the step, as in training
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params["w"], tx.init(params), params).compile().as_text()
    assert " while(" not in text and " conditional(" not in text

    def given(g, state, params):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(given, donate_argnums=(1, 2)).lower(params, tx.init(params), params)
    # temporaries: per-block values only (64 blocks)
    assert compiled.compile().memory_analysis().temp_size_in_bytes <= n // 16


def test_int8_codes_loop_reads_its_per_block_values():
    """The loop that writes a leaf's codes reads each block's values as computed once per
    block (its new scale's steps, as reduced; its old scale): the steps derived there from the
    block's largest bits ran once per 8 elements, 12 of the loop's 40 instructions."""
    n = 64 * 256
    params = {"w": jnp.zeros((n,))}
    tx = rj.rmsprop(0.01, accumulator_dtype="int8")

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    text = hlo.compile().as_text()
    codes_fusion = re.search(rf"= u8\[{n}\]\S* fusion\(.*calls=%([\w.-]+)", text)
    assert codes_fusion, "no loop writes the codes"
    body = text.split(f"%{codes_fusion.group(1)} ", 1)[1].split("\n}", 1)[0]
    per_block = [
        line.strip().split(" ")[0]
        for line in body.splitlines()[1:]
        if re.search(r"= \w+\[64\]", line) and " parameter(" not in line
    ]
    assert not per_block, f"per-block values computed in the codes' loop: {per_block}"


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32])
@pytest.mark.parametrize("shape", [(5, 200), (3, 2, 256)])
def test_block_maxima_are_the_largest_of_each_row(dtype, shape):
    info = jnp.iinfo(dtype)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype) for _ in "xy")
    x[0] = info.min  # a row at the identity of the maximum
    got = jax.jit(Q.block_maxima)(x, y)
    for array, largest in zip((x, y), got):
        np.testing.assert_array_equal(largest, array.max(axis=-1))
        assert largest.dtype == dtype


@pytest.mark.parametrize("shape", [(64 * 256,), (128, 128), (4099,), (7, 3, 300)])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, centered=True)])
def test_int8_step_overwrites_its_state_in_place(shape, kw):
    """With the state donated, the new codes overwrite the old ones, the new block scales and
    the float32 slots theirs: the compiled step copies no array (the update reads the codes
    as the encode wrote them; an update reading the old codes made XLA copy them each step,
    2 bytes per element, codes stored as blocks made it copy the new ones, and new scales
    computed before the encode, which reads the old ones, made it copy those)."""
    params = {"w": jnp.zeros(shape)}
    tx = rj.rmsprop(0.01, accumulator_dtype="int8", **kw)

    def step(params, state, g):  # the outputs in the order of the donated inputs
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    copies = [
        line for line in text.compile().as_text().splitlines() if " copy(" in line and _dims(line)
    ]
    assert not copies, copies


def _dims(line: str) -> list[str]:
    """The dimensions of the array an HLO instruction line defines (``%x = u8[7,3]{...} ...``)."""
    shape = line.split("=", 1)[1].split("[", 1)[1].split("]", 1)[0]
    return [d for d in shape.split(",") if d]


def test_state_is_a_plain_pytree_for_checkpoints():
    """Flatten to numpy arrays and back (what a checkpointer does), then keep training."""
    params = {"w": jnp.zeros((128, 64))}

    def grads(i):
        return {"w": jax.random.normal(jax.random.key(i), (128, 64))}

    tx = rj.rmsprop(0.01, accumulator_dtype="int8")
    p, state, _ = _steps(tx, params, grads, 3, jit=False)
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    u1, s1 = tx.update(grads(3), state, p)
    u2, s2 = tx.update(grads(3), restored, p)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_structure_errors_still_name_the_leaf():
    params = {"w": jnp.zeros((128, 64)), "b": jnp.zeros((3,))}
    tx = rj.rmsprop_update(accumulator_dtype="int8")
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"state has \['velocity/b'\].*init has \['velocity/c'\]"):
        tx.update({"w": jnp.zeros((128, 64)), "c": jnp.zeros((3,))}, state)


def test_row_sparse_gradient_on_int8_leaf_raises_naming_it():
    params = {"table": jnp.zeros((1000, 16)), "small": jnp.zeros((100, 16))}
    tx = rj.rmsprop(0.1, accumulator_dtype="int8")
    state = tx.init(params)
    rows = jnp.array([1, 5])
    small = rj.IndexedSlices(rows, jnp.ones((2, 16)), (100, 16))
    with pytest.raises(NotImplementedError, match=r"'table'.*IndexedSlices.*int8"):
        tx.update(
            {"table": rj.IndexedSlices(rows, jnp.ones((2, 16)), (1000, 16)), "small": small},
            state,
            params,
        )
    # a small (float32-state) table still takes row-sparse gradients
    updates, _ = jax.jit(tx.update)({"table": jnp.ones((1000, 16)), "small": small}, state, params)
    assert isinstance(updates["small"], rj.IndexedSlices)


def test_invalid_accumulator_dtype_lists_int8():
    with pytest.raises(ValueError, match="'int8'"):
        rj.rmsprop(accumulator_dtype="uint8")


def test_chain_with_other_transforms():
    """Global-norm clipping, decoupled weight decay and EMA around 8-bit state."""
    params = {"w": jnp.ones((128, 64)), "b": jnp.ones((64,))}
    kw = dict(learning_rate=0.01, global_clipnorm=1.0, weight_decay=0.01, use_ema=True)

    def grads(i):
        return jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)

    p8, _, _ = _steps(rj.rmsprop(**kw, accumulator_dtype="int8"), params, grads, 20)
    p32, _, _ = _steps(rj.rmsprop(**kw), params, grads, 20)
    np.testing.assert_allclose(np.asarray(p8["w"]), np.asarray(p32["w"]), atol=5e-3)


# --------------------------------------------------------------------------
# Training parity (the criterion: final loss within 3 % of float32 state)
# --------------------------------------------------------------------------


def test_demo_parity_within_three_percent():
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from rmsprop_jax.cli import parity

    rows = parity.run_parity(tasks=("digits-mlp",), dtypes=("float32", "int8"), epochs=4)
    by_dtype = {row["dtype"]: row for row in rows}
    assert by_dtype["int8"]["relative_difference"] < 0.03
    assert (
        by_dtype["int8"]["state_bytes_per_param"]
        < 1.5
        < by_dtype["float32"]["state_bytes_per_param"]
    )


def test_parity_command_char_task(capsys):
    pytest.importorskip("sklearn")
    from rmsprop_jax.__main__ import main

    assert main(["parity", "--tasks", "char-mlp", "--steps", "150", "--dtypes", "int8"]) == 0
    out = capsys.readouterr().out
    assert "char-mlp    int8" in out and "within 3%" in out


def test_demo_accumulator_dtype_flag():
    import argparse

    from rmsprop_jax.cli import demo

    parser = demo.add_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).accumulator_dtype == "float32"
    assert parser.parse_args(["--accumulator-dtype", "int8"]).accumulator_dtype == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--accumulator-dtype", "int4"])


# -- int8 state: an outlier stays in its element ----------------------------------------------


def _two_steps(tx, first):
    params, state = {"w": jnp.zeros((64, 64))}, None
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in (first, {"w": jnp.full((64, 64), 0.1)}):
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params["w"], state


@pytest.mark.parametrize("outlier", [1e20, float("inf"), float("nan")])
def test_int8_outlier_never_reaches_the_other_elements_of_its_block(outlier):
    base = jnp.full((64, 64), 0.1)
    int8 = rj.rmsprop(0.01, accumulator_dtype="int8")
    with_outlier, _ = _two_steps(int8, {"w": base.at[0, 3].set(outlier)})
    without, _ = _two_steps(int8, {"w": base.at[0, 3].set(0.0)})
    others = np.ones((64, 64), bool)
    others[0, 3] = False
    np.testing.assert_array_equal(with_outlier[others], without[others])
    float32, _ = _two_steps(rj.rmsprop(0.01), {"w": base.at[0, 3].set(outlier)})
    # Where float32 state is finite, int8 state is finite too (the element itself included).
    assert bool(jnp.all(jnp.isfinite(with_outlier) | ~jnp.isfinite(float32)))
    if outlier == 1e20:  # g**2 overflows: the step is 0 as with float32, then finite steps
        assert float32[0, 3] == 0 and bool(jnp.isfinite(with_outlier[0, 3]))
    # The step that meets it moves its element as float32 state does (0 for 1e20, else NaN),
    # although its code saturates at the block's scale.
    g = {"w": base.at[0, 3].set(outlier)}
    params = {"w": jnp.zeros((64, 64))}
    first8, _ = jax.jit(int8.update)(g, int8.init(params), params)
    first32, _ = rj.rmsprop(0.01).update(g, rj.rmsprop(0.01).init(params), params)
    np.testing.assert_array_equal(first8["w"][0, 3], first32["w"][0, 3])


def test_int8_codec_saturates_non_finite_values_at_the_block_maximum():
    q = rj.quantization
    v = jnp.linspace(0.0, 2.0, 512).at[7].set(jnp.inf).at[300].set(jnp.nan)
    stored = q.dequantize(q.quantize(v), v.shape)
    clean = q.dequantize(q.quantize(v.at[7].set(0.0).at[300].set(0.0)), v.shape)
    keep = np.ones(512, bool)
    keep[[7, 300]] = False
    np.testing.assert_array_equal(stored[keep], clean[keep])
    block_max = [float(jnp.max(jnp.where(keep, v, 0)[i : i + 256])) for i in (0, 256)]
    np.testing.assert_allclose([stored[7], stored[300]], block_max, rtol=0)
    lonely = q.dequantize(q.quantize(jnp.zeros(256).at[0].set(jnp.inf)), (256,))
    assert float(lonely[0]) == 2.0**127 and float(lonely[1:].max()) == 0


def test_int8_codes_survive_values_near_the_float32_maximum():
    q = rj.quantization
    v = jnp.full(256, 1e38).at[1].set(5e37)  # XLA:CPU's reciprocal of 1e38 would flush to 0
    np.testing.assert_allclose(q.dequantize(q.quantize(v), (256,)), v, rtol=0.01)


def test_large_leaves_run_their_loops_one_leaf_after_another(monkeypatch):
    """A large 8-bit leaf's loops start after the previous large leaf's encode (its gradient
    is then read from cache by its three loops); the results are those of the unordered step
    bit for bit, and the state is still overwritten in place."""
    sizes = {"a": Q.MIN_ORDERED_SIZE, "b": Q.MIN_ORDERED_SIZE + 512}
    params = {k: jnp.zeros((n,)) for k, n in sizes.items()}
    grads = {
        k: jax.random.normal(jax.random.key(i), (n,)) for i, (k, n) in enumerate(sizes.items())
    }
    tx = rj.rmsprop(0.01, accumulator_dtype="int8", momentum=0.9)

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    def run():  # traced anew (a new function): after the monkeypatch, unordered
        jitted = jax.jit(lambda p, s, g: step(p, s, g))
        p, s = params, tx.init(params)
        for _ in range(3):
            p, s = jitted(p, s, grads)
        return p, s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads)
    hlo = text.compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    instructions = [
        m.groups()
        for m in re.finditer(
            r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{\S*\})? (\w+)\((.*)\)", entry, re.M
        )
    ]
    root_operands = entry[entry.index("ROOT") :].split(" tuple(", 1)[1].split(")", 1)[0]
    # leaf a's new codes: the fusion of its codes' shape that is a state output
    codes_a = [
        name
        for name, shape, op, _ in instructions
        if op == "fusion"
        and shape == f"u8[{sizes['a']}]"
        and f"%{name}" in root_operands.split(", ")
    ]
    assert len(codes_a) == 1, codes_a
    first_loops_of_b = [  # the operand names, before the fusion's attributes
        re.findall(r"%[\w.-]+", operands.split("kind=", 1)[0])
        for _, _, op, operands in instructions
        if op == "fusion" and "%g__b__" in operands
    ]
    assert any(f"%{codes_a[0]}" in operands for operands in first_loops_of_b)
    assert not [i for i in instructions if i[2] == "copy" and i[1].startswith("u8[")]

    ordered = run()
    monkeypatch.setattr(Q, "is_ordered_size", lambda size: False)
    unordered = run()
    jax.tree.map(np.testing.assert_array_equal, ordered, unordered)
