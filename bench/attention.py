"""Attention on one GPU: cuDNN, jax's stock Pallas `mha` and XLA, then our Pallas kernel (pallas_gpu)
with its default blocks and with each kernel option on.

    python3 bench/attention.py                                 # H100 / H200: batch 8, 32 heads x 64, seq 2048, 4096
    python3 bench/attention.py --impls cudnn,stock,xla --json_out base.jsonl           # the suite: baselines ...
    python3 bench/attention.py --impls ours,ours+exp2 --baseline base.jsonl            # ... then ours, in another process
    python bench/attention.py --tiny --interpret               # CPU smoke run of the same code paths (seconds)

Causal, bfloat16, forward and forward+backward, each with and without packed segments (documents of
random length, mean --doc_len). Every output and gradient is checked against XLA in float32 at
"highest" precision (computed one batch row at a time); a NaN or inf fails the row. TFLOP/s use
FlashAttention's counting: forward 4*B*H*S^2*D, halved for causal; backward 2.5x forward. Packed rows
are counted as the same causal problem, so skipped tiles show as higher effective TFLOP/s. cuDNN takes
no segment ids: its packed row times the plain causal problem, the bar our skipping has to beat.
The last column is cuDNN's dense causal time at that length over the row's (> 1: faster than cuDNN),
from this run or from --baseline's rows. Rows print as measured (and go to --json_out at once), one
implementation at every length before the next, so a crash keeps everything before it; compiles run
ahead on a thread pool. Needs only jax (no TF, seqio, grain or gin).
"""  # noqa: E501 (the usage block's aligned comments; only the first line reaches --help)

import argparse
import datetime
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402

from phi_jax.attention.block_sizes import gpu_block_sizes  # noqa: E402
from phi_jax.attention.cudnn import cudnn_attention  # noqa: E402
from phi_jax.attention.pallas_gpu import pallas_gpu_attention  # noqa: E402
from phi_jax.attention.xla import xla_attention  # noqa: E402

TOLERANCE = 2e-2  # bf16, norm-wise relative (tests/test_attention.py's bfloat16 tolerance)
BASELINES = ("cudnn", "stock", "xla")
OURS = ("ours",) + tuple(f"ours+{variant}" for variant in benchlib.VARIANTS)
NAMES = {"cudnn": "cuDNN", "stock": "stock Pallas mha", "xla": "XLA", "ours": "ours (pallas_gpu)",
         **{f"ours+{variant}": f"ours +{variant}" for variant in benchlib.VARIANTS}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--doc_len", type=int, default=512, help="mean document length of packed rows")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default=",".join(BASELINES + OURS),
                        help=f"comma-separated, in order, from {', '.join(BASELINES + OURS)}")
    parser.add_argument("--xla_max_seq", type=int,
                        help="skip XLA above this length (default: 2048 on a GPU, where 4096 needs ~70 GB)")
    parser.add_argument("--json_out", help="append one JSON line per row to this file")
    parser.add_argument("--baseline", help="JSON lines of an earlier run: its cuDNN rows give the last column")
    parser.add_argument("--workers", type=int, help="compile threads (default: most cores on a GPU, 1 on CPU)")
    parser.add_argument("--budget_s", type=float, help="stop starting rows after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="batch 1, 2 heads, seq 128, docs of 32, 1 iteration")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (runs on CPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.heads, args.seq, args.doc_len, args.iters = 1, 2, [128], 32, 1
    args.impls = [name for name in args.impls.split(",") if name]
    unknown = sorted(set(args.impls) - set(NAMES))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {', '.join(NAMES)}")
    if args.xla_max_seq is None:
        args.xla_max_seq = 2048 if jax.default_backend() == "gpu" else math.inf
    return args


def stock_mha(interpret):
    """jax's own Pallas-Triton flash attention (checks segments per tile, skips no segment blocks)."""
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except ImportError as e:  # moved or removed in this jax
        return None, f"stock mha unavailable: {e}"
    return (lambda q, k, v, seg: mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True,
                                     interpret=interpret)), None


def implementation(key, args):
    """(fn(q, k, v, segment_ids or None) -> out, or None; why it is None)."""
    if key == "cudnn":
        if jax.default_backend() != "gpu":
            return None, "needs a GPU"
        return (lambda q, k, v, seg: cudnn_attention(q, k, v)), None
    if key == "xla":
        return (lambda q, k, v, seg: xla_attention(q, k, v, segment_ids=seg, kv_segment_ids=seg)), None
    if key == "stock":
        return stock_mha(args.interpret)
    variant = key.partition("+")[2] or None
    try:
        blocks = benchlib.with_option(gpu_block_sizes(args.head_dim), variant)
    except TypeError as e:  # the option is not in this checkout's BlockSizes
        return None, str(e)
    return (lambda q, k, v, seg: pallas_gpu_attention(q, k, v, seg, block_sizes=blocks, interpret=args.interpret)), None


def worst_error(results, ref):
    """Worst norm-wise relative error over output and gradients; NaN if any result is not finite."""
    errors = benchlib.device_relative_errors(results, ref[:len(results)])
    return float("nan") if not all(np.isfinite(errors)) else max(errors)


def cudnn_times(records, seq):
    for r in records:
        if r.get("impl") == "cudnn" and r.get("seq") == seq and not r.get("packed") and r.get("fwd_s"):
            return r["fwd_s"], r["fwd_bwd_s"]
    return None


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = benchlib.Deadline(args.budget_s)
    device = jax.devices()[0]
    print(f"# attention bench: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{datetime.date.today()}")
    print(f"# batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, causal, bfloat16, "
          f"packed docs of mean length {args.doc_len}; median of {args.iters}; impls {','.join(args.impls)}")
    benchlib.header(["seq", "packed", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                     "max rel err vs XLA", "cuDNN time / this (fwd / fwd+bwd)"])
    rng = np.random.default_rng(0)
    impls = {key: implementation(key, args) for key in args.impls}
    measured = benchlib.read_json_lines(args.baseline)  # cuDNN rows of another process, if any
    compiler = benchlib.Compiler(args.workers or benchlib.default_workers())

    # Inputs and every compile up front (compiles run on the pool while rows are measured in order).
    # Rows go implementation by implementation (all lengths of one before the next): a variant that
    # crashes the process then costs only the rows after it, never an earlier implementation's.
    shapes = []
    for seq in args.seq:
        shape = (args.batch, seq, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        for packed in (False, True):
            seg = jnp.asarray(benchlib.packed_segments(rng, args.batch, seq, args.doc_len)) if packed else None
            shapes.append((seq, packed, (q, k, v, d_out, seg)))

    def compile_key(kind, seq, packed, key):
        return (kind, seq, packed and key != "cudnn", key)  # cuDNN's packed row is its dense problem

    for key, (fn, _) in impls.items():
        for seq, packed, (q, k, v, d_out, seg) in shapes:
            if fn is None or (key == "xla" and seq > args.xla_max_seq) or compiler.known(compile_key("fwd", seq, packed,
                                                                                                     key)):
                continue
            use_seg = None if key == "cudnn" else seg
            loss = (lambda fn, d_out: lambda q, k, v, seg: jnp.sum(
                fn(q, k, v, seg).astype(jnp.float32) * d_out.astype(jnp.float32)))(fn, d_out)
            compiler.submit(compile_key("fwd", seq, packed, key), fn, q, k, v, use_seg)
            compiler.submit(compile_key("fwd_bwd", seq, packed, key), jax.grad(loss, argnums=(0, 1, 2)),
                            q, k, v, use_seg)
        if key == next(iter(impls)):  # the references right after the first implementation's compiles
            for seq, packed, (q, k, v, d_out, seg) in shapes:
                compiler.submit(("ref", seq, packed), benchlib.xla_reference, q, k, v, seg, d_out, precision="highest")

    compiler.prefetch()
    failed = False
    refs = {}
    for key, (fn, why) in impls.items():
        for seq, packed, (q, k, v, d_out, seg) in shapes:
            fwd_flops = 4 * args.batch * args.heads * seq * seq * args.head_dim / 2
            cells = [seq, "yes" if packed else "no", NAMES[key]]
            if fn is None:
                benchlib.row(cells + [f"n/a: {why}"] + [""] * 5)
                continue
            if key == "xla" and seq > args.xla_max_seq:
                benchlib.row(cells + [f"n/a: above --xla_max_seq {args.xla_max_seq}"] + [""] * 5)
                continue
            if deadline.passed():
                benchlib.row(cells + ["not run: --budget_s spent"] + [""] * 5)
                continue
            use_seg = None if key == "cudnn" else seg
            try:
                wait = deadline.wait_s()
                forward = compiler.get(compile_key("fwd", seq, packed, key), timeout=wait)
                forward_backward = compiler.get(compile_key("fwd_bwd", seq, packed, key), timeout=wait)
                compiler.wait_idle(wait)  # no compile beside the timing
                t_fwd, out = benchlib.median_seconds(forward, q, k, v, use_seg, iters=args.iters)
                t_fwd_bwd, grads = benchlib.median_seconds(forward_backward, q, k, v, use_seg, iters=args.iters)
                checked = not (key == "cudnn" and packed)
                if checked and (seq, packed) not in refs:
                    refs[seq, packed] = compiler.get(("ref", seq, packed), timeout=wait)(q, k, v, seg, d_out)
                error = worst_error((out, *grads), refs[seq, packed]) if checked else None
            except Exception as e:  # noqa: BLE001 - an OOM, a missing feature, a crash: report, go on
                benchlib.row(cells + [f"error: {benchlib.short_error(e, 100)}"] + [""] * 5)
                benchlib.append_json(args.json_out, {"seq": seq, "packed": packed, "impl": key,
                                                     "error": benchlib.short_error(e, 300)})
                failed |= key in OURS
                continue
            ok = error is None or benchlib.within(error, TOLERANCE)
            failed |= not ok
            record = {"seq": seq, "packed": packed, "impl": key, "name": NAMES[key], "batch": args.batch,
                      "heads": args.heads, "head_dim": args.head_dim, "fwd_s": t_fwd, "fwd_bwd_s": t_fwd_bwd,
                      "fwd_tflops": fwd_flops / t_fwd / 1e12, "fwd_bwd_tflops": 3.5 * fwd_flops / t_fwd_bwd / 1e12,
                      "error": error, "ok": ok, "device": device.device_kind, "jax": jax.__version__}
            measured.append(record)
            benchlib.append_json(args.json_out, record)
            base = cudnn_times(measured, seq)
            ratio = f"{base[0] / t_fwd:.2f} / {base[1] / t_fwd_bwd:.2f}" if base and key != "cudnn" else ""
            check = "not checked (ignores segments)" if error is None else benchlib.fmt_error(error, TOLERANCE)
            benchlib.row(cells + [f"{t_fwd * 1e3:.2f}", f"{record['fwd_tflops']:.1f}", f"{t_fwd_bwd * 1e3:.2f}",
                                  f"{record['fwd_bwd_tflops']:.1f}", check, ratio])
    print(f"# wall time {time.perf_counter() - started:.0f} s", flush=True)
    compiler.close()
    benchlib.exit_now(1 if failed else 0)


if __name__ == "__main__":
    main()
