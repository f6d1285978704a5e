"""cosine_logits speed and memory: the eager code a paper writes, torch.compile of it, and zslfast.

    out[n, c] = scale * cos(x[n], protos[c]);   x (N, D) visual features, protos (C, D), scale () learnable

Shapes (N, C, D): ViT-B features (D=768) against the classes of CUB (C=200), SUN (C=717) and AwA2 (C=50), as in
SVIP/SAGE-style cosine heads at batch 64, and a large-vocabulary one: ImageNet-21K's 21841 classes, at
(1024, 21841, 768) on a GPU, (256, 21841, 300) on a CPU. Forward, and forward+backward (gradients of x, protos and
scale, as in training). Each result's ``extra_info`` holds ``peak_extra_MiB`` (see conftest.py) and
``saved_MiB``: the bytes autograd keeps between forward and backward beyond the inputs (eager keeps normalised
copies of x and protos; zslfast keeps inverse norms, and out for the Triton backend).
"""

import pytest
import torch

import zslfast
from zslfast import baselines
from conftest import DEVICE, ON_GPU, compiled, run_benchmark, saved_mib, step


eager_cosine_logits = baselines.cosine_logits

IMPLEMENTATIONS = {
    "eager": lambda: eager_cosine_logits,
    "compile": lambda: compiled(eager_cosine_logits),
    "zslfast": lambda: zslfast.cosine_logits,
}

SHAPES = {
    "AwA2": (64, 50, 768),
    "CUB": (64, 200, 768),
    "SUN": (64, 717, 768),
    "21K-classes": (1024, 21841, 768) if ON_GPU else (256, 21841, 300),
}


def make(shape, requires_grad):
    N, C, D = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(N, D, device=DEVICE, generator=g)
    protos = torch.randn(C, D, device=DEVICE, generator=g)
    scale = torch.tensor(10.0, device=DEVICE)
    return [t.requires_grad_(requires_grad) for t in (x, protos, scale)]



@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_cosine_logits(benchmark, shape_name, backward, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"cosine_logits {shape_name} N,C,D={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = make(shape, backward)
    fn = IMPLEMENTATIONS[impl]()
    large_on_cpu = shape_name == "21K-classes" and not ON_GPU
    if backward:
        fn(*inputs)  # compiles outside the measurement
        benchmark.extra_info["saved_MiB"] = round(saved_mib(fn, inputs), 3)
    run_benchmark(
        benchmark, step(fn, inputs, backward), rounds=3 if large_on_cpu else None, warmup=1 if large_on_cpu else 2
    )
