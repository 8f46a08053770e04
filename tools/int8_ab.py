"""A/B of the int8 step's codec: ``quantization.quantize_step`` and ``decode`` at a git revision
against the working tree's, interleaved with the bench's float32 floor in one process.

This machine's timings drift by 10-40 % between processes, so a change to the int8 step is
measured here, not by two bench runs: every round times the floor and each step in turn, and
the ratio reported is the median over rounds of each step's time over the floor's in that
round. Usage (from the repository root)::

    python tools/int8_ab.py CASE CONFIG ROUNDS REV [REV ...]
    python tools/int8_ab.py 16M/1 plain 13 e019296
    python tools/int8_ab.py 160x100006 plain 9 HEAD~1   # LEAVESxSIZE: any leaf size

Only ``quantize_step`` and ``decode`` are swapped (the rest of the step is the working tree's);
the revision's codes and scales must be a ``QuantizedArray`` of the same layout.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile

from rmsprop_jax import quantization
from rmsprop_jax.cli import bench


def codec_at(rev: str) -> dict:
    """``quantize_step`` and ``decode`` of ``rmsprop_jax/quantization.py`` at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:rmsprop_jax/quantization.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/quantization.py"
        with open(path, "w") as file:
            file.write(source)
        spec = importlib.util.spec_from_file_location(f"quantization_{rev}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

    def quantize_step(x, shift):  # the revision's own GridShift and QuantizedArray types
        q = module.quantize_step(x, module.GridShift(*shift))
        return quantization.QuantizedArray(*q)

    return {"quantize_step": quantize_step, "decode": module.decode}


def main(case: str, config: str, rounds: int, revs: list[str]) -> None:
    if "x" in case:
        leaves, size = (int(n) for n in case.split("x"))
    else:
        _, leaves, size = bench.case_sizes(case, False)
    host_params, grad_sets = bench._host_data(leaves, size, 0)
    steps = {"floor": bench.make_floor(config, host_params, grad_sets)}
    current = {name: getattr(quantization, name) for name in ("quantize_step", "decode")}
    for rev in revs:
        for name, fn in codec_at(rev).items():
            setattr(quantization, name, fn)
        try:
            steps[rev] = bench.make_rj(config, host_params, grad_sets, accumulator_dtype="int8")
        finally:
            for name, fn in current.items():
                setattr(quantization, name, fn)
    steps["working tree"] = bench.make_rj(config, host_params, grad_sets, accumulator_dtype="int8")
    bench.measure(list(steps.values()), rounds, target_s=0.1)  # warm-up, then interleaved rounds
    for name, step in steps.items():
        ts = step.times
        ratio = statistics.median(t / f for t, f in zip(ts, steps["floor"].times))
        print(
            f"{name}: median {statistics.median(ts) * 1e3:.2f} ms, "
            f"min {min(ts) * 1e3:.2f} ms, {ratio:.3f}x the floor (median of per-round ratios)"
        )


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
