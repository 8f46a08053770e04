"""The same parameters in many leaves and in one, side by side in one process: how much longer
the step over many leaves takes, per kernel it runs beyond the one-leaf step's.

A step over many leaves runs a few kernels per leaf (float32 state: 2, int8 state: 4), where
the floor and a step over one leaf run a handful in all. Each round times, in turn, the floor,
rj's plain step with float32 state and with int8 state, on ``LEAVES`` leaves of ``SIZE``
elements and on one leaf of ``LEAVES * SIZE`` (``bench.measure``: warm-up, then the contenders
interleaved in rotating order). Per contender the report gives the medians over
rounds, the kernels in the compiled step (its fusions) and the time each extra kernel added:
``(many leaves - one leaf) / (their kernels' difference)``. That is a quotient of two step
times: it does not tell a kernel's launch cost from loops that run slower over small leaves
(a per-kernel profile of the 160-leaf int8 step found both cores busy, with no idle time
between kernels; README, "Performance and memory"). Usage (from the repository root)::

    python tools/kernel_overhead.py LEAVES SIZE [ROUNDS]
    python tools/kernel_overhead.py 160 4096      # small leaves: the dispatch dominates
    python tools/kernel_overhead.py 160 100000    # the bench's 16M/160 case

Leaves under 4096 elements keep float32 state under int8 (``MIN_QUANTIZED_SIZE``), so ``SIZE``
should be at least 4096 for the int8 rows to mean int8.
"""

from __future__ import annotations

import statistics
import sys

from rmsprop_jax.cli import bench


def main(leaves: int, size: int, rounds: int) -> None:
    layouts = {f"{leaves}x{size}": (leaves, size), f"1x{leaves * size}": (1, leaves * size)}
    steps = {}
    for layout, (n, m) in layouts.items():
        host_params, grad_sets = bench._host_data(n, m, 0)
        steps["floor", layout] = bench.make_floor("plain", host_params, grad_sets)
        steps["rj float32", layout] = bench.make_rj("plain", host_params, grad_sets)
        steps["rj int8", layout] = bench.make_rj(
            "plain", host_params, grad_sets, accumulator_dtype="int8"
        )
    bench.measure(list(steps.values()), rounds, target_s=0.05)  # warm-up, then interleaved rounds
    many, one = layouts
    for name in ("floor", "rj float32", "rj int8"):
        t_many, t_one = (statistics.median(steps[name, layout].times) for layout in (many, one))
        k_many, k_one = (steps[name, layout].stats["fusions"] for layout in (many, one))
        extra = (
            f"{(t_many - t_one) / (k_many - k_one) * 1e6:.2f} us per extra kernel"
            if k_many != k_one
            else "same kernels"
        )
        print(
            f"{name}: {many} {t_many * 1e3:.3f} ms ({k_many} kernels), "
            f"{one} {t_one * 1e3:.3f} ms ({k_one} kernels): {extra}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 9)
