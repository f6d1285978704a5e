"""attention_rollout: attention aggregated across ViT layers (SVIP's patch pseudo-labels), CLS row in O(L·N²).

    attns     (L, B, H, N, N) tensor, or a sequence of L tensors (B, H, N, N), first layer first
    F^l       = fuse_h(A^l)                       (B, N, N), head_fusion "mean" | "sum" | "max" | "min"
    abnar     A'^l = (F^l + I) / rowsum(F^l + I)  (each row divided by its own sum), R = A'^L ... A'^1
              (Abnar & Zuidema 2020; SVIP's released code; Chefer et al.'s baseline: ``result = a @ result``)
    residual  W^1 = F^1, W^l = W^(l-1) + W^(l-1) F^l                                (SVIP paper Eq. 4)
    out       row 0 of R (or W^L): (B, N), index 0 included, when cls_only; else the full (B, N, N)
Layers before ``start_layer`` are skipped. Callers take ``out[:, 1:]`` (or ``[:, num_prefix_tokens:]``) for
the patch scores.

Row normalisation: vit-explain writes ``a / a.sum(dim=-1)`` without keepdim, which broadcasts the row sums
along the last axis, so for B=1 it divides *columns* by row sums, and for B>1 it fails. zslfast divides rows.

CLS row (``cls_only=True``, the registered op ``zslfast::attention_rollout_cls``): row 0 of a product of
matrices is a vector walked through them, ``v <- v M^l`` with ``v = e_0``, so no N x N product is ever formed:
abnar walks the layers from last to first with ``M = A'``; residual walks first to last with ``M^1 = F^1`` and
``M^l = I + F^l``. Head fusion, identity and normalisation happen as each map is read, once (O(L·H·N²) reads,
O(B·N) writes), in C++ (CPU) or Triton (GPU). The vectors entering each step, states (L, B, N), are saved;
the backward walks the steps in reverse with PyTorch ops, one layer's (B, N, N) at a time:

    grad_v_in = M g,   grad_M[i, j] = v_in[i] g[j]
    abnar:     grad_F[i, j] = v_in[i] / r_i * (g[j] - (M g)[i]),   r_i = 1 + sum_j F[i, j]
    residual:  grad_F[i, j] = v_in[i] g[j]
    fusion:    mean -> grad_F / H to every head, sum -> grad_F, max/min -> grad_F to the selected head

Full matrix (``cls_only=False``): batched GEMMs (torch.bmm) layer by layer, the reference's own code.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _backend, reference
from ._common import LIB, accumulator_dtype, promote, shape_str

OP = "attention_rollout"
# Positions are the ids the C++ and Triton kernels take (csrc/ops.cpp): keep the order.
MODES = ("abnar", "residual")
FUSIONS = ("mean", "sum", "max", "min")
_BACKENDS = ("reference", "cpu", "triton")

LIB.define("attention_rollout_cls(Tensor[] attns, str mode, str head_fusion, str backend) -> (Tensor, Tensor)")


def _forward_kernel(attns, mode, head_fusion, backend):
    if backend == "triton":
        from ..triton import attention_rollout as triton_kernels

        return triton_kernels.forward(list(attns), mode, FUSIONS.index(head_fusion))
    return torch.ops.zslfast._attention_rollout_cls_fwd(attns, MODES.index(mode), FUSIONS.index(head_fusion))


for _key in ("CPU", "CUDA"):
    LIB.impl("attention_rollout_cls", _forward_kernel, _key)


@torch.library.register_fake("zslfast::attention_rollout_cls", lib=LIB)
def _forward_fake(attns, mode, head_fusion, backend):
    L = len(attns)
    B, _, N, _ = attns[0].shape
    return attns[0].new_empty((B, N)), attns[0].new_empty((L, B, N), dtype=accumulator_dtype(attns[0].dtype))


def _setup_context(ctx, inputs, output):
    attns, mode, head_fusion, _ = inputs
    ctx.save_for_backward(*attns, output[1])
    ctx.mode, ctx.head_fusion = mode, head_fusion
    ctx.mark_non_differentiable(output[1])


def _fuse_with_index(a: torch.Tensor, head_fusion: str):
    if head_fusion == "max":
        return a.max(dim=1)
    if head_fusion == "min":
        return a.min(dim=1)
    return reference.fuse_heads(a, head_fusion), None


def _unfuse(grad_fused: torch.Tensor, index, head_fusion: str, like: torch.Tensor) -> torch.Tensor:
    """Gradient of the head fusion: (B, N, N) -> (B, H, N, N)."""
    B, H, N, _ = like.shape
    if head_fusion in ("max", "min"):
        grad = torch.zeros((B, H, N, N), dtype=grad_fused.dtype, device=grad_fused.device)
        return grad.scatter_(1, index[:, None], grad_fused[:, None]).to(like.dtype)
    if head_fusion == "mean":
        grad_fused = grad_fused / H
    return grad_fused[:, None].expand(B, H, N, N).to(like.dtype)


def _backward(ctx, grad_out, _grad_states):
    *attns, states = ctx.saved_tensors
    L = len(attns)
    abnar = ctx.mode == "abnar"
    g = grad_out.to(states.dtype)
    grads = [None] * L
    for l in (range(L) if abnar else range(L - 1, -1, -1)):  # the forward's steps in reverse
        fused, index = _fuse_with_index(attns[l].to(states.dtype), ctx.head_fusion)
        v_in = states[l]
        f_g = torch.bmm(fused, g[:, :, None]).squeeze(-1)
        if abnar:
            r = fused.sum(-1) + 1
            m_g = (f_g + g) / r
            grad_fused = (v_in / r)[:, :, None] * (g[:, None, :] - m_g[:, :, None])
            g = m_g
        else:
            grad_fused = v_in[:, :, None] * g[:, None, :]
            g = f_g + g if l > 0 else f_g
        grads[l] = _unfuse(grad_fused, index, ctx.head_fusion, attns[l])
    return grads, None, None, None


torch.library.register_autograd("zslfast::attention_rollout_cls", _backward, setup_context=_setup_context, lib=LIB)


def _check_layers(attns) -> list[torch.Tensor]:
    if isinstance(attns, torch.Tensor):
        if attns.dim() != 5:
            raise ValueError(
                f"{OP}: attns must be (L, B, H, N, N) or a sequence of L tensors (B, H, N, N), "
                f"got a {attns.dim()}-D tensor of shape {shape_str(attns)}"
            )
        layers = list(attns.unbind(0))
    elif isinstance(attns, (list, tuple)):
        layers = list(attns)
    else:
        raise TypeError(f"{OP}: attns must be a tensor (L, B, H, N, N) or a list of tensors (B, H, N, N), got {type(attns).__name__}")
    if not layers:
        raise ValueError(f"{OP}: attns holds no layers")
    for l, a in enumerate(layers):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{OP}: attns[{l}] must be a tensor (B, H, N, N), got {type(a).__name__}")
        if not a.is_floating_point():
            raise TypeError(f"{OP}: attns[{l}] must be a floating-point tensor (B, H, N, N), got dtype {a.dtype}")
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"{OP}: attns[{l}] must be (B, H, N, N) with square maps, got shape {shape_str(a)}")
        if 0 in a.shape:
            raise ValueError(f"{OP}: attns[{l}] (B, H, N, N) is empty, got shape {shape_str(a)}")
        if a.shape != layers[0].shape:
            raise ValueError(
                f"{OP}: every layer must have the same (B, H, N, N); attns[{l}] has {shape_str(a)} but attns[0] has "
                f"{shape_str(layers[0])}"
            )
        if a.device != layers[0].device:
            raise ValueError(f"{OP}: every layer must be on one device; attns[{l}] is on {a.device}, attns[0] on {layers[0].device}")
    return layers


def attention_rollout(
    attns: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    mode: str = "abnar",
    head_fusion: str = "mean",
    start_layer: int = 0,
    cls_only: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention rollout across ViT layers (see the module docstring for the math).

    Args:
        attns: (L, B, H, N, N), or a sequence of L tensors (B, H, N, N) as hooks collect them, first layer first.
        mode: "abnar" (rownorm(fuse(A) + I), left-multiplied) or "residual" (SVIP Eq. 4).
        head_fusion: "mean", "sum", "max" or "min" over the heads.
        start_layer: layers before it are skipped.
        cls_only: return row 0, (B, N), computed as a vector chain in O(L·N²); else the full (B, N, N).
        backend: None (by device, or ZSLFAST_BACKEND), "reference", "cpu" or "triton".
    Returns:
        (B, N) or (B, N, N) in the maps' dtype, differentiable with respect to every map.
    """
    layers = _check_layers(attns)
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {MODES}, got {mode!r}")
    if head_fusion not in FUSIONS:
        raise ValueError(f"{OP}: head_fusion must be one of {FUSIONS}, got {head_fusion!r}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < len(layers):
        raise ValueError(f"{OP}: start_layer must be an int in [0, L={len(layers)}), got {start_layer!r}")
    layers = promote(*layers[start_layer:])
    which = _backend.resolve(OP, backend, layers[0].device, gpu_preference=("triton",), supported=_BACKENDS)
    if which == "reference" or not cls_only:
        return reference.attention_rollout(layers, mode, head_fusion, 0, cls_only)
    out, _ = torch.ops.zslfast.attention_rollout_cls(layers, mode, head_fusion, which)
    return out
