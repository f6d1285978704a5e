"""Triton kernel of attention_rollout's CLS row (math: zslfast/ops/attention_rollout.py).

One launch per layer step, grid (B,): the program of instance b walks the rows i of the layer's maps in blocks,
fuses the H heads of each block on the fly (mean/sum/max/min), takes the row sums (abnar), and accumulates

    v_out[j] = sum_i coef_i * (F[i, j] + identity * delta_ij),  coef_i = v_in[i] / rowsum_i (abnar) or v_in[i]

in registers, so each map is read once and nothing (B, N, N) is written. Shapes: A (B, H, N, N) one layer,
v_in and v_out (B, N) rows of the states buffer (L + 1, B, N) in the accumulator dtype (fp32, fp64 for fp64).
"""


import torch
import triton
import triton.language as tl

from ._common import accumulator_dtype, tl_accumulator_dtype

TILE_ELEMENTS = 4096  # rows per block x padded columns


@triton.jit
def _rollout_step_kernel(
    a_ptr, v_in_ptr, v_out_ptr,
    H, N,
    stride_ab, stride_ah, stride_ai, stride_aj,
    FUSION: tl.constexpr, ABNAR: tl.constexpr, IDENTITY: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask_j = cols < N
    acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    a_b = a_ptr + b * stride_ab
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        mask_i = rows < N
        mask = mask_i[:, None] & mask_j[None, :]
        tile = a_b + rows[:, None] * stride_ai + cols[None, :] * stride_aj
        fused = tl.load(tile, mask=mask, other=0.0).to(ACC_DTYPE)
        for h in range(1, H):
            x = tl.load(tile + h * stride_ah, mask=mask, other=0.0).to(ACC_DTYPE)
            if FUSION == 2:
                fused = tl.maximum(fused, x)
            elif FUSION == 3:
                fused = tl.minimum(fused, x)
            else:
                fused += x
        if FUSION == 0:
            fused = fused / H
        fused = tl.where(mask, fused, 0.0)
        coef = tl.load(v_in_ptr + b * N + rows, mask=mask_i, other=0.0).to(ACC_DTYPE)
        if ABNAR:
            coef = coef / (tl.sum(fused, axis=1) + 1.0)
        acc += tl.sum(coef[:, None] * fused, axis=0)
        if IDENTITY:
            acc += tl.sum(tl.where(rows[:, None] == cols[None, :], coef[:, None], 0.0), axis=0)
    tl.store(v_out_ptr + b * N + cols, acc, mask=mask_j)


def forward(attns: list[torch.Tensor], mode: str, fusion: int):
    """out (B, N) and states (L, B, N): the vector entering each layer's step, in the accumulator dtype.

    fusion is the head fusion's id: its position in zslfast.ops.attention_rollout.FUSIONS (mean, sum, max, min).
    """
    L = len(attns)
    B, H, N, _ = attns[0].shape
    acc_dtype = accumulator_dtype(attns[0].dtype)
    states = torch.empty((L, B, N), dtype=acc_dtype, device=attns[0].device)
    v = torch.zeros((B, N), dtype=acc_dtype, device=attns[0].device)
    v[:, 0] = 1
    block_n = triton.next_power_of_2(N)
    block_i = max(1, min(triton.next_power_of_2(N), TILE_ELEMENTS // block_n))
    order = range(L - 1, -1, -1) if mode == "abnar" else range(L)
    for l in order:
        a = attns[l]
        states[l] = v
        v_next = torch.empty_like(v)
        _rollout_step_kernel[(B,)](
            a, states[l], v_next, H, N, *a.stride(),
            FUSION=fusion, ABNAR=mode == "abnar", IDENTITY=mode == "abnar" or l > 0,
            ACC_DTYPE=tl_accumulator_dtype(acc_dtype),
            BLOCK_I=block_i, BLOCK_N=block_n,
        )
        v = v_next
    return v.to(attns[0].dtype), states
