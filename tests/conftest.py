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
    "test_sparse_adapters",
    "test_state_machine",
    "test_tensorflow",
}


# Single tests elsewhere that train a task or run a command, and the tests of row-sparse
# gradients at the optax seams (the README's table) in tests/test_sparse.py.
SLOW_TESTS = {
    "test_parity_command_char_task",
    "test_demo_parity_within_three_percent",
    # tests/test_sparse.py: row-sparse gradients at every seam with optax
    "test_optax_apply_updates_scatters_eagerly_and_under_jit",
    "test_optax_apply_updates_with_donation_is_in_place",
    "test_embedding_trained_with_optax_apply_updates_equals_dense_training",
    "test_dense_plus_sparse_checks_the_shape",
    "test_rj_clip_by_global_norm_equals_optax_on_the_dense_gradient",
    "test_global_norm_optax_refuses_rj_counts_values_once",
    "test_apply_if_finite_equals_rmsprop_and_rejects_non_finite_steps",
    "test_masked",
    "test_partition_and_param_groups",
    "test_inject_hyperparams_equals_rmsprop",
    "test_malformed_indexed_slices_is_an_error",
    "test_a_slice_rebuilt_malformed_is_an_error_naming_the_leaf",
    "test_out_of_range_indices_are_dropped_for_every_integer_dtype",
    "test_int64_indices_under_jit_with_x64_are_dropped_beyond_the_table",
    "test_empty_slice_is_a_no_op",
    "test_pad_accepts_an_empty_id_list",
    "test_rmsprop_object_equals_function_on_sparse_gradients",
    "test_value_and_sparse_grad_takes_a_nested_path",
    "test_value_and_sparse_grad_unknown_path_lists_the_leaves",
    "test_value_and_sparse_grad_drops_ids_beyond_the_table",
    "test_deduplicate_equals_numpy",
}

# Single tests in slow modules that are fast (one call each, no peer run): in the fast subset.
FAST_TESTS_BY_MODULE = {
    "test_orbax": {"test_orbax_checkpoint_restored_without_target_is_refused"},
    "test_presets": {"test_inject_hyperparams_presets_under_jit"},
    "test_keras_functional": {
        "test_set_learning_rate_rejects_bad_values",
        "test_copy_of_rmsprop_owns_its_configuration",
    },
    "test_porting": {"test_import_torch_state_with_numeric_keys_keeps_torch_order"},
    "test_flat": {
        "test_contiguous_clipnorm_with_huge_gradients_equals_the_tree_path",
        "test_contiguous_transform_pickles_with_cloudpickle",
    },
}
FAST_TESTS = set().union(*FAST_TESTS_BY_MODULE.values())


def pytest_ignore_collect(collection_path, config):
    """``-m "not slow"`` does not even import the modules that hold only slow tests (their
    peers' imports, TensorFlow's above all, were a fifth of the fast subset's time)."""
    if config.getoption("markexpr", "").replace(" ", "") != "notslow":
        return None
    stem = collection_path.stem
    if (
        collection_path.suffix == ".py"
        and stem in SLOW_MODULES
        and stem not in FAST_TESTS_BY_MODULE
    ):
        return True
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        name = getattr(item, "originalname", "")
        slow_module = item.path.stem in SLOW_MODULES and name not in FAST_TESTS
        if slow_module or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
