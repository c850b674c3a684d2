"""Attention in plain XLA: the reference every kernel is tested against, and the path for whatever
the kernels do not cover (CPU, KV-cache decoding, attention dropout).

Materializes the [B, H, T, S] scores, so it costs O(T * S) memory; fine for decoding and for tests.
"""

import jax
import jax.numpy as jnp

# Finite, so that a row with no visible key gives zeros instead of NaN after the softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible_mask(batch, q_len, kv_len, segment_ids, kv_segment_ids, causal, q_offset):
    """[B, 1, T, S] bool (or None when every key is visible)."""
    mask = None
    if causal:  # q_offset: one for all rows, or [B] (a KV cache whose rows are filled to different lengths)
        q_pos_Bx1xTx1 = jnp.reshape(q_offset, (-1, 1, 1, 1)) + jnp.arange(q_len)[:, None]
        mask = jnp.arange(kv_len) <= q_pos_Bx1xTx1
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = same if mask is None else mask & same
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
    return mask


def xla_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, segment_ids=None, kv_segment_ids=None, causal=True,
                  q_offset=0, dropout_rate=0.0, dropout_rng=None, kv_heads_first=False):
    """`kv_heads_first`: k and v come as [B, H, S, K] (the KV cache's layout) instead of [B, S, H, K]."""
    batch, q_len, _, head_dim = q_BxTxHxK.shape
    kv = "bhsk" if kv_heads_first else "bshk"
    kv_len = k_BxSxHxK.shape[2 if kv_heads_first else 1]
    scores_BxHxTxS = jnp.einsum(f"bthk,{kv}->bhts", q_BxTxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32) * head_dim ** -0.5
    mask = visible_mask(batch, q_len, kv_len, segment_ids, kv_segment_ids, causal, q_offset)
    if mask is not None:
        scores_BxHxTxS = jnp.where(mask, scores_BxHxTxS, MASK_VALUE)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if mask is not None:
        probs_BxHxTxS = probs_BxHxTxS * jnp.any(mask, axis=-1, keepdims=True)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxTxS.shape)
        probs_BxHxTxS = jnp.where(keep, probs_BxHxTxS / (1.0 - dropout_rate), 0.0)
    out_BxTxHxK = jnp.einsum(f"bhts,{kv}->bthk", probs_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)
    return out_BxTxHxK.astype(q_BxTxHxK.dtype)
