"""rmsprop_jax against the real peers: optax, Keras 3 (JAX backend), PyTorch.

Every peer is a hard requirement of the test suite: it is imported at module
top, so a missing peer is a collection error, never a skip.

All comparisons are float32, on small pytrees (two leaves, shapes (3,) and
(2, 2); the second leaf's gradients are small so that epsilon matters), step
by step. The error measure is the normwise relative error per leaf and step,
``max|ours - peer| / max|peer|``: elementwise relative error is meaningless
where a value passes near zero (momentum buffers, parameters crossing 0,
centered variances), there it reached 1e-5 .. 1e-4 from pure rounding.
RMSprop never reads the parameters, so the optax tests compare the updates
themselves, and the Keras / PyTorch trajectory tests start from parameters
of the size of one step (so the step's rounding is not hidden behind the
rounding of large parameter values).

Tolerances, measured on CPU (jax 0.10.2, optax 0.2.8, keras 3.15.1, torch
2.13.0) over nine different seed sets of this module's data; asserted with
about 2x headroom:

* optax ``optax.rmsprop``, all 48 option combinations (initial_scale,
  eps_in_sqrt, centered, momentum None / 0.9 / 0.9+nesterov,
  bias_correction) and an ``optax.exponential_decay`` schedule, per-step
  updates, both inside one ``jax.jit``: max seen 6.9e-7 (~6 ulp of the
  leaf's largest update; worst in centered mode, where ``v - a**2`` cancels);
  asserted ``OPTAX_RTOL = 1.5e-6``. Rounding only: optax computes
  ``-lr * (g * rsqrt(v + eps))``, ours ``-(lr * g) / sqrt(v + eps)``.
* Keras 3 ``keras.optimizers.RMSprop`` run eagerly vs ours under ``jax.jit``,
  per-step parameters: max seen 3.7e-7; asserted ``KERAS_RTOL = 1e-6``.
  Ours run EAGERLY is bit-exact with Keras (same float32 operations in the
  same order), for every config here and the ``ExponentialDecay`` schedule;
  under jit XLA fuses and may rewrite ``x / sqrt(y)`` as ``x * rsqrt(y)``.
  Spec section 1 numbers: the docstring example ``9.683772 == 0x411af0bb`` is
  bit-exact eager and under jit; the plain / centered / momentum trajectories
  are bit-exact eager and within 3.5e-8 (<= 2 ulp) under jit.
* PyTorch ``torch.optim.RMSprop`` vs ours with ``eps_in_sqrt=False,
  lr_in_momentum=False``, per-step parameters, including a learning rate
  changed between steps: max seen 5.4e-7; asserted ``TORCH_RTOL = 1e-6``.
  (PyTorch computes ``w - lr * g / (sqrt(v) + eps)`` with ``addcdiv`` and
  the centered mean with ``lerp``, ours ``(lr * g) / den`` and
  ``rho * a + (1 - rho) * g``.)

Documented deviation from optax: with ``centered=True, bias_correction=True``
and ``initial_scale=0`` step 1 is ill-conditioned (``v_hat - a_hat**2`` is 0
in exact arithmetic, a few ulp of g**2 of either sign after rounding). optax
has no clamp and gives NaN where it rounds negative by more than eps (see
``test_optax_centered_bias_correction_first_step_clamped``); ours clamps at 0
and stays finite and bounded. Step 1 of that combination is therefore not
compared; from step 2 on both are compared from the same state.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
import torch

import rmsprop_jax as rj

if keras.backend.backend() != "jax":
    raise RuntimeError(
        "tests/conformance/test_peers.py needs KERAS_BACKEND=jax (set by tests/conftest.py "
        f"before keras is imported); keras runs on {keras.backend.backend()!r}"
    )

OPTAX_RTOL = 1.5e-6
KERAS_RTOL = 1e-6
TORCH_RTOL = 1e-6

# Largest relative error seen per peer in this run (for the record above).
MAX_SEEN: dict = {}

SHAPES = {"a": (3,), "b": (2, 2)}


def _max_rel(ours, ref) -> float:
    """Normwise relative error: ``max|ours - ref| / max|ref|`` over one leaf and step."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = max(float(np.max(np.abs(ref))), float(np.finfo(np.float32).tiny))
    return float(np.max(np.abs(ours - ref))) / scale


def _assert_rel(ours, ref, rtol, *, peer, what):
    """Asserts the per-step relative error and records the maximum seen."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert np.all(np.isfinite(ref)), f"{peer} {what}: peer not finite: {ref}"
    assert np.all(np.isfinite(ours)), f"{peer} {what}: ours not finite: {ours}"
    err = _max_rel(ours, ref)
    MAX_SEEN[peer] = max(MAX_SEEN.get(peer, 0.0), err)
    assert err <= rtol, f"{peer} {what}: rel err {err:.3g} > {rtol:.3g}\nours={ours}\npeer={ref}"


def _grads(seed: int, steps: int, small_leaf_scale: float):
    """float32 gradients, leaf ``b`` scaled so that epsilon matters there."""
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal((steps,) + SHAPES["a"]).astype(np.float32),
        "b": (small_leaf_scale * rng.standard_normal((steps,) + SHAPES["b"])).astype(np.float32),
    }


def _params(seed: int, scale: float = 1.0):
    """float32 parameters. RMSprop never reads them; the trajectory tests use a
    small ``scale`` (of the order of the steps) so that the per-step error of
    the update is not hidden behind the rounding of large parameter values."""
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


# ---------------------------------------------------------------------------
# 1. optax.rmsprop
# ---------------------------------------------------------------------------

OPTAX_STEPS = 6
OPTAX_LR = 0.01
OPTAX_DECAY = 0.9
OPTAX_EPS = 1e-7

# (momentum, nesterov): optax momentum=None is our momentum=0.
_MOMENTA = [(None, False), (0.9, False), (0.9, True)]
_OPTAX_AXES = {
    "initial_scale": [0.0, 0.1],
    "eps_in_sqrt": [True, False],
    "centered": [False, True],
    "momentum_nesterov": _MOMENTA,
    "bias_correction": [False, True],
}
OPTAX_COMBOS = []
for _values in itertools.product(*_OPTAX_AXES.values()):
    _combo = dict(zip(_OPTAX_AXES, _values))
    _combo["momentum"], _combo["nesterov"] = _combo.pop("momentum_nesterov")
    OPTAX_COMBOS.append(_combo)
assert len(OPTAX_COMBOS) == 48


def _combo_id(c):
    parts = [
        f"s0={c['initial_scale']}",
        "in" if c["eps_in_sqrt"] else "out",
        "centered" if c["centered"] else "plain",
        {(None, False): "nomom", (0.9, False): "mom", (0.9, True): "nesterov"}[
            (c["momentum"], c["nesterov"])
        ],
        "bc" if c["bias_correction"] else "nobc",
    ]
    return "-".join(parts)


def _optax_pair(combo, learning_rate):
    ref = optax.rmsprop(
        learning_rate,
        decay=OPTAX_DECAY,
        eps=OPTAX_EPS,
        initial_scale=combo["initial_scale"],
        eps_in_sqrt=combo["eps_in_sqrt"],
        centered=combo["centered"],
        momentum=combo["momentum"],
        nesterov=combo["nesterov"],
        bias_correction=combo["bias_correction"],
    )
    ours = rj.rmsprop(
        learning_rate=learning_rate,
        rho=OPTAX_DECAY,
        epsilon=OPTAX_EPS,
        initial_accumulator_value=combo["initial_scale"],
        eps_in_sqrt=combo["eps_in_sqrt"],
        centered=combo["centered"],
        momentum=0.0 if combo["momentum"] is None else combo["momentum"],
        nesterov=combo["nesterov"],
        bias_correction=combo["bias_correction"],
    )
    return ref, ours


def _scan_both(ref, ours):
    """One jitted function running both transforms over a gradient sequence.

    RMSprop updates do not read the parameters, so the per-step updates are
    compared directly (stricter than comparing parameters).
    """

    @jax.jit
    def run(ref_state, our_state, grads_seq):
        def body(carry, g):
            rs, os_ = carry
            ru, rs = ref.update(g, rs)
            ou, os_ = ours.update(g, os_)
            return (rs, os_), (ru, ou)

        (ref_state, our_state), (ru, ou) = jax.lax.scan(body, (ref_state, our_state), grads_seq)
        return ref_state, our_state, ru, ou

    return run


def _assert_updates(ru, ou, rtol, peer, steps_offset=0):
    for k in SHAPES:
        for t in range(ru[k].shape[0]):
            _assert_rel(
                ou[k][t], ru[k][t], rtol, peer=peer, what=f"step {t + steps_offset} leaf {k}"
            )


def _degenerate(combo) -> bool:
    return combo["centered"] and combo["bias_correction"] and combo["initial_scale"] == 0.0


@pytest.mark.parametrize("combo", OPTAX_COMBOS, ids=_combo_id)
def test_optax_rmsprop_all_options(combo):
    params = _params(0)
    grads = _grads(1, OPTAX_STEPS, small_leaf_scale=1e-3)
    ref, ours = _optax_pair(combo, OPTAX_LR)
    run = _scan_both(ref, ours)
    if not _degenerate(combo):
        _, _, ru, ou = run(ref.init(params), ours.init(params), grads)
        _assert_updates(ru, ou, OPTAX_RTOL, "optax")
        return

    # centered + bias_correction + initial_scale=0: at step 1, v_hat == a_hat**2
    # in exact arithmetic, so optax's ``v_hat - a_hat**2`` is a few ulp of
    # either sign (NaN under the root, or a step of ~lr*g/sqrt(eps)). Ours
    # clamps at 0: finite, and bounded by lr*|g|/sqrt(eps) (eps in the root)
    # or lr*|g|/eps (eps outside), times 1 + momentum with Nesterov. The
    # step-1 update is not compared (rounding noise amplified ~1/sqrt(eps) in
    # both); the moving averages are, and from step 2 on, the updates.
    first = jax.tree.map(lambda x: x[:1], grads)
    rest = jax.tree.map(lambda x: x[1:], grads)
    ref_state, our_state, _, ou = run(ref.init(params), ours.init(params), first)
    bound = 1 / np.sqrt(OPTAX_EPS) if combo["eps_in_sqrt"] else 1 / OPTAX_EPS
    if combo["nesterov"]:  # step 1 with Nesterov: s + momentum * m = (1 + momentum) * s
        bound *= 1 + combo["momentum"]
    for k in SHAPES:
        u = np.asarray(ou[k][0])
        assert np.all(np.isfinite(u)), u
        assert np.all(np.abs(u) <= OPTAX_LR * np.abs(first[k][0]) * bound * (1 + 1e-6))
    stddev_state = ref_state[0]
    for k in SHAPES:
        _assert_rel(
            our_state.velocity[k],
            stddev_state.nu[k],
            OPTAX_RTOL,
            peer="optax",
            what=f"step 0 nu {k}",
        )
        _assert_rel(
            our_state.average_gradient[k],
            stddev_state.mu[k],
            OPTAX_RTOL,
            peer="optax",
            what=f"step 0 mu {k}",
        )
    # Continue both from OUR state (optax's trace holds -m: its lr scaling is negative).
    transplanted = (
        stddev_state._replace(
            count=our_state.count, mu=our_state.average_gradient, nu=our_state.velocity
        ),
        ref_state[1],
        ref_state[2]
        if combo["momentum"] is None
        else ref_state[2]._replace(trace=jax.tree.map(jnp.negative, our_state.momentum)),
    )
    _, _, ru, ou = run(transplanted, our_state, rest)
    _assert_updates(ru, ou, OPTAX_RTOL, "optax", steps_offset=1)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("momentum,nesterov", _MOMENTA)
def test_optax_centered_bias_correction_first_step_clamped(eps_in_sqrt, momentum, nesterov):
    # For these gradients optax 0.2.8 (centered=True, bias_correction=True)
    # returns NaN at step 1 in both eps modes (jit and eager): v_hat - a_hat**2
    # (0 in exact arithmetic) rounds to a negative number larger than eps.
    # Ours clamps the variance at 0: whatever the rounding (0 or a few ulp of
    # g**2 either side), the denominator is at least sqrt(eps) (or eps), so
    # the step is finite and at most lr*|g|/sqrt(eps) (or lr*|g|/eps), times
    # 1 + momentum with Nesterov.
    g = {"a": np.array([1.3575718402862549, 1.3006839752197266, -2.5459046363830566], np.float32)}
    ours = rj.rmsprop(
        learning_rate=OPTAX_LR,
        rho=OPTAX_DECAY,
        epsilon=OPTAX_EPS,
        centered=True,
        bias_correction=True,
        eps_in_sqrt=eps_in_sqrt,
        momentum=0.0 if momentum is None else momentum,
        nesterov=nesterov,
    )
    u, _ = jax.jit(ours.update)(g, ours.init(g))
    u = np.asarray(u["a"])
    assert np.all(np.isfinite(u)), u
    bound = OPTAX_LR * np.abs(g["a"]) / (np.sqrt(OPTAX_EPS) if eps_in_sqrt else OPTAX_EPS)
    if nesterov:
        bound *= 1 + momentum
    assert np.all(np.abs(u) <= bound * (1 + 1e-6)), (u, bound)
    assert np.all(np.sign(u) == -np.sign(g["a"])), u


@pytest.mark.parametrize(
    "combo",
    [
        c
        for c in OPTAX_COMBOS
        if c["initial_scale"] == 0.0 and not _degenerate(c) and c["eps_in_sqrt"]
    ],
    ids=_combo_id,
)
def test_optax_rmsprop_schedule(combo):
    schedule = optax.exponential_decay(init_value=0.1, transition_steps=2, decay_rate=0.5)
    params = _params(2)
    grads = _grads(3, OPTAX_STEPS, small_leaf_scale=1e-3)
    ref, ours = _optax_pair(combo, schedule)
    _, _, ru, ou = _scan_both(ref, ours)(ref.init(params), ours.init(params), grads)
    _assert_updates(ru, ou, OPTAX_RTOL, "optax")


# ---------------------------------------------------------------------------
# 2. Keras 3 keras.optimizers.RMSprop (eager) vs ours under jax.jit
# ---------------------------------------------------------------------------

KERAS_STEPS = 8

# (learning_rate, rho, epsilon): Keras defaults, the docstring's lr, and a
# large epsilon with a short memory.
_KERAS_HYPER = [(0.001, 0.9, 1e-7), (0.1, 0.9, 1e-7), (0.05, 0.5, 1e-3)]
KERAS_CONFIGS = [
    {"learning_rate": lr, "rho": rho, "epsilon": eps, "momentum": mom, "centered": cen}
    for (lr, rho, eps), mom, cen in itertools.product(_KERAS_HYPER, [0.0, 0.9], [False, True])
]


def _keras_id(c):
    return f"lr={c['learning_rate']}-rho={c['rho']}-eps={c['epsilon']}-mom={c['momentum']}-" + (
        "centered" if c["centered"] else "plain"
    )


def _keras_trajectory(params, grads, **kwargs):
    """Runs keras.optimizers.RMSprop eagerly; returns per-step parameters."""
    variables = {k: keras.Variable(v, name=f"w_{k}") for k, v in params.items()}
    opt = keras.optimizers.RMSprop(**kwargs)
    steps = next(iter(grads.values())).shape[0]
    out = {k: [] for k in params}
    for t in range(steps):
        opt.apply_gradients([(jnp.asarray(grads[k][t]), variables[k]) for k in params])
        for k in params:
            out[k].append(np.asarray(variables[k].value))
    return {k: np.stack(v) for k, v in out.items()}


def _our_trajectory(tx, params, grads, *, jit=True):
    """Runs ``tx`` step by step (one jitted step function, or eagerly);
    returns per-step parameters."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    if jit:
        step = jax.jit(step)

    p = jax.tree.map(jnp.asarray, params)
    s = tx.init(p)
    steps = next(iter(grads.values())).shape[0]
    out = {k: [] for k in params}
    for t in range(steps):
        p, s = step(p, s, {k: grads[k][t] for k in params})
        for k in params:
            out[k].append(np.asarray(p[k]))
    return {k: np.stack(v) for k, v in out.items()}


def _assert_trajectories(ours, ref, rtol, peer):
    for k in ref:
        for t in range(ref[k].shape[0]):
            _assert_rel(ours[k][t], ref[k][t], rtol, peer=peer, what=f"step {t} leaf {k}")


def _assert_bit_exact(ours, ref, peer):
    for k in ref:
        for t in range(ref[k].shape[0]):
            o = np.asarray(ours[k][t], np.float32)
            r = np.asarray(ref[k][t], np.float32)
            assert np.array_equal(o.view(np.uint32), r.view(np.uint32)), (
                f"{peer} step {t} leaf {k}: not bit-exact\nours={o!r}\npeer={r!r}"
            )


@pytest.mark.parametrize("config", KERAS_CONFIGS, ids=_keras_id)
def test_keras_rmsprop(config):
    params = _params(4, scale=config["learning_rate"])
    grads = _grads(5, KERAS_STEPS, small_leaf_scale=1e-3)
    ref = _keras_trajectory(params, grads, **config)
    tx = rj.rmsprop(**config)
    _assert_trajectories(_our_trajectory(tx, params, grads), ref, KERAS_RTOL, "keras")
    # Eagerly, ours performs Keras's float32 operations in Keras's order: the
    # same bits. (Under jit XLA may fuse / rewrite, hence KERAS_RTOL above.)
    _assert_bit_exact(_our_trajectory(tx, params, grads, jit=False), ref, "keras (eager)")


@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.9, True)])
def test_keras_learning_rate_schedule(momentum, centered):
    # A Keras schedule object is a callable step -> lr; Keras evaluates it at
    # its iteration counter, ours at the count of steps taken: the same.
    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5)

    params = _params(6, scale=0.1)
    grads = _grads(7, KERAS_STEPS, small_leaf_scale=1e-2)
    ref = _keras_trajectory(
        params, grads, learning_rate=schedule(), momentum=momentum, centered=centered
    )
    tx = rj.rmsprop(learning_rate=schedule(), momentum=momentum, centered=centered)
    _assert_trajectories(_our_trajectory(tx, params, grads), ref, KERAS_RTOL, "keras")
    _assert_bit_exact(_our_trajectory(tx, params, grads, jit=False), ref, "keras (eager)")


def _f32_bits(x) -> int:
    return int(np.asarray(x, np.float32).reshape(()).view(np.uint32))


def test_keras_docstring_example_bit_exact():
    # Spec section 1: lr=0.1, w=10, g=w, one step -> 9.683772 == 0x411af0bb.
    tx = rj.rmsprop(learning_rate=0.1)
    w = {"w": jnp.array([10.0], jnp.float32)}
    expected = 0x411AF0BB
    u, _ = tx.update(w, tx.init(w), w)  # eager
    assert _f32_bits(optax.apply_updates(w, u)["w"]) == expected
    step = jax.jit(lambda w, s: optax.apply_updates(w, tx.update(w, s, w)[0]))
    assert _f32_bits(step(w, tx.init(w))["w"]) == expected
    # And Keras itself, so the constant is the peer's, not only the spec's.
    var = keras.Variable(np.array([10.0], np.float32))
    keras.optimizers.RMSprop(learning_rate=0.1).apply_gradients([(var.value, var)])
    assert _f32_bits(var.value) == expected


_SPEC_GRADS = np.array([[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]], np.float32)
_SPEC_TRAJECTORIES = {
    "plain": ({}, [[0.68378806, 1.6837761], [0.38227823, 1.9694897], [0.65380049, 1.7104261]]),
    "centered": (
        {"centered": True},
        [[0.66668516, 1.6666713], [0.33895037, 1.9559792], [0.61136585, 1.6929227]],
    ),
    "momentum": (
        {"momentum": 0.9},
        [[0.68378806, 1.6837761], [0.097687483, 1.6848882], [-0.15828073, 1.4268255]],
    ),
}


@pytest.mark.parametrize("name", list(_SPEC_TRAJECTORIES))
def test_keras_spec_reference_trajectories(name):
    kwargs, expected = _SPEC_TRAJECTORIES[name]
    expected = {"w": np.array(expected, np.float32)}
    params = {"w": np.array([1.0, 2.0], np.float32)}
    grads = {"w": _SPEC_GRADS}
    tx = rj.rmsprop(learning_rate=0.1, **kwargs)
    # The spec's numbers are Keras's eager float32 results, printed exactly:
    # eager, ours reproduces them bit for bit; under jit within KERAS_RTOL.
    _assert_bit_exact(_our_trajectory(tx, params, grads, jit=False), expected, "keras spec (eager)")
    _assert_trajectories(
        _our_trajectory(tx, params, grads), expected, KERAS_RTOL, "keras spec (jit)"
    )
    # And Keras itself still produces them (guards the spec against the peer).
    keras_traj = _keras_trajectory(params, grads, learning_rate=0.1, **kwargs)
    _assert_bit_exact(keras_traj, expected, "keras spec (keras itself)")


# ---------------------------------------------------------------------------
# 3. torch.optim.RMSprop vs rj.rmsprop(eps_in_sqrt=False, lr_in_momentum=False)
# ---------------------------------------------------------------------------

TORCH_STEPS = 8

# (lr, alpha, eps): torch's defaults, and a short memory with an epsilon that
# dominates sqrt(v) on the small-gradient leaf.
_TORCH_HYPER = [(1e-2, 0.99, 1e-8), (0.05, 0.9, 1e-3)]
TORCH_CONFIGS = [
    {"lr": lr, "alpha": alpha, "eps": eps, "momentum": mom, "centered": cen, "maximize": mx}
    for (lr, alpha, eps), mom, cen, mx in itertools.product(
        _TORCH_HYPER, [0.0, 0.9], [False, True], [False, True]
    )
]


def _torch_id(c):
    return f"lr={c['lr']}-alpha={c['alpha']}-eps={c['eps']}-mom={c['momentum']}-" + "-".join(
        [("centered" if c["centered"] else "plain"), ("max" if c["maximize"] else "min")]
    )


def _torch_trajectory(params, grads, lrs=None, foreach=None, **kwargs):
    tensors = {
        k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in params.items()
    }
    opt = torch.optim.RMSprop(list(tensors.values()), foreach=foreach, **kwargs)
    steps = next(iter(grads.values())).shape[0]
    out = {k: [] for k in params}
    for t in range(steps):
        if lrs is not None:
            opt.param_groups[0]["lr"] = float(lrs[t])
        for k, p in tensors.items():
            p.grad = torch.tensor(grads[k][t], dtype=torch.float32)
        opt.step()
        for k, p in tensors.items():
            out[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


def _ours_like_torch(learning_rate, c):
    return rj.rmsprop(
        learning_rate=learning_rate,
        rho=c["alpha"],
        epsilon=c["eps"],
        momentum=c["momentum"],
        centered=c["centered"],
        maximize=c["maximize"],
        eps_in_sqrt=False,
        lr_in_momentum=False,
    )


@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=_torch_id)
def test_torch_rmsprop(config):
    params = _params(8, scale=config["lr"])
    grads = _grads(9, TORCH_STEPS, small_leaf_scale=1e-3)
    ref = _torch_trajectory(params, grads, **config)
    ours = _our_trajectory(_ours_like_torch(config["lr"], config), params, grads)
    _assert_trajectories(ours, ref, TORCH_RTOL, "torch")


@pytest.mark.parametrize(
    "momentum,centered,foreach",
    [(0.0, False, False), (0.9, False, False), (0.9, True, False), (0.9, True, True)],
)
def test_torch_learning_rate_changed_between_steps(momentum, centered, foreach):
    # torch re-reads group['lr'] every step and multiplies the momentum buffer
    # by it (lr outside the buffer), so a changed lr acts at once on the whole
    # buffer; ours: a schedule count -> lr with lr_in_momentum=False.
    lrs = np.array([0.05, 0.02, 0.1, 0.01, 0.01, 0.03, 0.2, 0.001], np.float32)
    config = {
        "lr": float(lrs[0]),
        "alpha": 0.9,
        "eps": 1e-8,
        "momentum": momentum,
        "centered": centered,
        "maximize": False,
    }
    params = _params(10, scale=0.05)
    grads = _grads(11, TORCH_STEPS, small_leaf_scale=1e-2)
    ref = _torch_trajectory(params, grads, lrs=lrs, foreach=foreach, **config)
    lr_table = jnp.asarray(lrs)
    ours = _our_trajectory(_ours_like_torch(lambda count: lr_table[count], config), params, grads)
    _assert_trajectories(ours, ref, TORCH_RTOL, "torch")
