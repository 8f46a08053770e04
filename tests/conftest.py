"""Test configuration shared by the whole suite.

Keras 3 reads ``KERAS_BACKEND`` once, when it is first imported; the peer
tests compare against Keras on the JAX backend, so the variable is set here,
before any test module imports keras. An explicit setting in the environment
wins (``setdefault``).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest

# Modules that run peers (Keras' own suites, TensorFlow, torch, optax's suite), subprocesses
# (simulated devices, multi-process, notebooks, the CLI) or property searches: `slow`.
# The rest is the fast subset: python -m pytest -m "not slow" (under a minute on 2 cores).
SLOW_MODULES = {
    "test_bench",
    "test_conformance_cli",
    "test_flat",
    "test_demo",
    "test_distributed",
    "test_flax",
    "test_keras_conformance",
    "test_keras_fit",
    "test_keras_suite",
    "test_notebooks",
    "test_optax_suite",
    "test_keras_functional",
    "test_orbax",
    "test_peers",
    "test_porting",
    "test_presets",
    "test_readme",
    "test_sparse_seams",
    "test_state_machine",
    "test_tensorflow",
}


# Single tests elsewhere that train a task or run a command.
SLOW_TESTS = {"test_parity_command_char_task", "test_demo_parity_within_three_percent"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.stem in SLOW_MODULES or getattr(item, "originalname", "") in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
