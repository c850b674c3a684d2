"""Training-step throughput, MFU and losses: phi_jax against transformers + torch, each framework in
its own process.

Both frameworks train the same config from the same weights (phi_jax params written with
phi_jax.hf.save, read by transformers.PhiForCausalLM.from_pretrained) on the same fixed token batch
(deterministic from --seed, so each process builds it itself) for --warmup + --iters steps: mean
next-token cross entropy, backward, global-norm clipping at 1.0 and an AdamW update that decays the
same params (matrices and the embedding, not biases or LayerNorms). The batch's tokens follow a
Zipf law, so the loss falls from ln V within a few steps; the compare step checks every step's loss
(and the first step's gradient norm, before any update) against torch, not only the first loss,
which at random init is about ln V whatever attention computes. Tokens/s and MFU are taken at the
median of the --iters timed steps.

    python bench/train_step.py                                  # CPU: tiny and small, float32 (make bench)
    python bench/train_step.py --configs tiny --dtype bfloat16 --batch 1 --seq 32 --iters 1   # bf16 path, CPU

  The GPU suite runs the three processes and the compare itself:
    python3 bench/train_step.py --preset gpu --framework jax --out_dir D --hf_dir H   # concat, then first_fit
    python3 bench/train_step.py --preset gpu --framework torch --out_dir D --hf_dir H
    python3 bench/train_step.py --compare D

Without --framework or --compare it does all of that in subprocesses for each config (a temporary D).
--framework jax runs --packings in one process: "concat" (rows cut from one token stream, no
segment ids, segment_aware=False: on a GPU the attention dispatcher picks cuDNN) and "first_fit"
(synthetic documents of random length, one-token ones among them, placed first-fit into rows and
padded; segment ids and per-document positions, segment_aware=True: our Pallas kernel). Both
compile at once on a thread pool. torch runs concat only (it has no segment-aware attention here).
Each run writes D/<config>_<framework>_<packing>.json as soon as it ends, so a crash later keeps it.

GPU preset: phi-1.5 with scan_layers=True, batch 8 x 2048, bf16 compute with float32 params and Adam
state; torch runs sdpa attention under bf16 autocast with float32 params and fused AdamW, and if a
step runs out of memory it starts again from the saved weights with twice the microbatches
(gradient accumulation: the same loss and update, recorded in the JSON). MFU counts model FLOPs
only (phi_jax.metrics.train_flops_per_token: 6N + 12 L D T per token, no rematerialization)
against the chip's dense bf16 peak (phi_jax.metrics.peak_tflops_per_device); on a CPU against the
float32 matmul throughput measured at start. Imports only jax/flax/optax/numpy/safetensors (JAX
process) or torch/transformers/numpy (torch process, which never initializes a JAX backend).
"""

import argparse
import gc
import glob
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The phi-1.5 recipe's AdamW (phi_jax.optimizer.OptimizerConfig's defaults), on both sides.
LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-4, (0.9, 0.98), 1e-7, 0.1, 1.0
# Largest allowed |loss difference| at any step, and relative first-step gradient-norm difference.
LOSS_TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2}
GRAD_NORM_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
PRESETS = {
    "cpu": {"configs": ("tiny", "small"), "batch": 4, "seq": 256, "dtype": "float32", "packings": "concat"},
    "gpu": {"configs": ("phi-1.5",), "batch": 8, "seq": 2048, "dtype": "bfloat16", "packings": "concat,first_fit"},
}


def model_config(name: str, layers: int | None, dtype: str):
    from phi_jax.config import phi_1_5, tiny
    if name == "tiny":
        config = tiny(vocab_size=51200, num_layers=layers or 2)
    elif name == "small":
        config = tiny(hidden_size=512, intermediate_size=2048, num_layers=layers or 4, num_heads=8, head_dim=64,
                      rotary_dim=32)
    elif name == "phi-1.5":
        config = phi_1_5(num_layers=layers or 24, scan_layers=True)
    else:
        raise SystemExit(f"unknown config {name!r}: choose from tiny, small, phi-1.5")
    return config.replace(dtype=dtype)


# ---- The fixed batch -----------------------------------------------------------------------------

def _zipf_sampler(rng, vocab: int):
    probs = 1.0 / (np.arange(vocab) + 10.0) ** 1.1
    probs /= probs.sum()
    ids = rng.permutation(vocab)
    return lambda size: ids[rng.choice(vocab, size=size, p=probs)].astype(np.int32)


def make_batch(packing: str, batch: int, seq: int, vocab: int, seed: int, mean_doc: int | None = None) -> dict:
    """The bench's batch, the same in every process: numpy [batch, seq] arrays of the trainer's
    fields (phi_jax.data's layout). concat: rows of one Zipf token stream, segment ids all 1.
    first_fit: documents of random length (a tenth of them one token long, the others uniform up
    to twice `mean_doc`, default 384 or seq / 5 if shorter) placed into the first
    row with room, in order, until 64 in a row fit nowhere; padding has segment 0 and loss weight 0."""
    rng = np.random.default_rng(seed)
    sample = _zipf_sampler(rng, vocab)
    mean_doc = mean_doc or max(4, min(384, seq // 5))
    if packing == "concat":
        stream = sample((batch, seq + 1))
        return {"tokens": stream[:, :-1], "targets": stream[:, 1:], "loss_weights": np.ones((batch, seq), np.float32),
                "segment_ids": np.ones((batch, seq), np.int32),
                "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}
    if packing != "first_fit":
        raise ValueError(f"packing must be concat or first_fit, found {packing!r}")
    out = {"tokens": np.zeros((batch, seq), np.int32), "targets": np.zeros((batch, seq), np.int32),
           "loss_weights": np.zeros((batch, seq), np.float32), "segment_ids": np.zeros((batch, seq), np.int32),
           "positions": np.zeros((batch, seq), np.int32)}
    # Each row keeps a little padding at its end (as a packer's last bins do), so segment 0 is exercised.
    room = [seq - int(rng.integers(1, max(2, seq // 32))) for _ in range(batch)]
    used, docs, misses = [0] * batch, [0] * batch, 0
    while misses < 64:  # until 64 documents in a row fit nowhere: the rows are about full
        n = 1 if rng.random() < 0.1 else int(min(seq, rng.integers(2, 2 * mean_doc)))
        row = next((r for r in range(batch) if room[r] - used[r] >= n), None)
        if row is None:
            misses += 1
            continue
        misses = 0
        doc = sample(n + 1)
        o = used[row]
        docs[row] += 1
        out["tokens"][row, o:o + n] = doc[:-1]
        out["targets"][row, o:o + n] = doc[1:]
        out["loss_weights"][row, o:o + n] = 1.0
        out["segment_ids"][row, o:o + n] = docs[row]
        out["positions"][row, o:o + n] = np.arange(n, dtype=np.int32)
        used[row] += n
    return out


def digest(batch: dict) -> str:
    return hashlib.sha256(np.ascontiguousarray(batch["tokens"]).tobytes()).hexdigest()[:16]


def write_record(out_dir, record: dict):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{record['config']}_{record['framework']}_{record['packing']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"# wrote {path}", flush=True)


# ---- JAX -----------------------------------------------------------------------------------------

def measured_cpu_peak_tflops(size: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp
    matmul = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((size, size), jnp.float32)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = matmul(a, a)
    out.block_until_ready()
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e12


def run_jax(args, name: str):
    import concurrent.futures

    import jax

    from phi_jax import hf
    from phi_jax.attention import choose_impl
    from phi_jax.metrics import peak_tflops_per_device, train_flops_per_token
    from phi_jax.model import init_params
    from phi_jax.optimizer import OptimizerConfig
    from phi_jax.sharding import global_batch, make_mesh, mesh_context
    from phi_jax.train_step import abstract_state, init_state, jit_train_step

    config = model_config(name, args.layers, args.dtype)
    if args.remat:
        config = config.replace(remat=args.remat)
    optimizer = OptimizerConfig(learning_rate=LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    device = jax.devices()[0]
    if jax.default_backend() == "cpu":
        peak, peak_source = measured_cpu_peak_tflops(), "measured float32 matmul"
    else:
        peak, peak_source = peak_tflops_per_device(device), f"{device.device_kind} dense bf16 peak"
    mesh = make_mesh({"data": 1}, [device])
    packings = [p for p in args.packings.split(",") if p]
    batches = {p: make_batch(p, args.batch, args.seq, config.vocab_size, args.seed) for p in packings}
    print(f"# jax {jax.__version__} on {device.device_kind}: {name} ({config.num_params / 1e6:.1f}M params, "
          f"{config.num_layers} layers, scan_layers={config.scan_layers}, remat={config.remat}), "
          f"batch {args.batch} x {args.seq}, {config.dtype}; packings {packings}; "
          f"peak {peak} TFLOP/s ({peak_source})", flush=True)

    # Lower both packings' steps here and compile them at once, while this thread builds and saves
    # the weights (XLA compiles without the GIL).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(packings))
    compiled, lowered_at = {}, time.perf_counter()
    with mesh_context(mesh):
        abstract = abstract_state(config, optimizer, mesh)
        device_batches = {p: global_batch(mesh, b, args.batch) for p, b in batches.items()}
        for p in packings:
            step = jit_train_step(config, optimizer, mesh, segment_aware=p == "first_fit")
            try:
                compiled[p] = pool.submit(_timed_compile, step.lower(abstract, device_batches[p]))
            except Exception as e:  # noqa: BLE001
                compiled[p] = concurrent.futures.Future()
                compiled[p].set_exception(e)
    print(f"# lowered in {time.perf_counter() - lowered_at:.1f} s; compiling {packings} in parallel", flush=True)
    initial_params = jax.jit(init_params, static_argnums=0)  # the same weights in every run and in torch's
    if args.hf_dir:
        started = time.perf_counter()
        hf.save(config, initial_params(config, jax.random.key(0)), args.hf_dir, overwrite=True)
        print(f"# saved the initial weights for torch to {args.hf_dir} in {time.perf_counter() - started:.1f} s",
              flush=True)

    # Time nothing while another step still compiles (it competes for the CPU, and XLA's autotuning
    # runs kernels on the GPU); a compile that hangs stops holding the others up after 300 s.
    concurrent.futures.wait(list(compiled.values()), timeout=300)
    failed = False
    for p in packings:
        segment_aware = p == "first_fit"
        attention = choose_impl(config.attention_impl, backend=jax.default_backend(), dtype=config.compute_dtype,
                                head_dim=config.head_dim, has_segments=segment_aware, dropout=False)
        record = {"config": name, "framework": "jax", "packing": p, "attention": attention,
                  "batch": args.batch, "seq": args.seq, "dtype": config.dtype, "params": config.num_params,
                  "layers": config.num_layers, "remat": config.remat, "batch_digest": digest(batches[p]),
                  "tokens_per_step": args.batch * args.seq,
                  "real_tokens_per_step": int(batches[p]["loss_weights"].sum()),
                  "documents": int(sum(len(set(r[r > 0].tolist())) for r in batches[p]["segment_ids"])),
                  "flops_per_token": train_flops_per_token(config, args.seq), "peak_tflops": peak,
                  "peak_source": peak_source, "device": device.device_kind, "version": f"jax {jax.__version__}",
                  "warmup": args.warmup, "iters": args.iters}
        try:
            executable, record["compile_s"] = compiled[p].result()  # compiled side by side with the others
            try:
                memory = executable.memory_analysis()
                record["memory_gb"] = {k: getattr(memory, f"{k}_size_in_bytes", 0) / 1e9
                                       for k in ("argument", "output", "temp", "generated_code")}
                print(f"# {p}: compiled in {record['compile_s']:.0f} s; device memory (GB) {record['memory_gb']}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - only a record; never worth the run
                record["memory_gb"] = f"unavailable: {type(e).__name__}"
            with mesh_context(mesh):
                state = init_state(config, optimizer, mesh, seed=0, params=initial_params(config, jax.random.key(0)))
                losses, grad_norms, seconds = [], [], []
                for _ in range(args.warmup + args.iters):
                    start = time.perf_counter()
                    state, metrics = executable(state, device_batches[p])
                    losses.append(float(metrics["loss"]))  # waits for the step
                    seconds.append(time.perf_counter() - start)
                    grad_norms.append(float(metrics["grad_norm"]))
            del state
        except Exception as e:  # noqa: BLE001 - an OOM or a kernel failure: record it, go on to the next
            record["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
            print(f"# {p}: FAILED: {record['error']}", flush=True)
            write_record(args.out_dir, record)
            failed = True
            continue
        record.update(losses=losses, grad_norms=grad_norms, step_seconds=seconds,
                      median_step_s=statistics.median(seconds[args.warmup:]))
        print(f"# {p} ({attention}): losses {[round(x, 4) for x in losses]}, median step "
              f"{record['median_step_s'] * 1e3:.1f} ms, compiled in {record['compile_s']:.0f} s", flush=True)
        write_record(args.out_dir, record)
    pool.shutdown(wait=False)
    return 1 if failed else 0


def _timed_compile(lowered):
    started = time.perf_counter()
    executable = lowered.compile()
    return executable, time.perf_counter() - started


# ---- torch ---------------------------------------------------------------------------------------

def run_torch(args, name: str):
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    bf16 = args.dtype == "bfloat16"
    config = transformers.PhiConfig.from_pretrained(args.hf_dir)
    batch = make_batch("concat", args.batch, args.seq, config.vocab_size, args.seed)
    inputs = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long, device=device)
    device_kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__} on {device_kind}: {name}, "
          f"batch {args.batch} x {args.seq}, {args.dtype}", flush=True)

    def fresh():
        model = transformers.PhiForCausalLM.from_pretrained(args.hf_dir, attn_implementation="sdpa",
                                                            dtype=torch.float32).to(device).train()
        # phi_jax decays matrices and the embedding only (optimizer._decay_mask): the same here.
        decay, no_decay = [], []
        for module in model.modules():
            for param_name, param in module.named_parameters(recurse=False):
                matrix = param_name == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                (decay if matrix else no_decay).append(param)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=LEARNING_RATE, betas=BETAS, eps=EPS, fused=device == "cuda")
        return model, optimizer

    fake_oom_below = int(os.environ.get("BENCH_TORCH_FAKE_OOM_BELOW", 0))  # tests: the retry path on a CPU

    def step(model, optimizer, microbatches):
        if microbatches < fake_oom_below:
            raise torch.cuda.OutOfMemoryError(f"fake, below {fake_oom_below} microbatches (BENCH_TORCH_FAKE_OOM_BELOW)")
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for rows in torch.arange(args.batch, device=device).chunk(microbatches):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=inputs[rows]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[rows].flatten(),
                                                     reduction="sum") / targets.numel()
            loss.backward()
            total += loss.detach()
            del logits, loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        return total.item(), grad_norm.item()  # .item() waits for the step

    record = {"config": name, "framework": "torch", "packing": "concat", "attention": "sdpa",
              "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "batch_digest": digest(batch),
              "tokens_per_step": args.batch * args.seq, "real_tokens_per_step": args.batch * args.seq,
              "device": device_kind, "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
              "warmup": args.warmup, "iters": args.iters}
    microbatches = 1
    while True:
        out_of_memory = None
        try:
            started = time.perf_counter()
            model, optimizer = fresh()
            record["load_s"] = time.perf_counter() - started
            losses, grad_norms, seconds = [], [], []
            for _ in range(args.warmup + args.iters):
                start = time.perf_counter()
                loss, grad_norm = step(model, optimizer, microbatches)
                seconds.append(time.perf_counter() - start)
                losses.append(loss)
                grad_norms.append(grad_norm)
            break
        except torch.cuda.OutOfMemoryError as e:
            out_of_memory = " ".join(str(e).split())[:300]
        # Outside the except block, so that the traceback's frames (and their tensors) are gone.
        model = optimizer = None
        gc.collect()
        torch.cuda.empty_cache()
        if microbatches >= args.batch:
            record["error"] = f"OutOfMemoryError at {microbatches} microbatches: {out_of_memory}"
            write_record(args.out_dir, record)
            return 1
        microbatches *= 2
        print(f"# out of memory ({out_of_memory[:120]}): starting again from the saved weights with "
              f"{microbatches} microbatches", flush=True)
    record.update(losses=losses, grad_norms=grad_norms, step_seconds=seconds, microbatches=microbatches,
                  median_step_s=statistics.median(seconds[args.warmup:]))
    if device == "cuda":
        record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"# torch: losses {[round(x, 4) for x in losses]}, median step {record['median_step_s'] * 1e3:.1f} ms, "
          f"{microbatches} microbatch(es)", flush=True)
    write_record(args.out_dir, record)
    return 0


# ---- Compare -------------------------------------------------------------------------------------

def load_runs(out_dir: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"# {path}: unreadable ({e})", file=sys.stderr)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """The runs in table order (per config: phi_jax concat, phi_jax first_fit, torch), each with
    tokens_per_s, mfu (FLOPs and peak from the config's JAX run: the same machine), ratio (torch's
    step time over this one's) and, on phi_jax concat, loss_check against torch; a run that failed
    keeps its "error"."""
    order = {("jax", "concat"): 0, ("jax", "first_fit"): 1, ("torch", "concat"): 2}
    rows = []
    for name in dict.fromkeys(r["config"] for r in records):
        runs = sorted((dict(r) for r in records if r["config"] == name),
                      key=lambda r: order.get((r["framework"], r["packing"]), 9))
        jax_runs = [r for r in runs if r["framework"] == "jax" and "error" not in r]
        torch_run = next((r for r in runs if r["framework"] == "torch" and "error" not in r), None)
        flops = next((r["flops_per_token"] for r in jax_runs if r.get("flops_per_token")), None)
        peak = next((r["peak_tflops"] for r in jax_runs if r.get("peak_tflops")), None)
        for r in runs:
            if "error" in r:
                rows.append(r)
                continue
            r["tokens_per_s"] = r["tokens_per_step"] / r["median_step_s"]
            r["mfu"] = r["tokens_per_s"] * flops / (peak * 1e12) if flops and peak else None
            r["ratio"] = (torch_run["median_step_s"] / r["median_step_s"]
                          if torch_run and r["framework"] != "torch" else None)
            if r["framework"] == "jax" and r["packing"] == "concat" and torch_run:
                r["loss_check"] = check_losses(r, torch_run)
            r["finite"] = bool(np.isfinite(r["losses"]).all() and np.isfinite(r["grad_norms"]).all())
            rows.append(r)
    return rows


def compare(out_dir: str, print_json: bool = False) -> int:
    """Prints the table from the runs' JSON files; 1 if a run failed, a loss is not finite or the
    losses disagree with torch's."""
    rows = summarize(load_runs(out_dir))
    print("| config | framework | packing | attention | batch x seq | dtype | compile / load s | step ms | "
          "tokens/s | MFU | torch time / this | max abs loss diff vs torch | losses (first, last) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    status = 0 if rows else 1
    for r in rows:
        label = "phi_jax" if r["framework"] == "jax" else "transformers + torch"
        cells = [r["config"], label, r["packing"], r.get("attention", ""), f"{r['batch']} x {r['seq']}", r["dtype"]]
        if "error" in r:
            print("| " + " | ".join(cells + [f"FAILED: {r['error'][:200]}"] + [""] * 6) + " |")
            status = 1
            continue
        status |= not r["finite"]
        if "loss_check" in r:
            status |= not r["loss_check"]["ok"]
            loss_cell = r["loss_check"]["text"]
        elif r["framework"] == "jax":
            loss_cell = ("no torch row" + (" (segments)" if r["packing"] == "first_fit" else "") + "; "
                         + ("finite" if r["finite"] else "NaN/inf FAILED"))
        else:
            loss_cell = "" if r["finite"] else "NaN/inf FAILED"
        compile_s = r.get("compile_s", r.get("load_s"))
        extra = f" ({r['microbatches']} microbatches)" if r.get("microbatches", 1) > 1 else ""
        print("| " + " | ".join(cells + [
            f"{compile_s:.0f}" if compile_s is not None else "", f"{r['median_step_s'] * 1e3:.1f}{extra}",
            f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "",
            f"{r['ratio']:.2f}x" if r["ratio"] else "", loss_cell,
            f"{r['losses'][0]:.4f}, {r['losses'][-1]:.4f}"]) + " |", flush=True)
    if print_json:
        for r in rows:
            if "error" not in r:
                row = {k: r.get(k) for k in ("config", "framework", "packing", "attention", "params", "batch", "seq",
                                             "dtype", "tokens_per_s", "mfu", "ratio", "losses", "grad_norms",
                                             "median_step_s", "compile_s")}
                if r.get("loss_check"):
                    row["loss_check"] = {k: v for k, v in r["loss_check"].items() if k != "text"}
                print(json.dumps(row))
    return status


def check_losses(ours: dict, torch_run: dict) -> dict:
    """Every step's loss within LOSS_TOLERANCE of torch's, the first gradient norm within
    GRAD_NORM_TOLERANCE (relative); NaN fails. 'fell' says whether the loss moved by more than
    the tolerance, i.e. whether the steps after the first tested the updates at all."""
    dtype = ours["dtype"]
    a, b = np.asarray(ours["losses"], np.float64), np.asarray(torch_run["losses"], np.float64)
    steps = min(len(a), len(b))
    diffs = np.abs(a[:steps] - b[:steps])
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all()) and steps > 0
    max_diff = float(diffs.max()) if finite else float("nan")
    g_ours, g_torch = ours["grad_norms"][0], torch_run["grad_norms"][0]
    grad_rel = abs(g_ours - g_torch) / max(abs(g_torch), 1e-12)
    same_batch = ours.get("batch_digest") == torch_run.get("batch_digest")
    fell = finite and float(b[0] - b[steps - 1]) > 2 * LOSS_TOLERANCE[dtype]
    ok = (finite and same_batch and max_diff <= LOSS_TOLERANCE[dtype]
          and np.isfinite(grad_rel) and grad_rel <= GRAD_NORM_TOLERANCE[dtype])
    text = (f"{max_diff:.4f} over {steps} steps (tol {LOSS_TOLERANCE[dtype]:g}); grad norm {grad_rel:.1e} rel; "
            + ("PASS" if ok else "FAILED") + ("" if same_batch else " (different batches)")
            + ("" if fell or not finite else f"; loss fell only {b[0] - b[steps - 1]:.3f}: later steps untested"))
    return {"ok": bool(ok), "max_loss_diff": max_diff, "steps": steps, "grad_norm_rel_diff": grad_rel,
            "loss_fell": bool(fell), "text": text}


# ---- Orchestration -------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--configs", nargs="+", help="configs of the preset to run (default: all)")
    parser.add_argument("--framework", choices=["jax", "torch"],
                        help="run one framework here (else both, in subprocesses)")
    parser.add_argument("--compare", metavar="OUT_DIR", help="only print the table from OUT_DIR's JSON files")
    parser.add_argument("--out_dir", help="where each run writes its JSON (with --framework)")
    parser.add_argument("--hf_dir", help="weights for torch: --framework jax writes them here, torch reads them")
    parser.add_argument("--packings", help="--framework jax: comma-separated, from concat, first_fit")
    parser.add_argument("--layers", type=int, help="override the number of layers (e.g. to fit memory)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (their losses are compared too)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps")
    parser.add_argument("--remat", choices=["none", "full", "dots"], help="phi_jax rematerialization (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per run")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="torch's device (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the preset's)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.seq = args.seq or preset["seq"]
    args.dtype = args.dtype or preset["dtype"]
    args.packings = args.packings or preset["packings"]
    names = args.configs or list(preset["configs"])

    if args.compare:
        return compare(args.compare, args.json)
    if args.framework:
        if not args.out_dir or (args.framework == "torch" and not args.hf_dir):
            parser.error("--framework needs --out_dir (and torch needs --hf_dir)")
        if len(names) != 1:
            parser.error("--framework runs one config: give --configs NAME")
        if args.framework == "torch":
            os.environ["JAX_PLATFORMS"] = "cpu"  # nothing here may take the GPU from torch
            return run_torch(args, names[0])
        return run_jax(args, names[0])

    status = 0
    common = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
              "--warmup", str(args.warmup), "--iters", str(args.iters), "--seed", str(args.seed)]
    common += ["--layers", str(args.layers)] if args.layers else []
    common += ["--device", args.device] if args.device else []
    common += ["--remat", args.remat] if args.remat else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            hf_dir = os.path.join(tmp, f"hf_{name}")
            for framework in ("jax", "torch"):
                extra = ["--packings", args.packings] if framework == "jax" else []
                cmd = [sys.executable, os.path.abspath(__file__), *common, "--configs", name, "--framework", framework,
                       "--out_dir", tmp, "--hf_dir", hf_dir, *extra]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode:
                    print(f"# {name} {framework} exited {result.returncode}:\n{result.stdout[-2000:]}"
                          f"{result.stderr[-3000:]}", file=sys.stderr)
                    status = 1
        status |= compare(tmp, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
