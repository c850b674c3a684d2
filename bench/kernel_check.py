"""Our Pallas-Triton attention (pallas_gpu) against a float32 XLA reference: the first thing the GPU
suite runs, since nothing else it measures means anything if the kernels are wrong.

    python3 bench/kernel_check.py                      # a GPU: 16 cases, about 30 s (compiles in parallel)
    python bench/kernel_check.py --tiny --interpret    # CPU, Pallas interpret mode: the same code, 7 cases

Each case compares the forward output and all three gradients (dq, dk, dv, from one vjp with a
random output cotangent) with phi_jax.attention.xla.xla_attention computed in float32 at
"highest" matmul precision (on a GPU the default float32 matmul is TF32, too coarse for a float32
reference). Causal; dense at a padded length (1000: not a multiple of any block) and packed at 2047
(random documents, several one-token documents, one at the very start, and a run of padding
segment 0 at the end); bfloat16 and float32; head_dim 64 and 128; the real block table
(gpu_block_sizes), so each side spans many blocks. Then each kernel option (BlockSizes.exp2,
.dkv_transposed, .fused_backward) switched on alone, and all three at once ("all3"). Errors are norm-wise relative, with
tests/test_attention.py's tolerances; a NaN or inf anywhere is a failure. One row per case, printed
as measured; the exit status is 1 if any case fails or cannot compile.
Imports only jax, numpy and phi_jax.attention.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402

from phi_jax.attention.block_sizes import BlockSizes, gpu_block_sizes  # noqa: E402
from phi_jax.attention.pallas_gpu import pallas_gpu_attention  # noqa: E402
from phi_jax.attention.xla import xla_attention  # noqa: E402

# tests/test_attention.py's TOLERANCE: (forward, gradients), norm-wise relative.
TOLERANCE = {"float32": (2e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}
# --tiny: blocks small enough that a 100-token sequence spans several of them (as the tests do).
TINY_BLOCKS = BlockSizes(32, 16, 16, 32, 32, 16)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    seq: int
    packed: bool
    option: str | None = None

    @property
    def name(self):
        return (f"{self.dtype} d{self.head_dim} {'packed' if self.packed else 'causal'} {self.seq}"
                + (f" +{self.option}" if self.option else ""))


def cases(tiny: bool) -> list[Case]:
    dense, packed = (100, 127) if tiny else (1000, 2047)
    if tiny:
        base = [Case("bfloat16", 64, packed, True), Case("float32", 64, packed, True),
                Case("float32", 128, dense, False)]
        optioned = [Case("bfloat16", 64, packed, True, variant) for variant in benchlib.VARIANTS]
        return base + optioned
    base = [Case(dtype, head_dim, seq, is_packed)
            for dtype in ("bfloat16", "float32") for head_dim in (64, 128)
            for seq, is_packed in ((dense, False), (packed, True))]
    optioned = [Case(dtype, head_dim, seq, is_packed, variant)
                for variant in benchlib.VARIANTS
                for dtype, head_dim, seq, is_packed in (("bfloat16", 64, packed, True), ("float32", 128, dense, False))]
    return base + optioned


def inputs(case: Case, batch: int, heads: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = (batch, case.seq, heads, case.head_dim)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(case.dtype) for _ in range(4))
    seg = None
    if case.packed:
        mean_doc = max(8, case.seq // 16)
        seg = jnp.asarray(benchlib.packed_segments(rng, batch, case.seq, mean_doc, one_token_docs=4, pad=7))
    return q, k, v, d_out, seg


def ours_value_and_grads(blocks, interpret):
    def fn(q, k, v, d_out, seg):
        def attend(q, k, v):
            return pallas_gpu_attention(q, k, v, seg, causal=True, block_sizes=blocks, interpret=interpret)
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out.astype(out.dtype)))
    return fn


def reference_value_and_grads(q, k, v, d_out, seg):
    as32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    def attend(q, k, v):
        return xla_attention(q, k, v, segment_ids=seg, kv_segment_ids=seg, causal=True)
    out, vjp = jax.vjp(attend, *as32[:3])
    return (out, *vjp(as32[3]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="short sequences, small blocks, 7 cases (CPU tests)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (runs on CPU)")
    parser.add_argument("--batch", type=int, help="default 2 (--tiny: 1)")
    parser.add_argument("--heads", type=int, help="default 4 (--tiny: 2)")
    parser.add_argument("--only", help="run only cases whose name contains this (e.g. 'fused_backward')")
    parser.add_argument("--workers", type=int, help="compile threads (default: most cores on a GPU, 1 on CPU)")
    parser.add_argument("--budget_s", type=float, help="stop starting cases after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batch = args.batch or (1 if args.tiny else 2)
    heads = args.heads or (2 if args.tiny else 4)
    deadline = benchlib.Deadline(args.budget_s)
    started = time.perf_counter()
    todo = [c for c in cases(args.tiny) if not args.only or args.only in c.name]

    print(f"# kernel check: pallas_gpu vs float32 XLA (highest precision) on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}{', interpret mode' if args.interpret else ''}), jax {jax.__version__}; "
          f"batch {batch}, heads {heads}, causal; blocks {'TINY_BLOCKS' if args.tiny else 'gpu_block_sizes'}",
          flush=True)
    missing = benchlib.missing_options()
    if missing:
        print(f"# BlockSizes in this checkout has no {missing}: those cases fail", flush=True)
    benchlib.header(["case", "dtype", "head_dim", "seq", "segments", "option", "out", "dq", "dk", "dv",
                     "tolerance (fwd, grads)", "result"])

    compiler = benchlib.Compiler(args.workers or benchlib.default_workers())
    prepared = []
    for index, case in enumerate(todo):  # queue every compile; they run ahead of the rows on the pool
        args_ = inputs(case, batch, heads, args.seed + index)
        try:
            blocks = benchlib.with_option(TINY_BLOCKS if args.tiny else gpu_block_sizes(case.head_dim), case.option)
        except TypeError as e:
            prepared.append((case, args_, e))
            continue
        compiler.submit(("ours", index), ours_value_and_grads(blocks, args.interpret), *args_)
        compiler.submit(("ref", index), reference_value_and_grads, *args_, precision="highest")
        prepared.append((case, args_, None))

    failures = 0
    for index, (case, args_, error) in enumerate(prepared):
        cells = [index + 1, case.dtype, case.head_dim, case.seq, "packed" if case.packed else "none",
                 case.option or "default"]
        fwd_tol, grad_tol = TOLERANCE[case.dtype]
        if error is None and deadline.passed():
            benchlib.row(cells + ["not run: --budget_s spent"] + [""] * 5)
            failures += 1
            continue
        try:
            if error is not None:
                raise error
            ours = jax.block_until_ready(compiler.get(("ours", index), timeout=deadline.wait_s())(*args_))
            ref = jax.block_until_ready(compiler.get(("ref", index), timeout=deadline.wait_s())(*args_))
        except Exception as e:  # noqa: BLE001 - a compile error, a timeout or a crash: this case fails
            benchlib.row(cells + [f"error: {benchlib.short_error(e)}"] + [""] * 4 + [f"{fwd_tol:g}, {grad_tol:g}",
                                                                                    "FAILED"])
            failures += 1
            continue
        errors = [benchlib.relative_error(x, r) for x, r in zip(ours, ref)]
        tolerances = [fwd_tol] + [grad_tol] * 3
        shapes_ok = ours[0].shape == args_[0].shape and ours[0].dtype == args_[0].dtype
        ok = shapes_ok and all(benchlib.within(e, t) for e, t in zip(errors, tolerances))
        failures += not ok
        benchlib.row(cells + [benchlib.fmt_error(e, t) for e, t in zip(errors, tolerances)]
                     + [f"{fwd_tol:g}, {grad_tol:g}", ("ok" if ok else "FAILED") + ("" if shapes_ok else " (shape)")])
    print(f"# {len(prepared) - failures} of {len(prepared)} cases passed; wall time "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    compiler.close()
    benchlib.exit_now(1 if failures else 0)


if __name__ == "__main__":
    main()
