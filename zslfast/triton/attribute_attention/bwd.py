"""attribute_attention's backward kernels and their planner. The math: the op's docstring
(zslfast/ops/attribute_attention.py); the launch configurations: config.py.

Over the keys:
    _rows_backward_kernel      grid (K / BLOCK_K, batch splits): per (sample, query rows): dE and dref's
                               coefficients from the score's gradient (_grad_score), each row's (shift, delta) (R <=
                               BLOCK_R: from the S and dP tiles of the whole row in registers; longer R: a first
                               pass over the R tiles, _add_softmax_grad, P from the saved lse), then dq = scale dS k
                               over the R tiles, added into the program's own rows
    _columns_backward_kernel   grid (R / BLOCK_R, B): loops over the query-row tiles of its tokens, P = exp(S - lse)
                               recomputed, dS = P ((dP - shift) - delta) with the rows' (shift, delta), adds
                               P^T dE into dv and scale dS^T q into dk (its own rows)
    _score_backward_kernel     dE and dref's coefficients alone, where the rows kernel does not run
Without a softmax, dS = dP: no (shift, delta), and the rows kernel runs for dq alone.
The bias's gradient is dS itself (0 on masked tokens), written (B, K, R) by the columns kernel of either axis, the
one that visits every (query row, token) once; the gradient of returned logits adds into dS, that of a returned P
into dP. The relu's test reads the scores before the bias (_grad_logits). With a bias, the kernels form each
tile's dP before its S: dP does not depend on S, and S, P and the bias (with the relu, the scores before it too)
then stay out of the registers of the dP product, whose operands are the kernels' peak (the launches without a bias
keep the order their configurations were tuned on).
Over the queries, a token's softmax runs over every query row, so its (shift, delta) needs all of them before any
dS, and dq comes last:
    _score_backward_kernel              dE and dref's coefficients (none without a score: dE is the gradient)
    _queries_columns_backward_kernel    grid (R / BLOCK_R, B): a first loop over the query-row tiles takes each
                                        token's running (shift, delta) and adds dv = P^T dE, writing (shift, delta)
                                        (B, R) when dq needs them; a second loop adds dk = scale dS^T q
    _queries_rows_backward_kernel       grid (K / BLOCK_K, batch splits): dq = scale dS k over the R tiles, from P
                                        = exp(S - lse[r]), dP and the tokens' (shift, delta)
A shared q's dq: each batch split sums its samples in order into its own (K, D) partial, and torch sums the
partials in split order. dS's dP - shift is selected to 0 where P > 3/4 (_grad_logits): the shift comes from the
other kernel's dP at the arg-max, which need not match this one's bit for bit (tl.dot's rounding may depend on the
tile shapes). Over the keys' R tiles, dq leaves out rows with no kept token (sum P = 0; NaN for a NaN row): their
dS is 0, and a non-finite dE would make it NaN through v's 0 on masked tokens; left out of the sums rather than
selected tile by tile, which costs registers (selected only without a softmax, where no sum of P tells those rows
apart, and with the returned logits' gradient, which reaches dS where P is 0). dk, dv of masked tokens are never
written (the planner zero-fills them).

dE (B, K, Dv), shift and delta ((B, K) over the keys, (B, R) over the queries), a_R, c_R, n_R (B, K), the dq
partials (splits, K, D) or (B, K, D), dk (B, R, D) and dv (B, R, Dv) are in the accumulator dtype, cast to the
inputs' dtype at the end; the bias's gradient (B, K, R) is written in the inputs' dtype.
"""

import torch
import triton
import triton.language as tl

from ..._enums import ReturnAttention, ReturnMax, Score, SoftmaxOver
from .._common import H200_SMS, accumulator_dtype, dot_precision, split, tl_accumulator_dtype
from .._launch import Launch, run
from .config import launch_config
from .fwd import bias_args, check_map_offsets, mask_arg, scalar_arg, strides3
from .helpers import (
    ATTN_LOGITS, SCORE_NONE, SOFTMAX_NONE, SOFTMAX_QUERIES, _add_product, _add_softmax_grad, _bias_of, _biased,
    _column_probs, _grad_logits, _grad_probs, _grad_score, _keep, _kept, _max_grad_of, _row_probs, _scores,
    _shift_of, _softmax,
)


@triton.jit
def _score_backward_kernel(
    g_ptr, ref_ptr, e_ptr, de_ptr, coef_a_ptr, coef_c_ptr, coef_r_ptr,
    B, K, Dv, eps_ptr, b_per_split, sr_b, sr_k, sr_d,
    SCORE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_ok = offs_k < K
    b_start = split * b_per_split
    b_end = tl.minimum(b_start + b_per_split, B)
    for b32 in range(b_start, b_end):
        b = b32 + tl.zeros([], dtype=tl.int64)  # the loop index is a Python int under the interpreter
        row_ids = b * K + offs_k
        _grad_score(g_ptr, e_ptr + row_ids[:, None] * Dv, de_ptr + row_ids[:, None] * Dv,
                    ref_ptr + b * sr_b + offs_k.to(tl.int64)[:, None] * sr_k, coef_a_ptr, coef_c_ptr, coef_r_ptr,
                    row_ids, rows_ok, Dv, sr_d, eps_ptr, SCORE, ACC_DTYPE, BLOCK_K, BLOCK_DV)


@triton.jit
def _rows_backward_kernel(
    g_ptr, ga_ptr, q_ptr, k_ptr, v_ptr, ref_ptr, mask_ptr, bias_ptr, e_ptr, lse_ptr,
    de_ptr, delta_ptr, shift_ptr, coef_a_ptr, coef_c_ptr, coef_r_ptr, dq_ptr, gm_ptr, idx_ptr,
    B, K, R, D, Dv, scale_ptr, eps_ptr, b_per_split,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, sr_b, sr_k, sr_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_ATTN: tl.constexpr, SCORE: tl.constexpr,
    NEED_Q: tl.constexpr, SHARED_Q: tl.constexpr, SINGLE_R: tl.constexpr, SOFTMAX: tl.constexpr,
    ACTIVATION: tl.constexpr, MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
        ga_b = ga_ptr + b * K * R  # the sample's (K, R) map: in-sample offsets in int32
        if SOFTMAX == SOFTMAX_NONE:
            shift = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)  # (unread without a softmax)
            delta = shift
        else:
            lse = tl.load(lse_ptr + row_ids, mask=rows_ok, other=0.0)
        gm, idx = _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD, ACC_DTYPE)
        if SCORE != SCORE_NONE:
            _grad_score(g_ptr, e_rows, de_rows, ref_rows, coef_a_ptr, coef_c_ptr, coef_r_ptr, row_ids, rows_ok,
                        Dv, sr_d, eps_ptr, SCORE, ACC_DTYPE, BLOCK_K, BLOCK_DV)
            tl.debug_barrier()
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        k_b = k_ptr + b * sk_b
        v_b = v_ptr + b * sv_b
        if SHARED_Q:
            dq_rows = dq_ptr + split.to(tl.int64) * K * D + offs_k.to(tl.int64)[:, None] * D
        else:
            dq_rows = dq_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D
        if SINGLE_R:
            # The whole row in registers: P as its own softmax, dP, and the row's (shift, delta) from them.
            offs_r = tl.arange(0, BLOCK_R)
            keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
            if HAS_BIAS:  # dP first (the module docstring)
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            a = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            s = _biased(a, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
            if SOFTMAX == SOFTMAX_NONE:
                p = _kept(s, keep)
            else:
                p, _ = _softmax(s)
            if not HAS_BIAS:
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            if SOFTMAX != SOFTMAX_NONE:
                shift, _ = _shift_of(s, dp, offs_r, 1)
                delta = tl.sum(p * (dp - shift[:, None]), axis=1)
                tl.store(shift_ptr + row_ids, shift, mask=rows_ok)
                tl.store(delta_ptr + row_ids, delta, mask=rows_ok)
            if NEED_Q:
                ds = _grad_logits(p, dp, shift[:, None], delta[:, None], a, keep, offs_k, offs_r, rows_ok, R,
                                  gm, idx, ga_b, ga_b, scale, ACTIVATION, MAX_GRAD, GRAD_ATTN, SOFTMAX,
                                  False, True)
                _add_product(dq_rows, rows_ok, ds.to(k_ptr.dtype.element_ty),
                             k_b + offs_r.to(tl.int64)[:, None] * sk_r, keep, sk_d, D,
                             True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                tl.debug_barrier()
        else:
            # R tiles: a first pass for the rows' (shift, delta), P from the saved lse (none without a softmax).
            if SOFTMAX != SOFTMAX_NONE:
                best = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)
                shift = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
                delta = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
                psum = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                    if HAS_BIAS:  # dP first (the module docstring)
                        dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                         sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R,
                                         BLOCK_DV)
                    s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                                ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                    s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
                    p = _row_probs(s, keep, lse)
                    if not HAS_BIAS:
                        dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                         sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R,
                                         BLOCK_DV)
                    best, shift, delta, psum = _add_softmax_grad(best, shift, delta, psum, s, p, dp, offs_r, 1)
                tl.store(shift_ptr + row_ids, shift, mask=rows_ok)
                tl.store(delta_ptr + row_ids, delta, mask=rows_ok)
            if NEED_Q:
                # Without a softmax, or with the logits' own gradient (dS on a row whose P is all 0), dS is
                # selected tile by tile instead.
                if SOFTMAX == SOFTMAX_NONE or GRAD_ATTN == ATTN_LOGITS:
                    dq_ok = rows_ok
                else:
                    dq_ok = rows_ok & (psum != 0)  # rows with a kept token (the module docstring)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
                    if HAS_BIAS:  # dP first (the module docstring)
                        dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv,
                                         sv_r, sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K,
                                         BLOCK_R, BLOCK_DV)
                    a = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                                ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
                    s = _biased(a, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
                    if SOFTMAX == SOFTMAX_NONE:
                        p = _kept(s, keep)
                    else:
                        p = _row_probs(s, keep, lse)
                    if not HAS_BIAS:
                        dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv,
                                         sv_r, sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K,
                                         BLOCK_R, BLOCK_DV)
                    ds = _grad_logits(p, dp, shift[:, None], delta[:, None], a, keep, offs_k, offs_r, rows_ok, R,
                                      gm, idx, ga_b, ga_b, scale, ACTIVATION, MAX_GRAD, GRAD_ATTN, SOFTMAX,
                                      False, SOFTMAX == SOFTMAX_NONE or GRAD_ATTN == ATTN_LOGITS)
                    _add_product(dq_rows, dq_ok, ds.to(k_ptr.dtype.element_ty),
                                 k_b + offs_r.to(tl.int64)[:, None] * sk_r, keep, sk_d, D,
                                 True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
                    tl.debug_barrier()


@triton.jit
def _columns_backward_kernel(
    ga_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, lse_ptr, de_ptr, delta_ptr, shift_ptr, dk_ptr, dv_ptr,
    dbias_ptr, gm_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_ATTN: tl.constexpr, NEED_K: tl.constexpr,
    NEED_V: tl.constexpr, NEED_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, ACTIVATION: tl.constexpr,
    MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
    ga_b = ga_ptr + b * K * R  # the sample's (K, R) maps: in-sample offsets in int32
    dbias_b = dbias_ptr + b * K * R
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows_ok = offs_k < K
        row_ids = b * K + offs_k
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        de_rows = de_ptr + row_ids[:, None] * Dv
        gm, idx = _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD, ACC_DTYPE)
        if HAS_BIAS and (NEED_K or NEED_BIAS):  # dP first (the module docstring)
            dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                             sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
        a = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(a, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        if SOFTMAX == SOFTMAX_NONE:
            p = tl.where(rows_ok[:, None] & keep[None, :], s, 0.0)
        else:
            lse = tl.load(lse_ptr + row_ids, mask=rows_ok, other=0.0)
            # Rows past K: s is 0 there (q loaded as 0) but lse too, so force P = 0; masked tokens: 0 by a select.
            p = tl.where(rows_ok[:, None] & keep[None, :], tl.exp(s - lse[:, None]), 0.0)
        p_op = p.to(v_ptr.dtype.element_ty)
        if NEED_K or NEED_BIAS:
            # dS, written as the bias's gradient (NEED_BIAS); dk (+)= scale dS^T q over D chunks (NEED_K)
            if SOFTMAX == SOFTMAX_NONE:
                shift = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)  # (unread without a softmax)
                delta = shift
            else:
                shift = tl.load(shift_ptr + row_ids, mask=rows_ok, other=0.0)
                delta = tl.load(delta_ptr + row_ids, mask=rows_ok, other=0.0)
            if not HAS_BIAS:
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            ds = _grad_logits(p, dp, shift[:, None], delta[:, None], a, keep, offs_k, offs_r, rows_ok, R, gm, idx,
                              ga_b, dbias_b, scale, ACTIVATION, MAX_GRAD, GRAD_ATTN, SOFTMAX, NEED_BIAS, True)
            if NEED_K:
                _add_product(dk_rows, keep, tl.trans(ds.to(q_ptr.dtype.element_ty)), q_rows, rows_ok, sq_d, D,
                             k0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
        if NEED_V:
            # dv (+)= P^T dE over Dv chunks
            _add_product(dv_rows, keep, tl.trans(p_op), de_rows, rows_ok, 1, Dv, k0 > 0,
                         ACC_DTYPE, DOT_PRECISION, BLOCK_DV)
        tl.debug_barrier()


# ------------------------------------------------------------------------------- the softmax over the queries
@triton.jit
def _queries_columns_backward_kernel(
    ga_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, lse_ptr, de_ptr, delta_ptr, shift_ptr, dk_ptr, dv_ptr,
    dbias_ptr, gm_ptr, idx_ptr,
    K, R, D, Dv, scale_ptr,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_ATTN: tl.constexpr, NEED_K: tl.constexpr,
    NEED_V: tl.constexpr, NEED_BIAS: tl.constexpr, STORE_DELTA: tl.constexpr, ACTIVATION: tl.constexpr,
    MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
    ga_b = ga_ptr + b * K * R  # the sample's (K, R) maps: in-sample offsets in int32
    dbias_b = dbias_ptr + b * K * R
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
        gm, idx = _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD, ACC_DTYPE)
        if HAS_BIAS and (NEED_K or STORE_DELTA or NEED_BIAS):  # dP first (the module docstring)
            dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                             sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
        s = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                    ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        s = _biased(s, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
        p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
        if NEED_K or STORE_DELTA or NEED_BIAS:
            if not HAS_BIAS:
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
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
    if NEED_K or NEED_BIAS:
        # dS, written as the bias's gradient (NEED_BIAS); dk (+)= scale dS^T q over D chunks (NEED_K)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            rows_ok = offs_k < K
            row_ids = b * K + offs_k
            q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
            de_rows = de_ptr + row_ids[:, None] * Dv
            gm, idx = _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD, ACC_DTYPE)
            if HAS_BIAS:  # dP first (the module docstring)
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            a = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            s = _biased(a, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
            p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
            if not HAS_BIAS:
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            ds = _grad_logits(p, dp, shift[None, :], delta[None, :], a, keep, offs_k, offs_r, rows_ok, R, gm, idx,
                              ga_b, dbias_b, scale, ACTIVATION, MAX_GRAD, GRAD_ATTN, SOFTMAX_QUERIES,
                              NEED_BIAS, True)
            if NEED_K:
                _add_product(dk_rows, keep, tl.trans(ds.to(q_ptr.dtype.element_ty)), q_rows, rows_ok, sq_d, D,
                             k0 > 0, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
            tl.debug_barrier()


@triton.jit
def _queries_rows_backward_kernel(
    ga_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, lse_ptr, de_ptr, delta_ptr, shift_ptr, dq_ptr, gm_ptr, idx_ptr,
    B, K, R, D, Dv, scale_ptr, b_per_split,
    sq_b, sq_k, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, H, sb_b, sb_h, sb_k, sb_r,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_ATTN: tl.constexpr, SHARED_Q: tl.constexpr,
    ACTIVATION: tl.constexpr, MAX_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        de_rows = de_ptr + row_ids[:, None] * Dv
        gm, idx = _max_grad_of(gm_ptr, idx_ptr, row_ids, rows_ok, MAX_GRAD, ACC_DTYPE)
        q_rows = q_ptr + b * sq_b + offs_k.to(tl.int64)[:, None] * sq_k
        k_b = k_ptr + b * sk_b
        v_b = v_ptr + b * sv_b
        bias_b = _bias_of(bias_ptr, b, H, sb_b, sb_h, HAS_BIAS)
        ga_b = ga_ptr + b * K * R  # the sample's (K, R) map: in-sample offsets in int32
        if SHARED_Q:
            dq_rows = dq_ptr + split.to(tl.int64) * K * D + offs_k.to(tl.int64)[:, None] * D
        else:
            dq_rows = dq_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            keep = _keep(mask_ptr, b, offs_r, R, HAS_MASK)
            if HAS_BIAS:  # dP first (the module docstring)
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            a = _scores(q_rows, k_b, offs_r, rows_ok, keep, D, sq_d, sk_r, sk_d, scale,
                        ACTIVATION, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
            s = _biased(a, bias_b, offs_k, offs_r, rows_ok, keep, sb_k, sb_r, HAS_BIAS)
            p = _column_probs(s, lse_ptr, b, offs_r, keep, rows_ok, R)
            if not HAS_BIAS:
                dp = _grad_probs(de_rows, v_b, ga_b, gm, idx, offs_k, offs_r, keep, rows_ok, R, Dv, sv_r,
                                 sv_d, GRAD_ATTN, MAX_GRAD, ACC_DTYPE, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_DV)
            shift = tl.load(shift_ptr + b * R + offs_r, mask=keep, other=0.0)
            delta = tl.load(delta_ptr + b * R + offs_r, mask=keep, other=0.0)
            ds = _grad_logits(p, dp, shift[None, :], delta[None, :], a, keep, offs_k, offs_r, rows_ok, R, gm, idx,
                              ga_b, ga_b, scale, ACTIVATION, MAX_GRAD, GRAD_ATTN, SOFTMAX_QUERIES, False, True)
            _add_product(dq_rows, rows_ok, ds.to(k_ptr.dtype.element_ty), k_b + offs_r.to(tl.int64)[:, None] * sk_r,
                         keep, sk_d, D, True, ACC_DTYPE, DOT_PRECISION, BLOCK_D)
            tl.debug_barrier()


# ------------------------------------------------------------------------------------------------ the planner
def plan_backward(grad, grad_attn, grad_max, q, k, v, ref, mask, bias, e, lse, best, best_index, probs, scale, score,
                  eps, output_mask, return_attention, softmax_over, logit_activation, return_max):
    """((grad_q, grad_k, grad_v, grad_ref, grad_bias) to be filled, steps): the launches, then the fixed-order sums
    and dtype casts. The arguments are the op's raw backward's, in its order; the options arrive as their ids
    (zslfast._enums). grad_max (B, K) or None: the max's gradient, to the forward's arg-max best_index (best itself
    is not read, nor probs: the forward's P, which the CPU backend may keep; these kernels recompute it, keeping
    the flash-style memory bound). grad_attn: that of the returned P (into dP) or logits (into dS), per
    return_attention. grad_bias (B, K, R) in q's dtype: dS, 0 on masked tokens, written by the columns kernel (the
    op reduces it to the bias's shape)."""
    need_q, need_k, need_v, need_ref, need_bias = output_mask
    need_ref = need_ref and score != Score.NONE
    need_bias = need_bias and bias is not None
    B, R, D = k.shape
    K, Dv = q.shape[-2], v.shape[-1]
    has_ga = return_attention != ReturnAttention.NONE and grad_attn is not None and grad_attn.numel() > 0
    check_map_offsets(K, R, bias, bias is not None or has_ga)
    acc = accumulator_dtype(q.dtype)
    over_queries = softmax_over == SoftmaxOver.QUERIES
    normalized = softmax_over != SoftmaxOver.NONE
    e = e.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    shared_q = q.dim() == 2
    ga = grad_attn.to(acc).contiguous() if has_ga else lse
    if not normalized and return_max == ReturnMax.ATTENTION:
        return_max = ReturnMax.LOGITS  # P = S on the kept tokens (as the forward): dP = dS
    # The max's gradient, to its arg-max: compiled in only when given (else the launch has no max).
    has_gm = return_max != ReturnMax.NONE and grad_max is not None and grad_max.numel() > 0
    max_grad = int(return_max) if has_gm else int(ReturnMax.NONE)
    gm = grad_max.to(acc).contiguous() if has_gm else lse
    index_t = best_index.to(torch.int32).contiguous() if has_gm else lse
    if score == Score.NONE:
        de = grad.to(acc).contiguous()
        g = lse
    else:
        de = torch.empty(B, K, Dv, device=q.device, dtype=acc)
        g = grad.to(acc).contiguous()
    # the softmax backward's (shift, delta): (B, K) over the keys (the rows kernel's, for the columns kernel's dk);
    # (B, R) over the queries (the columns kernel's, for the rows kernel's dq); none without a softmax
    delta = torch.empty((B, R) if over_queries else (B, K) if normalized else (0,), device=q.device, dtype=acc)
    shift = torch.empty_like(delta)
    coef_a, coef_c, coef_r = (torch.empty(B, K, device=q.device, dtype=acc) for _ in range(3))
    options = dict(logit_activation=logit_activation, return_max=max_grad, bias=bias is not None,
                   softmax_over=softmax_over, grad_attn=has_ga)
    rows_name = "queries_rows_backward" if over_queries else "rows_backward"
    tiles, rows_launch = launch_config(rows_name, B, K, R, D, Dv, q.dtype, **options)
    single_r = R <= tiles["BLOCK_R"]
    if shared_q:
        # Batch chunks of the shared-q dq reduction, each a (K, D) partial summed afterwards in chunk order: as few
        # as give every SM a program (fewer partials to write), as many as the batch allows.
        splits, b_per_split = split(B, triton.cdiv(K, tiles["BLOCK_K"]), H200_SMS)
        dq = torch.zeros((splits, K, D) if need_q else (0,), device=q.device, dtype=acc)
    else:
        splits, b_per_split = B, 1
        dq = torch.zeros((B, K, D) if need_q else (0,), device=q.device, dtype=acc)
    ref_t = ref if ref is not None else e
    mask_t = mask_arg(mask, lse)
    bias_t = bias_args(bias, lse)
    scale_t = scalar_arg(scale, acc, q.device)
    eps_t = scalar_arg(eps, acc, q.device) if score == Score.COSINE else scale_t  # (read by the cosine only)
    common = dict(ACC_DTYPE=tl_accumulator_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype))
    flags = dict(HAS_MASK=mask is not None, HAS_BIAS=bias is not None, GRAD_ATTN=int(return_attention) if has_ga
                 else int(ReturnAttention.NONE), ACTIVATION=int(logit_activation), MAX_GRAD=max_grad)
    grid_rows = (triton.cdiv(K, tiles["BLOCK_K"]), splits)
    # Over the keys the rows kernel gives dq, and the rows' (shift, delta) that dS needs in the columns kernel.
    rows_kernel = not over_queries and (need_q or (normalized and (need_k or need_bias)))
    steps = []
    if score != Score.NONE and not rows_kernel:
        # dE and dref's coefficients first (over the queries, every row's dE before the columns kernel)
        score_tiles, score_launch = launch_config("score_backward", B, K, R, D, Dv, q.dtype, **options)
        # its own batch chunks (it sums nothing over b): as many programs as the rows kernel's, on its own K tiles
        score_splits, score_b = split(B, triton.cdiv(K, score_tiles["BLOCK_K"]), H200_SMS) if shared_q else (B, 1)
        steps.append(Launch(
            _score_backward_kernel, (triton.cdiv(K, score_tiles["BLOCK_K"]), score_splits),
            (g, ref_t, e, de, coef_a, coef_c, coef_r, B, K, Dv, eps_t, score_b, *strides3(ref_t)),
            dict(SCORE=int(score), ACC_DTYPE=common["ACC_DTYPE"], BLOCK_K=score_tiles["BLOCK_K"],
                 BLOCK_DV=score_tiles["BLOCK_DV"]),
            **score_launch,
        ))
    if rows_kernel:
        # S and dP (2 B K R (D + Dv)), dq (2 B K R D), and over R tiles S and dP once more (the first pass)
        flops = 2 * B * K * R * (D + Dv) + ((2 * B * K * R * D + (0 if single_r or not normalized
                                                                   else 2 * B * K * R * (D + Dv)))
                                           if need_q else 0)
        steps.append(Launch(
            _rows_backward_kernel, grid_rows,
            (g, ga, q, k, v, ref_t, mask_t, bias_t[0], e, lse, de, delta, shift, coef_a, coef_c, coef_r, dq, gm,
             index_t, B, K, R, D, Dv, scale_t, eps_t, b_per_split,
             *strides3(q), *k.stride(), *v.stride(), *strides3(ref_t), *bias_t[1:]),
            dict(**flags, SCORE=int(score), NEED_Q=need_q, SHARED_Q=shared_q, SINGLE_R=single_r,
                 SOFTMAX=int(softmax_over), **common, **tiles),
            **rows_launch, flops=flops,
        ))
    # The columns kernels leave the rows of masked tokens unwritten: they must read 0.
    alloc = torch.zeros if mask is not None else torch.empty
    grad_k = alloc((B, R, D) if need_k else (0,), device=q.device, dtype=acc)
    grad_v = alloc((B, R, Dv) if need_v else (0,), device=q.device, dtype=acc)
    grad_bias = torch.empty((B, K, R) if need_bias else (0,), device=q.device, dtype=q.dtype)
    store_delta = over_queries and need_q
    if need_k or need_v or need_bias or store_delta:
        name = "queries_columns_backward" if over_queries else "columns_backward"
        col_tiles, col_launch = launch_config(name, B, K, R, D, Dv, q.dtype, **options)
        flops = 2 * B * K * R * (D + Dv) + 2 * B * K * R * ((D if need_k else 0) + (Dv if need_v else 0))
        args = (ga, q, k, v, mask_t, bias_t[0], lse, de, delta, shift, grad_k, grad_v, grad_bias, gm, index_t,
                K, R, D, Dv, scale_t, *strides3(q), *k.stride(), *v.stride(), *bias_t[1:])
        constexprs = dict(**flags, NEED_K=need_k, NEED_V=need_v, NEED_BIAS=need_bias, **common, **col_tiles)
        if over_queries:
            constexprs["STORE_DELTA"] = store_delta
            flops += 2 * B * K * R * (D + Dv) if need_k or need_bias else 0  # S and dP again in the dk loop
        else:
            constexprs["SOFTMAX"] = int(softmax_over)
        steps.append(Launch(
            _queries_columns_backward_kernel if over_queries else _columns_backward_kernel,
            (triton.cdiv(R, col_tiles["BLOCK_R"]), B), args, constexprs, **col_launch, flops=flops,
        ))
    if store_delta:
        steps.append(Launch(
            _queries_rows_backward_kernel, grid_rows,
            (ga, q, k, v, mask_t, bias_t[0], lse, de, delta, shift, dq, gm, index_t, B, K, R, D, Dv, scale_t,
             b_per_split, *strides3(q), *k.stride(), *v.stride(), *bias_t[1:]),
            dict(**flags, SHARED_Q=shared_q, **common, **tiles),
            **rows_launch, flops=2 * B * K * R * (2 * D + Dv),
        ))
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
        grads.append(grad_bias)

    return grads, steps + [finish]


def backward(grad, grad_attn, grad_max, q, k, v, ref, mask, bias, e, lse, best, best_index, probs, scale, score, eps,
             output_mask, return_attention, softmax_over, logit_activation, return_max):
    """(grad_q, grad_k, grad_v, grad_ref, grad_bias): the op's backward (plan_backward)."""
    grads, steps = plan_backward(grad, grad_attn, grad_max, q, k, v, ref, mask, bias, e, lse, best, best_index,
                                 probs, scale, score, eps, output_mask, return_attention, softmax_over,
                                 logit_activation, return_max)
    run(steps)
    return tuple(grads)
