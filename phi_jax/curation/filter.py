"""`phi-jax data filter heuristics|apply`: quality filtering by rules and by a trained classifier.

`heuristics` runs datatrove's filters on each document: `gopher_quality` (length, mean word length,
symbol-to-word ratio, bullet and ellipsis lines, alphabetic words, stop words: Gopher's rules),
`gopher_repetition` (repeated lines, paragraphs and n-grams) and `c4` (C4's line rules: terminal
punctuation, javascript, lorem ipsum, policy boilerplate, curly brackets; meant for prose, it drops
code). Words are split by a regular expression (words, and runs of punctuation as symbol words)
where datatrove would load spaCy. The report counts documents dropped per rule.

`apply` scores each document with a classifier from `filter train` (classifier.py), keeps those
scoring at least `--threshold`, each row with its `quality_score`, and writes the report with a
histogram of all scores (filter_report.json, quality_scores.png).
"""

import functools
import json
import logging
import re

import numpy as np
from datatrove.data import Document
from datatrove.utils.word_tokenizers import WordTokenizer

from phi_jax.curation import records
from phi_jax.curation.records import CorpusError
from phi_jax.files import local_path, replacing

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 20
SCORE_BATCH = 64


class RegexWords(WordTokenizer):
    """Words and runs of punctuation (datatrove's English tokenizer is spaCy's, a heavy dependency)."""

    _WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]+")
    _SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")

    def word_tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._SENTENCE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._SENTENCE.finditer(text) if m.group().strip()]


def _rules():
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    words = RegexWords()
    return {"gopher_quality": lambda: GopherQualityFilter(language=words),
            "gopher_repetition": lambda: GopherRepetitionFilter(language=words),
            "c4": lambda: C4QualityFilter(language=words)}


def _check(rules: list[str]) -> list:
    known = _rules()
    unknown = [r for r in rules if r not in known]
    if unknown or not rules:
        raise CorpusError(f"--rules {','.join(rules)}: expected some of {','.join(known)}")
    return [(name, known[name]()) for name in rules]


def _heuristics(recs, stats: dict, *, rules: list[str]):
    filters = _check(rules)
    stats.update(docs_in=0, dropped_by={})
    for record in recs:
        stats["docs_in"] += 1
        doc = Document(text=record.text, id=record.id)
        for name, rule in filters:
            verdict = rule.filter(doc)
            if verdict is not True and not (isinstance(verdict, tuple) and verdict[0]):
                reason = f"{name}:{verdict[1] if isinstance(verdict, tuple) else 'failed'}"
                stats["dropped_by"][reason] = stats["dropped_by"].get(reason, 0) + 1
                break
        else:
            yield record.row


def heuristics(in_dir, out_dir, *, rules=("gopher_quality", "gopher_repetition"), workers: int = 1) -> dict:
    rules = list(rules)
    _check(rules)
    out_dir = local_path(out_dir)
    states = records.curate_files(in_dir, out_dir, "filter_heuristics", functools.partial(_heuristics, rules=rules),
                                  workers=workers)
    dropped = {}
    for s in states:
        for reason, n in s["dropped_by"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    result = _counts(states) | {"dropped_by": dict(sorted(dropped.items())), "rules": rules,
                                "bad_records": records.bad_summary(states)}
    with replacing(out_dir / "filter_report.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return _counts(states)


def _counts(states) -> dict:
    docs_in, docs_out = sum(s["docs_in"] for s in states), sum(s["docs_out"] for s in states)
    return {"docs_in": docs_in, "docs_out": docs_out, "removed": docs_in - docs_out}


def _batches(recs, size: int = SCORE_BATCH):
    batch = []
    for record in recs:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _score(recs, stats: dict, *, classifier, threshold: float):
    stats.update(docs_in=0, histogram=[0] * HISTOGRAM_BINS)
    for batch in _batches(recs):
        scores = classifier.scores([r.text for r in batch])
        stats["docs_in"] += len(batch)
        counts, _ = np.histogram(scores, HISTOGRAM_BINS, (0.0, 1.0))
        stats["histogram"] = [a + int(b) for a, b in zip(stats["histogram"], counts)]
        for record, score in zip(batch, scores.tolist()):
            if score >= threshold:
                yield {**record.row, "quality_score": round(score, 6)}


def apply(in_dir, out_dir, classifier_dir, *, threshold: float = 0.5, workers: int = 1) -> dict:
    from phi_jax.curation import classifier as classifier_lib

    if not 0 <= threshold <= 1:
        raise CorpusError(f"--threshold {threshold}: expected a probability between 0 and 1")
    classifier = classifier_lib.load(classifier_dir)
    if classifier.features == "embeddings" and workers > 1:
        logger.warning("filter apply: embeddings run in one process (the model is not shared across forks)")
        workers = 1
    out_dir = local_path(out_dir)
    states = records.curate_files(in_dir, out_dir, "filter_apply",
                                  functools.partial(_score, classifier=classifier, threshold=threshold),
                                  workers=workers)
    histogram = [sum(h) for h in zip(*(s["histogram"] for s in states))]
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1).round(4).tolist()
    result = _counts(states) | {"threshold": threshold, "classifier": str(classifier_dir),
                                "features": classifier.features, "histogram": {"edges": edges, "counts": histogram},
                                "histogram_png": "quality_scores.png", "bad_records": records.bad_summary(states)}
    _plot(histogram, edges, threshold, out_dir / "quality_scores.png")
    with replacing(out_dir / "filter_report.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return _counts(states)


def _plot(counts, edges, threshold: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
    ax.set(xlabel="quality score (P(good))", ylabel="documents", title=f"{sum(counts):,} documents")
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
