"""Interleaved A/B timing of each op's forward+backward at the papers' shapes: eager vs torch.compile vs zslfast.

    python benchmarks/ab_ops.py                       every op of zslfast.testing.RECORDS at each papers' shape
    python benchmarks/ab_ops.py prototype_scores      one op at its papers' shapes
    python benchmarks/ab_ops.py prototype_scores SUN-B64 [large ...]   named cases of one op
    python benchmarks/ab_ops.py prototype_scores 64 717 102            one op at a shape given by its dimensions

On a shared machine whose speed drifts between minutes, timing each implementation in its own block (as
pytest-benchmark does) skews ratios; here the three alternate for ROUNDS rounds (median of several calls each)
and the per-round ratios are reported (median, min, max) (zslfast.tools.timing.interleaved), with each one's peak
extra memory. Gradients of every differentiable input every call (zslfast.tools.timing.step); torch.compile of the
eager code compiles for each shape afresh (torch._dynamo.reset()), outside the timing.
"""

import os
import sys

import torch

from zslfast import testing
from zslfast.tools import _cli, timing

ROUNDS = int(os.environ.get("ZSLFAST_AB_ROUNDS", "9"))


def run(op, shape, label):
    torch._dynamo.reset()  # the compiled eager code traces this shape afresh
    inputs = op.make(shape, device=timing.DEVICE, requires_grad=True)
    fns = {name: timing.step(timing.implementation(op, name), inputs) for name in timing.IMPLEMENTATIONS}
    single = timing.median_ms(fns["eager"], 1, warmup=1)
    calls = max(1, min(10, round(100 / max(single, 1e-3))))  # about 0.1 s per implementation per round
    timing.interleaved(f"{op.name} {label} forward+backward", fns, rounds=ROUNDS, calls=calls)
    print("  peak MiB " + ", ".join(f"{name} {timing.peak_mib(fn):.1f}" for name, fn in fns.items()), flush=True)


def main(argv):
    print(_cli.timing_conditions(timing.DEVICE))
    ops = [testing.RECORDS[argv[0]]] if argv else list(testing.RECORDS.values())
    for op in ops:
        if len(argv) > 1 and all(a.isdigit() for a in argv[1:]):
            shape = tuple(int(a) for a in argv[1:])
            run(op, shape, f"{shape}")
            continue
        cases = [op.shapes[name] for name in argv[1:]] if len(argv) > 1 else list(op.shapes.papers())
        for case in cases:
            shape = case.on(timing.DEVICE)
            if shape is not None:
                run(op, shape, case.label(shape))


if __name__ == "__main__":
    main(sys.argv[1:])
