"""Shardings for data-parallel, FSDP and ZeRO-1 training with rmsprop_jax.

The optimizer itself needs nothing special to run on many devices: every
transform of the package is elementwise per leaf except the global-norm
clipping and the finiteness check of :func:`rmsprop_jax.dynamic_loss_scale`,
and those see the whole tree whenever the gradients they get are global
arrays (``jit`` with shardings) or are already averaged across devices
(``lax.pmean`` inside ``pmap`` / ``shard_map``). What a multi-device run
needs is a sharding for the parameters, the optimizer state and the batch;
these helpers build them:

* :func:`data_mesh`: a 1-D mesh over the data-parallel axis.
* :func:`replicated`: every leaf on every device (plain data parallelism).
* :func:`shard_leading_axis`: the leading dimension of every leaf split over
  the data axis where it divides, the rest replicated (FSDP parameters).
* :func:`state_sharding`: the optimizer state laid out like the parameters
  (each slot gets its parameter's sharding; counters, scales replicated).
* :func:`zero_state_sharding`: ZeRO-1, the state split over the data axis
  while the parameters stay replicated.
* :func:`bytes_per_device`: what a tree occupies on each device.

Use them as ``jit`` in/out shardings, or with ``jax.device_put``:

  >>> import jax, jax.numpy as jnp, rmsprop_jax as rj
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = rj.sharding.data_mesh()                  # every device, axis "data"
  >>> n = mesh.shape["data"]
  >>> params = {"w": jnp.ones((4 * n, 3)), "b": jnp.zeros((3,))}
  >>> tx = rj.rmsprop(0.01, momentum=0.9)
  >>> p_shard = rj.sharding.replicated(params, mesh)  # ZeRO-1: params replicated,
  >>> s_shard = rj.sharding.zero_state_sharding(jax.eval_shape(tx.init, params), mesh)
  >>> state = jax.jit(tx.init, out_shardings=s_shard)(params)  # ... the state split
  >>> s_shard.momentum["w"].spec == P("data"), state.momentum["w"].sharding == s_shard.momentum["w"]
  (True, True)

``jax.make_mesh`` makes meshes with ``Explicit`` axes on recent JAX (sharding
in types); :func:`data_mesh` makes ``Auto`` axes, where XLA propagates the
shardings through a model that was written for one device.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "bytes_per_device",
    "data_mesh",
    "replicated",
    "shard_leading_axis",
    "shard_map",
    "state_sharding",
    "zero_state_sharding",
]

#: The default name of the data-parallel mesh axis.
DATA_AXIS = "data"

#: ``jax.shard_map`` (kept under this name for the code written against it).
shard_map: Callable[..., Any] = jax.shard_map


def data_mesh(
    num_devices: int | None = None,
    axis_name: str = DATA_AXIS,
    *,
    devices: Sequence[jax.Device] | None = None,
    explicit: bool = False,
) -> Mesh:
    """A 1-D mesh named ``axis_name`` over the first ``num_devices`` devices.

    Args:
      num_devices: how many devices (default: all of ``devices``).
      axis_name: the mesh axis the batch (and ZeRO / FSDP state) is split over.
      devices: the devices to use (default ``jax.devices()``, the global list
        in a multi-process run).
      explicit: ``Explicit`` axis type (sharding in types) instead of ``Auto``.

    Example:
      >>> import rmsprop_jax as rj
      >>> rj.sharding.data_mesh(1).shape
      OrderedDict([('data', 1)])
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"data_mesh: asked for {num_devices} devices, {len(devices)} available "
            "(simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "set before JAX starts)"
        )
    axis_type = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return Mesh(np.array(devices[:n]), (axis_name,), axis_types=(axis_type,))


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"mesh has no axis {name!r}; its axes are {tuple(mesh.shape)}")
    return math.prod(mesh.shape[name] for name in names)


def batch_sharding(mesh: Mesh, axis: str | tuple[str, ...] = DATA_AXIS) -> NamedSharding:
    """The leading (batch) dimension split over ``axis``; for inputs and labels."""
    _axis_size(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding(mesh, P())`` for every leaf of ``tree`` (arrays or shapes)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: sharding, tree)


def shard_leading_axis(tree: Any, mesh: Mesh, axis: str | tuple[str, ...] = DATA_AXIS) -> Any:
    """Split the leading dimension of each leaf over ``axis`` where it divides; replicate the rest.

    Scalars and leaves whose first dimension is not a multiple of the axis
    size are replicated. ``tree`` holds arrays or ``jax.ShapeDtypeStruct``
    (e.g. from ``jax.eval_shape``); None leaves stay None.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax as rj
      >>> mesh = rj.sharding.data_mesh(1)
      >>> spec = rj.sharding.shard_leading_axis({"w": jnp.ones((4, 2)), "n": jnp.int32(0)}, mesh)
      >>> tuple(spec["w"].spec), tuple(spec["n"].spec)
      (('data',), ())
    """
    size = _axis_size(mesh, axis)
    split = NamedSharding(mesh, PartitionSpec(axis))
    whole = NamedSharding(mesh, PartitionSpec())

    def leaf(x):
        shape = np.shape(x)
        return split if shape and shape[0] % size == 0 else whole

    return jax.tree.map(leaf, tree)


def zero_state_sharding(state: Any, mesh: Mesh, axis: str | tuple[str, ...] = DATA_AXIS) -> Any:
    """ZeRO-1: the optimizer state split over the data-parallel ``axis``.

    Every slot (velocity, mean gradient, momentum, EMA weights, accumulated
    gradients) has its leading dimension split over ``axis`` where it divides;
    step counters, loss scales and indivisible leaves are replicated. Give it
    to ``jit`` as the state's in- and out-sharding while the parameters stay
    replicated: each device then keeps ``1 / mesh.shape[axis]`` of each
    divisible slot, updates its slice of the parameters, and XLA all-gathers
    the updated parameters. The arithmetic is elementwise, so the result is
    the unsharded one.

    Args:
      state: the optimizer state, or its shapes (``jax.eval_shape(tx.init, params)``).
      mesh: the device mesh.
      axis: the data-parallel mesh axis (or a tuple of axes).
    """
    return shard_leading_axis(state, mesh, axis)


def state_sharding(tx: Any, params: Any, params_sharding: Any, mesh: Mesh | None = None) -> Any:
    """The sharding of ``tx``'s state when each slot follows its parameter's sharding.

    Every subtree of the state that has the structure and shapes of
    ``params`` (velocity, mean gradient, momentum, EMA weights, accumulated
    gradients) gets ``params_sharding``; everything else (counters, loss
    scale) is replicated. Use it for FSDP (sharded parameters keep sharded
    slots) and for plain data parallelism (replicated everywhere), as the
    ``out_shardings`` of a jitted ``tx.init``, so that the state is born with
    the layout the train step keeps:

      state = jax.jit(tx.init, out_shardings=state_sharding(tx, params, p_shard))(params)

    Args:
      tx: an optax transformation (or its ``init`` function).
      params: the parameters, or their shapes.
      params_sharding: a sharding per parameter leaf (a pytree like ``params``).
      mesh: for the replicated leaves; default the mesh of ``params_sharding``.
    """
    init = getattr(tx, "init", tx)
    shapes = jax.eval_shape(init, params)
    params_def = jax.tree.structure(params)
    param_shapes = [np.shape(p) for p in jax.tree.leaves(params)]
    shardings = jax.tree.leaves(params_sharding)
    if len(shardings) != len(param_shapes):
        raise ValueError(
            f"state_sharding: params_sharding has {len(shardings)} leaves, params has "
            f"{len(param_shapes)}; give one sharding per parameter leaf"
        )
    if mesh is None:
        meshes = [s.mesh for s in shardings if isinstance(s, NamedSharding)]
        if not meshes:
            raise ValueError(
                "state_sharding: pass mesh= when params_sharding holds no NamedSharding"
            )
        mesh = meshes[0]  # type: ignore[assignment]  # an AbstractMesh works as well here
    whole = NamedSharding(mesh, PartitionSpec())  # type: ignore[arg-type]  # narrowed above

    def params_like(node) -> bool:
        if jax.tree.structure(node) != params_def:  # type: ignore[operator]  # PyTreeDef stub
            return False
        return [np.shape(x) for x in jax.tree.leaves(node)] == param_shapes

    return jax.tree.map(
        lambda node: params_sharding if params_like(node) else whole,
        shapes,
        is_leaf=params_like,
    )


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s arrays held by each addressable device (from ``addressable_shards``).

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax as rj
      >>> list(rj.sharding.bytes_per_device({"w": jnp.ones((4, 2))}).values())
      [32]
    """
    total: dict[jax.Device, int] = collections.defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] += shard.data.nbytes
    return dict(total)
