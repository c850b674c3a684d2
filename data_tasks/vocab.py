"""A `seqio.Vocabulary` over a Hugging Face `tokenizer.json` (seqio ships none).

For phi's CodeGen tokenizer eos_id is 50256. seqio's PAD_ID is 0, but in phi's vocabulary id 0 is
'!': our pipeline never derives loss weights from `token != 0` (seqio's DecoderFeatureConverter does,
so use it only where that does not matter, as in the benchmark).
"""

import os

import numpy as np
import seqio
import tensorflow as tf

from phi_jax.data.tokenizer import Tokenizer


class HFTokenizerVocabulary(seqio.Vocabulary):
    """`path_fn()` gives the tokenizer.json path when the vocabulary is first used (so tasks can be
    registered before the command line says where the data is); `key` names it for equality."""

    def __init__(self, path_fn, key: str):
        super().__init__(extra_ids=0)
        self._path_fn, self._key = path_fn, key
        self._tok: Tokenizer | None = None
        self._tok_id = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer at `path_fn()` now: a new DATA_DIR, --tokenizer or file is picked up."""
        path = os.path.realpath(self._path_fn())
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer at {path}") from None
        tok_id = (path, stat.st_mtime_ns, stat.st_size)
        if tok_id != self._tok_id:
            self._tok, self._tok_id = Tokenizer(path), tok_id
        return self._tok

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        if s.shape.rank != 0:
            raise ValueError(f"HFTokenizerVocabulary encodes one string at a time, got shape {s.shape}")

        def encode(text: bytes) -> np.ndarray:
            return np.asarray(self.tokenizer.encode(text.decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(x: np.ndarray) -> bytes:
            return self._decode(x.tolist()).encode("utf-8")

        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape([])
        return text

    def __eq__(self, other) -> bool:
        return isinstance(other, HFTokenizerVocabulary) and other._key == self._key

    def __hash__(self) -> int:
        return hash(("HFTokenizerVocabulary", self._key))

    def __repr__(self) -> str:
        return f"HFTokenizerVocabulary({self._key})"
