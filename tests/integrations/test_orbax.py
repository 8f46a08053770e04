"""Orbax checkpointing: params + optimizer state round-trip and resume bit for bit.

Every state type is saved mid-run with ``ocp.StandardCheckpointer``, restored
against the abstract target from ``jax.eval_shape`` and trained on: the result
equals the uninterrupted run exactly (CPU). A crash test SIGKILLs a training
subprocess that checkpoints periodically with a ``CheckpointManager`` and
resumes from its newest checkpoint.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

import rmsprop_jax as rj
from rmsprop_jax.quantization import QuantizedArray

TESTS = Path(__file__).resolve().parents[1]  # tests/: the worker scripts
_spec = importlib.util.spec_from_file_location(
    "_orbax_crash_worker", TESTS / "_orbax_crash_worker.py"
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

CASES = [
    "plain",
    "centered_momentum",
    "ema",
    "accumulation",
    "dynamic_loss_scale",
    "int8",
    "bf16",
    "rmsprop_class",
    "everything",
]
TOTAL, SPLIT = 9, 4  # SPLIT mid accumulation window (3 and 2 micro-steps), mid EMA overwrite


def _assert_identical(a, b):
    """Same structure (NamedTuple types included), dtypes, shapes and bits."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def _is_quantized(x):
    return isinstance(x, QuantizedArray)


@pytest.mark.parametrize("case", CASES)
def test_save_restore_continue_bit_exact(case, tmp_path):
    init, step = worker.make_case(case)
    params0 = worker.init_params()
    state0 = init(params0)

    full_p, full_s = worker.run(params0, state0, 0, TOTAL, step)

    mid_p, mid_s = worker.run(params0, state0, 0, SPLIT, step)
    ckpt = {"params": mid_p, "opt_state": mid_s}
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, ckpt)
        ckptr.wait_until_finished()
    del mid_p, mid_s

    abstract = jax.eval_shape(lambda: ckpt)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract)
    _assert_identical(restored, ckpt)  # the round trip itself: types, dtypes, bits
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array)

    res_p, res_s = worker.run(restored["params"], restored["opt_state"], SPLIT, TOTAL, step)
    _assert_identical((res_p, res_s), (full_p, full_s))
    # The run moved the params (so equality is not vacuous).
    assert not np.array_equal(np.asarray(full_p["w"]), np.asarray(params0["w"]))

    if case == "int8":
        quantized = jax.tree.leaves(restored["opt_state"], is_leaf=_is_quantized)
        assert any(_is_quantized(q) for q in quantized)
        q = next(q for q in quantized if _is_quantized(q))
        assert q.codes.dtype == np.uint8 and np.any(np.asarray(q.codes) != 0)
    if case == "bf16":
        dtypes = {str(x.dtype) for x in jax.tree.leaves(restored["opt_state"])}
        assert "bfloat16" in dtypes


def test_dynamic_loss_scale_state_changed_before_checkpoint():
    """The loss-scale case checkpoints a scale that has both halved (step 2) and grown."""
    import rmsprop_jax as rj

    init, step = worker.make_case("dynamic_loss_scale")
    p = worker.init_params()
    s = init(p)
    _, s_mid = worker.run(p, s, 0, SPLIT, step)
    # steps 0, 1 finite: 2**12 -> 2**13; step 2 non-finite: 2**12; step 3 finite (counter 1).
    assert float(rj.loss_scale(s_mid)) == 2.0**12
    assert int(s_mid.counter) == 1


def _read_until(proc, prefix, deadline):
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"worker never printed {prefix!r}; output: {''.join(lines)}")


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """A worker checkpointing every 5 steps is SIGKILLed after its step-10 checkpoint.

    Resuming from its newest checkpoint, here and in a fresh worker process,
    reaches the uninterrupted run's params and state bit for bit.
    """
    total, every, kill_after = 25, 5, 10
    ckpt_dir = tmp_path / "ckpts"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        str(TESTS / "_orbax_crash_worker.py"),
        str(ckpt_dir),
        str(total),
        str(every),
    ]
    proc = subprocess.Popen(
        cmd + ["0.05"],  # 50 ms per step: the kill lands mid-run
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out = _read_until(proc, f"saved {kill_after}", time.monotonic() + 40)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not any(line.startswith("finished") for line in out)

    init, step = worker.make_case(worker.CRASH_CASE)
    params0 = worker.init_params()
    state0 = init(params0)
    full = dict(zip(("params", "opt_state"), worker.run(params0, state0, 0, total, step)))
    abstract = jax.eval_shape(lambda: full)

    # Resume in this process from the newest checkpoint the killed worker left.
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        latest = mngr.latest_step()
        assert latest is not None and kill_after <= latest < total, latest
        restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
    res = worker.run(restored["params"], restored["opt_state"], latest, total, step)
    _assert_identical(dict(zip(("params", "opt_state"), res)), full)

    # Resume in a fresh process, which finishes and writes the final checkpoint.
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"started {latest}" in done.stdout.splitlines(), done.stdout
    assert "finished" in done.stdout
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        assert mngr.latest_step() == total
        final = mngr.restore(total, args=ocp.args.StandardRestore(abstract))
    _assert_identical(final, full)


# -- a checkpoint restored without a target is refused, not misread ---------------------------

P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}


def test_orbax_checkpoint_restored_without_target_is_refused(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = rj.rmsprop(0.1, momentum=0.9)
    state = tx.init(P)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(tmp_path / "state")  # no target: dicts and lists
        with pytest.raises(ValueError, match="not built by a transform with these options"):
            tx.update(G, raw, P)
        # Restored into the target it continues as the saved state does.
        restored = checkpointer.restore(tmp_path / "state", tx.init(P))
    jax.tree.map(np.testing.assert_array_equal, tx.update(G, restored, P), tx.update(G, state, P))
    with pytest.raises(ValueError, match="decided by: momentum"):
        rj.rmsprop(0.1).update(G, restored, P)  # a checkpoint of another config
