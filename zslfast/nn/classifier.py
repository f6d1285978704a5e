"""CosineClassifier: the cosine classifier head of most ZSL models, over zslfast.cosine_logits.

    logits[n, c] = scale * <x[n], p[c]> / (max(|x[n]|, 1e-8) * max(|p[c]|, 1e-8))
                   eps_mode="add": scale * <x[n], p[c]> / ((|x[n]| + eps) * (|p[c]| + eps))  (GEM-ZSL, PSVMA)

Shapes: x (..., dim) features; prototypes p (C, dim), either learnable (``num_classes``), fixed
(``class_embeddings``, a buffer: the projected attribute vectors of seen and unseen classes) or passed per call
(``forward(x, prototypes)``: prototypes produced by a semantic-to-visual mapping each step) -> (..., C).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._enums import choices
from ..ops.cosine_logits import EPS, cosine_logits
from ..validation import check_int, check_option, check_positive, check_tensor, check_width


class CosineClassifier(nn.Module):
    """``scale * cos(x, prototypes)``, normalisation fused into the matmul (one kernel forward, one backward).

    Args:
        dim: feature width D.
        num_classes: C learnable prototypes (initialised like nn.Linear's weight); or
        class_embeddings: a fixed (C, D) matrix (registered as a buffer, moved by ``.to()``, not trained).
        scale: the temperature; ``learnable_scale=True`` makes it a parameter (log-parametrised, stays positive).
        eps, eps_mode: the normalisation, as ``zslfast.cosine_logits``'s: "clamp" (default, F.normalize's
            ``x / max(|x|, eps)``, eps 1e-8) or "add" (GEM-ZSL's and PSVMA's ``x / (|x| + eps)``, which use 1e-5).
        backend: None (by device), "reference" (plain PyTorch) or a kernel backend; see ``zslfast.cosine_logits``.
    """

    def __init__(
        self,
        dim: int,
        num_classes: Optional[int] = None,
        *,
        class_embeddings: Optional[torch.Tensor] = None,
        scale: float = 16.0,
        learnable_scale: bool = False,
        eps: float = EPS,
        eps_mode: str = "clamp",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if (num_classes is None) == (class_embeddings is None):
            raise ValueError("CosineClassifier: give exactly one of num_classes (learnable) or class_embeddings (fixed)")
        self.dim = check_int("CosineClassifier", "dim", dim)
        self.backend = backend
        # Checked here, so a bad setting fails at construction rather than at the first forward.
        self.eps = check_positive("CosineClassifier", "eps", eps)
        check_option("CosineClassifier", "eps_mode", eps_mode, choices("eps_mode"))
        self.eps_mode = eps_mode
        if class_embeddings is not None:
            check_tensor("CosineClassifier", "class_embeddings", class_embeddings, (2,), "(C, dim)")
            check_width("CosineClassifier", "class_embeddings", class_embeddings, dim, "(C, dim)", "dim")
            self.register_buffer("prototypes", class_embeddings.detach().clone())
        else:
            weight = torch.empty(check_int("CosineClassifier", "num_classes", num_classes), dim)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.prototypes = nn.Parameter(weight)
        scale = check_positive("CosineClassifier", "scale", scale)
        if learnable_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.register_buffer("log_scale", torch.tensor(math.log(scale)), persistent=False)
        self._fixed_scale = None if learnable_scale else float(scale)

    @property
    def scale(self):
        return self._fixed_scale if self._fixed_scale is not None else self.log_scale.exp()

    def forward(self, x: torch.Tensor, prototypes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., dim) -> (..., C) logits; ``prototypes`` (C, dim) replaces the module's own for this call."""
        check_tensor("CosineClassifier", "x", x, range(1, 1 << 16), "(..., dim)")
        check_width("CosineClassifier", "x", x, self.dim, "(..., dim)", "dim")
        if prototypes is not None:
            check_tensor("CosineClassifier", "prototypes", prototypes, (2,), "(C, dim)")
            check_width("CosineClassifier", "prototypes", prototypes, self.dim, "(C, dim)", "dim")
        protos = self.prototypes if prototypes is None else prototypes
        return cosine_logits(x, protos, self.scale, eps=self.eps, eps_mode=self.eps_mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.prototypes.shape[0]}, scale={self.scale}, eps={self.eps}, eps_mode={self.eps_mode!r}, backend={self.backend}"
