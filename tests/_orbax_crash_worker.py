"""Training shared by ``test_orbax.py`` and its crash test.

As a script: ``python tests/_orbax_crash_worker.py CKPT_DIR TOTAL_STEPS SAVE_EVERY [STEP_SLEEP]``
trains from scratch (or resumes from the newest checkpoint in CKPT_DIR), saving
params + optimizer state every SAVE_EVERY steps with an orbax CheckpointManager
and printing ``saved STEP`` once each checkpoint is durably written. The crash
test SIGKILLs it mid-run.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax as rj

IN, OUT = 64, 128  # 8192 weights: large enough for the int8 (QuantizedArray) path


def init_params():
    kw, kb = jax.random.split(jax.random.PRNGKey(42))
    return {
        "w": jax.random.normal(kw, (IN, OUT)) * 0.1,
        "b": jax.random.normal(kb, (OUT,)) * 0.1,
    }


def batch(step):
    """The batch of step ``step`` (numpy, so the same in every process and outside jit)."""
    rng = np.random.default_rng(1000 + int(step))
    x = rng.standard_normal((16, IN), dtype=np.float32)
    y = rng.standard_normal((16, OUT), dtype=np.float32)
    return x, y


def loss_fn(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def make_case(name):
    """Returns ``(init(params) -> opt_state, step(params, opt_state, i) -> (params, opt_state))``."""
    if name == "rmsprop_class":
        opt = rj.RMSprop(learning_rate=0.01, momentum=0.5, use_ema=True, ema_overwrite_frequency=3)

        def step(params, opt_state, i, x, y):
            grads = jax.grad(loss_fn)(params, x, y)
            return opt.stateless_apply(opt_state, grads, params)

        return opt.init, jax.jit(step)

    scaled = inject_inf = False
    if name == "plain":
        tx = rj.rmsprop(0.01)
    elif name == "centered_momentum":
        tx = rj.rmsprop(0.01, centered=True, momentum=0.9)
    elif name == "ema":
        tx = rj.rmsprop(0.01, use_ema=True, ema_momentum=0.9)
    elif name == "accumulation":
        tx = rj.rmsprop(0.01, gradient_accumulation_steps=3, momentum=0.5)
    elif name == "dynamic_loss_scale":
        # Growth every 2 finite steps; step 2 gets a non-finite gradient (skip + halving).
        tx = rj.dynamic_loss_scale(rj.rmsprop(0.01), initial_scale=2.0**12, dynamic_growth_steps=2)
        scaled = True
        inject_inf = True
    elif name == "int8":
        tx = rj.rmsprop(0.01, accumulator_dtype="int8", momentum=0.5)
    elif name == "bf16":
        tx = rj.rmsprop(0.01, accumulator_dtype="bfloat16", centered=True, momentum=0.9)
    elif name == "everything":
        tx = rj.dynamic_loss_scale(
            rj.rmsprop(
                0.01,
                centered=True,
                momentum=0.9,
                use_ema=True,
                gradient_accumulation_steps=2,
                weight_decay=0.01,
                global_clipnorm=1.0,
            ),
            initial_scale=2.0**10,
            dynamic_growth_steps=3,
        )
        scaled = True
    else:
        raise ValueError(name)

    def step(params, opt_state, i, x, y):
        if scaled:
            grads = jax.grad(lambda p: rj.loss_scale(opt_state) * loss_fn(p, x, y))(params)
        else:
            grads = jax.grad(loss_fn)(params, x, y)
        if inject_inf:
            grads = jax.tree.map(lambda g: jnp.where(i == 2, jnp.inf, 1.0) * g, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx.init, jax.jit(step)


CRASH_CASE = "everything"


def run(params, opt_state, start, stop, step_fn):
    for i in range(start, stop):
        params, opt_state = step_fn(params, opt_state, jnp.int32(i), *batch(i))
    return params, opt_state


def main(argv):
    import orbax.checkpoint as ocp

    ckpt_dir, total, every = argv[0], int(argv[1]), int(argv[2])
    sleep = float(argv[3]) if len(argv) > 3 else 0.0
    init, step_fn = make_case(CRASH_CASE)
    params = init_params()
    opt_state = init(params)
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=None)
    with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
        start = 0
        latest = mngr.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
            restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
            params, opt_state, start = restored["params"], restored["opt_state"], latest
        print(f"started {start}", flush=True)
        for i in range(start, total):
            params, opt_state = step_fn(params, opt_state, jnp.int32(i), *batch(i))
            done = i + 1
            if mngr.save(
                done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})
            ):
                mngr.wait_until_finished()
                print(f"saved {done}", flush=True)
            if sleep:
                time.sleep(sleep)
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
