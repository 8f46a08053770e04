"""End-to-end demo: train a small MLP on scikit-learn's digits with RMSprop.

Run it with ``python -m rmsprop_jax demo`` (see ``--help`` for the flags) or
call :func:`train` directly.  The model is a two-layer perceptron written in
plain ``jax.numpy`` (64 -> 128 -> 10, ReLU, He initialisation, softmax
cross-entropy), trained with :func:`rmsprop_jax.rmsprop` on minibatches.
After every epoch it prints the mean training loss and the test accuracy,
and at the end it writes a PNG of both curves.

``--devices N`` trains data-parallel on ``N`` devices (``jax.jit`` with
``NamedSharding``: each batch split over the devices, parameters and
optimizer state replicated, the gradient all-reduced by XLA). On a CPU-only
machine the ``N`` devices are simulated
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX
starts; if JAX had already started, the demo reruns itself in a fresh
process). The result equals the single-device run up to float32 rounding.

The demo needs scikit-learn (for the bundled digits data, no download),
matplotlib and tqdm.  They are imported only when the demo runs, so
``import rmsprop_jax`` does not need them; install them with
``pip install 'rmsprop_jax[demo]'``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_OUTPUT",
    "DemoDevicesError",
    "MissingDemoDependencyError",
    "add_arguments",
    "main",
    "run",
    "train",
]

DEFAULT_EPOCHS = 20
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 32
DEFAULT_OUTPUT = "rmsprop_demo_loss.png"
HIDDEN_UNITS = 128
TEST_FRACTION = 0.25

_INSTALL_HINT = "pip install 'rmsprop_jax[demo]'"


class MissingDemoDependencyError(ImportError):
    """Raised when scikit-learn, matplotlib or tqdm is not installed."""


class DemoDevicesError(RuntimeError):
    """Raised when ``devices`` asks for more devices than JAX has (and can no longer simulate)."""


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume started
        return True


def _data_parallel_devices(count: int) -> list:
    """``count`` devices for the data-parallel demo, simulating CPU devices when JAX has not started.

    XLA reads ``XLA_FLAGS`` once, when JAX's CPU backend starts (the first
    ``jax.devices()`` or computation, not ``import jax``), so the flag is
    added to the environment here when that has not happened yet.
    """
    if not _backends_initialized():
        flags = os.environ.get("XLA_FLAGS", "")
        current = re.search(rf"{_DEVICE_COUNT_FLAG}=(\d+)", flags)
        if current is None or int(current.group(1)) < count:
            flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", flags).strip()
            os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()
    devices = jax.devices()
    if len(devices) < count:
        cpus = jax.devices("cpu")
        if len(cpus) < count:
            have = f"{len(devices)} {devices[0].platform} device(s)"
            if devices[0].platform != "cpu":
                have += f" and {len(cpus)} CPU device(s)"
            raise DemoDevicesError(
                f"devices={count}: JAX has {have}, and it started before the demo could ask "
                "for more; "
                f"run in a fresh process, or set XLA_FLAGS={_DEVICE_COUNT_FLAG}={count} "
                "before JAX starts"
            )
        devices = cpus
    return devices[:count]


def _require(module: str, package: str) -> Any:
    """Import ``module`` or raise a readable error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDemoDependencyError(
            f"the rmsprop_jax demo needs {package}, which is not installed "
            f"({exc}). Install the demo extras with: {_INSTALL_HINT}"
        ) from exc


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits (8x8, 10 classes), standardised, split 75/25 (stratified) by ``seed``.

    The scaler is fitted on the training part only.  Returns
    ``(x_train, y_train, x_test, y_test)`` as float32 / int32 numpy arrays.
    """
    datasets = _require("sklearn.datasets", "scikit-learn")
    model_selection = _require("sklearn.model_selection", "scikit-learn")
    preprocessing = _require("sklearn.preprocessing", "scikit-learn")

    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    scaler = preprocessing.StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train).astype(np.float32)
    x_test = scaler.transform(x_test).astype(np.float32)
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


# --------------------------------------------------------------------------
# Model (plain jax.numpy)
# --------------------------------------------------------------------------


def init_params(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, dict[str, jax.Array]]:
    """He-normal weights, zero biases, for a ReLU MLP with layer ``sizes``."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        std = np.sqrt(2.0 / fan_in)
        params[f"layer{i}"] = {
            "w": std * jax.random.normal(k, (fan_in, fan_out), jnp.float32),
            "b": jnp.zeros((fan_out,), jnp.float32),
        }
    return params


def forward(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU on every layer but the last."""
    n_layers = len(params)
    for i in range(n_layers):
        layer = params[f"layer{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < n_layers - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    log_probs = jax.nn.log_softmax(forward(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


@jax.jit
def accuracy(params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of ``x`` classified as ``y``."""
    return jnp.mean(jnp.argmax(forward(params, x), axis=-1) == y)


#: ``--accumulator-dtype`` choices -> ``rj.rmsprop(accumulator_dtype=...)`` (float32: the default).
ACCUMULATOR_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "int8": "int8"}


def _make_optimizer(
    learning_rate: float, accumulator_dtype: Any = None
) -> optax.GradientTransformation:
    import rmsprop_jax as rj

    if isinstance(accumulator_dtype, str) and accumulator_dtype in ACCUMULATOR_DTYPES:
        accumulator_dtype = ACCUMULATOR_DTYPES[accumulator_dtype]
    return rj.rmsprop(learning_rate=learning_rate, accumulator_dtype=accumulator_dtype)


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------


def plot_curves(train_loss: list[float], test_accuracy: list[float], output: str) -> str:
    """Write train loss (left axis) and test accuracy (right axis) per epoch."""
    _require("matplotlib", "matplotlib")
    # A bare Figure renders with the Agg canvas and leaves pyplot's global
    # backend (and any interactive session) untouched.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(train_loss) + 1)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax_loss = fig.add_subplot()
    loss_line = ax_loss.plot(epochs, train_loss, "o-", color="tab:blue", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("train loss (cross-entropy)", color="tab:blue")
    ax_loss.tick_params(axis="y", labelcolor="tab:blue")
    ax_loss.grid(True, alpha=0.3)

    ax_acc = ax_loss.twinx()
    acc_line = ax_acc.plot(
        epochs, 100.0 * np.asarray(test_accuracy), "s--", color="tab:orange", label="test accuracy"
    )
    ax_acc.set_ylabel("test accuracy (%)", color="tab:orange")
    ax_acc.tick_params(axis="y", labelcolor="tab:orange")

    lines = loss_line + acc_line
    ax_loss.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    ax_loss.set_title("rmsprop_jax: MLP on sklearn digits")

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(output, format="png", dpi=100)
    return output


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train(
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    devices: int | None = None,
    accumulator_dtype: Any = None,
) -> dict[str, Any]:
    """Train the digits MLP with ``rmsprop_jax.rmsprop`` and plot the curves.

    Long on purpose: it is the demo's script (data, model, one- or multi-device
    step, loop, plot) read top to bottom, as a user would write it.

    Args:
      epochs: passes over the training set (>= 1).
      learning_rate: RMSprop step size (> 0).
      output: where to write the loss-curve PNG.
      seed: seeds the train/test split, the weight init and the shuffling.
      batch_size: minibatch size (>= 1); each epoch reshuffles and drops the
        last incomplete batch, so every step has the same shape and the
        train step compiles once.
      progress: show a tqdm progress bar on stderr.
      devices: train data-parallel on this many devices (None: one device,
        no sharding). The batch is split over them (``batch_size`` must be
        divisible by ``devices``), parameters and optimizer state are
        replicated; CPU devices are simulated when JAX has not started yet.
      accumulator_dtype: storage of the RMSprop state, as
        ``rj.rmsprop(accumulator_dtype=...)``: None or ``"float32"`` (the
        default), ``"bfloat16"``, or ``"int8"`` (8-bit blockwise second
        moment for the 64x128 kernel; see :mod:`rmsprop_jax.quantization`).

    Returns:
      ``{'train_loss': [...], 'test_accuracy': [...], 'png': path}`` with one
      entry per epoch: the mean minibatch loss over the epoch, and the test
      accuracy (a fraction in [0, 1]) after the epoch.
    """
    epochs = int(epochs)
    batch_size = int(batch_size)
    learning_rate = float(learning_rate)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if devices is not None:
        devices = int(devices)
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
    output = os.fspath(output)

    # Fail early, before any training, if an extra is missing.
    tqdm = _require("tqdm", "tqdm").tqdm
    _require("matplotlib", "matplotlib")
    # Before anything starts JAX's backend, so that CPU devices can still be simulated.
    mesh_devices = None if devices is None else _data_parallel_devices(devices)

    x_train, y_train, x_test, y_test = load_data(seed)
    n_train = x_train.shape[0]
    batch_size = min(batch_size, n_train)
    if devices is not None and batch_size % devices:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by devices {devices} "
            "(each device gets an equal share of every batch)"
        )
    steps_per_epoch = n_train // batch_size
    x_test_d, y_test_d = jnp.asarray(x_test), jnp.asarray(y_test)

    key = jax.random.key(seed)
    params = init_params(key, (x_train.shape[1], HIDDEN_UNITS, 10))
    tx = _make_optimizer(learning_rate, accumulator_dtype)
    opt_state = tx.init(params)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Simulated CPU devices are threads of this process: with many multi-device steps in
    # flight, XLA:CPU's thread pool can deadlock in the gradient's all-reduce (seen on 2
    # cores: one device thread never joins). One step in flight at a time there.
    sync_each_step = False
    if devices is None:
        # params and opt_state are consumed by each step, so let XLA reuse them.
        train_step = jax.jit(step, donate_argnums=(0, 1))
    else:
        from rmsprop_jax import sharding

        mesh = sharding.data_mesh(devices=mesh_devices)
        p_shard = sharding.replicated(params, mesh)
        s_shard = sharding.state_sharding(tx, params, p_shard)
        batch = sharding.batch_sharding(mesh)
        params = jax.device_put(params, p_shard)
        opt_state = jax.jit(tx.init, out_shardings=s_shard)(params)
        # The batch arrives split over the devices; XLA all-reduces the gradient.
        train_step = jax.jit(
            step,
            in_shardings=(p_shard, s_shard, batch, batch),
            out_shardings=(p_shard, s_shard, sharding.replicated(0.0, mesh)),
            donate_argnums=(0, 1),
        )
        platform = mesh.devices.flat[0].platform
        sync_each_step = platform == "cpu" and devices > 1
        print(
            f"data-parallel on {devices} {platform} devices: global batch {batch_size} = "
            f"{devices} x {batch_size // devices} per device; params and optimizer state replicated"
        )

    rng = np.random.default_rng(seed)
    train_loss: list[float] = []
    test_accuracy: list[float] = []
    epoch_width = max(2, len(str(epochs)))

    with tqdm(
        total=epochs * steps_per_epoch,
        disable=not progress,
        desc="rmsprop demo",
        unit="batch",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for epoch in range(1, epochs + 1):
            order = rng.permutation(n_train)[: steps_per_epoch * batch_size]
            xb_all = x_train[order].reshape(steps_per_epoch, batch_size, -1)
            yb_all = y_train[order].reshape(steps_per_epoch, batch_size)
            losses = []
            for xb, yb in zip(xb_all, yb_all):
                params, opt_state, loss = train_step(params, opt_state, xb, yb)
                if sync_each_step:
                    loss.block_until_ready()
                losses.append(loss)  # stays on device: no sync per step (but see above)
                bar.update(1)
            epoch_loss = float(jnp.mean(jnp.stack(losses)))
            epoch_acc = float(accuracy(params, x_test_d, y_test_d))
            train_loss.append(epoch_loss)
            test_accuracy.append(epoch_acc)
            bar.set_postfix(loss=f"{epoch_loss:.4f}", acc=f"{100 * epoch_acc:.2f}%")
            tqdm.write(
                f"epoch {epoch:>{epoch_width}d}  loss {epoch_loss:7.4f}  "
                f"test acc {100 * epoch_acc:6.2f}%",
                file=sys.stdout,
            )

    png = plot_curves(train_loss, test_accuracy, output)
    print(f"loss curve written to {png}")
    return {"train_loss": train_loss, "test_accuracy": test_accuracy, "png": png}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's flags to ``parser`` (shared by ``demo.main`` and ``__main__``)."""
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"number of passes over the training set (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        dest="learning_rate",
        type=_positive_float,
        default=DEFAULT_LEARNING_RATE,
        metavar="LR",
        help=f"RMSprop learning rate (default: {DEFAULT_LEARNING_RATE:g})",
    )
    parser.add_argument(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help=f"where to write the loss-curve PNG (default: ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed for the train/test split, weight init and shuffling (default: 0)",
    )
    parser.add_argument(
        "--batch-size",
        dest="batch_size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"minibatch size (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train data-parallel on N devices (CPU devices are simulated when needed); "
        "the batch size must be divisible by N (default: one device)",
    )
    parser.add_argument(
        "--accumulator-dtype",
        dest="accumulator_dtype",
        choices=tuple(ACCUMULATOR_DTYPES),
        default="float32",
        help="storage of the optimizer state: float32, bfloat16, or int8 (8-bit blockwise "
        "second moment, as bitsandbytes; float32 arithmetic in every case; default: float32)",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="do not show the tqdm progress bar",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; returns a process exit status."""
    devices = getattr(args, "devices", None)
    if devices is not None and args.batch_size % devices:
        print(
            f"error: --batch-size {args.batch_size} must be divisible by --devices {devices}",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    try:
        result = train(
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            output=args.output,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=args.progress,
            devices=devices,
            accumulator_dtype=getattr(args, "accumulator_dtype", "float32"),
        )
    except MissingDemoDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DemoDevicesError as exc:
        if os.environ.get(_RERUN_MARKER):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return _rerun_with_devices(args)
    elapsed = time.perf_counter() - start
    n = len(result["train_loss"])
    print(
        f"final test accuracy {100 * result['test_accuracy'][-1]:.2f}% "
        f"after {n} epoch{'s' if n != 1 else ''} in {elapsed:.1f} s"
    )
    return 0


_RERUN_MARKER = "RMSPROP_JAX_DEMO_RERUN"


def _rerun_with_devices(args: argparse.Namespace) -> int:
    """JAX started before ``--devices`` could simulate the devices: rerun the demo in a fresh process."""
    argv = [
        "--epochs", str(args.epochs),
        "--learning-rate", repr(args.learning_rate),
        "--output", os.fspath(args.output),
        "--seed", str(args.seed),
        "--batch-size", str(args.batch_size),
        "--devices", str(args.devices),
        "--accumulator-dtype", getattr(args, "accumulator_dtype", "float32"),
    ]  # fmt: skip
    if not args.progress:
        argv.append("--no-progress")
    env = dict(os.environ)
    env[_RERUN_MARKER] = "1"
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={args.devices}".strip()
    print(f"JAX already started: rerunning the demo in a new process with {args.devices} devices")
    sys.stdout.flush()
    return subprocess.call([sys.executable, "-m", "rmsprop_jax", "demo", *argv], env=env)


DESCRIPTION = (
    "Train a 64-128-10 MLP on scikit-learn's digits data with rmsprop_jax.rmsprop, "
    "print the loss and test accuracy after every epoch, and write a loss-curve PNG. "
    f"Needs the demo extras: {_INSTALL_HINT}"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m rmsprop_jax.cli.demo [flags]`` (or ``python -m rmsprop_jax demo``)."""
    parser = argparse.ArgumentParser(prog="python -m rmsprop_jax demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
