"""phi-jax data dedup: planted exact and near duplicates, the issue's recall and precision targets,
bad records, and resuming after kill -9."""

import json

import pytest

from phi_jax import cli
from phi_jax.curation import records
from tests.curation_corpus import document, kill_when_done, perturbed, read_corpus, vocabulary, write_corpus_file


def run_dedup(capsys, *argv) -> dict:
    assert cli.main(["data", "dedup", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_planted_near_duplicates_are_caught_and_distant_pairs_kept(tmp_path, rng, capsys):
    words = vocabulary(rng)
    near, far, files = [], [], {"web/a.jsonl": [], "web/b.jsonl.gz": [], "code/c.parquet": []}
    names = list(files)

    def add(text):
        count = sum(map(len, files.values()))
        files[names[count % 3]].append({"id": f"d{count}", "text": text, "source": "test"})
        return f"d{count}"

    for _ in range(100):
        base = document(rng, words)
        near.append((add(" ".join(base)), add(perturbed(rng, words, base, 0.8, 0.95))))
    for _ in range(150):
        base = document(rng, words)
        far.append((add(" ".join(base)), add(perturbed(rng, words, base, 0.3, 0.5))))
    exact = []
    for _ in range(10):  # the same text up to case, punctuation and whitespace: one of each pair goes
        text = " ".join(document(rng, words))
        exact.append((add(text), add("  " + text.upper().replace(" ", " ,\n") + "!")))
    short = [(add("too short"), add("Too  short!"))]  # fewer words than the n-gram: matched whole
    singles = [add(" ".join(document(rng, words))) for _ in range(50)]
    for rel, rows in files.items():
        write_corpus_file(tmp_path / "in" / rel, rows)

    counts = run_dedup(capsys, tmp_path / "in", tmp_path / "out")

    out = read_corpus(tmp_path / "out")
    assert sorted(out) == sorted(files)
    kept = [row["id"] for rows in out.values() for row in rows]
    assert len(kept) == len(set(kept)) and all(row["source"] == "test" for rows in out.values() for row in rows)
    kept = set(kept)
    assert all(a in kept or b in kept for a, b in near + far + exact + short), "a whole cluster went"
    recall = sum(not (a in kept and b in kept) for a, b in near) / len(near)
    distant_removed = sum(not (a in kept and b in kept) for a, b in far) / len(far)
    assert recall >= 0.90 and distant_removed <= 0.05, (recall, distant_removed)
    assert all(not (a in kept and b in kept) for a, b in exact + short) and set(singles) <= kept
    docs_in = sum(map(len, files.values()))
    assert counts["docs_in"] == docs_in and counts["docs_out"] == len(kept) == docs_in - counts["removed"]

    report = json.loads((tmp_path / "out" / "dedup_report.json").read_text())
    assert report["clusters"] == counts["clusters"] == len(report["cluster_members"])
    members = {c["kept"]: set(c["removed"]) for c in report["cluster_members"]}
    assert set(members) <= kept and not set().union(*members.values()) & kept
    for a, b in exact:
        assert members.get(a) == {b} or members.get(b) == {a}
    assert all(c["exact"] for c in report["cluster_members"] if c["kept"] in {x for pair in exact for x in pair})


def test_bad_records_are_counted_with_file_and_line_and_never_stop_the_run(tmp_path, capsys):
    good = {"text": "a perfectly ordinary document about birds and trees", "id": "ok"}
    write_corpus_file(tmp_path / "in" / "a.jsonl", [good, "not json\n", [1, 2], {"id": "x", "text": 3}, good])
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")

    counts = run_dedup(capsys, tmp_path / "in", tmp_path / "out")

    assert counts == {"docs_in": 2, "docs_out": 1, "removed": 1, "clusters": 1, "bad_records": 4}
    bad = json.loads((tmp_path / "out" / "dedup_report.json").read_text())["bad_records"]["examples"]
    assert [b.split(": ")[0] for b in bad] == ["a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "b.jsonl.gz:-1"]
    assert "not JSON" in bad[0] and "not an object" in bad[1] and "no 'text' string" in bad[2]
    assert [r.id for r in records.read_records(tmp_path / "out" / "a.jsonl", "a.jsonl", [])] == ["ok"]


def test_an_empty_or_missing_corpus_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["data", "dedup", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no **/*.jsonl" in capsys.readouterr().err
    assert cli.main(["data", "dedup", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_dedup_killed_with_sigkill_resumes_from_the_files_it_finished(tmp_path, rng, capsys):
    words = vocabulary(rng, size=5000)
    texts = [" ".join(document(rng, words, 100)) for _ in range(1500)]
    for f in range(6):
        rows = [{"id": f"f{f}-{i}", "text": text} for i, text in enumerate(texts)]
        write_corpus_file(tmp_path / "in" / f"part{f}.jsonl", rows)
    out = tmp_path / "out"
    done = out / records.STATE_DIR / "dedup" / "logs" / "signatures" / "completions"
    finished_before = kill_when_done(["data", "dedup", tmp_path / "in", out], done, 2)
    assert 2 <= len(finished_before) < 6, "the kill came too late to test resuming"

    counts = run_dedup(capsys, tmp_path / "in", out)

    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir() if p.name in finished_before} == finished_before
    kept = [row["id"] for rows in read_corpus(out).values() for row in rows]
    # The six files hold the same 1500 texts: one copy of each is left.
    assert counts["docs_in"] == 9000 and len(kept) == len(set(kept)) == counts["docs_out"] == 1500


@pytest.mark.parametrize("threshold, distant, most", [(0.8, 0.5, 0.05), (0.9, 0.6, 0.01)])
def test_the_band_setting_catches_the_threshold_and_rarely_a_distant_pair(threshold, distant, most):
    from phi_jax.curation.dedup import MAX_HASHES, band_setting

    bands, rows = band_setting(threshold)
    assert bands * rows <= MAX_HASHES and 1 - (1 - threshold ** rows) ** bands >= 0.9
    assert 1 - (1 - distant ** rows) ** bands <= most


def test_the_same_stages_chain_under_datatroves_slurm_executor(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from phi_jax.curation import dedup

    for name in ("a.jsonl", "b/c.jsonl"):
        write_corpus_file(tmp_path / "in" / name, [{"text": "one two three four five six"}])
    chain = dedup.executors(tmp_path / "in", tmp_path / "out", SlurmPipelineExecutor, time="1:00:00", partition="cpu")

    bands, _ = dedup.band_setting(0.8)
    assert [e.tasks for e in chain] == [2, bands + 1, 1, 2]  # files, bands and the exact bucket, one, files
    assert [e.depends for e in chain] == [None, *chain[:-1]]
    assert all(isinstance(e, SlurmPipelineExecutor) for e in chain)
