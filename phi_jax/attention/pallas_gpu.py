"""Flash attention for GPUs in Pallas, lowered through Triton: forward, and a backward of two kernels
(dK/dV, then dQ), with causal and segment block skipping (see flash.py for what is skipped and why).

Layout is the model's own, [batch, seq, heads, head_dim], so no transposes. Each program owns one
block of rows of one (batch, head); it walks the blocks of the other side inside the range flash.py
computed for it, so skipped tiles cost nothing, not even a loop trip. The range arrives as a tiny
[B, n, 2] int32 input.

Variants (BlockSizes fields, off by default until a GPU has timed them): `dkv_transposed` computes the
dK/dV kernel's tiles as k.q^T, [block_k, block_q]; `fused_backward` drops the dQ kernel: the dK/dV
kernel also adds each tile's dQ into a float32 buffer with atomic adds (5 matmuls a tile instead of 7,
at the cost of an order of summation that varies from run to run).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phi_jax.attention import flash
from phi_jax.attention.block_sizes import GPU_MIN_BLOCK, BlockSizes, gpu_block_sizes


def _over_span(span_ref, boundary, step, carry, *, masked_before: bool):
    """Runs carry = step(n, carry, masked=...) over the blocks n of the span [first, end): masked
    (elementwise) before `boundary` if `masked_before`, after it otherwise."""
    first, end = span_ref[0], span_ref[1]
    split = jnp.clip(boundary, first, end)
    carry = lax.fori_loop(first, split, functools.partial(step, masked=masked_before), carry)
    return lax.fori_loop(split, end, functools.partial(step, masked=not masked_before), carry)


def _forward_kernel(span_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref, *, plan, bq, bk):
    """One program: query block i of one (batch, head); loops over its visible key blocks."""
    i = pl.program_id(0)
    kv_pad = k_ref.shape[0]
    q = q_ref[...]
    precision = flash.precision_for(q.dtype)
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    def step(j, carry, *, masked):
        keys = pl.ds(j * bk, bk)
        mask = flash.tile_mask(plan, i, j, bq, bk, masked=masked, kv_pad=kv_pad, q_seg=q_seg,
                               kv_seg=None if kv_seg_ref is None else kv_seg_ref[keys][None, :])
        s = flash.scores(plan, q, k_ref[keys, :], precision=precision, mask=mask)
        return flash.softmax_step(plan, *carry, s, v_ref[keys, :], precision=precision)

    masked_from = flash.first_masked_key_block(i, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad)
    carry = _over_span(span_ref, masked_from, step, flash.softmax_init(bq, 1, q.shape[1]), masked_before=False)
    out, lse = flash.softmax_finish(plan, *carry)
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse.reshape(bq)


def _dkv_kernel(span_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref, *refs,
                plan, bq, bk):
    """One program: key block j of one (batch, head); loops over the query blocks that see it. With
    fused_backward, refs end in the float32 dQ of all rows (zeros on entry), which programs of other key
    blocks add into at the same time: hence atomic adds."""
    if plan.blocks.fused_backward:
        _, dk_ref, dv_ref, dq_ref = refs  # the first is the zeros dq_ref aliases
    else:
        (dk_ref, dv_ref), dq_ref = refs, None
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    precision = flash.precision_for(k.dtype)
    transposed = plan.blocks.dkv_transposed
    q_pad, kv_pad = plan.padded_lengths

    def query_rows(ref, rows):
        """lse, di or query ids of these rows, shaped for the tile: [1, bq] transposed, else [bq, 1]."""
        return ref[rows][None, :] if transposed else ref[rows][:, None]

    kv_seg = None if kv_seg_ref is None else (kv_seg_ref[...][:, None] if transposed else kv_seg_ref[...][None, :])

    def step(i, carry, *, masked):
        rows = pl.ds(i * bq, bq)
        # dK and dV of padded keys are sliced off, but their dQ terms are not: the fused kernel masks them.
        mask = flash.tile_mask(plan, i, j, bq, bk, masked=masked, kv_seg=kv_seg, transposed=transposed,
                               kv_pad=kv_pad if dq_ref is not None else None,
                               q_seg=None if q_seg_ref is None else query_rows(q_seg_ref, rows))
        q = q_ref[rows, :]
        dk, dv, ds = flash.dkv_step(plan, q, k, v, do_ref[rows, :], query_rows(lse_ref, rows), query_rows(di_ref, rows),
                                    precision=precision, mask=mask, transposed=transposed)
        if dq_ref is not None:
            ds_BQxBK = ds.T if transposed else ds
            dq = flash.dot(ds_BQxBK.astype(k.dtype), k, precision=precision) * plan.scale
            plgpu.atomic_add(dq_ref, (rows, slice(None)), dq)
        return carry[0] + dk, carry[1] + dv

    unmasked_from = flash.first_unmasked_query_block(j, plan=plan, bq=bq, bk=bk)
    if dq_ref is not None and kv_pad != plan.kv_len:  # the key block holding padding is masked throughout
        unmasked_from = jnp.where((j + 1) * bk > plan.kv_len, q_pad // bq, unmasked_from)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _over_span(span_ref, unmasked_from, step, (zeros, zeros), masked_before=True)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(span_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, kv_seg_ref, dq_ref,
               *, plan, bq, bk):
    """One program: query block i of one (batch, head); loops over its visible key blocks."""
    i = pl.program_id(0)
    kv_pad = k_ref.shape[0]
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...][:, None], di_ref[...][:, None]
    precision = flash.precision_for(q.dtype)
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    def step(j, dq, *, masked):
        keys = pl.ds(j * bk, bk)
        mask = flash.tile_mask(plan, i, j, bq, bk, masked=masked, kv_pad=kv_pad, q_seg=q_seg,
                               kv_seg=None if kv_seg_ref is None else kv_seg_ref[keys][None, :])
        return dq + flash.dq_step(plan, q, k_ref[keys, :], v_ref[keys, :], do, lse, di, precision=precision, mask=mask)

    masked_from = flash.first_masked_key_block(i, plan=plan, bq=bq, bk=bk, kv_pad=kv_pad)
    dq = _over_span(span_ref, masked_from, step, jnp.zeros(q.shape, jnp.float32), masked_before=False)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


# ---- BlockSpecs over grid (row block n, batch b, head h) ----------------------------------------

def _tile(rows, head_dim):
    """[B, T, H, K] -> the [rows, K] tile of (block n, batch b, head h)."""
    return pl.BlockSpec((None, rows, None, head_dim), lambda n, b, h: (b, n, h, 0))


def _whole(length, head_dim):
    """[B, T, H, K] -> all T rows of (batch b, head h)."""
    return pl.BlockSpec((None, length, None, head_dim), lambda n, b, h: (b, 0, h, 0))


def _row_stats(rows):
    """[B, H, T] float32 -> the [rows] of block n."""
    return pl.BlockSpec((None, None, rows), lambda n, b, h: (b, h, n))


def _whole_row_stats(length):
    """[B, H, T] float32 -> all T of (batch b, head h). Block index 0, not n: Triton offsets a block by
    index x block size with no clamp, so block n of a whole-length block starts past the array."""
    return pl.BlockSpec((None, None, length), lambda n, b, h: (b, h, 0))


def _segments(rows, segment_ids):
    """[B, T] int32 -> the [rows] of block n (or None without segments)."""
    if segment_ids is None:
        return None
    return pl.BlockSpec((None, rows), lambda n, b, h: (b, n))


def _whole_segments(length, segment_ids):
    """[B, T] int32 -> all T of batch b (or None without segments); block index 0, as in _whole_row_stats."""
    if segment_ids is None:
        return None
    return pl.BlockSpec((None, length), lambda n, b, h: (b, 0))


def _span_spec():
    return pl.BlockSpec((None, None, 2), lambda n, b, h: (b, n, 0))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, plan, num_warps, num_stages, name,
          input_output_aliases=None):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        input_output_aliases=input_output_aliases or {}, interpret=plan.interpret, name=name)


def _forward(plan, q, k, v, q_seg, kv_seg):
    batch, q_pad, heads, head_dim = q.shape
    kv_pad = k.shape[1]
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    spans = flash.key_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    return _call(
        functools.partial(_forward_kernel, plan=plan, bq=bq, bk=bk),
        grid=(q_pad // bq, batch, heads),
        in_specs=[_span_spec(), _tile(bq, head_dim), _whole(kv_pad, head_dim), _whole(kv_pad, head_dim),
                  _segments(bq, q_seg), _whole_segments(kv_pad, kv_seg)],
        out_specs=[_tile(bq, head_dim), _row_stats(bq)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
        plan=plan, num_warps=plan.blocks.num_warps, num_stages=plan.blocks.num_stages, name="phi_flash_fwd",
    )(spans, q, k, v, q_seg, kv_seg)


def _backward(plan, q, k, v, q_seg, kv_seg, out, lse, d_out):
    batch, q_pad, heads, head_dim = q.shape
    kv_pad = k.shape[1]
    di = flash.output_grad_dot(out, d_out).transpose(0, 2, 1)  # [B, H, T], like lse
    args = (q, k, v, d_out, lse, di, q_seg, kv_seg)
    blocks = plan.blocks
    warps, stages = blocks.num_warps_bwd, blocks.num_stages_bwd

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    spans = flash.query_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    dq_f32 = [jnp.zeros(q.shape, jnp.float32)] if blocks.fused_backward else []
    dkv = _call(
        functools.partial(_dkv_kernel, plan=plan, bq=bq, bk=bk),
        grid=(kv_pad // bk, batch, heads),
        in_specs=[_span_spec(), _whole(q_pad, head_dim), _tile(bk, head_dim), _tile(bk, head_dim),
                  _whole(q_pad, head_dim), _whole_row_stats(q_pad), _whole_row_stats(q_pad),
                  _whole_segments(q_pad, q_seg), _segments(bk, kv_seg)] + [_whole(q_pad, head_dim)] * len(dq_f32),
        out_specs=[_tile(bk, head_dim), _tile(bk, head_dim)] + [_whole(q_pad, head_dim)] * len(dq_f32),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        + [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * len(dq_f32),
        # Operand numbers count arrays only: absent segment ids (None) are not operands.
        input_output_aliases={len(jax.tree.leaves((spans, args))): 2} if dq_f32 else None,
        plan=plan, num_warps=warps, num_stages=stages, name="phi_flash_dkv",
    )(spans, *args, *dq_f32)
    if blocks.fused_backward:
        dk, dv, dq = dkv
        return dq.astype(q.dtype), dk, dv
    dk, dv = dkv

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    spans = flash.key_spans(q_seg, kv_seg, plan=plan, batch=batch, q_pad=q_pad, kv_pad=kv_pad, bq=bq, bk=bk)
    dq = _call(
        functools.partial(_dq_kernel, plan=plan, bq=bq, bk=bk),
        grid=(q_pad // bq, batch, heads),
        in_specs=[_span_spec(), _tile(bq, head_dim), _whole(kv_pad, head_dim), _whole(kv_pad, head_dim),
                  _tile(bq, head_dim), _row_stats(bq), _row_stats(bq),
                  _segments(bq, q_seg), _whole_segments(kv_pad, kv_seg)],
        out_specs=_tile(bq, head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        plan=plan, num_warps=warps, num_stages=stages, name="phi_flash_dq",
    )(spans, *args)
    return dq, dk, dv


_attend = flash.fused(_forward, _backward)


def pallas_gpu_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, segment_ids=None, kv_segment_ids=None, *,
                         causal=True, block_sizes: BlockSizes | None = None, interpret=False):
    """Fused attention on GPU; inputs and output [batch, seq, heads, head_dim], scale head_dim**-0.5.
    Any head_dim works (padded to a power of two inside); any sequence length (padded to the blocks)."""
    _, q_len, _, head_dim = q_BxTxHxK.shape
    plan = flash.plan(q_len, k_BxSxHxK.shape[1], head_dim, block_sizes or gpu_block_sizes(head_dim),
                      min_block=GPU_MIN_BLOCK, power_of_two=True, causal=causal, interpret=interpret)
    q_pad, kv_pad = plan.padded_lengths
    dim_pad = max(GPU_MIN_BLOCK, 1 << (head_dim - 1).bit_length())

    def pad(x, length):
        return flash.pad_axis(flash.pad_axis(x, 1, length), 3, dim_pad)

    out = _attend(plan, pad(q_BxTxHxK, q_pad), pad(k_BxSxHxK, kv_pad), pad(v_BxSxHxK, kv_pad),
                  *flash.pad_segments(plan, segment_ids, kv_segment_ids))
    return out[:, :q_len, :, :head_dim]
