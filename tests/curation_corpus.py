"""Small corpora for the curation tests: random words, planted near-duplicate pairs of a chosen word
n-gram Jaccard similarity, and corpus files in each of the readers' formats."""

import gzip
import json
import os
import signal
import string
import subprocess
import sys
import time

import numpy as np
from datatrove.utils.text import simplify_text


def vocabulary(rng, size=20000, letters=7) -> list[str]:
    """Random lower-case words (no digits: the n-grams' normalization turns every digit into 0)."""
    chars = np.array(list(string.ascii_lowercase))
    return sorted({"".join(w) for w in rng.choice(chars, size=(size, letters))})


def document(rng, words, length=150) -> list[str]:
    return [words[i] for i in rng.integers(0, len(words), length)]


def jaccard(a: str, b: str, n: int = 5) -> float:
    def shingles(text):
        w = simplify_text(text).split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def perturbed(rng, words, base: list[str], low: float, high: float) -> str:
    """A copy of `base` whose word 5-gram Jaccard similarity to it lies in [low, high], spread evenly
    over that band: random words are replaced one at a time until it falls below a random target."""
    text = " ".join(base)
    while True:
        target, copy = rng.uniform(low, high), list(base)
        while (similarity := jaccard(text, " ".join(copy))) > target:
            copy[int(rng.integers(0, len(copy)))] = words[int(rng.integers(0, len(words)))]
        if similarity >= low:
            return " ".join(copy)


def write_corpus_file(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        return
    lines = "".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)


def read_corpus(out_dir) -> dict[str, list[dict]]:
    """Every output file's rows, by relative path."""
    from phi_jax.curation import records

    return {rel: [r.row for r in records.read_records(out_dir / rel, rel, [])]
            for rel in records.corpus_files(out_dir)}


def kill_when_done(argv, done_dir, count: int, timeout: float = 60) -> dict:
    """Runs `phi-jax ARGV` and SIGKILLs it and its helpers (datatrove's multiprocess manager), as a crash
    would, once `done_dir` holds `count` entries; {entry name: mtime} of what it had finished."""
    proc = subprocess.Popen([sys.executable, "-m", "phi_jax.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not (done_dir.is_dir() and len(list(done_dir.iterdir())) >= count) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()}
