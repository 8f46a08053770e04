"""The flat buffers ``rj.contiguous`` works on: where each leaf lives, and per-leaf views of them.

Private plumbing shared by :mod:`rmsprop_jax.flat` (which re-exports
:class:`FlatParams` and :class:`Layout`) and by the transforms whose per-leaf
meaning survives flattening only with the layout's help (a per-tensor norm is
a :class:`Segments` sum, a per-leaf mask is :func:`leaf_mask`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _trees
from rmsprop_jax.sparse import IndexedSlices

__all__ = [
    "FlatParams",
    "Layout",
    "Segments",
    "concat",
    "leaf_mask",
    "make_layout",
    "select",
    "static_flags",
    "unflatten",
]

# Iota comparisons build a mask inside the fused loop (no memory traffic) up to
# this many ranges; beyond it the mask is a constant bool array (1 byte/param).
_MAX_MASK_RANGES = 8

# --------------------------------------------------------------------------- layout


class Layout:
    """Where each leaf of a pytree lives in the flat buffers (static; hashable, interned).

    ``groups``: one ``(dtype name, size)`` per buffer; ``leaves``: per leaf of
    ``treedef`` (None leaves included), ``(group, offset, shape)`` or None for a
    None parameter; ``paths``: the leaves' path names (``"dense/bias"``).
    """

    __module__ = "rmsprop_jax.flat"  # its public home (pickles name it there)
    __slots__ = ("__weakref__", "_hash", "_key", "groups", "leaves", "paths", "treedef")
    _interned: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()
    # The slots, set once in __new__ (annotations only: no class attributes).
    treedef: jax.tree_util.PyTreeDef
    groups: tuple[tuple[str, int], ...]
    leaves: tuple[tuple[int, int, tuple[int, ...]] | None, ...]
    paths: tuple[str, ...]
    _key: tuple
    _hash: int

    def __new__(cls, treedef, groups, leaves, paths):
        key = (treedef, tuple(groups), tuple(leaves), tuple(paths))
        found = cls._interned.get(key)
        if found is not None:
            return found
        self = object.__new__(cls)
        self.treedef, self.groups, self.leaves, self.paths = key
        self._key, self._hash = key, hash(key)
        cls._interned[key] = self
        return self

    def __eq__(self, other):
        return self is other or (isinstance(other, Layout) and self._key == other._key)

    def __hash__(self):
        return self._hash

    def __repr__(self):
        groups = ", ".join(f"{name}[{size}]" for name, size in self.groups)
        return f"Layout({len(self.leaves)} leaves -> {groups})"

    def __reduce__(self):  # pickling (checkpoints): rebuilt, and interned, on load
        return (Layout, (self.treedef, self.groups, self.leaves, self.paths))

    def segments(self, group: int) -> list[tuple[int, int, int]]:
        """``(leaf index, offset, size)`` of the leaves stored in buffer ``group``, by offset."""
        out = [
            (i, leaf[1], int(np.prod(leaf[2], dtype=np.int64)))
            for i, leaf in enumerate(self.leaves)
            if leaf is not None and leaf[0] == group
        ]
        return sorted(out, key=lambda s: s[1])


def make_layout(params: Any, first: Callable[[int], bool] | None = None) -> Layout:
    """The layout of ``params``; within a dtype, leaves with ``first(i)`` True come first."""
    leaves, treedef = _trees.flatten_with_none(params)
    groups: dict[str, list[int]] = {}
    for i, (path, p) in enumerate(leaves):
        if p is None:
            continue
        if isinstance(p, IndexedSlices):
            raise TypeError(
                f"rj.contiguous: params leaf {_trees.path_name(path)!r} is an IndexedSlices"
            )
        dtype = jnp.result_type(p)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"rj.contiguous: params leaf {_trees.path_name(path)!r} has dtype {dtype}; "
                "only float and complex leaves can be stored flat (leave the others out, "
                "or make them None)"
            )
        groups.setdefault(jnp.dtype(dtype).name, []).append(i)
    placed: list[Any] = [None] * len(leaves)
    sizes = []
    for g, (name, members) in enumerate(groups.items()):
        if first is not None:
            members = sorted(members, key=lambda i: not first(i))  # stable
        offset = 0
        for i in members:
            shape = tuple(int(d) for d in np.shape(leaves[i][1]))
            placed[i] = (g, offset, shape)
            offset += int(np.prod(shape, dtype=np.int64))
        sizes.append((name, offset))
    paths = tuple(_trees.path_name(path) for path, _ in leaves)
    return Layout(treedef, tuple(sizes), tuple(placed), paths)


# --------------------------------------------------------------------------- FlatParams


@jax.tree_util.register_pytree_with_keys_class
class FlatParams:
    """A pytree stored as one 1-D buffer per dtype; ``.unflatten()`` gives the tree back.

    A pytree node: its children are the buffers (``jax.tree.map``, ``jax.grad``,
    :func:`rmsprop_jax.apply_updates`, ``jit`` and donation see one array per
    dtype), the :class:`Layout` is static aux data.
    """

    __module__ = "rmsprop_jax.flat"
    __slots__ = ("buffers", "layout")

    def __init__(self, buffers, layout: Layout):
        self.buffers = tuple(buffers)
        self.layout = layout

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(name) for name, _ in self.layout.groups]
        return list(zip(keys, self.buffers)), self.layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        obj = object.__new__(cls)
        obj.buffers, obj.layout = tuple(buffers), layout
        return obj

    def unflatten(self) -> Any:
        """The pytree (slices and reshapes of the buffers; free inside ``jit``)."""
        return unflatten(self.layout, self.buffers)

    def __getitem__(self, dtype_name: str):
        """The buffer of one dtype, e.g. ``flat["float32"]``."""
        for (name, _), buffer in zip(self.layout.groups, self.buffers):
            if name == dtype_name:
                return buffer
        raise KeyError(dtype_name)

    def __repr__(self):
        inner = ", ".join(
            f"{name}: {getattr(b, 'dtype', '?')}{list(np.shape(b))}"
            for (name, _), b in zip(self.layout.groups, self.buffers)
        )
        return f"FlatParams({inner}; {len(self.layout.leaves)} leaves)"


def concat(layout: Layout, leaves: list) -> tuple:
    """One buffer per group from the flat list of leaves (None: zeros)."""
    buffers = []
    for g, (name, _size) in enumerate(layout.groups):
        parts = []
        for i, _offset, n in layout.segments(g):
            leaf = leaves[i]
            if leaf is None:
                parts.append(jnp.zeros((n,), name))
            else:
                parts.append(jnp.reshape(leaf, (n,)))
        buffers.append(parts[0] if len(parts) == 1 else _concatenate(parts))
    return tuple(buffers)


# --------------------------------------------------------------------------- concatenate and split
#
# XLA:CPU generates code once per distinct fused kernel (and once per
# concatenate). Two shapes of program make code per leaf: XLA merges nested
# concatenations into one concatenate, whose code grows with its operands
# (1.8 s to compile 1000 parts of 64 elements), and a slice at a constant
# offset is a kernel of its own (7.8 s for 1000 slices). So on CPU with one
# device, small leaves travel in runs: a run is concatenated first, and split
# out of a piece cut at a runtime offset; runs of the same sizes then share
# their code (0.46 s and 0.57 s for the same 1000 leaves). A concatenate alone
# is compiled once per instruction too, so a run of at most ``_FUSED_RUN``
# leaves is concatenated inside a kernel of XLA's loop fusion (a ``select``
# on a runtime False reads it; XLA:CPU fused a concatenate of 8 operands, not
# of 16), which compiles once per distinct kernel. All are copies: the
# buffers and pieces are the plain ops' bit for bit.

# Leaves under this many elements travel in runs (copied twice, which costs
# less than the kernels saved); larger ones alone.
_SMALL_PIECE = 2**11
_RUN = 16  # leaves per run cut out of a buffer
_FUSED_RUN = 8  # leaves per run joined into a buffer


def _runs(sizes: list[int], run: int = _RUN) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges: up to ``run`` consecutive small sizes, a large one alone."""
    runs: list[tuple[int, int]] = []
    for i, size in enumerate(sizes):
        start = runs[-1][0] if runs else i
        if runs and max(size, sizes[start]) < _SMALL_PIECE and i - start < run:
            runs[-1] = (start, i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _on_cpu(fallback: Callable, on_cpu: Callable, *operands):
    """``on_cpu(*operands)`` when lowered for CPU while the default backend has one device
    (counted at trace time), else ``fallback``."""
    if jax.device_count() != 1:
        return fallback(*operands)
    return jax.lax.platform_dependent(*operands, cpu=on_cpu, default=fallback)


def _opaque(element: jax.Array, make: Callable) -> Any:
    """``make()`` as a runtime value, which XLA cannot fold into the kernels that read it: out of
    a ``lax.cond`` with two identical branches, whose predicate (``element != element``) reads
    one element, so the value is ``make()``'s whatever the element holds."""
    return jax.lax.cond(element != element, make, make)


def _concatenate(parts: list) -> jax.Array:
    """``jnp.concatenate(parts)``; on CPU, runs concatenated first (see above).

    Each run's concatenate is read by a ``select`` whose predicate is a runtime
    False (:func:`_opaque`), so that XLA fuses it into a loop kernel; the runs
    stay separate behind ``lax.optimization_barrier``.
    """
    runs = _runs([int(np.size(p)) for p in parts], _FUSED_RUN)
    first = next((i for i, p in enumerate(parts) if np.size(p)), None)  # the predicate's part
    if len(runs) in (1, len(parts)) or first is None:  # nothing to share
        return jnp.concatenate(parts)

    def on_cpu(*parts):
        never = _opaque(jnp.ravel(parts[first])[0], lambda: jnp.bool_(False))
        grouped = []
        for a, b in runs:
            if b - a > 1:
                run = jnp.concatenate(parts[a:b])
                zeros_instead = jnp.broadcast_to(never, run.shape)
                grouped.append(jax.lax.select(zeros_instead, jnp.zeros_like(run), run))
        joined = iter(jax.lax.optimization_barrier(grouped))
        return jnp.concatenate([next(joined) if b - a > 1 else parts[a] for a, b in runs])

    return _on_cpu(lambda *p: jnp.concatenate(p), on_cpu, *parts)


def _split(buffer: jax.Array, sizes: list[int]) -> list:
    """``jnp.split`` of ``buffer`` into pieces of ``sizes``; on CPU, through runs (see above).

    Each run of small pieces is a ``dynamic_slice`` at a runtime offset
    (:func:`_opaque`), so that XLA cannot fold it into the kernels; the
    offsets are unsigned, so no kernel wraps a negative one around (JAX's
    rule for signed indices: three scalar operations in every piece's
    kernel; ``rj.contiguous`` on 1000 leaves of 64 compiled in 1.23-1.34 s
    against 1.45-1.54 s with int32 offsets, three interleaved compiles); the
    pieces are static slices of the run, at the same offsets in every run of
    the same sizes, and a short run is cut from a full run's length of
    buffer (``window``: at 1000 leaves of 64, the last run's 8 pieces reuse
    the kernels of the other runs' last 8; 1.23-1.37 s against 1.36-1.40 s,
    300 leaves 0.53-0.61 s against 0.62-0.66 s). A large piece is a static
    slice (a dynamic one would make XLA write the whole buffer before copying
    it out). Differentiable, but the transpose of a ``dynamic_slice`` is a
    ``dynamic_update_slice`` into zeros: code to differentiate through uses
    ``lax.split`` (one concatenate).
    """
    starts = np.cumsum([0, *sizes])
    runs = _runs(sizes)
    # Nothing to share; no element for the predicate; offsets beyond int32.
    if len(runs) in (1, len(sizes)) or buffer.size == 0 or buffer.size >= 2**31:
        return jnp.split(buffer, starts[1:-1])
    small = [(a, b) for a, b in runs if sizes[a] < _SMALL_PIECE]

    def window(a: int, b: int) -> int:
        """The first leaf of the slice a run is cut from: a short run reaches back over the small
        leaves before it to a full run's length, so that its pieces' kernels are those of a
        full run's last pieces when the sizes repeat (a tree of many same-shaped layers)."""
        first = b - _RUN
        if b - a < _RUN and first >= 0 and max(sizes[first:a]) < _SMALL_PIECE:
            return first
        return a

    def offsets():
        return tuple(np.uint32(starts[window(a, b)]) for a, b in small)

    def on_cpu(x):
        at = dict(zip(small, _opaque(x[0], offsets)))
        pieces = []
        for a, b in runs:
            if (a, b) not in at:
                pieces.append(x[starts[a] : starts[b]])
                continue
            first = window(a, b)
            run = jax.lax.dynamic_slice(x, (at[a, b],), (int(starts[b] - starts[first]),))
            cut = jnp.split(run, starts[first + 1 : b] - starts[first]) if b - first > 1 else [run]
            pieces += cut[a - first :]
        return pieces

    return _on_cpu(lambda x: jnp.split(x, starts[1:-1]), on_cpu, buffer)


def unflatten(
    layout: Layout, buffers, present: tuple | None = None, *, for_output: bool = False
) -> Any:
    """The tree of ``buffers``; leaves with ``present[i]`` False (or None params) are None.

    ``for_output``: split with :func:`_split` (a step's output); the default,
    ``lax.split``, is the one to differentiate through.
    """
    out: list[Any] = [None] * len(layout.leaves)
    for g, buffer in enumerate(buffers):
        segments = layout.segments(g)
        if len(segments) == 1 and segments[0][2] == np.shape(buffer)[0]:
            pieces = [buffer]
        elif for_output:
            pieces = _split(buffer, [n for _, _, n in segments])
        else:
            # lax.split: one op, whose transpose (under jax.grad) is one concatenate.
            pieces = jnp.split(buffer, [offset for _, offset, _ in segments[1:]])
        for (i, _, _), piece in zip(segments, pieces):
            if present is None or present[i]:
                spec = layout.leaves[i]
                if spec is None:  # segments() lists only the leaves that are stored
                    raise AssertionError(f"rj.contiguous: leaf {i} has no place in {layout!r}")
                out[i] = jnp.reshape(piece, spec[2])
    return layout.treedef.unflatten(out)


def leaf_mask(layout: Layout, group: int, flags) -> jax.Array | None:
    """Bool mask over buffer ``group`` that is True on the leaves with ``flags[i]``; None: all."""
    segments = layout.segments(group)
    size = layout.groups[group][1]
    ranges: list[list[int]] = []
    for i, offset, n in segments:
        if not flags[i] or n == 0:
            continue
        if ranges and ranges[-1][1] == offset:
            ranges[-1][1] = offset + n
        else:
            ranges.append([offset, offset + n])
    if ranges == [[0, size]]:
        return None
    if not ranges:
        return jnp.zeros((size,), bool)
    if len(ranges) <= _MAX_MASK_RANGES:
        iota = jax.lax.iota(jnp.int32, size)
        mask = None
        for lo, hi in ranges:
            piece = (iota >= lo) & (iota < hi)
            mask = piece if mask is None else mask | piece
        return mask
    dense = np.zeros((size,), bool)
    for lo, hi in ranges:
        dense[lo:hi] = True
    return jnp.asarray(dense)


def select(flags, new: FlatParams, old) -> FlatParams:
    """``new`` on the leaves with ``flags[i]``, ``old`` (a FlatParams, or 0) elsewhere."""
    if flags is None or all(flags):
        return new
    out = []
    for g, buffer in enumerate(new.buffers):
        mask = leaf_mask(new.layout, g, flags)
        other = jnp.zeros_like(buffer) if isinstance(old, int) else old.buffers[g]
        out.append(buffer if mask is None else jnp.where(mask, buffer, other))
    return FlatParams(out, new.layout)


def static_flags(tree: Any, layout: Layout, what: str) -> tuple[bool, ...]:
    """Per leaf of ``layout``, the Python bool of ``tree``'s leaf (False for a None parameter).

    ``tree`` (a bool pytree over the parameters, e.g. a weight-decay mask) must
    be static: a traced flag cannot choose the flat mask's ranges.
    """
    out = []
    for path, flag, leaf in zip(layout.paths, layout.treedef.flatten_up_to(tree), layout.leaves):
        if leaf is None:
            out.append(False)
            continue
        if isinstance(flag, jax.core.Tracer):
            raise TypeError(f"{what} must give Python bools; got a traced value for {path!r}")
        out.append(bool(flag))
    return tuple(out)


class Segments(NamedTuple):
    """Per-leaf reductions of one flat buffer: each leaf's segment reduces to one value.

    The flat counterpart of reducing a whole tensor (``jnp.sum`` /
    ``jnp.max`` and a scalar broadcast): ``sum`` and ``max`` give one value
    per leaf, ``spread`` gives every element its leaf's value. So per-tensor
    code written against this interface (:func:`rmsprop_jax.clip_by_norm`'s
    norm) runs unchanged over a flat buffer.
    """

    ids: jax.Array  # int32[size]: the leaf (segment) of each element
    n_segments: int

    @classmethod
    def of(cls, layout: Layout, group: int) -> Segments:
        ids, count = _segment_ids(layout, group)
        return cls(jnp.asarray(ids), count)

    def sum(self, x: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(x, self.ids, self.n_segments, indices_are_sorted=True)

    def max(self, x: jax.Array) -> jax.Array:
        return jax.ops.segment_max(x, self.ids, self.n_segments, indices_are_sorted=True)

    def spread(self, per_leaf: jax.Array) -> jax.Array:
        return per_leaf[self.ids]


@functools.lru_cache(maxsize=64)
def _segment_ids(layout: Layout, group: int) -> tuple[np.ndarray, int]:
    segments = layout.segments(group)
    ids = np.repeat(np.arange(len(segments), dtype=np.int32), [n for _, _, n in segments])
    return ids, len(segments)
