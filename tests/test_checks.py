"""``_checks.with_state_check``: a state built with other options is refused, naming the option.

Every entry point (``rj.rmsprop``, ``rj.rmsprop_update``, the presets) checks the
optimizer state against the options it was built with, at trace time; with the
same options the compiled step is the unchecked transform's (issue 13's case of a
restored state vs config).
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from _jit import CountingJit

import rmsprop_jax as rj

P = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(3)}
G = {"w": jnp.full((64, 80), 0.1), "b": jnp.full(3, -0.2)}

# -- a state built with other options is refused at trace time, naming the option -------------

MISMATCHES = [
    ("momentum", dict(momentum=0.9), {}),
    ("momentum", {}, dict(momentum=0.9)),
    ("centered", dict(centered=True), {}),
    ("learning_rate", dict(learning_rate=optax.constant_schedule(0.1)), {}),
    ("bias_correction", dict(bias_correction=True), {}),
    ("accumulator_dtype", dict(accumulator_dtype="int8"), {}),
    ("accumulator_dtype", {}, dict(accumulator_dtype="int8")),
    ("accumulator_dtype", dict(accumulator_dtype=jnp.bfloat16), {}),
    ("use_ema", dict(use_ema=True), {}),
    ("gradient_accumulation_steps", dict(gradient_accumulation_steps=2), {}),
]


@pytest.mark.parametrize("option, ours, theirs", MISMATCHES)
@pytest.mark.parametrize("jitted", [False, True])
def test_state_from_other_options_is_refused_naming_the_option(option, ours, theirs, jitted):
    tx, other = rj.rmsprop(**ours), rj.rmsprop(**theirs)
    update = jax.jit(tx.update) if jitted else tx.update
    with pytest.raises(ValueError, match=rf"not built by a transform with these options.*{option}"):
        update(G, other.init(P), P)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: rj.rmsprop_update(**kw),
        lambda **kw: rj.presets.torch(**kw),
        lambda **kw: rj.presets.tf1(0.1, **kw),
    ],
)
def test_every_entry_point_checks_the_state(make):
    with pytest.raises(ValueError, match="decided by: momentum"):
        make(momentum=0.9).update(G, make().init(P), P)


def test_same_options_still_update_and_cost_nothing_at_run_time():
    tx = rj.rmsprop(0.1, momentum=0.9, use_ema=True)
    state = tx.init(P)
    step = CountingJit(tx.update)
    for _ in range(3):
        _, state = step(G, state, P)
    assert step.traces == 1
    # Trace-time only: the compiled step is the unchecked transform's, op for op.
    unchecked = rj.rmsprop(0.1, momentum=0.9, use_ema=True)
    tx = rj._checks.with_state_check(unchecked, "the test")

    def ops(update):
        text = jax.jit(update).lower(G, state, P).compile().as_text()
        return sorted(
            line.split("=")[1].split("(")[0].strip()
            for line in text.splitlines()
            if " = " in line and "ENTRY" not in line
        )

    assert ops(tx.update) == ops(unchecked.update)
