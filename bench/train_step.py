"""Training-step throughput and MFU: phi_jax against transformers + torch, in one run.

Both frameworks train the same config from the same weights (phi_jax params written with
phi_jax.hf.save, read by transformers.PhiForCausalLM.from_pretrained) on the same token batch: mean
next-token cross entropy, backward, global-norm clipping at 1.0 and an AdamW update. Their first
losses must agree before anything is timed. Each is warmed up, then timed for --iters steps; the
table gives tokens/s at the median step, MFU, and the ratio phi_jax / torch (> 1: phi_jax faster).

    python bench/train_step.py                       # CPU: tiny and small, float32 (make bench-train)
    python bench/train_step.py --preset gpu          # one H100/H200: phi-1.5 width, bf16
    python bench/train_step.py --preset gpu --layers 12 --batch 4
    python bench/train_step.py --configs tiny --dtype bfloat16 --batch 1 --seq 32 --iters 1   # bf16 path, CPU

GPU preset: phi_jax computes in bfloat16 with float32 params and Adam state, attention "auto"
(our Pallas or cuDNN kernels); torch runs sdpa attention under bf16 autocast with float32 params and
fused AdamW. MFU counts model FLOPs only (phi_jax.metrics.train_flops_per_token: 6N + 12 L D T per
token, no rematerialization) against the chip's dense bf16 peak; on a CPU, against the float32
matmul throughput measured at start (so CPU MFU is a fraction of what this CPU's matmul reaches).
Only jax, torch and transformers are needed: it runs on the GPU machines' stack.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax import hf  # noqa: E402
from phi_jax.config import phi_1_5, tiny  # noqa: E402
from phi_jax.metrics import peak_tflops_per_device, train_flops_per_token  # noqa: E402
from phi_jax.model import init_params  # noqa: E402
from phi_jax.optimizer import OptimizerConfig  # noqa: E402
from phi_jax.sharding import global_batch, make_mesh, mesh_context  # noqa: E402
from phi_jax.train_step import init_state, jit_train_step  # noqa: E402

OPTIMIZER = OptimizerConfig(learning_rate=2e-4, b1=0.9, b2=0.98, eps=1e-7, weight_decay=0.1, max_grad_norm=1.0)
PRESETS = {
    "cpu": {"configs": {"tiny": lambda layers: tiny(vocab_size=51200, num_layers=layers or 2),
                        "small": lambda layers: tiny(hidden_size=512, intermediate_size=2048, num_layers=layers or 4,
                                                     num_heads=8, head_dim=64, rotary_dim=32)},
            "batch": 4, "seq": 256, "dtype": "float32"},
    "gpu": {"configs": {"phi-1.5": lambda layers: phi_1_5(num_layers=layers or 24, scan_layers=True)},
            "batch": 8, "seq": 2048, "dtype": "bfloat16"},
}


def measured_cpu_peak_tflops(size: int = 2048, reps: int = 10) -> float:
    matmul = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((size, size), jnp.float32)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = matmul(a, a)
    out.block_until_ready()
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e12


def median_step_seconds(step, iters: int, warmup: int = 2):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_trainer(config, tokens):
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    batch_size, seq = tokens.shape[0], tokens.shape[1] - 1
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": np.ones((batch_size, seq), np.float32),
             "segment_ids": np.ones((batch_size, seq), np.int32),
             "positions": np.tile(np.arange(seq, dtype=np.int32), (batch_size, 1))}
    with mesh_context(mesh):
        state = init_state(config, OPTIMIZER, mesh, seed=0, params=init_params(config, jax.random.key(0)))
        train_step = jit_train_step(config, OPTIMIZER, mesh)
        device_batch = global_batch(mesh, batch, batch_size)
    holder = {"state": state, "losses": []}

    def step():
        with mesh_context(mesh):
            holder["state"], metrics = train_step(holder["state"], device_batch)
        holder["losses"].append(float(metrics["loss"]))  # waits for the step
    return step, holder["losses"]


def torch_trainer(hf_dir, tokens, device: str, bf16: bool):
    model = transformers.PhiForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa",
                                                        dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER.learning_rate, betas=(OPTIMIZER.b1, OPTIMIZER.b2),
                                  eps=OPTIMIZER.eps, weight_decay=OPTIMIZER.weight_decay, fused=device == "cuda")
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())  # waits for the step
    return step, losses


def run(name, config, batch: int, seq: int, iters: int, device: str, peak_tflops: float):
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    with tempfile.TemporaryDirectory() as hf_dir:
        hf.save(config, init_params(config, jax.random.key(0)), f"{hf_dir}/model", overwrite=True)
        torch_step, torch_losses = torch_trainer(f"{hf_dir}/model", tokens, device, bf16=config.dtype == "bfloat16")
    jax_step, jax_losses = jax_trainer(config, tokens)
    jax_step()
    torch_step()
    tolerance = 2e-2 if config.dtype == "bfloat16" else 1e-4
    if abs(jax_losses[0] - torch_losses[0]) > tolerance * abs(torch_losses[0]):
        raise SystemExit(f"{name}: first losses differ: phi_jax {jax_losses[0]:.6f}, torch {torch_losses[0]:.6f}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch_seconds = median_step_seconds(lambda: (torch_step(), sync()), iters)
    jax_seconds = median_step_seconds(jax_step, iters)
    flops_per_step = train_flops_per_token(config, seq) * batch * seq
    row = {"config": name, "params": config.num_params, "batch": batch, "seq": seq, "dtype": config.dtype,
           "jax_tokens_per_sec": batch * seq / jax_seconds, "torch_tokens_per_sec": batch * seq / torch_seconds,
           "jax_mfu": flops_per_step / jax_seconds / (peak_tflops * 1e12),
           "torch_mfu": flops_per_step / torch_seconds / (peak_tflops * 1e12),
           "ratio": torch_seconds / jax_seconds, "first_loss": jax_losses[0]}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--configs", nargs="+", help="configs of the preset to run (default: all)")
    parser.add_argument("--layers", type=int, help="override the number of layers (e.g. to fit memory)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per config")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="torch's device (default: cuda for the gpu preset)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the preset's)")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
        peak, peak_source = measured_cpu_peak_tflops(), "measured float32 matmul"
    else:
        peak, peak_source = peak_tflops_per_device(), f"{jax.devices()[0].device_kind} bf16 peak"
        if peak is None:
            raise SystemExit(f"no peak FLOP/s known for {jax.devices()[0].device_kind}; add it to phi_jax.metrics")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; MFU against {peak:.2f} TFLOP/s ({peak_source})")
    print("| config | params | batch x seq | dtype | phi_jax tok/s | phi_jax MFU | torch tok/s | torch MFU | phi_jax / torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs or preset["configs"]:
        config = preset["configs"][name](args.layers).replace(dtype=args.dtype or preset["dtype"])
        row = run(name, config, args.batch or preset["batch"], args.seq or preset["seq"], args.iters, device, peak)
        print(f"| {name} | {row['params'] / 1e6:.1f}M | {row['batch']} x {row['seq']} | {row['dtype']} | "
              f"{row['jax_tokens_per_sec']:,.0f} | {row['jax_mfu']:.1%} | {row['torch_tokens_per_sec']:,.0f} | "
              f"{row['torch_mfu']:.1%} | {row['ratio']:.2f}x |", flush=True)
        if args.json:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
