"""Triton kernels of attribute_attention (the op, its math, its backends and its autograd:
zslfast/ops/attribute_attention.py), split by role:

    helpers.py   the jit helpers the kernels share: the option ids as constants, score tiles and their softmax,
                 products tile by tile, the max's gradient, the shifted softmax gradient, the score epilogue (dot,
                 cosine) and its gradient
    fwd.py       the forward kernels (over the keys; over the queries, after its column lse) and their planner
    bwd.py       the backward kernels (over the keys; the score's; over the queries) and their planner
    config.py    every launch's tiles, warps and stages: one table, each row with its reason

The entry points take the op's arguments in its own order, the options as their ids (zslfast._enums). Each is a
planner (plan_forward, plan_backward: the outputs and the launches, as data: zslfast/triton/_launch.py, which
``python -m zslfast audit`` compiles without a GPU) and its runner. No atomics anywhere: deterministic. Inputs are
addressed through their strides (transposed views are read in place). Accumulation in fp32 (fp64 for fp64, where
tl.dot is replaced by broadcast products: ACC_DTYPE, see zslfast/triton/_common.py); fp32 tl.dot runs "ieee" unless
torch.backends.cuda.matmul.allow_tf32 is on.
"""

from .bwd import backward, plan_backward
from .fwd import forward, plan_forward

__all__ = ["forward", "backward", "plan_forward", "plan_backward"]
