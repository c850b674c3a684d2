"""Continuous batching: the same compiled decode calls serve every request in flight.

    engine = Engine(config, params, max_batch_size=16, max_seq_len=512)
    engine.start()                                   # compiles every shape, then runs its thread
    engine.submit(Request(prompt_ids, max_tokens=64, sampling=Sampling(temperature=0.0),
                          stop_ids=frozenset({eos}), emit=callback))   # callback(list of events)
    engine.score(prompt_ids)                         # the prompt's own log-probabilities (echo)
    engine.close()                                   # finishes what is in flight, then stops

The KV cache has `max_batch_size` slots (rows) of `max_seq_len` columns, and each slot keeps its own
length: a request joins a free slot whenever one is free, its prompt prefilled into that slot's row
(prompts that arrive together in one call), and leaves as soon as it ends, while the others go on
decoding. In a decode call the cache's index is a vector, one per row, so each row writes and attends
at its own column; a call makes `decode_steps` tokens and reads only a power-of-two bucket of the
columns. The compiled shapes are a decode call per column bucket and a prefill per prompt bucket
(with one row or all of them), all compiled by `start()`: never one per request.

A prompt is prefilled right padded: its real tokens fill columns 0..P-2, so the decode step that
reads its last token writes column P-1 over the padding, and every column a query can see (causally,
those up to its own) was written by its own request: no padding costs cache room or masking.

All device work runs on the engine's thread, in arrival order between decode calls; callers on other
threads (the HTTP server's event loop) get their tokens through their request's `emit`.
"""

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.config import PhiConfig
from phi_jax.errors import PhiJaxError
from phi_jax.generate import filter_top_k_top_p
from phi_jax.model import KVCache, Phi, init_cache, unstack_layers

log = logging.getLogger(__name__)

TOP_LOGPROBS = 5  # the most alternatives per token a request may ask for (OpenAI's limit for completions)
MIN_BUCKET = 16
PROMPT_RATIO = 4


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    seed: int = 0


class Token(NamedTuple):  # a tuple, not a dataclass: one is made per generated token, on the engine thread
    id: int
    logprob: float
    top: tuple  # ((id, logprob), ...) best first, TOP_LOGPROBS of them


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (a stop id), "length" (max_tokens) or "cancelled"


@dataclasses.dataclass(frozen=True)
class Failed:
    error: str


@dataclasses.dataclass(eq=False)
class Request:
    """A generation. `emit` is called on the engine thread with a list of events after each decode call:
    the new Tokens, and last one Finished or Failed. `cancel()` (from any thread) frees the slot at the
    next call. `logprobs`: fill each Token's `logprob` and `top` (else 0.0 and empty: computing them
    costs a log-softmax of the vocabulary per token)."""
    prompt_ids: list
    max_tokens: int
    sampling: Sampling
    emit: Callable
    stop_ids: frozenset = frozenset()
    logprobs: bool = False
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """Log-probabilities of each prompt token after the ones before it (none for the first)."""
    logprobs: list  # [P - 1] floats, of tokens 1..P-1
    top: list       # [P - 1] tuples ((id, logprob), ...)


class EngineClosedError(PhiJaxError, RuntimeError):
    """A request came after close(): the server is shutting down."""


def buckets(max_seq_len: int, ratio: int = 2) -> list[int]:
    """Lengths the calls compile for: MIN_BUCKET times powers of `ratio`, then max_seq_len. Decode calls
    take ratio 2 (their attention reads the bucket's columns at every token); prompts ratio 4
    (PROMPT_RATIO: prefill runs once per request, so padding costs less than another compile)."""
    sizes, size = [], MIN_BUCKET
    while size < max_seq_len:
        sizes.append(size)
        size *= ratio
    return sizes + [max_seq_len]


def bucket_for(length: int, max_seq_len: int, ratio: int = 2) -> int:
    return next(b for b in buckets(max_seq_len, ratio) if b >= length)


def _draw(logits_BxV, seeds_B, steps_B, temperature_B, top_k_B, top_p_B):
    """Each row's sample from its own key stream (key, step), temperature and filters."""
    logits_BxV = logits_BxV / temperature_B[:, None]
    filtering_B = (top_k_B > 0) | (top_p_B < 1.0)
    filter_rows = jax.vmap(lambda logits_V, top_k, top_p: filter_top_k_top_p(logits_V[None], top_k, top_p)[0])
    logits_BxV = jax.lax.cond(jnp.any(filtering_B), filter_rows, lambda x, *_: x, logits_BxV, top_k_B, top_p_B)

    def draw_row(logits_V, seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, logits_V).astype(jnp.int32)

    return jax.vmap(draw_row)(logits_BxV, seeds_B, steps_B)


def _top(logprobs_BxV):
    lp_BxN, ids_BxN = jax.lax.top_k(logprobs_BxV, TOP_LOGPROBS)
    return ids_BxN.astype(jnp.int32), lp_BxN


def _logprobs(logits_BxV, next_B):
    """The chosen tokens' log-probabilities [B], and the TOP_LOGPROBS best ids and log-probabilities."""
    logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    return jnp.take_along_axis(logprobs_BxV, next_B[:, None], axis=-1)[:, 0], *_top(logprobs_BxV)


def _no_logprobs(logits_BxV, next_B):
    shape = (logits_BxV.shape[0], TOP_LOGPROBS)
    return jnp.zeros(next_B.shape, logits_BxV.dtype), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, logits_BxV.dtype)


class DeviceFunctions:
    """The engine's jitted calls over a fixed slot cache; pure functions of their arguments."""

    def __init__(self, config: PhiConfig, max_batch_size: int, cache_len: int, shardings, steps: int):
        self.config = config.replace(scan_layers=False)
        self.steps = steps  # tokens per decode call
        self.model = Phi(self.config)
        self.slots = max_batch_size
        self.cache_len = cache_len
        self.shardings = shardings  # where (params, cache) live: NamedSharding trees, or one device each
        # Over a mesh the cache keeps its layout from call to call (else GSPMD may choose another).
        cache_out = shardings[1] if isinstance(shardings[1], KVCache) else None
        self.decode = jax.jit(self._decode, donate_argnums=1, static_argnames="length",
                              out_shardings=(cache_out, None))
        self.prefill = jax.jit(self._prefill, donate_argnums=1, out_shardings=cache_out)
        self.score = jax.jit(self._score)

    def empty_cache(self) -> KVCache:
        """The slot cache; its `index` ([B]) is set from the slots' positions at every step."""
        shape = init_cache(self.config, self.slots, self.cache_len)
        shape = shape.replace(index=jnp.zeros((self.slots,), jnp.int32))
        # Buffers of their own: the decode step donates the cache, and init_cache's keys and values share one.
        cache = jax.tree.map(jnp.array, shape).replace(prefill=False)
        return jax.device_put(cache, self.shardings[1])

    def _decode(self, params, cache: KVCache, last_B, fresh_B, tokens_B, positions_B, seeds_B, steps_B,
                temperature_B, top_k_B, top_p_B, logprobs_B, *, length: int):
        """`self.steps` tokens for every slot, each fed back as the next input: (cache, (tokens [K, B],
        their logprobs [K, B], top ids [K, B, N] and top logprobs; zeros unless some row's `logprobs_B`)).

        A slot's first input is the last token the previous call made for it (`last_B`, still on the
        device: the host has not read it yet), or `tokens_B` where `fresh_B` (a prompt's last token).

        Only the first `length` columns take part (every slot's positions stay below it): attention
        over the whole cache would cost most of a small model's step.
        """
        sampling_B = temperature_B > 0
        temperature_B = jnp.where(sampling_B, temperature_B, 1.0)
        view = cache.replace(keys=tuple(k[:, :, :length] for k in cache.keys),
                             values=tuple(v[:, :, :length] for v in cache.values),
                             segment_ids_BxS=cache.segment_ids_BxS[:, :length])

        def step(carry, i):
            view, tokens_B = carry
            # Each row writes and attends at its own column: the cache's index is the rows' positions.
            positions_Bx1 = (positions_B + i)[:, None]
            logits_Bx1xV, view = self.model.apply(
                {"params": params}, tokens_B[:, None], positions_BxT=positions_Bx1,
                segment_ids_BxT=jnp.ones_like(positions_Bx1), cache=view.replace(index=positions_Bx1[:, 0]))
            logits_BxV = logits_Bx1xV[:, 0]
            greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
            # Drawing costs random bits and (with top-k/top-p) a sort of every row's vocabulary: only
            # when some slot samples at all.
            sampled_B = jax.lax.cond(jnp.any(sampling_B), _draw, lambda *_: greedy_B, logits_BxV, seeds_B,
                                     steps_B + i, temperature_B, top_k_B, top_p_B)
            next_B = jnp.where(sampling_B, sampled_B, greedy_B)
            scores = jax.lax.cond(jnp.any(logprobs_B), _logprobs, _no_logprobs, logits_BxV, next_B)
            return (view, next_B), (next_B, *scores)

        tokens_B = jnp.where(fresh_B, tokens_B, last_B)
        (view, _), out = jax.lax.scan(step, (view, tokens_B), jnp.arange(self.steps))

        # Back into the cache go only the columns this call wrote, each row's `steps` from its position:
        # copying the whole view back cost a tenth of a small model's step. (`length` keeps every row's
        # columns inside the view; at the cache's end the two clamp alike.)
        write = self._write_columns(positions_B)
        keys = tuple(write(k, u, axis=1) for k, u in zip(cache.keys, view.keys))
        values = tuple(write(v, u, axis=1) for v, u in zip(cache.values, view.values))
        segments = write(cache.segment_ids_BxS, view.segment_ids_BxS, axis=0)
        return cache.replace(keys=keys, values=values, segment_ids_BxS=segments, index=view.index), out

    def _write_columns(self, positions_B):
        """(full, view, axis) -> `full` with each row's `steps` columns from its position (along the row's
        `axis`) taken from `view`."""
        def write(full_B, view_B, axis: int):
            def row(full, part, at):
                written = jax.lax.dynamic_slice_in_dim(part, at, self.steps, axis=axis)
                return jax.lax.dynamic_update_slice_in_dim(full, written, at, axis=axis)
            return jax.vmap(row)(full_B, view_B, positions_B)
        return write

    def _prefill(self, params, cache: KVCache, slots_R, tokens_RxP):
        """Fills columns 0..P-1 of the rows `slots_R` with the keys and values of `tokens_RxP` (right
        padded). A row may repeat (the batch is filled up to a compiled size with copies)."""
        rows = init_cache(self.config, *tokens_RxP.shape)
        _, rows = self.model.apply({"params": params}, tokens_RxP, cache=rows)
        length = tokens_RxP.shape[1]

        def write(full, new):
            return full.at[slots_R, :, :length].set(new.astype(full.dtype))

        return cache.replace(keys=tuple(map(write, cache.keys, rows.keys)),
                             values=tuple(map(write, cache.values, rows.values)),
                             segment_ids_BxS=cache.segment_ids_BxS.at[slots_R, :length].set(rows.segment_ids_BxS))

    def _score(self, params, tokens_1xP):
        """Logprob of each token after the ones before it, and the top alternatives: [P - 1] each."""
        logits_1xPxV = self.model.apply({"params": params}, tokens_1xP)
        logprobs_PxV = jax.nn.log_softmax(logits_1xPxV[0, :-1], axis=-1)
        chosen_P = jnp.take_along_axis(logprobs_PxV, tokens_1xP[0, 1:, None], axis=-1)[:, 0]
        return (chosen_P, *_top(logprobs_PxV))


@dataclasses.dataclass
class _Slot:
    request: Request
    token: int            # the prompt's last token: the first input
    position: int         # the next decode call's first position (= cache column)
    dispatched: int = 0   # tokens the decode calls sent so far make (some not read back yet)
    generated: int = 0    # tokens handed to the request


class Engine:
    def __init__(self, config: PhiConfig, params, *, max_batch_size: int = 16, max_seq_len: int | None = None,
                 decode_steps: int = 8, gather_s: float = 0.005, mesh=None):
        max_seq_len = max_seq_len or config.max_position_embeddings
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        if decode_steps > max_seq_len:
            raise ValueError(f"decode_steps {decode_steps} exceeds max_seq_len {max_seq_len}: a decode call writes "
                             "that many columns of each slot")
        if config.scan_layers:  # a scanned cache is restacked on every token (see generate)
            params = unstack_layers(params, config.num_layers)
            config = config.replace(scan_layers=False)
        self.config, self.max_batch_size, self.max_seq_len = config, max_batch_size, max_seq_len
        self.gather_s = gather_s
        # Params and cache committed to their devices alike, on one device too: a call that mixed
        # committed and uncommitted arrays would compile the decode step a second time.
        device = jax.local_devices()[0]
        shardings = (device, device) if mesh is None else _shardings(config, params, mesh)
        self.params = jax.device_put(params, shardings[0])
        self.fn = DeviceFunctions(config, max_batch_size, max_seq_len, shardings, decode_steps)
        self._jobs: queue.Queue = queue.Queue()
        self._slots: list[_Slot | None] = [None] * max_batch_size
        self._waiting: list[Request] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phi-jax-engine", daemon=True)
        self.stats = {"decode_steps": 0, "generated_tokens": 0, "prefilled_tokens": 0}

    # ----------------------------------------------------------------------------------- interface

    def start(self, compile_ahead: bool = True):
        """Compiles the decode call for every cache-length bucket and the prefill for every prompt bucket
        (so that no request waits for a compile; else only the first decode shape, the rest on first
        use), then starts the engine thread."""
        t0 = time.perf_counter()
        self._reset_device_state()
        lengths = buckets(self.max_seq_len) if compile_ahead else buckets(self.max_seq_len)[:1]
        for length in lengths:
            self._cache, out = self.fn.decode(self.params, self._cache, self._last, *self._step_inputs(),
                                              length=length)
        for length in buckets(self.max_seq_len, PROMPT_RATIO) if compile_ahead else ():
            for rows in sorted({1, self.max_batch_size}):
                self._cache = self.fn.prefill(self.params, self._cache, jnp.zeros(rows, jnp.int32),
                                              jnp.zeros((rows, length), jnp.int32))
        jax.block_until_ready((self._cache, out))
        self._reset_device_state()
        log.info("compiled %s for %d slots x %d tokens in %.1f s", self.compiled(), self.max_batch_size,
                 self.max_seq_len, time.perf_counter() - t0)
        self._thread.start()

    def submit(self, request: Request):
        if self._closing.is_set():
            raise EngineClosedError("the server is shutting down")
        self._jobs.put(request)

    def score(self, prompt_ids) -> Future:
        """A Future of PromptScores for `prompt_ids` (at least 2 tokens, at most max_seq_len)."""
        future: Future = Future()
        if self._closing.is_set():
            future.set_exception(EngineClosedError("the server is shutting down"))
        else:
            self._jobs.put((list(prompt_ids), future))
        return future

    def close(self, timeout: float | None = None):
        """Stops taking requests, finishes those already taken, then stops the thread."""
        self._closing.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def compiled(self) -> dict:
        """How many shapes each device call has compiled for (the decode step: always one)."""
        return {name: getattr(self.fn, name)._cache_size() for name in ("decode", "prefill", "score")}

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def queued(self) -> int:
        return len(self._waiting) + self._jobs.qsize()

    # ----------------------------------------------------------------------------------- the loop

    def _run(self):
        """Decode calls are pipelined: the next one is sent before the host reads the last one's tokens,
        so the device never waits for the host's bookkeeping. A slot that ended in the call being read
        rides along in the next one; what it makes there is dropped."""
        in_flight = None
        while True:
            idle = self.active == 0 and not self._waiting and in_flight is None
            if idle and self._closing.is_set() and self._jobs.empty():
                return
            self._take_jobs(block=idle)
            self._admit()
            sent = self._dispatch() if any(map(self._wants_tokens, self._slots)) else None
            if in_flight is not None:
                self._read(*in_flight)
            in_flight = sent

    def _wants_tokens(self, slot: "_Slot | None") -> bool:
        """A slot whose request may take more tokens than the calls already sent make for it. When none
        does, the next call is not sent: its tokens would all be dropped, and in closed-loop traffic
        (requests of one length) its time would come out of the next requests'."""
        return (slot is not None and slot.dispatched < slot.request.max_tokens
                and len(slot.request.prompt_ids) + slot.dispatched < self.max_seq_len)

    def _take_jobs(self, block: bool):
        """Moves new requests to the waiting list and runs scoring jobs at once (they hold no slot).

        `block` (the engine is idle): waits for a job, then gathers what arrives within `gather_s` of it,
        so that clients that come back together start in one batch, not one slot first."""
        deadline = None
        while len(self._waiting) < self.max_batch_size:
            try:
                if deadline is None:
                    job = self._jobs.get(block=block, timeout=0.5 if block else None)
                else:
                    job = self._jobs.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return
            if block and deadline is None:
                deadline = time.monotonic() + self.gather_s
            if isinstance(job, Request):
                self._waiting.append(job)
            elif isinstance(job, tuple):
                self._run_score(*job)
            elif job is None:  # close(): stop waiting
                return

    def _run_score(self, prompt_ids, future: Future):
        if not future.set_running_or_notify_cancel():
            return
        try:
            length = bucket_for(len(prompt_ids), self.max_seq_len, PROMPT_RATIO)
            tokens = np.zeros((1, length), np.int32)
            tokens[0, :len(prompt_ids)] = prompt_ids
            chosen, top_ids, top_lps = jax.device_get(self.fn.score(self.params, jnp.asarray(tokens)))
            n = len(prompt_ids) - 1
            top = [tuple(zip(top_ids[i].tolist(), top_lps[i].tolist())) for i in range(n)]
            future.set_result(PromptScores(chosen[:n].tolist(), top))
        except Exception as e:  # reported to that request alone; the engine goes on
            log.exception("scoring a %d-token prompt failed", len(prompt_ids))
            future.set_exception(e)

    def _admit(self):
        """Waiting requests into free slots; their prompts prefilled together, a call per length bucket."""
        admitted = []
        free = [i for i, slot in enumerate(self._slots) if slot is None]
        while free and self._waiting:
            request = self._waiting.pop(0)
            if request.cancelled.is_set():
                _emit(request, [Finished("cancelled")])
            else:
                admitted.append((free.pop(0), request))
        by_bucket = {}
        for index, request in admitted:
            if len(request.prompt_ids) > 1:
                length = bucket_for(len(request.prompt_ids) - 1, self.max_seq_len, PROMPT_RATIO)
                by_bucket.setdefault(length, []).append((index, request))
            else:
                self._occupy(index, request)
        for length, group in by_bucket.items():
            try:
                self._prefill(length, group)
            except Exception as e:
                log.exception("prefilling %d prompts of up to %d tokens failed", len(group), length)
                for _, request in group:
                    _emit(request, [Failed(f"{type(e).__name__}: {e}")])
                continue
            for index, request in group:
                self._occupy(index, request)

    def _prefill(self, length: int, group):
        """One prefill call for `group` [(slot, request)]: one row, or as many rows as slots (filled up with
        copies), so that two shapes a bucket compile."""
        rows = 1 if len(group) == 1 else self.max_batch_size
        tokens = np.zeros((rows, length), np.int32)
        slots = np.full(rows, group[0][0], np.int32)
        for row, (index, request) in enumerate(group):
            tokens[row, :len(request.prompt_ids) - 1] = request.prompt_ids[:-1]
            slots[row] = index
        tokens[len(group):] = tokens[0]
        self._cache = self.fn.prefill(self.params, self._cache, jnp.asarray(slots), jnp.asarray(tokens))
        self.stats["prefilled_tokens"] += sum(len(request.prompt_ids) - 1 for _, request in group)

    def _occupy(self, index: int, request: Request):
        prompt = request.prompt_ids
        self._slots[index] = _Slot(request, token=prompt[-1], position=len(prompt) - 1)

    def _reset_device_state(self):
        """An empty cache, and no last tokens: what a decode call that failed leaves behind is unknown."""
        self._cache = self.fn.empty_cache()
        placement = self.fn.shardings[1]
        self._last = jax.device_put(np.zeros(self.max_batch_size, np.int32),
                                    placement.index if isinstance(placement, KVCache) else placement)

    def _step_inputs(self):
        """Host arrays of every slot's input for the next decode call (idle slots decode at 0)."""
        n = self.max_batch_size
        fresh, tokens = np.zeros(n, bool), np.zeros(n, np.int32)
        positions, steps, seeds = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        temperature, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
        logprobs = np.zeros(n, bool)
        for i, slot in enumerate(self._slots):
            if slot is None:
                continue
            s = slot.request.sampling
            fresh[i], tokens[i], positions[i] = slot.dispatched == 0, slot.token, slot.position
            steps[i], seeds[i], logprobs[i] = slot.dispatched, s.seed, slot.request.logprobs
            temperature[i], top_k[i], top_p[i] = s.temperature, s.top_k, s.top_p
        return tuple(map(jnp.asarray, (fresh, tokens, positions, seeds, steps, temperature, top_k, top_p, logprobs)))

    def _decode_length(self) -> int:
        """The columns the next decode call needs: its slots' furthest position after its steps, in a
        bucket (so that a few shapes compile), up to the whole cache."""
        furthest = max((slot.position for slot in self._slots if slot is not None), default=0) + self.fn.steps
        return bucket_for(min(furthest, self.max_seq_len), self.max_seq_len)

    def _dispatch(self):
        """Sends a decode call for the active slots and moves them on; (its outputs, the slots it served)."""
        inputs, length = self._step_inputs(), self._decode_length()
        self._cache, out = self.fn.decode(self.params, self._cache, self._last, *inputs, length=length)
        self._last = out[0][-1]
        served = [(i, slot) for i, slot in enumerate(self._slots) if slot is not None]
        for _, slot in served:
            slot.position += self.fn.steps
            slot.dispatched += self.fn.steps
        self.stats["decode_steps"] += self.fn.steps
        return out, served

    def _read(self, out, served):
        """Hands a finished decode call's tokens to the requests it served that are still running."""
        try:
            tokens_KxB, chosen_KxB, top_ids_KxBxN, top_lps_KxBxN = jax.device_get(out)
        except Exception as e:  # the device call itself: every request in flight has failed
            log.exception("the decode step failed; failing %d requests", self.active)
            for i, slot in enumerate(self._slots):
                if slot is not None:
                    self._slots[i] = None
                    _emit(slot.request, [Failed(f"{type(e).__name__}: {e}")])
            self._reset_device_state()
            return
        for i, slot in served:
            if self._slots[i] is slot:
                tops = (top_ids_KxBxN[:, i].tolist(), top_lps_KxBxN[:, i].tolist())
                self._advance(i, slot, tokens_KxB[:, i].tolist(), chosen_KxB[:, i].tolist(), tops)

    def _advance(self, index: int, slot: _Slot, tokens: list, logprobs: list, tops):
        """Hands a slot's new tokens to its request, up to where it ends (the call ran on past it)."""
        request, events, reason = slot.request, [], None
        if request.cancelled.is_set():
            reason = "cancelled"
        prompt_len = len(request.prompt_ids)
        for j, token_id in enumerate(tokens if reason is None else ()):
            top = tuple(zip(tops[0][j], tops[1][j])) if request.logprobs else ()
            events.append(Token(token_id, logprobs[j], top))
            slot.generated += 1
            if token_id in request.stop_ids:
                reason = "stop"
            elif slot.generated >= request.max_tokens or prompt_len + slot.generated >= self.max_seq_len:
                reason = "length"
            if reason:
                break
        self.stats["generated_tokens"] += len(events)
        if reason:
            self._slots[index] = None
            events.append(Finished(reason))
        if not _emit(request, events) and self._slots[index] is slot:
            self._slots[index] = None
            _emit(request, [Finished("cancelled")])


def _emit(request: Request, events: list) -> bool:
    """False if the request's consumer raised: a broken consumer must not stop the engine."""
    try:
        request.emit(events)
        return True
    except Exception:
        log.exception("a request's consumer failed; cancelling it")
        return False


def _shardings(config: PhiConfig, params, mesh):
    """Params by the project's logical rules; the cache's slots over `data`, its heads over `tensor`."""
    from jax.sharding import NamedSharding, PartitionSpec

    from phi_jax.model import init_boxed_params
    from phi_jax.sharding import logical_sharding

    boxed = jax.eval_shape(lambda: init_boxed_params(config, jax.random.key(0)))
    param_shardings = logical_sharding(boxed, mesh)
    kv = NamedSharding(mesh, PartitionSpec("data", "tensor", None, None))
    cache = KVCache(tuple(kv for _ in range(config.num_layers)), tuple(kv for _ in range(config.num_layers)),
                    NamedSharding(mesh, PartitionSpec("data", None)), NamedSharding(mesh, PartitionSpec("data")))
    return param_shardings, cache
