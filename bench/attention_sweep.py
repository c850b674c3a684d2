"""Block sizes, warps, stages and kernel options of our Pallas-Triton attention, swept on one GPU; prints
the winning `BlockSizes(...)` per head_dim, ready to paste into gpu_block_sizes
(phi_jax/attention/block_sizes.py).

    python3 bench/attention_sweep.py --budget_s 80              # a GPU: head_dim 64, then 128, as time allows
    python bench/attention_sweep.py --tiny --interpret --head_dims 64   # CPU: 2 candidates, the same code

Each kernel is timed separately, its candidates varying its own fields while the other kernels keep
the current table's (gpu_block_sizes):
  forward   block_q, block_k, num_warps, num_stages, exp2: time of the forward alone;
  dK/dV     block_q_dkv, block_k_dkv, dkv_transposed, and fused_backward (dQ added atomically);
  dQ        block_q_dq, block_k_dq;
  backward  num_warps_bwd, num_stages_bwd (shared by both backward kernels).
Backward candidates are timed as forward+backward with the table's forward (the same kernel for all
of them), so their differences are the backward's. The time of a candidate is the sum over two
inputs at batch 8, seq 2048, 2048 / head_dim heads, bf16, causal: dense, and packed (documents of
mean length 512). Before it can win, each candidate's output (and gradients) must match the float32
XLA reference on those inputs within 2e-2 (norm-wise, computed on the device); a NaN fails.
Candidates that fail to compile are printed with the reason and skipped. Then the winners of the
four groups are put together, checked and timed against the table (and against the best single
candidate), and the fastest correct one is printed. Compiles run ahead on a thread pool; every
candidate prints as measured; --budget_s stops the sweep in time to print the winners so far.
Imports only jax, numpy and phi_jax.attention.
"""

import argparse
import concurrent.futures
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

TOLERANCE = 2e-2
FINALS_S = 20.0  # of --budget_s, kept for each head_dim's finalists
TINY_BLOCKS = BlockSizes(32, 16, 16, 32, 32, 16)


def has(field):
    return field not in benchlib.missing_options()


def candidates(base: BlockSizes, tiny: bool) -> dict[str, list[BlockSizes]]:
    """Per kernel group, the table's row first, then alternatives in rough order of promise; only
    the group's own fields differ from `base`."""
    r = dataclasses.replace
    if tiny:
        def options(*names):
            return {name: True for name in names if has(name)}
        return {"forward": [base, r(base, block_q=16, block_k=32, **options("exp2"))],
                "dK/dV": [base, r(base, block_q_dkv=32, block_k_dkv=16, **options("dkv_transposed", "fused_backward"))],
                "dQ": [base], "backward": [base]}
    forward = [r(base, block_q=bq, block_k=bk, num_warps=w, num_stages=s)
               for bq, bk in ((128, 64), (128, 128), (64, 64), (128, 32), (64, 128), (64, 32))
               for w, s in ((4, 3), (8, 2), (4, 2))]
    if has("exp2"):
        forward += [r(b, exp2=True) for b in forward[:6]]
    dkv_blocks = [r(base, block_q_dkv=bq, block_k_dkv=bk)
                  for bq, bk in ((32, 128), (64, 128), (32, 64), (64, 64), (16, 128), (16, 64), (128, 128))]
    dkv = list(dkv_blocks)
    if has("dkv_transposed"):
        dkv += [r(b, dkv_transposed=True) for b in dkv_blocks]
    if has("fused_backward"):
        dkv += [r(b, fused_backward=True) for b in dkv_blocks[:5]]
        if has("dkv_transposed"):
            dkv += [r(b, fused_backward=True, dkv_transposed=True) for b in dkv_blocks[:3]]
    dq = [r(base, block_q_dq=bq, block_k_dq=bk)
          for bq, bk in ((128, 32), (64, 32), (128, 64), (64, 64), (128, 16), (64, 16))]
    backward = [r(base, num_warps_bwd=w, num_stages_bwd=s) for w, s in ((4, 3), (8, 2), (4, 2), (8, 3), (4, 4))]
    groups = {"forward": forward, "dK/dV": dkv, "dQ": dq, "backward": backward}
    return {name: [base] + [b for b in dict.fromkeys(group) if b != base] for name, group in groups.items()}


def describe(blocks: BlockSizes, group: str, base: BlockSizes) -> str:
    changed = [f"{f.name}={getattr(blocks, f.name)}" for f in dataclasses.fields(BlockSizes)
               if getattr(blocks, f.name) != getattr(base, f.name)]
    return ", ".join(changed) or "table default"


def forward_fn(blocks, interpret):
    return lambda q, k, v, seg, d_out: pallas_gpu_attention(q, k, v, seg, block_sizes=blocks, interpret=interpret)


def forward_backward_fn(blocks, interpret):
    def fn(q, k, v, seg, d_out):
        out, vjp = jax.vjp(lambda q, k, v: pallas_gpu_attention(q, k, v, seg, block_sizes=blocks, interpret=interpret),
                           q, k, v)
        return (out, *vjp(d_out))
    return fn


class Sweep:
    def __init__(self, args, head_dim, deadline):
        self.args, self.head_dim, self.deadline = args, head_dim, deadline
        heads = args.heads or max(1, 2048 // head_dim)
        rng = np.random.default_rng(head_dim)
        shape = (args.batch, args.seq, heads, head_dim)
        keys = jax.random.split(jax.random.key(head_dim), 4)
        q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        seg = jnp.asarray(benchlib.packed_segments(rng, args.batch, args.seq, args.doc_len))
        self.inputs = {"dense": (q, k, v, None, d_out), "packed": (q, k, v, seg, d_out)}
        self.compiler = benchlib.Compiler(args.workers or benchlib.default_workers())
        for layout, (q, k, v, seg, d_out) in self.inputs.items():
            self.compiler.submit(("ref", layout), benchlib.xla_reference, q, k, v, seg, d_out, precision="highest")
        self.refs = {}
        self.results = {}  # (kind, blocks) -> (seconds or None, note)

    def submit(self, kind, blocks):
        make = forward_fn if kind == "fwd" else forward_backward_fn
        for layout, args in self.inputs.items():
            key = (kind, blocks, layout)
            if not self.compiler.known(key):
                self.compiler.submit(key, make(blocks, self.args.interpret), *args)

    def measure(self, kind, blocks):
        """(summed seconds over the layouts, per-layout ms text, worst error, note); seconds None
        when it failed to compile, ran past the budget, or is wrong."""
        if (kind, blocks) in self.results:
            return self.results[(kind, blocks)]
        total, parts, worst = 0.0, [], 0.0
        try:
            for layout, args in self.inputs.items():
                if self.deadline.passed():
                    raise TimeoutError("--budget_s spent")
                executable = self.compiler.get((kind, blocks, layout), timeout=self.deadline.wait_s())
                self.compiler.wait_idle(self.deadline.wait_s())  # no compile beside the timing
                seconds, results = benchlib.median_seconds(executable, *args, iters=self.args.iters)
                if layout not in self.refs:
                    q, k, v, seg, d_out = args
                    self.refs[layout] = self.compiler.get(("ref", layout), timeout=self.deadline.wait_s())(
                        q, k, v, seg, d_out)
                refs = self.refs[layout]
                results = (results,) if kind == "fwd" else results
                errors = np.asarray(benchlib.device_relative_errors(results, refs[:len(results)]))
                if not np.isfinite(errors).all():
                    worst = float("nan")
                    raise ValueError(f"{layout}: NaN/inf in the results FAILED")
                worst = max(worst, float(errors.max()))
                if worst > TOLERANCE:
                    raise ValueError(f"{layout}: error {worst:.1e} > {TOLERANCE:g} FAILED")
                total += seconds
                parts.append(f"{seconds * 1e3:.3f}")
        except Exception as e:  # noqa: BLE001 - compile errors (out of shared memory, ...), timeouts, wrong results
            result = (None, " / ".join(parts), worst, benchlib.short_error(e, 140))
            if isinstance(e, (TimeoutError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError)):
                return result  # not the candidate's fault: a finalist may measure it again
        else:
            result = (total, " / ".join(parts), worst, "ok")
        self.results[(kind, blocks)] = result
        return result

    def report(self, group, blocks, base, result):
        seconds, parts, worst, note = result
        benchlib.row([self.head_dim, group, describe(blocks, group, base), parts or "",
                      f"{seconds * 1e3:.3f}" if seconds is not None else "",
                      benchlib.fmt_error(worst) if seconds is not None else "", note])
        benchlib.append_json(self.args.json_out, {"head_dim": self.head_dim, "group": group,
                                                  "blocks": dataclasses.asdict(blocks), "seconds": seconds,
                                                  "layouts_ms": parts, "error": worst, "note": note})


def best(measured):
    ok = [(seconds, i, blocks) for i, (blocks, (seconds, *_)) in enumerate(measured) if seconds is not None]
    return min(ok)[2] if ok else None


def run_head_dim(args, head_dim, deadline):
    base = dataclasses.replace(TINY_BLOCKS) if args.tiny else gpu_block_sizes(head_dim)
    groups = candidates(base, args.tiny)
    if args.candidates:
        groups = {name: group[:args.candidates] for name, group in groups.items()}
    sweep = Sweep(args, head_dim, deadline)
    kinds = {"forward": "fwd", "dK/dV": "fwd_bwd", "dQ": "fwd_bwd", "backward": "fwd_bwd"}
    for name, group in groups.items():  # everything compiles ahead, in the order it is measured
        for blocks in group:
            sweep.submit(kinds[name], blocks)

    # The groups stop early enough to leave the finalists (compile, check, time) their share.
    groups_deadline = benchlib.Deadline(None if deadline.end is None else max(0.0, deadline.left() - FINALS_S))
    sweep.deadline = groups_deadline
    winners = {}
    for name, group in groups.items():
        measured = []
        for blocks in group:
            result = sweep.measure(kinds[name], blocks)
            sweep.report(name, blocks, base, result)
            measured.append((blocks, result))
        winners[name] = best(measured) or base
    sweep.compiler.cancel_pending()  # compiles of candidates that ran out of time
    sweep.deadline = deadline

    # The groups' winners together: forward fields from the forward's, and so on.
    fields = {"forward": ("block_q", "block_k", "num_warps", "num_stages", "exp2"),
              "dK/dV": ("block_q_dkv", "block_k_dkv", "dkv_transposed", "fused_backward"),
              "dQ": ("block_q_dq", "block_k_dq"), "backward": ("num_warps_bwd", "num_stages_bwd")}
    combined = base
    for name, names in fields.items():
        combined = dataclasses.replace(combined, **{f: getattr(winners[name], f) for f in names if hasattr(base, f)})
    finalists = {"table default": base, "groups' winners combined": combined}
    for name in ("dK/dV", "dQ", "backward"):
        finalists.setdefault(f"best {name} alone", dataclasses.replace(winners[name], **{
            f: getattr(winners["forward"], f) for f in fields["forward"] if hasattr(base, f)}))
    for blocks in finalists.values():
        sweep.submit("fwd_bwd", blocks)
        sweep.submit("fwd", blocks)
    final, seen = [], set()
    for label, blocks in finalists.items():
        if blocks in seen:  # equal finalists are measured once, under the first label
            continue
        seen.add(blocks)
        result = sweep.measure("fwd_bwd", blocks)
        sweep.report(f"final: {label}", blocks, base, result)
        if result[0] is not None:
            final.append((result[0], label, blocks))
    sweep.compiler.close()
    if not final:
        print(f"# head_dim {head_dim}: no finalist ran (budget or failures); keep the table's row", flush=True)
        return None
    seconds, label, winner = min(final, key=lambda x: (x[0], x[1] != "table default"))
    base_seconds = next((s for s, lbl, _ in final if lbl == "table default"), None)
    gain = f"{base_seconds / seconds:.2f}x the table's forward+backward" if base_seconds else "table row did not run"
    print(f"# head_dim {head_dim}: winner = {label}: {seconds * 1e3:.3f} ms forward+backward (dense + packed), "
          f"{gain}", flush=True)
    print(f"WINNER head_dim={head_dim}: {benchlib.block_sizes_expr(winner)}", flush=True)
    return winner


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, help="default 2048 // head_dim (phi-1.5's width)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--doc_len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--candidates", type=int, help="at most this many candidates a group (the table's first)")
    parser.add_argument("--json_out", help="append one JSON line per candidate")
    parser.add_argument("--workers", type=int, help="compile threads (default: most cores on a GPU, 1 on CPU)")
    parser.add_argument("--budget_s", type=float, help="stop measuring after this many seconds and print winners")
    parser.add_argument("--tiny", action="store_true",
                        help="batch 1, 2 heads, seq 64, small blocks, 2 candidates for forward and dK/dV")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (runs on CPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.heads, args.seq, args.doc_len, args.iters = 1, 2, 64, 16, 1
        args.candidates = args.candidates or 2
    deadline = benchlib.Deadline(args.budget_s)
    started = time.perf_counter()
    print(f"# attention sweep: pallas_gpu on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}; batch {args.batch}, seq {args.seq}, bf16, causal, dense + packed (docs of mean "
          f"{args.doc_len}); median of {args.iters}; options missing here: {benchlib.missing_options() or 'none'}",
          flush=True)
    benchlib.header(["head_dim", "kernel", "candidate (fields changed from the table)", "ms dense / packed",
                     "ms total", "max rel err", "result"])
    winners = {}
    for head_dim in args.head_dims:
        if deadline.passed():
            print(f"# head_dim {head_dim}: not swept (--budget_s spent)", flush=True)
            continue
        winners[head_dim] = run_head_dim(args, head_dim, deadline)
    print("# paste into gpu_block_sizes (phi_jax/attention/block_sizes.py), one row per head_dim swept:")
    for head_dim, winner in winners.items():
        if winner is not None:
            print(f"#   head_dim <= {head_dim}: return {benchlib.block_sizes_expr(winner)}")
    print(f"# wall time {time.perf_counter() - started:.0f} s", flush=True)
    benchlib.exit_now(0 if winners and all(w is not None for w in winners.values()) else 1)


if __name__ == "__main__":
    main()
