"""The phi-1 / phi-1.5 transformer in Flax linen, exact to transformers' PhiForCausalLM.

    tokens -> embed -> N x Block -> final LayerNorm -> lm_head -> float32 logits
    Block:  h = LN(x);  x = x + dropout(Attention(h)) + dropout(Mlp(h))

Attention rotates only the first `rotary_dim` dims of each head (rotate-half / NeoX pairing: dim i
with dim i + rotary_dim/2). Tensor names carry their shapes, here and in phi_jax/attention: B batch,
T query length, S key length, D hidden, H heads, K head dim, F MLP hidden, V vocab, L layers.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`, and
`layers` when scanned); the sharding rules map them onto the mesh.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from phi_jax.attention import attention, cached_attention
from phi_jax.config import PhiConfig


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    `keys` and `values` hold one [B, H, S, K] array per layer (heads first: see `cached_attention`).
    Separate arrays, not one [L, ...] stack: a decode loop then writes each layer's new slot in
    place, where taking layers out of a stack and stacking them again copies the whole cache on
    every token. `segment_ids_BxS` holds each slot's segment (0 for slots not yet written); `index`
    is how many slots are filled, i.e. the key index the next token is written at: one for every row,
    or an int32 [B] of each row's own (the serving engine's rows hold requests of different lengths).

    `prefill` (static, not traced) is True in a fresh cache (`init_cache`) and False in every cache
    a call returns: the first call's tokens then attend only among themselves, through the fused
    kernels where they apply, not over the whole cache. False is right for any cache (attending over
    empty slots of segment 0 adds nothing); True is a shortcut that only an empty cache may take.
    """
    keys: tuple
    values: tuple
    segment_ids_BxS: jax.Array
    index: jax.Array | int
    prefill: bool = struct.field(pytree_node=False, default=False)


def init_cache(config: PhiConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    shape_BxHxSxK = (batch_size, config.num_heads, max_length, config.head_dim)
    dtype = dtype or config.compute_dtype
    zeros = tuple(jnp.zeros(shape_BxHxSxK, dtype) for _ in range(config.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch_size, max_length), jnp.int32), 0, prefill=True)


class LayerInputs(NamedTuple):
    """What every layer reads besides the residual stream: the same for all of them (nn.scan
    broadcasts it)."""
    positions_BxT: jax.Array             # rotary positions of this call's tokens
    segment_ids_BxT: jax.Array | None    # their segments; None: each row is one sequence
    kv_segment_ids_BxS: jax.Array | None  # the keys' segments: with a cache every slot's, else the queries'
    cache_index: jax.Array | int | None  # the cache slot this call's first token is written at; None: no cache


def _layer_inputs(tokens_BxT, positions_BxT, segment_ids_BxT, cache: KVCache | None) -> LayerInputs:
    """The defaults `Phi` documents: positions count from 0 and restart at each segment, or count on
    from the cache's index; with a cache, the new tokens' segments are written into its slots'."""
    batch, length = tokens_BxT.shape
    if cache is None:
        if positions_BxT is None:
            positions_BxT = (positions_from_segments(segment_ids_BxT) if segment_ids_BxT is not None
                             else jnp.broadcast_to(jnp.arange(length), (batch, length)))
        return LayerInputs(positions_BxT, segment_ids_BxT, segment_ids_BxT, None)
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.reshape(cache.index, (-1, 1)) + jnp.arange(length), (batch, length))
    kv_segment_ids_BxS = write_at(cache.segment_ids_BxS, segment_ids_BxT.astype(jnp.int32), cache.index, axis=1)
    return LayerInputs(positions_BxT, segment_ids_BxT, kv_segment_ids_BxS, cache.index)


def write_at(cache_Bx, new_Bx, index, axis: int):
    """`new` written into `cache` from `index` along `axis`: one index for every row, or [B] of them."""
    if jnp.ndim(index) == 0:
        start = [0] * cache_Bx.ndim
        start[axis] = index
        return jax.lax.dynamic_update_slice(cache_Bx, new_Bx, start)
    return jax.vmap(lambda c, n, i: write_at(c, n, i, axis - 1))(cache_Bx, new_Bx, index)


def positions_from_segments(segment_ids_BxT):
    """Positions that restart at 0 wherever the segment id changes (packed sequences)."""
    length = segment_ids_BxT.shape[1]
    index_BxT = jnp.broadcast_to(jnp.arange(length), segment_ids_BxT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    segment_start_BxT = jax.lax.cummax(jnp.where(starts, index_BxT, 0), axis=1)
    return index_BxT - segment_start_BxT


def apply_rotary(x_BxTxHxK, positions_BxT, rotary_dim: int, theta: float):
    """Partial rotate-half rotary embedding, computed in float32."""
    if rotary_dim == 0:
        return x_BxTxHxK
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles_BxTx1xR = positions_BxT.astype(jnp.float32)[:, :, None, None] * inv_freq
    cos, sin = jnp.cos(angles_BxTx1xR), jnp.sin(angles_BxTx1xR)
    x_rot = x_BxTxHxK[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x_BxTxHxK.dtype), x_BxTxHxK[..., rotary_dim:]], axis=-1)


class Projection(nn.Module):
    """y = x . kernel + bias, contracting x's last `len(in_shape)` axes; kernel [*in_shape, *out_shape].

    (Not nn.DenseGeneral: it initializes a flattened kernel, which breaks the kernel's logical
    partitioning under a mesh.)"""
    config: PhiConfig
    in_shape: tuple
    out_shape: tuple
    kernel_names: tuple

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), self.kernel_names),
            self.in_shape + self.out_shape, jnp.float32)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_names[len(self.in_shape):]),
            self.out_shape, jnp.float32)
        y = jnp.tensordot(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), axes=len(self.in_shape))
        return y + bias.astype(cfg.compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_rows(table_VxD, tokens_BxT, vocab_size: int):
    return jnp.take(table_VxD, tokens_BxT, axis=0)


def _gather_rows_fwd(table_VxD, tokens_BxT, vocab_size: int):
    return jnp.take(table_VxD, tokens_BxT, axis=0), tokens_BxT


def _gather_rows_bwd(vocab_size: int, tokens_BxT, d_rows_BxTxD):
    # Each row's gradient sums the cotangents of every position holding its token: in bfloat16 a
    # token seen thousands of times in a batch loses a third to a half of it. Sum in float32, round once.
    d_table_VxD = jnp.zeros((vocab_size, d_rows_BxTxD.shape[-1]), jnp.float32)
    d_table_VxD = d_table_VxD.at[tokens_BxT].add(d_rows_BxTxD.astype(jnp.float32))
    return d_table_VxD.astype(d_rows_BxTxD.dtype), None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class Embedding(nn.Module):
    """Token embedding lookup: table [V, D] (`vocab`, `embed`)."""
    config: PhiConfig

    @nn.compact
    def __call__(self, tokens_BxT):
        cfg = self.config
        table_VxD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        # Gather from a table whose embed dim is whole, as FSDP gathers every weight before use: with
        # it split over `fsdp`, the rows come out split over the axis the batch is also split over,
        # and XLA can only reshard them by replicating the whole [B, T, D] (and its gradient).
        table_VxD = nn.with_logical_constraint(table_VxD.astype(cfg.compute_dtype), ("vocab", None))
        return _gather_rows(table_VxD, tokens_BxT, cfg.vocab_size)


def _layer_norm(config: PhiConfig, name):
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def _activation(x, names):
    """Activations get their own logical names (`activation_embed`, ...), separate from the
    params' (`embed`, ...), so the rules can shard a weight's dim without sharding the stream."""
    return nn.with_logical_constraint(x, tuple(f"activation_{name}" for name in names))


class Attention(nn.Module):
    """Returns (out, this layer's updated (k, v) cache or None). `prefill`: see KVCache."""
    config: PhiConfig
    deterministic: bool
    prefill: bool = False

    @nn.compact
    def __call__(self, h_BxTxD, inputs: LayerInputs, layer_kv):
        cfg = self.config
        d, heads = (cfg.hidden_size,), (cfg.num_heads, cfg.head_dim)
        names = ("embed", "heads", "kv")
        q_BxTxHxK = Projection(cfg, d, heads, names, name="q_proj")(h_BxTxD)
        k_BxTxHxK = Projection(cfg, d, heads, names, name="k_proj")(h_BxTxD)
        v_BxTxHxK = Projection(cfg, d, heads, names, name="v_proj")(h_BxTxD)
        q_BxTxHxK = apply_rotary(q_BxTxHxK, inputs.positions_BxT, cfg.rotary_dim, cfg.rope_theta)
        k_BxTxHxK = apply_rotary(k_BxTxHxK, inputs.positions_BxT, cfg.rotary_dim, cfg.rope_theta)
        q_BxTxHxK = _activation(q_BxTxHxK, ("batch", "length", "heads", "kv"))

        new_kv = None
        if layer_kv is not None:
            k_cache_BxHxSxK, v_cache_BxHxSxK = layer_kv
            k_cache_BxHxSxK = write_at(k_cache_BxHxSxK, k_BxTxHxK.swapaxes(1, 2).astype(k_cache_BxHxSxK.dtype),
                                       inputs.cache_index, axis=2)
            v_cache_BxHxSxK = write_at(v_cache_BxHxSxK, v_BxTxHxK.swapaxes(1, 2).astype(v_cache_BxHxSxK.dtype),
                                       inputs.cache_index, axis=2)
            new_kv = (k_cache_BxHxSxK, v_cache_BxHxSxK)

        if layer_kv is None or self.prefill:
            dropout_rate = 0.0 if self.deterministic else cfg.attention_dropout
            out_BxTxHxK = attention(
                q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_ids=inputs.segment_ids_BxT, causal=True,
                dropout_rate=dropout_rate, dropout_rng=self.make_rng("dropout") if dropout_rate else None,
                impl=cfg.attention_impl, interpret=cfg.attention_interpret)
        else:
            out_BxTxHxK = cached_attention(
                q_BxTxHxK, k_cache_BxHxSxK.astype(q_BxTxHxK.dtype), v_cache_BxHxSxK.astype(q_BxTxHxK.dtype),
                segment_ids=inputs.segment_ids_BxT, kv_segment_ids=inputs.kv_segment_ids_BxS,
                cache_index=inputs.cache_index)
        out_BxTxD = Projection(cfg, heads, d, ("heads", "kv", "embed"), name="dense")(out_BxTxHxK)
        return out_BxTxD, new_kv


class Mlp(nn.Module):
    config: PhiConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        cfg = self.config
        d, f = (cfg.hidden_size,), (cfg.intermediate_size,)
        h_BxTxF = Projection(cfg, d, f, ("embed", "mlp"), name="fc1")(h_BxTxD)
        h_BxTxF = _activation(jax.nn.gelu(h_BxTxF, approximate=True), ("batch", "length", "mlp"))
        return Projection(cfg, f, d, ("mlp", "embed"), name="fc2")(h_BxTxF)


class Block(nn.Module):
    """One phi layer. Returns (x, this layer's updated (k, v) cache or None)."""
    config: PhiConfig
    deterministic: bool
    prefill: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, inputs: LayerInputs, layer_kv):
        cfg = self.config
        h_BxTxD = _layer_norm(cfg, "ln")(x_BxTxD)
        attn_BxTxD, new_kv = Attention(cfg, self.deterministic, self.prefill, name="attn")(h_BxTxD, inputs, layer_kv)
        mlp_BxTxD = Mlp(cfg, name="mlp")(h_BxTxD)
        residual_dropout = nn.Dropout(cfg.residual_dropout, deterministic=self.deterministic)
        x_BxTxD = x_BxTxD + residual_dropout(attn_BxTxD) + residual_dropout(mlp_BxTxD)
        return _activation(x_BxTxD, ("batch", "length", "embed")), new_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Phi(nn.Module):
    """`Phi(config).apply({"params": p}, tokens_BxT)` -> float32 logits [B, T, V].

    positions_BxT: rotary positions; by default they count from 0 and restart at each new segment.
    segment_ids_BxT: packed sequences; a token attends only to earlier tokens of its own segment.
    cache: a KVCache (see `init_cache`); then the call returns (logits, updated cache), writing the
    new tokens' keys and values at `cache.index`. Dropout runs when `deterministic=False` and a
    "dropout" rng is given. `return_hidden=True` returns the last block's output [B, T, D] in place
    of the logits: `head_logits` turns any slice of it into logits (the chunked loss).
    """
    config: PhiConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, cache: KVCache | None = None,
                 deterministic: bool = True, return_hidden: bool = False):
        cfg = self.config
        inputs = _layer_inputs(tokens_BxT, positions_BxT, segment_ids_BxT, cache)
        x_BxTxD = Embedding(cfg, name="embed")(tokens_BxT)
        x_BxTxD = nn.Dropout(cfg.embed_dropout, deterministic=deterministic)(x_BxTxD)
        x_BxTxD = _activation(x_BxTxD, ("batch", "length", "embed"))

        layer_kvs = None if cache is None else tuple(zip(cache.keys, cache.values))
        x_BxTxD, layer_kvs = self._layers(x_BxTxD, inputs, layer_kvs, deterministic,
                                          prefill=cache is not None and cache.prefill)

        if return_hidden:
            out = x_BxTxD
        else:
            out = _head(_layer_norm(cfg, "final_ln"), _lm_head(cfg, "lm_head"), x_BxTxD)
        if cache is None:
            return out
        keys, values = zip(*layer_kvs)
        return out, KVCache(keys, values, inputs.kv_segment_ids_BxS, cache.index + tokens_BxT.shape[1])

    def _layers(self, x_BxTxD, inputs: LayerInputs, layer_kvs, deterministic: bool, prefill: bool):
        """The N blocks, unrolled (params `layers_{i}`) or scanned (`layers`, with a leading L axis):
        (x, each layer's updated (k, v) cache, or None without a cache)."""
        cfg = self.config
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if not cfg.scan_layers:
            new_layer_kvs = []
            for i in range(cfg.num_layers):
                layer_kv = None if layer_kvs is None else layer_kvs[i]
                x_BxTxD, layer_kv = block(cfg, deterministic, prefill, name=f"layers_{i}")(x_BxTxD, inputs, layer_kv)
                new_layer_kvs.append(layer_kv)
            return x_BxTxD, None if layer_kvs is None else tuple(new_layer_kvs)
        # nn.scan takes the cache as [L, ...] stacks: a copy per call (`generate` decodes unscanned).
        kv_LxBxHxSxK = None if layer_kvs is None else jax.tree.map(lambda *layers: jnp.stack(layers), *layer_kvs)
        stack = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0), length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxTxD, kv_LxBxHxSxK = stack(cfg, deterministic, prefill, name="layers")(x_BxTxD, inputs, kv_LxBxHxSxK)
        return x_BxTxD, None if layer_kvs is None else tuple(zip(*kv_LxBxHxSxK))


def _lm_head(config: PhiConfig, name=None):
    return Projection(config, (config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), name=name)


def _head(final_ln, lm_head, x_BxTxD):
    """Final LayerNorm -> lm_head -> float32 logits: one definition for `Phi` and `head_logits`."""
    # A chunk cut out of the sequence (inside a scan) must keep the stream's sharding.
    x_BxTxD = _activation(x_BxTxD, ("batch", "length", "embed"))
    logits_BxTxV = lm_head(final_ln(x_BxTxD))
    return _activation(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))


def head_logits(config: PhiConfig, params, x_BxTxD):
    """Float32 logits from hidden states that `Phi(..., return_hidden=True)` returned, with the
    final LayerNorm and lm_head taken from Phi's params. T may be any slice of the positions: the
    loss applies it a chunk at a time so that the [B, T, V] logits never exist whole."""
    final_ln = _layer_norm(config, None).bind({"params": params["final_ln"]})
    lm_head = _lm_head(config).bind({"params": params["lm_head"]})
    return _head(final_ln, lm_head, x_BxTxD)


def init_boxed_params(config: PhiConfig, rng):
    """Freshly initialized float32 params, each boxed with its logical axis names.

    Traced on one 8-token row with XLA attention: the params do not depend on the attention, and a
    fused kernel runs per shard of the batch under a mesh, which one row cannot be split into."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return Phi(config.replace(attention_impl="xla")).init(rng, tokens)["params"]


def init_params(config: PhiConfig, rng):
    """Freshly initialized float32 params (plain arrays, no partitioning boxes)."""
    return nn.meta.unbox(init_boxed_params(config, rng))


def param_shapes(config: PhiConfig):
    """The params tree as jax.ShapeDtypeStruct, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def stack_layers(params, num_layers: int):
    """Unscanned params (`layers_0` ... `layers_{L-1}`) -> scanned (`layers` with a leading L axis)."""
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params, num_layers: int):
    """Scanned params -> unscanned: the inverse of `stack_layers`."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        rest[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return rest
