"""Where rmsprop_jax meets other frameworks' APIs (the library proper is one level up).

* :mod:`~rmsprop_jax.integrations.keras_optimizer` -- ``RMSprop``, a
  ``keras.optimizers.Optimizer`` (Keras 3, JAX backend); imports Keras, so it is
  not imported here (import path kept: ``rmsprop_jax.keras_optimizer``);
* :mod:`~rmsprop_jax.integrations.keras_functional` -- ``rj.RMSprop``, Keras'
  optimizer API as pure functions (state in, state out); no Keras needed;
* :mod:`~rmsprop_jax.integrations.porting` -- ``rj.porting``: optimizer state
  to and from PyTorch ``state_dict`` and Keras variables.
"""

from rmsprop_jax.integrations import keras_functional, porting

__all__ = ["keras_functional", "porting"]
