"""Pure-PyTorch oracles: the math of every zslfast op, written the plain way the papers' code writes it.

Tests compare every backend's outputs and gradients against these. They materialise what the fused kernels
avoid (S_W, normalised copies, ...), so they are the memory/speed baseline too. Autograd is PyTorch's own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def prototype_scores(e: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ILPG Eq. 5-6 logits: ``logits[b, c] = sum_k e[b, k] * S_W[b, c, k]`` with ``S_W = w * s + s``.

    e (B, K) attribute scores, s (C, K) class semantics, w None, (B, K) or (B, C, K) -> (B, C).
    """
    if w is None:
        return e @ s.T
    if w.dim() == 2:
        w = w[:, None, :]
    sw = w * s + s  # (B, C, K): S_W materialised, as in ILPG's code
    return (e[:, None, :] * sw).sum(-1)


def prototype_scores_factored(
    e: torch.Tensor, s: torch.Tensor, h: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """prototype_scores with ``w[b, c, k] = sum_j h[b, j] * u[j, c, k] (+ bias[c, k])`` (the generator's last layer).

    e (B, K), s (C, K), h (B, J), u (J, C, K), bias None or (C, K) -> (B, C). Materialises w (B, C, K).
    """
    w = torch.einsum("bj,jck->bck", h, u)
    if bias is not None:
        w = w + bias
    return prototype_scores(e, s, w)


def cosine_logits(x: torch.Tensor, protos: torch.Tensor, scale=1.0) -> torch.Tensor:
    """``scale * cos(x, protos[c])``: x (..., D), protos (C, D) -> (..., C), normalising as F.normalize(eps=1e-8)."""
    return scale * (F.normalize(x, dim=-1, eps=1e-8) @ F.normalize(protos, dim=-1, eps=1e-8).T)


def fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N): mean, sum, max or min over the heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "sum":
        return attn.sum(dim=1)
    if head_fusion == "max":
        return attn.max(dim=1).values
    if head_fusion == "min":
        return attn.min(dim=1).values
    raise ValueError(f"head_fusion must be 'mean', 'sum', 'max' or 'min', got {head_fusion!r}")


def attention_rollout(attns, mode: str = "abnar", head_fusion: str = "mean", start_layer: int = 0, cls_only: bool = True):
    """Attention rollout across ViT layers, the eager way (full (B, N, N) products, layer by layer).

    attns: (L, B, H, N, N) or a sequence of L tensors (B, H, N, N), first layer first.
    mode "abnar" (Abnar & Zuidema 2020, SVIP's released code): A'^l = rownorm(fuse(A^l) + I) with each row divided by
        its own sum, R = A'^L ... A'^1 (``result = a @ result``).
    mode "residual" (SVIP Eq. 4): T^l = fuse(A^l), W^1 = T^1, W^l = W^(l-1) + W^(l-1) T^l.
    Layers before ``start_layer`` are skipped. Returns R[:, 0] (B, N) when ``cls_only``, else R (B, N, N).
    """
    layers = list(attns)[start_layer:]
    if mode == "abnar":
        result = None
        for attn in layers:
            fused = fuse_heads(attn, head_fusion)
            a = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
            a = a / a.sum(dim=-1, keepdim=True)
            result = a if result is None else a @ result
    elif mode == "residual":
        result = None
        for attn in layers:
            t = fuse_heads(attn, head_fusion)
            result = t if result is None else result + result @ t
    else:
        raise ValueError(f"mode must be 'abnar' or 'residual', got {mode!r}")
    return result[:, 0] if cls_only else result
