"""Porting presets: each framework's own argument names and defaults, same trajectories.

Every preset is a short mapping onto :func:`rmsprop_jax.rmsprop_update` and
the feature transforms; none repeats the arithmetic. Each validates with the
framework's own argument names (``alpha must be in [0, 1)`` for PyTorch) and
rejects unknown keyword arguments with the list of valid ones.

==========  ===========================================================  ==================
preset      reproduces                                                   eps / lr placement
==========  ===========================================================  ==================
keras       ``keras.optimizers.RMSprop`` (Keras 3)                       in sqrt / in buffer
tf2         ``tf.keras.optimizers.RMSprop`` (TF 2.x optimizer_v2)         see :func:`tf2`
tf1         ``tf.compat.v1.train.RMSPropOptimizer``                       in sqrt / in buffer
torch       ``torch.optim.RMSprop``                                       outside / outside
oneflow     ``oneflow.optim.RMSprop``                                     in sqrt / (none)
optax       ``optax.rmsprop``                                             as its options
==========  ===========================================================  ==================
"""

import functools
import inspect
from typing import Any

import numpy as np
import optax as _optax

from rmsprop_jax import _checks, _flat_forms, _schedules, alias, core, transforms

# Called as rj.presets.torch(...), never star-imported: the preset names are the frameworks'
# names, and `from rmsprop_jax.presets import *` would shadow `import torch` / `import optax`.
__all__: list[str] = []
PRESET_NAMES = ("keras", "oneflow", "optax", "tf1", "tf2", "torch")


def _strict_kwargs(fn, name: str | None = None):
    """Unknown keyword arguments raise TypeError naming the preset's valid names."""
    name = name or fn.__name__
    names = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(
                f"rj.presets.{name}() got unknown argument(s) {unknown}; valid: {names}"
            )
        return fn(*args, **kwargs)

    return wrapper


def _float32_rounded(x: Any) -> Any:
    """``x`` rounded to float32 (as a Python float) so ``1 - x`` is what float32 math gives.

    TF computes ``1 - rho`` on float32 tensors (``1 - 0.9f = 0.100000024``); Keras
    3 and PyTorch compute it in Python double. Passing the float32-rounded rho
    reproduces TF exactly with the shared core, which forms ``1 - rho`` in double.
    """
    return float(np.float32(x)) if isinstance(x, (int, float)) else x


keras = _strict_kwargs(alias.rmsprop, "keras")
keras.__name__ = "keras"
keras.__doc__ = (
    "Keras 3 ``keras.optimizers.RMSprop``: :func:`rmsprop_jax.rmsprop` (same arguments)."
)


@_strict_kwargs
def tf2(
    learning_rate: _optax.ScalarOrSchedule = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float | None = 1e-7,
    centered: bool = False,
    decay: float = 0.0,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    lr: Any = None,
) -> _optax.GradientTransformationExtraArgs:
    r"""TensorFlow 2.x ``tf.keras.optimizers.RMSprop`` (optimizer_v2), step for step.

    * ``lr`` is an alias of ``learning_rate``; ``decay`` is inverse-time decay
      ``lr_t = lr / (1 + decay * t)``; ``epsilon=0`` or ``None`` becomes 1e-7.
    * ``1 - rho`` is computed in float32 (``0.100000024`` for 0.9), as TF does.
    * ``momentum == 0``: TF's Python path, epsilon OUTSIDE the square root,
      ``w -= lr * g / (sqrt(v) + eps)`` (centered: ``sqrt(v - a^2) + eps``).
    * ``momentum > 0``: the fused kernels ``ApplyRMSProp`` /
      ``ApplyCenteredRMSProp``, epsilon inside the root and the learning rate
      inside the momentum buffer: ``m = momentum * m + lr * g / sqrt(v + eps)``.
    * ``clipnorm`` (per tensor, ``g * c / max(||g||, c)``) and ``clipvalue`` are
      applied to the gradients as ``minimize()`` applies them. TF 2.0's
      ``apply_gradients`` silently skipped them (a known TF bug); this preset
      does not reproduce that bug: clip before the preset to port such code.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.presets.tf2(learning_rate=0.1)
      >>> p = jnp.array([1.0, 2.0]); s = tx.init(p)
      >>> u, s = tx.update(jnp.array([0.1, 0.2]), s, p)
      >>> optax.apply_updates(p, u)
      Array([0.6837733, 1.6837728], dtype=float32)
    """
    if lr is not None:
        learning_rate = lr
    if epsilon is None or epsilon == 0:
        epsilon = 1e-7
    _checks.check_range("decay", decay, 0.0)
    _checks.check_range("learning_rate", learning_rate, 0.0) if not callable(
        learning_rate
    ) else None
    schedule = learning_rate
    if decay:
        base = _schedules.as_schedule(learning_rate)
        initial = learning_rate

        def schedule(count):
            lr_now = initial if base is None else base(count)
            return lr_now / (1.0 + decay * count)

    pieces = []
    # TF 2.x clips an IndexedSlices' rows as given, before repeated rows are summed.
    if clipnorm:
        pieces.append(transforms.clip_by_norm(clipnorm, sum_duplicates=False))
    if clipvalue:
        pieces.append(transforms.clip_by_value(clipvalue, sum_duplicates=False))
    pieces.append(
        core.rmsprop_update(
            schedule,
            _float32_rounded(rho),
            epsilon,
            centered,
            momentum=momentum,
            eps_in_sqrt=not _checks.is_static_zero(momentum),
            sparse_mode="tf2",
        )
    )
    return _flat_forms.with_extra_args(alias._chain(pieces))


@_strict_kwargs
def tf1(
    learning_rate: _optax.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    """TensorFlow 1 ``tf.compat.v1.train.RMSPropOptimizer``.

    Always the fused kernels: epsilon inside the square root, the learning rate
    inside the momentum buffer, ``1 - decay`` in float32, and the mean-square
    slot starting at ONES (so early steps are small, unlike Keras).

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.presets.tf1(0.1)
      >>> p = jnp.array([1.0, 2.0]); s = tx.init(p)
      >>> optax.apply_updates(p, tx.update(jnp.array([0.1, 0.2]), s, p)[0])
      Array([0.98946494, 1.9789648 ], dtype=float32)
    """
    _checks.check_range("decay", decay, 0.0, 1.0, high_open=True)
    return alias.rmsprop(
        learning_rate,
        _float32_rounded(decay),
        momentum,
        epsilon,
        centered,
        initial_accumulator_value=1.0,
    )


def _check_torch_style(lr: Any, alpha: float, eps: float, weight_decay: float) -> None:
    """PyTorch / OneFlow argument checks, in their own names (a schedule ``lr`` is not checked)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not callable(value):
            _checks.check_range(name, value, 0.0)
    _checks.check_range("alpha", alpha, 0.0, 1.0, high_open=True)


def _coupled_l2_preamble(maximize: bool, weight_decay: float) -> list:
    """PyTorch / OneFlow gradient preamble: ``g = -g`` (maximize), then ``g += wd * w``."""
    pieces = []
    if maximize:
        pieces.append(_flat_forms.declare(_optax.scale(-1.0), _flat_forms.per_leaf))
    if not _checks.is_static_zero(weight_decay):  # traced under inject_hyperparams
        decay = _optax.add_decayed_weights(weight_decay)  # elementwise: right over flat buffers
        pieces.append(_flat_forms.declare(decay, _flat_forms.per_leaf))
    return pieces


@_strict_kwargs
def torch(
    lr: _optax.ScalarOrSchedule = 0.01,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    """PyTorch ``torch.optim.RMSprop``.

    ``g = -g`` if maximize; ``g += weight_decay * w`` (coupled L2, normalised by
    the RMSprop denominator, unlike Keras' decoupled decay); epsilon OUTSIDE the
    square root; with momentum the buffer holds ``g / d`` and the step is
    ``lr * m``, so ``lr`` may be a schedule ``count -> lr`` that behaves like a
    torch LR scheduler mutating ``param_groups[0]["lr"]`` (a changed rate acts
    at once on the whole buffer). Complex parameters: torch treats them as
    pairs of reals (a velocity per component); rmsprop_jax keeps one real
    ``|g|^2`` per element, so complex trajectories differ.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.presets.torch(lr=0.01)
      >>> p = jnp.array([1.0]); s = tx.init(p)
      >>> optax.apply_updates(p, tx.update(jnp.array([0.5]), s, p)[0])  # 1 - 0.01 * 0.5 / (0.05 + 1e-8)
      Array([0.90000004], dtype=float32)
    """
    _check_torch_style(lr, alpha, eps, weight_decay)
    _checks.check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    core_tx = core.rmsprop_update(
        lr,
        alpha,
        eps,
        centered,
        momentum=momentum,
        eps_in_sqrt=False,
        lr_in_momentum=False,
    )
    return _flat_forms.with_extra_args(
        alias._chain(_coupled_l2_preamble(maximize, weight_decay) + [core_tx])
    )


@_strict_kwargs
def oneflow(
    lr: _optax.ScalarOrSchedule = 0.001,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    centered: bool = False,
    clip_grad_max_norm: float | None = None,
    clip_grad_norm_type: float = 2.0,
) -> _optax.GradientTransformationExtraArgs:
    """OneFlow ``oneflow.optim.RMSprop``.

    ``g' = g + weight_decay * w`` (coupled L2), ``v = (1 - alpha) g'^2 + alpha v``
    (centered: ``v - a^2``), ``w -= lr * g' * rsqrt(v + eps)`` (epsilon inside
    the root). OneFlow has no momentum for RMSprop: ``momentum > 0`` raises.
    A param group's ``clip_grad_max_norm`` / ``clip_grad_norm_type`` are the
    ``clip_grad_max_norm`` / ``clip_grad_norm_type`` arguments here
    (:func:`rmsprop_jax.clip_by_p_norm`, any p including ``inf``).

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> tx = rj.presets.oneflow(lr=0.1, alpha=0.0, eps=0.0)
      >>> p = jnp.array([1.0]); s = tx.init(p)
      >>> optax.apply_updates(p, tx.update(jnp.array([0.5]), s, p)[0])
      Array([0.9], dtype=float32)
    """
    if not _checks.is_static_zero(momentum):  # a traced value could be anything: refused too
        raise ValueError(
            f"momentum={momentum!r}: oneflow.optim.RMSprop does not support momentum; "
            "use rj.presets.torch(momentum=...) for RMSprop with momentum"
        )
    _check_torch_style(lr, alpha, eps, weight_decay)
    pieces = []
    if clip_grad_max_norm is not None:
        _checks.check_range("clip_grad_max_norm", clip_grad_max_norm, 0.0, low_open=True)
        _checks.check_range("clip_grad_norm_type", clip_grad_norm_type, 0.0, low_open=True)
        pieces.append(transforms.clip_by_p_norm(clip_grad_max_norm, clip_grad_norm_type))
    pieces += _coupled_l2_preamble(False, weight_decay)
    pieces.append(core.rmsprop_update(lr, alpha, eps, centered))
    return _flat_forms.with_extra_args(alias._chain(pieces))


@_strict_kwargs
def optax(
    learning_rate: _optax.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    """``optax.rmsprop`` with its own names and defaults, for every option.

    The differences are the numerics guarantees of rmsprop_jax (real
    accumulators for complex parameters, float32 state for half-precision
    parameters, the centered variance clamped at 0): where optax is finite the
    results agree to float32 rounding.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax as rj
      >>> p = jnp.array([1.0]); g = jnp.array([0.5])
      >>> ours = rj.presets.optax(0.1, momentum=0.9, nesterov=True)
      >>> theirs = optax.rmsprop(0.1, momentum=0.9, nesterov=True)
      >>> bool(ours.update(g, ours.init(p), p)[0] == theirs.update(g, theirs.init(p), p)[0])
      True
    """
    _checks.check_range("decay", decay, 0.0, 1.0, high_open=True)
    _checks.check_range("eps", eps, 0.0)
    _checks.check_range("initial_scale", initial_scale, 0.0)
    if momentum is not None:
        _checks.check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    return alias.rmsprop(
        learning_rate,
        decay,
        0.0 if momentum is None else momentum,
        eps,
        centered,
        nesterov=nesterov and not _checks.is_static_zero(momentum),  # optax: no trace, no nesterov
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=initial_scale,
        bias_correction=bias_correction,
    )
