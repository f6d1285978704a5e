"""One op, one spec: each op declares what it is, and ``define`` turns that into its torch.library registration.

An :class:`OpSpec` names, for one registered op ``zslfast::<name>``:

    schema          its arguments and results; the last argument is always ``str backend``
    kernels         backend -> the kernel that runs it, called with the schema's arguments minus ``backend``, in
                    the schema's order, each string option (an argument named in zslfast._enums.ENUMS) as its int
                    id: ``define`` converts them, so a kernel takes the op's own contract and needs no adapter
                    ("cpu" and "cuda" name the compiled kernels of zslfast._C, "triton" those of zslfast/triton/)
    composite       instead of kernels: one implementation in PyTorch ops that serves every device and backend
                    (registered as CompositeExplicitAutograd; its schema has no ``backend`` argument)
    reference       the same computation in plain PyTorch (zslfast.reference), same arguments and results: the
                    "reference" backend runs it outside the registered op, so PyTorch's own autograd differentiates it
    gpu_preference  the op's GPU backends, fastest first: the default for CUDA tensors is the first available
    fake            the meta kernel (shapes and dtypes only) torch.compile and opcheck trace with
    backward        with setup_context, the autograd formula (usually a call of the op's ``<name>_backward`` spec)
    autocast        "lower": floating tensors are cast to the autocast dtype (matmul-like ops; the kernels
                    accumulate in fp32), except the argument positions in ``autocast_keep`` (a temperature);
                    "fp32": cast to float32 (softmax/KL-like losses, as PyTorch's own autocast lists do);
                    None: autocast leaves the inputs' dtype alone (the op runs in its inputs' dtype)

Dispatch happens in two places, both here: :meth:`OpSpec.resolve` picks the backend (``_backend.resolve``: the
caller's choice, ``ZSLFAST_BACKEND``, then by device), and the op's CPU/CUDA implementation, registered by
``define``, hands the call to ``kernels[backend]``. No op module holds a backend switch of its own.

The options of the Python API are strings; zslfast._enums maps them to the ints the compiled and Triton kernels
take, and ``define`` converts them on the way to ``kernels[backend]``, the one place that does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from .. import _backend
from .._enums import ENUMS, enum_id

# The compiled extension (csrc/ops.cpp) owns TORCH_LIBRARY(zslfast) with the raw kernels (``_<name>_fwd`` ...);
# the public ops with their autograd and fake kernels are defined here, in a fragment of the same namespace.
LIB = torch.library.Library("zslfast", "FRAGMENT")


def triton_kernel(module: str, function: str) -> Callable:
    """``zslfast.triton.<module>.<function>``, imported at its first call: triton loads only when a Triton kernel
    runs, so CPU-only installs never import it."""

    def kernel(*args):
        return getattr(importlib.import_module(f"zslfast.triton.{module}"), function)(*args)

    kernel.__name__ = f"triton_{module}_{function}"
    kernel.target = (f"zslfast.triton.{module}", function)
    return kernel


def compiled_kernel(name: str) -> Callable:
    """The raw kernel ``torch.ops.zslfast.<name>`` of zslfast._C, looked up at its call (the extension may be
    missing; then no backend that needs it is ever resolved)."""

    def kernel(*args):
        return getattr(torch.ops.zslfast, name)(*args)

    kernel.__name__ = name
    return kernel


@dataclass
class OpSpec:
    name: str
    schema: str
    kernels: Mapping[str, Callable]
    fake: Callable
    composite: Optional[Callable] = None
    reference: Optional[Callable] = None
    gpu_preference: Sequence[str] = ("triton", "cuda")
    backward: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    autocast: Optional[str] = "lower"
    autocast_keep: Sequence[int] = ()
    backends: tuple = field(init=False)

    def __post_init__(self):
        unknown = set(self.kernels) - set(_backend.BACKENDS)
        if unknown:
            raise ValueError(f"{self.name}: kernels for unknown backends {sorted(unknown)}")
        if self.autocast not in ("lower", "fp32", None):
            raise ValueError(f"{self.name}: autocast must be 'lower', 'fp32' or None, got {self.autocast!r}")
        self.backends = tuple(
            b
            for b in _backend.BACKENDS
            if b in self.kernels or (b == "reference" and self.reference) or (b != "reference" and self.composite)
        )

    @property
    def op(self):
        return getattr(torch.ops.zslfast, self.name).default

    def resolve(self, backend: Optional[str], device: torch.device) -> str:
        """The backend that runs this op on tensors of ``device`` (see zslfast/_backend.py)."""
        return _backend.resolve(self.name, backend, device, self.gpu_preference, self.backends)

    def __call__(self, backend: str, *args):
        """Run the op on a resolved ``backend``: the reference in plain PyTorch, else the registered op."""
        if backend == "reference":
            return self.reference(*args)
        if self.composite is not None:
            return self.op(*args)
        return self.op(*args, backend)


def enum_arguments(schema) -> tuple:
    """(position, option name) of each string option of a torch schema: the arguments named in ENUMS, whose values
    the kernels take as ids."""
    options = []
    for position, argument in enumerate(schema.arguments):
        if argument.name in ENUMS:
            if str(argument.type) not in ("str", "Optional[str]"):
                raise TypeError(f"{schema.name}: option {argument.name} must be a str, got {argument.type}")
            options.append((position, argument.name))
    return tuple(options)


def define(spec: OpSpec) -> OpSpec:
    """Register ``spec`` with torch.library: schema, CPU and CUDA implementations (by backend), fake kernel,
    autograd and autocast."""
    LIB.define(spec.name + spec.schema)
    options = enum_arguments(spec.op._schema)

    def implementation(*args):
        *inputs, backend = args
        for position, name in options:
            inputs[position] = enum_id(name, inputs[position])
        return spec.kernels[backend](*inputs)

    implementation.__name__ = f"{spec.name}_by_backend"
    if spec.composite is not None:
        LIB.impl(spec.name, spec.composite, "CompositeExplicitAutograd")
    else:
        for key in ("CPU", "CUDA"):
            LIB.impl(spec.name, implementation, key)
    torch.library.register_fake(f"zslfast::{spec.name}", spec.fake, lib=LIB)
    if spec.backward is not None:
        torch.library.register_autograd(
            f"zslfast::{spec.name}", spec.backward, setup_context=spec.setup_context, lib=LIB
        )
    if spec.autocast is not None:
        _register_autocast(spec)
    return spec


def _register_autocast(spec: OpSpec) -> None:
    """Under autocast, cast the floating tensor arguments (to the autocast dtype, or to fp32), then run the op with
    autocast switched off for it, as autocast does for matmul."""
    op = spec.op
    for device_type, key in (("cuda", torch._C.DispatchKey.AutocastCUDA), ("cpu", torch._C.DispatchKey.AutocastCPU)):

        def kernel(*args, _device_type=device_type, _key=key):
            dtype = torch.float32 if spec.autocast == "fp32" else torch.get_autocast_dtype(_device_type)
            cast = [
                a.to(dtype)
                if i not in spec.autocast_keep
                and isinstance(a, torch.Tensor)
                and a.is_floating_point()
                and a.device.type == _device_type
                else a
                for i, a in enumerate(args)
            ]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast)

        LIB.impl(spec.name, kernel, key.name)
