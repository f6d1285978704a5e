"""cosine_logits: scaled cosine similarity of features to class prototypes, normalisation fused into the matmul.

    ix[n]        = 1 / max(|x[n]|, eps)          ip[c] = 1 / max(|p[c]|, eps)  eps: an argument, 1e-8 default
                   eps_mode "add": ix[n] = 1 / (|x[n]| + eps), ip[c] = 1 / (|p[c]| + eps)
    out[n, c]    = scale * ix[n] * ip[c] * <x[n], p[c]>  = scale * cos(x[n], p[c])
                   (F.normalize(x, dim=-1, eps=1e-8) @ F.normalize(p, dim=-1, eps=1e-8).T * scale, the papers' code;
                   "add" is GEM-ZSL's base_module and PSVMA's compute_score, x / (x.norm(dim=-1, keepdim=True) + 1e-5))

Backward, g = dL/dout (N, C), cos = out / scale, [.] = 1 where |.| > eps (the clamped norm has no derivative):

    grad_x[n]    = scale * (ix[n] * sum_c g[n, c] ip[c] p[c]  -  [|x_n| > eps] x[n] ix[n]^2 sum_c g[n, c] cos[n, c])
    grad_p[c]    = scale * (ip[c] * sum_n g[n, c] ix[n] x[n]  -  [|p_c| > eps] p[c] ip[c]^2 sum_n g[n, c] cos[n, c])
    grad_scale   = sum_{n, c} g[n, c] cos[n, c]

eps_mode "add" (d/dx x / (|x| + eps) = ix * (I - x x^T / (|x| (|x| + eps))); no row is clamped):

    grad_x[n]    = scale * ix[n] * (sum_c g[n, c] ip[c] p[c]  -  x[n] / |x_n| * sum_c g[n, c] cos[n, c])
    grad_p[c]    alike; a zero row's second term is 0 (x = 0). |x_n| is read off the saved ix alone,
                   1 / |x_n| = ix / (1 - eps * ix) (csrc/inv_norm.h projection_coeff), so autograd keeps no more.

Shapes: x (..., D) features (flattened to (N, D) for the kernels, N = prod(...)), protos (C, D) class prototypes,
scale a Python float or a one-element tensor (a learnable temperature: it gets a gradient) -> out (..., C).
The kernels never write normalised copies of x or protos to keep for the backward: autograd keeps x, protos, the
inverse norms ix (N,) and ip (C,) (float, double for double inputs), and, for the Triton backward, out (N, C).

    "cpu"     at::mm (MKL/OpenBLAS) + fused epilogues in C++ (csrc/cpu/cosine_logits.cpp)
    "cuda"    cuBLAS through at::mm + small epilogue kernels (csrc/cuda/cosine_logits.cu)
    "triton"  one fused kernel for the forward (norms accumulated in the matmul's D loop), two for the backward
              (zslfast/triton/cosine_logits.py); reads out instead of repeating the forward's D loop
The default GPU backend is Triton, except in fp64, where tl.dot cannot run and cuBLAS's DGEMM wins. sum(g * cos)
is never taken as sum(g * out) / scale, so scale == 0 works (grad_x = grad_p = 0, grad_scale = sum(g * cos)).
|x| and |p| never overflow: where a sum of squares is inf (|v| beyond ~1.8e19 in float32, where
F.normalize returns 0) every backend takes the norm again as m * |v / m|, m = max |v_d| (reference.vector_norm,
csrc/inv_norm.h, zslfast/triton/_common.py), and the backwards never form ix^2 (0 for |x| ~ 1e30) or ix * ip. The
CPU backend's results do not depend on the thread count (its GEMMs run in fixed single-threaded blocks).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import reference
from .._enums import choices
from ..validation import (
    accumulator_dtype, check_option, check_positive, check_same_device, check_scale, check_tensor, promote, shape_str,
)
from ._spec import OpSpec, compiled_kernel, define, triton_kernel

OP = "cosine_logits"
EPS = 1e-8  # F.normalize's eps in the papers' code


def _forward_fake(x, protos, scale, eps, eps_mode, backend):
    acc = accumulator_dtype(x.dtype)
    N, C = x.shape[0], protos.shape[0]
    return x.new_empty((N, C)), x.new_empty((N,), dtype=acc), x.new_empty((C,), dtype=acc)


def _backward_fake(grad, x, protos, out, x_inv_norm, p_inv_norm, scale, eps, eps_mode, output_mask, backend):
    # The kernels return contiguous gradients whatever the inputs' strides, hence new_empty, not empty_like.
    need_x, need_p, need_scale = output_mask
    return (
        x.new_empty(x.shape if need_x else (0,)),
        x.new_empty(protos.shape if need_p else (0,)),
        scale.new_empty(() if need_scale else (0,)),
    )


def _reference(x, protos, scale, eps, eps_mode):
    return reference.cosine_logits(x, protos, scale, eps, eps_mode), None, None


BACKWARD = define(OpSpec(
    name="cosine_logits_backward",
    schema="(Tensor grad, Tensor x, Tensor protos, Tensor? out, Tensor x_inv_norm, Tensor p_inv_norm, Tensor scale,"
    " float eps, str eps_mode, bool[3] output_mask, str backend) -> (Tensor, Tensor, Tensor)",
    kernels={
        "cpu": compiled_kernel("_cosine_logits_bwd"),
        "cuda": compiled_kernel("_cosine_logits_bwd"),
        "triton": triton_kernel("cosine_logits", "backward"),
    },
    fake=_backward_fake,
    autocast=None,
))


def _setup_context(ctx, inputs, output):
    x, protos, scale, eps, eps_mode, backend = inputs
    out, x_inv_norm, p_inv_norm = output
    ctx.mark_non_differentiable(x_inv_norm, p_inv_norm)
    # Only the Triton backward reads out (its tiles over D cannot reduce <x, G> over all of D); the C++ backends
    # would keep it alive for nothing.
    ctx.save_for_backward(x, protos, out if backend == "triton" else None, x_inv_norm, p_inv_norm, scale)
    ctx.eps, ctx.eps_mode, ctx.backend = eps, eps_mode, backend


def _backward(ctx, grad, _grad_x_inv_norm, _grad_p_inv_norm):
    x, protos, out, x_inv_norm, p_inv_norm, scale = ctx.saved_tensors
    output_mask = list(ctx.needs_input_grad[:3])
    grad_x, grad_p, grad_scale = BACKWARD(
        ctx.backend, grad, x, protos, out, x_inv_norm, p_inv_norm, scale, ctx.eps, ctx.eps_mode, output_mask
    )
    return (
        grad_x if output_mask[0] else None,
        grad_p if output_mask[1] else None,
        grad_scale if output_mask[2] else None,
        None,
        None,
        None,
    )


# Triton first in every dtype: its kernels pass the interpreter tests, the CUDA C++ ones have only compiled.
SPEC = define(OpSpec(
    name=OP,
    schema="(Tensor x, Tensor protos, Tensor scale, float eps, str eps_mode, str backend) -> (Tensor, Tensor, Tensor)",
    kernels={
        "cpu": compiled_kernel("_cosine_logits_fwd"),
        "cuda": compiled_kernel("_cosine_logits_fwd"),
        "triton": triton_kernel("cosine_logits", "forward"),
    },
    reference=_reference,
    gpu_preference=("triton", "cuda"),
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
    autocast="lower",
    autocast_keep=(2,),  # the temperature keeps its dtype: rounding it to bf16 would change the model
))


def cosine_logits(
    x: torch.Tensor,
    protos: torch.Tensor,
    scale: Union[float, torch.Tensor] = 1.0,
    *,
    eps: float = EPS,
    eps_mode: str = "clamp",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``scale * cos(x, protos[c])`` for every class c, normalising as ``F.normalize(., dim=-1, eps=eps)``
    (or, with ``eps_mode="add"``, as ``v / (|v| + eps)``).

    Args:
        x: (..., D) features, any number of leading dimensions.
        protos: (C, D) class prototypes.
        scale: a finite Python float > 0 (ValueError otherwise) or a one-element tensor (a learnable temperature:
            it receives its gradient; its value is not read).
        eps: the norms' clamp, ``max(|x|, eps)`` as F.normalize (default 1e-8, the papers' code), or what is
            added to them for ``eps_mode="add"``.
        eps_mode: "clamp" (default, F.normalize's ``x / max(|x|, eps)``) or "add" (``x / (|x| + eps)``, GEM-ZSL's
            base_module and PSVMA's compute_score, which use eps=1e-5). Both x and protos are normalised alike.
        backend: None (by device, or ``ZSLFAST_BACKEND``), "reference", "cpu", "triton" or "cuda".
    Returns:
        (..., C) logits in the common dtype of x and protos. Differentiable in x, protos and a tensor scale.
    """
    check_tensor(OP, "x", x, range(1, 1 << 16), "(..., D)")
    check_tensor(OP, "protos", protos, (2,), "(C, D)")
    D = x.shape[-1]
    C = protos.shape[0]
    if protos.shape[1] != D:
        raise ValueError(
            f"{OP}: protos (C, D) must have D={D} columns to match x (..., D) {shape_str(x)}, "
            f"got protos {shape_str(protos)}"
        )
    device = check_same_device(OP, x=x, protos=protos)
    check_scale(OP, "scale", scale, device)
    check_positive(OP, "eps", eps)
    check_option(OP, "eps_mode", eps_mode, choices("eps_mode"))
    x, protos = promote(x, protos)
    which = SPEC.resolve(backend, device)
    acc = accumulator_dtype(x.dtype)
    if isinstance(scale, torch.Tensor):
        scale_t = scale.reshape(()).to(device=device, dtype=acc)
    else:
        scale_t = torch.full((), float(scale), dtype=acc, device=device)
    out, _, _ = SPEC(which, x.reshape(-1, D), protos, scale_t, float(eps), eps_mode)
    return out.reshape(*x.shape[:-1], C)
