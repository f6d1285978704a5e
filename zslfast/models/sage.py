"""SAGE (Structured Attribute-Guided Enhancement for GZSL, Zhang et al., AAAI 2026) on a timm ViT, over zslfast's
fused ops.

Shapes: B images, L levels (hidden states of L ViT blocks, the last three by default), P prefix tokens, N = h·w
patches of width D, K attributes (word vectors of width Dw), C classes (seen and unseen), d the model width.
Three scales s = 0, 1, 2 (Global, Context, Local), M = 3L branches (level l, scale s), G_s the attribute subset
of scale s (K_s attributes, a partition of the K), R_s the patches of scale s.

    H_l         (B, P+N, D)      hidden state of level l (a timm ViT's block output, or given precomputed)
    X_l         (B, d, h, w)     Linear_l(LayerNorm_l(H_l patches)): each level's patches at width d, as a grid
    MSFE        F_{l,0} = Conv(X_l)            (B, R_0, d)  P⁻: depthwise k2 s2 -> ceil(h/2) x ceil(w/2) (coarse)
                F_{l,1} = X_l                  (B, R_1, d)  P:  identity, R_1 = N
                F_{l,2} = ConvTranspose(X_l)   (B, R_2, d)  P⁺: depthwise k2 s2 -> 2h x 2w (fine)
    AMCL        T = W + MLP_K(LayerNorm(W)ᵀ)ᵀ  (K, Dw)   the Attribute-Mixer's step across the attributes on the
                                         word vectors W (K, Dw): a token-mixing MLP (K -> expansion·K -> K), the
                                         paper's "learn[s] implicit relationships among attributes"
                A = φ(T)        (K, d)   φ = Linear(GELU(Linear(LayerNorm(.))))  (Dw -> expansion·Dw -> d)
                a_y = S[y] A    (d,)     a class's attribute-level embedding (Eq. 1)
                c_y = φ(S[y] T) (d,)     a class's class-level embedding: φ on the class's mixed word vector (Eq. 2)
    VSA         attribute queries over the patches, softmax over the patches (zslfast.attribute_attention):
                u_{l,s}[b, i] = cos(P_vsa F, A_i),  P_vsa = softmax_r((A W_vsa)_i · F_r / √d)     i ∈ G_s
                m^vsa_{l,s}[b, i] = max_r P_vsa[b, i, r]        (return_max="attention": Eq. 3's MaxPool(W_s))
    SVA         each patch a query, the semantic vectors "both key and value" (the paper), softmax over the
                attributes (zslfast.attribute_attention with the patches as its queries):
                o_{l,s}[b, r] = Σ_{i ∈ G_s} P_sva[b, i, r] A_i   (d,), in the span of the subset's A_i
                P_sva[b, :, r] = softmax_i(F_r · (A W_sva)_i / √d)
                v_{l,s}[b, i] = cos(mean_r o_{l,s}[b, r], A_i)    the patches' mean semantic reading vs attribute i
                m^sva_{l,s}[b, i] = max_r P_sva[b, i, r]        (Eq. 4's softmax(W_v), pooled over the patches)
    Z_m         (B, K)   branch m = (l, s): ½(u + v) on the attributes of G_s, 0 elsewhere (the subset pairing)
    MBGF        zslfast.nn.MemoryBankGuidedFusion on Z (B, M, K) against the class attributes S (C, K):
                Eq. 6-8 fusion -> Z (B, K), logits = σ cos(Z, S) (B, C) (Eq. 10, cosine_logits), Eq. 9 KL on the
                failing branches of misclassified samples, KL(softmax(σ' Z_m) || softmax(σ' Z~_y^m)), σ' =
                ``kl_scale`` (default σ), then (training mode) the confidence-gated bank update

Losses (labels y (B,) given; every term a mean over the batch):
    cls         CE(logits, y)                                                          Eq. 10, over all C classes
    cont_attr   -mean over pairs y_i = y_j (i = j included) of log softmax_k(cos(a_{y_i}, a_{y_k}) / τ)[j]  Eq. 1
    cont_cls    the same with c_y                                                      Eq. 2
    attr_sem    Σ_{l,s} Σ_{i ∈ G_s} (m^vsa_{l,s}[b, i] - S[y_b, i])²                   Eq. 3
    attr_vis    Σ_{l,s} Σ_{i ∈ G_s} (m^sva_{l,s}[b, i] - S[y_b, i])²                   Eq. 4
    align       Σ_{l,s} KL(α || β) + KL(β || α) = Σ (α - β)(log α - log β), α = P_vsa / K_s, β = P_sva / R_s:
                each branch's two maps normalised to distributions over its (attribute, patch) pairs
                (zslfast.losses.attention_alignment)                                   Eq. 5
    kl          MBGF's memory-bank KL                                                  Eq. 9
    loss = cls + λ_cont (cont_attr + cont_cls) + λ_attr (attr_sem + attr_vis) + λ_align align + λ_kl kl   Eq. 11

Data-parallel (torch.distributed initialised with more than one rank, the bank's process group; DDP averages the
ranks' gradients, every rank holding the same number of samples): cls, attr_sem, attr_vis and align are per-sample
means, whose mean over the ranks is the global batch's. Two terms are not: cont_attr / cont_cls (the softmax runs
over every pair of the batch, the mean over its positive pairs) and kl (a mean over the active (b, m), whose count
differs between ranks). So each rank computes the contrastive terms over the whole global batch's labels (they
depend on the labels and the parameters only: every rank gets the same value and gradient) and reports kl as
world · (its sum over its active pairs) / (the active pairs of all ranks). The mean of the ranks' losses, and of
their gradients, is then the loss, and the gradient, of one process fed the global batch. A forward with labels
is therefore collective there (as the bank's update already was in training mode): every rank calls it together;
without labels (inference) it is local.

Memory: on the fused path VSA's attention maps stay inside the kernels (Eq. 3 reads the (B, K_s) max of each
row); only L_align needs them (Eq. 5 compares whole maps), so they are returned (return_attention=True,
(L·B, K_s, R_s) per scale) only when λ_align > 0 and labels are given. SVA's map is returned whenever labels are
given ((L·B, R_s, K_s): Eq. 4 takes its max over the patches, across the op's softmax), never at inference; its
outputs o are (L·B, R_s, d). The levels of a scale share their queries and are stacked along the batch: one VSA
and one SVA call per scale, 6 calls per step.

Choices where the paper is silent (documented, all constructor arguments):
  * subsets: the paper groups attributes by hand. Given none (``attribute_groups=None``), attributes are ranked by
    their prevalence, mean_c S[c, i] / max_c S[c, i] (0 for an all-zero column): the most widely shared third
    (coarse, abstract cues shared by many classes) is Global and goes with P⁻, the middle third Context with P,
    the least shared (class-specific details) Local with P⁺; ties by index, the first K mod 3 thirds one longer.
  * a_y in Eq. 6 and 10 is the class attribute vector S[y]: the branches predict attributes, as in every
    attribute-based ZSL model; AMCL's embeddings act through the VSA queries, SVA's keys and values, and Eq. 1-2.
  * Eq. 10's similarity gets a scale σ (default 10): plain cosines in [-1, 1] cannot train a softmax over C classes.
    Eq. 9's softmaxes get the same σ (``kl_scale``): over branch features of cosines in [-1, 1] they are near
    uniform, and the term is inert (measured on CUB-shaped data, C 200, K 312, the bank filled: KL 0.001 against
    5.2 for cls at an untrained model, gradient 0.04% of the rest's; with σ: KL 0.2, gradient about 8%).
  * SVA's attribute scores (the paper gives SVA's output, not how it scores attributes): the cosine between each
    attribute's semantic vector and the patches' mean output, mean_r o_r = Σ_i (mean_r P_sva[i, r]) A_i.
  * the Attribute-Mixer's step across the attributes is a token-mixing MLP with a residual, the MLP-Mixer form of
    "LayerNorm, dimension-expanding and dimension-reducing fully connected layers" (``mix_attributes=False``: the
    per-attribute MLP alone, the layout of checkpoints saved before it).
  * the backbone is frozen by default (``train_backbone=False``): zslfast's choice, for training on cached hidden
    states. The paper trains "end-to-end" from a pretrained ViT: ``train_backbone=True``.
  * λ: the paper's main text gives no values (its appendix is not part of the text we have), so there are no
    per-dataset presets; defaults λ_cont 0.1, λ_attr 1, λ_align 0.1, λ_kl 1, τ 0.1, α (Eq. 7) 10, bank capacity 8,
    FIFO ("dequeue the oldest entries", the paper's last word on the update), and a confidence threshold of 2/C
    (twice chance): a branch's confidence is its softmax probability of the true class over all C classes, and
    one branch sees a third of the attributes, so a fixed 0.5 is never reached at C = 200 (measured on the demo
    after 5 epochs: median 0.0065, 99th percentile 0.033, chance 0.005).
  * MSFE: the paper names the operations (conv, identity, transposed conv), not their kernels. Here both are
    depthwise 2x2 stride-2 (halving and doubling the grid: 14x14 -> 7x7 / 28x28 at ViT-B/16 224²), each level
    with its own weights; the projection D -> d comes before them, so the dense work is done once per level
    (a full conv would cost 4d² weights and B·R·4d² flops per level and scale).
  * the branch output Z_m averages the VSA and SVA scores (both streams feed the prediction).

``backend`` / ``set_backend``: None runs the fused kernels (by device); "reference" runs every op's plain PyTorch
reference on the same parameters (attribute attention materialising (B, K, R), cosine logits, the bank's
Python-loop update).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..losses import attention_alignment
from ..nn.memory_bank import MemoryBankGuidedFusion
from ..ops.attribute_attention import attribute_attention
from ..ops.cosine_logits import cosine_logits
from ..distributed import all_gather_rows, dist
from ._sage_blocks import AttributeMixer, MultiScaleBranches  # noqa: F401  (public through this module)
from ._vit import check_vit
from ._weights import PathLike, apply_checkpoint, read_checkpoint, timm_backbone, unused_pretrained
from ..validation import (
    check_flag, check_int, check_labels, check_number, check_option, check_positive, shape_str,
)

_NAME = "SAGE"
SCALES = ("global", "context", "local")  # paired with P⁻ (conv), P (identity), P⁺ (transposed conv)
# Eq. 11's weights: the paper gives no values in its main text, so one default set, no per-dataset presets.
DEFAULT_LOSS_WEIGHTS = {"lambda_cont": 0.1, "lambda_attr": 1.0, "lambda_align": 0.1, "lambda_kl": 1.0}


class SAGEOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) σ cos(Z, S) over every class of S (Eq. 10)
    loss: Optional[torch.Tensor]  # scalar when labels are given (Eq. 11)
    parts: dict  # the loss terms (detached): cls, cont_attr, cont_cls, attr_sem, attr_vis, align, kl
    attribute_scores: torch.Tensor  # the fused Z (B, K) (Eq. 8)
    kl_active: torch.Tensor  # (B, M) bool, the (sample, branch) pairs Eq. 9 applied to


def default_attribute_groups(class_attributes: torch.Tensor) -> torch.Tensor:
    """(C, K) class attributes -> (K,) int64 group ids (0 Global, 1 Context, 2 Local) by prevalence (module doc)."""
    s = class_attributes.detach().double()
    top = s.amax(dim=0)
    prevalence = torch.where(top > 0, s.mean(dim=0) / torch.where(top > 0, top, 1.0), 0.0)
    order = torch.sort(-prevalence, stable=True).indices  # most prevalent first, ties by index
    groups = torch.empty(s.shape[1], dtype=torch.int64)
    for g, chunk in enumerate(torch.tensor_split(order, 3)):
        groups[chunk] = g
    return groups


def _as_groups(attribute_groups, num_attributes: int) -> torch.Tensor:
    """A partition of the K attributes: (K,) ids in {0, 1, 2}, or three index sequences -> (K,) int64 ids."""
    K = num_attributes
    if isinstance(attribute_groups, (list, tuple)) and len(attribute_groups) == 3 and K != 3 and all(
        isinstance(g, (list, tuple, torch.Tensor)) for g in attribute_groups
    ):
        groups = torch.full((K,), -1, dtype=torch.int64)
        for g, members in enumerate(attribute_groups):
            members = torch.as_tensor(members, dtype=torch.int64).reshape(-1)
            if members.numel() and (members.min() < 0 or members.max() >= K):
                raise ValueError(f"{_NAME}: attribute_groups[{g}] has attribute ids outside [0, {K})")
            if (groups[members] >= 0).any() or members.unique().numel() != members.numel():
                raise ValueError(f"{_NAME}: attribute_groups must be disjoint (an attribute is in two subsets)")
            groups[members] = g
        if (groups < 0).any():
            raise ValueError(f"{_NAME}: attribute_groups must cover all K={K} attributes (a partition)")
    else:
        try:
            groups = torch.as_tensor(attribute_groups)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{_NAME}: attribute_groups must be (K,) group ids in {{0, 1, 2}} or three index lists, got "
                f"{type(attribute_groups).__name__}"
            ) from None
        if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
            raise TypeError(f"{_NAME}: attribute_groups must hold integer group ids, got dtype {groups.dtype}")
        if groups.shape != (K,):
            raise ValueError(f"{_NAME}: attribute_groups must be (K={K},) group ids, got shape {shape_str(groups)}")
        groups = groups.to(torch.int64)
        if ((groups < 0) | (groups > 2)).any():
            raise ValueError(f"{_NAME}: attribute_groups ids must be 0 (Global), 1 (Context) or 2 (Local)")
    for g, name in enumerate(SCALES):
        if not (groups == g).any():
            raise ValueError(f"{_NAME}: attribute_groups leaves the {name} subset (id {g}) empty")
    return groups


def patch_grid(num_patches: int, grid_size: Optional[tuple] = None) -> tuple[int, int]:
    """(h, w) of the N patches: ``grid_size`` when given (it must hold N), else a square; ValueError otherwise."""
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(f"{_NAME}: grid_size {grid_size} does not hold the N={num_patches} patches")
        return grid_size
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{_NAME}: N={num_patches} patches is not a square grid; give grid_size=(h, w)")
    return side, side


def _check_vit(model) -> nn.Module:
    return check_vit(_NAME, model, ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "embed_dim",
                                    "num_prefix_tokens"), "a fixed patch grid")


def _contrastive(emb: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1/2: emb (B, d) per sample (its class's embedding), positives y_i = y_j -> mean -log p over positives."""
    e = F.normalize(emb, dim=-1)
    log_p = torch.log_softmax(e @ e.T / tau, dim=1)  # (B, B), the denominator over every k in the batch
    positive = labels[:, None] == labels[None, :]
    return -(log_p * positive).sum() / positive.sum()


class SAGE(nn.Module):
    """SAGE on a timm ViT (see the module docstring for the math): forward(images | hidden_states=, labels=None).

    Args:
        class_attributes: S (C, K), every class (seen and unseen); a buffer, the classes the logits range over.
        backbone: a timm model name (built with ``timm.create_model(name, pretrained=pretrained, num_classes=0,
            img_size=img_size, **backbone_kwargs)`` when ``build_backbone``), a built timm VisionTransformer, or None
            (precomputed hidden states; then ``embed_dim`` is required).
        attribute_word_embeddings: W (K, Dw), the attributes' word vectors (Word2Vec/GloVe); a buffer. Required.
        build_backbone: False with a name: no backbone is built (precomputed hidden states, no timm import).
        train_backbone: whether the ViT trains. The paper trains "end-to-end" (train_backbone=True); the default
            False is zslfast's choice, the model of cached hidden states: frozen, run without gradients in eval mode.
        levels: the blocks whose outputs are the levels (default the last three: (-3, -2, -1)).
        embed_dim, num_prefix_tokens, grid_size: D, P and (h, w) of the precomputed hidden states (default P=1, a
            square grid); taken from the backbone when there is one.
        dim: d, the model width (attention, values, attribute embeddings).  mixer_expansion: the mixer's
            expansion (both MLPs).  mix_attributes: the mixer's step across the attributes (False: per attribute).
        attribute_groups: None (the prevalence rule), (K,) ids in {0 Global, 1 Context, 2 Local}, or three index
            lists (global, context, local): a partition of the attributes.
        scale: σ of Eq. 10.  kl_scale: the factor on Z_m and its prototype in Eq. 9's softmaxes (None: σ).
        alpha: Eq. 7's temperature.  tau: Eq. 1-2's temperature.
        lambda_cont, lambda_attr, lambda_align, lambda_kl: Eq. 11's weights.
        bank_capacity, bank_threshold, bank_policy: the memory bank's queue length, confidence gate (None: 2/C,
            twice chance), policy.
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
        backbone: Union[str, nn.Module, None] = "vit_base_patch16_224",
        *,
        attribute_word_embeddings: torch.Tensor,
        build_backbone: bool = True,
        train_backbone: bool = False,
        levels: Sequence[int] = (-3, -2, -1),
        embed_dim: Optional[int] = None,
        num_prefix_tokens: int = 1,
        grid_size: Optional[tuple] = None,
        dim: int = 256,
        mixer_expansion: int = 4,
        mix_attributes: bool = True,
        attribute_groups=None,
        scale: float = 10.0,
        kl_scale: Optional[float] = None,
        alpha: float = 10.0,
        tau: float = 0.1,
        lambda_cont: float = DEFAULT_LOSS_WEIGHTS["lambda_cont"],
        lambda_attr: float = DEFAULT_LOSS_WEIGHTS["lambda_attr"],
        lambda_align: float = DEFAULT_LOSS_WEIGHTS["lambda_align"],
        lambda_kl: float = DEFAULT_LOSS_WEIGHTS["lambda_kl"],
        bank_capacity: int = 8,
        bank_threshold: Optional[float] = None,
        bank_policy: str = "fifo",
        pretrained: Union[bool, PathLike] = False,
        img_size: int = 224,
        backbone_kwargs: Optional[dict] = None,
        backend: Optional[str] = None,
        checkpoint: Optional[PathLike] = None,
    ):
        super().__init__()
        saved = None if checkpoint is None else read_checkpoint(_NAME, checkpoint)  # refused before anything is built
        s = class_attributes
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            got = getattr(s, "dtype", type(s).__name__)
            raise TypeError(f"{_NAME}: class_attributes must be a floating-point tensor (C, K), got {got}")
        if s.dim() != 2 or 0 in s.shape:
            raise ValueError(f"{_NAME}: class_attributes must be (C, K), got shape {shape_str(s)}")
        C, K = s.shape
        w = attribute_word_embeddings
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            got = getattr(w, "dtype", type(w).__name__)
            raise TypeError(f"{_NAME}: attribute_word_embeddings must be a floating-point tensor (K, Dw), got {got}")
        if w.dim() != 2 or w.shape[0] != K or w.shape[1] == 0:
            raise ValueError(
                f"{_NAME}: attribute_word_embeddings must be (K={K}, Dw), one row per attribute of "
                f"class_attributes {shape_str(s)}, got {shape_str(w)}"
            )
        if isinstance(backbone, str) and build_backbone:
            backbone = timm_backbone(
                _NAME, backbone, pretrained, num_classes=0, img_size=img_size, **(backbone_kwargs or {})
            )
        else:
            unused_pretrained(_NAME, "pretrained", pretrained, "no backbone is built from a name here")
            backbone = None if isinstance(backbone, str) else backbone
        if backbone is not None:
            backbone = _check_vit(backbone)
            if embed_dim is not None and embed_dim != backbone.embed_dim:
                raise ValueError(f"{_NAME}: embed_dim={embed_dim} but the backbone's is {backbone.embed_dim}")
            embed_dim, num_prefix_tokens = backbone.embed_dim, backbone.num_prefix_tokens
            grid_size = tuple(backbone.patch_embed.grid_size)
        elif embed_dim is None:
            raise ValueError(f"{_NAME}: without a backbone (precomputed hidden states), give embed_dim")
        check_int(_NAME, "embed_dim", embed_dim)
        check_int(_NAME, "num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_int(_NAME, "dim", dim)
        check_int(_NAME, "mixer_expansion", mixer_expansion)
        check_flag(_NAME, "mix_attributes", mix_attributes)
        if grid_size is not None:
            if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
                raise ValueError(f"{_NAME}: grid_size must be (h, w), got {grid_size!r}")
            grid_size = (check_int(_NAME, "grid_size[0]", grid_size[0]), check_int(_NAME, "grid_size[1]", grid_size[1]))
        if isinstance(levels, int) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise TypeError(f"{_NAME}: levels must be a non-empty sequence of block indices, got {levels!r}")
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, int):
                raise TypeError(f"{_NAME}: levels must hold int block indices, got {levels!r}")
        if backbone is not None:
            depth = len(backbone.blocks)
            resolved = [level % depth if -depth <= level < depth else None for level in levels]
            if None in resolved or len(set(resolved)) != len(levels):
                raise ValueError(
                    f"{_NAME}: levels {tuple(levels)} must be distinct blocks of the {depth}-block backbone"
                )
            levels = resolved
        groups = default_attribute_groups(s) if attribute_groups is None else _as_groups(attribute_groups, K)
        check_option(_NAME, "bank_policy", bank_policy, ("fifo", "min_conf"))
        self.scale = check_positive(_NAME, "scale", scale)
        self.tau = check_positive(_NAME, "tau", tau)
        self.lambda_cont = check_number(_NAME, "lambda_cont", lambda_cont, minimum=0)
        self.lambda_attr = check_number(_NAME, "lambda_attr", lambda_attr, minimum=0)
        self.lambda_align = check_number(_NAME, "lambda_align", lambda_align, minimum=0)
        self.lambda_kl = check_number(_NAME, "lambda_kl", lambda_kl, minimum=0)
        self.backend = _backend.check_backend(_NAME, backend)

        self.backbone = backbone
        self.train_backbone = bool(train_backbone)
        if backbone is not None and not self.train_backbone:
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.levels = tuple(levels)
        self.embed_dim, self.num_prefix_tokens, self.grid_size, self.dim = embed_dim, num_prefix_tokens, grid_size, dim
        self.register_buffer("class_attributes", s.detach().clone())
        self.register_buffer("attribute_word_embeddings", w.detach().clone())
        self.register_buffer("attribute_groups", groups)
        # the attribute ids of each subset, in attribute order (buffers: they move with .to())
        for g in range(3):
            self.register_buffer(f"_subset_{g}", torch.nonzero(groups == g).flatten(), persistent=False)
        self.mixer = AttributeMixer(K, w.shape[1], dim, mixer_expansion, mix_attributes)
        self.msfe = MultiScaleBranches(len(self.levels), embed_dim, dim)
        self.vsa_query = nn.Linear(dim, dim, bias=False)  # attribute queries of VSA (softmax over the patches)
        self.sva_query = nn.Linear(dim, dim, bias=False)  # attribute keys of SVA (softmax over the attributes)
        self.mbgf = MemoryBankGuidedFusion(
            K, 3 * len(self.levels), C, bank_capacity,
            threshold=2.0 / C if bank_threshold is None else check_number(_NAME, "bank_threshold", bank_threshold),
            alpha=check_number(_NAME, "alpha", alpha), scale=self.scale,
            kl_scale=self.scale if kl_scale is None else check_positive(_NAME, "kl_scale", kl_scale),
            policy=bank_policy, backend=backend,
        )
        if saved is not None:
            apply_checkpoint(self, _NAME, *saved)

    # ------------------------------------------------------------------------------------------------------------

    def set_backend(self, backend: Optional[str]) -> "SAGE":
        """Run every op of this model (and of its zslfast submodules) on ``backend``; "reference" = plain PyTorch."""
        return _backend.set_module_backend(self, backend)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None and not self.train_backbone:
            self.backbone.eval()
        return self

    @property
    def num_branches(self) -> int:
        return 3 * len(self.levels)

    def subsets(self) -> list[torch.Tensor]:
        """[G_0, G_1, G_2]: the attribute ids of the Global, Context and Local subsets."""
        return [self._subset_0, self._subset_1, self._subset_2]

    def hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> the L levels' block outputs [(B, P+N, D)] (no gradient into a frozen ViT)."""
        vit = self.backbone
        wanted = set(self.levels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_backbone):
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
            outputs = {}
            for i, block in enumerate(vit.blocks):
                x = block(x)
                if i in wanted:
                    outputs[i] = x
                    if len(outputs) == len(wanted):
                        break
        return [outputs[i] for i in self.levels]

    def _check_hidden_states(self, hidden_states) -> list[torch.Tensor]:
        L = len(self.levels)
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:
            hidden_states = list(hidden_states.unbind(0))
        if not isinstance(hidden_states, (list, tuple)) or len(hidden_states) != L:
            raise ValueError(
                f"{_NAME}: hidden_states must be {L} tensors (B, P+N, D) (one per level) or one (L={L}, B, P+N, D), "
                f"got {type(hidden_states).__name__}"
                + (f" of {len(hidden_states)}" if isinstance(hidden_states, (list, tuple)) else "")
            )
        dtype = self.vsa_query.weight.dtype
        first = hidden_states[0]
        for i, h in enumerate(hidden_states):
            if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                raise TypeError(f"{_NAME}: hidden_states[{i}] must be a floating-point tensor (B, P+N, D)")
            P, D = self.num_prefix_tokens, self.embed_dim
            if h.dim() != 3 or h.shape[2] != D or h.shape[1] <= P or h.shape[0] == 0 or h.shape != first.shape:
                raise ValueError(
                    f"{_NAME}: hidden_states must all be (B, P+N, D) with P={P}, N >= 1, D={D}, got "
                    f"{[shape_str(t) for t in hidden_states]}"
                )
            if h.dtype != dtype:
                raise TypeError(
                    f"{_NAME}: hidden_states[{i}] has dtype {h.dtype} but the model's parameters {dtype} "
                    f"(convert one with .to(dtype))"
                )
        return list(hidden_states)

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        hidden_states=None,
    ) -> SAGEOutput:
        """images (B, 3, H, W) with a backbone, or hidden_states: L tensors (B, P+N, D) (or one (L, B, P+N, D));
        labels (B,) int64 in [0, C) for the loss (and, in training mode, the bank update)."""
        self.backend = _backend.check_backend(_NAME, self.backend)
        if images is not None:
            if hidden_states is not None:
                raise ValueError(f"{_NAME}: give images or hidden_states, not both")
            if self.backbone is None:
                raise ValueError(f"{_NAME}: built without a backbone (precomputed mode); pass hidden_states=")
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError(
                    f"{_NAME}: images must be a (B, 3, H, W) tensor, got "
                    f"{shape_str(images) if isinstance(images, torch.Tensor) else type(images).__name__}"
                )
            hidden_states = self.hidden_states(images)
        elif hidden_states is None:
            raise ValueError(f"{_NAME}: give images (B, 3, H, W) or hidden_states (L tensors (B, P+N, D))")
        states = self._check_hidden_states(hidden_states)
        B, L, C = states[0].shape[0], len(states), self.class_attributes.shape[0]
        if labels is not None:
            labels = check_labels(_NAME, "labels", labels, B, C)
        s = self.class_attributes.to(states[0].dtype)
        P = self.num_prefix_tokens
        grid = patch_grid(states[0].shape[1] - P, self.grid_size)

        # MSFE, all levels at once; each scale's levels come stacked along the batch: (L·B, R_s, d).
        features = self.msfe(torch.stack([h[:, P:] for h in states]), grid)  # per scale (L·B, R_s, d)
        mixed = self.mixer.mix(self.attribute_word_embeddings.to(s.dtype))  # T (K, Dw)
        attributes = self.mixer.embed(mixed)  # A (K, d)
        vsa_q, sva_k = self.vsa_query(attributes), self.sva_query(attributes)

        training = labels is not None
        want_maps = training and self.lambda_align > 0
        want_max = "attention" if training else None
        K = s.shape[1]
        z = []  # per scale (L, B, K)
        attr_sem = attr_vis = align = s.new_zeros(())
        for scale, (feats, subset) in enumerate(zip(features, self.subsets())):
            a, R = attributes[subset], feats.shape[1]
            vsa = attribute_attention(vsa_q[subset], feats, feats, a, return_attention=want_maps,
                                      return_max=want_max, backend=self.backend)
            # SVA: the patches query the subset's attributes, whose semantic vectors are the keys (through W_sva)
            # and the values: each patch's output lies in their span. Its map is needed in training for Eq. 4's
            # max over the patches (the op's own max runs over the keys, the attributes here).
            keys, values = sva_k[subset].expand(len(feats), -1, -1), a.expand(len(feats), -1, -1)
            sva = attribute_attention(feats, keys, values, score=None, return_attention=training,
                                      backend=self.backend)
            sva_out = sva[0] if training else sva  # (L·B, R_s, d)
            sva_scores = cosine_logits(sva_out.mean(dim=1), a, 1.0, backend=self.backend)  # (L·B, K_s)
            vsa_scores = vsa[0] if training else vsa
            # Z_m on this scale's subset (index_copy keeps the rest 0 and routes the gradient to the subset).
            z.append(s.new_zeros(L, B, K).index_copy(2, subset, (0.5 * (vsa_scores + sva_scores)).view(L, B, -1)))
            if not training:
                continue
            sva_map = sva[1].transpose(1, 2)  # (L·B, K_s, R_s), each patch's softmax over the attributes
            target = s[labels][:, subset]  # (B, K_s)
            attr_sem = attr_sem + (vsa[-1].view(L, B, -1) - target).square().sum(dim=(0, 2)).mean()  # Eq. 3
            sva_max = sva_map.max(dim=2).values  # the gradient to one arg-max (amax would split it over ties)
            attr_vis = attr_vis + (sva_max.view(L, B, -1) - target).square().sum(dim=(0, 2)).mean()  # Eq. 4
            if want_maps:  # Eq. 5: each map as a distribution over its (attribute, patch) pairs
                kl = attention_alignment(vsa[1], sva_map, 1.0 / subset.numel(), 1.0 / R)  # (L·B,)
                align = align + kl.view(L, B).sum(dim=0).mean()
        branches = torch.stack(z, dim=2).transpose(0, 1).reshape(B, 3 * L, K)  # (B, M, K), m = 3 l + scale
        fused = self.mbgf(branches, s, labels)
        if not training:
            return SAGEOutput(fused.logits, None, {}, fused.fused, fused.active)

        cls = F.cross_entropy(fused.logits, labels)  # Eq. 10
        kl, batch_labels = fused.kl_loss, labels
        world = self.mbgf.bank._distributed_world()
        if world > 1:  # data-parallel: the two batch-level terms over the global batch (module docstring)
            group = self.mbgf.bank.process_group
            batch_labels = all_gather_rows(labels, group)
            active = fused.active.sum()
            total = active.clone()
            dist.all_reduce(total, group=group)
            kl = kl * ((world * active).to(kl.dtype) / total.clamp_min(1).to(kl.dtype))
        s_batch = s[batch_labels]  # (B, K)
        cont_attr = _contrastive(s_batch @ attributes, batch_labels, self.tau)  # Eq. 1: a_y = S[y] A
        cont_cls = _contrastive(self.mixer.embed(s_batch @ mixed), batch_labels, self.tau)  # Eq. 2: c_y = φ(S[y] T)
        loss = (
            cls
            + self.lambda_cont * (cont_attr + cont_cls)
            + self.lambda_attr * (attr_sem + attr_vis)
            + self.lambda_align * align
            + self.lambda_kl * kl
        )
        parts = dict(cls=cls, cont_attr=cont_attr, cont_cls=cont_cls, attr_sem=attr_sem, attr_vis=attr_vis,
                     align=align, kl=kl)
        return SAGEOutput(fused.logits, loss, {k: v.detach() for k, v in parts.items()}, fused.fused, fused.active)

    def extra_repr(self) -> str:
        sizes = [int(g.numel()) for g in self.subsets()]
        return (
            f"levels={self.levels}, dim={self.dim}, subsets(global, context, local)={sizes}, scale={self.scale}, "
            f"tau={self.tau}, lambda_cont={self.lambda_cont}, lambda_attr={self.lambda_attr}, "
            f"lambda_align={self.lambda_align}, lambda_kl={self.lambda_kl}, backend={self.backend!r}"
        )
