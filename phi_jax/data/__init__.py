"""phi-jax's data edge: the one interface the training loop reads data through.

    from phi_jax import data

    it = data.make_train_iterator("phi15_web", data_dir="/data/phi", seq_len=2048, batch_size=8, seed=0,
                                  shard_index=s, shard_count=n, packing="concat")
    batch = next(it)   # dict of numpy arrays, each [batch_size, seq_len], the fields of phi_jax.batch:
                       #   tokens        int32    input ids
                       #   targets       int32    the next token of each position
                       #   loss_weights  float32  1 on real targets, 0 on padding (never from token != 0)
                       #   segment_ids   int32    concat: all 1; first_fit: 1, 2, ... per packed document, 0 pad
                       #   positions     int32    concat: 0..seq_len-1; first_fit: restart at 0 per segment
    state = it.get_state()   # small JSON-able dict; it.set_state(state) -> the same next batch
    # in an Orbax step beside the train state (restore merges all processes' states, see ShardRows):
    #   ocp.args.Composite(state=..., data=phi_jax.checkpoint.DataSave(it))  /  DataRestore(it)

make_train_iterator(mixture, *, data_dir, seq_len, batch_size, seed, shard_index=0, shard_count=1,
                    local_shards=1, packing="concat", split="train")
    An endless grain DatasetIterator. `batch_size` is the host-local batch: `local_shards` data shards
    from `shard_index` (of `shard_count`), batch_size // local_shards rows each, side by side. A data
    shard reads its own part of every task's documents (disjoint within each epoch), packed into its
    own rows; the same shard gives the same rows whichever process reads it, so with a fixed
    shard_count the global batch does not depend on how many processes share it. Hosts that hold parts
    of one model replica read the same shards. Its state names each shard. `packing` is "concat"
    (phi's recipe: documents joined with EOS and cut into rows; attention across documents) or
    "first_fit" (documents never share a segment; use segment_ids and positions for segment-aware
    attention). The mixture's shares are of tokens, read from the prepared directory (written there
    by `phi-jax data prepare`, which took them from the tasks module's MIXTURES).
make_eval_iterator(mixture, *, data_dir, seq_len, batch_size, shard_index=0, shard_count=1,
                   local_shards=1, packing="concat", split="validation")
    One pass over the split of every task, concatenated in token-share order; a data shard that has
    ended gives rows padded with loss_weights 0, so the shapes never change. Finite.
mixture_shares(mixture, data_dir=None) -> {task: token share} of a prepared mixture, as the stream mixes it.
load_tokenizer(path_or_none) -> Tokenizer with encode(str) -> list[int], decode(ids) -> str, eos_id, vocab_size
    None: the default corpus' byte-level BPE (vocab_size 4096, eos_id 4095; built on first use).
    Else a tokenizer.json, or a directory with one (a Hugging Face model dir, DATA_DIR, or prepared dir).
tokenizer_for(mixture, data_dir) -> the Tokenizer the mixture's prepared shards were made with.

data_dir: the DATA_DIR given to `phi-jax data prepare` (its `prepared/` is read), or a prepared
directory itself, on a filesystem (gs:// and other URLs are refused: mount the bucket); None is
$PHI_JAX_DATA_DIR, as for `phi-jax data`. data_dir=None with mixture "default" is the embedded
corpus (Python's stdlib code and docs plus synthetic textbooks), built and prepared on first use into
$PHI_JAX_CACHE (else ~/.cache/phi_jax), offline, in well under a minute.
Streaming prepared shards imports grain and ArrayRecord only, never a tasks module; preparing imports
the tasks module, seqio and TensorFlow.
"""

import os

from phi_jax.data.registry import DataError

__all__ = ["DataError", "load_tokenizer", "make_eval_iterator", "make_train_iterator", "mixture_shares",
           "prepared_dir", "tokenizer_for"]


def prepared_dir(mixture: str, data_dir=None):
    """Where the mixture's prepared shards are: under data_dir, else $PHI_JAX_DATA_DIR (as `phi-jax data
    prepare` wrote them there); for `default` and `default_chat` without data_dir, builds them if needed."""
    from phi_jax.data import corpus

    if data_dir is None and mixture in corpus.BUILT_IN_MIXTURES:
        return corpus.ensure_default(mixture=mixture)
    source = "DATA_DIR" if data_dir else "$PHI_JAX_DATA_DIR"
    data_dir = data_dir or os.environ.get("PHI_JAX_DATA_DIR")
    if not data_dir:
        raise DataError(f"mixture {mixture!r} needs a DATA_DIR (only {', '.join(corpus.BUILT_IN_MIXTURES)} have "
                        "built-in data): set "
                        "$PHI_JAX_DATA_DIR, or pass --gin.DATA_DIR=PATH to `phi-jax train` (--data_dir to "
                        "`phi-jax data`)")
    from phi_jax.data import shards
    from phi_jax.files import local_path

    try:  # grain reads prepared shards from a filesystem only; pathlib would make gs://b/d the local gs:/b/d
        local_path(data_dir)
    except ValueError as e:
        raise DataError(f"mixture {mixture!r}: {source} {e}") from None

    return shards.prepared_root(data_dir)


def make_train_iterator(mixture: str, *, data_dir, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, local_shards: int = 1,
                        packing: str = "concat", split: str = "train"):
    """The endless, checkpointable training stream (see the module doc)."""
    from phi_jax.data import stream

    ds, _ = stream.build(mixture, prepared_dir(mixture, data_dir), seq_len=seq_len, batch_size=batch_size,
                         seed=seed, shard_index=shard_index, shard_count=shard_count, local_shards=local_shards,
                         packing=packing, split=split, train=True)
    return iter(ds)


def make_eval_iterator(mixture: str, *, data_dir, seq_len: int, batch_size: int, shard_index: int = 0,
                       shard_count: int = 1, local_shards: int = 1, packing: str = "concat",
                       split: str = "validation"):
    """One padded pass over the split (see the module doc)."""
    from phi_jax.data import stream

    ds, _ = stream.build(mixture, prepared_dir(mixture, data_dir), seq_len=seq_len, batch_size=batch_size,
                         seed=0, shard_index=shard_index, shard_count=shard_count, local_shards=local_shards,
                         packing=packing, split=split, train=False)
    return iter(ds)


def mixture_shares(mixture: str, data_dir=None) -> dict[str, float]:
    """{task: token share} of a prepared mixture (root/mixtures/<mixture>.json), as the stream mixes it."""
    from phi_jax.data import shards

    return shards.read_mixture(prepared_dir(mixture, data_dir), mixture)["shares"]


def load_tokenizer(path_or_none=None):
    """A Tokenizer (encode, decode, eos_id, vocab_size); None is the default corpus' 4096-id BPE."""
    from phi_jax.data.tokenizer import Tokenizer, find_tokenizer_file

    if path_or_none is None:
        return Tokenizer(prepared_dir("default") / "tokenizer.json")
    return Tokenizer(find_tokenizer_file(path_or_none))


def tokenizer_for(mixture: str, data_dir=None):
    """The tokenizer a mixture's prepared shards were tokenized with."""
    return load_tokenizer(prepared_dir(mixture, data_dir) / "tokenizer.json")
