"""Reading and writing the corpora that the curation commands take and give.

A corpus is a directory of `**/*.jsonl`, `**/*.jsonl.gz` or `**/*.parquet` files whose records each hold
a `text` string (other fields are kept as they are). Paths with a part starting with "." are not part
of the corpus: that is where the commands keep their per-file state (`OUT_DIR/.curation/`).

A record is named by its `id` field, else by `file:line` (the row number, from 1, for Parquet). A
record that is not a JSON object with a `text` string is bad: it is counted and named with its
file:line, never fatal. Each command writes OUT_DIR with the same relative layout and format, one
output file per input file, each written whole (temporary name, then rename), and records that the
file is done only after its output is in place, so a run killed at any point resumes from the files
it has not finished.
"""

import contextlib
import dataclasses
import gzip
import json
import logging
import multiprocessing
import pathlib
from typing import Callable, Iterable, Iterator

import orjson

from phi_jax.errors import PhiJaxError
from phi_jax.files import local_path, replacing

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
STATE_DIR = ".curation"
BAD_RECORDS_LISTED = 100  # per file; all are counted


class CorpusError(PhiJaxError, ValueError):
    pass


@dataclasses.dataclass
class Record:
    id: str
    text: str
    row: dict
    line: int


def corpus_files(in_dir) -> list[str]:
    """The corpus files under `in_dir`, as sorted POSIX paths relative to it."""
    root = local_path(in_dir)
    if not root.is_dir():
        raise CorpusError(f"{root}: not a directory (expected a corpus directory of {', '.join(SUFFIXES)} files)")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise CorpusError(f"{root}: no {', '.join('**/*' + s for s in SUFFIXES)} file")
    return files


def record_id(row: dict, rel: str, line: int) -> str:
    return str(row["id"]) if row.get("id") is not None else f"{rel}:{line}"


def _rows(path: pathlib.Path) -> Iterator[tuple[int, object]]:
    """(line, value) of each record; a value that is not JSON comes as a ValueError to report."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet

        try:
            line = 0
            for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    line += 1
                    yield line, row
        except (pyarrow.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line, text in enumerate(f, 1):
                if text.strip():
                    try:
                        yield line, orjson.loads(text)
                    except orjson.JSONDecodeError as e:
                        yield line, ValueError(f"not JSON ({e})")
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz ends the file, reported as a bad record
        yield -1, ValueError(f"unreadable from here on ({e})")


def read_records(path, rel: str, bad: list) -> Iterator[Record]:
    """The good records of one corpus file; each bad one is appended to `bad` as "rel:line: why"."""
    for line, row in _rows(pathlib.Path(path)):
        if isinstance(row, ValueError):
            bad.append(f"{rel}:{line}: {row}")
        elif not isinstance(row, dict):
            bad.append(f"{rel}:{line}: a JSON {type(row).__name__}, not an object with a 'text' field")
        elif not isinstance(row.get("text"), str):
            bad.append(f"{rel}:{line}: no 'text' string (fields: {', '.join(map(str, row)) or 'none'})")
        else:
            yield Record(record_id(row, rel, line), row["text"], row, line)


def write_rows(path, rows: Iterable[dict]) -> int:
    """Writes `rows` to `path` in the format its name says, whole or not at all; returns how many."""
    path = pathlib.Path(path)
    count = 0
    with replacing(path) as tmp:
        if path.name.endswith(".parquet"):
            import pyarrow
            import pyarrow.parquet

            rows = list(rows)
            count = len(rows)
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp)
        else:
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(tmp, "wt", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
    return count


def bad_summary(states: list[dict]) -> dict:
    """{"count", "examples"} of the bad records over every file's state."""
    return {"count": sum(s["bad_count"] for s in states),
            "examples": [b for s in states for b in s["bad"]][:BAD_RECORDS_LISTED]}


def _state_path(out_dir, command: str, rel: str) -> pathlib.Path:
    return pathlib.Path(out_dir) / STATE_DIR / command / f"{rel}.json"


def load_state(out_dir, command: str, rel: str) -> dict | None:
    path = _state_path(out_dir, command, rel)
    return json.loads(path.read_text()) if path.exists() else None


def save_state(out_dir, command: str, rel: str, state: dict) -> None:
    with replacing(_state_path(out_dir, command, rel)) as tmp:
        tmp.write_text(json.dumps(state))


# A file's work: (records, stats to fill) -> rows to write. Set before the pool forks, so workers share it.
_TRANSFORM: Callable | None = None


def _curate_file(job) -> dict:
    in_dir, out_dir, command, rel, write = job
    bad, stats = [], {}
    rows = _TRANSFORM(read_records(pathlib.Path(in_dir) / rel, rel, bad), stats)
    if write:
        stats["docs_out"] = write_rows(pathlib.Path(out_dir) / rel, rows)
    else:
        stats["docs_out"] = sum(1 for _ in rows)
    state = {"file": rel, **stats, "bad_count": len(bad), "bad": bad[:BAD_RECORDS_LISTED]}
    save_state(out_dir, command, rel, state)
    return state


def curate_files(in_dir, out_dir, command: str, transform: Callable, *, workers: int = 1,
                 write: bool = True) -> list[dict]:
    """Runs `transform(records, stats) -> rows` on each corpus file not yet done, `workers` files at a
    time, writing OUT_DIR/<same path> (unless not `write`); returns every file's state in file order.
    `transform` fills `stats` (JSON) as it goes; it lands in the file's state with its bad records."""
    from tqdm import tqdm

    global _TRANSFORM
    files = corpus_files(in_dir)
    states = {rel: s for rel in files if (s := load_state(out_dir, command, rel)) is not None}
    todo = [(str(in_dir), str(out_dir), command, rel, write) for rel in files if rel not in states]
    if states:
        logger.info("%s: %d of %d files already done in %s; resuming", command, len(states), len(files), out_dir)
    _TRANSFORM = transform
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1 and len(todo) > 1:
                pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(todo))))
                results = pool.imap_unordered(_curate_file, todo)
            else:
                results = map(_curate_file, todo)
            for state in tqdm(results, total=len(files), initial=len(states), desc=command, unit="file"):
                states[state["file"]] = state
    finally:
        _TRANSFORM = None
    return [states[rel] for rel in files]
