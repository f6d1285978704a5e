"""Triton kernels of prototype_scores with w (B, C, K) (math: zslfast/ops/prototype_scores.py).

    forward   out[b, c]     = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])      grid (B, C / BLOCK_C)
    backward  one pass over w, grid (C / BLOCK_C, K / BLOCK_K, S), each program walking its own chunk of
              instances b (S fixed chunks of the batch, so that the grid fills the GPU at small C and K):
              grad_w[b, c, k] = g[b, c] * e[b, k] * s[c, k]                   written once
              grad_s[c, k]    = sum_b g[b, c] * e[b, k] * (1 + w[b, c, k])    per-chunk partials (S, C, K) in
                                                                              registers, summed afterwards in chunk order
              grad_e[b, k]    = sum_c g[b, c] * s[c, k] * (1 + w[b, c, k])    per-class-block partials (C/BLOCK_C, B, K),
                                                                              summed afterwards in block order
No atomics anywhere: the backward is deterministic, and S depends on the shapes only. Every tensor is addressed
through all its strides, so transposed and sliced inputs are read in place. Accumulation is in fp32 (fp64 for fp64 inputs).
Shapes: e (B, K), s (C, K), w (B, C, K) -> out (B, C); backward g (B, C) -> grad_e (B, K), grad_s (C, K), grad_w
(B, C, K), each (0,) where its output_mask entry is false (grad_e and grad_s come out of the pass over w in any
case), in the inputs' dtype; the partials in the accumulator dtype.
"""

import torch
import triton
import triton.language as tl

from ._common import H200_SMS, accumulator_dtype, split, tl_accumulator_dtype
from ._launch import Launch, run

FORWARD_BLOCK_C, FORWARD_BLOCK_K = 32, 64
BACKWARD_BLOCK_C, BACKWARD_BLOCK_K = 32, 64
# Both passes stream w: more warps per (32 x 64) tile means fewer registers per thread and more loads in flight.
# The GPU audit (benchmarks/gpu_audit.md) gives, on sm_90 in fp32: forward 158 registers at 4 warps (19% occupancy)
# -> 76 at 8 (38%); backward 186 at 4 (12%) -> 56 at 16 (50%); no spills anywhere.
FORWARD_WARPS, BACKWARD_WARPS = 8, 16


@triton.jit
def _forward_kernel(
    e_ptr, s_ptr, w_ptr, out_ptr,
    C, K,
    stride_eb, stride_ek, stride_sc, stride_sk, stride_wb, stride_wc, stride_wk, stride_ob, stride_oc,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_ck = mask_c[:, None] & mask_k[None, :]
        e = tl.load(e_ptr + b * stride_eb + offs_k * stride_ek, mask=mask_k, other=0.0).to(ACC_DTYPE)
        s = tl.load(s_ptr + offs_c[:, None] * stride_sc + offs_k[None, :] * stride_sk, mask=mask_ck, other=0.0)
        w = tl.load(
            w_ptr + b * stride_wb + offs_c[:, None] * stride_wc + offs_k[None, :] * stride_wk, mask=mask_ck, other=0.0
        )
        acc += tl.sum(s.to(ACC_DTYPE) * (1.0 + w.to(ACC_DTYPE)) * e[None, :], axis=1)
    tl.store(out_ptr + b * stride_ob + offs_c * stride_oc, acc.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _backward_kernel(
    g_ptr, e_ptr, s_ptr, w_ptr, grad_e_partial_ptr, grad_s_ptr, grad_w_ptr,
    B, C, K, b_per_chunk,
    stride_gb, stride_gc, stride_eb, stride_ek, stride_sc, stride_sk, stride_wb, stride_wc, stride_wk,
    NEED_GRAD_W: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    c_block = tl.program_id(0)
    chunk = tl.program_id(2)
    b_start = chunk * b_per_chunk
    b_end = tl.minimum(b_start + b_per_chunk, B)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_c = offs_c < C
    mask_k = offs_k < K
    mask_ck = mask_c[:, None] & mask_k[None, :]
    s = tl.load(s_ptr + offs_c[:, None] * stride_sc + offs_k[None, :] * stride_sk, mask=mask_ck, other=0.0).to(ACC_DTYPE)
    grad_s = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC_DTYPE)
    # Pointers start at the chunk's first instance and advance by one instance per step: 64-bit pointer arithmetic.
    # grad_e partials are (C / BLOCK_C, B, K), grad_s partials (S, C, K), grad_w (B, C, K), all contiguous.
    first = b_start.to(tl.int64)
    g_row = g_ptr + first * stride_gb + offs_c * stride_gc
    e_row = e_ptr + first * stride_eb + offs_k * stride_ek
    w_tile = w_ptr + first * stride_wb + offs_c[:, None] * stride_wc + offs_k[None, :] * stride_wk
    partial_row = grad_e_partial_ptr + (c_block.to(tl.int64) * B + first) * K + offs_k
    grad_w_tile = grad_w_ptr + first * C * K + offs_c[:, None] * K + offs_k[None, :]
    for _ in range(b_start, b_end):
        g = tl.load(g_row, mask=mask_c, other=0.0).to(ACC_DTYPE)
        e = tl.load(e_row, mask=mask_k, other=0.0).to(ACC_DTYPE)
        w = tl.load(w_tile, mask=mask_ck, other=0.0).to(ACC_DTYPE)
        t = g[:, None] * (1.0 + w)
        grad_s += t * e[None, :]
        tl.store(partial_row, tl.sum(t * s, axis=0), mask=mask_k)
        if NEED_GRAD_W:
            grad_w = g[:, None] * e[None, :] * s
            tl.store(grad_w_tile, grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask_ck)
        g_row += stride_gb
        e_row += stride_eb
        w_tile += stride_wb
        partial_row += K
        grad_w_tile += C * K
    grad_s_tile = grad_s_ptr + chunk.to(tl.int64) * C * K + offs_c[:, None] * K + offs_k[None, :]
    tl.store(grad_s_tile, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask_ck)


def plan_forward(e: torch.Tensor, s: torch.Tensor, w: torch.Tensor):
    """out (B, C) and the launch that fills it."""
    B, K = e.shape
    C = s.shape[0]
    out = torch.empty((B, C), dtype=e.dtype, device=e.device)
    launch = Launch(
        _forward_kernel, (B, triton.cdiv(C, FORWARD_BLOCK_C)),
        (e, s, w, out, C, K, *e.stride(), *s.stride(), *w.stride(), *out.stride()),
        dict(ACC_DTYPE=tl_accumulator_dtype(e.dtype), BLOCK_C=FORWARD_BLOCK_C, BLOCK_K=FORWARD_BLOCK_K),
        num_warps=FORWARD_WARPS, flops=3 * B * C * K,
    )
    return out, [launch]


def forward(e: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out, steps = plan_forward(e, s, w)
    run(steps)
    return out


def plan_backward(grad: torch.Tensor, e: torch.Tensor, s: torch.Tensor, w: torch.Tensor, output_mask):
    """(grad_e, grad_s, grad_w) and the steps that fill them: the pass over w, then the fixed-order partial sums."""
    need_e, need_s, need_grad_w = (bool(m) for m in output_mask)
    B, K = e.shape
    C = s.shape[0]
    c_blocks = triton.cdiv(C, BACKWARD_BLOCK_C)
    # two programs per SM keep a bandwidth-bound pass over w busy everywhere: the batch is cut to reach them
    chunks, per_chunk = split(B, c_blocks * triton.cdiv(K, BACKWARD_BLOCK_K), 2 * H200_SMS)
    acc_dtype = accumulator_dtype(e.dtype)
    grad_e_partial = torch.empty((c_blocks, B, K), dtype=acc_dtype, device=e.device)
    grad_s_partial = torch.empty((chunks, C, K), dtype=acc_dtype, device=e.device)
    grad_w = torch.empty((B, C, K) if need_grad_w else (0,), dtype=e.dtype, device=e.device)
    grad_e = torch.empty((B, K) if need_e else (0,), dtype=e.dtype, device=e.device)
    grad_s = torch.empty((C, K) if need_s else (0,), dtype=e.dtype, device=e.device)
    launch = Launch(
        _backward_kernel, (c_blocks, triton.cdiv(K, BACKWARD_BLOCK_K), chunks),
        (grad, e, s, w, grad_e_partial, grad_s_partial, grad_w if need_grad_w else grad_s_partial,
         B, C, K, per_chunk, *grad.stride(), *e.stride(), *s.stride(), *w.stride()),
        dict(NEED_GRAD_W=need_grad_w, ACC_DTYPE=tl_accumulator_dtype(e.dtype),
             BLOCK_C=BACKWARD_BLOCK_C, BLOCK_K=BACKWARD_BLOCK_K),
        num_warps=BACKWARD_WARPS, flops=(7 if need_grad_w else 5) * B * C * K,
    )

    def reduce_partials():
        if need_e:
            grad_e.copy_(grad_e_partial.sum(0))
        if need_s:
            grad_s.copy_(grad_s_partial.sum(0))

    return (grad_e, grad_s, grad_w), [launch, reduce_partials]


def backward(grad: torch.Tensor, e: torch.Tensor, s: torch.Tensor, w: torch.Tensor, output_mask):
    grads, steps = plan_backward(grad, e, s, w, output_mask)
    run(steps)
    return grads
