"""Flash attention for TPUs in Pallas (Mosaic): forward, and a backward of two kernels (dK/dV, then dQ),
with causal and segment block skipping (see flash.py for what is skipped and why).

Mosaic wants the last two dims of every block to be (8, 128)-aligned or whole, so the kernels work in
[batch, heads, seq, head_dim] (one transpose each way, outside). The grid is
(batch, head, row block, column block) with the column blocks innermost and sequential: each step
adds one tile into VMEM scratch accumulators. The visible column-block range of every row block
comes in through scalar prefetch (SMEM); a step outside the range computes nothing, and its index
map points at the range's nearest block so that the pipeline fetches nothing new either.

Layout follows jax's own TPU flash attention: row statistics are lane-replicated [rows, 128], query
segment ids arrive as [B, T, 128] and key segment ids as [B, 8, S].
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.attention import flash
from phi_jax.attention.block_sizes import TPU_MIN_BLOCK, BlockSizes, tpu_block_sizes

LANES, SUBLANES = 128, 8


def _span(spans_ref, b, n, num_blocks):
    """[first, end) of the column blocks that row block n of batch b loops over (flattened [B, n, 2])."""
    at = (b * num_blocks + n) * 2
    return spans_ref[at], spans_ref[at + 1]


def _when_visible(step, n, first, end, boundary, *, masked_before: bool):
    """Runs step(masked) at this grid step if column block n is in the span [first, end): masked
    (elementwise) before `boundary` if `masked_before`, after it otherwise."""
    in_span = (first <= n) & (n < end)
    pl.when(in_span & (n < boundary))(functools.partial(step, masked_before))
    pl.when(in_span & (n >= boundary))(functools.partial(step, not masked_before))


def _nearest(step, first, end):
    """The column block a grid step fetches: itself inside the span, the span's edge outside it."""
    return jnp.maximum(first, jnp.minimum(step, end - 1))


def _tile_mask(plan, i, j, bq, bk, q_seg_ref, kv_seg_ref, *, masked, kv_pad=None):
    """flash.tile_mask with this layout's segment tiles: queries [bq, 128], keys [8, bk] (row 0 used)."""
    return flash.tile_mask(plan, i, j, bq, bk, masked=masked, kv_pad=kv_pad,
                           q_seg=None if q_seg_ref is None else q_seg_ref[...],
                           kv_seg=None if kv_seg_ref is None else kv_seg_ref[:1, :])


def _forward_kernel(spans_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref, m_ref, l_ref, acc_ref,
                    *, plan, bq, bk, kv_pad):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, end = _span(spans_ref, b, i, pl.num_programs(2))
    precision = flash.precision_for(q_ref.dtype)

    @pl.when(j == 0)
    def _init():
        m_ref[...], l_ref[...], acc_ref[...] = flash.softmax_init(bq, LANES, acc_ref.shape[1])

    def step(masked):
        mask = _tile_mask(plan, i, j, bq, bk, q_seg_ref, kv_seg_ref, masked=masked, kv_pad=kv_pad)
        s = flash.scores(plan, q_ref[...], k_ref[...], precision=precision, mask=mask)
        m_ref[...], l_ref[...], acc_ref[...] = flash.softmax_step(
            plan, m_ref[...], l_ref[...], acc_ref[...], s, v_ref[...], precision=precision)

    masked_from = flash.first_masked_key_block(i, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad)
    _when_visible(step, j, first, end, masked_from, masked_before=False)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out, lse = flash.softmax_finish(plan, m_ref[...], l_ref[...], acc_ref[...])
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = lse


def _dkv_kernel(spans_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref,
                dk_acc_ref, dv_acc_ref, *, plan, bq, bk):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, end = _span(spans_ref, b, j, pl.num_programs(2))
    precision = flash.precision_for(q_ref.dtype)

    @pl.when(i == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def step(masked):
        mask = _tile_mask(plan, i, j, bq, bk, q_seg_ref, kv_seg_ref, masked=masked)
        dk, dv, _ = flash.dkv_step(plan, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], di_ref[...],
                                   precision=precision, mask=mask)
        dk_acc_ref[...] += dk
        dv_acc_ref[...] += dv

    unmasked_from = flash.first_unmasked_query_block(j, plan=plan, bq=bq, bk=bk)
    _when_visible(step, i, first, end, unmasked_from, masked_before=True)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dq_kernel(spans_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref, dq_ref, dq_acc_ref,
               *, plan, bq, bk, kv_pad):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, end = _span(spans_ref, b, i, pl.num_programs(2))
    precision = flash.precision_for(q_ref.dtype)

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    def step(masked):
        mask = _tile_mask(plan, i, j, bq, bk, q_seg_ref, kv_seg_ref, masked=masked, kv_pad=kv_pad)
        dq_acc_ref[...] += flash.dq_step(plan, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                                         di_ref[...], precision=precision, mask=mask)

    masked_from = flash.first_masked_key_block(i, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad)
    _when_visible(step, j, first, end, masked_from, masked_before=False)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * plan.scale).astype(dq_ref.dtype)


# ---- BlockSpecs over grid (batch b, head h, row block n, column block m), spans prefetched -----------
# "Row" blocks are the ones a program accumulates into; "column" blocks are the ones it steps over.
# A `block` function maps a grid point to the sequence block it reads.

def _row(b, h, n, m, spans):
    return n


def _column(num_row_blocks):
    """Column block m, or its span's nearest block outside the span (nothing new to fetch)."""
    return lambda b, h, n, m, spans: _nearest(m, *_span(spans, b, n, num_row_blocks))


def _tile(rows, width, block):
    """[B, H, T, width] -> a [rows, width] tile."""
    return pl.BlockSpec((None, None, rows, width), lambda *grid: (grid[0], grid[1], block(*grid), 0))


def _q_segments(rows, segment_ids, block):
    """[B, T, 128] -> [rows, 128] (or None without segments)."""
    return None if segment_ids is None else pl.BlockSpec((None, rows, LANES), lambda *grid: (grid[0], block(*grid), 0))


def _kv_segments(cols, segment_ids, block):
    """[B, 8, S] -> [8, cols] (or None without segments)."""
    if segment_ids is None:
        return None
    return pl.BlockSpec((None, SUBLANES, cols), lambda *grid: (grid[0], 0, block(*grid)))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes, plan, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=plan.interpret, name=name)


def _segment_layouts(q_seg_BxT, kv_seg_BxS):
    """Query ids lane-replicated [B, T, 128], key ids sublane-replicated [B, 8, S] (or None, None)."""
    if q_seg_BxT is None:
        return None, None
    batch, q_len = q_seg_BxT.shape
    return (jnp.broadcast_to(q_seg_BxT[:, :, None], (batch, q_len, LANES)),
            jnp.broadcast_to(kv_seg_BxS[:, None, :], (batch, SUBLANES, kv_seg_BxS.shape[1])))


def _forward(plan, q, k, v, q_seg, kv_seg):
    batch, heads, q_pad, head_dim = q.shape
    kv_pad = k.shape[2]
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    nq = q_pad // bq
    spans = flash.key_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    q_seg_lanes, kv_seg_sublanes = _segment_layouts(q_seg, kv_seg)
    out, lse_lanes = _call(
        functools.partial(_forward_kernel, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad),
        grid=(batch, heads, nq, kv_pad // bk),
        in_specs=[_tile(bq, head_dim, _row), _tile(bk, head_dim, _column(nq)), _tile(bk, head_dim, _column(nq)),
                  _q_segments(bq, q_seg, _row), _kv_segments(bk, kv_seg, _column(nq))],
        out_specs=[_tile(bq, head_dim, _row), _tile(bq, LANES, _row)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_pad, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, head_dim), jnp.float32)],
        plan=plan, name="phi_flash_fwd",
    )(spans.reshape(-1), q, k, v, q_seg_lanes, kv_seg_sublanes)
    return out, lse_lanes[..., 0]  # the residual kept for the backward: [B, H, T], not 128x that


def _backward(plan, q, k, v, q_seg, kv_seg, out, lse, d_out):
    batch, heads, q_pad, head_dim = q.shape
    kv_pad = k.shape[2]
    lse = jnp.broadcast_to(lse[..., None], (*lse.shape, LANES))
    di = jnp.broadcast_to(flash.output_grad_dot(out, d_out)[..., None], lse.shape)
    q_seg_lanes, kv_seg_sublanes = _segment_layouts(q_seg, kv_seg)
    blocks = plan.blocks

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    nk = kv_pad // bk
    spans = flash.query_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    dk, dv = _call(
        functools.partial(_dkv_kernel, plan=plan, bq=bq, bk=bk),
        grid=(batch, heads, nk, q_pad // bq),
        in_specs=[_tile(bq, head_dim, _column(nk)), _tile(bk, head_dim, _row), _tile(bk, head_dim, _row),
                  _tile(bq, head_dim, _column(nk)), _tile(bq, LANES, _column(nk)), _tile(bq, LANES, _column(nk)),
                  _q_segments(bq, q_seg, _column(nk)), _kv_segments(bk, kv_seg, _row)],
        out_specs=[_tile(bk, head_dim, _row), _tile(bk, head_dim, _row)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        plan=plan, name="phi_flash_dkv",
    )(spans.reshape(-1), q, k, v, d_out, lse, di, q_seg_lanes, kv_seg_sublanes)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    nq = q_pad // bq
    spans = flash.key_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    dq = _call(
        functools.partial(_dq_kernel, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad),
        grid=(batch, heads, nq, kv_pad // bk),
        in_specs=[_tile(bq, head_dim, _row), _tile(bk, head_dim, _column(nq)), _tile(bk, head_dim, _column(nq)),
                  _tile(bq, head_dim, _row), _tile(bq, LANES, _row), _tile(bq, LANES, _row),
                  _q_segments(bq, q_seg, _row), _kv_segments(bk, kv_seg, _column(nq))],
        out_specs=_tile(bq, head_dim, _row),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        plan=plan, name="phi_flash_dq",
    )(spans.reshape(-1), q, k, v, d_out, lse, di, q_seg_lanes, kv_seg_sublanes)
    return dq, dk, dv


_attend = flash.fused(_forward, _backward)


def pallas_tpu_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segment_ids=None, kv_segment_ids=None, *,
                         causal=True, block_sizes: BlockSizes | None = None, interpret=False):
    """Fused attention on TPU; inputs and output [batch, seq, heads, head_dim], scale head_dim**-0.5.
    Any sequence length (padded to the blocks inside). `interpret`: True, or pltpu.InterpretParams()."""
    _, q_len, _, head_dim = q_BxTxHxK.shape
    blocks = block_sizes or tpu_block_sizes(head_dim)
    if blocks.dkv_transposed or blocks.fused_backward:
        raise ValueError(f"pallas_tpu_attention: dkv_transposed and fused_backward are Triton kernel variants; "
                         f"the TPU kernel has neither (block_sizes={blocks})")
    plan = flash.plan(q_len, k_BxSxHxK.shape[1], head_dim, blocks,
                      min_block=TPU_MIN_BLOCK, power_of_two=False, causal=causal, interpret=interpret)
    q_pad, kv_pad = plan.padded_lengths

    def heads_major(x_BxTxHxK, length):
        return flash.pad_axis(x_BxTxHxK.transpose(0, 2, 1, 3), 2, length)

    out_BxHxTxK = _attend(plan, heads_major(q_BxTxHxK, q_pad), heads_major(k_BxSxHxK, kv_pad),
                          heads_major(v_BxSxHxK, kv_pad), *flash.pad_segments(plan, segment_ids, kv_segment_ids))
    return out_BxHxTxK[:, :, :q_len].transpose(0, 2, 1, 3)
