"""DIR/report.json and DIR/report.png: what a synth directory holds, written after each run.

Counts of rows by kind (train, validation, flagged, failed), by topic, style and audience; flags;
length distributions (words, completion tokens); token usage (and cost, given prices); diversity as
distinct n-grams (unique n-grams / all n-grams, n = 1..4, over the first MAX_DIVERSITY_ROWS good rows);
with `near_duplicates`, the share of good rows that `phi-jax data dedup` (phi_jax.curation.dedup:
MinHash, word 5-gram Jaccard >= 0.8, and exact copies) would remove.
"""

import collections
import json
import logging
import os
import pathlib
import tempfile

from phi_jax.synth.writer import part_files, read_rows

log = logging.getLogger(__name__)

REPORT_FILE, PLOT_FILE = "report.json", "report.png"
MAX_DIVERSITY_ROWS = 20_000


def distinct_ngrams(texts, n_max: int = 4) -> dict[str, float]:
    """{"distinct_1": unique unigrams / all unigrams, ...}: 1.0 is no repetition, near 0 a corpus of copies."""
    unique = [set() for _ in range(n_max)]
    totals = [0] * n_max
    for text in texts:
        words = text.lower().split()
        for n in range(1, n_max + 1):
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            unique[n - 1].update(grams)
            totals[n - 1] += len(grams)
    return {f"distinct_{n}": round(len(unique[n - 1]) / totals[n - 1], 4) if totals[n - 1] else 0.0
            for n in range(1, n_max + 1)}


def near_duplicates(root) -> dict:
    """What phi_jax.curation.dedup removes of DIR/train and DIR/validation (it runs in a scratch directory)."""
    from phi_jax.curation.dedup import dedup

    root = pathlib.Path(root)
    with tempfile.TemporaryDirectory(prefix=".dedup-", dir=root) as scratch:
        corpus = pathlib.Path(scratch) / "in"
        for kind in ("train", "validation"):
            for path in part_files(root, kind):
                (corpus / kind).mkdir(parents=True, exist_ok=True)
                os.symlink(path.resolve(), corpus / kind / path.name)
        if not corpus.exists():
            return {"rows": 0, "removed": 0, "rate": 0.0}
        counts = dedup(corpus, pathlib.Path(scratch) / "out")
    return {"rows": counts["docs_in"], "removed": counts["removed"], "clusters": counts["clusters"],
            "rate": round(counts["removed"] / max(1, counts["docs_in"]), 4)}


def _percentiles(values) -> dict:
    import numpy as np

    if not values:
        return {}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {"min": int(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]), "max": int(q[4]),
            "mean": round(float(np.mean(values)), 2)}


def build_report(root, price_per_million: tuple[float, float] | None = None,
                 with_near_duplicates: bool = False) -> tuple[dict, list[int]]:
    """(the report, the word count of each good row)."""
    root = pathlib.Path(root)
    rows = {kind: list(read_rows(root, kind)) for kind in ("train", "validation", "flagged", "failed")}
    done = {r["id"] for kind in ("train", "validation", "flagged") for r in rows[kind]}
    good = rows["train"] + rows["validation"]
    words = [len(r["text"].split()) for r in good]
    usage = collections.Counter()
    for row in good + rows["flagged"]:
        usage.update({k: row.get("usage", {}).get(k, 0) for k in ("prompt_tokens", "completion_tokens")})
    report = {
        "rows": {"train": len(rows["train"]), "validation": len(rows["validation"]), "flagged": len(rows["flagged"]),
                 "failed": len({r["id"] for r in rows["failed"]} - done)},
        "by_topic": dict(collections.Counter(r["topic"] for r in good).most_common()),
        "by_style": dict(collections.Counter(r["style"] for r in good).most_common()),
        "by_audience": dict(collections.Counter(r["audience"] for r in good).most_common()),
        "flags": dict(collections.Counter(f for r in rows["flagged"] for f in r.get("flags", ())).most_common()),
        "words": _percentiles(words),
        "completion_tokens": _percentiles([r.get("usage", {}).get("completion_tokens", 0) for r in good]),
        "usage": dict(usage),
        "diversity": distinct_ngrams(r["text"] for r in good[:MAX_DIVERSITY_ROWS]),
        "models": sorted({r["model"] for r in good + rows["flagged"]}),
    }
    if with_near_duplicates:
        report["near_duplicates"] = near_duplicates(root)
    if price_per_million:
        report["cost_usd"] = round((usage["prompt_tokens"] * price_per_million[0]
                                    + usage["completion_tokens"] * price_per_million[1]) / 1e6, 6)
    return report, words


def plot(report: dict, words: list[int], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, key, title in ((axes[0, 0], "by_topic", "rows by topic (top 30)"), (axes[0, 1], "by_style", "by style"),
                           (axes[1, 0], "by_audience", "by audience")):
        items = list(report[key].items())[:30][::-1]
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
    ax = axes[1, 1]
    ax.hist(words, bins=40)
    ax.set_title("words per row; distinct 1..4-grams: "
                 + ", ".join(f"{v:.2f}" for v in report["diversity"].values()), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)


def write_report(root, price_per_million=None, with_near_duplicates: bool = False) -> dict:
    from phi_jax.files import replacing

    root = pathlib.Path(root)
    report, words = build_report(root, price_per_million, with_near_duplicates)
    with replacing(root / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with replacing(root / PLOT_FILE) as tmp:
        plot(report, words, tmp)
    return report
