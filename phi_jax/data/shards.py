"""The prepared layout: ArrayRecord shards of token ids, one per input file, each with a stats file.

    PREPARED/tokenizer.json                                   the vocabulary every shard was made with
    PREPARED/<task>/<split>/part-00003-of-00008.array_record  one record per document: its token ids
                                                              (EOS appended) as little-endian uint16,
                                                              or int32 when the vocabulary needs it
                                                              A chat task's record is its token ids then
                                                              its loss mask (one uint8 0/1 per token)
    PREPARED/<task>/<split>/part-00003-of-00008.json          written last: the shard is done. input
                                                              file, docs, tokens, dtype, tokenizer
                                                              fingerprint, skipped-record report
    PREPARED/mixtures/<mixture>.json                          what the stream mixes: {"mixture", "shares":
                                                              {task: token share}, "tokenizer": fingerprint,
                                                              "tasks_module"}, written by `prepare` for the
                                                              mixture it prepared, every mixture of the
                                                              tasks module made of those tasks, and each
                                                              task alone

PREPARED is DATA_DIR/prepared unless `prepare --out_dir` says otherwise. No TensorFlow here.
"""

import json
import pathlib
import re

import numpy as np

from phi_jax.data.registry import DataError, did_you_mean
from phi_jax.files import replacing

# The field of a chat task's examples (and the flag in its shards' stats) that marks the trained tokens.
LOSS_MASK = "loss_mask"
STATS_SUFFIX = ".json"
RECORD_SUFFIX = ".array_record"
MIXTURES_DIR = "mixtures"


def prepared_root(data_dir) -> pathlib.Path:
    """DATA_DIR/prepared if it exists, else `data_dir` itself (a prepared directory given directly)."""
    path = pathlib.Path(data_dir).expanduser()
    return path / "prepared" if (path / "prepared").is_dir() else path


def shard_stem(root, task: str, split: str, index: int, count: int) -> pathlib.Path:
    return pathlib.Path(root) / task / split / f"part-{index:05d}-of-{count:05d}"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


def encode_record(ids, dtype, mask=None) -> bytes:
    """One document's record: its ids as `dtype`, then (a chat task's) its loss mask as uint8."""
    record = np.asarray(ids, dtype).tobytes()
    return record if mask is None else record + np.asarray(mask, np.uint8).tobytes()


def decode_record(record: bytes, dtype: np.dtype, masked: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, loss mask or None) of a record written by encode_record."""
    if not masked:
        return np.frombuffer(record, dtype), None
    n = len(record) // (dtype.itemsize + 1)
    return np.frombuffer(record, dtype, n), np.frombuffer(record, np.uint8, n, offset=n * dtype.itemsize)


def write_stats(stem: pathlib.Path, stats: dict) -> None:
    with replacing(stem.with_name(stem.name + STATS_SUFFIX)) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))


def read_stats(stem: pathlib.Path) -> dict | None:
    try:
        return json.loads(stem.with_name(stem.name + STATS_SUFFIX).read_text())
    except (FileNotFoundError, ValueError):
        return None


def read_split(root, task: str, split: str, mixture: str = "") -> list[dict]:
    """The stats of every shard of a prepared task split (each with "path"), checked complete and consistent."""
    directory = pathlib.Path(root) / task / split
    hint = f"run `phi-jax data prepare {mixture or task} --data_dir DATA_DIR`"
    stats = []
    for path in sorted(directory.glob(f"part-*{STATS_SUFFIX}")):
        try:
            s = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"task {task!r} split {split!r}: {path} is not valid JSON; delete it and {hint}") from None
        s["path"] = str(path.with_suffix(RECORD_SUFFIX))
        stats.append(s)
    if not stats:
        raise DataError(f"task {task!r} split {split!r}: no prepared shards in {directory}; {hint}")
    counts = {s["num_shards"] for s in stats}
    if len(counts) != 1:
        raise DataError(f"task {task!r} split {split!r}: shards of different preparations ({sorted(counts)} "
                        f"shards) in {directory}; delete the directory and {hint}")
    count = counts.pop()
    missing = sorted(set(range(count)) - {s["shard_index"] for s in stats})
    if missing:
        raise DataError(f"task {task!r} split {split!r}: {len(missing)} of {count} shards not prepared in "
                        f"{directory} (first missing: part {missing[0]}); {hint}")
    prints = {s["tokenizer"] for s in stats}
    if len(prints) != 1:
        raise DataError(f"task {task!r} split {split!r}: shards in {directory} were tokenized with different "
                        f"tokenizers; delete it and {hint}")
    return sorted(stats, key=lambda s: s["shard_index"])


def split_totals(root, task: str, split: str = "train") -> dict:
    stats = read_split(root, task, split)
    return {"docs": sum(s["docs"] for s in stats), "tokens": sum(s["tokens"] for s in stats),
            "shards": len(stats), "skipped": sum(sum(s["skipped"]["counts"].values()) for s in stats)}


def mixture_path(root, mixture: str) -> pathlib.Path:
    if not re.fullmatch(r"[\w.:-]+", mixture):
        raise DataError(f"mixture {mixture!r}: a mixture or task name is letters, digits and _ . : - only")
    return pathlib.Path(root) / MIXTURES_DIR / f"{mixture}.json"


def write_mixture(root, mixture: str, shares: dict[str, float], tokenizer: str, tasks_module: str) -> None:
    """Records what `mixture` is (token shares, tokenizer fingerprint) in the prepared directory."""
    path = mixture_path(root, mixture)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps({"mixture": mixture, "shares": shares, "tokenizer": tokenizer,
                                   "tasks_module": tasks_module}, indent=1))


def prepared_mixtures(root) -> list[str]:
    return sorted(p.stem for p in (pathlib.Path(root) / MIXTURES_DIR).glob("*.json"))


def read_mixture(root, mixture: str) -> dict:
    """The prepared mixture's record, with its shares normalized to sum to 1 (see the module doc)."""
    path = mixture_path(root, mixture)
    hint = f"run `phi-jax data prepare {mixture} --data_dir DATA_DIR` (resumable: shards already prepared are kept)"
    if not pathlib.Path(root).is_dir():
        raise DataError(f"mixture {mixture!r}: {root} does not exist (DATA_DIR, or a prepared directory); {hint}")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        known = prepared_mixtures(root)
        raise DataError(f"unknown mixture or task {mixture!r}: not prepared in {root} (no {path})"
                        f"{did_you_mean(mixture, known)}; prepared there: {', '.join(known) or 'none'}; to add it, "
                        f"{hint}") from None
    except ValueError as e:
        raise DataError(f"mixture {mixture!r}: {path} is not valid JSON ({e}); {hint}") from None
    shares = record.get("shares")
    if (not isinstance(shares, dict) or not shares or not isinstance(record.get("tokenizer"), str)
            or not all(isinstance(v, (int, float)) and v > 0 for v in shares.values())):
        raise DataError(f"mixture {mixture!r}: {path} has no \"shares\" {{task: positive token share}} and "
                        f"\"tokenizer\" fingerprint; {hint}")
    total = sum(shares.values())
    return {**record, "shares": {task: share / total for task, share in shares.items()}}
