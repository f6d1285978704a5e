"""The timm VisionTransformer check the models that run a ViT's blocks themselves share (SVIPHead, SAGE)."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def check_vit(owner: str, model, attributes: Sequence[str], fixed_grid_reason: str) -> nn.Module:
    """``model`` as a timm VisionTransformer with ``attributes`` (the ones ``owner``'s forward reads) and a fixed
    patch grid (``dynamic_img_size`` off, ``fixed_grid_reason`` saying why), else a TypeError / ValueError naming
    ``owner`` and what is missing."""
    expected = "a timm VisionTransformer"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: backbone must be a timm model name or {expected}, got {type(model).__name__}")
    for attr in attributes:
        if not hasattr(model, attr):
            raise TypeError(f"{owner}: backbone must be {expected}; {type(model).__name__} has no .{attr}")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError(f"{owner}: backbone with dynamic_img_size=True is not supported ({fixed_grid_reason})")
    return model
