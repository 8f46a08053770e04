"""``python -m rmsprop_jax conformance``: our presets side by side with every installed peer.

For each peer that imports (torch, optax, keras; tensorflow and oneflow when
present), random configurations are run for a number of steps in the peer and
in the matching preset from the same float32 parameters and gradients; the
table reports the worst normwise relative error per step,
``max|ours - peer| / max|peer|`` per leaf. TensorFlow and OneFlow cannot be
installed on every Python; without them their presets are checked against
the reference numbers measured from them (``docs/semantics.md``).
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable

import numpy as np

__all__ = [
    "DESCRIPTION",
    "PEERS",
    "SHAPES",
    "TOLERANCE",
    "add_arguments",
    "format_table",
    "main",
    "run",
]

DESCRIPTION = (__doc__ or "").split("\n\n")[0]

TOLERANCE = 1e-6
SHAPES = ((3,), (2, 2))


def _relative_error(ours, theirs) -> float:
    worst = 0.0
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


def _run_ours(tx, params: list, grads: list) -> list:
    """Per-step params of ``tx`` (jitted) over ``grads``."""
    import jax
    import optax

    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    return out


def _data(rng: np.random.Generator, steps: int):
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _check_torch(rng, configs: int, steps: int) -> float:
    import jax.numpy as jnp
    import torch

    from rmsprop_jax import presets

    worst = 0.0
    for _ in range(configs):
        cfg = dict(
            alpha=float(rng.choice([0.9, 0.99])),
            eps=float(rng.choice([1e-8, 1e-3])),
            weight_decay=float(rng.choice([0.0, 0.01])),
            momentum=float(rng.choice([0.0, 0.9])),
            centered=bool(rng.integers(2)),
            maximize=bool(rng.integers(2)),
        )
        lrs = rng.choice([1e-3, 1e-2], size=steps).astype(np.float32)
        params, grads = _data(rng, steps)
        tensors = [torch.tensor(p, requires_grad=True) for p in params]
        opt = torch.optim.RMSprop(tensors, lr=float(lrs[0]), **cfg)  # type: ignore[arg-type]
        theirs = []
        for k, g in enumerate(grads):
            opt.param_groups[0]["lr"] = float(lrs[k])  # a scheduler's write
            for t, gk in zip(tensors, g):
                t.grad = torch.tensor(gk)
            opt.step()
            theirs.append([t.detach().numpy().copy() for t in tensors])
        tx = presets.torch(lr=lambda count, lrs=lrs: jnp.asarray(lrs)[count], **cfg)
        ours = _run_ours(
            tx, [jnp.asarray(p) for p in params], [[jnp.asarray(x) for x in g] for g in grads]
        )
        worst = max(worst, max(_relative_error(o, t) for o, t in zip(ours, theirs)))
    return worst


def _check_optax(rng, configs: int, steps: int) -> float:
    import jax.numpy as jnp
    import optax

    from rmsprop_jax import presets

    worst = 0.0
    for _ in range(configs):
        cfg = dict(
            learning_rate=float(rng.choice([1e-3, 1e-2])),
            decay=float(rng.choice([0.9, 0.99])),
            eps=float(rng.choice([1e-8, 1e-3])),
            initial_scale=float(rng.choice([0.0, 0.1])),
            eps_in_sqrt=bool(rng.integers(2)),
            centered=bool(rng.integers(2)),
            momentum=[None, 0.9][int(rng.integers(2))],
            bias_correction=bool(rng.integers(2)),
        )
        cfg["nesterov"] = cfg["momentum"] is not None and bool(rng.integers(2))
        if cfg["centered"] and cfg["bias_correction"] and not cfg["initial_scale"]:
            cfg["initial_scale"] = 0.1  # step 1 is 0/0-conditioned there; see the README
        params, grads = _data(rng, steps)
        params = [jnp.asarray(p) for p in params]
        grads = [[jnp.asarray(x) for x in g] for g in grads]
        ours = _run_ours(presets.optax(**cfg), params, grads)
        theirs = _run_ours(optax.rmsprop(**cfg), params, grads)
        worst = max(worst, max(_relative_error(o, t) for o, t in zip(ours, theirs)))
    return worst


def _check_keras(rng, configs: int, steps: int) -> float:
    import jax.numpy as jnp
    import keras

    from rmsprop_jax import presets

    worst = 0.0
    for _ in range(configs):
        cfg = dict(
            learning_rate=float(rng.choice([1e-3, 1e-2])),
            rho=float(rng.choice([0.9, 0.99])),
            momentum=float(rng.choice([0.0, 0.9])),
            epsilon=float(rng.choice([1e-7, 1e-3])),
            centered=bool(rng.integers(2)),
            weight_decay=[None, 0.01][int(rng.integers(2))],
            clipnorm=[None, 1.0][int(rng.integers(2))],
            use_ema=bool(rng.integers(2)),
        )
        params, grads = _data(rng, steps)
        variables = [keras.Variable(p) for p in params]
        opt = keras.optimizers.RMSprop(**cfg)
        theirs = []
        for g in grads:
            opt.apply_gradients(zip([keras.ops.convert_to_tensor(x) for x in g], variables))
            theirs.append([np.asarray(v.value) for v in variables])
        ours = _run_ours(
            presets.keras(**cfg),
            [jnp.asarray(p) for p in params],
            [[jnp.asarray(x) for x in g] for g in grads],
        )
        worst = max(worst, max(_relative_error(o, t) for o, t in zip(ours, theirs)))
    return worst


# Reference trajectories measured from TF 2 / TF 1 (spec sections 2 and 3): lr=0.1, w0=[1, 2].
_SPEC_GRADS = ([0.1, 0.2], [0.3, -0.4], [-0.5, 0.6])
_SPEC_REFERENCE = {
    "tf2": [
        (
            dict(learning_rate=0.1),
            [[0.68377328, 1.6837728], [0.38226226, 1.9694868], [0.65378475, 1.7104231]],
        ),
        (
            dict(learning_rate=0.1, momentum=0.9),
            [[0.68378806, 1.6837763], [0.097687483, 1.6848884], [-0.15828076, 1.4268258]],
        ),
        (
            dict(learning_rate=0.1, decay=0.5),
            [[0.68377328, 1.6837728], [0.48276591, 1.8742489], [0.61852717, 1.744717]],
        ),
    ],
    "tf1": [(dict(learning_rate=0.1), [[0.98946494, 1.9789648]])],
}


def _check_spec(name: str) -> tuple[int, int, float]:
    import jax.numpy as jnp

    from rmsprop_jax import presets

    worst, steps = 0.0, 0
    for cfg, expected in _SPEC_REFERENCE[name]:
        grads = [[jnp.asarray(g, jnp.float32)] for g in _SPEC_GRADS[: len(expected)]]
        ours = _run_ours(getattr(presets, name)(**cfg), [jnp.asarray([1.0, 2.0])], grads)
        worst = max(worst, max(_relative_error(o, [np.asarray(e)]) for o, e in zip(ours, expected)))
        steps = max(steps, len(expected))
    return len(_SPEC_REFERENCE[name]), steps, worst


PEERS: dict[str, tuple[str, Callable]] = {
    "torch": ("torch", _check_torch),
    "optax": ("optax", _check_optax),
    "keras": ("keras", _check_keras),
}


def run(configs: int = 20, steps: int = 8, seed: int = 0) -> list[dict]:
    """Runs every peer; returns one row per peer (name, version, configs, steps, error, verdict)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    rows = []
    for name, (module, check) in PEERS.items():
        try:
            version = importlib.import_module(module).__version__
        except ImportError:
            rows.append(
                dict(
                    peer=name,
                    version="not installed",
                    configs=0,
                    steps=0,
                    error=None,
                    verdict="skipped",
                )
            )
            continue
        error = check(np.random.default_rng(seed), configs, steps)
        rows.append(
            dict(
                peer=name,
                version=version,
                configs=configs,
                steps=steps,
                error=error,
                verdict="PASS" if error <= TOLERANCE else "FAIL",
            )
        )
    for name, module in (("tf2", "tensorflow"), ("tf1", "tensorflow")):
        try:
            version = (
                importlib.import_module(module).__version__ + " (installed; spec numbers used)"
            )
        except ImportError:
            version = "not installed: spec reference numbers"
        count, n_steps, error = _check_spec(name)
        rows.append(
            dict(
                peer=name,
                version=version,
                configs=count,
                steps=n_steps,
                error=error,
                verdict="PASS" if error <= 4e-7 else "FAIL",
            )
        )
    try:
        version = importlib.import_module("oneflow").__version__
    except ImportError:
        version = "not installed"
    rows.append(
        dict(
            peer="oneflow",
            version=version,
            configs=0,
            steps=0,
            error=None,
            verdict="skipped (float64 model of its kernel in tests/conformance/test_presets.py)",
        )
    )
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("peer", "version", "configs", "steps", "max rel. error", "verdict")
    lines = [header] + [
        (
            r["peer"],
            r["version"],
            str(r["configs"]),
            str(r["steps"]),
            "-" if r["error"] is None else f"{r['error']:.2e}",
            r["verdict"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", type=int, default=20, help="random configurations per peer (default 20)"
    )
    parser.add_argument("--steps", type=int, default=8, help="steps per configuration (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def main(args: argparse.Namespace) -> int:
    rows = run(args.configs, args.steps, args.seed)
    print(format_table(rows))
    print(f"\ntolerance: max normwise relative error per step <= {TOLERANCE:g} (float32)")
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0
