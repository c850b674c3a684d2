"""The train step: a pure function of (state, batch), jitted once with explicit shardings.

Loss: next-token cross-entropy weighted by `loss_weights` (0 for padding and, where packing asks,
document boundaries), plus an optional z-loss (z * logsumexp^2, as in PaLM). Gradient accumulation
splits the batch into microbatches and sums *unnormalized* losses, so k microbatches give exactly
the gradient of one big batch.

The loss applies the final LayerNorm and lm_head `loss_chunk_size` positions at a time, each chunk
under remat: float32 logits of a whole phi-1.5 microbatch (16 x 2048 x 51200 per device) are 6.7 GB,
and as many again for their gradient, where chunks of 512 need a quarter of that, forward or
backward. The price is one more lm_head forward per step (the backward recomputes the logits).

A batch is a dict of [batch, seq] arrays: `tokens`, `targets`, `loss_weights`, `segment_ids`,
`positions`.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from phi_jax.batch import FIELDS as BATCH_FIELDS
from phi_jax.config import PhiConfig
from phi_jax.model import Phi, head_logits, init_boxed_params, init_params
from phi_jax.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from phi_jax.sharding import batch_sharding, logical_sharding, replicated

# Divides the usual sequence lengths. At phi15.gin's 16 rows per device a chunk's float32 logits are
# 1.7 GB: larger chunks raise the step's peak memory, smaller ones no longer lower it (README).
DEFAULT_LOSS_CHUNK_SIZE = 512


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    # Raw uint32 key data rather than a typed key, so that Orbax can save it.
    rng: jax.Array


def _uses_dropout(config: PhiConfig) -> bool:
    return max(config.embed_dropout, config.attention_dropout, config.residual_dropout) > 0


def weighted_losses(config: PhiConfig, params, batch, dropout_rng, z_loss: float, segment_aware: bool = True,
                    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE):
    """(sum of weighted loss incl. z-loss, {"ce": sum of weighted CE, "z": ..., "weight": sum of weights}).

    `segment_aware=False` ignores `segment_ids` (concat packing, where they are all 1 and phi attends
    across documents): the attention dispatcher may then pick kernels without segment support.
    `loss_chunk_size`: sequence positions whose logits exist at once (see the module docstring)."""
    deterministic = not _uses_dropout(config)
    x_BxTxD = Phi(config).apply(
        {"params": params}, batch["tokens"], positions_BxT=batch["positions"],
        segment_ids_BxT=batch["segment_ids"] if segment_aware else None, deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng}, return_hidden=True)
    weights_BxT = batch["loss_weights"].astype(jnp.float32)
    ce, log_z_squared = _chunked_loss_sums(config, params, x_BxTxD, batch["targets"], weights_BxT, loss_chunk_size)
    z = z_loss * log_z_squared
    return ce + z, {"ce": ce, "z": z, "weight": jnp.sum(weights_BxT)}


def _chunk_loss_sums(config: PhiConfig, params, x_BxCxD, targets_BxC, weights_BxC):
    """(sum of weighted CE, sum of weighted logsumexp^2) over one chunk of positions."""
    logits_BxCxV = head_logits(config, params, x_BxCxD)
    log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return jnp.sum(weights_BxC * (log_z_BxC - target_logit_BxC)), jnp.sum(weights_BxC * jnp.square(log_z_BxC))


def _chunked_loss_sums(config: PhiConfig, params, x_BxTxD, targets_BxT, weights_BxT, chunk_size: int):
    """`_chunk_loss_sums` over the whole sequence, `chunk_size` positions at a time.

    Each chunk is rematerialized: the backward pass recomputes its logits instead of the scan saving
    every chunk's, which would stack up to the whole [B, T, V] again. The loop runs over the
    sequence, which no mesh axis splits, so every chunk keeps the batch and vocab sharding. A last
    partial chunk is padded with zero-weight positions."""
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be a positive number of positions, found {chunk_size}")
    length = x_BxTxD.shape[1]
    chunk_size = min(chunk_size, length)
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length

    def to_chunks(x_BxT):
        x_BxT = jnp.pad(x_BxT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT.ndim - 2))
        x_BxNxC = x_BxT.reshape(x_BxT.shape[0], chunks, chunk_size, *x_BxT.shape[2:])
        return jnp.moveaxis(x_BxNxC, 1, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # scan already keeps the recompute apart
    def add_chunk(sums, chunk):
        return jax.tree.map(jnp.add, sums, _chunk_loss_sums(config, params, *chunk)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    sums, _ = jax.lax.scan(add_chunk, zeros, (to_chunks(x_BxTxD), to_chunks(targets_BxT), to_chunks(weights_BxT)))
    return sums


def _split_microbatches(batch, microbatches: int):
    """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j+k, ... so that each device's rows
    stay on that device (a contiguous split would move rows across the batch sharding)."""
    def split(x):
        if x.shape[0] % microbatches:
            raise ValueError(f"batch of {x.shape[0]} does not split into {microbatches} microbatches")
        return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(config: PhiConfig, optimizer_config: OptimizerConfig, *, microbatches: int = 1,
                    z_loss: float = 0.0, segment_aware: bool = True, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE):
    optimizer = make_optimizer(optimizer_config)
    schedule = learning_rate_schedule(optimizer_config)
    grad_fn = jax.grad(lambda p, b, r: weighted_losses(config, p, b, r, z_loss, segment_aware, loss_chunk_size),
                       has_aux=True)

    def train_step(state: TrainState, batch):
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if microbatches == 1:
            grads, sums = grad_fn(state.params, batch, step_rng)
        else:
            def accumulate(carry, micro_and_index):
                micro, index = micro_and_index
                grads, sums = grad_fn(state.params, micro, jax.random.fold_in(step_rng, index))
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.zeros(()) for k in ("ce", "z", "weight")})
            (grads, sums), _ = jax.lax.scan(
                accumulate, zeros, (_split_microbatches(batch, microbatches), jnp.arange(microbatches)))
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        metrics = {"loss": sums["ce"] / weight, "z_loss": sums["z"] / weight, "tokens": sums["weight"],
                   "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
        return new_state, metrics

    return train_step


def make_eval_step(config: PhiConfig, segment_aware: bool = True, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE):
    def eval_step(params, batch):
        _, sums = weighted_losses(config.replace(embed_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0),
                                  params, batch, None, 0.0, segment_aware, loss_chunk_size)
        return {"ce": sums["ce"], "weight": sums["weight"]}
    return eval_step


@functools.lru_cache(maxsize=16)
def param_shardings(config: PhiConfig, mesh):
    """The params' NamedShardings, by the logical axis rules."""
    return logical_sharding(
        jax.eval_shape(lambda: init_boxed_params(config, jax.random.key(0))), mesh)


@functools.lru_cache(maxsize=16)
def state_shardings(config: PhiConfig, optimizer_config: OptimizerConfig, mesh):
    """TrainState of NamedShardings: params by the logical rules, optimizer moments like their params.
    (Cached: tracing the model's init for its shapes takes seconds at phi-1.5 size.)"""
    params = param_shardings(config, mesh)
    opt_shapes = jax.eval_shape(lambda: make_optimizer(optimizer_config).init(init_params(config, jax.random.key(0))))
    opt_state = optax.tree_map_params(make_optimizer(optimizer_config), lambda _, sharding: sharding,
                                      opt_shapes, params, transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state, rng=replicated(mesh))


def new_state(config: PhiConfig, optimizer_config: OptimizerConfig, seed: int, params=None) -> TrainState:
    """A fresh TrainState (traceable); from `params` (e.g. imported weights) when given."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    params = init_params(config, init_rng) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_optimizer(optimizer_config).init(params), rng=jax.random.key_data(train_rng))


def init_state(config: PhiConfig, optimizer_config: OptimizerConfig, mesh, seed: int, params=None) -> TrainState:
    """`new_state` built directly in its shardings on `mesh`."""
    shardings = state_shardings(config, optimizer_config, mesh)
    if params is not None:
        params = jax.device_put(params, shardings.params)
    return jax.jit(lambda p: new_state(config, optimizer_config, seed, p), out_shardings=shardings)(params)


def abstract_state(config: PhiConfig, optimizer_config: OptimizerConfig, mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their shardings: for restore and AOT compile."""
    shapes = jax.eval_shape(lambda: new_state(config, optimizer_config, 0))
    shardings = state_shardings(config, optimizer_config, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def jit_train_step(config: PhiConfig, optimizer_config: OptimizerConfig, mesh, *, microbatches: int = 1,
                   z_loss: float = 0.0, segment_aware: bool = True, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE):
    """The train step jitted with explicit in/out shardings; the state's buffers are donated.

    Call (and compile) it inside `sharding.mesh_context(mesh)`, so that the model's activation
    sharding constraints apply."""
    shardings = state_shardings(config, optimizer_config, mesh)
    step = make_train_step(config, optimizer_config, microbatches=microbatches, z_loss=z_loss,
                           segment_aware=segment_aware, loss_chunk_size=loss_chunk_size)
    batch = {name: batch_sharding(mesh) for name in BATCH_FIELDS}
    return jax.jit(step, in_shardings=(shardings, batch),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(config: PhiConfig, mesh, segment_aware: bool = True, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE):
    batch = {name: batch_sharding(mesh) for name in BATCH_FIELDS}
    return jax.jit(make_eval_step(config, segment_aware, loss_chunk_size),
                   in_shardings=(param_shardings(config, mesh), batch), out_shardings=replicated(mesh))
