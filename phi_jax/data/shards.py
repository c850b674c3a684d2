"""The prepared layout: ArrayRecord shards of token ids, one per input file, each with a stats file.

    PREPARED/tokenizer.json                                   the vocabulary every shard was made with
    PREPARED/<task>/<split>/part-00003-of-00008.array_record  one record per document: its token ids
                                                              (EOS appended) as little-endian uint16,
                                                              or int32 when the vocabulary needs it
    PREPARED/<task>/<split>/part-00003-of-00008.json          written last: the shard is done. input
                                                              file, docs, tokens, dtype, tokenizer
                                                              fingerprint, skipped-record report

PREPARED is DATA_DIR/prepared unless `prepare --out_dir` says otherwise. No TensorFlow here.
"""

import json
import pathlib

from phi_jax.data.registry import DataError
from phi_jax.files import replacing

STATS_SUFFIX = ".json"
RECORD_SUFFIX = ".array_record"


def prepared_root(data_dir) -> pathlib.Path:
    """DATA_DIR/prepared if it exists, else `data_dir` itself (a prepared directory given directly)."""
    path = pathlib.Path(data_dir).expanduser()
    return path / "prepared" if (path / "prepared").is_dir() else path


def shard_stem(root, task: str, split: str, index: int, count: int) -> pathlib.Path:
    return pathlib.Path(root) / task / split / f"part-{index:05d}-of-{count:05d}"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


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
