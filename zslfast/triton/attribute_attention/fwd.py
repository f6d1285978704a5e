"""attribute_attention's forward kernels and their planner. The math: the op's docstring
(zslfast/ops/attribute_attention.py); the launch configurations: config.py.

    _forward_kernel           the softmax over the keys (or none), grid (K / BLOCK_K, B): a program owns BLOCK_K
                              query rows of one sample. S tiles (BLOCK_K x BLOCK_R) come from a loop over D in
                              BLOCK_D chunks, the bias added from its strided view.
                              R <= BLOCK_R (ZSL's 49 regions, ViT's 197 tokens): one S tile, the exact softmax in
                              registers, then E = P @ v Dv chunk by chunk with the score's sums from the same chunks;
                              q and k are read once, and E is written only when saved for the backward (or
                              returned: no score). Longer R: an online max/sum pass over the R tiles gives lse, a
                              second adds P_tile @ v into E in memory (the program's own rows; barriers order its
                              reads after its writes), then the epilogue reads E back. Without a softmax, P = S on
                              the kept tokens, no lse, and no first pass over the R tiles.
    _column_lse_kernel        the softmax over the queries, first: grid (R / BLOCK_R, B), an online max/sum over
                              the query-row tiles gives each token's lse (B, R)
    _queries_forward_kernel   then, grid (K / BLOCK_K, B): P = exp(S - lse[r]) tile by tile (no normalisation of
                              its own), E and the score as above, on either path
A returned max is the running max and first arg-max over the S tiles, in registers: the max of P as that of log P
(S over the keys, S - lse[r] over the queries; P = exp of it is monotone), since pooling P beside its use as the
P @ v operand costs registers; the max of the logits pools S. The returned attention is P or S (-inf on masked
tokens), stored from the tile in registers.

Outputs: E (B, K, Dv) and lse (B, K) ((B, R) over the queries, empty without a softmax) in the accumulator
dtype; the score (B, K) and the attention (B, K, R) in q's dtype; the max (B, K) in the accumulator dtype and its
arg-max (B, K) int32 (-1 and 0 for a row with no kept token). scale and eps arrive as one-element tensors in the
accumulator dtype: compiled Triton types a Python float argument as fp32, which would round an fp64 op's scale and
eps.
"""

import torch
import triton
import triton.language as tl

from ..._enums import ReturnAttention, ReturnMax, Score, SoftmaxOver
from .._common import accumulator_dtype, dot_precision, mm, tl_accumulator_dtype
from .._launch import Launch, run
from .config import launch_config
from .helpers import (
    ATTN_LOGITS, ATTN_PROBS, MAX_ATTENTION, MAX_LOGITS, MAX_NONE, SCORE_COSINE, SCORE_NONE, SOFTMAX_NONE,
    _add_product, _add_sums, _bias_of, _biased, _column_log_probs, _column_probs, _keep, _kept, _log_total,
    _row_probs, _scores, _softmax, _store_attention, _store_score, _stored_sums,
)


@triton.jit
def _online_lse(
    q_rows, k_b, mask_ptr, bias_b, b, offs_k, rows_ok, R, D, sq_d, sk_r, sk_d, sb_k, sb_r, scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse (BLOCK_K,) of rows longer than one tile: a running max and rescaled sum over the R tiles."""
    m = tl.full([BLOCK_K], -1e30, dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    return _log_total(m, total)


@triton.jit
def _pool(best, best_idx, x, keep, offs_r):
    """The running (max, first arg-max) over the kept tokens of x (BLOCK_K, BLOCK_R), updated with one tile of
    tokens offs_r: a later tile wins only if strictly greater (the first index among equals, as torch.max). A NaN
    wins, at its first index, and stays (torch.max's rule); a kept -inf still gives an index."""
    none = 2147483647
    x = tl.where(keep[None, :], x, float("-inf"))
    x_nan = x != x
    nan_idx = tl.min(tl.where(x_nan, offs_r[None, :], none), axis=1)
    tile_best = tl.max(x, axis=1)
    tile_idx = tl.min(tl.where(keep[None, :] & (x == tile_best[:, None]), offs_r[None, :], none), axis=1)
    tile_nan = nan_idx < none
    tile_idx = tl.where(tile_nan, nan_idx, tile_idx)
    tile_best = tl.where(tile_nan, float("nan"), tile_best)
    better = (best == best) & (tile_nan | (tile_best > best) | ((best_idx < 0) & (tile_idx < none)))
    return tl.where(better, tile_best, best), tl.where(better, tile_idx, best_idx)


@triton.jit
def _column_tile(best, best_idx, s, lse_ptr, b, offs_r, keep, rows_ok, R, RETURN_MAX: tl.constexpr):
    """(P, best, best_idx) of an S tile over the queries: P = exp(S - lse[r]), and the running max of log P (the
    attention's) or of S (the logits')."""
    if RETURN_MAX == MAX_ATTENTION:
        best, best_idx = _pool(best, best_idx, _column_log_probs(s, lse_ptr, b, offs_r, keep, R), keep, offs_r)
    if RETURN_MAX == MAX_LOGITS:
        best, best_idx = _pool(best, best_idx, s, keep, offs_r)
    return _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R), best, best_idx


@triton.jit
def _attend(
    p, v_b, e_rows, ref_rows, keep, rows_ok, Dv, sv_r, sv_d, sr_d, offs_r,
    STORE_E: tl.constexpr, SCORE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """E = p @ v_b[offs_r] Dv chunk by Dv chunk, written when STORE_E, and the score's row sums of E (_add_sums)
    from the same chunks (zeros without a score). v is read on kept tokens only: p is 0 elsewhere, and 0 * (a NaN
    or inf there) is not."""
    e_sq = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    e_dot_r = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    se = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    sd = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
        vt = tl.load(v_b + offs_r.to(tl.int64)[:, None] * sv_r + offs_dv[None, :] * sv_d,
                     mask=keep[:, None] & dv_ok[None, :], other=0.0)
        e = mm(p, vt, ACC_DTYPE, DOT_PRECISION)
        tile_ok = rows_ok[:, None] & dv_ok[None, :]
        if STORE_E:
            tl.store(e_rows + offs_dv[None, :], e, mask=tile_ok)
        if SCORE != SCORE_NONE:
            rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
            e_sq, e_dot_r, se, sd = _add_sums(e, rf, e_sq, e_dot_r, se, sd, SCORE == SCORE_COSINE, ACC_DTYPE)
    return e_sq, e_dot_r, se, sd


@triton.jit
def _store_max(best_ptr, idx_ptr, row_ids, rows_ok, best, best_idx):
    """The max and its arg-max; a row with no kept token: 0 and -1."""
    tl.store(best_ptr + row_ids, tl.where(best_idx >= 0, best, 0.0), mask=rows_ok)
    tl.store(idx_ptr + row_ids, best_idx, mask=rows_ok)


@triton.jit
def _column_lse_kernel(
    q_ptr, k_ptr, mask_ptr, bias_ptr, lse_ptr,
    K, R, D, scale_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse (B, R) of the softmax over the queries: for BLOCK_R tokens of one sample, a running max and rescaled sum
    over the query-row tiles. 0 on a masked token (nothing kept in its column)."""
    scale = tl.load(scale_ptr)
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
    k_b = k_ptr + b * sk_b
    bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
    m = tl.full([BLOCK_R], -1e30, dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows_ok = offs_k < K
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        s = tl.where(rows_ok[:, None], s, float("-inf"))  # rows past K: S is 0 there (q read as 0)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[None, :]), axis=0)
        m = m_new
    tl.store(lse_ptr + b * R + offs_r, _log_total(m, total), mask=offs_r < R)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, ref_ptr, mask_ptr, bias_ptr, out_ptr, e_ptr, lse_ptr, attn_ptr, best_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr, eps_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, sr_b, sr_k, sr_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SCORE: tl.constexpr, STORE_ATTN: tl.constexpr,
    STORE_E: tl.constexpr, SINGLE_R: tl.constexpr, SOFTMAX: tl.constexpr, ACTIVATION: tl.constexpr,
    RETURN_MAX: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    pid_k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_ok = offs_k < K
    q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
    k_b = k_ptr + b * sk_b
    v_b = v_ptr + b * sv_b
    row_ids = b * K + offs_k  # index into (B, K)
    e_rows = e_ptr + row_ids[:, None] * Dv
    ref_rows = ref_ptr + b * sr_b + offs_k.to(tl.int64)[:, None] * sr_k
    bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
    attn_b = attn_ptr + b * K * R  # the sample's (K, R) map: in-sample offsets in int32
    if RETURN_MAX != MAX_NONE:
        best = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)
        best_idx = tl.full([BLOCK_K], -1, dtype=tl.int32)
    if SINGLE_R:
        # One S tile: the exact softmax, then E and the score's sums from the same Dv chunks, E in registers.
        offs_r = tl.arange(0, BLOCK_R)
        keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        _store_attention(attn_b, s, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_LOGITS)
        if RETURN_MAX != MAX_NONE:
            best, best_idx = _pool(best, best_idx, s, keep, offs_r)  # log P = S - lse[i]: the same arg-max
        if SOFTMAX == SOFTMAX_NONE:
            p = _kept(s, keep)
        else:
            p, lse = _softmax(s)
        _store_attention(attn_b, p, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_PROBS)
        e_sq, e_dot_r, se, sd = _attend(p.to(v_ptr.dtype.element_ty), v_b, e_rows, ref_rows, keep, rows_ok, Dv,
                                        sv_r, sv_d, sr_d, offs_r, STORE_E, SCORE,
                                        ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_DV)
    else:
        # R tiles: lse first (none without a softmax), then E accumulated in memory tile by tile, then the score's
        # sums read back.
        if SOFTMAX != SOFTMAX_NONE:
            lse = _online_lse(q_rows, k_b, mask_ptr, bias_b, b, offs_k, rows_ok, R, D, sq_d, sk_r, sk_d, sb_k, sb_r,
                              scale, HAS_MASK, HAS_BIAS, ACTIVATION, ACC_DTYPE, DOT_PRECISION,
                              BLOCK_K, BLOCK_R, BLOCK_D)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
            _store_attention(attn_b, s, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_LOGITS)
            if RETURN_MAX != MAX_NONE:
                best, best_idx = _pool(best, best_idx, s, keep, offs_r)
            if SOFTMAX == SOFTMAX_NONE:
                p = _kept(s, keep)
            else:
                p = _row_probs(s, keep, lse)
            _store_attention(attn_b, p, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_PROBS)
            _add_product(e_rows, rows_ok, p.to(v_ptr.dtype.element_ty), v_b + offs_r.to(tl.int64)[:, None] * sv_r,
                         keep, sv_d, Dv, r0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
            tl.debug_barrier()
        e_sq, e_dot_r, se, sd = _stored_sums(e_rows, ref_rows, rows_ok, Dv, sr_d, SCORE, ACC_DTYPE, BLOCK_K,
                                             BLOCK_DV)
    if SOFTMAX != SOFTMAX_NONE:
        tl.store(lse_ptr + row_ids, lse, mask=rows_ok)
    if RETURN_MAX != MAX_NONE:
        if RETURN_MAX == MAX_ATTENTION:
            best = tl.exp(best - lse)  # the max of P from that of S (without a softmax: planned as the logits')
        _store_max(best_ptr, idx_ptr, row_ids, rows_ok, best, best_idx)
    _store_score(out_ptr, ref_rows, row_ids, rows_ok, e_sq, e_dot_r, se, sd, Dv, sr_d, eps_ptr,
                 SCORE, ACC_DTYPE, BLOCK_K, BLOCK_DV)


@triton.jit
def _queries_forward_kernel(
    q_ptr, k_ptr, v_ptr, ref_ptr, mask_ptr, bias_ptr, out_ptr, e_ptr, lse_ptr, attn_ptr, best_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr, eps_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, sr_b, sr_k, sr_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SCORE: tl.constexpr, STORE_ATTN: tl.constexpr,
    STORE_E: tl.constexpr, SINGLE_R: tl.constexpr, ACTIVATION: tl.constexpr, RETURN_MAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    pid_k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_ok = offs_k < K
    q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
    k_b = k_ptr + b * sk_b
    v_b = v_ptr + b * sv_b
    row_ids = b * K + offs_k  # index into (B, K)
    e_rows = e_ptr + row_ids[:, None] * Dv
    ref_rows = ref_ptr + b * sr_b + offs_k.to(tl.int64)[:, None] * sr_k
    bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
    attn_b = attn_ptr + b * K * R  # the sample's (K, R) map: in-sample offsets in int32
    best = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)  # (unused without a max)
    best_idx = tl.full([BLOCK_K], -1, dtype=tl.int32)
    if SINGLE_R:
        # One S tile: E and the score's sums from the same Dv chunks, E in registers.
        offs_r = tl.arange(0, BLOCK_R)
        keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        _store_attention(attn_b, s, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_LOGITS)
        p, best, best_idx = _column_tile(best, best_idx, s, lse_ptr, b, offs_r, keep, rows_ok, R, RETURN_MAX)
        _store_attention(attn_b, p, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_PROBS)
        e_sq, e_dot_r, se, sd = _attend(p.to(v_ptr.dtype.element_ty), v_b, e_rows, ref_rows, keep, rows_ok, Dv,
                                        sv_r, sv_d, sr_d, offs_r, STORE_E, SCORE,
                                        ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_DV)
    else:
        # R tiles: E accumulated in memory tile by tile, then the score's sums read back.
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
            _store_attention(attn_b, s, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_LOGITS)
            p, best, best_idx = _column_tile(best, best_idx, s, lse_ptr, b, offs_r, keep, rows_ok, R, RETURN_MAX)
            _store_attention(attn_b, p, offs_k, offs_r, rows_ok, R, STORE_ATTN == ATTN_PROBS)
            _add_product(e_rows, rows_ok, p.to(v_ptr.dtype.element_ty), v_b + offs_r.to(tl.int64)[:, None] * sv_r,
                         keep, sv_d, Dv, r0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
            tl.debug_barrier()
        e_sq, e_dot_r, se, sd = _stored_sums(e_rows, ref_rows, rows_ok, Dv, sr_d, SCORE, ACC_DTYPE, BLOCK_K,
                                             BLOCK_DV)
    if RETURN_MAX != MAX_NONE:
        if RETURN_MAX == MAX_ATTENTION:
            best = tl.exp(best)  # the max of P from that of log P
        _store_max(best_ptr, idx_ptr, row_ids, rows_ok, best, best_idx)
    _store_score(out_ptr, ref_rows, row_ids, rows_ok, e_sq, e_dot_r, se, sd, Dv, sr_d, eps_ptr,
                 SCORE, ACC_DTYPE, BLOCK_K, BLOCK_DV)


# ------------------------------------------------------------------------------------------------ the planner
def mask_arg(mask, like):
    return mask.to(torch.uint8).contiguous() if mask is not None else like


def scalar_arg(value, acc, device):
    """A runtime scalar (the softmax scale, the cosine's eps) as a one-element tensor in the accumulator dtype."""
    return torch.full((1,), value, dtype=acc, device=device)


def strides3(t):
    """(batch, row, column) strides; a 2-D tensor shared by the whole batch gets batch stride 0."""
    return (0, *t.stride()) if t.dim() == 2 else t.stride()


INT32_LIMIT = 2 ** 31


def bias_args(bias, placeholder):
    """(tensor, H, its 4 strides) of the (B, H, K, R) bias view, read in place (stride 0 where broadcast)."""
    if bias is None:
        return placeholder, 1, 0, 0, 0, 0
    return bias, bias.shape[1], *bias.stride()


def check_map_offsets(K, R, bias, maps: bool):
    """The (K, R) maps (the bias, the returned attention, their gradients; maps: the launches address one) are
    addressed from each sample's first element with int32 offsets (64-bit ones cost the backward registers it has
    not got): one sample's map must span fewer than 2^31 elements (8 GiB of fp32 per sample)."""
    if not maps:
        return
    span = K * R
    if bias is not None:
        span = max(span, 1 + sum((n - 1) * abs(st) for n, st in zip(bias.shape[2:], bias.stride()[2:])))
    if span >= INT32_LIMIT:
        raise ValueError(f"attribute_attention (triton): one sample's (K, R) = ({K}, {R}) map spans {span} elements "
                         f"of memory, over the kernels' 2^31 (bias strides {None if bias is None else bias.stride()})")


def plan_forward(q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over,
                 logit_activation, return_max):
    """((out or E, saved E, lse, attention, max, arg-max), launches): the forward's outputs, allocated, and the
    launches that fill them. The arguments are the op's raw kernel's, in its order; the options arrive as their ids
    (zslfast._enums). save_e: E is kept for a backward to come (else, one R tile and a score: never written).
    Without a softmax the lse is empty, and the kernels run as over the keys."""
    B, R, D = k.shape
    K, Dv = q.shape[-2], v.shape[-1]
    check_map_offsets(K, R, bias, bias is not None or return_attention != ReturnAttention.NONE)
    acc = accumulator_dtype(q.dtype)
    over_queries = softmax_over == SoftmaxOver.QUERIES
    normalized = softmax_over != SoftmaxOver.NONE
    pooled = (B, K) if return_max != ReturnMax.NONE else (0,)
    lse = torch.empty((B, R) if over_queries else (B, K) if normalized else (0,), device=q.device, dtype=acc)
    attn = torch.empty((B, K, R) if return_attention != ReturnAttention.NONE else (0,), device=q.device,
                       dtype=q.dtype)
    out = torch.empty((B, K) if score != Score.NONE else (0,), device=q.device, dtype=q.dtype)
    best = torch.empty(pooled, device=q.device, dtype=acc)
    best_index = torch.empty(pooled, device=q.device, dtype=torch.int32)
    if not normalized and return_max == ReturnMax.ATTENTION:
        return_max = ReturnMax.LOGITS  # P = S on the kept tokens: the same max and arg-max
    options = (logit_activation, return_max)
    kernel = "queries_forward" if over_queries else "forward"
    tiles, launch = launch_config(kernel, B, K, R, D, Dv, q.dtype, *options, bias=bias is not None,
                                  softmax_over=softmax_over, attention=return_attention != ReturnAttention.NONE)
    single_r = R <= tiles["BLOCK_R"]
    store_e = save_e or score == Score.NONE or not single_r
    e = torch.empty((B, K, Dv) if store_e else (0,), device=q.device, dtype=acc)
    ref_t = ref if ref is not None else e
    scale_t = scalar_arg(scale, acc, q.device)
    eps_t = scalar_arg(eps, acc, q.device) if score == Score.COSINE else scale_t  # (read by the cosine only)
    mask_arg_t = mask_arg(mask, lse)
    bias_t = bias_args(bias, lse)
    common = dict(HAS_BIAS=bias is not None, ACTIVATION=int(logit_activation),
                  ACC_DTYPE=tl_accumulator_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype))
    steps = []
    if over_queries:
        lse_tiles, lse_launch = launch_config("column_lse", B, K, R, D, Dv, q.dtype, *options,
                                              bias=bias is not None, softmax_over=softmax_over)
        steps.append(Launch(
            _column_lse_kernel, (triton.cdiv(R, lse_tiles["BLOCK_R"]), B),
            (q, k, mask_arg_t, bias_t[0], lse, K, R, D, scale_t, *strides3(q), *k.stride(), *bias_t[1:]),
            dict(HAS_MASK=mask is not None, **common, **lse_tiles), **lse_launch, flops=2 * B * K * R * D,
        ))
    keys_only = {} if over_queries else dict(SOFTMAX=int(softmax_over))
    steps.append(Launch(
        _queries_forward_kernel if over_queries else _forward_kernel, (triton.cdiv(K, tiles["BLOCK_K"]), B),
        (q, k, v, ref_t, mask_arg_t, bias_t[0], out, e, lse, attn, best if best.numel() else lse,
         best_index if best.numel() else lse,
         K, R, D, Dv, scale_t, eps_t,
         *strides3(q), *k.stride(), *v.stride(), *strides3(ref_t), *bias_t[1:]),
        dict(HAS_MASK=mask is not None, SCORE=int(score), STORE_ATTN=int(return_attention), STORE_E=store_e,
             SINGLE_R=single_r, RETURN_MAX=int(return_max), **keys_only, **common, **tiles),
        **launch, flops=2 * B * K * R * (D + Dv),
    ))
    if score == Score.NONE:
        return (e, e.new_empty((0,)), lse, attn, best, best_index), steps
    return (out, e if save_e else e.new_empty((0,)), lse, attn, best, best_index), steps


def forward(q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over, logit_activation,
            return_max):
    """(out, saved E, lse, attention, max, arg-max): the op's forward outputs (plan_forward)."""
    (out, saved_e, lse, attn, best, best_index), steps = plan_forward(
        q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over, logit_activation,
        return_max)
    run(steps)
    return (out.to(q.dtype) if score == Score.NONE else out), saved_e, lse, attn, best, best_index
