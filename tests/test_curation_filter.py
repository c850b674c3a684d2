"""phi-jax data filter: datatrove's heuristic rules, the quality classifier (hashed n-grams and a
phi-jax checkpoint's hidden states), apply with its report, and labelling through a real server."""

import json

import pytest

from phi_jax import cli
from phi_jax.curation import classifier, label
from tests.curation_corpus import read_corpus, write_corpus_file

PROSE = ("The river runs down from the hills to the sea, and the people of the valley have always lived by "
         "its water. In spring the snow melts and the river rises; in summer it is slow and warm. Farmers "
         "use it to water their fields, and children learn to swim in the shallow pools near the old mill. ")
TOPICS = {"good": "photosynthesis converts light energy into chemical energy stored in glucose molecules".split(),
          "bad": "click here buy cheap deals now free offer limited subscribe winner casino".split()}


def run(capsys, *argv) -> dict:
    assert cli.main(["data", "filter", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def graded(rng, kind: str, n_words: int = 60) -> str:
    """A document mostly of `kind`'s words, with some of the other kind's."""
    other = "bad" if kind == "good" else "good"
    topics = [TOPICS[kind if rng.random() < 0.8 else other] for _ in range(n_words)]
    return " ".join(words[int(rng.integers(len(words)))] for words in topics)


def write_labels(path, rng, n: int) -> None:
    rows = [{"id": str(i), "text": graded(rng, kind), "score": 4 if kind == "good" else 1}
            for i, kind in enumerate(["good", "bad"] * (n // 2))]
    rows.append({"id": "unparsed", "text": "whatever", "score": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_heuristics_drop_short_repetitive_and_symbol_documents_by_rule(tmp_path, capsys):
    docs = {"prose": PROSE, "short": "Too short to be a document.", "repeated": "buy now\n" * 40 + PROSE,
            "symbols": PROSE + " ".join(["#"] * 200)}
    write_corpus_file(tmp_path / "in" / "web.jsonl", [{"id": k, "text": v, "url": k} for k, v in docs.items()])

    counts = run(capsys, "heuristics", tmp_path / "in", tmp_path / "out")

    assert counts == {"docs_in": 4, "docs_out": 1, "removed": 3}
    assert read_corpus(tmp_path / "out")["web.jsonl"] == [{"id": "prose", "text": PROSE, "url": "prose"}]
    report = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert report["dropped_by"] == {"gopher_quality:gopher_short_doc": 1, "gopher_quality:gopher_too_many_hashes": 1,
                                    "gopher_repetition:dup_line_frac": 1}
    assert cli.main(["data", "filter", "heuristics", str(tmp_path / "in"), str(tmp_path / "o2"),
                     "--rules", "nope"]) == 2
    assert "expected some of gopher_quality" in capsys.readouterr().err


def test_an_ngram_classifier_trains_and_filters_with_scores_and_a_histogram(tmp_path, rng, capsys):
    write_labels(tmp_path / "labels.jsonl", rng, 200)

    trained = run(capsys, "train", tmp_path / "labels.jsonl", tmp_path / "clf")

    assert trained["train"] + trained["held_out"] == 200 and trained["accuracy"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.json", "classifier.skops"]
    kinds = ["good", "bad"] * 50
    write_corpus_file(tmp_path / "in" / "a.parquet", [{"text": graded(rng, k), "kind": k} for k in kinds])

    counts = run(capsys, "apply", tmp_path / "in", tmp_path / "out", "--classifier", tmp_path / "clf",
                 "--threshold", 0.5)

    rows = read_corpus(tmp_path / "out")["a.parquet"]
    assert counts["docs_in"] == 100 and counts["docs_out"] == len(rows)
    assert sum(r["kind"] == "good" for r in rows) >= 45 and sum(r["kind"] == "bad" for r in rows) <= 5
    assert all(r["quality_score"] >= 0.5 for r in rows)
    report = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert sum(report["histogram"]["counts"]) == 100 and len(report["histogram"]["edges"]) == 21
    assert (tmp_path / "out" / "quality_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_classifier_file_with_types_it_never_holds_is_refused(tmp_path, rng, capsys):
    import skops.io
    from sklearn.tree import DecisionTreeClassifier

    write_labels(tmp_path / "labels.jsonl", rng, 20)
    run(capsys, "train", tmp_path / "labels.jsonl", tmp_path / "clf")
    skops.io.dump(DecisionTreeClassifier().fit([[0], [1]], [0, 1]), tmp_path / "clf" / "classifier.skops")
    with pytest.raises(ValueError, match="holds types a classifier never has: sklearn.tree"):
        classifier.load(tmp_path / "clf")


def test_an_embedding_classifier_uses_a_phi_jax_checkpoints_hidden_states(tmp_path, rng, capsys):
    import jax

    from phi_jax.checkpoint import save_params
    from phi_jax.config import tiny
    from phi_jax.data.tokenizer import train_byte_level_bpe
    from phi_jax.model import init_params

    config = tiny(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, vocab_size=512)
    params = init_params(config, jax.random.key(0))
    save_params(tmp_path / "ckpt", config, params)
    train_byte_level_bpe([" ".join(words) for words in TOPICS.values()] * 20, 400, tmp_path / "ckpt" / "tokenizer.json")
    write_labels(tmp_path / "labels.jsonl", rng, 40)

    trained = run(capsys, "train", tmp_path / "labels.jsonl", tmp_path / "clf", "--features", "embeddings",
                  "--checkpoint", tmp_path / "ckpt")

    assert trained["features"] == "embeddings" and trained["accuracy"] >= 0.75
    loaded = classifier.load(tmp_path / "clf")
    scores = loaded.scores([graded(rng, "good") for _ in range(5)] + [graded(rng, "bad") for _ in range(5)])
    assert scores[:5].mean() > scores[5:].mean()


class ScriptedGrader:
    """A generator (the synthetic-data generators' `run(requests, on_done)`) that grades each document
    by its number, fails document 3 the first time it is asked and cannot grade document 7."""

    def __init__(self):
        self.asked = []

    def run(self, requests, on_done):
        from phi_jax.synth.generators import Completion

        for request in requests:
            self.asked.append(request.id)
            number = int(request.prompt.split("document ")[-1].split()[0])
            if number == 3 and self.asked.count(request.id) == 1:
                on_done(request, None, "HTTP 500")
            else:
                on_done(request, Completion("no idea" if number == 7 else str(number % 6), "stop", 1, 1, "m"), None)


def test_labels_resume_after_a_line_cut_short_and_keep_replies_without_a_grade(tmp_path):
    assert [label.grade_of(r) for r in ["4", "Score: 3.5/5", "none", "", "17"]] == [4.0, 3.5, None, None, None]
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": f"document {i}"} for i in range(30)])
    grader, path = ScriptedGrader(), tmp_path / "labels.jsonl"

    first = label.label(tmp_path / "in", path, generator=grader, model="m", num=30)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a kill in the middle of the last line
    cut = json.loads(lines[-1])["id"]
    again = label.label(tmp_path / "in", path, generator=grader, model="m", num=30)

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert first == {"labeled": 29, "total": 29, "unparsed": 1, "failed": 1}
    assert again == {"labeled": 2, "total": 30, "unparsed": int(cut == "d7"), "failed": 0}
    assert sorted(grader.asked[30:]) == sorted({"d3", cut}) and len({r["id"] for r in rows}) == len(rows) == 30
    assert all(r["score"] == (None if r["id"] == "d7" else int(r["id"][1:]) % 6) for r in rows)


def test_a_larger_sample_takes_the_smaller_ones_documents_and_more(tmp_path):
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"text": f"document {i}"} for i in range(200)])
    small, large = ({r.id for r in label.sample(tmp_path / "in", n, seed=3)} for n in (20, 50))
    assert len(small) == 20 and len(large) == 50 and small < large
    assert small != {r.id for r in label.sample(tmp_path / "in", 20, seed=4)}


@pytest.mark.slow
def test_label_grades_a_sample_through_a_real_phi_jax_server_and_resumes(tmp_path_factory, tmp_path, capsys):
    from tests.serving import serve_process, trained_workdir

    workdir = trained_workdir(tmp_path_factory)
    write_corpus_file(tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": PROSE[:60 + i]} for i in range(8)])
    labels = tmp_path / "labels.jsonl"
    with serve_process(workdir, args=("--chat_template", "phi", "--model_name", "grader"), log_dir=tmp_path) as server:
        argv = ["label", tmp_path / "in", labels, "--endpoint", server.base_url, "--model", "grader"]
        first = run(capsys, *argv, "--num", 3)
        again = run(capsys, *argv, "--num", 5)
        assert cli.main(["data", "filter", *map(str, argv[:-1]), "nobody"]) == 2
        assert "--model 'nobody': not served by" in capsys.readouterr().err

    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert first["labeled"] == 3 and again["labeled"] + 3 == again["total"] == 5 == len({r["id"] for r in rows})
    assert all(r["model"] == "grader" and isinstance(r["reply"], str) for r in rows)
    assert first["unparsed"] + again["unparsed"] == sum(r["score"] is None for r in rows)
