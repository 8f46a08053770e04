"""The import path of the Keras optimizer: ``from rmsprop_jax.keras_optimizer import RMSprop``.

The code is :mod:`rmsprop_jax.integrations.keras_optimizer`. This path stays because it is
the documented one and because Keras stores it in saved models (``"module"``), which
``keras.models.load_model`` imports when the class is not registered yet.
"""

from rmsprop_jax.integrations.keras_optimizer import RMSprop

__all__ = ["RMSprop"]
