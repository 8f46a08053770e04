"""Steering XLA's fusion where it costs compile time (no effect on any value computed)."""

from __future__ import annotations

import jax

__all__ = ["computed_once"]


def computed_once(x: jax.Array) -> jax.Array:
    """``x`` (finite), computed in one kernel of its own instead of in every loop that reads it.

    XLA duplicates a cheap expression (a ``where``, a ``minimum``) into each
    consumer's loop: a step-wide scalar read by every leaf's kernels is then
    compiled once per kernel (at 1000 leaves, thousands of copies), and a
    per-block vector read by a leaf-shaped loop (int8's block scales) is
    recomputed per element. A division counts as expensive to XLA's fusion, so
    an expression that ends in one keeps its own kernel; the divisor
    ``1 + 0 * x`` is exactly 1 for a finite ``x`` and is not folded away
    (``0 * x`` is NaN for a non-finite ``x``, so a non-finite ``x`` becomes
    NaN: for finite values only; callers make sure of that).
    """
    return x / (1 + 0 * x)
