"""Sampling with the KV cache: one prefill call, then a `lax.while_loop` of one-token cached calls.

    tokens = generate(config, params, prompt_BxP, max_new_tokens=64)                     # greedy
    tokens = generate(config, params, prompt_BxP, 64, temperature=0.8, top_k=50, top_p=0.95,
                      rng=jax.random.key(0), eos_id=50256, prompt_lengths=lengths_B)   # sampled, batched
    tokens = generate(config, params, prompt_BxP, 64, stop_ids=[50256, 50296])        # a chat reply

Batches of prompts of different lengths are left padded: row b holds its prompt in its last
`prompt_lengths[b]` columns (`left_pad` builds such a batch). Pad slots get segment id 0, so no real
token attends to them, and positions count from each row's first real token, as transformers does
with an attention mask. The result is [B, P + max_new_tokens]: the prompt as given, then the new
tokens; a row that produced `eos_id`, or any of `stop_ids` (a chat template's end-of-turn tokens), is
filled with `pad_id` after it (`new_tokens` cuts there), and the loop ends as soon as every row has.
Greedy when temperature is 0; otherwise softmax sampling of logits / temperature, filtered like
transformers' warpers (top-k, then top-p; 0 and 1 turn them off).

Everything but the shapes and `max_new_tokens` is traced: one compilation per (batch, prompt length,
max_new_tokens), whatever the temperature, top-k, top-p, stop ids (up to STOP_SLOTS of them) or seed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.config import PhiConfig
from phi_jax.model import Phi, init_cache, unstack_layers

NO_STOP = -1  # fills the unused stop slots: never a token
STOP_SLOTS = 8  # stop ids are padded to a multiple of this, so their number rarely changes the compilation


def filter_top_k_top_p(logits_BxV, top_k, top_p):
    """-inf outside each row's top_k logits (0: all) and outside the smallest set of them whose
    probability reaches top_p (1: all); at least the best token always stays."""
    vocab = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=-1)
    in_top_k_BxV = sorted_BxV >= kth_Bx1
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = in_top_k_BxV & (mass_before_BxV < top_p)
    keep_BxV = keep_BxV.at[:, 0].set(True)
    count_B = jnp.sum(keep_BxV, axis=-1)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, count_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_tokens(logits_BxV, rng, temperature, top_k, top_p):
    """The next token of each row, drawn from the softmax of logits / temperature after the filters."""
    logits_BxV = logits_BxV / temperature
    filtering = (top_k > 0) | (top_p < 1.0)
    logits_BxV = jax.lax.cond(filtering, lambda x: filter_top_k_top_p(x, top_k, top_p), lambda x: x, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate(config: PhiConfig, params, prompt_BxP, lengths_B, max_new_tokens: int, temperature, top_k, top_p,
              stop_ids_S, pad_id, rng):
    if config.scan_layers:  # a scanned model would stack and unstack the KV cache on every token
        params = unstack_layers(params, config.num_layers)
        config = config.replace(scan_layers=False)
    model = Phi(config)
    batch, prompt_len = prompt_BxP.shape
    pad_B = prompt_len - lengths_B
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    if prompt_len > 1:
        # The prompt but its last token fills the cache; its logits are never used, so XLA drops the
        # lm_head over the whole prompt ([B, P, vocab]). The loop's first step reads the last token.
        column_BxP = jnp.arange(prompt_len - 1)[None, :]
        _, cache = model.apply({"params": params}, prompt_BxP[:, :-1],
                               positions_BxT=jnp.maximum(column_BxP - pad_B[:, None], 0),
                               segment_ids_BxT=(column_BxP >= pad_B[:, None]).astype(jnp.int32), cache=cache)
    else:  # the loop's calls attend over the cache, and its carry keeps one type: its first call too
        cache = cache.replace(prefill=False)
    rngs = jax.random.split(rng, max_new_tokens)
    ones_Bx1 = jnp.ones((batch, 1), jnp.int32)

    def keep_going(state):
        i, _, done_B, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def decode(pick_tokens):
        def step(state):
            i, token_B, done_B, cache, out_BxN = state
            positions_Bx1 = (lengths_B - 1 + i)[:, None]
            logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None], positions_BxT=positions_Bx1,
                                              segment_ids_BxT=ones_Bx1, cache=cache)
            token_B = jnp.where(done_B, pad_id, pick_tokens(logits_Bx1xV[:, 0], i))
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, i))
            return i + 1, token_B, done_B | jnp.isin(token_B, stop_ids_S), cache, out_BxN
        return lambda state: jax.lax.while_loop(keep_going, step, state)

    def greedy(logits_BxV, _):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sample(logits_BxV, i):
        return sample_tokens(logits_BxV, rngs[i], temperature, top_k, top_p)

    out_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), prompt_BxP[:, -1], jnp.zeros((batch,), bool), cache, out_BxN)
    # Greedy or sampled is chosen once, around the loop: a choice per token, inside it, costs a
    # copy of the [B, V] logits per token (10% of a batch-16 step on CPU).
    out_BxN = jax.lax.cond(temperature > 0.0, decode(sample), decode(greedy), state)[-1]
    return jnp.concatenate([prompt_BxP, out_BxN], axis=1)


def generate(config: PhiConfig, params, prompt_BxP, max_new_tokens: int, temperature: float = 0.0, rng=None, *,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, stop_ids=(), pad_id: int | None = None,
             prompt_lengths=None):
    """prompt [B, P] int32, left padded when `prompt_lengths` [B] is given -> [B, P + max_new_tokens].

    Stops a row at `eos_id` or any of `stop_ids` (kept; `pad_id` after it, by default eos_id, else the
    first stop id, else 0). `rng` defaults to key 0.
    """
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    batch, prompt_len = prompt_BxP.shape
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be at least 1, found {max_new_tokens}")
    if prompt_lengths is None:
        lengths_B = jnp.full((batch,), prompt_len, jnp.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > prompt_len:
            raise ValueError(f"generate: prompt_lengths must be [{batch}] values in 1..{prompt_len}, "
                             f"found {lengths.tolist()}")
        lengths_B = jnp.asarray(lengths, jnp.int32)
    # Left padding takes cache slots but no positions: only the longest real prompt must fit.
    longest = prompt_len if prompt_lengths is None else int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceed max_position_embeddings={config.max_position_embeddings}")
    stops = _stop_list(eos_id, stop_ids)
    pad = pad_id if pad_id is not None else (stops[0] if stops else 0)
    slots = max(1, -(-len(stops) // STOP_SLOTS)) * STOP_SLOTS
    stop_ids_S = jnp.asarray(stops + [NO_STOP] * (slots - len(stops)), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(config, params, prompt_BxP, lengths_B, max_new_tokens, jnp.float32(temperature),
                     jnp.int32(top_k), jnp.float32(top_p), stop_ids_S, jnp.int32(pad), rng)


def _stop_list(eos_id: int | None, stop_ids) -> list[int]:
    """eos_id (first, when given) and the stop ids, each once."""
    stops = ([] if eos_id is None else [int(eos_id)]) + [int(i) for i in stop_ids]
    if any(i < 0 for i in stops):
        raise ValueError(f"generate: stop ids must be token ids (>= 0), found {stops}")
    return list(dict.fromkeys(stops))


def left_pad(prompts, pad_id: int = 0, multiple: int = 1):
    """Token-id lists -> (int32 [B, P] left padded, lengths [B]); P is rounded up to `multiple` so
    that batches of nearby lengths share one compilation."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("left_pad: every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def complete(config: PhiConfig, params, prompts, max_new_tokens: int, *, batch_size: int = 8, seed: int = 0,
             eos_id: int | None = None, stop_ids=(), multiple: int = 16, **sampling) -> list[list[int]]:
    """The new ids of each token-id prompt, up to and without the first eos or stop id, generated
    `batch_size` prompts at a time.

    Every batch has the same shape (the last is filled up with copies of a prompt, prompt lengths are
    rounded up to `multiple`), so a long list compiles a few times, not once per batch. Batch i
    samples with `fold_in(key(seed), i)`; `sampling` is temperature, top_k, top_p.
    """
    prompts = [list(p) for p in prompts]
    results = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        tokens_BxP, lengths = left_pad(chunk + [chunk[0]] * (batch_size - len(chunk)), multiple=multiple)
        tokens = generate(config, params, tokens_BxP, max_new_tokens,
                          rng=jax.random.fold_in(jax.random.key(seed), index),
                          eos_id=eos_id, stop_ids=stop_ids, prompt_lengths=lengths, **sampling)
        results += new_tokens(tokens, tokens_BxP.shape[1], eos_id, stop_ids)[:len(chunk)]
    return results


def new_tokens(tokens_BxT, prompt_len: int, eos_id: int | None = None, stop_ids=()) -> list[list[int]]:
    """Each row's generated ids (after the first `prompt_len` columns), up to and without its first eos
    or stop id."""
    stops = set(_stop_list(eos_id, stop_ids))
    rows = []
    for row in np.asarray(tokens_BxT)[:, prompt_len:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        rows.append(row[:end])
    return rows
