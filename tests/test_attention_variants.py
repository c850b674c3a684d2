"""The kernel variants a GPU run will A/B (BlockSizes.exp2, dkv_transposed, fused_backward): each equals
the float64 reference in interpret mode, lowers for its hardware, and the TPU kernel refuses the
Triton-only ones. Off by default until bench/gpu_suite.sh has timed them on a card."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.attention.block_sizes import gpu_block_sizes
from phi_jax.attention.pallas_gpu import pallas_gpu_attention
from phi_jax.attention.pallas_tpu import pallas_tpu_attention
from tests.lowering import lowered_text
from tests.test_attention import (
    LOWERINGS,
    SMALL_BLOCKS,
    TOLERANCE,
    _float64_reference,
    _inputs,
    _packed,
    _relative_error,
    _value_and_grads,
)

pytestmark = pytest.mark.core  # the JAX stack only: also run under the newest jax (.ci/newest_jax.sh)

GPU_VARIANTS = {
    "exp2": {"exp2": True},
    "dkv_transposed": {"dkv_transposed": True},
    "fused_backward": {"fused_backward": True},
    "all_three": {"exp2": True, "dkv_transposed": True, "fused_backward": True},
}
CASES = {
    # name: (q_len, kv_len, causal, dtype): lengths that need padding, several blocks per side
    "causal_packed_f32": (72, 72, True, "float32"),
    "bidirectional_cross_bf16": (40, 88, False, "bfloat16"),
}


def _check_against_reference(kernel, rng, q_len, kv_len, causal, dtype, blocks):
    q, k, v, d_out = _inputs(rng, 2, q_len, kv_len, 2, 64, dtype)
    seg = _packed(rng, 2, q_len, mean_doc=10).at[0, 20].set(77)  # one-token document inside a block
    kv_seg = seg if q_len == kv_len else _packed(rng, 2, kv_len, mean_doc=10)
    out, grads = _value_and_grads(
        lambda q, k, v: kernel(q, k, v, seg, kv_seg, causal=causal, block_sizes=blocks, interpret=True), q, k, v, d_out)
    ref_out, ref_grads = _float64_reference(q, k, v, d_out, segment_ids=seg, kv_segment_ids=kv_seg, causal=causal)
    fwd_tol, grad_tol = TOLERANCE[dtype]
    assert _relative_error(out, ref_out) <= fwd_tol
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), f"d{name} not finite"
        assert _relative_error(grad, ref) <= grad_tol, f"d{name}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gpu_kernel_variant_matches_float64_reference(variant, case, rng):
    _check_against_reference(pallas_gpu_attention, rng, *CASES[case],
                             dataclasses.replace(SMALL_BLOCKS, **GPU_VARIANTS[variant]))


@pytest.mark.parametrize("case", CASES)
def test_tpu_kernel_in_base_2_matches_float64_reference(case, rng):
    blocks = dataclasses.replace(SMALL_BLOCKS, exp2=True)
    q_len, kv_len, causal, dtype = CASES[case]
    _check_against_reference(pallas_tpu_attention, rng, q_len, kv_len, causal, dtype, blocks)


def test_tpu_kernel_refuses_the_triton_only_variants():
    q = jnp.zeros((1, 128, 1, 64), jnp.float32)
    for variant in ("dkv_transposed", "fused_backward"):
        with pytest.raises(ValueError, match="Triton kernel variants"):
            pallas_tpu_attention(q, q, q, block_sizes=dataclasses.replace(SMALL_BLOCKS, **{variant: True}))


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gpu_kernel_variant_lowers_for_cuda(variant):
    """The real block table with the variant on, bf16, a padded length, packed: the fused backward is
    one kernel fewer."""
    platform, custom_call = LOWERINGS["pallas_gpu"]
    blocks = dataclasses.replace(gpu_block_sizes(64), **GPU_VARIANTS[variant])
    qkv = jax.ShapeDtypeStruct((2, 1000, 4, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

    def loss(q, k, v, seg):
        return pallas_gpu_attention(q, k, v, seg, block_sizes=blocks).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    text = lowered_text(grad, qkv, qkv, qkv, seg, platform=platform)
    assert text.count(custom_call) == (2 if blocks.fused_backward else 3)
