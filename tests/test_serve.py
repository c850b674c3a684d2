"""`phi-jax serve` as users reach it: real server processes on 127.0.0.1 with a tiny trained model, driven
by the official `openai` client, lm-eval-harness's local-completions model, and plain HTTP for the
faults (bad bodies, a client that goes away, SIGTERM, a missing API key)."""

import concurrent.futures
import json
import pathlib
import signal
import socket
import threading
import time
import urllib.request

import jax
import numpy as np
import openai
import pytest

from phi_jax.checkpoint import load_model
from phi_jax.data.tokenizer import Tokenizer
from phi_jax.generate import complete
from phi_jax.serving.engine import PROMPT_RATIO, buckets
from tests.serving import request, serve_process, stop, trained_workdir

PROMPTS = ["def fibonacci(n):\n", "Lesson 3: Fractions.\n", "import os\n", "The cat", "class Stack:\n    def",
           "for i in range(10):\n", "# Sort a list\n", "Question: What is 2 + 2?\nAnswer:"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def model(workdir):
    config, params = load_model(workdir)
    return config, params, Tokenizer(workdir / "tokenizer.json")


@pytest.fixture(scope="module")
def server(workdir):
    with serve_process(workdir, args=("--max_batch_size", "16", "--max_seq_len", "256", "--chat_template", "phi"),
                       lazy_compile=False) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def generate_texts(model, prompts, max_tokens):
    """`phi-jax generate`'s greedy continuations (its batched `complete`), as text."""
    config, params, tokenizer = model
    ids = complete(config, params, [tokenizer.encode(p) for p in prompts], max_tokens, batch_size=4,
                   eos_id=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in ids]


# ------------------------------------------------------------------------------------------ batching


def test_greedy_output_is_the_same_alone_and_beside_fifteen_others_and_equals_generate(server, client, model):
    expected = generate_texts(model, PROMPTS, 40)
    alone = [client.completions.create(model="phi-jax", prompt=p, max_tokens=40, temperature=0).choices[0].text
             for p in PROMPTS]
    assert alone == expected

    def sixteen_at_once():
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda p: client.completions.create(
                model="phi-jax", prompt=p, max_tokens=40, temperature=0).choices[0].text, PROMPTS * 2))

    assert sixteen_at_once() == expected * 2
    assert sixteen_at_once() == expected * 2
    metrics = server.metrics()
    # Compiled at start, before /health said 200: a shape per cache-length bucket (decode) and per prompt
    # bucket with one row or all 16 (prefill). 40 requests later, still those.
    assert metrics["compiled"]["decode"] == len(buckets(256))
    assert metrics["compiled"]["prefill"] == 2 * len(buckets(256, PROMPT_RATIO))
    assert metrics["active_slots"] == 0


def test_concurrent_requests_share_decode_steps(server, client):
    before = server.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.completions.create(model="phi-jax", prompt=p, max_tokens=30, temperature=0,
                                                          stop=None), PROMPTS))
    after = server.metrics()
    generated = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert generated >= 8 and steps < generated / 2, (generated, steps)


# ------------------------------------------------------------------------------------------ the openai client


def test_openai_completions_list_prompts_n_seeds_usage_and_stop(client, model):
    _, _, tokenizer = model
    response = client.completions.create(model="phi-jax", prompt=PROMPTS[:2], max_tokens=12, n=3,
                                         temperature=1.0, seed=7)
    assert [c.index for c in response.choices] == list(range(6))
    first = [c.text for c in response.choices[:3]]
    assert len(set(first)) > 1, "the choices of one prompt draw their own samples"
    again = client.completions.create(model="phi-jax", prompt=PROMPTS[:2], max_tokens=12, n=3, temperature=1.0,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in response.choices], "a seed replays"
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS[:2])
    counted = client.completions.create(model="phi-jax", prompt=PROMPTS[:2], max_tokens=12, n=3, temperature=1.0,
                                        seed=7, logprobs=0)
    assert counted.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in counted.choices)
    assert [c.text for c in counted.choices] == first + [c.text for c in response.choices[3:]]

    greedy = client.completions.create(model="phi-jax", prompt=PROMPTS[0], max_tokens=40, temperature=0, logprobs=0)
    text, pieces = greedy.choices[0].text, greedy.choices[0].logprobs.tokens
    stop = text[10:13]
    cut = client.completions.create(model="phi-jax", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop],
                                    logprobs=0)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert greedy.choices[0].finish_reason in ("length", "stop")
    # The completion's tokens (and usage) end with the one that completed the stop string.
    through_stop = next(k for k in range(1, len(pieces) + 1) if stop in "".join(pieces[:k]))
    assert cut.usage.completion_tokens == len(cut.choices[0].logprobs.tokens) == through_stop < len(pieces)


def test_streamed_text_equals_the_whole_response(client):
    whole = client.completions.create(model="phi-jax", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="phi-jax", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 3 and "".join(texts) == whole.choices[0].text  # a chunk per decode call or two
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_renders_the_template_and_streams(client, model):
    config, params, tokenizer = model
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Write a loop."}]
    reply = client.chat.completions.create(model="phi-jax", messages=messages, max_tokens=24, temperature=0)
    from phi_jax.data.chat import encode_chat

    ids, _ = encode_chat(messages, tokenizer.path, "phi", add_generation_prompt=True)
    new = complete(config, params, [ids], 24, batch_size=1, eos_id=tokenizer.eos_id)[0]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tokenizer.decode(new)
    assert reply.usage.prompt_tokens == len(ids)
    streamed = client.chat.completions.create(model="phi-jax", messages=messages, max_tokens=24, temperature=0,
                                              stream=True, n=2)
    parts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
    assert parts == {0: reply.choices[0].message.content, 1: reply.choices[0].message.content}


def test_echo_logprobs_are_the_prompt_tokens_log_probabilities(client, model):
    config, params, tokenizer = model
    prompt = PROMPTS[0] + "    return n"
    ids = tokenizer.encode(prompt)
    response = client.completions.create(model="phi-jax", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids)
    from phi_jax.model import Phi

    logits = Phi(config).apply({"params": params}, np.asarray([ids]))
    expected = jax.nn.log_softmax(logits[0, :-1], axis=-1)[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(logprobs.token_logprobs[1:], expected, atol=1e-4)
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert response.choices[0].text == prompt and response.usage.completion_tokens == 0


def test_models_lists_the_served_name_and_another_name_is_404(client):
    assert [m.id for m in client.models.list().data] == ["phi-jax"]
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert "gpt-4" in str(error.value)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "JSON"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ({"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "256"),
    ({"prompt": "word " * 300, "max_tokens": 8}, 400, "max_tokens", "maximum context length is 256"),
    ({"prompt": [5, 99999], "max_tokens": 8}, 400, "prompt", "vocabulary"),
    ({"max_tokens": 8}, 400, "prompt", "Field required"),
])
def test_bad_requests_get_an_openai_error_naming_the_field_and_limit(server, body, status, param, words):
    code, payload = request(server.url + "/v1/completions", body)
    assert code == status
    error = payload["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_a_client_that_leaves_mid_stream_frees_its_slot(workdir, tmp_path):
    with serve_process(workdir, args=("--max_batch_size", "1"), log_dir=tmp_path) as server:
        body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}).encode()
        connection = urllib.request.urlopen(urllib.request.Request(
            server.base_url + "/completions", body, {"Content-Type": "application/json"}), timeout=60)
        assert connection.readline().startswith(b"data: ")
        connection.close()
        deadline = time.monotonic() + 30
        while server.metrics()["active_slots"] and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = server.metrics()
        assert metrics["active_slots"] == 0 and metrics["generated_tokens"] < 400
        code, answer = request(server.base_url + "/completions", {"prompt": "x", "max_tokens": 5})
        assert code == 200 and answer["usage"]["completion_tokens"] == 5


def test_a_failing_request_leaves_the_server_serving(workdir, tmp_path):
    # A user's template that divides by zero on a one-message conversation: that request fails, with an
    # OpenAI-style error; the next ones are served.
    template = tmp_path / "fragile.jinja"
    template.write_text("{{ 'turns: ' ~ (10 // (messages | length - 1)) }}{% for m in messages %}"
                        "{{ m['content'] }}\n{% endfor %}")
    with serve_process(workdir, args=("--chat_template", template), log_dir=tmp_path) as server:
        code, answer = request(server.base_url + "/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert code in (400, 500) and "division" in answer["error"]["message"]
        code, answer = request(server.base_url + "/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}],
                                "max_tokens": 4})
        assert code == 200 and answer["usage"]["completion_tokens"] == 4


def test_chat_without_a_template_is_a_400_that_says_so(workdir, tmp_path):
    with serve_process(workdir, log_dir=tmp_path) as server:
        code, answer = request(server.base_url + "/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}]})
        assert code == 400 and "no chat template" in answer["error"]["message"]
        assert "--chat_template" in answer["error"]["message"]


# ------------------------------------------------------------------------------------------ lifecycle


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (Linux /proc/net/tcp)."""
    found = set()
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_sigterm_finishes_requests_in_flight_then_exits_zero(workdir, tmp_path):
    with serve_process(workdir, log_dir=tmp_path) as server:
        assert _listening_addresses(server.port) == {"127.0.0.1"}, "binds the loopback unless told otherwise"
        result = {}
        thread = threading.Thread(target=lambda: result.update(answer=request(
            server.base_url + "/completions", {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                                               "stop": []})))
        thread.start()
        deadline = time.monotonic() + 30
        while not server.metrics()["active_slots"] and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert stop(server) == 0
        code, answer = result["answer"]
        assert code == 200 and answer["usage"]["completion_tokens"] >= 1
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_with_an_api_key_requests_without_it_get_401_and_reach_no_model_code(workdir, tmp_path):
    with serve_process(workdir, args=("--api_key", "sesame"), log_dir=tmp_path) as server:
        body = {"prompt": "x", "max_tokens": 2}
        assert request(server.base_url + "/completions", body)[0] == 401
        code, answer = request(server.base_url + "/completions", body, {"Authorization": "Bearer wrong"})
        assert code == 401 and answer["error"]["type"] == "authentication_error"
        assert server.get("/metrics")[0] == 401
        key = {"Authorization": "Bearer sesame"}
        assert server.get("/metrics", key)[1]["requests_received"] == 0
        client = openai.OpenAI(base_url=server.base_url, api_key="sesame", max_retries=0)
        assert client.completions.create(model="phi-jax", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_params_split_over_devices_serve_the_same_greedy_text(workdir, model, tmp_path):
    expected = generate_texts(model, PROMPTS[:4], 24)
    with serve_process(workdir, args=("--data_parallel", "2", "--tensor_parallel", "2", "--max_batch_size", "4"),
                       devices=4, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: client.completions.create(
                model="phi-jax", prompt=p, max_tokens=24, temperature=0).choices[0].text, PROMPTS[:4]))
        assert "on 2 x 2 devices" in server.log()
    assert texts == expected
