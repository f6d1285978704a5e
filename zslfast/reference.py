"""Pure-PyTorch oracles: the math of every zslfast op, written the plain way the papers' code writes it.

Tests compare every backend's outputs and gradients against these, and the "reference" backend of every op runs
them (autograd is PyTorch's own). They are exact and general (every option, mask and mode); the papers' own
eager code, loops included, that zslfast is timed against is zslfast/baselines.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def prototype_scores(e: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ILPG Eq. 5-6 logits: ``logits[b, c] = sum_k e[b, k] * S_W[b, c, k]`` with ``S_W = w * s + s``.

    e (B, K) attribute scores, s (C, K) class semantics, w None, (B, K) or (B, C, K) -> (B, C).
    """
    if w is None:
        return e @ s.T
    if w.dim() == 2:
        w = w[:, None, :]
    sw = w * s + s  # (B, C, K): S_W materialised, as in ILPG's code
    return (e[:, None, :] * sw).sum(-1)


def prototype_scores_factored(
    e: torch.Tensor, s: torch.Tensor, h: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """prototype_scores with ``w[b, c, k] = sum_j h[b, j] * u[j, c, k] (+ bias[c, k])`` (the generator's last layer).

    e (B, K), s (C, K), h (B, J), u (J, C, K), bias None or (C, K) -> (B, C). Materialises w (B, C, K).
    """
    w = torch.einsum("bj,jck->bck", h, u)
    if bias is not None:
        w = w + bias
    return prototype_scores(e, s, w)


def vector_norm(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``|v|`` over ``dim`` (kept) without overflow: the plain norm, and where that overflowed, ``m * |v / m|``,
    m = max |v_d| (a constant for autograd, so the gradient is v / |v| as for the plain norm). torch.linalg.vector_norm returns inf in float32 for |v| beyond
    ~1.8e19 (its sum of squares overflows). NaN anywhere in the row gives NaN."""
    plain = torch.linalg.vector_norm(v, dim=dim, keepdim=True)  # where finite, the result (F.normalize's norm)
    m = v.detach().abs().amax(dim=dim, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return torch.where(plain == float("inf"), m * torch.linalg.vector_norm(v / m, dim=dim, keepdim=True), plain)


def normalize(v: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """F.normalize(v, dim=dim, eps=eps), with the norm taken by ``vector_norm`` (no overflow)."""
    return v / vector_norm(v, dim).clamp_min(eps)


def cosine_logits(
    x: torch.Tensor, protos: torch.Tensor, scale=1.0, eps: float = 1e-8, eps_mode: str = "clamp"
) -> torch.Tensor:
    """``scale * cos(x, protos[c])``: x (..., D), protos (C, D) -> (..., C), normalising as F.normalize(eps=eps)
    (``normalize`` above: F.normalize's values without its overflow) for eps_mode "clamp", or as GEM-ZSL's and
    PSVMA's ``v / (|v| + eps)`` for "add" (with vector_norm, so |v| does not overflow either)."""
    if eps_mode == "add":
        return scale * ((x / (vector_norm(x) + eps)) @ (protos / (vector_norm(protos) + eps)).T)
    return scale * (normalize(x, -1, eps) @ normalize(protos, -1, eps).T)


def fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N): mean, sum, max or min over the heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "sum":
        return attn.sum(dim=1)
    if head_fusion == "max":
        return attn.max(dim=1).values
    if head_fusion == "min":
        return attn.min(dim=1).values
    raise ValueError(f"head_fusion must be 'mean', 'sum', 'max' or 'min', got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """vit-explain's discard, for every instance: (B, N, N) -> (B, N, N) with the int(N*N*discard_ratio) smallest
    entries of each map (torch.topk(largest=False) over the flattened N*N, its tie-breaking) set to 0, except the
    CLS->CLS entry (flat index 0), which is never discarded. The selection is a constant for autograd: discarded
    entries get gradient 0, kept ones the gradient of the identity."""
    B, N, _ = fused.shape
    k = int(N * N * discard_ratio)
    if k == 0:
        return fused
    flat = fused.reshape(B, N * N)
    lowest = flat.topk(k, dim=-1, largest=False).indices
    drop = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).scatter_(1, lowest, True)
    drop[:, 0] = False
    return torch.where(drop, torch.zeros((), dtype=flat.dtype, device=flat.device), flat).reshape(B, N, N)


def attention_rollout(attns, mode: str = "abnar", head_fusion: str = "mean", start_layer: int = 0, cls_only: bool = True,
                      discard_ratio: float = 0.0, normalize: str = "row"):
    """Attention rollout across ViT layers, the eager way (full (B, N, N) products, layer by layer).

    attns: (L, B, H, N, N) or a sequence of L tensors (B, H, N, N), first layer first.
    F^l = fuse(A^l), then, when discard_ratio > 0, ``discard_lowest(F^l, discard_ratio)`` (vit-explain's discard,
        per instance, CLS->CLS kept).
    mode "abnar" (Abnar & Zuidema 2020, SVIP's released code): A'^l = rownorm(F^l + I) with each row divided by
        its own sum, R = A'^L ... A'^1 (``result = a @ result``); normalize "none": A'^l = F^l + I, no division
        (Transformer-Explainability's ``compute_rollout_attention``).
    mode "residual" (SVIP Eq. 4): W^1 = F^1, W^l = W^(l-1) + W^(l-1) F^l (normalize must be "row", ignored).
    Layers before ``start_layer`` are skipped. Returns R[:, 0] (B, N) when ``cls_only``, else R (B, N, N).
    """
    layers = list(attns)[start_layer:]
    if mode == "abnar":
        result = None
        for attn in layers:
            fused = discard_lowest(fuse_heads(attn, head_fusion), discard_ratio)
            a = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
            if normalize == "row":
                a = a / a.sum(dim=-1, keepdim=True)
            elif normalize != "none":
                raise ValueError(f"normalize must be 'row' or 'none', got {normalize!r}")
            result = a if result is None else a @ result
    elif mode == "residual":
        if normalize != "row":
            raise ValueError(f"normalize applies to mode 'abnar' only; mode 'residual' takes 'row', got {normalize!r}")
        result = None
        for attn in layers:
            t = discard_lowest(fuse_heads(attn, head_fusion), discard_ratio)
            result = t if result is None else result + result @ t
    else:
        raise ValueError(f"mode must be 'abnar' or 'residual', got {mode!r}")
    return result[:, 0] if cls_only else result


def attention_score(e, ref, score="cosine", eps=1e-8):
    """attribute_attention's epilogue on E (..., K, Dv): ref or score None -> E; "cosine" -> F.cosine_similarity(E,
    ref, eps=eps), its norms without overflow (``normalize``); "dot" -> <E, ref> (..., K)."""
    if ref is None or score is None:
        return e
    if score == "cosine":
        # F.cosine_similarity's value; written with F.normalize so that the gradient of a clamped norm is 0, as in
        # the kernels (F.cosine_similarity's own backward differs where |E| < eps).
        return (normalize(e, -1, eps) * normalize(ref.expand_as(e), -1, eps)).sum(-1)
    if score == "dot":
        return (e * ref).sum(-1)
    raise ValueError(f"score must be 'cosine', 'dot' or None, got {score!r}")


def attribute_attention(
    q, k, v, ref=None, *, scale=None, mask=None, bias=None, score="cosine", eps=1e-8, return_attention=False,
    softmax_over="keys", logit_activation=None, return_max=None, num_heads=1,
):
    """Attribute->region cross-attention, the eager way (ILPG AVL Eq. 2-4, TransZero(++), SAGE, MSDN, PSVMA, GEM,
    APN, DPPN): materialises (B, H, K, R).

    q (K, D) or (B, K, D), k (B, R, D), v (B, R, Dv), ref None | (K, Dv) | (B, K, Dv), mask None | (B, R) bool
    (True = token kept), bias None or broadcastable to (B, K, R) (to (B, H, K, R) with heads).
    Heads (num_heads = H, nn.MultiheadAttention's split): q, k, v cut along their last dim into H heads, head h
    holding features [h D/H, (h+1) D/H) (of v: [h Dv/H, (h+1) Dv/H)); each head attends on its own.
    S = act(q_h k_h^T) * scale + bias[:, h], act = relu for logit_activation "relu" (PSVMA: before the scale),
    scale = (D/H)^-0.5 by default. P = softmax of S over the kept tokens r (softmax_over "keys"), or, for each
    kept r, over the K queries (softmax_over "queries": MSDN V2A), or S itself on the kept tokens (softmax_over
    None: TransZero++'s E_v2s); a masked token gets no weight from any query, and a row with every token masked
    none anywhere (E = 0). E = the heads' P_h v_h concatenated along Dv (B, K, Dv). Masked tokens are selected away
    whatever their k, v and bias hold (NaN, inf): nothing of them reaches the outputs or the other gradients, and
    their own gradients are 0.
    The score (after the heads' merge): ``attention_score(E, ref, score, eps)``.
    return_attention True or "attention" also returns P, "logits" S with the masked entries -inf, (B, K, R)
    ((B, H, K, R) with heads). return_max "attention" | "logits" also returns (B, K) ((B, H, K) with heads): the
    max over the kept r of P or of S (torch.max: the gradient goes to its index), 0 for a row with every token
    masked. Returns out, (out, map), (out, max) or (out, map, max).
    """
    H = num_heads
    B, R, K = k.shape[0], k.shape[1], q.shape[-2]
    if scale is None:
        scale = (q.shape[-1] // H) ** -0.5
    if mask is not None:
        # Masked tokens are selected away, never multiplied by 0: a NaN or inf there (padding) would survive a
        # product (0 * inf = NaN) in the forward or in a gradient. Their k and v never reach a product, and the
        # gradients of k and v there are exactly 0 (torch.where's backward selects, too).
        token_kept = mask[:, :, None]
        k = torch.where(token_kept, k, 0)
        v = torch.where(token_kept, v, 0)

    def heads(x):  # (..., n, H * d) -> (..., H, n, d)
        return x.unflatten(-1, (H, -1)).transpose(-3, -2)

    logits = torch.matmul(heads(q), heads(k).transpose(-1, -2))  # (B, H, K, R)
    if logit_activation == "relu":
        logits = torch.relu(logits)
    logits = logits * scale
    if bias is not None:
        logits = logits + (bias.expand(B, H, K, R) if H > 1 else bias.expand(B, K, R)[:, None])
    keep = None if mask is None else mask[:, None, None, :]
    if softmax_over is None:
        attn = logits if keep is None else torch.where(keep, logits, 0)
    else:
        dim = -1 if softmax_over == "keys" else -2
        # finfo.min, not -inf: a fully masked row stays finite (uniform), then the select zeroes it and its
        # gradient. (Over the queries, a masked column is all finfo.min: uniform, then selected to 0 alike.)
        filled = logits if keep is None else logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        # A row (column) of -inf logits alone (a -inf bias) is all 0 as well, as torch's SDPA gives it.
        dead = (filled == float("-inf")).all(dim=dim, keepdim=True)
        attn = torch.softmax(filled.masked_fill(dead, 0), dim=dim)
        attn = torch.where(~dead if keep is None else keep & ~dead, attn, 0)
    e = torch.matmul(attn, heads(v)).transpose(-3, -2).flatten(-2)  # (B, K, Dv): the heads side by side
    results = (attention_score(e, ref, score, eps),)
    if return_attention:
        returned = attn
        if return_attention == "logits":
            returned = logits if keep is None else logits.masked_fill(~keep, float("-inf"))
        results += (returned if H > 1 else returned[:, 0],)
    if return_max is not None:
        pooled = attn if return_max == "attention" else logits
        if keep is None:
            best = pooled.max(dim=-1).values
        else:
            best = pooled.masked_fill(~keep, float("-inf")).max(dim=-1).values
            best = torch.where(mask.any(dim=-1)[:, None, None], best, 0)
        results += (best if H > 1 else best[:, 0],)
    return results if len(results) > 1 else results[0]


def memory_bank_update(features, confidences, counts, next_slot, z, y, conf, threshold: float, policy: str = "fifo"):
    """The class-wise memory bank's update the way research code writes it: entries offered one by one, in batch order.

    Bank state, updated in place: features (C, M, K, D), confidences (C, M, K), counts (C, M) int64 (entries stored,
    always in slots 0..counts-1), next_slot (C, M) int64 (FIFO write head). Offers: z (B, M, D), y (B,) labels, conf (B, M). Entry (b, m) is offered to queue
    (y[b], m) when conf[b, m] > threshold (after casting conf to the bank's dtype) and z[b, m] is finite.
    policy "fifo": written at next_slot, overwriting the oldest once full. "min_conf": appended while not full;
    when full, replaces the least confident stored entry (the first such slot on ties) if strictly more confident.
    """
    C, M, K, D = features.shape
    z = z.to(features.dtype)
    conf = conf.to(confidences.dtype)
    for b in range(z.shape[0]):
        c = int(y[b])
        for m in range(M):
            value = float(conf[b, m])
            if not value > threshold or not bool(torch.isfinite(z[b, m]).all()):
                continue
            n = int(counts[c, m])
            if policy == "fifo":
                slot = int(next_slot[c, m])
                next_slot[c, m] = (slot + 1) % K
                counts[c, m] = min(n + 1, K)
            elif policy == "min_conf":
                if n < K:
                    slot = n
                    counts[c, m] = n + 1
                else:
                    slot = int(torch.argmin(confidences[c, m]))
                    if not value > float(confidences[c, m, slot]):
                        continue
            else:
                raise ValueError(f"policy must be 'fifo' or 'min_conf', got {policy!r}")
            features[c, m, slot] = z[b, m]
            confidences[c, m, slot] = conf[b, m]


def memory_bank_prototypes(features: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, M, K, D) bank, (C, M) counts -> (C, M, D): mean of the stored entries (slots 0..counts-1), 0 where none."""
    K = features.shape[2]
    stored = (torch.arange(K, device=features.device) < counts[..., None]).to(features.dtype)
    return (features * stored[..., None]).sum(dim=2) / counts.clamp_min(1)[..., None].to(features.dtype)


def memory_bank_kl(z: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """SAGE Eq. 9: mean over the active (b, m) of KL(softmax(z[b, m]) || softmax(protos[labels[b], m])), softmax over
    the feature dim; KL(P || Q) = sum_d P_d (log P_d - log Q_d). 0 when nothing is active. protos is a constant
    (detached). z (B, M, D), protos (C, M, D), labels (B,), active (B, M) bool -> ()."""
    # Inactive rows are selected away before any arithmetic: a NaN/inf in an inactive z (or in its prototype, NaN
    # for an empty queue, say) must reach neither the loss nor, through 0 * NaN in a backward, the gradient.
    log_p = F.log_softmax(torch.where(active[..., None], z, torch.zeros_like(z)), dim=-1)
    log_q = F.log_softmax(protos.detach()[labels], dim=-1)
    log_q = torch.where(active[..., None], log_q, log_p.detach())
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    kl = torch.where(active, kl, torch.zeros_like(kl))
    return kl.sum() / active.sum().clamp_min(1).to(kl.dtype)

