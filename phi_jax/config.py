"""PhiConfig: the shape and options of a phi model, as a plain frozen dataclass.

Gin and the CLI build one of these at the edges; everything inside phi_jax takes it as is.
"""

import dataclasses
import json
from typing import Literal, get_args

import jax.numpy as jnp

RematPolicy = Literal["none", "full", "dots"]
# "auto" picks per backend and call (phi_jax.attention.choose_impl); the others force one implementation.
AttentionImpl = Literal["auto", "xla", "pallas_gpu", "pallas_tpu", "cudnn"]

# CodeGen / GPT-2 byte-level BPE: <|endoftext|> is bos, eos and unk for every phi vocabulary.
PHI_EOS_ID = 50256
PHI_BASE_VOCAB = 50257


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 24
    num_heads: int = 32
    head_dim: int = 64
    rotary_dim: int = 32
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    initializer_range: float = 0.02
    # Activations and matmuls run in `dtype`; params stay float32 and logits come out float32.
    dtype: str = "float32"
    remat: RematPolicy = "none"
    scan_layers: bool = False
    attention_impl: AttentionImpl = "auto"
    # Run the Pallas kernels' bodies on the CPU (Pallas interpret mode): slow, for tests and debugging.
    attention_interpret: bool = False

    def __post_init__(self):
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"PhiConfig: num_heads * head_dim must equal hidden_size, found "
                f"{self.num_heads} * {self.head_dim} != {self.hidden_size}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"PhiConfig: rotary_dim must be even and within [0, head_dim={self.head_dim}], "
                f"found {self.rotary_dim}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"PhiConfig: remat must be 'none', 'full' or 'dots', found {self.remat!r}")
        if self.attention_impl not in get_args(AttentionImpl):
            raise ValueError(f"PhiConfig: attention_impl must be one of {get_args(AttentionImpl)}, "
                             f"found {self.attention_impl!r}")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + self.num_layers * per_layer + 2 * d + d * v + v

    def replace(self, **changes) -> "PhiConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "PhiConfig":
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{source}: unknown PhiConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**fields)


def phi_1_5(**changes) -> PhiConfig:
    """microsoft/phi-1_5: 1.42B parameters, inference defaults (no dropout)."""
    return PhiConfig(**changes)


def phi_1(**changes) -> PhiConfig:
    """microsoft/phi-1: the phi-1.5 shape; trained with attention and residual dropout 0.1."""
    return PhiConfig(**{"attention_dropout": 0.1, "residual_dropout": 0.1, **changes})


def tiny(**changes) -> PhiConfig:
    """A phi small enough to train on two CPU cores in minutes; same structure, phi vocabulary."""
    defaults = dict(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, head_dim=32,
                    rotary_dim=16, max_position_embeddings=512)
    return PhiConfig(**{**defaults, **changes})


PRESETS = {"phi_1": phi_1, "phi_1_5": phi_1_5, "tiny": tiny}
