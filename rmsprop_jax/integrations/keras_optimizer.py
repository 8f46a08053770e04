"""A ``keras.optimizers.Optimizer`` backed by :func:`rmsprop_jax.rmsprop` (Keras 3, JAX backend).

Importing this module imports Keras (with ``KERAS_BACKEND`` defaulting to
``"jax"`` when Keras is not imported yet); ``import rmsprop_jax`` does not.

What is Keras' and what is ours. Keras' own ``Optimizer.apply`` runs around
every step, so everything Keras does around the arithmetic behaves as in
Keras because it *is* Keras' code: ``None`` gradients are dropped with Keras'
warning, variables with ``overwrite_with_gradient`` (float8 scales and amax
history) are overwritten, gradients are divided by ``loss_scale_factor``
(which ``LossScaleOptimizer`` switches off), constraints are applied, the
``iterations`` counter and the ``learning_rate`` variable, property and
setter (``LearningRateScheduler``, ``ReduceLROnPlateau``) are Keras', and so
are ``stateless_apply``, ``exclude_from_weight_decay()``,
``finalize_variable_values`` and the save / load of the variables. The step
itself (clipping, weight decay, gradient accumulation, RMSprop, EMA) is one
call of our pure ``rj.rmsprop(lr, ...).update`` over all the variables, with
``lr`` the learning rate Keras gives for this step, so a new learning rate is
a new value, never a new compilation.

The optimizer variables are Keras RMSprop's, with Keras' names and order:
``iteration``, ``learning_rate`` (when it is a float), then per model
variable ``{path}_average`` (EMA), ``{path}_gradient_accumulator``,
``{path}_velocity``, ``{path}_momentum`` and ``{path}_average_gradient`` as
the configuration needs them (``accumulator_dtype="int8"`` stores
``{path}_velocity_codes`` and ``{path}_velocity_scales``). The transforms'
private step counters are derived from ``iteration`` on every step, so they
are not variables, and a checkpoint of ``keras.optimizers.RMSprop`` with the
same options loads into this class (and back).

Example:
  >>> import keras, numpy as np
  >>> from rmsprop_jax.keras_optimizer import RMSprop
  >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="out")], name="net")
  >>> model.compile(optimizer=RMSprop(learning_rate=0.01, momentum=0.9), loss="mse")
  >>> history = model.fit(np.ones((8, 3)), np.zeros((8, 1)), epochs=1, verbose=0)
  >>> [v.name for v in model.optimizer.variables]  # doctest: +NORMALIZE_WHITESPACE
  ['iteration', 'learning_rate', 'net_out_kernel_velocity', 'net_out_bias_velocity',
   'net_out_kernel_momentum', 'net_out_bias_momentum']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

from rmsprop_jax import _checks, _schedules, _trees, transforms
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.integrations.keras_functional import sync_counters
from rmsprop_jax.sparse import IndexedSlices
from rmsprop_jax.transforms.ema import EmaState, overwrites_weights
from rmsprop_jax.transforms.weight_decay import compile_exclusion
from rmsprop_jax.utils import apply_updates

__all__ = ["RMSprop"]

# Slot groups in Keras RMSprop's variable order (base build: EMA averages, gradient
# accumulators; RMSprop build: velocity, momentum, average_gradient), keyed by the field
# of our state that holds them.
_SLOTS = {
    "ema": "average",
    "accumulators": "gradient_accumulator",
    "velocity": "velocity",
    "momentum": "momentum",
    "average_gradient": "average_gradient",
}
_GROUP_ORDER = list(_SLOTS.values())
# Options of rj.rmsprop held as attributes: Keras' base optimizer's, then RMSprop's and ours.
_BASE_OPTIONS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "gradient_accumulation_steps",
)
_RMSPROP_OPTIONS = (
    "rho",
    "momentum",
    "epsilon",
    "centered",
    "nesterov",
    "eps_in_sqrt",
    "lr_in_momentum",
    "initial_accumulator_value",
    "bias_correction",
    "maximize",
    "accumulator_dtype",
)


class _StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A ``step -> lr`` callable (an optax schedule) as a Keras schedule.

    Keras calls a plain callable learning rate with no argument; an optax
    schedule takes the step. Wrapped, it is evaluated at Keras' ``iterations``
    like any ``LearningRateSchedule``. It cannot be saved in a Keras config.
    """

    def __init__(self, schedule: Callable[[Any], Any]):
        self.schedule = schedule

    def __call__(self, step):
        return self.schedule(step)

    def get_config(self):
        raise TypeError(
            f"learning_rate={self.schedule!r} is a step -> lr callable (an optax schedule), "
            "which a Keras config cannot hold: to save the model with its optimizer, use a "
            "keras.optimizers.schedules.LearningRateSchedule (or save weights only)"
        )


def _keras_learning_rate(value: Any) -> Any:
    """A learning rate in the form Keras' base optimizer takes (float, schedule, no-arg callable)."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if callable(value):  # the same rule as rj.rmsprop's learning_rate
        return value if _schedules.takes_no_arguments(value) else _StepSchedule(value)
    if isinstance(value, jax.core.Tracer):
        return value
    return _checks.learning_rate_value(value)


def _dense(gradient: Any) -> Any:
    """Keras' sparse gradients on JAX (``jax.experimental.sparse`` BCOO) as dense arrays.

    Keras' RMSprop treats a sparse gradient as the dense gradient with zeros
    elsewhere (every velocity decays); so does this class. (For lazy row
    updates, where untouched rows keep their slots, use ``rj.IndexedSlices``
    with ``rj.rmsprop``.)
    """
    from jax.experimental import sparse

    return gradient.todense() if isinstance(gradient, sparse.JAXSparse) else gradient


@keras.saving.register_keras_serializable(package="rmsprop_jax")
class RMSprop(keras.optimizers.Optimizer):
    """``rj.rmsprop(...)`` as a Keras optimizer (JAX backend).

    The arguments, defaults and attributes are ``keras.optimizers.RMSprop``'s,
    then the keyword-only knobs of :func:`rmsprop_jax.rmsprop` (PyTorch / TF1 /
    optax conventions, int8 or bfloat16 slots). ``learning_rate`` is a float
    (a Keras variable: assign it, or let a callback do it, without
    recompiling), a ``keras.optimizers.schedules.LearningRateSchedule``, a
    no-argument callable (Keras) or a ``step -> lr`` callable such as an optax
    schedule (evaluated at Keras' ``iterations``; not saveable in a config).
    ``exclude_from_weight_decay`` takes regexes searched in the variable paths
    (``"sequential/dense/bias"``), a callable ``{path: value} -> {path: bool}``
    (True: excluded) or None; the method of the same name (Keras') adds
    exclusions by variable or by name.

    Example:
      >>> import keras
      >>> from rmsprop_jax.keras_optimizer import RMSprop
      >>> opt = RMSprop(learning_rate=0.5)
      >>> w = keras.Variable([1.0, 2.0, 3.0, 4.0])
      >>> _ = opt.apply_gradients([(keras.ops.array([1.0, 6.0, 7.0, 2.0]), w)])
      >>> w.numpy().round(4), int(opt.iterations)
      (array([-0.5811,  0.4189,  1.4189,  2.4189], dtype=float32), 1)
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        *,
        exclude_from_weight_decay: Any = None,
        nesterov: bool = False,
        eps_in_sqrt: bool = True,
        lr_in_momentum: bool = True,
        initial_accumulator_value: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        accumulator_dtype: Any = None,
        **kwargs: Any,
    ):
        if accumulator_dtype is not None and accumulator_dtype != "int8":
            accumulator_dtype = jnp.dtype(accumulator_dtype).type
        arguments = locals()
        base = {key: arguments[key] for key in (*_BASE_OPTIONS, "loss_scale_factor")}
        options = {key: arguments[key] for key in _RMSPROP_OPTIONS}
        learning_rate = _keras_learning_rate(learning_rate)
        # Our checks first (they name the argument and the value), with the full option set.
        rmsprop(
            learning_rate, **base, **options, exclude_from_weight_decay=exclude_from_weight_decay
        )
        super().__init__(learning_rate=learning_rate, **base, name=name, **kwargs)
        for key, value in options.items():  # Keras' attributes (rho, ...) and our knobs
            setattr(self, key, value)
        # Not an attribute of that name: Keras' method exclude_from_weight_decay() would be hidden.
        self._rj_exclude = exclude_from_weight_decay
        self._rj_keys: list[str] = []

    # -- the learning rate: Keras' property, also accepting step -> lr callables ---------------

    @property
    def learning_rate(self):
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        keras.optimizers.Optimizer.learning_rate.fset(self, _keras_learning_rate(value))

    # -- building the variables ----------------------------------------------------------------

    def _transform(self, learning_rate: Any, params: dict | None = None):
        """``rj.rmsprop`` at this step's learning rate, exclusions resolved for ``params``.

        Loss scaling is left to Keras' ``apply`` (it reads ``loss_scale_factor``
        on every step, which ``LossScaleOptimizer`` turns off).
        """
        exclude = None
        if self.weight_decay and params is not None:
            decayed = compile_exclusion(self._rj_exclude)(params)
            exclude = {
                key: not (decayed[key] and self._use_weight_decay(variable))
                for key, variable in zip(self._rj_keys, self._rj_stepped)
            }
        options = {name: getattr(self, name) for name in (*_BASE_OPTIONS, *_RMSPROP_OPTIONS)}
        return rmsprop(learning_rate, **options, exclude_from_weight_decay=exclude)

    def build(self, variables):
        """Creates Keras RMSprop's variables (names and order), holding our state's leaves."""
        if self.built:
            return
        variables = list(variables)
        # Lists of model variables bypass Keras' attribute tracking, which would count them
        # as optimizer variables (Keras' build is decorated to the same effect).
        object.__setattr__(self, "_trainable_variables", variables[:])
        self._trainable_variables_indices = {self._var_key(v): i for i, v in enumerate(variables)}
        # Variables overwritten with their gradient have no slots (Keras).
        stepped = [v for v in variables if not self._overwrite_variable_with_gradient(v)]
        object.__setattr__(self, "_rj_stepped", stepped)
        keys = [getattr(v, "path", None) or str(v.name) for v in self._rj_stepped]
        if len(set(keys)) != len(keys):
            keys = [f"{i}/{key}" for i, key in enumerate(keys)]
        self._rj_keys = keys
        index_of = {key: self._get_variable_index(v) for key, v in zip(keys, self._rj_stepped)}
        params = dict(zip(keys, [v.value for v in self._rj_stepped]))
        state = self._transform(0.0).init(params)
        leaves_with_path, self._rj_treedef = jax.tree_util.tree_flatten_with_path(state)
        leaves = [leaf for _, leaf in leaves_with_path]

        # The step counters are derived from `iteration` (see sync_counters); a probe tells
        # which leaves those are: every other leaf is stored.
        probe = sync_counters(
            jax.tree.map(jnp.zeros_like, state), jnp.int32(2**20), self._accumulation_steps
        )
        derived = [bool(jnp.any(p != 0)) for p in jax.tree.leaves(probe)]
        self._rj_counter_dtypes = {
            i: (leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves) if derived[i]
        }

        slots = []  # (group rank, model-variable index, tree position, name, leaf position)
        extra = []
        for position, (path, _) in enumerate(leaves_with_path):
            if derived[position]:
                continue
            key_at = next(
                (i for i, k in enumerate(path) if getattr(k, "key", None) in index_of), None
            )
            field = _field_before(path, key_at)
            if key_at is None or field not in _SLOTS:  # not a per-variable slot: kept as is
                extra.append((position, "rj_" + _trees.path_name(path).replace("/", "_")))
                continue
            variable_path = path[key_at].key
            suffix = "_".join(str(getattr(k, "name", k)) for k in path[key_at + 1 :])
            group = _SLOTS[field]
            name = variable_path.replace("/", "_") + f"_{group}" + (f"_{suffix}" if suffix else "")
            slots.append((_GROUP_ORDER.index(group), index_of[variable_path], position, name))

        # Keras keeps a gradient accumulator for overwritten variables too (it holds their max).
        if self.gradient_accumulation_steps:
            rank = _GROUP_ORDER.index("gradient_accumulator")
            for v in variables:
                if self._overwrite_variable_with_gradient(v):
                    slots.append((rank, self._get_variable_index(v), None, v))

        self._rj_state_variables = {}  # tree position -> keras variable
        accumulators = [None] * len(variables)
        averages = [None] * len(variables)
        for rank, index, position, name in sorted(slots, key=lambda s: s[:2]):
            if position is None:  # an overwritten variable's accumulator (Keras' own kind)
                accumulators[index] = self.add_variable_from_reference(
                    name, name="gradient_accumulator"
                )
                continue
            variable = self._add_leaf_variable(leaves[position], name)
            self._rj_state_variables[position] = variable
            if _GROUP_ORDER[rank] == "gradient_accumulator" and accumulators[index] is None:
                accumulators[index] = variable
            elif _GROUP_ORDER[rank] == "average":
                averages[index] = variable
        for position, name in extra:
            self._rj_state_variables[position] = self._add_leaf_variable(leaves[position], name)
        # Keras' names for these lists: its gradient-accumulation code for overwritten
        # variables, finalize_variable_values and keras.callbacks.SwapEMAWeights read them.
        if self.gradient_accumulation_steps:
            self._accumulated_gradients = accumulators
        if self.use_ema:
            self._model_variables_moving_average = averages
        self.built = True

    def _add_leaf_variable(self, leaf: Any, name: str):
        leaf = jnp.asarray(leaf)
        return self.add_variable(
            shape=leaf.shape,
            initializer=lambda shape, dtype, leaf=leaf: leaf,  # keeps the value and its dtype
            dtype=leaf.dtype,
            name=name,
        )

    @property
    def _accumulation_steps(self) -> int:
        return self.gradient_accumulation_steps or 1

    def _state(self, calls: Any) -> Any:
        """Our optax state, from the variables' current values and Keras' ``iteration``."""
        leaves = []
        for position in range(self._rj_treedef.num_leaves):
            if position in self._rj_counter_dtypes:
                shape, dtype = self._rj_counter_dtypes[position]
                leaves.append(jnp.zeros(shape, dtype))
            else:
                leaves.append(self._rj_state_variables[position].value)
        state = jax.tree_util.tree_unflatten(self._rj_treedef, leaves)
        return sync_counters(state, calls, self._accumulation_steps)

    # -- the step --------------------------------------------------------------------------------

    def _backend_apply_gradients(self, grads, trainable_variables):
        """One ``rj.rmsprop`` update over all the variables Keras' ``apply`` passes on.

        Keras' ``apply`` has already dropped ``None`` gradients and overwritten
        the ``overwrite_with_gradient`` variables: the dropped ones get ``None``
        here, which leaves them and their slots untouched (as Keras), while the
        EMA still follows them (as Keras).
        """
        by_key = {self._var_key(v): _dense(g) for g, v in zip(grads, trainable_variables)}
        params = {key: v.value for key, v in zip(self._rj_keys, self._rj_stepped)}
        gradients = {}
        for key, v in zip(self._rj_keys, self._rj_stepped):
            g = by_key.get(self._var_key(v))
            gradients[key] = (
                g if g is None or isinstance(g, IndexedSlices) else jnp.asarray(g, v.dtype)
            )
        learning_rate = self.learning_rate
        learning_rate = jnp.asarray(getattr(learning_rate, "value", learning_rate))
        if not jnp.issubdtype(learning_rate.dtype, jnp.floating):
            learning_rate = learning_rate.astype(jnp.float32)
        calls = self._iterations.value
        tx = self._transform(learning_rate, params)
        updates, new_state = tx.update(gradients, self._state(calls), params)
        new_params = apply_updates(params, updates)
        if self.use_ema and self.ema_overwrite_frequency:
            # Keras writes the averages themselves (w + (avg - w) may differ by one rounding).
            overwrite = overwrites_weights(
                calls, self.ema_overwrite_frequency, self._accumulation_steps
            )
            ema = _trees.find_state(new_state, EmaState, "RMSprop").ema
            new_params = jax.tree.map(lambda a, w: jnp.where(overwrite, a, w), ema, new_params)
        for key, v in zip(self._rj_keys, self._rj_stepped):
            self.assign(v, jnp.asarray(new_params[key], v.dtype))
        for position, leaf in enumerate(jax.tree.leaves(new_state)):
            variable = self._rj_state_variables.get(position)
            if variable is not None:
                self.assign(variable, jnp.asarray(leaf, variable.dtype))

    def _clip_gradients(self, grads):
        """Our clipping transform (Keras' formulas) on a list of gradients; None stays None."""
        if self.clipnorm:
            clip = transforms.clip_by_norm(self.clipnorm)
        elif self.global_clipnorm:
            clip = transforms.clip_by_global_norm(self.global_clipnorm)
        elif self.clipvalue:
            clip = transforms.clip_by_value(self.clipvalue)
        else:
            return grads
        grads = [None if g is None else jnp.asarray(_dense(g)) for g in grads]
        clipped, _ = clip.update(grads, clip.init(grads))
        return list(clipped)

    def finalize_variable_values(self, var_list):
        """With ``use_ema``, the weights become their averages (Keras), as copies.

        Keras assigns the average's own buffer, so the weight and its average
        share it, and the next ``fit`` fails to donate it twice
        (``keras.optimizers.RMSprop`` does: train, then train again).
        """
        if not self.use_ema:
            return
        averages = self._model_variables_moving_average
        if len(var_list) != len(averages):
            raise ValueError(
                f"finalize_variable_values: {len(var_list)} variables, but the optimizer was "
                f"built on {len(averages)}; pass the model's trainable variables"
            )
        for variable, average in zip(var_list, averages, strict=True):
            if average is not None:
                variable.assign(jnp.array(average.value, copy=True))

    # -- our state -------------------------------------------------------------------------------

    @property
    def tx(self):
        """The optax transformation this optimizer runs, at the current learning rate."""
        learning_rate = self.learning_rate
        return self._transform(float(getattr(learning_rate, "value", learning_rate)))

    @property
    def opt_state(self) -> Any:
        """The current optax state of :attr:`tx`, keyed by variable path."""
        if not self.built:
            raise ValueError("the optimizer is not built yet")
        return self._state(self._iterations.value)

    # -- saving --------------------------------------------------------------------------------------

    def load_own_variables(self, store):
        """Keras' loading, which also reads checkpoints of rmsprop_jax <= 0.1.0.

        Those stored ``iteration`` then every leaf of our state in tree order
        (``rj_state_<i>``, step counters included). They are recognised by their
        shapes and dtypes and mapped onto today's variables, so a resumed run
        keeps its slots instead of Keras skipping them with a warning.
        """
        values = [store[str(i)] for i in range(len(store.keys()))]
        legacy = self._legacy_layout() if self.built else None
        current = [(tuple(v.shape), str(v.dtype)) for v in self.variables]
        found = [(tuple(np.shape(x)), str(np.asarray(x).dtype)) for x in values]
        if legacy is None or found == current or found != legacy:
            return super().load_own_variables(store)
        self._iterations.assign(values[0])
        for position, value in enumerate(values[1:]):
            variable = self._rj_state_variables.get(position)
            if variable is not None:  # the counters are derived from iteration
                variable.assign(value)
        return None

    def _legacy_layout(self) -> list[tuple]:
        """(shape, dtype) of each variable as rmsprop_jax <= 0.1.0 stored them."""
        layout = [((), str(self._iterations.dtype))]
        for position in range(self._rj_treedef.num_leaves):
            if position in self._rj_counter_dtypes:
                shape, dtype = self._rj_counter_dtypes[position]
                layout.append((tuple(shape), str(jnp.dtype(dtype))))
            else:
                variable = self._rj_state_variables[position]
                layout.append((tuple(variable.shape), str(variable.dtype)))
        return layout

    # -- serialization ---------------------------------------------------------------------------

    def get_config(self):
        """Keras RMSprop's config, then our keyword-only knobs."""
        config = super().get_config()
        exclude = self._rj_exclude
        if isinstance(exclude, str):
            exclude = [exclude]
        elif callable(exclude):
            exclude = keras.saving.serialize_keras_object(exclude)
        elif exclude is not None:
            if not all(isinstance(e, str) for e in exclude):
                raise TypeError(
                    "get_config: exclude_from_weight_decay must be regex strings or a callable "
                    f"to be saved, got {exclude!r}"
                )
            exclude = list(exclude)
        config.update({name: getattr(self, name) for name in _RMSPROP_OPTIONS})
        dtype = self.accumulator_dtype
        config.update(
            exclude_from_weight_decay=exclude,
            accumulator_dtype=dtype if dtype is None or dtype == "int8" else jnp.dtype(dtype).name,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("exclude_from_weight_decay"), dict):
            config["exclude_from_weight_decay"] = keras.saving.deserialize_keras_object(
                config["exclude_from_weight_decay"], custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)


def _field_before(path: tuple, key_at: int | None) -> str | None:
    """The name of the state field holding the per-variable dict at ``path[key_at]``."""
    for entry in reversed(path[: len(path) if key_at is None else key_at]):
        name = getattr(entry, "name", None)
        if name is not None:
            return name
    return None
