"""Keras' own optimizer tests, from the installed keras wheel, against ``keras_optimizer.RMSprop``.

Keras ships its tests in its wheel (``keras/src/optimizers/*_test.py``,
``keras/src/trainers/trainer_test.py``). They run here unchanged, through a
small adapter, in one of two ways:

* **direct** -- the test is about RMSprop (``rmsprop_test.py``, the RMSprop
  cases of ``optimizer_sparse_test.py``): where it builds Keras' RMSprop it
  gets ours, and its own assertions (Keras' golden numbers) decide.
* **differential** -- the test's numbers belong to another optimizer (SGD,
  Adam, ...) or to the base optimizer (``optimizer_test.py``,
  ``loss_scale_optimizer_test.py``, the fit tests of ``trainer_test.py``). It
  runs twice from the same seeds: first with every optimizer it builds
  replaced by ``keras.optimizers.RMSprop`` with the same arguments (those
  RMSprop takes), then by ours. In Keras' run each assertion records its
  arguments and whether it held; in ours, every numeric argument must equal
  Keras' (``rtol=1e-6, atol=1e-7``), every string equal, every dict contain
  Keras' items, and every assertion that held for Keras must hold for ours.

Every test of those modules runs, except the ones in ``NOT_APPLICABLE``,
each with its reason; a test that fails because our behaviour differs from
Keras' is a defect, never an entry there. ``test_every_keras_test_is_run_or_listed``
fails when a Keras release adds a test this file neither runs nor lists.
Reproduce the counts of the README with
``python -m pytest tests/conformance/test_keras_suite.py -q -p no:xdist``.
"""

from __future__ import annotations

import importlib
import json
import unittest
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import keras.src.optimizers as keras_optimizers

from rmsprop_jax.keras_optimizer import RMSprop

RTOL, ATOL = 1e-6, 1e-7

# (module, TestCase class, how): which Keras test modules run and in which way.
MODULES = {
    "rmsprop_test": ("keras.src.optimizers.rmsprop_test", "RMSpropTest", "direct"),
    "optimizer_test": ("keras.src.optimizers.optimizer_test", "OptimizerTest", "differential"),
    "loss_scale_optimizer_test": (
        "keras.src.optimizers.loss_scale_optimizer_test",
        "LossScaleOptimizerTest",
        "differential",
    ),
    "optimizer_sparse_test": (
        "keras.src.optimizers.optimizer_sparse_test",
        "OptimizerSparseTest",
        "direct",
    ),
    "trainer_test": ("keras.src.trainers.trainer_test", "TestTrainer", "differential"),
}

# Tests of those modules that do not apply, each with its reason.
NOT_APPLICABLE = {
    "optimizer_test::test_get_method": "Keras' registry: optimizers.get('sgd') is an SGD",
    "optimizer_test::test_tf_checkpointing": "TensorFlow backend only (Keras skips it on JAX)",
    "optimizer_test::test_mixed_with_tf_variables": "TensorFlow backend only (Keras skips it)",
    "optimizer_sparse_test::test_sparse_gradients_rmsprop": (
        "patches the private _apply_weight_decay and checks which Keras method writes the "
        "variable (a sparse assign); our step writes the same numbers (sparse_correctness) "
        "with a dense assign"
    ),
    **{
        f"trainer_test::test_fit_with_data_adapter_{variant}": reason
        for reason, variants in {
            "needs the grain data loader (not an optimizer dependency); the same fit runs with "
            "the other data adapters": (
                "grain_dataloader",
                "grain_dataset",
                "grain_dataset_with_len",
            ),
            "Keras skips it on JAX: multiprocessing not supported with the JAX backend": (
                "py_dataset_multiprocessing",
                "py_dataset_multiprocessing_cw",
                "py_dataset_multiprocessing_infinite",
            ),
        }.items()
        for variant in variants
    },
}
NOT_APPLICABLE.update(
    {
        f"loss_scale_optimizer_test::{name}": (
            "Keras skips it on JAX: LossScaleOptimizer must use stateless_apply with JAX"
        )
        for name in (
            "test_apply_with_no_vars",
            *(
                f"test_{test}_stateful"
                for test in (
                    "downscaling",
                    "finite_step",
                    "finite_step_with_inner_loss_scale",
                    "finite_step_with_overwrite",
                    "infinite_step",
                    "iterations_update",
                    "upscaling",
                )
            ),
        )
    }
)
# optimizer_sparse_test is parametrized over every Keras optimizer: the RMSprop cases apply.
SPARSE_CASES = ("rmsprop", "rmsprop_momentum", "rmsprop_momentum_centered")
# trainer_test is about the trainer: its fit tests exercise the optimizer.
TRAINER_TESTS = ("fit", "on_batch", "loss_scaling", "steps_per_execution_steps_count")

# Arguments of keras.optimizers.RMSprop: what an SGD(...) or Adam(...) call keeps.
RMSPROP_ARGS = set(
    keras.optimizers.RMSprop.__init__.__code__.co_varnames[
        1 : keras.optimizers.RMSprop.__init__.__code__.co_argcount
    ]
)


# -- which optimizer a test gets -------------------------------------------------------------


class _Run:
    """Whose RMSprop the optimizers built now are: "keras" (reference run) or "ours"."""

    who = "ours"
    records: ClassVar[list] = []
    position = 0
    depth = 0


def _rmsprop(**kwargs: Any):
    kwargs = {k: v for k, v in kwargs.items() if k in RMSPROP_ARGS}
    cls = keras.optimizers.RMSprop if _Run.who == "keras" else RMSprop
    return cls(**kwargs)


class _AnyOptimizerMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any):
        if args:  # learning_rate may be positional
            kwargs["learning_rate"] = args[0]
        return _rmsprop(**kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, (keras.optimizers.RMSprop, RMSprop))


class _factory(metaclass=_AnyOptimizerMeta):
    """Stands for SGD, Adam, ...: calling it builds the run's RMSprop, which isinstance() accepts."""


def _get(identifier: Any, **kwargs: Any):
    """Stands for ``keras.optimizers.get``: names and configs give RMSprop."""
    if identifier is None or isinstance(identifier, keras_optimizers.Optimizer):
        return identifier
    if isinstance(identifier, str):
        return _rmsprop()
    if isinstance(identifier, dict):
        return _rmsprop(**identifier.get("config", {}))
    raise ValueError(f"Could not interpret optimizer identifier: {identifier}")


def _is_replaced(value: Any) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, keras_optimizers.Optimizer)
        and not issubclass(value, (keras_optimizers.LossScaleOptimizer, RMSprop))
    )


class _OptimizersModule:
    """``keras.src.optimizers`` as a test module sees it in a differential run."""

    def __getattr__(self, name: str) -> Any:
        if name == "get":
            return _get
        value = getattr(keras_optimizers, name)
        if _is_replaced(value) and value is not keras_optimizers.Optimizer:
            return _factory
        return value


def _patches(module: Any, how: str) -> list:
    """Patches for a run: the test module's globals, and keras.optimizers.get for compile()."""
    if how == "direct":
        return [mock.patch.dict(module.__dict__, {"RMSprop": RMSprop})]
    replaced = {name: _factory for name, value in vars(module).items() if _is_replaced(value)}
    if "optimizers" in vars(module):
        replaced["optimizers"] = _OptimizersModule()
    return [
        mock.patch.dict(module.__dict__, replaced),
        mock.patch.object(keras_optimizers, "get", _get),
    ]


# -- assertions: recorded in Keras' run, compared in ours ------------------------------------

_ASSERTIONS = (
    "assertAllClose",
    "assertNotAllClose",
    "assertAlmostEqual",
    "assertEqual",
    "assertNotEqual",
    "assertLen",
    "assertAllEqual",
    "assertTrue",
    "assertFalse",
    "assertGreater",
    "assertLess",
    "assertIn",
)


def _snapshot(value: Any) -> Any:
    """A copy of an assertion argument, as plain data (arrays, str, dict, list)."""
    if isinstance(value, str):
        if value.startswith("{"):  # a JSON config (run_class_serialization_test)
            try:
                return _snapshot(json.loads(value))
            except ValueError:
                pass
        return value
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    if isinstance(value, (set, frozenset)) or value is None:
        return None  # not compared between runs (attribute names differ by class)
    try:
        array = np.array(getattr(value, "value", value))
    except (TypeError, ValueError):  # an object without an array form
        return None
    return array if array.dtype.kind in "biuf" else None


# Serialized-object keys naming the class: ours is another class than Keras' RMSprop.
_CLASS_IDENTITY = {"module", "class_name", "registered_name"}


def _compare(ours: Any, reference: Any, where: str) -> None:
    if reference is None:
        return
    if isinstance(reference, str):
        assert ours == reference, f"{where}: {ours!r} where Keras has {reference!r}"
    elif isinstance(reference, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours)} where Keras has a dict"
        for key, value in reference.items():
            if key in _CLASS_IDENTITY:
                continue
            assert key in ours, f"{where}: no {key!r} where Keras has {value!r}"
            _compare(ours[key], value, f"{where}[{key!r}]")
    elif isinstance(reference, list):
        assert isinstance(ours, list) and len(ours) == len(reference), (
            f"{where}: {len(ours) if isinstance(ours, list) else ours!r} items where Keras "
            f"has {len(reference)}"
        )
        for i, (a, b) in enumerate(zip(ours, reference)):
            _compare(a, b, f"{where}[{i}]")
    else:
        assert ours is not None and np.shape(ours) == reference.shape, (
            f"{where}: shape {np.shape(ours) if ours is not None else None} where Keras has "
            f"{reference.shape}"
        )
        np.testing.assert_allclose(
            np.asarray(ours, np.float64), reference.astype(np.float64), rtol=RTOL, atol=ATOL,
            err_msg=f"{where}: ours vs keras.optimizers.RMSprop",
        )  # fmt: skip


def _recording(name: str, original: Any) -> Any:
    def assertion(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _Run.who == "direct" or _Run.depth:  # direct mode, or called by another assertion
            return original(self, *args, **kwargs)
        _Run.depth += 1
        try:
            values = [_snapshot(a) for a in args]
            if _Run.who == "keras":
                try:
                    original(self, *args, **kwargs)
                    held = True
                except AssertionError:
                    held = False
                _Run.records.append((name, values, held))
                return None
            where = f"assertion {_Run.position} ({name})"
            assert _Run.position < len(_Run.records), f"{where}: Keras' run did not reach it"
            reference_name, reference_values, held = _Run.records[_Run.position]
            _Run.position += 1
            assert reference_name == name, f"{where}: Keras' run asserted {reference_name} here"
            for i, (ours, reference) in enumerate(zip(values, reference_values)):
                _compare(ours, reference, f"{where}, argument {i}")
            if held:  # what held for Keras' RMSprop holds for ours
                return original(self, *args, **kwargs)
            return None
        finally:
            _Run.depth -= 1

    return assertion


def _adapted(cls: type) -> type:
    return type(
        f"Adapted{cls.__name__}",
        (cls,),
        {name: _recording(name, getattr(cls, name)) for name in _ASSERTIONS},
    )


# -- running one Keras test ------------------------------------------------------------------


def _load(key: str) -> tuple[Any, type, str]:
    module_name, class_name, how = MODULES[key]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name), how


def _keras_tests(key: str) -> list[str]:
    _, cls, _ = _load(key)
    return list(unittest.TestLoader().getTestCaseNames(cls))


def _selected(key: str, name: str) -> bool:
    if key == "optimizer_sparse_test":
        return any(name.endswith(f"_{case}") for case in SPARSE_CASES)
    if key == "trainer_test":
        return any(part in name for part in TRAINER_TESTS)
    return True


def _run_once(cls: type, name: str, call: Any = None) -> None:
    """Runs one test method (setUp, body, cleanups) from fixed seeds; raises what it raised."""
    keras.utils.set_random_seed(20261128)
    case = cls(name)
    if call is not None:  # a parametrized sparse case, called with our class
        setattr(case, name, lambda: call(case))
    result = unittest.TestResult()
    case.run(result)
    if result.skipped:  # not a pass: list it in NOT_APPLICABLE, with the reason
        raise AssertionError(f"Keras skipped {name}: {result.skipped[0][1]}")
    for _, trace in result.errors + result.failures:
        raise AssertionError(trace)


def _sparse_call(name: str, module: Any) -> Any:
    case_name = next(c for c in sorted(SPARSE_CASES, key=len, reverse=True) if name.endswith(c))
    params = next(dict(c) for c in module.TEST_CASES if c["testcase_name"] == case_name)
    params.pop("testcase_name")
    params["optimizer_class"] = RMSprop
    function = getattr(module.OptimizerSparseTest, name).__wrapped__
    return lambda case: function(case, **params)


def _params() -> list:
    params = []
    for key in MODULES:
        for name in _keras_tests(key):
            if _selected(key, name) and f"{key}::{name}" not in NOT_APPLICABLE:
                params.append(pytest.param(key, name, id=f"{key}::{name}"))
    return params


@pytest.mark.parametrize(("key", "name"), _params())
def test_keras_test_passes_with_our_rmsprop(key, name):
    module, cls, how = _load(key)
    call = _sparse_call(name, module) if key == "optimizer_sparse_test" else None
    patches = _patches(module, how)
    for patch in patches:
        patch.start()
    try:
        if how == "direct":
            _Run.who = "direct"
            _run_once(cls, name, call)
            return
        adapted = _adapted(cls)
        _Run.who, _Run.records, _Run.position = "keras", [], 0
        _run_once(adapted, name)
        _Run.who = "ours"
        _run_once(adapted, name)
        assert _Run.position == len(_Run.records), (
            f"our run made {_Run.position} of the {len(_Run.records)} assertions of Keras' run"
        )
    finally:
        _Run.who = "ours"
        for patch in reversed(patches):
            patch.stop()


def test_every_keras_test_is_run_or_listed():
    """A Keras release that adds or renames a test is noticed here."""
    known = {f"{key}::{name}" for key in MODULES for name in _keras_tests(key)}
    assert set(NOT_APPLICABLE) <= known, sorted(set(NOT_APPLICABLE) - known)
    run = {p.id for p in _params()}
    assert run, "no Keras test selected"
    assert len(run) + len(NOT_APPLICABLE) + sum(
        not _selected(*k.split("::")) for k in known
    ) == len(known)


def test_differential_run_detects_a_different_optimizer():
    """The adapter's comparison fails when ours computes other numbers than Keras' RMSprop."""
    _, cls, _ = _load("optimizer_test")
    adapted = _adapted(cls)
    module = importlib.import_module(MODULES["optimizer_test"][0])
    with (
        mock.patch.dict(module.__dict__, {"optimizers": _OptimizersModule()}),
        mock.patch.object(keras_optimizers, "get", _get),
    ):
        _Run.who, _Run.records, _Run.position = "keras", [], 0
        _run_once(adapted, "test_callable_learning_rate")
        _Run.who = "ours"
        other_rho = lambda **kwargs: RMSprop(**{**kwargs, "rho": 0.5})  # Keras' rho is 0.9
        with (
            mock.patch(f"{__name__}._rmsprop", other_rho),
            pytest.raises(AssertionError, match=r"ours vs keras\.optimizers\.RMSprop"),
        ):
            _run_once(adapted, "test_callable_learning_rate")
    _Run.who = "ours"
