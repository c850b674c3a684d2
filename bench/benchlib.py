"""What the GPU suite's Python steps share: NaN-safe error checks, timing, markdown rows printed as
measured, JSON records, packed segment ids, the kernel options, and compiling many jitted
functions at once on a thread pool (XLA compiles without the GIL, and a fresh GPU machine has 16
cores: compiling one by one would spend most of the suite's minutes waiting on one core).

Imports only jax and numpy (and phi_jax.attention.block_sizes), like every step of the suite.
"""

import concurrent.futures
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax.attention.block_sizes import BlockSizes  # noqa: E402

# The three kernel options of BlockSizes (default False), each A/B'd alone, then all three at once.
OPTIONS = ("exp2", "dkv_transposed", "fused_backward")
VARIANTS = {"exp2": ("exp2",), "dkv_transposed": ("dkv_transposed",), "fused_backward": ("fused_backward",),
            "all3": OPTIONS}


def missing_options() -> list[str]:
    """The OPTIONS this checkout's BlockSizes does not have (yet)."""
    fields = {f.name for f in dataclasses.fields(BlockSizes)}
    return [name for name in OPTIONS if name not in fields]


def with_option(blocks: BlockSizes, variant: str | None) -> BlockSizes:
    """`blocks` with a VARIANTS entry's options switched on (None: unchanged). Raises TypeError if
    this checkout's BlockSizes lacks one of them."""
    if variant is None:
        return blocks
    names = VARIANTS[variant]
    missing = [name for name in names if name in missing_options()]
    if missing:
        raise TypeError(f"BlockSizes has no field {missing[0]!r} in this checkout")
    return dataclasses.replace(blocks, **dict.fromkeys(names, True))


def block_sizes_expr(blocks: BlockSizes) -> str:
    """A `BlockSizes(...)` expression to paste into phi_jax/attention/block_sizes.py: positional
    blocks, then every keyword field that differs from its default."""
    fields = dataclasses.fields(BlockSizes)
    positional = [str(getattr(blocks, f.name)) for f in fields if f.default is dataclasses.MISSING]
    keywords = [f"{f.name}={getattr(blocks, f.name)!r}" for f in fields
                if f.default is not dataclasses.MISSING and getattr(blocks, f.name) != f.default]
    return f"BlockSizes({', '.join(positional + keywords)})"


# ---- Errors --------------------------------------------------------------------------------------

def relative_error(x, ref) -> float:
    """Norm-wise |x - ref| / |ref| in float64; NaN when x has a NaN or inf (never hidden by a max)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(x).all():
        return float("nan")
    denominator = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (denominator if denominator > 0 else 1.0))


def within(error: float, tolerance: float) -> bool:
    """True only for a finite error at or below the tolerance (NaN compares false: a failure)."""
    return bool(np.isfinite(error)) and error <= tolerance


def fmt_error(error: float, tolerance: float | None = None) -> str:
    if not np.isfinite(error):
        return "NaN/inf FAILED"
    text = f"{error:.1e}"
    return text if tolerance is None or error <= tolerance else text + " FAILED"


# ---- Timing --------------------------------------------------------------------------------------

def median_seconds(fn, *args, iters: int, warmup: int = 1):
    """(median seconds of `iters` calls after `warmup` untimed ones, last result)."""
    result = None
    for _ in range(warmup):
        result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class Deadline:
    """A step's own time budget, so that it prints what it has before the suite's timeout kills it."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# ---- Compiling many functions at once ------------------------------------------------------------

class Compiler:
    """Lowers in the calling thread (tracing holds the GIL anyway) and compiles on a thread pool;
    `get(key)` waits for one compile and returns the compiled callable or raises its error.

    Results are taken in submission order, so rows still print as measured while later compiles
    run. A compile that never returns cannot hang the process at exit: `close()` does not wait for
    it (call os._exit after flushing if one is still running)."""

    def __init__(self, workers: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) if workers > 1 else None
        self.futures = {}

    def submit(self, key, fn, *args, static_argnums=()):
        try:
            lowered = jax.jit(fn, static_argnums=static_argnums).lower(*args)
        except Exception as e:  # noqa: BLE001 - a trace or lowering error belongs to this key
            self.futures[key] = _failed(e)
            return
        if self.pool is None:
            try:
                self.futures[key] = _done(lowered.compile())
            except Exception as e:  # noqa: BLE001
                self.futures[key] = _failed(e)
            return
        self.futures[key] = self.pool.submit(lowered.compile)

    def get(self, key, timeout: float | None = None):
        return self.futures[key].result(timeout=timeout)

    def busy(self) -> bool:
        return any(not f.done() for f in self.futures.values())

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _done(value):
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


def _failed(error):
    future = concurrent.futures.Future()
    future.set_exception(error)
    return future


def default_workers() -> int:
    """Compile threads: most cores on a GPU machine, 1 on a CPU (interpret mode runs there)."""
    if jax.default_backend() != "gpu":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) - 2))


def short_error(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def exit_now(code: int):
    """Flush and leave without joining compile threads that may still be running."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- Output --------------------------------------------------------------------------------------

def row(cells) -> str:
    line = "| " + " | ".join(str(c) for c in cells) + " |"
    print(line, flush=True)
    return line


def header(cells):
    row(cells)
    row(["---"] * len(cells))


def append_json(path, record: dict):
    """One JSON object per line; flushed at once, so a crash later keeps what was measured."""
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_json_lines(path) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut off by a kill
    return records


# ---- Inputs --------------------------------------------------------------------------------------

def packed_segments(rng, batch: int, length: int, mean_doc: int, *, one_token_docs: int = 0, pad: int = 0):
    """[batch, length] int32 segment ids 1, 2, ... (non-decreasing, as packing writes them) with
    document lengths uniform in [1, 2 * mean_doc); `one_token_docs` extra one-token documents per
    row (one at the very start, the rest anywhere); the last `pad` positions are 0 (padding)."""
    rows = []
    for _ in range(batch):
        lengths = list(rng.integers(1, 2 * mean_doc, size=2 * length // max(mean_doc, 1) + 2))
        if one_token_docs:
            lengths.insert(0, 1)
            for _ in range(one_token_docs - 1):
                lengths.insert(int(rng.integers(0, len(lengths))), 1)
        ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:length]
        if len(ids) < length:
            ids = np.concatenate([ids, np.full(length - len(ids), ids[-1])])
        if pad:
            ids[length - pad:] = 0
        rows.append(ids)
    return np.stack(rows).astype(np.int32)
