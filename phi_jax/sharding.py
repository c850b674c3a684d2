"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with params, gradients and
optimizer state sharded, ZeRO-3 style), `tensor` (Megatron-style: heads, MLP hidden and vocab split).
The batch is split over `data` x `fsdp`.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None for replicated). Params use the plain names the model
# gives them; activations use `activation_*` so that, e.g., a kernel's `embed` dim is sharded over
# `fsdp` while the residual stream's embed dim stays whole on each device.
LOGICAL_AXIS_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

BATCH_SPEC = PartitionSpec(("data", "fsdp"), None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The mesh and the logical axis rules in context: where jitted steps are traced and run."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def make_mesh(shape: dict, devices=None) -> Mesh:
    """Mesh from e.g. {"data": -1, "fsdp": 1, "tensor": 1}; one -1 takes the remaining devices."""
    devices = jax.devices() if devices is None else devices
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh shape {shape}: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh shape {shape}: needs {math.prod(sizes.values())} devices, found {len(devices)} "
                         f"({jax.device_count()} in all over {jax.process_count()} processes)")
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_sharding(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of nn.Partitioned values (e.g. `jax.eval_shape` of `Phi.init`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(first row, row count) of the global batch this process feeds.

    Processes whose devices hold the same rows (one model replica split over `tensor`) read the same
    data; the data shard of a process is its first row // row count.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1))
    intervals = sorted({(rows.start or 0, global_batch if rows.stop is None else rows.stop)
                        for rows, _ in index_map.values()})
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        if start != end:
            raise ValueError(f"this process's batch rows are not contiguous: {intervals}")
    first, rows = intervals[0][0], intervals[-1][1] - intervals[0][0]
    return first, rows


def global_batch(mesh: Mesh, local_batch: dict, global_batch_size: int) -> dict:
    """Host-local numpy arrays [local rows, ...] -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value, (global_batch_size,) + value.shape[1:])
            for name, value in local_batch.items()}
