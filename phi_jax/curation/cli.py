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
