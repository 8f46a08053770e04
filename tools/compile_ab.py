"""A/B of compile time: one bench contender's step (full config) compiled by the package at git
revisions and by the working tree's, in alternating processes.

Compile times drift between processes and with what a process compiled before, so each round
runs one fresh process per version (the working tree first, then each revision, from a ``git
archive`` of ``rmsprop_jax/``), each timing ``COMPILES`` compiles of the same lowered step
(``lowered.compile()`` alone; tracing and lowering excluded, caches cleared in between). The
report per version: the median over rounds of each process's median compile. Usage (from the
repository root)::

    python tools/compile_ab.py CASE CONTENDER ROUNDS REV [REV ...]
    python tools/compile_ab.py 10x64 rj 3 HEAD~1
    python tools/compile_ab.py 1000x64 rj-contiguous 3 31d6c38

``CASE`` is ``LEAVESxSIZE`` (equal 1-D float32 leaves); ``CONTENDER`` is ``rj``,
``rj-contiguous`` or ``optax``.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

COMPILES = 5
REPO = pathlib.Path(__file__).resolve().parents[1]

# Run in each process, with the version under test first on sys.path.
_CHILD = """
import statistics, sys, time, jax
import rmsprop_jax as rj
from rmsprop_jax.cli import bench
leaves, size = (int(n) for n in sys.argv[1].split("x"))
host_params, grad_sets = bench._host_data(leaves, size, 0)
if sys.argv[2] == "optax":
    import optax
    tx, apply_updates = bench.optax_tx("full")[0], optax.apply_updates
else:
    tx, apply_updates = rj.rmsprop(**bench.CONFIGS["full"]), rj.apply_updates
    if sys.argv[2] == "rj-contiguous":
        tx = rj.contiguous(tx)
params = bench._tree(host_params)
state, grads = (params, tx.init(params)), bench._tree(grad_sets[0])
seconds = []
for _ in range(int(sys.argv[3])):
    lowered = jax.jit(bench._optax_step(tx, apply_updates), donate_argnums=0).lower(state, grads)
    start = time.perf_counter()
    lowered.compile()
    seconds.append(time.perf_counter() - start)
    jax.clear_caches()
print(statistics.median(seconds), rj.__file__)
"""


def _compile_seconds(source_root: str, case: str, contender: str) -> float:
    env = dict(os.environ, PYTHONPATH=source_root)
    out = subprocess.run(  # run in source_root: ``python -c`` puts the folder it runs in first
        [sys.executable, "-c", _CHILD, case, contender, str(COMPILES)],
        cwd=source_root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[1].startswith(source_root), f"imported {out[1]}, not the version in {source_root}"
    return float(out[0])


def main(case: str, contender: str, rounds: int, revs: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        roots = {"working tree": str(REPO)}
        for rev in revs:
            roots[rev] = f"{folder}/{rev.replace('/', '_')}"
            os.makedirs(roots[rev])
            archive = subprocess.run(
                ["git", "archive", rev, "rmsprop_jax"], cwd=REPO, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", roots[rev]], input=archive, check=True)
        seconds: dict[str, list[float]] = {name: [] for name in roots}
        for r in range(rounds):
            for name, root in roots.items():
                seconds[name].append(_compile_seconds(root, case, contender))
            print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()))
    for name, s in seconds.items():
        print(f"{case} {contender} {name}: median {statistics.median(s):.3f} s (min {min(s):.3f})")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
