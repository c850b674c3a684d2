"""phi-jax data decontaminate: items of every benchmark planted verbatim, normalized and with 5% of
their words changed, against the issue's recall targets; clean text (Python's standard library)
against its false-positive target; excise, report_only, resuming after kill -9."""

import json
import pathlib
import re
import sysconfig

import pytest

from phi_jax import cli
from phi_jax.curation import records
from phi_jax.evaluation import tasks as eval_tasks
from tests.curation_benchmarks import rendered_items, write_eval_data
from tests.curation_corpus import kill_when_done, read_corpus, vocabulary, write_corpus_file


def run_decontaminate(capsys, *argv) -> dict:
    assert cli.main(["data", "decontaminate", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def filler(rng, words, n=80) -> str:
    return " ".join(words[i] for i in rng.integers(0, len(words), n))


def ordinary_text(num_docs: int, words_per_doc: int = 150) -> list[str]:
    """Chunks of Python's standard library (English docstrings and comments, and code)."""
    texts = []
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        tokens = path.read_text(errors="replace").split(" ")
        texts += [" ".join(tokens[i:i + words_per_doc]) for i in range(0, len(tokens), words_per_doc)]
        if len(texts) >= num_docs:
            return texts[:num_docs]
    raise AssertionError("the standard library is smaller than expected")


@pytest.fixture
def eval_data(tmp_path, rng):
    words = vocabulary(rng)
    write_eval_data(tmp_path / "eval", rng, words)
    return tmp_path / "eval", words


def test_planted_benchmark_items_are_found_and_clean_text_is_left(tmp_path, rng, eval_data, capsys):
    eval_dir, words = eval_data
    plants = rendered_items(eval_dir)
    assert {task for task, _, _ in plants} == set(eval_tasks.TASKS)

    def perturbed(text):  # 5% of the words (at least one) replaced by random ones
        tokens = text.split(" ")
        for j in rng.choice(len(tokens), max(1, round(0.05 * len(text.split()))), replace=False):
            tokens[j] = words[int(rng.integers(len(words)))]
        return " ".join(tokens)

    variants = {"verbatim": lambda t: t, "normalized": lambda t: re.sub(r"[\W_]+", "  ", t).upper(),
                "perturbed": perturbed}
    planted, clean = {}, ordinary_text(2000)
    for kind, change in variants.items():
        rows = [{"id": f"{kind}-{i}", "text": f"{filler(rng, words)}\n{change(text)}\n{filler(rng, words)}"}
                for i, (_, _, text) in enumerate(plants)]
        write_corpus_file(tmp_path / "in" / f"{kind}.jsonl", rows)
        planted[kind] = {row["id"]: plant[:2] for row, plant in zip(rows, plants)}
    write_corpus_file(tmp_path / "in" / "clean" / "stdlib.jsonl.gz",
                      [{"id": f"clean-{i}", "text": t} for i, t in enumerate(clean)])

    counts = run_decontaminate(capsys, tmp_path / "in", tmp_path / "out", "--eval_data", eval_dir)

    report = json.loads((tmp_path / "out" / "decontamination_report.json").read_text())
    found = {(h["record"], h["task"], h["item"]) for h in report["hits"]}
    recall = {kind: sum((record, *item) in found for record, item in ids.items()) / len(ids)
              for kind, ids in planted.items()}
    flagged_clean = {h["record"] for h in report["hits"] if h["record"].startswith("clean-")}
    assert recall["verbatim"] >= 0.99 and recall["normalized"] >= 0.99 and recall["perturbed"] >= 0.95, recall
    assert len(flagged_clean) <= 0.001 * len(clean), [h for h in report["hits"] if h["record"] in flagged_clean]
    assert set(counts["by_task"]) == set(eval_tasks.TASKS) and all(counts["by_task"].values())
    assert counts["docs_in"] == 3 * len(plants) + len(clean) and counts["removed"] == len({h["record"] for h in
                                                                                           report["hits"]})
    kept = {row["id"] for rows in read_corpus(tmp_path / "out").values() for row in rows}
    assert len(kept) == counts["docs_out"] == counts["docs_in"] - counts["removed"]
    assert not kept & {h["record"] for h in report["hits"]}
    humaneval = report["tasks"]["humaneval"]
    assert humaneval["items"] == 164 and humaneval["items_hit"] >= 0.99 * 164
    assert all(h["matched"] for h in report["hits"])


def test_excise_cuts_the_match_with_its_surroundings_and_drops_what_is_too_short(tmp_path, rng, eval_data, capsys):
    eval_dir, words = eval_data
    _, item, text = next(p for p in rendered_items(eval_dir, ["gsm8k"]))
    before, after = filler(rng, words, 200), filler(rng, words, 200)
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"id": "long", "text": f"{before}\n{text}\n{after}", "n": 1},
                                                    {"id": "short", "text": f"see: {text}"}])

    counts = run_decontaminate(capsys, tmp_path / "in", tmp_path / "out", "--eval_data", eval_dir,
                               "--tasks", "gsm8k,mbpp", "--mode", "excise")

    assert counts == {"docs_in": 2, "docs_out": 1, "removed": 1, "by_task": {"gsm8k": 2, "mbpp": 0}, "excised": 1}
    (row,) = read_corpus(tmp_path / "out")["a.jsonl"]
    assert row["id"] == "long" and row["n"] == 1
    assert before[:-250] in row["text"] and after[250:] in row["text"] and text[20:60] not in row["text"]
    assert len(row["text"]) < len(before) + len(after) - 100  # some of the 200 characters around went too


def test_report_only_writes_the_report_and_no_corpus(tmp_path, rng, eval_data, capsys):
    eval_dir, words = eval_data
    _, _, text = next(p for p in rendered_items(eval_dir, ["boolq"]))
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"text": text}, {"text": filler(rng, words)}, "{bad\n"])

    counts = run_decontaminate(capsys, tmp_path / "in", tmp_path / "out", "--eval_data", eval_dir, "--report_only")

    assert counts["docs_in"] == 2 and counts["removed"] == 1 and counts["by_task"]["boolq"] == 1
    report = json.loads((tmp_path / "out" / "decontamination_report.json").read_text())
    assert report["hits"][0]["record"] == "a.jsonl:1" and report["bad_records"]["examples"][0].startswith("a.jsonl:3:")
    assert not (tmp_path / "out" / "a.jsonl").exists()


def test_a_named_benchmark_that_is_missing_is_an_error_and_all_reports_what_it_skipped(tmp_path, rng, capsys):
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"text": "nothing to see here at all"}])
    (tmp_path / "eval").mkdir()
    assert cli.main(["data", "decontaminate", str(tmp_path / "in"), str(tmp_path / "o1"), "--eval_data",
                     str(tmp_path / "eval"), "--tasks", "piqa"]) == 2
    assert "piqa: none of piqa is a directory" in capsys.readouterr().err
    assert cli.main(["data", "decontaminate", str(tmp_path / "in"), str(tmp_path / "o2"), "--eval_data",
                     str(tmp_path / "eval"), "--tasks", "piqa,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err

    counts = run_decontaminate(capsys, tmp_path / "in", tmp_path / "o3", "--eval_data", tmp_path / "eval")

    assert counts["by_task"] == {"humaneval": 0}
    missing = json.loads((tmp_path / "o3" / "decontamination_report.json").read_text())["tasks_not_indexed"]
    assert set(missing) == set(eval_tasks.TASKS) - {"humaneval"}


def test_a_run_killed_with_sigkill_resumes_from_the_files_it_finished(tmp_path, rng, eval_data, capsys):
    eval_dir, words = eval_data
    plants = rendered_items(eval_dir, ["humaneval"])
    for f in range(8):
        rows = [{"id": f"{f}-{i}", "text": filler(rng, words, 1000)} for i in range(300)]
        rows[f] = {"id": f"{f}-planted", "text": plants[f][2]}
        write_corpus_file(tmp_path / "in" / f"part{f}.jsonl", rows)
    out = tmp_path / "out"
    states = out / records.STATE_DIR / "decontaminate"
    finished_before = kill_when_done(["data", "decontaminate", tmp_path / "in", out, "--eval_data", eval_dir,
                                      "--tasks", "humaneval"], states, 2)
    assert 2 <= len(finished_before) < 8, "the kill came too late to test resuming"

    counts = run_decontaminate(capsys, tmp_path / "in", out, "--eval_data", eval_dir, "--tasks", "humaneval")

    assert {p.name: p.stat().st_mtime_ns for p in states.iterdir() if p.name in finished_before} == finished_before
    assert counts == {"docs_in": 2400, "docs_out": 2392, "removed": 8, "by_task": {"humaneval": 8}}
    assert sorted(read_corpus(out)) == [f"part{f}.jsonl" for f in range(8)]
