"""Attention on one GPU: our Pallas kernel vs cuDNN vs XLA vs jax's stock Pallas `mha`.

    python bench/attention.py                      # H100 / H200: batch 8, 32 heads x 64, seq 2048 and 4096
    python bench/attention.py --tiny --interpret   # CPU smoke run of the same code paths (seconds)

Causal, bfloat16, forward and forward+backward, each with and without packed segments (documents of
random length, mean --doc_len). Every output and gradient is checked against XLA (computed one batch
row at a time, in float32). TFLOP/s use FlashAttention's counting: forward 4*B*H*S^2*D, halved for
causal; backward 2.5x forward. Packed rows are counted as the same causal problem, so skipped tiles
show as higher effective TFLOP/s. cuDNN takes no segment ids: on packed rows its time is that of the
plain causal problem, the bar our skipping has to beat. Prints a markdown table for BENCHMARKS.md.
Needs only jax (no TF, seqio, grain or gin).
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax.attention.cudnn import cudnn_attention  # noqa: E402
from phi_jax.attention.pallas_gpu import pallas_gpu_attention  # noqa: E402
from phi_jax.attention.xla import xla_attention  # noqa: E402

TOLERANCE = 2e-2  # bf16, norm-wise relative


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--doc_len", type=int, default=512, help="mean document length of packed rows")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="batch 1, 2 heads, seq 128, docs of 32, 1 iteration")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (runs on CPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.heads, args.seq, args.doc_len, args.iters = 1, 2, [128], 32, 1
    return args


def packed_segments(rng, batch, length, mean_doc):
    """Segment ids 1, 2, ... with document lengths uniform in [1, 2 * mean_doc)."""
    rows = []
    for _ in range(batch):
        lengths = rng.integers(1, 2 * mean_doc, size=2 * length // mean_doc + 2)
        rows.append(np.repeat(np.arange(1, len(lengths) + 1), lengths)[:length])
    return jnp.asarray(np.stack(rows), jnp.int32)


def stock_mha(interpret):
    """jax's own Pallas-Triton flash attention (checks segments per tile, skips no segment blocks)."""
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except ImportError as e:  # moved or removed in this jax
        print(f"stock mha unavailable: {e}")
        return None
    return lambda q, k, v, seg, head_dim: mha(q, k, v, seg, sm_scale=head_dim ** -0.5, causal=True,
                                              interpret=interpret)


def implementations(args):
    """name -> fn(q, k, v, segment_ids or None) -> out; None where not available here."""
    on_gpu = jax.default_backend() == "gpu"
    mha = stock_mha(args.interpret)
    impls = {
        "ours (pallas_gpu)": lambda q, k, v, seg: pallas_gpu_attention(q, k, v, seg, interpret=args.interpret),
        "cuDNN": (lambda q, k, v, seg: cudnn_attention(q, k, v)) if on_gpu else None,
        "XLA": lambda q, k, v, seg: xla_attention(q, k, v, segment_ids=seg, kv_segment_ids=seg),
        "stock Pallas mha": (lambda q, k, v, seg: mha(q, k, v, seg, q.shape[-1])) if mha else None,
    }
    return impls


def timed(fn, *args, iters):
    """(median seconds per call, last result); the first call compiles and is not timed."""
    result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def reference(q, k, v, seg, d_out):
    """XLA output and gradients in float32, one batch row at a time (the full [B, H, S, S] would not fit)."""
    def one_row(row):
        q, k, v, d_out, *seg = (x[None] for x in row)
        segment_ids = seg[0] if seg else None
        f = lambda q, k, v: xla_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=segment_ids)
        out, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
        return (out, *vjp(d_out.astype(jnp.float32)))
    rows = (q, k, v, d_out) + (() if seg is None else (seg,))
    return [x[:, 0] for x in jax.lax.map(one_row, rows)]


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def bench_one(fn, q, k, v, seg, d_out, ref, iters):
    """(fwd s, fwd+bwd s, worst relative error or None when unchecked)."""
    forward = jax.jit(fn)
    loss = lambda q, k, v, seg: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * d_out.astype(jnp.float32))
    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    t_fwd, out = timed(forward, q, k, v, seg, iters=iters)
    t_fwd_bwd, grads = timed(forward_backward, q, k, v, seg, iters=iters)
    if ref is None:
        return t_fwd, t_fwd_bwd, None
    return t_fwd, t_fwd_bwd, max(relative_error(x, r) for x, r in zip((out, *grads), ref))


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = jax.devices()[0]
    print(f"# attention bench: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{datetime.date.today()}")
    print(f"# batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, causal, bfloat16, "
          f"packed docs of mean length {args.doc_len}; median of {args.iters}")
    print("| seq | packed | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
          "max rel err vs XLA | cuDNN time / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    impls = implementations(args)
    failed = False
    for seq in args.seq:
        shape = (args.batch, seq, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        fwd_flops = 4 * args.batch * args.heads * seq * seq * args.head_dim / 2
        cudnn_times = None
        for packed in (False, True):
            seg = packed_segments(rng, args.batch, seq, args.doc_len) if packed else None
            ref = reference(q, k, v, seg, d_out)
            ours = None
            for name, fn in impls.items():
                cells = [str(seq), "yes" if packed else "no", name]
                if fn is None:
                    print("| " + " | ".join(cells + ["n/a"] * 6) + " |")
                    continue
                ignores_segments = name == "cuDNN"
                try:
                    t_fwd, t_fwd_bwd, err = bench_one(fn, q, k, v, None if ignores_segments else seg, d_out,
                                                      None if ignores_segments and packed else ref, args.iters)
                except Exception as e:  # an OOM (XLA at 4096) or a missing feature: report, go on
                    print("| " + " | ".join(cells + [f"error: {type(e).__name__}: {str(e)[:80]}"] + [""] * 5) + " |")
                    continue
                if name == "cuDNN" and not packed:
                    cudnn_times = (t_fwd, t_fwd_bwd)
                if name.startswith("ours"):
                    ours = (t_fwd, t_fwd_bwd)
                ok = err is None or err <= TOLERANCE
                failed |= not ok
                check = "not checked (ignores segments)" if err is None else f"{err:.1e}" + ("" if ok else " FAILED")
                ratio = ""
                if name.startswith("ours") and cudnn_times:
                    ratio = f"{cudnn_times[0] / ours[0]:.2f} / {cudnn_times[1] / ours[1]:.2f}"
                print("| " + " | ".join(cells + [
                    f"{t_fwd * 1e3:.2f}", f"{fwd_flops / t_fwd / 1e12:.1f}", f"{t_fwd_bwd * 1e3:.2f}",
                    f"{3.5 * fwd_flops / t_fwd_bwd / 1e12:.1f}", check, ratio]) + " |", flush=True)
    print(f"# last column: forward / forward+backward, > 1 means ours is faster (empty without cuDNN); "
          f"wall time {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
