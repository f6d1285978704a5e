"""Which implementation runs an op: the one place that decides.

Backends:
    "reference"  pure PyTorch (zslfast/reference.py), any device, autograd through PyTorch itself
    "cpu"        the compiled C++ kernels of zslfast._C, CPU tensors
    "cuda"       the compiled CUDA kernels of zslfast._C, CUDA tensors
    "triton"     the Triton kernels of zslfast/triton/, CUDA tensors, or CPU tensors when TRITON_INTERPRET=1

``backend=None`` picks by device: CPU tensors -> "cpu" (or "reference" when the extension is missing),
CUDA tensors -> the op's preferred GPU backend among those available. ``ZSLFAST_BACKEND`` in the environment
overrides that default (it is read at each eager call, so tests and scripts can set it late; while torch.compile
traces, the value of the last eager read serves, see :func:`environ`). An explicit backend that cannot run raises
:class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from typing import Optional, Sequence

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (extension not built, no triton, wrong device, ...)."""


def _load_extension():
    """Import zslfast._C if it was built against this torch; otherwise warn once and return the reason."""
    try:
        from . import _build_info
    except ImportError:
        return None, "zslfast._C is not built (run `pip install -e . --no-build-isolation`)"
    if _build_info.TORCH_VERSION != torch.__version__:
        return None, (
            f"zslfast._C was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "installed; rebuild with `pip install -e . --no-build-isolation`"
        )
    try:
        importlib.import_module("zslfast._C")
    except (ImportError, OSError) as exc:
        return None, f"zslfast._C failed to load ({exc}); rebuild with `pip install -e . --no-build-isolation`"
    return _build_info, None


BUILD_INFO, EXTENSION_ERROR = _load_extension()
HAS_EXTENSION = BUILD_INFO is not None
HAS_CUDA_KERNELS = bool(HAS_EXTENSION and BUILD_INFO.WITH_CUDA)
if EXTENSION_ERROR is not None:
    warnings.warn(f"{EXTENSION_ERROR}. zslfast falls back to its PyTorch reference ops.", RuntimeWarning, stacklevel=2)


def extension_warning() -> Optional[str]:
    """A banner for the command-line tools when zslfast._C is not in use (missing, mismatched or failing to load,
    with the import error), else None: a failed build must not pass for a slow run of the fused ops."""
    if EXTENSION_ERROR is None:
        return None
    bar = "!" * 100
    return (
        f"{bar}\n! zslfast's compiled extension is NOT in use: {EXTENSION_ERROR}.\n"
        "! CPU tensors run the PyTorch reference ops instead of the fused C++ kernels.\n"
        f"{bar}"
    )


def _triton_missing_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    return None


TRITON_ERROR = _triton_missing_reason()
HAS_TRITON = TRITON_ERROR is None


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _interpreter_numpy_problem() -> Optional[str]:
    """Why the installed triton's interpreter computes wrong with the installed numpy, or None.

    triton < 3.9 takes ``int()`` of one-element arrays, which numpy >= 2.4 refuses (every kernel looping over a
    runtime bound fails); triton 3.0 silently loads and stores zeros under numpy 2. GPU runs never touch this.
    """
    import numpy
    import triton

    triton_version, numpy_version = _major_minor(triton.__version__), _major_minor(numpy.__version__)
    if triton_version < (3, 1) and numpy_version >= (2, 0):
        need = "numpy<2"
    elif triton_version < (3, 9) and numpy_version >= (2, 4):
        need = "numpy<2.4"
    else:
        return None
    return (
        f"the Triton interpreter of triton {triton.__version__} does not work with numpy {numpy.__version__}: "
        f"install {need} (`pip install '{need}'`) or triton >= 3.9"
    )


INTERPRETER_ERROR = _interpreter_numpy_problem() if HAS_TRITON else None


# The environment settings the dispatch depends on, as last read outside torch.compile (or at import).
_ENVIRON_SEEN = {name: os.environ.get(name) for name in ("ZSLFAST_BACKEND", "TRITON_INTERPRET")}


def environ(name: str) -> Optional[str]:
    """``os.environ.get(name)`` for the dispatch's own settings, safe inside a compiled region.

    torch.compile in torch < 2.5 cannot trace ``os.environ`` (fullgraph fails), and a traced read would be frozen
    into the graph anyway; so while it traces, the value of the last eager read (or of import) serves.
    """
    if torch.compiler.is_compiling():
        return _ENVIRON_SEEN[name]
    value = os.environ.get(name)
    _ENVIRON_SEEN[name] = value
    return value


def triton_interpreted() -> bool:
    return environ("TRITON_INTERPRET") == "1"


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on tensors of ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        return EXTENSION_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        if EXTENSION_ERROR is not None:
            return EXTENSION_ERROR
        if not HAS_CUDA_KERNELS:
            return "zslfast._C was built without CUDA kernels (no CUDA toolkit at build time, or ZSLFAST_CUDA=0)"
        return None
    if backend == "triton":
        if TRITON_ERROR is not None:
            return TRITON_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreted():
                return INTERPRETER_ERROR
            return "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1"
        return f"backend 'triton' does not run on {device} tensors"
    return f"unknown backend {backend!r}; choose one of {BACKENDS} or None"


def why_no_cuda_device() -> Optional[str]:
    """None when torch sees a CUDA device, else why not (a CPU-only torch, or no GPU/driver)."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    return "torch finds no NVIDIA GPU or driver"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on tensors of ``device`` here: none for CUDA tensors without a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and why_no_cuda_device():
        return []
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def check_backend(owner: str, backend: Optional[str]) -> Optional[str]:
    """``backend`` itself when it is None or a known backend name, else a ValueError naming ``owner``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def set_module_backend(module, backend: Optional[str]):
    """Point ``module`` and every zslfast submodule of it that has a ``backend`` attribute (zslfast.nn modules,
    zslfast models) at ``backend``; other submodules (timm backbones, plain torch layers) are left alone."""
    check_backend(type(module).__name__, backend)
    for sub in module.modules():
        if type(sub).__module__.startswith("zslfast.") and hasattr(sub, "backend"):
            sub.backend = backend
    return module


def check_module_backend(owner: str, backend: Optional[str], specs: Sequence) -> Optional[str]:
    """A module's ``backend`` setting: None, "reference", or a kernel backend every op the module runs has (``specs``:
    the ops' OpSpecs, zslfast/ops/, each with its ``name`` and ``backends``).

    Checked when it is set, so ``MemoryBank(backend="triton")`` fails at once (the bank update has no Triton
    kernel) rather than at its first update."""
    check_backend(owner, backend)
    if backend is None:
        return None
    lacking = [spec.name for spec in specs if backend not in spec.backends]
    if lacking:
        raise BackendUnavailableError(
            f"{owner}: backend {backend!r} has no kernel for {', '.join(lacking)}; "
            f"choose one of {tuple(b for b in BACKENDS if all(b in s.backends for s in specs))} or None"
        )
    return backend


def resolve(
    op: str,
    backend: Optional[str],
    device: torch.device,
    gpu_preference: Sequence[str] = ("triton", "cuda"),
    supported: Sequence[str] = BACKENDS,
) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``backend`` is the caller's choice (None = default). The default honours ``ZSLFAST_BACKEND`` first, then
    picks by device. ``gpu_preference`` is the op's own order of GPU backends, fastest first; ``supported`` the
    backends the op has kernels for (an explicit request for another is an error, an environment default that
    names one falls back to the op's own default).
    """
    if backend is None:
        backend = environ("ZSLFAST_BACKEND") or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"ZSLFAST_BACKEND={backend!r} is not a backend; choose one of {BACKENDS}")
        if backend is not None and backend not in supported:
            backend = None
    if backend is not None:
        check_backend(op, backend)
        if backend not in supported:
            raise BackendUnavailableError(f"{op} has no {backend!r} kernel; its backends are {tuple(supported)}")
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is not available: {reason}")
        return backend
    if device.type == "cpu":
        return "cpu" if HAS_EXTENSION and "cpu" in supported else "reference"
    if device.type == "cuda":
        for candidate in gpu_preference:
            if why_unavailable(candidate, device) is None:
                return candidate
    return "reference"
