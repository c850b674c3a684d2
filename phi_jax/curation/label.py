"""`phi-jax data filter label IN_DIR LABELS --endpoint URL --model NAME`: grades for the classifier.

A seeded uniform sample of `--num` documents (the smallest hashes of seed and id: the same command
picks the same documents, a larger `--num` the same and more) is graded for educational value by a
model behind an OpenAI-compatible endpoint (phi-1 asked GPT-4; `phi-jax serve --chat_template ...` or
any vLLM server works), through the synthetic-data generator's client (phi_jax/synth:
round-robin over endpoints, concurrent requests, retries), chat API by default. Each grade is
appended to LABELS (JSON lines: id, text, score, reply, model) as it arrives, so a run stopped at
any point resumes with the documents not yet graded; a line cut short by a kill is dropped on
resume. A reply without a number is kept with "score": null and counted.
"""

import hashlib
import heapq
import json
import logging
import os
import re

from phi_jax.curation import records
from phi_jax.curation.records import CorpusError
from phi_jax.files import local_path

logger = logging.getLogger(__name__)

MAX_CHARS = 4000  # of each document shown to the grader
MAX_SCORE = 5
PROMPT = ("Here is a document from a corpus for training a language model. Determine its educational value "
          "for a student whose goal is to learn: is it clear, correct, self-contained and instructive, like a "
          "good textbook or tutorial? Rate it from 0 (no educational value: spam, boilerplate, gibberish) to "
          f"{MAX_SCORE} (excellent). Reply with the number only.\n\n--- document ---\n{{text}}\n--- end ---")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def grade_of(reply: str) -> float | None:
    """The first number of a reply, if it is a grade 0..MAX_SCORE."""
    match = _NUMBER.search(reply or "")
    if match and 0 <= float(match.group()) <= MAX_SCORE:
        return float(match.group())
    return None


def sample(in_dir, num: int, seed: int = 0) -> list[records.Record]:
    """`num` records drawn uniformly from the corpus (all if it has fewer), in corpus order: those with
    the smallest hash of (seed, id), so a larger --num takes the same documents and more."""
    def key(pair):
        digest = hashlib.blake2b(f"{seed}:{pair[1].id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little"), pair[0]

    def stream():
        for rel in records.corpus_files(in_dir):
            yield from records.read_records(local_path(in_dir) / rel, rel, [])

    chosen = heapq.nsmallest(num, enumerate(stream()), key=key)
    return [record for _, record in sorted(chosen, key=lambda pair: pair[0])]


def _graded_ids(path) -> set[str]:
    """The ids already in LABELS, after dropping a last line cut short by a kill."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    ids = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorpusError(f"{path}:{number}: not a line `filter label` wrote; use a new LABELS file") from None
    return ids


def openai_generator(endpoints: list[str], model: str, *, api: str = "chat", concurrency: int = 8):
    """The synthetic-data generator's client (phi_jax/synth/generators.py: round-robin over the
    endpoints, `concurrency` requests in flight, retries), greedy and short: a grade is one number."""
    from phi_jax.synth.generators import OpenAIGenerator, Sampling

    generator = OpenAIGenerator(endpoints, model, api=api, concurrency=concurrency,
                                sampling=Sampling(max_tokens=8, temperature=0.0),
                                api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    generator.check()
    return generator


def label(in_dir, labels_path, *, generator, model: str, num: int = 1000, seed: int = 0) -> dict:
    """Grades a sample of the corpus with `generator` (`run(requests, on_done)`, as the synthetic-data
    generators have), appending to `labels_path`; returns counts. A request that finally failed is
    counted and left for the next run."""
    from tqdm import tqdm

    from phi_jax.synth.generators import Request

    path = local_path(labels_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _graded_ids(path)
    todo = {r.id: r for r in sample(in_dir, num, seed) if r.id not in done}
    counts = {"labeled": 0, "total": len(done), "unparsed": 0, "failed": 0}
    with open(path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="filter label", unit="doc") as bar:
        def on_done(request, completion, error):
            bar.update()
            if completion is None:
                counts["failed"] += 1
                logger.warning("filter label: %s: %s", request.id, error)
                return
            score = grade_of(completion.text)
            counts["unparsed"] += score is None
            counts["labeled"] += 1
            counts["total"] += 1
            out.write(json.dumps({"id": request.id, "text": todo[request.id].text, "score": score,
                                  "reply": completion.text, "model": model}, ensure_ascii=False) + "\n")
            out.flush()

        generator.run([Request(r.id, PROMPT.format(text=r.text[:MAX_CHARS])) for r in todo.values()], on_done)
    return counts
