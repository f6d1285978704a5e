"""Each paper's training recipe, the run's settings, and how ``train`` builds each model and feeds it.

    RECIPES[model] -> Recipe        the paper's optimiser, rate, batch, epochs, schedule, with its source (printed
                                    by ``python -m zslfast train --help`` and written to config.json)
    Settings                        every setting of a run (config.json's "settings"); RUNTIME: those a resumed
                                    run may change (where it runs, not what it computes)
    SPECS[model] -> ModelSpec       build_extractor (the frozen backbones: their features are cached),
                                    build_model (what trains), inputs (a batch -> the forward's keywords),
                                    data_config (timm's resolve_data_config of the backbone that reads the images)

ILPG and SAGE keep their backbones frozen (ILPG: ResNet-101 regions and a DINOv2 signature, §3; SAGE: its ViT, the
model's default train_backbone=False), so ``train`` extracts their features once (zslfast.training.cache) and
trains the head alone (ILPG(build_backbones=False), SAGE(backbone=None)) on them; with ``--no-cache`` the same
frozen extractor runs on every batch instead. SVIP fine-tunes its ViT (Eq. 12 runs it twice per step), so it
trains on the images every epoch, with timm's training transform (augmentation); evaluation uses timm's eval
transform. SVIP's Eq. 11 softmax runs over the seen classes: it trains with the seen classes' attributes and scores
every class of the split at evaluation (forward(class_attributes=...)); ILPG and SAGE score every class in both
(ILPG's SAS term reads the unseen classes' logits; SAGE's Eq. 10 runs over all C).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Union

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str  # "sgd", "adam" or "adamw"
    lr: float
    momentum: float  # SGD's (unused by Adam)
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str  # "constant" or "cosine" (CosineAnnealingLR over the epochs, stepped per epoch)
    image_size: int
    source: str


RECIPES = {
    "ilpg": Recipe("sgd", 1e-4, 0.9, 1e-4, 50, 100, "constant", 224,
                   "ILPG §5 (Experimental Setup): SGD, momentum 0.9, weight decay 1e-4, initial learning rate 1e-4, "
                   "batch size 50, 100 epochs; 224x224 (Table 3). The paper names no schedule after the initial "
                   "rate: constant (zslfast's choice)."),
    "svip": Recipe("sgd", 1e-3, 0.9, 1e-4, 32, 30, "cosine", 224,
                   "SVIP §4.1 (Implementation): ViT-Base at 224x224 on ImageNet-1k weights, fine-tuned; λ1, λ2 and σ "
                   "are SVIPHead's defaults. The paper gives no optimiser, rate, batch or epochs: zslfast's choice is "
                   "SGD, momentum 0.9, weight decay 1e-4 (ILPG's), lr 1e-3, batch 32, 30 epochs, cosine schedule."),
    "sage": Recipe("adam", 1e-4, 0.0, 0.0, 32, 30, "constant", 224,
                   "SAGE (Experiments): a pretrained ViT and Word2Vec attribute vectors; its main text gives no "
                   "optimiser, rate, batch or epochs: zslfast's choice is Adam, lr 1e-4, no weight decay, batch 32, "
                   "30 epochs, constant rate; the ViT frozen (SAGE's train_backbone=False), its hidden states cached."),
}


@dataclasses.dataclass
class Settings:
    """Every setting of a run, as config.json stores it (paths as given, the recipe's values filled in)."""

    model: str
    data: str
    images: str
    out: str
    backbone: str
    backbone_weights: str  # "timm" (timm's pretrained weights, downloaded once), "none" (random), or a file
    encoder: Optional[str]  # ILPG's instance encoder (DINOv2)
    encoder_weights: Optional[str]
    image_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int  # the global batch (under torchrun: split over the processes)
    epochs: int
    schedule: str
    seed: int
    gamma: Union[str, float]  # "val": chosen on the validation split, epoch by epoch; or a fixed value
    val_holdout: float  # the fraction of each train_loc class held out as the validation's seen images
    amp: str  # "none" or "bf16"
    compile: bool
    cache: bool
    cache_dtype: str
    eval_batch_size: int
    preset: Optional[str] = None
    word_vectors: Optional[str] = None
    attribute_names: Optional[str] = None
    device: str = "cpu"
    workers: int = 0
    cache_dir: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# a resumed run may change these: where it runs and finds its files, not what it computes
RUNTIME = ("device", "workers", "cache_dir", "data", "images")


def pretrained(source: Optional[str]):
    """--backbone-weights -> the models' ``pretrained``: True (timm), False (random) or a file's path."""
    return {"timm": True, "none": False}.get(source, source)


def _default(cls, argument: str) -> str:
    return inspect.signature(cls.__init__).parameters[argument].default


def data_config(module: nn.Module, image_size: int) -> dict:
    """timm's data config of the backbone (mean, std, interpolation, crop) at image_size x image_size."""
    from timm.data import resolve_data_config

    return resolve_data_config({"input_size": (3, image_size, image_size)}, model=module)


class ModelSpec:
    """How ``train`` builds and feeds one paper's model (module docstring)."""

    name: str
    cached: bool  # frozen backbones: extract once, train the head on the features
    seen_only: bool = False  # the training softmax over the seen classes only (SVIP's Eq. 11)

    def default_backbone(self) -> str:
        raise NotImplementedError

    def default_encoder(self) -> Optional[str]:
        return None

    def build_extractor(self, s: Settings, S: torch.Tensor, W: torch.Tensor):
        """(the module holding the frozen backbones (eval mode), {name: each frozen backbone}, fn(images) ->
        {name: (B, ...)}, the backbone whose data config reads the images, info for build_model)."""
        raise NotImplementedError

    def build_model(self, s: Settings, S: torch.Tensor, W: torch.Tensor, unseen: torch.Tensor, shapes: dict,
                    info: dict) -> nn.Module:
        raise NotImplementedError

    def inputs(self, batch: dict) -> dict:
        return batch


class _ILPG(ModelSpec):
    name, cached = "ilpg", True

    def default_backbone(self):
        from ..models import ILPG

        return _default(ILPG, "backbone")

    def default_encoder(self):
        from ..models import ILPG

        return _default(ILPG, "instance_encoder")

    def build_extractor(self, s, S, W):
        from ..models import ILPG

        sources = {"backbone": pretrained(s.backbone_weights), "instance_encoder": pretrained(s.encoder_weights)}
        model = ILPG(S, W, build_backbones=True, backbone=s.backbone, instance_encoder=s.encoder,
                     pretrained=sources, image_size=s.image_size).eval()

        def extract(images):
            regions, signatures = model.encode(images)
            return {"regions": regions, "signatures": signatures}

        frozen = {"backbone": model.backbone, "instance_encoder": model.instance_encoder}
        return model, frozen, extract, model.backbone, {}

    def build_model(self, s, S, W, unseen, shapes, info):
        from ..models import ILPG

        return ILPG(S, W, region_dim=shapes["regions"][-1], signature_dim=shapes["signatures"][-1],
                    unseen_classes=unseen, preset=s.preset)


class _SAGE(ModelSpec):
    name, cached = "sage", True

    def default_backbone(self):
        from ..models import SAGE

        return _default(SAGE, "backbone")

    def build_extractor(self, s, S, W):
        from ..models import SAGE

        model = SAGE(S, s.backbone, attribute_word_embeddings=W, build_backbone=True,
                     pretrained=pretrained(s.backbone_weights), img_size=s.image_size).eval()

        def extract(images):
            return {"hidden_states": torch.stack(model.hidden_states(images), dim=1)}  # (B, L, P+N, D)

        info = dict(embed_dim=model.embed_dim, num_prefix_tokens=model.num_prefix_tokens,
                    grid_size=list(model.grid_size), levels=len(model.levels))
        return model, {"backbone": model.backbone}, extract, model.backbone, info

    def build_model(self, s, S, W, unseen, shapes, info):
        from ..models import SAGE

        return SAGE(S, None, attribute_word_embeddings=W, embed_dim=info["embed_dim"],
                    num_prefix_tokens=info["num_prefix_tokens"], grid_size=tuple(info["grid_size"]),
                    levels=tuple(range(-info["levels"], 0)))

    def inputs(self, batch):
        return {"hidden_states": batch["hidden_states"].transpose(0, 1)}  # (L, B, P+N, D)


class _SVIP(ModelSpec):
    name, cached, seen_only = "svip", False, True

    def default_backbone(self):
        from ..models import SVIPHead

        return _default(SVIPHead, "backbone")

    def build_model(self, s, S, W, unseen, shapes, info):
        from ..models import SVIPHead

        return SVIPHead(S, s.backbone, attribute_word_embeddings=W, pretrained=pretrained(s.backbone_weights),
                        img_size=s.image_size)


SPECS = {spec.name: spec for spec in (_ILPG(), _SVIP(), _SAGE())}


def optimizer_and_schedule(s: Settings, parameters) -> tuple:
    """(optimizer, scheduler) of the settings over ``parameters``; the scheduler steps once per epoch."""
    if s.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        kind = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
        optimizer = kind(parameters, lr=s.lr, weight_decay=s.weight_decay)
    if s.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    return optimizer, scheduler


def _constant(epoch: int) -> float:
    return 1.0

