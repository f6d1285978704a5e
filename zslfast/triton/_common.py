"""What the Triton kernels share: the accumulator dtype as a Triton type (the rule itself: zslfast/validation.py), block
sizes, the SM count grids are sized for and the one rule that cuts work into chunks to fill it, the dot precision,
a matmul that also serves fp64, and the clamped inverse norm of the cosine epilogues."""

import torch
import triton
import triton.language as tl

from ..validation import accumulator_dtype


def tl_accumulator_dtype(dtype: torch.dtype):
    """tl.float64 for fp64 inputs, tl.float32 for every other floating dtype."""
    return tl.float64 if accumulator_dtype(dtype) == torch.float64 else tl.float32


def block_size(size: int, cap: int) -> int:
    """The power of two covering ``size``, between 16 (tl.dot's minimum) and ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


H200_SMS = 132  # the largest GPU zslfast targets: launchers size their grids so that every SM gets programs


def split(units: int, tiles: int, programs: int, granule: int = 1):
    """(chunks, units per chunk): ``units`` (a batch, rows) cut into fixed chunks, each a multiple of ``granule``,
    so that ``tiles`` x chunks reaches ``programs`` programs where the units allow. A function of the shapes only,
    so results that are summed over the chunks afterwards stay the same on every GPU."""
    wanted = max(1, min(triton.cdiv(units, granule), triton.cdiv(programs, tiles)))
    per_chunk = max(granule, units // wanted // granule * granule)  # rounded down: at least `wanted` chunks
    return triton.cdiv(units, per_chunk), per_chunk


def dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def mm(a, b, FP64: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a (M, K) @ b (K, N) with a float accumulator (fp64 by broadcast and sum: tl.dot has no fp64)."""
    if FP64:
        return tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def inv_norm(sq, EPS: tl.constexpr, FP64: tl.constexpr):
    """1 / max(sqrt(sq), EPS), the clamp of F.normalize / F.cosine_similarity."""
    # The bound is built in the accumulator's dtype: a plain float argument would arrive as fp32 and move the
    # clamp of zero rows (and their 1/eps-sized gradients) off the reference's by ~1e-8 relative in fp64.
    if FP64:
        eps = tl.full([], EPS, tl.float64)
        return 1.0 / tl.maximum(tl.sqrt(sq), eps)
    else:
        # Round-to-nearest sqrt and division: Triton's defaults are the approximate ones. div_rn does not
        # broadcast, hence the numerator of the denominator's shape.
        eps = tl.full([], EPS, tl.float32)
        denominator = tl.maximum(tl.sqrt_rn(sq), eps)
        return tl.math.div_rn(tl.full(denominator.shape, 1.0, tl.float32), denominator)
