"""One process of the multi-process data-parallel test (``test_distributed.py``).

``python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [LOCAL_DEVICES]``
(2 simulated CPU devices per process by default): joins the
``jax.distributed`` cluster whose coordinator (process 0) listens on
127.0.0.1:PORT, with gloo CPU collectives, builds a mesh over all the
processes' devices and trains ``STEPS`` data-parallel steps twice: parameters
and state replicated, then ZeRO-1 (state split over the 4 devices, so each
process holds half of it). Each process writes its final parameters, EMA
parameters and loss scale (replicated, so every process has them) to
``OUT_DIR/proc{PROCESS_ID}.npz`` and its per-device state bytes to
``OUT_DIR/proc{PROCESS_ID}.json``. Nothing runs on import.
"""

from __future__ import annotations

import json
import os
import sys
import time

import _sharding_common as common
import numpy as np


def _local_rows(sharding, global_shape) -> slice:
    """The rows of the global batch that live on this process's devices (contiguous)."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [(idx[0].start or 0) for idx in indices]
    stops = [(idx[0].stop if idx[0].stop is not None else global_shape[0]) for idx in indices]
    return slice(min(starts), max(stops))


def train(mesh, zero: bool):
    import jax

    import rmsprop_jax as rj

    tx = common.make_tx()
    params = common.init_params()
    p_shard = rj.sharding.replicated(params, mesh)
    if zero:
        s_shard = rj.sharding.zero_state_sharding(jax.eval_shape(tx.init, params), mesh)
    else:
        s_shard = rj.sharding.state_sharding(tx, params, p_shard)
    batch = rj.sharding.batch_sharding(mesh)
    scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    # Host numpy values are the same on every process: device_put makes global arrays.
    params = jax.device_put(params, p_shard)
    state = jax.jit(tx.init, out_shardings=s_shard)(params)
    step = jax.jit(
        common.make_step(tx),
        in_shardings=(p_shard, s_shard, batch, batch),
        out_shardings=(p_shard, s_shard, scalar),
        donate_argnums=(0, 1),
    )
    xs, ys = common.batches()
    rows = _local_rows(batch, xs.shape[1:])
    for x, y in zip(xs, ys):
        # Each process feeds only its own rows, as a per-host data loader would.
        gx = jax.make_array_from_process_local_data(batch, x[rows], x.shape)
        gy = jax.make_array_from_process_local_data(batch, y[rows], y.shape)
        params, state, _ = step(params, state, gx, gy)
    memory = {str(d): b for d, b in rj.sharding.bytes_per_device(state).items()}
    return common.summary(params, state), memory, (rows.start, rows.stop)


def main(process_id: int, num_processes: int, port: int, out_dir: str, local: int) -> None:
    if os.environ.get("RMSPROP_JAX_TEST_CRASH") == str(process_id):  # the failure-path test
        raise RuntimeError(f"process {process_id}: crash requested by the test")
    # Before JAX starts its CPU backend: `local` simulated devices in this process.
    os.environ.update(common.with_host_devices(local))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(range(local)),
        initialization_timeout=60,
    )
    try:
        import rmsprop_jax as rj

        start = time.perf_counter()
        assert jax.process_count() == num_processes, jax.process_count()
        mesh = rj.sharding.data_mesh()  # every device of every process
        replicated, _, rows = train(mesh, zero=False)
        zero, memory, _ = train(mesh, zero=True)
        out = dict(replicated)
        out.update({f"zero/{k}": v for k, v in zero.items()})
        np.savez(os.path.join(out_dir, f"proc{process_id}.npz"), **out)
        with open(os.path.join(out_dir, f"proc{process_id}.json"), "w") as f:
            json.dump(
                {
                    "process_index": jax.process_index(),
                    "global_devices": [str(d) for d in jax.devices()],
                    "local_devices": [str(d) for d in jax.local_devices()],
                    "rows": rows,
                    "zero_state_bytes_per_local_device": memory,
                    "seconds": time.perf_counter() - start,
                },
                f,
                indent=1,
            )
        print(f"process {process_id}: done", flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        int(sys.argv[5]) if len(sys.argv) > 5 else 2,
    )
