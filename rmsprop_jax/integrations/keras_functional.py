"""``rj.RMSprop``: the Keras 3 optimizer API over the pure transforms, state in, state out."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _checks, _schedules, _trees, alias, core
from rmsprop_jax.sparse import IndexedSlices
from rmsprop_jax.transforms.accumulation import AccumulationState
from rmsprop_jax.transforms.ema import EmaState, overwrites_weights
from rmsprop_jax.transforms.weight_decay import WeightDecayState, compile_exclusion
from rmsprop_jax.utils import apply_updates

__all__ = [
    "KERAS_CONFIG_KEYS",
    "SLOT_ALIASES",
    "RMSprop",
    "RMSpropOptimizerState",
    "sync_counters",
]

# Keras 3 ``RMSprop.get_config()`` keys, in Keras' order.
KERAS_CONFIG_KEYS = (
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "rho",
    "momentum",
    "epsilon",
    "centered",
)
# Keras and TF 2 slot names -> field of ``RMSpropState``.
SLOT_ALIASES = {
    "velocity": "velocity",
    "rms": "velocity",
    "momentum": "momentum",
    "average_gradient": "average_gradient",
    "mg": "average_gradient",
}


class RMSpropOptimizerState(NamedTuple):
    """State of :class:`RMSprop` (Keras' optimizer variables)."""

    iterations: chex.Array  # int32 scalar: calls so far (Keras' raw ``_iterations``)
    learning_rate: chex.Array | None  # float32 scalar when the learning rate is a float (settable)
    inner_state: optax.OptState  # state of ``rj.rmsprop(...)``


def _rmsprop_kwargs() -> tuple[str, ...]:
    return tuple(inspect.signature(alias.rmsprop).parameters)


class RMSprop:
    """The Keras 3 ``keras.optimizers.RMSprop`` API, functional: state in, state out.

    Takes every argument of :func:`rmsprop_jax.rmsprop` (Keras' arguments and
    defaults plus the keyword-only knobs) and ``name``. A float learning rate
    lives in the state, like Keras' ``learning_rate`` variable, so
    :meth:`set_learning_rate` changes it between steps without recompiling.

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax as rj
      >>> opt = rj.RMSprop(learning_rate=0.1, use_ema=True)
      >>> params = {"w": jnp.array([10.0])}
      >>> opt_state = opt.init(params)
      >>> params, opt_state = jax.jit(opt.stateless_apply)(opt_state, params, params)
      >>> params["w"], int(opt.iterations(opt_state))
      (Array([9.683772], dtype=float32), 1)
    """

    def __init__(
        self,
        learning_rate: optax.ScalarOrSchedule = 0.001,
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
        name: str = "rmsprop",
        *,
        exclude_from_weight_decay: Any = None,
        nesterov: bool = False,
        eps_in_sqrt: bool = True,
        lr_in_momentum: bool = True,
        initial_accumulator_value: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        accumulator_dtype: Any = None,
    ):
        arguments = dict(locals())
        self._kwargs = {key: arguments[key] for key in _rmsprop_kwargs()}
        self.name = name
        self._build()

    def _build(self) -> None:
        kwargs = self._kwargs
        self._float_lr = not callable(kwargs["learning_rate"])
        alias.rmsprop(**kwargs)  # validates every argument now, at construction
        self._steps = kwargs["gradient_accumulation_steps"] or 1
        self._schedule = _schedules.as_schedule(kwargs["learning_rate"])

        def init_fn(params):
            lr = jnp.asarray(kwargs["learning_rate"], jnp.float32) if self._float_lr else None
            return RMSpropOptimizerState(
                iterations=jnp.zeros([], jnp.int32),
                learning_rate=lr,
                inner_state=alias.rmsprop(**kwargs).init(params),
            )

        def update_fn(updates, state, params=None, **extra_args):
            config = dict(kwargs)
            if self._float_lr:
                config["learning_rate"] = state.learning_rate
            inner = alias.rmsprop(**config)
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return updates, state._replace(
                iterations=optax.safe_increment(state.iterations), inner_state=inner_state
            )

        self.tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)

    # -- attributes as in Keras -----------------------------------------------------------------

    def __copy__(self) -> RMSprop:
        """A copy with its own configuration: changing one (``exclude_from_weight_decay``)
        leaves the other alone. The transform is rebuilt around the copied configuration."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._kwargs = dict(self._kwargs)
        new._build()
        return new

    def __deepcopy__(self, memo: dict) -> RMSprop:
        new = self.__copy__()
        new._kwargs = copy.deepcopy(self._kwargs, memo)
        new._build()
        return new

    def init(self, params: optax.Params) -> RMSpropOptimizerState:
        """Creates the optimizer state (Keras ``build``)."""
        return self.tx.init(params)

    # -- applying gradients ---------------------------------------------------------------------

    def stateless_apply(
        self, opt_state: RMSpropOptimizerState, grads: optax.Updates, params: optax.Params
    ) -> tuple[optax.Params, RMSpropOptimizerState]:
        """One step in Keras' argument order: returns ``(new_params, new_opt_state)``.

        Pure and jittable (donate ``opt_state`` and ``params``). Where Keras
        overwrites the weights with their EMA, the averages are written
        exactly (not ``w + (avg - w)``).
        """
        updates, new_state = self.tx.update(grads, opt_state, params)
        new_params = apply_updates(params, updates)
        frequency = self._kwargs["ema_overwrite_frequency"]
        if self._kwargs["use_ema"] and frequency is not None:
            overwrite = overwrites_weights(opt_state.iterations, frequency, self._steps)

            def write_average(u, avg, w):
                if isinstance(u, IndexedSlices):  # lazy, as rj.rmsprop: the touched rows only
                    return u.scatter(w, jnp.where(overwrite, u.gather(avg), u.gather(w)))
                return jnp.where(overwrite, avg, w)

            new_params = jax.tree.map(
                write_average,
                updates,
                _find(new_state, EmaState).ema,
                new_params,
                is_leaf=_trees.is_leaf_gradient,
            )
        return new_params, new_state

    def apply(self, grads, params, opt_state):
        """Keras ``apply(grads, trainable_variables)``, functional: returns ``(params, opt_state)``."""
        return self.stateless_apply(opt_state, grads, params)

    def apply_gradients(self, grads_and_vars, opt_state):
        """Keras/TF ``apply_gradients([(g, v), ...])``: returns ``([new v, ...], opt_state)``.

        ``opt_state`` must have been built on the list of variables in the same order.
        """
        grads, params = zip(*grads_and_vars)
        return self.stateless_apply(opt_state, list(grads), list(params))

    def minimize(self, loss_fn: Callable[..., jax.Array], params, opt_state, *args, **kwargs):
        """TF 2 ``minimize``: gradients of ``loss_fn(params, *args)`` by ``jax.grad``, then a step.

        The loss is scaled by :meth:`scale_loss` before differentiation (and the
        gradients unscaled by the optimizer). Returns ``(loss, params, opt_state)``.
        """
        loss, grads = jax.value_and_grad(lambda p: self.scale_loss(loss_fn(p, *args, **kwargs)))(
            params
        )
        params, opt_state = self.stateless_apply(opt_state, grads, params)
        factor = self._kwargs["loss_scale_factor"]
        return (loss if factor is None else loss / factor), params, opt_state

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """Keras ``scale_loss``: ``loss * loss_scale_factor`` (unchanged when it is None)."""
        factor = self._kwargs["loss_scale_factor"]
        return loss if factor is None else loss * factor

    # -- reading the state ----------------------------------------------------------------------

    def iterations(self, opt_state: RMSpropOptimizerState) -> jax.Array:
        """Keras ``iterations``: update steps taken (calls // N under accumulation)."""
        return opt_state.iterations // self._steps

    def learning_rate(self, opt_state: RMSpropOptimizerState) -> jax.Array:
        """The learning rate the next step uses (a schedule at Keras' raw iteration count)."""
        if self._float_lr:
            return cast(jax.Array, opt_state.learning_rate)
        assert self._schedule is not None  # not a float: a schedule
        return jnp.asarray(self._schedule(opt_state.iterations))

    def set_learning_rate(
        self, opt_state: RMSpropOptimizerState, value: Any
    ) -> RMSpropOptimizerState:
        """Keras ``optimizer.learning_rate = value``: a new state, no recompilation."""
        if not self._float_lr:
            raise TypeError(
                "This optimizer was created with a schedule as its learning_rate, hence its "
                "learning rate is not settable (as in Keras); create it with a float."
            )
        if not isinstance(value, jax.core.Tracer):
            _checks.learning_rate_value(value)
        return opt_state._replace(learning_rate=jnp.asarray(value, jnp.float32))

    def finalize_variable_values(self, params, opt_state):
        """Keras ``finalize_variable_values``: the EMA weights when ``use_ema``, else ``params``."""
        if not self._kwargs["use_ema"]:
            return params
        return _find(opt_state, EmaState).ema

    def get_slot_names(self) -> list[str]:
        """Keras slot names present for this config: velocity, momentum, average_gradient."""
        names = ["velocity"]
        if not _is_zero(self._kwargs["momentum"]):
            names.append("momentum")
        if self._kwargs["centered"]:
            names.append("average_gradient")
        return names

    def get_slot(self, opt_state: RMSpropOptimizerState, name: str) -> optax.Updates:
        """A slot pytree by Keras or TF 2 name (velocity / rms, momentum, average_gradient / mg)."""
        if name not in SLOT_ALIASES or SLOT_ALIASES[name] not in [
            SLOT_ALIASES[n] for n in self.get_slot_names()
        ]:
            raise KeyError(
                f"no slot {name!r} for this config; slots: {self.get_slot_names()} "
                "(TF 2 aliases: rms, mg)"
            )
        return getattr(_find(opt_state, core.RMSpropState), SLOT_ALIASES[name])

    # -- Keras variables: flat lists in save_own_variables order --------------------------------

    def _variable_groups(self, opt_state) -> list:
        """Keras' variable order: iteration, learning_rate, EMA, accumulators, slots."""
        groups = [opt_state.iterations]
        if self._float_lr:
            groups.append(opt_state.learning_rate)
        if self._kwargs["use_ema"]:
            groups.append(_find(opt_state, EmaState).ema)
        if self._steps > 1:
            groups.append(_find(opt_state, AccumulationState).accumulators)
        groups.extend(self.get_slot(opt_state, name) for name in self.get_slot_names())
        return groups

    def variables(self, opt_state) -> list[jax.Array]:
        """Keras ``optimizer.variables``: the state's arrays in Keras' order."""
        return jax.tree.leaves(self._variable_groups(opt_state))

    def get_weights(self, opt_state) -> list[np.ndarray]:
        """Keras ``get_weights``: ``variables`` as NumPy arrays."""
        return [np.asarray(v) for v in self.variables(opt_state)]

    def set_weights(self, opt_state, weights) -> RMSpropOptimizerState:
        """Keras ``set_weights``: a new state holding ``weights`` (Keras' order), shapes checked."""
        current = self.variables(opt_state)
        weights = list(weights)
        if len(weights) != len(current):
            raise ValueError(f"set_weights: expected {len(current)} arrays, got {len(weights)}")
        new = []
        for i, (old, value) in enumerate(zip(current, weights)):
            value = jnp.asarray(value)
            if value.shape != old.shape:
                raise ValueError(
                    f"set_weights: variable {i} has shape {old.shape}, got shape {value.shape}"
                )
            new.append(value.astype(old.dtype))
        # Rebuild by swapping leaves in the same traversal order as _variable_groups.
        replacement = dict(zip(map(id, current), new))
        if len(replacement) != len(current):  # one array object in two places: no unique position
            raise ValueError(
                "set_weights: the state shares arrays between variables; copy it first"
            )
        return self._sync_counters(jax.tree.map(lambda x: replacement.get(id(x), x), opt_state))

    def _sync_counters(self, opt_state):
        return sync_counters(opt_state, opt_state.iterations, self._steps)

    def save_own_variables(self, opt_state, store: dict) -> None:
        """Keras ``save_own_variables``: ``store[str(i)]`` = i-th variable."""
        for i, value in enumerate(self.get_weights(opt_state)):
            store[str(i)] = value

    def load_own_variables(self, opt_state, store: dict) -> RMSpropOptimizerState:
        """Keras ``load_own_variables``: a new state from ``store`` (keys "0", "1", ...)."""
        return self.set_weights(opt_state, [store[str(i)] for i in range(len(store))])

    # -- configuration --------------------------------------------------------------------------

    def exclude_from_weight_decay(self, var_list: Any = None, var_names: Any = None) -> None:
        """Keras ``exclude_from_weight_decay``: call before :meth:`init`.

        ``var_names`` are regexes searched in each leaf's path name; ``var_list``
        may be a bool pytree (True: excluded) or a callable ``params -> bool
        pytree`` (JAX has no variable objects to list).
        """
        exclusion = var_list if var_list is not None else var_names
        if var_list is not None and var_names:  # Keras excludes the union of both
            by_list = compile_exclusion(var_list)
            by_names = compile_exclusion(var_names)

            def exclusion(params):  # True: excluded (compile_exclusion returns True: decayed)
                return jax.tree.map(lambda a, b: not (a and b), by_list(params), by_names(params))

        self._kwargs["exclude_from_weight_decay"] = exclusion
        self._build()

    def get_config(self) -> dict:
        """Keras 3 ``get_config()`` keys, plus the keyword-only knobs of :func:`rmsprop_jax.rmsprop`."""
        config = {"name": self.name}
        for key in _rmsprop_kwargs():
            value = self._kwargs[key]
            if key == "learning_rate":
                value = _serialize_learning_rate(value)
            elif key == "accumulator_dtype" and value is not None and not isinstance(value, str):
                value = jnp.dtype(value).name
            config[key] = value
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None) -> RMSprop:
        """Inverse of :meth:`get_config` (also accepts a Keras ``RMSprop`` config)."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            import keras  # a serialized Keras LearningRateSchedule

            config["learning_rate"] = keras.optimizers.schedules.deserialize(
                config["learning_rate"], custom_objects=custom_objects
            )
        return cls(**config)

    def __repr__(self) -> str:
        changed = {
            k: v
            for k, v in self._kwargs.items()
            if v != inspect.signature(alias.rmsprop).parameters[k].default
        }
        return f"RMSprop({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def _option(name: str) -> property:
    def read(self: RMSprop) -> Any:
        return self._kwargs[name]

    def refuse(self: RMSprop, value: Any) -> None:
        hint = " (the learning rate: set_learning_rate)" if name == "learning_rate" else ""
        raise AttributeError(
            f"RMSprop.{name} is read-only: the transform was built with {name}="
            f"{self._kwargs[name]!r}; create a new rj.RMSprop({name}={value!r}, ...){hint}"
        )

    return property(read, refuse, doc=f"``{name}`` as given (read-only).")


# Keras' attributes (rho, momentum, clipnorm, use_ema, ...) and our knobs, read-only: the
# transform is built from them once, so an assignment would silently change nothing.
for _name in _rmsprop_kwargs():
    if not hasattr(RMSprop, _name):  # learning_rate, exclude_from_weight_decay: methods, as Keras
        setattr(RMSprop, _name, _option(_name))
del _name


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _serialize_learning_rate(value: Any) -> Any:
    if not callable(value):
        return float(value)
    try:  # Keras LearningRateSchedule objects serialize like Keras does
        import keras

        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            return keras.optimizers.schedules.serialize(value)
    except ImportError:
        pass
    return value  # an optax schedule or a callable: kept as the object


def _find(opt_state: Any, cls: type) -> Any:
    return _trees.find_state(opt_state, cls, "RMSprop")


def sync_counters(opt_state: Any, calls: Any, steps: int) -> Any:
    """Sets every transform's private step counter in ``opt_state`` from Keras' ``iteration``.

    Keras saves one counter (``calls``, its raw ``iterations``); the
    transforms each keep their own: the accumulation phase and the EMA's
    first-step rule count calls, the RMSprop step (bias correction, schedules)
    and weight decay count update steps (``calls // steps`` under gradient
    accumulation of ``steps``). Loading Keras variables must set them all, or a
    resumed run would restart its accumulation cycle and schedules from zero.
    """
    calls = jnp.asarray(calls)
    updates_done = calls // steps
    counted = (core.RMSpropState, WeightDecayState)

    def inner(x):
        if isinstance(x, counted) and x.count is not None:
            return x._replace(count=updates_done.astype(x.count.dtype))
        return x

    def outer(x):
        if isinstance(x, (AccumulationState, EmaState)):
            return x._replace(count=calls.astype(x.count.dtype))
        return x

    state = jax.tree.map(inner, opt_state, is_leaf=lambda x: isinstance(x, counted))
    outer_types = (AccumulationState, EmaState)
    return jax.tree.map(outer, state, is_leaf=lambda x: isinstance(x, outer_types))
