"""attribute_attention: attribute->region cross-attention with a fused cosine/dot score (ILPG AVL Eq. 2-4, TransZero's
decoder cross-attention, SAGE/GEM/PSVMA/APN attribute localisation, TransZero++/DPPN multi-head attention),
flash-style: no (B, K, R) tensor is kept.

    S[b, i, r]  = scale * <q[i], k[b, r]> (+ bias[b, i, r])  (q[b, i] for per-sample queries), scale = D^-0.5 default
    P[b, i, :]  = softmax over the kept r (mask[b, r] True) of S[b, i, :]; a row with no kept r is all zeros
    E[b, i]     = sum_r P[b, i, r] v[b, r]
    out[b, i]   = E[b, i]                                    ref None or score None     -> (B, K, Dv)
                = <E[b, i], ref[i]>                          score "dot"                -> (B, K)
                = <E, ref> / (max(|E|, eps) max(|ref|, eps)) score "cosine" (eps: 1e-8) -> (B, K)
                                                             (F.cosine_similarity(E, ref, dim=-1, eps=1e-8))
    lse[b, i]   = log sum_{kept r} exp(S[b, i, r])           (0 for a fully masked row)

Backward, g = dL/dout, iE = 1 / max(|E|, eps), iR = 1 / max(|ref|, eps), cos = out for "cosine":
    dE          = g                                          (score None)
                = g ref                                      (dot)
                = g (iE iR ref - [|E| > eps] iE^2 cos E)     (cosine; the clamped norm has no derivative)
    dref        = g E (dot), g (iE iR E - [|ref| > eps] iR^2 cos ref) (cosine); summed over b for ref (K, Dv)
    P           = the kept r's softmax, recomputed;  dP = dE v^T (+ dL/dattn when the attention is returned)
    dS          = P (dP - Delta),  Delta[b, i] = sum_r P dP, taken as
                = P ((dP - c) - delta),  c[b, i] = dP at the row's arg-max t (the first among equals),
                  delta[b, i] = sum_r P (dP - c)  (= Delta - c, as sum_r P = 1; why: "saturation" below)
    dq = scale dS k (summed over b for a shared q (K, D)), dk = scale dS^T q, dv = P^T dE

Options (the variants of MSDN, SAGE, PSVMA, GEM-ZSL, APN, TransZero++ and DPPN, one call each), T = q k^T:
    logit_activation  None: S = scale T;  "relu": S = scale relu(T) (PSVMA's AnyAttention: before the scale)
    bias              S = scale act(T) + bias (after the scale: SDPA's float attn_mask, TransZero++'s
                      q kᵀ/√d − relu(w_g)), bias broadcast to (B, K, R) (B, H, K, R with heads) as a view of stride 0
                      along its broadcast dimensions, never expanded in memory, read at the kept tokens only (a NaN or
                      inf bias at a masked token reaches nothing). -inf logits (a -inf bias) get P = 0; a row (over
                      the queries: a column) whose kept logits are all -inf is all 0, lse 0, as a fully masked one
                      (as torch's SDPA gives it).
    softmax_over      "keys": P above.  "queries": for each kept r, P[b, :, r] = softmax over the K queries of
                      S[b, :, r] (MSDN V2A), 0 on a masked r; its lse is then per token: lse[b, r] =
                      log sum_i exp(S[b, i, r]) (B, R) (0 on a masked r). None: no normalisation, P = S on the kept
                      r and 0 on the masked ones (TransZero++'s E_v2s = (q kᵀ) v); no lse. E and the score as above.
    return_attention  "attention" (or True): also returns P (B, K, R);  "logits": S instead, masked entries -inf
                      (masked_fill(~mask, -inf) of S, as before a softmax: APN's attribute maps). Differentiable:
                      its gradient adds to dP ("attention") or to dS ("logits"; nothing at masked entries).
    return_max        "attention": M[b, i] = max over kept r of P[b, i, r] (GEM-ZSL, SAGE Eq. 3);  "logits": of
                      S[b, i, r] (PSVMA's max-pool). idx[b, i] = the first r reaching it (int32: saved for the
                      backward, -1 and M = 0 for a row with no kept r). (B, K), kept in the accumulator dtype.
                      With softmax_over None both maxima are the max of S over the kept r.
    num_heads         H: q, k, v cut along D (Dv) into H heads of D/H (Dv/H) features, nn.MultiheadAttention's
                      order (head h: features [h D/H, (h+1) D/H)); scale = (D/H)^-0.5 by default; each head attends
                      on its own, with bias[:, h]; E (B, K, Dv) = the heads' E side by side, then the score against
                      ref (after the merge: DPPN's and TransZero++'s nn.MultiheadAttention merge their heads before
                      any projection or score). The map comes back (B, H, K, R), the max (B, H, K). The kernels see
                      the heads folded into the batch, N = B·H (batch n = b H + h): copies of q, k, v (O(B·K·D +
                      B·R·D), cheap beside the attention's O(B·K·R·D)); a shared q (K, D) then becomes per sample.
    backward, gM = dL/dM, gA = dL/d(returned map):
                      dP = dE v^T (+ gA for "attention") (+ gM at r = idx for "attention")
                      keys:    dS = P (dP - Delta), Delta[b, i] = sum_r P dP
                      queries: dS = P (dP - Gamma), Gamma[b, r] = sum_i P dP  (a column sum over every query row)
                      None:    dS = dP on the kept r
                      each shifted as above: c, delta of the row (keys) or of the column (queries: c[b, r] = dP at
                      the arg-max query row of token r)
                      "logits": dS[b, i, idx] += gM;  (+ gA for the returned "logits");  dS = 0 on masked r
                      dbias = dS, summed over the bias's broadcast dimensions (a (B·H, K, R) tensor, formed only when
                      the bias requires grad)
                      dT = scale dS [not T <= 0 for "relu"] (torch's relu backward: a NaN T passes dS)
                      dq = dT k, dk = dT^T q, dv = P^T dE

Numerics every backend keeps (tests/test_attribute_attention.py):
    masks       masked tokens are selected away (torch.where / tl.where / masked loads), never weighted by 0: a NaN
                or inf in masked k or v reaches no output and no gradient, their dk, dv are exactly 0, and a fully
                masked row keeps E = 0, score 0, and passes nothing to q, k, v even from a NaN or inf gradient
    NaN         a NaN input makes NaN exactly the outputs and gradients that depend on it (q[i]: row i of every
                sample that keeps a token; a kept k[b, r] or v[b, r]: sample b; a bias[b, i, r] at a kept r: row i
                of sample b), and nothing else
    overflow    the cosine's norms and <E, ref> are plain sums where finite, rescaled where they overflowed; its
                gradient is written so that neither iE iR nor iE^2 is formed (both underflow fp32 at |E| ~ 1e30)
    saturation  where a softmax is near one-hot (its top two logits more than ~17 apart in float32, ~37 in
                float64), Delta = P_t dP_t + (terms ~e^-gap) rounds to dP_t in any precision, and dP_t - Delta keeps
                nothing of the true dS_t = -sum_{r != t} P_r (dP_r - dP_t) (<dE, E> cancels worse still): the eager
                softmax backward (the reference's), float64 included, loses the q and k gradients of such rows.
                The kernels shift dP by c first: the arg-max's own dP - c is exactly 0 (in Triton also a select
                where P > 3/4, as c may be the other kernel's dP), delta sums the small terms alone, and every dS
                keeps float32's relative accuracy (tests: within float32's first-order rounding of dP, against
                60-digit arithmetic). Over R tiles (Triton, R > 256), and over query-row tiles for the queries, c
                follows the running arg-max: delta += (c_old - c_new) (sum of the P seen so far), exact as that sum
                is tiny whenever it matters.

Shapes: q (K, D) attribute queries shared by the batch (ILPG: Q = A W_q) or (B, K, D); k (B, R, D), v (B, R, Dv)
from R image tokens; ref None, (K, Dv) or (B, K, Dv); mask None or (B, R) bool; bias None, broadcastable to
(B, K, R), or with heads to (B, H, K, R) (4-D, or up to 2-D: a 3-D bias would broadcast its batch onto the heads).
Autograd keeps q, k, v, ref, mask, the caller's bias, E (B, K, Dv) and lse (B, K) ((B, R) over the queries), with
return_max M and idx (B, K): O(B·K·Dv) + O(B·K) + O(B·R), and on the Triton backend never the (B, K, R) attention
(only return_attention materialises it, and the bias's gradient dS).
Without a backward to come (no input requires grad, or grad mode off), E is not written at all for the scores.
Memory and the backward, "cpu": a CPU has memory to spare and few FLOPs, so there the backward reads the forward's
P instead of recomputing q k^T and its softmax (one GEMM of the backward's four fewer) whenever keeping it costs
little: when the attention is returned anyway (it is the caller's tensor; keeping it extends its life to the
backward, and modifying it in place before then is autograd's error), or when P (B·H, K, R) is no larger than the
E autograd keeps anyway (R <= Dv per head), so at most doubling what the op keeps. Not with logit_activation "relu"
(its backward reads T) nor in fp16/bf16 (a P rounded to 16 bits would cost the gradients their accuracy). The
Triton backend keeps the flash-style bound above on every shape: it always recomputes.

    "cpu"     C++ (csrc/cpu/attribute_attention.cpp): at::parallel_for over (b, query tiles), at::mm per tile,
              softmax and the cosine/dot epilogue and their gradients fused in row loops
    "triton"  Triton forward and backward (zslfast/triton/attribute_attention/); CUDA tensors, or CPU tensors
              under TRITON_INTERPRET=1. CUDA tensors always use Triton: there is no CUDA C++ kernel for this op
              (one would earn its upkeep only by beating Triton on a GPU, which has not been measured).
Sums over b (shared q, shared ref) run in a fixed order, without atomics: deterministic.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..validation import (
    accumulator_dtype, check_int, check_option, check_positive, check_same_device, check_tensor, promote, shape_str,
)
from .._enums import choices
from ._spec import OpSpec, compiled_kernel, define, triton_kernel

OP = "attribute_attention"
EPS = 1e-8  # F.cosine_similarity's eps in the papers' code


def _forward_fake(
    q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over, logit_activation,
    return_max, backend,
):
    acc = accumulator_dtype(q.dtype)
    B, R = k.shape[0], k.shape[1]
    K, Dv = q.shape[-2], v.shape[-1]
    if score is None:
        out, e = q.new_empty((B, K, Dv)), q.new_empty((0,), dtype=acc)
    else:
        out, e = q.new_empty((B, K)), q.new_empty((B, K, Dv) if save_e else (0,), dtype=acc)
    attn = q.new_empty((B, K, R) if return_attention is not None else (0,))
    lse = q.new_empty({"keys": (B, K), "queries": (B, R), None: (0,)}[softmax_over], dtype=acc)
    pooled = (B, K) if return_max is not None else (0,)
    return out, e, lse, attn, q.new_empty(pooled, dtype=acc), q.new_empty(pooled, dtype=torch.int32)


def _backward_fake(
    grad, grad_attn, grad_max, q, k, v, ref, mask, bias, e, lse, best, best_index, probs, scale, score, eps,
    output_mask, return_attention, softmax_over, logit_activation, return_max, backend,
):
    need_q, need_k, need_v, need_ref, need_bias = output_mask
    need_ref = need_ref and score is not None
    need_bias = need_bias and bias is not None
    return (
        q.new_empty(q.shape if need_q else (0,)),
        q.new_empty(k.shape if need_k else (0,)),
        q.new_empty(v.shape if need_v else (0,)),
        q.new_empty(ref.shape if need_ref else (0,)),
        q.new_empty((k.shape[0], q.shape[-2], k.shape[1]) if need_bias else (0,)),
    )


def _reference(q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over,
               logit_activation, return_max):
    # The op's arguments: heads folded into the batch (N = B·H), bias the (B, H, K, R) view (batch n: its row
    # n // H, head n % H, i.e. its (N, K, R) reshape).
    N, R, K = k.shape[0], k.shape[1], q.shape[-2]
    result = reference.attribute_attention(
        q, k, v, ref, scale=scale, mask=mask, bias=None if bias is None else bias.reshape(N, K, R), score=score,
        eps=eps, return_attention=return_attention or False, softmax_over=softmax_over,
        logit_activation=logit_activation, return_max=return_max,
    )
    result = list(result) if isinstance(result, tuple) else [result]
    out = result.pop(0)
    attn = result.pop(0) if return_attention is not None else None
    best = result.pop(0) if return_max is not None else None
    return out, None, None, attn, best, None


BACKWARD = define(OpSpec(
    name="attribute_attention_backward",
    schema="(Tensor grad, Tensor? grad_attn, Tensor? grad_max, Tensor q, Tensor k, Tensor v, Tensor? ref,"
    " Tensor? mask, Tensor? bias, Tensor e, Tensor lse, Tensor best, Tensor best_index, Tensor? probs,"
    " float scale, str? score,"
    " float eps, bool[5] output_mask, str? return_attention, str? softmax_over, str? logit_activation,"
    " str? return_max, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    kernels={
        "cpu": compiled_kernel("_attribute_attention_bwd"),
        "triton": triton_kernel("attribute_attention", "backward"),
    },
    fake=_backward_fake,
    autocast=None,
))


def _reads_probs(return_attention, logit_activation, dtype, backend) -> bool:
    """Whether the backward reads the forward's P, returned by the kernels (module docstring: "Memory and the
    backward"): the CPU backend's, in float/double, without the relu."""
    return (backend == "cpu" and return_attention == "attention" and logit_activation is None
            and dtype in (torch.float32, torch.float64))


def _setup_context(ctx, inputs, output):
    (q, k, v, ref, mask, bias, scale, score, eps, return_attention, save_e, softmax_over, activation, return_max,
     _) = inputs
    out, e, lse, attn, best, best_index = output
    ctx.mark_non_differentiable(e, lse, best_index)
    # Unused output gradients stay None: materialised, the one for e would be a zero-filled (B, K, Dv) per backward.
    ctx.set_materialize_grads(False)
    # Score None: the output is E itself, and the kernels return an empty e. best and best_index are (B, K) or
    # empty: with the lse, O(B·K) (O(B·R) for the lse over the queries) beside E's O(B·K·Dv). bias is the caller's
    # broadcast view: saving it keeps no more than the caller's own tensor.
    probs = attn if _reads_probs(return_attention, activation, q.dtype, inputs[-1]) else None
    ctx.save_for_backward(q, k, v, ref, mask, bias, out if score is None else e, lse, best, best_index, probs)
    ctx.scale, ctx.score, ctx.eps, ctx.return_attention = scale, score, eps, return_attention
    ctx.options, ctx.backend = (softmax_over, activation, return_max), inputs[-1]


def _backward(ctx, grad, _grad_e, _grad_lse, grad_attn, grad_max, _grad_index):
    q, k, v, ref, mask, bias, e, lse, best, best_index, probs = ctx.saved_tensors
    output_mask = [bool(x) for x in ctx.needs_input_grad[:4]] + [bool(ctx.needs_input_grad[5])]
    if ref is None or ctx.score is None:  # score None: ref is not used
        output_mask[3] = False
    if bias is None:
        output_mask[4] = False
    if grad is None:
        grad = torch.zeros_like(e, dtype=q.dtype) if ctx.score is None else q.new_zeros((k.shape[0], q.shape[-2]))
    if ctx.return_attention is None:
        grad_attn = None
    if ctx.options[2] is None:
        grad_max = None
    *grads, grad_bias = BACKWARD(
        ctx.backend, grad, grad_attn, grad_max, q, k, v, ref, mask, bias, e, lse, best, best_index, probs, ctx.scale,
        ctx.score, ctx.eps, output_mask, ctx.return_attention, *ctx.options,
    )
    # dL/dbias = dS (N, K, R) = (B·H, K, R), summed to the shape of the bias the op was given (the caller's (B, H,
    # K, R) broadcast view: the view's own backward then sums over its broadcast dimensions).
    if output_mask[4]:
        grad_bias = grad_bias.view(bias.shape[0], bias.shape[1], *grad_bias.shape[1:]).sum_to_size(bias.shape)
    return (*(g if need else None for g, need in zip(grads, output_mask)), None,
            grad_bias if output_mask[4] else None, *([None] * 9))


# CUDA tensors always use Triton: there is no CUDA C++ kernel for this op.
SPEC = define(OpSpec(
    name=OP,
    schema="(Tensor q, Tensor k, Tensor v, Tensor? ref, Tensor? mask, Tensor? bias, float scale, str? score,"
    " float eps, str? return_attention, bool save_e, str? softmax_over, str? logit_activation, str? return_max,"
    " str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    kernels={
        "cpu": compiled_kernel("_attribute_attention_fwd"),
        "triton": triton_kernel("attribute_attention", "forward"),
    },
    reference=_reference,
    gpu_preference=("triton",),
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
    autocast="lower",
))

# return_attention's accepted values -> the op's (None: no map)
RETURNED_MAP = {False: None, True: "attention", "attention": "attention", "logits": "logits"}


def _check_inputs(q, k, v, ref, mask, bias, scale, score, eps, return_attention, softmax_over, logit_activation,
                  return_max, num_heads) -> None:
    check_tensor(OP, "q", q, (2, 3), "(K, D) or (B, K, D)")
    check_tensor(OP, "k", k, (3,), "(B, R, D)")
    check_tensor(OP, "v", v, (3,), "(B, R, Dv)")
    B, R, D = k.shape
    shapes = f"q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
    if q.shape[-1] != D:
        raise ValueError(f"{OP}: q (..., K, D) and k (B, R, D) must share D, got {shapes}")
    if q.dim() == 3 and q.shape[0] != B:
        raise ValueError(f"{OP}: per-sample q (B, K, D) must have k's batch size B={B}, got {shapes}")
    if v.shape[0] != B or v.shape[1] != R:
        raise ValueError(f"{OP}: v (B, R, Dv) must match k (B, R, D) in B and R, got {shapes}")
    K, Dv = q.shape[-2], v.shape[-1]
    if ref is not None:
        check_tensor(OP, "ref", ref, (2, 3), "(K, Dv) or (B, K, Dv)")
        if ref.shape[-2:] != (K, Dv) or (ref.dim() == 3 and ref.shape[0] != B):
            raise ValueError(
                f"{OP}: ref must be (K, Dv) = ({K}, {Dv}) or (B, K, Dv) = ({B}, {K}, {Dv}) for {shapes}, "
                f"got ref {shape_str(ref)}"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{OP}: mask must be a bool tensor (B, R), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{OP}: mask must be a bool tensor (B, R) (True = token kept), got dtype {mask.dtype}")
        if mask.shape != (B, R):
            raise ValueError(f"{OP}: mask must be (B, R) = ({B}, {R}) to match k {shape_str(k)}, got {shape_str(mask)}")
    check_int(OP, "num_heads", num_heads, 1)
    H = num_heads
    if D % H or Dv % H:
        raise ValueError(f"{OP}: num_heads={H} must divide D={D} and Dv={Dv} (each head takes D/H and Dv/H "
                         f"features), got {shapes}")
    if bias is not None:
        if isinstance(bias, torch.Tensor) and bias.dtype == torch.bool:
            raise TypeError(f"{OP}: bias must be a floating tensor added to the logits; a bool one is a mask: pass "
                            f"it as mask=, got dtype {bias.dtype}")
        check_tensor(OP, "bias", bias, (1, 2, 3, 4), "broadcastable to (B, K, R) (with heads: (B, H, K, R))")
        target = _bias_shape(B, H, K, R, bias.dim())
        if (H > 1 and bias.dim() == 3) or not _broadcasts(bias.shape, target):
            layout = "(B, K, R)" if len(target) == 3 else "(B, H, K, R)"
            raise ValueError(f"{OP}: bias must broadcast to {layout} = {target} for {shapes}, num_heads={H}, got "
                             f"bias {shape_str(bias)}" + (" (with heads a bias is 4-D, (B, 1, K, R) when the heads "
                                                          "share it, or up to 2-D)" if H > 1 else ""))
    check_option(OP, "score", score, choices("score"))
    if scale is not None:
        check_positive(OP, "scale", scale)
    check_positive(OP, "eps", eps)
    if not any(return_attention is value or (isinstance(return_attention, str) and return_attention == value)
               for value in RETURNED_MAP):
        raise ValueError(f"{OP}: return_attention must be one of {tuple(RETURNED_MAP)}, got {return_attention!r}")
    check_option(OP, "softmax_over", softmax_over, choices("softmax_over"))
    check_option(OP, "logit_activation", logit_activation, choices("logit_activation"))
    check_option(OP, "return_max", return_max, choices("return_max"))


def _bias_shape(B, H, K, R, dims):
    """What a bias of ``dims`` dims broadcasts to: (B, K, R) up to 3-D with one head, else (B, H, K, R). (With heads
    a 3-D bias is refused: broadcast, its first dimension would be read as the heads.)"""
    return (B, K, R) if H == 1 and dims <= 3 else (B, H, K, R)


def _broadcasts(shape, target) -> bool:
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _split_heads(x, H):
    """(B, n, H·d) -> (B·H, n, d): head h of sample b is batch b·H + h (a copy, O(B·n·H·d)). A shared (n, H·d) is
    first given the batch: with heads the kernels see per-sample queries."""
    *lead, n, width = x.shape
    heads = x.unflatten(-1, (H, width // H)).transpose(-3, -2)  # (..., H, n, d)
    return heads.reshape(-1, n, width // H)


def attribute_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    score: Optional[str] = "cosine",
    eps: float = EPS,
    return_attention=False,
    softmax_over: Optional[str] = "keys",
    logit_activation: Optional[str] = None,
    return_max: Optional[str] = None,
    num_heads: int = 1,
    backend: Optional[str] = None,
):
    """``E = softmax(q k^T * scale + bias, over R) v`` and its cosine (or dot) score against ``ref``, without keeping
    the (B, K, R) attention for the backward.

    Args:
        q: (K, D) attribute queries shared by the batch, or (B, K, D) per sample.
        k: (B, R, D) region/token keys.  v: (B, R, Dv) region/token values.
        ref: None (return E), (K, Dv) or (B, K, Dv): what each E[b, i] is scored against (ILPG: the attribute
            vectors; TransZero: ``V @ W_1`` with ``score="dot"``).
        scale: softmax temperature, a finite float > 0, default ``(D / num_heads) ** -0.5``.
        mask: None or (B, R) bool, True = token kept; a row with no kept token gives E = 0 and score 0.
        bias: None or a floating tensor added to the scaled logits (SDPA's float ``attn_mask``; TransZero++'s
            ``-relu(geometry)``): broadcastable to (B, K, R), or with heads to (B, H, K, R) (a 4-D bias with one head:
            to (B, 1, K, R)). Never expanded in memory; read at the kept tokens only. Its gradient, when it requires
            one, materialises a (B·H, K, R) tensor (then summed to its shape).
        score: "cosine" (``F.cosine_similarity(E, ref, dim=-1, eps=eps)``), "dot" (``<E, ref>``) or None (E).
        eps: the cosine score's norm clamp (default 1e-8, the papers' code).
        return_attention: False, True or "attention": also return the (B, K, R) probabilities P; "logits": the
            logits S instead (masked entries -inf; APN's attribute maps). Materialised only then; differentiable.
        softmax_over: "keys" (each query's softmax over the R tokens), "queries" (each token's softmax over the K
            queries: MSDN's V2A branch) or None (no normalisation, P = S on the kept tokens: TransZero++'s E_v2s);
            a masked token gets no weight from any query either way.
        logit_activation: None or "relu": ``relu(q k^T)`` before the scale (PSVMA's AnyAttention).
        return_max: None, "attention" or "logits": also return the (B, K) max over the kept tokens of P (GEM-ZSL,
            SAGE Eq. 3: ``MaxPool(W_s)``) or of the logits S (PSVMA's max-pool, APN's attribute scores); its
            gradient goes to the arg-max (first among equals), and no (B, K, R) tensor is kept. 0 for a row with
            every token masked.
        num_heads: H >= 1 dividing D and Dv: q, k, v split along their features into H heads
            (nn.MultiheadAttention's order: head h holds features [h D/H, (h+1) D/H)), each head attending on its
            own; E (B, K, Dv) is the heads side by side, then scored against ref. The map comes back (B, H, K, R),
            the max (B, H, K).
        backend: None (by device, or ``ZSLFAST_BACKEND``), "reference", "cpu" or "triton". CUDA tensors run the
            Triton kernels (no CUDA C++ kernel for this op).
    Returns:
        (B, K) scores, or E (B, K, Dv) when ``ref`` or ``score`` is None; with return_attention, (that, map);
        with return_max, (that, max); with both, (that, map, max).
    """
    _check_inputs(q, k, v, ref, mask, bias, scale, score, eps, return_attention, softmax_over, logit_activation,
                  return_max, num_heads)
    returned = RETURNED_MAP[return_attention]
    if score is None or ref is None:
        ref, score = None, None
    device = check_same_device(OP, q=q, k=k, v=v, ref=ref, mask=mask, bias=bias)
    q, k, v, ref, bias = promote(q, k, v, ref, bias)
    which = SPEC.resolve(backend, device)
    H = num_heads
    B, R, K = k.shape[0], k.shape[1], q.shape[-2]
    scale = float((q.shape[-1] // H) ** -0.5 if scale is None else scale)
    if bias is not None:  # the (B, H, K, R) view the kernels read, broadcast dimensions at stride 0
        target = _bias_shape(B, H, K, R, bias.dim())
        bias = bias.expand(target).unsqueeze(1) if len(target) == 3 else bias.expand(target)
    # With heads the score comes after the merge (the models merge their heads first): the kernels return E.
    kernel_ref, kernel_score = (ref, score) if H == 1 else (None, None)
    if H > 1:
        q, k, v = (_split_heads(t if t.dim() == 3 else t.expand(B, *t.shape), H) for t in (q, k, v))
        mask = None if mask is None else mask.repeat_interleave(H, dim=0)
    # E is kept only when a backward can follow; scores alone never write (B, K, Dv).
    save_e = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, kernel_ref, bias))
    # The CPU backward reads P instead of recomputing it where P is no larger than E (module docstring): the
    # kernels then return it, for the backward alone.
    keep_p = (save_e and returned is None and k.shape[1] <= v.shape[-1]
              and _reads_probs("attention", logit_activation, q.dtype, which))
    out, _, _, attn, best, _ = SPEC(
        which, q, k, v, kernel_ref, mask, bias, scale, kernel_score, float(eps), "attention" if keep_p else returned,
        save_e, softmax_over, logit_activation, return_max,
    )
    if H > 1:
        out = reference.attention_score(out.unflatten(0, (B, H)).transpose(1, 2).flatten(-2), ref, score, eps)
        attn = attn.unflatten(0, (B, H)) if returned is not None else attn
        best = best.unflatten(0, (B, H)) if return_max is not None else best
    results = (out,) + ((attn,) if returned is not None else ())
    if return_max is not None:
        results += (best.to(q.dtype),)  # the kernels keep it in the accumulator dtype for the backward
    return results if len(results) > 1 else out
