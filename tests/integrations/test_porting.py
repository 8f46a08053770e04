"""Optimizer-state porting (``rj.porting``) against the real peers, mid-training.

PyTorch (``torch.optim.RMSprop`` vs ``rj.presets.torch`` / ``rj.param_groups``):

* torch -> ours: 5 steps in torch, ``copy.deepcopy(opt.state_dict())`` (its tensors are live
  references to torch's state: the copy is taken at step 5 and imported only after torch
  has run on to step 10), ``rj.porting.import_torch_state(tx.init(params5), sd, params5)``,
  5 steps of ours == torch's steps 6..10.
* ours -> torch: 5 steps of ours, ``export_torch_state(state5, params5,
  param_groups=opt.state_dict()["param_groups"])``, ``opt.load_state_dict`` on a fresh
  optimizer over params5, 5 torch steps == our steps 6..10.
* configs: plain, momentum, centered (+momentum), coupled L2 (+maximize), and a learning
  rate changed before every step (torch: ``param_groups[0]["lr"]``; ours: a schedule whose
  count must come from torch's ``step`` on import, and goes back as ``step`` on export);
  ``order=[path names]`` when the pytree's leaf order is not torch's; two param groups
  (``rj.param_groups``); the errors.

Keras (``keras.optimizers.RMSprop`` eager, KERAS_BACKEND=jax, vs ``rj.RMSprop``):

* keras -> ours: 5 Keras steps, ``import_keras_state(rj_opt, rj_opt.init(params5),
  keras_opt)``, 5 steps of ``jax.jit(rj_opt.stateless_apply)`` == Keras' steps 6..10, plus
  ``iterations`` after every step and ``finalize_variable_values`` (EMA) at the end.
* ours -> keras: 5 steps of ours, ``export_keras_state`` into a fresh Keras optimizer built
  on params5, 5 Keras steps == our steps 6..10.
* configs: momentum, centered, EMA (with overwrite), gradient accumulation 2 (ported in the
  middle of an accumulation cycle: call 5 of 2-step cycles), and everything at once with a
  learning-rate schedule (the counters of every transform must follow Keras' iteration).

Error measure: normwise relative error per leaf and step, ``max|ours - peer| / max|peer|``
(see tests/conformance/test_peers.py). Measured (jax 0.10.2, keras 3.15.1, torch 2.13.0, CPU): torch
max 2.2e-7, Keras max 2.4e-7; asserted ``RTOL = 1e-6`` (the peer tests' bound).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
import torch

import rmsprop_jax as rj
from rmsprop_jax.integrations import porting

RTOL = 1e-6
MAX_SEEN: dict = {}
STEPS = 10
HALF = 5


@pytest.fixture(scope="module", autouse=True)
def _report_max_seen():
    yield
    if MAX_SEEN:
        print("\nmax normwise relative error (test_porting):")
        for kind, err in sorted(MAX_SEEN.items()):
            print(f"  {kind}: {err:.3g}")


def _rel(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ref)) and np.all(np.isfinite(ours)), (ours, ref)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _check_steps(ours: list, ref: list, kind: str, what: str = ""):
    """Per-step params (lists of dicts name -> array) within RTOL, normwise per leaf."""
    assert len(ours) == len(ref)
    for t, (o, r) in enumerate(zip(ours, ref)):
        for name in r:
            err = _rel(o[name], r[name])
            MAX_SEEN[kind] = max(MAX_SEEN.get(kind, 0.0), err)
            assert err <= RTOL, (
                f"{kind} {what} step {t + 1} of the second half, {name}: rel err {err:.3g}\n"
                f"ours={np.asarray(o[name]).tolist()}\npeer={np.asarray(r[name]).tolist()}"
            )


def _snapshot(tree: dict) -> dict:
    return {k: np.array(v) for k, v in tree.items()}


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

# torch's parameter order; our params dicts flatten in sorted key order, so "a" < "b"
# keeps torch's order (the order= tests use names that do not).
TORCH_SHAPES = {"a": (3, 2), "b": (4,)}
LRS = np.array([0.05, 0.02, 0.1, 0.01, 0.03, 0.2, 0.004, 0.05, 0.08, 0.01], np.float32)


def _torch_data(shapes=TORCH_SHAPES, seed=0):
    rng = np.random.RandomState(seed)
    params = {n: (0.1 * rng.randn(*s)).astype(np.float32) for n, s in shapes.items()}
    grads = {n: rng.randn(STEPS, *s).astype(np.float32) for n, s in shapes.items()}
    return params, grads


class _Torch:
    """A torch.optim.RMSprop over named tensors, stepped with given gradients."""

    def __init__(self, params: dict, names: list, groups=None, **kwargs):
        self.tensors = {n: torch.tensor(params[n].copy(), requires_grad=True) for n in names}
        if groups is None:
            groups = [list(names)]
        self.opt = torch.optim.RMSprop(
            [
                {"params": [self.tensors[n] for n in g["names"]], **g["options"]}
                if isinstance(g, dict)
                else {"params": [self.tensors[n] for n in g]}
                for g in groups
            ],
            **kwargs,
        )

    def steps(self, grads: dict, start: int, stop: int, lrs=None) -> list:
        out = []
        for t in range(start, stop):
            if lrs is not None:
                self.opt.param_groups[0]["lr"] = float(lrs[t])
            for n, p in self.tensors.items():
                p.grad = torch.tensor(grads[n][t])
            self.opt.step()
            out.append({n: p.detach().numpy().copy() for n, p in self.tensors.items()})
        return out


def _our_steps(tx, params: dict, state, grads: dict, start: int, stop: int):
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    out = []
    params = jax.tree.map(jnp.asarray, params)
    for t in range(start, stop):
        params, state = step(params, state, {n: g[t] for n, g in grads.items()})
        out.append(_snapshot(params))
    return params, state, out


def _apply(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s


TORCH_CONFIGS = {
    "plain": {"lr": 0.01, "alpha": 0.9},
    "momentum": {"lr": 0.01, "alpha": 0.9, "momentum": 0.9},
    "centered": {"lr": 0.01, "alpha": 0.95, "eps": 1e-6, "centered": True, "momentum": 0.5},
    "l2": {"lr": 0.01, "alpha": 0.99, "weight_decay": 0.1, "maximize": True},
    "schedule": {"lr": float(LRS[0]), "alpha": 0.9, "momentum": 0.9, "centered": True},
}


def _torch_pair(name):
    """(torch kwargs, our preset, lrs or None): the schedule config reads LRS[count]."""
    kwargs = TORCH_CONFIGS[name]
    if name == "schedule":
        table = jnp.asarray(LRS)
        return kwargs, rj.presets.torch(**{**kwargs, "lr": lambda count: table[count]}), LRS
    return kwargs, rj.presets.torch(**kwargs), None


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_torch_state_into_ours(name):
    kwargs, tx, lrs = _torch_pair(name)
    params, grads = _torch_data()
    peer = _Torch(params, list(TORCH_SHAPES), **kwargs)
    peer.steps(grads, 0, HALF, lrs)
    state_dict = copy.deepcopy(peer.opt.state_dict())  # live tensors: copy now
    params5 = {n: p.detach().numpy().copy() for n, p in peer.tensors.items()}
    ref = peer.steps(grads, HALF, STEPS, lrs)  # torch runs on: its state_dict tensors change
    state = rj.porting.import_torch_state(tx.init(params5), state_dict, params5)
    if lrs is not None:
        (core,) = [
            x
            for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, rj.RMSpropState))
            if isinstance(x, rj.RMSpropState)
        ]
        assert int(core.count) == HALF  # the count came from torch's step
    _, _, ours = _our_steps(tx, params5, state, grads, HALF, STEPS)
    _check_steps(ours, ref, "torch", f"{name} torch->ours")


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_our_state_into_torch(name):
    kwargs, tx, lrs = _torch_pair(name)
    params, grads = _torch_data(seed=1)
    params5, state5, _ = _our_steps(tx, params, tx.init(params), grads, 0, HALF)
    _, _, ours = _our_steps(tx, params5, state5, grads, HALF, STEPS)
    params5 = _snapshot(params5)
    peer = _Torch(params5, list(TORCH_SHAPES), **kwargs)
    # Without a schedule our state keeps no count: pass torch's step (5) explicitly.
    step = None if lrs is not None else HALF
    exported = rj.porting.export_torch_state(
        state5, params5, param_groups=peer.opt.state_dict()["param_groups"], step=step
    )
    peer.opt.load_state_dict(exported)
    ref = peer.steps(grads, HALF, STEPS, lrs)
    assert float(peer.opt.state_dict()["state"][0]["step"]) == STEPS
    _check_steps(ours, ref, "torch", f"{name} ours->torch")


def test_export_without_count_loads_and_steps_in_torch():
    kwargs, tx, _ = _torch_pair("plain")
    params, grads = _torch_data(seed=2)
    params5, state5, _ = _our_steps(tx, params, tx.init(params), grads, 0, HALF)
    params5 = _snapshot(params5)
    peer = _Torch(params5, list(TORCH_SHAPES), **kwargs)
    exported = rj.porting.export_torch_state(
        state5, params5, param_groups=peer.opt.state_dict()["param_groups"]
    )
    peer.opt.load_state_dict(exported)
    peer.steps(grads, HALF, STEPS)


# Same shapes, so a wrong order would not fail loudly: it would swap the slots.
ORDER_SHAPES = {"weight": (2, 3), "bias": (2, 3)}
TORCH_ORDER = ["weight", "bias"]  # torch's order; our leaves flatten as bias, weight


def test_torch_order_by_path_names():
    kwargs = {"lr": 0.01, "alpha": 0.9, "momentum": 0.9, "centered": True}
    tx = rj.presets.torch(**kwargs)
    params, grads = _torch_data(ORDER_SHAPES, seed=3)
    grads["bias"] *= 0.01  # very different slot values per parameter
    peer = _Torch(params, TORCH_ORDER, **kwargs)
    peer.steps(grads, 0, HALF)
    state_dict = copy.deepcopy(peer.opt.state_dict())
    params5 = {n: p.detach().numpy().copy() for n, p in peer.tensors.items()}
    ref = peer.steps(grads, HALF, STEPS)
    state = rj.porting.import_torch_state(tx.init(params5), state_dict, params5, order=TORCH_ORDER)
    _, _, ours = _our_steps(tx, params5, state, grads, HALF, STEPS)
    _check_steps(ours, ref, "torch", "order torch->ours")
    # Without order= the slots land on the wrong parameters: the run departs from torch.
    wrong = rj.porting.import_torch_state(tx.init(params5), state_dict, params5)
    _, _, off = _our_steps(tx, params5, wrong, grads, HALF, STEPS)
    assert _rel(off[0]["bias"], ref[0]["bias"]) > 1e-3

    # And back: export with order= into a fresh torch optimizer.
    p5, state5, _ = _our_steps(tx, params, tx.init(params), grads, 0, HALF)
    _, _, ours = _our_steps(tx, p5, state5, grads, HALF, STEPS)
    peer = _Torch(_snapshot(p5), TORCH_ORDER, **kwargs)
    peer.opt.load_state_dict(
        rj.porting.export_torch_state(
            state5,
            _snapshot(p5),
            param_groups=peer.opt.state_dict()["param_groups"],
            order=TORCH_ORDER,
            step=HALF,
        )
    )
    _check_steps(ours, peer.steps(grads, HALF, STEPS), "torch", "order ours->torch")


def _torch_groups(momentum_w):
    """torch groups (weight: lr 0.1 + L2, bias: lr 0.01 + momentum) and ours alike."""
    torch_groups = [
        {"names": ["weight"], "options": {"lr": 0.1, "weight_decay": 0.01, "momentum": momentum_w}},
        {"names": ["bias"], "options": {"lr": 0.01, "momentum": 0.9}},
    ]
    tx = rj.param_groups(
        {
            "w": rj.presets.torch(lr=0.1, weight_decay=0.01, momentum=momentum_w, alpha=0.9),
            "b": rj.presets.torch(lr=0.01, momentum=0.9, alpha=0.9),
        },
        {r"^weight": "w", r"^bias": "b"},
    )
    return torch_groups, tx


@pytest.mark.parametrize("momentum_w", [0.5])
def test_torch_two_param_groups_both_ways(momentum_w):
    torch_groups, tx = _torch_groups(momentum_w)
    params, grads = _torch_data(ORDER_SHAPES, seed=4)
    # torch -> ours
    peer = _Torch(params, TORCH_ORDER, groups=torch_groups, alpha=0.9)
    peer.steps(grads, 0, HALF)
    state_dict = copy.deepcopy(peer.opt.state_dict())
    params5 = {n: p.detach().numpy().copy() for n, p in peer.tensors.items()}
    ref = peer.steps(grads, HALF, STEPS)
    state = rj.porting.import_torch_state(tx.init(params5), state_dict, params5, order=TORCH_ORDER)
    _, _, ours = _our_steps(tx, params5, state, grads, HALF, STEPS)
    _check_steps(ours, ref, "torch", "groups torch->ours")
    # ours -> torch
    p5, state5, _ = _our_steps(tx, params, tx.init(params), grads, 0, HALF)
    _, _, ours = _our_steps(tx, p5, state5, grads, HALF, STEPS)
    peer = _Torch(_snapshot(p5), TORCH_ORDER, groups=torch_groups, alpha=0.9)
    exported = rj.porting.export_torch_state(
        state5,
        _snapshot(p5),
        param_groups=peer.opt.state_dict()["param_groups"],
        order=TORCH_ORDER,
        step=HALF,
    )
    peer.opt.load_state_dict(exported)
    _check_steps(ours, peer.steps(grads, HALF, STEPS), "torch", "groups ours->torch")


def test_torch_groups_momentum_in_one_group_exports():
    # The brief's groups: momentum only in the bias group. Export works.
    torch_groups, tx = _torch_groups(0.0)
    params, grads = _torch_data(ORDER_SHAPES, seed=5)
    p5, state5, _ = _our_steps(tx, params, tx.init(params), grads, 0, HALF)
    _, _, ours = _our_steps(tx, p5, state5, grads, HALF, STEPS)
    peer = _Torch(_snapshot(p5), TORCH_ORDER, groups=torch_groups, alpha=0.9)
    exported = rj.porting.export_torch_state(
        state5,
        _snapshot(p5),
        param_groups=peer.opt.state_dict()["param_groups"],
        order=TORCH_ORDER,
        step=HALF,
    )
    assert "momentum_buffer" not in exported["state"][0]
    assert "momentum_buffer" in exported["state"][1]
    peer.opt.load_state_dict(exported)
    _check_steps(ours, peer.steps(grads, HALF, STEPS), "torch", "groups (mixed momentum) export")


def test_torch_groups_momentum_in_one_group_imports():
    torch_groups, tx = _torch_groups(0.0)
    params, grads = _torch_data(ORDER_SHAPES, seed=6)
    peer = _Torch(params, TORCH_ORDER, groups=torch_groups, alpha=0.9)
    peer.steps(grads, 0, HALF)
    state_dict = copy.deepcopy(peer.opt.state_dict())
    params5 = {n: p.detach().numpy().copy() for n, p in peer.tensors.items()}
    ref = peer.steps(grads, HALF, STEPS)
    state = rj.porting.import_torch_state(tx.init(params5), state_dict, params5, order=TORCH_ORDER)
    _, _, ours = _our_steps(tx, params5, state, grads, HALF, STEPS)
    _check_steps(ours, ref, "torch", "groups (mixed momentum) import")


def _torch_state_after(kwargs, params, grads, names=None):
    peer = _Torch(params, names or list(params), **kwargs)
    peer.steps(grads, 0, 2)
    return copy.deepcopy(peer.opt.state_dict())


def test_torch_import_errors():
    params, grads = _torch_data(seed=7)
    # momentum in torch's state, none in our config
    sd = _torch_state_after({"lr": 0.01, "momentum": 0.9}, params, grads)
    tx = rj.presets.torch(lr=0.01)
    with pytest.raises(
        ValueError,
        match=r"torch state of parameter 0 .* has .momentum_buffer. but this config keeps no momentum",
    ):
        rj.porting.import_torch_state(tx.init(params), sd, params)
    # momentum in our config, none in torch's state: names the parameter
    sd = _torch_state_after({"lr": 0.01}, params, grads)
    tx = rj.presets.torch(lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match=r"parameter 0 \('a'\) has no 'momentum_buffer'"):
        rj.porting.import_torch_state(tx.init(params), sd, params)
    # centered in torch, not in ours
    sd = _torch_state_after({"lr": 0.01, "centered": True}, params, grads)
    with pytest.raises(ValueError, match=r"'grad_avg'"):
        rj.porting.import_torch_state(rj.presets.torch(lr=0.01).init(params), sd, params)
    # shape mismatch: names the parameter and both shapes
    sd = _torch_state_after({"lr": 0.01}, params, grads)
    other = dict(params, b=np.zeros(5, np.float32))
    tx = rj.presets.torch(lr=0.01)
    with pytest.raises(ValueError, match=r"parameter 1 \('b'\) has shape \(4,\), ours \(5,\)"):
        rj.porting.import_torch_state(tx.init(other), sd, other)
    # order= missing a leaf
    with pytest.raises(ValueError, match=r"order does not list the leaves \['b'\]"):
        rj.porting.import_torch_state(tx.init(params), sd, params, order=["a"])


# ---------------------------------------------------------------------------
# Keras
# ---------------------------------------------------------------------------

KERAS_SHAPES = {"bias": (3,), "kernel": (2, 2)}  # Keras order == our leaf order
KERAS_NAMES = list(KERAS_SHAPES)


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.08, decay_steps=3, decay_rate=0.6)


KERAS_CONFIGS = {
    "momentum": {"learning_rate": 0.05, "momentum": 0.9},
    "centered": {"learning_rate": 0.05, "rho": 0.8, "centered": True, "momentum": 0.5},
    "ema": {
        "learning_rate": 0.05,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 3,
    },
    "accumulation": {"learning_rate": 0.05, "gradient_accumulation_steps": 2, "momentum": 0.9},
    "everything": {
        "learning_rate": "schedule",
        "momentum": 0.9,
        "centered": True,
        "weight_decay": 0.1,
        "use_ema": True,
        "ema_momentum": 0.8,
        "gradient_accumulation_steps": 2,
        "clipnorm": 1.0,
    },
}


def _keras_kwargs(name):
    kwargs = dict(KERAS_CONFIGS[name])
    if kwargs["learning_rate"] == "schedule":
        kwargs["learning_rate"] = _schedule()  # a fresh object per optimizer
    return kwargs


def _keras_data(seed):
    rng = np.random.RandomState(seed)
    params = {n: (0.5 * rng.randn(*s)).astype(np.float32) for n, s in KERAS_SHAPES.items()}
    grads = [
        {n: rng.randn(*s).astype(np.float32) for n, s in KERAS_SHAPES.items()} for _ in range(STEPS)
    ]
    return params, grads


class _Keras:
    """keras.optimizers.RMSprop on named keras.Variables, run eagerly.

    Gradient accumulation on Keras' JAX backend compiles a fresh ``lax.cond`` on every
    eager call; under ``jax.disable_jit()`` the same code runs op by op, bit-identically
    and much faster (see tests/conformance/test_keras_conformance.py).
    """

    def __init__(self, params, kwargs):
        self.variables = [keras.Variable(params[n], name=n) for n in KERAS_NAMES]
        self.opt = keras.optimizers.RMSprop(**kwargs)
        self.opt.build(self.variables)

    def steps(self, grads, start, stop):
        out, iterations = [], []
        with jax.disable_jit():
            for t in range(start, stop):
                self.opt.apply_gradients(
                    zip([jnp.asarray(grads[t][n]) for n in KERAS_NAMES], self.variables)
                )
                out.append({n: np.array(v.value) for n, v in zip(KERAS_NAMES, self.variables)})
                iterations.append(int(self.opt.iterations))
        return out, iterations

    def finalize(self):
        self.opt.finalize_variable_values(self.variables)
        return {n: np.array(v.value) for n, v in zip(KERAS_NAMES, self.variables)}


def _rj_steps(opt, params, state, grads, start, stop):
    step = jax.jit(opt.stateless_apply)
    out, iterations = [], []
    params = jax.tree.map(jnp.asarray, params)
    for t in range(start, stop):
        params, state = step(state, grads[t], params)
        out.append(_snapshot(params))
        iterations.append(int(opt.iterations(state)))
    return params, state, out, iterations


@pytest.mark.parametrize("name", list(KERAS_CONFIGS))
def test_keras_state_into_ours(name):
    params, grads = _keras_data(10)
    peer = _Keras(params, _keras_kwargs(name))
    peer.steps(grads, 0, HALF)
    params5 = {n: np.array(v.value) for n, v in zip(KERAS_NAMES, peer.variables)}
    opt = rj.RMSprop(**_keras_kwargs(name))
    state = rj.porting.import_keras_state(opt, opt.init(params5), peer.opt)
    ref, ref_iterations = peer.steps(grads, HALF, STEPS)
    params10, state10, ours, iterations = _rj_steps(opt, params5, state, grads, HALF, STEPS)
    _check_steps(ours, ref, "keras", f"{name} keras->ours")
    assert iterations == ref_iterations
    _check_steps(
        [_snapshot(opt.finalize_variable_values(params10, state10))],
        [peer.finalize()],
        "keras",
        f"{name} keras->ours finalize",
    )


@pytest.mark.parametrize("name", list(KERAS_CONFIGS))
def test_our_state_into_keras(name):
    params, grads = _keras_data(11)
    opt = rj.RMSprop(**_keras_kwargs(name))
    params5, state5, _, _ = _rj_steps(opt, params, opt.init(params), grads, 0, HALF)
    params10, state10, ours, iterations = _rj_steps(opt, params5, state5, grads, HALF, STEPS)
    peer = _Keras(_snapshot(params5), _keras_kwargs(name))
    rj.porting.export_keras_state(opt, state5, peer.opt)
    assert int(peer.opt.iterations) == HALF // (
        KERAS_CONFIGS[name].get("gradient_accumulation_steps") or 1
    )
    ref, ref_iterations = peer.steps(grads, HALF, STEPS)
    _check_steps(ours, ref, "keras", f"{name} ours->keras")
    assert iterations == ref_iterations
    _check_steps(
        [_snapshot(opt.finalize_variable_values(params10, state10))],
        [peer.finalize()],
        "keras",
        f"{name} ours->keras finalize",
    )


def test_keras_export_mismatched_config_errors():
    params, _ = _keras_data(12)
    opt = rj.RMSprop(learning_rate=0.05, momentum=0.9)
    peer = _Keras(params, {"learning_rate": 0.05})  # no momentum slots
    with pytest.raises(ValueError, match="the Keras optimizer has 4 variables, ours 6"):
        rj.porting.export_keras_state(opt, opt.init(params), peer.opt)
    with pytest.raises(ValueError, match="expected 6 arrays, got 4"):
        rj.porting.import_keras_state(opt, opt.init(params), peer.opt)


def test_import_torch_state_with_numeric_keys_keeps_torch_order():
    torch = pytest.importorskip("torch")
    shapes = [(2,)] * 12  # same-shaped: a permutation would go unnoticed
    torch_params = [torch.nn.Parameter(torch.full(s, float(i))) for i, s in enumerate(shapes)]
    opt = torch.optim.RMSprop(torch_params, lr=0.01, momentum=0.5)
    for p in torch_params:
        p.grad = p.detach() + 1.0
    opt.step()
    params = {str(i): jnp.asarray(p.detach().numpy()) for i, p in enumerate(torch_params)}
    tx = rj.presets.torch(lr=0.01, momentum=0.5)
    for state_dict in (
        opt.state_dict(),
        {"state": {str(k): v for k, v in opt.state_dict()["state"].items()}},
    ):
        velocity = porting.import_torch_state(tx.init(params), state_dict, params).velocity
        for i in range(12):
            want = opt.state[torch_params[i]]["square_avg"].numpy()
            np.testing.assert_allclose(velocity[str(i)], want, rtol=1e-7)
