"""`phi-jax serve`: an OpenAI-compatible server for a checkpoint, batching concurrent requests.

    phi-jax serve demo_out/run                                  # http://127.0.0.1:8000/v1
    phi-jax serve phi15_params --tokenizer hf/phi-1_5 --port 8080 --max_batch_size 32 --dtype bfloat16
    phi-jax serve big_params --tensor_parallel 8                # params over 8 local devices

CKPT is a training workdir (its latest step, or --step), an import-hf params checkpoint or a Hugging
Face directory; its own tokenizer is used unless --tokenizer says otherwise. The port is bound at
once; /health answers 503 while the model loads and its decode step compiles, then 200. SIGTERM (or
Ctrl-C) stops taking connections, finishes the requests in flight, and exits 0.
"""

import argparse
import logging
import signal
import threading

log = logging.getLogger(__name__)


def _mesh(data_parallel: int, tensor_parallel: int):
    import jax

    from phi_jax.sharding import make_mesh

    devices = jax.local_devices()
    needed = data_parallel * tensor_parallel
    if needed > len(devices):
        raise ValueError(f"--data_parallel {data_parallel} x --tensor_parallel {tensor_parallel} needs {needed} "
                         f"devices; this machine has {len(devices)} ({devices[0].platform})")
    if needed == 1:
        return None
    return make_mesh({"data": data_parallel, "fsdp": 1, "tensor": tensor_parallel}, devices[:needed])


def build_server(args):
    """Everything but the compile: the model, tokenizer, engine and HTTP app (so errors come first)."""
    from phi_jax.checkpoint import checkpoint_step, load_model
    from phi_jax.conversation import end_of_turn_ids, find_template
    from phi_jax.data.tokenizer import resolve_tokenizer
    from phi_jax.serving.api import Server, create_app
    from phi_jax.serving.engine import Engine

    if args.max_batch_size % args.data_parallel:
        raise ValueError(f"--max_batch_size {args.max_batch_size} must be a multiple of --data_parallel "
                         f"{args.data_parallel} (each replica holds the same number of slots)")
    tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint)
    changes = {"dtype": args.dtype} if args.dtype else {}
    step = None
    if args.step is not None:
        step = checkpoint_step(args.checkpoint, args.step)
    config, params = load_model(args.checkpoint, step, **changes)
    template = find_template(args.chat_template, args.checkpoint, tokenizer)
    engine = Engine(config, params, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    decode_steps=args.decode_steps, mesh=_mesh(args.data_parallel, args.tensor_parallel))
    server = Server(engine, tokenizer, model_name=args.model_name, chat_template=template,
                    chat_stop_ids=end_of_turn_ids(tokenizer, template), api_key=args.api_key)
    log.info("%s: %s parameters on %d x %d devices (data x tensor), %d slots x %d tokens, tokenizer %s, "
             "chat template: %s", args.checkpoint, f"{config.num_params:,}", args.data_parallel,
             args.tensor_parallel, args.max_batch_size, engine.max_seq_len, tokenizer.path,
             "yes" if template else "none")
    return server, create_app(server)


def run(args):
    import contextlib

    import uvicorn

    server, app = build_server(args)

    def warm_up():
        try:
            server.engine.start(compile_ahead=not args.lazy_compile)
        except Exception:  # the server cannot serve: say so and stop it
            log.exception("compiling the decode step failed")
            uvicorn_server.should_exit = True
            return
        server.ready = True
        log.info("serving %s at http://%s:%d/v1", server.model_name, args.host, args.port)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        threading.Thread(target=warm_up, name="phi-jax-warm-up", daemon=True).start()
        yield
        server.engine.close()

    app.router.lifespan_context = lifespan
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                                   timeout_graceful_shutdown=None))
    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again for the handler it
    # found: with the default ones the process would die of it (status 143) after a clean shutdown.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn_server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.ready:
        raise RuntimeError("the server stopped before it could serve (see the error above)")
    log.info("stopped: %s", server.counters)


def add_command(commands):
    from phi_jax.cli import positive_int

    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP server for a checkpoint",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training workdir, params checkpoint or Hugging Face directory")
    p.add_argument("--step", type=int, help="with a training workdir: this step rather than the latest")
    p.add_argument("--tokenizer", help="'default', a tokenizer.json or a directory with one "
                                       "(default: the checkpoint's own)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default="phi-jax", help="the name clients ask for")
    p.add_argument("--max_batch_size", type=positive_int, default=16, help="requests decoded together (slots)")
    p.add_argument("--max_seq_len", type=positive_int,
                   help="prompt + completion tokens per request (default: the model's context)")
    p.add_argument("--decode_steps", type=positive_int, default=8,
                   help="tokens per decode call: more amortize the host's work per call, fewer let a "
                        "finished request's slot go sooner")
    p.add_argument("--lazy_compile", action="store_true",
                   help="compile each cache-length and prompt bucket on first use, not before /health "
                        "answers 200: a faster start, and a wait for the first requests of each new shape")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--chat_template", help="phi, chatml, a .jinja file or a tokenizer_config.json "
                                           "(default: the checkpoint's or tokenizer's own, if any)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--data_parallel", type=positive_int, default=1, help="model replicas, each with its share "
                                                                         "of the slots")
    p.add_argument("--tensor_parallel", type=positive_int, default=1,
                   help="devices each replica's params are split over (heads, MLP, vocab)")
    p.set_defaults(run=run)
