"""rmsprop_jax._fusion: steering XLA's fusion changes no value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import _fusion


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_computed_once_is_the_value_in_a_kernel_of_its_own(dtype):
    x = np.array([-1e38, -1.0, -0.0, 0.0, 1e-30, 2.5, 1e38], dtype)  # 2 * x finite

    def per_element(x, y):  # a cheap per-block value read by a larger loop
        return y + jnp.repeat(_fusion.computed_once(x * 2), 3)

    compiled = jax.jit(per_element).lower(x, np.repeat(x, 3)).compile()
    got = compiled(x, np.repeat(x, 3))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.repeat(x, 3) + np.repeat(x * 2, 3))
    # The doubling runs in a kernel of its own (one value per block), not in the loop over all.
    entry = compiled.as_text().split("ENTRY", 1)[1]
    fusion_shapes = [
        line.split("=", 1)[1].split()[0] for line in entry.splitlines() if " fusion(" in line
    ]
    assert any(f"[{x.size}]" in shape for shape in fusion_shapes), fusion_shapes
