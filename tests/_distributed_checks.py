"""Every 8-device check of ``test_distributed.py``, in one process (one JAX start, one set of compiles).

Run as ``python tests/_distributed_checks.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the environment
(the test sets it; JAX reads it once, when its CPU backend starts, which is why
this runs in a subprocess). Each check trains the same model for
``STEPS`` steps and records its difference from the single-device run on the
full batch, the shardings it saw, and any error, as JSON. The test file
asserts on the JSON. Nothing runs on import (pytest's ``--doctest-modules``
imports this file).
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import _sharding_common as common
import numpy as np

N_DEVICES = 8


def _close(got: dict, want: dict) -> dict:
    result = common.compare(got, want)
    try:
        common.assert_close(got, want, "vs single device")
        result["mismatch"] = ""
    except AssertionError as err:
        result["mismatch"] = str(err)
    return result


def _spec_str(sharding) -> str:
    spec = getattr(sharding, "spec", None)
    return str(tuple(spec)) if spec is not None else type(sharding).__name__


def _sharding_mismatches(shapes, left, right) -> list[str]:
    """Paths whose shardings in ``left`` and ``right`` differ (compared on the leaf's rank)."""
    import jax

    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    lefts, rights = jax.tree.leaves(left), jax.tree.leaves(right)
    assert len(paths) == len(lefts) == len(rights), (len(paths), len(lefts), len(rights))
    bad = []
    for (path, shape), a, b in zip(paths, lefts, rights):
        if not a.is_equivalent_to(b, len(np.shape(shape))):
            bad.append(f"{jax.tree_util.keystr(path)}: {_spec_str(a)} -> {_spec_str(b)}")
    return bad


def _train_compiled(step, params, state, batch_sharding):
    """Lower + compile the step once, then run every step through the compiled executable.

    A compiled executable accepts only arguments with exactly its input
    shardings, so feeding each step's outputs back in also proves that the
    step keeps the layout (no resharding between steps).
    """
    import jax

    xs, ys = common.batches()
    put = lambda a: jax.device_put(a, batch_sharding)
    compiled = step.lower(params, state, put(xs[0]), put(ys[0])).compile()
    in_params, in_state = compiled.input_shardings[0][:2]
    out_params, out_state, _ = compiled.output_shardings
    shapes = (params, state)
    report = {
        "step_in_out_mismatch": _sharding_mismatches(
            shapes, (in_params, in_state), (out_params, out_state)
        ),
        "args_vs_step_in_mismatch": _sharding_mismatches(
            shapes, jax.tree.map(lambda a: a.sharding, (params, state)), (in_params, in_state)
        ),
        "state_specs": sorted(
            {
                f"{jax.tree_util.keystr(p)}={_spec_str(s)}"
                for (p, _), s in zip(
                    jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(in_state)
                )
            }
        ),
    }
    for x, y in zip(xs, ys):
        params, state, _ = compiled(params, state, put(x), put(y))
    report["final_mismatch"] = _sharding_mismatches(
        shapes, jax.tree.map(lambda a: a.sharding, (params, state)), (in_params, in_state)
    )
    return params, state, report


def check_pmap(ref):
    import jax

    tx = common.make_tx()
    step = jax.pmap(common.make_step(tx, axis_name="data"), axis_name="data", donate_argnums=(0, 1))
    devices = jax.devices()[:N_DEVICES]
    params = jax.tree.map(lambda a: np.stack([a] * N_DEVICES), common.init_params())
    state = jax.pmap(tx.init, devices=devices)(params)
    xs, ys = common.batches()
    for x, y in zip(xs, ys):
        params, state, _ = step(
            params, state, x.reshape(N_DEVICES, -1, common.IN), y.reshape(N_DEVICES, -1)
        )
    replicas = [
        jax.tree.map(lambda a, i=i: np.asarray(a[i]), (params, state)) for i in range(N_DEVICES)
    ]
    identical = all(
        all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(replicas[0]), jax.tree.leaves(r)))
        for r in replicas[1:]
    )
    result = _close(common.summary(*replicas[0]), ref)
    result["replicas_identical"] = identical
    return result


def _jit_run(ref, params_sharding_fn):
    import jax

    import rmsprop_jax as rj

    mesh = rj.sharding.data_mesh(N_DEVICES)
    tx = common.make_tx()
    params = common.init_params()
    p_shard = params_sharding_fn(params, mesh)
    params = jax.device_put(params, p_shard)
    s_shard = rj.sharding.state_sharding(tx, params, p_shard)
    state = jax.jit(tx.init, out_shardings=s_shard)(params)
    step = jax.jit(common.make_step(tx), donate_argnums=(0, 1))
    params, state, report = _train_compiled(step, params, state, rj.sharding.batch_sharding(mesh))
    result = _close(common.summary(params, state), ref)
    result.update(report)
    return result


def check_jit_replicated(ref):
    import rmsprop_jax as rj

    return _jit_run(ref, rj.sharding.replicated)


def check_jit_fsdp(ref):
    import jax

    import rmsprop_jax as rj

    result = _jit_run(ref, rj.sharding.shard_leading_axis)
    # The slots of every sharded parameter are sharded like it.
    mesh = rj.sharding.data_mesh(N_DEVICES)
    params = common.init_params()
    p_shard = rj.sharding.shard_leading_axis(params, mesh)
    tx = common.make_tx()
    s_shard = rj.sharding.state_sharding(tx, params, p_shard)
    inner = s_shard.inner_state[0]  # (accumulation, ema)
    rms = inner.inner_state[1]
    slots = {
        "velocity": rms.velocity,
        "average_gradient": rms.average_gradient,
        "momentum": rms.momentum,
        "accumulators": inner.accumulators,
        "ema": s_shard.inner_state[1].ema,
    }
    result["slot_specs_equal_params"] = all(
        jax.tree.map(lambda s, p: s == p, tree, p_shard) == jax.tree.map(lambda _: True, p_shard)
        for tree in slots.values()
    )
    result["param_specs"] = {k: _spec_str(v) for k, v in p_shard.items()}
    return result


def check_plain_init_keeps_sharding(ref):
    """``tx.init(sharded params)`` without the helper: do the slots inherit the params' sharding?

    Checked eagerly on an Auto mesh and under ``jit`` on an Explicit mesh
    (sharding in types), where the slots should follow the parameters by
    themselves. Under ``jit`` on an Auto mesh a slot created from a constant
    has no sharding to inherit (XLA replicates it), which is why
    ``rj.sharding.state_sharding`` exists; that case is only recorded.
    """
    import jax

    import rmsprop_jax as rj

    del ref
    params = common.init_params()
    tx = common.make_tx()
    result = {}
    for how in ("eager", "explicit_jit", "auto_jit_informative"):
        mesh = rj.sharding.data_mesh(N_DEVICES, explicit=how.startswith("explicit"))
        p_shard = rj.sharding.shard_leading_axis(params, mesh)
        want = rj.sharding.state_sharding(tx, params, p_shard)
        with jax.set_mesh(mesh):
            placed = jax.device_put(params, p_shard)
            state = tx.init(placed) if how == "eager" else jax.jit(tx.init)(placed)
        mismatches = _sharding_mismatches(state, jax.tree.map(lambda a: a.sharding, state), want)
        # Scalars (counters, the loss scale) may live anywhere: only slots must follow the params.
        scalars = {
            jax.tree_util.keystr(path)
            for path, a in jax.tree_util.tree_flatten_with_path(state)[0]
            if a.ndim == 0
        }
        result[how] = [m for m in mismatches if m.split(":")[0] not in scalars]
    return result


def check_shard_map(ref):
    import jax
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax as rj

    mesh = rj.sharding.data_mesh(N_DEVICES)
    tx = common.make_tx()
    params = jax.device_put(
        common.init_params(), rj.sharding.replicated(common.init_params(), mesh)
    )
    state = jax.jit(
        tx.init,
        out_shardings=rj.sharding.state_sharding(tx, params, rj.sharding.replicated(params, mesh)),
    )(params)
    step = jax.jit(
        rj.sharding.shard_map(
            common.make_step(tx, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
        ),
        donate_argnums=(0, 1),
    )
    params, state, report = _train_compiled(step, params, state, rj.sharding.batch_sharding(mesh))
    result = _close(common.summary(params, state), ref)
    result.update(report)
    result["shard_map"] = f"{rj.sharding.shard_map.__module__}.{rj.sharding.shard_map.__name__}"
    return result


def check_zero1(ref):
    import jax

    import rmsprop_jax as rj

    mesh = rj.sharding.data_mesh(N_DEVICES)
    tx = common.make_tx()
    params = common.init_params()
    p_shard = rj.sharding.replicated(params, mesh)
    params = jax.device_put(params, p_shard)
    s_shard = rj.sharding.zero_state_sharding(jax.eval_shape(tx.init, params), mesh)
    state = jax.jit(tx.init, out_shardings=s_shard)(params)

    # Per-device memory of the state: every divisible slot holds 1/8 per device.
    divisible = [a for a in jax.tree.leaves(state) if a.ndim and a.shape[0] % N_DEVICES == 0]
    rest = [a for a in jax.tree.leaves(state) if not (a.ndim and a.shape[0] % N_DEVICES == 0)]
    per_device_div = rj.sharding.bytes_per_device(divisible)
    per_device_all = rj.sharding.bytes_per_device(state)
    total_div = sum(a.nbytes for a in divisible)
    total_all = sum(a.nbytes for a in jax.tree.leaves(state))
    memory = {
        "total_state_bytes": total_all,
        "divisible_total_bytes": total_div,
        "divisible_per_device_bytes": sorted(set(per_device_div.values())),
        "replicated_leaf_bytes": sum(a.nbytes for a in rest),
        "per_device_state_bytes": sorted(set(per_device_all.values())),
        "unsharded_per_device_bytes": total_all,
        "n_devices_holding": len(per_device_all),
    }

    batch = rj.sharding.batch_sharding(mesh)
    scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(
        common.make_step(tx),
        in_shardings=(p_shard, s_shard, batch, batch),
        out_shardings=(p_shard, s_shard, scalar),
        donate_argnums=(0, 1),
    )
    params, state, report = _train_compiled(step, params, state, batch)
    result = _close(common.summary(params, state), ref)
    result.update(report)
    result["memory"] = memory
    result["params_replicated"] = all(
        a.sharding.is_fully_replicated for a in jax.tree.leaves(params)
    )
    # Without pinned out_shardings, does XLA's propagation keep the ZeRO layout by itself?
    free = jax.jit(common.make_step(tx), in_shardings=(p_shard, s_shard, batch, batch))
    c = free.lower(
        params,
        state,
        jax.device_put(common.batches()[0][0], batch),
        jax.device_put(common.batches()[1][0], batch),
    ).compile()
    result["unpinned_out_mismatch"] = _sharding_mismatches(
        (params, state), c.input_shardings[0][:2], c.output_shardings[:2]
    )
    return result


def _explicit_run(ref, params_sharding_fn):
    """The same training on a mesh with Explicit axes (``jax.make_mesh``'s default on this JAX)."""
    import jax
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax as rj

    mesh = rj.sharding.data_mesh(N_DEVICES, explicit=True)
    tx = common.make_tx()
    with jax.set_mesh(mesh):
        params = common.init_params()
        p_shard = params_sharding_fn(params, mesh)
        params = jax.device_put(params, p_shard)
        state = tx.init(params)  # under explicit axes init should follow the params by itself
        gather = lambda a: jax.sharding.reshard(a, P())
        step = jax.jit(common.make_step(tx, gather=gather), donate_argnums=(0, 1))
        params, state, report = _train_compiled(
            step, params, state, rj.sharding.batch_sharding(mesh)
        )
    result = _close(common.summary(params, state), ref)
    result.update(report)
    return result


def check_explicit_replicated(ref):
    import rmsprop_jax as rj

    return _explicit_run(ref, rj.sharding.replicated)


def check_explicit_fsdp(ref):
    import rmsprop_jax as rj

    return _explicit_run(ref, rj.sharding.shard_leading_axis)


def check_explicit_accumulation_from_unsharded_state(ref):
    """State built from unsharded params, stepped with sharded ones (Explicit axes): the
    accumulation's two cond branches must agree on the state's sharding."""
    del ref
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax as rj

    tx = rj.rmsprop(0.1, gradient_accumulation_steps=2, use_ema=True, momentum=0.5)
    w = jnp.linspace(-1.0, 1.0, N_DEVICES * 16).reshape(N_DEVICES, 16)
    grads = [w * (0.1 * (i + 1)) for i in range(4)]

    def run(params, state, put):
        step = jax.jit(tx.update)
        for g in grads:
            u, state = step({"w": put(g)}, state, params)
            params = optax.apply_updates(params, u)
        return np.asarray(params["w"])

    want = run({"w": w}, tx.init({"w": w}), lambda g: g)
    mesh = rj.sharding.data_mesh(N_DEVICES, explicit=True)
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        put = lambda a: jax.device_put(a, sharding)
        got = run({"w": put(w)}, tx.init({"w": w}), put)  # the state: unsharded
    return {"max_rel": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))}


CHECKS = {
    "pmap": check_pmap,
    "jit_replicated": check_jit_replicated,
    "jit_fsdp": check_jit_fsdp,
    "plain_init_keeps_sharding": check_plain_init_keeps_sharding,
    "shard_map": check_shard_map,
    "zero1": check_zero1,
    "explicit_replicated": check_explicit_replicated,
    "explicit_fsdp": check_explicit_fsdp,
    "explicit_accumulation_unsharded_state": check_explicit_accumulation_from_unsharded_state,
}


def main(out_path: str, names: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import rmsprop_jax as rj

    start = time.perf_counter()
    results: dict = {
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "rmsprop_jax_file": rj.__file__,
        "tolerance": {"rtol": common.RTOL, "atol": common.ATOL},
    }
    if jax.device_count() < N_DEVICES:
        results["error"] = (
            f"needs {N_DEVICES} devices, got {jax.devices()} (XLA_FLAGS not honoured?)"
        )
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
        return
    ref = common.reference_run()
    # The checks below are only meaningful if clipping, loss scaling and the skip really happen.
    params = jax.tree.map(jnp.asarray, common.init_params())
    xs, ys = common.batches()
    norms = [
        float(optax.global_norm(jax.grad(common.loss_fn)(params, x, y)))
        for x, y in zip(xs[:3], ys[:3])
    ]
    results["reference"] = {
        "first_grad_norms": norms,
        "clipnorm": common.CLIPNORM,
        "final_loss_scale": float(ref["loss_scale"]),
        "initial_loss_scale": common.INITIAL_SCALE,
        "clip_changes_result": common.compare(common.reference_run(clip=False), ref),
        "ema_differs_from_params": common.compare(
            {f"params/{k[4:]}": v for k, v in ref.items() if k.startswith("ema/")},
            {k: v for k, v in ref.items() if k.startswith("params/")},
        ),
        "seconds": time.perf_counter() - start,
    }
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](ref)
        except Exception:  # reported to the test as data
            results[name] = {"error": traceback.format_exc(limit=6)[-3000:]}
        results[name]["seconds"] = time.perf_counter() - t0
    results["seconds"] = time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(CHECKS))
