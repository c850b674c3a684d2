"""Every block every Pallas kernel reads or writes lies inside its operand, at every grid point.

Pallas interpret mode clamps an out-of-range block start (dynamic_slice semantics), so a kernel whose
index map points past its array reads the right rows on CPU and passes every numerical test; the
Triton lowering computes the offset as block index x block size with no clamp and reads another
head's rows on a GPU. The bounds tests never run a kernel: they record each `pallas_call` (grid, specs,
operands), evaluate each BlockSpec's index map over the whole grid in Python, and check the block.
The TPU kernels also run under the TPU-faithful interpreter, which raises on an out-of-bounds block;
no such interpreter exists for Triton, hence the recorded check.
"""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from phi_jax.attention import flash, pallas_gpu, pallas_tpu
from phi_jax.attention.block_sizes import GPU_MIN_BLOCK, TPU_MIN_BLOCK, BlockSizes

pytestmark = pytest.mark.core  # the JAX stack only: also run under the newest jax (.ci/newest_jax.sh)


@dataclasses.dataclass
class RecordedCall:
    name: str
    grid: tuple
    in_specs: list
    out_specs: list
    operands: list  # after the scalar-prefetch operands
    outputs: list   # ShapeDtypeStructs
    prefetch: list  # concrete scalar-prefetch operands, passed to every index map


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


@pytest.fixture
def recorded_calls(monkeypatch):
    """Replaces pl.pallas_call with a recorder whose calls return zeros of the output shapes."""
    calls = []

    def recording_pallas_call(kernel, *, out_shape, grid=(), in_specs=(), out_specs=(), grid_spec=None,
                              name=None, **_):
        prefetch_count = 0
        if grid_spec is not None:
            grid, in_specs, out_specs = grid_spec.grid, grid_spec.in_specs, grid_spec.out_specs
            prefetch_count = getattr(grid_spec, "num_scalar_prefetch", 0)

        def call(*operands):
            outputs = _as_list(out_shape)
            calls.append(RecordedCall(name, tuple(grid), _as_list(in_specs), _as_list(out_specs),
                                      list(operands[prefetch_count:]), outputs,
                                      [np.asarray(x) for x in operands[:prefetch_count]]))
            zeros = [jnp.zeros(o.shape, o.dtype) for o in outputs]
            return zeros if isinstance(out_shape, (list, tuple)) else zeros[0]
        return call

    monkeypatch.setattr(pl, "pallas_call", recording_pallas_call)
    return calls


def _block_errors(spec, shape, grid_point, prefetch):
    """Why the block `spec` maps `grid_point` to is not inside an array of `shape` ([] if it is)."""
    index = _as_list(spec.index_map(*grid_point, *prefetch))
    if len(index) != len(spec.block_shape) or len(index) != len(shape):
        return [f"index map gives {len(index)} indices for a {len(shape)}-d operand"]
    errors = []
    for dim, (block, at, size) in enumerate(zip(spec.block_shape, index, shape)):
        at = int(at)
        start, length = (at, 1) if block is None else (at * block, block)  # None: squeezed, an element index
        if start < 0 or start + length > size:
            errors.append(f"dim {dim}: rows [{start}, {start + length}) of {size}")
    return errors


def _out_of_bounds(call: RecordedCall):
    """'operand i at grid point p: ...' for every block outside its operand, over the whole grid."""
    operands = [(f"input {n}", spec, x.shape) for n, (spec, x) in enumerate(zip(call.in_specs, call.operands))
                if spec is not None]
    operands += [(f"output {n}", spec, o.shape) for n, (spec, o) in enumerate(zip(call.out_specs, call.outputs))]
    found = []
    for grid_point in itertools.product(*(range(n) for n in call.grid)):
        for what, spec, shape in operands:
            found += [f"{call.name} {what} {shape} at grid {grid_point}: {e}"
                      for e in _block_errors(spec, shape, grid_point, call.prefetch)]
    return found


def _packed_ids(batch, length, rng):
    """Non-decreasing segment ids with one-token documents, as first-fit packing writes them."""
    lengths = rng.integers(1, 24, size=length)
    lengths[::5] = 1
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:length]
    return jnp.asarray(np.broadcast_to(ids, (batch, length)), jnp.int32)


# Several blocks per side, lengths that need padding, and q/k blocks of different sizes, so that a
# spec that confuses a block with the whole length, or the q side with the k side, points past the end.
# (batch, q_len, kv_len) per backend: the TPU's blocks are at least 128.
SHAPES = {"gpu": {"padded_self": (2, 100, 100), "padded_cross": (1, 72, 136)},
          "tpu": {"padded_self": (1, 300, 300), "padded_cross": (1, 200, 400)}}


def _run_kernels(backend, batch, q_len, kv_len, segments, causal, variant=None):
    """Runs forward and backward of one backend on padded random inputs, recording every pallas_call."""
    rng = np.random.default_rng(0)
    heads, head_dim = 2, 64
    module, min_block = {"gpu": (pallas_gpu, GPU_MIN_BLOCK), "tpu": (pallas_tpu, TPU_MIN_BLOCK)}[backend]
    blocks = (BlockSizes(32, 16, 16, 32, 32, 16) if backend == "gpu"
              else BlockSizes(128, 256, 256, 128, 128, 256))
    blocks = dataclasses.replace(blocks, **(variant or {}))
    plan = flash.plan(q_len, kv_len, head_dim, blocks, min_block=min_block, power_of_two=backend == "gpu",
                      causal=causal, interpret=True)
    q_pad, kv_pad = plan.padded_lengths
    layout = (lambda t: (batch, t, heads, head_dim)) if backend == "gpu" else (lambda t: (batch, heads, t, head_dim))

    def normal(length):
        return jnp.asarray(rng.standard_normal(layout(length)), jnp.float32)

    q, k, v, d_out = normal(q_pad), normal(kv_pad), normal(kv_pad), normal(q_pad)
    seg = kv_seg = None
    if segments:
        seg, kv_seg = flash.pad_segments(plan, _packed_ids(batch, q_len, rng), _packed_ids(batch, kv_len, rng))
    out, lse = module._forward(plan, q, k, v, seg, kv_seg)
    module._backward(plan, q, k, v, seg, kv_seg, out, lse, d_out)


@pytest.mark.parametrize("segments", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("shape", ["padded_self", "padded_cross"])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_every_block_of_every_kernel_lies_inside_its_operand(backend, shape, segments, recorded_calls):
    batch, q_len, kv_len = SHAPES[backend][shape]
    _run_kernels(backend, batch, q_len, kv_len, segments, causal=q_len == kv_len)
    assert [c.name for c in recorded_calls] == ["phi_flash_fwd", "phi_flash_dkv", "phi_flash_dq"]
    for call in recorded_calls:
        assert max(call.grid[:1] if backend == "gpu" else call.grid[2:]) > 1, "one block per side proves nothing"
    problems = [p for call in recorded_calls for p in _out_of_bounds(call)]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("variant", ["dkv_transposed", "fused_backward"])
def test_every_block_of_the_gpu_kernel_variants_lies_inside_its_operand(variant, recorded_calls):
    _run_kernels("gpu", 2, 100, 100, True, causal=True, variant={variant: True})
    kernels = ["phi_flash_fwd", "phi_flash_dkv"] + ([] if variant == "fused_backward" else ["phi_flash_dq"])
    assert [c.name for c in recorded_calls] == kernels
    problems = [p for call in recorded_calls for p in _out_of_bounds(call)]
    assert not problems, "\n".join(problems[:20])


def test_the_bounds_check_finds_a_whole_length_block_indexed_per_row_block():
    """The check itself: the bug it exists for (a [T]-long block at block index n) is reported."""
    spec = pl.BlockSpec((None, None, 64), lambda n, b, h: (b, h, n))
    call = RecordedCall("bad", (2, 1, 1), [spec], [], [jnp.zeros((1, 1, 64))], [], [])
    assert _out_of_bounds(call) == ["bad input 0 (1, 1, 64) at grid (1, 0, 0): dim 2: rows [64, 128) of 64"]


FAITHFUL_CASES = {
    # name: (q_len, kv_len, causal, segments, exp2): at the TPU's real 128 blocks, several per side
    "causal_dense_padded": (300, 300, True, False, False),
    "bidirectional_cross_lengths_packed": (200, 328, False, True, False),
    "causal_packed_base_2": (260, 260, True, True, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FAITHFUL_CASES)
def test_tpu_kernels_pass_the_tpu_faithful_interpreter(case):
    """Pallas' TPU-faithful interpreter raises on an out-of-bounds block and poisons uninitialized VMEM
    with NaN: forward and all three gradients against the float64 reference (tests/test_attention.py
    covers the 2 x 2-tile packed case)."""
    from jax.experimental.pallas import tpu as pltpu

    from phi_jax.attention.pallas_tpu import pallas_tpu_attention
    from tests.test_attention import _float64_reference, _inputs, _relative_error, _value_and_grads

    q_len, kv_len, causal, segments, exp2 = FAITHFUL_CASES[case]
    rng = np.random.default_rng(1)
    q, k, v, d_out = _inputs(rng, 1, q_len, kv_len, 1, 64, "float32")
    seg = kv_seg = None
    if segments:
        seg, kv_seg = _packed_ids(1, q_len, rng), _packed_ids(1, kv_len, rng)
    blocks = BlockSizes(*[128] * 6, exp2=exp2)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_tpu_attention(q, k, v, seg, kv_seg, causal=causal, block_sizes=blocks,
                                             interpret=pltpu.InterpretParams()), q, k, v, d_out)
    ref_out, ref_grads = _float64_reference(q, k, v, d_out, segment_ids=seg, kv_segment_ids=kv_seg, causal=causal)
    assert _relative_error(out, ref_out) <= 2e-5
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(grad)).all() and _relative_error(grad, ref) <= 1e-4, f"d{name}"
