"""`phi-jax data prepare`: run each task's seqio pipeline once and write ArrayRecord shards of token ids.

The tasks come from a tasks module (phi_jax.data.registry; default `data_tasks`), imported by name
and registered with this run's DATA_DIR and tokenizer. One work item is one (task, split, input
file): seqio's own `Task.get_dataset(shard_info=...)` reads, preprocesses and tokenizes that file
(the source has one shard per file), and the documents land in one ArrayRecord shard with a stats
file (phi_jax.data.shards). Work items are

  resumable    a shard whose stats file exists with the same input and tokenizer is not redone;
  parallel     `workers` processes take items in turn (each imports the tasks module and TensorFlow
               once, and registers the tasks itself);
  splittable   item i belongs to `shard_index` when i % num_shards == shard_index, so the hosts of a
               SLURM array or a TPU pod prepare one corpus together into a shared directory.

Chat tasks (those in the tasks module's optional CHAT_TASKS) give {"targets", "loss_mask"}: their shards
hold each conversation's ids followed by its mask (phi_jax.data.shards). Their chat template is
`chat_template` (a built-in name, a .jinja file, a tokenizer_config.json), else the tokenizer's own,
else the task's default; it is written to PREPARED/chat_template.jinja beside PREPARED/tokenizer.json,
which the tasks then tokenize with (with the template's special tokens added, when it needs new ones:
PREPARED/chat_tokens.json lists them). A conversation longer than `max_tokens` is cut after its last
assistant turn that fits, or, with `overlong="drop"` or when none fits, dropped; both are counted.

At the end the mixture's token shares and the tokenizer's fingerprint go into PREPARED/mixtures/
(also those of the module's other mixtures made of the same tasks, and of each task alone): the
stream reads what a mixture is from there.
"""

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

from phi_jax.data import chat, corpus, registry, shards
from phi_jax.data.registry import DEFAULT_TASKS_MODULE, DataError
from phi_jax.data.skips import SkipReport
from phi_jax.data.tokenizer import copy_tokenizer_files
from phi_jax.files import replacing
from phi_jax.token_rows import CHAT_TOKENS_FILE

logger = logging.getLogger(__name__)


def task_inputs(mixture: str, data_dir=None, tokenizer=None) -> tuple[str | None, str]:
    """(DATA_DIR, tokenizer.json path) the mixture's tasks read: `data_dir`, else $PHI_JAX_DATA_DIR;
    `tokenizer`, else $PHI_JAX_TOKENIZER, else DATA_DIR/tokenizer.json. `default` reads neither: its
    tasks read the embedded corpus, with its own tokenizer."""
    if mixture in corpus.BUILT_IN_MIXTURES:
        return None, str(corpus.tokenizer_file())
    data_dir = data_dir or os.environ.get("PHI_JAX_DATA_DIR")
    if not data_dir:
        raise DataError(f"mixture {mixture!r}: no DATA_DIR; pass --data_dir (or set PHI_JAX_DATA_DIR)")
    tokenizer = tokenizer or os.environ.get("PHI_JAX_TOKENIZER") or os.path.join(data_dir, "tokenizer.json")
    return str(data_dir), str(tokenizer)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (which seqio loads) with file descriptor 2 held aside: since TF 2.19 its C++
    start-up lines (cudart_stub's "Could not find cuda drivers", cuInit's error, absl's "before
    absl::InitializeLog") ignore TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442). Shown if the
    import fails; a no-op once imported or where TensorFlow is not installed. TF gets no GPU: the
    input pipelines run on CPU and leave the accelerators' memory to JAX."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow

            # The input pipelines run on CPU; this also makes TF look for GPUs (cuInit) now, while held.
            tensorflow.config.set_visible_devices([], "GPU")
        except ImportError:
            pass  # seqio's own import says what is missing
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def register(tasks_module: str, mixture: str, data_dir, tokenizer) -> None:
    """Imports the tasks module and registers its tasks with seqio for these inputs (task_inputs)."""
    import_tensorflow_quietly()
    module = registry.load_tasks_module(tasks_module)
    module.register(data_dir=data_dir, tokenizer=None if mixture in corpus.BUILT_IN_MIXTURES else tokenizer)


def _seqio_task(name: str, tasks_module: str):
    import seqio

    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        raise DataError(f"task {name!r}: tasks module {tasks_module!r} names it in MIXTURES, but its register() "
                        "did not register a seqio Task of that name") from None


def plan(tasks, splits=registry.SPLITS, tasks_module: str = DEFAULT_TASKS_MODULE) -> list[dict]:
    """Every work item of these (registered) tasks, in a fixed order (the same on every host)."""
    items = []
    for task_name in sorted(tasks):
        task = _seqio_task(task_name, tasks_module)
        for split in splits:
            inputs = task.source.list_shards(split)
            for index, path in enumerate(inputs):
                items.append({"task": task_name, "split": split, "index": index, "count": len(inputs),
                              "input": path})
    return items


def _is_done(out_dir, item, fingerprint, limits: dict) -> bool:
    """The item's shard exists from the same input and tokenizer (and, for a chat task, the same length
    limit and template: `limits` is {"max_tokens", "overlong", "chat_template"})."""
    stem = shards.shard_stem(out_dir, item["task"], item["split"], item["index"], item["count"])
    stats = shards.read_stats(stem)
    return (stats is not None and stats.get("input") == item["input"] and stats.get("tokenizer") == fingerprint
            and stem.with_name(stem.name + shards.RECORD_SUFFIX).exists()
            and (not stats.get(shards.LOSS_MASK) or all(stats.get(k) == v for k, v in limits.items())))


def prepare_item(item: dict, out_dir, fingerprint: str, tasks_module: str = DEFAULT_TASKS_MODULE,
                 max_tokens: int | None = None, overlong: str = "truncate", chat_template: str | None = None) -> dict:
    """Runs seqio on one input file of a registered task and writes its shard; returns the shard's stats.
    The skip report comes from the task's source (`take_report(input)`, where it has one); a chat task's
    overlong conversations are cut or dropped (see the module doc) and counted there too."""
    import seqio
    from array_record.python.array_record_module import ArrayRecordWriter

    task = _seqio_task(item["task"], tasks_module)
    vocab = task.output_features["targets"].vocabulary
    own = getattr(getattr(vocab, "tokenizer", None), "fingerprint", None)
    if own is not None and own != fingerprint:
        raise DataError(f"task {item['task']!r}: its vocabulary ({vocab}) is tokenizer {own}, but this preparation's "
                        f"tokenizer.json is {fingerprint}: the tasks module's register() must build its "
                        "vocabulary from the `tokenizer` it is given")
    dtype = np.dtype(shards.token_dtype(vocab.vocab_size)).newbyteorder("<")
    stem = shards.shard_stem(out_dir, item["task"], item["split"], item["index"], item["count"])
    stem.parent.mkdir(parents=True, exist_ok=True)
    record_path = stem.with_name(stem.name + shards.RECORD_SUFFIX)
    ds = task.get_dataset(sequence_length=None, split=item["split"], shuffle=False, num_epochs=1,
                          shard_info=seqio.ShardInfo(item["index"], item["count"]), use_cached=False,
                          trim_output_features=False, try_in_mem_cache=False)
    masked = shards.LOSS_MASK in task.output_features
    fields = ("targets", shards.LOSS_MASK) if masked else ("targets",)
    docs = tokens = trained = longest = truncated = 0
    overlong_report = SkipReport()
    with replacing(record_path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")  # token ids barely compress; reads 2x faster
        try:
            for batch in ds.map(lambda ex: {f: ex[f] for f in fields}).ragged_batch(256).as_numpy_iterator():
                for k, ids in enumerate(batch["targets"]):
                    mask = batch[shards.LOSS_MASK][k] if masked else None
                    if masked and max_tokens is not None and len(ids) > max_tokens:
                        keep = chat.truncate_at_turn(ids, mask, max_tokens) if overlong == "truncate" else None
                        if keep is None:
                            overlong_report.skip(f"conversation over {max_tokens} tokens",
                                                 f"{item['input']}: conversation {docs + overlong_report.total + 1}")
                            continue
                        ids, mask, truncated = ids[:keep], mask[:keep], truncated + 1
                    writer.write(shards.encode_record(ids, dtype, mask))
                    docs += 1
                    tokens += len(ids)
                    trained += int(np.sum(mask)) if masked else len(ids)
                    longest = max(longest, len(ids))
        finally:
            writer.close()
    take_report = getattr(task.source, "take_report", None)
    report = (take_report(item["input"]) if take_report else SkipReport()).merge(overlong_report)
    stats = {"task": item["task"], "split": item["split"], "shard_index": item["index"],
             "num_shards": item["count"], "input": item["input"], "docs": docs, "tokens": tokens,
             "longest": longest, "dtype": dtype.name, "tokenizer": fingerprint,
             "vocab_size": vocab.vocab_size, "eos_id": vocab.eos_id, "skipped": report.to_json()}
    if masked:
        stats.update({shards.LOSS_MASK: True, "trained_tokens": trained, "truncated": truncated,
                      "max_tokens": max_tokens, "overlong": overlong, "chat_template": chat_template})
    shards.write_stats(stem, stats)
    return stats


def _drop_stale(out_dir, items):
    """Shards of an earlier preparation with another number of input files would never be read: remove."""
    counts = {(i["task"], i["split"]): i["count"] for i in items}
    for (task, split), count in counts.items():
        for path in (pathlib.Path(out_dir) / task / split).glob("part-*"):
            if not path.name.endswith(f"-of-{count:05d}{shards.STATS_SUFFIX}") and \
                    not path.name.endswith(f"-of-{count:05d}{shards.RECORD_SUFFIX}"):
                path.unlink(missing_ok=True)


def _mixtures_of(module, mixture: str) -> dict[str, dict[str, float]]:
    """What to record after preparing `mixture`: it, the module's mixtures made of its tasks, each task."""
    tasks = set(registry.mixture_shares(module, mixture))
    names = {mixture, *tasks} | {name for name, shares in module.MIXTURES.items()
                                 if {t for t, s in shares.items() if s > 0} <= tasks}
    return {name: registry.mixture_shares(module, name) for name in sorted(names)}


def prepare(mixture: str, data_dir=None, out_dir=None, tokenizer=None, splits=registry.SPLITS, workers: int = 1,
            shard_index: int = 0, num_shards: int = 1, tasks_module: str = DEFAULT_TASKS_MODULE,
            chat_template=None, max_tokens: int | None = None, overlong: str = "truncate") -> dict:
    """Prepares every task of `mixture` (see the module doc). Returns {"done", "skipped_done", "report",
    "out_dir"}."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard_index {shard_index} is not in [0, {num_shards})")
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {', '.join(OVERLONG)}, found {overlong!r}")
    module = registry.load_tasks_module(tasks_module)
    shares = _checked_shares(module, mixture, tasks_module)
    data_dir, tok_path = task_inputs(mixture, data_dir, tokenizer)
    if out_dir is None:
        out_dir = corpus.prepared_dir(mixture) if data_dir is None else pathlib.Path(data_dir) / "prepared"
    out_dir = pathlib.Path(out_dir)
    chat_defaults = {t: getattr(module, "CHAT_TASKS", {})[t] for t in shares if t in getattr(module, "CHAT_TASKS", {})}
    limits = {"max_tokens": max_tokens, "overlong": overlong}
    if chat_defaults:
        tok_path, template = _chat_tokenizer(mixture, tok_path, out_dir, chat_template, chat_defaults, shard_index)
        limits["chat_template"] = hashlib.sha256(template.encode()).hexdigest()[:16]
    tok = _load_tokenizer(mixture, tok_path)
    register(tasks_module, mixture, data_dir, tok_path)
    items = plan(shares, splits, tasks_module)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_index == 0:
        _drop_stale(out_dir, items)
    with replacing(out_dir / "tokenizer.json") as tmp:
        shutil.copyfile(tok.path, tmp)
    mine = [item for i, item in enumerate(items) if i % num_shards == shard_index]
    todo = [item for item in mine if not _is_done(out_dir, item, tok.fingerprint, limits)]
    logger.info(f"prepare {mixture}: {len(items)} input files, {len(mine)} for shard {shard_index}/{num_shards}, "
                f"{len(mine) - len(todo)} already done -> {out_dir}")
    _prepare_items(todo, out_dir, tok.fingerprint, workers, (tasks_module, mixture, data_dir, tok_path), limits)
    for name, name_shares in _mixtures_of(module, mixture).items():
        shards.write_mixture(out_dir, name, name_shares, tok.fingerprint, tasks_module)
    report = _skip_report(out_dir, mine)
    return {"done": len(todo), "skipped_done": len(mine) - len(todo), "report": report, "out_dir": str(out_dir)}


OVERLONG = ("truncate", "drop")


def _chat_tokenizer(mixture: str, tok_path, out_dir: pathlib.Path, chat_template, chat_defaults: dict,
                    shard_index: int) -> tuple[str, str]:
    """Puts the chat tasks' template (see the module doc) beside out_dir/tokenizer.json, with the template's
    special tokens added to it where it needs them; returns (that tokenizer.json, which the tasks read, the
    template's source)."""
    if chat_template is None:
        source = chat.find_chat_template(tok_path)
        defaults = {d for d in chat_defaults.values() if d is not None}
        if source is None and len(defaults) == 1:
            chat_template = defaults.pop()
        elif source is None:
            raise DataError(f"mixture {mixture!r}: its chat tasks {sorted(chat_defaults)} need a chat template and "
                            f"{tok_path} has none beside it; pass --chat_template ({', '.join(chat.TEMPLATES)}, a "
                            ".jinja file or a tokenizer_config.json)")
    if chat_template is not None:
        try:
            source = chat.resolve_template(chat_template)
        except chat.ChatError as e:
            raise DataError(f"mixture {mixture!r}: --chat_template: {e}") from None
    tokens = chat.template_tokens(chat_template)
    out_tokenizer = out_dir / "tokenizer.json"
    if shard_index == 0 or not out_tokenizer.exists():  # hosts preparing together write the same files
        # Its special tokens too (tokenizer_config.json, special_tokens_map.json): templates read them.
        copy_tokenizer_files(tok_path, out_dir)
        added = chat.add_tokens(tok_path, tokens, out_tokenizer)
        if added:
            logger.info(f"chat template {chat_template}: added {added} to the tokenizer ({out_tokenizer})")
        with replacing(out_dir / chat.TEMPLATE_FILE) as tmp:
            tmp.write_text(source)
        with replacing(out_dir / CHAT_TOKENS_FILE) as tmp:
            tmp.write_text(json.dumps({"template": str(chat_template) if tokens else None, "added": added,
                                       "trained_rows": _base_vocab_size(tok_path)}, indent=1))
    return str(out_tokenizer), source


def _base_vocab_size(tok_path) -> int:
    """The vocabulary size of the tokenizer before any template tokens: the rows a model trained."""
    from phi_jax.data.tokenizer import Tokenizer

    return Tokenizer(tok_path).vocab_size


def _checked_shares(module, mixture: str, tasks_module: str) -> dict[str, float]:
    """The mixture's token shares; a misspelled name stops here, before TensorFlow loads."""
    shares = registry.mixture_shares(module, mixture)
    if shards.MIXTURES_DIR in shares:
        raise DataError(f"tasks module {tasks_module!r}: a task may not be called {shards.MIXTURES_DIR!r} (the "
                        "prepared directory keeps the mixtures there)")
    return shares


def _load_tokenizer(mixture: str, tok_path):
    from phi_jax.data.tokenizer import Tokenizer

    try:
        return Tokenizer(tok_path)
    except FileNotFoundError:
        raise DataError(f"mixture {mixture!r}: no tokenizer at {tok_path} (put phi's tokenizer.json in DATA_DIR "
                        "or pass --tokenizer)") from None


def _prepare_items(todo, out_dir, fingerprint: str, workers: int, register_args: tuple, limits: dict) -> None:
    """Prepares the work items in this process, or in `workers` spawned ones that each register the tasks
    with `register_args` (tasks module, mixture, DATA_DIR, tokenizer); `limits` are the chat tasks'."""
    tasks_module = register_args[0]
    start = time.time()
    results = []
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            results.append(prepare_item(item, out_dir, fingerprint, tasks_module, **limits))
            _log_item(results[-1])
    else:
        ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=register,
                                                    initargs=register_args) as pool:
            futures = [pool.submit(prepare_item, item, out_dir, fingerprint, tasks_module, **limits) for item in todo]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                _log_item(results[-1])
    if todo:
        tokens = sum(r["tokens"] for r in results)
        logger.info(f"prepared {len(todo)} shards, {sum(r['docs'] for r in results):,} documents, {tokens:,} tokens "
                    f"in {time.time() - start:.1f}s")


def _skip_report(out_dir, mine) -> SkipReport:
    """The bad input of all of this host's shards, also those done earlier: bad input is never forgotten."""
    report = SkipReport()
    for item in mine:
        stats = shards.read_stats(shards.shard_stem(out_dir, item["task"], item["split"], item["index"],
                                                    item["count"]))
        if stats and stats["skipped"]["counts"]:
            skipped = SkipReport.from_json(stats["skipped"])
            logger.warning(f"task {item['task']!r} {item['split']} {item['input'].split('#')[0]}: {skipped.summary()}")
            report.merge(skipped)
    if report.total:
        logger.warning(f"bad input: {report.summary()}")
    return report


def _log_item(stats):
    chat_counts = ""
    if stats.get(shards.LOSS_MASK):
        chat_counts = f", {stats['trained_tokens']:,} of them trained (assistant turns)"
        if stats["max_tokens"] is not None:
            chat_counts += f", {stats['truncated']:,} conversations cut after a turn to {stats['max_tokens']} tokens"
    logger.info(f"  {stats['task']}/{stats['split']} part {stats['shard_index'] + 1}/{stats['num_shards']}: "
                f"{stats['docs']:,} docs, {stats['tokens']:,} tokens{chat_counts}")
