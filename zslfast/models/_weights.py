"""Weights from local files, no hub: a timm backbone from a local checkpoint (``pretrained=path``) and a whole model
from a saved state dict (``checkpoint=path``). The one loading code of ILPG, SVIPHead and SAGE.

Every load is all or nothing. The file is read here on the CPU with weights-only loading (torch.load's
weights_only=True, or safetensors: a pickle that would run code is refused, never run) and checked whole before a
weight is copied: the argument a path (else a TypeError), the file there (else a FileNotFoundError), readable and
parseable, a dict of tensors (a state dict), and against the model every key present and none unexpected, every
shape equal and every dtype fitting (a floating value for a floating entry, cast to the model's; any other entry
its own dtype). Any other failure is a ValueError naming the argument and the file; the model is left as it was.

    timm_backbone(owner, name, pretrained, argument="pretrained", **kwargs) -> timm model
        pretrained False / True: ``timm.create_model(name, pretrained=pretrained, **kwargs)`` (True downloads);
        a path (str / os.PathLike): the file read and checked as above (unwrapped and cleaned as timm does), then
        timm's own local-file route, ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(
        file=path), **kwargs)`` (.pth / .bin / .safetensors; the classifier head of a checkpoint is dropped by timm
        when the model is built with num_classes=0, and timm adapts what it adapts, such as a ViT's position
        embedding), then every weight of the model must have come from the file (timm alone loads non-strictly
        when it drops the head) with a fitting dtype. A failure raises before the model is returned: nothing
        half-loaded is ever seen. timm's own route works too, with timm's checks only: ``pretrained=True,
        backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=path, custom_load=False))`` (custom_load=False:
        timm < 1.0.31 otherwise reads the file as the registry's .npz).
    load_checkpoint(model, path, strict=True) -> model
        a ``torch.save(model.state_dict(), path)`` file (or a dict holding it under "state_dict" or "model"; a
        "module." prefix of DistributedDataParallel is removed), checked against the model as above, then copied
        onto the model's device/dtype. A model's ``checkpoint=`` goes through read_checkpoint before the model is
        built (a bad argument or file fails before any work) and apply_checkpoint once it is.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]
_SHOWN = 5  # keys listed per kind in a mismatch error


def is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


def _existing_file(owner: str, argument: str, path, what: str) -> str:
    if not is_path(path) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{owner}: {argument} must be a path (str or os.PathLike) to {what}, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: {argument}={path!r}: no such file ({what})")
    return path


def _listed(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    """A checkpoint value may go into a model entry: floating into floating (cast), else the same dtype."""
    return value.dtype == target.dtype or (value.is_floating_point() and target.is_floating_point())


def check_state_dict(owner: str, argument: str, path: str, state: dict, expected: dict, hint: str,
                     strict: bool = True, ignore_unexpected: tuple = (), check_shapes: bool = True) -> None:
    """ValueError naming ``argument`` and ``path`` when ``state`` (the file's) does not fit ``expected`` (the
    model's state dict): values that are not tensors (where the model's are), shape mismatches (when
    ``check_shapes``), dtypes that do not fit, missing / unexpected keys when ``strict``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(ignore_unexpected)]
    tensors = [k for k in expected if k in state and isinstance(expected[k], torch.Tensor)]
    values = [f"{k}: {type(state[k]).__name__}" for k in tensors if not isinstance(state[k], torch.Tensor)]
    tensors = [k for k in tensors if isinstance(state[k], torch.Tensor)]
    shapes = [] if not check_shapes else [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in tensors if state[k].shape != expected[k].shape
    ]
    dtypes = [f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
              for k in tensors if not _fits(state[k], expected[k])]
    if not strict:
        missing = unexpected = []
    if not (missing or unexpected or values or shapes or dtypes):
        return
    parts = [f"{len(missing)} missing keys ({_listed(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({_listed(unexpected)})" if unexpected else "",
             f"{len(values)} values that are not tensors ({_listed(values)})" if values else "",
             f"{len(shapes)} shape mismatches ({_listed(shapes)})" if shapes else "",
             f"{len(dtypes)} dtype mismatches ({_listed(dtypes)})" if dtypes else ""]
    raise ValueError(
        f"{owner}: {argument}={path!r} does not match the model: {'; '.join(p for p in parts if p)}. {hint}"
    )


def _weights_only_load(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(owner: str, argument: str, path, what: str, wrappers: Sequence[str] = ("state_dict", "model"),
                    tensors_only: bool = False) -> Tuple[str, dict]:
    """(path as a str, the state dict in the file at ``path``), or a TypeError / FileNotFoundError / ValueError
    naming ``argument`` and the file. A dict holding it under one of ``wrappers`` (the first there) is unwrapped;
    ``tensors_only``: every value must be a tensor (else the model decides which keys hold tensors)."""
    path = _existing_file(owner, argument, path, what)
    try:
        state = _weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - pickle / zip / safetensors / OS errors: one clear message
        raise ValueError(
            f"{owner}: {argument}={path!r} could not be read as a weights-only checkpoint "
            f"({type(error).__name__}{': ' + str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        ) from error
    if isinstance(state, dict):
        for key in wrappers:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{owner}: {argument}={path!r} holds a {type(state).__name__}, not a state dict")
    values = [] if not tensors_only else [
        f"{k}: {type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor)
    ]
    if values:
        raise ValueError(
            f"{owner}: {argument}={path!r} is not a state dict: {len(values)} values that are not tensors "
            f"({_listed(values)})"
        )
    return path, state


def read_checkpoint(owner: str, path, argument: str = "checkpoint") -> Tuple[str, dict]:
    """(path, state dict) of a whole-model checkpoint, read and unwrapped (module docstring), not yet checked
    against a model: the models read their ``checkpoint=`` before building anything, so a bad argument or file
    fails before any work (a backbone built, or downloaded)."""
    what = f"a state dict saved with torch.save({owner}.state_dict(), path)"
    path, state = read_state_dict(owner, argument, path, what)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return path, state


def apply_checkpoint(model: nn.Module, owner: str, path: str, state: dict, strict: bool = True,
                     argument: str = "checkpoint") -> nn.Module:
    """``state`` (from ``path``, read by read_checkpoint) checked against ``model``, then copied into it."""
    hint = (f"Was it saved from a {owner} built with other sizes (C, K, hidden or model width), another backbone, "
            "or with / without a built backbone?")
    check_state_dict(owner, argument, path, state, model.state_dict(), hint, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True, *, owner: Optional[str] = None,
                    argument: str = "checkpoint") -> nn.Module:
    """Load a whole-model checkpoint into ``model`` (see the module docstring); returns ``model``.

    TypeError when ``path`` is not a path, FileNotFoundError when it is not a file, ValueError when the file cannot
    be read or does not fit the model (the keys, values, shapes and dtypes listed): raised before any weight is
    copied, the model left as it was. ``strict=False`` allows missing and unexpected keys (never a value that
    does not fit)."""
    owner = owner or type(model).__name__
    return apply_checkpoint(model, owner, *read_checkpoint(owner, path, argument), strict=strict, argument=argument)


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
    from timm.models import clean_state_dict

    # read and checked here first: weights-only whatever timm's default, and no unreadable file reaches timm
    path, state = read_state_dict(
        owner, argument, pretrained, f"a timm checkpoint of the {name!r} backbone",
        wrappers=("state_dict_ema", "model_ema", "state_dict", "model"), tensors_only=True,  # timm's order
    )
    state = clean_state_dict(state)
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
    # (keys and dtypes only: timm has checked the shapes, after its own adaptation such as a ViT's position-embedding
    # resize); a failure here discards the model, so no half-loaded backbone is ever returned
    classifiers = (model.pretrained_cfg or {}).get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    check_state_dict(
        owner, argument, path, state, model.state_dict(),
        f"Is it a timm checkpoint of {name!r} with these kwargs ({kwargs or 'none'})?",
        ignore_unexpected=tuple(c + "." for c in classifiers), check_shapes=False,
    )
    return model
