"""Hugging Face `tokenizer.json` tokenizers, and training the small byte-level BPE of the default corpus.

Only `tokenizers` is imported here (no TensorFlow): the training loop and `generate` can use it.
"""

import hashlib
import pathlib
import shutil

from phi_jax.errors import PhiJaxError
from phi_jax.files import replacing

TOKENIZER_FILE = "tokenizer.json"
# A tokenizer as transformers saves it: whichever of these lie beside a tokenizer.json travel with it
# (into a training workdir, a params checkpoint, an export), so its chat template and special tokens do too.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Tried in order to find the end-of-text id of a tokenizer.json that does not say.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _fingerprint(raw: bytes) -> str:
    """A short, stable identity of a vocabulary: prepared shards and mixtures record it so that shards
    tokenized with different vocabularies are never mixed."""
    return hashlib.sha256(raw).hexdigest()[:16]


def file_fingerprint(path) -> str:
    """The fingerprint of the tokenizer.json at `path`, without parsing it (Tokenizer(path).fingerprint)."""
    return _fingerprint(pathlib.Path(path).read_bytes())


class Tokenizer:
    """A Hugging Face `tokenizer.json`: `encode(str) -> list[int]`, `decode(ids) -> str`, `eos_id`, `vocab_size`.

    Encoding adds no special tokens (documents are joined with `eos_id` by the data pipeline). For
    phi's CodeGen tokenizer eos_id is 50256 and vocab_size 50295 (the model's embedding has 51200 rows).
    """

    def __init__(self, path, eos_token: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = pathlib.Path(path)
        raw = self.path.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        self.fingerprint = _fingerprint(raw)
        names = (eos_token,) if eos_token else EOS_TOKENS
        ids = [self._tok.token_to_id(n) for n in names]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"{self.path}: none of the end-of-text tokens {list(names)} is in the vocabulary")
        self.eos_id = ids[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Added tokens marked special (<|endoftext|>, <|im_end|>, ...): each one a single id, never split.
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token(self, token_id: int) -> str:
        """The vocabulary entry of an id (a special token's own text, e.g. '<|endoftext|>')."""
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def find_tokenizer_file(path) -> pathlib.Path:
    """`path` is a tokenizer.json, or a directory holding one (a Hugging Face model or a prepared data dir)."""
    path = pathlib.Path(path).expanduser()
    for candidate in (path, path / TOKENIZER_FILE, path / "prepared" / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} there (give a tokenizer.json, a Hugging Face "
                            f"model directory or a prepared data directory)")


# --tokenizer of every command that reads text (resolve_tokenizer's `tokenizer`).
TOKENIZER_FLAG_HELP = ("a tokenizer.json (or a directory with one), or 'default' for the built-in corpus' (default: "
                       "the checkpoint's own, which a training workdir and import-hf keep)")


class TokenizerNotFoundError(PhiJaxError, FileNotFoundError):
    """A command needs a tokenizer and neither --tokenizer nor the checkpoint gives one."""


def resolve_tokenizer(tokenizer=None, checkpoint=None, *, required: bool = True) -> "Tokenizer | None":
    """The tokenizer every command reads text with.

    `tokenizer` is "default" (the built-in corpus' BPE), a tokenizer.json or a directory holding one;
    None is the checkpoint's own: the copy a training workdir keeps of its data's tokenizer, or the
    tokenizer.json of a params checkpoint or a Hugging Face directory. When there is none: an error
    saying what to pass, or None if not `required` (a command that can work on token ids alone).
    """
    if tokenizer == "default":
        from phi_jax.data import load_tokenizer  # may build the default corpus on first use

        return load_tokenizer(None)
    if tokenizer is not None:
        return Tokenizer(find_tokenizer_file(tokenizer))
    own = pathlib.Path(checkpoint) / TOKENIZER_FILE if checkpoint is not None else None
    if own is not None and own.is_file():
        return Tokenizer(own)
    if not required:
        return None
    where = f"{checkpoint}: no {TOKENIZER_FILE} there" if checkpoint is not None else "no checkpoint to read it from"
    raise TokenizerNotFoundError(f"{where}; pass --tokenizer (a tokenizer.json or a directory with one, or "
                                 "'default' for the built-in corpus' tokenizer). Training runs keep their data's "
                                 "tokenizer in the workdir; runs trained before that do not")


def copy_tokenizer_files(tokenizer_file, directory) -> list[str]:
    """Copies the tokenizer.json at `tokenizer_file` and the TOKENIZER_FILES beside it into `directory`,
    each replaced whole; returns the names copied."""
    source = pathlib.Path(tokenizer_file)
    copied = []
    for name in TOKENIZER_FILES:
        path = source if name == TOKENIZER_FILE else source.with_name(name)
        if path.is_file():
            with replacing(pathlib.Path(directory) / name) as tmp:
                shutil.copyfile(path, tmp)
            copied.append(name)
    return copied


def train_byte_level_bpe(texts, vocab_size: int, out_path) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `texts`, written to `out_path`.

    Like phi's tokenizer, id 0 is an ordinary token ('!') and `<|endoftext|>` is the last id
    (vocab_size - 1), so vocab_size counts it.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    with replacing(out_path) as tmp:
        tmp.write_text(tok.to_str())
    return Tokenizer(out_path)
