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
    """The tokenizer.json at `path`, read when the vocabulary is first used (so that tasks can be
    registered before the file exists, as the default corpus's is); equal to another of the same path."""

    def __init__(self, path):
        super().__init__(extra_ids=0)
        self._path = os.path.realpath(path)
        self._tok: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            try:
                self._tok = Tokenizer(self._path)
            except FileNotFoundError:
                raise FileNotFoundError(f"no tokenizer at {self._path}") from None
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
        return isinstance(other, HFTokenizerVocabulary) and other._path == self._path

    def __hash__(self) -> int:
        return hash(("HFTokenizerVocabulary", self._path))

    def __repr__(self) -> str:
        return f"HFTokenizerVocabulary({self._path})"
