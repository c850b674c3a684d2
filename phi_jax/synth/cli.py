"""`phi-jax data synth` and `phi-jax data topics` (added to `phi-jax data` by phi_jax/data/cli.py).

Importing this module imports nothing heavy: openai, aiohttp, jinja2, scikit-learn, matplotlib and jax load
when a command runs.
"""

import argparse
import json
import logging
import os

from phi_jax.synth import SynthError

log = logging.getLogger(__name__)


def _positive_int(text):
    from phi_jax.cli import positive_int

    return positive_int(text)


def _names(values) -> tuple[str, ...]:
    """`--styles a b` or `--styles a,b`."""
    return tuple(n for v in values for n in v.split(",") if n)


def _price(text: str) -> tuple[float, float]:
    try:
        prices = [float(p) for p in text.split(",")]
    except ValueError:
        prices = []
    if len(prices) not in (1, 2) or min(prices) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected USD per million tokens, PROMPT[,COMPLETION], "
                                         "e.g. 0.5,1.5")
    return prices[0], prices[-1]


def _load_tokenizer(name, checkpoint):
    """--tokenizer as every command reads it (phi_jax.data.tokenizer.resolve_tokenizer)."""
    from phi_jax.data.tokenizer import resolve_tokenizer

    return resolve_tokenizer(name, checkpoint)


def make_generator(args, max_tokens: int):
    from phi_jax.synth.generators import CheckpointGenerator, OpenAIGenerator, Sampling

    sampling = Sampling(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.checkpoint and args.endpoint:
        raise SynthError("give either --endpoint (with --model) or --checkpoint, not both")
    if args.checkpoint:
        return CheckpointGenerator.load(args.checkpoint, _load_tokenizer(args.tokenizer, args.checkpoint),
                                        sampling=sampling, batch_size=args.batch_size, seed=args.seed)
    if not args.endpoint:
        raise SynthError("give a generator: --endpoint URL --model NAME (an OpenAI-compatible server), "
                         "or --checkpoint W_OR_CKPT (a phi-jax model in this process)")
    if not args.model:
        raise SynthError("--endpoint needs --model NAME (the model name the server serves, GET /v1/models)")
    return OpenAIGenerator(args.endpoint, args.model, api=args.api, sampling=sampling, concurrency=args.concurrency,
                           timeout=args.timeout, retries=args.retries, backoff=args.backoff, client=args.client,
                           api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")


def _add_generator_flags(p, max_tokens: int) -> None:
    g = p.add_argument_group("generator: an OpenAI-compatible fleet, or a phi-jax checkpoint in this process")
    g.add_argument("--endpoint", action="append", help="base URL, e.g. http://host:8000/v1 (repeatable: round-robin)")
    g.add_argument("--model", help="the served model's name (with --endpoint)")
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="completions for base models, chat for instruction-tuned ones")
    g.add_argument("--api_key", help="default $OPENAI_API_KEY (local servers need none)")
    g.add_argument("--client", choices=("openai", "aiohttp"), default="openai",
                   help="what sends the requests: the official openai package, or aiohttp at a fifth of its CPU a "
                        "request (for fleets fast enough that the client would be the bound)")
    g.add_argument("--concurrency", type=_positive_int, default=16, help="requests in flight, over all endpoints")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--retries", type=int, default=5, help="retries of a request that may pass (then it is failed)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling (unless the "
                                                              "server sends Retry-After)")
    g.add_argument("--checkpoint", help="a phi-jax training workdir, params checkpoint or Hugging Face directory")
    g.add_argument("--tokenizer", help="with --checkpoint: tokenizer.json (or a directory with one), or 'default' "
                                       "(default: the checkpoint's own)")
    g.add_argument("--batch_size", type=_positive_int, default=8, help="with --checkpoint: prompts decoded together")
    g.add_argument("--max_tokens", type=_positive_int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="the plan's (and the in-process sampler's) seed")


def _synth(args):
    from phi_jax.synth import run, templates

    if args.copy_templates:
        for path in templates.copy_builtin(args.copy_templates):
            print(path)
        return
    if not args.topics or not args.out:
        raise SynthError("data synth: --topics FILE and --out DIR are required")
    options = run.Options(num_samples=args.num_samples, seed=args.seed, extract_chars=args.extract_chars,
                          validation_every=args.validation_every, min_words=args.min_words,
                          price_per_million=args.price, progress=not args.no_progress,
                          contamination=run.benchmark_checker(args.eval_data) if args.eval_data else None,
                          near_duplicates=args.near_duplicates, max_failures_in_a_row=args.max_failures_in_a_row,
                          **({"styles": _names(args.styles)} if args.styles else {}),
                          **({"audiences": _names(args.audiences)} if args.audiences else {}))
    generator = make_generator(args, args.max_tokens)
    summary = run.synthesize(args.topics, args.out, generator, templates.Templates(args.templates), options,
                             seed_data=args.seed_data)
    print(json.dumps(summary))


def _topics(args):
    from phi_jax.synth import topics as topics_lib

    if bool(args.seed_data) == bool(args.topics):
        raise SynthError("data topics: give --seed_data DIR (cluster web documents into topics) or --topics FILE "
                         "(seed topics to expand with --subtopics)")
    if args.topics:
        found = [{"topic": t.name, "subtopics": list(t.subtopics)} for t in topics_lib.read_topics(args.topics)]
        documents = 0
    else:
        docs = topics_lib.read_seed_documents(args.seed_data)
        embeddings = None
        if args.embed_checkpoint:
            from phi_jax.checkpoint import load_model

            config, params = load_model(args.embed_checkpoint)
            tokenizer = _load_tokenizer(args.tokenizer, args.embed_checkpoint)
            embeddings = topics_lib.hidden_state_embeddings(config, params, tokenizer, [d.text for d in docs])
        found = topics_lib.cluster_topics(docs, args.num_topics, seed=args.seed, embeddings_NxD=embeddings)
        documents = len(docs)
    generator = make_generator(args, args.max_tokens) if args.subtopics or args.label == "generator" else None
    if args.label == "generator":
        if not args.seed_data:
            raise SynthError("--label generator names clusters: it needs --seed_data")
        topics_lib.label_with_generator(found, docs, generator)
    if args.subtopics:
        topics_lib.expand_subtopics(found, generator, args.subtopics)
    topics_lib.write_topics(args.out, found)
    for t in found:
        covers = f"{t['documents']:6d} documents  " if "documents" in t else ""
        log.info("%s%s%s", covers, t["topic"], f"  ({len(t.get('subtopics', []))} subtopics)" if args.subtopics else "")
    print(json.dumps({"topics": len(found), "documents": documents, "out": str(args.out),
                      "documents_by_topic": {t["topic"]: t["documents"] for t in found if "documents" in t}}))


def add_commands(commands) -> None:
    """`synth` and `topics` under `phi-jax data`."""
    from phi_jax.synth.plan import AUDIENCES  # plain Python, like this module

    p = commands.add_parser("synth", help="generate synthetic textbooks into DIR/{train,validation} (resumable)",
                            description="phi's synthetic data: a plan of topic x audience x style x web extract, "
                                        "generated by OpenAI-compatible endpoints or a phi-jax checkpoint. "
                                        "Re-running the same command resumes exactly.")
    p.add_argument("--topics", help="topics file: one a line, or JSONL with \"topic\" (and \"subtopics\")")
    p.add_argument("--out", help="output DIR (DATA_DIR/synthetic is the `synthetic` task of the phi15 mixtures)")
    p.add_argument("--seed_data", help="directory of JSONL web documents (a \"text\" field) whose extracts "
                                       "seed the prompts")
    p.add_argument("--num_samples", type=_positive_int, default=100, help="plan entries (requests)")
    p.add_argument("--styles", nargs="+", help="prompt styles (templates); default all built-in")
    p.add_argument("--audiences", nargs="+", help="default all: " + ", ".join(AUDIENCES))
    p.add_argument("--templates", help="directory of <style>.jinja files, before the built-in ones")
    p.add_argument("--copy_templates", metavar="DIR", help="copy the built-in templates into DIR to edit, and exit")
    p.add_argument("--extract_chars", type=_positive_int, default=1000, help="web extract length in a prompt")
    p.add_argument("--validation_every", type=int, default=20,
                   help="every K-th plan entry goes to validation/ (0: none)")
    p.add_argument("--min_words", type=int, default=50, help="shorter completions are flagged too_short")
    p.add_argument("--price", type=_price, help="USD per million tokens, PROMPT[,COMPLETION]: the cost in the report")
    p.add_argument("--eval_data", help="EVAL_DATA (as phi-jax eval reads it; HumanEval always): rows holding "
                                       "benchmark text are flagged contaminated, kept out of train/")
    p.add_argument("--near_duplicates", action="store_true",
                   help="the report's near-duplicate rate: phi-jax data dedup's MinHash over the good rows")
    p.add_argument("--max_failures_in_a_row", type=int, default=100,
                   help="stop the run after this many requests in a row failed their retries (0: never)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_generator_flags(p, max_tokens=1024)
    p.set_defaults(run=_synth)

    p = commands.add_parser("topics", help="make a topics file: cluster web documents; expand into subtopics",
                            description="Topics by k-means over web documents (TF-IDF, or a phi-jax model's "
                                        "hidden states), named by salient terms; optionally expanded into "
                                        "subtopics by a generator.")
    p.add_argument("--out", required=True, help="the topics JSONL to write")
    p.add_argument("--seed_data", help="directory of JSONL web documents (a \"text\" field) to cluster")
    p.add_argument("--num_topics", type=_positive_int, default=100)
    p.add_argument("--embed_checkpoint", help="embed documents by this phi-jax model's mean hidden state "
                                              "(default TF-IDF)")
    p.add_argument("--label", choices=("terms", "generator"), default="terms",
                   help="name a cluster by its salient terms, or by the generator's title for a few of its documents")
    p.add_argument("--topics", help="seed topics to expand instead of clustering")
    p.add_argument("--subtopics", type=int, default=0, help="ask the generator for N subtopics of each topic")
    _add_generator_flags(p, max_tokens=256)
    p.set_defaults(run=_topics)
