"""Test configuration shared by the whole suite.

Keras 3 reads ``KERAS_BACKEND`` once, when it is first imported; the peer
tests compare against Keras on the JAX backend, so the variable is set here,
before any test module imports keras. An explicit setting in the environment
wins (``setdefault``).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
