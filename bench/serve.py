"""`phi-jax serve` under concurrent clients, against `phi-jax generate` of the same requests in one batch.

The server (a subprocess, --max_batch_size 16) gets R requests of --max_tokens new tokens each (no
stop: `ignore_eos`) from C concurrent clients, C = 1, 4, 16; each level is timed after a warm-up round.
The clients are coroutines in this process, so on the same cores as the server: by default they send
with aiohttp (what vLLM's own serving benchmark uses), which costs about 0.3 ms of CPU a request;
`--client openai` sends with the official package's AsyncOpenAI, about 2 ms a request (bench/synth.py
measures both), which the server's decode calls then lose. Aggregate tokens/s = all completion tokens /
the level's wall time; latency is per request, p50 and p95. The baseline is
`phi_jax.generate.complete` (what `phi-jax generate` runs) on 16 of the prompts in one batch, in this
process while the server idles. On a shared machine the load drifts, so the 16-client level and the
baseline are measured --rounds times, taking turns, and the ratio is the median of the rounds' ratios.

Targets (issue 14, on 2 CPU cores, the demo's model): 16 clients >= 4x the tokens/s of 1 client, and
>= 0.7x the one-batch generate.

    .venv/bin/python bench/serve.py                        # demo_out/run (make demo)
    python bench/serve.py --checkpoint phi15 --max_tokens 128 --dtype bfloat16   # a GPU, phi-1.5
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aiohttp  # noqa: E402
import openai  # noqa: E402
import orjson  # noqa: E402

from phi_jax.checkpoint import load_model  # noqa: E402
from phi_jax.data.tokenizer import resolve_tokenizer  # noqa: E402
from phi_jax.generate import complete  # noqa: E402
from phi_jax.serving.process import serve_process  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "Lesson 3: Fractions.\n", "import os\n", "The cat sat on", "class Stack:\n",
           "for i in range(10):\n", "# Sort a list\n", "Question: What is 2 + 2?\nAnswer:", "A story about a",
           "def read_file(path):\n", "Chapter 1. Energy\n", "x = [1, 2, 3]\n", "The history of", "try:\n",
           "Exercise: write a", "while True:\n"]
LEVELS = (1, 4, 16)


def generate_baseline(checkpoint, tokenizer, max_tokens: int, dtype):
    """A function timing one batched `complete` of the 16 prompts: its tokens/s (compiled here)."""
    config, params = load_model(checkpoint, **({"dtype": dtype} if dtype else {}))
    ids = [tokenizer.encode(p) for p in PROMPTS]
    complete(config, params, ids, max_tokens, batch_size=len(ids))

    def tokens_per_s() -> float:
        start = time.perf_counter()
        complete(config, params, ids, max_tokens, batch_size=len(ids))
        return len(ids) * max_tokens / (time.perf_counter() - start)

    return tokens_per_s


@contextlib.asynccontextmanager
async def sender(kind: str, base_url: str, max_tokens: int):
    """An async prompt -> completion tokens, through aiohttp (one session, a connection per client) or
    the `openai` package's AsyncOpenAI."""
    if kind == "openai":
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
            async def through_openai(prompt):
                response = await client.completions.create(model="phi-jax", prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0, extra_body={"ignore_eos": True})
                return response.usage.completion_tokens
            yield through_openai
        return
    body = {"model": "phi-jax", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async def through_aiohttp(prompt):
            async with session.post(f"{base_url}/completions", data=orjson.dumps({**body, "prompt": prompt}),
                                    headers=headers) as response:
                response.raise_for_status()
                return orjson.loads(await response.read())["usage"]["completion_tokens"]
        yield through_aiohttp


async def run_level(kind: str, base_url: str, max_tokens: int, clients: int, requests: int) -> dict:
    async with sender(kind, base_url, max_tokens) as send:
        async def timed(prompt):
            start = time.perf_counter()
            tokens = await send(prompt)
            return time.perf_counter() - start, tokens

        async def client(prompts):  # one client: a request at a time, the next as soon as one returns
            return [await timed(prompt) for prompt in prompts]

        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
        await asyncio.gather(*(timed(p) for p in prompts[:clients]))  # warm-up: connections open
        start = time.perf_counter()
        results = sum(await asyncio.gather(*(client(prompts[i::clients]) for i in range(clients))), [])
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(count for _, count in results)
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="demo_out/run")
    parser.add_argument("--tokenizer", help="default: the checkpoint's own")
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=160, help="requests per level")
    parser.add_argument("--rounds", type=int, default=5, help="turns of baseline and 16 clients")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--decode_steps", type=int, default=8, help="the server's --decode_steps")
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp",
                        help="what the clients send with (both in this process, on the same cores)")
    args = parser.parse_args()
    tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint)
    baseline = generate_baseline(args.checkpoint, tokenizer, args.max_tokens, args.dtype)

    serve_args = ["--max_batch_size", "16", "--decode_steps", str(args.decode_steps)]
    serve_args += ["--dtype", args.dtype] if args.dtype else []
    if args.tokenizer:
        serve_args += ["--tokenizer", args.tokenizer]
    rows, ratios = [], []
    with serve_process(args.checkpoint, args=serve_args, log_dir=os.environ.get("TMPDIR", "/tmp")) as server:
        def level(clients: int, requests: int) -> dict:
            return asyncio.run(run_level(args.client, server.base_url, args.max_tokens, clients, requests))

        for clients in LEVELS[:-1]:
            rows.append(level(clients, max(args.requests, clients)))
            print(json.dumps(rows[-1]), flush=True)
        for _ in range(args.rounds):
            generate_tps = baseline()
            rows.append(level(LEVELS[-1], args.requests))
            ratios.append(rows[-1]["tokens_per_s"] / generate_tps)
            print(json.dumps({**rows[-1], "generate_tokens_per_s": round(generate_tps, 1),
                              "vs_generate": round(ratios[-1], 3)}), flush=True)
    one_client = rows[0]["tokens_per_s"]
    sixteen = statistics.median(row["tokens_per_s"] for row in rows if row["clients"] == LEVELS[-1])
    scaling, vs_generate = sixteen / one_client, statistics.median(ratios)
    print(json.dumps({"16_vs_1_clients": round(scaling, 2), "target_16_vs_1": 4.0,
                      "16_clients_vs_generate": round(vs_generate, 2), "target_vs_generate": 0.7,
                      "pass": scaling >= 4.0 and vs_generate >= 0.7}))


if __name__ == "__main__":
    main()
