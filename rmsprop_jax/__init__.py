"""rmsprop_jax: the RMSprop optimizer for JAX, every convention, as optax transforms."""

from rmsprop_jax.alias import rmsprop
from rmsprop_jax.core import RMSpropState, rmsprop_leaf_update, scale_by_rmsprop
from rmsprop_jax.utils import apply_updates

__version__ = "0.1.0"

__all__ = [
    "RMSpropState",
    "apply_updates",
    "rmsprop",
    "rmsprop_leaf_update",
    "scale_by_rmsprop",
]
