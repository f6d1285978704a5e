"""What the Triton kernels share: the accumulator flag, block sizes, the SM count grids are sized for and the one
rule that cuts work into chunks to fill it, the dot precision, a matmul that also serves fp64, and the clamped
inverse norm of the cosine epilogues.

The accumulator flag, one name and one meaning in every kernel of zslfast/triton/:

    ACC_DTYPE: tl.constexpr    tl.float64 for fp64 inputs, tl.float32 for every other floating dtype

Launchers pass ``ACC_DTYPE=tl_accumulator_dtype(input.dtype)`` (the rule itself: zslfast/validation.py). Kernels use
it as the dtype of their accumulators, saved statistics and loaded-and-upcast operands (``tl.zeros(..., ACC_DTYPE)``,
``x.to(ACC_DTYPE)``). The code that must differ in fp64 tests ``ACC_DTYPE == tl.float64``, a compile-time branch,
and lives in the helpers here: ``mm`` (tl.dot has no fp64) and ``inv_norm`` (whose fp32 branch asks for the
round-to-nearest sqrt and division explicitly).

Norms never overflow: a sum of squares overflows fp32 for |v| beyond ~1.8e19. The kernels keep the plain
sum (the result wherever it is finite, bit for bit) and take the norm of the rows where it came out inf again, scaled
(cosine_logits: a rescan by the row's max; attribute_attention: sums of 2^-80-scaled values kept alongside).
"""

import torch
import triton
import triton.language as tl

from ..validation import accumulator_dtype


def tl_accumulator_dtype(dtype: torch.dtype):
    """The ACC_DTYPE constant of a launch on ``dtype`` inputs: tl.float64 for fp64, tl.float32 otherwise."""
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
def mm(a, b, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a (M, K) @ b (K, N) in ACC_DTYPE (fp64 by broadcast and sum: tl.dot has no fp64)."""
    if ACC_DTYPE == tl.float64:
        return tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def sqrt_acc(sq, ACC_DTYPE: tl.constexpr):
    """sqrt in ACC_DTYPE, round-to-nearest in fp32 (Triton's default sqrt is the approximate one)."""
    if ACC_DTYPE == tl.float64:
        return tl.sqrt(sq)
    else:
        return tl.sqrt_rn(sq)


@triton.jit
def inv_clamped(norm, eps, ACC_DTYPE: tl.constexpr):
    """1 / max(norm, eps) in ACC_DTYPE, round-to-nearest division in fp32 (Triton's default is the approximate one).

    eps is a compile-time float or a runtime scalar loaded from a tensor of the accumulator dtype. The bound is built
    in ACC_DTYPE: an fp64 op must not see it rounded to fp32 (a plain float *argument* would arrive as fp32 and move
    the clamp of zero rows, and their 1/eps-sized gradients, off the reference's by ~1e-8 relative). A NaN norm
    stays NaN, as in clamp_min (tl.maximum alone would return eps and hide it)."""
    bound = tl.full([], eps, ACC_DTYPE)
    denominator = tl.maximum(norm, bound, propagate_nan=tl.PropagateNan.ALL)
    if ACC_DTYPE == tl.float64:
        return 1.0 / denominator
    else:
        # div_rn does not broadcast, hence the numerator of the denominator's shape.
        return tl.math.div_rn(tl.full(denominator.shape, 1.0, tl.float32), denominator)


@triton.jit
def inv_norm(sq, eps, ACC_DTYPE: tl.constexpr):
    """1 / max(sqrt(sq), eps), the clamp of F.normalize / F.cosine_similarity, in ACC_DTYPE (see inv_clamped)."""
    return inv_clamped(sqrt_acc(sq, ACC_DTYPE), eps, ACC_DTYPE)
