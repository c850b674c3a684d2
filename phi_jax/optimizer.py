"""AdamW and the learning-rate schedules of the phi recipes.

The recipes themselves are the experiment files, and only there: experiments/phi15.gin (constant 2e-4,
no warmup, betas (0.9, 0.98), eps 1e-7, weight decay 0.1) and experiments/phi1.gin (linear warmup for
750 steps to 1e-3, then linear decay; weight decay 0.1). The defaults below are phi-1.5's values.
"""

import dataclasses
from typing import Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-4
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    # Steps over which "linear" and "cosine" decay to `final_lr_fraction` x learning_rate.
    decay_steps: int = 0
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-7
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"OptimizerConfig.schedule: expected constant, linear or cosine, found {self.schedule!r}")
        if self.schedule != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"OptimizerConfig: a {self.schedule} schedule needs decay_steps ({self.decay_steps}) "
                             f"greater than warmup_steps ({self.warmup_steps})")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, peak * config.final_lr_fraction, config.decay_steps - warmup)
    else:
        after = optax.cosine_decay_schedule(peak, config.decay_steps - warmup, alpha=config.final_lr_fraction)
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    # Kernels and the embedding decay; biases and LayerNorm params do not (by name, not by ndim,
    # since scanned layers add a leading axis to every param).
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else optax.identity()
    return optax.chain(clip, optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                                         weight_decay=config.weight_decay, mask=_decay_mask))
