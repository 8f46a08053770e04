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

import inspect
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax
from _jit import CountingJit

from rmsprop_jax.keras_optimizer import RMSprop

RTOL, ATOL = 1e-5, 1e-6
# The callbacks, checkpoints, float8 and learning-rate forms below: measured bit-identical to
# keras.optimizers.RMSprop (plain options: no weight-decay or loss-scale rounding order).
SEAM_RTOL = 1e-6

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


def _assert_weights_close(ours, theirs, rtol=RTOL, atol=ATOL):
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fit_matches_keras_rmsprop(config):
    ours, our_loss = _fit(RMSprop(**config))
    theirs, their_loss = _fit(keras.optimizers.RMSprop(**config))
    _assert_weights_close(ours.get_weights(), theirs.get_weights())
    np.testing.assert_allclose(our_loss, their_loss, rtol=RTOL)
    assert int(np.asarray(ours.optimizer.iterations)) == int(
        np.asarray(theirs.optimizer.iterations)
    )
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


# -- the seams around fit: callbacks, learning-rate changes, attributes, saving -----------------


def _fit_both(config, callbacks=list, epochs=3, **fit_kwargs):
    """fit with ours and with keras.optimizers.RMSprop (fresh callbacks each): weights, losses."""
    results = []
    for cls in (RMSprop, keras.optimizers.RMSprop):
        x, y = _data()
        model = _model(_init_weights())
        model.compile(optimizer=cls(**config), loss="mse")
        history = model.fit(
            x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
            callbacks=callbacks(), **fit_kwargs,
        )  # fmt: skip
        results.append((model, history.history))
    (ours, our_history), (theirs, their_history) = results
    _assert_weights_close(ours.get_weights(), theirs.get_weights(), SEAM_RTOL, 0)
    np.testing.assert_allclose(our_history["loss"], their_history["loss"], rtol=SEAM_RTOL)
    return ours, our_history, theirs, their_history


def test_fit_with_learning_rate_scheduler_matches_keras():
    halve = lambda: [keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)]
    ours, history, _, their_history = _fit_both({"learning_rate": 0.02, "momentum": 0.5}, halve)
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.005, 0.0025], rtol=1e-7)
    np.testing.assert_allclose(history["learning_rate"], their_history["learning_rate"])
    assert float(np.asarray(ours.optimizer.learning_rate)) == pytest.approx(0.0025)


def test_fit_with_reduce_lr_on_plateau_matches_keras():
    def callbacks():  # min_delta so large that every epoch is a plateau: the rate is cut each time
        return [keras.callbacks.ReduceLROnPlateau("loss", factor=0.3, patience=0, min_delta=1e9)]

    _, history, _, their_history = _fit_both({"learning_rate": 0.02}, callbacks, epochs=4)
    assert history["learning_rate"][-1] < history["learning_rate"][0]
    np.testing.assert_allclose(history["learning_rate"], their_history["learning_rate"])


def test_fit_with_swap_ema_weights_matches_keras():
    x, y = _data()
    config = {"learning_rate": 0.02, "use_ema": True, "ema_momentum": 0.8}
    swap = lambda: [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)]
    _, history, _, their_history = _fit_both(config, swap, validation_data=(x[:16], y[:16]))
    np.testing.assert_allclose(history["val_loss"], their_history["val_loss"], rtol=RTOL)


def test_fit_with_model_checkpoint_and_reload_matches_keras(tmp_path):
    config = {"learning_rate": 0.02, "momentum": 0.9, "gradient_accumulation_steps": 3}
    finals = []
    for cls in (RMSprop, keras.optimizers.RMSprop):
        path = os.fspath(tmp_path / f"{cls.__module__}.keras")
        model = _model(_init_weights())
        model.compile(optimizer=cls(**config), loss="mse")
        x, y = _data()
        checkpoint = keras.callbacks.ModelCheckpoint(path)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[checkpoint])
        reloaded = keras.models.load_model(path)
        assert type(reloaded.optimizer) is cls
        reloaded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        finals.append(reloaded.get_weights())
    _assert_weights_close(*finals, SEAM_RTOL, 0)


def test_fit_with_backup_and_restore_matches_keras(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    config = {"learning_rate": 0.02, "momentum": 0.5, "use_ema": True}
    finals = []
    for cls in (RMSprop, keras.optimizers.RMSprop):
        backup = os.fspath(tmp_path / cls.__module__)
        x, y = _data()
        model = _model(_init_weights())
        model.compile(optimizer=cls(**config), loss="mse")
        restore = keras.callbacks.BackupAndRestore(backup)
        with pytest.raises(RuntimeError, match="interrupted"):
            model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                      callbacks=[restore, Interrupt()])  # fmt: skip
        model = _model(_init_weights())  # a new process would start from scratch
        model.compile(optimizer=cls(**config), loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                            callbacks=[keras.callbacks.BackupAndRestore(backup)])  # fmt: skip
        assert len(history.history["loss"]) == 2  # resumed after epoch 2
        finals.append(model.get_weights())
    _assert_weights_close(*finals, SEAM_RTOL, 0)


def test_learning_rate_assignment_is_data_not_a_recompilation():
    opt = RMSprop(learning_rate=0.1, momentum=0.5)
    variables = [keras.Variable(np.ones(3, "float32"))]
    opt.build(variables)
    step = CountingJit(opt.stateless_apply)
    grads = [np.ones(3, "float32")]
    values = [v.value for v in variables]
    moved = []
    for lr in (0.1, 1e-4, 0.5):
        opt.learning_rate = lr  # Keras' setter: LearningRateScheduler and ReduceLROnPlateau's path
        new_values, _ = step([v.value for v in opt.variables], grads, values)
        moved.append(float(1 - new_values[0][0]))
    assert step.traces == 1
    np.testing.assert_allclose(np.array(moved) / moved[0], [1, 1e-3, 5], rtol=1e-3)


def test_learning_rate_forms_match_keras():
    import optax

    decay = {"decay_steps": 4, "decay_rate": 0.5}
    exponential = keras.optimizers.schedules.ExponentialDecay(0.05, **decay)
    ours, _ = _fit(RMSprop(learning_rate=optax.exponential_decay(0.05, 4, 0.5)), epochs=2)
    theirs, _ = _fit(keras.optimizers.RMSprop(learning_rate=exponential), epochs=2)
    _assert_weights_close(ours.get_weights(), theirs.get_weights(), SEAM_RTOL, 0)
    # Readable like Keras' (an optax schedule evaluated at iterations), not saveable.
    assert float(np.asarray(ours.optimizer.learning_rate)) == pytest.approx(
        float(np.asarray(theirs.optimizer.learning_rate)), rel=1e-6
    )
    with pytest.raises(TypeError, match=r"optax schedule.*LearningRateSchedule"):
        ours.optimizer.get_config()
    # A schedule or a callable assigned before fit is the one the steps use (as Keras).
    for value in (exponential, lambda: 0.03):
        models = []
        for cls in (RMSprop, keras.optimizers.RMSprop):
            opt = cls(learning_rate=0.5)
            opt.learning_rate = value
            models.append(_fit(opt, epochs=1)[0])
        _assert_weights_close(models[0].get_weights(), models[1].get_weights(), SEAM_RTOL, 0)
    with pytest.raises(ValueError, match="learning_rate must be a finite number >= 0"):
        RMSprop().learning_rate = -1.0
    with pytest.raises(TypeError, match="learning_rate must be a float"):
        RMSprop().learning_rate = "0.1"


def test_attributes_are_keras_rmsprops():
    config = {
        "learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "epsilon": 1e-6, "centered": True,
        "weight_decay": 0.01, "clipnorm": 1.0, "use_ema": True, "ema_momentum": 0.9,
        "ema_overwrite_frequency": 5, "loss_scale_factor": 8.0, "gradient_accumulation_steps": 2,
    }  # fmt: skip
    ours, theirs = RMSprop(**config), keras.optimizers.RMSprop(**config)
    names = [*theirs.get_config(), "rho", "momentum", "epsilon", "centered"]
    names.remove("name")  # auto-numbered: rm_sprop, rm_sprop_1, ...
    for name in names:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (
        ours.get_config().items()
        >= {k: v for k, v in theirs.get_config().items() if k != "name"}.items()
    )
    assert ours.global_clipnorm is None and ours.clipvalue is None
    assert (
        list(inspect.signature(RMSprop).parameters)[:15]
        == list(inspect.signature(keras.optimizers.RMSprop).parameters)[:15]
    )


def test_float8_training_matches_keras():
    """Float8 Dense layers hold scales and amax histories Keras overwrites with their gradient."""
    results = []
    for cls in (RMSprop, keras.optimizers.RMSprop):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(2)])
        model.quantize("float8")
        assert any(getattr(v, "overwrite_with_gradient", False) for v in model.variables)
        model.compile(optimizer=cls(learning_rate=0.01), loss="mse")
        x, y = _data()
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    _assert_weights_close(*results, SEAM_RTOL, 0)


@keras.saving.register_keras_serializable(package="rmsprop_jax_tests")
def exclude_biases(params):
    """Registered, as Keras needs custom functions to be for load_model: True for the biases."""
    return {path: path.endswith("bias") for path in params}


def test_callable_exclusion_saves_and_reloads(tmp_path):
    config = {
        "learning_rate": 0.02,
        "weight_decay": 0.5,
        "exclude_from_weight_decay": exclude_biases,
    }
    full, _ = _fit(RMSprop(**config), epochs=2)
    first, _ = _fit(RMSprop(**config), epochs=1)
    path = os.fspath(tmp_path / "m.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer._rj_exclude is exclude_biases
    resumed, _ = _fit(None, epochs=1, model=loaded)
    for a, b in zip(resumed.get_weights(), full.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Excluded: the biases decay in a run without the exclusion only.
    plain, _ = _fit(RMSprop(learning_rate=0.02, weight_decay=0.5), epochs=2)
    assert not np.allclose(plain.get_weights()[1], full.get_weights()[1])


def test_keras_rmsprop_checkpoint_loads_into_ours():
    """Same variables, same names and order: Keras RMSprop's state continues in ours."""
    config = {"learning_rate": 0.01, "momentum": 0.9, "centered": True}
    config["gradient_accumulation_steps"] = 3  # stops mid-cycle: 8 steps per epoch
    trained, _ = _fit(keras.optimizers.RMSprop(**config), epochs=1)
    weights = [np.array(w) for w in trained.get_weights()]
    state = [np.array(v.value) for v in trained.optimizer.variables]
    continued, _ = _fit(None, epochs=1, model=trained)  # Keras all along

    model = _model(weights)
    model.compile(optimizer=RMSprop(**config), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.set_weights(state)
    ours, _ = _fit(None, epochs=1, model=model)
    _assert_weights_close(ours.get_weights(), continued.get_weights(), SEAM_RTOL, 0)


def test_checkpoint_of_the_previous_layout_loads():
    """rmsprop_jax <= 0.1.0 stored iteration + every leaf of the state (counters included)."""
    config = {"learning_rate": 0.01, "momentum": 0.5, "use_ema": True}
    config["gradient_accumulation_steps"] = 3
    trained, _ = _fit(RMSprop(**config), epochs=1)
    optimizer = trained.optimizer
    legacy = [np.array(optimizer._iterations.value)]
    legacy += [np.array(leaf) for leaf in jax.tree.leaves(optimizer.opt_state)]
    assert len(legacy) != len(optimizer.variables)  # EMA and accumulation counters, no lr

    model = _model([np.array(w) for w in trained.get_weights()])
    model.compile(optimizer=RMSprop(**config), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.load_own_variables({str(i): v for i, v in enumerate(legacy)})
    for ours, theirs in zip(model.optimizer.variables, optimizer.variables, strict=True):
        if ours.name != "learning_rate":  # not stored then: the constructor's value
            np.testing.assert_array_equal(np.asarray(ours.value), np.asarray(theirs.value))
    resumed, _ = _fit(None, epochs=1, model=model)
    continued, _ = _fit(None, epochs=1, model=trained)
    _assert_weights_close(resumed.get_weights(), continued.get_weights(), SEAM_RTOL, 0)
