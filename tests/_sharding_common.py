"""Model, data, optimizer and reference run shared by the distributed tests and their subprocesses.

Imported by ``tests/integrations/test_distributed.py`` (one device) and by the scripts it
runs in subprocesses with several (simulated) devices, so every run trains the
same model on the same batches with the same optimizer. Nothing here runs at
import time.
"""

from __future__ import annotations

import os
import re
import socket

import numpy as np

IN, HIDDEN, OUT = 16, 32, 10  # OUT = 10 does not divide by 4 or 8: an indivisible leaf
BATCH = 64  # global batch: 8 per device on 8 devices, 16 on 4
STEPS = 20
BAD_STEP = 7  # one sample of this step is inf: the dynamic loss scale must skip the step
CLIPNORM = 0.05  # below the gradient norms seen in training, so global clipping is active
INITIAL_SCALE = 2.0**8
GROWTH_STEPS = 4

# Data-parallel runs reorder the batch reductions (per-device partial sums,
# then an all-reduce), so results differ from one device in the last bits;
# RMSprop divides by sqrt(v), which keeps relative errors relative. Measured
# over 20 steps on 8 simulated CPU devices (pmap, jit, FSDP, shard_map,
# ZeRO-1) and 2 processes x 2 devices: max |diff| 1.8e-7, at most 2.8e-7 of
# the leaf's largest magnitude. The tolerance leaves a 30x margin.
RTOL = 1e-5
ATOL = 1e-6


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(size=(IN, HIDDEN)) * np.sqrt(2.0 / IN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, OUT)) * np.sqrt(2.0 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(OUT, np.float32),
    }


def batches(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(xs, ys)``: ``STEPS`` batches of ``BATCH`` samples; step ``BAD_STEP`` has an inf."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(STEPS, BATCH, IN)).astype(np.float32)
    ys = rng.integers(0, OUT, size=(STEPS, BATCH)).astype(np.int32)
    xs[BAD_STEP, 3, 0] = np.inf  # lands on one device / one process only
    return xs, ys


def loss_fn(params, x, y, gather=None):
    """Mean softmax cross-entropy of a 16-32-10 ReLU MLP.

    ``gather`` maps each parameter before use (FSDP under explicit sharding
    all-gathers the shards there).
    """
    import jax
    import jax.numpy as jnp

    if gather is not None:
        params = jax.tree.map(gather, params)
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def make_tx(clip: bool = True):
    """``rj.rmsprop`` with every feature that could break under sharding, in a dynamic loss scale."""
    import rmsprop_jax as rj

    return rj.dynamic_loss_scale(
        rj.rmsprop(
            learning_rate=0.01,
            momentum=0.9,
            centered=True,
            weight_decay=0.01,
            global_clipnorm=CLIPNORM if clip else None,
            use_ema=True,
            ema_momentum=0.9,
            gradient_accumulation_steps=2,
        ),
        initial_scale=INITIAL_SCALE,
        dynamic_growth_steps=GROWTH_STEPS,
    )


def make_step(tx, axis_name=None, gather=None):
    """One training step ``(params, state, x, y) -> (params, state, loss)``.

    With ``axis_name`` (inside ``pmap`` / ``shard_map``) the gradients and the
    loss are averaged over that axis with ``lax.pmean`` before the optimizer,
    so the optimizer sees the full-batch gradient on every device.
    """
    import jax
    import optax

    import rmsprop_jax as rj

    def step(params, state, x, y):
        scale = rj.loss_scale(state)
        scaled_loss, grads = jax.value_and_grad(lambda p: loss_fn(p, x, y, gather) * scale)(params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            scaled_loss = jax.lax.pmean(scaled_loss, axis_name)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, scaled_loss / scale

    return step


def summary(params, state) -> dict[str, np.ndarray]:
    """Flat dict of numpy arrays: final params, EMA params and loss scale (host copies)."""
    import rmsprop_jax as rj

    def host(a):
        if not getattr(a, "is_fully_addressable", True):  # multi-process: a collective, all call it
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    out = {f"params/{k}": host(v) for k, v in params.items()}
    out.update({f"ema/{k}": host(v) for k, v in rj.ema_params(state).items()})
    out["loss_scale"] = host(rj.loss_scale(state))
    return out


def reference_run(clip: bool = True) -> dict[str, np.ndarray]:
    """The single-device run on the full batch: the result every parallel run must equal."""
    import jax

    tx = make_tx(clip)
    step = jax.jit(make_step(tx))
    params = jax.tree.map(jax.numpy.asarray, init_params())
    state = tx.init(params)
    xs, ys = batches()
    for x, y in zip(xs, ys):
        params, state, _ = step(params, state, x, y)
    return summary(params, state)


def compare(got: dict, want: dict) -> dict[str, float]:
    """Worst absolute and relative (to the leaf's largest magnitude) difference over all entries."""
    worst_abs = worst_rel = 0.0
    for key, ref in want.items():
        diff = float(np.max(np.abs(np.asarray(got[key], np.float64) - np.asarray(ref, np.float64))))
        scale = float(np.max(np.abs(ref))) or 1.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale)
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for key, ref in want.items():
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(ref), rtol=RTOL, atol=ATOL, err_msg=f"{what}: {key}"
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Simulated CPU devices are threads of one process. On a 2-core machine also running the other
# pytest worker, one device's thread can start a collective more than XLA:CPU's default 40 s
# after the others, and XLA then aborts the process (seen once in CI: "Expected 8 threads to join
# the rendezvous, but only 7 of them arrived on time"). Slowness, not a wrong result: wait longer.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=900"


def with_host_devices(count: int, env: dict | None = None) -> dict:
    """A copy of ``env`` (default os.environ) whose XLA_FLAGS simulate ``count`` CPU devices."""
    env = dict(os.environ if env is None else env)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (
        f"{flags.strip()} --xla_force_host_platform_device_count={count} {PATIENT_COLLECTIVES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env
