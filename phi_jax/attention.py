"""Multi-head attention: the one entry point the model calls.

`attention` picks an implementation per backend and inputs in one place (`_choose_impl`). Today the
only implementation is plain XLA; the fused Pallas kernels plug in here.
"""

import jax
import jax.numpy as jnp

# Finite, so that a row with no visible key gives zeros instead of NaN after the softmax.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "xla")


def _choose_impl(impl: str) -> str:
    """The backend decision, made here and nowhere else."""
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, found {impl!r}")
    return "xla" if impl == "auto" else impl


def attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, *, segment_ids=None, kv_segment_ids=None,
              causal=True, q_offset=0, dropout_rate=0.0, dropout_rng=None, impl="auto"):
    """Softmax attention with scale head_dim**-0.5; returns an array shaped like q.

    segment_ids [B, T] int32: a query attends only to keys of its own segment. `kv_segment_ids`
    [B, S] gives the keys' segments when keys are not the queries (a KV cache); it defaults to
    `segment_ids`. `q_offset` is the key index of the first query (the cache fill level when
    decoding): causal masking lets query i see keys 0..q_offset+i.
    """
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    return _IMPLEMENTATIONS[_choose_impl(impl)](q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, segment_ids, kv_segment_ids,
                          causal, q_offset, dropout_rate, dropout_rng)


def _visible_mask(batch, q_len, kv_len, segment_ids, kv_segment_ids, causal, q_offset):
    """[B, 1, T, S] bool (or None when every key is visible)."""
    mask = None
    if causal:
        q_pos = q_offset + jnp.arange(q_len)[:, None]
        mask = (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = same if mask is None else mask & same
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
    return mask


def _xla_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, segment_ids, kv_segment_ids, causal,
                   q_offset, dropout_rate, dropout_rng):
    batch, q_len, _, head_dim = q_BxTxHxD.shape
    kv_len = k_BxSxHxD.shape[1]
    scores_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD,
                                preferred_element_type=jnp.float32) * head_dim ** -0.5
    mask = _visible_mask(batch, q_len, kv_len, segment_ids, kv_segment_ids, causal, q_offset)
    if mask is not None:
        scores_BxHxTxS = jnp.where(mask, scores_BxHxTxS, _MASK_VALUE)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if mask is not None:
        probs_BxHxTxS = probs_BxHxTxS * jnp.any(mask, axis=-1, keepdims=True)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxTxS.shape)
        probs_BxHxTxS = jnp.where(keep, probs_BxHxTxS / (1.0 - dropout_rate), 0.0)
    out_BxTxHxD = jnp.einsum("bhts,bshd->bthd", probs_BxHxTxS.astype(v_BxSxHxD.dtype), v_BxSxHxD)
    return out_BxTxHxD.astype(q_BxTxHxD.dtype)


_IMPLEMENTATIONS = {"xla": _xla_attention}
