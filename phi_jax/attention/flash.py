"""What the GPU and TPU flash-attention kernels share: padding, which blocks to compute, the math on
one (query block, key block) tile, and the custom_vjp that ties a forward kernel to its backward.

Conventions. Queries are split into blocks of `bq` rows and keys into blocks of `bk` rows; a tile is
one (query block, key block) pair. A tile is *visible* when at least one of its keys may be seen by
one of its queries; invisible tiles are never computed:
  - causality: key block j is invisible to query block i when its first key comes after i's last query;
  - segments: each block carries the [min, max] of its segment ids; key block j is invisible to query
    block i when the two ranges do not overlap (exact for non-decreasing ids, as packing writes
    them; a conservative superset otherwise, never wrong);
  - padding: blocks made only of padding rows are invisible.
For each query block the kernels loop over the key blocks [first, last] visible to it (and for each
key block, in the dK/dV kernel, over the query blocks [first, last] that see it). Inside that range a
tile is masked elementwise only where it has to be: on the causal diagonal, at the padded end of the
keys, and wherever segment ids are given.

Row statistics (running max m, running sum l, log-sum-exp, the backward's `di`) are [bq, 1] on GPU and
lane-replicated [bq, 128] on TPU (Mosaic's native row layout); `widen` makes either broadcast against
a [bq, width] tile. The softmax runs in float32 with a finite mask value: a query that sees no key at
all gets output 0 (not NaN) and zero gradients.

With `BlockSizes.exp2` the kernels exponentiate in base 2 with log2(e) folded into the score scale (one
multiply fewer per score, and exp2 is the GPU's native instruction); scores, m and the log-sum-exp
residual are then in base-2 units, which only the kernels of one call ever see.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from phi_jax.attention.block_sizes import BlockSizes
from phi_jax.attention.xla import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class Plan:
    """The plan of one attention call: everything about it that is not an array (lengths, the blocks
    fitted to them, scale, interpret mode). Hashable, so it can be a custom_vjp nondiff arg."""
    causal: bool
    q_len: int    # before padding
    kv_len: int
    scale: float
    blocks: BlockSizes
    interpret: Any  # False, True (Pallas interpret mode), or a pltpu.InterpretParams (TPU-faithful)

    @property
    def padded_lengths(self) -> tuple[int, int]:
        return self.blocks.padded_lengths(self.q_len, self.kv_len)

    @property
    def score_scale(self) -> float:
        """What q.k^T is multiplied by: head_dim**-0.5, times log2(e) when exponentiating in base 2."""
        return self.scale * math.log2(math.e) if self.blocks.exp2 else self.scale

    def exp(self, x):
        return jnp.exp2(x) if self.blocks.exp2 else jnp.exp(x)

    def log(self, x):
        return jnp.log2(x) if self.blocks.exp2 else jnp.log(x)


def plan(q_len, kv_len, head_dim, blocks: BlockSizes, *, min_block, power_of_two, causal, interpret) -> Plan:
    """The Plan of one call: the backend's blocks fitted to the lengths, scale head_dim**-0.5."""
    blocks = blocks.fit(q_len, kv_len, min_block=min_block, power_of_two=power_of_two)
    return Plan(causal=causal, q_len=q_len, kv_len=kv_len, scale=head_dim ** -0.5, blocks=blocks,
                interpret=interpret)


# ---- Padding -------------------------------------------------------------------------------------

def pad_axis(x, axis: int, length: int, mode="constant"):
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def pad_segments(plan: Plan, segment_ids_BxT, kv_segment_ids_BxS):
    """(query ids, key ids) int32 padded to the padded lengths, or (None, None); key ids default to
    the query ids. Padding repeats the last id, so it widens no block's segment range (skipping stays
    tight); padded keys are masked by position and padded queries are sliced off."""
    if segment_ids_BxT is None:
        return None, None
    if kv_segment_ids_BxS is None:
        kv_segment_ids_BxS = segment_ids_BxT
    q_pad, kv_pad = plan.padded_lengths
    return (pad_axis(segment_ids_BxT.astype(jnp.int32), 1, q_pad, mode="edge"),
            pad_axis(kv_segment_ids_BxS.astype(jnp.int32), 1, kv_pad, mode="edge"))


# ---- Which tiles to compute ----------------------------------------------------------------------

def block_visibility(q_seg_BxT, kv_seg_BxS, *, plan: Plan, batch: int, q_pad: int, kv_pad: int, bq: int, bk: int):
    """[B, nq, nk] bool: tile (i, j) holds at least one (query, key) pair that may be visible."""
    q_first = jnp.arange(q_pad // bq) * bq
    k_first = jnp.arange(kv_pad // bk) * bk
    visible = (q_first[:, None] < plan.q_len) & (k_first[None, :] < plan.kv_len)
    if plan.causal:
        visible &= k_first[None, :] <= q_first[:, None] + bq - 1
    visible = jnp.broadcast_to(visible, (batch, *visible.shape))
    if q_seg_BxT is not None:
        q_seg = q_seg_BxT.reshape(batch, -1, bq)
        kv_seg = kv_seg_BxS.reshape(batch, -1, bk)
        q_min, q_max = q_seg.min(-1)[:, :, None], q_seg.max(-1)[:, :, None]
        k_min, k_max = kv_seg.min(-1)[:, None, :], kv_seg.max(-1)[:, None, :]
        visible &= (k_min <= q_max) & (q_min <= k_max)
    return visible


def spans(visible_BxNxM):
    """[B, N, 2] int32: for each row block, [first, last + 1) of its visible column blocks (0, 0 if none)."""
    num_cols = visible_BxNxM.shape[-1]
    any_visible = visible_BxNxM.any(-1)
    first = jnp.argmax(visible_BxNxM, -1)
    end = num_cols - jnp.argmax(visible_BxNxM[..., ::-1], -1)
    return jnp.stack([jnp.where(any_visible, first, 0), jnp.where(any_visible, end, 0)], -1).astype(jnp.int32)


def key_spans(q_seg_BxT, kv_seg_BxS, *, plan, batch, q_pad, kv_pad, bq, bk):
    """[B, nq, 2]: the key blocks each query block loops over (forward and dQ kernels)."""
    visible = block_visibility(q_seg_BxT, kv_seg_BxS, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    return spans(visible)


def query_spans(q_seg_BxT, kv_seg_BxS, *, plan, batch, q_pad, kv_pad, bq, bk):
    """[B, nk, 2]: the query blocks each key block loops over (dK/dV kernel)."""
    visible = block_visibility(q_seg_BxT, kv_seg_BxS, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    return spans(visible.transpose(0, 2, 1))


def first_masked_key_block(i, *, plan: Plan, bq: int, bk: int, kv_pad: int):
    """Key blocks j < this need no causal or padding mask for query block i (a traced index)."""
    end = kv_pad // bk
    if plan.causal:  # key block j is entirely at or before query i*bq when (j + 1) * bk <= i * bq + 1
        end = jnp.minimum(end, lax.div(i * bq + 1, bk))
    if kv_pad != plan.kv_len:  # the block holding the last real key, and any after it, are padded
        end = jnp.minimum(end, plan.kv_len // bk)
    return end


def first_unmasked_query_block(j, *, plan: Plan, bq: int, bk: int):
    """Query blocks i >= this need no causal mask for key block j: i * bq >= (j + 1) * bk - 1.
    (The dK/dV kernel does not mask padded keys: their gradients are sliced off.)"""
    if not plan.causal:
        return 0
    return lax.div((j + 1) * bk - 1 + bq - 1, bq)


# ---- The math on one tile ------------------------------------------------------------------------

def precision_for(dtype):
    """float32 inputs get true float32 matmuls (Triton would otherwise use TF32); bf16 runs native."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot(a, b, *, trans_b=False, precision):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def widen(rows, width: int):
    """Row statistics ([bq, 1], or lane-replicated [bq, L]) made to broadcast against [bq, width]."""
    lanes = rows.shape[1]
    if lanes in (1, width):
        return rows
    if width < lanes:
        return rows[:, :width]
    if width % lanes:
        raise NotImplementedError(f"a tile {width} wide does not take rows replicated over {lanes} lanes")
    return jnp.tile(rows, (1, width // lanes))


def tile_mask(plan: Plan, i, j, bq: int, bk: int, *, masked: bool, kv_pad=None, q_seg=None, kv_seg=None,
              transposed=False):
    """[bq, bk] bool for tile (query block i, key block j), True where the query may see the key;
    None when all may. Causality and key padding (when `kv_pad` is given) are applied only to tiles
    the caller marks `masked` (static); segments always. q_seg is [bq, 1] or [bq, L]; kv_seg [1, bk].
    `transposed`: the [bk, bq] mask of the transposed tile, with q_seg [1, bq] and kv_seg [bk, 1]."""
    shape, q_axis, k_axis = ((bk, bq), 1, 0) if transposed else ((bq, bk), 0, 1)
    kv_len = plan.kv_len if masked and kv_pad not in (None, plan.kv_len) else None
    causal = masked and plan.causal
    mask = None
    if causal or kv_len is not None:
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    if causal:
        mask = i * bq + lax.broadcasted_iota(jnp.int32, shape, q_axis) >= k_pos
    if kv_len is not None:
        mask = k_pos < kv_len if mask is None else mask & (k_pos < kv_len)
    if q_seg is not None:
        same = (q_seg == kv_seg) if transposed else (widen(q_seg, bk) == kv_seg)
        mask = same if mask is None else mask & same
    return mask


def scores(plan: Plan, q, k, *, precision, mask=None):
    """[bq, bk] float32 scaled scores (in base-2 units under exp2), masked keys at the finite mask value."""
    s = dot(q, k, trans_b=True, precision=precision) * plan.score_scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def softmax_init(rows: int, lanes: int, head_dim: int):
    """(m, l, acc) before any key: m at the mask value marks 'no visible key yet'."""
    return (jnp.full((rows, lanes), MASK_VALUE, jnp.float32), jnp.zeros((rows, lanes), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def softmax_step(plan: Plan, m, l, acc, s, v, *, precision):
    """Online softmax over one more key block: s [bq, bk] masked scores, v [bk, K]."""
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = plan.exp(s - widen(m_next, s.shape[1]))
    alpha = plan.exp(m - m_next)
    l_next = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_next = widen(alpha, acc.shape[1]) * acc + dot(p.astype(v.dtype), v, precision=precision)
    return m_next, l_next, acc_next


def softmax_finish(plan: Plan, m, l, acc):
    """(out [bq, K] float32, lse rows). A row that saw no visible key (m still at the mask value) gets
    out 0 and lse +big, so that the backward's exp(s - lse) is 0 on it."""
    empty = m <= MASK_VALUE
    l = jnp.where(empty, 1.0, l)
    out = jnp.where(widen(empty, acc.shape[1]), 0.0, acc / widen(l, acc.shape[1]))
    lse = jnp.where(empty, -MASK_VALUE, m + plan.log(l))
    return out, lse


def probabilities_and_score_grads(plan: Plan, a, b, c, d, lse, di, *, precision, mask):
    """(p, ds) of one tile from s = a.b^T and dp = c.d^T: p the softmax probabilities, ds = p * (dp - di)
    the gradient of the unscaled scores. (a, b, c, d) = (q, k, dO, v) gives the [bq, bk] tile with lse
    and di as [bq, 1] (or [bq, L]) rows; (k, q, v, dO) its transpose [bk, bq] with them as [1, bq]."""
    s = scores(plan, a, b, precision=precision, mask=mask)
    p = plan.exp(s - widen(lse, s.shape[1]))
    return p, p * (dot(c, d, trans_b=True, precision=precision) - widen(di, s.shape[1]))


def dkv_step(plan: Plan, q, k, v, do, lse, di, *, precision, mask, transposed=False):
    """One tile's contributions (dK, dV, ds), dK still lacking the factor `scale`; ds is [bq, bk], or
    [bk, bq] when `transposed`. The transposed tile puts the key block on the matmuls' M side (bk
    rows, not bq): Hopper's fast MMA needs at least 64 there."""
    if transposed:
        p_t, ds_t = probabilities_and_score_grads(plan, k, q, v, do, lse, di, precision=precision, mask=mask)
        return (dot(ds_t.astype(q.dtype), q, precision=precision),
                dot(p_t.astype(do.dtype), do, precision=precision), ds_t)
    p, ds = probabilities_and_score_grads(plan, q, k, do, v, lse, di, precision=precision, mask=mask)
    return (dot(ds.astype(q.dtype).T, q, precision=precision),
            dot(p.astype(do.dtype).T, do, precision=precision), ds)


def dq_step(plan: Plan, q, k, v, do, lse, di, *, precision, mask):
    """One tile's contribution to dQ, still lacking the factor `scale`."""
    _, ds = probabilities_and_score_grads(plan, q, k, do, v, lse, di, precision=precision, mask=mask)
    return dot(ds.astype(k.dtype), k, precision=precision)


def output_grad_dot(o, do, axis=-1):
    """di = rowsum(dO * O) in float32, the backward's softmax correction term."""
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=axis)


# ---- Tying a forward kernel to its backward ------------------------------------------------------

def fused(forward, backward):
    """A custom_vjp function attend(plan, q, k, v, q_seg, kv_seg) -> out over padded inputs, from
    forward(plan, q, k, v, q_seg, kv_seg) -> (out, lse) and
    backward(plan, q, k, v, q_seg, kv_seg, out, lse, d_out) -> (dq, dk, dv)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(plan, q, k, v, q_seg, kv_seg):
        return forward(plan, q, k, v, q_seg, kv_seg)[0]

    def attend_fwd(plan, q, k, v, q_seg, kv_seg):
        out, lse = forward(plan, q, k, v, q_seg, kv_seg)
        return out, (q, k, v, q_seg, kv_seg, out, lse)

    def attend_bwd(plan, residuals, d_out):
        return (*backward(plan, *residuals, d_out), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
