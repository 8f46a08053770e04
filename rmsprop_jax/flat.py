r"""``rj.contiguous(tx)``: the same optimizer with its state stored flat, one buffer per dtype.

This module (``rmsprop_jax.flat``, ``rj.flat``) holds :func:`contiguous` and the flat
data it works on: :func:`flatten`, :class:`FlatParams`, :class:`Layout`,
:class:`ContiguousState` and :func:`ema_params`.

A model with many small leaves (an RL agent, a small MLP: 100K parameters in
200 tensors) spends most of an optimizer step on per-leaf overhead, not on
arithmetic: every leaf of the parameters, the gradients and every slot of the
state is a separate buffer, a separate kernel and a separate argument of the
jitted step. ``rj.contiguous(tx)`` keeps the semantics of ``tx`` over the same
pytrees and stores every per-parameter slot (RMSprop's ``v``, ``a``, ``m``, the
weight EMA, the gradient accumulators) as ONE 1-D buffer per dtype. A step
concatenates the gradients of each dtype (one concatenate), runs the
transformation once over the flat buffers (one fused loop) and splits the
update back into the tree.

Two ways to use it:

* **Tree in, tree out** (drop-in): ``tx = rj.contiguous(rj.rmsprop(...))``
  with the parameters and gradients as usual. The state shrinks to one buffer
  per dtype and slot; the parameters stay a tree, so the step still reads and
  writes one buffer per leaf.
* **Flat parameters** (fastest): ``flat, unflatten = rj.flat.flatten(params)``
  keeps the parameters themselves in one buffer per dtype; the loss reads
  ``unflatten(flat)`` (slices, free), ``jax.grad`` with respect to ``flat``
  returns flat gradients (the backward of the slices is the one
  concatenate), and ``tx.update`` / :func:`rmsprop_jax.apply_updates` work on
  the buffers directly: the optimizer step is the floor's single fused loop.

  >>> import jax, jax.numpy as jnp, rmsprop_jax as rj
  >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  >>> flat, unflatten = rj.flat.flatten(params)
  >>> tx = rj.contiguous(rj.rmsprop(0.1, exclude_from_weight_decay="b", weight_decay=0.1))
  >>> state = tx.init(flat)
  >>> loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum((p["b"] - 1) ** 2)
  >>> grads = jax.grad(lambda f: loss(unflatten(f)))(flat)
  >>> updates, state = tx.update(grads, state, flat)
  >>> flat = rj.apply_updates(flat, updates)
  >>> unflatten(flat)["b"].round(4)
  Array([0.3162, 0.3162, 0.3162], dtype=float32)

Why, and what each path buys (2-core CPU shared with other jobs, load 4-8, so
the ratios move by 2x between runs; float32; jit + donation; median of 21-31
interleaved repeats). On XLA:CPU the cost of a small step is per BUFFER: a
jitted call passing 200 donated arrays through untouched takes ~270 us (one
array: ~4 us), one trivial kernel per leaf adds ~260 us more. Per-leaf
optimizers pay that for the parameters, the gradients and every slot;
``contiguous`` on a tree pays it for the parameters and gradients only (it
cannot do less while they are trees: ``tree p+g`` below, a step with no
optimizer at all, is the bound); flat parameters pay it for one buffer per
dtype. Optimizer step alone, 100K parameters in 200 leaves, ratio to the
floor (one fused loop over one flat buffer; one run, flat path 0.8-1.4x over
five runs)::

                                 plain   centered+momentum   full Keras set
    rj.rmsprop, per leaf          7.9x         10.7x              39x
    optax                         7.5x         10.6x              39x
    rj.contiguous, tree           7.9x          4.0x              9.0x
    tree p+g, no optimizer        4.1x          2.6x              6.1x
    rj.contiguous, flat params    1.01x         0.98x             1.01x

(the issue's target, <= 2x, needs the flat parameters). **The tree path is
for small leaves only.** Every step it concatenates the gradients and splits
the flat update: parameter-sized temporaries allocated per step. At 1M
parameters in 100 leaves it gains little (``python -m rmsprop_jax bench``:
2.66x vs rj's 2.32x plain, 1.69x vs 2.29x full), and at 16M in 160 leaves it
LOSES (8.3x plain, 4.8x full, where per-leaf rj is 1.06x / 1.02x: 122 MB of
temporaries, and XLA:CPU's concatenate is slow); flat parameters stay at
0.8-1.2x everywhere. A whole
training step of an MLP (100 residual layers of a 31x31 kernel and a bias:
99,200 parameters, 200 leaves, batch 32, forward + backward + optimizer)::

                                 plain     full Keras set
    p - lr*g per leaf (no state)  2.5 ms      1.6 ms
    rj.rmsprop, per leaf          4.2 ms      8.5 ms
    optax.rmsprop                 4.4 ms
    rj.contiguous, tree           3.7 ms      2.8 ms
    rj.contiguous, flat params    2.3 ms      1.6 ms

The trade-off of flat parameters: the model must read its weights through
``unflatten(flat)`` (free slices) and checkpoints hold the buffers (or
``unflatten(flat)``); in exchange the whole step costs what the model costs.

What keeps its per-leaf meaning (each is a flat, segment-aware version):

* Keras ``clipnorm`` (:func:`rmsprop_jax.clip_by_norm`): the norm of every
  tensor is a segment sum over the flat buffer;
* ``exclude_from_weight_decay`` (regexes on leaf paths, bool pytrees,
  callables): evaluated on the original tree and applied as a flat mask
  (ranges of an iota, or a constant mask when there are many ranges);
* ``None`` gradients: the leaf's slots stay untouched and its update is
  ``None``, exactly as the per-leaf transforms do (with a weight EMA the
  update is zero and the average still moves, as per leaf);
* global norms, weight EMA, accumulation, loss scaling, value clipping and
  the RMSprop arithmetic are elementwise or tree-global: unchanged.

What is rejected with an error: :class:`~rmsprop_jax.IndexedSlices`
gradients (a row-sparse update of a table would become a dense one; keep the
table per-leaf, e.g. with :func:`rmsprop_jax.param_groups`), gradients whose
dtype differs from their parameter's, ``None`` gradients together with
transforms that are not rmsprop_jax's, slots that are not one array per
parameter (e.g. blockwise quantized state, whose blocks are per tensor), and
any transformation ``contiguous`` does not know to be safe under flattening
(pass ``assume_elementwise=True`` to vouch that it is elementwise or reduces
only over the whole tree).

Not meant for sharded models (the concatenation gathers the leaves) nor for
huge leaves (no gain: per-leaf overhead is already negligible there).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _checks, _flat_rules, _trees, transforms
from rmsprop_jax.core import abs_sq
from rmsprop_jax.sparse import IndexedSlices

__all__ = ["ContiguousState", "FlatParams", "Layout", "contiguous", "ema_params", "flatten"]

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


def _make_layout(params: Any, first: Callable[[int], bool] | None = None) -> Layout:
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
        return _unflatten(self.layout, self.buffers)

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


def _concat(layout: Layout, leaves: list, dtypes_checked: bool = True) -> tuple:
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
        buffers.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
    return tuple(buffers)


def _unflatten(layout: Layout, buffers, present: tuple | None = None) -> Any:
    """The tree of ``buffers``; leaves with ``present[i]`` False (or None params) are None."""
    out: list[Any] = [None] * len(layout.leaves)
    for g, buffer in enumerate(buffers):
        segments = layout.segments(g)
        if len(segments) == 1 and segments[0][2] == np.shape(buffer)[0]:
            pieces = [buffer]
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


def flatten(params: Any) -> tuple[FlatParams, Callable[[FlatParams], Any]]:
    """``params`` as one buffer per dtype, and the function that gives the tree back.

    Keep the parameters in this form across training steps so that no step
    concatenates or splits them: differentiate ``loss(unflatten(flat))`` with
    respect to ``flat`` and give ``flat`` to ``rj.contiguous(tx)``. Leaves of
    the same dtype are stored in tree order.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> flat, unflatten = rj.flat.flatten({"a": jnp.ones(2), "b": jnp.zeros((1, 2))})
      >>> flat
      FlatParams(float32: float32[4]; 2 leaves)
      >>> unflatten(flat)["b"]
      Array([[0., 0.]], dtype=float32)
    """
    if isinstance(params, FlatParams):
        return params, _unflatten_fn(params.layout)
    layout = _make_layout(params)
    leaves = [leaf for _, leaf in _trees.flatten_with_none(params)[0]]
    return FlatParams(_concat(layout, leaves), layout), _unflatten_fn(layout)


def _unflatten_fn(layout: Layout) -> Callable[[FlatParams], Any]:
    def unflatten(flat: FlatParams) -> Any:
        """The pytree of ``flat`` (slices of its buffers)."""
        if not isinstance(flat, FlatParams) or flat.layout != layout:
            raise ValueError("unflatten: expected a FlatParams with the layout it was made for")
        return flat.unflatten()

    return unflatten


# --------------------------------------------------------------------------- state


@jax.tree_util.register_pytree_with_keys_class
class ContiguousState:
    """State of ``rj.contiguous(tx)``: ``inner`` is ``tx``'s state over :class:`FlatParams`."""

    __slots__ = ("inner", "layout")

    def __init__(self, inner: Any, layout: Layout):
        self.inner = inner
        self.layout = layout

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("inner"), self.inner)], self.layout

    def tree_flatten(self):
        return (self.inner,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)

    def __repr__(self):
        return f"ContiguousState({self.layout!r}, inner={self.inner!r})"


def ema_params(opt_state: Any) -> Any:
    """The EMA weights held in a ``rj.contiguous`` state, as the parameters' tree.

    (:func:`rmsprop_jax.ema_params` returns them as :class:`FlatParams`.)
    """
    found = transforms.ema_params(opt_state)
    return found.unflatten() if isinstance(found, FlatParams) else found


# --------------------------------------------------------------------------- None gradients

# Per leaf of the layout, whether the update being computed has a gradient there
# (None: every leaf has one). Set by the top-level update for the duration of one
# trace; the flat pieces read it (static information, like the layout).
_PRESENT: contextvars.ContextVar = contextvars.ContextVar("rj_contiguous_present", default=None)


# Closures reach the variable only through these module-level functions, so a
# transform pickles by value (cloudpickle) without the unpicklable ContextVar.
def _present() -> Any:
    return _PRESENT.get()


def _set_present(present: Any) -> Any:
    return _PRESENT.set(present)


def _leaf_mask(layout: Layout, group: int, flags) -> jax.Array | None:
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


def _select(flags, new: FlatParams, old) -> FlatParams:
    """``new`` on the leaves with ``flags[i]``, ``old`` (a FlatParams, or 0) elsewhere."""
    if flags is None or all(flags):
        return new
    out = []
    for g, buffer in enumerate(new.buffers):
        mask = _leaf_mask(new.layout, g, flags)
        other = jnp.zeros_like(buffer) if isinstance(old, int) else old.buffers[g]
        out.append(buffer if mask is None else jnp.where(mask, buffer, other))
    return FlatParams(out, new.layout)


def _zero_absent(updates):
    """The update with zeros on the leaves that have no gradient (as a per-leaf None)."""
    present = _present()
    if present is None or not isinstance(updates, FlatParams):
        return updates
    return _select(present, updates, 0)


# --------------------------------------------------------------------------- flat pieces


def _flat_rmsprop(original: optax.GradientTransformation) -> optax.GradientTransformation:
    """``rmsprop_update`` itself over the buffers; leaves without a gradient keep their slots."""

    def init_fn(params):
        state = original.init(params)
        if isinstance(params, FlatParams):
            _check_slots(state, params.layout)
        return state

    def update_fn(updates, state, params=None):
        present = _present()
        updates = _zero_absent(updates)
        new_updates, new_state = original.update(updates, state, params)
        if present is None:
            return new_updates, new_state
        fields = {}
        for name, new, old in zip(new_state._fields, new_state, state):
            if isinstance(new, FlatParams):
                fields[name] = _select(present, new, old)
            elif not _scalars_only(new):
                raise NotImplementedError(
                    f"rj.contiguous: None gradients with an RMSprop state field {name!r} "
                    "that is not one array per dtype are not supported"
                )
        return _select(present, new_updates, 0), new_state._replace(**fields)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_slots(state: Any, layout: Layout) -> None:
    """Every per-parameter slot is one 1-D array per dtype (not, e.g., blockwise quantized)."""
    for name, value in zip(getattr(state, "_fields", ()), state):
        if _scalars_only(value):  # the step count, absent slots, hyperparameters
            continue
        ok = isinstance(value, FlatParams) and all(
            tuple(getattr(b, "shape", ())) == (size,)
            for b, (_, size) in zip(value.buffers, layout.groups)
        )
        if not ok:
            raise NotImplementedError(
                f"rj.contiguous: the RMSprop slot {name!r} is not one 1-D array per dtype "
                "(blockwise-quantized state is per tensor: its blocks and its small-tensor "
                "rule would change under flattening); use the per-leaf optimizer, or "
                "accumulator_dtype=None / jnp.bfloat16"
            )


def _scalars_only(tree) -> bool:
    return not isinstance(tree, FlatParams) and all(np.ndim(x) == 0 for x in jax.tree.leaves(tree))


def _flat_clip_by_norm(clipnorm: float) -> optax.GradientTransformation:
    """Keras ``clipnorm`` per leaf: the norm of each segment of the buffer (one segment sum)."""

    def update_fn(updates, state, params=None):
        del params
        layout = updates.layout
        out = []
        for g, buffer in enumerate(updates.buffers):
            ids, count = _segment_ids(layout, g)
            x = buffer.astype(jnp.promote_types(buffer.dtype, jnp.float32))
            sums = jax.ops.segment_sum(abs_sq(x), ids, count, indices_are_sorted=True)
            norms = jnp.where(sums > 0, jnp.sqrt(jnp.where(sums > 0, sums, 1)), sums)

            def rescaled(_, x=x, ids=ids, count=count, norms=norms):
                # As rj.clip_by_norm: an overflowing sum of finite values is recomputed
                # as m * sqrt(sum((x / m)^2)), m the segment's largest |x|.
                with jax.named_scope(transforms.clipping.OVERFLOW_FALLBACK):
                    m = jax.ops.segment_max(jnp.abs(x), ids, count, indices_are_sorted=True)
                    ok = jnp.isfinite(m) & (m > 0)
                    safe_m = jnp.where(ok, m, 1.0)
                    scaled = jax.ops.segment_sum(
                        abs_sq(x / safe_m[ids]), ids, count, indices_are_sorted=True
                    )
                    return jnp.where(ok & ~jnp.isfinite(norms), m * jnp.sqrt(scaled), norms)

            norms = jax.lax.cond(
                jnp.all(jnp.isfinite(norms)), lambda _, norms=norms: norms, rescaled, None
            )
            per_element = norms[ids]
            out.append(
                ((buffer * clipnorm) / jnp.maximum(per_element, clipnorm)).astype(buffer.dtype)
            )
        return FlatParams(out, layout), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@functools.lru_cache(maxsize=64)
def _segment_ids_np(layout: Layout, group: int) -> tuple[np.ndarray, int]:
    segments = layout.segments(group)
    ids = np.repeat(np.arange(len(segments), dtype=np.int32), [n for _, _, n in segments])
    return ids, len(segments)


def _segment_ids(layout: Layout, group: int):
    ids, count = _segment_ids_np(layout, group)
    return jnp.asarray(ids), count


def _flat_weight_decay(weight_decay, learning_rate, schedule, decayed_mask):
    """Keras decoupled weight decay with the exclusions evaluated on the tree, applied flat."""

    def init_fn(params):
        return transforms.WeightDecayState(count=jnp.zeros([], jnp.int32) if schedule else None)

    def update_fn(updates, state, params=None):
        if params is None:
            raise _checks.params_required("add_decoupled_weight_decay")
        lr = learning_rate if schedule is None else schedule(state.count)
        flags = _decay_flags(decayed_mask, params.layout, params.unflatten())
        present = _present()
        if present is not None:
            flags = tuple(f and p for f, p in zip(flags, present))
        out = []
        for g, (u, w) in enumerate(zip(updates.buffers, params.buffers)):
            mask = _leaf_mask(params.layout, g, flags)
            decayed = (u - (w * weight_decay * jnp.asarray(lr, w.dtype))).astype(u.dtype)
            out.append(decayed if mask is None else jnp.where(mask, decayed, u))
        count = None if schedule is None else optax.safe_increment(state.count)
        return FlatParams(out, updates.layout), transforms.WeightDecayState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_flags(decayed_mask, layout: Layout, tree) -> tuple[bool, ...]:
    """Per leaf of ``layout``: True when weight decay applies (a Python bool)."""
    mask = decayed_mask(tree)
    flags = layout.treedef.flatten_up_to(mask)
    out = []
    for path, flag, leaf in zip(layout.paths, flags, layout.leaves):
        if leaf is None:
            out.append(False)
            continue
        if isinstance(flag, jax.core.Tracer):
            raise TypeError(
                f"exclude_from_weight_decay must give Python bools; got a traced value for {path!r}"
            )
        out.append(bool(flag))
    return tuple(out)


def _flat_ema(original: optax.GradientTransformation) -> optax.GradientTransformation:
    """Keras weight EMA itself; a leaf without a gradient gets a zero update, as per leaf."""

    def update_fn(updates, state, params=None):
        updates = _zero_absent(updates)
        result = original.update(updates, state, params)
        _set_present(None)  # every leaf has an update from here on (zeros, or the overwrite)
        return result

    return optax.GradientTransformation(original.init, update_fn)


def _zeroing(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` fed zeros (not whatever an earlier piece left) on the leaves without a gradient."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        return inner.update(_zero_absent(updates), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# --------------------------------------------------------------------------- recognising tx


class _Plan(NamedTuple):
    tx: optax.GradientTransformationExtraArgs
    decay_masks: tuple  # the exclusion functions of the weight-decay pieces
    foreign: tuple  # names of trusted transforms that are not rmsprop_jax's (None grads rejected)


# optax's elementwise transforms (None gradients are rejected with them).
_OPTAX_FLAT_SAFE = {
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_adam",
    "trace",
    "scale",
    "scale_by_schedule",
    "clip",
    "clip_by_global_norm",
    "add_decayed_weights",
    "identity",
}


def _identify(tx) -> tuple[str, str]:
    """(module, factory name) of the function ``tx.update``."""
    update = getattr(tx, "update", None)
    module = getattr(update, "__module__", "") or ""
    qualname = getattr(update, "__qualname__", "") or ""
    return module, qualname.split(".<locals>")[0]


def _closure(fn) -> Mapping[str, Any]:
    try:
        return inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}
    except (TypeError, ValueError):
        return {}


#: Attribute of a transform's ``update`` function telling ``rj.contiguous`` how it
#: behaves over flat buffers (every rmsprop_jax factory sets it; see
#: ``rmsprop_jax._flat_rules``). Users may set ``"elementwise"`` (elementwise or
#: reducing only over the whole tree, a None gradient staying None: used as is,
#: fed zeros where a gradient is None), or a callable ``rule(tx, flat) ->
#: GradientTransformation`` returning the flat version (``flat(inner)``
#: converts a wrapped transform).
RULE_ATTRIBUTE = _flat_rules.RULE_ATTRIBUTE


class _UnknownVersion(NotImplementedError):
    pass


def _env(env: Mapping[str, Any], name: str, label: str):
    """A closure variable of a recognised factory, or a clear error when its code changed."""
    if name not in env:
        raise _UnknownVersion(
            f"rj.contiguous does not recognise this version of {label} (its closure has no "
            f"{name!r}); update rmsprop_jax/flat.py or tag the transform with "
            f"update.{RULE_ATTRIBUTE}"
        )
    return env[name]


def _plan(tx, assume_elementwise: bool) -> _Plan:
    decay_masks: list = []
    foreign: list = []

    def flat_version(tx, factory: str, arguments: dict):
        """The flat version of a transform an rmsprop_jax factory built from ``arguments``."""
        if factory == "chain":
            return optax.chain(*(visit(piece) for piece in arguments["pieces"]))
        if factory in ("with_extra_args_support", "with_state_check"):  # the flat state is new
            return optax.with_extra_args_support(visit(arguments["inner"]))
        if factory == "rmsprop_update":
            return _flat_rmsprop(tx)
        if factory == "ema":
            return _flat_ema(tx)
        if factory == "clip_by_norm":
            return _flat_clip_by_norm(arguments["clipnorm"])
        if factory == "add_decoupled_weight_decay":
            decay_masks.append(arguments["decayed_mask"])
            return _flat_weight_decay(**arguments)
        # The wrappers: the mean of a leaf without a gradient is not zero (its sum is
        # kept) and a skipped step must stay skipped, so they are fed zeros too.
        inner = visit(arguments["inner"])
        if factory == "accumulate_gradients":
            steps = arguments["gradient_accumulation_steps"]
            return _zeroing(transforms.accumulate_gradients(inner, steps))
        if factory == "dynamic_loss_scale":
            scale, growth = arguments["initial_scale"], arguments["dynamic_growth_steps"]
            return _zeroing(transforms.dynamic_loss_scale(inner, scale, growth))
        raise AssertionError(f"no flat version of {factory!r}")

    def visit(tx):
        rule = getattr(getattr(tx, "update", None), RULE_ATTRIBUTE, None)
        if rule == _flat_rules.ELEMENTWISE:
            return _zeroing(tx)  # fed zeros where a gradient is None (norms skip a None leaf)
        if isinstance(rule, tuple):
            return flat_version(tx, *rule)
        if callable(rule):
            return rule(tx, visit)
        # Chains built with optax itself: their pieces are only in optax's closures.
        module, name = _identify(tx)
        get = lambda fn, key: _env(_closure(fn), key, f"{module}.{name}")
        if module.startswith("optax") and name == "with_extra_args_support":
            return optax.with_extra_args_support(visit(get(tx.update, "tx")))
        if module.startswith("optax") and name == "chain":
            children = [
                optax.GradientTransformationExtraArgs(i, u)
                for i, u in zip(get(tx.init, "init_fns"), get(tx.update, "update_fns"))
            ]
            return optax.chain(*(visit(c) for c in children))
        label = f"{module}.{name}" if module else repr(tx)
        if (module.startswith("optax") and name in _OPTAX_FLAT_SAFE) or assume_elementwise:
            foreign.append(label)
            return tx
        raise NotImplementedError(
            f"rj.contiguous cannot tell whether {label} keeps its meaning over flat buffers "
            "(a per-tensor norm, a mask by path or a per-leaf shape would change). It knows "
            "rj.rmsprop / rj.rmsprop_update / rj.scale_by_rmsprop, the rj.transforms, optax.chain and optax's "
            "elementwise transforms. If this transform is elementwise or reduces only over the "
            "whole tree, pass assume_elementwise=True."
        )

    flat_tx = optax.with_extra_args_support(visit(tx))
    return _Plan(flat_tx, tuple(decay_masks), tuple(foreign))


# --------------------------------------------------------------------------- the wrapper


def contiguous(
    tx: optax.GradientTransformation, *, assume_elementwise: bool = False
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its per-parameter state stored as one flat buffer per dtype.

    Same ``init`` / ``update`` over the same pytrees as ``tx`` (updates agree
    to float rounding: sums such as global norms are taken in another order),
    with :class:`ContiguousState` holding ``tx``'s state over
    :class:`FlatParams`. ``init`` and ``update`` also accept the
    :class:`FlatParams` of :func:`flatten` (then ``update`` returns
    :class:`FlatParams` updates and nothing is concatenated or split).

    Args:
      tx: ``rj.rmsprop(...)``, ``rj.rmsprop_update(...)``, an ``optax.chain``
        of rmsprop_jax transforms and optax's elementwise transforms.
        Per-leaf features keep their per-leaf meaning (see the module
        docstring); anything else raises ``NotImplementedError`` at once.
      assume_elementwise: accept transforms ``contiguous`` does not know,
        vouching that they are elementwise or reduce only over the whole tree.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> tx = rj.contiguous(rj.rmsprop(0.1, momentum=0.9, centered=True))
      >>> state = tx.init(params)
      >>> state.inner.momentum
      FlatParams(float32: float32[6]; 2 leaves)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["bias"].round(4)
      Array([-0.3333, -0.3333], dtype=float32)
    """
    plan = _plan(tx, assume_elementwise)
    inner = plan.tx

    def init_fn(params):
        if isinstance(params, FlatParams):
            layout, flat = params.layout, params
        else:
            first = None
            if plan.decay_masks:  # decayed leaves first: the decay mask is one range
                probe = _make_layout(params)
                flags = _decay_flags(plan.decay_masks[0], probe, params)
                first = flags.__getitem__
            layout = _make_layout(params, first)
            flat = FlatParams(
                _concat(layout, [p for _, p in _trees.flatten_with_none(params)[0]]), layout
            )
        return ContiguousState(inner.init(flat), layout)

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, ContiguousState):
            raise TypeError("rj.contiguous: the state was not made by this transformation's init")
        layout = state.layout
        if isinstance(updates, FlatParams):
            if updates.layout != layout:
                raise ValueError(
                    "rj.contiguous: the FlatParams gradients have another layout than the state; "
                    "initialise with the same FlatParams (tx.init(flat))"
                )
            if params is not None and not (
                isinstance(params, FlatParams) and params.layout == layout
            ):
                raise ValueError(
                    "rj.contiguous: with FlatParams gradients, pass the FlatParams parameters"
                )
            flat_g, flat_p, present = updates, params, None
        else:
            flat_g, present = _flatten_grads(layout, updates)
            flat_p = None if params is None else _flatten_params(layout, params)
        if present is not None and plan.foreign:
            raise ValueError(
                "rj.contiguous: None gradients are only supported with rmsprop_jax's transforms "
                f"(this chain holds {', '.join(plan.foreign)}); pass zeros instead"
            )
        with _presence(present) as final:
            new_flat, inner_state = inner.update(flat_g, state.inner, flat_p, **extra_args)
        new_state = ContiguousState(inner_state, layout)
        if isinstance(updates, FlatParams):
            return new_flat, new_state
        return _unflatten(layout, new_flat.buffers, final()), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@contextlib.contextmanager
def _presence(present):
    token = _PRESENT.set(present)
    final = {}
    try:
        yield lambda: final["present"]
    finally:
        final["present"] = _PRESENT.get()
        _PRESENT.reset(token)


def _flatten_grads(layout: Layout, grads) -> tuple[FlatParams, tuple | None]:
    leaves, treedef = _trees.flatten_with_none(grads)
    if treedef != layout.treedef:
        _checks.check_same_structure(grads, layout.treedef.unflatten([0] * len(layout.leaves)))
        raise ValueError(
            f"rj.contiguous: grads have structure {treedef}, the state {layout.treedef}"
        )
    values: list[Any] = []
    present = []
    for (path, g), spec in zip(leaves, layout.leaves):
        name = _trees.path_name(path)
        if isinstance(g, IndexedSlices):
            raise TypeError(
                f"rj.contiguous: grads leaf {name!r} is an IndexedSlices; row-sparse updates "
                "need the per-leaf optimizer (flat state would update the whole table densely). "
                "Keep the table out of the contiguous transform, e.g. with rj.param_groups / "
                "optax.partition"
            )
        if spec is None:
            if g is not None:
                raise ValueError(
                    f"rj.contiguous: grads leaf {name!r} is set but the parameter was None"
                )
            values.append(None)
            present.append(False)
            continue
        present.append(g is not None)
        if g is not None:
            _check_leaf(layout, spec, g, name, "grads")
        values.append(g)
    flat = FlatParams(_concat(layout, values), layout)
    real = [p for p, spec in zip(present, layout.leaves) if spec is not None]
    return flat, (None if all(real) else tuple(present))


def _flatten_params(layout: Layout, params) -> FlatParams:
    leaves, treedef = _trees.flatten_with_none(params)
    if treedef != layout.treedef:
        _checks.check_same_structure(params, layout.treedef.unflatten([0] * len(layout.leaves)))
        raise ValueError(
            f"rj.contiguous: params have structure {treedef}, the state {layout.treedef}"
        )
    values: list[Any] = []
    for (path, p), spec in zip(leaves, layout.leaves):
        if spec is not None:
            if p is None:
                raise ValueError(f"rj.contiguous: params leaf {_trees.path_name(path)!r} is None")
            _check_leaf(layout, spec, p, _trees.path_name(path), "params")
        values.append(p)
    return FlatParams(_concat(layout, values), layout)


def _check_leaf(layout: Layout, spec, leaf, name: str, what: str) -> None:
    group, _, shape = spec
    dtype = jnp.dtype(jnp.result_type(leaf)).name
    expected = layout.groups[group][0]
    if tuple(np.shape(leaf)) != shape:
        raise ValueError(
            f"rj.contiguous: {what} leaf {name!r} has shape {tuple(np.shape(leaf))}, "
            f"the parameter {shape}"
        )
    if dtype != expected:
        raise TypeError(
            f"rj.contiguous: {what} leaf {name!r} has dtype {dtype} but the parameter is "
            f"{expected}; the flat state is grouped by the parameters' dtypes (cast the "
            "gradients to them, or use the per-leaf optimizer)"
        )
