"""zslfast.generative speed and memory against the loops research code writes, at SUN scale.

    ridge_prototypes   FSIGenZ prototypes for U=72 unseen classes from S=645 seen classes, K=102 attributes,
                       P=20 λ values, D=2048 (ResNet-101) features. "eager" = one torch.linalg.solve per (u, λ)
                       (the issue's baseline); group "batched-solve baseline": "eager" = one solve per λ with all
                       72 right-hand sides (a stronger baseline a careful user would write).
    msas               FSIGenZ MSAS on all 717 SUN classes, W_A a (102, 102) matrix; "eager" = per-class loop.
    topk_similar       GenZSL referent selection, 72 unseen vs 645 seen CLIP text embeddings (K=512), k=5;
                       "eager" = per-target-class cosine + sort loop.
    cdp                GenZSL class diversity promotion of the 717 SUN CLIP text embeddings (K=512), n_remove=1;
                       "eager" = per-class projection and per-class pairwise-cosine loop; group "vectorised
                       baseline": "eager" = the same math written with the full (C, C) cosine matrix.

Shapes: zslfast.testing.SHAPES["generative"] (SUN's classes and attributes from zslfast.data.PRESETS).
Forward only (these are preprocessing steps, run once per experiment). ``extra_info`` holds ``peak_extra_MiB``
(see conftest.py). Run: ``pytest benchmarks/bench_generative.py --benchmark-only [--full]`` (the quick set leaves
out the per-(u, λ) ridge loop and the CDP loop, the slow baselines); summarise with
``python benchmarks/summarize.py <json>``.
"""

import pytest
import torch
import torch.nn.functional as F

from zslfast import baselines, generative, testing
from zslfast.testing import CLIP_DIM
from conftest import DEVICE, ON_GPU, full_unless, run_benchmark

SUN = testing.SHAPES["generative"]["SUN"].named(DEVICE)  # U, S, K, P, D
CLASSES = SUN["U"] + SUN["S"]  # 717


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


def ridge_inputs():
    g = _gen()
    att = torch.rand(SUN["S"] + SUN["U"], SUN["K"], device=DEVICE, generator=g)
    att = att / att.norm(dim=1, keepdim=True)
    means = torch.rand(SUN["S"], SUN["D"], device=DEVICE, generator=g)
    lambdas = torch.logspace(-2, 1, SUN["P"]).tolist()
    return att[SUN["S"]:], att[: SUN["S"]], means, lambdas


def ridge_per_lambda_solve(target, seen, means, lambdas):
    """One solve per λ, all targets as right-hand sides: (A_s A_sᵀ + λI) X = A_s Tᵀ."""
    gram = seen @ seen.T
    rhs = seen @ target.T  # (S, U)
    eye = torch.eye(seen.shape[0], dtype=seen.dtype, device=seen.device)
    coefs = torch.stack([torch.linalg.solve(gram + lam * eye, rhs).T for lam in lambdas], dim=1)  # (U, P, S)
    return coefs @ means, coefs


RIDGE = {
    "loop": {"eager": baselines.ridge_prototypes_loop, "zslfast": generative.ridge_prototypes},
    "batched-solve baseline": {"eager": ridge_per_lambda_solve, "zslfast": generative.ridge_prototypes},
}


@pytest.mark.parametrize("impl", ["eager", "zslfast"])
@pytest.mark.parametrize("baseline", full_unless(lambda b: b != "loop", *RIDGE))  # the loop: a minute a call
def test_ridge_prototypes(benchmark, baseline, impl):
    U, S, K, P, D = (SUN[n] for n in "USKPD")
    benchmark.group = f"ridge_prototypes SUN U,S,K,P,D={(U, S, K, P, D)} {baseline} {DEVICE.type}"
    inputs = ridge_inputs()
    fn = RIDGE[baseline][impl]
    # The per-(u, λ) loop is 1440 solves of a 645×645 system: about a minute per call on a 2-core CPU.
    slow = impl == "eager" and baseline == "loop" and not ON_GPU
    run_benchmark(benchmark, lambda: fn(*inputs), rounds=1 if slow else None, warmup=0 if slow else 2)


def msas_inputs():
    g = _gen()
    att = torch.rand(CLASSES, SUN["K"], device=DEVICE, generator=g)
    weight = torch.randn(SUN["K"], SUN["K"], device=DEVICE, generator=g)
    return att, 0.5, weight


@pytest.mark.parametrize("impl", ["eager", "zslfast"])
def test_msas(benchmark, impl):
    benchmark.group = f"msas SUN C,K=({CLASSES}, {SUN['K']}) W_A matrix loop {DEVICE.type}"
    inputs = msas_inputs()
    fn = {"eager": baselines.msas_loop, "zslfast": generative.msas}[impl]
    run_benchmark(benchmark, lambda: fn(*inputs))


def clip_like(n, g):
    """CLIP-text-like class embeddings: a shared component plus class-specific parts, unit rows."""
    common = torch.randn(1, CLIP_DIM, device=DEVICE, generator=g)
    return F.normalize(3 * common + torch.randn(n, CLIP_DIM, device=DEVICE, generator=g), dim=1)


@pytest.mark.parametrize("impl", ["eager", "zslfast"])
def test_topk_similar_classes(benchmark, impl):
    g = _gen()
    target, source = clip_like(SUN["U"], g), clip_like(SUN["S"], g)
    benchmark.group = f"topk_similar_classes SUN U,S,K=({SUN['U']}, {SUN['S']}, {CLIP_DIM}) k=5 loop {DEVICE.type}"
    fn = {"eager": baselines.topk_similar_classes_loop, "zslfast": generative.topk_similar_classes}[impl]
    run_benchmark(benchmark, lambda: fn(target, source, 5))


def cdp_vectorised_eager(sem, n_remove=1):
    _, _, vt = torch.linalg.svd(sem, full_matrices=False)
    vr = vt[:n_remove]
    out = F.normalize(sem - sem @ vr.T @ vr, dim=1)

    def mean_cos(x):
        n = F.normalize(x, dim=1)
        cos = n @ n.T
        return (cos.sum() - cos.diagonal().sum()) / (x.shape[0] * (x.shape[0] - 1))

    return out, mean_cos(sem), mean_cos(out)


CDP = {
    "loop": {"eager": baselines.class_diversity_promotion_loop, "zslfast": generative.class_diversity_promotion},
    "vectorised baseline": {"eager": cdp_vectorised_eager, "zslfast": generative.class_diversity_promotion},
}


@pytest.mark.parametrize("impl", ["eager", "zslfast"])
@pytest.mark.parametrize("baseline", full_unless(lambda b: b != "loop", *CDP))  # the loop: slow to profile
def test_class_diversity_promotion(benchmark, baseline, impl):
    sem = clip_like(CLASSES, _gen())
    benchmark.group = f"class_diversity_promotion SUN C,K=({CLASSES}, {CLIP_DIM}) {baseline} {DEVICE.type}"
    fn = CDP[baseline][impl]
    run_benchmark(benchmark, lambda: fn(sem, 1))
