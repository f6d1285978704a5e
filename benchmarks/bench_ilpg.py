"""ILPG training step: the same model (zslfast.models.ILPG) with the reference ops ("eager": the papers' PyTorch
code, S_W and the (B, K, R) attention materialised), torch.compile of that, the fused ops ("zslfast") and
torch.compile of the model on the fused ops ("zslfast+compile"): zslfast.tools.timing.model_variants.

    regions (B, R, Dv), signatures (B, Dg) precomputed (frozen backbones, as ZSL code trains) -> AVL (encoder:
    Linear Dv -> Da and one transformer layer over the R regions; decoder: Eq. 2-4) -> Ẽ (B, K) -> IDPP (hidden J,
    weights "full" (B, C, K)) -> APC logits (B, C) -> ILPG loss; one step = forward, backward and an SGD update of
    every trainable parameter.

Shapes (zslfast.testing.SHAPES["ilpg"]: B, C, K, unseen): CUB (B=50, C=200, K=312), SUN (C=717, K=102), AwA2
(C=50, K=85), with ResNet-101 regions (R=49, Dv=2048), GloVe attribute vectors (Da=300), DINOv2 ViT-S/14
signatures (Dg=384), J=64; and a large one (B=128, C=1000, K=312). The encoder (its region embedding, B·R·Dv·Da
flops each way, and its layer) is plain PyTorch, the same work in every implementation, so it bounds the
model-level speed-up.

Interleaved timing (the four alternate each round; see zslfast.tools.timing.interleaved) and peak memory; with
--defaults, at the model's own defaults (J=512) instead of J=64:
    python benchmarks/bench_ilpg.py CUB [rounds] [--defaults]
Where the step's time goes (profiled; the region embedding and the (Da, B·R) weight gradients vs the rest):
    python benchmarks/bench_ilpg.py CUB --breakdown
"""

import sys

import pytest
import torch

from conftest import DEVICE, ON_GPU, cases, run_benchmark
from zslfast import testing
from zslfast.tools import timing

CASES = testing.SHAPES["ilpg"]  # B, C, K, unseen
R, DV, DA, J = testing.REGIONS, testing.RESNET_DIM, testing.GLOVE_DIM, testing.HIDDEN


def make(shape_name, hidden_dim=J, weights="full"):
    return testing.ilpg_step(shape_name, DEVICE, hidden_dim=hidden_dim, weights=weights)


@pytest.mark.parametrize("impl", timing.MODEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape_name", cases("ilpg"))
def test_ilpg_training_step(benchmark, shape_name, impl):
    if shape_name == "large" and impl.endswith("compile") and not ON_GPU:
        pytest.skip("compile of the large case takes minutes on 2 CPU cores")
    benchmark.group = f"ILPG training step {shape_name} B,C,K={CASES[shape_name].on(DEVICE)[:3]} R={R} {DEVICE.type}"
    fused, batch = make(shape_name)
    model, forward = timing.model_variants(fused, [impl])[impl]
    run_benchmark(benchmark, timing.training_step(model, batch, forward), rounds=None if shape_name != "large" else 5)


def run_interleaved(shape_name, rounds=11, **model_options):
    fused, batch = make(shape_name, **model_options)
    fns = {name: timing.training_step(model, batch, forward)
           for name, (model, forward) in timing.model_variants(fused).items()}
    options = "".join(f" {k}={v}" for k, v in model_options.items())
    timing.interleaved(f"ILPG training step {shape_name} B,C,K={CASES[shape_name].on(DEVICE)[:3]} R={R}{options}",
                       fns, rounds, calls=3)
    for name, fn in fns.items():
        print(f"  peak memory {name}: {timing.peak_mib(fn, DEVICE):.0f} MiB (beyond the inputs)")


def breakdown(shape_name, steps=5):
    """Profile each path's step and split it into the region GEMMs (the same in both) and the rest."""
    fused, batch = make(shape_name)
    B = batch["regions"].shape[0]
    projection_shapes = ([B * R, DV], [DA, B * R])  # forward I @ W_e, weight gradients g^T @ x of width Da
    for name, (model, _) in timing.model_variants(fused, ["eager", "zslfast"]).items():
        step = timing.training_step(model, batch)
        for _ in range(3):
            step()
        with torch.profiler.profile(record_shapes=True) as prof:
            wall = 1e3 * sum(timing.call_seconds(step, steps)) / steps
        projections = sum(
            e.cpu_time_total for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::mm" and e.input_shapes and e.input_shapes[0] in projection_shapes
        ) / steps / 1e3
        print(f"{name:9s} step {wall:6.1f} ms (profiled): region GEMMs {projections:5.1f} ms, "
              f"the rest {wall - projections:6.1f} ms")


if __name__ == "__main__":
    words = [a for a in sys.argv[1:] if not a.startswith("--")]
    shape = words[0] if words else "CUB"
    if "--breakdown" in sys.argv:
        breakdown(shape)
    else:
        defaults = dict(hidden_dim=512) if "--defaults" in sys.argv else {}  # the model's own defaults: J=512
        run_interleaved(shape, int(words[1]) if len(words) > 1 else 11, **defaults)
