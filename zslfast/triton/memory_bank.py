"""Triton kernel of memory_bank_kl (the op and its autograd: zslfast/ops/memory_bank.py), forward and gradient in
one launch.

The math, per row r = (b, m) with z = z[b, m], p = protos[labels[b], m] (the prototypes' logits, gathered by index):

    lse_z = logsumexp(z), lse_p = logsumexp(p), P = exp(z - lse_z), a = (z - lse_z) - (p - lse_p)
    kl_row[r]  = sum_d P_d a_d                             KL(softmax(z) || softmax(p)); 0 for an inactive row
    grad_z[r]  = P * (a - kl_row[r]) / max(n_active, 1)    0 for an inactive row
    loss       = sum_r kl_row[r] / max(n_active, 1),  n_active = active.sum()
    taken as a_t + kl_t and P ((a - a_t) - kl_t) / max(n_active, 1), t the arg-max of z (the first), kl_t =
    sum_d P_d (a_d - a_t), a_d - a_t = (z_d - z_t) - (p_d - p_t): the softmax backward shifted by its arg-max's
    term, exact where P is near one-hot (csrc/cpu/memory_bank.cpp's kl rows)

    grid (B * M,): program r handles one row; a row is inactive where active[b, m] is False or labels[b] is out of
    [0, C) (possible only under torch.compile, where the Python check does not run): it reads nothing. Active rows
    read z[b, m] and protos[labels[b], m] in place (no (B, M, D) copy of the prototypes). Rows of D <=
    MAX_SINGLE_BLOCK are held in registers (one read of each side); longer rows are streamed in BLOCK_D chunks
    (online logsumexp, then the KL, then the gradient: three reads, two without the gradient). n_active is read on
    the device (no host sync); the loss is summed by torch.sum (fixed order: deterministic). Every tensor is
    addressed through all its strides. Accumulation in fp32, fp64 for fp64 inputs.

Shapes: z (B, M, D), protos (C, M, D), labels (B,) int64, active (B, M) bool (read as uint8), n_active () int64
-> kl_row (B * M,) in the accumulator dtype, loss () and grad_z (B, M, D) (or (0,) without the gradient) in z's dtype.
"""

import torch
import triton
import triton.language as tl

from ._common import tl_accumulator_dtype
from ._launch import Launch, run
from ..validation import accumulator_dtype

MAX_SINGLE_BLOCK = 8192  # tests lower it to run the streaming path on small rows


@triton.jit
def _load_rows(z_row, p_row, offs, D, stride_zd, stride_pd, other, ACC_DTYPE: tl.constexpr):
    """(z, p, offs < D): the two rows at offs in ACC_DTYPE, ``other`` past D."""
    mask = offs < D
    z = tl.load(z_row + offs * stride_zd, mask=mask, other=other).to(ACC_DTYPE)
    p = tl.load(p_row + offs * stride_pd, mask=mask, other=other).to(ACC_DTYPE)
    return z, p, mask


@triton.jit
def _kl_in_registers(
    z_row, p_row, kl_ptr, grad_row, r, offs, inv_n, D, stride_zd, stride_pd,
    COMPUTE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """kl_row[r] and grad_z[r] of a row held whole in registers (offs covers D): one read of each side."""
    z, p, mask = _load_rows(z_row, p_row, offs, D, stride_zd, stride_pd, 0.0, ACC_DTYPE)
    max_z = tl.max(tl.where(mask, z, -float("inf")), axis=0)
    max_p = tl.max(tl.where(mask, p, -float("inf")), axis=0)
    ez = tl.where(mask, tl.exp(z - max_z), 0.0)
    sum_z = tl.sum(ez, axis=0)
    lse_z = max_z + tl.log(sum_z)
    lse_p = max_p + tl.log(tl.sum(tl.where(mask, tl.exp(p - max_p), 0.0), axis=0))
    top = tl.min(tl.where(mask & (z == max_z), offs, D), axis=0)  # the first arg-max (D: none, a NaN row)
    z_t = tl.sum(tl.where(offs == top, z, 0.0), axis=0)
    p_t = tl.sum(tl.where(offs == top, p, 0.0), axis=0)
    a = tl.where(mask, (z - z_t) - (p - p_t), 0.0)  # a - a_t
    P = ez / sum_z
    kl = tl.sum(P * a, axis=0)
    tl.store(kl_ptr + r, ((z_t - lse_z) - (p_t - lse_p)) + kl)
    if COMPUTE_GRAD:
        tl.store(grad_row + offs, (P * (a - kl) * inv_n).to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _streamed_lse(z_row, p_row, D, stride_zd, stride_pd, ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """(lse_z, lse_p, z_t, p_t) of rows streamed in BLOCK_D chunks: running maxima and rescaled sums (the first
    read), z_t = max z and p_t = p at its first arg-max t."""
    offs = tl.arange(0, BLOCK_D)
    max_z = tl.full([], -float("inf"), ACC_DTYPE)
    max_p = tl.full([], -float("inf"), ACC_DTYPE)
    sum_z = tl.zeros([], ACC_DTYPE)
    sum_p = tl.zeros([], ACC_DTYPE)
    p_t = tl.zeros([], ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        z, p, mask = _load_rows(z_row, p_row, d0 + offs, D, stride_zd, stride_pd, -float("inf"), ACC_DTYPE)
        chunk_max = tl.max(z, axis=0)
        chunk_top = tl.min(tl.where(mask & (z == chunk_max), offs, BLOCK_D), axis=0)
        p_t = tl.where(chunk_max > max_z, tl.sum(tl.where(offs == chunk_top, p, 0.0), axis=0), p_t)
        new_max_z = tl.maximum(max_z, chunk_max)
        new_max_p = tl.maximum(max_p, tl.max(p, axis=0))
        sum_z = sum_z * tl.exp(max_z - new_max_z) + tl.sum(tl.exp(z - new_max_z), axis=0)
        sum_p = sum_p * tl.exp(max_p - new_max_p) + tl.sum(tl.exp(p - new_max_p), axis=0)
        max_z = new_max_z
        max_p = new_max_p
    return max_z + tl.log(sum_z), max_p + tl.log(sum_p), max_z, p_t


@triton.jit
def _streamed_kl(z_row, p_row, lse_z, z_t, p_t, D, stride_zd, stride_pd, ACC_DTYPE: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """kl_t = sum_d P_d (a_d - a_t) of streamed rows (the second read)."""
    offs = tl.arange(0, BLOCK_D)
    kl_acc = tl.zeros([BLOCK_D], ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        z, p, mask = _load_rows(z_row, p_row, d0 + offs, D, stride_zd, stride_pd, 0.0, ACC_DTYPE)
        kl_acc += tl.where(mask, tl.exp(z - lse_z) * ((z - z_t) - (p - p_t)), 0.0)
    return tl.sum(kl_acc, axis=0)


@triton.jit
def _streamed_grad(
    grad_row, z_row, p_row, lse_z, z_t, p_t, kl_t, inv_n, D, stride_zd, stride_pd,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_z = P ((a - a_t) - kl_t) / max(n_active, 1) of streamed rows (the third read)."""
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        z, p, mask = _load_rows(z_row, p_row, d0 + offs, D, stride_zd, stride_pd, 0.0, ACC_DTYPE)
        grad = tl.exp(z - lse_z) * (((z - z_t) - (p - p_t)) - kl_t) * inv_n
        tl.store(grad_row + d0 + offs, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _kl_kernel(
    z_ptr, p_ptr, labels_ptr, active_ptr, n_active_ptr, kl_ptr, grad_ptr,
    M, C, D,
    stride_zb, stride_zm, stride_zd, stride_pc, stride_pm, stride_pd, stride_l, stride_ab, stride_am,
    COMPUTE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, SINGLE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    b = r // M
    m = r % M
    label = tl.load(labels_ptr + b.to(tl.int64) * stride_l)
    # An out-of-range label (only possible under torch.compile, where the Python check does not run) reads nothing.
    on = (tl.load(active_ptr + b.to(tl.int64) * stride_ab + m * stride_am) != 0) & (label >= 0) & (label < C)
    grad_row = grad_ptr + r.to(tl.int64) * D
    offs = tl.arange(0, BLOCK_D)
    if on:
        n_active = tl.load(n_active_ptr).to(ACC_DTYPE)
        inv_n = 1.0 / tl.maximum(n_active, 1.0)
        z_row = z_ptr + b.to(tl.int64) * stride_zb + m.to(tl.int64) * stride_zm
        p_row = p_ptr + label.to(tl.int64) * stride_pc + m.to(tl.int64) * stride_pm
        if SINGLE:
            _kl_in_registers(z_row, p_row, kl_ptr, grad_row, r, offs, inv_n, D, stride_zd, stride_pd,
                             COMPUTE_GRAD, ACC_DTYPE)
        else:
            lse_z, lse_p, z_t, p_t = _streamed_lse(z_row, p_row, D, stride_zd, stride_pd, ACC_DTYPE, BLOCK_D)
            kl_t = _streamed_kl(z_row, p_row, lse_z, z_t, p_t, D, stride_zd, stride_pd, ACC_DTYPE, BLOCK_D)
            tl.store(kl_ptr + r, ((z_t - lse_z) - (p_t - lse_p)) + kl_t)
            if COMPUTE_GRAD:
                _streamed_grad(grad_row, z_row, p_row, lse_z, z_t, p_t, kl_t, inv_n, D, stride_zd, stride_pd,
                               ACC_DTYPE, BLOCK_D)
    else:
        tl.store(kl_ptr + r, tl.zeros([], ACC_DTYPE))
        if COMPUTE_GRAD:
            for d0 in range(0, D, BLOCK_D):
                tl.store(grad_row + d0 + offs, tl.zeros([BLOCK_D], grad_ptr.dtype.element_ty), mask=d0 + offs < D)


def plan_kl_forward(z: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, active: torch.Tensor, output_mask):
    """(loss, grad_z) and the steps that fill them: one program per (b, m) row, then the fixed-order mean. grad_z
    (d loss / dz) is formed when output_mask[0] is true, else it is empty."""
    compute_grad = bool(output_mask[0])
    B, M, D = z.shape
    C = protos.shape[0]
    acc_dtype = accumulator_dtype(z.dtype)
    labels = labels.to(torch.int64)
    active = active.to(torch.bool)
    n_active = active.sum()
    kl_rows = torch.empty((B * M,), dtype=acc_dtype, device=z.device)
    grad_z = torch.empty((B, M, D) if compute_grad else (0,), dtype=z.dtype, device=z.device)
    loss = torch.empty((), dtype=z.dtype, device=z.device)
    single = triton.next_power_of_2(D) <= MAX_SINGLE_BLOCK
    block_d = triton.next_power_of_2(D) if single else min(MAX_SINGLE_BLOCK, 2048)
    active_u8 = active.view(torch.uint8)
    launch = Launch(
        _kl_kernel, (B * M,),
        (z, protos, labels, active_u8, n_active, kl_rows, grad_z if compute_grad else kl_rows,
         M, C, D, *z.stride(), *protos.stride(), labels.stride(0), *active_u8.stride()),
        dict(COMPUTE_GRAD=compute_grad, ACC_DTYPE=tl_accumulator_dtype(z.dtype), SINGLE=single, BLOCK_D=block_d),
        num_warps=4 if block_d <= 1024 else 8,
        flops=B * M * D * (12 if compute_grad else 8),
    )

    def mean():
        loss.copy_(kl_rows.sum() / n_active.clamp_min(1).to(acc_dtype))

    return (loss, grad_z), [launch, mean]


def kl_forward(z: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, active: torch.Tensor, output_mask):
    outputs, steps = plan_kl_forward(z, protos, labels, active, output_mask)
    run(steps)
    return outputs
