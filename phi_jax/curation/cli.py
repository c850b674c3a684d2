"""`phi-jax data dedup|decontaminate|filter`: the curation commands. Each module is imported inside its
command, so `phi-jax --help` needs none of datatrove, scikit-learn or matplotlib."""

import argparse
import json

from phi_jax.cli import positive_int


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number strictly between 0 and 1")
    return value


def _print_counts(counts: dict) -> None:
    print(json.dumps(counts))


def _dedup(args):
    from phi_jax.curation import dedup

    _print_counts(dedup.dedup(args.in_dir, args.out_dir, threshold=args.threshold, ngram=args.ngram,
                              workers=args.workers))


def _decontaminate(args):
    from phi_jax.curation import decontaminate

    _print_counts(decontaminate.decontaminate(args.in_dir, args.out_dir, args.eval_data, tasks=args.tasks,
                                              ngram=args.ngram, mode=args.mode, report_only=args.report_only,
                                              workers=args.workers))


def _heuristics(args):
    from phi_jax.curation import filter as filter_lib

    _print_counts(filter_lib.heuristics(args.in_dir, args.out_dir, rules=args.rules, workers=args.workers))


def _train(args):
    from phi_jax.curation import classifier

    _print_counts(classifier.train(args.labels, args.model_out, features=args.features, checkpoint=args.checkpoint,
                                   tokenizer=args.tokenizer, min_score=args.min_score))


def _apply(args):
    from phi_jax.curation import filter as filter_lib

    _print_counts(filter_lib.apply(args.in_dir, args.out_dir, args.classifier, threshold=args.threshold,
                                   workers=args.workers))


def _label(args):
    from phi_jax.curation import label

    generator = label.openai_generator(args.endpoint, args.model, api=args.api, concurrency=args.concurrency)
    _print_counts(label.label(args.in_dir, args.labels, generator=generator, model=args.model, num=args.num,
                              seed=args.seed))


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _tasks(text: str):
    return "all" if text == "all" else [t for t in text.split(",") if t]


def _add_corpus_args(p, *, out: bool = True) -> None:
    p.add_argument("in_dir", help="corpus directory: **/*.jsonl, *.jsonl.gz or *.parquet with a 'text' field")
    if out:
        p.add_argument("out_dir", help="output directory: the same relative layout and formats (resumable)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes, each taking input files in turn")


def add_commands(commands) -> None:
    """Adds dedup, decontaminate and filter to the `phi-jax data` subcommands."""
    p = commands.add_parser("dedup", help="remove exact and near duplicates (datatrove MinHash; resumable)")
    _add_corpus_args(p)
    p.add_argument("--threshold", type=_fraction, default=0.8,
                   help="word n-gram Jaccard similarity from which pairs are caught (with probability >= 0.9)")
    p.add_argument("--ngram", type=positive_int, default=5, help="words per shingle")
    p.set_defaults(run=_dedup)

    p = commands.add_parser("decontaminate", help="drop (or excise) documents holding text of any eval benchmark")
    _add_corpus_args(p)
    p.add_argument("--eval_data", required=True, help="the benchmarks' directory, as for phi-jax eval --data_dir")
    p.add_argument("--tasks", type=_tasks, default="all",
                   help="comma-separated benchmarks, or all (those present under EVAL_DATA, and HumanEval)")
    p.add_argument("--ngram", type=positive_int, default=13, help="words per n-gram of long benchmark texts")
    p.add_argument("--mode", choices=("remove", "excise"), default="remove",
                   help="remove: drop a document with a hit; excise: cut each match with 200 characters around it")
    p.add_argument("--report_only", action="store_true", help="write decontamination_report.json and no corpus")
    p.set_defaults(run=_decontaminate)

    filters = commands.add_parser("filter", help="quality filtering: heuristics, or label/train/apply a classifier")
    kinds = filters.add_subparsers(dest="filter_command", required=True)
    p = kinds.add_parser("heuristics", help="datatrove's Gopher and C4 rules")
    _add_corpus_args(p)
    p.add_argument("--rules", type=_names, default=["gopher_quality", "gopher_repetition"],
                   help="comma-separated: gopher_quality, gopher_repetition, c4 (prose only: it drops code)")
    p.set_defaults(run=_heuristics)

    p = kinds.add_parser("label", help="grade a sample for educational value with an OpenAI-compatible model")
    _add_corpus_args(p, out=False)
    p.add_argument("labels", help="LABELS: JSON lines written as grades arrive (resumable)")
    p.add_argument("--endpoint", action="append", required=True,
                   help="the API's base URL, e.g. http://127.0.0.1:8000/v1 (repeatable: round-robin)")
    p.add_argument("--model", required=True, help="the model name the endpoint serves")
    p.add_argument("--api", choices=("chat", "completions"), default="chat",
                   help="chat (an instruction-tuned model) or completions (a base model)")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    p.add_argument("--num", type=positive_int, default=1000, help="documents to grade (a seeded uniform sample)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_label)

    p = kinds.add_parser("train", help="fit the quality classifier on LABELS; prints held-out accuracy")
    p.add_argument("labels", help="LABELS from filter label (id, text, score)")
    p.add_argument("model_out", help="the classifier's directory")
    p.add_argument("--features", choices=("ngrams", "embeddings"), default="ngrams",
                   help="hashed word n-grams, or a checkpoint's mean-pooled hidden states (phi-1's recipe)")
    p.add_argument("--checkpoint", help="with --features embeddings: a workdir, params checkpoint or HF directory")
    p.add_argument("--tokenizer", help="with --features embeddings: the checkpoint's own unless given")
    p.add_argument("--min_score", type=float, default=3.0, help="grades at or above it are good")
    p.set_defaults(run=_train)

    p = kinds.add_parser("apply", help="keep documents the classifier scores at or above --threshold")
    _add_corpus_args(p)
    p.add_argument("--classifier", required=True, help="the directory filter train wrote")
    p.add_argument("--threshold", type=float, default=0.5, help="P(good) a document needs to stay")
    p.set_defaults(run=_apply)
