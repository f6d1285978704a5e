"""Weights from local files, no hub: a timm backbone from a local checkpoint (``pretrained=path``) and a whole model
from a saved state dict (``checkpoint=path``). The one loading code of ILPG, SVIPHead and SAGE.

    timm_backbone(owner, name, pretrained, argument="pretrained", **kwargs) -> timm model
        pretrained False / True: ``timm.create_model(name, pretrained=pretrained, **kwargs)`` (True downloads);
        a path (str / os.PathLike): timm's own local-file route, ``timm.create_model(name, pretrained=True,
        pretrained_cfg_overlay=dict(file=path), **kwargs)`` (.pth / .bin / .safetensors as timm reads them; the
        classifier head of a checkpoint is dropped by timm when the model is built with num_classes=0), then every
        weight of the model must come from the file (timm alone loads non-strictly when it drops the head).
        timm's own route works too, with timm's checks only: ``pretrained=True,
        backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=path, custom_load=False))`` (custom_load=False:
        timm < 1.0.31 otherwise reads the file as the registry's .npz).
    load_checkpoint(model, path, strict=True) -> model
        a ``torch.save(model.state_dict(), path)`` file (or a dict holding it under "state_dict" or "model"; a
        "module." prefix of DistributedDataParallel is removed), read on the CPU with weights_only=True, checked
        against the model (keys and shapes) before anything is copied, then copied onto the model's device/dtype.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]
_SHOWN = 5  # keys listed per kind in a mismatch error


def is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


def _existing_file(owner: str, argument: str, path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: {argument}={path!r}: no such file ({what})")
    return path


def _listed(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_state_dict(owner: str, argument: str, path: str, state: dict, expected: dict, hint: str,
                     strict: bool = True, ignore_unexpected: tuple = (), check_shapes: bool = True) -> None:
    """ValueError naming ``argument`` and ``path`` when ``state`` (the file's) does not fit ``expected`` (the
    model's state dict): shape mismatches (when ``check_shapes``), missing / unexpected keys when ``strict``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(ignore_unexpected)]
    shapes = [] if not check_shapes else [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    if not strict:
        missing = unexpected = []
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(missing)} missing keys ({_listed(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({_listed(unexpected)})" if unexpected else "",
             f"{len(shapes)} shape mismatches ({_listed(shapes)})" if shapes else ""]
    raise ValueError(
        f"{owner}: {argument}={path!r} does not match the model: {'; '.join(p for p in parts if p)}. {hint}"
    )


def _weights_only_load(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # a torch without weights_only (< 1.13)
        return torch.load(path, map_location="cpu")


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True, *, owner: Optional[str] = None,
                    argument: str = "checkpoint") -> nn.Module:
    """Load a whole-model checkpoint into ``model`` (see the module docstring); returns ``model``.

    FileNotFoundError when ``path`` is not a file; ValueError (keys and shapes listed) when the file does not match
    the model, raised before any weight is copied. ``strict=False`` allows missing and unexpected keys (never a
    shape mismatch)."""
    owner = owner or type(model).__name__
    path = _existing_file(owner, argument, path, f"a state dict saved with torch.save({owner}.state_dict(), path)")
    try:
        state = _weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - pickle / zip / safetensors errors: one clear message
        raise ValueError(
            f"{owner}: {argument}={path!r} could not be read as a weights-only checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{owner}: {argument}={path!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    hint = (f"Was it saved from a {owner} built with other sizes (C, K, hidden or model width), another backbone, "
            "or with / without a built backbone?")
    check_state_dict(owner, argument, path, state, model.state_dict(), hint, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model


def _torch_load_error(error: RuntimeError) -> str:
    """torch's load_state_dict message, its size mismatches as "key: checkpoint (a, b) vs model (c, d)"."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    pattern = (r"^size mismatch for (.+?): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
               r"the shape in current model is torch\.Size\(\[(.*?)\]\)\.?$")
    shapes = [re.sub(pattern, r"\1: checkpoint (\2) vs model (\3)", line) for line in lines[1:]]
    if not shapes:
        return lines[0] if lines else type(error).__name__
    return f"{len(shapes)} mismatches: {_listed(shapes)}"


def check_pretrained(owner: str, argument: str, pretrained) -> None:
    if not isinstance(pretrained, bool) and not is_path(pretrained):
        raise TypeError(
            f"{owner}: {argument} must be False, True (download through timm) or the path of a local timm "
            f"checkpoint, got {type(pretrained).__name__}"
        )


def unused_pretrained(owner: str, argument: str, pretrained, why: str) -> None:
    """A ``pretrained`` path where no backbone is built from a name: a ValueError rather than a file ignored."""
    if is_path(pretrained):
        raise ValueError(f"{owner}: {argument}={os.fspath(pretrained)!r} is a backbone checkpoint, but {why}")


def timm_backbone(owner: str, name: str, pretrained, argument: str = "pretrained", **kwargs) -> nn.Module:
    """``timm.create_model(name, ...)`` with ``pretrained`` False / True / a local checkpoint path (module
    docstring); FileNotFoundError / ValueError naming ``argument`` and the file."""
    import timm

    check_pretrained(owner, argument, pretrained)
    if isinstance(pretrained, bool):
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    path = _existing_file(owner, argument, pretrained, f"a timm checkpoint of the {name!r} backbone")
    # custom_load describes the registry's weights (e.g. a ViT's .npz); older timm keeps it for a file overlay
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=path)
    overlay.setdefault("custom_load", False)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        raise ValueError(
            f"{owner}: {argument}={path!r} does not match the {name!r} backbone built here "
            f"with {kwargs or 'no kwargs'}"
            f" ({_torch_load_error(error)})"
        ) from error
    # timm loads non-strictly once it has dropped the head (num_classes=0): check every weight came from the file
    # (keys only: timm has checked the shapes, after its own adaptation such as a ViT's position-embedding resize)
    from timm.models import load_state_dict

    classifiers = (model.pretrained_cfg or {}).get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    check_state_dict(
        owner, argument, path, load_state_dict(path), model.state_dict(),
        f"Is it a timm checkpoint of {name!r} with these kwargs ({kwargs or 'none'})?",
        ignore_unexpected=tuple(c + "." for c in classifiers), check_shapes=False,
    )
    return model
