"""Embedding and lm_head rows for tokens a chat template added (phi_jax.data.chat, `prepare --chat_template`).

phi's tokenizer has 50295 ids and its embedding 51200 rows: chatml's <|im_start|> and <|im_end|> take ids
50295 and 50296, rows phi never trained. Random or untrained rows there make the first steps of a
fine-tune chase them; rows set to the mean of the trained ones start the new tokens as an average token
(the mean-resizing of transformers' resize_token_embeddings, without its noise). A vocabulary with no
spare rows grows: the embedding and lm_head get the rows the experiment's model has (its vocab_size).

`prepare` lists the added tokens in PREPARED/chat_tokens.json ({"added": {token: id}, "trained_rows": n})
beside the tokenizer.json the run trains with. numpy only.
"""

import json
import pathlib

import numpy as np

from phi_jax.errors import PhiJaxError

CHAT_TOKENS_FILE = "chat_tokens.json"


class TokenRowsError(PhiJaxError, ValueError):
    """Rows for added tokens that the model cannot hold."""


def added_tokens(tokenizer_file) -> tuple[dict[str, int], int] | None:
    """({token: id} a chat template added, the number of trained rows) from the chat_tokens.json beside
    `tokenizer_file`; None when it added none (or there is no such file)."""
    if tokenizer_file is None:
        return None
    path = pathlib.Path(tokenizer_file).with_name(CHAT_TOKENS_FILE)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return (record["added"], int(record["trained_rows"])) if record.get("added") else None


def with_token_rows(params: dict, token_ids, trained_rows: int, vocab_size: int) -> dict:
    """`params` with the embedding and lm_head grown to `vocab_size` rows (if they have fewer) and the rows
    of `token_ids` set to the mean of rows [0, trained_rows): embedding rows, lm_head kernel columns and
    lm_head bias entries alike."""
    embedding_VxD = np.asarray(params["embed"]["embedding"])
    kernel_DxV = np.asarray(params["lm_head"]["kernel"])
    bias_V = np.asarray(params["lm_head"]["bias"])
    token_ids = sorted(int(i) for i in token_ids)
    if token_ids and token_ids[-1] >= vocab_size:
        raise TokenRowsError(f"added token id {token_ids[-1]} needs a model with more than {vocab_size} rows: set "
                             f"the experiment's vocab_size to at least {token_ids[-1] + 1}")
    if not 0 < trained_rows <= embedding_VxD.shape[0]:
        raise TokenRowsError(f"{trained_rows} trained rows, but the embedding has {embedding_VxD.shape[0]}")
    grow = max(0, vocab_size - embedding_VxD.shape[0])
    embedding_VxD = np.concatenate([embedding_VxD, np.zeros((grow, embedding_VxD.shape[1]), embedding_VxD.dtype)])
    kernel_DxV = np.concatenate([kernel_DxV, np.zeros((kernel_DxV.shape[0], grow), kernel_DxV.dtype)], axis=1)
    bias_V = np.concatenate([bias_V, np.zeros(grow, bias_V.dtype)])
    embedding_VxD[token_ids] = embedding_VxD[:trained_rows].mean(axis=0)
    kernel_DxV[:, token_ids] = kernel_DxV[:, :trained_rows].mean(axis=1, keepdims=True)
    bias_V[token_ids] = bias_V[:trained_rows].mean()
    return {**params, "embed": {**params["embed"], "embedding": embedding_VxD},
            "lm_head": {**params["lm_head"], "kernel": kernel_DxV, "bias": bias_V}}
