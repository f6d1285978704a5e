"""The code a paper writes for each op: the eager baselines that zslfast is timed against.

One copy, used by ``python -m zslfast bench``, ``python -m zslfast gpucheck``, benchmarks/ and the tests (which check
each against zslfast.reference, so it can serve as a second oracle). zslfast.reference is the oracle: exact,
general (every option, mask and mode) and written for clarity; these are the papers' own chains of einsum, softmax
and loops, at the options the papers use, written the way their code writes them.

    prototype_scores            ILPG IDPP + APC: S_W = W * S + S materialised, then a row-wise dot-sum
    prototype_scores_factored   the same after the generator's last linear layer: w formed by an einsum
    cosine_logits               SVIP/SAGE/GEM heads: scale * normalize(x) @ normalize(protos).T (F.normalize eps)
    cosine_logits_eps_added     GEM-ZSL base_module / PSVMA compute_score: x / (|x| + 1e-5), eps added, not clamped
    attribute_attention         ILPG AVL / TransZero: softmax(q k^T / sqrt(D)) v, then the cosine with ref
    attribute_attention_sdpa    the same with PyTorch's fused scaled_dot_product_attention for the softmax part
    msdn_attention              MSDN (core/MSDN.py): V2A (softmax over the attributes) and A2V (over the regions)
                                attention, each einsum-chained and dot-scored against V W
    gem_attention               GEM-ZSL: softmax attention maps of attribute prototypes over regions, the part
                                features' cosine with the attributes, and each map's max over the regions
    transzero_pp_geometry_attention  TransZero++ (model_tzpp.py, ScaledDotProductGeometryAttention): per head,
                                softmax(q kᵀ/√d_k − w_g) v, w_g the relu'd geometry weights, heads merged side by side
    transzero_pp_e_v2s          TransZero++ (forward_feature_transformer): E_v2s by einsum, no softmax, weighted by
                                the regions' scores ('cc': W_4's diagonal)
    apn_attribute_maps          APN (model_proto.py): raw attribute maps conv2d(x, prototypes) and their max_pool2d
    multihead_attention         nn.MultiheadAttention between its projections (DPPN's PrtAttLayer): heads split
                                along the features, softmax(q kᵀ/√d) v per head, merged side by side
    attention_rollout           SVIP / vit-explain: mean over heads, + I, rows normalised, bmm layer by layer
    memory_bank_kl              SAGE Eq. 9 vectorised: log-softmaxes, KL(P || Q) per (b, m), mean over the active
    memory_bank_kl_loop         the same per (b, m) with F.kl_div, as research code loops it
    memory_bank_fifo_update     SAGE's FIFO queues vectorised: stable sort by queue, closed-form slots
    memory_bank_update_loop     the queues offered entry by entry (plain Python bookkeeping), fifo or min_conf
    msas_loop, ridge_prototypes_loop, class_diversity_promotion_loop, topk_similar_classes_loop,
    semantic_regularised_contrastive_loss_loop
                                FSIGenZ / GenZSL one class (or one (u, lambda), one element) at a time, as their
                                code loops: zslfast.generative batches them

Shapes: e (B, K), s (C, K), w (B, C, K), h (B, J), u (J, C, K) -> (B, C); x (N, D), protos (C, D) -> (N, C);
q (K, D) or (B, K, D), k (B, R, D), v (B, R, Dv), ref (K, Dv) -> (B, K); MSDN V (K, Dw), W_* (Dw, F), Fs (B, F, R)
-> (2, B, K); GEM q (K, D), x (B, R, D), ref (K, D) -> (2, B, K); TransZero++ q, k, v (B, N, h d), w_g (B, h, N, N)
-> (B, N, h d), emb_vis (B, R, C), W_4 (C, C), emb_att (B, K, C), S_p (B, R) -> (B, K); APN x (B, C, h, w),
prototypes (K, C, 1, 1) -> (B, K, h w + 1) (the map, then its max); multi-head q (B, K, D), k (B, R, D),
v (B, R, Dv) -> (B, K, Dv); attns L x (B, H, N, N) -> (B, N);
z (B, M, D), protos (C, M, D), labels (B,), active (B, M) -> (); the bank: features (C, M, K, D),
confidences (C, M, K), counts and next_slot (C, M), offers z (B, M, D), y (B,), conf (B, M).
"""

from typing import Optional

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8  # F.normalize / F.cosine_similarity as the papers call them


def prototype_scores(e, s, w):
    sw = w * s + s
    return (e[:, None] * sw).sum(-1)


def prototype_scores_factored(e, s, h, u):
    return prototype_scores(e, s, torch.einsum("bj,jck->bck", h, u))


def cosine_logits(x, protos, scale):
    return scale * F.normalize(x, dim=-1, eps=COSINE_EPS) @ F.normalize(protos, dim=-1, eps=COSINE_EPS).T


def cosine_logits_eps_added(x, protos, scale, eps=1e-5):
    x_n = x / (x.norm(dim=-1, keepdim=True) + eps)
    p_n = protos / (protos.norm(dim=-1, keepdim=True) + eps)
    return x_n @ p_n.T * scale


def attribute_attention(q, k, v, ref):
    e = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    return F.cosine_similarity(e, ref.expand_as(e), dim=-1, eps=COSINE_EPS)


def attribute_attention_sdpa(q, k, v, ref):
    e = F.scaled_dot_product_attention(q.expand(k.shape[0], *q.shape[-2:]), k, v)
    return F.cosine_similarity(e, ref.expand_as(e), dim=-1, eps=COSINE_EPS)


def msdn_attention(V, W_1, W_2, W_3, W_4, Fs):
    """MSDN's two branches as its code chains them: (S_p, S_v) stacked, (2, B, K)."""
    A = torch.softmax(torch.einsum("iv,vf,bfr->bir", V, W_2, Fs), dim=1)  # V2A: over the attributes
    F_p = torch.einsum("bir,bfr->bif", A, Fs)
    S_p = torch.einsum("iv,vf,bif->bi", V, W_1, F_p)
    A_v = torch.softmax(torch.einsum("iv,vf,bfr->bir", V, W_3, Fs), dim=-1)  # A2V: over the regions
    F_v = torch.einsum("bir,bfr->bif", A_v, Fs)
    S_v = torch.einsum("iv,vf,bif->bi", V, W_4, F_v)
    return torch.stack((S_p, S_v))


def gem_attention(q, x, ref):
    """GEM-ZSL's attribute localisation: (cosine of the part features with ref, max of each attention map), (2, B, K)."""
    attn = torch.softmax(torch.einsum("kd,brd->bkr", q, x), dim=-1)
    parts = attn @ x
    score = F.cosine_similarity(parts, ref.expand_as(parts), dim=-1, eps=COSINE_EPS)
    return torch.stack((score, attn.amax(dim=-1)))


def transzero_pp_geometry_attention(q, k, v, w_g):
    """TransZero++'s geometry attention after fc_q, fc_k, fc_v (before fc_o), as its forward chains it."""
    b_s, nq, width = q.shape
    h = w_g.shape[1]
    d_k = width // h
    q = q.view(b_s, nq, h, d_k).permute(0, 2, 1, 3)
    k = k.view(b_s, nq, h, d_k).permute(0, 2, 3, 1)
    v = v.view(b_s, nq, h, d_k).permute(0, 2, 1, 3)
    att = torch.matmul(q, k) / d_k ** 0.5
    w_mn = torch.softmax(-w_g + att, -1)
    return torch.matmul(w_mn, v).permute(0, 2, 1, 3).contiguous().view(b_s, nq, width)


def transzero_pp_e_v2s(emb_vis, W_4, emb_att, S_p):
    E_v2s = torch.einsum("brc,cc,bic->bir", emb_vis, W_4, emb_att)
    return torch.einsum("bir,br->bi", E_v2s, S_p)


def apn_attribute_maps(x, prototypes):
    """APN's layer4 branch: the maps (B, K, h w) and their max (the attribute scores), side by side."""
    attention = F.conv2d(input=x, weight=prototypes)
    pre_attri = F.max_pool2d(attention, kernel_size=attention.shape[-1]).view(x.shape[0], -1)
    return torch.cat((attention.flatten(2), pre_attri[..., None]), dim=-1)


def multihead_attention(q, k, v, num_heads):
    B, K, D = q.shape
    d = D // num_heads
    q = q.reshape(B, K, num_heads, d).transpose(1, 2)
    k = k.reshape(B, k.shape[1], num_heads, d).transpose(1, 2)
    v = v.reshape(B, v.shape[1], num_heads, v.shape[-1] // num_heads).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, K, -1)


def attention_rollout(attns):
    result = None
    for attn in attns:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else torch.bmm(a, result)
    return result[:, 0]


def memory_bank_kl(z, protos, labels, active):
    log_p = F.log_softmax(z, dim=-1)
    log_q = F.log_softmax(protos[labels], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return (kl * active).sum() / active.sum().clamp_min(1)


def memory_bank_kl_loop(z, protos, labels, active):
    """Per-(b, m) F.kl_div: KL(P || Q) = F.kl_div(log Q, log P, log_target=True), SAGE Eq. 9's direction."""
    total, n = z.new_zeros(()), 0
    B, M = active.shape
    flags, classes = active.tolist(), labels.tolist()
    for b in range(B):
        for m in range(M):
            if flags[b][m]:
                log_p = F.log_softmax(z[b, m], dim=-1)
                log_q = F.log_softmax(protos[classes[b], m], dim=-1)
                total = total + F.kl_div(log_q, log_p, reduction="sum", log_target=True)
                n += 1
    return total / max(n, 1)


def memory_bank_fifo_update(features, confidences, counts, next_slot, z, y, conf, threshold):
    """Vectorised FIFO in eager PyTorch: stable sort of the accepted offers by queue, closed-form slots."""
    C, M, K, D = features.shape
    accepted = conf > threshold
    queue = (y[:, None] * M + torch.arange(M, device=z.device))[accepted]  # row-major: batch order kept
    order = torch.sort(queue, stable=True).indices
    queue, z_sorted, c_sorted = queue[order], z[accepted][order], conf[accepted][order]
    per_queue = torch.bincount(queue, minlength=C * M)
    start = per_queue.cumsum(0) - per_queue
    rank = torch.arange(queue.numel(), device=z.device) - start[queue]
    keep = rank >= per_queue[queue] - K
    slot = (next_slot.view(-1)[queue] + rank) % K
    features.view(C * M, K, D)[queue[keep], slot[keep]] = z_sorted[keep]
    confidences.view(C * M, K)[queue[keep], slot[keep]] = c_sorted[keep]
    counts.view(-1).copy_((counts.view(-1) + per_queue).clamp_max(K))
    next_slot.view(-1).copy_((next_slot.view(-1) + per_queue) % K)


def memory_bank_update_loop(features, confidences, counts, next_slot, z, y, conf, threshold, policy="fifo"):
    """The queues offered entry by entry as research code writes them (plain Python ints for the bookkeeping):
    "fifo" writes at the head, overwriting the oldest once full; "min_conf" appends while not full, then replaces
    the least confident entry when the offer is more confident."""
    K = features.shape[2]
    labels, scores = y.tolist(), conf.tolist()
    for b, c in enumerate(labels):
        for m, score in enumerate(scores[b]):
            if not score > threshold:
                continue
            if policy == "fifo":
                slot = int(next_slot[c, m])
                next_slot[c, m] = (slot + 1) % K
                counts[c, m] = min(int(counts[c, m]) + 1, K)
            else:
                n = int(counts[c, m])
                if n < K:
                    slot = n
                    counts[c, m] = n + 1
                else:
                    slot = int(confidences[c, m].argmin())
                    if score <= float(confidences[c, m, slot]):
                        continue
            features[c, m, slot] = z[b, m]
            confidences[c, m, slot] = score


# ----------------------------------------------------------------------------------------------------------------
# FSIGenZ / GenZSL (zslfast.generative), one class at a time.


def msas_loop(att: torch.Tensor, threshold, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FSIGenZ MSAS, one class at a time: a = a_o + a_o * [a_o > Th]; a @ W_A (matrix) or a * W_A (vector)."""
    rows = []
    for c in range(att.shape[0]):
        a_o = att[c]
        a = a_o + a_o * (a_o > threshold).to(a_o.dtype)
        if weight is not None:
            a = a @ weight if weight.dim() == 2 else a * weight
        rows.append(a)
    return torch.stack(rows)


def ridge_prototypes_loop(target_att, seen_att, seen_means, lambdas):
    """FSIGenZ prototypes, one torch.linalg.solve per (u, λ): α = (A_s A_sᵀ + λI)⁻¹ A_s a_u, μ = α @ M_s.
    -> prototypes (U, P, D), coefficients (U, P, S)."""
    S = seen_att.shape[0]
    gram = seen_att @ seen_att.T
    eye = torch.eye(S, dtype=seen_att.dtype, device=seen_att.device)
    protos, coefs = [], []
    for u in range(target_att.shape[0]):
        p_row, c_row = [], []
        for lam in lambdas:
            alpha = torch.linalg.solve(gram + float(lam) * eye, seen_att @ target_att[u])
            c_row.append(alpha)
            p_row.append(alpha @ seen_means)
        protos.append(torch.stack(p_row))
        coefs.append(torch.stack(c_row))
    return torch.stack(protos), torch.stack(coefs)


def class_diversity_promotion_loop(sem: torch.Tensor, n_remove: int = 1, center: bool = False):
    """GenZSL CDP, per class: project each row off the top n_remove right singular vectors, normalise it; mean
    pairwise cosine as the mean of each class's cosines to the others. -> (sem', before, after)."""

    def mean_cos(x):
        C = x.shape[0]
        total = x.new_zeros(())
        for i in range(C):
            cos = F.cosine_similarity(x[i : i + 1], x, dim=1, eps=1e-8)
            total = total + cos.sum() - cos[i]
        return total / (C * (C - 1))

    x = sem - sem.mean(0, keepdim=True) if center else sem
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    rows = []
    for i in range(x.shape[0]):
        row = x[i]
        for j in range(n_remove):
            row = row - (row @ vt[j]) * vt[j]
        rows.append(row / row.norm().clamp_min(1e-8))
    out = torch.stack(rows)
    return out, mean_cos(sem), mean_cos(out)


def topk_similar_classes_loop(target_sem: torch.Tensor, source_sem: torch.Tensor, k: int):
    """GenZSL referent selection, per target class: cosine to every source, the k best, ties by lower index
    (Python's sort on (-score, index)). -> values (U, k), indices (U, k)."""
    values, indices = [], []
    for u in range(target_sem.shape[0]):
        norms = source_sem.norm(dim=1).clamp_min(1e-8) * target_sem[u].norm().clamp_min(1e-8)
        sims = (source_sem @ target_sem[u]) / norms
        scores = sims.tolist()
        best = sorted(range(len(scores)), key=lambda s: (-scores[s], s))[:k]
        idx = torch.tensor(best, dtype=torch.long, device=sims.device)
        indices.append(idx)
        values.append(sims[idx])
    return torch.stack(values), torch.stack(indices)


def semantic_regularised_contrastive_loss_loop(logits, labels, class_sim, beta, unseen_mask, strength=0.5):
    """FSIGenZ DPSR loss (see zslfast.generative), element by element."""
    N, C = logits.shape
    unseen = [bool(m) for m in unseen_mask.tolist()]
    seen_losses, unseen_losses = [], []
    for n in range(N):
        y = int(labels[n])
        others = [j for j in range(C) if unseen[j] and j != y]
        row_max = max([max(float(class_sim[y, j]), 0.0) for j in others], default=0.0)
        total = logits.new_zeros(())
        for c in range(C):
            if c == y:
                t = 1.0
            elif unseen[c] and row_max > 0:
                t = strength * class_sim[y, c].clamp_min(0) / row_max
            else:
                t = 0.0
            x = logits[n, c]
            total = total + F.softplus(x) - t * x
        (unseen_losses if unseen[y] else seen_losses).append(total / C)
    loss = logits.new_zeros(())
    if seen_losses:
        loss = loss + torch.stack(seen_losses).mean()
    if unseen_losses:
        loss = loss + beta * torch.stack(unseen_losses).mean()
    return loss
