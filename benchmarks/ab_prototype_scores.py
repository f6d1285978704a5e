"""Interleaved A/B timing of prototype_scores forward+backward: eager vs torch.compile vs zslfast.

    python benchmarks/ab_prototype_scores.py B C K      e.g. 64 717 102 (ILPG's SUN shape at batch 64)
    python benchmarks/ab_prototype_scores.py CUB        a case of zslfast.testing.SHAPES["prototype_scores"] by name

On a shared machine whose speed drifts between minutes, timing each implementation in its own block (as
pytest-benchmark does) skews ratios; here the three alternate for 15 rounds (median of 10 calls each, 2 for
large shapes) and the per-round ratios are reported (median, min, max) (zslfast.tools.timing.interleaved). CPU
tensors; gradients of e, s and w every call (zslfast.tools.timing.step).
"""

import sys

import torch

from zslfast import testing
from zslfast.tools import timing

OP = testing.RECORDS["prototype_scores"]


def main(B, C, K):
    inputs = OP.make((B, C, K), device="cpu", requires_grad=True)
    fns = {name: timing.step(timing.implementation(OP, name), inputs) for name in timing.IMPLEMENTATIONS}
    calls = 10 if B * C * K < 10_000_000 else 2
    timing.interleaved(f"B,C,K=({B}, {C}, {K}) forward+backward", fns, rounds=15, calls=calls)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        main(*OP.shapes[sys.argv[1]].on(torch.device("cpu")))
    else:
        main(*(int(a) for a in sys.argv[1:4]))
