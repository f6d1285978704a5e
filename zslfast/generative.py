"""Generative-ZSL utilities (FSIGenZ, GenZSL): batched over classes and λ, no Python loop over either.

Papers: FSIGenZ, "Few-Shot Inspired Generative Zero-Shot Learning" (arXiv 2507.01026): MSAS, sparse-coding
(ridge) prototypes, DPSR. GenZSL, "Generative Zero-Shot Learning via Inductive Variational Autoencoder"
(arXiv 2505.11882): class diversity promotion (CDP) and the top-k referent-class selector.

Shapes: C classes, S seen (source) classes, U target (unseen) classes, K attributes (or semantic dims),
D visual feature dim, P number of λ values, N samples.

    msas(att, threshold, weight)                  A = (A_o + A_o ⊙ [A_o > Th]) · W_A           (C, K) -> (C, K')
    ridge_prototypes(target_att, seen_att, seen_means, lambdas)
        α[u, p] = argmin_α ‖a_u − A_sᵀ α‖² + λ_p ‖α‖²,  μ[u, p] = M_sᵀ α[u, p]
                                                  -> prototypes (U, P, D), coefficients (U, P, S)
    class_diversity_promotion(sem, n_remove=1)    X' = rownorm(X − X V_r V_rᵀ)  + mean pairwise cosine before/after
    topk_similar_classes(target_sem, source_sem, k)   k most cosine-similar sources per target, ties -> lower index
    semantic_regularised_contrastive_loss(logits, labels, class_sim, beta, unseen_mask)   DPSR BCE (formula below)

Everything here is plain PyTorch (matmuls, one small SVD or symmetric eigendecomposition, one sort), so it runs
on any device, under autograd, and in any floating dtype; the speed comes from batching: one factorisation of A_s
serves every (u, λ), one Gram eigendecomposition gives CDP's directions, one score matrix and one stable sort
give every target's top k.
Input checks that depend on values (λ signs, the rank of A_s, label range) read tensors back to the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .validation import (
    check_finite, check_labels, check_number, check_same_device, check_tensor, promote, shape_str,
)

__all__ = [
    "CDPResult",
    "RidgePrototypes",
    "TopKClasses",
    "class_diversity_promotion",
    "msas",
    "ridge_prototypes",
    "semantic_regularised_contrastive_loss",
    "topk_similar_classes",
]


# --------------------------------------------------------------------------------------------------------- MSAS
def msas(
    att: torch.Tensor,
    threshold: Union[float, torch.Tensor],
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FSIGenZ model-specific attribute scoring (Phase 1, MSAS; A_mdf as the paper writes it):

        A_mdf = A_o ⊙ [A_o > Th]            (strict >: attributes above the threshold are counted twice)
        A     = (A_o + A_mdf) · W_A         W_A a (K, K') matrix: A = (A_o + A_mdf) @ W_A
                                            W_A a (K,) vector:    A = (A_o + A_mdf) * W_A  (per-attribute weights)
                                            W_A None:             A = A_o + A_mdf

    Args:
        att: (C, K) original class attributes A_o.
        threshold: Th, a Python number, a 0-D tensor, or a (K,) per-attribute tensor.
        weight: W_A, (K, K') or (K,) or None.
    Returns:
        (C, K') re-scored attributes ((C, K) for a vector or no weight). Differentiable in ``weight`` and ``att``
        (d A / d A_o = (1 + [A_o > Th]) W_A; the threshold, a step, gets no gradient).
    """
    op = "msas"
    check_tensor(op, "att", att, (2,), "(C, K)")
    K = att.shape[1]
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() > 1 or (threshold.dim() == 1 and threshold.shape[0] != K):
            raise ValueError(
                f"{op}: threshold must be a number, a 0-D tensor or a (K,) tensor with K={K} to match att (C, K) "
                f"{shape_str(att)}, got shape {shape_str(threshold)}"
            )
        if threshold.dim() == 1:  # a 0-D tensor may live on the CPU, as a Python number would
            check_same_device(op, att=att, threshold=threshold)
        check_finite(op, "threshold", threshold)  # NaN would amplify no attribute, silently
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"{op}: threshold must be a number or a tensor, got {type(threshold).__name__}")
    else:
        check_number(op, "threshold", threshold)
    if weight is not None:
        check_tensor(op, "weight", weight, (1, 2), "(K,) or (K, K')")
        if weight.shape[0] != K:
            raise ValueError(
                f"{op}: weight W_A must be (K,) or (K, K') with K={K} to match att (C, K) {shape_str(att)}, "
                f"got {shape_str(weight)}"
            )
        check_same_device(op, att=att, weight=weight)
        att, weight = promote(att, weight)
    amplified = torch.where(att > threshold, att + att, att)
    if weight is None:
        return amplified
    return amplified * weight if weight.dim() == 1 else amplified @ weight


# --------------------------------------------------------------------------------------------- ridge prototypes
class RidgePrototypes(NamedTuple):
    prototypes: torch.Tensor  # (U, P, D): μ[u, p] = M_sᵀ α[u, p]
    coefficients: torch.Tensor  # (U, P, S): α[u, p]


def _as_lambdas(lambdas, device, dtype) -> torch.Tensor:
    op = "ridge_prototypes"
    if isinstance(lambdas, (str, bytes, bool)):
        raise TypeError(f"{op}: lambdas must be a number, a sequence of numbers or a 1-D tensor, "
                        f"got {type(lambdas).__name__}")
    if isinstance(lambdas, (int, float)):
        lambdas = [lambdas]
    if isinstance(lambdas, torch.Tensor):
        if lambdas.dim() > 1:
            raise ValueError(f"{op}: lambdas must be a number, a sequence or a 1-D tensor (P,), got shape "
                             f"{shape_str(lambdas)}")
        if lambdas.is_complex() or not (lambdas.is_floating_point() or lambdas.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{op}: lambdas must be real numbers, got dtype {lambdas.dtype}")
        lam = lambdas.reshape(-1).to(device=device, dtype=dtype)
    else:
        try:
            lam = torch.as_tensor([float(v) for v in lambdas], dtype=dtype, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: lambdas must be a number, a sequence of numbers or a 1-D tensor, "
                            f"got {type(lambdas).__name__}") from None
    if lam.numel() == 0:
        raise ValueError(f"{op}: lambdas is empty; give at least one λ")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{op}: every λ in lambdas must be finite, got {lam.tolist()}")
    if bool((lam < 0).any()):
        raise ValueError(f"{op}: every λ in lambdas must be >= 0 (ridge penalty), got min λ = {lam.min().item():g}")
    return lam


def ridge_prototypes(
    target_att: torch.Tensor,
    seen_att: torch.Tensor,
    seen_means: torch.Tensor,
    lambdas: Union[float, Sequence[float], torch.Tensor],
) -> RidgePrototypes:
    """FSIGenZ sparse-coding prototypes (Phase 1, group-level prototypes: μ^u_k = M_s α,
    α = argmin ‖a^u_c − A_s α‖² + λ‖α‖², one prototype per λ), every (u, λ) in one go:

        α[u, p] = argmin_α ‖a_u − A_sᵀ α‖² + λ_p ‖α‖²  =  (A_s A_sᵀ + λ_p I_S)⁻¹ A_s a_u        (S,)
        μ[u, p] = M_sᵀ α[u, p]                                                              (D,)

    with A_s = seen_att (S, K) (row s = attributes of seen class s), a_u = target_att[u] (K,), M_s = seen_means
    (S, D) (row s = mean visual feature of seen class s).

    How (one factorisation for all u and λ): the thin SVD A_s = Q diag(σ) Wᵀ, Q (S, r), W (K, r),
    r = min(S, K), gives (A_s A_sᵀ + λI)⁻¹ A_s = Q diag(σ / (σ² + λ)) Wᵀ (A_s a_u lies in span(Q), so the
    directions outside it never contribute), hence

        α[u, p] = Q (f_p ⊙ (Wᵀ a_u)),   f_p = σ / (σ² + λ_p)                  (r filter factors per λ)
        μ[u, p] = (Qᵀ M_s)ᵀ (f_p ⊙ (Wᵀ a_u))

    The SVD works on the smaller side automatically (cost O(S·K·r), the same as eigendecomposing the smaller of
    the Gram matrices A_s A_sᵀ (S×S) and A_sᵀ A_s (K×K), but without squaring A_s's condition number); each
    (u, λ) is then a diagonal scaling. Prototypes go through the projected means Qᵀ M_s (r, D) when r < S
    (U·P·r·D + r·S·D flops instead of U·P·S·D); when r = S they come from α @ M_s directly. For float32 and
    lower inputs the small SVD and the filter factors are computed in float64 (cheap, and the error of the ill-
    conditioned directions stays at the input precision), the big products in the input dtype.

    Args:
        target_att: (U, K) attributes of the classes to synthesise (e.g. MSAS-adjusted unseen attributes).
        seen_att: (S, K) seen-class attributes A_s.
        seen_means: (S, D) seen-class mean features M_s.
        lambdas: P ridge penalties λ_p >= 0 (number, sequence or 1-D tensor). λ = 0 is allowed only when
            A_s A_sᵀ is invertible, i.e. rank(A_s) = S (needs S <= K); rank is counted as the singular values
            above max(S, K) · eps(dtype) · σ_max (numpy.linalg.matrix_rank's rule).
    Returns:
        RidgePrototypes(prototypes (U, P, D), coefficients (U, P, S)) in the common dtype. Differentiable in
        target_att and seen_means (linear), and in seen_att through the SVD where its singular values are
        distinct (PyTorch's SVD backward).
    """
    op = "ridge_prototypes"
    check_tensor(op, "target_att", target_att, (2,), "(U, K)")
    check_tensor(op, "seen_att", seen_att, (2,), "(S, K)")
    check_tensor(op, "seen_means", seen_means, (2,), "(S, D)")
    S, K = seen_att.shape
    if target_att.shape[1] != K:
        raise ValueError(
            f"{op}: target_att (U, K) and seen_att (S, K) must have the same K, got target_att "
            f"{shape_str(target_att)} and seen_att {shape_str(seen_att)}"
        )
    if seen_means.shape[0] != S:
        raise ValueError(
            f"{op}: seen_means (S, D) must have one row per seen class, S={S} as in seen_att {shape_str(seen_att)}, "
            f"got seen_means {shape_str(seen_means)}"
        )
    device = check_same_device(op, target_att=target_att, seen_att=seen_att, seen_means=seen_means)
    check_finite(op, "seen_att", seen_att)  # the SVD's input: NaN there fails inside torch.linalg.svd
    target_att, seen_att, seen_means = promote(target_att, seen_att, seen_means)
    dtype = seen_att.dtype
    work = torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype
    lam = _as_lambdas(lambdas, device, work)

    Q, sigma, Wt = torch.linalg.svd(seen_att.to(work), full_matrices=False)  # (S, r), (r,), (r, K)
    tol = sigma[0] * max(S, K) * torch.finfo(dtype).eps
    rank = int((sigma > tol).sum())
    if rank < S and bool((lam == 0).any()):
        raise ValueError(
            f"{op}: λ = 0 needs A_s A_sᵀ (S×S, S={S}) invertible, but seen_att A_s {shape_str(seen_att)} has rank "
            f"{rank} < S (singular values {sigma.min().item():.3g}..{sigma.max().item():.3g}); use λ > 0"
        )
    # The rank test above lets λ = 0 through only when every σ > tol > 0, so σ² + λ never vanishes.
    filters = sigma / (sigma * sigma + lam[:, None])  # (P, r)
    projected = target_att.to(work) @ Wt.T  # (U, r): Wᵀ a_u
    scaled = (projected[:, None, :] * filters[None]).to(dtype)  # (U, P, r)
    Q = Q.to(dtype)
    coefficients = scaled @ Q.T  # (U, P, S)
    r = sigma.shape[0]
    if r < S:
        prototypes = scaled @ (Q.T @ seen_means)  # (U, P, r) @ (r, D)
    else:
        prototypes = coefficients @ seen_means  # (U, P, S) @ (S, D)
    return RidgePrototypes(prototypes, coefficients)


# -------------------------------------------------------------------------------------- class diversity promotion
class CDPResult(NamedTuple):
    sem: torch.Tensor  # (C, K) rows of unit norm (a row that lay entirely in the removed subspace is 0)
    mean_cosine_before: torch.Tensor  # () mean over ordered pairs i != j of cos(sem[i], sem[j]), input
    mean_cosine_after: torch.Tensor  # () the same for the output


def mean_pairwise_cosine(sem: torch.Tensor) -> torch.Tensor:
    """mean_{i != j} cos(x_i, x_j) in O(C·K): with n_i = x_i / max(‖x_i‖, 1e-8),
    Σ_{i≠j} n_i·n_j = ‖Σ_i n_i‖² − Σ_i ‖n_i‖², divided by C(C − 1). Needs C >= 2."""
    C = sem.shape[0]
    n = F.normalize(sem, dim=-1, eps=1e-8)
    total = n.sum(0)
    return ((total * total).sum() - (n * n).sum()) / (C * (C - 1))


def class_diversity_promotion(sem: torch.Tensor, n_remove: int = 1, *, center: bool = False) -> CDPResult:
    """GenZSL class diversity promotion (CDP, applied to the CLIP text embeddings): remove the top principal
    directions shared by all class semantic vectors, so the classes become closer to orthogonal.

        X = sem (C, K) = U diag(σ) Vᵀ (thin SVD),  V_r = V[:, :n_remove] (top right singular vectors)
        X' = X − X V_r V_rᵀ  (= X − U_r U_rᵀ X),       out[i] = X'[i] / max(‖X'[i]‖, 1e-8)
                                   (out[i] = 0 where ‖X'[i]‖ <= max(C, K)·eps·‖X[i]‖: the row lay in the removed
                                    subspace and only rounding noise is left)

    Centring: the default (center=False) follows the paper, which takes the SVD of the semantic matrix itself;
    for CLIP-style embeddings, whose rows share a large common component, the top right singular vector is close
    to that common direction, so removing it is what lowers the mean similarity. center=True removes the column
    mean first (X ← X − mean_i X[i]) and then the top n_remove principal components of the centred matrix (PCA);
    the mean is not added back, since it is exactly the shared component. V_r V_rᵀ does not depend on the signs
    of the singular vectors; it is ill-defined only if σ_{n_remove} = σ_{n_remove+1} (a tie at the cut).

    How: only the top n_remove singular directions are needed, so instead of a full SVD this takes the
    eigendecomposition of the smaller Gram matrix, XᵀX (K×K) when K <= C (giving V_r) or XXᵀ (C×C) otherwise
    (giving U_r, and X V_r V_rᵀ = U_r U_rᵀ X needs no division by σ), in float64 for float32 and lower inputs.
    The top eigenvectors of a Gram matrix are as well conditioned as the top singular vectors (their error
    scales with eps·σ_1² / (σ_n² − σ_{n+1}²)); at SUN scale (717×512) this is several times faster than the SVD.

    Args:
        sem: (C, K) class semantic vectors, C >= 2.
        n_remove: number of top directions to remove, 0 <= n_remove < min(C, K) (0: only renormalise).
        center: subtract the column mean before the SVD (see above).
    Returns:
        CDPResult(sem (C, K), mean_cosine_before (), mean_cosine_after ()): mean cosine over all ordered pairs of
        distinct classes (the mean of the off-diagonal of the C×C cosine matrix), computed in O(C·K).
    """
    op = "class_diversity_promotion"
    check_tensor(op, "sem", sem, (2,), "(C, K)")
    C, K = sem.shape
    if C < 2:
        raise ValueError(f"{op}: sem (C, K) needs C >= 2 classes (pairwise cosine is undefined for one), "
                         f"got {shape_str(sem)}")
    if isinstance(n_remove, bool) or not isinstance(n_remove, int):
        raise TypeError(f"{op}: n_remove must be an int, got {type(n_remove).__name__}")
    if not 0 <= n_remove < min(C, K):
        raise ValueError(f"{op}: n_remove must satisfy 0 <= n_remove < min(C, K) = {min(C, K)} for sem "
                         f"{shape_str(sem)}, got {n_remove}")
    if n_remove > 0:
        check_finite(op, "sem", sem)  # eigh's input: NaN there fails inside torch.linalg.eigh
    before = mean_pairwise_cosine(sem)
    x = sem - sem.mean(0, keepdim=True) if center else sem
    if n_remove > 0:
        work = torch.float64 if sem.dtype in (torch.float32, torch.float16, torch.bfloat16) else sem.dtype
        xw = x.to(work)
        if K <= C:  # top eigenvectors of the K×K Gram XᵀX are V_r: X' = X − (X V_r) V_rᵀ
            Vr = torch.linalg.eigh(xw.T @ xw).eigenvectors[:, K - n_remove:].to(sem.dtype)  # (K, n_remove)
            residual = x - (x @ Vr) @ Vr.T
        else:  # top eigenvectors of the C×C Gram XXᵀ are U_r, and X V_r V_rᵀ = U_r U_rᵀ X: X' = X − U_r (U_rᵀ X)
            Ur = torch.linalg.eigh(xw @ xw.T).eigenvectors[:, C - n_remove:].to(sem.dtype)  # (C, n_remove)
            residual = x - Ur @ (Ur.T @ x)
        # A row (numerically) inside the removed subspace keeps only rounding noise; normalising that would turn
        # noise into a unit vector, so such rows become exact zeros.
        noise = x.norm(dim=-1, keepdim=True) * (max(C, K) * torch.finfo(sem.dtype).eps)
        x = torch.where(residual.norm(dim=-1, keepdim=True) <= noise, torch.zeros_like(residual), residual)
    out = F.normalize(x, dim=-1, eps=1e-8)
    return CDPResult(out, before, mean_pairwise_cosine(out))


# ----------------------------------------------------------------------------------------- top-k similar classes
class TopKClasses(NamedTuple):
    values: torch.Tensor  # (U, k) cosine similarities, descending
    indices: torch.Tensor  # (U, k) int64 source indices; equal scores in increasing index order


def topk_similar_classes(
    target_sem: torch.Tensor,
    source_sem: torch.Tensor,
    k: int,
    *,
    chunk_elements: int = 1 << 22,
    backend: Optional[str] = None,
) -> TopKClasses:
    """GenZSL referent selector (the selector that picks the top-k similar seen classes whose features the
    inductive VAE transforms): for every target class u, the k
    source classes s with the largest cos(target_sem[u], source_sem[s]) (``zslfast.cosine_logits``, eps 1e-8).

    Ties: equal scores come out in increasing source index. torch.topk does not promise any order among ties,
    so each row is sorted with ``torch.sort(-scores, stable=True)``: a stable ascending sort of the negated scores
    keeps equal elements in their original (index) order, and -x is exact, so ties stay ties.
    Memory: target rows are processed in chunks of max(1, chunk_elements // S) rows, so at most that many scores
    (plus the sort's values and int64 indices) live at once beyond the (U, k) result: O(min(U·S, chunk)).

    Args:
        target_sem: (U, K) target (e.g. unseen) class semantic vectors.
        source_sem: (S, K) source (e.g. seen) class semantic vectors.
        k: 1 <= k <= S.
        chunk_elements: score-matrix elements per chunk.
        backend: passed to ``cosine_logits``.
    Returns:
        TopKClasses(values (U, k), indices (U, k) int64). ``values`` is differentiable through cosine_logits.
    """
    from .ops.cosine_logits import cosine_logits

    op = "topk_similar_classes"
    check_tensor(op, "target_sem", target_sem, (2,), "(U, K)")
    check_tensor(op, "source_sem", source_sem, (2,), "(S, K)")
    if target_sem.shape[1] != source_sem.shape[1]:
        raise ValueError(f"{op}: target_sem (U, K) and source_sem (S, K) must have the same K, got "
                         f"{shape_str(target_sem)} and {shape_str(source_sem)}")
    check_same_device(op, target_sem=target_sem, source_sem=source_sem)
    S = source_sem.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= S:
        raise ValueError(f"{op}: k must satisfy 1 <= k <= S = {S} (source_sem {shape_str(source_sem)}), got {k}")
    rows = max(1, chunk_elements // S)
    values, indices = [], []
    for start in range(0, target_sem.shape[0], rows):
        scores = cosine_logits(target_sem[start:start + rows], source_sem, backend=backend)
        neg_sorted, order = torch.sort(-scores, dim=1, stable=True)
        values.append(-neg_sorted[:, :k])
        indices.append(order[:, :k])
    if len(values) == 1:
        return TopKClasses(values[0], indices[0])
    return TopKClasses(torch.cat(values), torch.cat(indices))


# ------------------------------------------------------------------------------------------------------ DPSR loss
def normalised_unseen_similarity(class_sim: torch.Tensor, unseen_mask: torch.Tensor) -> torch.Tensor:
    """s̃ (C, C): s̃[i, j] = max(s_ij, 0) / max_{j' unseen, j' != i} max(s_ij', 0) for unseen j != i, else 0
    (a row with no positive similarity to another unseen class is all zeros)."""
    C = class_sim.shape[0]
    keep = unseen_mask[None, :] & ~torch.eye(C, dtype=torch.bool, device=class_sim.device)
    pos = torch.where(keep, class_sim.clamp_min(0), torch.zeros((), dtype=class_sim.dtype, device=class_sim.device))
    row_max = pos.amax(dim=1, keepdim=True)
    return torch.where(row_max > 0, pos / torch.where(row_max > 0, row_max, torch.ones_like(row_max)), pos)


def semantic_regularised_contrastive_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_sim: torch.Tensor,
    beta: float,
    unseen_mask: torch.Tensor,
    *,
    strength: float = 0.5,
) -> torch.Tensor:
    """FSIGenZ dual-purpose semantic regularisation (DPSR, Phase 2: training the semantic-aware contrastive
    classifier, SCC) on the SCC's contrastive scores, as a binary cross-entropy with semantically softened
    unseen-class targets:

        s̃[i, j] = max(s_ij, 0) / max_{j' ∈ U, j' ≠ i} max(s_ij', 0)    for j ∈ U, j ≠ i;   0 otherwise
        t[n, c]  = 1                        if c = y_n
                 = strength · s̃[y_n, c]     if c ∈ U, c ≠ y_n       (softened unseen-class targets)
                 = 0                        otherwise (other seen classes)
        ℓ_n      = (1/C) Σ_c BCE(σ(logits[n, c]), t[n, c])
                 = (1/C) Σ_c softplus(logits[n, c]) − t[n, c] · logits[n, c]
        L        = mean_{n: y_n ∉ U} ℓ_n  +  β · mean_{n: y_n ∈ U} ℓ_n      (an empty group contributes 0)

    U = {c : unseen_mask[c]}. The "dual purpose": for real seen samples the soft targets ask for some activation
    of the semantically similar unseen classes (transferable activations, less seen bias); for synthetic unseen
    samples (prototypes, labels in U) they soften the boundaries between similar unseen classes, and β
    down-weights that synthetic part (the paper's best β is 0.2).

    The paper describes DPSR as normalised class-to-class similarities s^u_ij modulating the contrastive (BCE)
    loss on the unseen classes, with β weighting the synthetic part, without a complete formula (and a further
    parameter ϕ whose value it does not give). Choices where it is underspecified (tests pin each one):
    similarities are clipped at 0 and max-normalised per row over the other unseen classes, so the most similar
    unseen class gets ``strength`` (default 0.5, half the true-class target) and dissimilar ones get ~0; seen
    non-target classes keep target 0; each sample's loss is the mean over the C classes; the seen and unseen parts
    are means over their own samples, so β, not the prototype count, sets the balance.

    Args:
        logits: (N, C) contrastive scores (pre-sigmoid).
        labels: (N,) integer class indices in [0, C).
        class_sim: (C, C) class-to-class semantic similarity (e.g. cosine of attribute vectors).
        beta: weight of the synthetic (unseen-labelled) samples, >= 0.
        unseen_mask: (C,) bool, True for unseen classes.
        strength: target given to the most similar unseen class, in [0, 1].
    Returns:
        () loss in logits' dtype, differentiable in logits (and class_sim where the max is unique).
    """
    op = "semantic_regularised_contrastive_loss"
    check_tensor(op, "logits", logits, (2,), "(N, C)", allow_empty=True)
    N, C = logits.shape
    if C == 0:
        raise ValueError(f"{op}: logits (N, C) may be empty only in N, got shape {shape_str(logits)}")
    labels = check_labels(op, "labels", labels, N, C, "(N,)")
    check_tensor(op, "class_sim", class_sim, (2,), "(C, C)")
    if class_sim.shape != (C, C):
        raise ValueError(f"{op}: class_sim must be (C, C) with C={C} as in logits {shape_str(logits)}, "
                         f"got {shape_str(class_sim)}")
    if not isinstance(unseen_mask, torch.Tensor) or unseen_mask.dtype != torch.bool:
        raise TypeError(f"{op}: unseen_mask must be a bool tensor (C,), got "
                        f"{unseen_mask.dtype if isinstance(unseen_mask, torch.Tensor) else type(unseen_mask).__name__}")
    if unseen_mask.shape != (C,):
        raise ValueError(f"{op}: unseen_mask must be (C,) with C={C} as in logits {shape_str(logits)}, "
                         f"got {shape_str(unseen_mask)}")
    check_same_device(op, logits=logits, labels=labels, class_sim=class_sim, unseen_mask=unseen_mask)
    beta = check_number(op, "beta", beta, minimum=0)
    if not 0 <= check_number(op, "strength", strength) <= 1:
        raise ValueError(f"{op}: strength must be a number in [0, 1], got {strength!r}")
    logits, class_sim = promote(logits, class_sim)

    soft = strength * normalised_unseen_similarity(class_sim, unseen_mask)  # (C, C)
    is_target = F.one_hot(labels, C).bool()  # (N, C)
    targets = torch.where(is_target, torch.ones((), dtype=logits.dtype, device=logits.device), soft[labels])
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)  # (N,)
    synthetic = unseen_mask[labels].to(logits.dtype)  # (N,) 1 for unseen-labelled samples
    real = 1 - synthetic
    weights = real / real.sum().clamp_min(1) + beta * synthetic / synthetic.sum().clamp_min(1)
    return (per_sample * weights).sum()
