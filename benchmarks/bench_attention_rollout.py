"""attention_rollout speed and memory: SVIP's eager chain, torch.compile of it, zslfast, and the floor.

    attns L x (B, H, N, N) softmax maps -> row 0 of A'^L ... A'^1, A' = rownorm(mean_h(A) + I)   (B, N)

The eager code (SVIP / vit-explain, rows normalised): mean over heads, + I, normalise, torch.bmm layer by layer,
take row 0. The floor is one plain read of every map (``sum`` of each layer), which no method can beat.
Shapes (L, B, H, N; zslfast.testing.SHAPES): ViT-B/16 (L=12, H=12) at 224^2 (N=197) batch 8 and 32 (64 on a GPU),
at 384^2 (N=577) batch 8 (16 on a GPU), and on a GPU the large one, N=197 at batch 256. Forward at every shape;
forward+backward (gradients of every map, as SVIP runs it) at N=197 batch 8.
"""

import pytest
import torch

from zslfast import testing
from zslfast.tools import timing
from conftest import DEVICE, ON_GPU, cases, run_benchmark, shape_of

OP = testing.RECORDS["attention_rollout"]


def read_floor(*attns):
    return [a.sum() for a in attns]


def implementation(name):
    return read_floor if name == "floor" else timing.implementation(OP, name)


_maps = {}


def maps_for(shape):
    if shape not in _maps:
        _maps.clear()
        _maps[shape] = OP.make(shape, device=DEVICE, requires_grad=False)
    return _maps[shape]


@pytest.mark.parametrize("impl", [*timing.IMPLEMENTATIONS, "floor"])
@pytest.mark.parametrize("shape_name", cases(OP.name, "ViT-B-224-B8"))
def test_rollout_forward(benchmark, shape_name, impl):
    shape = shape_of(OP.name, shape_name)
    benchmark.group = f"attention_rollout {shape_name} L,B,H,N={shape} fwd {DEVICE.type}"
    attns = maps_for(shape)
    benchmark.extra_info["maps_MB"] = sum(a.numel() * a.element_size() for a in attns) / 1e6
    fn = implementation(impl)
    with torch.no_grad():
        run_benchmark(benchmark, lambda: fn(*attns), rounds=None if ON_GPU else 5)


@pytest.mark.parametrize("impl", timing.IMPLEMENTATIONS)
def test_rollout_forward_backward(benchmark, impl):
    """SVIP runs rollout under autograd: gradients of every map."""
    shape = shape_of(OP.name, "ViT-B-224-B8")
    benchmark.group = f"attention_rollout ViT-B-224-B8 L,B,H,N={shape} fwd+bwd {DEVICE.type}"
    attns = [a.clone().requires_grad_() for a in maps_for(shape)]
    fn = timing.implementation(OP, impl)
    run_benchmark(benchmark, timing.step(fn, attns), rounds=None if ON_GPU else 3, saved=(fn, attns))
