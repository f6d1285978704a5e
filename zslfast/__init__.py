"""zslfast: fused, autograd-correct kernels for attribute-based zero-shot learning.

Ops (each takes ``backend=None | "reference" | "cpu" | "triton" | "cuda"``):
    prototype_scores(e, s, w=None)                  ILPG IDPP+APC logits, S_W = W*S + S never materialised
    prototype_scores_factored(e, s, h, u, bias=None) the same with w = h @ u (+ bias) fused in
    cosine_logits(x, protos, scale=1.0, ...)        scale * cos(x, protos[c]), normalisation fused into the matmul
                                                    (eps_mode="clamp" as F.normalize, "add": x / (|x| + eps), GEM-ZSL)
    attention_rollout(attns, mode="abnar", ...)     ViT attention rollout, CLS row as an O(L·N²) vector chain
    attribute_attention(q, k, v, ref=None, ...)     softmax(q k^T) v + cosine/dot score, flash-style (ILPG AVL)
    memory_bank_kl(z, protos, labels, active)       SAGE Eq. 9 KL to memory-bank prototypes, gather fused in
    MemoryBank(C, M, capacity, D, threshold=...)    SAGE's class-wise confident-feature queues, vectorised update

Modules:
    zslfast.data      xlsa17 benchmark format: load_xlsa17(root), write_synthetic_xlsa17(root, "CUB"|"SUN"|"AwA2")
    zslfast.metrics   per-class top-1, CZSL accuracy, GZSL U/S/H with calibrated stacking and a gamma sweep
    zslfast.losses    ILPG IPM/SAS/VSR/PCR and ILPGLoss.from_preset(...); SVIP jsd_loss and patch_bce_loss
    zslfast.generative  FSIGenZ/GenZSL, batched over classes and λ: msas, ridge_prototypes (one SVD for all (u, λ)),
                      class_diversity_promotion, topk_similar_classes, semantic_regularised_contrastive_loss (DPSR);
                      example: python -m zslfast.examples.fsigenz
    zslfast.testing   one record per op (inputs, shapes, the papers' code, the reference, the audit plan), for tests
                      of your own and for zslfast.tools (python -m zslfast bench, audit, gpucheck, demo)
"""

from . import _backend, reference
from . import data, losses, metrics
from ._backend import BackendUnavailableError, available_backends
from .ops.attention_rollout import attention_rollout
from .ops.attribute_attention import attribute_attention
from .ops.cosine_logits import cosine_logits
from .ops.memory_bank import memory_bank_kl
from .nn.memory_bank import MemoryBank
from .ops.prototype_scores import prototype_scores, prototype_scores_factored
from . import generative

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MemoryBank",
    "attention_rollout",
    "attribute_attention",
    "available_backends",
    "cosine_logits",
    "data",
    "generative",
    "losses",
    "memory_bank_kl",
    "metrics",
    "prototype_scores",
    "prototype_scores_factored",
    "reference",
]
