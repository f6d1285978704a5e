"""What the Triton kernels share: the accumulator dtype as a Triton type (the rule itself: ops/_common.py)."""

import torch
import triton.language as tl

from ..ops._common import accumulator_dtype


def tl_accumulator_dtype(dtype: torch.dtype):
    """tl.float64 for fp64 inputs, tl.float32 for every other floating dtype."""
    return tl.float64 if accumulator_dtype(dtype) == torch.float64 else tl.float32
