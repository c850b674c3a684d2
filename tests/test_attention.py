"""Attention: both Pallas kernels (interpret mode on CPU) against a float64 reference, block skipping,
padding and fully masked rows, lowering for cuda and tpu without hardware, the dispatcher, the model
wired through it, and sharding under a mesh.

Inputs are fresh random each run; a failure prints the seed (PHI_TEST_SEED=<seed> replays it).
Errors are norm-wise relative: |x - ref| / |ref| over the whole array.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from phi_jax import Phi, init_cache, sharding
from phi_jax.attention import attention, choose_impl, flash
from phi_jax.attention.block_sizes import BlockSizes, gpu_block_sizes, tpu_block_sizes
from phi_jax.attention.cudnn import cudnn_attention
from phi_jax.attention.pallas_gpu import pallas_gpu_attention
from phi_jax.attention.pallas_tpu import pallas_tpu_attention
from phi_jax.attention.xla import xla_attention
from phi_jax.config import tiny
from phi_jax.model import init_params, param_shapes
from tests.lowering import lowered_text

pytestmark = pytest.mark.core  # the JAX stack only: also run under the newest jax (.ci/newest_jax.sh)

KERNELS = {"pallas_gpu": pallas_gpu_attention, "pallas_tpu": pallas_tpu_attention}
# Small blocks, so that short test sequences span several blocks and padding; the TPU kernel's
# real minimum (128) is exercised by test_tpu_kernel_in_tpu_interpret_mode and the lowering tests.
SMALL_BLOCKS = BlockSizes(32, 16, 16, 32, 32, 16)
TOLERANCE = {"float32": (2e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}  # (forward, gradients)


def _inputs(rng, batch, q_len, kv_len, heads, head_dim, dtype):
    def normal(length):
        return jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32).astype(dtype)
    return normal(q_len), normal(kv_len), normal(kv_len), normal(q_len)


def _relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _value_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out.astype(out.dtype))


def _float64_reference(q, k, v, d_out, **kw):
    with jax.enable_x64(True):
        as64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out)]
        out, grads = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, **kw), *as64)
        return np.asarray(out), [np.asarray(g) for g in grads]


def _packed(rng, batch, length, mean_doc):
    """Segment ids 1, 2, ... with random document boundaries, ending in a run of 0s (padding)."""
    rows = []
    for _ in range(batch):
        ids, doc = [], 1
        while len(ids) < length:
            ids += [doc] * int(rng.integers(1, 2 * mean_doc))
            doc += 1
        row = np.array(ids[:length])
        row[length - int(rng.integers(1, 8)):] = 0
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


CASES = {
    # name: (batch, q_len, kv_len, heads, head_dim, dtype, causal, segments)
    "causal_f32_d64_unaligned": (2, 72, 72, 2, 64, "float32", True, None),
    "packed_f32_d32": (2, 96, 96, 2, 32, "float32", True, "packed"),
    "packed_bf16_d128": (1, 80, 80, 2, 128, "bfloat16", True, "packed"),
    "bidirectional_f32_cross_lengths": (2, 40, 72, 2, 64, "float32", False, "cross"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_float64_reference(impl, case, rng):
    batch, q_len, kv_len, heads, head_dim, dtype, causal, segments = CASES[case]
    q, k, v, d_out = _inputs(rng, batch, q_len, kv_len, heads, head_dim, dtype)
    seg = kv_seg = None
    if segments == "packed":
        seg = kv_seg = _packed(rng, batch, q_len, mean_doc=12)
        seg = kv_seg = seg.at[0, 30].set(99)  # a one-token segment, inside a block
    elif segments == "cross":  # queries of segment 3 have no key at all: their rows must be 0
        seg = jnp.asarray(rng.integers(1, 4, (batch, q_len)), jnp.int32)
        kv_seg = jnp.asarray(rng.integers(1, 3, (batch, kv_len)), jnp.int32)

    out, grads = _value_and_grads(
        lambda q, k, v: KERNELS[impl](q, k, v, seg, kv_seg, causal=causal, block_sizes=SMALL_BLOCKS, interpret=True),
        q, k, v, d_out)
    ref_out, ref_grads = _float64_reference(q, k, v, d_out, segment_ids=seg, kv_segment_ids=kv_seg, causal=causal)

    fwd_tol, grad_tol = TOLERANCE[dtype]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _relative_error(out, ref_out) <= fwd_tol
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), f"d{name} not finite"
        assert _relative_error(grad, ref) <= grad_tol, f"d{name}"
    if segments == "cross":
        empty = np.asarray(seg == 3)
        assert empty.any() and not np.asarray(out)[empty].any()


@pytest.mark.parametrize("impl", KERNELS)
def test_skipped_blocks_are_never_read(impl, rng):
    """NaN in the second document's values: the first document's outputs (and dQ) stay finite only
    if the kernel never computes a tile of document 1 against document 2 (a mask alone would give
    0 * NaN = NaN). Bidirectional, so causality cannot be what skips them."""
    q, k, v, d_out = _inputs(rng, 1, 128, 128, 2, 32, "float32")
    seg = jnp.asarray(np.repeat([[1, 2]], 64, axis=1), jnp.int32)
    v = v.at[:, 64:].set(jnp.nan)
    out, (dq, _, _) = _value_and_grads(
        lambda q, k, v: KERNELS[impl](q, k, v, seg, causal=False, block_sizes=SMALL_BLOCKS, interpret=True),
        q, k, v, d_out.at[:, 64:].set(0.0))
    ref = xla_attention(q[:, :64], k[:, :64], v[:, :64], causal=False)
    assert _relative_error(out[:, :64], ref) <= 2e-5
    assert np.isfinite(np.asarray(dq[:, :64])).all()


def test_spans_skip_across_documents_and_above_the_diagonal():
    """Documents of 64 tokens in blocks of 32: each query block sees only its own document's blocks."""
    seg = jnp.asarray(np.repeat(np.arange(1, 5), 64)[None], jnp.int32)
    plan = flash.Plan(causal=True, q_len=256, kv_len=256, scale=1.0, blocks=SMALL_BLOCKS, interpret=True)
    kv = flash.key_spans(seg, seg, plan=plan, batch=1, q_pad=256, kv_pad=256, bq=32, bk=32)[0]
    assert np.asarray(kv).tolist() == [[2 * (i // 2), i + 1] for i in range(8)]
    q = flash.query_spans(seg, seg, plan=plan, batch=1, q_pad=256, kv_pad=256, bq=32, bk=32)[0]
    assert np.asarray(q).tolist() == [[j, 2 * (j // 2) + 2] for j in range(8)]
    no_segments = flash.key_spans(None, None, plan=plan, batch=1, q_pad=256, kv_pad=256, bq=32, bk=32)[0]
    assert np.asarray(no_segments).tolist() == [[0, i + 1] for i in range(8)]


@pytest.mark.slow
def test_tpu_kernel_in_tpu_interpret_mode(rng):
    """The TPU kernel at its legal minimum blocks (128) under Pallas' TPU-faithful interpreter, which
    poisons uninitialized VMEM with NaN and raises on out-of-bounds reads: 2 x 2 tiles, padded, packed."""
    q, k, v, d_out = _inputs(rng, 1, 200, 200, 1, 64, "float32")
    seg = _packed(rng, 1, 200, mean_doc=40)
    blocks = BlockSizes(*[128] * 6)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_tpu_attention(q, k, v, seg, block_sizes=blocks, interpret=pltpu.InterpretParams()),
        q, k, v, d_out)
    ref_out, ref_grads = _float64_reference(q, k, v, d_out, segment_ids=seg, kv_segment_ids=seg)
    assert _relative_error(out, ref_out) <= 2e-5
    assert all(_relative_error(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))


# ---- Lowering without hardware -----------------------------------------------------------------

LOWERINGS = {"pallas_gpu": ("cuda", "custom_call @__gpu$xla.gpu.triton("),
             "pallas_tpu": ("tpu", "custom_call @tpu_custom_call(")}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("impl", KERNELS)
def test_lowers_forward_and_backward(impl, dtype):
    """The real block-size tables, a length that needs padding, packed segments: forward and grad."""
    platform, custom_call = LOWERINGS[impl]
    qkv = jax.ShapeDtypeStruct((2, 1000, 4, 64), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

    def forward(q, k, v, seg):
        return attention(q, k, v, segment_ids=seg, impl=impl)

    def backward(q, k, v, seg):
        return jax.grad(lambda *qkv: forward(*qkv, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((forward, 1), (backward, 3)):
        text = lowered_text(fn, qkv, qkv, qkv, seg, platform=platform)
        assert text.count(custom_call) == kernels, fn.__name__


# ---- The dispatcher ----------------------------------------------------------------------------

def _choose(impl="auto", backend="gpu", dtype=jnp.bfloat16, head_dim=64, has_segments=False, dropout=False):
    return choose_impl(impl, backend=backend, dtype=dtype, head_dim=head_dim, has_segments=has_segments,
                       dropout=dropout)


def test_auto_picks_per_backend_and_call():
    assert _choose(backend="cpu") == "xla"
    assert _choose(backend="tpu", has_segments=True) == "pallas_tpu"
    assert _choose(backend="tpu", head_dim=192) == "xla"
    assert _choose(backend="gpu") == "cudnn"
    assert _choose(backend="gpu", has_segments=True) == "pallas_gpu"
    assert _choose(backend="gpu", dtype=jnp.float32) == "pallas_gpu"  # cuDNN attention is fp16/bf16 only
    assert _choose(backend="tpu", dropout=True) == "xla"


def test_explicit_impls_refuse_what_they_cannot_do():
    assert _choose("pallas_gpu", backend="cpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="dropout"):
        _choose("pallas_gpu", dropout=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        _choose("flash")
    q = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="no segment ids"):
        cudnn_attention(q, q, q, jnp.ones((1, 8), jnp.int32))


def test_block_tables_fit_short_sequences():
    blocks = gpu_block_sizes(64).fit(40, 40, min_block=16, power_of_two=True)
    assert max(blocks.q_blocks + blocks.k_blocks) == 64 and blocks.padded_lengths(40, 40) == (64, 64)
    assert tpu_block_sizes(64).fit(2048, 2048, min_block=128, power_of_two=False).block_q == 512
    assert tpu_block_sizes(64).fit(300, 300, min_block=128, power_of_two=False).padded_lengths(300, 300) == (384, 384)


# ---- Wired into the model ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", KERNELS)
def test_model_logits_equal_xla(impl, rng):
    config = tiny(num_layers=2)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 40)), jnp.int32)
    seg = _packed(rng, 2, 40, mean_doc=10)
    ref = Phi(config.replace(attention_impl="xla")).apply({"params": params}, tokens, segment_ids_BxT=seg)
    kernel_config = config.replace(attention_impl=impl, attention_interpret=True)
    logits = Phi(kernel_config).apply({"params": params}, tokens, segment_ids_BxT=seg)
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=0)

    # The same config decodes with a KV cache (that call goes to XLA).
    cache = init_cache(kernel_config, batch_size=2, max_length=48)
    logits, cache = Phi(kernel_config).apply({"params": params}, tokens[:, :8], cache=cache)
    np.testing.assert_allclose(logits, Phi(config).apply({"params": params}, tokens[:, :8]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", KERNELS)
def test_prefill_into_a_fresh_cache_runs_the_kernel_and_decoding_does_not(impl):
    """A fresh cache's first call attends within its own tokens, so it can take the fused kernel;
    later calls attend over the cache with XLA."""
    platform, custom_call = LOWERINGS[impl]
    config = tiny(num_layers=2, attention_impl=impl)
    params = param_shapes(config)

    def prefill(params, tokens):
        return Phi(config).apply({"params": params}, tokens, cache=init_cache(config, batch_size=2, max_length=200))

    def step(params, tokens, cache):
        return Phi(config).apply({"params": params}, tokens, cache=cache)

    def lowered(fn, *args):
        return lowered_text(fn, *args, platform=platform)

    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    assert custom_call in lowered(prefill, params, tokens)
    cache = jax.eval_shape(prefill, params, tokens)[1]
    assert custom_call not in lowered(step, params, tokens, cache)


def test_kernel_runs_per_shard_under_a_mesh(rng):
    """Batch over data x fsdp and heads over tensor: no gathering of q, k, v; same result as XLA."""
    q, k, v, d_out = _inputs(rng, 4, 40, 40, 4, 32, "float32")
    seg = _packed(rng, 4, 40, mean_doc=10)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def loss(q, k, v, impl):
        return jnp.sum(attention(q, k, v, segment_ids=seg, impl=impl, interpret=True) * d_out)

    with sharding.mesh_context(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        assert "all-gather" not in fn.lower(q, k, v, "pallas_gpu").as_text()
        value, grads = fn(q, k, v, "pallas_gpu")
    ref_value, ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-3)  # a sum of 20k signed terms
    assert all(_relative_error(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu():
    """bench/attention.py's argument parsing, timing loop and correctness checks, in interpret mode."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "attention.py"), "--tiny", "--interpret"],
                            capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("| 128 | no | ours (pallas_gpu) |", "| 128 | yes | ours (pallas_gpu) |",
                "| 128 | yes | stock Pallas mha |"):
        assert row in result.stdout, result.stdout
    assert "FAILED" not in result.stdout and "error:" not in result.stdout, result.stdout
