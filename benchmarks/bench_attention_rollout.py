"""attention_rollout speed and memory: SVIP's eager chain, torch.compile of it, zslfast, and the floor.

    attns L x (B, H, N, N) softmax maps -> row 0 of A'^L ... A'^1, A' = rownorm(mean_h(A) + I)   (B, N)

The eager code (SVIP / vit-explain, rows normalised): mean over heads, + I, normalise, torch.bmm layer by layer,
take row 0. The floor is one plain read of every map (``sum`` of each layer), which no method can beat.
Shapes: ViT-B/16 at 224^2 (L=12, H=12, N=197) and 384^2 (N=577), batch 8 and 32 (64 on GPU).
"""

import pytest
import torch

import zslfast
from zslfast import baselines
from conftest import DEVICE, ON_GPU, compiled, run_benchmark


eager_rollout = baselines.attention_rollout


def read_floor(attns):
    return [a.sum() for a in attns]


IMPLEMENTATIONS = {
    "eager": lambda: eager_rollout,
    "compile": lambda: compiled(eager_rollout),
    "zslfast": lambda: zslfast.attention_rollout,
    "floor": lambda: read_floor,
}

SHAPES = {
    "ViT-B-224-B8": (12, 8, 12, 197),
    "ViT-B-224-B32": (12, 64 if ON_GPU else 32, 12, 197),
    "ViT-B-384-B8": (12, 8, 12, 577),
}

_maps = {}


def maps_for(shape):
    if shape not in _maps:
        _maps.clear()
        L, B, H, N = shape
        g = torch.Generator(device=DEVICE).manual_seed(0)
        _maps[shape] = [torch.randn(B, H, N, N, device=DEVICE, generator=g).softmax(-1) for _ in range(L)]
    return _maps[shape]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rollout_forward(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"attention_rollout {shape_name} L,B,H,N={shape} fwd {DEVICE.type}"
    attns = maps_for(shape)
    benchmark.extra_info["maps_MB"] = sum(a.numel() * a.element_size() for a in attns) / 1e6
    fn = IMPLEMENTATIONS[impl]()
    with torch.no_grad():
        run_benchmark(benchmark, lambda: fn(attns), rounds=None if ON_GPU else 5)


@pytest.mark.parametrize("impl", ["eager", "compile", "zslfast"])
def test_rollout_forward_backward(benchmark, impl):
    """SVIP runs rollout under autograd: gradients of every map."""
    shape = SHAPES["ViT-B-224-B8"]
    benchmark.group = f"attention_rollout ViT-B-224-B8 L,B,H,N={shape} fwd+bwd {DEVICE.type}"
    attns = [a.clone().requires_grad_() for a in maps_for(shape)]
    fn = IMPLEMENTATIONS[impl]()
    grad_out = torch.randn(shape[1], shape[3], device=DEVICE)
    run_benchmark(benchmark, lambda: torch.autograd.grad(fn(attns), attns, grad_out), rounds=None if ON_GPU else 3)
