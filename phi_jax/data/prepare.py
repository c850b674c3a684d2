"""`phi-jax data prepare`: run each task's seqio pipeline once and write ArrayRecord shards of token ids.

One work item is one (task, split, input file): seqio's own `Task.get_dataset(shard_info=...)` reads,
preprocesses and tokenizes that file (the source has one shard per file), and the documents land in
one ArrayRecord shard with a stats file (phi_jax.data.shards). Work items are

  resumable    a shard whose stats file exists with the same input and tokenizer is not redone;
  parallel     `workers` processes take items in turn (each imports TensorFlow once);
  splittable   item i belongs to `shard_index` when i % num_shards == shard_index, so the hosts of a
               SLURM array or a TPU pod prepare one corpus together into a shared directory.
"""

import concurrent.futures
import multiprocessing
import pathlib
import shutil
import time

import numpy as np

from phi_jax.data import corpus, registry, shards
from phi_jax.data.registry import DataError
from phi_jax.files import replacing


def _configure(data_dir, tokenizer):
    import data_tasks

    data_tasks.set_data_dir(data_dir)
    data_tasks.set_tokenizer(tokenizer)


def _vocabulary(task):
    return task.output_features["targets"].vocabulary


def plan(mixture: str, splits=registry.SPLITS) -> list[dict]:
    """Every work item of a mixture, in a fixed order (the same on every host)."""
    import seqio

    import data_tasks  # noqa: F401  (registers)

    items = []
    for task_name in sorted(registry.mixture_shares(mixture)):
        task = seqio.get_mixture_or_task(task_name)
        for split in splits:
            inputs = task.source.list_shards(split)
            for index, path in enumerate(inputs):
                items.append({"task": task_name, "split": split, "index": index, "count": len(inputs),
                              "input": path})
    return items


def _is_done(out_dir, item, fingerprint) -> bool:
    stem = shards.shard_stem(out_dir, item["task"], item["split"], item["index"], item["count"])
    stats = shards.read_stats(stem)
    return (stats is not None and stats.get("input") == item["input"] and stats.get("tokenizer") == fingerprint
            and stem.with_name(stem.name + shards.RECORD_SUFFIX).exists())


def prepare_item(item: dict, out_dir, data_dir=None, tokenizer=None) -> dict:
    """Runs seqio on one input file and writes its shard; returns the shard's stats."""
    import seqio
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_tasks.sources import take_report

    if data_dir is not None or tokenizer is not None:
        _configure(data_dir, tokenizer)
    task = seqio.get_mixture_or_task(item["task"])
    vocab = _vocabulary(task)
    dtype = np.dtype(shards.token_dtype(vocab.vocab_size)).newbyteorder("<")
    stem = shards.shard_stem(out_dir, item["task"], item["split"], item["index"], item["count"])
    stem.parent.mkdir(parents=True, exist_ok=True)
    record_path = stem.with_name(stem.name + shards.RECORD_SUFFIX)
    ds = task.get_dataset(sequence_length=None, split=item["split"], shuffle=False, num_epochs=1,
                          shard_info=seqio.ShardInfo(item["index"], item["count"]), use_cached=False,
                          trim_output_features=False, try_in_mem_cache=False)
    docs = tokens = longest = 0
    with replacing(record_path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")  # token ids barely compress; reads 2x faster
        try:
            for batch in ds.map(lambda ex: ex["targets"]).ragged_batch(256).as_numpy_iterator():
                for ids in batch:
                    writer.write(np.asarray(ids, dtype).tobytes())
                    docs += 1
                    tokens += len(ids)
                    longest = max(longest, len(ids))
        finally:
            writer.close()
    report = take_report(item["input"])
    stats = {"task": item["task"], "split": item["split"], "shard_index": item["index"],
             "num_shards": item["count"], "input": item["input"], "docs": docs, "tokens": tokens,
             "longest": longest, "dtype": dtype.name, "tokenizer": vocab.tokenizer.fingerprint,
             "vocab_size": vocab.vocab_size, "eos_id": vocab.eos_id, "skipped": report.to_json()}
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


def prepare(mixture: str, data_dir=None, out_dir=None, tokenizer=None, splits=registry.SPLITS, workers: int = 1,
            shard_index: int = 0, num_shards: int = 1, log=print) -> dict:
    """Prepares every task of `mixture` (see the module doc). Returns {"done", "skipped_done", "report"}."""
    from data_tasks.sources import SkipReport

    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard_index {shard_index} is not in [0, {num_shards})")
    is_default = mixture == "default"
    if is_default:
        data_dir, tokenizer = None, str(corpus.tokenizer_file())
        out_dir = pathlib.Path(out_dir or corpus.prepared_dir())
    else:
        if data_dir is None:
            data_dir = registry.data_dir(mixture)
        out_dir = pathlib.Path(out_dir or pathlib.Path(data_dir) / "prepared")
    _configure(data_dir, tokenizer)
    from phi_jax.data.tokenizer import Tokenizer

    tok_path = str(corpus.tokenizer_file()) if is_default else registry.tokenizer_path(mixture)
    try:
        tok = Tokenizer(tok_path)
    except FileNotFoundError:
        raise DataError(f"mixture {mixture!r}: no tokenizer at {tok_path} (put phi's tokenizer.json in DATA_DIR "
                        "or pass --tokenizer)") from None
    items = plan(mixture, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_index == 0:
        _drop_stale(out_dir, items)
    with replacing(out_dir / "tokenizer.json") as tmp:
        shutil.copyfile(tok.path, tmp)
    mine = [item for i, item in enumerate(items) if i % num_shards == shard_index]
    todo = [item for item in mine if not _is_done(out_dir, item, tok.fingerprint)]
    log(f"prepare {mixture}: {len(items)} input files, {len(mine)} for shard {shard_index}/{num_shards}, "
        f"{len(mine) - len(todo)} already done -> {out_dir}")
    start = time.time()
    results = []
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            results.append(prepare_item(item, out_dir))
            _log_item(log, results[-1])
    else:
        ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = [pool.submit(prepare_item, item, out_dir, data_dir or "", tokenizer) for item in todo]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                _log_item(log, results[-1])
    tokens = sum(r["tokens"] for r in results)
    if todo:
        log(f"prepared {len(todo)} shards, {sum(r['docs'] for r in results):,} documents, {tokens:,} tokens "
            f"in {time.time() - start:.1f}s")
    report = SkipReport()
    for item in mine:  # all of this host's shards, also those done earlier: bad input is never forgotten
        stats = shards.read_stats(shards.shard_stem(out_dir, item["task"], item["split"], item["index"],
                                                    item["count"]))
        if stats and stats["skipped"]["counts"]:
            skipped = SkipReport.from_json(stats["skipped"])
            log(f"task {item['task']!r} {item['split']} {item['input'].split('#')[0]}: {skipped.summary()}")
            report.merge(skipped)
    if report.total:
        log(f"bad input: {report.summary()}")
    return {"done": len(todo), "skipped_done": len(mine) - len(todo), "report": report, "out_dir": str(out_dir)}


def _log_item(log, stats):
    log(f"  {stats['task']}/{stats['split']} part {stats['shard_index'] + 1}/{stats['num_shards']}: "
        f"{stats['docs']:,} docs, {stats['tokens']:,} tokens")
