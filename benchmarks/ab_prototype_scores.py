"""Interleaved A/B timing of prototype_scores forward+backward: eager vs torch.compile vs zslfast.

    python benchmarks/ab_prototype_scores.py B C K      e.g. 64 717 102 (ILPG's SUN shape at batch 64)

On a shared machine whose speed drifts between minutes, timing each implementation in its own block (as
pytest-benchmark does) skews ratios; here the three alternate for 15 rounds (median of 10 calls each, 2 for
large shapes) and the per-round ratios are reported (median, min, max). Gradients of e, s and w every call.
"""

import sys

import torch

import zslfast
from zslfast.baselines import prototype_scores as eager
from conftest import interleaved


def main(B, C, K):
    compiled = torch.compile(eager)
    e, s, w = (torch.randn(*shape, requires_grad=True) for shape in ((B, K), (C, K), (B, C, K)))
    g = torch.randn(B, C)
    fns = {
        "eager": lambda: torch.autograd.grad(eager(e, s, w), (e, s, w), g),
        "compile": lambda: torch.autograd.grad(compiled(e, s, w), (e, s, w), g),
        "zslfast": lambda: torch.autograd.grad(zslfast.prototype_scores(e, s, w), (e, s, w), g),
    }
    calls = 10 if B * C * K < 10_000_000 else 2
    interleaved(f"B,C,K=({B}, {C}, {K}) forward+backward", fns, rounds=15, calls=calls)

if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
