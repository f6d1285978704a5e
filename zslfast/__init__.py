"""zslfast: fused, autograd-correct kernels for attribute-based zero-shot learning.

Ops (each takes ``backend=None | "reference" | "cpu" | "triton" | "cuda"``):
    prototype_scores(e, s, w=None)                  ILPG IDPP+APC logits, S_W = W*S + S never materialised
    prototype_scores_factored(e, s, h, u, bias=None) the same with w = h @ u (+ bias) fused in
    cosine_logits(x, protos, scale=1.0)             scale * cos(x, protos[c]), normalisation fused into the matmul
    attention_rollout(attns, mode="abnar", ...)     ViT attention rollout, CLS row as an O(L·N²) vector chain
"""

from . import _backend, reference
from ._backend import BackendUnavailableError, available_backends
from .ops.attention_rollout import attention_rollout
from .ops.cosine_logits import cosine_logits
from .ops.prototype_scores import prototype_scores, prototype_scores_factored

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "attention_rollout",
    "available_backends",
    "cosine_logits",
    "prototype_scores",
    "prototype_scores_factored",
    "reference",
]
