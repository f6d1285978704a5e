"""attribute_attention speed and memory: the eager code of the papers, torch.compile of it, SDPA + a separate cosine,
and zslfast.

    E = softmax(q k^T / sqrt(D)) v;  out = cos(E[b, i], ref[i])      q (K, D) shared attribute queries,
    k (B, R, D), v (B, R, Dv), ref (K, Dv)                           (ILPG AVL, Eq. 2-4)

Shapes (B, K, R, D, Dv; zslfast.testing.SHAPES): ResNet101 7x7 regions (R=49) against GloVe attribute queries
(D=Dv=300) of CUB (K=312), AwA2 (K=85), SUN (K=102) at batch 64, and ViT-B tokens (R=197, D=Dv=768) against CUB's
attributes; on a GPU also ViT-B at 384^2 (R=577, B=16) and CUB at batch 256 (the large one). Forward, and
forward+backward (gradients of q, k, v and ref). extra_info: peak_extra_MiB (see conftest.py) and, for fwd+bwd,
saved_MiB (what autograd keeps beyond the inputs: eager keeps the (B, K, R) attention several times).

Interleaved A/B timing (the pytest-benchmark blocks drift on a shared machine):
    python benchmarks/bench_attribute_attention.py CUB [rounds] [threads]
"""

import sys

import pytest
import torch

from zslfast import baselines, testing
from zslfast.tools import timing
from conftest import DEVICE, ON_GPU, cases, run_benchmark, shape_of

OP = testing.RECORDS["attribute_attention"]


def implementation(name):
    return baselines.attribute_attention_sdpa if name == "sdpa" else timing.implementation(OP, name)


@pytest.mark.parametrize("impl", ["eager", "compile", "sdpa", "zslfast"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", cases(OP.name))
def test_attribute_attention(benchmark, shape_name, backward, impl):
    shape = shape_of(OP.name, shape_name)
    benchmark.group = f"attribute_attention {shape_name} B,K,R,D,Dv={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = OP.make(shape, device=DEVICE, requires_grad=backward)
    fn = implementation(impl)
    large_on_cpu = shape_name == "ViT-CUB" and not ON_GPU
    run_benchmark(
        benchmark, timing.step(fn, inputs, backward), rounds=5 if large_on_cpu else None,
        warmup=1 if large_on_cpu else 2, saved=(fn, inputs) if backward else None,  # compiles outside the timing
    )


def run_interleaved(shape_name, rounds=11, backward=True):
    cpu = torch.device("cpu")
    shape = OP.shapes[shape_name].on(cpu)
    inputs = OP.make(shape, device=cpu, requires_grad=backward)
    fns = {name: timing.step(timing.implementation(OP, name), inputs, backward) for name in timing.IMPLEMENTATIONS}
    timing.interleaved(f"{shape_name} {shape} {'fwd+bwd' if backward else 'fwd'}", fns, rounds)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "CUB"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 11
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    run_interleaved(name, n, backward=True)
    run_interleaved(name, n, backward=False)
