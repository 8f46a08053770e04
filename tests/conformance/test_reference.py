"""Tests that prove the NumPy reference (tests/reference.py) against independent facts.

* Numbers from the semantics document (Keras 3, TF2, TF1; float32 runs of the
  real systems, hence rtol 2e-6).
* Real ``torch.optim.RMSprop`` in float64 (PyTorch's conventions: eps outside
  the sqrt, lr outside the momentum buffer), to ~1e-12.
* Real ``optax.rmsprop`` in float32 in this process (x64 is never enabled here,
  so other test modules are unaffected) and in float64 in a subprocess.
* Hand-derived properties: the centered clamp, the epsilon == 0 guard, complex
  numbers, the learning-rate forms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

try:
    from reference import assert_close, reference_rmsprop, ulp_distance
except ImportError:  # tests/ collected as a package
    from tests.reference import assert_close, reference_rmsprop, ulp_distance


# Section 1 of the spec: lr=0.1, w0=[1,2], three gradients.
W0 = np.array([1.0, 2.0])
GRADS3 = [np.array([0.1, 0.2]), np.array([0.3, -0.4]), np.array([-0.5, 0.6])]
SPEC_RTOL = 2e-6  # spec numbers come from float32 runs


def _random_problem(seed, shape=(3, 4), steps=6, complex_=False, zeros=True):
    rng = np.random.default_rng(seed)

    def draw():
        x = rng.normal(size=shape) * rng.choice([0.01, 0.1, 1.0, 3.0], size=shape)
        if complex_:
            x = x + 1j * rng.normal(size=shape) * 0.5
        return x

    w0 = draw()
    grads = [draw() for _ in range(steps)]
    if zeros:
        grads[1].flat[0] = 0.0  # exercise zero gradients (and a zero velocity entry)
        grads[2].flat[0] = 0.0
    return w0, grads


# ---------------------------------------------------------------------------
# Numbers from the semantics document
# ---------------------------------------------------------------------------


def test_keras_docstring_example():
    traj, state = reference_rmsprop(np.array(10.0), [np.array(10.0)], learning_rate=0.1)
    assert_close(traj[0], 9.683772, rtol=1e-6)
    # float32 0x411af0bb is the Keras result; the reference rounds to it.
    keras32 = np.array([0x411AF0BB], dtype=np.uint32).view(np.float32)[0]
    assert ulp_distance(np.float32(keras32), traj[0]) <= 1
    assert state["average_gradient"] is None and state["momentum"] is None


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {},
            [[0.68378806, 1.6837761], [0.38227823, 1.9694897], [0.65380049, 1.7104261]],
        ),
        (
            {"centered": True},
            [[0.66668516, 1.6666713], [0.33895037, 1.9559792], [0.61136585, 1.6929227]],
        ),
        (
            {"momentum": 0.9},
            [[0.68378806, 1.6837761], [0.097687483, 1.6848882], [-0.15828073, 1.4268255]],
        ),
    ],
    ids=["plain", "centered", "momentum"],
)
def test_keras3_trajectories(kwargs, expected):
    traj, _ = reference_rmsprop(W0, GRADS3, learning_rate=0.1, rho=0.9, epsilon=1e-7, **kwargs)
    assert_close(np.stack(traj), np.array(expected), rtol=SPEC_RTOL)


def test_tf2_momentum0_eps_outside_sqrt():
    traj, _ = reference_rmsprop(
        W0, GRADS3, learning_rate=0.1, rho=0.9, epsilon=1e-7, eps_in_sqrt=False
    )
    expected = [[0.68377328, 1.6837728], [0.38226226, 1.9694868], [0.65378475, 1.7104231]]
    assert_close(np.stack(traj), np.array(expected), rtol=SPEC_RTOL)


def test_tf2_momentum_fused_kernel():
    traj, _ = reference_rmsprop(W0, GRADS3, learning_rate=0.1, momentum=0.9)
    expected = [[0.68378806, 1.6837763], [0.097687483, 1.6848884], [-0.15828076, 1.4268258]]
    assert_close(np.stack(traj), np.array(expected), rtol=SPEC_RTOL)


def test_tf2_inverse_time_decay_as_callable_lr():
    # TF2 `decay=0.5`: lr_t = lr / (1 + decay*t), momentum-0 path (eps outside sqrt).
    traj, _ = reference_rmsprop(
        W0,
        GRADS3,
        learning_rate=lambda t: 0.1 / (1.0 + 0.5 * t),
        eps_in_sqrt=False,
    )
    expected = [[0.68377328, 1.6837728], [0.48276591, 1.8742489], [0.61852717, 1.744717]]
    assert_close(np.stack(traj), np.array(expected), rtol=SPEC_RTOL)


def test_tf1_ones_initial_accumulator():
    traj, state = reference_rmsprop(
        W0,
        GRADS3[:1],
        learning_rate=0.1,
        rho=0.9,
        epsilon=1e-10,
        initial_accumulator_value=1.0,
    )
    assert_close(traj[0], [0.98946494, 1.9789648], rtol=SPEC_RTOL)
    assert_close(state["velocity"], [0.901, 0.904], rtol=1e-14)


# ---------------------------------------------------------------------------
# Hand-derived properties
# ---------------------------------------------------------------------------


def test_state_and_dtypes():
    w0 = np.array([1.0, 2.0], dtype=np.float32)
    traj, state = reference_rmsprop(
        w0, [g.astype(np.float32) for g in GRADS3], centered=True, momentum=0.5
    )
    assert len(traj) == 3
    assert all(t.dtype == np.float64 for t in traj)
    assert set(state) == {"velocity", "average_gradient", "momentum"}
    assert state["velocity"].dtype == np.float64
    assert state["average_gradient"].shape == (2,)
    assert state["momentum"].shape == (2,)
    assert traj[0] is not traj[1]
    # Input is not modified.
    np.testing.assert_array_equal(w0, np.array([1.0, 2.0], dtype=np.float32))


def test_velocity_and_average_by_hand():
    _, state = reference_rmsprop(W0, GRADS3, centered=True, rho=0.8)
    v = np.zeros(2)
    a = np.zeros(2)
    for g in GRADS3:
        v = 0.8 * v + 0.2 * g * g
        a = 0.8 * a + 0.2 * g
    assert_close(state["velocity"], v, rtol=1e-15)
    assert_close(state["average_gradient"], a, rtol=1e-15)


def test_learning_rate_forms_agree():
    a, _ = reference_rmsprop(W0, GRADS3, learning_rate=0.05, momentum=0.9)
    b, _ = reference_rmsprop(W0, GRADS3, learning_rate=lambda t: 0.05, momentum=0.9)
    c, _ = reference_rmsprop(W0, GRADS3, learning_rate=[0.05, 0.05, 0.05], momentum=0.9)
    d, _ = reference_rmsprop(W0, GRADS3, learning_rate=np.full(3, 0.05), momentum=0.9)
    for other in (b, c, d):
        np.testing.assert_array_equal(np.stack(a), np.stack(other))


def test_schedule_sees_step_before_update():
    seen = []

    def lr(step):
        seen.append(step)
        return 0.1

    reference_rmsprop(W0, GRADS3, learning_rate=lr)
    assert seen == [0, 1, 2]


def test_lr_in_momentum_equivalent_for_constant_lr_only():
    kw = dict(momentum=0.9, centered=True)
    keras, sk = reference_rmsprop(W0, GRADS3, learning_rate=0.1, lr_in_momentum=True, **kw)
    torch_, st = reference_rmsprop(W0, GRADS3, learning_rate=0.1, lr_in_momentum=False, **kw)
    assert_close(np.stack(keras), np.stack(torch_), rtol=1e-14)
    assert_close(sk["momentum"], 0.1 * st["momentum"], rtol=1e-14)
    # With a changing lr the conventions differ: the buffer remembers old lrs or not.
    sched = [0.1, 0.01, 0.5]
    keras, _ = reference_rmsprop(W0, GRADS3, learning_rate=sched, lr_in_momentum=True, **kw)
    torch_, _ = reference_rmsprop(W0, GRADS3, learning_rate=sched, lr_in_momentum=False, **kw)
    assert not np.allclose(keras[-1], torch_[-1], rtol=1e-3)


def test_nesterov_by_hand():
    traj, _ = reference_rmsprop(
        W0, GRADS3[:2], learning_rate=0.1, momentum=0.9, nesterov=True, epsilon=0.0
    )
    # step 1: v = 0.1 g^2, s = lr*g/sqrt(v) = 0.1*sign(g)/sqrt(0.1); m = s; update = s + 0.9*m
    s1 = 0.1 * np.sign(GRADS3[0]) / np.sqrt(0.1)
    w1 = W0 - 1.9 * s1
    v2 = 0.9 * 0.1 * GRADS3[0] ** 2 + 0.1 * GRADS3[1] ** 2
    s2 = 0.1 * GRADS3[1] / np.sqrt(v2)
    m2 = 0.9 * s1 + s2
    w2 = w1 - (s2 + 0.9 * m2)
    assert_close(traj[0], w1, rtol=1e-14)
    assert_close(traj[1], w2, rtol=1e-14)


def test_bias_correction_by_hand():
    traj, state = reference_rmsprop(
        W0, GRADS3[:2], learning_rate=0.1, bias_correction=True, epsilon=1e-7
    )
    # First step: v_hat = g^2 exactly, so the step is lr*g/sqrt(g^2 + eps) ~ lr*sign(g).
    assert_close(traj[0], W0 - 0.1 * GRADS3[0] / np.sqrt(GRADS3[0] ** 2 + 1e-7), rtol=1e-14)
    v2 = 0.9 * 0.1 * GRADS3[0] ** 2 + 0.1 * GRADS3[1] ** 2
    assert_close(state["velocity"], v2, rtol=1e-14)  # stored velocity is NOT corrected
    w2 = traj[0] - 0.1 * GRADS3[1] / np.sqrt(v2 / (1 - 0.81) + 1e-7)
    assert_close(traj[1], w2, rtol=1e-14)


def test_maximize_negates_gradient():
    w0, grads = _random_problem(1)
    kw = dict(learning_rate=0.01, centered=True, momentum=0.9, nesterov=True)
    up, _ = reference_rmsprop(w0, grads, maximize=True, **kw)
    down, _ = reference_rmsprop(w0, [-g for g in grads], **kw)
    np.testing.assert_array_equal(np.stack(up), np.stack(down))


def test_centered_clamp_at_zero():
    # centered + bias_correction, first step: v_hat == |a_hat|^2 in exact arithmetic, but
    # for g = 0.1 float64 rounding gives v_hat - a_hat^2 = -1.7e-18. Without the clamp,
    # eps outside the sqrt would give sqrt(negative) = NaN.
    g = np.array([0.1])
    v = 0.1 * g * g
    a = 0.1 * g
    assert (v / 0.1 - (a / 0.1) ** 2)[0] < 0  # the premise of this test
    traj, _ = reference_rmsprop(
        np.array([1.0]),
        [g],
        learning_rate=1e-3,
        centered=True,
        bias_correction=True,
        eps_in_sqrt=False,
        epsilon=1e-3,
    )
    assert np.all(np.isfinite(traj[0]))
    assert_close(traj[0], 1.0 - 1e-3 * 0.1 / 1e-3, rtol=1e-15)  # var clamped to exactly 0


def test_epsilon_zero_guard():
    # Hinton's RMSprop has no epsilon; a zero gradient with zero velocity must not give NaN.
    w0 = np.array([1.0, 2.0, 3.0])
    grads = [np.array([0.0, 0.5, 0.0]), np.array([0.0, 0.0, 1.0])]
    for eps_in_sqrt in (True, False):
        for centered in (False, True):
            traj, _ = reference_rmsprop(
                w0,
                grads,
                learning_rate=0.1,
                epsilon=0.0,
                eps_in_sqrt=eps_in_sqrt,
                centered=centered,
                momentum=0.9,
            )
            assert all(np.all(np.isfinite(t)) for t in traj)
            assert traj[1][0] == 1.0  # never-touched coordinate stays put
    # Plain Hinton step: g/sqrt(0.1 g^2) = sign(g)/sqrt(0.1).
    traj, _ = reference_rmsprop(w0, grads[:1], learning_rate=0.1, epsilon=0.0)
    assert_close(traj[0], [1.0, 2.0 - 0.1 / np.sqrt(0.1), 3.0], rtol=1e-15)


def test_complex_uses_squared_modulus():
    w0 = np.array([1.0 + 1.0j])
    g = np.array([3.0 + 4.0j])
    traj, state = reference_rmsprop(w0, [g], learning_rate=0.1, epsilon=1e-7, centered=True)
    assert traj[0].dtype == np.complex128
    assert state["velocity"].dtype == np.float64
    assert state["average_gradient"].dtype == np.complex128
    assert_close(state["velocity"], [2.5], rtol=1e-15)  # 0.1 * |3+4i|^2
    var = 2.5 - abs(0.1 * g) ** 2  # 2.5 - 0.25
    assert_close(traj[0], w0 - 0.1 * g / np.sqrt(var + 1e-7), rtol=1e-15)


def test_complex_with_zero_imaginary_part_matches_real():
    w0, grads = _random_problem(2)
    kw = dict(learning_rate=0.01, centered=True, momentum=0.9, bias_correction=True)
    real, sr = reference_rmsprop(w0, grads, **kw)
    cplx, sc = reference_rmsprop(w0.astype(complex), [g.astype(complex) for g in grads], **kw)
    assert_close(np.stack(cplx).imag, 0.0, atol=0.0)
    assert_close(np.stack(cplx).real, np.stack(real), rtol=1e-15)
    assert_close(sc["velocity"], sr["velocity"], rtol=1e-15)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        reference_rmsprop(W0, [np.array([1.0j, 0.0])])
    with pytest.raises(ValueError):
        reference_rmsprop(W0, [np.zeros(3)])


# ---------------------------------------------------------------------------
# Cross-check against the real torch.optim.RMSprop (float64)
# ---------------------------------------------------------------------------


def _run_torch(w0, grads, lr, rho, eps, momentum=0.0, centered=False, maximize=False):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    lrs = [lr] * len(grads) if np.ndim(lr) == 0 else list(lr)
    opt = torch.optim.RMSprop(
        [p],
        lr=lrs[0],
        alpha=rho,
        eps=eps,
        momentum=momentum,
        centered=centered,
        maximize=maximize,
        foreach=False,
    )
    out = []
    for g, step_lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = step_lr
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().numpy().copy())
    st = opt.state[p]
    state = {
        "velocity": st["square_avg"].numpy().copy(),
        "average_gradient": st["grad_avg"].numpy().copy() if centered else None,
        "momentum": st["momentum_buffer"].numpy().copy() if momentum > 0 else None,
    }
    return out, state


TORCH_CASES = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True),
    "centered_momentum": dict(centered=True, momentum=0.5),
    "maximize": dict(maximize=True, momentum=0.9),
    "lr_schedule": dict(momentum=0.9, lr=[0.01, 0.003, 0.02, 0.001, 0.01, 0.005]),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_matches_torch_float64(name):
    case = dict(TORCH_CASES[name])
    lr = case.pop("lr", 0.01)
    w0, grads = _random_problem(10)
    rho, eps = 0.99, 1e-8
    got, gstate = _run_torch(w0, grads, lr, rho, eps, **case)
    ref, rstate = reference_rmsprop(
        w0,
        grads,
        learning_rate=lr,
        rho=rho,
        epsilon=eps,
        eps_in_sqrt=False,
        lr_in_momentum=False,
        momentum=case.get("momentum", 0.0),
        centered=case.get("centered", False),
        maximize=case.get("maximize", False),
    )
    assert_close(np.stack(ref), np.stack(got), rtol=1e-12, atol=1e-14)
    for key in ("velocity", "average_gradient", "momentum"):
        if rstate[key] is None:
            assert gstate[key] is None
        else:
            assert_close(rstate[key], gstate[key], rtol=1e-12, atol=1e-14, err_msg=key)


# ---------------------------------------------------------------------------
# Cross-check against the real optax.rmsprop
# ---------------------------------------------------------------------------

# (reference kwargs); optax gets the same through _optax_kwargs. lr may be a list
# (turned into a schedule indexed by optax's count).
OPTAX_CASES = {
    "plain": dict(),
    "eps_outside": dict(eps_in_sqrt=False),
    "centered": dict(centered=True),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "bias_correction": dict(bias_correction=True),
    "bias_nesterov_eps_outside": dict(
        bias_correction=True, momentum=0.8, nesterov=True, eps_in_sqrt=False
    ),
    "initial_scale": dict(initial_accumulator_value=1.0, epsilon=1e-10),
    "centered_momentum_initial_scale": dict(
        centered=True, momentum=0.9, initial_accumulator_value=0.5
    ),
    # Away from the step-1 degeneracy (v_hat == |a_hat|^2): large eps inside the sqrt.
    "centered_bias_correction": dict(centered=True, bias_correction=True, epsilon=0.1),
    "schedule": dict(momentum=0.9, learning_rate=[0.01, 0.003, 0.02, 0.001, 0.01, 0.005]),
    "complex": dict(complex_=True, centered=True, momentum=0.9, nesterov=True),
}

# Shared by this process (float32) and the float64 subprocess.
_OPTAX_RUNNER = textwrap.dedent(
    """
    def run_optax(w0, grads, case, dtype):
        import jax.numpy as jnp
        import numpy as np
        import optax

        lr = case.get("learning_rate", 0.01)
        if np.ndim(lr) != 0:
            table = jnp.asarray(np.asarray(lr, dtype=np.float64))
            lr_arg = lambda count: table[count].astype(dtype)
        else:
            lr_arg = lr
        mom = case.get("momentum", 0.0)
        opt = optax.rmsprop(
            lr_arg,
            decay=case.get("rho", 0.9),
            eps=case.get("epsilon", 1e-7),
            initial_scale=case.get("initial_accumulator_value", 0.0),
            eps_in_sqrt=case.get("eps_in_sqrt", True),
            centered=case.get("centered", False),
            momentum=mom if mom > 0 else None,
            nesterov=case.get("nesterov", False),
            bias_correction=case.get("bias_correction", False),
        )
        cdtype = {"float32": "complex64", "float64": "complex128"}[dtype]
        dt = cdtype if np.iscomplexobj(w0) else dtype
        w = jnp.asarray(w0, dtype=dt)
        state = opt.init(w)
        out = []
        for g in grads:
            upd, state = opt.update(jnp.asarray(g, dtype=dt), state, w)
            w = optax.apply_updates(w, upd)
            out.append(np.asarray(w))
        return out
    """
)


def _optax_problem(name):
    case = dict(OPTAX_CASES[name])
    complex_ = case.pop("complex_", False)
    w0, grads = _random_problem(20, complex_=complex_)
    return case, w0, grads


def _reference_for(case, w0, grads):
    kw = dict(case)
    kw.setdefault("learning_rate", 0.01)
    kw.setdefault("epsilon", 1e-7)
    return reference_rmsprop(w0, grads, **kw)[0]


@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_matches_optax_float32(name):
    pytest.importorskip("optax")
    namespace = {}
    exec(_OPTAX_RUNNER, namespace)
    case, w0, grads = _optax_problem(name)
    w0_32 = w0.astype(np.complex64 if np.iscomplexobj(w0) else np.float32)
    grads_32 = [g.astype(w0_32.dtype) for g in grads]
    got = namespace["run_optax"](w0_32, grads_32, case, "float32")
    # Feed the reference the float32-rounded inputs so only arithmetic differs.
    ref = _reference_for(case, w0_32, grads_32)
    assert got[0].dtype == w0_32.dtype
    assert_close(np.stack(got), np.stack(ref), rtol=2e-6, atol=1e-6)


def test_matches_optax_float64_subprocess():
    """Enable x64 only in a child process, so no other test module is affected."""
    pytest.importorskip("optax")
    problems = {name: _optax_problem(name) for name in OPTAX_CASES}
    payload = {
        name: {
            "case": case,
            "w0": [np.real(w0).tolist(), np.imag(w0).tolist()],
            "grads": [[np.real(g).tolist(), np.imag(g).tolist()] for g in grads],
            "complex": bool(np.iscomplexobj(w0)),
        }
        for name, (case, w0, grads) in problems.items()
    }
    script = _OPTAX_RUNNER + textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import jax
        jax.config.update("jax_enable_x64", True)
        data = json.load(sys.stdin)
        result = {}
        for name, item in data.items():
            def arr(pair, c=item["complex"]):
                re, im = np.asarray(pair[0]), np.asarray(pair[1])
                return re + 1j * im if c else re
            out = run_optax(arr(item["w0"]), [arr(g) for g in item["grads"]],
                            item["case"], "float64")
            assert out[0].dtype in (np.float64, np.complex128), out[0].dtype
            result[name] = [[np.real(o).tolist(), np.imag(o).tolist()] for o in out]
        json.dump(result, sys.stdout)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    for name, (case, w0, grads) in problems.items():
        got = np.stack(
            [
                np.asarray(re) + (1j * np.asarray(im) if np.iscomplexobj(w0) else 0)
                for re, im in result[name]
            ]
        )
        ref = np.stack(_reference_for(case, w0, grads))
        assert_close(got, ref, rtol=1e-12, atol=1e-14, err_msg=name)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def test_ulp_distance():
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2))
    assert ulp_distance(np.float32([1.0]), [up])[0] == 1
    assert ulp_distance(np.float32([0.0]), np.float32([-0.0]))[0] == 0
    tiny = np.float32(1e-45)  # smallest subnormal
    assert ulp_distance(np.float32([tiny]), np.float32([-tiny]))[0] == 2
    assert ulp_distance(np.float32([np.nan]), np.float32([np.nan]))[0] == 0
    assert ulp_distance(np.float32([np.nan]), np.float32([1.0]))[0] == np.iinfo(np.int64).max
    # float64 expected values are rounded to float32 first.
    assert ulp_distance(np.float32([0.1]), np.array([0.1]))[0] == 0
    # Complex: the larger of the two parts.
    a = np.array([1 + 1j], dtype=np.complex64)
    b = np.array([complex(up, 1.0)], dtype=np.complex64)
    assert ulp_distance(a, b)[0] == 1
    assert ulp_distance(np.float64([1.0]), [np.nextafter(1.0, 0.0)])[0] == 1


def test_assert_close_wrapper():
    assert_close(np.float32([1.0]), [1.0 + 1e-8], rtol=1e-7)
    with pytest.raises(AssertionError, match="tag"):
        assert_close([1.0], [1.1], rtol=1e-3, err_msg="tag")
    assert_close([np.nan], [np.nan])
