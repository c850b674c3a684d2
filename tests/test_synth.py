"""phi-jax data synth / topics without a server: topics, the plan, templates, the resumable writer,
flagging, reports, clustering, the in-process checkpoint generator, and the OpenAI client's retries
against a real HTTP server on 127.0.0.1. tests/test_synth_serve.py runs it against `phi-jax serve`."""

import http.server
import json
import socket
import threading
import time

import pytest

from phi_jax.synth import SynthError, plan, report, run, templates, topics, writer
from phi_jax.synth.generators import Completion, OpenAIGenerator, Request, Sampling, retry_after_seconds
from tests.cli_runner import run as run_cli

try:
    from tests.synth_fixtures import WORDS, make_tiny_model, topics_file, write_jsonl
except ImportError:  # pytest run from inside tests/
    from synth_fixtures import WORDS, make_tiny_model, topics_file, write_jsonl



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("synth") / "model")


def test_a_text_topics_file_skips_comments_and_a_jsonl_one_carries_subtopics(tmp_path):
    assert [t.name for t in topics.read_topics(topics_file(tmp_path))] == ["rivers", "lists in Python", "fractions"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"topic": "tides", "subtopics": ["the moon", "spring tides"]}, "waves"])
    assert topics.read_topics(path) == [topics.Topic("tides", ("the moon", "spring tides")), topics.Topic("waves")]


def test_bad_topics_files_are_errors_naming_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SynthError, match=f"{empty}: the file has no topics"):
        topics.read_topics(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"topic": "a"}, {"name": "b"}])
    with pytest.raises(SynthError, match=f'{bad}:2: expected an object with a non-empty string "topic"'):
        topics.read_topics(bad)
    with pytest.raises(SynthError, match="no such file"):
        topics.read_topics(tmp_path / "missing.txt")


def test_seed_data_without_a_text_field_is_an_error_naming_the_file_line_and_field(tmp_path):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": "fine"}])
    write_jsonl(tmp_path / "web" / "b.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    with pytest.raises(SynthError, match=r'b\.jsonl:2: no string field "text"'):
        topics.read_seed_documents(tmp_path / "web")
    (tmp_path / "none").mkdir()
    with pytest.raises(SynthError, match="no .jsonl"):
        topics.read_seed_documents(tmp_path / "none")


def test_an_extract_is_cut_at_a_word_boundary_within_the_limit():
    text = "alpha beta  gamma\n delta epsilon"
    assert topics.extract(text, 100) == "alpha beta gamma delta epsilon"
    assert topics.extract(text, 13) == "alpha beta"
    assert len(topics.extract("x" * 50, 10)) == 10


def documents(n):
    return [topics.SeedDocument(f"web.jsonl:{i + 1}", f"document {i} " + " ".join(WORDS[i % 7:])) for i in range(n)]


def test_the_plan_is_deterministic_covers_topics_evenly_and_a_longer_plan_extends_a_shorter_one():
    ts = [topics.Topic("a", ("a1", "a2")), topics.Topic("b")]
    args = (ts, documents(5), ["textbook", "story"], ["college", "young_children"], 7, 40)
    long_plan = plan.build_plan(12, *args)
    assert long_plan == plan.build_plan(12, *args)
    assert long_plan[:5] == plan.build_plan(5, *args)
    assert [e["topic"] for e in long_plan] == ["a", "b"] * 6
    assert {e["subtopic"] for e in long_plan if e["topic"] == "a"} <= {"a1", "a2"}
    assert all(e["subtopic"] is None for e in long_plan if e["topic"] == "b")
    assert all(len(e["extract"]) <= 40 and e["seed_id"].startswith("web.jsonl:") for e in long_plan)
    other_seed = (ts, documents(5), ["textbook", "story"], ["college", "young_children"], 8, 40)
    assert plan.build_plan(12, *other_seed) != long_plan


def test_a_topic_with_seed_ids_takes_its_extracts_from_its_own_documents():
    docs = documents(6)
    ts = [topics.Topic("a", seed_ids=("web.jsonl:2", "web.jsonl:5"))]
    entries = plan.build_plan(20, ts, docs, ["textbook"], ["college"], 0, 100)
    assert {e["seed_id"] for e in entries} == {"web.jsonl:2", "web.jsonl:5"}


def test_a_saved_plan_is_kept_extended_or_a_changed_one_refused_naming_the_field(tmp_path):
    ts = [topics.Topic("a"), topics.Topic("b")]
    first = plan.build_plan(4, ts, None, ["textbook"], ["college"], 0, 10)
    plan.settle_plan(tmp_path, first)
    longer = plan.build_plan(6, ts, None, ["textbook"], ["college"], 0, 10)
    assert plan.settle_plan(tmp_path, longer) == longer
    assert len((tmp_path / plan.PLAN_FILE).read_text().splitlines()) == 6
    other = plan.build_plan(6, ts, None, ["story"], ["college"], 0, 10)
    with pytest.raises(SynthError, match=r"entry 0 was planned with style='textbook', this run plans style='story'"):
        plan.settle_plan(tmp_path, other)


def test_every_builtin_style_renders_its_topic_audience_and_extract(tmp_path):
    t = templates.Templates()
    assert set(run.Options().styles) <= set(t.styles)
    for style in t.styles:
        entry = {"topic": "tides", "subtopic": "the moon", "style": style, "audience": "college",
                 "extract": "WEB EXTRACT TEXT", "seed_id": "x:1", "index": 0}
        prompt = t.render(entry, plan.AUDIENCES["college"], "completions")
        assert "tides" in prompt and "the moon" in prompt and "WEB EXTRACT TEXT" in prompt and "college" in prompt
        bare = t.render({**entry, "subtopic": None, "extract": None}, plan.AUDIENCES["college"], "chat")
        assert "extract" not in bare.lower() and "None" not in bare


def test_a_user_template_replaces_or_adds_a_style_and_an_unknown_style_is_named(tmp_path):
    (tmp_path / "story.jinja").write_text("A tale of {{ topic }} for {{ audience_name }}.")
    (tmp_path / "poem.jinja").write_text("A poem on {{ topic }}{% include '_extract.jinja' %}")
    t = templates.Templates(tmp_path)
    entry = {"topic": "tides", "subtopic": None, "style": "story", "audience": "general", "extract": None}
    assert t.render(entry, "", "chat") == "A tale of tides for general."
    assert "poem" in t.styles and "textbook" in t.styles
    with pytest.raises(SynthError, match="no template for sonnet"):
        t.check_styles(["poem", "sonnet"])
    (tmp_path / "broken.jinja").write_text("{{ topics }}")
    with pytest.raises(SynthError, match="broken.jinja.*'topics' is undefined"):
        t.render({**entry, "style": "broken"}, "", "chat")


def test_copy_templates_writes_the_builtins_to_edit(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "data", "synth", "--copy_templates", tmp_path / "mine")
    assert status == 0 and (tmp_path / "mine" / "textbook.jinja").read_text() == \
        (templates.BUILTIN_DIR / "textbook.jinja").read_text()
    assert run_cli(capsys, "data", "synth", "--copy_templates", tmp_path / "mine")[0] == 2


def completion(text, finish="stop"):
    return Completion(text, finish, 3, len(text.split()), "m")


def test_cut_empty_short_and_refused_completions_are_flagged():
    long = " ".join(["word"] * 60)
    assert run.flags(completion(long), 50) == []
    assert run.flags(completion(long, "length"), 50) == ["max_tokens"]
    assert run.flags(completion("   "), 50) == ["empty"]
    assert run.flags(completion("too few words"), 50) == ["too_short"]
    assert run.flags(completion("I'm sorry, but I can't help with that. " + long), 50) == ["refusal"]
    assert run.flags(completion("As an AI language model, " + long), 50) == ["refusal"]


def test_the_writer_cuts_a_torn_last_line_reads_what_is_done_and_locks_the_directory(tmp_path):
    with writer.OutputDir(tmp_path) as out:
        out.append("train", {"id": "a", "text": "x"})
        out.append("flagged", {"id": "b", "text": ""})
        out.append("failed", {"id": "c", "error": "boom"})
        out.append("failed", {"id": "b", "error": "earlier"})
        with pytest.raises(SynthError, match="another run is writing it"):
            writer.OutputDir(tmp_path)
    shard = tmp_path / "train" / "part-00001.jsonl"
    with open(shard, "a") as f:
        f.write('{"id": "torn", "te')
    with writer.OutputDir(tmp_path) as out:
        assert out.done == {"a", "b"} and out.failed_before == {"c"} and out.run_number == 2
        out.append("train", {"id": "d", "text": "y"})
    assert shard.read_text() == '{"id": "a", "text": "x"}\n'
    assert [r["id"] for r in writer.read_rows(tmp_path, "train")] == ["a", "d"]


def test_distinct_ngrams_count_repetition():
    assert report.distinct_ngrams(["a b c d"], 2) == {"distinct_1": 1.0, "distinct_2": 1.0}
    assert report.distinct_ngrams(["a a a a"], 2) == {"distinct_1": 0.25, "distinct_2": round(1 / 3, 4)}
    assert report.distinct_ngrams(["same text here", "same text here"], 1) == {"distinct_1": 0.5}


def test_clustering_finds_the_topics_of_a_web_corpus_and_counts_their_documents(tmp_path):
    astronomy = "telescope galaxy star orbit planet nebula comet astronomer".split()
    cooking = "recipe flour oven bake dough butter sugar kitchen".split()
    rows = []
    for i in range(30):
        vocab = astronomy if i % 3 else cooking
        rows.append({"text": " ".join(vocab[(i + k) % len(vocab)] for k in range(12))})
    write_jsonl(tmp_path / "web" / "part.jsonl", rows)
    found = topics.cluster_topics(topics.read_seed_documents(tmp_path / "web"), 2, seed=0)
    assert [t["documents"] for t in found] == [20, 10]
    assert set(found[0]["terms"]) <= set(astronomy) and set(found[1]["terms"]) <= set(cooking)
    assert sorted(found[1]["seed_ids"]) == sorted(f"part.jsonl:{i + 1}" for i in range(0, 30, 3))


def test_subtopics_are_parsed_from_a_numbered_or_bulleted_list():
    text = " the moon\n2. spring tides\n- neap tides.\n3) tides\n\n4. spring tides\n"
    assert topics.parse_subtopics(text, 5, "tides") == ["the moon", "spring tides", "neap tides"]
    assert topics.parse_subtopics(text, 2, "tides") == ["the moon", "spring tides"]


class ScriptedGenerator:
    """Answers in process: fails the requests whose plan index is in `fail`, records what it was sent."""

    def __init__(self, fail=()):
        self.fail, self.sent = set(fail), []
        self.settings = {"model": "scripted", "api": "completions", "max_tokens": 64, "temperature": 0.0, "top_p": 1.0}

    def check(self):
        pass

    def run(self, requests, on_done):
        for r in requests:
            self.sent.append(r.id)
            index = int(r.id.split("-")[0])
            if index in self.fail:
                on_done(r, None, "http://x/v1: HTTP 503: overloaded")
            else:
                on_done(r, completion(" ".join(["lesson"] * (60 if index % 4 else 5))), None)


def test_failed_requests_are_recorded_then_retried_by_the_next_run_and_nothing_done_is_sent_again(tmp_path):
    options = run.Options(num_samples=8, styles=("textbook", "qa"), validation_every=3, progress=False)
    gen = ScriptedGenerator(fail={1, 6})
    summary = run.synthesize(topics_file(tmp_path), tmp_path / "out", gen, templates.Templates(), options)
    assert summary == {"completed": 6, "failed": 2, "skipped_existing": 0, "prompt_tokens": 18,
                       "completion_tokens": 60 * 4 + 5 * 2, "flagged": 2}
    out = tmp_path / "out"
    assert sorted(int(r["id"][:7]) for r in writer.read_rows(out, "failed")) == [1, 6]
    assert sorted(int(r["id"][:7]) for r in writer.read_rows(out, "flagged")) == [0, 4]  # 5 words: too_short
    assert sorted(int(r["id"][:7]) for r in writer.read_rows(out, "validation")) == [2, 5]
    again = ScriptedGenerator()
    summary = run.synthesize(topics_file(tmp_path), out, again, templates.Templates(), options)
    assert sorted(int(i[:7]) for i in again.sent) == [1, 6]
    assert summary["completed"] == 2 and summary["skipped_existing"] == 6 and summary["failed"] == 0
    rows = [r for kind in writer.DONE_KINDS for r in writer.read_rows(out, kind)]
    assert len(rows) == 8 == len({r["id"] for r in rows})
    assert json.loads((out / "report.json").read_text())["rows"] == {"train": 4, "validation": 2, "flagged": 2,
                                                                      "failed": 0}
    with pytest.raises(SynthError, match="generated with temperature=0.0, this run asks for temperature=0.5"):
        other = ScriptedGenerator()
        other.settings = {**other.settings, "temperature": 0.5}
        run.synthesize(topics_file(tmp_path), out, other, templates.Templates(), options)


def test_the_checkpoint_generator_writes_rows_that_resume_and_report(tmp_path, tiny_model, capsys):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": "rivers and seas " * 30}, {"text": "numbers in a list " * 30}])
    argv = ["data", "synth", "--topics", topics_file(tmp_path), "--out", tmp_path / "out", "--checkpoint", tiny_model,
            "--seed_data", tmp_path / "web", "--num_samples", 5, "--max_tokens", 12, "--extract_chars", 80,
            "--batch_size", 4, "--min_words", 1, "--validation_every", 5, "--styles", "textbook,qa", "--no_progress"]
    status, out, err = run_cli(capsys, *argv)
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["completed"] == 5 and summary["failed"] == 0 and summary["skipped_existing"] == 0
    rows = [r for kind in writer.DONE_KINDS for r in writer.read_rows(tmp_path / "out", kind)]
    flagged = {r["id"] for r in writer.read_rows(tmp_path / "out", "flagged")}
    assert len(rows) == 5
    for row in rows:
        assert set(row) >= {"id", "text", "prompt", "topic", "audience", "style", "seed_id", "model", "finish_reason",
                            "usage"}
        assert row["usage"]["completion_tokens"] <= 12 and row["seed_id"].startswith("a.jsonl:")
        assert row["style"] in ("textbook", "qa") and row["model"] == str(tiny_model)
        assert (row["finish_reason"] == "length") == (row["usage"]["completion_tokens"] == 12)
        assert row["finish_reason"] != "length" or row["id"] in flagged
    assert summary["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in rows)
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, out, _ = run_cli(capsys, *argv)
    assert json.loads(out.strip().splitlines()[-1])["skipped_existing"] == 5


def test_a_prompt_longer_than_the_models_context_is_recorded_failed(tmp_path, tiny_model, capsys):
    argv = ["data", "synth", "--topics", topics_file(tmp_path, ["tides " * 800]), "--out", tmp_path / "out",
            "--checkpoint", tiny_model, "--num_samples", 1, "--max_tokens", 8, "--no_progress"]
    status, out, _ = run_cli(capsys, *argv)
    assert status == 0 and json.loads(out.strip().splitlines()[-1])["failed"] == 1
    (failure,) = writer.read_rows(tmp_path / "out", "failed")
    assert "exceeds the model's context of 1024" in failure["error"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_an_error_naming_the_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    status, _, err = run_cli(capsys, "data", "synth", "--topics", topics_file(tmp_path), "--out", tmp_path / "out",
                             "--endpoint", url, "--model", "m", "--num_samples", 2, "--timeout", 5, "--no_progress")
    assert status == 2 and f"--endpoint {url}: unreachable" in err


def test_retry_after_is_read_in_milliseconds_seconds_or_as_a_date():
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds({"retry-after": date}) <= 30
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


class _Answers(http.server.BaseHTTPRequestHandler):
    """/v1/completions: a completion, unless `mode` says otherwise: "overloaded" (429 with Retry-After: 1
    to the first request), "bad_request" (400 with an OpenAI error body) or "not_json" (200, HTML)."""

    mode = "ok"
    calls: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append(time.monotonic())
        if self.mode == "overloaded" and len(self.calls) == 1:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            body = b'{"error": {"message": "slow down"}}'
        elif self.mode == "bad_request":
            self.send_response(400)
            body = b'{"error": {"message": "max_tokens 8 is over this server\'s cap", "param": "max_tokens"}}'
        elif self.mode == "not_json":
            self.send_response(200)
            body = b"<html>a login page</html>"
        else:
            self.send_response(200)
            body = json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "text": "an answer", "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # /v1/models
        body = b'{"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "t"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    """A real HTTP server on 127.0.0.1 answering like an OpenAI completions endpoint (see _Answers)."""
    def start(mode: str):
        handler = type("Handler", (_Answers,), {"mode": mode, "calls": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1", handler.calls

    servers = []
    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_a_429_is_retried_after_the_servers_retry_after(answering_server, client):
    url, calls = answering_server("overloaded")
    gen = OpenAIGenerator([url], "m", sampling=Sampling(8), retries=2, backoff=0.01, client=client)
    results = []
    gen.run([Request("r", "a prompt")], lambda r, c, e: results.append((c, e)))
    ((result, error),) = results
    assert error is None and result.text == "an answer" and result.completion_tokens == 2
    first, second = calls
    assert second - first >= 0.95  # waited for Retry-After, not the 0.01 s backoff


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_a_bad_request_fails_at_once_with_the_servers_message(answering_server, client):
    url, calls = answering_server("bad_request")
    results = []
    OpenAIGenerator([url], "m", sampling=Sampling(8), retries=3, backoff=0.01, client=client).run(
        [Request("r", "a prompt")], lambda r, c, e: results.append((c, e)))
    assert results == [(None, f"{url}/completions: HTTP 400: max_tokens 8 is over this server's cap "
                              "(after 1 attempt(s))")]
    assert len(calls) == 1


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_an_answer_that_is_not_json_is_an_error_that_shows_it(answering_server, client):
    url, calls = answering_server("not_json")
    results = []
    OpenAIGenerator([url], "m", sampling=Sampling(8), retries=3, client=client).run(
        [Request("r", "a prompt")], lambda r, c, e: results.append((c, e)))
    ((completion, error),) = results
    assert completion is None and "HTTP 200: the answer is not JSON: b'<html>a login page" in error
    assert len(calls) == 1


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_an_unreachable_endpoint_of_a_fleet_is_left_out_and_the_others_take_its_requests(answering_server, client):
    url, calls = answering_server("ok")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gen = OpenAIGenerator([dead, url], "m", sampling=Sampling(8), concurrency=4, retries=2, backoff=30,
                          client=client)
    gen.check()  # one endpoint answers: a warning for the other, not an error
    with pytest.raises(SynthError, match=f"--model 'n': not served by {url} \\(it serves: m\\)"):
        OpenAIGenerator([dead, url], "n", client=client).check()
    results = []
    start = time.monotonic()
    gen.run([Request(str(i), "a prompt") for i in range(12)], lambda r, c, e: results.append((r.id, c, e)))
    assert time.monotonic() - start < 10  # no request waited out the dead endpoint's 15-30 s backoff
    assert sorted(int(i) for i, _, _ in results) == list(range(12)) and all(e is None for _, _, e in results)
    assert len(calls) == 12


def test_synth_and_topics_are_phi_jax_data_commands(capsys):
    status, _, err = run_cli(capsys, "data", "synth", "--out", "x")
    assert status == 2 and "--topics FILE and --out DIR are required" in err
    status, _, err = run_cli(capsys, "data", "topics", "--out", "x")
    assert status == 2 and "give --seed_data DIR" in err


def test_a_web_seed_extract_holding_benchmark_text_flags_its_row(tmp_path):
    from phi_jax.evaluation.tasks import humaneval_docs

    leaked = humaneval_docs()[0]["prompt"]
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": leaked}])
    (tmp_path / "eval").mkdir()
    options = run.Options(num_samples=2, styles=("textbook",), validation_every=0, progress=False, min_words=1,
                          extract_chars=len(leaked), contamination=run.benchmark_checker(tmp_path / "eval"))
    summary = run.synthesize(topics_file(tmp_path), tmp_path / "out", ScriptedGenerator(), templates.Templates(),
                             options, seed_data=tmp_path / "web")
    rows = list(writer.read_rows(tmp_path / "out", "flagged"))
    assert summary["flagged"] == 2 and all(r["contamination"] == ["humaneval:HumanEval/0"] for r in rows)
    assert not list(writer.read_rows(tmp_path / "out", "train"))


def test_a_row_holding_benchmark_text_is_flagged_contaminated_with_the_item(tmp_path):
    from phi_jax.evaluation.tasks import humaneval_docs

    leaked = humaneval_docs()[0]["prompt"]

    class Leaky(ScriptedGenerator):
        def run(self, requests, on_done):
            for r in requests:
                words = " ".join(f"word{i}" for i in range(60))
                on_done(r, completion(words + ("\n" + leaked if r.id.startswith("0000001") else "")), None)

    (tmp_path / "eval").mkdir()
    options = run.Options(num_samples=3, styles=("textbook",), validation_every=0, progress=False,
                          contamination=run.benchmark_checker(tmp_path / "eval"))
    summary = run.synthesize(topics_file(tmp_path), tmp_path / "out", Leaky(), templates.Templates(), options)
    assert summary["flagged"] == 1
    (row,) = writer.read_rows(tmp_path / "out", "flagged")
    assert row["id"].startswith("0000001") and row["flags"] == ["contaminated"]
    assert row["contamination"] == ["humaneval:HumanEval/0"]
    assert len(list(writer.read_rows(tmp_path / "out", "train"))) == 2


def test_the_report_counts_near_duplicate_rows_through_dedup(tmp_path):
    import random

    letters = random.Random(0)  # words of letters only: dedup's normalization maps every digit to 0
    base = [[("".join(letters.choices("abcdefghij", k=6))) for _ in range(40)] for _ in range(5)]
    copies = [base[0], base[1][:3] + base[1][4:]]  # an exact copy, and one with a word left out
    with writer.OutputDir(tmp_path) as out:
        for i, text in enumerate(" ".join(words) for words in base + copies):
            out.append("train" if i % 2 else "validation", {"id": str(i), "text": text})
    assert report.near_duplicates(tmp_path) == {"rows": 7, "removed": 2, "clusters": 2, "rate": round(2 / 7, 4)}
    assert not list(tmp_path.glob(".dedup-*"))


def test_subtopics_come_from_the_generator_and_a_failed_request_leaves_a_topic_alone(tmp_path):
    class Lister(ScriptedGenerator):
        def run(self, requests, on_done):
            for r in requests:
                if "tides" in r.prompt:
                    on_done(r, completion(" the moon\n2. spring tides\n3. neap tides\n4. tidal pools"), None)
                else:
                    on_done(r, None, "http://x/v1: HTTP 503: overloaded (after 6 attempt(s))")

    found = [{"topic": "tides"}, {"topic": "volcanoes"}]
    assert topics.expand_subtopics(found, Lister(), 3) == 1
    assert found == [{"topic": "tides", "subtopics": ["the moon", "spring tides", "neap tides"]},
                     {"topic": "volcanoes", "subtopics": []}]


def test_topics_from_a_checkpoints_hidden_states_cover_every_document(tmp_path, tiny_model, capsys):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": " ".join(WORDS[i:i + 8])} for i in range(12)])
    status, out, err = run_cli(capsys, "data", "topics", "--seed_data", tmp_path / "web", "--num_topics", 3,
                               "--embed_checkpoint", tiny_model, "--out", tmp_path / "topics.jsonl")
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["topics"] == 3 and sum(summary["documents_by_topic"].values()) == 12
    written = topics.read_topics(tmp_path / "topics.jsonl")
    assert sorted(s for t in written for s in t.seed_ids) == sorted(f"a.jsonl:{i + 1}" for i in range(12))


@pytest.mark.slow
def test_the_output_directory_is_the_synthetic_task_that_prepare_reads(tmp_path, capsys):
    from phi_jax.data.tokenizer import train_byte_level_bpe

    data_dir = tmp_path / "data"
    options = run.Options(num_samples=8, styles=("textbook",), validation_every=4, progress=False)
    run.synthesize(topics_file(tmp_path), data_dir / "synthetic", ScriptedGenerator(), templates.Templates(), options)
    train_byte_level_bpe([" ".join(WORDS)] * 5, 300, data_dir / "tokenizer.json")
    status, out, err = run_cli(capsys, "data", "prepare", "synthetic", "--data_dir", data_dir)
    assert status == 0, err
    good = {kind: len(list(writer.read_rows(data_dir / "synthetic", kind))) for kind in ("train", "validation")}
    assert good == {"train": 4, "validation": 2}  # entries 0 and 4 are too short (flagged), 3 and 7 held out
    assert "synthetic/train part 1/1: 4 docs" in out + err and "synthetic/validation part 1/1: 2 docs" in out + err


def test_clusters_can_be_named_by_the_generator_and_keep_their_terms_name_when_it_gives_none(tmp_path):
    class Titler(ScriptedGenerator):
        def run(self, requests, on_done):
            for r in requests:
                title = '"Looking at the night sky"\nChapter 2' if "telescope" in r.prompt else "\n  \n"
                on_done(r, completion(title), None)

    docs = [topics.SeedDocument(f"w:{i}", ("telescope galaxy star orbit " if i % 2 else "flour oven bake dough ") * 3)
            for i in range(8)]
    found = topics.cluster_topics(docs, 2, seed=0)
    cooking = next(t["topic"] for t in found if "flour" in t["terms"])
    assert topics.label_with_generator(found, docs, Titler()) == 1
    assert sorted(t["topic"] for t in found) == sorted(["Looking at the night sky", cooking])


def test_a_run_whose_every_request_fails_stops_after_the_limit_keeping_what_it_wrote(tmp_path):
    options = run.Options(num_samples=10, styles=("textbook",), progress=False, max_failures_in_a_row=3)
    with pytest.raises(SynthError, match="3 requests in a row failed .*HTTP 503.*re-run the same command"):
        run.synthesize(topics_file(tmp_path), tmp_path / "out", ScriptedGenerator(fail={0, 2, 3, 4, 5, 6}),
                       templates.Templates(), options)
    assert [int(r["id"][:7]) for r in writer.read_rows(tmp_path / "out", "failed")] == [0, 2, 3, 4]
    assert [int(r["id"][:7]) for r in writer.read_rows(tmp_path / "out", "train")] == [1]


def test_a_torn_line_longer_than_the_read_back_chunk_is_cut_and_an_empty_part_is_left_alone(tmp_path):
    (tmp_path / "train").mkdir()
    shard, empty = tmp_path / "train" / "part-00001.jsonl", tmp_path / "train" / "part-00002.jsonl"
    whole = json.dumps({"id": "a", "text": "x"}) + "\n"
    shard.write_text(whole + '{"id": "torn", "text": "' + "y" * 200_000)
    empty.write_text("")
    with writer.OutputDir(tmp_path) as out:
        assert out.done == {"a"} and out.run_number == 3
    assert shard.read_text() == whole and empty.read_text() == ""
