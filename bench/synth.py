"""phi-jax data synth's generators: requests/s, generated tokens/s and the client's own CPU per request.

Against `phi-jax serve` (a subprocess on 127.0.0.1, --max_batch_size 16) on the smallest random phi, at
concurrency 1 and 16: OpenAIGenerator.run sends --requests completions of --max_tokens tokens each
(ignore_eos is not an OpenAI field, so a request may stop early: tokens/s counts what came back), and
every result is written through writer.OutputDir as a real run writes it. "client ms/request" is
this process's CPU time (time.process_time: the transport, asyncio, JSON, the writer) per request,
for each of the generator's transports (`--client openai`, the official package, and `--client
aiohttp`): the server runs in its own process, so this is what the client costs a fleet, whatever the
server's speed; "client ms/extra request" is the difference between a run of 2N and one of N
requests, per request: the cost without the run's fixed set-up. The target is under 2 ms, so that a
vLLM fleet, not the client, bounds a run. The baseline, in the same minutes against the same server,
is the bare `openai` package (AsyncOpenAI's typed `completions.create`, as a user would write it)
sending the same requests at the same concurrency, nothing written.

--in_process also times CheckpointGenerator (phi_jax.generate.complete in this process) at --config
(tiny here; phi_1_5 on a GPU, random weights) for --requests prompts in batches of --batch_size.

    .venv/bin/python bench/synth.py                                          # CPU
    python bench/synth.py --in_process --config phi_1_5 --requests 64 --batch_size 32 --max_tokens 256  # GPU
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax.config import tiny  # noqa: E402
from phi_jax.serving.process import serve_process  # noqa: E402
from phi_jax.synth.generators import CheckpointGenerator, OpenAIGenerator, Request, Sampling  # noqa: E402
from phi_jax.synth.writer import OutputDir  # noqa: E402

# The server's model: as small as a phi goes, so that the server, sharing this machine's cores, is as fast
# as it can be; the client's cost per request does not depend on it.
SERVED = tiny(vocab_size=300, hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16, rotary_dim=8,
              max_position_embeddings=256)
PROMPT = ("Write a section of a textbook about rivers, for high school students. Explain the ideas clearly, "
          "use concrete everyday examples, and reason through each example step by step.")


def make_model(path, config_name: str):
    """(config, random params, a 300-id BPE); "served" is also saved at `path` for phi-jax serve."""
    import jax

    from phi_jax import checkpoint, config
    from phi_jax.data.tokenizer import train_byte_level_bpe
    from phi_jax.model import init_params

    cfg = SERVED if config_name == "served" else config.PRESETS[config_name]()
    params = init_params(cfg, jax.random.key(0))
    if config_name == "served":
        checkpoint.save_params(path, cfg, params)
    tokenizer = train_byte_level_bpe([PROMPT] * 50, 300, path / "tokenizer.json")
    return cfg, params, tokenizer


def timed_run(generator, requests) -> dict:
    """Runs the requests, writing each result as a synth run does; wall and client CPU seconds, tokens."""
    tokens = failed = 0
    with tempfile.TemporaryDirectory() as out, OutputDir(out) as output:
        def on_done(request, completion, error):
            nonlocal tokens, failed
            if completion is None:
                failed += 1
                return
            tokens += completion.completion_tokens
            output.append("train", {"id": request.id, "text": completion.text, "usage": {
                "completion_tokens": completion.completion_tokens}})

        wall, cpu = time.perf_counter(), time.process_time()
        generator.run(requests, on_done)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(requests)
    return {"requests": n, "failed": failed, "seconds": round(wall, 3), "requests_per_s": round(n / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "client_cpu_s": round(cpu, 4),
            "client_ms_per_request": round(1000 * cpu / n, 3)}


def openai_client_ms_per_request(base_url: str, sampling: Sampling, concurrency: int, n: int) -> float:
    """This process's CPU ms per request for the bare `openai` AsyncOpenAI client (the baseline)."""
    import asyncio

    import openai

    async def send_all():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
        slots = asyncio.Semaphore(concurrency)

        async def one():
            async with slots:
                await client.completions.create(model="phi-jax", prompt=PROMPT, max_tokens=sampling.max_tokens,
                                                temperature=sampling.temperature, top_p=sampling.top_p)
        async with client:
            await asyncio.gather(*(one() for _ in range(n)))

    cpu = time.process_time()
    asyncio.run(send_all())
    return 1000 * (time.process_time() - cpu) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--in_process", action="store_true", help="also time CheckpointGenerator at --config")
    parser.add_argument("--config", default="tiny", help="with --in_process: tiny, phi_1, phi_1_5")
    parser.add_argument("--batch_size", type=int, default=16, help="with --in_process")
    parser.add_argument("--no_server", action="store_true", help="skip the phi-jax serve runs")
    parser.add_argument("--client", nargs="+", choices=("openai", "aiohttp"), default=["openai", "aiohttp"],
                        help="OpenAIGenerator's transports to time")
    args = parser.parse_args()
    sampling = Sampling(max_tokens=args.max_tokens, temperature=0.8)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / "model"
        make_model(model_dir, "served")
        if args.in_process:
            cfg, params, tokenizer = make_model(pathlib.Path(tmp) / "in_process", args.config)
        results = []
        if not args.no_server:
            with serve_process(model_dir, args=("--max_batch_size", "16")) as server:
                for concurrency in args.concurrency:
                    openai_ms = openai_client_ms_per_request(server.base_url, sampling, concurrency, 2 * args.requests)
                    for client in args.client:
                        gen = OpenAIGenerator([server.base_url], "phi-jax", sampling=sampling,
                                              concurrency=concurrency, client=client)
                        timed_run(gen, [Request(f"warm-{i}", PROMPT) for i in range(concurrency)])  # compiles
                        runs = [timed_run(gen, [Request(f"{client}-{concurrency}-{n}-{i}", PROMPT) for i in range(n)])
                                for n in (args.requests, 2 * args.requests)]
                        # One more request's cost, without the once-a-run set-up (clients, TLS context: ~40 ms)
                        marginal = (runs[1]["client_cpu_s"] - runs[0]["client_cpu_s"]) / args.requests
                        ms = runs[1]["client_ms_per_request"]
                        results.append({"generator": f"OpenAIGenerator (--client {client}) -> phi-jax serve (tiny)",
                                        "concurrency": concurrency, **runs[1],
                                        "client_ms_per_extra_request": round(1000 * marginal, 3),
                                        "bare_openai_package_ms_per_request": round(openai_ms, 3),
                                        "vs_bare_openai_package": round(ms / openai_ms, 2),
                                        "target_ms": 2.0, "pass": ms < 2.0})
                        print(json.dumps(results[-1]), flush=True)
        if args.in_process:
            gen = CheckpointGenerator(cfg, params, tokenizer, args.config, sampling=sampling,
                                      batch_size=args.batch_size)
            timed_run(gen, [Request("warm", PROMPT)])  # compiles
            requests = [Request(f"p-{i}", PROMPT) for i in range(args.requests)]
            results.append({"generator": f"in-process checkpoint ({args.config})", "batch_size": args.batch_size,
                            **timed_run(gen, requests)})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
