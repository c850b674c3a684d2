"""One `phi-jax data synth` run: plan -> prompts -> the requests not yet written -> generator -> DIR.

Each request's id is its plan index and a hash of its plan entry, its prompt and the generation
settings; a run sends only the requests whose ids are not in DIR (writer.OutputDir). DIR/settings.json
keeps the generation settings of the first run: a run with other ones is refused, not mixed in.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import re
import sys
import time

from phi_jax.synth import SynthError
from phi_jax.synth.generators import Request
from phi_jax.synth.plan import AUDIENCES, build_plan, settle_plan
from phi_jax.synth.topics import read_seed_documents, read_topics
from phi_jax.synth.writer import OutputDir

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
# The start of a reply that declines the task (checked on its first 200 characters, case-insensitively).
REFUSAL = re.compile(r"^\W*(i'm sorry|i am sorry|sorry,|i apologi[sz]e|i cannot|i can't|i can not|i won't|"
                     r"i'm unable|i am unable|i'm not able|as an ai\b|as a language model)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Options:
    num_samples: int = 100
    seed: int = 0
    styles: tuple[str, ...] = ("textbook", "code_textbook", "code_exercises", "story", "qa", "blog")
    audiences: tuple[str, ...] = tuple(AUDIENCES)
    extract_chars: int = 1000
    validation_every: int = 20  # plan entries i with i % validation_every == validation_every - 1; 0: none
    min_words: int = 50
    price_per_million: tuple[float, float] | None = None
    progress: bool = True
    # text -> the benchmark items it holds (benchmark_checker); rows whose completion or prompt (its web
    # seed extract) holds one are flagged "contaminated"
    contamination: object = None
    near_duplicates: bool = False  # the report runs phi_jax.curation.dedup over the good rows
    # A dead fleet should not spend hours failing every request in turn: stop after this many final
    # failures in a row (0: never). What is written stays; the next run resumes.
    max_failures_in_a_row: int = 100


def request_id(entry: dict, prompt: str, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"entry": entry, "prompt": prompt, "settings": settings},
                                       sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{entry['index']:07d}-{digest[:16]}"


def benchmark_checker(eval_data):
    """text -> ["task:item id", ...] of the benchmark items it holds: phi_jax.curation.decontaminate's
    index of every benchmark `phi-jax eval` reads under `eval_data` (HumanEval from its package)."""
    from phi_jax.curation import decontaminate

    items, missing = decontaminate.benchmark_items(eval_data, "all")
    for name, why in missing.items():
        log.warning("--eval_data: %s not indexed: %s", name, why)
    index = decontaminate.build_index(items, missing)

    def items_in(text: str) -> list[str]:
        found = decontaminate.find_hits(index, [decontaminate.words_of(text)]).get(0, {})
        return sorted(f"{index.items[owner][0]}:{index.items[owner][1]}" for owner in found)

    return items_in


def flags(completion, min_words: int) -> list[str]:
    """Why a completion stays out of training: cut by max_tokens, empty, too short, a refusal."""
    text = completion.text.strip()
    found = ["max_tokens"] if completion.finish_reason == "length" else []
    if not text:
        return found + ["empty"]
    if len(text.split()) < min_words:
        found.append("too_short")
    if REFUSAL.search(text[:200]):
        found.append("refusal")
    return found


def _check_settings(root: pathlib.Path, settings: dict) -> None:
    from phi_jax.files import replacing

    path = root / SETTINGS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise SynthError(f"{path}: {root} was generated with {k}={saved.get(k)!r}, this run asks for "
                             f"{k}={settings.get(k)!r}: resume with the same settings, or write to a new --out")
        return
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


def _validate(options: Options, templates) -> None:
    templates.check_styles(options.styles)
    unknown = [a for a in options.audiences if a not in AUDIENCES]
    if unknown:
        raise SynthError(f"--audiences: unknown {', '.join(unknown)} (expected some of {', '.join(AUDIENCES)})")


class _Progress:
    """Counts, the rows, and the progress bar (requests/s, tokens/s) as results arrive."""

    def __init__(self, output: OutputDir, plan_by_id: dict, options: Options, total: int):
        from tqdm import tqdm

        self.output, self.plan_by_id, self.options = output, plan_by_id, options
        self.counts = {"completed": 0, "failed": 0, "flagged": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.failures_in_a_row = 0
        self.start = time.monotonic()
        self.bar = tqdm(total=total, unit="req", file=sys.stderr, disable=not options.progress, mininterval=0.5)

    def __call__(self, request, completion, error):
        entry = self.plan_by_id[request.id]
        if completion is None:
            self.counts["failed"] += 1
            self.output.append("failed", {"id": request.id, "index": entry["index"], "error": error,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            log.warning("request %s failed: %s", request.id, error)
            self.failures_in_a_row += 1
            limit = self.options.max_failures_in_a_row
            if limit and self.failures_in_a_row >= limit:
                raise SynthError(f"{limit} requests in a row failed (the last: {error}); stopping. What is "
                                 f"written is kept: fix the generator and re-run the same command to resume")
        else:
            self.failures_in_a_row = 0
            self._write(request, entry, completion)
        self.bar.update(1)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix({"tok/s": f"{self.counts['completion_tokens'] / elapsed:.0f}",
                              "failed": self.counts["failed"]}, refresh=False)

    def _write(self, request, entry, completion):
        c, o = self.counts, self.options
        c["completed"] += 1
        c["prompt_tokens"] += completion.prompt_tokens
        c["completion_tokens"] += completion.completion_tokens
        row = {"id": request.id, "text": completion.text.strip(), "prompt": request.prompt,
               **{k: entry[k] for k in ("topic", "subtopic", "audience", "style", "seed_id")},
               "model": completion.model, "finish_reason": completion.finish_reason,
               "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}}
        found = flags(completion, o.min_words)
        # The prompt holds the web seed extract: a benchmark item in it may come back paraphrased.
        benchmark_items = (sorted(set(o.contamination(row["text"])) | set(o.contamination(request.prompt)))
                           if o.contamination else [])
        if benchmark_items:
            found.append("contaminated")
            row["contamination"] = benchmark_items
        if found:
            c["flagged"] += 1
            self.output.append("flagged", {**row, "flags": found})
        elif o.validation_every and entry["index"] % o.validation_every == o.validation_every - 1:
            self.output.append("validation", row)
        else:
            self.output.append("train", row)

    def close(self):
        self.bar.close()


def synthesize(topics_file, out_dir, generator, templates, options: Options, seed_data=None) -> dict:
    """Runs (or resumes) the generation into `out_dir`; returns the summary the command prints last."""
    from phi_jax.synth.report import write_report

    topics = read_topics(topics_file)
    _validate(options, templates)
    documents = read_seed_documents(seed_data) if seed_data else None
    plan = build_plan(options.num_samples, topics, documents, list(options.styles), list(options.audiences),
                      options.seed, options.extract_chars)
    api = generator.settings["api"]
    with OutputDir(out_dir) as output:
        _check_settings(output.root, generator.settings)
        plan = settle_plan(output.root, plan)
        requests, plan_by_id = [], {}
        for entry in plan:
            prompt = templates.render(entry, AUDIENCES[entry["audience"]], api)
            request = Request(request_id(entry, prompt, generator.settings), prompt)
            requests.append(request)
            plan_by_id[request.id] = entry
        todo = [r for r in requests if r.id not in output.done]
        retrying = sum(r.id in output.failed_before for r in todo)
        log.info("%d requests planned: %d already written, %d to send (%d failed before)", len(requests),
                 len(requests) - len(todo), len(todo), retrying)
        progress = _Progress(output, plan_by_id, options, len(todo))
        try:
            if todo:
                generator.check()
                generator.run(todo, progress)
        finally:
            progress.close()
    write_report(out_dir, options.price_per_million, options.near_duplicates)
    counts = progress.counts
    summary = {"completed": counts["completed"], "failed": counts["failed"],
               "skipped_existing": len(requests) - len(todo), "prompt_tokens": counts["prompt_tokens"],
               "completion_tokens": counts["completion_tokens"], "flagged": counts["flagged"]}
    if options.price_per_million:
        prompt_price, completion_price = options.price_per_million
        summary["cost_usd"] = round((counts["prompt_tokens"] * prompt_price
                                     + counts["completion_tokens"] * completion_price) / 1e6, 6)
    return summary
