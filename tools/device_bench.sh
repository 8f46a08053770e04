#!/usr/bin/env bash
# The GPU half of `python -m rmsprop_jax bench`, as one call of the device tool
# (a machine with python3, jax[cuda], optax, chex and torch already installed).
# Each part is its own bench process with its own time limit, log and JSON under
# $OUT, so a part that overruns costs only itself (its JSON keeps the cases it finished:
# the bench rewrites it after each case). Usage: bash tools/device_bench.sh [PARTS]
set -uo pipefail
OUT=${OUT:-/tmp/device_bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 KERAS_BACKEND=jax
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9a-z-]*|optax|chex|flax|torch|numpy) ' | tee -a "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
import jax, jax.numpy as jnp, numpy as np, rmsprop_jax as rj
print("devices", jax.devices(), jax.devices()[0].device_kind)
p = {"w": jnp.ones((1000,)), "b": jnp.zeros((10,))}
for dtype in (None, "int8"):
    tx = rj.rmsprop(learning_rate=1e-3, centered=True, momentum=0.9,
                    **({"accumulator_dtype": dtype} if dtype else {}))
    s = tx.init(p)
    u, s = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), s, p)
    print("smoke", dtype, float(u["w"][0]))
PY
part() {  # part NAME SECONDS bench-args...
  local name=$1 limit=$2; shift 2
  echo "=== part $name (limit ${limit}s) ==="
  timeout "$limit" python3 -m rmsprop_jax bench --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -vE '^  (16M|1M|100K|10x|300x|1000x|sparse).*(compiled|ready)'
}
# Measured on an H200 (2026-11-28): big 141 s, sparse 11 s; many and compile did not finish
# in 110 s / 80 s (per-leaf steps compile in 1-19 s each on XLA:GPU), hence the limits below.
for p in ${1:-big sparse many compile}; do
  case $p in
    big) part big 200 --cases 16M/1,16M/160 --repeats 5 --target-ms 60 ;;
    sparse) part sparse 60 --cases sparse --repeats 5 --target-ms 60 ;;
    many) part many 300 --cases 1M/100,100K/200 --repeats 5 --target-ms 60 ;;
    compile) part compile 300 --cases 10x64,300x64,1000x64 --repeats 3 --target-ms 30 ;;
  esac
done
