"""Multi-head attention: the entry points the model calls (`attention`, and `cached_attention` when
it decodes against a KV cache), and the one place that decides which implementation runs
(`choose_impl`).

    xla         plain XLA (xla.py): the reference; CPU, KV-cache decoding, attention dropout
    pallas_gpu  our flash attention for GPUs, Pallas -> Triton (pallas_gpu.py)
    pallas_tpu  our flash attention for TPUs, Pallas -> Mosaic (pallas_tpu.py)
    cudnn       cuDNN through jax.nn.dot_product_attention (cudnn.py); no segment ids
    auto        the fastest correct one for the backend and the call

The kernels take causal attention with segment ids (packed sequences) and skip the tiles that
causality and segments make empty. What they do not take goes to XLA: decoding against a KV cache
(one query row, nothing to fuse) always, and attention dropout under "auto"; asking a kernel for
dropout explicitly is an error rather than a silent switch.

Tensor names carry their shapes in model.py's alphabet: B batch, T query length, S key length,
H heads, K head dim.
"""

import functools
from typing import get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from phi_jax.attention.xla import xla_attention
from phi_jax.config import AttentionImpl

IMPLS = get_args(AttentionImpl)

# The logical axes of q, k, v and the output where a kernel runs per shard: batch and heads may be
# sharded, the sequence may not (a kernel needs every key of its rows). model.py constrains q to
# them; k and v (projected like q) and the output are laid out so by the shard_map's specs below.
QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def choose_impl(impl: str, *, backend: str, dtype, head_dim: int, has_segments: bool, dropout: bool) -> str:
    """The backend decision, made here and nowhere else."""
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, found {impl!r}")
    if impl == "xla":
        return "xla"
    if impl != "auto":
        if dropout:
            raise ValueError(f"attention: impl {impl!r} has no attention dropout; use impl='auto' or 'xla' "
                             "(or attention_dropout=0)")
        return impl
    if dropout:
        return "xla"
    if backend == "tpu":  # the kernel's row statistics span 128 lanes: head_dim <= 128 or a multiple
        return "pallas_tpu" if head_dim <= 128 or head_dim % 128 == 0 else "xla"
    if backend == "gpu":
        cudnn_fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
        return "cudnn" if cudnn_fits and not has_segments else "pallas_gpu"
    return "xla"


def _kernel(impl):
    """The fused implementations, imported on first use (CPU-only runs never load Pallas)."""
    if impl == "pallas_gpu":
        from phi_jax.attention.pallas_gpu import pallas_gpu_attention
        return pallas_gpu_attention
    if impl == "pallas_tpu":
        from phi_jax.attention.pallas_tpu import pallas_tpu_attention
        return pallas_tpu_attention
    from phi_jax.attention.cudnn import cudnn_attention
    return cudnn_attention


def _per_shard(kernel, has_segments: bool):
    """Under a mesh (jax.set_mesh), runs the kernel once per shard of batch and heads, as the
    logical axis rules in context place them. A Pallas or cuDNN call has no partitioning rule of
    its own: without this, XLA would gather whole q, k and v onto every device."""
    if jax.sharding.get_abstract_mesh().empty:
        return kernel
    qkv = nn.logical_to_mesh_axes(QKV_AXES)
    if qkv[1] is not None:
        raise ValueError(f"attention: the fused kernels need whole sequences, but the axis rules shard "
                         f"{QKV_AXES[1]!r} over {qkv[1]!r}")
    segments = PartitionSpec(qkv[0], None) if has_segments else None
    return jax.shard_map(kernel, in_specs=(qkv, qkv, qkv, segments, segments), out_specs=qkv, check_vma=False)


def attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, segment_ids=None, kv_segment_ids=None, causal=True,
              dropout_rate=0.0, dropout_rng=None, impl="auto", interpret=False):
    """Softmax attention with scale head_dim**-0.5; returns an array shaped like q [B, T, H, K].

    segment_ids [B, T] int32: a query attends only to keys of its own segment (0 may mark padding,
    which then attends only to padding). `kv_segment_ids` [B, S] gives the keys' segments when keys
    are not the queries; it defaults to `segment_ids`. `interpret` runs a Pallas kernel's body on
    the CPU (tests, debugging).
    """
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    chosen = choose_impl(impl, backend=jax.default_backend(), dtype=q_BxTxHxK.dtype, head_dim=q_BxTxHxK.shape[-1],
                         has_segments=segment_ids is not None, dropout=dropout_rate > 0.0)
    if chosen == "xla":
        return xla_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segment_ids=segment_ids,
                             kv_segment_ids=kv_segment_ids, causal=causal, dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng)
    kernel = functools.partial(_kernel(chosen), causal=causal, interpret=interpret)
    return _per_shard(kernel, segment_ids is not None)(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segment_ids, kv_segment_ids)


def cached_attention(q_BxTxHxK, k_cache_BxHxSxK, v_cache_BxHxSxK, *, segment_ids, kv_segment_ids, cache_index):
    """Causal attention of T new queries against a KV cache that already holds their keys at
    `cache_index`..`cache_index + T - 1`: query i sees cache slots 0..cache_index + i of its segment.

    Always XLA, whatever the configured impl. The cache is heads-first ([B, H, S, K]) so that XLA's
    batched dots over (batch, heads) read it where it lies; [B, S, H, K] costs a transposed copy of
    the whole cache per layer per decoded token.
    """
    return xla_attention(q_BxTxHxK, k_cache_BxHxSxK, v_cache_BxHxSxK, segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, causal=True, q_offset=cache_index, kv_heads_first=True)
