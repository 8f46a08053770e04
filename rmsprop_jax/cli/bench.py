"""``python -m rmsprop_jax bench``: one optimizer step against optax, Keras, PyTorch and the floor.

Every case is a float32 parameter tree (``16M/160``: 16,000,000 parameters in
160 equal leaves) and every config a Keras RMSprop feature set:

* ``plain``: ``RMSprop(learning_rate=1e-3, rho=0.9, epsilon=1e-7)``;
* ``centered+momentum``: plus ``centered=True, momentum=0.9``;
* ``full``: plus ``global_clipnorm=1.0, weight_decay=0.01, use_ema=True,
  ema_momentum=0.99`` (decoupled weight decay, weight EMA).

Contenders, all given the same parameters and gradients:

* ``floor``: one jitted elementwise program over a single flat buffer that
  moves the minimal bytes of the config (see :data:`FLOOR_BYTES`): the
  yardstick every other time is divided by;
* ``floor-per-leaf``: the floor's program applied to every leaf with its own
  state (one global norm for ``full``): what any optimizer that keeps a state
  per leaf compiles to at best, so ``rj`` / ``floor-per-leaf`` isolates the
  optimizer's own overhead from the per-leaf kernel and argument costs;
* ``rj``: ``rj.rmsprop(**config)``, ``tx.update`` and ``rj.apply_updates``
  in one jitted step with the parameters and the state donated;
* ``rj-bf16`` / ``rj-int8``: the same with ``accumulator_dtype="bfloat16"`` /
  ``"int8"`` (column ``state B/param``: the optimizer state's bytes per
  parameter, from its arrays);
* ``rj-contiguous``: the same through ``rj.contiguous(tx)`` when it exists;
* ``rj-contiguous-flat``: ``rj.contiguous(tx)`` on params kept flat by the user
  (``rj.flat.flatten``), so the step never concatenates or splits;
* ``optax``: the equivalent optax chain (``optax.rmsprop``; for ``full``
  ``clip_by_global_norm`` + ``scale_by_stddev`` + ``scale_by_learning_rate`` +
  ``trace`` + ``add_decayed_weights(-lr*wd)`` + a weight EMA by ``tree_map``);
* ``keras``: ``keras.optimizers.RMSprop(**config).stateless_apply`` (JAX
  backend), jitted with donation;
* ``torch``: ``torch.optim.RMSprop(foreach=True)`` on the CPU (epsilon outside
  the square root, torch's only form; for ``full`` ``clip_grad_norm_`` +
  ``_foreach_mul_`` decoupled decay + ``_foreach_lerp_`` EMA around it).

The optional case ``sparse 1Mx64/4096`` (when ``rj.IndexedSlices`` exists)
steps a 1,000,000 x 64 table with 4,096 looked-up ids (duplicates allowed):
the dense floor and ``rj`` with a dense gradient, against ``floor-sparse``
(gather / update / scatter of the pre-deduplicated rows), ``rj-sparse``
(``IndexedSlices`` gradient, ``rj.apply_updates`` scatter) and ``rj-sparse-optax``
(the same, applied by ``optax.apply_updates``). Its "HLO B/param"
is per table element and counts each scatter's whole operand (cost analysis
does), so it overstates the sparse rows' traffic.

The compile-time cases ``10x64``, ``300x64`` and ``1000x64`` (10, 300 and
1,000 leaves of 64 elements, config ``full`` only; contenders ``floor``, ``rj``,
``rj-contiguous``, ``rj-contiguous-flat`` and ``optax``) are there for the
``compile s`` column: seconds for XLA to compile one jitted step (tracing
and lowering excluded, they are the ``trace s`` column), shown for every JAX
contender of every case. XLA
runs its passes over every kernel, so a per-leaf optimizer's compile time
grows with its leaves, and so, more slowly, does that of ``rj-contiguous``
on a tree, which concatenates the leaves and hands back one array per leaf
(in kernels shared by runs of leaves of the same sizes). ``--quick`` leaves
these cases out unless ``--cases`` names them.

The floor's bytes are the config's minimum (:data:`FLOOR_BYTES`); XLA:CPU
does not fuse sibling outputs into one loop, so the compiled floor itself
writes each state array in its own loop and re-reads the fresh ``v`` / ``a``
/ ``m`` (its HLO moves 28 / 56 / 72 B/param): it is the best one program over
one buffer can do on this backend, the yardstick for per-leaf and per-pass
overheads. The steps cycle through two gradient sets (see :data:`GRAD_SETS`).

Timing: one process, warm-up (compilation and a calibration run) excluded,
the contenders interleaved within every repeat (rotating order), each
measurement ``k`` back-to-back steps ended by ``block_until_ready`` (``k``
calibrated so a measurement lasts about ``--target-ms``), median over the
repeats. For the JAX contenders the compiled HLO is inspected: ``fusion``
instructions in the module, other array-valued top-level instructions,
``bytes accessed`` from ``cost_analysis()`` and temp / peak bytes from
``memory_analysis()`` (peak = argument + output + temp - aliased).

Column ``faults/step``: the process's minor page faults per step over the timed
measurements (``getrusage``, median over the repeats; empty where the platform
has no ``resource`` module). XLA:CPU allocates a step's temporaries afresh in
every call and the OS maps them page by page as they are first written, so a
step with parameter-sized temporaries pays for them here as well as in bytes:
4 KB pages make 256 faults per MB, fewer where the allocator gets transparent
huge pages (see the README's section on ``rj.contiguous``). The contenders
share one allocator: a temporary under glibc's largest mmap threshold (32 MB)
may be reused from its heap or mapped afresh, depending on what the other
contenders allocated and freed before it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CASES",
    "CONFIGS",
    "CONTENDERS",
    "DESCRIPTION",
    "FLOOR_BYTES",
    "GRAD_SETS",
    "QUICK_SHRINK",
    "SPARSE_CASE",
    "SPARSE_CONFIGS",
    "SPARSE_IDS",
    "SPARSE_SHAPE",
    "TORCH_LABEL",
    "Contender",
    "add_arguments",
    "case_sizes",
    "compiled_stats",
    "environment",
    "format_table",
    "hlo_summary",
    "main",
    "make_floor",
    "make_floor_per_leaf",
    "make_keras",
    "make_optax",
    "make_rj",
    "make_sparse_contenders",
    "make_torch",
    "measure",
    "optax_tx",
    "process_seconds",
    "run",
    "run_case",
    "sparse_speedups",
]

DESCRIPTION = (__doc__ or "").split("\n\n")[0]

#: case name -> (parameters, leaves). Leaves are equal 1-D float32 arrays.
CASES: dict[str, tuple[int, int]] = {
    "16M/1": (16_000_000, 1),
    "16M/160": (16_000_000, 160),
    "1M/100": (1_000_000, 100),
    "100K/200": (100_000, 200),
    # Only when named in --cases: leaves of a million elements (int8 leaves are ordered).
    "16M/16": (16_000_000, 16),
    # Compile-time cases: many small leaves, full features (compile s is the column to read).
    "10x64": (640, 10),
    "300x64": (19_200, 300),
    "1000x64": (64_000, 1000),
}
#: Cases that run only when --cases names them.
OPT_IN_CASES = ("16M/16",)
#: The compile-time cases: only the full config, only these contenders, never shrunk.
COMPILE_CASES = ("10x64", "300x64", "1000x64")
COMPILE_CONTENDERS = ("floor", "rj", "rj-contiguous", "rj-contiguous-flat", "optax")
SPARSE_CASE = "sparse 1Mx64/4096"
SPARSE_SHAPE = (1_000_000, 64)
SPARSE_IDS = 4096
SPARSE_CONFIGS = ("plain", "centered+momentum")  # full: EMA and global norm are dense anyway
QUICK_SHRINK = 16
QUICK_LEAF_SHRINK = 8  # compile time grows with the leaves: --quick keeps an eighth of them
# The steps cycle through this many gradient sets: with one constant gradient the
# centered variance v - a^2 decays geometrically into float32 denormals, which
# PyTorch (no flush-to-zero, unlike XLA:CPU) then computes 100x slower.
GRAD_SETS = 2

LR, RHO, EPS, MOMENTUM, WD, CLIP, EMA = 1e-3, 0.9, 1e-7, 0.9, 0.01, 1.0, 0.99

#: Keras / rj.rmsprop keyword arguments of each config.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(learning_rate=LR, rho=RHO, epsilon=EPS),
    "centered+momentum": dict(
        learning_rate=LR, rho=RHO, epsilon=EPS, centered=True, momentum=MOMENTUM
    ),
    "full": dict(
        learning_rate=LR,
        rho=RHO,
        epsilon=EPS,
        centered=True,
        momentum=MOMENTUM,
        global_clipnorm=CLIP,
        weight_decay=WD,
        use_ema=True,
        ema_momentum=EMA,
    ),
}

#: Minimal bytes moved per float32 parameter by a step of each config.
FLOOR_BYTES: dict[str, tuple[int, str]] = {
    "plain": (20, "read p, g, v; write p, v"),
    "centered+momentum": (36, "read p, g, v, a, m; write p, v, a, m"),
    "full": (
        48,
        "global-norm pass reads g (4), then read p, g, v, a, m, ema; write p, v, a, m, ema",
    ),
}

CONTENDERS = (
    "floor",
    "floor-per-leaf",
    "rj",
    "rj-bf16",
    "rj-int8",
    "rj-contiguous",
    "rj-contiguous-flat",
    "optax",
    "keras",
    "torch",
)
TORCH_LABEL = {
    "plain": "torch.optim.RMSprop(foreach=True), CPU; eps outside sqrt",
    "centered+momentum": (
        "torch.optim.RMSprop(foreach=True, centered, momentum), CPU; eps outside sqrt"
    ),
    "full": (
        "CPU: clip_grad_norm_(foreach) + _foreach_mul_ decoupled decay + "
        "RMSprop(foreach, centered, momentum) + _foreach_lerp_ EMA; eps outside sqrt"
    ),
}


# --------------------------------------------------------------------------- data


def case_sizes(case: str, quick: bool) -> tuple[int, int, int]:
    """(params, leaves, leaf size) of a case; --quick shrinks the parameters ~16x and the
    leaves 8x (the compile-time cases are never shrunk: their leaves are the point)."""
    total, leaves = CASES[case]
    if quick and case not in COMPILE_CASES:
        total //= QUICK_SHRINK
        leaves = max(1, leaves // QUICK_LEAF_SHRINK)
    size = max(1, round(total / leaves))
    return size * leaves, leaves, size


def _host_data(leaves: int, size: int, seed: int) -> tuple[list, list[list]]:
    """Parameters and GRAD_SETS gradient sets (the steps cycle through them)."""
    rng = np.random.default_rng(seed)
    params = [0.1 * rng.standard_normal(size, dtype=np.float32) for _ in range(leaves)]
    grad_sets = [
        [rng.standard_normal(size, dtype=np.float32) for _ in range(leaves)]
        for _ in range(GRAD_SETS)
    ]
    return params, grad_sets


# --------------------------------------------------------------------------- HLO


def _split_instruction(line: str) -> tuple[str, str] | None:
    """(shape, opcode) of one HLO instruction line, or None."""
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple shape: skip the balanced parentheses
        depth = 0
        end = 0
        for end, ch in enumerate(rest):  # noqa: B007 (end is read after the loop)
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return (shape, op.group(1)) if op else None


_TRIVIAL = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "fusion"}


def _is_array(shape: str) -> bool:
    """True when an HLO shape (or tuple shape) holds an array with at least one dimension."""
    return any(dims for dims in re.findall(r"\w+\[([\d,]*)\]", shape))


def _elements(shape: str) -> int:
    """Elements of the largest array in an HLO shape."""
    sizes = [
        math.prod(int(d) for d in dims.split(",")) for dims in re.findall(r"\[([\d,]+)\]", shape)
    ]
    return max(sizes, default=1)


def hlo_summary(text: str) -> dict[str, Any]:
    """Counts in an optimized HLO module's text.

    ``fusions``: every ``fusion`` instruction of the module; ``passes``: the
    fusions that read or write an array (not only scalars), i.e. the loops
    over memory; ``other_ops``: the other array-valued instructions of the
    entry computation (copies, sorts, scatters, ...), by opcode in
    ``other_op_kinds``. Computations holding the norms' overflow fallback
    (the ``lax.cond`` branch named ``rj_overflow_fallback``, run only when a
    sum of squares overflows) are left out: they are not part of a step.
    """
    shapes: dict[str, str] = {}
    fusion_lines: list[tuple[str, str]] = []
    other: dict[str, int] = {}
    largest_other = 0
    in_entry = False
    computation: list[tuple[str, str]] = []  # fusions of the computation being read

    def close_computation(lines: list[str]) -> None:
        if not any("rj_overflow_fallback" in line for line in lines):
            fusion_lines.extend(computation)

    lines_of_computation: list[str] = []
    for line in text.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            close_computation(lines_of_computation)
            computation, lines_of_computation = [], []
        lines_of_computation.append(line)
        if line.startswith("ENTRY"):
            in_entry = True
            continue
        if in_entry and line.startswith("}"):
            in_entry = False
        parsed = _split_instruction(line)
        if parsed is None:
            continue
        shape, op = parsed
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)", line)
        if match is None:
            raise ValueError(f"bench: HLO instruction without a name: {line!r}")
        name = match.group(1)
        shapes[name] = shape
        if op == "fusion":
            computation.append((shape, line))
        elif in_entry and op not in _TRIVIAL and _is_array(shape):
            other[op] = other.get(op, 0) + 1
            largest_other = max(largest_other, _elements(shape))
    close_computation(lines_of_computation)
    passes = 0
    for shape, line in fusion_lines:
        args = line.split(" fusion(", 1)[1].split("), kind=", 1)[0]
        operands = [shapes.get(n, "") for n in re.findall(r"%([\w.\-]+)", args)]
        if _is_array(shape) or _is_array(args) or any(_is_array(s) for s in operands):
            passes += 1
    return dict(
        fusions=len(fusion_lines),
        passes=passes,
        other_ops=sum(other.values()),
        other_op_kinds=other,
        other_op_max_elements=largest_other,
    )


def compiled_stats(compiled: Any) -> dict[str, Any]:
    """Fusions, bytes accessed and memory of a ``jax.stages.Compiled``."""
    out: dict[str, Any] = {}
    try:
        out.update(hlo_summary(compiled.as_text()))
    except Exception as err:  # diagnostics only
        out["hlo_error"] = repr(err)
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
        out["flops"] = float(cost.get("flops", float("nan")))
    except Exception as err:
        out["cost_error"] = repr(err)
    try:
        mem = compiled.memory_analysis()
        temp = int(mem.temp_size_in_bytes)
        arg = int(mem.argument_size_in_bytes)
        res = int(mem.output_size_in_bytes)
        alias = int(getattr(mem, "alias_size_in_bytes", 0))
        out.update(
            temp_bytes=temp,
            argument_bytes=arg,
            output_bytes=res,
            alias_bytes=alias,
            peak_bytes=arg + res + temp - alias,
        )
    except Exception as err:
        out["memory_error"] = repr(err)
    return out


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One way to take a step; ``run(k)`` takes k steps and returns the seconds."""

    name: str
    label: str
    step: Callable[[], None]  # one step (asynchronous for JAX)
    sync: Callable[[], None]
    stats: dict[str, Any] = field(default_factory=dict)
    ratio_to: str = "floor"
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per step
    k: int = 1

    def run(self, k: int) -> float:
        start = time.perf_counter()
        for _ in range(k):
            self.step()
        self.sync()
        return time.perf_counter() - start


def _minor_faults() -> int | None:
    """The process's minor page faults so far (``None`` without the ``resource`` module)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _jax_contender(
    name: str, label: str, fn: Callable, state: Any, batches: list, **kw
) -> Contender:
    """``state = fn(state, batch)`` jitted with ``state`` donated, cycling through ``batches``."""
    import jax

    jitted = jax.jit(fn, donate_argnums=0)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowered = jitted.lower(state, batches[0])
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    # Timed before the inspection: reading the HLO text back took 0.14 s of the 1000x64 case's
    # rj-contiguous compile (1.02 s), which the column used to include.
    stats = compiled_stats(compiled)
    stats["trace_s"] = lowered_at - start
    stats["compile_s"] = compiled_at - lowered_at
    unused = [str(w.message) for w in caught if "donated" in str(w.message).lower()]
    if unused:
        stats["donation_warning"] = unused[0][:300]
    holder = {"state": state, "i": 0}

    def step():
        holder["i"] = i = (holder["i"] + 1) % len(batches)
        holder["state"] = compiled(holder["state"], batches[i])

    def sync():
        jax.block_until_ready(holder["state"])

    return Contender(name, label, step, sync, stats, **kw)


def _floor_fn(config: str):
    import jax.numpy as jnp

    centered = config != "plain"
    full = config == "full"

    def fn(state, batch, norm=None):
        # The arithmetic in rj's order of operations (XLA:CPU times differ by a few
        # percent between equivalent orderings of the same memory traffic).
        g, count = batch, state.get("count")
        if full and norm is None:
            norm = jnp.sqrt(jnp.sum(g * g))
        if full:
            g = g * (CLIP * jnp.minimum(1.0 / norm, 1.0 / CLIP) + (norm - norm))
        p, v = state["p"], state["v"]
        v = RHO * v + (1 - RHO) * (g * g)
        new = dict(state, v=v)
        if centered:
            a = RHO * state["a"] + (1 - RHO) * g
            denominator = jnp.sqrt(jnp.maximum(v - a * a, 0) + EPS)
            m = MOMENTUM * state["m"] + (LR * g) / denominator
            step, new["a"], new["m"] = m, a, m
        else:
            step = (LR * g) / jnp.sqrt(v + EPS)
        update = -step
        if full:
            update = update - p * (WD * LR)
        p = p + update
        new["p"] = p
        if full:
            k = jnp.where(count == 0, 0.0, EMA)
            new["ema"] = k * state["ema"] + (1 - k) * p
            new["count"] = count + 1
        return new

    return fn


def _floor_state(config: str, flat_p: np.ndarray) -> dict:
    import jax.numpy as jnp

    state = {"p": jnp.asarray(flat_p), "v": jnp.zeros(flat_p.shape, jnp.float32)}
    if config != "plain":
        state["a"] = jnp.zeros(flat_p.shape, jnp.float32)
        state["m"] = jnp.zeros(flat_p.shape, jnp.float32)
    if config == "full":
        state["ema"] = jnp.asarray(flat_p)
        state["count"] = jnp.zeros([], jnp.int32)
    return state


def make_floor(config: str, host_params: list, grad_sets: list) -> Contender:
    import jax.numpy as jnp

    flat_p = np.concatenate(host_params)
    flat_g = [jnp.asarray(np.concatenate(grads)) for grads in grad_sets]
    per_param, what = FLOOR_BYTES[config]
    label = f"fused over one flat buffer, {per_param} B/param ({what})"
    return _jax_contender("floor", label, _floor_fn(config), _floor_state(config, flat_p), flat_g)


def make_floor_per_leaf(config: str, host_params: list, grad_sets: list) -> Contender:
    """The floor's program on every leaf (one global norm for ``full``): per-leaf state at best."""
    import jax.numpy as jnp

    if len(host_params) == 1:
        raise _NotAvailable("one leaf: the floor itself")
    fn = _floor_fn(config)

    def step(states, grads):
        norm = None
        if config == "full":
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
        return [fn(state, g, norm) for state, g in zip(states, grads)]

    states = [_floor_state(config, p) for p in host_params]
    batches = [[jnp.asarray(g) for g in grads] for grads in grad_sets]
    label = "the floor's program on each leaf (a sum of squares per leaf for the global norm)"
    return _jax_contender("floor-per-leaf", label, step, states, batches)


def _tree(host: list) -> dict:
    import jax.numpy as jnp

    return {f"layer{i:03d}": jnp.asarray(x) for i, x in enumerate(host)}


def _optax_step(tx, apply_updates):
    def fn(state, grads):
        params, opt_state = state
        updates, opt_state = tx.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state

    return fn


def make_rj(
    config: str,
    host_params: list,
    grad_sets: list,
    *,
    contiguous: bool = False,
    flat: bool = False,
    accumulator_dtype: str | None = None,
) -> Contender:
    import jax

    import rmsprop_jax as rj
    from rmsprop_jax import quantization

    extra: dict[str, Any] = (
        {} if accumulator_dtype is None else {"accumulator_dtype": accumulator_dtype}
    )
    tx = rj.rmsprop(**CONFIGS[config], **extra)
    label = f"rj.rmsprop(**{config}); apply_updates in the jitted step"
    name = "rj"
    if accumulator_dtype is not None:
        name = {"bfloat16": "rj-bf16", "int8": "rj-int8"}[accumulator_dtype]
        label = f"rj.rmsprop(**{config}, accumulator_dtype={accumulator_dtype!r}); apply_updates"
    if contiguous:
        tx = rj.contiguous(tx)
        name, label = "rj-contiguous", "rj.contiguous(" + label.split(";")[0] + ")"
    params: Any = _tree(host_params)
    batches: list[Any] = [_tree(grads) for grads in grad_sets]
    if flat:  # the user keeps params (and so grads) as one buffer per dtype
        from rmsprop_jax.flat import flatten

        params = flatten(params)[0]
        batches = [flatten(grads)[0] for grads in batches]
        name, label = "rj-contiguous-flat", label + " on rj.flat.flatten(params)"
    state = (params, tx.init(params))
    contender = _jax_contender(name, label, _optax_step(tx, rj.apply_updates), state, batches)
    # Per-parameter arrays only: the scalar counters are no memory per parameter.
    per_param = [x for x in jax.tree.leaves(state[1]) if x.ndim]
    elements = sum(x.size for x in jax.tree.leaves(params))
    contender.stats["state_bytes_per_param"] = quantization.tree_nbytes(per_param) / elements
    return contender


def _optax_param_ema(decay: float):
    """Weight EMA after the update, Keras semantics (first step copies), by tree_map."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return (jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates, state, params=None):
        count, avg = state
        k = jnp.where(count == 0, 0.0, decay)
        new_params = optax.apply_updates(params, updates)
        avg = jax.tree.map(lambda a, w: k * a + (1 - k) * w, avg, new_params)
        return updates, (optax.safe_increment(count), avg)

    return optax.GradientTransformation(init, update)


def optax_tx(config: str):
    import optax

    if config == "plain":
        return optax.rmsprop(LR, decay=RHO, eps=EPS), "optax.rmsprop"
    if config == "centered+momentum":
        return (
            optax.rmsprop(LR, decay=RHO, eps=EPS, centered=True, momentum=MOMENTUM),
            "optax.rmsprop(centered, momentum)",
        )
    tx = optax.chain(
        optax.clip_by_global_norm(CLIP),
        optax.scale_by_stddev(decay=RHO, eps=EPS),
        optax.scale_by_learning_rate(LR),
        optax.trace(decay=MOMENTUM),
        optax.add_decayed_weights(-LR * WD),  # decoupled: w -= lr * wd * w
        _optax_param_ema(EMA),
    )
    return (
        tx,
        "chain(clip_by_global_norm, scale_by_stddev, lr, trace, add_decayed_weights(-lr*wd), ema)",
    )


def make_optax(config: str, host_params: list, grad_sets: list) -> Contender:
    import optax

    tx, label = optax_tx(config)
    params = _tree(host_params)
    state = (params, tx.init(params))
    batches = [_tree(grads) for grads in grad_sets]
    return _jax_contender("optax", label, _optax_step(tx, optax.apply_updates), state, batches)


def make_keras(config: str, host_params: list, grad_sets: list) -> Contender:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax.numpy as jnp
    import keras

    if keras.backend.backend() != "jax":
        raise _NotAvailable(f"Keras backend is {keras.backend.backend()!r}, not 'jax'")
    variables = [keras.Variable(x, name=f"layer{i:03d}") for i, x in enumerate(host_params)]
    opt = keras.optimizers.RMSprop(**CONFIGS[config])
    opt.build(variables)
    state = ([v.value for v in variables], [v.value for v in opt.variables])
    batches = [[jnp.asarray(g) for g in grads] for grads in grad_sets]

    def fn(state, grads):
        trainable, opt_vars = state
        return opt.stateless_apply(opt_vars, grads, trainable)

    label = f"keras.optimizers.RMSprop(**{config}).stateless_apply, JAX backend"
    contender = _jax_contender("keras", label, fn, state, batches)
    contender.stats["keep_alive"] = (variables, opt)  # dropped before JSON
    return contender


def make_torch(config: str, host_params: list, grad_sets: list) -> Contender:
    import torch

    params = [torch.tensor(x, requires_grad=True) for x in host_params]
    grads = [[torch.tensor(g) for g in gs] for gs in grad_sets]
    counter = [0]
    full = config == "full"
    opt = torch.optim.RMSprop(
        params,
        lr=LR,
        alpha=RHO,
        eps=EPS,
        momentum=0.0 if config == "plain" else MOMENTUM,
        centered=config != "plain",
        foreach=True,
    )
    ema = [p.detach().clone() for p in params] if full else None

    def step():
        counter[0] = i = (counter[0] + 1) % len(grads)
        for p, g in zip(params, grads[i]):  # as backward() would: ~0.2 us per leaf
            p.grad = g
        if full:
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
            with torch.no_grad():
                torch._foreach_mul_(params, 1.0 - LR * WD)
        opt.step()
        if full:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - EMA)

    return Contender("torch", TORCH_LABEL[config], step, lambda: None)


class _NotAvailable(Exception):
    """A contender that cannot run here (API missing, backend absent)."""


# --------------------------------------------------------------------------- sparse


def _sparse_floor_fn(config: str):
    import jax.numpy as jnp

    centered = config != "plain"

    def fn(state, batch):
        ids, g = batch  # sorted unique ids: the floor assumes deduplicated rows
        new = dict(state)

        def rows(x):
            return x.at[ids].get(indices_are_sorted=True, unique_indices=True)

        def put(x, r):
            return x.at[ids].set(r, indices_are_sorted=True, unique_indices=True)

        v = RHO * rows(state["v"]) + (1 - RHO) * g * g
        new["v"] = put(state["v"], v)
        if centered:
            a = RHO * rows(state["a"]) + (1 - RHO) * g
            m = MOMENTUM * rows(state["m"]) + (LR * g) / jnp.sqrt(jnp.maximum(v - a * a, 0) + EPS)
            new["a"], new["m"], step = put(state["a"], a), put(state["m"], m), m
        else:
            step = (LR * g) / jnp.sqrt(v + EPS)
        new["p"] = put(state["p"], rows(state["p"]) - step)
        return new

    return fn


def make_sparse_contenders(config: str, quick: bool, seed: int) -> tuple[int, list, list[str]]:
    """(params, contenders, notes) of the sparse case.

    Long on purpose: each contender (floors, dense, row-sparse, through optax) is
    defined next to the others, in the order of the table's rows.
    """
    import jax.numpy as jnp

    import rmsprop_jax as rj

    slices = rj.IndexedSlices
    rows, width = SPARSE_SHAPE
    k = SPARSE_IDS
    if quick:
        rows, k = rows // QUICK_SHRINK, k // QUICK_SHRINK
    rng = np.random.default_rng(seed)
    table = 0.1 * rng.standard_normal((rows, width), dtype=np.float32)
    ids = rng.integers(0, rows, size=k).astype(np.int32)  # duplicates allowed, as real lookups
    value_sets = [rng.standard_normal((k, width), dtype=np.float32) for _ in range(GRAD_SETS)]
    unique_ids, inverse = np.unique(ids, return_inverse=True)
    n = rows * width
    contenders, notes = [], []
    per_param, what = FLOOR_BYTES[config]

    def dense(values):
        out = np.zeros((rows, width), np.float32)
        np.add.at(out, ids, values)
        return out

    dense_sets = [jnp.asarray(dense(values)) for values in value_sets]
    contenders.append(
        _jax_contender(
            "floor",
            f"dense fused step over the {rows}x{width} table, {per_param} B/param ({what})",
            _floor_fn(config),
            _floor_state(config, table.reshape(-1)),
            [g.reshape(-1) for g in dense_sets],
        )
    )
    tx = rj.rmsprop(**CONFIGS[config])

    def rj_state():
        params = {"table": jnp.asarray(table)}
        return (params, tx.init(params))

    contenders.append(
        _jax_contender(
            "rj",
            "rj.rmsprop, dense gradient of the table",
            _optax_step(tx, rj.apply_updates),
            rj_state(),
            [{"table": g} for g in dense_sets],
        )
    )
    summed_sets = []
    for values in value_sets:
        summed = np.zeros((unique_ids.size, width), np.float32)
        np.add.at(summed, inverse.reshape(-1), values)
        summed_sets.append((jnp.asarray(unique_ids), jnp.asarray(summed)))
    contenders.append(
        _jax_contender(
            "floor-sparse",
            f"gather/update/scatter of the {unique_ids.size} touched rows (ids pre-deduplicated)",
            _sparse_floor_fn(config),
            _floor_state(config, table),  # the 2-D table
            summed_sets,
            ratio_to="floor-sparse",
        )
    )
    if slices is None:
        notes.append("rj-sparse skipped: rmsprop_jax has no IndexedSlices yet")
    else:
        try:
            batches = [
                {"table": slices(jnp.asarray(ids), jnp.asarray(values), (rows, width))}
                for values in value_sets
            ]
            c = _jax_contender(
                "rj-sparse",
                f"rj.rmsprop, IndexedSlices gradient ({k} ids, duplicates), "
                "rj.apply_updates scatter",
                _optax_step(tx, rj.apply_updates),
                rj_state(),
                batches,
                ratio_to="floor-sparse",
            )
            contenders.append(c)
            import optax  # the seam users meet: optax's own apply_updates

            contenders.append(
                _jax_contender(
                    "rj-sparse-optax",
                    "as rj-sparse, applied with optax.apply_updates (dense + IndexedSlices scatter)",
                    _optax_step(tx, optax.apply_updates),
                    rj_state(),
                    batches,
                    ratio_to="floor-sparse",
                )
            )
        except Exception as err:  # API in progress: skip with a note
            notes.append(f"rj-sparse skipped: {type(err).__name__}: {str(err)[:200]}")
    return n, contenders, notes


# --------------------------------------------------------------------------- measuring


def measure(contenders: list[Contender], repeats: int, target_s: float) -> None:
    """Warm up, calibrate k, then interleave the contenders per repeat (rotating order)."""
    for c in contenders:
        c.run(1)  # first call: compile caches, page-in, allocator warm-up
        t = c.run(1)
        c.k = max(1, min(1000, math.ceil(target_s / max(t, 1e-6))))
        c.run(c.k)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for c in order:
                before = _minor_faults()
                c.times.append(c.run(c.k) / c.k)
                after = _minor_faults()
                if before is not None and after is not None:
                    c.faults.append((after - before) / c.k)
    finally:
        if gc_was_enabled:
            gc.enable()


def _row(case, n, leaves, config, c: Contender | None, name, status, note, floor_ms):
    row = dict(
        case=case,
        params=n,
        leaves=leaves,
        config=config,
        contender=name,
        status=status,
        label=c.label if c else "",
        note=note,
        floor_bytes_per_param=FLOOR_BYTES[config][0],
    )
    if c is not None and c.times:
        ms = statistics.median(c.times) * 1e3
        ref = floor_ms.get(c.ratio_to)
        row.update(
            median_ms=ms,
            min_ms=min(c.times) * 1e3,
            times_ms=[t * 1e3 for t in c.times],
            steps_per_measurement=c.k,
            ratio_to=c.ratio_to,
            ratio=(ms / ref) if ref else None,
        )
        if c.faults:
            row["page_faults_per_step"] = statistics.median(c.faults)
        if c.ratio_to != "floor" and floor_ms.get("floor"):
            row["ratio_to_dense_floor"] = ms / floor_ms["floor"]
    if c is not None:  # what compiling showed (compile time, HLO), measured or not
        stats = {k: v for k, v in c.stats.items() if k != "keep_alive"}
        row.update(stats)
        if "bytes_accessed" in stats:
            row["hlo_bytes_per_param"] = stats["bytes_accessed"] / n
        if "passes" in stats:
            row["passes_per_leaf"] = stats["passes"] / leaves
    return row


def run_case(case, config, quick, repeats, target_s, seed, log) -> list[dict]:
    """Rows for one (case, config)."""
    notes: list[str] = []
    if case == SPARSE_CASE:
        n, contenders, notes = make_sparse_contenders(config, quick, seed)
        leaves = 1
        failed: list[tuple[str, str, str]] = []
    else:
        n, leaves, size = case_sizes(case, quick)
        host_params, grad_sets = _host_data(leaves, size, seed)
        contenders, failed = [], []
        makers = dict(
            floor=make_floor,
            rj=make_rj,
            optax=make_optax,
            keras=make_keras,
            torch=make_torch,
        )
        makers["floor-per-leaf"] = make_floor_per_leaf
        makers["rj-bf16"] = lambda *a: make_rj(*a, accumulator_dtype="bfloat16")
        makers["rj-int8"] = lambda *a: make_rj(*a, accumulator_dtype="int8")
        makers["rj-contiguous"] = lambda *a: make_rj(*a, contiguous=True)
        makers["rj-contiguous-flat"] = lambda *a: make_rj(*a, contiguous=True, flat=True)
        names = COMPILE_CONTENDERS if case in COMPILE_CASES else CONTENDERS
        for name in names:
            started = time.perf_counter()
            try:
                contenders.append(makers[name](config, host_params, grad_sets))
                compile_s = contenders[-1].stats.get("compile_s")
                took = f"compiled in {compile_s:.2f} s" if compile_s is not None else "ready"
                log(f"  {case} {config} {name}: {took} ({time.perf_counter() - started:.1f} s)")
            except _NotAvailable as err:
                failed.append((name, "n/a", str(err)))
            except ImportError as err:
                failed.append((name, "n/a", f"not installed: {err}"))
            except Exception as err:  # one broken contender must not stop the run
                failed.append((name, "error", f"{type(err).__name__}: {str(err)[:300]}"))
        del host_params, grad_sets
    measure(contenders, repeats, target_s)
    floor_ms = {
        c.name: statistics.median(c.times) * 1e3 for c in contenders if c.name.startswith("floor")
    }
    rows = [_row(case, n, leaves, config, c, c.name, "ok", "", floor_ms) for c in contenders]
    rows += [_row(case, n, leaves, config, None, nm, st, nt, floor_ms) for nm, st, nt in failed]
    for note in notes:
        log(f"  note: {note}")
    for nm, st, nt in failed:
        log(f"  {nm}: {st}: {nt}")
    return rows


# --------------------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    import jax

    env = dict(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        devices=[str(d) for d in jax.devices()],
        device_kind=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
    )
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    for module in ("optax", "keras", "torch"):
        try:
            env[module] = importlib.import_module(module).__version__
        except ImportError:
            env[module] = "not installed"
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import rmsprop_jax

        env["rmsprop_jax"] = rmsprop_jax.__version__
    except ImportError:
        pass
    return env


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _other_ops(r: dict) -> str:
    if "other_ops" not in r:
        return "-"
    kinds = r.get("other_op_kinds") or {}
    return " ".join([str(r["other_ops"])] + [f"{k}x{v}" if v > 1 else k for k, v in kinds.items()])


def format_table(rows: list[dict]) -> str:
    header = (
        "case",
        "params",
        "config",
        "contender",
        "median ms",
        "min ms",
        "x floor",
        "fusions",
        "passes",
        "other ops",
        "HLO B/param",
        "state B/param",
        "temp MB",
        "peak MB",
        "faults/step",
        "compile s",
        "trace s",
    )
    lines = [header]
    for r in rows:
        ok = r["status"] == "ok"
        ratio = _fmt(r.get("ratio"), ".2f")
        if ok and r.get("ratio_to", "floor") != "floor":
            ratio += f" ({r['ratio_to']})"
        lines.append(
            (
                r["case"],
                f"{r['params']:,}",
                r["config"],
                r["contender"],
                _fmt(r.get("median_ms"), ".3f") if ok else r["status"],
                _fmt(r.get("min_ms"), ".3f"),
                ratio,
                _fmt(r.get("fusions"), "d"),
                _fmt(r.get("passes"), "d"),
                _other_ops(r),
                _fmt(r.get("hlo_bytes_per_param"), ".1f"),
                _fmt(r.get("state_bytes_per_param"), ".3f"),
                _fmt(r["temp_bytes"] / 2**20 if "temp_bytes" in r else None, ".1f"),
                _fmt(r["peak_bytes"] / 2**20 if "peak_bytes" in r else None, ".1f"),
                _fmt(r.get("page_faults_per_step"), ".0f"),
                _fmt(r.get("compile_s"), ".2f"),
                _fmt(r.get("trace_s"), ".2f"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {1, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16}
    out = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _parse_filter(spec: str | None) -> tuple[set[str], set[str]]:
    """``--cases 16M/1,100K/200,full`` -> (cases, configs); empty set = all."""
    cases: set[str] = set()
    configs: set[str] = set()
    if not spec:
        return cases, configs
    known_cases = {c.lower(): c for c in [*CASES, SPARSE_CASE]}
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        low = token.lower()
        if low in known_cases:
            cases.add(known_cases[low])
        elif low in ("sparse",):
            cases.add(SPARSE_CASE)
        elif low in CONFIGS:
            configs.add(low)
        else:
            raise SystemExit(
                f"bench: unknown case or config {token!r}; cases: "
                f"{', '.join([*CASES, 'sparse'])}; configs: {', '.join(CONFIGS)}"
            )
    return cases, configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes /{QUICK_SHRINK}, leaves /{QUICK_LEAF_SHRINK}, 3 repeats, short measurements, "
        "no compile-time cases unless named in --cases (the whole run < 60 s on 2 cores)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write every row (and the machine) as JSON, rewritten after each case "
        '(environment "complete": false until the run ends)',
    )
    parser.add_argument(
        "--cases",
        metavar="LIST",
        help="comma-separated case names and/or configs, e.g. '16M/1,100K/200,full' "
        f"(cases: {', '.join(CASES)}, sparse; configs: {', '.join(CONFIGS)}); default all "
        f"but {', '.join(OPT_IN_CASES)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default 7, quick 3)"
    )
    parser.add_argument(
        "--target-ms",
        type=float,
        default=None,
        help="length of one measurement, steps back to back (default 150, quick 15)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the torch contender (default: torch's own choice; "
        "1 avoids OpenMP stalls when other processes load the cores)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(
    cases: set[str] | None = None,
    configs: set[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    target_ms: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    torch_threads: int | None = None,
    on_case: Callable[[dict, list[dict]], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Runs the cases; ``on_case(environment, rows so far)`` after each (case, config)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if torch_threads:
        try:
            import torch

            torch.set_num_threads(torch_threads)
        except ImportError:
            pass
    repeats = repeats or (3 if quick else 7)
    target_s = (target_ms or (15.0 if quick else 150.0)) / 1e3
    log("loading the peers (optax, keras, torch): a few seconds")
    env = environment()
    env["loadavg_start"] = _loadavg()
    log(
        f"machine: {env['platform']}, {env['cpu_count']} CPUs; jax backend {env['backend']}, "
        f"devices {env['devices']} ({env['device_kind']})"
    )
    log(
        "versions: "
        + ", ".join(
            f"{k} {env[k]}"
            for k in ("python", "rmsprop_jax", "jax", "jaxlib", "optax", "keras", "torch")
            if k in env
        )
        + (f" ({env['torch_threads']} threads, CPU only)" if "torch_threads" in env else "")
    )
    log(
        f"timing: {repeats} interleaved repeats, median; each measurement ~{target_s * 1e3:.0f} ms "
        "of back-to-back steps ended by block_until_ready; warm-up and compilation excluded"
        + (f"; --quick: sizes /{QUICK_SHRINK}, leaves /{QUICK_LEAF_SHRINK}" if quick else "")
    )
    for name, (b, what) in FLOOR_BYTES.items():
        log(f"floor {name}: {b} bytes/param assumed ({what})")
    for name in ("plain", "centered+momentum", "full"):
        log(f"torch {name}: {TORCH_LABEL[name]}")
    busy = env["loadavg_start"] is not None and env["loadavg_start"] > 0.25 * (os.cpu_count() or 1)
    log(
        f"load average at start: {_fmt(env['loadavg_start'], '.2f')}"
        + ("  WARNING: the machine is busy, timings are noisy" if busy else "")
    )
    log("")
    all_cases = [*CASES, SPARSE_CASE]
    rows: list[dict] = []
    start = time.perf_counter()
    for case in all_cases:
        if (cases and case not in cases) or (not cases and case in OPT_IN_CASES):
            continue
        for config in CONFIGS:
            if configs and config not in configs:
                continue
            if case == SPARSE_CASE and config not in SPARSE_CONFIGS:
                continue
            if case in COMPILE_CASES and (config != "full" or (quick and not cases)):
                continue
            log(f"[{case} {config}: building and compiling the contenders]")
            t0 = time.perf_counter()
            case_rows = run_case(case, config, quick, repeats, target_s, seed, log)
            rows += case_rows
            log(f"[{case} {config}: {time.perf_counter() - t0:.1f} s]")
            if on_case:
                on_case(env, rows)
            gc.collect()
    env["total_seconds"] = time.perf_counter() - start
    env["process_seconds"] = process_seconds()
    env["loadavg_end"] = _loadavg()
    return env, rows


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: ``/proc``; else None): the whole command's time,
    with the interpreter's start and the imports the benchmark clock does not see."""
    try:
        with open("/proc/self/stat") as f:  # field 22: start time, in clock ticks after boot
            started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def sparse_speedups(rows: list[dict]) -> list[str]:
    """One line per sparse config: the dense rj step's median over the sparse rj step's."""
    lines = []
    for config in dict.fromkeys(r["config"] for r in rows if r["case"].startswith("sparse")):
        by = {
            r["contender"]: r.get("median_ms")
            for r in rows
            if r["case"].startswith("sparse") and r["config"] == config
        }
        dense, sparse = by.get("rj"), by.get("rj-sparse")
        if dense and sparse:
            lines.append(
                f"sparse speedup, {config}: dense rj step {dense:.2f} ms / sparse rj step "
                f"{sparse:.3f} ms = {dense / sparse:.0f}x"
            )
    return lines


def _write_json(path: str, env: dict, rows: list[dict], complete: bool) -> None:
    """Written to a temporary file and renamed: a run stopped mid-write keeps the last file."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(
            dict(environment={**env, "complete": complete}, rows=rows), f, indent=1, default=str
        )
    os.replace(partial, path)


def main(args: argparse.Namespace) -> int:
    cases, configs = _parse_filter(args.cases)
    # The rows so far are written after each case: a run stopped by a time limit keeps them.
    save = (lambda env, rows: _write_json(args.json, env, rows, False)) if args.json else None
    env, rows = run(
        cases,
        configs,
        quick=args.quick,
        repeats=args.repeats,
        target_ms=args.target_ms,
        seed=args.seed,
        log=lambda s: print(s, flush=True),
        torch_threads=args.torch_threads,
        on_case=save,
    )
    print(format_table(rows))
    print(
        f"\ntotal benchmark time: {env['total_seconds']:.1f} s (the whole command: "
        f"{_fmt(env.get('process_seconds'), '.1f')} s, imports included); load average (1 min) "
        f"{_fmt(env['loadavg_start'], '.2f')} at start, {_fmt(env['loadavg_end'], '.2f')} at end"
    )
    print(
        "x floor: median / median of the floor row (sparse rows: of floor-sparse); passes: fusions "
        "that read or write an array; HLO B/param: cost_analysis bytes accessed / params; "
        "peak MB: argument + output + temp - aliased (memory_analysis); faults/step: minor page "
        "faults of the process per step (fresh temporaries are mapped page by page)"
    )
    for line in sparse_speedups(rows):
        print(line)
    for r in rows:
        if r.get("donation_warning"):
            print(f"donation: {r['case']} {r['config']} {r['contender']}: {r['donation_warning']}")
    if args.json:
        _write_json(args.json, env, rows, True)
    return 0
