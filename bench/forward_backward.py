"""Forward+backward training-step throughput of phi_jax against transformers + torch, on CPU.

For each config, one set of random weights is built (phi_jax params, written with phi_jax.hf.save
and read back by transformers.PhiForCausalLM.from_pretrained), and both frameworks compute the same
thing on the same token batch: the mean next-token cross entropy and its gradients w.r.t. every
parameter. JAX runs one jitted jax.value_and_grad; torch runs model.train() (all dropout is 0) with
loss.backward(), grads zeroed each iteration, torch.set_num_threads(number of cores). Before timing,
the two losses (and global gradient norms) must agree, or the run fails. Each framework is warmed
up, then timed for --iters steps; the table gives tokens/s at the median step time, the ratio
JAX/torch of those (> 1 means phi_jax is faster), and the same ratio at each framework's fastest
step ("best step"). Both run in one process, their steps taking turns, so other processes on the
machine hit both, but not alike: a step whose threads lose a core can take several times its
quiet time, more often torch's (OpenMP waits at every barrier for the descheduled thread) than
XLA's. The load average is printed before and after; on a busy machine read both ratios together
with the min-max spread, and compare runs made at similar load.

    make bench                    # runs .venv/bin/python bench/forward_backward.py: both configs, ~2-3 min
    .venv/bin/python bench/forward_backward.py --configs tiny --batch 4 --seq 512 --iters 9 --json

Optimizer updates are not included: this measures the model, not the optimizer.
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
import optax
import torch
import transformers

# Run as a script (`python bench/forward_backward.py`), sys.path holds bench/, not the checkout that
# the numbers are meant to describe; put that checkout first, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax import hf  # noqa: E402
from phi_jax.config import PhiConfig, tiny  # noqa: E402
from phi_jax.model import Phi, init_params  # noqa: E402

# tiny is dominated by the 51200-wide embedding and lm_head; small puts most of its time in the
# transformer layers while keeping one step to seconds on 2 cores.
CONFIGS = {
    "tiny": lambda: tiny(vocab_size=51200),
    "small": lambda: tiny(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, head_dim=64,
                          rotary_dim=32),
}
LOSS_RTOL = 1e-4
# Gradients sum over every token through every layer, so float32 rounding differs more than the loss.
GRAD_NORM_RTOL = 1e-3


def random_params(config: PhiConfig, seed: int):
    """init_params, with biases and LayerNorm params made random too.

    init_params leaves biases at 0 and LayerNorm at (1, 0); a loss check on those would not notice a
    bias loaded into the wrong place or a LayerNorm scale applied to the wrong tensor.
    """
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    perturbed = [leaf + 0.02 * jax.random.normal(key, leaf.shape, leaf.dtype) if leaf.ndim == 1 else leaf
                 for leaf, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, perturbed)


def next_token_loss(config: PhiConfig, params, tokens_BxT):
    logits_BxTxV = Phi(config).apply({"params": params}, tokens_BxT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()


def time_interleaved(steps: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each step, `iters` times each, after `warmup` untimed rounds.

    The steps take turns (a, b, a, b, ...) rather than running back to back, so that whatever else
    the machine is doing meanwhile slows both alike and the ratio stays meaningful.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def global_norm(arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays)))


def check_close(what: str, jax_value: float, torch_value: float, rtol: float):
    rel = abs(jax_value - torch_value) / max(abs(torch_value), 1e-30)
    if not rel <= rtol:  # `not <=` so that NaN fails too
        sys.exit(f"FAIL {what}: JAX {jax_value!r} vs torch {torch_value!r}, relative difference {rel:.3g} > {rtol:g}; "
                 "the two models do not compute the same thing, so their timings are not comparable")


def bench_config(name: str, config: PhiConfig, batch: int, seq: int, iters: int, warmup: int, seed: int) -> dict:
    params = random_params(config, seed)
    tokens_BxT = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq), dtype=np.int32)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "checkpoint")
        hf.save(config, params, checkpoint)
        torch_model = transformers.PhiForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    torch_model.train()
    dropouts = {m.p for m in torch_model.modules() if isinstance(m, torch.nn.Dropout)}
    dropouts |= {torch_model.config.attention_dropout}
    if dropouts - {0.0}:
        sys.exit(f"torch model has dropout {sorted(dropouts)}; the benchmark needs 0 so both compute the same loss")

    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, t: next_token_loss(config, p, t)))
    jax_tokens = jnp.asarray(tokens_BxT)
    torch_tokens = torch.from_numpy(tokens_BxT.astype(np.int64))

    def jax_step():
        return jax.block_until_ready(loss_and_grads(params, jax_tokens))

    def torch_step():
        torch_model.zero_grad(set_to_none=True)
        # transformers' own causal-LM loss: mean cross entropy of token t+1 given tokens <= t.
        loss = torch_model(input_ids=torch_tokens, labels=torch_tokens).loss
        loss.backward()
        return loss

    jax_loss, jax_grads = jax_step()
    torch_loss = torch_step()
    check_close(f"{name} loss", float(jax_loss), float(torch_loss.detach()), LOSS_RTOL)
    check_close(f"{name} gradient global norm", global_norm(jax.tree.leaves(jax_grads)),
                global_norm(p.grad.numpy() for p in torch_model.parameters()), GRAD_NORM_RTOL)
    del jax_grads

    seconds = time_interleaved({"jax": jax_step, "torch": torch_step}, iters, warmup)
    jax_seconds, torch_seconds = seconds["jax"], seconds["torch"]
    tokens = batch * seq
    jax_tokens_per_s = tokens / statistics.median(jax_seconds)
    torch_tokens_per_s = tokens / statistics.median(torch_seconds)
    # The fastest step is the one least disturbed by other processes: on a shared machine its ratio
    # is the better guide to the frameworks themselves, the median's to what a user would see.
    best_ratio = min(torch_seconds) / min(jax_seconds)
    return {
        "config": name, "num_params": config.num_params, "batch": batch, "seq": seq, "iters": iters,
        "loss_jax": float(jax_loss), "loss_torch": float(torch_loss.detach()),
        "jax_seconds": jax_seconds, "torch_seconds": torch_seconds,
        "jax_tokens_per_s": jax_tokens_per_s, "torch_tokens_per_s": torch_tokens_per_s,
        "ratio_jax_over_torch": jax_tokens_per_s / torch_tokens_per_s, "best_step_ratio_jax_over_torch": best_ratio,
        "torch_attn_implementation": torch_model.config._attn_implementation,
    }


def describe_seconds(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.3f} ({min(seconds):.3f}-{max(seconds):.3f})"


def print_table(results: list[dict]):
    header = (f"{'config':<8} {'params':>7} {'batch x seq':>12} {'JAX tok/s':>10} {'torch tok/s':>12} "
              f"{'JAX/torch':>10} {'(best step)':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['config']:<8} {r['num_params'] / 1e6:>6.1f}M {r['batch']:>5} x {r['seq']:<4}"
              f" {r['jax_tokens_per_s']:>10.0f} {r['torch_tokens_per_s']:>12.0f} {r['ratio_jax_over_torch']:>9.2f}x"
              f" {r['best_step_ratio_jax_over_torch']:>11.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {sorted(CONFIGS)} (default: all)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per framework; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per framework after the check step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    if min(args.batch, args.seq - 1, args.iters) < 1:
        parser.error("--batch and --iters must be >= 1, --seq >= 2")
    for name in names:
        max_length = CONFIGS[name]().max_position_embeddings
        if args.seq > max_length:
            parser.error(f"--seq {args.seq} exceeds max_position_embeddings={max_length} of config {name}")

    transformers.utils.logging.disable_progress_bar()
    num_cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(num_cores)
    # Other processes on the machine slow both frameworks (the steps take turns) but widen the spread;
    # the load average says how much to trust the absolute numbers.
    load_before = os.getloadavg()[0]
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {num_cores} cores, "
          f"load average {load_before:.1f}")
    results = []
    for name in names:
        result = bench_config(name, CONFIGS[name](), args.batch, args.seq, args.iters, args.warmup, args.seed)
        results.append(result)
        print(f"{name}: loss JAX {result['loss_jax']:.6f} torch {result['loss_torch']:.6f}; step seconds, "
              f"median (min-max): JAX {describe_seconds(result['jax_seconds'])}, "
              f"torch {describe_seconds(result['torch_seconds'])}; "
              f"torch attention {result['torch_attn_implementation']}", flush=True)
    load_after = os.getloadavg()[0]
    print(f"load average {load_after:.1f}\n")
    print_table(results)
    if args.json:
        print(json.dumps({"benchmark": "forward_backward", "jax": jax.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "cores": num_cores,
                          "load_average": [load_before, load_after], "results": results}))


if __name__ == "__main__":
    main()
