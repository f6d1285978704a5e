"""SVIPHead: SVIP (Semantically contextualized VIsual Patches, Chen et al.) on a timm ViT, over zslfast's fused ops.

With a backbone (a timm VisionTransformer, B images, N patches on an h x w grid, P prefix tokens, width D, K
attributes, C classes). The unit of selection is a merged patch: §4.1, "for computational efficiency, we aggregate
each 4 (2×2) patches as one, resulting in 49 patches" (ViT-B/16 at 224²), as SVIP's released code does. merge(x)
concatenates the features of each 2x2 group of patches, groups in raster order of the (h/2, w/2) grid, so
N' = N/4 units of width D' = 4D; ``merge_patches=False`` makes every patch its own unit (N' = N, D' = D).

    v        (B, N, D)      patch embeddings, ``vit.patch_embed(images)`` (Eq. 1)
    r̂        (B, N')        patch classifier logits, ``patch_classifier(merge(v))`` (Eq. 5: on the input patches),
                            an MLP D' -> 512 -> ReLU -> 1 (Fig. 6b's "intermediate layer in the patch classifier";
                            the released code's 3072 -> 512 -> 1)
    S_M      (B, N') bool   top-M units by r̂ (Eq. 8), ``patch_mask``; exactly M True per row
    e        (D',)          semantic context patch, W2P (Eq. 7): mean_k Linear(w_k) of the attribute word vectors
                            w (K, Dw); a plain learnable (D',) vector when no word vectors are given ("w/o W2P")
    v'       (B, N, D)      merge(v) + e on the units outside S_M, split back into patches (Eq. 9): each patch of
                            a dropped 2x2 group gets its own quarter of e
    Z^L'     (B, P+N, D)    the ViT run on v' (pos. embed, blocks, norm)
    â        (B, K)         P2A (D' -> K) + max-pool over the kept units of merge(Z^L' patches) (Eq. 10), see
                            "pool" below
    logits   (B, C)         σ cos(â, a_c) with a (C, K) the class attributes (Eq. 11), ``zslfast.cosine_logits``

Eq. 11's softmax runs over the seen classes: train with the seen classes' attributes as ``class_attributes`` and
score every class at test time with ``forward(..., class_attributes=all_classes)``.

Training (``labels`` given) adds the first pass of Eq. 12: the ViT also runs on the plain v, its attention rolled
out while it runs (``AttentionRollout.from_model``: no (B, H, N, N) map stored on the fused path) into the CLS row
r (B, N) over the patches (Eq. 4), averaged over each unit's patches (B, N'), whose top ``label_fraction`` units
are the pseudo-labels (1 = semantic, no gradient); the same P2A + pool on its kept output units gives logits1.
Then (Eq. 6, 12, 13, 14):

    loss = CE(logits1, y) + CE(logits, y) + λ_jsd · JSD(logits1, logits) + λ_patch · BCE(r̂, pseudo-labels)

with ``zslfast.losses.jsd_loss`` and ``patch_bce_loss``. Without labels only the contextualised pass runs (the
paper's inference).

Pool (Eq. 10, the paper's P2A is a linear map Z -> Â (M, K) then a max over the kept patches; here the units):
    "attention" (default): â_k = Σ_n p_kn (w_k·z_n) + b_k, p_k = softmax_n(w_k·z_n / τ) over the kept units:
        ``zslfast.attribute_attention(W, Z, Z, ref=W, score="dot", mask=S_M, scale=1/τ)`` with (W, b) the P2A
        weights. A soft max-pool: it tends to the paper's hard max as τ -> 0, and every kept unit gets gradient.
    "max": the paper's hard max, ``P2A(Z).masked_fill(~S_M, -inf).amax(units)``.

Precomputed mode (no backbone, ``forward(tokens=..., attentions=...)``, how ZSL code trains on cached features):
tokens (B, P+N, D) are a ViT's final tokens (on a square grid, or ``grid_size=(h, w)``) and attentions its L maps
(B, H, P+N, P+N). The ViT cannot be re-run, so the context patch is appended to the kept units as one more
always-kept unit instead of added to the inputs; logits1 uses the kept units alone. The patch classifier reads the
given tokens' merged patches; the pseudo-labels come from ``AttentionRollout()(attentions)``. Same losses.

Choices where the paper is silent: W2P = a Linear per word vector, then the mean over attributes, its output a
whole unit (D' = 4D when merging: the released code's fill token is 3072 wide); pseudo-labels top-k of the rollout
with k = round(label_fraction · N') (default: k = M, so the classifier learns to pick the units the rollout would);
rollout "abnar"/"mean" (SVIP's released code; "residual"/"sum" is Eq. 4 as printed); a unit's rollout score is the
mean over its 2x2 group (the released code averages 4 consecutive patches of a row, which are not the group it
merges); the mask follows r̂ in training too (Eq. 8; the paper's Algorithm 1 indexes with the pseudo-labels there,
which inference cannot); JSD as Eq. 13 prints it (``jsd_mode="mixture"`` for the textbook one).

``backend`` / ``set_backend``: None runs the fused kernels (by device); "reference" runs every op's plain PyTorch
reference (attribute attention, cosine logits, rollout from stored eager attention maps).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from .._enums import choices
from ..losses import jsd_loss, patch_bce_loss
from ..nn.rollout import AttentionRollout
from ..ops.attribute_attention import attribute_attention
from ._vit import check_vit
from ._weights import PathLike, apply_checkpoint, read_checkpoint, timm_backbone, unused_pretrained
from ..validation import check_flag, check_int, check_labels, check_number, check_option, check_positive, shape_str
from ..ops.cosine_logits import cosine_logits

_NAME = "SVIPHead"
POOLS = ("attention", "max")


class SVIPOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) from the contextualised patches (the paper's prediction)
    loss: Optional[torch.Tensor]  # scalar when labels are given
    parts: dict  # loss terms (detached), patch_logits, pseudo_labels, logits_original, attribute_scores
    patch_mask: torch.Tensor  # (B, N') bool, True = kept (semantic) unit (2x2 group, or patch), exactly M per row


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) scores -> (B, N) bool with True at each row's k largest (exactly k per row, ties by topk's order)."""
    index = scores.topk(k, dim=1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, index, True)


class _TokensFromPatchEmbeddings(nn.Module):
    """A timm ViT from its patch embeddings v (B, N, D) to its normalised tokens (B, P+N, D): forward_features
    without the patch_embed. Has the ViT's ``.blocks``, so ``vit_attention_rollout`` can wrap it."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    @property
    def blocks(self):
        return self.vit.blocks

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(v)))
        for blk in vit.blocks:
            x = blk(x)
        return vit.norm(x)


def _check_vit(model) -> nn.Module:
    model = check_vit(_NAME, model, ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm",
                                     "embed_dim"), "patch embeddings must be (B, N, D)")
    if getattr(model.patch_drop, "prob", 0.0):
        raise ValueError(
            f"{_NAME}: backbone with patch_drop_rate > 0 is not supported (it would drop patches after selection)"
        )
    return model


class SVIPHead(nn.Module):
    """SVIP on a timm ViT (see the module docstring for the math): forward(images, labels=None) -> SVIPOutput.

    Args:
        class_attributes: a (C, K) class attribute matrix (a buffer), the classes the logits range over: for
            training, the seen classes (Eq. 11); ``forward(class_attributes=...)`` scores others at test time.
        backbone: a timm model name (built with ``timm.create_model(name, pretrained=pretrained, num_classes=0,
            img_size=img_size, **backbone_kwargs)``), an already built timm VisionTransformer, or None for the
            precomputed mode (then ``embed_dim`` is required).
        embed_dim: D in the precomputed mode (default: the backbone's).
        attribute_word_embeddings: w (K, Dw), the attributes' word vectors (GloVe); a buffer, projected by W2P to
            the context patch. None: the context patch is a learnable (D,) vector.
        merge_patches: select 2x2 groups of patches (the paper's 49 of ViT-B/16 at 224², the default), or single
            patches (False); merging needs an even grid.
        patch_classifier_hidden: the patch classifier's hidden width (512, the released code's); None: one Linear.
        num_keep: M, the units kept: an int in [1, N'], or a float in (0, 1] as a fraction of N' (the paper keeps
            about 40 of 49: 0.8).
        label_fraction: fraction of units marked semantic in the pseudo-labels; None: M / N'.
        scale: σ of Eq. 11 (the paper's best: 5).
        lambda_jsd, lambda_patch: λ1, λ2 of Eq. 14 (the paper's best: 1 and 3).
        jsd_mode: "eq13" (Eq. 13 as printed: symmetrised KL / 2) or "mixture" (the textbook JSD); see jsd_loss.
        pool: "attention" (soft max-pool through ``attribute_attention``) or "max" (hard max); pool_temperature τ.
        rollout_mode, head_fusion: the pseudo-labels' rollout ("abnar"/"mean": SVIP's code; "residual"/"sum": Eq. 4).
        num_prefix_tokens: P in the precomputed mode (default 1, the class token; the backbone's own otherwise).
        grid_size: (h, w) of the patches in the precomputed mode (default: a square); the backbone's otherwise.
        pretrained: the named backbone's weights: False (random), True (timm downloads them) or the path of a
            local timm checkpoint of it, no network (zslfast.models._weights: both routes, timm's own included).
        img_size, backbone_kwargs: for ``timm.create_model``.
        backend: None (fused kernels by device) or "reference" (plain PyTorch) or a kernel backend; see set_backend.
        checkpoint: None, or the path of a whole-model state dict, read first and loaded once the model is built
            (all or nothing: zslfast.models._weights).
    """

    def __init__(
        self,
        class_attributes: torch.Tensor,
        backbone: Union[str, nn.Module, None] = "deit_base_patch16_224",
        *,
        embed_dim: Optional[int] = None,
        attribute_word_embeddings: Optional[torch.Tensor] = None,
        merge_patches: bool = True,
        patch_classifier_hidden: Optional[int] = 512,
        num_keep: Union[int, float] = 0.8,
        label_fraction: Optional[float] = None,
        scale: float = 5.0,
        lambda_jsd: float = 1.0,
        lambda_patch: float = 3.0,
        jsd_mode: str = "eq13",
        pool: str = "attention",
        pool_temperature: float = 0.1,
        rollout_mode: str = "abnar",
        head_fusion: str = "mean",
        num_prefix_tokens: int = 1,
        grid_size: Optional[tuple] = None,
        pretrained: Union[bool, PathLike] = False,
        img_size: int = 224,
        backbone_kwargs: Optional[dict] = None,
        backend: Optional[str] = None,
        checkpoint: Optional[PathLike] = None,
    ):
        super().__init__()
        saved = None if checkpoint is None else read_checkpoint(_NAME, checkpoint)  # refused before anything is built
        if not isinstance(class_attributes, torch.Tensor) or not class_attributes.is_floating_point():
            got = getattr(class_attributes, "dtype", type(class_attributes).__name__)
            raise TypeError(f"{_NAME}: class_attributes must be a floating-point tensor (C, K), got {got}")
        if class_attributes.dim() != 2 or 0 in class_attributes.shape:
            raise ValueError(f"{_NAME}: class_attributes must be (C, K), got shape {shape_str(class_attributes)}")
        num_attributes = class_attributes.shape[1]

        if isinstance(backbone, str):
            backbone = timm_backbone(
                _NAME, backbone, pretrained, num_classes=0, img_size=img_size, **(backbone_kwargs or {})
            )
        else:
            unused_pretrained(_NAME, "pretrained", pretrained, "backbone is not a timm model name")
        if backbone is not None:
            backbone = _check_vit(backbone)
            if embed_dim is not None and embed_dim != backbone.embed_dim:
                raise ValueError(f"{_NAME}: embed_dim={embed_dim} but the backbone's is {backbone.embed_dim}")
            embed_dim = backbone.embed_dim
            num_prefix_tokens = backbone.num_prefix_tokens
            grid_size = tuple(backbone.patch_embed.grid_size)
        elif embed_dim is None:
            raise ValueError(f"{_NAME}: without a backbone (precomputed tokens), give embed_dim")
        check_int(_NAME, "embed_dim", embed_dim, minimum=1)
        check_int(_NAME, "num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_flag(_NAME, "merge_patches", merge_patches)
        if patch_classifier_hidden is not None:
            check_int(_NAME, "patch_classifier_hidden", patch_classifier_hidden)
        if grid_size is not None:
            if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
                raise ValueError(f"{_NAME}: grid_size must be (h, w), got {grid_size!r}")
            grid_size = (check_int(_NAME, "grid_size[0]", grid_size[0]), check_int(_NAME, "grid_size[1]", grid_size[1]))
            if merge_patches and (grid_size[0] % 2 or grid_size[1] % 2):
                raise ValueError(f"{_NAME}: merge_patches=True merges 2x2 groups: it needs an even patch grid, got "
                                 f"{grid_size}")
        if isinstance(num_keep, bool) or not isinstance(num_keep, (int, float)):
            raise TypeError(f"{_NAME}: num_keep must be an int (M) or a float fraction of N, got {num_keep!r}")
        if (isinstance(num_keep, int) and num_keep < 1) or (isinstance(num_keep, float) and not 0 < num_keep <= 1):
            raise ValueError(f"{_NAME}: num_keep must be an int >= 1 or a float in (0, 1], got {num_keep!r}")
        if label_fraction is not None and not 0 < check_number(_NAME, "label_fraction", label_fraction) <= 1:
            raise ValueError(f"{_NAME}: label_fraction must be None or in (0, 1], got {label_fraction!r}")
        check_option(_NAME, "jsd_mode", jsd_mode, ("eq13", "mixture"))
        check_option(_NAME, "pool", pool, POOLS)
        scale = check_positive(_NAME, "scale", scale)
        pool_temperature = check_positive(_NAME, "pool_temperature", pool_temperature)
        lambda_jsd = check_number(_NAME, "lambda_jsd", lambda_jsd, minimum=0)
        lambda_patch = check_number(_NAME, "lambda_patch", lambda_patch, minimum=0)
        check_option(_NAME, "rollout_mode", rollout_mode, choices("mode"))
        check_option(_NAME, "head_fusion", head_fusion, choices("head_fusion"))

        self.backbone = backbone
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.merge_patches = merge_patches
        self.grid_size = grid_size
        unit_dim = 4 * embed_dim if merge_patches else embed_dim  # D', the width of a unit of selection
        self.num_keep = num_keep
        self.label_fraction = label_fraction
        self.scale = float(scale)
        self.lambda_jsd = float(lambda_jsd)
        self.lambda_patch = float(lambda_patch)
        self.jsd_mode = jsd_mode
        self.pool = pool
        self.pool_temperature = float(pool_temperature)
        self.backend = _backend.check_backend(_NAME, backend)

        self.register_buffer("class_attributes", class_attributes.detach().clone())
        if patch_classifier_hidden is None:
            self.patch_classifier = nn.Linear(unit_dim, 1)
        else:
            self.patch_classifier = nn.Sequential(
                nn.Linear(unit_dim, patch_classifier_hidden), nn.ReLU(), nn.Linear(patch_classifier_hidden, 1)
            )
        self.p2a = nn.Linear(unit_dim, num_attributes)
        self.rollout = AttentionRollout(rollout_mode, head_fusion, cls_only=True, backend=backend)
        if attribute_word_embeddings is not None:
            w = attribute_word_embeddings
            ok = isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2
            if not ok or w.shape[0] != num_attributes:
                raise ValueError(
                    f"{_NAME}: attribute_word_embeddings must be a floating (K={num_attributes}, Dw) tensor, got "
                    f"{shape_str(w) if isinstance(w, torch.Tensor) else type(w).__name__}"
                )
            self.register_buffer("attribute_word_embeddings", w.detach().clone())
            self.word_to_patch = nn.Linear(w.shape[1], unit_dim)
            self.context = None
        else:
            self.attribute_word_embeddings = None
            self.word_to_patch = None
            self.context = nn.Parameter(torch.randn(unit_dim) * 0.02)
        if saved is not None:
            apply_checkpoint(self, _NAME, *saved)

    # ------------------------------------------------------------------------------------------------------------

    def set_backend(self, backend: Optional[str]) -> "SVIPHead":
        """Run every op of this model (and of its zslfast submodules) on ``backend``; "reference" = plain PyTorch."""
        return _backend.set_module_backend(self, backend)

    def grid(self, num_patches: int) -> tuple[int, int]:
        """(h, w) of ``num_patches`` patches: the backbone's or ``grid_size``, else a square; even when merging."""
        if self.grid_size is not None:
            if self.grid_size[0] * self.grid_size[1] != num_patches:
                raise ValueError(f"{_NAME}: grid_size {self.grid_size} does not hold the N={num_patches} patches")
            return self.grid_size
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{_NAME}: N={num_patches} patches is not a square grid; give grid_size=(h, w)")
        if self.merge_patches and side % 2:
            raise ValueError(f"{_NAME}: merge_patches=True merges 2x2 groups: it needs an even patch grid, got "
                             f"{(side, side)}")
        return side, side

    def merge(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, F) per patch -> (B, N', 4F) per unit: each 2x2 group's features concatenated, (p, q) row-major,
        groups in raster order (identity without merging)."""
        if not self.merge_patches:
            return x
        (h, w), B, F = grid, x.shape[0], x.shape[-1]
        return x.reshape(B, h // 2, 2, w // 2, 2, F).transpose(2, 3).reshape(B, h * w // 4, 4 * F)

    def unmerge(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The inverse of ``merge``: (B, N', 4F) -> (B, N, F)."""
        if not self.merge_patches:
            return x
        (h, w), B = grid, x.shape[0]
        return x.reshape(B, h // 2, w // 2, 2, 2, -1).transpose(2, 3).reshape(B, h * w, -1)

    def merge_scores(self, scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N) per-patch scores -> (B, N') each unit's mean."""
        return self.merge(scores[..., None], grid).mean(dim=-1) if self.merge_patches else scores

    def context_patch(self) -> torch.Tensor:
        """e (D',): W2P of the attribute word vectors (mean over attributes of a Linear), or the learnable vector."""
        if self.word_to_patch is None:
            return self.context
        return self.word_to_patch(self.attribute_word_embeddings).mean(dim=0)

    def resolve_num_keep(self, num_units: int) -> int:
        """M for N' = ``num_units``."""
        m = self.num_keep if isinstance(self.num_keep, int) else max(1, round(self.num_keep * num_units))
        if m > num_units:
            unit = "merged patches (2x2 groups)" if self.merge_patches else "patches"
            raise ValueError(f"{_NAME}: num_keep M={m} exceeds the N'={num_units} {unit}")
        return m

    def pseudo_labels(self, patch_rollout: torch.Tensor, num_keep: int) -> torch.Tensor:
        """(B, N') rollout CLS row over the units -> (B, N') 0/1 labels: its top round(label_fraction·N') (or M)."""
        n = patch_rollout.shape[1]
        k = num_keep if self.label_fraction is None else max(1, round(self.label_fraction * n))
        return top_mask(patch_rollout.detach(), k).to(patch_rollout.dtype)

    def attribute_scores(self, patches: torch.Tensor, keep: torch.Tensor, context: Optional[torch.Tensor] = None):
        """P2A + pool over the kept units: patches (B, N', D'), keep (B, N') bool, context (D',) appended -> (B, K)."""
        if context is not None:
            B = patches.shape[0]
            patches = torch.cat([patches, context.to(patches.dtype).expand(B, 1, -1)], dim=1)
            keep = torch.cat([keep, keep.new_ones(B, 1)], dim=1)
        if self.pool == "max":
            per_patch = self.p2a(patches)  # (B, R, K)
            return per_patch.masked_fill(~keep[..., None], float("-inf")).amax(dim=1)
        w = self.p2a.weight
        scores = attribute_attention(
            w, patches, patches, w, scale=1.0 / self.pool_temperature, mask=keep, score="dot", backend=self.backend
        )
        return scores + self.p2a.bias

    def classify(self, attribute_scores: torch.Tensor, class_attributes: torch.Tensor) -> torch.Tensor:
        """σ cos(â, a_c): (B, K), (C, K) -> (B, C)."""
        return cosine_logits(attribute_scores, class_attributes, self.scale, backend=self.backend)

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        tokens: Optional[torch.Tensor] = None,
        attentions=None,
        class_attributes: Optional[torch.Tensor] = None,
    ) -> SVIPOutput:
        """images (B, 3, H, W) with a backbone, or tokens (B, P+N, D) [+ attentions, L maps (B, H, P+N, P+N)].

        labels (B,) int64 in [0, C): compute the training objective (needs ``attentions`` in the precomputed mode).
        class_attributes (C', K): score against these classes for this call (e.g. seen + unseen at test time).
        """
        self.backend = _backend.check_backend(_NAME, self.backend)
        class_attributes = self._check_class_attributes(class_attributes)
        if self.backbone is not None:
            if tokens is not None or attentions is not None:
                raise ValueError(f"{_NAME}: this model has a backbone; pass images, not tokens/attentions")
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError(
                    f"{_NAME}: images must be a (B, 3, H, W) tensor, got "
                    f"{shape_str(images) if isinstance(images, torch.Tensor) else type(images).__name__}"
                )
            return self._forward_backbone(images, labels, class_attributes)
        if images is not None:
            raise ValueError(f"{_NAME}: this model has no backbone (precomputed mode); pass tokens=, not images")
        return self._forward_tokens(tokens, attentions, labels, class_attributes)

    def _check_class_attributes(self, class_attributes):
        if class_attributes is None:
            return self.class_attributes
        K = self.class_attributes.shape[1]
        if not isinstance(class_attributes, torch.Tensor):
            got = type(class_attributes).__name__
            raise TypeError(f"{_NAME}: class_attributes must be a tensor (C, K={K}), got {got}")
        if class_attributes.dim() != 2 or class_attributes.shape[1] != K or class_attributes.shape[0] == 0:
            raise ValueError(f"{_NAME}: class_attributes must be (C, K={K}), got {shape_str(class_attributes)}")
        return class_attributes

    def _check_labels(self, labels, batch: int, num_classes: int):
        return None if labels is None else check_labels(_NAME, "labels", labels, batch, num_classes)

    def _forward_backbone(self, images, labels, class_attributes):
        labels = self._check_labels(labels, images.shape[0], class_attributes.shape[0])
        vit = _TokensFromPatchEmbeddings(self.backbone)
        v = self.backbone.patch_embed(images)
        if v.dim() != 3:
            raise ValueError(f"{_NAME}: backbone.patch_embed gave shape {shape_str(v)}, expected (B, N, D)")
        P, grid = self.num_prefix_tokens, self.grid(v.shape[1])
        units = self.merge(v, grid)
        num_keep = self.resolve_num_keep(units.shape[1])
        patch_logits = self.patch_classifier(units).squeeze(-1)
        keep = top_mask(patch_logits.detach(), num_keep)
        units_context = units + (~keep)[..., None].to(v.dtype) * self.context_patch().to(v.dtype)
        scores = self.attribute_scores(self.merge(vit(self.unmerge(units_context, grid))[:, P:], grid), keep)
        logits = self.classify(scores, class_attributes)
        parts = dict(patch_logits=patch_logits, attribute_scores=scores, pseudo_labels=None, logits_original=None)
        if labels is None:
            return SVIPOutput(logits, None, parts, keep)
        tokens, rollout = self.rollout.from_model(vit, v)
        pseudo = self.pseudo_labels(self.merge_scores(rollout.detach()[:, P:], grid), num_keep)
        logits_original = self.classify(self.attribute_scores(self.merge(tokens[:, P:], grid), keep),
                                        class_attributes)
        return self._with_loss(logits, logits_original, patch_logits, pseudo, labels, parts, keep)

    def _forward_tokens(self, tokens, attentions, labels, class_attributes):
        if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
            raise TypeError(f"{_NAME}: tokens must be a floating-point tensor (B, P+N, D), got {type(tokens).__name__}")
        P = self.num_prefix_tokens
        if tokens.dim() != 3 or tokens.shape[2] != self.embed_dim or tokens.shape[1] <= P or tokens.shape[0] == 0:
            raise ValueError(
                f"{_NAME}: tokens must be (B, P+N, D) with P={P} prefix tokens, N >= 1 patches and "
                f"D={self.embed_dim}, got {shape_str(tokens)}"
            )
        if tokens.dtype != self.p2a.weight.dtype:
            raise TypeError(
                f"{_NAME}: tokens have dtype {tokens.dtype} but the head's parameters "
                f"{self.p2a.weight.dtype} (convert one with .to(dtype))"
            )
        labels = self._check_labels(labels, tokens.shape[0], class_attributes.shape[0])
        grid = self.grid(tokens.shape[1] - P)
        patches = self.merge(tokens[:, P:], grid)
        num_keep = self.resolve_num_keep(patches.shape[1])
        patch_logits = self.patch_classifier(patches).squeeze(-1)
        keep = top_mask(patch_logits.detach(), num_keep)
        scores = self.attribute_scores(patches, keep, self.context_patch())
        logits = self.classify(scores, class_attributes)
        parts = dict(patch_logits=patch_logits, attribute_scores=scores, pseudo_labels=None, logits_original=None)
        if labels is None:
            return SVIPOutput(logits, None, parts, keep)
        if attentions is None:
            raise ValueError(f"{_NAME}: with labels, the precomputed mode needs attentions (L maps (B, H, P+N, P+N))")
        rollout = self.rollout(attentions)
        if rollout.shape != tokens.shape[:2]:
            raise ValueError(
                f"{_NAME}: attentions must be maps over the tokens' P+N={tokens.shape[1]} positions for B="
                f"{tokens.shape[0]}, got a rollout of shape {shape_str(rollout)}"
            )
        pseudo = self.pseudo_labels(self.merge_scores(rollout.detach()[:, P:], grid), num_keep)
        logits_original = self.classify(self.attribute_scores(patches, keep), class_attributes)
        return self._with_loss(logits, logits_original, patch_logits, pseudo, labels, parts, keep)

    def _with_loss(self, logits, logits_original, patch_logits, pseudo, labels, parts, keep):
        loss_cls = F.cross_entropy(logits_original, labels) + F.cross_entropy(logits, labels)
        loss_jsd = jsd_loss(logits_original, logits, mode=self.jsd_mode)
        loss_patch = patch_bce_loss(patch_logits, pseudo.bool())  # exactly 0/1: bool skips the loss's range check (a host sync)
        loss = loss_cls + self.lambda_jsd * loss_jsd + self.lambda_patch * loss_patch
        parts.update(
            pseudo_labels=pseudo,
            logits_original=logits_original,
            loss_cls=loss_cls.detach(),
            loss_jsd=loss_jsd.detach(),
            loss_patch=loss_patch.detach(),
        )
        return SVIPOutput(logits, loss, parts, keep)

    def extra_repr(self) -> str:
        return (
            f"merge_patches={self.merge_patches}, num_keep={self.num_keep}, scale={self.scale}, "
            f"lambda_jsd={self.lambda_jsd}, lambda_patch={self.lambda_patch}, pool={self.pool!r}, "
            f"backend={self.backend!r}"
        )
