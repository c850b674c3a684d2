"""The plan: what each request asks for, a pure function of the topics, seed documents, styles,
audiences and --seed, saved as DIR/plan.jsonl so that a resumed run follows it.

Entry i draws its topic in turn (i mod the number of topics, so every topic is covered evenly), and
its subtopic, style, audience and web extract from a random stream of its own (seeded by --seed and
i): the first N entries of a plan of M > N samples are the plan of N samples, so a run asked for more
samples later extends its plan rather than changing it.
"""

import json
import logging
import pathlib
import random

from phi_jax.synth import SynthError
from phi_jax.synth.topics import extract

log = logging.getLogger(__name__)

PLAN_FILE = "plan.jsonl"

# Audience name -> how a prompt describes the reader.
AUDIENCES = {
    "young_children": "young children (about 5 to 8 years old): very simple words, short sentences, everyday "
                      "examples",
    "middle_school": "middle school students: clear explanations, concrete examples, no jargon",
    "high_school": "high school students: precise explanations with worked examples",
    "college": "college students: rigorous, with definitions, derivations and exercises",
    "professionals": "working professionals: practical, concise, with real-world applications",
    "researchers": "researchers in the field: technical depth, precise terminology, open questions",
    "general": "a general adult audience: engaging and accessible",
}


def build_plan(num_samples: int, topics, documents, styles, audiences, seed: int, extract_chars: int) -> list[dict]:
    """Entries 0..num_samples-1 (see the module doc). A topic with seed_ids takes its extracts from those
    of its documents that are in `documents`, else from all of them."""
    by_id = {d.seed_id: d for d in documents or ()}
    everything = list(by_id)
    pools = {t.name: [s for s in t.seed_ids if s in by_id] or everything for t in topics}
    plan = []
    for index in range(num_samples):
        rng = random.Random(f"{seed}:{index}")
        topic = topics[index % len(topics)]
        entry = {"index": index, "topic": topic.name,
                 "subtopic": rng.choice(topic.subtopics) if topic.subtopics else None,
                 "style": rng.choice(styles), "audience": rng.choice(audiences), "seed_id": None, "extract": None}
        pool = pools[topic.name]
        if pool:
            document = by_id[pool[rng.randrange(len(pool))]]
            entry["seed_id"], entry["extract"] = document.seed_id, extract(document.text, extract_chars)
        plan.append(entry)
    return plan


def _read_plan(path: pathlib.Path) -> list[dict]:
    from phi_jax.files import read_json_lines

    return [entry for _, entry in read_json_lines(path)]


def settle_plan(out_dir, plan: list[dict]) -> list[dict]:
    """The plan of this run: `plan`, checked against the one an earlier run saved in DIR/plan.jsonl (the
    entries both have must agree: else the inputs changed, and resuming would mix two plans), and saved."""
    from phi_jax.files import replacing

    path = pathlib.Path(out_dir) / PLAN_FILE
    if path.exists():
        saved = _read_plan(path)
        for old, new in zip(saved, plan):
            if old != new:
                field = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
                raise SynthError(
                    f"{path}: entry {old.get('index')} was planned with {field}={old.get(field)!r}, this run plans "
                    f"{field}={new.get(field)!r}: the topics, --seed_data, --styles, --audiences, --seed or "
                    f"--extract_chars changed since that run. Resume with the same inputs, or write to a new --out")
        if len(saved) >= len(plan):
            return plan
        log.info("extending %s from %d to %d entries", path, len(saved), len(plan))
    with replacing(path) as tmp:
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in plan), encoding="utf-8")
    return plan
