"""Packed training tokens/s from prepared shards: our grain stream against seqio's own pipeline.

Both read the same tokens: the `default` mixture (Python's stdlib code and docs plus synthetic
textbooks, about 1.1M training tokens in 3 tasks; built offline into the cache on first use). Ours
reads its ArrayRecord shards with `phi_jax.data.make_train_iterator` (concat and first-fit packing),
as one process of the trainer does: the batch split into --data_shards data shards read side by side
(default `batch`, TrainConfig.data_shards' default: one shard per row; give several, e.g. 1,batch).
seqio gets the same token ids, copied once (untimed) into TFRecords of tf.train.Example, which is
what seqio's own cache holds, as three Tasks that split long documents into pieces of at most seq_len tokens
(t5's split_tokens, so no token is cut away) and a Mixture whose example rates give the same token shares; then
`seqio.get_dataset(..., feature_converter=DecoderFeatureConverter(pack=True), shuffle=True,
num_epochs=None)` batched like ours. Tokens counted: non-padding targets. All three run in one
process, warmed up, then take turns for --rounds rounds of --tokens tokens each (so a busy machine
hits them alike); the table gives the median and best round.

    .venv/bin/python bench/data_stream.py                 # seq 2048, batch 8, 3 rounds of 8M tokens
    .venv/bin/python bench/data_stream.py --data_shards 1,batch --json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_jax import data  # noqa: E402
from phi_jax.data import shards  # noqa: E402


def _data_shards(text: str) -> list[str]:
    counts = [c.strip() for c in text.split(",") if c.strip()]
    if not counts or not all(c == "batch" or c.isdigit() and int(c) > 0 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers or 'batch', separated by commas")
    return counts


def _time(batches, n_tokens, warmup, weights_key):
    for _ in range(warmup):
        next(batches)
    seen, start = 0, time.perf_counter()
    while seen < n_tokens:
        seen += int((next(batches)[weights_key] > 0).sum())
    return seen / (time.perf_counter() - start)


def _seqio_mirror(root, work_dir, mixture="default"):
    """TFRecords of tf.train.Example{targets: int64 list} from the prepared shards; seqio tasks + mixture."""
    import seqio
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordReader

    from data_tasks.vocab import HFTokenizerVocabulary

    shares = data.mixture_shares(mixture)
    vocab = HFTokenizerVocabulary(os.path.join(root, "tokenizer.json"))
    for task in shares:
        out = os.path.join(work_dir, f"{task}.tfrecord")
        stats = shards.read_split(root, task, "train")
        if not os.path.exists(out):
            with tf.io.TFRecordWriter(out + ".tmp") as writer:
                for s in stats:
                    reader = ArrayRecordReader(s["path"])
                    for record in reader.read_all():
                        ids = np.frombuffer(record, s["dtype"]).astype(np.int64)
                        feature = {"targets": tf.train.Feature(int64_list=tf.train.Int64List(value=ids))}
                        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                    reader.close()
            os.replace(out + ".tmp", out)
        def dense(ds):
            return ds.map(lambda ex: {"targets": tf.cast(tf.sparse.to_dense(ex["targets"]), tf.int32)},
                          num_parallel_calls=tf.data.AUTOTUNE)

        def split_to_length(ds, sequence_length):
            """Long documents become pieces of at most seq_len tokens (t5's split_tokens; not in seqio)."""
            length = sequence_length["targets"]

            def pieces(ex):
                t = ex["targets"]
                n = tf.size(t)
                k = (n + length - 1) // length
                lengths = tf.concat([tf.fill([k - 1], length), [n - (k - 1) * length]], 0)
                return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(t, lengths)})

            return ds.flat_map(pieces)

        seqio.TaskRegistry.remove(f"bench_{task}")
        seqio.TaskRegistry.add(
            f"bench_{task}",
            source=seqio.TFExampleDataSource({"train": out}, {"targets": tf.io.VarLenFeature(tf.int64)}),
            preprocessors=[dense, split_to_length],
            output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
            shuffle_buffer_size=10_000)
    totals = {t: shards.split_totals(root, t) for t in shares}
    seqio.MixtureRegistry.remove("bench_mixture")
    seqio.MixtureRegistry.add("bench_mixture", [(f"bench_{t}", s * totals[t]["docs"] / totals[t]["tokens"])
                                                for t, s in shares.items()])
    return "bench_mixture"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="timed tokens per pipeline per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the pipelines take turns in each")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--data_shards", type=_data_shards, default="batch",
                        help="comma-separated data shard counts (each a divisor of the batch, or 'batch': one "
                             "shard per row); one grain row per count and packing")
    parser.add_argument("--work_dir", help="where the seqio TFRecord copy goes (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import seqio
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    root = data.prepared_dir("default")
    kw = dict(data_dir=None, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        name = _seqio_mirror(root, args.work_dir or tmp)
        ds = seqio.get_dataset(name, task_feature_lengths={"targets": args.seq_len}, dataset_split="train",
                               shuffle=True, num_epochs=None, seed=0, use_cached=False,
                               feature_converter=seqio.DecoderFeatureConverter(pack=True))
        pipelines = {}
        for count in (args.batch_size if c == "batch" else int(c) for c in args.data_shards):
            for packing in ("concat", "first_fit"):
                pipelines[f"grain {packing}, {count} data shard{'s' if count > 1 else ''}"] = (
                    data.make_train_iterator("default", packing=packing, shard_count=count, local_shards=count, **kw),
                    "loss_weights")
        pipelines["seqio pack=True"] = (ds.batch(args.batch_size, drop_remainder=True).prefetch(2).as_numpy_iterator(),
                                        "decoder_loss_weights")
        load = [os.getloadavg()[0]]
        runs = {k: [] for k in pipelines}
        for r in range(args.rounds):
            for k, (it, key) in pipelines.items():
                runs[k].append(_time(it, args.tokens, args.warmup if r == 0 else 0, key))
        load.append(os.getloadavg()[0])
    results = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: max(v) for k, v in runs.items()}
    ratio = {k: v / results["seqio pack=True"] for k, v in results.items()}
    cores = len(os.sched_getaffinity(0))
    if args.json:
        print(json.dumps({"tokens_per_s_median": results, "tokens_per_s_best": best, "vs_seqio": ratio,
                          "seq_len": args.seq_len, "batch_size": args.batch_size, "cores": cores,
                          "load_average": load}))
        return
    print(f"packed tokens/s, default mixture, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.rounds} rounds of {args.tokens:,} tokens each, {cores} cores, "
          f"load average {load[0]:.1f} -> {load[1]:.1f}")
    width = max(map(len, results))
    print(f"{'pipeline':{width}s} {'median tok/s':>14s} {'best tok/s':>14s} {'median vs seqio':>16s}")
    for k, v in results.items():
        print(f"{k:{width}s} {v:14,.0f} {best[k]:14,.0f} {ratio[k]:15.2f}x")


if __name__ == "__main__":
    main()
