"""The training batch, written once: its fields and their dtypes. numpy only (no jax).

Every batch the data stream yields, the train step takes and the trainer describes ahead of time is a
dict of these fields, each [batch, seq_len]:

  tokens        int32    input ids
  targets       int32    the next token of each position
  loss_weights  float32  1 on real targets, 0 on padding and on a chat task's prompt tokens (never
                         derived from token != 0 or != pad: in phi's vocabulary id 0 is '!', and
                         <|endoftext|> is pad, bos and eos at once, a target a chat reply must learn)
  segment_ids   int32    concat packing: all 1; first_fit: 1, 2, ... per packed document, 0 on padding
  positions     int32    concat: 0..seq_len-1; first_fit: restarting at 0 in each segment

Padding is zero in every field: token 0, weight 0, segment 0, position 0.
"""

import numpy as np

FIELDS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "loss_weights": np.dtype(np.float32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
}


def padding(shape) -> dict[str, np.ndarray]:
    """Every field as padding (zeros) of `shape`: a row is (seq_len,), a batch (rows, seq_len)."""
    return {name: np.zeros(shape, dtype) for name, dtype in FIELDS.items()}
