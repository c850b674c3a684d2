"""The HTTP API of `phi-jax serve`: OpenAI's completions and chat completions, on FastAPI.

    GET  /health                 200 once the model is loaded and its decode step compiled
    GET  /v1/models              the one model served (--model_name)
    POST /v1/completions         prompt (text, ids, or a list of either), echo and logprobs included
    POST /v1/chat/completions    messages, rendered with the checkpoint's chat template
    POST /tokenize, /detokenize  GET /tokenizer_info: vLLM's tokenizer endpoints, which lm-eval's
                                 local-completions uses instead of loading a tokenizer itself
    GET  /metrics                JSON counters: requests received and finished, tokens, slots in use

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and name the field and
the limit. Every request runs in the engine's continuous batch (phi_jax/serving/engine.py); a
stream's client that goes away cancels its requests, which frees their slots.
"""

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from phi_jax.errors import PhiJaxError
from phi_jax.serving.engine import EngineClosedError, Failed, Finished, Request, Sampling, Token
from phi_jax.serving.text import IncrementalText

log = logging.getLogger(__name__)

MAX_CHOICES = 16
OPEN_PATHS = ("/health",)  # answered without an API key: a load balancer's probe has none


class APIError(PhiJaxError):
    """A request the server refuses or cannot serve: its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


# ------------------------------------------------------------------------------------------ request bodies


class StreamOptions(BaseModel):
    include_usage: bool = True


class SamplingFields(BaseModel):
    # Fields this server does not implement (user, presence_penalty, ...) are ignored, as vLLM does:
    # clients send them by default.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's: generate max_tokens whatever the model emits")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the template may read them
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


# ------------------------------------------------------------------------------------------ one choice


class Choice:
    """One generated continuation: its text so far, tokens and their logprobs, and how it ended."""

    def __init__(self, index: int, prompt_ids: list, text: IncrementalText):
        self.index, self.prompt_ids, self.text = index, prompt_ids, text
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        self.announced = False  # a chat stream's first chunk of this choice, with its role, is out


class Server:
    """What the endpoints share: the engine, the tokenizer, the limits, and the counters."""

    def __init__(self, engine, tokenizer, *, model_name: str = "phi-jax", chat_template: str | None = None,
                 chat_stop_ids=(), api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.chat_stop_ids, self.api_key = chat_template, frozenset(chat_stop_ids), api_key
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = engine.config.vocab_size
        self.ready = False
        self.created = int(time.time())
        self.counters = {"requests_received": 0, "requests_completed": 0, "requests_failed": 0,
                         "prompt_tokens": 0, "completion_tokens": 0}

    # ------------------------------------------------------------------------------------ checks

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "not_found_error")

    def prompt_ids(self, prompt, param: str = "prompt") -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, f"{param} is empty", param)
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for i, row in enumerate(ids):
            if not row:
                raise APIError(400, f"{param}[{i}] has no tokens; give at least one", param)
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"{param}[{i}] holds token id {bad[0]}, outside the vocabulary "
                               f"0..{self.vocab_size - 1}", param)
        return ids

    def check_lengths(self, prompts: list[list[int]], max_tokens: int, param: str = "max_tokens"):
        if max_tokens > self.max_seq_len:
            raise APIError(400, f"{param} is {max_tokens}; this server's limit is {self.max_seq_len} "
                           f"(its --max_seq_len)", param)
        for row in prompts:
            if len(row) + max_tokens > self.max_seq_len:
                raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens; you "
                               f"requested {len(row) + max_tokens} ({len(row)} in the prompt, {max_tokens} for "
                               f"the completion). Shorten the prompt or lower {param}.", param)

    def sampling(self, body: SamplingFields, choice: int) -> Sampling:
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        # Each choice of a request draws its own stream; with a seed, the same one on every run.
        return Sampling(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                        seed=(seed * MAX_CHOICES * 1024 + choice) % 2**31)

    # ------------------------------------------------------------------------------------ generation

    async def run_choice(self, choice: Choice, max_tokens: int, sampling: Sampling, stop_ids, on_delta=None,
                         logprobs: bool = False):
        """Generates `choice` to its end, calling `on_delta(choice, text, new tokens)` as text becomes
        final. Cancelled (the client went away): the engine request is cancelled, its slot freed."""
        if max_tokens == 0:
            choice.finish_reason = "length"
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        # A choice that neither streams nor looks for stop strings needs its tokens only at its end:
        # waking the event loop after every decode call (16 requests, 16 wake-ups a call) would take
        # the cores from the decode calls themselves.
        wants_each_call = on_delta is not None or bool(choice.text.stop)
        held: list = []

        def emit(batch):
            if wants_each_call:
                loop.call_soon_threadsafe(events.put_nowait, batch)
                return
            held.extend(batch)
            if batch and isinstance(batch[-1], (Finished, Failed)):
                loop.call_soon_threadsafe(events.put_nowait, held)

        request = Request(choice.prompt_ids, max_tokens, sampling, emit, stop_ids=frozenset(stop_ids),
                          logprobs=logprobs)
        try:
            self.engine.submit(request)
        except EngineClosedError as e:
            raise APIError(503, str(e), kind="server_error") from None
        unsent: list[Token] = []
        try:
            while choice.finish_reason is None:
                batch = await events.get()
                end = batch[-1] if isinstance(batch[-1], (Finished, Failed)) else None
                tokens = batch[:-1] if end else batch
                if isinstance(end, Failed):
                    raise APIError(500, f"generation failed: {end.error}", kind="server_error")
                choice.text.add([t.id for t in tokens if t.id not in stop_ids])
                if choice.text.stopped:  # the tokens after the one that completed a stop string are not its
                    tokens = tokens[:choice.text.used]
                choice.tokens += tokens
                unsent += tokens
                if choice.text.stopped:
                    choice.finish_reason = "stop"
                elif end:
                    choice.finish_reason = "length" if end.reason == "length" else "stop"
                delta = choice.text.release()
                if on_delta and delta:
                    await on_delta(choice, delta, unsent)
                    unsent = []
        finally:
            request.cancel()
        rest = choice.text.flush()
        if on_delta and (rest or unsent):
            await on_delta(choice, rest, unsent)

    async def prompt_scores(self, prompt_ids):
        if len(prompt_ids) < 2:
            return None
        return await asyncio.wrap_future(self.engine.score(prompt_ids))

    def usage(self, prompts, choices) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def top_dict(self, top, n: int) -> dict:
        """OpenAI's {token text: logprob} of the n best; a text that two ids share keeps the better."""
        best = {}
        for token_id, logprob in top[:n]:
            best.setdefault(self.token_text(token_id), logprob)
        return best


# ------------------------------------------------------------------------------------------ the app


def create_app(server: Server) -> FastAPI:
    async def authorize(request: HTTPRequest):  # async: a plain def would hop to a worker thread
        # A dependency of every route, checked before its handler runs: a request without the key
        # reaches no model code. (Not an http middleware: Starlette's adds a task group per request.)
        if server.api_key and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <--api_key>'",
                               kind="authentication_error")

    # Responses are JSONResponse: FastAPI's encoder would walk every dict first.
    app = FastAPI(title="phi-jax serve", openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorize)], default_response_class=JSONResponse)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.kind)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        # One request's failure is that request's 500; the server and the other requests go on.
        log.error("a request failed", exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        got = f" (got {json.dumps(first['input'])[:80]})" if "input" in first and first["type"] != "missing" else ""
        return error_response(400, f"{field}: {first.get('msg', 'invalid')}{got}", field)

    @app.get("/health")
    async def health():
        if not server.ready:
            return error_response(503, "the model is still loading", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return {**server.counters, **server.engine.stats, "active_slots": server.engine.active,
                "queued": server.engine.queued, "max_batch_size": server.engine.max_batch_size,
                "compiled": server.engine.compiled()}

    def model_card():
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "phi-jax",
                "max_model_len": server.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eos = server.token_text(server.tokenizer.eos_id)
        return {"eos_token": eos, "bos_token": eos, "pad_token": eos, "model_max_length": server.max_seq_len,
                "tokenizer_class": "PreTrainedTokenizerFast"}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokens = server.tokenizer.encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return _response(await _counted(server, _completions(server, body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return _response(await _counted(server, _chat_completions(server, body)))

    return app


def _response(result):
    return result if isinstance(result, StreamingResponse) else JSONResponse(result)


async def _counted(server: Server, handler):
    server.counters["requests_received"] += 1
    try:
        response = await handler
    except BaseException:
        server.counters["requests_failed"] += 1
        raise
    server.counters["requests_completed"] += 1
    return response


def _stop_strings(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or ())


async def _run_all(server: Server, choices, max_tokens, samplings, stop_ids, on_delta=None,
                   logprobs: bool = False):
    """Runs every choice in the engine at once; the first failure cancels the others."""
    tasks = [asyncio.create_task(server.run_choice(c, max_tokens, s, stop_ids, on_delta, logprobs))
             for c, s in zip(choices, samplings)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _record(server: Server, usage: dict):
    server.counters["prompt_tokens"] += usage["prompt_tokens"]
    server.counters["completion_tokens"] += usage["completion_tokens"]


# ------------------------------------------------------------------------------------------ completions


async def _completions(server: Server, body: CompletionRequest):
    server.check_model(body.model)
    prompts = server.prompt_ids(body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    server.check_lengths(prompts, max_tokens)
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens is 0: nothing to generate (with echo, 0 scores the prompt alone)",
                       "max_tokens")
    stop = _stop_strings(body.stop)
    choices = [Choice(i * body.n + j, p, IncrementalText(server.tokenizer, stop))
               for i, p in enumerate(prompts) for j in range(body.n)]
    samplings = [server.sampling(body, c.index) for c in choices]
    stop_ids = set() if body.ignore_eos else {server.tokenizer.eos_id}
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name}
    scores = await _echo_scores(server, body, prompts)
    def run(on_delta=None):
        return _run_all(server, choices, max_tokens, samplings, stop_ids, on_delta, body.logprobs is not None)

    if body.stream:
        return _stream(server, head, choices, prompts, run, _completion_chunk, scores, body)
    await run()
    usage = server.usage(prompts, choices)
    _record(server, usage)
    out = []
    for c in choices:
        prompt_index = c.index // body.n
        text = (server.tokenizer.decode(c.prompt_ids) if body.echo else "") + c.text.text
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(server, c.prompt_ids if body.echo else [], scores[prompt_index],
                                            c.tokens, body.logprobs)
        out.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return {**head, "choices": out, "usage": usage}


async def _echo_scores(server: Server, body: CompletionRequest, prompts):
    """Each prompt's own token logprobs, when the request echoes the prompt with logprobs."""
    if not (body.echo and body.logprobs is not None):
        return [None] * len(prompts)
    return await asyncio.gather(*(server.prompt_scores(p) for p in prompts))


def _completion_logprobs(server: Server, echoed: list, scores, tokens: list[Token], n: int, offset: int = 0) -> dict:
    """OpenAI's completions logprobs: the echoed prompt's tokens (the first has none), then the generated ones."""
    texts, token_logprobs, tops = [], [], []
    for i, token_id in enumerate(echoed):
        texts.append(server.token_text(token_id))
        if i == 0 or scores is None:
            token_logprobs.append(None)
            tops.append(None)
        else:
            token_logprobs.append(scores.logprobs[i - 1])
            tops.append(server.top_dict(scores.top[i - 1], n) if n else {})
    for token in tokens:
        texts.append(server.token_text(token.id))
        token_logprobs.append(token.logprob)
        tops.append(server.top_dict(token.top, n) if n else {})
    offsets, position = [], offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _completion_chunk(server, body, choice, text, tokens, scores=None, echo_ids=()):
    logprobs = None
    if body.logprobs is not None:
        logprobs = _completion_logprobs(server, list(echo_ids), scores, tokens, body.logprobs)
    return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": None}


# ------------------------------------------------------------------------------------------ chat


async def _chat_completions(server: Server, body: ChatRequest):
    server.check_model(body.model)
    if server.chat_template is None:
        raise APIError(400, "this model has no chat template (no chat_template.jinja or chat_template in its "
                       "tokenizer_config.json): use /v1/completions, or restart with --chat_template "
                       "(phi, chatml, or a file)", "messages")
    from phi_jax.data.chat import ChatError, encode_chat

    messages = [{**m.model_dump(exclude_none=True),
                 "content": m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content)}
                for m in body.messages]
    try:
        ids, _ = encode_chat(messages, server.tokenizer.path, server.chat_template, add_generation_prompt=True)
    except ChatError as e:
        raise APIError(400, str(e), "messages") from None
    prompts = server.prompt_ids([ids], "messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(server.max_seq_len - len(ids), 0)
    server.check_lengths(prompts, max_tokens, param)
    if max_tokens == 0:
        raise APIError(400, f"{param} is 0: nothing to generate", param)
    stop = _stop_strings(body.stop)
    choices = [Choice(j, ids, IncrementalText(server.tokenizer, stop)) for j in range(body.n)]
    samplings = [server.sampling(body, j) for j in range(body.n)]
    stop_ids = set() if body.ignore_eos else server.chat_stop_ids | {server.tokenizer.eos_id}
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.model_name}
    def run(on_delta=None):
        return _run_all(server, choices, max_tokens, samplings, stop_ids, on_delta, body.logprobs)

    if body.stream:
        return _stream(server, {**head, "object": "chat.completion.chunk"}, choices, prompts, run, _chat_chunk,
                       [None], body)
    await run()
    usage = server.usage(prompts, choices)
    _record(server, usage)
    out = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
            "logprobs": _chat_logprobs(server, c.tokens, body) if body.logprobs else None,
            "finish_reason": c.finish_reason} for c in choices]
    return {**head, "choices": out, "usage": usage}


def _chat_logprobs(server: Server, tokens: list[Token], body: ChatRequest) -> dict:
    def entry(token_id, logprob):
        text = server.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    n = body.top_logprobs or 0
    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:n]]}
                        for t in tokens]}


def _chat_chunk(server, body, choice, text, tokens, scores=None, echo_ids=()):
    delta = {"content": text}
    if not choice.announced:
        delta, choice.announced = {"role": "assistant", **delta}, True
    return {"index": choice.index, "delta": delta,
            "logprobs": _chat_logprobs(server, tokens, body) if body.logprobs else None, "finish_reason": None}


# ------------------------------------------------------------------------------------------ streaming


def _stream(server: Server, head: dict, choices, prompts, run, make_chunk, scores, body):
    """Server-sent events: a chunk per piece of final text of any choice, a last chunk per choice with its
    finish_reason, a usage chunk, then `data: [DONE]`. `run(on_delta)` generates every choice. Closing
    the stream (the client went away) cancels the generation, which frees its slots."""
    chunks: asyncio.Queue = asyncio.Queue()

    async def on_delta(choice, text, tokens):
        await chunks.put(make_chunk(server, body, choice, text, list(tokens)))

    async def generate():
        try:
            await run(on_delta)
        finally:
            await chunks.put(None)

    def sse(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def events():
        if getattr(body, "echo", False):
            for c in choices:
                echo = make_chunk(server, body, c, server.tokenizer.decode(c.prompt_ids), [],
                                  scores[c.index // body.n], c.prompt_ids)
                yield sse({**head, "choices": [echo]})
        generation = asyncio.create_task(generate())
        try:
            while (chunk := await chunks.get()) is not None:
                yield sse({**head, "choices": [chunk]})
            await generation  # raises the generation's error, if any
            for c in choices:
                last = make_chunk(server, body, c, "", [])
                last["finish_reason"] = c.finish_reason
                if "delta" in last:
                    last["delta"] = {}
                yield sse({**head, "choices": [last]})
            usage = server.usage(prompts, choices)
            _record(server, usage)
            if body.stream_options is None or body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage})
        except APIError as e:
            yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
