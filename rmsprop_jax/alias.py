"""``rj.rmsprop``: Keras 3's RMSprop arguments and defaults as an optax transformation."""

from typing import Any

import numpy as np
import optax

from rmsprop_jax import _checks, _flat_forms, _schedules, core, transforms

__all__ = [
    "rmsprop",
]


def rmsprop(
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
    *,
    exclude_from_weight_decay: Any = None,
    nesterov: bool = False,
    eps_in_sqrt: bool = True,
    lr_in_momentum: bool = True,
    initial_accumulator_value: float = 0.0,
    bias_correction: bool = False,
    maximize: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSprop with Keras 3's arguments and defaults, as an optax transformation.

    With the defaults this is ``keras.optimizers.RMSprop()``:

    .. math::

      v \leftarrow \rho v + (1-\rho) g^2, \qquad
      w \leftarrow w - \frac{\eta\, g}{\sqrt{v + \epsilon}}

    (centered: :math:`v - a^2` under the root, :math:`a` the moving mean of
    :math:`g`; momentum: :math:`m \leftarrow \mu m + \eta g/\sqrt{\cdot},\ w
    \leftarrow w - m`). The keyword-only knobs select the other conventions; see
    :func:`rmsprop_jax.rmsprop_update` for the full math.

    Args:
      learning_rate: float, or a schedule ``step -> lr`` evaluated at the number
        of steps taken before this one.
      rho: discounting factor for the moving averages, in [0, 1).
      momentum: momentum in [0, 1); 0 keeps no momentum buffer.
      epsilon: small non-negative constant for numerical stability.
      centered: normalise by the estimated variance of the gradient.
      weight_decay: decoupled weight decay ``w -= w * weight_decay * lr``
        (Keras; not L2), applied on every update step.
      clipnorm: clip each gradient tensor to this L2 norm (Keras formula).
      clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
      global_clipnorm: clip the whole gradient tree to this global norm
        (a non-finite norm makes the step NaN, as Keras). At most one of the
        three clip options may be set; 0 or None disables.
      use_ema: keep an exponential moving average of the weights
        (read it with :func:`rmsprop_jax.ema_params`).
      ema_momentum: EMA momentum in [0, 1]; the first step copies the weights.
      ema_overwrite_frequency: overwrite the weights with their average every
        this many (update) steps; None never.
      loss_scale_factor: the gradients are divided by it (the loss was
        multiplied by it).
      gradient_accumulation_steps: apply the mean of every N gradients once
        every N calls (Keras semantics; schedules and EMA advance on every call).
      exclude_from_weight_decay: leaves not decayed: regex strings searched in
        each leaf's path name ("dense/bias"), a bool pytree (True: excluded) or
        a callable ``params -> bool pytree``.
      nesterov: Nesterov momentum (optax ``trace(nesterov=True)``).
      eps_in_sqrt: ``sqrt(v + eps)`` (True, Keras) or ``sqrt(v) + eps`` (PyTorch).
      lr_in_momentum: the buffer holds ``lr*g/d`` (True, Keras/TF/optax) or
        ``g/d`` with the step ``lr*m`` (False, PyTorch).
      initial_accumulator_value: start value of ``v`` (TF1 uses 1.0).
      bias_correction: optax's bias correction of the moving averages.
      maximize: gradient ascent (PyTorch).
      accumulator_dtype: None, ``jnp.float32`` or ``jnp.bfloat16`` slot storage,
        or ``"int8"`` (blockwise 8-bit velocity for leaves of >= 4096 elements).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.rmsprop(learning_rate=0.1)
      >>> params = {"w": jnp.array([10.0])}
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([9.683772], dtype=float32)
    """
    clip_options = dict(clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm)
    for name, value in {
        **clip_options,
        "weight_decay": weight_decay,
        "loss_scale_factor": loss_scale_factor,
    }.items():
        if value is not None and not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"{name} must be a Python number or None, got {value!r}: it selects which "
                "transforms the chain holds (with optax.inject_hyperparams, list it in static_args)"
            )
    clips_set = [name for name, value in clip_options.items() if value is not None]  # as Keras
    if len(clips_set) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set, got "
            + ", ".join(f"{name}={clip_options[name]!r}" for name in clips_set)
        )
    if weight_decay is not None:
        _checks.check_range("weight_decay", weight_decay, 0.0)
    if loss_scale_factor is not None:
        _checks.check_range("loss_scale_factor", loss_scale_factor, 0.0, low_open=True)
    _checks.check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    if use_ema:
        _checks.check_range("ema_momentum", ema_momentum, 0.0, 1.0)
        _checks.check_positive_int("ema_overwrite_frequency", ema_overwrite_frequency)
    steps = gradient_accumulation_steps or 1
    # Schedules are read at Keras' raw iteration count, also by the pieces that
    # only run on accumulation update steps.
    schedule = _schedules.as_schedule(learning_rate)
    inner_lr: Any = learning_rate if schedule is None else _schedules.shifted(schedule, steps)

    update_pieces = []
    if clipnorm:
        update_pieces.append(transforms.clip_by_norm(clipnorm))
    elif global_clipnorm:
        update_pieces.append(transforms.clip_by_global_norm(global_clipnorm))
    elif clipvalue:
        update_pieces.append(transforms.clip_by_value(clipvalue))
    update_pieces.append(
        core.rmsprop_update(
            inner_lr,
            rho,
            epsilon,
            centered,
            momentum=momentum,
            nesterov=nesterov,
            lr_in_momentum=lr_in_momentum,
            eps_in_sqrt=eps_in_sqrt,
            initial_accumulator_value=initial_accumulator_value,
            bias_correction=bias_correction,
            maximize=maximize,
            accumulator_dtype=accumulator_dtype,
        )
    )
    if weight_decay:
        # Keras decays the weights just before update_step; the decay reads
        # w, not g, so adding it after the RMSprop step is the same update.
        update_pieces.append(
            transforms.add_decoupled_weight_decay(weight_decay, inner_lr, exclude_from_weight_decay)
        )
    elif exclude_from_weight_decay is not None:
        transforms.weight_decay.compile_exclusion(exclude_from_weight_decay)  # validate anyway

    pieces = []
    if loss_scale_factor is not None:
        pieces.append(transforms.unscale_gradients(loss_scale_factor))
    update = _chain(update_pieces)
    pieces.append(update if steps == 1 else transforms.accumulate_gradients(update, steps))
    if use_ema:
        pieces.append(transforms.weight_ema(ema_momentum, ema_overwrite_frequency, steps))
    return _checks.with_state_check(_chain(pieces), "rj.rmsprop")


def _chain(pieces):
    """``optax.chain`` without a wrapper (and its nested state) around a single piece."""
    return pieces[0] if len(pieces) == 1 else _flat_forms.chain(*pieces)
