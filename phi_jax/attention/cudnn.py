"""cuDNN's fused attention through `jax.nn.dot_product_attention`: the fastest path on NVIDIA GPUs for
rows that hold one sequence each (bf16 / fp16). It takes no segment ids (a dense mask would become an
O(T^2) bias), so packed sequences go to our Pallas kernel instead.
"""

import jax


def cudnn_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segment_ids=None, kv_segment_ids=None, *, causal=True,
                    interpret=False):
    """Same contract as the Pallas kernels; refuses segment ids rather than attend across documents."""
    del interpret  # cuDNN has no interpreter
    if segment_ids is not None or kv_segment_ids is not None:
        raise ValueError(
            "attention impl 'cudnn' takes no segment ids (jax.nn.dot_product_attention has none, and a dense "
            "mask would be slow): use impl='pallas_gpu' (or 'auto') for packed sequences")
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=causal, implementation="cudnn")
