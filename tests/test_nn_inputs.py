"""zslfast.nn's modules (and ILPG, which feeds them) check every input against the dims they were built with, and
say which argument is off and both widths, before any layer runs: never torch's "mat1 and mat2 shapes cannot be
multiplied", an einsum error, an index error, or a message naming an op's internal argument (q, protos, w)."""

import pytest
import torch

from zslfast.models import ILPG
from zslfast.nn import AttributeCrossAttention, CosineClassifier, InstancePrototypeClassifier

g = torch.Generator().manual_seed(0)
# AttributeCrossAttention(dim_visual=8, dim_attr=5, dim=4); CosineClassifier(dim=8, 4 classes);
# InstancePrototypeClassifier(Dg=6, K=5, C=4, J=3); ILPG over C=4 classes, K=5 attributes, Dv=8, Dg=7
AVL, COS = AttributeCrossAttention(8, 5, 4), CosineClassifier(8, 4)
FULL, ATTR = (InstancePrototypeClassifier(6, 5, 4, hidden_dim=3, weights=w) for w in ("full", "attribute"))
MODEL = ILPG(torch.rand(4, 5, generator=g), torch.randn(5, 6, generator=g), region_dim=8, signature_dim=7,
             hidden_dim=3)


def randn(*shape):
    return torch.randn(*shape, generator=g)


CASES = {
    "avl regions": (lambda: AVL(randn(2, 3, 9), randn(6, 5)), ValueError,
                    "AttributeCrossAttention: regions (B, R, dim_visual) must have dim_visual=8, got dim_visual=9"),
    "avl attributes": (lambda: AVL(randn(2, 3, 8), randn(6, 6)), ValueError,
                       "AttributeCrossAttention: attributes (K, dim_attr) or (B, K, dim_attr) must have dim_attr=5, "
                       "got dim_attr=6"),
    "avl attributes batch": (lambda: AVL(randn(2, 3, 8), randn(3, 6, 5)), ValueError,
                             "AttributeCrossAttention: per-sample attributes (B, K, dim_attr) must have regions' "
                             "batch size B=2, got attributes (3, 6, 5)"),
    "avl attributes int": (lambda: AVL(randn(2, 3, 8), torch.ones(6, 5, dtype=torch.long)), TypeError,
                           "AttributeCrossAttention: attributes must be a floating-point tensor"),
    "avl dim 0": (lambda: AttributeCrossAttention(8, 5, 0), ValueError,
                  "AttributeCrossAttention: dim must be an int >= 1, got 0"),
    "cosine x": (lambda: COS(randn(2, 9)), ValueError, "CosineClassifier: x (..., dim) must have dim=8, got dim=9"),
    "cosine prototypes": (lambda: COS(randn(2, 8), randn(4, 9)), ValueError,
                          "CosineClassifier: prototypes (C, dim) must have dim=8, got dim=9"),
    "cosine x and prototypes": (lambda: COS(randn(2, 9), randn(4, 9)), ValueError,
                                "CosineClassifier: x (..., dim) must have dim=8, got dim=9"),
    "cosine class_embeddings list": (lambda: CosineClassifier(2, class_embeddings=[[1.0, 2.0]]), TypeError,
                                     "CosineClassifier: class_embeddings must be a torch.Tensor"),
    "prototype g": (lambda: FULL(randn(2, 5), randn(2, 7), randn(4, 5)), ValueError,
                    "InstancePrototypeClassifier: g (B, Dg) must have Dg=6, got Dg=7"),
    "prototype e": (lambda: ATTR(randn(2, 6), randn(2, 6), randn(4, 6)), ValueError,
                    "InstancePrototypeClassifier: e (B, K) must have K=5, got K=6"),
    "prototype s": (lambda: ATTR(randn(2, 5), randn(2, 6), randn(4, 6)), ValueError,
                    "InstancePrototypeClassifier: s (C, K) must have K=5, got K=6"),
    "label_weights hidden": (lambda: FULL.label_weights(randn(2, 4), torch.tensor([0, 1])), ValueError,
                             "InstancePrototypeClassifier.label_weights: hidden (B, J) must have J=3, got J=4"),
    "label_weights labels": (lambda: FULL.label_weights(randn(2, 3), torch.tensor([0, 9])), ValueError,
                             "InstancePrototypeClassifier.label_weights: labels holds the label 9, outside [0, 4)"),
    "label_weights weights": (lambda: FULL.label_weights(randn(2, 3), torch.tensor([0, 1]), randn(2, 5, 4)),
                              ValueError, "InstancePrototypeClassifier.label_weights: weights must be w (B, C, K) = "
                              "(2, 4, 5), got (2, 5, 4)"),
    "ilpg signatures": (lambda: MODEL(regions=randn(2, 3, 8), signatures=randn(2, 8)), ValueError,
                        "ILPG: signatures (B, Dg) must have Dg=7, got Dg=8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_input_off_the_modules_dims_is_named(case):
    call, error, message = CASES[case]
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value), str(info.value)
