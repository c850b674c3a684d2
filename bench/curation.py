"""Words/s per core of each curation stage on a generated corpus, and dedup beside datatrove's own
pipeline run directly on the same files.

The corpus: --words words of a Zipf-distributed 50,000-word vocabulary in documents of 50 to 2,000
words (log-normal lengths), in JSON-lines files of about --file_words words; 3% of the documents are
copies of earlier ones (half exact, half with 5% of their words changed) and 0.1% hold a HumanEval
prompt. Every stage runs in this one process (--workers 1): words/s per core is words over the
process's CPU seconds (wall-clock words/s beside it; on a shared machine the two differ). Stages:
- dedup: `phi-jax data dedup` (phi_jax/curation/dedup.py: our reader and writer around datatrove's
  MinHash stages, plus the exact-hash bucket), and datatrove's own pipeline on the same files:
  JsonlReader -> the same four stages (same MinhashConfig; datatrove's English word tokenizer needs
  spaCy, so both split on whitespace) -> JsonlWriter;
- decontaminate: against HumanEval (its 164 problems) and every other benchmark in the issue's
  format with 500 generated items each (tests/curation_benchmarks.py), --mode remove;
- filter heuristics: datatrove's Gopher quality and repetition filters;
- filter apply: the hashed-n-gram classifier, trained on 2,000 generated labels.

    .venv/bin/python bench/curation.py                       # 5M words
    .venv/bin/python bench/curation.py --words 50000000      # the issue's 50M words
"""

import argparse
import datetime
import gzip
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vocabulary(rng, size: int = 50_000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths])


def generate_corpus(root, words: int, file_words: int, seed: int = 0) -> int:
    """Writes the corpus (module docstring) under `root`; returns its number of words."""
    from phi_jax.evaluation import code

    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    prompts = [p["prompt"] for p in code.humaneval_problems().values()]
    written, file_index, docs = 0, 0, []
    while written < words:
        out, in_file = [], 0
        while in_file < file_words and written + in_file < words:
            roll = rng.random()
            if docs and roll < 0.03:
                text = docs[int(rng.integers(len(docs)))]
                if roll < 0.015:
                    tokens = text.split()
                    for j in rng.choice(len(tokens), max(1, len(tokens) // 20), replace=False):
                        tokens[j] = vocab[int(rng.integers(len(vocab)))]
                    text = " ".join(tokens)
            else:
                n = int(np.clip(rng.lognormal(6.0, 0.8), 50, 2000))
                text = " ".join(vocab[rng.choice(len(vocab), n, p=zipf)])
                if roll > 0.999:
                    text += "\n" + prompts[int(rng.integers(len(prompts)))]
                docs = (docs + [text])[-1000:]
            out.append(json.dumps({"text": text}) + "\n")
            in_file += text.count(" ") + 1
        path = root / f"part-{file_index:04d}.jsonl"
        path.write_text("".join(out))
        written += in_file
        file_index += 1
    return written


def datatrove_dedup(in_dir, work, settings) -> dict:
    """datatrove's own four-stage MinHash pipeline, as its examples run it."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from phi_jax.curation.dedup import SplitWords

    config = settings.minhash()
    files = len(os.listdir(in_dir))
    stages = [
        ([JsonlReader(str(in_dir)), MinhashDedupSignature(f"{work}/sigs", config, language=SplitWords())], files),
        ([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)], config.num_buckets),
        ([MinhashDedupCluster(f"{work}/buckets", f"{work}/clusters", config=config)], 1),
        ([JsonlReader(str(in_dir)), MinhashDedupFilter(f"{work}/clusters"), JsonlWriter(f"{work}/out")], files),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{i}").run()
    kept = 0
    for path in pathlib.Path(work, "out").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            kept += sum(1 for _ in f)
    return {"docs_out": kept}


def write_labels(path, rng, n: int = 2000) -> None:
    good = "energy cell molecule theorem proof function variable equation learn example".split()
    bad = "click buy cheap deal free offer winner casino subscribe now".split()
    rows = []
    for i in range(n):
        words, score = (good, 4) if i % 2 else (bad, 1)
        rows.append({"id": str(i), "text": " ".join(rng.choice(words, 80)), "score": score})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_timed(fn):
    """(wall seconds, CPU seconds of this process, result): every stage runs in this one process."""
    cpu = time.process_time()
    seconds, result = timed(fn)
    return seconds, time.process_time() - cpu, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=5_000_000)
    parser.add_argument("--file_words", type=int, default=1_000_000)
    parser.add_argument("--stages", default="dedup,datatrove_dedup,decontaminate,heuristics,apply")
    parser.add_argument("--json", action="store_true", help="also print each row as JSON")
    args = parser.parse_args()

    from phi_jax.curation import classifier, decontaminate, dedup
    from phi_jax.curation import filter as filter_lib
    from tests.curation_benchmarks import write_eval_data
    from tests.curation_corpus import vocabulary as test_vocabulary

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        tmp = pathlib.Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        seconds, words = timed(lambda: generate_corpus(corpus, args.words, args.file_words))
        print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}); corpus: {words:,} words in "
              f"{len(os.listdir(corpus))} files, generated in {seconds:.0f} s")
        write_eval_data(tmp / "eval", rng, test_vocabulary(rng), per_task=500)  # untimed preparation
        write_labels(tmp / "labels.jsonl", rng)
        classifier.train(tmp / "labels.jsonl", tmp / "classifier")
        index_seconds, _ = timed(lambda: decontaminate.build_index(*decontaminate.benchmark_items(tmp / "eval", "all")))
        print(f"# decontaminate's index of every benchmark (each stage's own, in its time): {index_seconds:.1f} s")
        print("| stage | wall s | CPU s | words/s per core (CPU) | words/s (wall) | result |")
        print("|---|---|---|---|---|---|")
        stages = args.stages.split(",")
        runs = {
            "dedup": lambda: dedup.dedup(corpus, tmp / "dedup", workers=1),
            "datatrove_dedup": lambda: datatrove_dedup(corpus, tmp / "datatrove", dedup.Settings()),
            "decontaminate": lambda: decontaminate.decontaminate(corpus, tmp / "decontaminated", tmp / "eval"),
            "heuristics": lambda: filter_lib.heuristics(corpus, tmp / "heuristics", workers=1),
            "apply": lambda: filter_lib.apply(corpus, tmp / "filtered", tmp / "classifier", threshold=0.5),
        }
        for stage in stages:
            seconds, cpu, result = cpu_timed(runs[stage])
            shown = json.dumps({k: v for k, v in (result or {}).items() if k != "by_task"})
            print(f"| {stage} | {seconds:.1f} | {cpu:.1f} | {words / cpu:,.0f} | {words / seconds:,.0f} | {shown} |",
                  flush=True)
            if args.json:
                print(json.dumps({"stage": stage, "seconds": seconds, "cpu_seconds": cpu, "words": words,
                                  "result": result}))
        print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
