"""Triton kernels of cosine_logits (the op and its autograd: zslfast/ops/cosine_logits.py).

    out[n, c] = scale * <x[n], p[c]> * ix[n] * ip[c],   ix = 1 / max(|x|, eps), ip = 1 / max(|p|, eps)  (F.normalize's)
                or, ADD_EPS (eps_mode "add", GEM-ZSL's x / (|x| + eps)), ix = 1 / (|x| + eps), ip = 1 / (|p| + eps)

    forward   one kernel, grid (N / BLOCK_N, C / BLOCK_C): the D loop accumulates x @ protos.T with tl.dot and, from
              the same loaded tiles, the squared norms of the block's x rows and protos rows; the epilogue applies
              ix = 1 / max(|x|, eps), ip = 1 / max(|p|, eps) and scale. A sum of squares overflows fp32 for
              |v| beyond ~1.8e19: a program that finds one inf among its sums reads those rows again
              (max |v_d| first, then sum (v / max)^2), a rare branch that leaves every other result bit-identical. Every program computes the norms of its
              rows; those with pid_c == 0 store ix, those with pid_n == 0 store ip, so none waits on another.
    backward  grad_x, grid (N / BLOCK_N, D / BLOCK_D), loop over class blocks:
                  G[n, d] = sum_c g[n, c] * ip[c] * p[c, d]          tl.dot(g, p * ip)
                  r[n]    = sum_c g[n, c] * out[n, c]                  (= scale * sum_c g * cos, no division)
                  grad_x  = scale * ix * G - [|x| > eps] * (x * ix) * (ix * r)   (ix^2 underflows for |x| ~ 1e30)
                            ADD_EPS: scale * ix * G - (x * ix) * (r / |x|), 1 / |x| = ix / (1 - eps * ix)
                  and, when scale needs a gradient, partial sums of (x ix) * G per (D block, n): sum g * cos
                  reduced from G, so scale == 0 needs no special case
              grad_protos, grid (C / BLOCK_C, D / BLOCK_D), loop over row blocks: the same with x and protos swapped
                  H[c, d] = sum_n g[n, c] * ix[n] * x[n, d]            tl.dot(g.T, x * ix)
Operands are scaled by their inverse norms in registers (values in [-1, 1] before the cast back to fp16/bf16 for
tl.dot, as the eager code's normalised copies are), never in memory. No atomics: deterministic. Every tensor is
addressed through all its strides, so transposed and sliced inputs (and autograd's expanded grads) are read in
place. Accumulation is in fp32, fp64 for fp64 inputs; tl.dot has no fp64, so fp64 multiplies and sums tiles.
fp32 tl.dot runs "ieee" (as torch.matmul without TF32), or "tf32" when torch.backends.cuda.matmul.allow_tf32 is on.
Shapes: x (N, D), protos (C, D), scale () -> out (N, C), ix (N,), ip (C,); backward g (N, C) -> grad_x (N, D),
grad_protos (C, D), grad_scale () (from partials (D / BLOCK_D, N), summed by torch). out and the gradients in the
inputs' dtype; ix, ip, the partials and the scale the kernels read in the accumulator dtype. eps is a compile-time
constant (EPS; the op passes its EPS = 1e-8), and so is the eps mode (ADD_EPS).
"""

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._enums import EpsMode
from ._common import accumulator_dtype, block_size, dot_precision, inv_clamped, inv_norm, mm, sqrt_acc, tl_accumulator_dtype
from ._launch import Launch, run


@triton.jit
def _not_clamped(inverse_norm, EPS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """|v| > eps, read off 1 / max(|v|, eps): a clamped row's inverse norm is exactly 1 / eps, computed the same way."""
    return inverse_norm < inv_norm(tl.full([], 0.0, inverse_norm.dtype), EPS, ACC_DTYPE)


@triton.jit
def _div_acc(numerator, denominator, ACC_DTYPE: tl.constexpr):
    """numerator / denominator (same shapes) in ACC_DTYPE, round-to-nearest in fp32 as the C++ kernels divide."""
    if ACC_DTYPE == tl.float64:
        return numerator / denominator
    else:
        return tl.math.div_rn(numerator, denominator)


@triton.jit
def _inv_by_mode(norm, EPS: tl.constexpr, ADD_EPS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """1 / (norm + eps) for ADD_EPS, else 1 / max(norm, eps) (eps built in ACC_DTYPE: see _common.inv_clamped)."""
    if ADD_EPS:
        denominator = norm + tl.full([], EPS, ACC_DTYPE)
        return _div_acc(tl.full(denominator.shape, 1.0, ACC_DTYPE), denominator, ACC_DTYPE)
    else:
        return inv_clamped(norm, EPS, ACC_DTYPE)


@triton.jit
def _normalised_grad(G, rows, inverse_norm, r, scale, EPS: tl.constexpr, ADD_EPS: tl.constexpr,
                     ACC_DTYPE: tl.constexpr):
    """The gradient of the rows of one side: scale * i * G - [|row| > eps] * (row * i) * (i * r), i = the rows'
    inverse norms, G the other side's normalised rows weighted by g, r = sum g * out per row (grad_x; grad_protos
    alike). i^2 is never formed: it underflows to 0 for |row| ~ 1e30, where row * i and i * r do not.
    ADD_EPS: (row * i) * (r / |row|), |row| read off i as i / (1 - eps * i) (csrc/inv_norm.h projection_coeff: no
    norm is saved beside i); a zero row, where 1 - eps * i rounds to ~0, gets 0, its limit."""
    if ADD_EPS:
        share = 1.0 - tl.full([], EPS, ACC_DTYPE) * inverse_norm
        safe_share = tl.where(share > 0, share, 1.0).to(ACC_DTYPE)
        norm_term = tl.where(share > 0, _div_acc(inverse_norm * r, safe_share, ACC_DTYPE), 0.0)
    else:
        norm_term = tl.where(_not_clamped(inverse_norm, EPS, ACC_DTYPE), inverse_norm * r, 0.0)
    return G * (scale * inverse_norm)[:, None] - (rows * inverse_norm[:, None]) * norm_term[:, None]


@triton.jit
def _rescaled_norms(rows_ptr, mask_rows, stride_d, D, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """|v[r]| = m * |v[r] / m|, m = max_d |v[r, d]|, of the (BLOCK_R,) rows at rows_ptr (pointers (BLOCK_R, 1)),
    read again in D tiles: the norms of the rows whose sum of squares overflowed (inv_norm.h rescaled_norm; an inf
    element gives NaN)."""
    m = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(rows_ptr + offs_d[None, :] * stride_d, mask=mask_rows[:, None] & (offs_d < D)[None, :], other=0.0)
        m = tl.maximum(m, tl.max(tl.abs(v.to(ACC_DTYPE)), axis=1))
    m = tl.where(m > 0, m, 1.0).to(ACC_DTYPE)
    sum_sq = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(rows_ptr + offs_d[None, :] * stride_d, mask=mask_rows[:, None] & (offs_d < D)[None, :], other=0.0)
        scaled = v.to(ACC_DTYPE) / m[:, None]
        sum_sq += tl.sum(scaled * scaled, axis=1)
    return m * sqrt_acc(sum_sq, ACC_DTYPE)


@triton.jit
def _row_norms(sum_sq, rows_ptr, mask_rows, stride_d, D, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The norms of a block's rows from their plain sums of squares: sqrt(sum_sq) (bit-identical to it wherever it
    is finite) and, only in a block where some sum overflowed (a rare branch, taken by the whole program), those
    rows' norms again by _rescaled_norms."""
    norm = sqrt_acc(sum_sq, ACC_DTYPE)
    overflowed = sum_sq == float("inf")
    if tl.sum(overflowed.to(tl.int32), axis=0) > 0:  # a count, not max(sum_sq): max may drop NaN on a GPU
        norm = tl.where(overflowed, _rescaled_norms(rows_ptr, mask_rows, stride_d, D, ACC_DTYPE, BLOCK_R, BLOCK_D),
                        norm)
    return norm


@triton.jit
def _forward_kernel(
    x_ptr, p_ptr, scale_ptr, out_ptr, ix_ptr, ip_ptr,
    N, C, D,
    stride_xn, stride_xd, stride_pc, stride_pd, stride_on, stride_oc,
    EPS: tl.constexpr, ADD_EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    p_rows = p_ptr + offs_c.to(tl.int64)[:, None] * stride_pc
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC_DTYPE)
    x_sq = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    p_sq = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        p = tl.load(p_rows + offs_d[None, :] * stride_pd, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        xf = x.to(ACC_DTYPE)
        pf = p.to(ACC_DTYPE)
        x_sq += tl.sum(xf * xf, axis=1)
        p_sq += tl.sum(pf * pf, axis=1)
        acc += mm(x, tl.trans(p), ACC_DTYPE, DOT_PRECISION)
    # ix = 1 / max(|x|, eps) as inv_norm(x_sq) would give it, without overflow
    ix = _inv_by_mode(_row_norms(x_sq, x_rows, mask_n, stride_xd, D, ACC_DTYPE, BLOCK_N, BLOCK_D), EPS, ADD_EPS,
                      ACC_DTYPE)
    ip = _inv_by_mode(_row_norms(p_sq, p_rows, mask_c, stride_pd, D, ACC_DTYPE, BLOCK_C, BLOCK_D), EPS, ADD_EPS,
                      ACC_DTYPE)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    out = acc * (scale * ix)[:, None] * ip[None, :]
    tl.store(
        out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_c[None, :] * stride_oc,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_c[None, :],
    )
    if pid_c == 0:
        tl.store(ix_ptr + offs_n, ix, mask=mask_n)
    if pid_n == 0:
        tl.store(ip_ptr + offs_c, ip, mask=mask_c)


@triton.jit
def _grad_x_kernel(
    g_ptr, out_ptr, x_ptr, p_ptr, ix_ptr, ip_ptr, scale_ptr, grad_x_ptr, partial_ptr,
    N, C, D,
    stride_gn, stride_gc, stride_on, stride_oc, stride_xn, stride_xd, stride_pc, stride_pd,
    STORE_GRAD: tl.constexpr, NEED_SCALE: tl.constexpr,
    EPS: tl.constexpr, ADD_EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    rows64 = offs_n.to(tl.int64)
    g_rows = g_ptr + rows64[:, None] * stride_gn
    out_rows = out_ptr + rows64[:, None] * stride_on
    G = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    r = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask_nc = mask_n[:, None] & mask_c[None, :]
        g = tl.load(g_rows + offs_c[None, :] * stride_gc, mask=mask_nc, other=0.0)
        out = tl.load(out_rows + offs_c[None, :] * stride_oc, mask=mask_nc, other=0.0)
        r += tl.sum(g.to(ACC_DTYPE) * out.to(ACC_DTYPE), axis=1)
        ip = tl.load(ip_ptr + offs_c, mask=mask_c, other=0.0)
        p = tl.load(
            p_ptr + offs_c.to(tl.int64)[:, None] * stride_pc + offs_d[None, :] * stride_pd,
            mask=mask_c[:, None] & mask_d[None, :],
            other=0.0,
        )
        p_hat = (p.to(ACC_DTYPE) * ip[:, None]).to(p_ptr.dtype.element_ty)
        G += mm(g.to(p_ptr.dtype.element_ty), p_hat, ACC_DTYPE, DOT_PRECISION)
    ix = tl.load(ix_ptr + offs_n, mask=mask_n, other=0.0)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask_nd, other=0.0)
    x = x.to(ACC_DTYPE)
    if STORE_GRAD:
        grad = _normalised_grad(G, x, ix, r, tl.load(scale_ptr).to(ACC_DTYPE), EPS, ADD_EPS, ACC_DTYPE)
        tl.store(grad_x_ptr + rows64[:, None] * D + offs_d[None, :], grad.to(grad_x_ptr.dtype.element_ty), mask=mask_nd)
    if NEED_SCALE:
        # of x ix (entries in [-1, 1]): x * G itself overflows fp32 for |x| ~ 1e37 (the tests' aligned gradients)
        tl.store(partial_ptr + pid_d.to(tl.int64) * N + offs_n, tl.sum((x * ix[:, None]) * G, axis=1), mask=mask_n)


@triton.jit
def _grad_p_kernel(
    g_ptr, out_ptr, x_ptr, p_ptr, ix_ptr, ip_ptr, scale_ptr, grad_p_ptr,
    N, C, D,
    stride_gn, stride_gc, stride_on, stride_oc, stride_xn, stride_xd, stride_pc, stride_pd,
    EPS: tl.constexpr, ADD_EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    H = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC_DTYPE)
    q = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows64 = offs_n.to(tl.int64)
        mask_nc = mask_n[:, None] & mask_c[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_gn + offs_c[None, :] * stride_gc, mask=mask_nc, other=0.0)
        out = tl.load(out_ptr + rows64[:, None] * stride_on + offs_c[None, :] * stride_oc, mask=mask_nc, other=0.0)
        q += tl.sum(g.to(ACC_DTYPE) * out.to(ACC_DTYPE), axis=0)
        ix = tl.load(ix_ptr + offs_n, mask=mask_n, other=0.0)
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xn + offs_d[None, :] * stride_xd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        x_hat = (x.to(ACC_DTYPE) * ix[:, None]).to(x_ptr.dtype.element_ty)
        H += mm(tl.trans(g.to(x_ptr.dtype.element_ty)), x_hat, ACC_DTYPE, DOT_PRECISION)
    ip = tl.load(ip_ptr + offs_c, mask=mask_c, other=0.0)
    mask_cd = mask_c[:, None] & mask_d[None, :]
    cols64 = offs_c.to(tl.int64)
    p = tl.load(p_ptr + cols64[:, None] * stride_pc + offs_d[None, :] * stride_pd, mask=mask_cd, other=0.0)
    p = p.to(ACC_DTYPE)
    grad = _normalised_grad(H, p, ip, q, tl.load(scale_ptr).to(ACC_DTYPE), EPS, ADD_EPS, ACC_DTYPE)
    tl.store(grad_p_ptr + cols64[:, None] * D + offs_d[None, :], grad.to(grad_p_ptr.dtype.element_ty), mask=mask_cd)


def _blocks(x: torch.Tensor, N: int, C: int, D: int, backward: bool = False):
    """(BLOCK_N, BLOCK_C, BLOCK_D) for programs of NUM_WARPS warps. The GPU audit (benchmarks/gpu_audit.md) finds
    no spills on sm_80/sm_90 with 64 x 64 x 32 tiles forward and 32 x 32 x 16 backward, whose kernels hold two
    (N, D)/(C, D) operand tiles and the (N, C) tile of g, out and their products; 64 x 64 x 32 backward spilled
    up to 4.3 KB per thread in fp32."""
    # fp64 multiplies (BLOCK_N, BLOCK_C, BLOCK_D) products in registers: smaller tiles on a GPU. The interpreter
    # runs each program as numpy calls, where bigger tiles only mean fewer calls.
    if x.dtype == torch.float64 and not (x.device.type == "cpu" and triton_interpreted()):
        return block_size(N, 16), block_size(C, 16), block_size(D, 16)
    if backward:
        return block_size(N, 32), block_size(C, 32), block_size(D, 16)
    return block_size(N, 64), block_size(C, 64), block_size(D, 32)


NUM_WARPS = 8


def plan_forward(x: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor, eps: float, eps_mode: int):
    """(out, x_inv_norm, p_inv_norm) and the launch that fills them."""
    N, D = x.shape
    C = protos.shape[0]
    acc_dtype = accumulator_dtype(x.dtype)
    out = torch.empty((N, C), dtype=x.dtype, device=x.device)
    x_inv_norm = torch.empty((N,), dtype=acc_dtype, device=x.device)
    p_inv_norm = torch.empty((C,), dtype=acc_dtype, device=x.device)
    block_n, block_c, block_d = _blocks(x, N, C, D)
    launch = Launch(
        _forward_kernel, (triton.cdiv(N, block_n), triton.cdiv(C, block_c)),
        (x, protos, scale.to(acc_dtype), out, x_inv_norm, p_inv_norm, N, C, D,
         *x.stride(), *protos.stride(), *out.stride()),
        dict(EPS=eps, ADD_EPS=eps_mode == EpsMode.ADD, ACC_DTYPE=tl_accumulator_dtype(x.dtype),
             DOT_PRECISION=dot_precision(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d),
        num_warps=NUM_WARPS, flops=2 * N * C * D,
    )
    return (out, x_inv_norm, p_inv_norm), [launch]


def forward(x: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor, eps: float, eps_mode: int):
    outputs, steps = plan_forward(x, protos, scale, eps, eps_mode)
    run(steps)
    return outputs


def plan_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    protos: torch.Tensor,
    out: torch.Tensor,
    x_inv_norm: torch.Tensor,
    p_inv_norm: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    eps_mode: int,
    output_mask,
):
    """(grad_x, grad_p, grad_scale) and the steps that fill them."""
    need_x, need_p, need_scale = (bool(m) for m in output_mask)
    N, D = x.shape
    C = protos.shape[0]
    acc_dtype = accumulator_dtype(x.dtype)
    block_n, block_c, block_d = _blocks(x, N, C, D, backward=True)
    d_blocks = triton.cdiv(D, block_d)
    scale_acc = scale.to(acc_dtype)
    common = dict(EPS=eps, ADD_EPS=eps_mode == EpsMode.ADD, ACC_DTYPE=tl_accumulator_dtype(x.dtype),
                  DOT_PRECISION=dot_precision(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d)
    strides = (*grad.stride(), *out.stride(), *x.stride(), *protos.stride())
    empty = x.new_empty((0,))
    grad_x = torch.empty((N, D), dtype=x.dtype, device=x.device) if need_x else empty
    grad_p = torch.empty((C, D), dtype=x.dtype, device=x.device) if need_p else empty
    grad_scale = scale.new_empty(() if need_scale else (0,))
    steps = []
    if need_x or need_scale:
        partial = torch.empty((d_blocks, N), dtype=acc_dtype, device=x.device) if need_scale else x_inv_norm
        steps.append(Launch(
            _grad_x_kernel, (triton.cdiv(N, block_n), d_blocks),
            (grad, out, x, protos, x_inv_norm, p_inv_norm, scale_acc, grad_x if need_x else x_inv_norm, partial,
             N, C, D, *strides),
            dict(STORE_GRAD=need_x, NEED_SCALE=need_scale, **common),
            num_warps=NUM_WARPS, flops=2 * N * C * D + 2 * N * C,
        ))
        if need_scale:
            steps.append(lambda: grad_scale.copy_(partial.sum()))
    if need_p:
        steps.append(Launch(
            _grad_p_kernel, (triton.cdiv(C, block_c), d_blocks),
            (grad, out, x, protos, x_inv_norm, p_inv_norm, scale_acc, grad_p, N, C, D, *strides),
            common,
            num_warps=NUM_WARPS, flops=2 * N * C * D + 2 * N * C,
        ))
    return (grad_x, grad_p, grad_scale), steps


def backward(grad, x, protos, out, x_inv_norm, p_inv_norm, scale, eps, eps_mode, output_mask):
    grads, steps = plan_backward(grad, x, protos, out, x_inv_norm, p_inv_norm, scale, eps, eps_mode, output_mask)
    run(steps)
    return grads
