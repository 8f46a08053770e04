"""``rj.presets.tf2`` / ``tf1`` against REAL TensorFlow 2.21 (CPU, float32).

Peers (the test extra installs ``tensorflow-cpu==2.21.0`` and ``tf-keras==2.21.0``; this
module imports them plainly, so a missing TensorFlow is a failure, not a skip):

* ``rj.presets.tf2(**cfg)`` vs ``tf_keras.optimizers.legacy.RMSprop(**cfg)`` (TF 2.x
  optimizer_v2, the same argument names): momentum 0 is TF's Python path (epsilon outside
  the square root; sparse: ``rms`` / ``mg`` of ALL rows decay, touched rows get the
  scatter-add), momentum > 0 the fused kernels ``ResourceApply[Centered]RMSProp`` and the
  sparse ``ResourceSparseApply[Centered]RMSProp``. TF2's ``decay`` (inverse-time
  learning-rate decay) in half of the configs; ``epsilon=0`` / ``None`` (both become 1e-7);
  ``clipnorm`` / ``clipvalue`` (``test_tf2_clipping_matches_tensorflow``) on dense gradients
  and on ``IndexedSlices`` without and with duplicated row indices. TF clips the slices as
  given (``tf.clip_by_value`` per raw row, ``tf.clip_by_norm`` over the raw values) and only
  then sums duplicates in the optimizer.
* ``rj.presets.tf1(**cfg)`` vs ``tf.compat.v1.train.RMSPropOptimizer(**cfg)`` (eager,
  ``apply_gradients`` on ``tf.Variable``): always the kernels ``ResourceApply[Centered]RMSProp``
  / ``ResourceSparseApply[Centered]RMSProp``, ``rms`` slot starting at ones.

Sparse means a ``tf.IndexedSlices`` gradient in TF and ``rj.IndexedSlices(indices, values,
dense_shape)`` here, with a duplicated index in every step (TF sums duplicates before its
sparse kernels). Every config has two leaves: ``bias`` (3,) with a dense gradient and
``table`` (5, 3) with a dense or a row-sparse gradient; 8 steps; random gradients (scale
1e-3 .. 1, so that epsilon matters) drawn once per config and fed to both sides.

Configs: ``N_PER_CELL = 3`` random configs (``SEED``) in each of the 16 cells preset x
dense/sparse x momentum 0/>0 x centered, 48 in all: learning rate log-uniform
[1e-3, 1e-1], rho / decay in [0.5, 0.99], momentum 0 or in [0.1, 0.95], epsilon
log-uniform [1e-10, 1e-3]; tf2 ``decay`` 0 or in [0.01, 0.5] (alternating). Plus a few
fixed configs (tf2 epsilon 0 / None, both presets' defaults). Ours is jitted once per config
(a step function, as users write it); TF runs eagerly.

Error measure, asserted after EVERY step and for every element of both leaves:
``|ours - tf| / max(|tf|, |w0|)``, ``w0`` the element's initial value. Initial values have
magnitude in [0.5, 2], so the denominator is ``|tf|`` (plain elementwise relative error)
except for elements that have moved toward or through zero, where the element's initial
magnitude is the absolute floor (the rounding error there is that of the O(|w0|) values
that were added, an elementwise relative error at a zero crossing is meaningless).
Tolerance ``RTOL = 1e-6``. The normwise measure of the rest of the suite,
``max|ours - tf| / max|tf|`` per leaf, is recorded too; both are printed by
``python -m pytest tests/conformance/test_tensorflow.py -n 0 -s`` (xdist workers swallow prints).

Measured on a 2-core CPU (jax 0.10.2, TensorFlow 2.21.0, tf-keras 2.21.0), see README.md's
"Conformance" table for the numbers.

The checks have teeth: ``test_detects_*`` run a wrong convention (epsilon inside the root
on TF2's momentum-free path; lazy instead of all-row decay for TF2 sparse) and assert that
the same measure flags it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import rmsprop_jax as rj

SEED = 2113
N_PER_CELL = 3
STEPS = 8
RTOL = 1e-6
BIAS_SHAPE = (3,)
TABLE_SHAPE = (5, 3)
SPARSE_ROWS = 4  # rows per IndexedSlices gradient, one of them a duplicate

# worst errors seen, per (preset, kind): {"elementwise": ..., "normwise": ...}; printed last
MAX_SEEN: dict[tuple[str, str], dict[str, float]] = {}


def _log_uniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _random_configs():
    rng = np.random.default_rng(SEED)
    params = []
    for preset in ("tf2", "tf1"):
        for sparse in (False, True):
            for with_momentum in (False, True):
                for centered in (False, True):
                    for i in range(N_PER_CELL):
                        cfg = {
                            "learning_rate": _log_uniform(rng, 1e-3, 1e-1),
                            "momentum": float(rng.uniform(0.1, 0.95)) if with_momentum else 0.0,
                            "epsilon": _log_uniform(rng, 1e-10, 1e-3),
                            "centered": centered,
                        }
                        rho = float(rng.uniform(0.5, 0.99))
                        if preset == "tf2":
                            cfg["rho"] = rho
                            # inverse-time lr decay in every other config
                            cfg["decay"] = float(rng.uniform(0.01, 0.5)) if i % 2 == 0 else 0.0
                        else:
                            cfg["decay"] = rho
                        kind = "sparse" if sparse else "dense"
                        data_seed = int(rng.integers(2**31))
                        test_id = (
                            f"{preset}-{kind}-{'mom' if with_momentum else 'nomom'}-"
                            f"{'centered' if centered else 'plain'}-{i}"
                        )
                        params.append(
                            pytest.param(preset, kind, cfg, data_seed, id=test_id),
                        )
    return params


FIXED_CONFIGS = [
    # epsilon 0 / None: both sides use 1e-7
    pytest.param(
        "tf2", "sparse", {"learning_rate": 0.05, "epsilon": 0.0}, 11, id="tf2-eps0-sparse"
    ),
    pytest.param(
        "tf2",
        "dense",
        {"learning_rate": 0.05, "momentum": 0.5, "epsilon": None},
        12,
        id="tf2-epsNone",
    ),
    # TF's own defaults (tf1 has no default learning rate)
    pytest.param("tf2", "dense", {}, 13, id="tf2-defaults"),
    pytest.param("tf1", "sparse", {"learning_rate": 0.01}, 14, id="tf1-defaults-sparse"),
]


def _data(kind: str, seed: int, scale: float | None = None):
    """Initial params (|w| in [0.5, 2], random sign) and STEPS gradients, float32 NumPy.

    The gradients are ``scale`` (default: log-uniform in [1e-3, 1]) times standard normals.
    """
    rng = np.random.default_rng(seed)

    def init(shape):
        magnitude = rng.uniform(0.5, 2.0, shape)
        return (magnitude * rng.choice([-1.0, 1.0], shape)).astype(np.float32)

    params = {"bias": init(BIAS_SHAPE), "table": init(TABLE_SHAPE)}
    drawn_scale = _log_uniform(rng, 1e-3, 1.0)
    scale = drawn_scale if scale is None else scale
    grads = []
    for _ in range(STEPS):
        g = {"bias": (scale * rng.normal(size=BIAS_SHAPE)).astype(np.float32)}
        if kind == "sparse":
            indices = rng.integers(0, TABLE_SHAPE[0], SPARSE_ROWS).astype(np.int64)
            indices[-1] = indices[0]  # a duplicate in every step
            values = scale * rng.normal(size=(SPARSE_ROWS,) + TABLE_SHAPE[1:])
            g["table"] = (indices, values.astype(np.float32))
        elif kind == "sparse-unique":
            indices = rng.choice(TABLE_SHAPE[0], SPARSE_ROWS, replace=False).astype(np.int64)
            values = scale * rng.normal(size=(SPARSE_ROWS,) + TABLE_SHAPE[1:])
            g["table"] = (indices, values.astype(np.float32))
        else:
            g["table"] = (scale * rng.normal(size=TABLE_SHAPE)).astype(np.float32)
        grads.append(g)
    return params, grads


def _tf_optimizer(preset: str, cfg: dict):
    if preset == "tf2":
        return tf_keras.optimizers.legacy.RMSprop(**cfg)
    return tf.compat.v1.train.RMSPropOptimizer(**cfg)


def _rj_preset(preset: str, cfg: dict):
    return {"tf2": rj.presets.tf2, "tf1": rj.presets.tf1}[preset](**cfg)


def run_tensorflow(preset: str, cfg: dict, params0: dict, grads: list) -> list[dict]:
    """The TF optimizer from ``params0`` over ``grads``; the parameters after every step."""
    variables = {name: tf.Variable(value) for name, value in params0.items()}
    opt = _tf_optimizer(preset, cfg)
    trajectory = []
    for g in grads:
        pairs = []
        for name, var in variables.items():
            grad = g[name]
            if isinstance(grad, tuple):
                indices, values = grad
                grad = tf.IndexedSlices(
                    tf.constant(values),
                    tf.constant(indices),
                    tf.constant(params0[name].shape, tf.int64),
                )
            else:
                grad = tf.constant(grad)
            pairs.append((grad, var))
        opt.apply_gradients(pairs)
        trajectory.append({name: var.numpy() for name, var in variables.items()})
    return trajectory


def run_ours(tx, params0: dict, grads: list) -> list[dict]:
    """``tx`` (one jitted step) from ``params0`` over ``grads``; the params after every step."""
    params = {name: jnp.asarray(value) for name, value in params0.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state

    trajectory = []
    for g in grads:
        jgrads = {}
        for name, grad in g.items():
            if isinstance(grad, tuple):
                indices, values = grad
                grad = rj.IndexedSlices(
                    jnp.asarray(indices, jnp.int32), jnp.asarray(values), params0[name].shape
                )
            else:
                grad = jnp.asarray(grad)
            jgrads[name] = grad
        params, state = step(params, state, jgrads)
        trajectory.append({name: np.asarray(value) for name, value in params.items()})
    return trajectory


def compare(ours: list[dict], theirs: list[dict], params0: dict):
    """Worst errors over steps and leaves, and where the elementwise one is."""
    worst = {"elementwise": 0.0, "normwise": 0.0, "where": None}
    for step, (o_step, t_step) in enumerate(zip(ours, theirs)):
        for name in t_step:
            o = o_step[name].astype(np.float64)
            t = t_step[name].astype(np.float64)
            diff = np.abs(o - t)
            rel = diff / np.maximum(np.abs(t), np.abs(params0[name].astype(np.float64)))
            normwise = float(diff.max() / np.abs(t).max())
            worst["normwise"] = max(worst["normwise"], normwise)
            i = np.unravel_index(np.argmax(rel), rel.shape)
            if rel[i] > worst["elementwise"] or worst["where"] is None:
                worst["elementwise"] = max(worst["elementwise"], float(rel[i]))
                worst["where"] = {
                    "step": step + 1,
                    "leaf": name,
                    "index": tuple(int(k) for k in i),
                    "ours": float(o_step[name][i]),
                    "tf": float(t_step[name][i]),
                    "initial": float(params0[name][i]),
                }
    return worst


def _record(preset: str, kind: str, worst: dict) -> None:
    seen = MAX_SEEN.setdefault((preset, kind), {"elementwise": 0.0, "normwise": 0.0})
    for key in ("elementwise", "normwise"):
        seen[key] = max(seen[key], worst[key])


@pytest.mark.parametrize("preset, kind, cfg, data_seed", _random_configs() + FIXED_CONFIGS)
def test_preset_matches_tensorflow(preset, kind, cfg, data_seed):
    params0, grads = _data(kind, data_seed)
    theirs = run_tensorflow(preset, cfg, params0, grads)
    ours = run_ours(_rj_preset(preset, cfg), params0, grads)
    worst = compare(ours, theirs, params0)
    _record(preset, kind, worst)
    assert worst["elementwise"] <= RTOL, (
        f"rj.presets.{preset}({cfg}) vs TensorFlow {tf.__version__}, {kind} gradients: "
        f"relative error {worst['elementwise']:.3g} > {RTOL} at {worst['where']}"
    )


CLIP_CASES = [
    pytest.param(clip, kind, momentum, id=f"{clip}-{kind}-{'mom' if momentum else 'nomom'}")
    for clip in ("clipnorm", "clipvalue")
    for kind in ("dense", "sparse-unique", "sparse")
    for momentum in (0.0, 0.8)
]


@pytest.mark.parametrize("clip, kind, momentum", CLIP_CASES)
def test_tf2_clipping_matches_tensorflow(clip, kind, momentum):
    """``clipnorm`` / ``clipvalue``: TF applies them in ``apply_gradients`` (TF >= 2.4).

    Gradients of scale 1 and thresholds below that, so clipping changes the trajectory
    (asserted: TF with and without clipping differ by more than 1e-3). ``sparse`` has a
    duplicated row index in every step, ``sparse-unique`` none.
    """
    cfg = {"learning_rate": 0.02, "momentum": momentum, "centered": momentum > 0}
    cfg[clip] = 0.3 if clip == "clipnorm" else 0.2
    params0, grads = _data(kind, 31, scale=1.0)
    theirs = run_tensorflow("tf2", cfg, params0, grads)
    unclipped = run_tensorflow("tf2", {k: v for k, v in cfg.items() if k != clip}, params0, grads)
    assert compare(unclipped, theirs, params0)["elementwise"] > 1e-3  # clipping is active
    ours = run_ours(rj.presets.tf2(**cfg), params0, grads)
    worst = compare(ours, theirs, params0)
    _record("tf2", f"{kind} (clipping)", worst)
    assert worst["elementwise"] <= RTOL, (
        f"rj.presets.tf2({cfg}) vs TensorFlow {tf.__version__}, {kind} gradients: "
        f"relative error {worst['elementwise']:.3g} > {RTOL} at {worst['where']}"
    )


def test_first_step_by_hand():
    """One step of each peer against the formula TF documents, to anchor the harness."""
    w0 = np.array([1.0, 2.0], np.float32)
    g = np.array([0.1, 0.2], np.float32)
    params0, grads = {"w": w0}, [{"w": g}]
    # tf1: rms starts at 1: w - lr * g / sqrt(0.9 + 0.1 g^2 + eps)
    tf1 = run_tensorflow("tf1", {"learning_rate": 0.1}, params0, grads)[0]["w"]
    np.testing.assert_allclose(tf1, w0 - 0.1 * g / np.sqrt(0.9 + 0.1 * g * g), rtol=1e-6)
    ours = run_ours(rj.presets.tf1(learning_rate=0.1), params0, grads)[0]["w"]
    np.testing.assert_allclose(ours, tf1, rtol=1e-6)
    # tf2, momentum 0: w - lr * g / (sqrt(0.1 g^2) + 1e-7)
    tf2 = run_tensorflow("tf2", {"learning_rate": 0.1}, params0, grads)[0]["w"]
    np.testing.assert_allclose(tf2, w0 - 0.1 * g / (np.sqrt(0.1 * g * g) + 1e-7), rtol=1e-6)
    ours = run_ours(rj.presets.tf2(learning_rate=0.1), params0, grads)[0]["w"]
    np.testing.assert_allclose(ours, tf2, rtol=1e-6)


def test_detects_epsilon_inside_the_root_on_tf2_plain_path():
    """Keras 3's ``sqrt(v + eps)`` instead of TF2's ``sqrt(v) + eps`` (momentum 0) is flagged."""
    cfg = {"learning_rate": 0.01, "rho": 0.9, "epsilon": 1e-3}
    params0, grads = _data("dense", 21)
    theirs = run_tensorflow("tf2", cfg, params0, grads)
    wrong = rj.rmsprop(learning_rate=0.01, rho=float(np.float32(0.9)), epsilon=1e-3)
    worst = compare(run_ours(wrong, params0, grads), theirs, params0)
    assert worst["elementwise"] > 100 * RTOL, worst
    right = compare(run_ours(rj.presets.tf2(**cfg), params0, grads), theirs, params0)
    assert right["elementwise"] <= RTOL, right


def test_detects_lazy_rows_on_tf2_sparse_plain_path():
    """TF2 (momentum 0) decays ``rms`` of every row; touched-rows-only updates are flagged."""
    cfg = {"learning_rate": 0.01, "rho": 0.9, "epsilon": 1e-7}
    params0, grads = _data("sparse", 22)
    theirs = run_tensorflow("tf2", cfg, params0, grads)
    lazy = rj.rmsprop_update(
        0.01, float(np.float32(0.9)), 1e-7, eps_in_sqrt=False, sparse_mode="lazy"
    )
    worst = compare(run_ours(lazy, params0, grads), theirs, params0)
    assert worst["elementwise"] > 100 * RTOL, worst


def test_print_max_seen():
    """With ``-n 0 -s``: the worst errors per preset and gradient kind (runs last in this module)."""
    for (preset, kind), seen in sorted(MAX_SEEN.items()):
        print(
            f"\n{preset} {kind}: elementwise (floor |w0|) {seen['elementwise']:.3g}, "
            f"normwise {seen['normwise']:.3g}"
        )
