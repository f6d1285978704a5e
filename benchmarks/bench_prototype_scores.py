"""prototype_scores speed and memory: the eager code a paper writes, torch.compile of it, and zslfast.

    logits[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k]);   e (B, K), s (C, K), w (B, C, K) -> (B, C)
    factored:    w[b, c, k] = sum_j h[b, j] * u[j, c, k];       h (B, J), u (J, C, K)

Shapes (zslfast.testing.SHAPES): ILPG's CUB (B=50 C=200 K=312), SUN (B=64 C=717 K=102), AwA2 (B=50 C=50 K=85), a
large one (B=256 C=1000 K=312), and for the factored form CUB at J=64 and the large-vocabulary shape (B=256
C=21841 K=300 J=64). Forward and forward+backward (gradients of every input, as in training). Eager runs that
would not fit in memory are skipped with the size they would need.
"""

import pytest
import torch

from zslfast import testing
from zslfast.tools import timing
from conftest import DEVICE, FULL, ON_GPU, cases, run_benchmark, shape_of

OP, FACTORED = testing.RECORDS["prototype_scores"], testing.RECORDS["prototype_scores_factored"]


@pytest.mark.parametrize("impl", timing.IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", cases(OP.name))
def test_prototype_scores(benchmark, shape_name, backward, impl):
    shape = shape_of(OP.name, shape_name)
    benchmark.group = f"prototype_scores {shape_name} B,C,K={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = OP.make(shape, device=DEVICE, requires_grad=backward)
    rounds = 5 if shape_name == "large" and not ON_GPU else None
    benchmark.extra_info["w_MB"] = inputs[2].numel() * inputs[2].element_size() / 1e6
    fn = timing.implementation(OP, impl)
    run_benchmark(benchmark, timing.step(fn, inputs, backward), rounds=rounds, saved=(fn, inputs) if backward else None)


@FULL
@pytest.mark.parametrize("impl", ["eager", "zslfast"])
def test_dispatch_overhead(benchmark, impl):
    """Cost of the registered op on a tiny input (B=C=K=1): what an eager call pays for torch.library."""
    benchmark.group = f"prototype_scores dispatch overhead B=C=K=1 {DEVICE.type}"
    inputs = OP.make((1, 1, 1), device=DEVICE)
    fn = timing.implementation(OP, impl)
    run_benchmark(benchmark, lambda: fn(*inputs))


@pytest.mark.parametrize("impl", timing.IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", cases(FACTORED.name, "CUB-J64"))
def test_prototype_scores_factored(benchmark, shape_name, backward, impl):
    B, C, K, J = shape = shape_of(FACTORED.name, shape_name)
    benchmark.group = f"prototype_scores_factored {shape_name} B,C,K,J={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    w_bytes = B * C * K * 4
    free = torch.cuda.mem_get_info()[0] if ON_GPU else 16 * 2**30
    if impl != "zslfast" and 4 * w_bytes > free:  # eager keeps w, S_W, e*S_W (and their grads) alive
        pytest.skip(f"eager/compile would materialise w (B, C, K) = {w_bytes / 2**30:.1f} GiB several times over")
    if shape_name == "21K-classes" and not ON_GPU and backward:
        pytest.skip("forward+backward at 21K classes takes minutes on a 2-core CPU; run it on a GPU")
    inputs = FACTORED.make(shape, device=DEVICE, requires_grad=backward)
    rounds = 3 if shape_name == "21K-classes" else None
    fn = timing.implementation(FACTORED, impl)
    run_benchmark(benchmark, timing.step(fn, inputs, backward), rounds=rounds, warmup=1 if rounds else 2,
                  saved=(fn, inputs) if backward else None)
