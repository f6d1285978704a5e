"""prototype_scores: ILPG's instance-driven prototypes scored by row-wise dot-sum (ILPG Eq. 5-6).

    S_W[b, c, k]  = w[b, c, k] * s[c, k] + s[c, k]                  (Eq. 5, never materialised)
    logits[b, c]  = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])      (Eq. 6's <E~, S_W^(c)>)

Shapes: e (B, K) attribute scores (ILPG's E~), s (C, K) class semantic matrix, w None, (B, K) (one weight per
instance and attribute, shared by all classes) or (B, C, K) (one per instance, class and attribute) -> (B, C).

    w None      logits = e @ s.T                     one GEMM: every backend runs torch.matmul (cuBLAS/MKL win)
    w (B, K)    logits = (e * (1 + w)) @ s.T         likewise
    w (B, C, K) the registered op zslfast::prototype_scores: bound by reading w, so the forward reads w once and
                the backward reads w once and writes grad_w once, reducing grad_e and grad_s in a fixed order
                (deterministic) without any (B, C, K) temporary.

prototype_scores_factored: the same logits with w[b, c, k] = sum_j h[b, j] u[j, c, k] (+ bias[c, k]), ILPG's
instance semantic generator's last linear layer fused in. Then

    logits = e @ (s * (1 + bias)).T + P @ V,   P[b, (j, k)] = h[b, j] e[b, k],   V[(j, k), c] = u[j, c, k] s[c, k]

a GEMM of B x (J*K) x C that never forms w; V is built in chunks of j (at most ~64 Mi elements at a time), so
memory stays O(B*C + B*J*K + J*C*K) even at ImageNet-21K scale (C = 21841). When B <= J, w (B, C, K) is no
larger than u, so the op forms it with one GEMM and runs the single-pass w kernel instead (same memory bound).
Shapes: h (B, J), u (J, C, K), bias None or (C, K).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..validation import check_same_device, check_tensor, promote, shape_str
from ._spec import OpSpec, compiled_kernel, define, triton_kernel

OP = "prototype_scores"


def _forward_fake(e, s, w, backend):
    return e.new_empty((e.shape[0], s.shape[0]))


def _backward_fake(grad, e, s, w, output_mask, backend):
    need_e, need_s, need_w = output_mask
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in ((e, need_e), (s, need_s), (w, need_w)))


BACKWARD = define(OpSpec(
    name="prototype_scores_backward",
    schema="(Tensor grad, Tensor e, Tensor s, Tensor w, bool[3] output_mask, str backend) -> (Tensor, Tensor, Tensor)",
    kernels={
        "cpu": compiled_kernel("_prototype_scores_bwd"),
        "cuda": compiled_kernel("_prototype_scores_bwd"),
        "triton": triton_kernel("prototype_scores", "backward"),
    },
    fake=_backward_fake,
    autocast=None,
))


def _setup_context(ctx, inputs, output):
    e, s, w, backend = inputs
    ctx.save_for_backward(e, s, w)
    ctx.backend = backend


def _backward(ctx, grad):
    e, s, w = ctx.saved_tensors
    output_mask = list(ctx.needs_input_grad[:3])
    grads = BACKWARD(ctx.backend, grad, e, s, w, output_mask)
    return (*(g if need else None for g, need in zip(grads, output_mask)), None)


SPEC = define(OpSpec(
    name=OP,
    schema="(Tensor e, Tensor s, Tensor w, str backend) -> Tensor",
    kernels={
        "cpu": compiled_kernel("_prototype_scores_fwd"),
        "cuda": compiled_kernel("_prototype_scores_fwd"),
        "triton": triton_kernel("prototype_scores", "forward"),
    },
    reference=lambda e, s, w: reference.prototype_scores(e, s, w),
    gpu_preference=("triton", "cuda"),
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
    autocast="lower",
))


def _check_e_s(op: str, e, s) -> None:
    check_tensor(op, "e", e, (2,), "(B, K)")
    check_tensor(op, "s", s, (2,), "(C, K)")
    if s.shape[1] != e.shape[1]:
        raise ValueError(f"{op}: s (C, K) must have K={e.shape[1]} columns to match e (B, K) {shape_str(e)}, got s {shape_str(s)}")


def prototype_scores(
    e: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
) -> torch.Tensor:
    """ILPG logits ``logits[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])`` without forming S_W = w*s + s.

    Args:
        e: (B, K) attribute scores.
        s: (C, K) class semantic matrix.
        w: None, (B, K) or (B, C, K) instance-driven weights.
        backend: None (by device, or ``ZSLFAST_BACKEND``), "reference", "cpu", "triton" or "cuda".
    Returns:
        (B, C) logits. Differentiable in e, s and w.
    """
    _check_e_s(OP, e, s)
    B, K = e.shape
    C = s.shape[0]
    if w is not None:
        check_tensor(OP, "w", w, (2, 3), "(B, K) or (B, C, K)")
        expected = (B, K) if w.dim() == 2 else (B, C, K)
        if tuple(w.shape) != expected:
            raise ValueError(
                f"{OP}: w must be {'(B, K)' if w.dim() == 2 else '(B, C, K)'}={expected} for e {shape_str(e)} and "
                f"s {shape_str(s)}, got w {shape_str(w)}"
            )
    device = check_same_device(OP, e=e, s=s, w=w)
    e, s, w = promote(e, s, w)
    which = SPEC.resolve(backend, device)
    if which != "reference" and (w is None or w.dim() == 2):
        # One GEMM without a (B, C, K) w: every kernel backend runs it as torch.matmul (cuBLAS/MKL win).
        return e @ s.T if w is None else (e + e * w) @ s.T
    return SPEC(which, e, s, w)


# ----------------------------------------------------------------------------------------------------------------
# Factored weights: w = h @ u (+ bias), fused as GEMMs. One composite implementation serves every device.

_CHUNK_ELEMENTS = 1 << 26  # elements of V built at once (256 MiB in fp32)


def _j_chunks(J: int, C: int, K: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, C * K))
    return [(j0, min(J, j0 + step)) for j0 in range(0, J, step)]


def _v_chunk(u, s, j0, j1):
    """V[j, k, c] = u[j, c, k] * s[c, k] for j in [j0, j1), laid out (j1 - j0, K, C) so it reshapes to a GEMM operand."""
    out = torch.empty((j1 - j0, u.shape[2], u.shape[1]), dtype=u.dtype, device=u.device)
    torch.mul(u[j0:j1].transpose(1, 2), s.T, out=out)
    return out


def _factored_forward(e, s, h, u, bias):
    B, K = e.shape
    J, C, _ = u.shape
    static = s if bias is None else s + s * bias
    logits = e @ static.T
    for j0, j1 in _j_chunks(J, C, K):
        p = (h[:, j0:j1, None] * e[:, None, :]).reshape(B, (j1 - j0) * K)
        logits.addmm_(p, _v_chunk(u, s, j0, j1).reshape((j1 - j0) * K, C))
    return logits


def _factored_backward(grad, e, s, h, u, bias):
    B, K = e.shape
    J, C, _ = u.shape
    grad = grad.to(e.dtype)
    static = s if bias is None else s + s * bias
    grad_e = grad @ static
    grad_static = grad.T @ e
    grad_s = grad_static if bias is None else grad_static + grad_static * bias
    grad_bias = grad_static * s if bias is not None else e.new_empty((0,))
    grad_h = torch.empty_like(h)
    grad_u = torch.empty_like(u)
    for j0, j1 in _j_chunks(J, C, K):
        jc = j1 - j0
        v = _v_chunk(u, s, j0, j1)
        grad_p = (grad @ v.reshape(jc * K, C).T).reshape(B, jc, K)
        grad_e += torch.einsum("bjk,bj->bk", grad_p, h[:, j0:j1])
        grad_h[:, j0:j1] = torch.einsum("bjk,bk->bj", grad_p, e)
        p = (h[:, j0:j1, None] * e[:, None, :]).reshape(B, jc * K)
        grad_v = (p.T @ grad).reshape(jc, K, C)
        grad_u[j0:j1] = (grad_v * s.T).transpose(1, 2)
        grad_s += (grad_v * u[j0:j1].transpose(1, 2)).sum(0).T
    return grad_e, grad_s, grad_h, grad_u, grad_bias


def _factored_forward_fake(e, s, h, u, bias):
    return e.new_empty((e.shape[0], s.shape[0]))


def _factored_backward_fake(grad, e, s, h, u, bias):
    grad_bias = torch.empty_like(bias) if bias is not None else e.new_empty((0,))
    return torch.empty_like(e), torch.empty_like(s), torch.empty_like(h), torch.empty_like(u), grad_bias


FACTORED_BACKWARD = define(OpSpec(
    name="prototype_scores_factored_backward",
    schema="(Tensor grad, Tensor e, Tensor s, Tensor h, Tensor u, Tensor? bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    kernels={},
    composite=_factored_backward,
    fake=_factored_backward_fake,
    autocast=None,
))


def _factored_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _factored_autograd_backward(ctx, grad):
    e, s, h, u, bias = ctx.saved_tensors
    grads = FACTORED_BACKWARD.op(grad, e, s, h, u, bias)
    needs = ctx.needs_input_grad
    return tuple(g if (needs[i] and (i < 4 or bias is not None)) else None for i, g in enumerate(grads))


FACTORED = define(OpSpec(
    name="prototype_scores_factored",
    schema="(Tensor e, Tensor s, Tensor h, Tensor u, Tensor? bias) -> Tensor",
    kernels={},
    composite=_factored_forward,
    reference=lambda e, s, h, u, bias: reference.prototype_scores_factored(e, s, h, u, bias),
    fake=_factored_forward_fake,
    backward=_factored_autograd_backward,
    setup_context=_factored_setup_context,
    autocast="lower",
))


def prototype_scores_factored(
    e: torch.Tensor,
    s: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """prototype_scores with ``w[b, c, k] = sum_j h[b, j] * u[j, c, k] (+ bias[c, k])``, never forming w.

    Args:
        e: (B, K) attribute scores. s: (C, K) class semantics.
        h: (B, J) hidden features of the instance semantic generator; u: (J, C, K) its last layer's weight
        (``nn.Linear(J, C*K).weight.T.reshape(J, C, K)``); bias: None or (C, K).
        backend: "reference" materialises w; any other backend (or None) runs the fused GEMM form.
    Returns:
        (B, C) logits, differentiable in e, s, h, u and bias.
    """
    op = "prototype_scores_factored"
    _check_e_s(op, e, s)
    check_tensor(op, "h", h, (2,), "(B, J)")
    check_tensor(op, "u", u, (3,), "(J, C, K)")
    B, K = e.shape
    C = s.shape[0]
    if h.shape[0] != B:
        raise ValueError(f"{op}: h (B, J) must have B={B} rows to match e {shape_str(e)}, got h {shape_str(h)}")
    J = h.shape[1]
    if tuple(u.shape) != (J, C, K):
        raise ValueError(
            f"{op}: u must be (J, C, K)={(J, C, K)} for h {shape_str(h)}, s {shape_str(s)}, e {shape_str(e)}, got u {shape_str(u)}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, (2,), "(C, K)")
        if tuple(bias.shape) != (C, K):
            raise ValueError(f"{op}: bias must be (C, K)={(C, K)}, got bias {shape_str(bias)}")
    device = check_same_device(op, e=e, s=s, h=h, u=u, bias=bias)
    e, s, h, u, bias = promote(e, s, h, u, bias)
    which = FACTORED.resolve(backend, device)
    if B <= J and which != "reference":
        # w (B, C, K) is no larger than u (J, C, K) here, so forming it keeps the O(J*C*K) memory bound, and the
        # single-pass w kernel beats building V (J, K, C) and its gradient: one GEMM for w, then the fused op.
        w = (h @ u.reshape(J, C * K)).reshape(B, C, K)
        if bias is not None:
            w = w + bias
        return SPEC(which, e, s, w)  # both ops run on every backend: ``which`` serves the w kernel too
    return FACTORED(which, e, s, h, u, bias)
