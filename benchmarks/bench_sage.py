"""SAGE training step at CUB: the same model (zslfast.models.SAGE) with the reference ops ("eager": the (B, K, R)
attention maps materialised, the bank's Python-loop update), torch.compile of that, the fused ops ("zslfast") and
torch.compile of the model on the fused ops ("zslfast+compile"): zslfast.tools.timing.model_variants.

    hidden states: L=3 levels of ViT-B/16 at 224² (B, 1+196, 768) precomputed (a frozen backbone, as ZSL code
    trains on cached features) -> MSFE (d=256: 49 / 196 / 784 patches per scale) -> VSA + SVA per scale over the
    Global / Context / Local subsets (K=312) -> MBGF over M=9 branches, C=200 classes -> Eq. 11; one step = forward,
    backward and an SGD update of every trainable parameter. B=32, all losses on (λ_align > 0: the alignment loss
    returns the attention maps on both paths). The quick set (pytest without --full) runs B=8 on CPU tensors, without torch.compile.

Interleaved timing (the four alternate each round; see zslfast.tools.timing.interleaved) and peak memory:
    python benchmarks/bench_sage.py [rounds] [--no-compile] [--batch B]
Where the step's time goes (profiled, top ops of each path):
    python benchmarks/bench_sage.py --profile
"""

import sys

import pytest
import torch

from conftest import DEVICE, full_unless, quick, run_benchmark
from zslfast import testing
from zslfast.tools import timing

# the step's shapes, testing.sage_step's: CUB, L levels of ViT-B/16 hidden states of N patches (1 + N tokens) of D
B, L, D = (testing.SAGE_STEP[name] for name in ("batch", "levels", "dim"))
N, C, K = testing.SAGE_STEP["tokens"] - 1, testing.CUB.num_classes, testing.CUB.num_attributes
QUICK_B = 8  # the quick set's batch on CPU tensors (a B=32 eager step takes ~3 s on 2 cores); --full runs B=32


def make(batch=B, lambda_align=0.1):
    return testing.sage_step(batch, DEVICE, lambda_align=lambda_align)


# torch.compile of the whole SAGE step takes 30-100 s on 2 CPU cores (cold inductor cache): --full only.
@pytest.mark.parametrize("impl", full_unless(lambda impl: not impl.endswith("compile"), *timing.MODEL_IMPLEMENTATIONS))
def test_sage_training_step(benchmark, impl):
    batch = QUICK_B if quick() and DEVICE.type == "cpu" else B
    benchmark.group = f"SAGE training step CUB B={batch} K={K} C={C} L={L} N={N} D={D} {DEVICE.type}"
    fused, inputs = make(batch)
    model, forward = timing.model_variants(fused, [impl])[impl]
    run_benchmark(benchmark, timing.training_step(model, inputs, forward), rounds=5)


def run_interleaved(rounds=7, compile_too=True, batch=B):
    fused, inputs = make(batch)
    names = timing.MODEL_IMPLEMENTATIONS if compile_too else ("eager", "zslfast")
    fns = {name: timing.training_step(model, inputs, forward)
           for name, (model, forward) in timing.model_variants(fused, names).items()}
    title = f"SAGE training step CUB B={batch} K={K} C={C} L={L} N={N} D={D} d={fused.dim} {DEVICE.type}"
    timing.interleaved(title, fns, rounds, calls=1, warmup=2)
    for name, fn in fns.items():
        print(f"  peak memory {name}: {timing.peak_mib(fn, DEVICE):.0f} MiB (beyond the inputs)")


def profile(steps=3):
    fused, inputs = make()
    for name, (model, _) in timing.model_variants(fused, ["eager", "zslfast"]).items():
        step = timing.training_step(model, inputs)
        for _ in range(2):
            step()
        with torch.profiler.profile() as prof:
            wall = 1e3 * sum(timing.call_seconds(step, steps)) / steps
        print(f"\n{name}: {wall:.0f} ms per step (profiled)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    else:
        numbers = [a for a in sys.argv[1:] if a.isdigit()]
        batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else B
        numbers = [n for n in numbers if "--batch" not in sys.argv or n != str(batch)]
        run_interleaved(int(numbers[0]) if numbers else 7, compile_too="--no-compile" not in sys.argv, batch=batch)
