"""AttributeCrossAttention: ILPG's attribute-visual localisation (AVL, Eq. 2-4) as a module over
zslfast.attribute_attention.

    q = W_q(attributes)   (K, dim) or (B, K, dim)      attributes: (K, dim_attr) word vectors (GloVe: 300)
    k = W_k(regions)      (B, R, dim)                   regions: (B, R, dim_visual) features (ResNet101 7x7: 49 x 2048)
    v = W_v(regions)      (B, R, dim_attr)              V maps to the attributes' width: E is compared with them
    E = softmax(act(q k^T) / sqrt(dim)) v               (B, K, dim_attr); the softmax over the regions, or over the
                                                        attributes (softmax_over="queries"); act: logit_activation
    out = cos(E[b, i], ref[i])                          (B, K), ref = attributes unless given; score="dot" -> <E, ref>;
                                                        score=None -> E
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._enums import choices
from ..ops.attribute_attention import attribute_attention
from ..validation import check_flag, check_int, check_option, check_tensor, check_width, shape_str


class AttributeCrossAttention(nn.Module):
    """Attribute word vectors + region features -> (B, K) attribute scores (ILPG AVL), one fused op.

    Args:
        dim_visual: width of the region features.  dim_attr: width of the attribute vectors (and of E).
        dim: width of the query/key projections.  score: "cosine", "dot" or None (return E).
        bias: whether W_q, W_k, W_v have biases.  backend: passed to zslfast.attribute_attention.
        softmax_over, logit_activation: zslfast.attribute_attention's ("keys" | "queries", None | "relu").
    """

    def __init__(self, dim_visual: int, dim_attr: int, dim: int, score: Optional[str] = "cosine", *,
                 bias: bool = False, backend: Optional[str] = None, softmax_over: str = "keys",
                 logit_activation: Optional[str] = None):
        super().__init__()
        for name, value in (("dim_visual", dim_visual), ("dim_attr", dim_attr), ("dim", dim)):
            check_int("AttributeCrossAttention", name, value)
        check_flag("AttributeCrossAttention", "bias", bias)
        check_option("AttributeCrossAttention", "score", score, ("cosine", "dot", None))
        check_option("AttributeCrossAttention", "softmax_over", softmax_over, choices("softmax_over"))
        check_option("AttributeCrossAttention", "logit_activation", logit_activation, choices("logit_activation"))
        self.softmax_over, self.logit_activation = softmax_over, logit_activation
        self.W_q = nn.Linear(dim_attr, dim, bias=bias)
        self.W_k = nn.Linear(dim_visual, dim, bias=bias)
        self.W_v = nn.Linear(dim_visual, dim_attr, bias=bias)
        self.score = score
        self.backend = backend

    def forward(self, regions: torch.Tensor, attributes: torch.Tensor, *, ref: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, return_attention: bool = False,
                return_max: Optional[str] = None):
        """regions (B, R, dim_visual), attributes (K, dim_attr) or (B, K, dim_attr), ref (defaults to attributes)
        (K, dim_attr) or (B, K, dim_attr), mask (B, R) bool -> (B, K) scores, or E (B, K, dim_attr) for score None;
        with return_attention also the (B, K, R) attention, with return_max ("attention" | "logits") the (B, K)
        max over the regions (zslfast.attribute_attention's order: out, attention, max)."""
        fn, attributes_layout = "AttributeCrossAttention", "(K, dim_attr) or (B, K, dim_attr)"
        check_tensor(fn, "regions", regions, (3,), "(B, R, dim_visual)")
        check_width(fn, "regions", regions, self.W_k.in_features, "(B, R, dim_visual)", "dim_visual")
        check_tensor(fn, "attributes", attributes, (2, 3), attributes_layout)
        check_width(fn, "attributes", attributes, self.W_q.in_features, attributes_layout, "dim_attr")
        if attributes.dim() == 3 and attributes.shape[0] != regions.shape[0]:
            raise ValueError(f"{fn}: per-sample attributes (B, K, dim_attr) must have regions' batch size "
                             f"B={regions.shape[0]}, got attributes {shape_str(attributes)}")
        q = self.W_q(attributes)
        k = self.W_k(regions)
        v = self.W_v(regions)
        return attribute_attention(
            q, k, v, attributes if ref is None else ref, mask=mask, score=self.score,
            return_attention=return_attention, softmax_over=self.softmax_over,
            logit_activation=self.logit_activation, return_max=return_max, backend=self.backend,
        )
