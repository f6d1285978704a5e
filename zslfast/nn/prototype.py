"""InstancePrototypeClassifier: ILPG's IDPP + APC (Eq. 5-6), an instance semantic generator scored by prototype_scores.

    hidden = act(g @ W1 + b1)                         the instance semantic generator h(g), (B, J)
    w      = hidden @ U + bias                        ILPG's personalised weights W, one of three forms:
        "full"       (B, C, K)  one weight per instance, class and attribute (Eq. 5's W ⊙ S read per class)
        "attribute"  (B, K)     one weight per instance and attribute, shared by all classes (the size of
                                ILPG's Table 3; zslfast.models.ilpg states the contradiction)
        "factored"   (B, C, K)  the same model as "full", but w is never formed: the last layer is fused into
                                zslfast.prototype_scores_factored (logits = GEMMs over (h ⊗ e) and U ⊙ S)
    logits[b, c] = <e[b], S_W[b, c]>,  S_W[b, c] = w[b, c] ⊙ s[c] + s[c]   (Eq. 5-6, S_W never materialised)

Shapes: e (B, K) attribute scores (ILPG's Ẽ), g (B, Dg) instance signatures (DINOv2 CLS), s (C, K) class
semantic matrix -> logits (B, C). ``label_weights(hidden, labels, weights)`` gives w[b, labels[b]] (B, K), all that
ILPG's VSR and PCR losses need: gathered from w where the forward formed it ("full": its backward adds B·K entries
to w's gradient), else from the label rows of the last layer ("factored", which never forms w; "attribute"). Taken
from the layer's weight rows instead, "full" would pay a zero-filled gradient of the whole (C·K, J) weight (128 MB
at CUB with J = 512) and its sum into the layer's gradient each step.

"full" and "factored" hold the same parameters (``last.weight`` (C*K, J), ``last.bias`` (C*K,)), so a checkpoint
moves between them; "factored" wins when B > J or C*K is large (ImageNet-21K scale), "full" when B ≤ J.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..ops.prototype_scores import prototype_scores, prototype_scores_factored
from ..validation import check_int, check_labels, check_option, check_tensor, check_width

WEIGHT_FORMS = ("full", "attribute", "factored")


class PrototypeScores(NamedTuple):
    logits: torch.Tensor  # (B, C)
    hidden: torch.Tensor  # (B, J), the generator's hidden features, for label_weights
    weights: Optional[torch.Tensor] = None  # w (B, C, K) where the forward formed it ("full"), for label_weights


class InstancePrototypeClassifier(nn.Module):
    """ILPG's instance semantic generator (a two-layer MLP, g -> W) and prototype classifier.

    Args:
        signature_dim: Dg, the width of g (384 for DINOv2 ViT-S/14).
        num_attributes: K. num_classes: C (needed by "full"/"factored": the last layer emits C*K weights).
        hidden_dim: J, the generator's hidden width.
        weights: "full", "attribute" or "factored" (module docstring).
        backend: None (by device) or "reference" (plain PyTorch: S_W materialised, as ILPG's code does).
    The last layer starts at zero, so training starts from the static prototypes (S_W = S), ILPG's fidelity path.
    """

    def __init__(
        self,
        signature_dim: int,
        num_attributes: int,
        num_classes: Optional[int] = None,
        *,
        hidden_dim: int = 512,
        weights: str = "full",
        backend: Optional[str] = None,
    ):
        super().__init__()
        fn = "InstancePrototypeClassifier"
        check_option(fn, "weights", weights, WEIGHT_FORMS)
        if weights != "attribute" and num_classes is None:
            raise ValueError(f"{fn}: weights={weights!r} needs num_classes")
        for name, value in (("signature_dim", signature_dim), ("num_attributes", num_attributes),
                            ("hidden_dim", hidden_dim)) + ((("num_classes", num_classes),) if num_classes else ()):
            check_int(fn, name, value)
        self.weights = weights
        self.num_attributes = num_attributes
        self.num_classes = num_classes
        self.backend = backend
        self.hidden = nn.Sequential(nn.Linear(signature_dim, hidden_dim), nn.ReLU())
        out = num_attributes if weights == "attribute" else num_classes * num_attributes
        self.last = nn.Linear(hidden_dim, out)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, e: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> PrototypeScores:
        """e (B, K), g (B, Dg), s (C, K) -> PrototypeScores(logits (B, C), hidden (B, J), w (B, C, K) for "full")."""
        fn, K = "InstancePrototypeClassifier", self.num_attributes
        for name, t, layout, dim, width in (("e", e, "(B, K)", "K", K), ("s", s, "(C, K)", "K", K),
                                            ("g", g, "(B, Dg)", "Dg", self.hidden[0].in_features)):
            check_tensor(fn, name, t, (2,), layout)
            check_width(fn, name, t, width, layout, dim)
        if g.shape[0] != e.shape[0]:
            raise ValueError(f"{fn}: g (B, Dg) must have B={e.shape[0]} rows, got {tuple(g.shape)}")
        if self.weights != "attribute" and tuple(s.shape) != (self.num_classes, K):
            raise ValueError(
                f"InstancePrototypeClassifier: s must be (C, K)={(self.num_classes, K)} for weights={self.weights!r}, "
                f"got {tuple(s.shape)}"
            )
        hidden = self.hidden(g)
        B, J = hidden.shape
        if self.weights == "attribute":
            w = self.last(hidden)
            return PrototypeScores(prototype_scores(e, s, w, backend=self.backend), hidden)
        C = self.num_classes
        if self.weights == "full":
            w = self.last(hidden).reshape(B, C, K)
            return PrototypeScores(prototype_scores(e, s, w, backend=self.backend), hidden, w)
        u = self.last.weight.T.reshape(J, C, K)
        bias = self.last.bias.reshape(C, K)
        return PrototypeScores(prototype_scores_factored(e, s, hidden, u, bias, backend=self.backend), hidden)

    def label_weights(self, hidden: torch.Tensor, labels: torch.Tensor,
                      weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """w[b, labels[b]] (B, K): gathered from ``weights`` (the forward's w (B, C, K), PrototypeScores.weights) when
        given, else from the hidden features and the label rows of the last layer only."""
        fn, K = "InstancePrototypeClassifier.label_weights", self.num_attributes
        check_tensor(fn, "hidden", hidden, (2,), "(B, J)")
        check_width(fn, "hidden", hidden, self.last.in_features, "(B, J)", "J")
        # "attribute" weights do not depend on the class: the labels' values are not read
        labels = check_labels(fn, "labels", labels, hidden.shape[0], self.num_classes or 0,
                              values=self.weights != "attribute")
        if self.weights == "attribute":
            return self.last(hidden)
        if weights is not None:
            expected = (hidden.shape[0], self.num_classes, K)
            if tuple(weights.shape) != expected:
                raise ValueError(f"{fn}: weights must be w (B, C, K) = {expected}, got {tuple(weights.shape)}")
            return weights[torch.arange(labels.shape[0], device=labels.device), labels]
        rows = (labels[:, None] * K + torch.arange(K, device=labels.device)).reshape(-1)  # (B*K,) output indices
        weight = self.last.weight.index_select(0, rows).reshape(labels.shape[0], K, -1)  # (B, K, J)
        bias = self.last.bias.index_select(0, rows).reshape(labels.shape[0], K)
        return torch.einsum("bkj,bj->bk", weight, hidden) + bias
