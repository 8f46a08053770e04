"""Training parity of the optimizer-state storage: float32, bfloat16 and 8-bit state.

``python -m rmsprop_jax parity`` trains two small models three times each,
identically except for ``accumulator_dtype`` (float32 arithmetic every time;
only the storage of the RMSprop state differs), and prints the final loss of
each run, its relative difference to the float32 run, and the state's bytes
per parameter measured from ``jax.tree.leaves(opt_state)``:

* ``digits-mlp``: the demo (``python -m rmsprop_jax demo``): a 64-128-10 MLP
  on scikit-learn's digits, 20 epochs of batch 32, lr 1e-3. Final loss: the
  mean training loss of the last epoch.
* ``char-mlp``: a character-level language model (Bengio et al. 2003: 16
  characters of context, 16-dim embeddings, one tanh layer of 512, softmax)
  on the reStructuredText dataset descriptions shipped inside scikit-learn
  (``sklearn/datasets/descr/*.rst``, 43K characters; no download), 2000
  steps of batch 64, lr 1e-3. Final loss: the mean training loss of the last
  200 steps (and, as a check, the loss on the held-out last 10 % of the text).

In both models the large kernels (>= 4096 elements: 64x128 = 8192 in the
MLP; 256x512 and 512x92 in the character model) get 8-bit state with
``accumulator_dtype="int8"``; biases, the embedding table (92x16) and the
digits output layer (128x10) keep float32 state, as bitsandbytes does.

Exit status 1 when a run's final loss differs from the float32 run's by more
than ``--tolerance`` (default 3 %).

Needs scikit-learn (and, for the digits task, the demo extras matplotlib and tqdm).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import io
import math
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "DTYPES",
    "TASKS",
    "add_arguments",
    "char_text",
    "main",
    "run_parity",
    "train_char_mlp",
    "train_digits_mlp",
]

#: Storage dtypes compared, in the order printed (float32 first: the reference).
DTYPES = ("float32", "bfloat16", "int8")
TASKS = ("digits-mlp", "char-mlp")
DEFAULT_TOLERANCE = 0.03

DESCRIPTION = (
    "Train the demo MLP on digits and a character-level MLP on the text shipped with "
    "scikit-learn, each with float32, bfloat16 and int8 (8-bit blockwise) optimizer state, "
    "and print the final losses, their relative difference to float32 state and the "
    "state's bytes per parameter."
)


def _accumulator(name: str) -> Any:
    return {"float32": None, "bfloat16": jnp.bfloat16, "int8": "int8"}[name]


def _state_bytes(tx: optax.GradientTransformation, params: Any) -> float:
    """Bytes per parameter of ``tx``'s state, from the shapes of ``jax.tree.leaves(state)``."""
    from rmsprop_jax import quantization

    return quantization.state_bytes_per_param(jax.eval_shape(tx.init, params), params)


# --------------------------------------------------------------------------
# Task 1: the demo
# --------------------------------------------------------------------------


def train_digits_mlp(accumulator_dtype: str, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """The demo (``rmsprop_jax.cli.demo.train``) with the given state storage; its output is silenced."""
    from rmsprop_jax.cli import demo

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        result = demo.train(
            epochs=epochs,
            seed=seed,
            progress=False,
            output=os.path.join(tmp, "loss.png"),
            accumulator_dtype=accumulator_dtype,
        )
    params = demo.init_params(jax.random.key(seed), (64, demo.HIDDEN_UNITS, 10))
    tx = demo._make_optimizer(demo.DEFAULT_LEARNING_RATE, accumulator_dtype)
    return {
        "final_loss": result["train_loss"][-1],
        "check": f"test acc {100 * result['test_accuracy'][-1]:.2f}%",
        "state_bytes_per_param": _state_bytes(tx, params),
    }


# --------------------------------------------------------------------------
# Task 2: a character-level MLP language model on text shipped with sklearn
# --------------------------------------------------------------------------

CONTEXT = 16
EMBEDDING = 16
HIDDEN = 512


def char_text() -> str:
    """The dataset descriptions bundled with scikit-learn, concatenated in file-name order."""
    try:
        folder = importlib.resources.files("sklearn.datasets").joinpath("descr")
    except ModuleNotFoundError as exc:
        raise ImportError(
            "the char-mlp parity task needs scikit-learn (pip install scikit-learn)"
        ) from exc
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "".join(folder.joinpath(name).read_text(encoding="utf-8") for name in names)


def _char_init(key: jax.Array, vocab: int) -> dict[str, jax.Array]:
    k_embed, k_hidden, k_out = jax.random.split(key, 3)
    fan_in = CONTEXT * EMBEDDING
    return {
        "embed": jax.random.normal(k_embed, (vocab, EMBEDDING), jnp.float32),
        "w1": jax.random.normal(k_hidden, (fan_in, HIDDEN), jnp.float32) / math.sqrt(fan_in),
        "b1": jnp.zeros((HIDDEN,), jnp.float32),
        "w2": jax.random.normal(k_out, (HIDDEN, vocab), jnp.float32) / math.sqrt(HIDDEN),
        "b2": jnp.zeros((vocab,), jnp.float32),
    }


def _char_loss(params: dict[str, jax.Array], context: jax.Array, target: jax.Array) -> jax.Array:
    x = params["embed"][context].reshape(context.shape[0], -1)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    log_probs = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
    return -jnp.mean(jnp.take_along_axis(log_probs, target[:, None], axis=1))


def train_char_mlp(
    accumulator_dtype: str,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the character MLP; the batches and the init depend on ``seed`` only."""
    import rmsprop_jax as rj

    text = char_text()
    vocab = sorted(set(text))
    ids = np.asarray([vocab.index(c) for c in text], np.int32)
    split = int(0.9 * len(ids))
    windows = np.lib.stride_tricks.sliding_window_view(ids, CONTEXT + 1)
    train_windows, held_out = windows[: split - CONTEXT], windows[split:]
    rng = np.random.default_rng(seed)
    order = rng.integers(0, len(train_windows), size=(steps, batch_size))

    params = _char_init(jax.random.key(seed), len(vocab))
    tx = rj.rmsprop(learning_rate=learning_rate, accumulator_dtype=_accumulator(accumulator_dtype))
    opt_state = tx.init(params)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_char_loss)(params, batch[:, :-1], batch[:, -1])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    losses = []
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, train_windows[order[step]])
        losses.append(loss)
    tail = max(1, min(200, steps // 10))
    final = float(jnp.mean(jnp.stack(losses[-tail:])))
    held = jnp.asarray(held_out)
    held_out_loss = float(jax.jit(_char_loss)(params, held[:, :-1], held[:, -1]))
    return {
        "final_loss": final,
        "check": f"held-out loss {held_out_loss:.4f}",
        "held_out_loss": held_out_loss,
        "state_bytes_per_param": _state_bytes(tx, params),
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run_parity(
    tasks: tuple[str, ...] = TASKS,
    dtypes: tuple[str, ...] = DTYPES,
    epochs: int = 20,
    steps: int = 2000,
    seed: int = 0,
    echo: bool = False,
) -> list[dict[str, Any]]:
    """One row per (task, dtype): final loss, relative difference to float32, bytes/param, seconds."""
    # float32 first: it is the reference of the other rows.
    dtypes = ("float32", *(d for d in dtypes if d != "float32"))
    rows = []
    for task in tasks:
        reference = None
        for dtype in dtypes:
            start = time.perf_counter()
            if task == "digits-mlp":
                result = train_digits_mlp(dtype, epochs=epochs, seed=seed)
            elif task == "char-mlp":
                result = train_char_mlp(dtype, steps=steps, seed=seed)
            else:
                raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
            result.update(task=task, dtype=dtype, seconds=time.perf_counter() - start)
            if dtype == "float32":
                reference = result["final_loss"]
            assert reference is not None  # float32 ran first
            result["relative_difference"] = abs(result["final_loss"] - reference) / abs(reference)
            rows.append(result)
            if echo:
                print(_format_row(result), flush=True)
    return rows


_HEADER = (
    f"{'task':<11} {'state':<9} {'bytes/param':>11} {'final loss':>11} "
    f"{'vs float32':>10} {'check':<24} {'time':>6}"
)


def _format_row(row: dict[str, Any]) -> str:
    diff = "-" if row["dtype"] == "float32" else f"{100 * row['relative_difference']:.2f}%"
    return (
        f"{row['task']:<11} {row['dtype']:<9} {row['state_bytes_per_param']:>11.3f} "
        f"{row['final_loss']:>11.5f} {diff:>10} {row['check']:<24} {row['seconds']:>5.1f}s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        help="tasks to train (default: both)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        default=list(DTYPES),
        help="state storage to compare (float32 always runs, as the reference)",
    )
    parser.add_argument("--epochs", type=int, default=20, help="digits-mlp epochs (default: 20)")
    parser.add_argument("--steps", type=int, default=2000, help="char-mlp steps (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both tasks (default: 0)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest relative difference of the final loss to float32 state (default: 0.03)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    print(_HEADER)
    start = time.perf_counter()
    try:
        rows = run_parity(
            tasks=tuple(args.tasks),
            dtypes=tuple(args.dtypes),
            epochs=args.epochs,
            steps=args.steps,
            seed=args.seed,
            echo=True,
        )
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    worst = max(row["relative_difference"] for row in rows)
    verdict = "within" if worst <= args.tolerance else "NOT within"
    print(
        f"largest difference to float32 state: {100 * worst:.2f}% ({verdict} "
        f"{100 * args.tolerance:g}%); {time.perf_counter() - start:.1f} s in all"
    )
    return 0 if worst <= args.tolerance else 1
