"""What every op shares: the ``zslfast`` torch.library fragment and autocast (validation: zslfast/validation.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..validation import accumulator_dtype, check_same_device, check_tensor, compiling, promote, shape_str  # noqa: F401

# The compiled extension (csrc/ops.cpp) owns TORCH_LIBRARY(zslfast) with the raw kernels; the public ops with
# their autograd and fake kernels are defined here, in a fragment of the same namespace.
LIB = torch.library.Library("zslfast", "FRAGMENT")


def register_autocast(name: str, op: Callable, keep: Sequence[int] = ()) -> None:
    """Under autocast, cast the op's floating tensor arguments to the autocast dtype (the kernels accumulate in
    fp32), then run the op with autocast switched off for it, as autocast does for matmul. Arguments at the
    positions in ``keep`` (a temperature, say) keep their dtype: rounding them to bf16 would change the model."""
    for device_type, key in (("cuda", torch._C.DispatchKey.AutocastCUDA), ("cpu", torch._C.DispatchKey.AutocastCPU)):

        def kernel(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            cast = [
                a.to(dtype)
                if i not in keep and isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == _device_type
                else a
                for i, a in enumerate(args)
            ]
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast)

        LIB.impl(name, kernel, key.name)
