"""Where ``rj.contiguous``'s compile time on a tree of many leaves goes: its step and programs
that do only one part of it, compiled in turn in one process.

``rj.contiguous`` on a tree joins the gradients and the parameters into flat buffers, runs the
optimizer on them and splits the update back into one array per leaf, which the step adds to
its leaf. Each round compiles, in this order (``lowered.compile()`` alone: tracing and
lowering excluded, caches cleared after each):

* ``contiguous 10`` and ``contiguous LEAVES``: the bench's step (``bench._optax_step``, full
  config, parameters donated) on 10 and on ``LEAVES`` leaves of ``SIZE`` elements;
* ``add``: each donated parameter plus its gradient, nothing else: no step that takes and
  returns one array per leaf compiles faster (a lower bound for every optimizer);
* ``join g``: the gradients joined as ``rj.contiguous`` joins them, times a constant;
* ``join g, p``: the gradients and the parameters joined, as the full config's step does;
* ``split + add``: one flat buffer split as ``rj.contiguous`` splits its update, each piece
  added to its donated parameter.

Reported per program: the median over rounds, and its multiple of ``contiguous 10``. Usage
(from the repository root)::

    python tools/compile_parts.py LEAVES SIZE ROUNDS
    python tools/compile_parts.py 1000 64 3     # the bench's 1000x64 compile case
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

import rmsprop_jax as rj
from rmsprop_jax import _flat_buffers
from rmsprop_jax.cli import bench


def _contiguous(leaves: int, size: int) -> Callable[[], object]:
    host_params, grad_sets = bench._host_data(leaves, size, 0)
    tx = rj.contiguous(rj.rmsprop(**bench.CONFIGS["full"]))
    params = bench._tree(host_params)
    state, grads = (params, tx.init(params)), bench._tree(grad_sets[0])
    step = jax.jit(bench._optax_step(tx, rj.apply_updates), donate_argnums=0)
    return lambda: step.lower(state, grads)


def _parts(leaves: int, size: int) -> dict[str, Callable[[], object]]:
    host_params, grad_sets = bench._host_data(leaves, size, 0)
    params, grads = bench._tree(host_params), bench._tree(grad_sets[0])
    sizes = [size] * leaves
    p_list, g_list = list(params.values()), list(grads.values())
    flat = jnp.concatenate(g_list)

    def add(ps, gs):
        return [p + g for p, g in zip(ps, gs)]

    def join_g(ps, gs):
        return _flat_buffers._concatenate(gs) * 0.5

    def join_gp(ps, gs):
        return _flat_buffers._concatenate(gs) * 0.5 + _flat_buffers._concatenate(ps)

    def split_add(ps, u):
        return [p + piece for p, piece in zip(ps, _flat_buffers._split(u, sizes))]

    # In the docstring's order; the programs that return a leaf per parameter donate them.
    programs = {
        "add": (add, 0, g_list),
        "join g": (join_g, (), g_list),
        "join g, p": (join_gp, (), g_list),
        "split + add": (split_add, 0, flat),
    }
    return {
        name: (lambda f=f, d=d, second=second: jax.jit(f, donate_argnums=d).lower(p_list, second))
        for name, (f, d, second) in programs.items()
    }


def main(leaves: int, size: int, rounds: int) -> None:
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    programs = {
        "contiguous 10": _contiguous(10, size),
        f"contiguous {leaves}": _contiguous(leaves, size),
    }
    programs.update(_parts(leaves, size))
    seconds: dict[str, list[float]] = {name: [] for name in programs}
    for r in range(rounds):
        for name, lower in programs.items():
            lowered = lower()
            start = time.perf_counter()
            lowered.compile()
            seconds[name].append(time.perf_counter() - start)
            jax.clear_caches()
        print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()))
    base = statistics.median(seconds["contiguous 10"])
    for name, s in seconds.items():
        median = statistics.median(s)
        print(
            f"{name:16s} median {median:.3f} s ({median / base:.2f}x contiguous 10), min {min(s):.3f}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
