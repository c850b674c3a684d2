"""Synthetic textbooks: phi's own training data, made by `phi-jax data synth` (and `phi-jax data topics`).

    topics.py      topics files; topics from a web corpus (clustering) and subtopics from a generator
    plan.py        the deterministic plan: topic x audience x style x web extract, saved as plan.jsonl
    templates/     the prompts, one Jinja file per style (copy and edit them, --templates DIR)
    generators.py  one interface over OpenAI-compatible endpoints (a fleet) and an in-process checkpoint
    writer.py      append-only JSONL shards that resume exactly; train/validation split; flagged rows
    report.py      report.json and report.png: counts, lengths, distinct n-grams
    run.py         the run: plan -> prompts -> requests not yet written -> generator -> writer -> report
    cli.py         the two commands

Only cli.py is imported by `phi-jax --help`; it imports the rest (openai, aiohttp, jinja2, scikit-learn,
matplotlib) when a command runs.
"""

from phi_jax.errors import PhiJaxError


class SynthError(PhiJaxError, ValueError):
    """A bad input to `phi-jax data synth` or `phi-jax data topics`: names the file, field, flag or URL."""
