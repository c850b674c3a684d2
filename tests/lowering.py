"""Lowering for an accelerator this machine does not have: the StableHLO text jax hands XLA for a
cuda or tpu device, from a CPU-only machine, on jax 0.10 and 0.11.

Pallas' Triton lowering needs the target GPU's compute capability. jax 0.10 assumes sm_90 when no GPU
is present; jax 0.11 refuses ("please specify an abstract GPU device using AbstractDevice") and reads
it from the abstract device of the abstract mesh that was in context when the pallas_call was traced
(each equation keeps its tracing context, and lowering restores it). So a cuda lowering is traced
and lowered under an abstract mesh with no axes whose abstract device is an H100 (sm_90: the target
0.10 assumed, and the lent machines' architecture). Having no axes, that mesh is empty: jit and
phi_jax.attention (which runs the kernel per shard under a mesh) trace exactly what they trace with
no mesh, so the program lowered is the one the caller wrote.
"""

import contextlib

import jax

# What an H100 reports as its device_kind and core_count: jax 0.11 maps "NVIDIA H100" to sm_90.
CUDA_TARGET = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def _target_device(platform: str):
    if platform != "cuda":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(**CUDA_TARGET)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def lowered_text(fn, *args, platform: str) -> str:
    """jax.jit(fn) traced with `args` (arrays or jax.ShapeDtypeStruct) and lowered for `platform`
    ("cuda", "tpu", "cpu"), as text."""
    with _target_device(platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
