"""phi-jax: phi-1 and phi-1.5 in JAX/Flax."""

from phi_jax.config import PhiConfig, phi_1, phi_1_5, tiny
from phi_jax.model import KVCache, Phi, init_cache

__all__ = ["KVCache", "Phi", "PhiConfig", "init_cache", "phi_1", "phi_1_5", "tiny"]
