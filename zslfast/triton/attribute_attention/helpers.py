"""The jit helpers that attribute_attention's forward (fwd.py) and backward (bwd.py) kernels share: the option ids as
constants, the score tiles (with the additive bias) and their softmax, the products tile by tile, the max's
gradient, the shifted softmax gradient, and the score epilogue (dot, cosine) with its gradient. The math they
compute: the op's docstring (zslfast/ops/attribute_attention.py).

The options reach the kernels as compile-time ints, the ids of zslfast._enums, and the kernels compare them with
the constants below (``if SCORE == SCORE_COSINE``): the options a launch does not run compile away.

Conventions: a program holds a (BLOCK_K x BLOCK_R) tile of query rows i (offs_k, rows_ok: i < K) by tokens r
(offs_r, keep: r < R and mask[b, r]); ``row_ids`` index the (B, K) statistics. Masked tokens are selected away
(tl.where, masked loads), never multiplied by 0: a NaN or inf in k or v there reaches no output and no gradient.
Batches are the op's B·H (heads folded in): only the bias sees the heads, batch b reading bias[b // H, b % H].
"""

import triton
import triton.language as tl

from ..._enums import LogitActivation, ReturnAttention, ReturnMax, Score, SoftmaxOver
from .._common import inv_clamped, mm, sqrt_acc

# The options' ids as constexpr globals (a tl.constexpr object: what every triton since 3.0 reads in jit code)
SCORE_NONE = tl.constexpr(int(Score.NONE))
SCORE_DOT = tl.constexpr(int(Score.DOT))
SCORE_COSINE = tl.constexpr(int(Score.COSINE))
RELU = tl.constexpr(int(LogitActivation.RELU))
MAX_NONE = tl.constexpr(int(ReturnMax.NONE))
MAX_ATTENTION = tl.constexpr(int(ReturnMax.ATTENTION))
MAX_LOGITS = tl.constexpr(int(ReturnMax.LOGITS))
ATTN_PROBS = tl.constexpr(int(ReturnAttention.ATTENTION))
ATTN_LOGITS = tl.constexpr(int(ReturnAttention.LOGITS))
SOFTMAX_QUERIES = tl.constexpr(int(SoftmaxOver.QUERIES))
SOFTMAX_NONE = tl.constexpr(int(SoftmaxOver.NONE))


# ------------------------------------------------------------------------------------ scores and the softmax
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
    """S = scale * act(q_rows @ k_b[offs_r]^T) (BLOCK_K, BLOCK_R) over D in BLOCK_D chunks (masked: D needs no
    padding), -inf where the token is not kept; act = relu for RELU (before the scale; NaN stays NaN, as
    torch.relu's). Rows past K read q as 0: their S is 0, not -inf."""
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
    if ACTIVATION == RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    return tl.where(keep[None, :], acc * scale, float("-inf"))


@triton.jit
def _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS: tl.constexpr):
    """Sample b's (K, R) bias: bias[b // H, b % H] of the (B, H, K, R) view (b the folded batch B·H)."""
    if HAS_BIAS:
        bias_ptr += (b // H) * sb_b + (b % H) * sb_h
    return bias_ptr


@triton.jit
def _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS: tl.constexpr):
    """S = s + bias[offs_k, offs_r] of a _scores tile (the bias after the scale and the activation), read on kept
    tokens only: a NaN or inf bias on a masked token reaches nothing, and S stays -inf there. Without a bias, s
    itself (the same value: no code)."""
    if HAS_BIAS:
        bias = tl.load(bias_b + (offs_k[:, None] * sb_k + offs_r[None, :] * sb_r),
                       mask=rows_ok[:, None] & keep[None, :], other=0.0)
        s = s + bias.to(s.dtype)
    return s


@triton.jit
def _kept(s, keep):
    """P = S on kept tokens, 0 elsewhere: the attention without a softmax (softmax_over None)."""
    return tl.where(keep[None, :], s, 0.0)


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
def _row_probs(s, keep, lse):
    """P = exp(S - lse[row]) of an S tile (the softmax over the keys, from the saved lse), 0 where the token is
    not kept, by a select (exp(-inf - lse) would be NaN for a NaN row's lse)."""
    return tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _column_log_probs(s, lse_ptr, b, offs_r, keep, R):
    """log P = S - lse[b, r] of an S tile (the softmax over the queries, lse per token (B, R))."""
    lse = tl.load(lse_ptr + b * R + offs_r, mask=keep, other=0.0)
    return s - lse[None, :]


@triton.jit
def _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R):
    """P = exp(S - lse[b, r]) of an S tile (the softmax over the queries), 0 where the token is not kept and on
    rows past K."""
    return tl.where(rows_ok[:, None] & keep[None, :], tl.exp(_column_log_probs(s, lse_ptr, b, offs_r, keep, R)),
                    0.0)


@triton.jit
def _store_tile(dst_b, x, offs_k, offs_r, rows_ok, R):
    """x into rows offs_k of one sample's (K, R) map dst_b, in its dtype (the returned attention, the bias's
    gradient)."""
    tl.store(dst_b + (offs_k[:, None] * R + offs_r[None, :]), x.to(dst_b.dtype.element_ty),
             mask=rows_ok[:, None] & (offs_r < R)[None, :])


@triton.jit
def _store_attention(attn_b, x, offs_k, offs_r, rows_ok, R, STORE: tl.constexpr):
    """x as the returned attention where STORE: the kernels pass S (-inf on masked tokens) as it is formed, before
    the softmax, for ATTN_LOGITS, and P for ATTN_PROBS."""
    if STORE:
        _store_tile(attn_b, x, offs_k, offs_r, rows_ok, R)


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


# -------------------------------------------------------------------------------- the softmax's gradient
@triton.jit
def _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(dL/dM, idx) of the rows row_ids: the max's gradient and its arg-max (-1 for a row with no kept token and
    past K); placeholders, never read, without a max's gradient (MAX_GRAD: MAX_NONE)."""
    if MAX_GRAD != MAX_NONE:
        gm = tl.load(gm_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
        idx = tl.load(idx_ptr + row_ids, mask=rows_ok, other=-1)
    else:
        gm = rows_ok
        idx = rows_ok
    return gm, idx


@triton.jit
def _add_max_grad(x, offs_r, gm, idx, MAX_GRAD: tl.constexpr, KIND: tl.constexpr):
    """x + dL/dM at each row's arg-max r = idx (_max_grad_of), where the max whose gradient the launch carries
    (MAX_GRAD) is of KIND: MAX_ATTENTION for x = dP, MAX_LOGITS for x = dS before the scale; x itself otherwise."""
    if MAX_GRAD == KIND:
        x += tl.where(offs_r[None, :] == idx[:, None], gm[:, None], 0.0)
    return x


@triton.jit
def _grad_probs(
    de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r, sv_d,
    GRAD_ATTN: tl.constexpr, MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dP (BLOCK_K, BLOCK_R) = dE v^T over Dv tiles, + the returned P's own gradient (GRAD_ATTN: ATTN_PROBS; that
    of returned logits goes to dS, _grad_logits), + the attention max's at its arg-max; read on kept tokens only
    (0 elsewhere)."""
    dp = tl.zeros([BLOCK_K, BLOCK_R], dtype=ACC_DTYPE)
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < Dv
        de = tl.load(de_rows + offs_dv[None, :], mask=rows_ok[:, None] & dv_ok[None, :], other=0.0)
        vt = tl.load(v_b + offs_r.to(tl.int64)[None, :] * sv_r + offs_dv[:, None] * sv_d,
                     mask=dv_ok[:, None] & keep[None, :], other=0.0)
        dp += mm(de.to(vt.dtype), vt, ACC_DTYPE, DOT_PRECISION)
    if GRAD_ATTN == ATTN_PROBS:
        dp += tl.load(ga_b + (offs_k[:, None] * R + offs_r[None, :]), mask=rows_ok[:, None] & keep[None, :],
                      other=0.0)
    return _add_max_grad(dp, offs_r, gm, idx, MAX_GRAD, MAX_ATTENTION)


@triton.jit
def _grad_logits(
    p, dp, shift, delta, a, keep, offs_k, offs_r, rows_ok, R, gm, idx, ga_b, ds_b, scale,
    ACTIVATION: tl.constexpr, MAX_GRAD: tl.constexpr, GRAD_ATTN: tl.constexpr, SOFTMAX: tl.constexpr,
    STORE_DS: tl.constexpr, SELECT: tl.constexpr,
):
    """dT = scale dS [T > 0 for the relu] of an S tile, dS = P ((dP - shift) - delta) (dP itself without a
    softmax, SOFTMAX_NONE: shift and delta unread) + the returned logits' gradient (GRAD_ATTN: ATTN_LOGITS) + the
    logits max's at its arg-max, with shift and delta broadcast from each row ([:, None], over the keys) or token
    ([None, :], over the queries). a: the tile's scale act(T) before the bias (the relu's test; S itself without a
    bias). STORE_DS: dS, 0 on tokens not kept, is written to ds_b (the sample's (K, R) map of the bias's
    gradient). SELECT: 0 on tokens not kept, by a select (without: P and dP are 0 there, so is dS unless delta or
    dP is not finite).

    dP - shift is exactly 0 at the arg-max, and selected so where P > 3/4 (only the arg-max can be): the shift may
    be the other kernel's dP there, which need not be this one's bit for bit (tl.dot's rounding may depend on the
    tile shape), and the near one-hot rows that need the 0 have P ~ 1 there. Where the arg-max has P <= 3/4, an
    ulp of dP_top in dP - shift is far below what the others' P (>= 1/4) put into dS."""
    if SOFTMAX == SOFTMAX_NONE:
        ds = dp
    else:
        ds = p * (tl.where(p > 0.75, 0.0, dp - shift) - delta)
    ds = _add_max_grad(ds, offs_r, gm, idx, MAX_GRAD, MAX_LOGITS)
    if GRAD_ATTN == ATTN_LOGITS:
        ds += tl.load(ga_b + (offs_k[:, None] * R + offs_r[None, :]), mask=rows_ok[:, None] & keep[None, :],
                      other=0.0)
    if STORE_DS:
        _store_tile(ds_b, tl.where(keep[None, :], ds, 0.0), offs_k, offs_r, rows_ok, R)
    ds = ds * scale
    if ACTIVATION == RELU:
        # relu's derivative: 0 where T <= 0 (a = scale relu(T) is 0 there, -inf on masked tokens), NaN kept
        ds = tl.where(a <= 0, 0.0, ds)
    if SELECT:
        ds = tl.where(keep[None, :], ds, 0.0)
    return ds


@triton.jit
def _shift_of(s, dp, offs, AXIS: tl.constexpr):
    """(shift, max): dP at the arg-max of S along AXIS (1: each row's over the tokens offs; 0: each token's over
    the query rows offs), the first among equals, and that max."""
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
    (AXIS 1: tiles of tokens, over the keys; AXIS 0: tiles of query rows, over the queries), with one tile added;
    P is final (from the saved lse), only the shift moves. delta = sum P (dP - shift) over the entries so far:
    where a tile holds a strictly larger S, the shift becomes its dP and delta gains (old shift - new shift) psum,
    psum the P of the earlier entries, which is tiny when the softmax is near one-hot with its top here (the case
    the shift is for): no cancellation against a large term."""
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


# ------------------------------------------------------------------------ the score epilogue and its gradient
# The cosine's sums never overflow: next to the plain |E|^2, |ref|^2 and <E, ref>, the same sums of E * SCALE and
# ref * SCALE (SCALE a power of two, 2^-80 in fp32 and 2^-600 in fp64: exact, and no finite value overflows them)
# are taken from the same tiles; a row uses the plain sums where they are finite and the scaled ones where they
# overflowed (|x| beyond ~1.8e19 in fp32). No branch and no second pass: a few FMAs per element of the epilogue,
# against the BLOCK_R of the P @ v product that made it. Values the scaling underflows are below 2^-100 of such a
# row's norm. The gradient is written so that neither 1 / (|E| |ref|) nor 1 / |E|^2 is formed (both underflow fp32
# at |E| ~ |ref| ~ 1e30): dE = s_E (a_E ref - c_E E) and dref = n_R (a_R E - c_R ref), the kernels storing a_R, c_R,
# n_R per (b, row) for torch to form dref (summed over b for a shared ref).

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
def _stored_sums(
    e_rows, ref_rows, rows_ok, Dv, sr_d, SCORE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The score's row sums of E (_add_sums) read from E in memory; zeros without a score."""
    e_sq = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    e_dot_r = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    se = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    sd = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    if SCORE != SCORE_NONE:
        for dv0 in range(0, Dv, BLOCK_DV):
            offs_dv = dv0 + tl.arange(0, BLOCK_DV)
            tile_ok = rows_ok[:, None] & (offs_dv < Dv)[None, :]
            e = tl.load(e_rows + offs_dv[None, :], mask=tile_ok, other=0.0)
            rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
            e_sq, e_dot_r, se, sd = _add_sums(e, rf, e_sq, e_dot_r, se, sd, SCORE == SCORE_COSINE, ACC_DTYPE)
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
def _store_score(
    out_ptr, ref_rows, row_ids, rows_ok, e_sq, e_dot_r, se, sd, Dv, sr_d, eps_ptr,
    SCORE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = the rows' dot or cosine score from E's row sums; nothing without a score (out is E itself)."""
    if SCORE == SCORE_DOT:
        tl.store(out_ptr + row_ids, e_dot_r.to(out_ptr.dtype.element_ty), mask=rows_ok)
    if SCORE == SCORE_COSINE:
        r_sq, sr = _ref_sums(ref_rows, rows_ok, Dv, sr_d, ACC_DTYPE, BLOCK_K, BLOCK_DV)
        cos, _, _, _, _ = _cosine(e_sq, r_sq, e_dot_r, se, sr, sd, tl.load(eps_ptr), ACC_DTYPE)
        tl.store(out_ptr + row_ids, cos.to(out_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _grad_score(
    g_ptr, e_rows, de_rows, ref_rows, coef_a_ptr, coef_c_ptr, coef_r_ptr, row_ids, rows_ok, Dv, sr_d, eps_ptr,
    SCORE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Writes dE = s_E (a_E ref - c_E E) from the score's gradient g (B, K), and dref's coefficients a_R, c_R, n_R
    (B, K) for torch. A clamped norm is the constant eps: no derivative, hence the indicators [|x| > eps]."""
    g = tl.load(g_ptr + row_ids, mask=rows_ok, other=0.0).to(ACC_DTYPE)
    if SCORE == SCORE_COSINE:
        e_sq, e_dot_r, se, sd = _stored_sums(e_rows, ref_rows, rows_ok, Dv, sr_d, SCORE, ACC_DTYPE, BLOCK_K,
                                             BLOCK_DV)
        r_sq, sr = _ref_sums(ref_rows, rows_ok, Dv, sr_d, ACC_DTYPE, BLOCK_K, BLOCK_DV)
        eps = tl.load(eps_ptr)
        cos, ie, ir, ne, nr = _cosine(e_sq, r_sq, e_dot_r, se, sr, sd, eps, ACC_DTYPE)
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
    for dv0 in range(0, Dv, BLOCK_DV):
        offs_dv = dv0 + tl.arange(0, BLOCK_DV)
        tile_ok = rows_ok[:, None] & (offs_dv < Dv)[None, :]
        e = tl.load(e_rows + offs_dv[None, :], mask=tile_ok, other=0.0)
        rf = tl.load(ref_rows + offs_dv[None, :] * sr_d, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        tl.store(de_rows + offs_dv[None, :], s_e[:, None] * (a_e[:, None] * rf - c_e[:, None] * e), mask=tile_ok)
