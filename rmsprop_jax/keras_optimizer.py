"""A ``keras.optimizers.Optimizer`` backed by :func:`rmsprop_jax.rmsprop` (Keras 3, JAX backend).

Importing this module imports Keras (with ``KERAS_BACKEND`` defaulting to
``"jax"`` when Keras is not imported yet); ``import rmsprop_jax`` does not.

The optimizer's ``variables`` are Keras' ``iteration`` counter followed by the
leaves of our optax state (``jax.tree.leaves(tx.init(params))``, in that
deterministic order). ``stateless_apply`` -- what ``model.fit`` calls under
``jax.jit`` -- rebuilds the state pytree from those values, runs our pure
``tx.update`` and ``optax.apply_updates``, and returns the new values, so
``model.compile(optimizer=...)``, ``model.fit``, ``model.save`` and
``keras.models.load_model`` work as with any Keras optimizer.

Example:
  >>> import keras, numpy as np
  >>> from rmsprop_jax.keras_optimizer import RMSprop
  >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
  >>> model.compile(optimizer=RMSprop(learning_rate=0.01, momentum=0.9), loss="mse")
  >>> history = model.fit(np.ones((8, 3)), np.zeros((8, 1)), epochs=1, verbose=0)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

if "keras" not in sys.modules:
    # Keras reads its backend once, at first import; this module needs JAX's.
    os.environ.setdefault("KERAS_BACKEND", "jax")
try:
    import keras
except ImportError as error:  # pragma: no cover
    raise ImportError(
        "rmsprop_jax.keras_optimizer needs Keras 3 (pip install keras) on the JAX backend"
    ) from error
if keras.backend.backend() != "jax":
    raise ImportError(
        "rmsprop_jax.keras_optimizer needs Keras on the JAX backend (KERAS_BACKEND=jax), "
        f"got {keras.backend.backend()!r}"
    )

from rmsprop_jax.alias import rmsprop

__all__ = ["RMSprop"]

# rj.rmsprop's arguments (besides learning_rate), with their defaults.
_ARGS = {
    "rho": 0.9,
    "momentum": 0.0,
    "epsilon": 1e-7,
    "centered": False,
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
    "exclude_from_weight_decay": None,
    "nesterov": False,
    "eps_in_sqrt": True,
    "lr_in_momentum": True,
    "initial_accumulator_value": 0.0,
    "bias_correction": False,
    "maximize": False,
    "accumulator_dtype": None,
}


def _dtype_to_config(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return jnp.dtype(dtype).name


def _dtype_from_config(dtype: Any) -> Any:
    if dtype is None or dtype == "int8":
        return dtype
    return jnp.dtype(dtype).type


@keras.saving.register_keras_serializable(package="rmsprop_jax")
class RMSprop(keras.optimizers.Optimizer):
    """``rj.rmsprop(**kwargs)`` as a Keras optimizer (JAX backend).

    Takes every argument of :func:`rmsprop_jax.rmsprop` plus ``name``.
    ``learning_rate`` is a float or a ``keras.optimizers.schedules.
    LearningRateSchedule`` (any ``step -> lr`` callable works, but only those
    two serialize). ``exclude_from_weight_decay`` (regexes) is searched in the
    Keras variable paths (``"sequential/dense/bias"``). With ``use_ema`` the
    weights are replaced by their moving average at the end of ``fit``, as Keras.
    """

    def __init__(self, learning_rate=0.001, name=None, **kwargs):
        unknown = set(kwargs) - set(_ARGS)
        if unknown:
            raise ValueError(f"Argument(s) not recognized: {sorted(unknown)}")
        config = {**_ARGS, **kwargs}
        config["accumulator_dtype"] = _dtype_from_config(config["accumulator_dtype"])
        # Validates everything before any Keras state is made.
        tx = rmsprop(learning_rate, **config)
        # A no-argument callable: Keras creates no learning-rate variable, so
        # ``variables`` is the iteration counter and our state's leaves only.
        super().__init__(
            learning_rate=lambda: self._current_learning_rate(),
            loss_scale_factor=config["loss_scale_factor"],
            name=name,
        )
        self._rj_learning_rate = learning_rate
        self._rj_config = config
        self._rj_tx = tx
        self._rj_treedef = None
        self._rj_keys = None
        self._rj_state_variables = []

    # -- Keras' optimizer protocol -------------------------------------------------

    def _current_learning_rate(self):
        lr = self._rj_learning_rate
        if callable(lr):
            return lr(self._iterations)
        return lr

    def build(self, variables):
        if self.built:
            return
        variables = list(variables)
        super().build(variables)  # records the variables' indices
        paths = [
            getattr(v, "path", None) or getattr(v, "name", str(i)) for i, v in enumerate(variables)
        ]
        if len(set(paths)) != len(paths):
            paths = [f"{i}/{p}" for i, p in enumerate(paths)]
        self._rj_keys = paths
        state = self._rj_tx.init(self._as_tree([v.value for v in variables]))
        leaves, self._rj_treedef = jax.tree_util.tree_flatten(state)
        self._rj_state_variables = []
        for i, leaf in enumerate(leaves):
            leaf = jnp.asarray(leaf)
            # Keras copies the initializer's value, keeping its dtype (bf16, int8, ints).
            self._rj_state_variables.append(
                self.add_variable(
                    shape=leaf.shape,
                    initializer=lambda shape, dtype, leaf=leaf: leaf,
                    dtype=leaf.dtype,
                    name=f"rj_state_{i}",
                )
            )
        self.built = True

    def _as_tree(self, values):
        return dict(zip(self._rj_keys, values))

    def _from_tree(self, tree):
        return [tree[k] for k in self._rj_keys]

    def _state(self, state_values):
        return jax.tree_util.tree_unflatten(self._rj_treedef, list(state_values))

    def _pure_apply(self, optimizer_values, grads, trainable_values):
        iteration, state_values = optimizer_values[0], optimizer_values[1:]
        params = self._as_tree(list(trainable_values))
        grads = self._as_tree([jnp.asarray(g, p.dtype) for g, p in zip(grads, trainable_values)])
        updates, new_state = self._rj_tx.update(grads, self._state(state_values), params)
        new_params = self._from_tree(optax.apply_updates(params, updates))
        new_params = [
            v.constraint(p) if v.constraint is not None else p
            for v, p in zip(self._trainable_variables, new_params)
        ]
        new_params = [
            jnp.asarray(p, jnp.asarray(old).dtype) for p, old in zip(new_params, trainable_values)
        ]
        new_leaves = jax.tree_util.tree_leaves(new_state)
        new_leaves = [
            jnp.asarray(new, jnp.asarray(old).dtype) for new, old in zip(new_leaves, state_values)
        ]
        return new_params, [jnp.asarray(iteration) + 1] + new_leaves

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Our pure update: returns (new trainable values, new optimizer variable values)."""
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, the optimizer must be built: call "
                "`optimizer.build(trainable_variables)` first."
            )
        if len(optimizer_variables) != len(self.variables):
            raise ValueError(
                f"expected {len(self.variables)} optimizer variable values, got "
                f"{len(optimizer_variables)}"
            )
        if len(trainable_variables) != len(self._trainable_variables):
            raise ValueError(
                f"the optimizer was built on {len(self._trainable_variables)} variables, got "
                f"{len(trainable_variables)}"
            )
        optimizer_values = [getattr(v, "value", v) for v in optimizer_variables]
        trainable_values = [getattr(v, "value", v) for v in trainable_variables]
        return self._pure_apply(optimizer_values, list(grads), trainable_values)

    def apply(self, grads, trainable_variables=None):
        """Eager update: assigns the new weights and optimizer state."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built: call `optimizer.build(trainable_variables)` first."
                )
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                self.build(trainable_variables)
            known = [id(v) for v in self._trainable_variables]
            if [id(v) for v in trainable_variables] != known:
                # Reorder to the build order; every built variable needs a gradient.
                position = {id(v): i for i, v in enumerate(trainable_variables)}
                missing = [v.path for v in self._trainable_variables if id(v) not in position]
                if missing or len(position) != len(known):
                    raise ValueError(
                        "rmsprop_jax's Keras RMSprop updates all the variables it was built "
                        f"on together; missing gradients for {missing}"
                    )
                grads = [grads[position[k]] for k in known]
        if any(g is None for g in grads):
            raise ValueError("rmsprop_jax's Keras RMSprop needs a gradient for every variable")
        new_params, new_opt = self.stateless_apply(
            [v.value for v in self.variables],
            grads,
            [v.value for v in self._trainable_variables],
        )
        for variable, value in zip(self._trainable_variables, new_params):
            variable.assign(value)
        for variable, value in zip(self.variables, new_opt):
            variable.assign(value)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self._iterations

    def finalize_variable_values(self, var_list):
        """With ``use_ema``, replaces the weights by their moving average (Keras)."""
        if not (self._rj_config["use_ema"] and self.built):
            return
        from rmsprop_jax.transforms.ema import ema_params

        average = self._from_tree(ema_params(self.opt_state))
        by_id = {id(v): a for v, a in zip(self._trainable_variables, average)}
        for variable in var_list:
            if id(variable) in by_id:
                variable.assign(by_id[id(variable)])

    # -- our state -----------------------------------------------------------------

    @property
    def tx(self) -> optax.GradientTransformationExtraArgs:
        """The optax transformation (``rj.rmsprop(**config)``) this optimizer runs."""
        return self._rj_tx

    @property
    def opt_state(self) -> Any:
        """The current optax state, rebuilt from the optimizer's variables (keyed by variable path)."""
        if not self.built:
            raise ValueError("the optimizer is not built yet")
        return self._state([v.value for v in self._rj_state_variables])

    # -- serialization -------------------------------------------------------------

    def get_config(self):
        lr = self._rj_learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            lr = keras.optimizers.schedules.serialize(lr)
        elif callable(lr):
            lr = keras.saving.serialize_keras_object(lr)
        else:
            lr = float(lr)
        config = dict(self._rj_config)
        config["accumulator_dtype"] = _dtype_to_config(config["accumulator_dtype"])
        exclude = config["exclude_from_weight_decay"]
        if exclude is not None:
            if isinstance(exclude, str):
                exclude = [exclude]
            if not all(isinstance(e, str) for e in exclude):
                raise TypeError(
                    "get_config: exclude_from_weight_decay serializes only as regex strings"
                )
            config["exclude_from_weight_decay"] = list(exclude)
        return {"name": self.name, "learning_rate": lr, **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = keras.saving.deserialize_keras_object(
                config["learning_rate"], custom_objects=custom_objects
            )
        return cls(**config)
