"""What the GPU suite's Python steps share: NaN-safe error checks, timing, markdown rows printed as
measured, JSON records, packed segment ids, the kernel options, and compiling jitted functions
ahead of their use on a thread pool (XLA compiles without the GIL, and a fresh GPU machine has 16
cores: compiling one by one would spend most of the suite's minutes waiting on one core).

Imports only jax and numpy (and phi_jax.attention.block_sizes), like every step of the suite.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax.attention.block_sizes import BlockSizes  # noqa: E402
from phi_jax.attention.xla import xla_attention  # noqa: E402

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

def xla_reference(q, k, v, seg, d_out):
    """XLA output and gradients in float32, one batch row at a time (the full [B, H, S, S] would not fit)."""
    def one_row(row):
        q, k, v, d_out, *seg = (x[None] for x in row)
        segment_ids = seg[0] if seg else None
        def f(q, k, v):
            return xla_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=segment_ids)
        out, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
        return (out, *vjp(d_out.astype(jnp.float32)))
    rows = (q, k, v, d_out) + (() if seg is None else (seg,))
    return tuple(x[:, 0] for x in jax.lax.map(one_row, rows))


def relative_error(x, ref) -> float:
    """Norm-wise |x - ref| / |ref| in float64; NaN when x has a NaN or inf (never hidden by a max)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(x).all():
        return float("nan")
    denominator = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (denominator if denominator > 0 else 1.0))


@jax.jit
def _device_relative_errors(results, refs):
    def one(x, ref):
        x, ref = x.astype(np.float32), ref.astype(np.float32)
        error = jax.numpy.linalg.norm(x - ref) / jax.numpy.maximum(jax.numpy.linalg.norm(ref), 1e-30)
        return jax.numpy.where(jax.numpy.all(jax.numpy.isfinite(x)), error, np.nan)
    return jax.numpy.stack([one(x, r) for x, r in zip(results, refs)])


def device_relative_errors(results, refs) -> list[float]:
    """relative_error of each pair, computed on the device in float32 (at 8 x 4096 x 32 x 64 the
    host's float64 version takes seconds per array); NaN where a result is not finite."""
    return [float(e) for e in np.asarray(_device_relative_errors(tuple(results), tuple(refs)))]


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

    def wait_s(self) -> float | None:
        """A timeout for waiting on something within the budget (None: no budget, wait for ever)."""
        return None if self.end is None else max(1.0, self.left())


# ---- Compiling many functions at once ------------------------------------------------------------

class Compiler:
    """Compiles jitted functions ahead of their use: `submit` queues a function and its arguments,
    `get(key)` returns the compiled callable (or raises its trace, lowering or compile error).

    With workers > 1, asking for a key not started yet lowers it and the next `lookahead - 1`
    queued ones (in the calling thread: tracing holds the GIL anyway) and compiles them together on
    a thread pool (XLA compiles without the GIL); keys are taken in queue order, so rows still
    print as measured. Call `wait_idle()` before timing anything: a compile in flight competes for
    the CPU and runs XLA's autotuning kernels on the GPU. Batches keep that wait to once per
    `lookahead` rows. With one worker (a CPU), each compiles when it is asked for. A compile that
    never returns cannot hang the process at exit: `close()` does not wait for it (end with
    exit_now)."""

    def __init__(self, workers: int, lookahead: int | None = None):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.lookahead = 1 if self.pool is None else (lookahead or 2 * workers)
        self.pending = {}  # key -> (fn, args, precision), in submission order
        self.futures = {}

    def submit(self, key, fn, *args, precision: str | None = None):
        """Queues jax.jit(fn) at these arguments, lowered under jax.default_matmul_precision(precision)."""
        if key in self.futures and self.futures[key].cancelled():
            del self.futures[key]
        if key not in self.futures:
            self.pending[key] = (fn, args, precision)

    def known(self, key) -> bool:
        return key in self.pending or (key in self.futures and not self.futures[key].cancelled())

    def _start(self, key):
        fn, args, precision = self.pending.pop(key)
        try:
            with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
                lowered = jax.jit(fn).lower(*args)
        except Exception as e:  # noqa: BLE001 - a trace or lowering error belongs to this key
            self.futures[key] = _failed(e)
            return
        if self.pool is None:
            try:
                self.futures[key] = _done(lowered.compile())
            except Exception as e:  # noqa: BLE001
                self.futures[key] = _failed(e)
        else:
            self.futures[key] = self.pool.submit(lowered.compile)

    def prefetch(self):
        """Starts the next batch of queued compiles (the first rows' while inputs are prepared)."""
        for key in list(self.pending)[:self.lookahead]:
            self._start(key)

    def get(self, key, timeout: float | None = None):
        if key in self.pending:
            others = [k for k in self.pending if k != key][:self.lookahead - 1]
            for k in [key] + others:
                self._start(k)
        return self.futures[key].result(timeout=timeout)

    def wait_idle(self, timeout: float | None = None):
        """Waits (at most `timeout`) until no compile is running."""
        running = [f for f in self.futures.values() if not f.done()]
        if running:
            concurrent.futures.wait(running, timeout=timeout)

    def cancel_pending(self):
        """Drops what is queued or not yet compiling (a stage that ran out of time)."""
        self.pending.clear()
        for future in self.futures.values():
            future.cancel()

    def close(self):
        self.pending.clear()
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
    """Compile threads: $BENCH_COMPILE_WORKERS, else most cores on a GPU machine and 1 on a CPU
    (interpret mode runs there)."""
    if os.environ.get("BENCH_COMPILE_WORKERS"):
        return max(1, int(os.environ["BENCH_COMPILE_WORKERS"]))
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
