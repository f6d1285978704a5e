"""Launch configurations as data.

Every Triton launcher in zslfast is split in two: a planner, a pure function of the inputs' shapes, strides and
dtype that allocates the outputs and returns the steps to run, and the runner that runs them. A step is a
:class:`Launch` (kernel, grid, runtime arguments, compile-time constants, num_warps, num_stages, an optional
register budget, and the FLOPs it does) or a plain callable for glue between launches (a fixed-order sum of
partials). ``python -m zslfast audit`` calls the same planners on meta tensors and compiles the same Launch objects
for sm_80/sm_90 with no GPU, so the audit never restates a launcher's arithmetic.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple, Union

import torch


@dataclass
class Launch:
    kernel: Any  # a triton.JITFunction
    grid: Tuple[int, ...]
    args: tuple  # positional runtime arguments: tensors and Python scalars, in the kernel's order
    constexprs: dict  # keyword compile-time constants
    num_warps: int = 4
    num_stages: int = 2
    # registers per thread ptxas may use (PTX .maxnreg); None: ptxas's own choice, which may trade a few spilled
    # bytes for occupancy
    maxnreg: Optional[int] = None
    flops: float = 0.0  # floating-point operations of the whole launch (a model, for the audit's roofline)
    label: str = field(default="")  # what the launch computes, when a kernel is launched in several roles

    def __call__(self) -> None:
        budget = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages,
                               **budget)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def tensors(self) -> List[torch.Tensor]:
        """The distinct tensors it reads or writes (placeholders passed twice count once)."""
        seen, out = set(), []
        for arg in self.args:
            if isinstance(arg, torch.Tensor) and id(arg) not in seen and arg.numel() > 0:
                seen.add(id(arg))
                out.append(arg)
        return out

    def bytes_moved(self) -> int:
        """Each tensor argument read or written once: the traffic floor of the launch (a model)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


Step = Union[Launch, Callable[[], None]]


def run(steps: List[Step]) -> None:
    for step in steps:
        step()
