"""Generators behind one interface: `generator.run(requests, on_done)` sends each Request and calls
`on_done(request, completion, error)` once per request, as results arrive (completion None with the
error message when it finally failed). `generator.settings` is what the results depend on (model,
API, sampling); it goes into every request id, so a change of settings is a new request.

- OpenAIGenerator: any OpenAI-compatible server (vLLM, TGI, `phi-jax serve`, a hosted API) through
  the official `openai` package or aiohttp (`client`), on its completions API (base models) or chat
  API (instruction-tuned ones). Several endpoints are served round-robin, at most `concurrency`
  requests in flight. A request that fails for a reason that may pass (connection refused or reset,
  timeout, 408, 409, 429, 5xx) is retried after an exponential backoff, or after the server's
  Retry-After if it sent one; any other error (a bad request, an unknown model) fails it at once. An
  endpoint that is unreachable or says it is overloaded (429, 503) is left out of the rotation for
  that wait, so the retry and the other requests go to the rest of the fleet at once; when every
  endpoint is out, requests wait for the first to come back.
- CheckpointGenerator: a phi-jax model in this process, batched through phi_jax.generate.complete.
"""

import asyncio
import dataclasses
import email.utils
import itertools
import logging
import random
import time
import zlib

from phi_jax.synth import SynthError

log = logging.getLogger(__name__)

RETRIABLE_STATUS = (408, 409, 429)
OVERLOADED_STATUS = (429, 503)
MAX_RETRY_AFTER_S = 300.0


@dataclasses.dataclass(frozen=True)
class Request:
    id: str
    prompt: str


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop", "length", ...
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 1.0


def retry_after_seconds(headers) -> float | None:
    """The wait a server asked for: `retry-after-ms`, or `retry-after` in seconds or as an HTTP date."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EndpointError(SynthError):
    """One failed call to an endpoint: `status` is its HTTP status, or None when it could not be reached,
    reset the connection or did not answer in time; `headers` are the answer's (for Retry-After). The
    generator retries it or records it as the request's error; it does not leave the generator."""

    def __init__(self, url: str, status: int | None, message: str, headers=None):
        super().__init__(f"{url}: HTTP {status}: {message}" if status else f"{url}: {message}")
        self.status, self.headers = status, headers

    @property
    def retriable(self) -> bool:
        return self.status is None or self.status in RETRIABLE_STATUS or self.status >= 500

    @property
    def endpoint_is_down(self) -> bool:
        """The endpoint, not the request, is the trouble: unreachable, or it says it is overloaded."""
        return self.status is None or self.status in OVERLOADED_STATUS


def _error_message(payload: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    import orjson

    try:
        return str(orjson.loads(payload)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload[:200].decode(errors="replace") or "(no body)"


class OpenAIPackageTransport:
    """JSON calls through the official `openai` package (its documented `post`/`get` for requests it has
    no method for, with the raw response: its response models would cost more CPU and drop the fields a
    server adds). About 1.5 to 2.5 ms of client CPU a request (BENCHMARKS.md)."""

    def __init__(self, api_key: str, timeout: float):
        self.api_key, self.timeout = api_key, timeout

    async def __aenter__(self):
        import openai

        # One client for every endpoint (a call's URL is absolute); our own retries, not the package's:
        # a retry should go to the next endpoint of the fleet.
        self.client = openai.AsyncOpenAI(base_url="http://unused.invalid/v1", api_key=self.api_key,
                                         timeout=self.timeout, max_retries=0)
        self.raw = _raw_response_type()
        return self

    async def __aexit__(self, *exc):
        await self.client.close()

    async def call(self, method: str, url: str, body: dict | None = None) -> bytes:
        import openai

        try:
            if method == "GET":
                response = await self.client.get(url, cast_to=self.raw)
            else:
                response = await self.client.post(url, cast_to=self.raw, body=body)
        except (openai.APIConnectionError, openai.APITimeoutError) as e:  # refused, reset, timed out
            raise EndpointError(url, None, f"{type(e).__name__}: {e}") from None
        except openai.APIStatusError as e:
            raise EndpointError(url, e.status_code, _error_message(e.response.content), e.response.headers) from None
        return response.content


def _raw_response_type():
    """The Response class that the openai package's `cast_to` takes for a raw answer: httpx2's from
    openai 3 on, httpx's before."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response


class AiohttpTransport:
    """JSON calls through aiohttp: about 0.3 to 0.8 ms of client CPU a request (BENCHMARKS.md), for
    fleets so fast that the openai package's cost would bound a run."""

    def __init__(self, api_key: str, timeout: float):
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.timeout = timeout

    async def __aenter__(self):
        import aiohttp

        # No connection limit of its own: at most `concurrency` requests are in flight anyway.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self.headers,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    async def call(self, method: str, url: str, body: dict | None = None) -> bytes:
        import aiohttp
        import orjson

        try:
            async with self.session.request(method, url, data=None if body is None else orjson.dumps(body)) as response:
                payload = await response.read()
                status, headers = response.status, response.headers
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # refused, reset, cut short, timed out
            raise EndpointError(url, None, f"{type(e).__name__}: {e}") from None
        if status >= 400:
            raise EndpointError(url, status, _error_message(payload), headers)
        return payload


TRANSPORTS = {"openai": OpenAIPackageTransport, "aiohttp": AiohttpTransport}


class OpenAIGenerator:
    """OpenAI-compatible endpoints, round-robin; see the module doc. `client` is the transport: the
    official openai package, or aiohttp (a fifth of its CPU a request)."""

    def __init__(self, endpoints: list[str], model: str, *, api: str = "completions", sampling: Sampling = Sampling(),
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, api_key: str = "EMPTY", client: str = "openai"):
        if api not in ("completions", "chat"):
            raise SynthError(f"--api {api!r}: expected completions or chat")
        if client not in TRANSPORTS:
            raise SynthError(f"--client {client!r}: expected one of {', '.join(TRANSPORTS)}")
        if not endpoints:
            raise SynthError("give at least one --endpoint URL (e.g. http://127.0.0.1:8000/v1)")
        self.endpoints, self.model, self.api, self.sampling = [e.rstrip("/") for e in endpoints], model, api, sampling
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.transport = lambda: TRANSPORTS[client](api_key, timeout)
        # The transport is not among the settings: the results do not depend on it.
        self.settings = {"model": model, "api": api, **dataclasses.asdict(sampling)}

    async def _call_json(self, transport, method: str, url: str, body: dict | None = None) -> dict:
        """The JSON answer of `method url`, or EndpointError (status None: unreachable, reset, timed out)."""
        import orjson

        payload = await transport.call(method, url, body)
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise EndpointError(url, 200, f"the answer is not JSON: {payload[:200]!r}") from None

    def check(self) -> None:
        """Every endpoint that answers serves `model`, and one at least answers: else a SynthError naming
        the URL (or the model). An unreachable endpoint of a fleet is only a warning: it may come back,
        and the rotation leaves it out meanwhile."""
        asyncio.run(self._check())

    async def _check(self):
        unreachable = []
        async with self.transport() as transport:
            for url in self.endpoints:
                try:
                    served = [m["id"] for m in (await self._call_json(transport, "GET", f"{url}/models"))["data"]]
                except EndpointError as e:
                    if e.status is None:
                        unreachable.append(f"--endpoint {url}: unreachable ({e})")
                        continue
                    raise SynthError(f"--endpoint {url}: GET {url}/models answered {e}; expected an "
                                     "OpenAI-compatible server") from None
                except (KeyError, TypeError):
                    raise SynthError(f"--endpoint {url}: GET {url}/models answered without a `data` list of "
                                     "models; expected an OpenAI-compatible server") from None
                if self.model not in served:
                    raise SynthError(f"--model {self.model!r}: not served by {url} (it serves: "
                                     f"{', '.join(served) or 'nothing'})")
        if len(unreachable) == len(self.endpoints):
            raise SynthError("; ".join(unreachable) + ": is the server running, and is the URL its OpenAI base URL "
                             "(ending in /v1)?")
        for problem in unreachable:
            log.warning("%s; the other endpoints take its requests until it answers", problem)

    def run(self, requests, on_done) -> None:
        asyncio.run(self._run(list(requests), on_done))

    async def _run(self, requests, on_done):
        pending = iter(requests)
        turns = itertools.count()
        self._out_until = [0.0] * len(self.endpoints)  # time.monotonic() until which an endpoint is left out

        async def worker(transport):
            for request in pending:  # one shared iterator: each request is taken by one worker
                completion, error = await self._send(transport, request, turns)
                on_done(request, completion, error)

        async with self.transport() as transport:
            await asyncio.gather(*(worker(transport) for _ in range(min(self.concurrency, max(1, len(requests))))))

    def _pick(self, turns) -> int:
        """The next endpoint in turn that is not left out; if all are, the one back first."""
        start, now, n = next(turns), time.monotonic(), len(self.endpoints)
        order = [(start + k) % n for k in range(n)]
        return next((i for i in order if self._out_until[i] <= now), min(order, key=self._out_until.__getitem__))

    async def _send(self, transport, request, turns):
        error = None
        for attempt in range(self.retries + 1):
            turn = self._pick(turns)
            await asyncio.sleep(max(0.0, self._out_until[turn] - time.monotonic()))
            try:
                return await self._complete(transport, self.endpoints[turn], request.prompt), None
            except EndpointError as e:
                error = str(e)
                if not e.retriable or attempt == self.retries:
                    break
                wait = retry_after_seconds(e.headers)
                if wait is None:
                    wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                wait = min(wait, MAX_RETRY_AFTER_S)
                log.debug("request %s: %s; retrying in %.1fs", request.id, error, wait)
                if e.endpoint_is_down:
                    self._out_until[turn] = max(self._out_until[turn], time.monotonic() + wait)
                else:  # this request's own trouble (say, a 500 on it): only it waits
                    await asyncio.sleep(wait)
        return None, f"{error} (after {attempt + 1} attempt(s))"

    async def _complete(self, transport, url: str, prompt: str) -> Completion:
        s = self.sampling
        body = dict(model=self.model, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)
        if self.api == "chat":
            url, body["messages"] = f"{url}/chat/completions", [{"role": "user", "content": prompt}]
        else:
            url, body["prompt"] = f"{url}/completions", prompt
        answer = await self._call_json(transport, "POST", url, body)
        try:
            choice = answer["choices"][0]
            text = (choice["message"]["content"] if self.api == "chat" else choice["text"]) or ""
            usage = answer.get("usage") or {}
            return Completion(text, choice.get("finish_reason") or "stop", usage.get("prompt_tokens", 0),
                              usage.get("completion_tokens", 0), answer.get("model") or self.model)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(url, 200, f"no completion in the answer: {str(answer)[:200]}") from None


class CheckpointGenerator:
    """A phi-jax model (training workdir, params checkpoint or Hugging Face directory) in this process:
    prompts `batch_size` at a time through phi_jax.generate.complete, in the order given."""

    def __init__(self, config, params, tokenizer, model: str, *, sampling: Sampling = Sampling(),
                 batch_size: int = 8, seed: int = 0):
        self.config, self.params, self.tokenizer, self.model = config, params, tokenizer, model
        self.sampling, self.batch_size, self.seed = sampling, batch_size, seed
        self.settings = {"model": model, "api": "checkpoint", **dataclasses.asdict(sampling)}

    @classmethod
    def load(cls, checkpoint, tokenizer, **kwargs) -> "CheckpointGenerator":
        """From a training workdir (its latest step, which names the model as PATH@STEP), a params
        checkpoint or a Hugging Face directory."""
        from phi_jax.checkpoint import checkpoint_step, load_model
        from phi_jax.files import local_path

        path = local_path(checkpoint)
        step = checkpoint_step(path) if (path / "checkpoints").is_dir() else None
        config, params = load_model(path, step)
        return cls(config, params, tokenizer, str(path) if step is None else f"{path}@{step}", **kwargs)

    def check(self) -> None:
        if self.sampling.max_tokens >= self.config.max_position_embeddings:
            raise SynthError(f"--max_tokens {self.sampling.max_tokens}: the model's context is only "
                             f"{self.config.max_position_embeddings} tokens")

    def run(self, requests, on_done) -> None:
        from phi_jax.generate import complete

        s, context = self.sampling, self.config.max_position_embeddings
        for start in range(0, len(requests), self.batch_size):
            batch, ids = [], []
            for request in requests[start:start + self.batch_size]:
                prompt_ids = self.tokenizer.encode(request.prompt)
                if len(prompt_ids) + s.max_tokens > context:
                    on_done(request, None, f"the prompt has {len(prompt_ids)} tokens: with --max_tokens {s.max_tokens} "
                                           f"that exceeds the model's context of {context}")
                    continue
                batch.append(request)
                ids.append(prompt_ids)
            if not batch:
                continue
            outputs = complete(self.config, self.params, ids, s.max_tokens, batch_size=self.batch_size,
                               seed=self.seed ^ zlib.crc32(batch[0].id.encode()), eos_id=self.tokenizer.eos_id,
                               multiple=64, temperature=s.temperature, top_p=s.top_p)
            for request, prompt_ids, new_ids in zip(batch, ids, outputs):
                finish = "length" if len(new_ids) >= s.max_tokens else "stop"
                on_done(request, Completion(self.tokenizer.decode(new_ids), finish, len(prompt_ids), len(new_ids),
                                            self.model), None)
