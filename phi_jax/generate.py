"""Sampling with the KV cache: one prefill call, then one cached call per new token."""

import functools

import jax
import jax.numpy as jnp

from phi_jax.config import PhiConfig
from phi_jax.model import Phi, init_cache


def _pick(logits_BxV, temperature, rng):
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits_BxV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature"))
def generate(config: PhiConfig, params, prompt_BxP, max_new_tokens: int, temperature: float = 0.0, rng=None):
    """prompt [B, P] int32 (no padding) -> [B, P + max_new_tokens]; greedy when temperature is 0."""
    model = Phi(config)
    batch, prompt_len = prompt_BxP.shape
    rng = jax.random.key(0) if rng is None else rng
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    logits_BxPxV, cache = model.apply({"params": params}, prompt_BxP, cache=cache)
    rng, step_rng = jax.random.split(rng)
    first_B = _pick(logits_BxPxV[:, -1], temperature, step_rng)

    def step(carry, step_rng):
        token_B, cache = carry
        logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
        next_B = _pick(logits_Bx1xV[:, 0], temperature, step_rng)
        return (next_B, cache), token_B

    (last_B, _), tokens_NxB = jax.lax.scan(step, (first_B, cache), jax.random.split(rng, max_new_tokens - 1))
    new_BxN = jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1)
    return jnp.concatenate([prompt_BxP.astype(jnp.int32), new_BxN], axis=1)
