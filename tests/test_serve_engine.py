"""The serving engine's continuous batching, in process: a KV cache whose rows hold requests of different
lengths, slots reused as requests come and go, and sampling that does not depend on the neighbours.
`core`: only the JAX stack."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.config import tiny
from phi_jax.generate import generate, left_pad
from phi_jax.model import Phi, init_cache, init_params
from phi_jax.serving.engine import PROMPT_RATIO, Engine, Failed, Finished, Request, Sampling, Token, buckets

pytestmark = pytest.mark.core

CONFIG = tiny(vocab_size=300, num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def params():
    """Random weights scaled up so that logits are far from ties: greedy tokens are then stable."""
    params = jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(1))
    return jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def engine(params):
    """Three slots, 4 tokens a decode call: fewer slots than the tests' requests, so slots are reused."""
    engine = Engine(CONFIG, params, max_batch_size=3, max_seq_len=64, decode_steps=4)
    engine.start()
    yield engine
    engine.close(30)


def forward(params, tokens_BxT):
    return jax.jit(Phi(CONFIG).apply)({"params": params}, jnp.asarray(tokens_BxT))


def run(engine, requests, timeout=120):
    """Submits a Request for each (prompt, max_tokens, sampling[, stop_ids]) and returns each one's events."""
    results = [[] for _ in requests]
    done = threading.Semaphore(0)

    def collector(i):
        def emit(batch):
            results[i].extend(batch)
            if isinstance(batch[-1], (Finished, Failed)):
                done.release()
        return emit

    for i, (prompt, max_tokens, sampling, *stop_ids) in enumerate(requests):
        engine.submit(Request(prompt, max_tokens, sampling, collector(i), stop_ids=frozenset(*stop_ids)))
    for _ in requests:
        assert done.acquire(timeout=timeout)
    return results


def tokens_of(events):
    return [e.id for e in events if isinstance(e, Token)]


def test_a_cache_with_an_index_per_row_equals_each_row_alone(params, rng):
    lengths = [3, 9, 1]
    prompts = [rng.integers(0, 300, n) for n in lengths]
    cache = init_cache(CONFIG, 3, 16).replace(index=jnp.zeros(3, jnp.int32), prefill=False)

    @jax.jit
    def step(cache, tokens_Bx1, index_B):
        return Phi(CONFIG).apply({"params": params}, tokens_Bx1, positions_BxT=index_B[:, None],
                                 cache=cache.replace(index=index_B))

    for t in range(max(lengths)):  # row r takes its own prompt, a token a step, at its own index
        index_B = np.asarray([min(t, n - 1) for n in lengths], np.int32)
        tokens_Bx1 = np.asarray([p[i] for p, i in zip(prompts, index_B)])[:, None]
        logits_Bx1xV, cache = step(cache, jnp.asarray(tokens_Bx1), jnp.asarray(index_B))
        for row, prompt in enumerate(prompts):
            if t == len(prompt) - 1:
                np.testing.assert_allclose(logits_Bx1xV[row, 0], forward(params, prompt[None])[0, -1], atol=2e-5)


def test_greedy_requests_equal_generate_while_slots_are_reused(engine, params, rng):
    prompts = [rng.integers(0, 300, n).tolist() for n in (1, 5, 17, 40, 3, 9, 2)]
    max_tokens = [12, 7, 20, 5, 16, 9, 1]
    events = run(engine, [(p, m, Sampling()) for p, m in zip(prompts, max_tokens)])
    tokens_BxP, lengths = left_pad(prompts)
    expected = np.asarray(generate(CONFIG, params, tokens_BxP, max(max_tokens), prompt_lengths=lengths))
    for row, (m, got) in enumerate(zip(max_tokens, events)):
        assert tokens_of(got) == expected[row, tokens_BxP.shape[1]:][:m].tolist() and got[-1] == Finished("length")
    compiled = engine.compiled()  # a shape per length bucket (and, prefilling, 1 row or 3): none per request
    assert (compiled["decode"], compiled["prefill"]) == (len(buckets(64)), 2 * len(buckets(64, PROMPT_RATIO)))


def test_requests_to_the_caches_last_column_and_those_after_them_see_the_right_keys(engine, params, rng):
    # 51 + 13 = 64 = max_seq_len: the last decode calls run past the cache's end (their writes clamp
    # there), and the requests after them reuse those slots. Each token's log-probability is the
    # forward pass's over the whole sequence: any column written to the wrong place would show.
    prompts = [rng.integers(0, 300, n).tolist() for n in (51, 2, 30, 6, 4)]
    max_tokens = [13, 30, 34, 9, 21]
    events = [[] for _ in prompts]
    done = threading.Semaphore(0)
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        def emit(batch, i=i):
            events[i].extend(batch)
            if isinstance(batch[-1], (Finished, Failed)):
                done.release()
        engine.submit(Request(prompt, m, Sampling(), emit, logprobs=True))
    for _ in prompts:
        assert done.acquire(timeout=120)
    for prompt, m, got in zip(prompts, max_tokens, events):
        new = tokens_of(got)
        assert len(new) == m and got[-1] == Finished("length")
        logprobs_TxV = jax.nn.log_softmax(forward(params, np.asarray([prompt + new]))[0], axis=-1)
        expected = [float(logprobs_TxV[len(prompt) - 1 + j, t]) for j, t in enumerate(new)]
        np.testing.assert_allclose([e.logprob for e in got if isinstance(e, Token)], expected, atol=1e-4)


def test_a_stop_id_ends_the_request_there_and_frees_its_slot(params):
    engine = Engine(CONFIG, params, max_batch_size=1, max_seq_len=64, decode_steps=4)
    engine.start()
    free_run = tokens_of(run(engine, [([7, 8, 9], 10, Sampling())])[0])
    stop_id = free_run[2]
    stopped, after = run(engine, [([7, 8, 9], 10, Sampling(), {stop_id}), ([1, 2], 3, Sampling())])
    engine.close(30)
    assert tokens_of(stopped) == free_run[:free_run.index(stop_id) + 1] and stopped[-1] == Finished("stop")
    assert len(tokens_of(after)) == 3 and after[-1] == Finished("length")


def test_seeded_samples_do_not_depend_on_the_requests_beside_them(engine):
    sampled = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=123)
    [alone] = run(engine, [([4, 5, 6], 16, sampled)])
    crowded = run(engine, [([9, 9], 16, Sampling()), ([4, 5, 6], 16, sampled),
                           ([1, 2, 3, 4], 16, Sampling(temperature=0.7, seed=5))])
    other_seed = run(engine, [([4, 5, 6], 16, Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=124))])[0]
    assert tokens_of(crowded[1]) == tokens_of(alone)
    assert tokens_of(other_seed) != tokens_of(alone)


def test_prompt_scores_are_the_forward_pass_log_probabilities(engine, params, rng):
    prompt = rng.integers(0, 300, 23).tolist()
    scores = engine.score(prompt).result(60)
    logits = forward(params, [prompt])[0]
    logprobs = jax.nn.log_softmax(logits[:-1], axis=-1)
    np.testing.assert_allclose(scores.logprobs, logprobs[np.arange(22), prompt[1:]], atol=1e-5)
    assert [ids for ids, _ in scores.top[0]][0] == int(jnp.argmax(logprobs[0]))


def test_the_engine_survives_a_consumer_that_raises(engine):
    events = {"bad": [], "good": []}
    done = threading.Event()

    def bad(batch):
        events["bad"].extend(batch)
        if not isinstance(batch[-1], Finished):
            raise RuntimeError("consumer broke")

    def good(batch):
        events["good"].extend(batch)
        if isinstance(batch[-1], (Finished, Failed)):
            done.set()

    engine.submit(Request([5, 6, 7], 20, Sampling(), bad))
    engine.submit(Request([8, 9], 20, Sampling(), good))
    assert done.wait(60)
    assert events["good"][-1] == Finished("length") and len(tokens_of(events["good"])) == 20
    assert events["bad"][-1] == Finished("cancelled") and len(tokens_of(events["bad"])) == 4
