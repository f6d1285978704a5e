"""cosine_logits speed and memory: the eager code a paper writes, torch.compile of it, and zslfast.

    out[n, c] = scale * cos(x[n], protos[c]);   x (N, D) visual features, protos (C, D), scale () learnable

Shapes (N, C, D; zslfast.testing.SHAPES): ViT-B features (D=768) against the classes of CUB (C=200), SUN (C=717) and
AwA2 (C=50), as in SVIP/SAGE-style cosine heads at batch 64, and a large-vocabulary one: ImageNet-21K's 21841
classes, at (256, 21841, 768) on a GPU, (256, 21841, 300) on a CPU. Forward, and forward+backward (gradients of
x, protos and scale, as in training). Each result's ``extra_info`` holds ``peak_extra_MiB`` (see conftest.py) and
``saved_MiB``: the bytes autograd keeps between forward and backward beyond the inputs (eager keeps normalised
copies of x and protos; zslfast keeps inverse norms, and out for the Triton backend).
"""

import pytest

from zslfast import testing
from zslfast.tools import timing
from conftest import DEVICE, ON_GPU, cases, run_benchmark, shape_of

OP = testing.RECORDS["cosine_logits"]


@pytest.mark.parametrize("impl", timing.IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", cases(OP.name))
def test_cosine_logits(benchmark, shape_name, backward, impl):
    shape = shape_of(OP.name, shape_name)
    benchmark.group = f"cosine_logits {shape_name} N,C,D={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = OP.make(shape, device=DEVICE, requires_grad=backward)
    fn = timing.implementation(OP, impl)
    large_on_cpu = shape_name == "21K-classes" and not ON_GPU
    run_benchmark(
        benchmark, timing.step(fn, inputs, backward), rounds=3 if large_on_cpu else None,
        warmup=1 if large_on_cpu else 2, saved=(fn, inputs) if backward else None,  # compiles outside the timing
    )
