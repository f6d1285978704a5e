"""ILPG (Instance-Level Prototype Generation for ZSL) on timm backbones, over zslfast's fused ops.

    regions  I (B, R, Dv)   frozen timm ResNet-101 feature map, 7x7x2048 -> R=49, Dv=2048 (or precomputed)
    g        (B, Dg)        frozen timm DINOv2 ViT-S/14 pooled feature, Dg=384 (or precomputed)
    H        (B, R, de)     AVL's encoder (§3: "we adopt the widely-validated encoder–decoder architecture"), as
                            TransZero's: Linear(Dv, de), then ``encoder_layers`` post-norm transformer layers over the
                            R regions (self-attention, FFN, each with its residual and LayerNorm); de = Da by default
    Ẽ        (B, K)         AVL's decoder, Eq. 2-4: cos(softmax(A W_q (H W_k)ᵀ/√d) H W_v, A),
                            zslfast.attribute_attention
    logits   (B, C)         IDPP + APC, Eq. 5-6: <Ẽ, W ⊙ S + S>, zslfast.prototype_scores (S_W never formed)
    loss                    Eq. 12: IPM + λ_SAS·SAS + λ_VSR·VSR + λ_PCR·PCR (zslfast.losses.ILPGLoss), the VSR and
                            PCR terms fed w[b, y_b] (B, K) only

A (K, Da) are the attribute word vectors (GloVe, Da=300), S (C, K) the class attribute matrix of every class, seen
and unseen. ``backend="reference"`` (or ``set_backend("reference")``) runs every op's plain PyTorch reference:
the same model and parameters, for checking the fused path and for timing against it.

Parameters at CUB (Dv 2048, Da = d = de 300, K 312, C 200, Dg 384, J 512), against the paper's Table 3:
    AVL     1,555,112 = encoder 1,285,112 (Linear 614,700; one layer of 1 head, FFN 512: 670,412) + Eq. 2's W_q,
            W_k, W_v 270,000. Table 3 gives 3.31M for ILPG without IDPP. The paper's text describes no more than
            this; TransZero's code, which the paper's encoder–decoder follows, also has an unused second region
            embedding, an attribute embedding, self-attention and an FFN in its decoder, and its V and W_1: about
            3.2M, near Table 3 but none of it in the paper's equations. ``encoder_layers=0`` leaves the encoder out
            (Eq. 2-4 straight on the regions, 1,318,800 parameters at CUB).
    IDPP    weights="attribute": 357,176 (Table 3's 3.67M - 3.31M = 0.36M); weights="full": 32,208,320.
W's form is the paper's open contradiction: Eq. 5 personalises S, (C, K), by W ⊙ S, and §3 speaks of each
image's own prototype set, which reads as a W per class and attribute ("full"); Table 3's IDPP budget holds only
a W per attribute shared by the classes ("attribute"). The default is "full", zslfast's choice: the most general
reading of Eq. 5, which prototype_scores runs without forming S_W (or W itself, "factored"); weights="attribute"
is the model Table 3 measures.

Choices where the paper is silent: the encoder's width (de = Da), depth (1), heads (1), FFN width (512) and
activation (ReLU) are TransZero's CUB configuration; its dropout is 0 here (TransZero's 0.4: ``encoder_dropout``),
so two runs of one model on two backends take identical steps; no positional encoding (TransZero's geometry
bias is not in the paper).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .._backend import set_module_backend
from ..losses import ILPGLoss
from ..nn.attention import AttributeCrossAttention
from ..nn.prototype import InstancePrototypeClassifier
from ..validation import check_int, check_number, check_width
from ._weights import (
    PathLike, apply_checkpoint, check_pretrained, is_path, read_checkpoint, timm_backbone, unused_pretrained,
)


class ILPGOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) over every class of S
    loss: Optional[torch.Tensor]  # scalar when labels are given
    parts: dict  # the loss terms, detached
    attribute_scores: torch.Tensor  # Ẽ (B, K)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class RegionEncoder(nn.Module):
    """AVL's encoder: regions (B, R, Dv) -> Linear(Dv, dim) -> ``layers`` post-norm transformer encoder layers
    (nn.TransformerEncoderLayer: self-attention over the R regions, ReLU FFN, residuals and LayerNorms) -> (B, R, dim).
    """

    def __init__(self, dim_visual: int, dim: int, layers: int = 1, heads: int = 1, ffn_dim: int = 512,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(dim_visual, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ffn_dim, dropout, batch_first=True) for _ in range(layers)
        )

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        x = self.embed(regions)
        for layer in self.layers:
            x = layer(x)
        return x


def _pretrained_sources(pretrained) -> dict:
    """ILPG's ``pretrained`` -> {"backbone": bool | path, "instance_encoder": bool | path}."""
    names = ("backbone", "instance_encoder")
    if isinstance(pretrained, dict):
        extra = sorted(set(pretrained) - set(names), key=str)
        if extra:
            raise ValueError(f"ILPG: pretrained dict keys must be among {names}, got {extra}")
        sources = {name: pretrained.get(name, False) for name in names}
    elif is_path(pretrained):
        raise ValueError(
            f"ILPG: pretrained={str(pretrained)!r}: ILPG builds two timm models; give their checkpoints as "
            f"pretrained={{'backbone': path_or_bool, 'instance_encoder': path_or_bool}}"
        )
    else:
        sources = dict.fromkeys(names, pretrained)
    for name, source in sources.items():
        check_pretrained("ILPG", f"pretrained[{name!r}]", source)
    return sources


class ILPG(nn.Module):
    """ILPG: AVL (attribute cross-attention, cosine) -> Ẽ; IDPP instance prototypes -> APC logits; ILPG loss.

    Args:
        class_attributes: S (C, K), every class (seen and unseen); a buffer.
        attribute_vectors: A (K, Da), the attribute word vectors; a buffer.
        region_dim: Dv of the region features; signature_dim: Dg of the instance signatures.
        attn_dim: d, the query/key width of the AVL attention (default Da).
        encoder_layers: the AVL encoder's transformer layers (default 1; 0: no encoder, Eq. 2-4 on the regions).
        encoder_dim, encoder_heads, encoder_ffn_dim, encoder_dropout: its width de (default Da), heads, FFN width
            and dropout (module docstring).
        hidden_dim, weights: the instance semantic generator's width and weight form ("full", "attribute",
            "factored"; see zslfast.nn.InstancePrototypeClassifier).
        unseen_classes: (U,) the unseen class ids, for the SAS term (Eq. 9). None: no SAS, and the first forward
            with labels warns once naming ``unseen_classes``; to train without SAS knowingly, give a loss with
            lambda_sas=0 (``loss=ILPGLoss.from_preset("CUB", lambda_sas=0)``).
        loss: an ILPGLoss (default: ILPGLoss.from_preset(preset) when ``preset`` is given, else the CUB weights,
            with ``unseen_classes``).
        backbone, instance_encoder: timm model names, built (frozen) only with ``build_backbones=True``.
        pretrained: the two timm models' weights: False (random, the default here: no downloads), True (timm
            downloads them), or a dict {"backbone": ..., "instance_encoder": ...} of False / True / the path of a
            local timm checkpoint of that model (.pth/.bin/.safetensors; loaded through timm's
            ``pretrained_cfg_overlay=dict(file=path)``, no network). A single path is an error (two models).
        image_size: the input resolution the instance encoder is built for.
        backend: None (fused ops, by device) or "reference".
        checkpoint: None, or the path of a whole-model state dict (``torch.save(model.state_dict(), path)``),
            read first and loaded once the model is built (see zslfast.models._weights); it must match this model's
            sizes and whether its backbones are built.
    """

    def __init__(
        self,
        class_attributes: torch.Tensor,
        attribute_vectors: torch.Tensor,
        *,
        region_dim: int = 2048,
        signature_dim: int = 384,
        attn_dim: Optional[int] = None,
        encoder_layers: int = 1,
        encoder_dim: Optional[int] = None,
        encoder_heads: int = 1,
        encoder_ffn_dim: int = 512,
        encoder_dropout: float = 0.0,
        hidden_dim: int = 512,
        weights: str = "full",
        unseen_classes: Optional[torch.Tensor] = None,
        preset: Optional[str] = None,
        loss: Optional[ILPGLoss] = None,
        build_backbones: bool = False,
        backbone: str = "resnet101",
        instance_encoder: str = "vit_small_patch14_dinov2",
        pretrained: Union[bool, dict] = False,
        image_size: int = 224,
        backend: Optional[str] = None,
        checkpoint: Optional[PathLike] = None,
    ):
        super().__init__()
        saved = None if checkpoint is None else read_checkpoint("ILPG", checkpoint)  # refused before anything is built
        if class_attributes.dim() != 2 or attribute_vectors.dim() != 2:
            raise ValueError(
                f"ILPG: class_attributes must be (C, K) and attribute_vectors (K, Da), got "
                f"{tuple(class_attributes.shape)} and {tuple(attribute_vectors.shape)}"
            )
        C, K = class_attributes.shape
        if attribute_vectors.shape[0] != K:
            raise ValueError(
                f"ILPG: attribute_vectors (K, Da) must have K={K} rows (one per attribute of class_attributes "
                f"{tuple(class_attributes.shape)}), got {tuple(attribute_vectors.shape)}"
            )
        Da = attribute_vectors.shape[1]
        check_int("ILPG", "region_dim", region_dim)
        check_int("ILPG", "encoder_layers", encoder_layers, minimum=0)
        encoder_dim = Da if encoder_dim is None else check_int("ILPG", "encoder_dim", encoder_dim)
        check_int("ILPG", "encoder_heads", encoder_heads)
        check_int("ILPG", "encoder_ffn_dim", encoder_ffn_dim)
        if encoder_dim % encoder_heads:
            raise ValueError(f"ILPG: encoder_dim={encoder_dim} must be a multiple of encoder_heads={encoder_heads}")
        if not 0 <= check_number("ILPG", "encoder_dropout", encoder_dropout) < 1:
            raise ValueError(f"ILPG: encoder_dropout must be in [0, 1), got {encoder_dropout!r}")
        self.region_dim = region_dim
        self.register_buffer("class_attributes", class_attributes.detach().clone())
        self.register_buffer("attribute_vectors", attribute_vectors.detach().clone())
        self.region_encoder = None
        if encoder_layers:
            self.region_encoder = RegionEncoder(region_dim, encoder_dim, encoder_layers, encoder_heads,
                                                encoder_ffn_dim, encoder_dropout)
        avl_in = encoder_dim if encoder_layers else region_dim
        self.avl = AttributeCrossAttention(avl_in, Da, attn_dim or Da, score="cosine", backend=backend)
        self.apc = InstancePrototypeClassifier(
            signature_dim, K, C, hidden_dim=hidden_dim, weights=weights, backend=backend
        )
        if loss is None:
            loss = ILPGLoss.from_preset(preset or "CUB", unseen_classes=unseen_classes)
        self.criterion = loss
        sources = _pretrained_sources(pretrained)
        self.backbone = self.instance_encoder = None
        if build_backbones:
            self.backbone = _frozen(timm_backbone(
                "ILPG", backbone, sources["backbone"], "pretrained['backbone']", num_classes=0, global_pool=""
            ))
            kwargs = {"img_size": image_size} if "vit" in instance_encoder else {}
            self.instance_encoder = _frozen(timm_backbone(
                "ILPG", instance_encoder, sources["instance_encoder"], "pretrained['instance_encoder']",
                num_classes=0, **kwargs
            ))
        else:
            for key, source in sources.items():
                unused_pretrained("ILPG", f"pretrained[{key!r}]", source, "build_backbones=False")
        self.backend = backend  # the submodules were built with it; set_backend switches them all
        if saved is not None:
            apply_checkpoint(self, "ILPG", *saved)

    def set_backend(self, backend: Optional[str]) -> "ILPG":
        return set_module_backend(self, backend)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.backbone, self.instance_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> regions (B, R, Dv), signatures (B, Dg) from the frozen backbones."""
        if self.backbone is None:
            raise ValueError("ILPG: built without backbones (build_backbones=False); pass regions= and signatures=")
        fmap = self.backbone.forward_features(images)  # (B, Dv, h, w)
        regions = fmap.flatten(2).transpose(1, 2)
        return regions, self.instance_encoder(images)

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        *,
        regions: Optional[torch.Tensor] = None,
        signatures: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> ILPGOutput:
        """images (B, 3, H, W), or precomputed regions (B, R, Dv) and signatures (B, Dg); labels (B,) for the loss."""
        if images is not None:
            if regions is not None or signatures is not None:
                raise ValueError("ILPG: give images, or regions and signatures, not both")
            regions, signatures = self.encode(images)
        elif regions is None or signatures is None:
            raise ValueError("ILPG: give images, or both regions (B, R, Dv) and signatures (B, Dg)")
        if regions.dim() != 3 or signatures.dim() != 2 or regions.shape[0] != signatures.shape[0]:
            raise ValueError(
                f"ILPG: regions must be (B, R, Dv) and signatures (B, Dg) with the same B, got "
                f"{tuple(regions.shape)} and {tuple(signatures.shape)}"
            )
        check_width("ILPG", "regions", regions, self.region_dim, "(B, R, Dv)", "Dv")
        check_width("ILPG", "signatures", signatures, self.apc.hidden[0].in_features, "(B, Dg)", "Dg")
        s = self.class_attributes
        if self.region_encoder is not None:
            regions = self.region_encoder(regions)
        e = self.avl(regions, self.attribute_vectors)  # Ẽ (B, K)
        logits, hidden, w = self.apc(e, signatures, s)
        if labels is None:
            return ILPGOutput(logits, None, {}, e)
        w_label = self.apc.label_weights(hidden, labels, w)  # w[b, y_b] (B, K): all VSR and PCR read of w
        total, parts = self.criterion(logits, labels, e, s, w_label)
        return ILPGOutput(logits, total, {k: v.detach() for k, v in parts.items()}, e)
