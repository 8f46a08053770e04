"""The Keras 3 features of RMSprop, each a small optax transform usable alone in ``optax.chain``."""

from rmsprop_jax.transforms.accumulation import AccumulationState, accumulate_gradients
from rmsprop_jax.transforms.clipping import (
    clip_by_global_norm,
    clip_by_norm,
    clip_by_p_norm,
    clip_by_value,
    global_norm,
)
from rmsprop_jax.transforms.ema import EmaState, ema_params, weight_ema
from rmsprop_jax.transforms.loss_scaling import (
    DynamicLossScaleState,
    dynamic_loss_scale,
    loss_scale,
    unscale_gradients,
)
from rmsprop_jax.transforms.sparse_adapters import densify, on_touched_rows
from rmsprop_jax.transforms.weight_decay import WeightDecayState, add_decoupled_weight_decay

__all__ = [
    "AccumulationState",
    "DynamicLossScaleState",
    "EmaState",
    "WeightDecayState",
    "accumulate_gradients",
    "add_decoupled_weight_decay",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_p_norm",
    "clip_by_value",
    "densify",
    "dynamic_loss_scale",
    "ema_params",
    "global_norm",
    "loss_scale",
    "on_touched_rows",
    "unscale_gradients",
    "weight_ema",
]
