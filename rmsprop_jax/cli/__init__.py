"""The command-line tools, ``python -m rmsprop_jax <command>`` (not part of the library API).

* ``demo`` -- train an MLP on scikit-learn's digits (:mod:`rmsprop_jax.cli.demo`);
* ``bench`` -- step time and bytes against the memory floor (:mod:`rmsprop_jax.cli.bench`);
* ``conformance`` -- the presets against every installed peer
  (:mod:`rmsprop_jax.cli.conformance`);
* ``parity`` -- int8 against float32 state on two tasks (:mod:`rmsprop_jax.cli.parity`).

Each is imported only when its command runs; ``import rmsprop_jax`` imports none of them.
"""

__all__: list[str] = []
