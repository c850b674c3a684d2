"""`phi-jax data dedup IN_DIR OUT_DIR`: exact and near-duplicate removal with datatrove's MinHash stages.

The four stages are datatrove's (`MinhashDedupSignature`, with faster shingles as `Signature`, then
`MinhashDedupBuckets`, `MinhashDedupCluster`, `MinhashDedupFilter`), each run by a
`LocalPipelineExecutor` whose task `rank` is input file `rank` (signatures, filter) or bucket `rank`
(buckets). Ours are only the two ends, `CorpusReader` and `CorpusWriter` (records.py's reader and
writer: any of our formats, bad records counted, other fields kept, the same relative layout), and
the exact duplicates: the reader writes each document's normalized-text hash as one more signature
bucket, so datatrove's bucket stage pairs exact duplicates too (short documents with fewer than
`ngram` words have no MinHash signature) and its disk-based sort keeps memory flat in the corpus
size. Clusters are the connected components of all pairs; datatrove keeps one member of each.

Word n-grams are taken of datatrove's `simplify_text` (lower case, no punctuation, digits as 0,
whitespace collapsed), split on whitespace (datatrove's English tokenizer needs spaCy, which is
slower and changes nothing once punctuation is gone). Hashes are 64-bit (datatrove's own xxhash path
passes `str` to xxhash, which xxhash 4 refuses). `--threshold T` picks the band
setting: of those with at most 128 hashes that catch a pair of Jaccard T with probability >= 0.9,
the one with the fewest pairs caught below T (T = 0.8: 13 bands of 8 hashes; at Jaccard 0.5 a pair
is caught with probability 0.05).

Work files (signatures, buckets, clusters, datatrove's logs and completions) live in
OUT_DIR/.curation/dedup/; a killed run re-run with the same command redoes only the tasks not
completed (datatrove's `skip_completed`). The same stages on a cluster, with paths on a shared
filesystem (the ranks are the same: one per input file for signatures and the filter, one per
bucket for the buckets, one for the clusters):

    from datatrove.executor import SlurmPipelineExecutor   # or RayPipelineExecutor
    from phi_jax.curation import dedup

    chain = dedup.executors(IN_DIR, OUT_DIR, SlurmPipelineExecutor, time="4:00:00", partition="cpu")
    chain[-1].run()                  # submits the four jobs, each depending on the one before
    dedup.finish(IN_DIR, OUT_DIR)    # once the last job is done: dedup_report.json
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import struct

import numpy as np
import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from phi_jax.curation import records
from phi_jax.curation.records import CorpusError
from phi_jax.files import replacing

logger = logging.getLogger(__name__)

MAX_HASHES = 128
_MERSENNE = (1 << 61) - 1  # datatrove reads 64-bit signature values only below this


class SplitWords(WordTokenizer):
    """Whitespace words: after `simplify_text` nothing else separates them."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def band_setting(threshold: float) -> tuple[int, int]:
    """(bands, hashes per band) for `threshold`, as the module docstring says."""
    if not 0 < threshold < 1:
        raise CorpusError(f"--threshold {threshold}: expected a Jaccard similarity strictly between 0 and 1")
    s = np.linspace(0, threshold, 401)
    best = None
    for rows in range(1, MAX_HASHES + 1):
        for bands in range(1, MAX_HASHES // rows + 1):
            if 1 - (1 - threshold ** rows) ** bands >= 0.9:
                below = np.trapezoid(1 - (1 - s ** rows) ** bands, s)
                best = min(best or (below, bands, rows), (below, bands, rows))
                break  # more bands only catch more below the threshold
    return best[1], best[2]


_ASCII_NORM = TextNormConfig(norm_unicode_diacritics=False)
_SHINGLE_MULTIPLIER = np.uint64(0x100000001B3)


def simplify(text: str) -> str:
    """datatrove's `simplify_text`, without its character-by-character diacritics pass on ASCII text,
    where it changes nothing (it is half of the signature stage's time)."""
    return simplify_text(text, _ASCII_NORM) if text.isascii() else simplify_text(text)


def normalized_hash(text: str) -> int:
    """The exact-duplicate key: 64-bit hash of the text as simplified for the n-grams, below 2**61 - 1."""
    digest = hashlib.blake2b(simplify(text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _MERSENNE


class Signature(MinhashDedupSignature):
    """datatrove's signature stage with faster shingles: each word hashed once (xxh64), n-grams
    combined by a rolling polynomial in numpy, where datatrove joins each n-gram's words into a string
    and hashes it with SHA-1 (about five times slower). The same words make the same shingles in
    every process; the MinHash signature, its buckets and all later stages are datatrove's."""

    def get_shingles(self, text: str) -> np.ndarray:
        words = simplify(text).split()
        n = self.config.n_grams
        if len(words) < n:
            return np.empty((0, 1), np.uint64)
        hashes_W = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in words), np.uint64, len(words))
        grams = hashes_W[:len(words) - n + 1].copy()
        for j in range(1, n):
            grams = grams * _SHINGLE_MULTIPLIER + hashes_W[j:len(words) - n + 1 + j]
        return grams.reshape(-1, 1)


@dataclasses.dataclass(frozen=True)
class Settings:
    threshold: float = 0.8
    ngram: int = 5

    def minhash(self, exact_bucket: bool = False) -> MinhashConfig:
        bands, rows = band_setting(self.threshold)
        return MinhashConfig(n_grams=self.ngram, num_buckets=bands + exact_bucket, hashes_per_bucket=rows,
                             hash_config=HashConfig(precision=64, hash_fc="sha1"))


class CorpusReader(PipelineStep):
    """Input file `rank` as datatrove Documents (the record in metadata["row"]). With `work`, also
    writes what the report needs (ids, hashes, bad records) and the exact-hash signature bucket."""

    name = "phi-jax corpus reader"
    type = "📖 - READER"

    def __init__(self, in_dir, files: list[str], work=None, settings: Settings | None = None):
        super().__init__()
        self.in_dir, self.files, self.work, self.settings = str(in_dir), files, work, settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from tqdm import tqdm

        rel = self.files[rank]
        bad, ids, hashes = [], [], []
        for record in tqdm(records.read_records(pathlib.Path(self.in_dir) / rel, rel, bad), desc=rel, unit="doc",
                           leave=False):
            self.stat_update("documents")
            if self.work:
                ids.append(record.id)
                hashes.append(normalized_hash(record.text))
            yield Document(text=record.text, id=record.id, metadata={"row": record.row})
        if self.work:
            self._write_exact_bucket(rank, hashes)
            with replacing(pathlib.Path(self.work) / "records" / f"{rank:05d}.json") as tmp:
                tmp.write_text(json.dumps({"file": rel, "ids": ids, "hashes": hashes, "bad_count": len(bad),
                                           "bad": bad[:records.BAD_RECORDS_LISTED]}))

    def _write_exact_bucket(self, rank: int, hashes: list[int]) -> None:
        """The hashes as signature bucket `bands` in datatrove's layout: (hash, 0, ..., 0, doc index)
        records, sorted, so its bucket stage finds equal ones like any other band."""
        config = self.settings.minhash(exact_bucket=True)
        rows = config.hashes_per_bucket
        dtype = np.dtype([(f"h{i}", "<u8") for i in range(rows)] + [("doc", "<u4")])
        sigs = np.zeros(len(hashes), dtype)
        sigs["h0"] = np.array(hashes, np.uint64)
        sigs["doc"] = np.arange(len(hashes), dtype=np.uint32)
        sigs.sort(order=dtype.names)
        bucket = pathlib.Path(self.work) / "signatures" / f"bucket_{config.num_buckets - 1:03d}"
        with replacing(bucket / f"{rank:05d}.minhash.sig") as tmp:
            tmp.write_bytes(sigs.tobytes())


class CorpusWriter(PipelineStep):
    """The documents that reach it, as the rows of output file `rank` (same path and format as the input)."""

    name = "phi-jax corpus writer"
    type = "💽 - WRITER"

    def __init__(self, out_dir, files: list[str]):
        super().__init__()
        self.out_dir, self.files = str(out_dir), files

    def run(self, data, rank: int = 0, world_size: int = 1):
        rows = (doc.metadata["row"] for doc in data)
        written = records.write_rows(pathlib.Path(self.out_dir) / self.files[rank], rows)
        self.stat_update("written", value=written)


def pipelines(in_dir, out_dir, files: list[str], work: pathlib.Path, settings: Settings) -> dict:
    """Each stage's (pipeline, tasks): what an executor (local, Slurm, Ray) is given, in this order."""
    config, with_exact = settings.minhash(), settings.minhash(exact_bucket=True)
    signatures, buckets, clusters = work / "signatures", work / "buckets", work / "clusters"
    return {
        "signatures": ([CorpusReader(in_dir, files, work, settings),
                        Signature(str(signatures), config, language=SplitWords())], len(files)),
        "buckets": ([MinhashDedupBuckets(str(signatures), str(buckets), config=with_exact)], with_exact.num_buckets),
        "clusters": ([MinhashDedupCluster(str(buckets), str(clusters), config=with_exact, save_cluster_id=True)], 1),
        "filter": ([CorpusReader(in_dir, files), MinhashDedupFilter(str(clusters), load_cluster_ids=True),
                    CorpusWriter(out_dir, files)], len(files)),
    }


def _check_settings(work: pathlib.Path, settings: Settings, files: list[str]) -> None:
    """A re-run resumes only the same job: other settings or input files would mix two dedups."""
    path = work / "job.json"
    job = {**dataclasses.asdict(settings), "files": files}
    if path.exists():
        before = json.loads(path.read_text())
        if before != job:
            changed = [k for k in job if before.get(k) != job[k]]
            raise CorpusError(f"{work}: holds an unfinished dedup with other {', '.join(changed)}; use a new OUT_DIR "
                              "or remove that directory to start over")
    else:
        with replacing(path) as tmp:
            tmp.write_text(json.dumps(job))


def _read_pairs(path: pathlib.Path, fmt: str):
    if not path.exists():
        return []
    return list(struct.iter_unpack(fmt, path.read_bytes()))


def report(work: pathlib.Path, num_files: int) -> dict:
    """{"clusters": [{"kept", "removed", "exact"}], "bad_records", counts} from the stages' outputs."""
    clusters, docs_in, bad_states = {}, 0, []
    for rank in range(num_files):
        index = json.loads((work / "records" / f"{rank:05d}.json").read_text())
        docs_in += len(index["ids"])
        bad_states.append(index)
        removed = {doc for (doc,) in _read_pairs(work / "clusters" / f"{rank:06d}.remove", "<I")}
        for doc, cluster in _read_pairs(work / "clusters" / f"{rank:06d}.clusters", "<2I"):
            entry = clusters.setdefault(cluster, {"kept": None, "removed": [], "hashes": set()})
            entry["hashes"].add(index["hashes"][doc])
            if doc in removed:
                entry["removed"].append(index["ids"][doc])
            else:
                entry["kept"] = index["ids"][doc]
    listed = [{"kept": c["kept"], "removed": c["removed"], "exact": len(c["hashes"]) == 1}
              for _, c in sorted(clusters.items())]
    removed = sum(len(c["removed"]) for c in listed)
    return {"docs_in": docs_in, "docs_out": docs_in - removed, "removed": removed, "clusters": len(listed),
            "exact_clusters": sum(c["exact"] for c in listed), "bad_records": records.bad_summary(bad_states),
            "cluster_members": listed}


def executors(in_dir, out_dir, executor_class, settings: Settings = Settings(), **executor_args) -> list:
    """The four stages as datatrove executors of `executor_class` (Local, Slurm or Ray), each
    depending on the one before; `executor_args` go to every one (e.g. Slurm's time and partition).
    Running the last runs (or submits) them all; `finish` then writes the report."""
    if settings.ngram < 1:
        raise CorpusError(f"--ngram {settings.ngram}: expected a positive number of words")
    files = records.corpus_files(in_dir)
    out_dir = records.local_path(out_dir)
    work = out_dir / records.STATE_DIR / "dedup"
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(work, settings, files)
    chain = []
    for stage, (pipeline, tasks) in pipelines(in_dir, out_dir, files, work, settings).items():
        chain.append(executor_class(pipeline, tasks=tasks, logging_dir=str(work / "logs" / stage),
                                    depends=chain[-1] if chain else None, **executor_args))
    return chain


def finish(in_dir, out_dir, settings: Settings = Settings()) -> dict:
    """After the stages: OUT_DIR/dedup_report.json, the work files no longer needed removed; the counts."""
    out_dir = records.local_path(out_dir)
    work = out_dir / records.STATE_DIR / "dedup"
    result = report(work, len(records.corpus_files(in_dir)))
    result["settings"] = {**dataclasses.asdict(settings), "bands": settings.minhash().num_buckets,
                          "hashes_per_band": settings.minhash().hashes_per_bucket}
    with replacing(out_dir / "dedup_report.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    for bulky in ("signatures", "buckets"):  # about 1 KB a document; the completions say these stages are done
        shutil.rmtree(work / bulky, ignore_errors=True)
    return {k: result[k] for k in ("docs_in", "docs_out", "removed", "clusters")} | {
        "bad_records": result["bad_records"]["count"]}


def dedup(in_dir, out_dir, *, threshold: float = 0.8, ngram: int = 5, workers: int = 1) -> dict:
    """Runs the four stages on this machine (resuming), writes OUT_DIR/dedup_report.json; returns the counts."""
    from datatrove.executor import LocalPipelineExecutor

    settings = Settings(threshold, ngram)
    executors(in_dir, out_dir, LocalPipelineExecutor, settings, workers=workers)[-1].run()
    return finish(in_dir, out_dir, settings)
