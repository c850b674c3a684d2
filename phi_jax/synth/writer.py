"""DIR: where a run's rows go, append-only, so that a run resumes exactly.

    DIR/train/part-NNNNN.jsonl       good rows (the `synthetic` task reads DIR/train and DIR/validation)
    DIR/validation/part-NNNNN.jsonl  good rows of the held-out plan entries
    DIR/flagged/part-NNNNN.jsonl     rows kept out of training, with their "flags"
    DIR/failed/part-NNNNN.jsonl      requests that failed after their retries, with the error

Each run appends to part files of its own number, one `write` of a whole line per row on a file
opened O_APPEND: a process killed at any moment (kill -9 included) leaves whole lines only, since a
signal cannot split a write to a local file. A machine that loses power can leave a torn last line;
the next run cuts it off (and logs it) before it reads what is written. A request is done once its
id is in train/, validation/ or flagged/; ids only in failed/ are sent again by the next run. One run
at a time writes a DIR (a lock file, DIR/.lock).
"""

import fcntl
import json
import logging
import os
import pathlib
import re

from phi_jax.synth import SynthError

log = logging.getLogger(__name__)

DONE_KINDS = ("train", "validation", "flagged")
KINDS = DONE_KINDS + ("failed",)
PART = re.compile(r"part-(\d{5,})\.jsonl$")


def part_files(root, kind: str) -> list[pathlib.Path]:
    folder = pathlib.Path(root) / kind
    return sorted(p for p in folder.glob("part-*.jsonl") if PART.search(p.name)) if folder.is_dir() else []


def read_rows(root, kind: str):
    """The rows of DIR/kind/*, in order; a line that is not a JSON object (a torn line the writer has not
    cut yet) is skipped with a warning."""
    for path in part_files(root, kind):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: not a JSON line; skipped", path, number)
                    continue
                if isinstance(row, dict) and "id" in row:
                    yield row


def _cut_torn_tail(path: pathlib.Path, chunk: int = 1 << 16) -> None:
    """Cuts `path` after its last newline (reading back from the end only as far as that newline)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0 or (f.seek(size - 1) >= 0 and f.read(1) == b"\n"):
            return
        end = size
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        f.truncate(end)
    log.warning("%s: cut a torn last line (%d bytes) left by a run that stopped mid-write", path, size - end)


class OutputDir:
    """DIR, locked for this run: `done` (ids written), `failed_before` (ids that failed and are not done),
    `append(kind, row)`. Use as a context manager."""

    def __init__(self, root):
        from phi_jax.files import local_path

        self.root = local_path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SynthError(f"--out {self.root}: another run is writing it (it holds {self.root / '.lock'})") from None
        numbers = [0]
        for kind in KINDS:
            for path in part_files(self.root, kind):
                _cut_torn_tail(path)
                numbers.append(int(PART.search(path.name).group(1)))
        self.run_number = max(numbers) + 1
        self.done = {row["id"] for kind in DONE_KINDS for row in read_rows(self.root, kind)}
        self.failed_before = {row["id"] for row in read_rows(self.root, "failed")} - self.done
        self._fds: dict[str, int] = {}

    def append(self, kind: str, row: dict) -> None:
        """One whole line, in one write (see the module doc)."""
        if kind not in self._fds:
            folder = self.root / kind
            folder.mkdir(exist_ok=True)
            path = folder / f"part-{self.run_number:05d}.jsonl"
            self._fds[kind] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fds[kind], data)
        if written != len(data):  # a full disk: cut what was written, so that no torn line stays behind
            os.ftruncate(self._fds[kind], os.lseek(self._fds[kind], 0, os.SEEK_END) - written)
            raise OSError(f"{self.root / kind}: wrote {written} of {len(data)} bytes (disk full?)")
        if kind in DONE_KINDS:
            self.done.add(row["id"])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
