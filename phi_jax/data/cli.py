"""`phi-jax data list|prepare|preview|stats`. Heavy imports happen inside the commands, so
`phi-jax --help` works without TensorFlow, seqio or grain installed.

`list`, `prepare` and `preview --raw` read the tasks module named by --tasks_module (default
data_tasks); `preview` and `stats` stream what `prepare` wrote and need none."""

import argparse
import json
import sys
import time

from phi_jax.cli import positive_int


def _splits(text: str) -> tuple[str, ...]:
    from phi_jax.data.registry import SPLITS

    splits = tuple(s for s in text.split(",") if s)
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(SPLITS)}")
    return splits


def _list(args):
    from phi_jax.data import registry

    module = registry.load_tasks_module(args.tasks_module)
    print(f"mixtures of {args.tasks_module} (shares of training tokens):")
    for name in sorted(module.MIXTURES):
        shares = registry.mixture_shares(module, name)
        print(f"  {name:16s} " + ", ".join(f"{t} {100 * s:.1f}%" for t, s in shares.items()))
    print("tasks:")
    describe = getattr(module, "describe_task", lambda name: "")
    for name in registry.tasks_of(module):
        print(f"  {name:18s} {describe(name)}")


def _prepare(args):
    from phi_jax.data import corpus
    from phi_jax.data.prepare import prepare

    chat_flags = args.chat_template is not None or args.max_tokens is not None
    if args.mixture in corpus.BUILT_IN_MIXTURES and args.data_dir is None and args.out_dir is None and not chat_flags:
        corpus.ensure_default(tasks_module=args.tasks_module, mixture=args.mixture)
        return
    prepare(args.mixture, data_dir=args.data_dir, out_dir=args.out_dir, tokenizer=args.tokenizer,
            splits=args.splits, workers=args.workers, shard_index=args.shard_index, num_shards=args.num_shards,
            tasks_module=args.tasks_module, chat_template=args.chat_template, max_tokens=args.max_tokens,
            overlong=args.overlong)


def _stream(args, *, task_ids=False, prefetch=2):
    from phi_jax import data
    from phi_jax.data import stream

    root = data.prepared_dir(args.mixture, args.data_dir)
    ds, tasks = stream.build(args.mixture, root, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                             packing=args.packing, split=args.split, train=args.split == "train",
                             task_ids=task_ids, prefetch=prefetch)
    return root, iter(ds), tasks


def _preview(args):
    from phi_jax.data.tokenizer import Tokenizer

    if args.raw:
        return _preview_raw(args)
    root, it, tasks = _stream(args, task_ids=True, prefetch=0)
    tok = Tokenizer(root / "tokenizer.json")
    shown = 0
    for batch in it:
        for r in range(len(batch["tokens"])):
            if shown == args.num:
                return
            names = sorted({tasks[i].name for i in set(batch["task_ids"][r].tolist()) if i >= 0})
            real = batch["segment_ids"][r] > 0  # a chat task's prompt tokens are real, with loss weight 0
            segments = sorted(set(batch["segment_ids"][r][real].tolist()))
            trained = int((batch["loss_weights"][r] > 0).sum())
            print(f"=== row {shown} ({args.packing}, {int(real.sum())}/{args.seq_len} tokens, {trained} trained, "
                  f"{len(segments)} segment(s), from {', '.join(names)}) ===")
            print(tok.decode(batch["tokens"][r][real].tolist()))
            shown += 1


def _preview_raw(args):
    """Documents as the seqio task pipeline makes them (before preparing): tokenized, then decoded."""
    from phi_jax.data import prepare, registry

    prepare.import_tensorflow_quietly()
    import seqio

    shares = registry.mixture_shares(registry.load_tasks_module(args.tasks_module), args.mixture)
    from phi_jax.data import corpus

    if args.mixture in corpus.BUILT_IN_MIXTURES:  # its raw data and tokenizer (a chat task's template) on first use
        corpus.ensure_default(tasks_module=args.tasks_module, mixture=args.mixture)
    data_dir, tokenizer = prepare.task_inputs(args.mixture, args.data_dir, args.tokenizer)
    prepare.register(args.tasks_module, args.mixture, data_dir, tokenizer)
    for name in shares:
        task = seqio.get_mixture_or_task(name)
        vocab = task.output_features["targets"].vocabulary
        ds = task.get_dataset(sequence_length=None, split=args.split, shuffle=False, num_epochs=1,
                              trim_output_features=False, try_in_mem_cache=False)
        for i, ex in enumerate(ds.take(args.num).as_numpy_iterator()):
            ids = ex["targets"].tolist()
            text = vocab.decode(ids)
            print(f"=== {name} {args.split} document {i}: {len(ids)} tokens ===")
            print(text[:2000] + ("..." if len(text) > 2000 else ""))


def _stats(args):
    import numpy as np

    from phi_jax.data import shards

    root, it, tasks = _stream(args, task_ids=True)
    shares = shards.read_mixture(root, args.mixture)["shares"]
    print(f"mixture {args.mixture} from {root} ({args.split}, {args.packing} packing, seq_len {args.seq_len}, "
          f"batch {args.batch_size}, seed {args.seed})")
    for t in tasks:
        split_stats = shards.read_split(root, t.name, args.split)
        skipped = sum(sum(s["skipped"]["counts"].values()) for s in split_stats)
        chat = (f", {sum(s['trained_tokens'] for s in split_stats):,} of them trained (assistant turns), "
                f"{sum(s['truncated'] for s in split_stats):,} conversations cut") if t.masked else ""
        print(f"  {t.name:18s} prepared: {t.docs:,} docs, {t.tokens:,} tokens{chat} in {len(t.paths)} shard(s), "
              f"{t.tokens / max(1, t.docs):,.0f} tokens/doc, {skipped:,} bad records skipped")
    counts = np.zeros(len(tasks), np.int64)
    seen = rows = padding = trained = 0
    start = time.time()
    for batch in it:
        w = batch["segment_ids"] > 0  # real tokens, a chat task's prompts included
        counts += np.bincount(batch["task_ids"][w], minlength=len(tasks))
        seen += int(w.sum())
        trained += int((batch["loss_weights"] > 0).sum())
        padding += int((~w).sum())
        rows += len(w)
        if seen >= args.num_tokens:
            break
    elapsed = time.time() - start
    print(f"streamed {seen:,} target tokens ({trained:,} with loss weight) in {rows:,} rows "
          f"({100 * padding / max(1, rows * args.seq_len):.2f}% padding) in {elapsed:.2f}s: "
          f"{seen / max(elapsed, 1e-9):,.0f} tokens/s")
    observed = {t.name: float(c) / max(1, seen) for t, c in zip(tasks, counts)}
    for t in tasks:
        print(f"  {t.name:18s} {counts[tasks.index(t)]:>12,} tokens  share {100 * observed[t.name]:6.2f}%  "
              f"(configured {100 * shares[t.name]:.2f}%)")
    print(json.dumps({name: round(share, 6) for name, share in observed.items()}))


def _add_tasks_module_flag(p, what: str) -> None:
    from phi_jax.data.registry import DEFAULT_TASKS_MODULE

    p.add_argument("--tasks_module", default=DEFAULT_TASKS_MODULE,
                   help=f"the module defining the tasks and mixtures{what} (importable: e.g. my_project.tasks; "
                        f"default {DEFAULT_TASKS_MODULE})")


def _add_data_flags(p, *, stream: bool):
    p.add_argument("mixture", help="a mixture or task name (phi-jax data list)")
    p.add_argument("--data_dir", help="DATA_DIR (default $PHI_JAX_DATA_DIR; not needed for 'default')")
    if stream:
        p.add_argument("--split", default="train", choices=("train", "validation"))
        p.add_argument("--seq_len", type=positive_int, default=2048)
        p.add_argument("--batch_size", type=positive_int, default=8)
        p.add_argument("--packing", choices=("concat", "first_fit"), default="concat")
        p.add_argument("--seed", type=int, default=0)


def add_commands(subparsers) -> None:
    """Adds `data` with its subcommands to the phi-jax parser's subparsers."""
    data = subparsers.add_parser("data", help="data: list, prepare, preview, stats, dedup, decontaminate, filter",
                                 description="seqio tasks and mixtures, prepared once, streamed by grain")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("list", help="tasks and mixtures with their token shares")
    _add_tasks_module_flag(p, "")
    p.set_defaults(run=_list)

    p = commands.add_parser("prepare", help="tokenize a mixture once into ArrayRecord shards (resumable)")
    _add_data_flags(p, stream=False)
    _add_tasks_module_flag(p, "")
    p.add_argument("--tokenizer", help="tokenizer.json (default $PHI_JAX_TOKENIZER, else DATA_DIR/tokenizer.json)")
    p.add_argument("--out_dir", help="where the shards go (default DATA_DIR/prepared)")
    p.add_argument("--splits", type=_splits, default=("train", "validation"), help="e.g. train or train,validation")
    p.add_argument("--workers", type=positive_int, default=1, help="processes, each taking input files in turn")
    p.add_argument("--shard_index", type=int, default=0, help="this machine's part of the input files")
    p.add_argument("--num_shards", type=positive_int, default=1, help="machines preparing together")
    p.add_argument("--chat_template", help="chat tasks: phi, chatml, a .jinja file or a tokenizer_config.json "
                                           "(default: the tokenizer's own, else the task's)")
    p.add_argument("--max_tokens", type=positive_int, help="chat tasks: the longest conversation kept (the "
                                                          "training SEQ_LEN); longer ones per --overlong")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                   help="chat tasks: cut a conversation over --max_tokens after its last assistant turn that fits "
                        "(dropped when none fits), or drop it; both counted")
    p.set_defaults(run=_prepare)

    p = commands.add_parser("preview", help="decoded rows of the prepared training stream (or --raw documents)")
    _add_data_flags(p, stream=True)
    p.add_argument("--num", type=positive_int, default=3)
    p.add_argument("--raw", action="store_true", help="documents from the seqio tasks, before preparing")
    p.add_argument("--tokenizer", help="with --raw: tokenizer.json (default DATA_DIR/tokenizer.json)")
    _add_tasks_module_flag(p, " (with --raw; prepared rows need none)")
    p.set_defaults(run=_preview, seq_len=256)

    p = commands.add_parser("stats", help="stream N prepared tokens through the training pipeline; observed shares")
    _add_data_flags(p, stream=True)
    p.add_argument("--num_tokens", type=positive_int, default=1_000_000)
    p.set_defaults(run=_stats)

    from phi_jax.curation import cli as curation_cli  # imports nothing heavy itself

    curation_cli.add_commands(commands)

    from phi_jax.synth import cli as synth_cli  # synth, topics; imports nothing heavy itself

    synth_cli.add_commands(commands)


if __name__ == "__main__":  # `python -m phi_jax.data.cli data ...` is `phi-jax data ...`
    from phi_jax.cli import main

    sys.exit(main())
