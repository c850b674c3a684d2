"""Generators behind one interface: `generator.run(requests, on_done)` sends each Request and calls
`on_done(request, completion, error)` once per request, as results arrive (completion None with the
error message when it finally failed). `generator.settings` is what the results depend on (model,
API, sampling); it goes into every request id, so a change of settings is a new request.

- OpenAIGenerator: any OpenAI-compatible server (vLLM, TGI, `phi-jax serve`, a hosted API) through the
  official `openai` package, on its completions API (base models) or chat API (instruction-tuned
  ones). Several endpoints are served round-robin, at most `concurrency` requests in flight. A request
  that fails for a reason that may pass (connection refused or reset, timeout, 408, 409, 429, 5xx) is
  retried after an exponential backoff, or after the server's Retry-After if it sent one; any other
  error (a bad request, an unknown model) fails it at once. An endpoint that is unreachable or says
  it is overloaded (429, 503) is left out of the rotation for that wait, so the retry and the other
  requests go to the rest of the fleet at once; when every endpoint is out, requests wait for the
  first to come back.
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


def _is_retriable(error) -> bool:
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):  # refused, reset, timed out
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRIABLE_STATUS or error.status_code >= 500
    return False


def _endpoint_is_down(error) -> bool:
    """The endpoint, not the request, is the trouble: unreachable, or it says it is overloaded."""
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in OVERLOADED_STATUS


def _describe(error, url: str) -> str:
    import openai

    if isinstance(error, openai.APIStatusError):
        return f"{url}: HTTP {error.status_code}: {error.message}"
    return f"{url}: {type(error).__name__}: {error}"


class OpenAIGenerator:
    """OpenAI-compatible endpoints, round-robin; see the module doc."""

    def __init__(self, endpoints: list[str], model: str, *, api: str = "completions", sampling: Sampling = Sampling(),
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, api_key: str = "EMPTY"):
        if api not in ("completions", "chat"):
            raise SynthError(f"--api {api!r}: expected completions or chat")
        if not endpoints:
            raise SynthError("give at least one --endpoint URL (e.g. http://127.0.0.1:8000/v1)")
        self.endpoints, self.model, self.api, self.sampling = [e.rstrip("/") for e in endpoints], model, api, sampling
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff, self.api_key = backoff, max_backoff, api_key
        self.settings = {"model": model, "api": api, **dataclasses.asdict(sampling)}

    def _clients(self):
        import openai

        # Our own retries, not the client's: a retry should go to the next endpoint of the fleet.
        return [openai.AsyncOpenAI(base_url=url, api_key=self.api_key, timeout=self.timeout, max_retries=0)
                for url in self.endpoints]

    def check(self) -> None:
        """Every endpoint that answers serves `model`, and one at least answers: else a SynthError naming
        the URL (or the model). An unreachable endpoint of a fleet is only a warning: it may come back,
        and the rotation leaves it out meanwhile."""
        asyncio.run(self._check())

    async def _check(self):
        import openai

        unreachable = []
        for url, client in zip(self.endpoints, self._clients()):
            try:
                async with client:
                    served = [m.id async for m in client.models.list()]
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                unreachable.append(f"--endpoint {url}: unreachable ({e})")
                continue
            except openai.APIStatusError as e:
                raise SynthError(f"--endpoint {url}: GET {url}/models answered HTTP {e.status_code} "
                                 f"({e.message}); expected an OpenAI-compatible server") from None
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
        clients = self._clients()
        pending = iter(requests)
        turns = itertools.count()
        self._out_until = [0.0] * len(clients)  # time.monotonic() until which an endpoint is left out

        async def worker():
            for request in pending:  # one shared iterator: each request is taken by one worker
                completion, error = await self._send(request, clients, turns)
                on_done(request, completion, error)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, max(1, len(requests))))))
        finally:
            for client in clients:
                await client.close()

    def _pick(self, turns) -> int:
        """The next endpoint in turn that is not left out; if all are, the one back first."""
        start, now, n = next(turns), time.monotonic(), len(self.endpoints)
        order = [(start + k) % n for k in range(n)]
        return next((i for i in order if self._out_until[i] <= now), min(order, key=self._out_until.__getitem__))

    async def _send(self, request, clients, turns):
        import openai

        error = None
        for attempt in range(self.retries + 1):
            turn = self._pick(turns)
            await asyncio.sleep(max(0.0, self._out_until[turn] - time.monotonic()))
            try:
                return await self._call(clients[turn], request.prompt), None
            except openai.OpenAIError as e:
                error = _describe(e, self.endpoints[turn])
                if not _is_retriable(e) or attempt == self.retries:
                    break
                wait = retry_after_seconds(getattr(getattr(e, "response", None), "headers", None))
                if wait is None:
                    wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                wait = min(wait, MAX_RETRY_AFTER_S)
                log.debug("request %s: %s; retrying in %.1fs", request.id, error, wait)
                if _endpoint_is_down(e):
                    self._out_until[turn] = max(self._out_until[turn], time.monotonic() + wait)
                else:  # this request's own trouble (say, a 500 on it): only it waits
                    await asyncio.sleep(wait)
        return None, f"{error} (after {attempt + 1} attempt(s))"

    async def _call(self, client, prompt: str) -> Completion:
        s = self.sampling
        kwargs = dict(model=self.model, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)
        if self.api == "chat":
            response = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
            choice = response.choices[0]
            text = choice.message.content or ""
        else:
            response = await client.completions.create(prompt=prompt, **kwargs)
            choice = response.choices[0]
            text = choice.text or ""
        usage = response.usage
        return Completion(text, choice.finish_reason or "stop", usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, response.model or self.model)


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
