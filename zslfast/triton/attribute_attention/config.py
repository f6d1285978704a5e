"""Launch configurations of attribute_attention's kernels: every launch's tiles, warps, pipeline stages and register
budget come from the one table here, each row with its reason. The planners (fwd.py, bwd.py) ask
:func:`launch_config`, and nothing else sets a tile, a warp count, a stage count or a budget.

A launch is keyed by its kernel, its R tile (the range of BLOCK_R the row covers) and tags: "16-bit" (fp16 or bf16
inputs) or "fp32", and "tf32" beside it where fp32 products run on tensor cores (torch's allow_tf32, as
``torch.set_float32_matmul_precision("high")`` sets it: another register layout), "max" (a returned max; in the
backward, a max whose gradient is given), "options" (the relu or a max), "bias" (an additive bias), "no-softmax",
"attention" (in the forward, a returned map: the attention or the logits), "attention-grad" (in the backward, a
given gradient of the returned map) and "R-tiled" (R longer than the widest R tile). The first row whose kernel
and range match, and whose tags the launch all has, wins.

The R tile itself is a rule of the shapes, not a row (a row may only cap it, block_r: the launch then runs over R
tiles of that width):
    row kernels      (a program owns BLOCK_K query rows and loops over R)  BLOCK_R = R's power of two, 16 to
                     MAX_BLOCK_R: one tile holds a whole row up to ViT's 197 tokens (-> 256), an exact softmax in
                     registers; longer rows (ViT-384's 577) run over R tiles
    column kernels   (a program owns BLOCK_R tokens and loops over K)  the widest of 64, 32, 16, at most the row
                     kernels' BLOCK_R, whose grid (R / BLOCK_R, B) still gives every SM of an H200 a program
The K, D and Dv tiles are the sizes' powers of two, 16 (tl.dot's minimum) to the row's caps.

Why the rows say what they say: ``python -m zslfast audit`` compiles every launch of the op's audit plan
(zslfast/testing.py) for sm_80 and sm_90 and reads registers and spills from the cubins; each row is the cheapest
setting found with no spill there, with each triton that CI's stacks install (the audit runs in CI), and with every
launch still spill-free when limited to 7/8 of its ceiling (its budget, or the hardware's 255 registers per thread,
128 at sixteen warps): room for a later compiler's code to grow. fp64 launches (broadcast products instead of
tl.dot, far more registers; not audited) keep ptxas's own choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

import torch
import triton

from ..._enums import LogitActivation, ReturnMax, SoftmaxOver
from .._common import H200_SMS, block_size, dot_precision

MAX_BLOCK_R = 256  # the widest R tile of the row kernels (tests lower it to reach the R-tiled paths on small R)
COLUMN_R_TILES = (64, 32, 16)  # the column kernels' R tiles, widest first

# the kernels whose programs own query rows (R tile: the row rule) and those owning tokens (the column rule)
ROW_KERNELS = ("forward", "queries_forward", "rows_backward", "score_backward", "queries_rows_backward")
COLUMN_KERNELS = ("column_lse", "columns_backward", "queries_columns_backward")


@dataclass(frozen=True)
class Config:
    kernels: Tuple[str, ...]  # the kernels it configures (their names without _kernel)
    r_tile: Tuple[int, int]  # the BLOCK_R range it covers, both ends included
    when: FrozenSet[str]  # tags the launch must have (all of them)
    block_k: int  # caps of BLOCK_K, BLOCK_D and BLOCK_DV (0: the kernel has no such tile)
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int
    min_ctas: Optional[int]  # CTAs per SM its register budget keeps (as CUDA's __launch_bounds__); None: no budget
    why: str
    block_r: Optional[int] = None  # a cap of BLOCK_R below the shape rule's (None: the rule's)

    @property
    def max_registers(self) -> Optional[int]:
        """The register budget per thread (PTX .maxnreg) that keeps min_ctas CTAs on an SM's 64 K registers."""
        if self.min_ctas is None:
            return None
        return min(255, 65536 // (32 * self.num_warps * self.min_ctas) // 8 * 8)


def _row(kernels, r_tile, block_k, block_d, block_dv, num_warps, num_stages, why, when=(), min_ctas=None,
         block_r=None):
    return Config(tuple(kernels.split()), r_tile, frozenset(when), block_k, block_d, block_dv, num_warps,
                  num_stages, min_ctas, why, block_r)


# Register budgets (min_ctas): without one, ptxas picks a kernel's register count itself and may squeeze it below
# what the kernel needs, for occupancy, spilling a few bytes; which launches it squeezes moves from one triton (and
# its ptxas) to the next. With a budget ptxas spills only past it, and each budget here leaves an eighth of itself
# spare. The column kernels at 16- and 32-token tiles keep two CTAs per SM: the column rule picks those tiles only
# where 64 would leave SMs idle, so their grid has fewer than two programs per SM, and two CTAs lose nothing.

NARROW, WIDE, COLUMNS, UNDER_FILLED = (16, 64), (128, 256), (16, 64), (16, 32)

TABLE = (
    # ------------------------------------------------------------------------------------------------ forward
    _row("forward queries_forward", NARROW, 32, 32, 32, 8, 1, when=("bias",), min_ctas=1,
         why="as below, with the bias's tile: a second stage's buffers spill, and ptxas's own choice squeezes it "
             "into 128 registers (two CTAs), which leave no eighth spare (triton 3.8): all 255"),
    _row("forward queries_forward", NARROW, 32, 32, 32, 8, 2,
         "a 32 x 64 score tile and 64 x 32 operand tiles over eight warps; four warps, or 64-wide K and D tiles, "
         "spill"),
    _row("forward queries_forward", WIDE, 16, 16, 16, 8, 1, when=("R-tiled", "bias"), min_ctas=1, block_r=128,
         why="over R tiles with a bias, its tile beside the running statistics: four warps leave no eighth of "
             "their 255 registers spare; eight, with all 255 (one CTA per SM either way), over 256-token tiles "
             "too over the queries (triton 3.8): 128-token ones, the same work"),
    _row("forward", WIDE, 16, 16, 16, 8, 1, when=("R-tiled", "no-softmax"), min_ctas=1,
         why="over R tiles without a softmax: four warps, whose registers ptxas's own choice squeezes to 128, "
             "spill; eight, within 255"),
    _row("forward queries_forward", WIDE, 16, 16, 16, 8, 1, when=("bias",), min_ctas=1,
         why="a whole row of ViT's tokens with a bias: four warps spill (ptxas's own choice squeezes them) or, "
             "with all 255 registers, leave no eighth spare (triton 3.7, 3.8); eight, with all 255"),
    _row("forward queries_forward", WIDE, 16, 16, 16, 8, 1, when=("fp32", "attention"), min_ctas=1, block_r=128,
         why="a returned map in fp32 (tl.dot's FMA path): a whole row of ViT's tokens spills 1.3 KB at four warps "
             "and all 255 registers, ~140 B at eight (triton 3.6); 128-token tiles at eight warps fit in 7/8, "
             "at the cost of the R-tiled path's second pass over the tiles"),
    _row("forward", WIDE, 16, 16, 16, 4, 1, when=("fp32", "max"), min_ctas=2,
         why="as below; with a max in fp32 it needs 150 to 200 registers, and ptxas's own choice may squeeze it "
             "into 128 (four CTAs) and spill: all 255 (two CTAs at least, three where it needs at most 168)"),
    _row("forward queries_forward", WIDE, 16, 16, 16, 8, 1, when=("R-tiled", "attention"), min_ctas=1,
         why="a returned map over R tiles: four warps (eight over the queries), which ptxas's own choice "
             "squeezes into 128 registers, spill 8-16 B in 16-bit inputs (triton 3.9, sm_90); eight, within 255"),
    _row("queries_forward", WIDE, 16, 16, 16, 8, 1, when=("R-tiled", "max"),
         why="over R tiles with a max, the running max and arg-max stay live beside the P @ v operands: four "
             "warps spill"),
    _row("forward queries_forward", WIDE, 16, 16, 16, 4, 1,
         "a whole row of ViT's tokens (256) in one tile, so sixteen query rows a program; eight warps spill in "
         "16-bit inputs, and a second pipeline stage's operand buffers cost the registers that spill"),
    _row("column_lse", COLUMNS, 32, 16, 0, 8, 1,
         "the columns kernels' tiles (its lse is theirs to read); a second stage's buffers spill"),
    # ----------------------------------------------------------------------------------------------- backward
    _row("score_backward", NARROW, 32, 32, 16, 8, 2, min_ctas=3,
         why="the rows kernels' tiles and grid; a small epilogue (the score's sums, dE) that ptxas's own choice "
             "squeezes into 64 registers, its need, and may spill: 80"),
    _row("score_backward", WIDE, 16, 16, 16, 16, 1, when=("16-bit",), min_ctas=2,
         why="the rows kernels' tiles and grid: 64 registers (two CTAs of sixteen warps), half again its need"),
    _row("score_backward", WIDE, 16, 16, 16, 8, 1, min_ctas=3,
         why="the rows kernels' tiles and grid: 80 registers, as above"),
    _row("queries_rows_backward", NARROW, 16, 16, 16, 8, 2, when=("fp32", "bias"), min_ctas=1,
         why="as the next row, where ptxas's own choice may squeeze it into 128 registers (triton 3.8): all 255, "
             "and D tiles of 16 (32 leave no eighth spare, triton 3.9)"),
    _row("rows_backward", NARROW, 16, 32, 16, 8, 2, when=("bias",),
         why="as below with a bias: 32-row K tiles spill in fp32 (one stage as well) and leave no eighth spare in "
             "bf16 (triton 3.9); a budget of all 255 registers spills too (triton 3.8's ptxas), its own choice "
             "does not"),
    _row("rows_backward", NARROW, 16, 32, 16, 8, 2, when=("attention-grad",),
         why="as below with the returned map's gradient: 32-row K tiles spill 16-48 B in fp32 on sm_90 (triton "
             "3.6); 16-row ones, as with a bias"),
    _row("rows_backward queries_rows_backward", NARROW, 32, 32, 16, 8, 2,
         "the forward's score tile, with dE, dP and the softmax's gradient live beside it: Dv tiles of 16"),
    _row("rows_backward", WIDE, 16, 16, 16, 8, 1, when=("bias", "R-tiled"), min_ctas=1, block_r=128,
         why="with a bias over R tiles, 256-token tiles spill at eight warps and all 255 registers (sixteen "
             "warps: more); 128-token tiles (the same work: the R tiles cover R either way) fit in 7/8 of them"),
    _row("rows_backward", WIDE, 16, 16, 16, 8, 1, when=("attention-grad",), min_ctas=1, block_r=128,
         why="with the returned map's gradient (a bias or not), a whole row of ViT's tokens spills 8-112 B (or "
             "leaves no eighth spare) in either dtype: over 128-token tiles, which costs the first pass over the "
             "R tiles (S and dP once more)"),
    _row("queries_rows_backward", WIDE, 16, 16, 16, 8, 1, when=("tf32", "bias"), min_ctas=1, block_r=128,
         why="as below on tensor cores (tf32), where ptxas's own choice squeezes it into 128 registers and spills "
             "32 B (triton 3.6, sm_90): all 255"),
    _row("queries_rows_backward", WIDE, 16, 16, 16, 8, 1, when=("fp32", "bias"), block_r=128,
         why="with a bias in fp32, 256-token tiles spill on sm_90 (triton 3.7); 128-token ones cost nothing: this "
             "kernel runs over R tiles on every R"),
    _row("rows_backward", WIDE, 16, 16, 16, 8, 1, when=("16-bit", "bias"), min_ctas=1,
         why="a whole row of ViT's tokens with a bias in 16-bit inputs: sixteen warps spill in their 128 "
             "registers; eight, with all 255"),
    _row("rows_backward", WIDE, 16, 16, 16, 16, 1, when=("16-bit", "no-softmax"), min_ctas=1,
         why="without a softmax in 16-bit inputs, ptxas's own choice squeezes sixteen warps into 64 registers "
             "and spills: all 128"),
    _row("rows_backward", WIDE, 16, 16, 16, 8, 1, when=("16-bit", "options", "R-tiled"), min_ctas=1,
         why="over R tiles with the relu or a max, sixteen warps fill their 128 registers: eight, with all 255 "
             "(one CTA per SM either way), a fifth of them spare"),
    _row("rows_backward queries_rows_backward", WIDE, 16, 16, 16, 16, 1, when=("16-bit",),
         why="a whole row of ViT's tokens: sixteen warps in 16-bit inputs, eight spill; one stage, as the forward"),
    _row("rows_backward queries_rows_backward", WIDE, 16, 16, 16, 8, 1, when=("tf32",), min_ctas=1,
         why="as below on tensor cores (tf32), where ptxas's own choice squeezes it into 128 registers and spills "
             "16-48 B (triton 3.6): all 255"),
    _row("rows_backward queries_rows_backward", WIDE, 16, 16, 16, 8, 1,
         "a whole row of ViT's tokens in fp32/fp64: eight warps (sixteen spill); one stage, as the forward"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 1, when=("bias",), min_ctas=1,
         why="as below, with the bias's tile: ptxas's own choice squeezes two stages into 128 registers and "
             "spills: one stage, within all 255"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 1, when=("no-softmax",), min_ctas=1,
         why="without a softmax, ptxas's own choice squeezes two stages into 64 registers and spills (triton 3.8): "
             "one stage, within all 255 (it takes ~125: two CTAs per SM still)"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 1, when=("attention-grad",), min_ctas=1,
         why="with the returned map's gradient, two stages spill 32 B in fp32 (triton 3.9, sm_90), and ptxas's "
             "own choice squeezes one stage into 128 registers beside the options (16 B, triton 3.6): one stage, "
             "within all 255"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 2, when=("16-bit", "options"),
         why="64-token tiles in 16-bit inputs keep two stages with the options: one spills"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 1, when=("options",),
         why="the relu's select and the max's gradient cost a second stage's buffers, which spill"),
    _row("columns_backward", (64, 64), 32, 16, 16, 8, 2,
         "32 x 16 operand tiles over 64 tokens"),
    _row("columns_backward", (32, 32), 32, 16, 16, 8, 1, when=("no-softmax",), min_ctas=1,
         why="without a softmax at 32-token tiles, two CTAs' 128 registers spill 8-16 B in fp32 (triton 3.7, "
             "3.9): one stage within all 255 (it takes 80 to 155)"),
    _row("columns_backward", UNDER_FILLED, 32, 16, 16, 8, 1, when=("attention-grad",), min_ctas=1,
         why="with the returned map's gradient, two CTAs' 128 registers leave no eighth spare (fp32, triton "
             "3.6): one stage within all 255"),
    _row("columns_backward", UNDER_FILLED, 32, 16, 16, 8, 1, when=("options",), min_ctas=2,
         why="as the 64-token tiles with the options, within two CTAs' registers"),
    _row("columns_backward", (32, 32), 16, 16, 16, 8, 2, when=("fp32",), min_ctas=2,
         why="32-token tiles in fp32: 32-row K tiles fill two CTAs' 128 registers and spill 8 B (triton 3.8, 3.9) "
             "or leave no eighth spare; one stage leaves none either (3.9): 16-row K tiles, two stages"),
    _row("columns_backward", UNDER_FILLED, 32, 16, 16, 8, 2, min_ctas=2,
         why="as the 64-token tiles, within two CTAs' registers"),
    _row("queries_columns_backward", (64, 64), 16, 16, 16, 8, 2, when=("bias",), min_ctas=1,
         why="as below, with the bias's tile: ptxas's own choice squeezes it into 128 registers and spills: all "
             "255 (one CTA per SM)"),
    _row("queries_columns_backward", (64, 64), 16, 16, 16, 8, 1, when=("fp32", "attention-grad"), min_ctas=1,
         why="with the returned map's gradient in fp32, two stages take 240 registers, no eighth of 255 spare "
             "(triton 3.9): one stage, within all 255"),
    _row("queries_columns_backward", (64, 64), 16, 16, 16, 8, 2, when=("tf32",), min_ctas=1,
         why="as below on tensor cores (tf32), where ptxas's own choice squeezes it into 128 registers and spills "
             "64-72 B with a max (triton 3.6, sm_80): all 255"),
    _row("queries_columns_backward", (64, 64), 16, 16, 16, 8, 2,
         "each token's (shift, delta) runs over every query tile: 16-row K tiles (32 spill); 64-token tiles "
         "keep two stages (one spills)"),
    _row("queries_columns_backward", (32, 32), 16, 16, 16, 8, 1, min_ctas=2,
         why="16-row K tiles (32 spill); one stage (two spill)"),
    _row("queries_columns_backward", (16, 16), 16, 16, 16, 4, 1, min_ctas=2,
         why="16-row K tiles, four warps for 16 x 16 tiles (eight spill); one stage (two spill)"),
)


def _r_tile(kernel: str, B: int, R: int) -> int:
    block_r = block_size(R, MAX_BLOCK_R)
    if kernel in ROW_KERNELS:
        return block_r
    return next((c for c in COLUMN_R_TILES if c <= block_r and triton.cdiv(R, c) * B >= H200_SMS),
                COLUMN_R_TILES[-1])


def tags(dtype: torch.dtype, R: int, logit_activation: int, return_max: int, bias: bool = False,
         softmax_over: int = SoftmaxOver.KEYS, grad_attn: bool = False, attention: bool = False) -> FrozenSet[str]:
    """The launch's tags: its inputs' dtype (and fp32's product precision), its options (ids of zslfast._enums),
    whether R is tiled."""
    found = set()
    if dtype == torch.float32 and dot_precision(dtype) == "tf32":
        found.add("tf32")
    if attention:
        found.add("attention")
    if bias:
        found.add("bias")
    if softmax_over == SoftmaxOver.NONE:
        found.add("no-softmax")
    if grad_attn:
        found.add("attention-grad")
    if return_max != ReturnMax.NONE:
        found |= {"max", "options"}
    if logit_activation != LogitActivation.NONE:
        found.add("options")
    if dtype in (torch.float16, torch.bfloat16):
        found.add("16-bit")
    elif dtype == torch.float32:
        found.add("fp32")
    if R > MAX_BLOCK_R:
        found.add("R-tiled")
    return frozenset(found)


def launch_config(kernel: str, B: int, K: int, R: int, D: int, Dv: int, dtype: torch.dtype, logit_activation: int,
                  return_max: int, bias: bool = False, softmax_over: int = SoftmaxOver.KEYS, grad_attn: bool = False,
                  attention: bool = False):
    """(tiles, launch options) of one launch: the constexprs BLOCK_K, BLOCK_R, BLOCK_D, BLOCK_DV (the kernel's
    own), and num_warps, num_stages, maxnreg (the register budget), from the first matching row of TABLE."""
    block_r = _r_tile(kernel, B, R)
    row = matching_row(kernel, block_r, tags(dtype, R, logit_activation, return_max, bias, softmax_over, grad_attn,
                                            attention))
    tiles = dict(BLOCK_K=block_size(K, row.block_k), BLOCK_R=min(block_r, row.block_r or block_r))
    if row.block_d:
        tiles["BLOCK_D"] = block_size(D, row.block_d)
    if row.block_dv:
        tiles["BLOCK_DV"] = block_size(Dv, row.block_dv)
    # fp64 (no tl.dot: broadcast products, far more registers; not audited) keeps ptxas's own choice
    budget = None if dtype == torch.float64 else row.max_registers
    return tiles, dict(num_warps=row.num_warps, num_stages=row.num_stages, maxnreg=budget)


def matching_row(kernel: str, block_r: int, found: FrozenSet[str]) -> Config:
    """The first row of TABLE for this kernel whose R tile range holds block_r and whose tags ``found`` has."""
    for row in TABLE:
        if kernel in row.kernels and row.r_tile[0] <= block_r <= row.r_tile[1] and row.when <= found:
            return row
    raise LookupError(f"attribute_attention: no launch configuration for {kernel} at BLOCK_R {block_r} ({found})")
