"""Multi-head attention: the one entry point the model calls.

`attention` picks an implementation per backend and inputs in one place (`choose_impl`).
"""

from phi_jax.attention.xla import xla_attention

IMPLS = ("auto", "xla")


def choose_impl(impl: str) -> str:
    """The backend decision, made here and nowhere else."""
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, found {impl!r}")
    return "xla" if impl == "auto" else impl


def attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, *, segment_ids=None, kv_segment_ids=None,
              causal=True, q_offset=0, dropout_rate=0.0, dropout_rng=None, impl="auto"):
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    choose_impl(impl)
    return xla_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, causal=causal, q_offset=q_offset,
                         dropout_rate=dropout_rate, dropout_rng=dropout_rng)
