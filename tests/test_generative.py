"""zslfast.generative against the per-class / per-λ loops of zslfast.baselines, plus the properties that pin each
documented choice (strict threshold, λ = 0 rule, tie order, centring, DPSR targets and weighting) and bad input."""

import pytest
import torch
import torch.nn.functional as F

from zslfast import baselines, generative
from zslfast.generative import (
    class_diversity_promotion,
    msas,
    ridge_prototypes,
    semantic_regularised_contrastive_loss,
    topk_similar_classes,
)

from helpers import backend_param

f64 = torch.float64


def close(actual, expected, rtol, atol=None):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol if atol is None else atol)


# ----------------------------------------------------------------------------------------------------------- MSAS
def away_from(att, threshold, gap=1e-3):
    """Move entries within ``gap`` of the threshold off it, so a finite-difference step never crosses it."""
    near = (att - threshold).abs() < gap
    return torch.where(near, att + 4 * gap, att)


@pytest.mark.parametrize("C,K", [(1, 1), (1, 7), (13, 5), (50, 85)])
@pytest.mark.parametrize("weight_kind", ["none", "vector", "matrix"])
@pytest.mark.parametrize("threshold_kind", ["float", "per-attribute"])
def test_msas_matches_loop(generator, C, K, weight_kind, threshold_kind):
    att = torch.rand(C, K, generator=generator, dtype=f64)
    threshold = 0.5 if threshold_kind == "float" else torch.rand(K, generator=generator, dtype=f64)
    weight = {
        "none": None,
        "vector": torch.randn(K, generator=generator, dtype=f64),
        "matrix": torch.randn(K, 3 * K + 1, generator=generator, dtype=f64),
    }[weight_kind]
    out = msas(att, threshold, weight)
    close(out, baselines.msas_loop(att, threshold, weight), 1e-12)
    out32 = msas(att.float(), threshold if isinstance(threshold, float) else threshold.float(),
                 None if weight is None else weight.float())
    assert out32.dtype == torch.float32
    close(out32.double(), out, 1e-5)


def test_msas_threshold_is_strict_and_doubles_above():
    att = torch.tensor([[0.2, 0.5, 0.7]], dtype=f64)
    torch.testing.assert_close(msas(att, 0.5), torch.tensor([[0.2, 0.5, 1.4]], dtype=f64))
    torch.testing.assert_close(msas(att, torch.tensor([0.1, 0.6, 0.8], dtype=f64)),
                               torch.tensor([[0.4, 0.5, 0.7]], dtype=f64))


@pytest.mark.parametrize("weight_kind", ["vector", "matrix"])
def test_msas_gradcheck(generator, weight_kind):
    att = away_from(torch.rand(6, 5, generator=generator, dtype=f64), 0.4).requires_grad_()
    shape = (5,) if weight_kind == "vector" else (5, 4)
    weight = torch.randn(*shape, generator=generator, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: msas(a, 0.4, w), (att, weight))
    # and the gradient equals the loop's (autograd through the per-class code)
    g = torch.randn(6, shape[-1] if weight_kind == "matrix" else 5, generator=generator, dtype=f64)
    ours = torch.autograd.grad(msas(att, 0.4, weight), (att, weight), g)
    loop = torch.autograd.grad(baselines.msas_loop(att, 0.4, weight), (att, weight), g)
    for a, b in zip(ours, loop):
        close(a, b, 1e-12)


def test_msas_bad_input():
    att = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"weight W_A must be \(K,\) or \(K, K'\) with K=3.*\(5, 2\)"):
        msas(att, 0.5, torch.rand(5, 2))
    with pytest.raises(ValueError, match="threshold must be .* K=3"):
        msas(att, torch.rand(4), None)
    with pytest.raises(ValueError, match=r"att must be \(C, K\)"):
        msas(torch.rand(3), 0.5)
    with pytest.raises(TypeError, match="att must be a floating-point"):
        msas(torch.ones(2, 3, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="threshold must be a number"):
        msas(att, "0.5")


# ---------------------------------------------------------------------------------------------- ridge prototypes
def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "U,S,K,D,P",
    [(1, 1, 1, 1, 1), (3, 7, 5, 4, 1), (5, 9, 13, 6, 4), (4, 11, 11, 3, 3), (2, 30, 17, 9, 20)],
)
def test_ridge_prototypes_match_solve_loop(generator, U, S, K, D, P):
    target = torch.randn(U, K, generator=generator, dtype=f64)
    seen = torch.randn(S, K, generator=generator, dtype=f64)
    means = torch.randn(S, D, generator=generator, dtype=f64)
    lambdas = torch.logspace(-3, 2, P, dtype=f64)
    protos, coefs = ridge_prototypes(target, seen, means, lambdas)
    assert protos.shape == (U, P, D) and coefs.shape == (U, P, S)
    loop_protos, loop_coefs = baselines.ridge_prototypes_loop(target, seen, means, lambdas)
    assert rel_err(coefs, loop_coefs) < 1e-8
    assert rel_err(protos, loop_protos) < 1e-8
    # Independent of any solver: α satisfies the normal equations A_s(A_sᵀα − a_u) + λα = 0.
    residual = (coefs @ seen - target[:, None, :]) @ seen.T + lambdas[None, :, None] * coefs
    assert residual.abs().max() < 1e-9 * (1 + target.abs().max() * seen.abs().max() ** 2)


def test_ridge_prototypes_lambda_zero_full_row_rank(generator):
    target = torch.randn(3, 8, generator=generator, dtype=f64)
    seen = torch.randn(5, 8, generator=generator, dtype=f64)  # rank 5 = S: A_s A_sᵀ invertible
    means = torch.randn(5, 4, generator=generator, dtype=f64)
    protos, coefs = ridge_prototypes(target, seen, means, [0.0, 0.5])
    loop_protos, loop_coefs = baselines.ridge_prototypes_loop(target, seen, means, [0.0, 0.5])
    assert rel_err(coefs, loop_coefs) < 1e-8 and rel_err(protos, loop_protos) < 1e-8


def test_ridge_prototypes_lambda_rules(generator):
    target = torch.randn(2, 4, generator=generator, dtype=f64)
    seen_tall = torch.randn(6, 4, generator=generator, dtype=f64)  # S > K: rank <= K < S
    means = torch.randn(6, 3, generator=generator, dtype=f64)
    with pytest.raises(ValueError, match=r"λ = 0 needs A_s A_sᵀ .* rank 4 < S"):
        ridge_prototypes(target, seen_tall, means, [1.0, 0.0])
    # rank-deficient although S <= K: a repeated seen class
    seen_dup = torch.randn(3, 4, generator=generator, dtype=f64)
    seen_dup = torch.cat([seen_dup, seen_dup[:1]])
    with pytest.raises(ValueError, match=r"rank 3 < S"):
        ridge_prototypes(target, seen_dup, means[:4], 0.0)
    ridge_prototypes(target, seen_dup, means[:4], 1e-3)  # λ > 0 is fine
    with pytest.raises(ValueError, match=r"must be >= 0.*-0.1"):
        ridge_prototypes(target, seen_tall, means, [0.1, -0.1])
    with pytest.raises(ValueError, match="finite"):
        ridge_prototypes(target, seen_tall, means, [float("nan")])
    with pytest.raises(ValueError, match="empty"):
        ridge_prototypes(target, seen_tall, means, [])
    with pytest.raises(TypeError, match="lambdas"):
        ridge_prototypes(target, seen_tall, means, "1.0")
    with pytest.raises(TypeError, match="lambdas"):
        ridge_prototypes(target, seen_tall, means, "10")


def test_ridge_prototypes_shape_errors():
    with pytest.raises(ValueError, match=r"same K.*\(2, 5\).*\(6, 4\)"):
        ridge_prototypes(torch.rand(2, 5), torch.rand(6, 4), torch.rand(6, 3), [1.0])
    with pytest.raises(ValueError, match=r"S=6.*seen_means \(5, 3\)"):
        ridge_prototypes(torch.rand(2, 4), torch.rand(6, 4), torch.rand(5, 3), [1.0])
    with pytest.raises(ValueError, match=r"target_att must be \(U, K\)"):
        ridge_prototypes(torch.rand(4), torch.rand(6, 4), torch.rand(6, 3), [1.0])
    with pytest.raises(ValueError, match="lambdas must be"):
        ridge_prototypes(torch.rand(2, 4), torch.rand(6, 4), torch.rand(6, 3), torch.ones(2, 2))


def test_ridge_prototypes_float32(generator):
    target = torch.rand(7, 31, generator=generator, dtype=f64)
    seen = torch.rand(40, 31, generator=generator, dtype=f64)
    means = torch.rand(40, 17, generator=generator, dtype=f64)
    lambdas = [0.01, 0.1, 1.0]
    protos, coefs = ridge_prototypes(target.float(), seen.float(), means.float(), lambdas)
    assert protos.dtype == torch.float32
    exact_protos, exact_coefs = ridge_prototypes(target, seen, means, lambdas)
    # float32 inputs: the error is the input rounding amplified by the conditioning of the λ = 0.01 system.
    assert rel_err(protos.double(), exact_protos) < 1e-4
    assert rel_err(coefs.double(), exact_coefs) < 1e-4


def test_ridge_prototypes_gradcheck(generator):
    target = torch.randn(2, 5, generator=generator, dtype=f64, requires_grad=True)
    seen = torch.randn(4, 5, generator=generator, dtype=f64, requires_grad=True)
    means = torch.randn(4, 3, generator=generator, dtype=f64, requires_grad=True)
    lambdas = [0.3, 2.0]
    assert torch.autograd.gradcheck(lambda t, s, m: ridge_prototypes(t, s, m, lambdas), (target, seen, means))
    # and the same gradients as autograd through the solve loop
    loss = lambda out: (out[0] ** 2).sum() + out[1].sin().sum()  # noqa: E731
    ours = torch.autograd.grad(loss(ridge_prototypes(target, seen, means, lambdas)), (target, seen, means))
    loop = torch.autograd.grad(loss(baselines.ridge_prototypes_loop(target, seen, means, lambdas)),
                               (target, seen, means))
    for a, b in zip(ours, loop):
        close(a, b, 1e-9)


# ------------------------------------------------------------------------------------- class diversity promotion
@pytest.mark.parametrize("C,K,n_remove", [(2, 1, 0), (2, 3, 1), (9, 6, 2), (40, 13, 1), (5, 30, 4)])
@pytest.mark.parametrize("center", [False, True])
def test_cdp_matches_loop(generator, C, K, n_remove, center):
    if center and n_remove >= min(C - 1, K):
        pytest.skip("centring removes one rank: nothing left to remove")
    sem = torch.rand(C, K, generator=generator, dtype=f64) + 0.5  # a shared positive component, as CLIP text
    out, before, after = class_diversity_promotion(sem, n_remove, center=center)
    loop_out, loop_before, loop_after = baselines.class_diversity_promotion_loop(sem, n_remove, center)
    close(out, loop_out, 1e-10)
    close(before, loop_before, 1e-12)
    close(after, loop_after, 1e-10)
    cos = F.normalize(sem, dim=1) @ F.normalize(sem, dim=1).T  # the C×C matrix the O(C·K) formula avoids
    close(before, (cos.sum() - cos.diagonal().sum()) / (C * (C - 1)), 1e-12)


def test_cdp_removes_the_best_rank_n_part(generator):
    sem = torch.rand(12, 8, generator=generator, dtype=f64) + 1.0
    out, before, after = class_diversity_promotion(sem, 2)
    u, s, vt = torch.linalg.svd(sem, full_matrices=False)
    residual = sem - (u[:, :2] * s[:2]) @ vt[:2]  # Eckart–Young: what is left after the best rank-2 part
    close(out, F.normalize(residual, dim=1), 1e-10)
    close(out @ vt[:2].T, torch.zeros(12, 2, dtype=f64), 1e-10, 1e-10)  # orthogonal to the removed directions
    close(out.norm(dim=1), torch.ones(12, dtype=f64), 1e-12)
    assert after < before  # a shared component made the classes similar; removing it separates them


def test_cdp_float32_and_zero_rows(generator):
    sem = torch.rand(10, 6, generator=generator) + 0.5
    out, before, after = class_diversity_promotion(sem, 1)
    exact = class_diversity_promotion(sem.double(), 1)
    close(out.double(), exact.sem, 1e-5)
    close(after.double(), exact.mean_cosine_after, 1e-5)
    # rank-1 input: every row lies in the removed direction and becomes exactly the zero row (not NaN)
    rank1 = torch.outer(torch.arange(1.0, 5.0, dtype=f64), torch.tensor([1.0, 2.0, 2.0], dtype=f64))
    out, _, after = class_diversity_promotion(rank1, 1)
    assert torch.equal(out, torch.zeros_like(out)) and after == 0


def test_cdp_bad_input():
    with pytest.raises(ValueError, match=r"C >= 2.*\(1, 5\)"):
        class_diversity_promotion(torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"0 <= n_remove < min\(C, K\) = 3"):
        class_diversity_promotion(torch.rand(3, 7), 3)
    with pytest.raises(ValueError, match="n_remove"):
        class_diversity_promotion(torch.rand(3, 7), -1)
    with pytest.raises(TypeError, match="n_remove must be an int"):
        class_diversity_promotion(torch.rand(3, 7), 1.0)
    with pytest.raises(ValueError, match=r"sem must be \(C, K\)"):
        class_diversity_promotion(torch.rand(3, 7, 2))


# ---------------------------------------------------------------------------------------- top-k similar classes
@pytest.mark.parametrize("U,S,K,k", [(1, 1, 1, 1), (1, 9, 4, 3), (7, 13, 5, 1), (7, 13, 5, 13), (30, 64, 33, 10)])
@pytest.mark.parametrize("backend", ["reference", backend_param("cpu")])
def test_topk_matches_loop(generator, U, S, K, k, backend):
    target = torch.randn(U, K, generator=generator, dtype=f64)
    source = torch.randn(S, K, generator=generator, dtype=f64)
    values, indices = topk_similar_classes(target, source, k, backend=backend)
    loop_values, loop_indices = baselines.topk_similar_classes_loop(target, source, k)
    assert indices.dtype == torch.long and values.shape == indices.shape == (U, k)
    assert torch.equal(indices, loop_indices)
    close(values, loop_values, 1e-12)


def test_topk_ties_go_to_the_lower_index(generator):
    # Integer vectors: dot products and norms are exact, so duplicated source rows tie exactly in any
    # implementation. Distinct base rows must not tie (their cosines could round differently): resample until
    # every target sees 6 well-separated cosines.
    while True:
        target = torch.randint(-3, 4, (9, 5), generator=generator).double()
        base = torch.randint(-3, 4, (6, 5), generator=generator).double()
        cos = F.normalize(target, dim=1) @ F.normalize(base, dim=1).T
        gaps = (cos[:, :, None] - cos[:, None, :]).abs() + torch.eye(6, dtype=f64)
        if gaps.min() > 1e-6:
            break
    source = base[torch.randint(0, 6, (40,), generator=generator)]  # many duplicated rows, shuffled
    for k in (1, 7, 40):
        for chunk in (1 << 22, 40, 80):  # one chunk, one row per chunk, two rows per chunk
            values, indices = topk_similar_classes(target, source, k, chunk_elements=chunk)
            loop_values, loop_indices = baselines.topk_similar_classes_loop(target, source, k)
            assert torch.equal(indices, loop_indices)
            close(values, loop_values, 1e-12)
            assert (values[:, 1:] <= values[:, :-1]).all()
            tied = values[:, 1:] == values[:, :-1]
            assert (indices[:, 1:] > indices[:, :-1])[tied].all()
    # all sources identical: the selection is 0..k-1
    same = torch.ones(50, 4, dtype=f64)
    assert torch.equal(topk_similar_classes(target[:, :4], same, 5).indices, torch.arange(5).expand(9, 5))


def test_topk_float32_and_gradient(generator):
    target = torch.randn(5, 8, generator=generator, dtype=f64, requires_grad=True)
    source = torch.randn(11, 8, generator=generator, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: topk_similar_classes(t, s, 4).values, (target, source))
    v32, i32 = topk_similar_classes(target.detach().float(), source.detach().float(), 4)
    v64, _ = topk_similar_classes(target.detach(), source.detach(), 4)
    close(v32.double(), v64, 1e-5)


def test_topk_bad_input():
    with pytest.raises(ValueError, match=r"1 <= k <= S = 4"):
        topk_similar_classes(torch.rand(2, 3), torch.rand(4, 3), 5)
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_similar_classes(torch.rand(2, 3), torch.rand(4, 3), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_similar_classes(torch.rand(2, 3), torch.rand(4, 3), 2.0)
    with pytest.raises(ValueError, match=r"same K.*\(2, 3\).*\(4, 2\)"):
        topk_similar_classes(torch.rand(2, 3), torch.rand(4, 2), 1)


# ------------------------------------------------------------------------------------------------------ DPSR loss
def dpsr_inputs(generator, N, C, n_unseen, dtype=f64):
    logits = 3 * torch.randn(N, C, generator=generator, dtype=dtype)
    labels = torch.randint(0, C, (N,), generator=generator)
    attrs = torch.rand(C, 6, generator=generator, dtype=dtype) - 0.3
    class_sim = F.normalize(attrs, dim=1) @ F.normalize(attrs, dim=1).T  # has negative entries: clipped at 0
    unseen_mask = torch.zeros(C, dtype=torch.bool)
    unseen_mask[torch.randperm(C, generator=generator)[:n_unseen]] = True
    return logits, labels, class_sim, unseen_mask


@pytest.mark.parametrize("N,C,n_unseen", [(1, 1, 0), (1, 1, 1), (5, 3, 1), (17, 9, 4), (40, 12, 12), (23, 7, 0)])
@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_dpsr_matches_loop(generator, N, C, n_unseen, beta):
    logits, labels, class_sim, unseen_mask = dpsr_inputs(generator, N, C, n_unseen)
    loss = semantic_regularised_contrastive_loss(logits, labels, class_sim, beta, unseen_mask)
    loop = baselines.semantic_regularised_contrastive_loss_loop(logits, labels, class_sim, beta, unseen_mask)
    close(loss, loop, 1e-12)
    assert torch.isfinite(loss)
    loss32 = semantic_regularised_contrastive_loss(logits.float(), labels, class_sim.float(), beta, unseen_mask)
    close(loss32.double(), loss, 1e-5)


def test_dpsr_gradcheck(generator):
    logits, labels, class_sim, unseen_mask = dpsr_inputs(generator, 11, 6, 3)
    logits.requires_grad_()
    fn = lambda x: semantic_regularised_contrastive_loss(x, labels, class_sim, 0.2, unseen_mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    loop_fn = lambda x: baselines.semantic_regularised_contrastive_loss_loop(  # noqa: E731
        x, labels, class_sim, 0.2, unseen_mask)
    close(torch.autograd.grad(fn(logits), logits)[0], torch.autograd.grad(loop_fn(logits), logits)[0], 1e-12)


def test_dpsr_targets_are_the_documented_ones():
    # C = 4: classes 0, 1 seen; 2, 3 unseen. At the loss minimum over logits, sigmoid(logit) = target.
    class_sim = torch.tensor([[1.0, 0.9, 0.6, 0.3],
                              [0.9, 1.0, -0.4, 0.2],
                              [0.6, -0.4, 1.0, 0.8],
                              [0.3, 0.2, 0.8, 1.0]], dtype=f64)
    unseen_mask = torch.tensor([False, False, True, True])
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.zeros(4, 4, dtype=f64, requires_grad=True)
    loss = semantic_regularised_contrastive_loss(logits, labels, class_sim, 1.0, unseen_mask, strength=0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    # d/dx mean_c BCE = (sigmoid(x) - t) / C per row, rows weighted 1/2 (two seen rows) and β/2 (two unseen rows)
    targets = 0.5 - grad * 4 * 2
    expected = torch.tensor([[1.0, 0.0, 0.5, 0.25],  # seen 0: unseen 2 (0.6, the max) -> 0.5, unseen 3 -> 0.5·0.3/0.6
                             [0.0, 1.0, 0.0, 0.5],  # seen 1: sim to 2 negative -> 0, unseen 3 is the max -> 0.5
                             [0.0, 0.0, 1.0, 0.5],  # unseen 2: the only other unseen class gets the full 0.5
                             [0.0, 0.0, 0.5, 1.0]], dtype=f64)  # seen non-target classes always 0
    close(targets, expected, 1e-12)


def test_dpsr_weighting(generator):
    logits, labels, class_sim, unseen_mask = dpsr_inputs(generator, 30, 8, 3)
    labels[:4] = torch.nonzero(unseen_mask)[0, 0]  # make sure both groups are present
    labels[4:8] = torch.nonzero(~unseen_mask)[0, 0]
    synthetic = unseen_mask[labels]
    logits.requires_grad_()
    # β = 0: the synthetic samples do not count at all
    (grad,) = torch.autograd.grad(
        semantic_regularised_contrastive_loss(logits, labels, class_sim, 0.0, unseen_mask), logits)
    assert grad[synthetic].abs().max() == 0 and grad[~synthetic].abs().max() > 0
    # each part is a mean over its own samples: repeating the synthetic samples leaves the loss unchanged
    loss = semantic_regularised_contrastive_loss(logits, labels, class_sim, 0.2, unseen_mask)
    more = torch.cat([logits, logits[synthetic], logits[synthetic]])
    more_labels = torch.cat([labels, labels[synthetic], labels[synthetic]])
    close(semantic_regularised_contrastive_loss(more, more_labels, class_sim, 0.2, unseen_mask), loss, 1e-12)
    # and L = L_seen + β L_unseen
    part = lambda mask, b: semantic_regularised_contrastive_loss(  # noqa: E731
        logits[mask], labels[mask], class_sim, b, unseen_mask)
    close(loss, part(~synthetic, 0.2) + part(synthetic, 0.2), 1e-12)
    close(part(synthetic, 0.2), 0.2 * part(synthetic, 1.0), 1e-12)


def test_dpsr_bad_input():
    logits, labels, sim, mask = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.eye(3), torch.tensor(
        [False, False, True])
    loss = generative.semantic_regularised_contrastive_loss
    with pytest.raises(ValueError, match=r"labels holds the label 3, outside \[0, 3\)"):
        loss(logits, torch.tensor([0, 1, 3, 1]), sim, 0.2, mask)
    with pytest.raises(ValueError, match=r"labels holds the label -1"):
        loss(logits, torch.tensor([0, -1, 2, 1]), sim, 0.2, mask)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss(logits, labels.float(), sim, 0.2, mask)
    with pytest.raises(ValueError, match=r"labels must be \(N,\) with N=4"):
        loss(logits, labels[:3], sim, 0.2, mask)
    with pytest.raises(ValueError, match=r"class_sim must be \(C, C\) with C=3.*\(3, 4\)"):
        loss(logits, labels, torch.rand(3, 4), 0.2, mask)
    with pytest.raises(TypeError, match="unseen_mask must be a bool tensor"):
        loss(logits, labels, sim, 0.2, mask.long())
    with pytest.raises(ValueError, match=r"unseen_mask must be \(C,\)"):
        loss(logits, labels, sim, 0.2, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="beta must be (>= 0|a finite number)"):
        loss(logits, labels, sim, -0.1, mask)
    with pytest.raises(ValueError, match="strength"):
        loss(logits, labels, sim, 0.2, mask, strength=1.5)


# -------------------------------------------------------------------------------------------------------- example
def test_fsigenz_example_runs_and_learns(capsys):
    from zslfast.examples import fsigenz

    results = fsigenz.main(["--num-classes", "12", "--num-unseen", "4", "--num-attributes", "9", "--feature-dim",
                            "32", "--samples-per-class", "6", "--epochs", "5", "--jitter", "0.5", "--seed", "0"])
    out = capsys.readouterr().out
    assert "U=" in out and "H=" in out and "calibrated stacking" in out
    gamma0, calibrated = results["gamma0"], results["calibrated"]
    for r in (gamma0, calibrated):
        assert all(0.0 <= v <= 1.0 for v in r)
    # Seeded and deterministic: the prototypes make the 4 unseen classes learnable (chance: 0.25 CZSL).
    assert results["czsl"] >= 0.5
    assert calibrated.h >= gamma0.h and gamma0.h > 0.3


def test_example_class_means(generator):
    from zslfast.examples.fsigenz import class_means

    features = torch.randn(30, 5, generator=generator, dtype=f64)
    labels = torch.randint(0, 7, (30,), generator=generator)
    classes = torch.unique(labels)
    expected = torch.stack([features[labels == c].mean(0) for c in classes.tolist()])
    close(class_means(features, labels, classes), expected, 1e-12)
