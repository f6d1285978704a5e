"""prototype_scores speed and memory: the eager code a paper writes, torch.compile of it, and zslfast.

    logits[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k]);   e (B, K), s (C, K), w (B, C, K) -> (B, C)
    factored:    w[b, c, k] = sum_j h[b, j] * u[j, c, k];       h (B, J), u (J, C, K)

Shapes: ILPG's CUB (B=50 C=200 K=312), SUN (B=64 C=717 K=102), AwA2 (B=50 C=50 K=85), a large one, and the
large-vocabulary factored shape (B=256 C=21841 K=300 J=64). Forward and forward+backward (gradients of every
input, as in training). Eager runs that would not fit in memory are skipped with the size they would need.
"""

import pytest
import torch

import zslfast
from zslfast import baselines
from conftest import DEVICE, ON_GPU, compiled, run_benchmark, step


eager_prototype_scores, eager_factored = baselines.prototype_scores, baselines.prototype_scores_factored

IMPLEMENTATIONS = {
    "eager": lambda: eager_prototype_scores,
    "compile": lambda: compiled(eager_prototype_scores),
    "zslfast": lambda: zslfast.prototype_scores,
}

SHAPES = {
    "AwA2": (50, 50, 85),
    "CUB": (50, 200, 312),
    "SUN-B64": (64, 717, 102),
    "large": (256, 5000, 312) if ON_GPU else (256, 1000, 312),
}


def make(shape, requires_grad):
    B, C, K = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    tensors = [torch.randn(*dims, device=DEVICE, generator=g) for dims in ((B, K), (C, K), (B, C, K))]
    return [t.requires_grad_(requires_grad) for t in tensors]



@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_prototype_scores(benchmark, shape_name, backward, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"prototype_scores {shape_name} B,C,K={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = make(shape, backward)
    rounds = 5 if shape_name == "large" and not ON_GPU else None
    benchmark.extra_info["w_MB"] = inputs[2].numel() * inputs[2].element_size() / 1e6
    run_benchmark(benchmark, step(IMPLEMENTATIONS[impl](), inputs, backward), rounds=rounds)


@pytest.mark.parametrize("impl", ["eager", "zslfast"])
def test_dispatch_overhead(benchmark, impl):
    """Cost of the registered op on a tiny input (B=C=K=1): what an eager call pays for torch.library."""
    benchmark.group = f"prototype_scores dispatch overhead B=C=K=1 {DEVICE.type}"
    inputs = make((1, 1, 1), False)
    fn = eager_prototype_scores if impl == "eager" else zslfast.prototype_scores
    run_benchmark(benchmark, lambda: fn(*inputs))


FACTORED = {"CUB-J64": (50, 200, 312, 64), "21K-classes": (256, 21841, 300, 64)}


@pytest.mark.parametrize("impl", ["eager", "compile", "zslfast"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(FACTORED))
def test_prototype_scores_factored(benchmark, shape_name, backward, impl):
    B, C, K, J = FACTORED[shape_name]
    benchmark.group = f"prototype_scores_factored {shape_name} B,C,K,J={(B, C, K, J)} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    w_bytes = B * C * K * 4
    free = torch.cuda.mem_get_info()[0] if ON_GPU else 16 * 2**30
    if impl != "zslfast" and 4 * w_bytes > free:  # eager keeps w, S_W, e*S_W (and their grads) alive
        pytest.skip(f"eager/compile would materialise w (B, C, K) = {w_bytes / 2**30:.1f} GiB several times over")
    if shape_name == "21K-classes" and not ON_GPU and backward:
        pytest.skip("forward+backward at 21K classes takes minutes on a 2-core CPU; run it on a GPU")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    e, s, h = (torch.randn(*d, device=DEVICE, generator=g) for d in ((B, K), (C, K), (B, J)))
    u = torch.randn(J, C, K, device=DEVICE, generator=g) * 0.05
    inputs = [t.requires_grad_(backward) for t in (e, s, h, u)]
    fn = {"eager": eager_factored, "compile": compiled(eager_factored), "zslfast": zslfast.prototype_scores_factored}[impl]
    rounds = 3 if shape_name == "21K-classes" else None
    run_benchmark(benchmark, step(fn, inputs, backward), rounds=rounds, warmup=1 if rounds else 2)
