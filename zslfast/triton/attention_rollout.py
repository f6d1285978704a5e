"""Triton kernel of attention_rollout's CLS row (the op, the full-matrix path and the backward:
zslfast/ops/attention_rollout.py).

The math: row 0 of a product of L per-layer matrices, walked as a vector, v_0 = e_0 (one-hot on the CLS token),

    v_{t+1}[j] = sum_i v_t[i] M[i, j],   M = (F + I) / r  with r_i = 1 + sum_j F[i, j]   abnar: layers L-1 .. 0
                                         M = F + I        (normalize "none": r = 1)      abnar: layers L-1 .. 0
                                         M = F (first layer), I + F (the others)          residual: layers 0 .. L-1
    F[i, j]    = fuse_h A[h, i, j]       mean | sum | max | min over the H heads (FUSION: zslfast._enums.HeadFusion)

One launch per layer step, grid (B, S): the program (b, s) walks its own chunk of the rows i of instance b's map
in blocks of BLOCK_I rows (S fixed chunks of whole row blocks, enough for the grid to fill the GPU at small B),
fuses the H heads of each block on the fly, takes the row sums (abnar), and accumulates

    partial[s, b, j] = sum_{i in chunk s} coef_i * (F[i, j] + IDENTITY * delta_ij),
    coef_i = v_t[b, i] / r_i (NORMALIZE: abnar with normalize "row") or v_t[b, i] (abnar with normalize "none",
    residual),  IDENTITY = abnar, or residual past its first layer

in registers, so each map is read once and nothing (B, N, N) is written (the first step, v_0 = e_0, reads row 0
only: FIRST); the partials are then summed over s in
chunk order by torch (deterministic, no atomics) into v_{t+1}.

discard_ratio (zslfast.attention_rollout) never reaches this kernel: the op hands it maps already fused and
discarded in PyTorch, as one head (H = 1) with fusion sum.

NaN: max/min fusion propagates a NaN head (propagate_nan=ALL, as torch.max/amax), and a NaN reaches
exactly the outputs the reference's full products reach: every row is read past the first step, zero weight or not
(0 * NaN is NaN there too); the first step reads row 0 alone (the reference's selection of row 0). As the C++ kernel.

Shapes: A (B, H, N, N) one layer, read through its strides; vectors (L, B, N), row t the vector v_t entering step
t (row 0 = e_0); partial (S, B, N); result v_L (B, N). All in the accumulator dtype (fp32, fp64 for fp64). forward
returns the result in A's dtype and the states (L, B, N), states[l] the vector entering layer l's step: the vectors
as they are for residual, flipped for abnar.
"""

import torch
import triton
import triton.language as tl

from .._enums import HeadFusion, Mode, Normalize
from ._common import H200_SMS, accumulator_dtype, split, tl_accumulator_dtype
from ._launch import Launch, run

# The head fusions' ids (FUSION), as the kernel compares them at compile time.
FUSION_MEAN: tl.constexpr = tl.constexpr(int(HeadFusion.MEAN))
FUSION_MAX: tl.constexpr = tl.constexpr(int(HeadFusion.MAX))
FUSION_MIN: tl.constexpr = tl.constexpr(int(HeadFusion.MIN))

# Rows per block x padded columns, at 4 warps: 164-168 registers and no spill on triton 3.6-3.9 (sm_80/sm_90, every
# dtype; the audit). 8 warps or 2048-element tiles spilled 8-16 B on one or another of those versions.
TILE_ELEMENTS = 4096


@triton.jit
def _rollout_step_kernel(
    a_ptr, v_in_ptr, partial_ptr,
    B, H, N, rows_per_chunk,
    stride_ab, stride_ah, stride_ai, stride_aj,
    FUSION: tl.constexpr, NORMALIZE: tl.constexpr, IDENTITY: tl.constexpr, FIRST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, N)
    if FIRST:  # v = e_0: row 0 alone is read, so a NaN elsewhere in this map reaches no output (as in the reference)
        row_end = tl.minimum(row_end, 1)
    cols = tl.arange(0, BLOCK_N)
    mask_j = cols < N
    acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    a_b = a_ptr + b * stride_ab
    for i0 in range(row_start, row_end, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        mask_i = rows < row_end
        mask = mask_i[:, None] & mask_j[None, :]
        tile = a_b + rows[:, None] * stride_ai + cols[None, :] * stride_aj
        fused = tl.load(tile, mask=mask, other=0.0).to(ACC_DTYPE)
        for h in range(1, H):
            x = tl.load(tile + h * stride_ah, mask=mask, other=0.0).to(ACC_DTYPE)
            if FUSION == FUSION_MAX:  # a NaN head wins, as in torch.max (the default maximum drops NaN)
                fused = tl.maximum(fused, x, propagate_nan=tl.PropagateNan.ALL)
            elif FUSION == FUSION_MIN:
                fused = tl.minimum(fused, x, propagate_nan=tl.PropagateNan.ALL)
            else:
                fused += x
        if FUSION == FUSION_MEAN:
            fused = fused / H
        fused = tl.where(mask, fused, 0.0)
        if IDENTITY:  # F + I in the tile itself: one product and one column sum (NORMALIZE implies IDENTITY)
            fused += tl.where(mask & (rows[:, None] == cols[None, :]), 1.0, 0.0)
        coef = tl.load(v_in_ptr + b * N + rows, mask=mask_i, other=0.0).to(ACC_DTYPE)
        if NORMALIZE:
            coef = coef / tl.where(mask_i, tl.sum(fused, axis=1), 1.0)  # rows past the chunk: 0 / 1, not 0 / 0
        acc += tl.sum(coef[:, None] * fused, axis=0)
    tl.store(partial_ptr + (chunk * B + b) * N + cols, acc, mask=mask_j)


def plan_forward(attns, mode: int, head_fusion: int, normalize: int):
    """The vectors (L, B, N) and the result (B, N), in the accumulator dtype, and the steps that fill them: row t is
    the vector entering step t (layers last to first for abnar, first to last for residual), row 0 = e_0.

    mode, head_fusion and normalize are the options' ids (zslfast._enums: Mode, HeadFusion, Normalize); only abnar
    reads normalize.
    """
    abnar = mode == Mode.ABNAR
    L = len(attns)
    B, H, N, _ = attns[0].shape
    acc_dtype = accumulator_dtype(attns[0].dtype)
    device = attns[0].device
    vectors = torch.zeros((L, B, N), dtype=acc_dtype, device=device)
    result = torch.empty((B, N), dtype=acc_dtype, device=device)
    block_n = triton.next_power_of_2(N)
    block_i = max(1, min(triton.next_power_of_2(N), TILE_ELEMENTS // block_n))
    # two programs per SM: each instance's rows are cut into chunks of whole row blocks to reach them
    chunks, rows_per_chunk = split(N, B, 2 * H200_SMS, granule=block_i)
    partial = torch.empty((chunks, B, N), dtype=acc_dtype, device=device)
    order = range(L - 1, -1, -1) if abnar else range(L)
    steps = [lambda: vectors[0, :, 0].fill_(1)]
    for t, l in enumerate(order):
        a = attns[l]
        steps.append(Launch(
            _rollout_step_kernel, (B, chunks),
            (a, vectors[t], partial, B, H, N, rows_per_chunk, *a.stride()),
            dict(FUSION=int(head_fusion), NORMALIZE=abnar and normalize == Normalize.ROW, IDENTITY=abnar or l > 0,
                 FIRST=t == 0, ACC_DTYPE=tl_accumulator_dtype(acc_dtype), BLOCK_I=block_i, BLOCK_N=block_n),
            flops=B * N * N * (H + 2), label=f"layer {l}",
        ))
        steps.append(lambda t=t: torch.sum(partial, 0, out=vectors[t + 1] if t + 1 < L else result))
    return vectors, result, steps


def forward(attns, mode: int, head_fusion: int, normalize: int):
    """out (B, N) in the maps' dtype and states (L, B, N) in the accumulator dtype, states[l] the vector entering
    layer l's step."""
    vectors, result, steps = plan_forward(attns, mode, head_fusion, normalize)
    run(steps)
    return result.to(attns[0].dtype), vectors.flip(0) if mode == Mode.ABNAR else vectors
