"""attribute_attention speed and memory: the eager code of the papers, torch.compile of it, SDPA + a separate cosine,
and zslfast.

    E = softmax(q k^T / sqrt(D)) v;  out = cos(E[b, i], ref[i])      q (K, D) shared attribute queries,
    k (B, R, D), v (B, R, Dv), ref (K, Dv)                           (ILPG AVL, Eq. 2-4)

Shapes (B, K, R, D, Dv): ResNet101 7x7 regions (R=49) against GloVe attribute queries (D=Dv=300) of CUB (K=312),
AwA2 (K=85), SUN (K=102) at batch 64, and ViT-B tokens (R=197, D=Dv=768) against CUB's attributes. Forward, and
forward+backward (gradients of q, k, v and ref). extra_info: peak_extra_MiB (see conftest.py) and, for fwd+bwd,
saved_MiB (what autograd keeps beyond the inputs: eager keeps the (B, K, R) attention several times).

Interleaved A/B timing (the pytest-benchmark blocks drift on a shared machine):
    python benchmarks/bench_attribute_attention.py CUB [rounds] [threads]
"""

import sys

import pytest
import torch

import zslfast
from zslfast import baselines
from conftest import DEVICE, ON_GPU, compiled, interleaved, run_benchmark, saved_mib, step


eager_attribute_attention, sdpa_attribute_attention = baselines.attribute_attention, baselines.attribute_attention_sdpa

IMPLEMENTATIONS = {
    "eager": lambda: eager_attribute_attention,
    "compile": lambda: compiled(eager_attribute_attention),
    "sdpa": lambda: sdpa_attribute_attention,
    "zslfast": lambda: zslfast.attribute_attention,
}

SHAPES = {
    "CUB": (64, 312, 49, 300, 300),
    "AwA2": (64, 85, 49, 300, 300),
    "SUN": (64, 102, 49, 300, 300),
    "ViT-CUB": (64, 312, 197, 768, 768),
}


def make(shape, requires_grad, device=DEVICE):
    B, K, R, D, Dv = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(K, D, device=device, generator=g)
    k = torch.randn(B, R, D, device=device, generator=g)
    v = torch.randn(B, R, Dv, device=device, generator=g)
    ref = torch.randn(K, Dv, device=device, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, ref)]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_attribute_attention(benchmark, shape_name, backward, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"attribute_attention {shape_name} B,K,R,D,Dv={shape} {'fwd+bwd' if backward else 'fwd'} {DEVICE.type}"
    inputs = make(shape, backward)
    fn = IMPLEMENTATIONS[impl]()
    large_on_cpu = shape_name == "ViT-CUB" and not ON_GPU
    if backward:
        fn(*inputs)  # compiles outside the measurement
        benchmark.extra_info["saved_MiB"] = round(saved_mib(fn, inputs), 3)
    run_benchmark(
        benchmark, step(fn, inputs, backward), rounds=5 if large_on_cpu else None, warmup=1 if large_on_cpu else 2
    )


def run_interleaved(shape_name, rounds=11, backward=True):
    inputs = make(SHAPES[shape_name], backward, torch.device("cpu"))
    fns = {name: step(IMPLEMENTATIONS[name](), inputs, backward) for name in ("eager", "compile", "zslfast")}
    interleaved(f"{shape_name} {SHAPES[shape_name]} {'fwd+bwd' if backward else 'fwd'}", fns, rounds)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "CUB"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 11
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    run_interleaved(name, n, backward=True)
    run_interleaved(name, n, backward=False)
