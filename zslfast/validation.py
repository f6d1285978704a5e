"""The input contract every layer of zslfast applies: one set of checks, dtype promotion and the accumulator dtype.

Ops, modules, losses, metrics and the generative helpers validate their arguments here, in Python, before any
kernel runs, so every backend receives already-validated input and bad input gives a ``TypeError``/``ValueError``
that names the function, the argument and the shapes it got, never a crash inside a kernel, a silent broadcast
or NaN. Value checks that need a host sync (labels in range) run in eager mode only: under torch.compile they
would be data-dependent branches.

    check_tensor(fn, name, t, ranks, layout)   a floating tensor of one of ``ranks`` dims, none of them empty
    check_labels(fn, name, labels, B, C)       an integer (not bool) tensor (B,) with values in [0, C) -> int64
    check_option(fn, name, value, choices)     one of a set of strings (the Python API's enums)
    check_flag(fn, name, value)                a Python bool
    check_positive(fn, name, value)            a finite Python float > 0 (an eps, a temperature)
    check_start_layer(fn, start_layer, L)      an int in [-L, L) (negative counts from the end) -> in [0, L)
    check_same_device(fn, **tensors)           one device for all tensors given -> that device
    promote(*tensors)                          mixed floating dtypes cast to their common dtype
    accumulator_dtype(dtype)                   what kernels accumulate in: fp64 for fp64, else fp32
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


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
