r"""Float64 NumPy reference implementation of the RMSprop core math.

This module is the test oracle for ``rmsprop_jax``. It is written from the
project's semantics document (``docs/semantics.md``, sections 1, 5, 6
and 8), not from any library's code, and is deliberately plain, loop-based
NumPy: one array (any shape, real or complex), one step at a time, every
intermediate in float64 (complex128 for complex parameters).

The math
========

Notation: ``w`` parameter, ``g`` gradient, ``v`` velocity (mean of squared
gradient magnitudes), ``a`` average gradient (centered mode only), ``m``
momentum buffer, ``t`` the number of steps taken *before* the current one
(0 on the first step), ``lr`` the learning rate of the current step.

For every step::

    g     = -g                                   if maximize
    v     = rho*v + (1 - rho)*|g|^2              # v is always REAL; |g|^2 = re^2 + im^2
    a     = rho*a + (1 - rho)*g                  if centered (a has g's dtype)
    c     = 1 - rho**(t + 1)                     if bias_correction, else c = 1
    v_hat = v / c ;  a_hat = a / c
    var   = max(v_hat - |a_hat|^2, 0)            if centered, else v_hat
    den   = sqrt(var + epsilon)                  if eps_in_sqrt
          = sqrt(var) + epsilon                  otherwise
    den   = 1  where den == 0                    only when epsilon == 0 (no 0/0 NaN)

    momentum == 0:
        w = w - lr*g/den
    momentum > 0 and lr_in_momentum:             # Keras / TF / optax / Graves
        s = lr*g/den ; m = momentum*m + s
        w = w - (s + momentum*m)   if nesterov else  w - m
    momentum > 0 and not lr_in_momentum:         # PyTorch
        s = g/den ; m = momentum*m + s
        w = w - lr*((s + momentum*m) if nesterov else m)

Initial state: ``v = initial_accumulator_value`` (broadcast to the parameter's
shape), ``a = 0``, ``m = 0``.

The clamp ``max(., 0)`` in centered mode is part of the contract: in exact
arithmetic ``v - |a|^2 >= 0`` always holds, but rounding (and bias correction
at the first step, where ``v_hat == |a_hat|^2`` exactly) can make it slightly
negative, which would give NaN (optax) or a huge step.

Which option reproduces which peer
==================================

* **Keras 3** ``keras.optimizers.RMSprop`` (the default here): epsilon inside
  the square root (``eps_in_sqrt=True``), learning rate inside the momentum
  buffer (``lr_in_momentum=True``), ``initial_accumulator_value=0``,
  ``rho=0.9``, ``epsilon=1e-7``. TF2's momentum > 0 path (fused kernels) is the
  same formula.
* **TensorFlow 2** momentum == 0 path: epsilon *outside* the square root
  (``eps_in_sqrt=False``).
* **TensorFlow 1** ``RMSPropOptimizer``: ``initial_accumulator_value=1``,
  ``epsilon=1e-10``, eps inside the sqrt, lr inside momentum.
* **PyTorch** ``torch.optim.RMSprop``: ``eps_in_sqrt=False`` and
  ``lr_in_momentum=False`` (``w -= lr*m`` with ``m = momentum*m + g/den``),
  ``maximize``; its ``alpha`` is ``rho``. (PyTorch treats complex parameters
  as pairs of reals, i.e. a per-component velocity; this reference uses
  ``|g|^2`` like optax, so complex results are *not* PyTorch's.)
* **optax** ``optax.rmsprop``: ``nesterov``, ``bias_correction`` (both moments
  corrected by ``1 - decay**count``), ``initial_scale`` (=
  ``initial_accumulator_value``), ``eps_in_sqrt`` either way, lr inside the
  momentum trace. optax has no clamp in centered mode; this reference does.
* **Hinton** (lecture 6): ``epsilon=0`` plain RMSprop. **Graves 2013**:
  ``centered=True``, eps inside the sqrt, lr inside momentum.

Helpers
=======

``ulp_distance(a, b)`` measures the distance between floating-point arrays in
units in the last place, and ``assert_close`` is a thin wrapper of
``np.testing.assert_allclose`` that accepts JAX arrays and low-precision
dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["assert_close", "reference_rmsprop", "ulp_distance"]

LearningRate = float | Callable[[int], Any] | Sequence[float]


def _lr_at(learning_rate: LearningRate, step: int) -> float:
    """Learning rate for the step with ``step`` steps taken before it."""
    if callable(learning_rate):
        return float(np.asarray(learning_rate(step)))
    if np.ndim(learning_rate) == 0:
        return float(np.asarray(learning_rate))
    return float(np.asarray(learning_rate)[step])


def _abs_sq(x: np.ndarray) -> np.ndarray:
    """``|x|^2`` as a real float64 array (``re^2 + im^2`` for complex)."""
    if np.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x


def _div(x: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``x / den`` for a real ``den``, dividing real and imaginary parts separately.

    (NumPy would otherwise promote ``den`` to complex and use complex division,
    whose rounding differs from the component-wise quotient.)
    """
    if np.iscomplexobj(x):
        return x.real / den + 1j * (x.imag / den)
    return x / den


def _store(x, slot_dtype):
    """``x`` rounded to ``slot_dtype`` (complex: each part), back in x's float64 dtype."""
    if slot_dtype is None:
        return x
    if np.iscomplexobj(x):
        return _store(x.real, slot_dtype) + 1j * _store(x.imag, slot_dtype)
    return np.asarray(x).astype(slot_dtype).astype(np.float64)


def reference_rmsprop(
    params,
    grads_seq,
    *,
    learning_rate: LearningRate = 0.001,
    rho: float = 0.9,
    epsilon: float = 1e-7,
    centered: bool = False,
    eps_in_sqrt: bool = True,
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    momentum: float = 0.0,
    nesterov: bool = False,
    lr_in_momentum: bool = True,
    maximize: bool = False,
    slot_dtype=None,
):
    """Run RMSprop on one array for ``len(grads_seq)`` steps, in float64.

    Args:
      params: initial parameter array (real or complex, any shape).
      grads_seq: sequence of gradient arrays, one per step, each of
        ``params``' shape.
      learning_rate: a float; or a callable ``step -> lr`` where ``step`` is
        the number of steps taken before this one (0 first); or a sequence
        giving the learning rate of each step.
      rho: decay of the moving averages.
      epsilon: stabiliser; see ``eps_in_sqrt``.
      centered: divide by the (clamped) variance estimate instead of the
        second moment.
      eps_in_sqrt: ``sqrt(var + eps)`` if True, else ``sqrt(var) + eps``.
      initial_accumulator_value: initial velocity (TF1 uses 1).
      bias_correction: divide both moments by ``1 - rho**(t+1)``.
      momentum: momentum coefficient (0 disables the buffer).
      nesterov: Nesterov momentum (only meaningful with ``momentum > 0``).
      lr_in_momentum: learning rate inside the buffer (Keras/TF/optax) or
        applied after it (PyTorch).
      maximize: ascend instead of descend (negates the gradient).
      slot_dtype: a real storage dtype for the slots (e.g. ``ml_dtypes.bfloat16``):
        each new ``v``, ``a``, ``m`` is rounded to it as soon as it is computed
        and the step uses the rounded value. None: no rounding.

    Returns:
      ``(trajectory, state)``: ``trajectory`` is a list with the parameters
      after each step (float64, or complex128 for complex parameters);
      ``state`` is a dict with ``'velocity'`` (real float64),
      ``'average_gradient'`` (``None`` unless centered) and ``'momentum'``
      (``None`` unless ``momentum > 0``), all after the last step.
    """
    params = np.asarray(params)
    is_complex = np.iscomplexobj(params)
    dtype = np.complex128 if is_complex else np.float64
    w = params.astype(dtype)

    if momentum < 0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")

    rho = float(rho)
    epsilon = float(epsilon)
    momentum = float(momentum)

    v = np.broadcast_to(np.asarray(initial_accumulator_value, dtype=np.float64), w.shape).copy()
    a = np.zeros(w.shape, dtype) if centered else None
    m = np.zeros(w.shape, dtype) if momentum > 0 else None

    trajectory = []
    for t, grad in enumerate(grads_seq):
        grad = np.asarray(grad)
        if np.iscomplexobj(grad) and not is_complex:
            raise ValueError("complex gradient for a real parameter")
        if grad.shape != w.shape:
            raise ValueError(f"gradient shape {grad.shape} != param shape {w.shape}")
        g = grad.astype(dtype)
        if maximize:
            g = -g

        # Moving averages.
        v = _store(rho * v + (1.0 - rho) * _abs_sq(g), slot_dtype)
        if centered:
            a = _store(rho * a + (1.0 - rho) * g, slot_dtype)

        # Bias correction.
        if bias_correction:
            c = 1.0 - rho ** (t + 1)
            v_hat = v / c
            a_hat = _div(a, c) if centered else None
        else:
            v_hat = v
            a_hat = a

        # Variance estimate (clamped at 0 in centered mode).
        var = np.maximum(v_hat - _abs_sq(a_hat), 0.0) if centered else v_hat

        # Denominator.
        den = np.sqrt(var + epsilon) if eps_in_sqrt else np.sqrt(var) + epsilon
        if epsilon == 0.0:
            den = np.where(den == 0.0, 1.0, den)

        lr = _lr_at(learning_rate, t)

        # Parameter update.
        if momentum == 0.0:
            w = w - lr * _div(g, den)
        elif lr_in_momentum:
            s = _div(lr * g, den)
            m = _store(momentum * m + s, slot_dtype)
            w = w - ((s + momentum * m) if nesterov else m)
        else:
            s = _div(g, den)
            m = _store(momentum * m + s, slot_dtype)
            w = w - lr * ((s + momentum * m) if nesterov else m)

        trajectory.append(np.array(w, dtype=dtype, copy=True))

    state = {
        "velocity": np.array(v, dtype=np.float64, copy=True),
        "average_gradient": None if a is None else np.array(a, copy=True),
        "momentum": None if m is None else np.array(m, copy=True),
    }
    return trajectory, state


# ---------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------

_INT_FOR_FLOAT = {
    np.dtype(np.float16): np.int16,
    np.dtype(np.float32): np.int32,
    np.dtype(np.float64): np.int64,
}


def _ordered_ints(x: np.ndarray) -> np.ndarray:
    """Map IEEE floats to integers whose order and spacing match the floats'.

    Sign-magnitude bit patterns become two's-complement-like integers, so
    ``+0`` and ``-0`` both map to 0 and adjacent floats differ by 1.
    """
    int_type = _INT_FOR_FLOAT[x.dtype]
    bits = x.view(int_type).astype(np.int64)
    mask = np.int64((1 << (8 * x.dtype.itemsize - 1)) - 1)
    magnitude = bits & mask
    return np.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a, b, dtype=None) -> np.ndarray:
    """Elementwise distance between ``a`` and ``b`` in units in the last place.

    Both inputs are converted to ``dtype`` (default: ``a``'s dtype when it is
    float16/32/64, else float32) before comparing, so a float64 expected value
    is first rounded to the nearest representable value of the type under
    test. Returns an int64 array (broadcast shape). ``+0`` and ``-0`` are 0
    apart; two NaNs are 0 apart; a NaN against a non-NaN is
    ``np.iinfo(np.int64).max``. Complex inputs give the larger of the real and
    imaginary parts' distances.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if dtype is None:
        base = a.real.dtype if np.iscomplexobj(a) else a.dtype
        dtype = base if base in _INT_FOR_FLOAT else np.dtype(np.float32)
    dtype = np.dtype(dtype)
    if np.iscomplexobj(a) or np.iscomplexobj(b):
        a = a.astype(np.complex128)
        b = b.astype(np.complex128)
        return np.maximum(ulp_distance(a.real, b.real, dtype), ulp_distance(a.imag, b.imag, dtype))
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    if b.dtype.kind not in "fc":
        b = b.astype(np.float64)
    a, b = np.broadcast_arrays(a.astype(dtype), b.astype(dtype))
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    dist = np.abs(_ordered_ints(a) - _ordered_ints(b))
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    dist = np.where(nan_a & nan_b, 0, dist)
    dist = np.where(nan_a ^ nan_b, np.iinfo(np.int64).max, dist)
    return dist


def _as_numpy(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fciub" or (
        x.dtype.kind in "f" and x.dtype.itemsize < 4
    ):  # e.g. bfloat16 from ml_dtypes
        x = x.astype(np.float64)
    return x


def assert_close(actual, expected, rtol=1e-7, atol=0.0, err_msg=""):
    """``np.testing.assert_allclose`` accepting JAX arrays and bfloat16/float16."""
    np.testing.assert_allclose(
        _as_numpy(actual),
        _as_numpy(expected),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        err_msg=err_msg,
    )
