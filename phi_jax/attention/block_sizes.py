"""Block sizes of the fused attention kernels: one table per backend, and fitting a table row to a shape.

The forward kernel runs one program per `block_q` queries and steps over keys `block_k` at a time.
The backward runs two kernels: dK/dV (one program per `block_k_dkv` keys, stepping over queries
`block_q_dkv` at a time) and dQ (one program per `block_q_dq` queries, stepping over keys
`block_k_dq` at a time). Smaller blocks skip more finely on packed data; larger ones feed the
matrix units better.

The GPU rows follow the FlashAttention-2 Triton tutorial's H100 settings; the TPU rows follow jax's
splash attention (512). Neither is tuned on our kernels yet: bench/attention.py is where to tune.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    # Triton only: warps per program and software-pipelining stages, forward and backward.
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    # Kernel variants, off until a GPU has measured them (bench/gpu_suite.sh times each against the default).
    exp2: bool = False            # exponentiate in base 2, log2(e) folded into the scale (flash.py)
    dkv_transposed: bool = False  # Triton: the dK/dV kernel computes k.q^T tiles, so its matmuls have block_k_dkv rows
    fused_backward: bool = False  # Triton: one backward kernel, dQ added atomically in float32: 5 matmuls a tile, not 7

    @property
    def q_blocks(self):
        return (self.block_q, self.block_q_dkv, self.block_q_dq)

    @property
    def k_blocks(self):
        return (self.block_k, self.block_k_dkv, self.block_k_dq)

    def fit(self, q_len: int, kv_len: int, *, min_block: int, power_of_two: bool) -> "BlockSizes":
        """Shrinks blocks longer than the (rounded-up) sequence, so short inputs are not padded to a
        full block; every block stays a multiple of `min_block` (and a power of two if asked)."""
        def shrink(block, length):
            cap = max(min_block, -(-length // min_block) * min_block)
            if power_of_two:
                cap = 1 << (cap - 1).bit_length()
            return min(block, cap)
        q = [shrink(b, q_len) for b in self.q_blocks]
        k = [shrink(b, kv_len) for b in self.k_blocks]
        return dataclasses.replace(self, block_q=q[0], block_q_dkv=q[1], block_q_dq=q[2],
                                   block_k=k[0], block_k_dkv=k[1], block_k_dq=k[2])

    def padded_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
        """Sequence lengths rounded up so that every block size divides them."""
        def pad(length, blocks):
            multiple = math.lcm(*blocks)
            return -(-length // multiple) * multiple
        return pad(q_len, self.q_blocks), pad(kv_len, self.k_blocks)


def gpu_block_sizes(head_dim: int) -> BlockSizes:
    """Triton (H100 / H200 class). Blocks are powers of two, at least 16 (the MMA tile)."""
    if head_dim <= 64:
        return BlockSizes(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=3)
    return BlockSizes(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2)


GPU_MIN_BLOCK = 16


def tpu_block_sizes(head_dim: int) -> BlockSizes:
    """Mosaic (v4 / v5e / v5p / v6e). jax's old 128 default is far too small on v5e."""
    del head_dim  # 512 holds from 64 to 256 (a 512x512 f32 score tile is 1 MiB of VMEM).
    return BlockSizes(512, 512, 512, 512, 512, 512)


# Key blocks are the lane (last) dimension of the segment-id and score tiles: multiples of 128.
TPU_MIN_BLOCK = 128
