"""phi-jax data synth against real `phi-jax serve` processes on 127.0.0.1 (tests/serving.py starts them):
the server killed and restarted mid-run, the generator killed with kill -9 and resumed (the server's
own request count shows nothing completed was sent twice), the chat API, and a wrong model name."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from phi_jax.synth import writer

try:
    from tests.serving import serve_process, trained_workdir
    from tests.synth_fixtures import topics_file
except ImportError:  # pytest run from inside tests/
    from serving import serve_process, trained_workdir
    from synth_fixtures import topics_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model):
    with serve_process(model, args=("--max_batch_size", "4", "--chat_template", "chatml")) as served:
        yield served


def synth_argv(tmp_path, base_url, out, num_samples, *extra):
    return [sys.executable, "-m", "phi_jax.cli", "data", "synth", "--topics", str(topics_file(tmp_path)),
            "--out", str(out), "--endpoint", base_url, "--model", "phi-jax", "--num_samples", str(num_samples),
            "--max_tokens", "24", "--min_words", "1", "--concurrency", "4", "--no_progress", *extra]


def done_ids(out) -> list[str]:
    return [r["id"] for kind in writer.DONE_KINDS for r in writer.read_rows(out, kind)]


def wait_for_rows(out, n, process, timeout=120):
    deadline = time.monotonic() + timeout
    while len(done_ids(out)) < n:
        assert process.poll() is None, f"synth exited ({process.returncode}) before writing {n} rows"
        assert time.monotonic() < deadline, f"fewer than {n} rows after {timeout}s"
        time.sleep(0.05)


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def every_line_is_whole_json(out) -> bool:
    for kind in writer.KINDS:
        for path in writer.part_files(out, kind):
            data = path.read_text()
            if data and not data.endswith("\n"):
                return False
            [json.loads(line) for line in data.splitlines()]
    return True


def test_a_generator_killed_with_sigkill_resumes_without_sending_a_completed_request_again(tmp_path, server):
    out, n = tmp_path / "out", 24
    argv = synth_argv(tmp_path, server.base_url, out, n)
    before = server.metrics()["requests_received"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 6, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(1)  # the requests in flight when it died finish on the server (and are lost)
    sent_by_first = server.metrics()["requests_received"] - before
    written = set(done_ids(out))
    assert every_line_is_whole_json(out) and len(written) < n
    assert sent_by_first - len(written) <= 4  # at most the --concurrency requests in flight were lost
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    summary = summary_of(second.stdout)
    assert summary["skipped_existing"] == len(written) and summary["completed"] == n - len(written)
    assert server.metrics()["requests_received"] - before - sent_by_first == n - len(written)  # none sent twice
    ids = done_ids(out)
    assert len(ids) == len(set(ids)) == n and written <= set(ids)


def test_a_server_killed_and_restarted_mid_run_costs_retries_not_rows(tmp_path, model):
    out, n = tmp_path / "out", 24
    with serve_process(model, args=("--max_batch_size", "4")) as first_server:
        port = first_server.port
        argv = synth_argv(tmp_path, first_server.base_url, out, n, "--retries", "8", "--backoff", "1")
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_rows(out, 4, run)
        first_server.process.kill()
        first_server.process.wait()
    written_before_restart = len(done_ids(out))
    assert written_before_restart < n  # killed mid-run
    with serve_process(model, args=("--max_batch_size", "4"), port=port) as second_server:
        stdout, stderr = run.communicate(timeout=300)
        served_after = second_server.metrics()["requests_received"]
    assert run.returncode == 0, stderr
    summary = summary_of(stdout)
    assert summary["completed"] + summary["failed"] == n and summary["skipped_existing"] == 0
    failed = {r["id"] for r in writer.read_rows(out, "failed")}
    ids = done_ids(out)
    assert len(ids) == len(set(ids)) == summary["completed"] and not failed & set(ids)
    assert len(failed) == summary["failed"]
    assert served_after >= n - written_before_restart - summary["failed"] > 0  # the retries reached the new one


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_the_chat_api_and_usage_accounting_against_serve(tmp_path, server, capsys, client):
    from phi_jax import cli

    status = cli.main(synth_argv(tmp_path, server.base_url, tmp_path / "out", 3, "--api", "chat",
                                 "--price", "1,2", "--client", client)[3:])
    out, err = capsys.readouterr()
    assert status == 0, err
    summary = summary_of(out)
    rows = [r for kind in writer.DONE_KINDS for r in writer.read_rows(tmp_path / "out", kind)]
    assert summary["completed"] == len(rows) == 3
    assert summary["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in rows) > 0
    assert summary["cost_usd"] == pytest.approx((summary["prompt_tokens"] + 2 * summary["completion_tokens"]) / 1e6)
    assert all(r["model"] == "phi-jax" for r in rows)


def test_a_wrong_model_name_is_an_error_naming_the_model_and_what_the_server_serves(tmp_path, server, capsys):
    from phi_jax import cli

    argv = synth_argv(tmp_path, server.base_url, tmp_path / "out", 2)[3:]
    argv[argv.index("phi-jax")] = "phi-3"
    assert cli.main(argv) == 2
    assert f"--model 'phi-3': not served by {server.base_url} (it serves: phi-jax)" in capsys.readouterr().err
