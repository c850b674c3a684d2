"""`phi-jax`: the command line.

    phi-jax import-hf SRC_DIR OUT_DIR      Hugging Face directory -> phi-jax params checkpoint
    phi-jax export-hf CKPT OUT_DIR         checkpoint -> Hugging Face directory (weights, tokenizer, chat
                                           template, generation config, model card)
    phi-jax generate CKPT --prompt TEXT ... greedy or sampled continuations (batched; or --prompt_ids)
    phi-jax eval TASKS --checkpoint CKPT   the phi-1.5 paper's benchmarks; eval humaneval --samples F
    phi-jax serve CKPT [--port 8000]       an OpenAI-compatible server (completions, chat), batching requests
    phi-jax chat CKPT [--message TEXT]     talk to a model through its chat template (interactive, or scripted)
    phi-jax train --gin_file F --workdir W  train (or resume) a gin experiment; --compile_only

CKPT is a training workdir (its latest checkpoint), a params checkpoint written by import-hf, or a
Hugging Face directory.
"""

import argparse
import contextlib
import logging
import os
import pathlib
import re
import sys

# TensorFlow (`phi-jax data`'s seqio) reads these when it loads: without them it prints its cuInit
# errors and oneDNN banners to every user. Set before anything below can import it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from phi_jax import checkpoint, hf  # noqa: E402
from phi_jax.data.tokenizer import TOKENIZER_FLAG_HELP, copy_tokenizer_files, resolve_tokenizer  # noqa: E402
from phi_jax.errors import PhiJaxError  # noqa: E402
from phi_jax.files import local_path, read_json_lines  # noqa: E402

# jax's "no GPU/TPU found, falling back to CPU" on a CPU machine is the expected case, not news.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)

# The project's loggers: progress and notices go to stderr; what a command prints as its result, stdout.
LOGGERS = ("phi_jax", "data_tasks")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MiB' or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; expected e.g. 2GB, 500MiB or 1000000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _local_path(text: str) -> str:
    try:
        local_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _import_hf(args):
    config, params = hf.load(args.src_dir, scan_layers=args.scan_layers)
    checkpoint.save_params(args.out_dir, config, params, overwrite=args.overwrite)
    tokenizer = resolve_tokenizer(None, args.src_dir, required=False)
    if tokenizer is not None:  # so that generate, eval, fine-tuning and export-hf of it need no --tokenizer
        copy_tokenizer_files(tokenizer.path, args.out_dir)
    print(f"wrote {args.out_dir}: {config.num_params:,} parameters, {config.num_layers} layers"
          f"{' (scanned)' if config.scan_layers else ''}")


def _export_hf(args):
    from phi_jax.export import export

    done = export(args.ckpt, args.out_dir, step=args.step, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                  tokenizer=args.tokenizer, chat_template=args.chat_template, overwrite=args.overwrite)
    held = "tokenizer" + (" with its chat template" if done.chat_template else "") if done.tokenizer else "no tokenizer"
    print(f"wrote {args.out_dir}: transformers PhiForCausalLM, {args.dtype}, {held}"
          + (f", stops on ids {done.stop_ids}" if done.stop_ids else ""))


def _read_prompt_file(path) -> list:
    """A .jsonl file: one prompt a line, as a JSON string (text), a list of ids, or an object with
    "prompt" or "prompt_ids". Any other file: one text prompt a line, with \\n, \\t and \\\\ escapes."""
    path = pathlib.Path(path)
    if path.suffix != ".jsonl":
        escapes = {"n": "\n", "t": "\t", "\\": "\\"}
        return [re.sub(r"\\([nt\\])", lambda m: escapes[m.group(1)], line)
                for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for number, item in read_json_lines(path):
        item = item.get("prompt_ids", item.get("prompt")) if isinstance(item, dict) else item
        if not isinstance(item, (str, list)):
            raise ValueError(f"{path}:{number}: expected a string, a list of ids or an object with 'prompt' "
                             f"or 'prompt_ids'")
        prompts.append(item)
    return prompts


def _generate(args):
    from phi_jax.generate import complete

    prompts = args.prompt_ids or args.prompt or _read_prompt_file(args.prompt_file)
    text_prompts = any(isinstance(p, str) for p in prompts)
    tokenizer = resolve_tokenizer(args.tokenizer, args.ckpt, required=text_prompts)
    prompt_ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    config, params = checkpoint.load_model(args.ckpt, args.step)
    for ids in prompt_ids:
        if not ids:
            raise ValueError("a prompt is empty")
        if len(ids) + args.max_new_tokens > config.max_position_embeddings:
            raise ValueError(f"a prompt ({len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) exceed "
                             f"the model's max_position_embeddings={config.max_position_embeddings}")
        if max(ids) >= config.vocab_size:
            raise ValueError(f"prompt token {max(ids)} is outside the vocabulary (size {config.vocab_size})")
    eos_id = args.eos_id if args.eos_id is not None else (tokenizer.eos_id if tokenizer else None)
    eos_id = None if args.ignore_eos else eos_id
    outputs = complete(config, params, prompt_ids, args.max_new_tokens,
                       batch_size=min(args.batch_size, len(prompt_ids)), seed=args.seed, eos_id=eos_id,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for index, (ids, new_ids) in enumerate(zip(prompt_ids, outputs)):
        if tokenizer is None or args.ids:
            print(" ".join(map(str, new_ids)))
        else:
            print(("" if index == 0 else "-" * 40 + "\n") + tokenizer.decode(ids + new_ids))


def _train(args):
    from phi_jax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    from phi_jax import experiment, trainer

    config = experiment.build_train_config(args.gin_file, args.gin_bindings, args.gin_macros)
    if args.compile_only:
        memory = trainer.compile_only(config)
        gib = {k: v / 2**30 for k, v in memory.items()}
        print(f"compiled the train step for {jax.device_count()} x {jax.devices()[0].device_kind}, "
              f"batch {config.batch_size} x {config.seq_len}, mesh {config.mesh_shape}:")
        for name, value in gib.items():
            print(f"  {name:32s} {value:10.3f} GiB")
        return
    final = trainer.train(config, args.workdir, gin_config=experiment.config_str())
    if final:
        print("final " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)))
    else:
        print(f"nothing to train: {args.workdir} has reached TRAIN_STEPS={config.train_steps}")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids separated by commas or spaces") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one non-negative token id")
    return ids


def positive_int(text: str) -> int:
    """An argparse type (phi_jax/data/cli.py uses it too)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_import_hf_command(commands)
    _add_export_hf_command(commands)
    _add_generate_command(commands)
    from phi_jax.data.cli import add_commands  # TensorFlow/seqio/grain load only when a data command runs
    add_commands(commands)
    from phi_jax.evaluation.command import add_command as add_eval_command  # loads its modules when run
    add_eval_command(commands)
    from phi_jax.serving.command import add_command as add_serve_command  # FastAPI loads when it runs
    add_serve_command(commands)
    from phi_jax.conversation import add_command as add_chat_command
    add_chat_command(commands)
    _add_train_command(commands)
    return parser


def _add_import_hf_command(commands):
    p = commands.add_parser("import-hf", help="Hugging Face directory -> phi-jax params checkpoint")
    p.add_argument("src_dir", type=_local_path)
    p.add_argument("out_dir", type=_local_path)
    p.add_argument("--scan_layers", action="store_true", help="lay the params out for nn.scan over layers")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR once the new one is complete")
    p.set_defaults(run=_import_hf)


def _add_export_hf_command(commands):
    p = commands.add_parser("export-hf", help="params checkpoint -> Hugging Face directory")
    p.add_argument("ckpt", type=_local_path)
    p.add_argument("out_dir", type=_local_path)
    p.add_argument("--step", type=int, help="with a training workdir: this step rather than the latest")
    p.add_argument("--dtype", choices=sorted(hf.EXPORT_DTYPES), default="float32")
    p.add_argument("--max_shard_size", type=parse_size, default=hf.DEFAULT_MAX_SHARD_BYTES,
                   help="split the safetensors above this size (e.g. 2GB)")
    p.add_argument("--tokenizer", help=TOKENIZER_FLAG_HELP)
    p.add_argument("--chat_template", help="'phi', 'chatml', a .jinja file, a tokenizer_config.json or a Jinja string "
                                           "(default: the run's own, else its tokenizer's, else none)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR once the new one is complete")
    p.set_defaults(run=_export_hf)


def _add_generate_command(commands):
    p = commands.add_parser("generate", help="continue prompts (text with --tokenizer, or token ids)")
    p.add_argument("ckpt", type=_local_path)
    p.add_argument("--step", type=int, help="with a training workdir: this step rather than the latest")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt_ids", type=_token_ids, action="append", help="e.g. 50256,464,318 (repeatable)")
    prompt.add_argument("--prompt", action="append", help="text; needs --tokenizer (repeatable)")
    prompt.add_argument("--prompt_file", help="one prompt a line; .jsonl: JSON strings, id lists or "
                                              "{\"prompt\": ...} / {\"prompt_ids\": ...}")
    p.add_argument("--tokenizer", help=TOKENIZER_FLAG_HELP + "; with one, prints text")
    p.add_argument("--ids", action="store_true", help="print the new token ids (one line a prompt), not text")
    p.add_argument("--max_new_tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--eos_id", type=int, help="stop a prompt at this id (default: the tokenizer's end of text)")
    p.add_argument("--ignore_eos", action="store_true", help="always generate --max_new_tokens, past any end of text")
    p.add_argument("--batch_size", type=positive_int, default=8, help="prompts decoded together (left padded)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_generate)


def _add_train_command(commands):
    p = commands.add_parser("train", help="train (or resume) a gin experiment",
                            epilog="--gin.MACRO=VALUE overrides a macro of the experiment file, "
                                   "e.g. --gin.TRAIN_STEPS=100 --gin.MIXTURE=phi15")
    p.add_argument("--gin_file", action="append", required=True, help="experiment file (repeatable)")
    p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding (repeatable)")
    p.add_argument("--workdir", type=_local_path, help="checkpoints, metrics and the operative config go here")
    p.add_argument("--compile_only", action="store_true",
                   help="compile the train step ahead of time and print its per-device memory")
    p.add_argument("--coordinator_address", help="host:port of process 0, for multi-process runs")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    p.set_defaults(run=_train)


# What `phi-jax` reports as one line and exit status 2, not a traceback: the project's own errors, and
# the builtin ones that its argument checks and its libraries raise for a bad value or path. Caught
# here and nowhere else (`phi-jax data` and `phi-jax eval` run through this too).
USER_ERRORS = (PhiJaxError, ValueError, FileExistsError, FileNotFoundError)


@contextlib.contextmanager
def _log_to_stderr():
    """While a command runs, the project's loggers write their INFO and above, as bare messages, to the
    sys.stderr of this call (so pytest's capsys sees them), and only there: a root handler that
    TensorFlow or absl installed does not print them again. Restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with _log_to_stderr():
        try:
            _run(argv)
        except USER_ERRORS as e:
            print(f"phi-jax {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    return 0


def _run(argv):
    macros = {}
    if argv[:1] == ["train"]:  # --gin.MACRO=VALUE: argparse cannot know the experiment file's macros
        from phi_jax.experiment import split_macro_flags

        macros, argv = split_macro_flags(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.gin_macros = macros
    if args.command == "train" and not args.workdir and not args.compile_only:
        parser.error("train: --workdir is required (unless --compile_only)")
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
