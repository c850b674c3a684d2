"""Decoding tokens/s of phi_jax.generate against transformers' generate, on the same exported model.

One set of random weights is built for each config, written with phi_jax.hf.save and read back by
transformers.PhiForCausalLM.from_pretrained. Both decode greedily from the same random prompts
(batch 1 and batch 16 by default, no padding) for exactly --new_tokens tokens (no stop token), KV
cache on both sides: JAX runs phi_jax.generate (prefill + a jitted lax.while_loop), torch runs
model.generate(do_sample=False, min_new_tokens=max_new_tokens=N) under torch.no_grad with
torch.set_num_threads(number of cores). Before timing, the two must produce the same greedy tokens
at batch 1 (float32), or the run fails. Calls take turns (JAX, torch, JAX, ...) after a warm-up call
each (JAX's compiles); tokens/s = batch x new tokens / seconds of a whole call, prefill included,
at the median call; "best" is the ratio of each framework's fastest call, the one least disturbed
by other processes on a shared machine.

    .venv/bin/python bench/decode.py                                   # CPU: tiny_cpu, tiny, small; batch 1 and 16
    python bench/decode.py --configs phi_1_5 --dtype bfloat16 --prompt 128 --new_tokens 256   # a GPU
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# JAX grabs 75% of a GPU's memory by default; leave torch its share.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax import hf  # noqa: E402
from phi_jax.config import phi_1_5, tiny  # noqa: E402
from phi_jax.data.corpus import VOCAB_SIZE as DEFAULT_CORPUS_VOCAB_SIZE  # noqa: E402
from phi_jax.generate import generate  # noqa: E402
from phi_jax.model import init_params  # noqa: E402

CONFIGS = {
    # The model `make demo` trains and exports (experiments/tiny_cpu.gin): tiny on the built-in
    # corpus' BPE.
    "tiny_cpu": lambda: tiny(vocab_size=DEFAULT_CORPUS_VOCAB_SIZE),
    # The same layers with phi's vocabulary: the lm_head is 25 times larger and dominates a step.
    "tiny": lambda: tiny(vocab_size=51200),
    "small": lambda: tiny(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, head_dim=64,
                          rotary_dim=32, max_position_embeddings=1024),
    "phi_1_5": phi_1_5,
}
CHECK_TOKENS = 16


def peaked_params(config, seed: int):
    """Random params with every leaf drawn (weights and biases normal(0.08), LayerNorm scales
    1 + normal(0.1)): logits far from ties, so that greedy tokens are the same in both frameworks."""
    params = init_params(config, jax.random.key(seed))
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(paths))
    leaves = []
    for (path, leaf), key in zip(paths, keys):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        is_scale = getattr(path[-1], "key", None) == "scale"
        leaves.append(1.0 + 0.1 * noise if is_scale else 0.08 * noise)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def bench(name: str, batches, prompt_len: int, new_tokens: int, iters: int, dtype: str, seed: int) -> list[dict]:
    config = CONFIGS[name]()
    params = peaked_params(config, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(config, params, os.path.join(tmp, "hf"))
        torch_model = transformers.PhiForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32)
    torch_model = torch_model.eval().to(device)
    rng = np.random.default_rng(seed)

    def torch_generate(prompt):
        with torch.no_grad():
            out = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long, device=device),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.cpu().numpy()

    # float32 is float32 on both sides: on a GPU, JAX's default float32 matmuls are TF32, torch's are not.
    timed_precision = "highest" if dtype == "float32" else "default"
    prompt = rng.integers(0, config.vocab_size, (1, prompt_len), dtype=np.int32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(generate(config, params, prompt, CHECK_TOKENS))[0, prompt_len:]
    with torch.no_grad():
        theirs = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long, device=device),
                                      max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS, do_sample=False,
                                      pad_token_id=0)[0, prompt_len:].cpu().numpy()
    if not np.array_equal(ours, theirs):
        sys.exit(f"FAIL {name}: greedy tokens differ (JAX {ours.tolist()} vs transformers {theirs.tolist()}); "
                 "the two do not compute the same thing, so their timings are not comparable")

    if dtype != "float32":
        config = config.replace(dtype=dtype)
        torch_model = torch_model.to(getattr(torch, dtype))
    results = []
    for batch in batches:
        prompt = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32))
        def jax_generate():
            with jax.default_matmul_precision(timed_precision):
                return jax.block_until_ready(generate(config, params, prompt, new_tokens))

        calls = {"jax": jax_generate,
                 "torch": lambda: torch_generate(np.asarray(prompt))}
        seconds = {k: [] for k in calls}
        for call in calls.values():  # warm-up: JAX compiles this shape
            call()
        for _ in range(iters):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[key].append(time.perf_counter() - start)
        tokens = batch * new_tokens
        jax_tps, torch_tps = tokens / statistics.median(seconds["jax"]), tokens / statistics.median(seconds["torch"])
        results.append({"config": name, "num_params": config.num_params, "dtype": dtype, "batch": batch,
                        "prompt": prompt_len, "new_tokens": new_tokens, "jax_seconds": seconds["jax"],
                        "torch_seconds": seconds["torch"], "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
                        "ratio": jax_tps / torch_tps, "best_ratio": min(seconds["torch"]) / min(seconds["jax"]),
                        "jax_device": str(jax.devices()[0].device_kind), "torch_device": device})
        print_row(results[-1])
    return results


def print_row(r):
    """Flushed as measured: a time limit that stops the run keeps every row already timed."""
    print(f"| {r['config']} | {r['num_params'] / 1e6:.1f}M | {r['batch']} | {r['jax_tokens_per_s']:,.0f} | "
          f"{r['torch_tokens_per_s']:,.0f} | {r['ratio']:.2f}x | {r['best_ratio']:.2f}x |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny_cpu,tiny,small", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per framework and batch (median)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the timed runs (the token check always runs in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if not names or set(names) - set(CONFIGS):
        parser.error(f"--configs: choose from {sorted(CONFIGS)}")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load_before = os.getloadavg()[0]
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy")
    print("| config | params | batch | JAX tokens/s | transformers tokens/s | JAX / transformers | best call |")
    print("|---|---|---|---|---|---|---|", flush=True)
    results = []
    for name in names:
        results += bench(name, [int(b) for b in args.batches.split(",")], args.prompt, args.new_tokens, args.iters,
                         args.dtype, args.seed)
    print(f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
