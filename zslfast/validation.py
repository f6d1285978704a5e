"""The input contract every layer of zslfast applies: one set of checks, dtype promotion and the accumulator dtype.

Ops, modules, losses, metrics and the generative helpers validate their arguments here, in Python, before any
kernel runs, so every backend receives already-validated input and bad input gives a ``TypeError``/``ValueError``
that names the function, the argument and the shapes it got, never a crash inside a kernel, a silent broadcast
or NaN. Value checks that need a host sync (labels in range) run in eager mode only: under torch.compile they
would be data-dependent branches.

    check_tensor(fn, name, t, ranks, layout)   a floating tensor of one of ``ranks`` dims, none of them empty
    check_width(fn, name, t, width, layout, dim)  t's last dimension (named dim in layout) is a module's width
    check_labels(fn, name, labels, B, C)       an integer (not bool) tensor (B,) with values in [0, C) -> int64
    check_option(fn, name, value, choices)     one of a set of strings (the Python API's enums)
    check_flag(fn, name, value)                a Python bool
    check_positive(fn, name, value)            a finite Python float > 0 (an eps, a temperature)
    check_int(fn, name, value, minimum)        a Python int (not a bool) >= minimum: sizes, counts
    check_number(fn, name, value, minimum)     a finite Python number (>= minimum when given): weights, gamma, a threshold
    check_float_dtype(fn, name, dtype)         a floating-point torch.dtype (not a string, not an integer dtype)
    check_path(fn, name, value)                a str or os.PathLike -> pathlib.Path
    check_scale(fn, name, scale, device)       a finite Python float > 0, or a one-element floating tensor
    check_class_ids(fn, name, ids, C)          a non-empty 1-D set of integer class ids in [0, C) -> int64 (lists too)
    check_finite(fn, name, t)                  no NaN or inf in t (before a solver that would fail deep inside torch)
    as_integer_tensor(fn, name, value, ndim)   a tensor, numpy array or list of integer ids -> an int64 tensor
    as_scores(fn, name, value)                 (N, C) scores as a floating tensor, no NaN (-inf allowed: a masked class)
    check_start_layer(fn, start_layer, L)      an int in [-L, L) (negative counts from the end) -> in [0, L)
    check_rollout_options(fn, mode, head_fusion, discard_ratio, normalize)  a rollout's options -> discard_ratio
    check_same_device(fn, **tensors)           one device for all tensors given -> that device
    promote(*tensors)                          mixed floating dtypes cast to their common dtype
    accumulator_dtype(dtype)                   what kernels accumulate in: fp64 for fp64, else fp32
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Optional, Sequence

import torch

from ._enums import choices


def compiling() -> bool:
    """True while torch.compile traces: value checks (a host sync, a data-dependent branch) are skipped then."""
    return torch.compiler.is_compiling()


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def check_tensor(fn: str, name: str, t, ranks: Sequence[int], layout: str, *, allow_empty: bool = False) -> None:
    """``t`` must be a floating tensor of one of ``ranks`` dims (and no empty dimension unless ``allow_empty``);
    ``layout`` names its dims, e.g. "(B, K)"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor {layout}, got dtype {t.dtype}")
    if t.dim() not in ranks:
        raise ValueError(f"{fn}: {name} must be {layout}, got a {t.dim()}-D tensor of shape {shape_str(t)}")
    if not allow_empty and 0 in t.shape:
        raise ValueError(f"{fn}: {name} {layout} is empty, got shape {shape_str(t)}")


def check_width(fn: str, name: str, t: torch.Tensor, width: int, layout: str, dim: str) -> None:
    """The last dimension of ``t`` (a tensor already checked by check_tensor), named ``dim`` in ``layout``, must be
    ``width``: what a module was built for (its Linear layers' in_features, its prototypes' width)."""
    if t.shape[-1] != width:
        raise ValueError(f"{fn}: {name} {layout} must have {dim}={width}, got {dim}={t.shape[-1]} "
                         f"(shape {shape_str(t)})")


def check_labels(
    fn: str, name: str, labels, batch: int, num_classes: int, layout: str = "(B,)", values: bool = True
) -> torch.Tensor:
    """``labels`` as int64: an integer (not bool) tensor of shape (batch,) with values in [0, num_classes).

    The value check (skipped when ``values`` is false, e.g. before a distributed gather checks the gathered labels)
    runs in eager mode only; the kernels mask out-of-range rows under torch.compile.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be an integer torch.Tensor {layout} of class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor {layout} of class ids, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        size = layout.strip("(,)") or "B"
        raise ValueError(f"{fn}: {name} must be {layout} with {size}={batch}, got shape {shape_str(labels)}")
    # One host sync in the common case; min/max only to name the offender (the minimum if negative, else the maximum).
    if values and batch and not compiling() and bool(((labels < 0) | (labels >= num_classes)).any()):
        low, high = int(labels.min()), int(labels.max())
        bad = low if low < 0 else high
        raise ValueError(f"{fn}: {name} holds the label {bad}, outside [0, {num_classes}) (C={num_classes} classes)")
    return labels.long()


def check_option(fn: str, name: str, value, choices: Sequence) -> None:
    """``value`` must be one of ``choices`` (strings, and None where the option may be off)."""
    if not any(value is choice or (isinstance(value, str) and value == choice) for choice in choices):
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_flag(fn: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def check_positive(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a Python float, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{fn}: {name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_int(fn: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(fn: str, name: str, value, minimum: Optional[float] = None) -> float:
    """A finite Python number (not a bool), >= ``minimum`` when given. NaN and inf are refused: compared with
    anything they would silently select nothing or everything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_float_dtype(fn: str, name: str, dtype) -> torch.dtype:
    """A floating-point torch.dtype. A string ("float32") or an integer dtype would otherwise reach ``.to()``,
    which reads a string as a device and silently truncates values to integers."""
    if not isinstance(dtype, torch.dtype):
        named = isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
        raise TypeError(f"{fn}: {name} must be a floating-point torch.dtype, got {type(dtype).__name__} {dtype!r}"
                        + (f" (torch.{dtype}?)" if named else ""))
    if not dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point torch.dtype, got {dtype}")
    return dtype


def check_path(fn: str, name: str, value) -> pathlib.Path:
    """A path given as a str or an os.PathLike (pathlib.Path), as a pathlib.Path."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{fn}: {name} must be a path (str or os.PathLike), got {type(value).__name__}")
    return pathlib.Path(value)


def check_scale(fn: str, name: str, scale, device: Optional[torch.device] = None) -> None:
    """A scale or temperature: a Python number, finite and > 0, or a one-element floating tensor (a learnable
    temperature). A tensor's value is the model's own and is not read: that would be a host sync on every step,
    and a NaN in it already shows as NaN in every output (all of them depend on it). A CPU 0-D tensor may scale
    tensors on another device, as in PyTorch's binary ops; otherwise it must be on ``device``."""
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(
                f"{fn}: {name} must be a Python float or a floating-point one-element tensor, got dtype {scale.dtype}"
            )
        if scale.numel() != 1:
            raise ValueError(
                f"{fn}: {name} must be a Python float or a one-element tensor, got a tensor of shape {shape_str(scale)}"
            )
        if device is not None and scale.device != device and not (scale.device.type == "cpu" and scale.dim() == 0):
            raise ValueError(f"{fn}: all tensors must be on one device, got {name} on {scale.device}, not {device}")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: {name} must be a Python float or a one-element tensor, got {type(scale).__name__}")
    if not 0 < scale < float("inf"):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {scale!r}")


def check_class_ids(fn: str, name: str, ids, num_classes: Optional[int], device=None) -> torch.Tensor:
    """A non-empty 1-D set of integer class ids (a tensor, a numpy array or a list) in [0, num_classes) -> int64 on
    ``device``. The range is checked in eager mode only (and not at all while num_classes is None)."""
    t = torch.as_tensor(ids, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer class ids, got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty 1-D set of class ids, got shape {shape_str(t)}")
    if num_classes is not None and not compiling() and bool(((t < 0) | (t >= num_classes)).any()):
        raise ValueError(
            f"{fn}: {name} must be class ids in [0, {num_classes}) (C={num_classes} classes), "
            f"got ids in {int(t.min())}..{int(t.max())}"
        )
    return t.long()


def check_finite(fn: str, name: str, t: torch.Tensor) -> None:
    """No NaN or inf in ``t`` (eager mode only): for inputs of solvers (SVD, eigh) that would otherwise fail inside
    torch with a LinAlgError, or return garbage for every output instead of NaN where it belongs."""
    if t.numel() and not compiling():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(
                f"{fn}: {name} {shape_str(t)} must be finite, got {int(bad.sum())} NaN/inf value(s)"
            )


def check_start_layer(fn: str, start_layer, num_layers: Optional[int]) -> Optional[int]:
    """One rule for the first layer of a rollout: an int in [-L, L), negative counting from the end as in list
    slicing. Returns it in [0, L); with ``num_layers`` None (L not known yet) only the type is checked."""
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise TypeError(f"{fn}: start_layer must be an int, got {type(start_layer).__name__}")
    if num_layers is None:
        return None
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(
            f"{fn}: start_layer must be in [-L, L) = [-{num_layers}, {num_layers}) for L={num_layers} layers "
            f"(negative counts from the end), got {start_layer}"
        )
    return start_layer % num_layers


def check_rollout_options(fn: str, mode, head_fusion, discard_ratio, normalize) -> float:
    """The options every attention rollout shares (zslfast.attention_rollout, zslfast.nn's module and ViT rollout)
    -> discard_ratio as a float."""
    check_option(fn, "mode", mode, choices("mode"))
    check_option(fn, "head_fusion", head_fusion, choices("head_fusion"))
    check_option(fn, "normalize", normalize, choices("normalize"))
    if mode == "residual" and normalize != "row":
        # residual never divides by row sums, so "none" would be a silent no-op: refused rather than ignored
        raise ValueError(
            f"{fn}: normalize applies to mode 'abnar' only (mode 'residual' never normalises); leave it 'row', "
            f"got normalize={normalize!r}"
        )
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)):
        raise TypeError(f"{fn}: discard_ratio must be a Python number, got {type(discard_ratio).__name__}")
    # comparisons only (no math.isfinite): torch.compile traces a Python float as a SymFloat; NaN fails both
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"{fn}: discard_ratio must be a finite number in [0, 1), got {discard_ratio!r}")
    return float(discard_ratio)


def check_same_device(fn: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
            raise ValueError(f"{fn}: all tensors must be on one device, got {where}")
    return device


def promote(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Cast floating tensors of mixed dtypes to their common dtype (as PyTorch's own binary ops would)."""
    dtype = None
    mixed = False
    for t in tensors:
        if t is not None:
            if dtype is None:
                dtype = t.dtype
            elif t.dtype != dtype:
                dtype = torch.promote_types(dtype, t.dtype)
                mixed = True
    if not mixed:
        return list(tensors)
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate (and keep saved norms, states, partial sums) in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_integer_tensor(fn: str, name: str, value, ndim: int = 1) -> torch.Tensor:
    """``value`` (a tensor, a numpy array or a list) as an int64 tensor of ``ndim`` dims; integer dtypes only."""
    t = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor) and t.numel() == 0:
        t = t.long()  # an empty list comes out as float32
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer class ids, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be a {ndim}-D tensor, got shape {shape_str(t)}")
    return t.long()


def as_scores(fn: str, name: str, value) -> torch.Tensor:
    """(N, C) class scores as a floating tensor (integers become float64). NaN is refused: argmax would silently
    predict the NaN's class; -inf (a class masked out) and +inf are kept."""
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        t = t.double()
    if t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be (N, C) scores, got shape {shape_str(t)}")
    if not compiling() and t.numel() and bool(torch.isnan(t).any()):
        rows = torch.isnan(t).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{fn}: {name} {shape_str(t)} holds NaN scores in {rows.numel()} row(s), the first row {int(rows[0])}"
        )
    return t
