"""``CountingJit``: ``jax.jit`` that counts its traces, for "compiles once" assertions.

JAX traces a jitted function once per distinct input signature (shapes,
dtypes, weak types, static values, pytree structure) and compiles each trace,
so the trace count is the compilation count. ``jitted._cache_size()`` (the C++
dispatch cache) looked like the direct measure but read 0 after the first call
late in long pytest workers, so it is not used.
"""

from __future__ import annotations

import functools
from typing import Any

import jax


class CountingJit:
    """``jax.jit(fn, **jit_kwargs)``; ``.traces`` is how many times ``fn`` was traced."""

    def __init__(self, fn: Any, **jit_kwargs: Any):
        self.traces = 0

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self.traces += 1
            return fn(*args, **kwargs)

        self._jitted = jax.jit(traced, **jit_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted(*args, **kwargs)
