"""``rj.rmsprop``: Keras 3's RMSprop arguments and defaults as an optax transformation."""

from __future__ import annotations

from typing import Any, Optional

import optax

from rmsprop_jax import core

# Keras feature arguments that are not implemented yet, with their "off" values.
_NOT_YET = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "exclude_from_weight_decay",
)


def rmsprop(
    learning_rate: core.ScalarOrSchedule = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: Optional[float] = None,
    clipnorm: Optional[float] = None,
    clipvalue: Optional[float] = None,
    global_clipnorm: Optional[float] = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: Optional[int] = None,
    loss_scale_factor: Optional[float] = None,
    gradient_accumulation_steps: Optional[int] = None,
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
    :func:`rmsprop_jax.scale_by_rmsprop` for the full math.

    Args:
      learning_rate: float, or a schedule ``step -> lr`` evaluated at the number
        of steps taken before this one.
      rho: discounting factor for the moving averages, in [0, 1).
      momentum: momentum in [0, 1); 0 keeps no momentum buffer.
      epsilon: small non-negative constant for numerical stability.
      centered: normalise by the estimated variance of the gradient.
      weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps,
        exclude_from_weight_decay: Keras 3 features, not implemented yet;
        setting one raises ``NotImplementedError`` naming it.
      nesterov: Nesterov momentum (optax ``trace(nesterov=True)``).
      eps_in_sqrt: ``sqrt(v + eps)`` (True, Keras) or ``sqrt(v) + eps`` (PyTorch).
      lr_in_momentum: the buffer holds ``lr*g/d`` (True, Keras/TF/optax) or
        ``g/d`` with the step ``lr*m`` (False, PyTorch).
      initial_accumulator_value: start value of ``v`` (TF1 uses 1.0).
      bias_correction: optax's bias correction of the moving averages.
      maximize: gradient ascent (PyTorch).
      accumulator_dtype: None, ``jnp.float32`` or ``jnp.bfloat16`` slot storage.

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
    given = dict(
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        clipvalue=clipvalue,
        global_clipnorm=global_clipnorm,
        use_ema=use_ema,
        ema_overwrite_frequency=ema_overwrite_frequency,
        loss_scale_factor=loss_scale_factor,
        gradient_accumulation_steps=gradient_accumulation_steps,
        exclude_from_weight_decay=exclude_from_weight_decay,
    )
    for name in _NOT_YET:
        if given[name] is not None and given[name] is not False:
            raise NotImplementedError(
                f"rmsprop(): {name}={given[name]!r} is not implemented yet (Keras "
                "feature arguments arrive with the feature transforms)"
            )
    del ema_momentum  # only read when use_ema=True
    tx = core.scale_by_rmsprop(
        learning_rate,
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
    return optax.with_extra_args_support(tx)
