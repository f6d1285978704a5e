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
