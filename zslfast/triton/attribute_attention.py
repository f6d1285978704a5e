"""Triton kernels of attribute_attention (the op, its backends and its autograd: zslfast/ops/attribute_attention.py).

The math, for each sample b and query row i (r runs over the R tokens, kept r: mask[b, r] True):

    T[b, i, r] = <q[i], k[b, r]>                        (q[b, i] for per-sample queries)
    S[b, i, r] = scale T  |  scale relu(T)               (ACTIVATION 0 | 1: the relu before the scale)
    P[b, i, :] = softmax over the kept r of S[b, i, :]   a row with no kept r: P = 0, lse = 0
    lse[b, i]  = log sum_{kept r} exp(S[b, i, r])
    OVER_QUERIES (softmax_over 1): for each kept r, P[b, :, r] = softmax over the K queries of S[b, :, r]
               = exp(S - lse[b, r]), lse[b, r] = log sum_i exp(S[b, i, r]) (B, R); a masked r: P = 0, lse = 0
    MAX_MODE 1 | 2: M[b, i] = max over kept r of P[b, i, r] | S[b, i, r], idx[b, i] its first r (int32; -1 and
               M = 0 for a row with no kept r). The max of P is taken as that of log P (S over the keys,
               S - lse[r] over the queries): M = exp(max S - lse[i]) | exp(max (S - lse[r])).
    E[b, i]    = sum_r P[b, i, r] v[b, r]
    out[b, i]  = E[b, i]                                               MODE 0 (no score)
               = <E, ref[i]>                                           MODE 1 ("dot")
               = <E, ref[i]> / (max(|E|, eps) max(|ref[i]|, eps))      MODE 2 ("cosine")
    eps: F.cosine_similarity's, the launchers' argument (1e-8 by default, as the papers' code calls it)

    backward, g = dL/dout, iE = 1 / max(|E|, eps), iR = 1 / max(|ref|, eps), cos = out:
    dE         = g | g ref | s_E (a_E ref - c_E E)                                          (MODE 0 | 1 | 2)
                 s_E = g iE, a_E = iR, c_E = [|E| > eps] cos iE
    dref       = n_R (a_R E - c_R ref),  n_R = iR, a_R = g iE, c_R = [|ref| > eps] g cos iR (MODE 2; n_R = 1,
                 a_R = g, c_R = 0 for MODE 1), summed over b by torch for a shared ref, from the coefficients the
                 rows kernel stores. (iE iR and iE^2 are never formed: they underflow fp32 at |E| ~ |ref| ~ 1e30.)
    P          = the kept r's softmax (recomputed), dP = dE v^T (+ dL/dattn when the attention is returned)
                 (+ gM = dL/dM at r = idx: MAX_MODE 1)
    shift[b, i] = dP at the row's arg-max of S (the first among equals), delta[b, i] = sum_r P (dP - shift),
                 dS = P ((dP - shift) - delta): P (dP - sum_r P dP), exact where P is near one-hot (the op's
                 docstring). R in one tile: from the row in registers; R-tiled: a first pass over the R tiles
                 (_add_softmax_grad), P = exp(S - lse) from the saved lse either way in the columns kernel
    OVER_QUERIES: shift[b, r], delta[b, r] likewise over the query rows i of token r (over every query tile)
    MAX_MODE 2: dS[b, i, idx] += gM
    dT = scale dS [T > 0: ACTIVATION 1; a select]
    dq = dT k (summed over b for a shared q),  dk = dT^T q,  dv = P^T dE

Masked tokens are selected away (tl.where, masked loads), never multiplied by 0: whatever k and v hold there (NaN,
inf) reaches neither the outputs nor any gradient, and dk, dv of masked tokens are exactly 0 (never written into
zero-filled buffers). A NaN score makes its row NaN (lse included), as in eager code.
The cosine's |E|^2, |ref|^2 and <E, ref> are plain sums where finite, and where they overflowed (|x| beyond ~1.8e19
in fp32) the same sums of E and ref scaled by a power of two, taken alongside from the same tiles (_add_sums).

Shapes: q (K, D) shared by the batch or (B, K, D); k (B, R, D); v (B, R, Dv); ref (K, Dv) or (B, K, Dv) (MODE 1, 2);
mask (B, R) as uint8; scale and eps one-element tensors in the accumulator dtype (a Python float argument would be
typed fp32 by compiled Triton and round an fp64 op's values). Forward: E (B, K, Dv), lse (B, K) ((B, R) over the
queries) in the accumulator dtype; out (B, K) (MODE 1, 2; MODE 0 returns E) and P (B, K, R) (when asked for) in q's
dtype; M (B, K) in the accumulator dtype and idx (B, K) int32 (MAX_MODE 1, 2; else empty). Backward: grad (B, K) or
(B, K, Dv) (MODE 0), dL/dattn (B, K, R) or none, dL/dM (B, K) or none; dE (B, K, Dv), shift and delta (B, K) ((B, R)
over the queries), a_R, c_R, n_R (B, K); dq partials (S, K, D) for a shared q (S batch splits, summed by torch in split
order) or (B, K, D); dk (B, R, D), dv (B, R, Dv); all in the accumulator dtype, cast to the inputs' dtype at the end.
The options are compile-time constants (OVER_QUERIES, ACTIVATION, MAX_MODE, HAS_GM): the default ones compile their
code away.

    forward   grid (K / BLOCK_K, B). A program owns BLOCK_K query rows of one sample. S tiles (BLOCK_K x BLOCK_R)
              come from a loop over D in BLOCK_D chunks (masked, so D = 300, 768, 2048 need no padding copies).
              R <= BLOCK_R (ZSL's 49 regions, ViT's 197 tokens): one S tile, an exact softmax in registers, then
              E = P @ v chunk by chunk of Dv, the cosine/dot sums taken from the same chunks; q and k are read
              once per program, and E is written only when saved for the backward (or returned: MODE 0). Larger
              R: an online max/sum pass over R tiles gives lse, a second pass adds P_tile @ v into E in memory (the
              program's own rows; barriers order its reads after its writes), then the epilogue reads E back.
              MAX_MODE: the running max and first arg-max over the tiles of S (or S - lse[r]), in registers.
              OVER_QUERIES: _column_lse_kernel first, grid (R / BLOCK_R, B) (the columns kernel's tiles): an
              online max/sum over the query-row tiles gives lse (B, R); the forward kernel then forms
              P = exp(S - lse[r]) tile by tile (no row normalisation, no online pass), on either path.
    backward  rows kernel, grid (K / BLOCK_K, splits of the batch): per (b, query rows): dE from the epilogue's
              gradient (stored), the coefficients of dref, the rows' (shift, delta) (R <= BLOCK_R: from the S and
              dP tiles of the whole row; R-tiled: a first pass over the R tiles; also when only dk needs them),
              then dq = scale dS k over R tiles, added into the program's own rows of dq (a shared q sums its b's
              in order into its split's partial).
              columns kernel, grid (R / BLOCK_R, B): loops over query-row tiles, recomputes P from lse and
              dS = P ((dE v^T + dL/dattn - shift) - delta), adds P^T dE into dv and scale dS^T q into dk (own
              rows). dP - shift is selected to 0 where P > 3/4 (_grad_logits): one kernel's shift is the other's dP
              at the arg-max, which need not match bit for bit (tl.dot's rounding may depend on the tile shapes).
    OVER_QUERIES backward: a token's (shift, delta) takes every query row, so dq comes last. The rows kernel first
              writes dE and dref's coefficients (WRITE_DE; not launched for MODE 0, where dE is the gradient),
              the columns kernel loops twice over the query-row tiles of its tokens ((shift, delta) and dv, then
              dk from dS) and writes (shift, delta) (B, R), then the rows kernel again (NEED_Q, no WRITE_DE): dq
              from P, dP and them tile by tile (the arg-max's dP - shift selected to 0, as above).
No atomics anywhere: deterministic. Inputs are addressed through their strides (transposed views are read in
place). Accumulation in fp32 (fp64 for fp64, where tl.dot is replaced by broadcast products: ACC_DTYPE, see
_common.py); fp32 tl.dot runs "ieee" unless torch.backends.cuda.matmul.allow_tf32 is on.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    H200_SMS, accumulator_dtype, block_size, dot_precision, inv_clamped, mm, split, sqrt_acc, tl_accumulator_dtype,
)
from ._launch import Launch, run

MAX_BLOCK_R = 256  # R up to this takes the single-tile exact softmax (tests lower it to reach the R-tiled path)
COSINE_EPS = 1e-8  # the default eps: F.cosine_similarity's, as the papers' code calls it


# ------------------------------------------------------------------------------------------ tiles and passes
@triton.jit
def _keep(mask_ptr, b, offs_r, R, HAS_MASK: tl.constexpr):
    valid = offs_r < R
    if HAS_MASK:
        kept = tl.load(mask_ptr + b * R + offs_r, mask=valid, other=0)
        valid = valid & (kept != 0)
    return valid


@triton.jit
def _scores(
    q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scale * act(q_rows @ k_b[offs_r]^T) (BLOCK_K, BLOCK_R), -inf where the token is masked or out of range;
    act = relu for ACTIVATION 1 (before the scale; a NaN stays NaN, as torch.relu's)."""
    acc = tl.zeros([BLOCK_K, BLOCK_R], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        qt = tl.load(q_rows + offs_d[None, :] * sq_d, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(
            k_b + offs_r.to(tl.int64)[None, :] * sk_r + offs_d[:, None] * sk_d,
            mask=d_ok[:, None] & keep[None, :],
            other=0.0,
        )
        acc += mm(qt, kt, ACC_DTYPE, DOT_PRECISION)
    if ACTIVATION == 1:
        acc = tl.where(acc < 0, 0.0, acc)
    return tl.where(keep[None, :], acc * scale, float("-inf"))


@triton.jit
def _log_total(m, total):
    """lse from the running max m and sum of exp(S - m): 0 for a row with nothing kept (total 0), NaN for a row
    with a NaN score (total NaN: the test is == 0, which NaN fails, so it is not taken for a fully masked row)."""
    return tl.where(total == 0, 0.0, m + tl.log(tl.where(total == 0, 1.0, total)))


@triton.jit
def _softmax(s):
    """(P, lse) of one S tile holding whole rows: the exact softmax, all zeros for a fully masked row. Masked
    scores are -inf and their P a select to 0: in a NaN row, exp(-inf - m) / total is NaN (m or total NaN), and
    the returned attention must stay 0 there, as the reference's."""
    m = tl.maximum(tl.max(s, axis=1), -1e30)  # finite for a fully masked row, so exp(s - m) = 0, not NaN
    p = tl.exp(s - m[:, None])
    total = tl.sum(p, axis=1)
    lse = _log_total(m, total)
    return tl.where(s == float("-inf"), 0.0, p / tl.where(total == 0, 1.0, total)[:, None]), lse


@triton.jit
def _online_lse(
    q_rows, k_b, mask_ptr, b, rows_ok, R, D, sq_d, sk_r, sk_d, scale,
    HAS_MASK: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse (BLOCK_K,) of rows longer than one tile: a running max and rescaled sum over the R tiles."""
    m = tl.full([BLOCK_K], -1e30, dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    return _log_total(m, total)


@triton.jit
def _probs(
    q_rows, k_b, keep, offs_r, rows_ok, lse, D, sq_d, sk_r, sk_d, scale,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """P = exp(S - lse) on the tile of tokens offs_r (BLOCK_K, BLOCK_R), recomputed from the saved lse; 0 where
    the token is not kept, by a select (exp(-inf - lse) would be NaN for a NaN row's lse)."""
    s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
    return _row_probs(s, keep, lse)


@triton.jit
def _row_probs(s, keep, lse):
    """P = exp(S - lse[row]) of an S tile (the softmax over the keys), 0 where the token is not kept."""
    return tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _column_log_probs(s, lse_ptr, b, offs_r, keep, R):
    """log P = S - lse[b, r] of an S tile (the softmax over the queries, lse per token from _column_lse_kernel)."""
    lse = tl.load(lse_ptr + b * R + offs_r, mask=keep, other=0.0)
    return s - lse[None, :]


@triton.jit
def _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R):
    """P = exp(S - lse[b, r]) of an S tile (the softmax over the queries), 0 where the token is not kept and on
    rows past K (their S is 0, not -inf: q is read as 0 there)."""
    return tl.where(rows_ok[:, None] & keep[None, :], tl.exp(_column_log_probs(s, lse_ptr, b, offs_r, keep, R)),
                    0.0)


@triton.jit
def _pool(best, best_idx, x, keep, offs_r):
    """The running (max, first arg-max) over the kept tokens of x (BLOCK_K, BLOCK_R), updated with one tile of
    tokens offs_r: a later tile wins only if strictly greater (the first index among equals, as torch.max).
    The max of P is pooled as that of log P (S over the keys, S - lse over the queries; P = exp of it is
    monotone): pooling P itself, next to its use as the P @ v operand, spilled 1.7 KB (fp32, 16 x 256 tile, 4
    warps, sm_90; the audit). A NaN wins, at its first index, and stays (torch.max's rule); a kept -inf still
    gives an index."""
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
def _add_max_grad(x, offs_r, idx, gm):
    """x + gM at r = idx (the max's gradient, to its arg-max); idx -1 (no kept token, rows past K) matches none."""
    return x + tl.where(offs_r[None, :] == idx[:, None], gm[:, None], 0.0)


@triton.jit
def _grad_logits(
    p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
    OVER_QUERIES: tl.constexpr, ACTIVATION: tl.constexpr, LOGITS_GRAD: tl.constexpr, SELECT: tl.constexpr,
):
    """dT = scale dS [T > 0 for relu] of an S tile, dS = P ((dP - shift) - delta) with the (shift, delta) of each
    row (keys) or token (OVER_QUERIES) (_shift_of), + gM at r = idx (LOGITS_GRAD: the max of the logits'
    gradient). SELECT: 0 on tokens not kept, by a select (without: P and dP are 0 there, so is dS unless delta or
    dP is not finite). dP - shift is exactly 0 at the arg-max, and selected so where P > 3/4 (only the arg-max can
    be): the shift may be the other kernel's dP there, which need not be this one's bit for bit (tl.dot's rounding
    may depend on the tile shape), and the near one-hot rows that need the 0 have P ~ 1 there. Where the arg-max
    has P <= 3/4, an ulp of dP_top in dP - shift is far below what the others' P (>= 1/4) put into dS."""
    if OVER_QUERIES:
        ds = p * (tl.where(p > 0.75, 0.0, dp - shift[None, :]) - delta[None, :])
    else:
        ds = p * (tl.where(p > 0.75, 0.0, dp - shift[:, None]) - delta[:, None])
    if LOGITS_GRAD:
        ds = _add_max_grad(ds, offs_r, idx, gm)
    ds = ds * scale
    if ACTIVATION == 1:
        # relu's derivative: 0 where T <= 0 (S = scale relu(T) is 0 there, -inf on masked tokens), NaN kept
        ds = tl.where(s <= 0, 0.0, ds)
    if SELECT:
        ds = tl.where(keep[None, :], ds, 0.0)
    return ds


@triton.jit
def _shift_of(s, dp, offs, AXIS: tl.constexpr):
    """(shift, max): dP at the arg-max of S along AXIS (1: each row's over the tokens offs; 0: each token's over
    the query rows offs), the first among equals, and that max: the softmax backward's shift (the module
    docstring)."""
    best = tl.max(s, axis=AXIS)
    none = 2147483647
    if AXIS == 1:
        top = tl.min(tl.where(s == best[:, None], offs[None, :], none), axis=1)
        hit = offs[None, :] == top[:, None]
    else:
        top = tl.min(tl.where(s == best[None, :], offs[:, None], none), axis=0)
        hit = offs[:, None] == top[None, :]
    return tl.sum(tl.where(hit, dp, 0.0), axis=AXIS), best


@triton.jit
def _add_softmax_grad(best, shift, delta, psum, s, p, dp, offs, AXIS: tl.constexpr):
    """The running (max of S, shift, delta, sum of P) of the softmax backward over tiles of one softmax's entries
    (AXIS 1: tiles of tokens, keys; AXIS 0: tiles of query rows, OVER_QUERIES), with one tile added; P is final
    (from the saved lse), only the shift moves. delta = sum P (dP - shift) over the entries so far: where a tile
    holds a strictly larger S, the shift becomes its dP and delta gains (old shift - new shift) psum, psum the P
    of the earlier entries, which is tiny when the softmax is near one-hot with its top here (the case the shift
    is for): no cancellation against a large term."""
    tile_shift, tile_best = _shift_of(s, dp, offs, AXIS)
    moved = tile_best > best
    delta = tl.where(moved, delta + (shift - tile_shift) * psum, delta)
    shift = tl.where(moved, tile_shift, shift)
    best = tl.where(moved, tile_best, best)
    if AXIS == 1:
        delta += tl.sum(p * (dp - shift[:, None]), axis=1)
    else:
        delta += tl.sum(p * (dp - shift[None, :]), axis=0)
    return best, shift, delta, psum + tl.sum(p, axis=AXIS)


@triton.jit
def _store_attention(attn_ptr, p, row_ids, offs_r, rows_ok, R):
    tl.store(attn_ptr + row_ids[:, None] * R + offs_r[None, :], p.to(attn_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & (offs_r < R)[None, :])


@triton.jit
def _add_product(
    dst_rows, dst_ok, lhs, src_rows, src_ok, s_col, N, ADD,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst[:, :N] = lhs @ src[:, :N] (plus dst's own values when ADD), BLOCK_N columns at a time.

    dst_rows / src_rows point at the rows' first elements ([:, None]-shaped); dst is contiguous, src has column
    stride s_col. src is cast to lhs's dtype for the dot (a no-op where it already has it)."""
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        src = tl.load(src_rows + offs_n[None, :] * s_col, mask=src_ok[:, None] & n_ok[None, :], other=0.0)
        tile_ok = dst_ok[:, None] & n_ok[None, :]
        out = mm(lhs, src.to(lhs.dtype), ACC_DTYPE, DOT_PRECISION)
        if ADD:
            out += tl.load(dst_rows + offs_n[None, :], mask=tile_ok, other=0.0)
        tl.store(dst_rows + offs_n[None, :], out, mask=tile_ok)


# -------------------------------------------------------------------------------- the score and its gradient
# The cosine's sums never overflow (issue 16). Next to the plain |E|^2, |ref|^2 and <E, ref>, the same sums of
# E * SCALE and ref * SCALE (SCALE a power of two, 2^-80 in fp32: exact, and no finite value overflows them) are
# taken from the same tiles (ref's in a loop of its own); a row uses the plain sums where they are finite (bit-identical to before) and the
# scaled ones where they overflowed (|x| beyond ~1.8e19 in fp32). No branch and no second pass: a few FMAs per
# element of the epilogue, against the BLOCK_R of the P @ v product that made it. Values the scaling underflows
# are below 2^-100 of such a row's norm.
@triton.jit
def _norm_scale(ACC_DTYPE: tl.constexpr):
    if ACC_DTYPE == tl.float64:
        return 2.0 ** -600
    else:
        return 2.0 ** -80


@triton.jit
def _add_sums(e, rf, e_sq, e_dot_r, se, sd, SCALED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The score's row sums |E|^2 and <E, ref> with one (BLOCK_K, BLOCK_DV) tile of E and ref added, and (SCALED,
    the cosine) |E * SCALE|^2 and <E * SCALE, ref * SCALE>."""
    e_sq += tl.sum(e * e, axis=1)
    e_dot_r += tl.sum(e * rf, axis=1)
    if SCALED:
        es = e * _norm_scale(ACC_DTYPE)
        se += tl.sum(es * es, axis=1)
        sd += tl.sum(es * (rf * _norm_scale(ACC_DTYPE)), axis=1)
    return e_sq, e_dot_r, se, sd


@triton.jit
def _ref_sums(
    ref_rows, rows_ok, Dv, sr_d,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """(|ref|^2, |ref * SCALE|^2) of the program's rows, a loop of its own: kept out of the loops that make E,
    whose registers are the kernels' peak (ref is (K, Dv), shared by the batch: L2-resident)."""
    r_sq = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    sr = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        tile_ok = rows_ok[:, None] & (offs_dv < Dv)[None, :]
        rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        r_sq += tl.sum(rf * rf, axis=1)
        rs = rf * _norm_scale(ACC_DTYPE)
        sr += tl.sum(rs * rs, axis=1)
    return r_sq, sr


@triton.jit
def _attend(
    p, v_b, e_rows, ref_rows, keep, rows_ok, Dv, sv_r, sv_d, sr_d, offs_r,
    STORE_E: tl.constexpr, SUMS: tl.constexpr, SCALED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """E = p @ v_b[offs_r] Dv chunk by Dv chunk, written when STORE_E; with SUMS the score's row sums of E
    (_add_sums) taken from the same chunks, else zeros. v is read on kept tokens only: p is 0 elsewhere, and
    0 * (a NaN or inf there) is not."""
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
        if SUMS:
            rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
            e_sq, e_dot_r, se, sd = _add_sums(e, rf, e_sq, e_dot_r, se, sd, SCALED, ACC_DTYPE)
    return e_sq, e_dot_r, se, sd


@triton.jit
def _stored_sums(
    e_rows, ref_rows, rows_ok, Dv, sr_d, SCALED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The score's row sums of E (_add_sums) read from E in memory."""
    e_sq = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    e_dot_r = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    se = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    sd = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        tile_ok = rows_ok[:, None] & (offs_dv < Dv)[None, :]
        e = tl.load(e_rows + offs_dv[None, :], mask=tile_ok, other=0.0)
        rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        e_sq, e_dot_r, se, sd = _add_sums(e, rf, e_sq, e_dot_r, se, sd, SCALED, ACC_DTYPE)
    return e_sq, e_dot_r, se, sd


@triton.jit
def _cosine(e_sq, r_sq, e_dot_r, se, sr, sd, eps, ACC_DTYPE: tl.constexpr):
    """(cos, iE, iR, |E|, |ref|) per row, iE = 1 / max(|E|, eps), from the plain sums where finite and from the
    scaled ones (_add_sums) where they overflowed: |E| = sqrt(se) / SCALE, cos = sd (iE / SCALE) (iR / SCALE)."""
    inf = float("inf")
    unscale = 1.0 / _norm_scale(ACC_DTYPE)
    ne = tl.where(e_sq == inf, sqrt_acc(se, ACC_DTYPE) * unscale, sqrt_acc(e_sq, ACC_DTYPE))
    nr = tl.where(r_sq == inf, sqrt_acc(sr, ACC_DTYPE) * unscale, sqrt_acc(r_sq, ACC_DTYPE))
    ie = inv_clamped(ne, eps, ACC_DTYPE)
    ir = inv_clamped(nr, eps, ACC_DTYPE)
    # The plain dot where it is finite; where it is not (inf, or NaN from partial sums that overflowed with both
    # signs) while neither norm is NaN (a NaN input), the scaled one.
    # (not ~(|dot| < inf): Triton 3.0's interpreter cannot invert a bool tensor)
    scaled_dot = ((tl.abs(e_dot_r) == inf) | (e_dot_r != e_dot_r)) & (e_sq == e_sq) & (r_sq == r_sq)
    cos = tl.where(scaled_dot, sd * (ie * unscale) * (ir * unscale), e_dot_r * ie * ir)
    return cos, ie, ir, ne, nr


@triton.jit
def _store_score(out_ptr, row_ids, rows_ok, score, MODE: tl.constexpr):
    """out = the row's score (MODE 1, 2); nothing for MODE 0."""
    if MODE != 0:
        tl.store(out_ptr + row_ids, score.to(out_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _write_grad_e(
    de_rows, e_rows, ref_rows, s_e, a_e, c_e, rows_ok, Dv, sr_d, ACC_DTYPE: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Writes dE = s_E (a_E ref - c_E E) Dv chunk by Dv chunk."""
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        tile_ok = rows_ok[:, None] & (offs_dv < Dv)[None, :]
        e = tl.load(e_rows + offs_dv[None, :], mask=tile_ok, other=0.0)
        rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        tl.store(de_rows + offs_dv[None, :], s_e[:, None] * (a_e[:, None] * rf - c_e[:, None] * e), mask=tile_ok)


@triton.jit
def _grad_probs(
    de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
    HAS_GA: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dP (BLOCK_K, BLOCK_R) = dE vᵀ over Dv tiles, plus the attention's own gradient when it was returned; read
    on kept tokens only (0 elsewhere)."""
    dp = tl.zeros([BLOCK_K, BLOCK_R], dtype=ACC_DTYPE)
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
        de = tl.load(de_rows + offs_dv[None, :], mask=rows_ok[:, None] & dv_ok[None, :], other=0.0)
        vt = tl.load(v_b + offs_r.to(tl.int64)[None, :] * sv_r + offs_dv[:, None] * sv_d,
                     mask=dv_ok[:, None] & keep[None, :], other=0.0)
        dp += mm(de.to(vt.dtype), vt, ACC_DTYPE, DOT_PRECISION)
    if HAS_GA:
        dp += tl.load(ga_ptr + row_ids[:, None] * R + offs_r[None, :], mask=rows_ok[:, None] & keep[None, :], other=0.0)
    return dp


# ----------------------------------------------------------------------------------------------- the kernels
@triton.jit
def _column_lse_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr,
    K, R, D, scale_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d,
    HAS_MASK: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The softmax over the queries' lse (B, R): for BLOCK_R tokens of one sample, a running max and rescaled sum
    over the query-row tiles. 0 on a masked token (nothing kept in its column)."""
    scale = tl.load(scale_ptr)
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
    k_b = k_ptr + b * sk_b
    m = tl.full([BLOCK_R], -1e30, dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows_ok = offs_k < K
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = tl.where(rows_ok[:, None], s, float("-inf"))  # rows past K: S is 0 there (q read as 0)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[None, :]), axis=0)
        m = m_new
    tl.store(lse_ptr + b * R + offs_r, _log_total(m, total), mask=offs_r < R)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, ref_ptr, mask_ptr, out_ptr, e_ptr, lse_ptr, attn_ptr, best_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr, eps_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, sr_b, sr_k, sr_d,
    HAS_MASK: tl.constexpr, MODE: tl.constexpr, STORE_ATTN: tl.constexpr, STORE_E: tl.constexpr,
    SINGLE_R: tl.constexpr, OVER_QUERIES: tl.constexpr, ACTIVATION: tl.constexpr, MAX_MODE: tl.constexpr,
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
    if MAX_MODE != 0:
        best = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)
        best_idx = tl.full([BLOCK_K], -1, dtype=tl.int32)

    if SINGLE_R:
        # One S tile: exact softmax, then E and the score's sums from the same Dv chunks, E in registers.
        offs_r = tl.arange(0, BLOCK_R)
        keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
        if OVER_QUERIES:
            # Over the queries: P from the tokens' lse (_column_lse_kernel), no row normalisation.
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            if MAX_MODE == 1:
                best, best_idx = _pool(best, best_idx, _column_log_probs(s, lse_ptr, b, offs_r, keep, R), keep,
                                       offs_r)
            if MAX_MODE == 2:
                best, best_idx = _pool(best, best_idx, s, keep, offs_r)
            p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
        elif MAX_MODE != 0:
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            best, best_idx = _pool(best, best_idx, s, keep, offs_r)
            p, lse = _softmax(s)
        else:
            p, lse = _softmax(_scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                                      ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D))
        if STORE_ATTN:
            _store_attention(attn_ptr, p, row_ids, offs_r, rows_ok, R)
        e_sq, e_dot_r, se, sd = _attend(p.to(v_ptr.dtype.element_ty), v_b, e_rows, ref_rows, keep, rows_ok, Dv,
                                        sv_r, sv_d, sr_d, offs_r, STORE_E, MODE != 0, MODE == 2,
                                        ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_DV)
    else:
        # R tiles: lse first (over the queries: from _column_lse_kernel), then E accumulated in memory tile by
        # tile, then the score's sums read back.
        if not OVER_QUERIES:
            lse = _online_lse(q_rows, k_b, mask_ptr, b, rows_ok, R, D, sq_d, sk_r, sk_d, scale,
                              HAS_MASK, ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
            if OVER_QUERIES or MAX_MODE != 0:
                s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                            ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                if OVER_QUERIES and MAX_MODE == 1:
                    best, best_idx = _pool(best, best_idx, _column_log_probs(s, lse_ptr, b, offs_r, keep, R), keep,
                                           offs_r)
                elif MAX_MODE != 0:
                    best, best_idx = _pool(best, best_idx, s, keep, offs_r)
                if OVER_QUERIES:
                    p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
                else:
                    p = _row_probs(s, keep, lse)
            else:
                p = _probs(q_rows, k_b, keep, offs_r, rows_ok, lse, D, sq_d, sk_r, sk_d, scale,
                           ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            if STORE_ATTN:
                _store_attention(attn_ptr, p, row_ids, offs_r, rows_ok, R)
            _add_product(e_rows, rows_ok, p.to(v_ptr.dtype.element_ty), v_b + offs_r.to(tl.int64)[:, None] * sv_r,
                         keep, sv_d, Dv, r0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
            tl.debug_barrier()
        e_sq = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)  # (unused without a score)
        e_dot_r = e_sq
        se = e_sq
        sd = e_sq
        if MODE != 0:
            e_sq, e_dot_r, se, sd = _stored_sums(e_rows, ref_rows, rows_ok, Dv, sr_d, MODE == 2,
                                                 ACC_DTYPE, BLOCK_K, BLOCK_DV)
    if not OVER_QUERIES:
        tl.store(lse_ptr + row_ids, lse, mask=rows_ok)
    if MAX_MODE != 0:
        # The max of P from that of log P: exp(max S - lse) over the keys, exp(max (S - lse)) over the queries. A
        # row with no kept token: max 0, index -1.
        if MAX_MODE == 1:
            if OVER_QUERIES:
                best = tl.exp(best)
            else:
                best = tl.exp(best - lse)
        tl.store(best_ptr + row_ids, tl.where(best_idx >= 0, best, 0.0), mask=rows_ok)
        tl.store(idx_ptr + row_ids, best_idx, mask=rows_ok)
    if MODE == 1:
        _store_score(out_ptr, row_ids, rows_ok, e_dot_r, MODE)
    if MODE == 2:
        r_sq, sr = _ref_sums(ref_rows, rows_ok, Dv, sr_d, ACC_DTYPE, BLOCK_K, BLOCK_DV)
        cos, _, _, _, _ = _cosine(e_sq, r_sq, e_dot_r, se, sr, sd, tl.load(eps_ptr), ACC_DTYPE)
        _store_score(out_ptr, row_ids, rows_ok, cos, MODE)


@triton.jit
def _rows_backward_kernel(
    g_ptr, ga_ptr, q_ptr, k_ptr, v_ptr, ref_ptr, mask_ptr, e_ptr, lse_ptr,
    de_ptr, delta_ptr, shift_ptr, coef_a_ptr, coef_c_ptr, coef_r_ptr, dq_ptr, gm_ptr, idx_ptr,
    B, K, R, D, Dv, scale_ptr, eps_ptr, b_per_split,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, sr_b, sr_k, sr_d,
    HAS_MASK: tl.constexpr, HAS_GA: tl.constexpr, MODE: tl.constexpr, NEED_Q: tl.constexpr,
    NEED_DELTA: tl.constexpr, SHARED_Q: tl.constexpr, SINGLE_R: tl.constexpr,
    OVER_QUERIES: tl.constexpr, ACTIVATION: tl.constexpr, MAX_MODE: tl.constexpr, HAS_GM: tl.constexpr,
    WRITE_DE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_ok = offs_k < K
    b_start = split * b_per_split
    b_end = tl.minimum(b_start + b_per_split, B)
    for b32 in range(b_start, b_end):
        b = b32 + tl.zeros([], dtype=tl.int64)  # the loop index is a Python int under the interpreter
        row_ids = b * K + offs_k
        e_rows = e_ptr + row_ids[:, None] * Dv
        de_rows = de_ptr + row_ids[:, None] * Dv
        ref_rows = ref_ptr + b * sr_b + offs_k.to(tl.int64)[:, None] * sr_k
        if not OVER_QUERIES:
            lse = tl.load(lse_ptr + row_ids, mask=rows_ok, other=0.0)
        if MODE != 0:
            if WRITE_DE:
                # dE = s_E (a_E ref - c_E E) from the score's gradient, stored; dref = n_R (a_R E - c_R ref): its
                # coefficients a_R, c_R, n_R for torch (no product of two inverse norms: it underflows at
                # |E| ~ 1e30).
                g = tl.load(g_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
                if MODE == 2:
                    e_sq, e_dot_r, se, sd = _stored_sums(e_rows, ref_rows, rows_ok, Dv, sr_d, True,
                                                         ACC_DTYPE, BLOCK_K, BLOCK_DV)
                    r_sq, sr = _ref_sums(ref_rows, rows_ok, Dv, sr_d, ACC_DTYPE, BLOCK_K, BLOCK_DV)
                    eps = tl.load(eps_ptr)
                    cos, ie, ir, ne, nr = _cosine(e_sq, r_sq, e_dot_r, se, sr, sd, eps, ACC_DTYPE)
                    # a clamped norm is the constant eps: no derivative, hence the indicators
                    s_e = g * ie
                    a_e = ir
                    c_e = tl.where(ne > eps, cos * ie, 0.0)
                    a_r = s_e
                    c_r = tl.where(nr > eps, g * cos * ir, 0.0)
                    n_r = ir
                else:
                    s_e = g
                    a_e = tl.full([BLOCK_K], 1.0, dtype=ACC_DTYPE)
                    c_e = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
                    a_r = g
                    c_r = c_e
                    n_r = a_e
                tl.store(coef_a_ptr + row_ids, a_r, mask=rows_ok)
                tl.store(coef_c_ptr + row_ids, c_r, mask=rows_ok)
                tl.store(coef_r_ptr + row_ids, n_r, mask=rows_ok)
                _write_grad_e(de_rows, e_rows, ref_rows, s_e, a_e, c_e, rows_ok, Dv, sr_d, ACC_DTYPE, BLOCK_DV)
                tl.debug_barrier()
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        k_b = k_ptr + b * sk_b
        v_b = v_ptr + b * sv_b
        if SHARED_Q:
            dq_rows = dq_ptr + split.to(tl.int64) * K * D + offs_k.to(tl.int64)[:, None] * D
        else:
            dq_rows = dq_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D
        # The max's gradient gM and its arg-max (placeholders without one: unused, compiled away).
        if HAS_GM:
            gm = tl.load(gm_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
            idx = tl.load(idx_ptr + row_ids, mask=rows_ok, other=-1)
        else:
            gm = scale
            idx = offs_k
        if OVER_QUERIES:
            if NEED_Q:
                # dq = scale dS k, dS = P ((dP - shift) - delta) with the tokens' (shift, delta) from the columns
                # kernel ((B, R) each), tile of tokens by tile, added into this program's rows (its split's, shared
                # q).
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                    s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                                ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                    p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
                    dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                     HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                    if MAX_MODE == 1 and HAS_GM:
                        dp = _add_max_grad(dp, offs_r, idx, gm)
                    shift = tl.load(shift_ptr + b * R + offs_r, mask=keep, other=0.0)
                    delta = tl.load(delta_ptr + b * R + offs_r, mask=keep, other=0.0)
                    ds = _grad_logits(p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
                                      True, ACTIVATION, MAX_MODE == 2 and HAS_GM, True)
                    _add_product(dq_rows, rows_ok, ds.to(k_ptr.dtype.element_ty),
                                 k_b + offs_r.to(tl.int64)[:, None] * sk_r, keep, sk_d, D,
                                 True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                    tl.debug_barrier()
        elif SINGLE_R:
            if NEED_DELTA:
                # The whole row in registers: P as its own softmax, dP (with dL/dattn, and the max's gM at its
                # arg-max), and the row's (shift, delta) from them, for this kernel's dS and the columns kernel's.
                offs_r = tl.arange(0, BLOCK_R)
                keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                            ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                p, _ = _softmax(s)
                dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                 HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                if MAX_MODE == 1 and HAS_GM:
                    dp = _add_max_grad(dp, offs_r, idx, gm)
                shift, _ = _shift_of(s, dp, offs_r, 1)
                delta = tl.sum(p * (dp - shift[:, None]), axis=1)
                tl.store(shift_ptr + row_ids, shift, mask=rows_ok)
                tl.store(delta_ptr + row_ids, delta, mask=rows_ok)
                if NEED_Q:
                    # dq = scale dS k, added into this program's rows (its split's, shared q)
                    ds = _grad_logits(p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
                                      False, ACTIVATION, MAX_MODE == 2 and HAS_GM, True)
                    _add_product(dq_rows, rows_ok, ds.to(k_ptr.dtype.element_ty),
                                 k_b + offs_r.to(tl.int64)[:, None] * sk_r, keep, sk_d, D,
                                 True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                    tl.debug_barrier()
        elif NEED_DELTA:
            # R tiles: a first pass for the rows' (shift, delta) (_add_softmax_grad), P from the saved lse.
            best = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)
            shift = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
            delta = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
            psum = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                            ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                p = _row_probs(s, keep, lse)
                dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                 HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                if MAX_MODE == 1 and HAS_GM:
                    dp = _add_max_grad(dp, offs_r, idx, gm)
                best, shift, delta, psum = _add_softmax_grad(best, shift, delta, psum, s, p, dp, offs_r, 1)
            tl.store(shift_ptr + row_ids, shift, mask=rows_ok)
            tl.store(delta_ptr + row_ids, delta, mask=rows_ok)
            if NEED_Q:
                # dq = scale dS k, tile of tokens by tile, added into this program's rows (its split's, shared q),
                # but for rows with no kept token (sum P = 0; NaN for a NaN row, which must reach dq): their dS is
                # 0, and a non-finite dE would make it NaN here (P and dP are 0 on masked tokens, but dE's NaN
                # reaches dP through v's 0 there). Left out of the sums rather than selected tile by tile: a select
                # on the tile spilled the bf16 rows kernel (sm_90, R = 577).
                dq_ok = rows_ok & (psum != 0)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                    if ACTIVATION == 1:
                        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                        p = _row_probs(s, keep, lse)
                    else:
                        p = _probs(q_rows, k_b, keep, offs_r, rows_ok, lse, D, sq_d, sk_r, sk_d, scale,
                                   ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                        s = p  # (unused without the relu)
                    dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                     HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                    if MAX_MODE == 1 and HAS_GM:
                        dp = _add_max_grad(dp, offs_r, idx, gm)
                    ds = _grad_logits(p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
                                      False, ACTIVATION, MAX_MODE == 2 and HAS_GM, False)
                    _add_product(dq_rows, dq_ok, ds.to(k_ptr.dtype.element_ty),
                                 k_b + offs_r.to(tl.int64)[:, None] * sk_r, keep, sk_d, D,
                                 True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                    tl.debug_barrier()


@triton.jit
def _columns_backward_kernel(
    ga_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, lse_ptr, de_ptr, delta_ptr, shift_ptr, dk_ptr, dv_ptr, gm_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d,
    HAS_MASK: tl.constexpr, HAS_GA: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
    OVER_QUERIES: tl.constexpr, ACTIVATION: tl.constexpr, MAX_MODE: tl.constexpr, HAS_GM: tl.constexpr,
    STORE_DELTA: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
    k_b = k_ptr + b * sk_b
    v_b = v_ptr + b * sv_b
    dk_rows = dk_ptr + (b * R + offs_r.to(tl.int64))[:, None] * D
    dv_rows = dv_ptr + (b * R + offs_r.to(tl.int64))[:, None] * Dv
    # dk, dv rows of masked tokens are never written (the launcher zero-fills them): a NaN query row or dE row
    # would reach them through a 0 weight.
    if OVER_QUERIES:
        # The softmax over the queries: dS = P ((dP - shift) - delta) with each token's (shift, delta) over every
        # query row, so a first loop over the query tiles takes them (_add_softmax_grad; and adds dv = P^T dE), a
        # second adds dk = scale dS^T q. They go to shift_ptr, delta_ptr ((B, R)) for the rows kernel's dq,
        # launched after this one.
        best = tl.full([BLOCK_R], float("-inf"), dtype=ACC_DTYPE)
        shift = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        delta = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        psum = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            rows_ok = offs_k < K
            row_ids = b * K + offs_k
            q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
            de_rows = de_ptr + row_ids[:, None] * Dv
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
            if NEED_K or STORE_DELTA:
                dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                 HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                if MAX_MODE == 1 and HAS_GM:
                    gm = tl.load(gm_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
                    idx = tl.load(idx_ptr + row_ids, mask=rows_ok, other=-1)
                    dp = _add_max_grad(dp, offs_r, idx, gm)
                # rows past K: S is 0 there (q read as 0), not -inf, and must not be the arg-max
                best, shift, delta, psum = _add_softmax_grad(
                    best, shift, delta, psum, tl.where(rows_ok[:, None], s, float("-inf")), p, dp, offs_k, 0)
            if NEED_V:
                # dv (+)= P^T dE over Dv chunks
                _add_product(dv_rows, keep, tl.trans(p.to(v_ptr.dtype.element_ty)), de_rows, rows_ok, 1, Dv, k0 > 0,
                             ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
            tl.debug_barrier()
        if STORE_DELTA:
            tl.store(shift_ptr + b * R + offs_r, shift, mask=offs_r < R)
            tl.store(delta_ptr + b * R + offs_r, delta, mask=offs_r < R)
        if NEED_K:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                rows_ok = offs_k < K
                row_ids = b * K + offs_k
                q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
                de_rows = de_ptr + row_ids[:, None] * Dv
                s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                            ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
                dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                 HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                if HAS_GM:
                    gm = tl.load(gm_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
                    idx = tl.load(idx_ptr + row_ids, mask=rows_ok, other=-1)
                else:
                    gm = scale
                    idx = offs_k
                if MAX_MODE == 1 and HAS_GM:
                    dp = _add_max_grad(dp, offs_r, idx, gm)
                ds = _grad_logits(p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
                                  True, ACTIVATION, MAX_MODE == 2 and HAS_GM, True)
                _add_product(dk_rows, keep, tl.trans(ds.to(q_ptr.dtype.element_ty)), q_rows, rows_ok, sq_d, D,
                             k0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                tl.debug_barrier()
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            rows_ok = offs_k < K
            row_ids = b * K + offs_k
            q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
            de_rows = de_ptr + row_ids[:, None] * Dv
            s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            lse = tl.load(lse_ptr + row_ids, mask=rows_ok, other=0.0)
            # Rows past K: s is 0 there (q loaded as 0) but lse too, so force P = 0; masked tokens: 0 by a select.
            p = tl.where(rows_ok[:, None] & keep[None, :], tl.exp(s - lse[:, None]), 0.0)
            p_op = p.to(v_ptr.dtype.element_ty)
            if NEED_K:
                # dk (+)= scale dS^T q over D chunks
                shift = tl.load(shift_ptr + row_ids, mask=rows_ok, other=0.0)
                delta = tl.load(delta_ptr + row_ids, mask=rows_ok, other=0.0)
                dp = _grad_probs(de_rows, v_b, ga_ptr, offs_r, keep, rows_ok, row_ids, R, Dv, sv_r, sv_d,
                                 HAS_GA, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
                if HAS_GM:
                    gm = tl.load(gm_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
                    idx = tl.load(idx_ptr + row_ids, mask=rows_ok, other=-1)
                else:
                    gm = scale
                    idx = offs_k
                if MAX_MODE == 1 and HAS_GM:
                    dp = _add_max_grad(dp, offs_r, idx, gm)
                ds = _grad_logits(p, dp, shift, delta, s, keep, offs_r, idx, gm, scale,
                                  False, ACTIVATION, MAX_MODE == 2 and HAS_GM, True)
                ds_t = tl.trans(ds.to(q_ptr.dtype.element_ty))
                _add_product(dk_rows, keep, ds_t, q_rows, rows_ok, sq_d, D, k0 > 0, ACC_DTYPE, DOT_PRECISION,
                             BLOCK_D)
            if NEED_V:
                # dv (+)= P^T dE over Dv chunks
                _add_product(dv_rows, keep, tl.trans(p_op), de_rows, rows_ok, 1, Dv, k0 > 0,
                             ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
            tl.debug_barrier()


def _blocks(K, R, D, Dv):
    """(BLOCK_K, BLOCK_R, BLOCK_D, BLOCK_DV) of the forward and rows kernels, programs of 8 warps holding a
    (BLOCK_K x BLOCK_R) score tile and (BLOCK_R x BLOCK_D) operand tiles. The GPU audit (benchmarks/gpu_audit.md)
    finds no spills on sm_80/sm_90 in fp32/bf16/fp16, with triton 3.6 and 3.9, with 32 x 64 x 32 tiles, and
    16 x 256 x 16 for a wide row tile (ViT's 197 tokens -> 256); the former 64 x 64 x 64 and 32 x 256 x 32 tiles at
    4 warps spilled up to 3.7 KB, and 16 x 256 x 32 still 8 B (triton 3.6, sm_90, fp32, R-tiled forward)."""
    block_r = block_size(R, MAX_BLOCK_R)
    cap = 32 if block_r <= 64 else 16
    return block_size(K, cap), block_r, block_size(D, cap), block_size(Dv, cap)


def _columns_blocks(B, K, R, D, Dv, block_r, block_dv):
    """The columns kernel's tiles. Its R tile is the widest of 64, 32, 16 (at most the forward's) whose grid
    (R tiles, B) still gives every SM of an H200 a program (it only changes how programs share the work); its
    (BLOCK_K x BLOCK_D) operand tiles are 32 x 16, which the audit finds spill-free at every R tile. Its Dv tile is
    the rows kernel's (block_dv)."""
    col_r = next((c for c in (64, 32, 16) if c <= block_r and triton.cdiv(R, c) * B >= H200_SMS), 16)
    return block_size(K, 32), col_r, block_size(D, 16), block_dv


def _launch_options(block_r, wide_warps=8):
    """Eight warps (see _blocks), ``wide_warps`` for a wide row tile. Two pipeline stages, one for a wide row tile,
    where the second stage's operand buffers cost the registers that spilled 24 B in the rows kernel (bf16/fp16,
    sm_90, triton 3.9)."""
    return dict(num_warps=8 if block_r <= 64 else wide_warps, num_stages=2 if block_r <= 64 else 1)


def _mask_arg(mask, like):
    return mask.to(torch.uint8).contiguous() if mask is not None else like


def _scalar_arg(value, acc, device):
    """A runtime scalar (the softmax scale, the cosine's eps) as a one-element tensor in the accumulator dtype:
    compiled Triton types a Python float argument as fp32, which would round an fp64 op's scale (and its logits)
    by ~1e-8 relative, and its eps (the clamp of small rows, and their 1/eps-sized gradients) likewise."""
    return torch.full((1,), value, dtype=acc, device=device)


def _strides3(t):
    """(batch, row, column) strides; a 2-D tensor shared by the whole batch gets batch stride 0."""
    return (0, *t.stride()) if t.dim() == 2 else t.stride()


def plan_forward(q, k, v, ref, mask, scale, score_mode, return_attention, save_e=True, eps=COSINE_EPS,
                 softmax_over=0, activation=0, max_mode=0):
    """(out or E, saved E, lse, attention, max, arg-max) and the launches that fill them. eps: the cosine score's
    (score_mode 2) clamp of the norms, max(|E|, eps) max(|ref|, eps). softmax_over 1 (the queries) first runs
    _column_lse_kernel for the tokens' lse (B, R); activation 1: relu; max_mode 1, 2: the max of P, S (B, K) in the
    accumulator dtype and its first arg-max (int32), else both empty."""
    B, R, D = k.shape
    K, Dv = q.shape[-2], v.shape[-1]
    acc = accumulator_dtype(q.dtype)
    lse = torch.empty((B, R) if softmax_over else (B, K), device=q.device, dtype=acc)
    attn = torch.empty((B, K, R) if return_attention else (0,), device=q.device, dtype=q.dtype)
    out = torch.empty((B, K) if score_mode != 0 else (0,), device=q.device, dtype=q.dtype)
    best = torch.empty((B, K) if max_mode else (0,), device=q.device, dtype=acc)
    best_index = torch.empty((B, K) if max_mode else (0,), device=q.device, dtype=torch.int32)
    block_k, block_r, block_d, block_dv = _blocks(K, R, D, Dv)
    single_r = R <= block_r
    # Scores with no backward to come, one R tile: E stays in registers (the R-tiled path accumulates it in memory).
    store_e = save_e or score_mode == 0 or not single_r
    e = torch.empty((B, K, Dv) if store_e else (0,), device=q.device, dtype=acc)
    ref_t = ref if ref is not None else e
    scale_t = _scalar_arg(scale, acc, q.device)
    eps_t = _scalar_arg(eps, acc, q.device) if score_mode == 2 else scale_t  # (a placeholder: read for cosine only)
    mask_arg = _mask_arg(mask, lse)
    common = dict(ACTIVATION=activation, ACC_DTYPE=tl_accumulator_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype))
    steps = []
    if softmax_over:
        # The tokens' lse over the K queries: the columns kernel's tiles (spill-free there, with more live tiles).
        col_k, col_r, col_d, _ = _columns_blocks(B, K, R, D, Dv, block_r, block_dv)
        steps.append(Launch(
            _column_lse_kernel, (triton.cdiv(R, col_r), B),
            (q, k, mask_arg, lse, K, R, D, scale_t, *_strides3(q), *k.stride()),
            dict(HAS_MASK=mask is not None, **common, BLOCK_K=col_k, BLOCK_R=col_r, BLOCK_D=col_d),
            # One pipeline stage: two spilled 24 B (fp32, sm_80, triton 3.9, B = 256; the audit).
            **dict(_launch_options(col_r), num_stages=1), flops=2 * B * K * R * D,
        ))
    steps.append(Launch(
        _forward_kernel, (triton.cdiv(K, block_k), B),
        (q, k, v, ref_t, mask_arg, out, e, lse, attn, best if max_mode else lse,
         best_index if max_mode else lse,
         K, R, D, Dv, scale_t, eps_t,
         *_strides3(q), *k.stride(), *v.stride(), *_strides3(ref_t)),
        dict(HAS_MASK=mask is not None, MODE=score_mode, STORE_ATTN=return_attention, STORE_E=store_e,
             SINGLE_R=single_r, OVER_QUERIES=bool(softmax_over), MAX_MODE=max_mode, **common,
             BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_DV=block_dv),
        # Four warps for a wide row tile: eight spilled 8 B there (bf16/fp16, sm_80, triton 3.6; the audit). Over
        # the queries with a max, R-tiled: eight (four spilled 8 B: bf16/fp16, sm_90, triton 3.6).
        **_launch_options(block_r, wide_warps=8 if softmax_over and max_mode and not single_r else 4),
        flops=2 * B * K * R * (D + Dv),
    ))
    if score_mode == 0:
        return (e, e.new_empty((0,)), lse, attn, best, best_index), steps
    return (out, e if save_e else e.new_empty((0,)), lse, attn, best, best_index), steps


def forward(q, k, v, ref, mask, scale, score_mode, return_attention, save_e=True, eps=COSINE_EPS, softmax_over=0,
            activation=0, max_mode=0):
    """(out, saved E, lse, attention, max, arg-max): see plan_forward."""
    (out, saved_e, lse, attn, best, best_index), steps = plan_forward(
        q, k, v, ref, mask, scale, score_mode, return_attention, save_e, eps, softmax_over, activation, max_mode)
    run(steps)
    return (out.to(q.dtype) if score_mode == 0 else out), saved_e, lse, attn, best, best_index


def plan_backward(grad, grad_attn, q, k, v, ref, mask, e, lse, scale, score_mode, output_mask, eps=COSINE_EPS,
                  softmax_over=0, activation=0, max_mode=0, grad_max=None, best=None, best_index=None):
    """(grad_q, grad_k, grad_v, grad_ref) and the steps that fill them: the rows kernel (dq, each row's (shift,
    delta), the epilogue's coefficients), the columns kernel (dk, dv), then the fixed-order sums and dtype casts.
    eps: the forward's (the cosine's clamp, and its gradient's indicators [|E| > eps], [|ref| > eps]).
    softmax_over 1 (the queries): the rows kernel writes dE (and the coefficients), the columns kernel takes each
    token's (shift, delta) and adds dk, dv, then the rows kernel again for dq. grad_max (B, K) or None: the
    gradient of the max (max_mode 1, 2), with the forward's arg-max best_index (best, the max itself, is not
    read: dP carries the max's gradient)."""
    need_q, need_k, need_v, need_ref = output_mask
    need_ref = need_ref and score_mode != 0
    B, R, D = k.shape
    K, Dv = q.shape[-2], v.shape[-1]
    acc = accumulator_dtype(q.dtype)
    e = e.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    shared_q = q.dim() == 2
    has_ga = grad_attn is not None and grad_attn.numel() > 0
    ga = grad_attn.to(acc).contiguous() if has_ga else lse
    has_gm = bool(max_mode) and grad_max is not None and grad_max.numel() > 0
    gm = grad_max.to(acc).contiguous() if has_gm else lse
    index_t = best_index.to(torch.int32).contiguous() if has_gm else lse
    if score_mode == 0:
        de = grad.to(acc).contiguous()
        g = lse
    else:
        de = torch.empty(B, K, Dv, device=q.device, dtype=acc)
        g = grad.to(acc).contiguous()
    # The softmax backward's (shift, delta): (B, K) over the keys (the rows kernel's, for the columns kernel's dk);
    # (B, R) over the queries (the columns kernel's, for the rows kernel's dq)
    delta = torch.empty((B, R) if softmax_over else (B, K), device=q.device, dtype=acc)
    shift = torch.empty_like(delta)
    coef_a = torch.empty(B, K, device=q.device, dtype=acc)
    coef_c = torch.empty(B, K, device=q.device, dtype=acc)
    coef_r = torch.empty(B, K, device=q.device, dtype=acc)
    block_k, block_r, block_d, _ = _blocks(K, R, D, Dv)
    # One Dv tile for the rows and columns kernels: 16, the columns kernel's spill-free tile (wider ones spill
    # there: the audit, fp32 sm_80).
    block_dv = block_size(Dv, 16)
    single_r = R <= block_r
    if shared_q:
        # Batch chunks of the shared-q dq reduction, each a (K, D) partial summed afterwards in chunk order: as few
        # as give every SM a program (fewer partials to write), as many as the batch allows.
        splits, b_per_split = split(B, triton.cdiv(K, block_k), H200_SMS)
        dq = torch.zeros((splits, K, D) if need_q else (0,), device=q.device, dtype=acc)
    else:
        splits, b_per_split = B, 1
        dq = torch.zeros((B, K, D) if need_q else (0,), device=q.device, dtype=acc)
    ref_t = ref if ref is not None else e
    mask_arg = _mask_arg(mask, lse)
    scale_t = _scalar_arg(scale, acc, q.device)
    eps_t = _scalar_arg(eps, acc, q.device) if score_mode == 2 else scale_t  # (a placeholder: read for cosine only)
    q_strides = _strides3(q)
    options = dict(OVER_QUERIES=bool(softmax_over), ACTIVATION=activation, MAX_MODE=max_mode, HAS_GM=has_gm)
    common = dict(ACC_DTYPE=tl_accumulator_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
                  BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_DV=block_dv)

    def rows_flops(dq_too):
        """S and dP (2 B K R (D + Dv)), then dq (2 B K R D): over the keys R-tiled, S and dP once more (a first
        pass for the rows' (shift, delta)); over the queries, dq's launch alone does the products."""
        if softmax_over:
            return 2 * B * K * R * (2 * D + Dv) if dq_too else 0
        return 2 * B * K * R * (D + Dv) + (2 * B * K * R * D + (0 if single_r else 2 * B * K * R * (D + Dv))
                                           if dq_too else 0)

    def rows(write_de, dq_too):
        return Launch(
            _rows_backward_kernel, (triton.cdiv(K, block_k), splits),
            (g, ga, q, k, v, ref_t, mask_arg, e, lse, de, delta, shift, coef_a, coef_c, coef_r, dq, gm, index_t,
             B, K, R, D, Dv, scale_t, eps_t, b_per_split,
             *q_strides, *k.stride(), *v.stride(), *_strides3(ref_t)),
            dict(HAS_MASK=mask is not None, HAS_GA=has_ga, MODE=score_mode, NEED_Q=dq_too,
                 NEED_DELTA=(need_q or need_k) and not softmax_over, SHARED_Q=shared_q, SINGLE_R=single_r,
                 **options, WRITE_DE=write_de, **common),
            # A wide row tile in 16-bit inputs: sixteen warps (eight spilled 32 B: sm_90, triton 3.6), fp32/fp64
            # eight (sixteen spilled 40 B there). The audit checks every case with the triton each stack installs.
            **_launch_options(block_r, wide_warps=16 if q.dtype in (torch.float16, torch.bfloat16) else 8),
            flops=rows_flops(dq_too),
            label=("dE" if not dq_too else "dq") if softmax_over else "",
        )

    steps = []
    if not softmax_over:
        steps.append(rows(True, need_q))
    elif score_mode != 0:
        steps.append(rows(True, False))  # dE (and dref's coefficients) first: the columns need every row's
    # The columns kernel leaves the rows of masked tokens unwritten: they must read 0.
    alloc = torch.zeros if mask is not None else torch.empty
    grad_k = alloc((B, R, D) if need_k else (0,), device=q.device, dtype=acc)
    grad_v = alloc((B, R, Dv) if need_v else (0,), device=q.device, dtype=acc)
    store_delta = bool(softmax_over) and need_q
    if need_k or need_v or store_delta:
        col_k, col_r, col_d, col_dv = _columns_blocks(B, K, R, D, Dv, block_r, block_dv)
        if softmax_over:
            col_k = 16  # 32 spilled 8-32 B (fp32, sm_80/sm_90, triton 3.6 and 3.9; the audit)
        steps.append(Launch(
            _columns_backward_kernel, (triton.cdiv(R, col_r), B),
            (ga, q, k, v, mask_arg, lse, de, delta, shift, grad_k, grad_v, gm, index_t,
             K, R, D, Dv, scale_t,
             *q_strides, *k.stride(), *v.stride()),
            dict(HAS_MASK=mask is not None, HAS_GA=has_ga, NEED_K=need_k, NEED_V=need_v, **options,
                 STORE_DELTA=store_delta, ACC_DTYPE=common["ACC_DTYPE"], DOT_PRECISION=common["DOT_PRECISION"],
                 BLOCK_K=col_k, BLOCK_R=col_r, BLOCK_D=col_d, BLOCK_DV=col_dv),
            # One pipeline stage with the options (two spilled 8-64 B: fp32, sm_80, triton 3.9; the audit), but for
            # 64-token tiles over the queries (one spilled 8-24 B there: fp32, B = 256, sm_90, triton 3.6 and 3.9)
            # and in 16-bit inputs (one spilled 8 B: bf16, sm_80, triton 3.6, ViT-CUB with relu and the logits'
            # max). Over the queries with 16-token tiles, four warps (eight spilled 16 B: bf16/fp16, sm_90, 3.6).
            **dict(_launch_options(col_r),
                   **({"num_stages": 1} if (activation or max_mode or softmax_over)
                      and not (col_r == 64 and (softmax_over or q.dtype in (torch.float16, torch.bfloat16)))
                      else {}),
                   **({"num_warps": 4} if softmax_over and col_r == 16 else {})),
            flops=2 * B * K * R * (D + Dv) + 2 * B * K * R * ((D if need_k else 0) + (Dv if need_v else 0))
            + (2 * B * K * R * (D + Dv) if softmax_over and need_k else 0),
        ))
    if store_delta:
        steps.append(rows(False, True))
    grads = []

    def finish():
        grad_q = dq.sum(0) if shared_q and need_q else dq
        if need_ref:
            # dref = n_R (a_R E - c_R ref); n_R (iR for the cosine, 1 for dot) is the same for every b of a row
            # of a shared ref, so it multiplies the sum over b.
            if ref.dim() == 2:
                grad_ref = coef_r[0][:, None] * (torch.einsum("bk,bkd->kd", coef_a, e)
                                                 - coef_c.sum(0)[:, None] * ref.to(acc))
            else:
                grad_ref = coef_r[:, :, None] * (coef_a[:, :, None] * e - coef_c[:, :, None] * ref.to(acc))
        else:
            grad_ref = q.new_empty((0,), dtype=acc)
        grads.extend(t.to(q.dtype) for t in (grad_q, grad_k, grad_v, grad_ref))

    return grads, steps + [finish]


def backward(grad, grad_attn, q, k, v, ref, mask, e, lse, scale, score_mode, output_mask, eps=COSINE_EPS,
             softmax_over=0, activation=0, max_mode=0, grad_max=None, best=None, best_index=None):
    grads, steps = plan_backward(grad, grad_attn, q, k, v, ref, mask, e, lse, scale, score_mode, output_mask, eps,
                                 softmax_over, activation, max_mode, grad_max, best, best_index)
    run(steps)
    return tuple(grads)
