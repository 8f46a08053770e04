"""``rmsprop_jax.keras_optimizer.RMSprop`` inside Keras 3's ``model.fit`` (JAX backend).

fit with our optimizer equals fit with ``keras.optimizers.RMSprop`` of the same
config (same initial weights, ``shuffle=False``); ``model.save`` /
``keras.models.load_model`` restore the optimizer variables, and training on
equals the uninterrupted run.

Tolerance, measured after 3 epochs x 8 steps on CPU float32 (jax 0.10.2,
keras 3.15.1), max over the weights: plain and accumulation + clipnorm are
bit-identical to Keras; momentum + centered + weight decay 4.8e-6 relative /
5.4e-7 absolute (Keras decays the weights before its step, we add the decay to
the update: another rounding order); loss scale + global_clipnorm 6.8e-6 /
1.2e-7; EMA with overwrite frequency (finalized at the end of fit) 1.0e-7 /
9.3e-10. The tests assert
``rtol=1e-5, atol=1e-6``. The save / load round trip and resume are exact.
"""

import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax

from rmsprop_jax.keras_optimizer import RMSprop

RTOL, ATOL = 1e-5, 1e-6

CONFIGS = [
    {"learning_rate": 0.01},
    {"learning_rate": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.05, "rho": 0.8},
    {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    {"learning_rate": 0.01, "gradient_accumulation_steps": 2, "momentum": 0.5, "clipnorm": 0.1},
    {"learning_rate": 0.01, "loss_scale_factor": 128.0, "global_clipnorm": 0.1},
]
IDS = ["plain", "momentum_centered_wd", "ema", "accumulation_clipnorm", "loss_scale_global_clip"]


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 2)) + 0.1 * rng.normal(size=(64, 2))).astype("float32")
    return x, y


def _model(weights):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",  # fixed variable paths, hence fixed optimizer variable names
    )
    model.set_weights(weights)
    return model


def _init_weights():
    rng = np.random.default_rng(1)
    return [
        rng.normal(scale=0.5, size=(5, 16)).astype("float32"),
        rng.normal(scale=0.1, size=(16,)).astype("float32"),
        rng.normal(scale=0.5, size=(16, 2)).astype("float32"),
        rng.normal(scale=0.1, size=(2,)).astype("float32"),
    ]


def _fit(optimizer, epochs=3, model=None):
    x, y = _data()
    if model is None:
        model = _model(_init_weights())
        model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]


def _assert_weights_close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fit_matches_keras_rmsprop(config):
    ours, our_loss = _fit(RMSprop(**config))
    theirs, their_loss = _fit(keras.optimizers.RMSprop(**config))
    _assert_weights_close(ours.get_weights(), theirs.get_weights())
    np.testing.assert_allclose(our_loss, their_loss, rtol=RTOL)
    assert int(np.asarray(ours.optimizer.iterations)) == int(np.asarray(theirs.optimizer.iterations))
    # Keras RMSprop's variables: the same names, shapes and dtypes in the same order.
    assert [(v.name, v.shape, v.dtype) for v in ours.optimizer.variables] == [
        (v.name, v.shape, v.dtype) for v in theirs.optimizer.variables
    ]


def test_save_load_round_trip_continues_exactly(tmp_path):
    config = CONFIGS[1]
    full, _ = _fit(RMSprop(**config), epochs=4)

    first, _ = _fit(RMSprop(**config), epochs=2)
    path = os.fspath(tmp_path / "model.keras")
    first.save(path)
    loaded = keras.models.load_model(path)  # registered: no custom_objects needed
    assert isinstance(loaded.optimizer, RMSprop)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    resumed, _ = _fit(None, epochs=2, model=loaded)
    for a, b in zip(resumed.get_weights(), full.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_custom_objects_load(tmp_path):
    model, _ = _fit(RMSprop(learning_rate=0.02, momentum=0.5), epochs=1)
    path = os.fspath(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects={"RMSprop": RMSprop})
    assert loaded.optimizer.get_config()["momentum"] == 0.5


def test_eager_apply_gradients_matches_keras():
    config = CONFIGS[1]
    rng = np.random.default_rng(3)
    init = [rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=(2,)).astype("float32")]
    results = []
    for optimizer in (RMSprop(**config), keras.optimizers.RMSprop(**config)):
        variables = [keras.Variable(w) for w in init]
        for step in range(5):
            grads = [np.asarray(v.value) * 0.5 + step for v in variables]
            if step % 2:
                optimizer.apply_gradients(zip(grads, variables))
            else:
                optimizer.apply(grads, variables)
        results.append([np.asarray(v.value) for v in variables])
        assert int(optimizer.iterations.numpy()) == 5
    _assert_weights_close(*results)


def test_schedule_and_stateless_apply():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=4, decay_rate=0.5)
    ours, _ = _fit(RMSprop(learning_rate=schedule, momentum=0.9), epochs=2)
    theirs, _ = _fit(
        keras.optimizers.RMSprop(
            learning_rate=keras.optimizers.schedules.ExponentialDecay(
                0.05, decay_steps=4, decay_rate=0.5
            ),
            momentum=0.9,
        ),
        epochs=2,
    )
    _assert_weights_close(ours.get_weights(), theirs.get_weights())
    config = ours.optimizer.get_config()
    clone = RMSprop.from_config(config)
    assert clone.get_config() == config


def test_keras_optional_at_import():
    import subprocess
    import sys

    code = "import sys, rmsprop_jax; assert 'keras' not in sys.modules, 'keras imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
