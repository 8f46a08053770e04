"""rmsprop_jax: the RMSprop optimizer for JAX, every convention, as optax transforms."""

from rmsprop_jax import flat, presets, sharding, transforms
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.core import RMSpropState, rmsprop_leaf_update, rmsprop_update, scale_by_rmsprop
from rmsprop_jax.flat import contiguous
from rmsprop_jax.groups import label_leaves, param_groups
from rmsprop_jax.integrations import porting
from rmsprop_jax.integrations.keras_functional import RMSprop, RMSpropOptimizerState
from rmsprop_jax.sparse import IndexedSlices, value_and_sparse_grad
from rmsprop_jax.transforms import (
    accumulate_gradients,
    add_decoupled_weight_decay,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_p_norm,
    clip_by_value,
    densify,
    dynamic_loss_scale,
    ema_params,
    global_norm,
    loss_scale,
    on_touched_rows,
    unscale_gradients,
    weight_ema,
)
from rmsprop_jax.utils import apply_updates

__version__ = "0.1.0"

__all__ = [
    "IndexedSlices",
    "RMSprop",
    "RMSpropOptimizerState",
    "RMSpropState",
    "accumulate_gradients",
    "add_decoupled_weight_decay",
    "apply_updates",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_p_norm",
    "clip_by_value",
    "contiguous",
    "densify",
    "dynamic_loss_scale",
    "ema_params",
    "flat",
    "global_norm",
    "label_leaves",
    "loss_scale",
    "on_touched_rows",
    "param_groups",
    "porting",
    "presets",
    "rmsprop",
    "rmsprop_leaf_update",
    "rmsprop_update",
    "scale_by_rmsprop",
    "sharding",
    "transforms",
    "unscale_gradients",
    "value_and_sparse_grad",
    "weight_ema",
]
