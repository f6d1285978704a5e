"""``python -m zslfast bench``: each op's forward + backward time and peak extra memory, eager against zslfast.

It prints a table of each op's forward + backward time (median of ``--repeats`` calls) and peak extra memory at the
papers' shapes on the current device, eager against zslfast; ``--compile`` adds torch.compile of the eager code
(its first call compiles, outside the timing). ``--models`` times a training step of ILPG and SAGE instead
(zslfast.testing.ilpg_step / sage_step, timing.model_variants): the model on the reference ops (the papers' code)
against the model on zslfast ops, and with ``--compile`` torch.compile of each (the fourth column: torch.compile
of the zslfast model, against torch.compile alone). The ops, their cases and inputs are zslfast.testing's records; the
timers and memory figures are zslfast.tools.timing's. The benchmark suite is ``pytest benchmarks/
--benchmark-only`` (a quick set, one paper shape per op; ``--full`` for every case).
"""

import argparse
import sys

import torch

from .. import _backend, available_backends, testing
from ..testing import RECORDS
from .timing import (
    DEVICE, MODEL_IMPLEMENTATIONS, compiled, median_ms, model_variants, peak_mib, step, training_step,
)


def cases(device: torch.device = DEVICE):
    """(title, record, case, shape on ``device``) of every op at the papers' shapes that run on ``device``."""
    for op in RECORDS.values():
        for case in op.shapes.papers():
            shape = case.on(device)
            if shape is not None:
                yield f"{op.name} {case.label(shape)}", op, case, shape


DESCRIPTION = """\
Time each op's forward+backward (the median of --repeats calls) and measure its peak extra memory at the papers'
shapes (CUB, SUN, AwA2, ViT-B) on this machine's device, eager PyTorch code (the papers') against zslfast;
--compile adds torch.compile of the eager code (its first call compiles, outside the timing). --models times one
training step of ILPG and SAGE instead (reference ops against zslfast ops; with --compile, torch.compile of each
model too: the fourth column is torch.compile of the zslfast model). The timings state
the threads and the machine's load: on a busy machine they are not reliable.
The full suite, with every shape, the forward alone and the summary table: pytest benchmarks/ --benchmark-only"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import matching, positive_int

    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager code")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per case (their median)")
    parser.add_argument("--models", action="store_true",
                        help="time one training step of ILPG (CUB) and SAGE (CUB; batch 8 on CPU) instead of the ops")
    parser.add_argument("--only", default="", metavar="TEXT", type=matching([title for title, *_ in cases()] + [title for title, _ in model_cases()], "case"),
                        help="run only the cases whose title contains TEXT, e.g. 'prototype_scores CUB'")


def run(args: argparse.Namespace) -> None:
    from ._cli import timing_conditions

    device = DEVICE
    selected = [c for c in cases(device) if args.only in c[0]]
    info = _backend.BUILD_INFO
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    print(f"zslfast on torch {torch.__version__}")
    kernels = ", with CUDA kernels" if info and info.WITH_CUDA else ", CPU only"
    print(f"extension: {'built for torch ' + info.TORCH_VERSION + kernels if info else _backend.EXTENSION_ERROR}")
    print(f"backends for {device.type} tensors: {', '.join(available_backends(device))}")
    print(timing_conditions(device) + "\n")

    if args.models:
        run_models(args, device)
        print("\n" + timing_conditions(device, busy_self=torch.get_num_threads() if device.type == "cpu" else 1))
        return
    width = max([52] + [len(title) for title, *_ in selected])
    header = (f"{'forward+backward':{width}s} {'eager ms':>9s} " + (f"{'compile':>9s} " if args.compile else "")
              + f"{'zslfast':>9s} {'speed-up':>9s} {'eager MiB':>10s} {'zslfast MiB':>12s}")
    print(header)
    for title, op, case, shape in selected:
        inputs = op.make(shape, device=device, requires_grad=True)
        eager_step, fused_step = step(op.eager, inputs), step(op.fused, inputs)
        eager_ms = median_ms(eager_step, args.repeats)
        row = f"{title:{width}s} {eager_ms:9.3f} "
        if args.compile:
            torch._dynamo.reset()  # compile for this shape, as the benchmarks do
            row += f"{median_ms(step(compiled(op.eager), inputs), args.repeats):9.3f} "
        fused_ms = median_ms(fused_step, args.repeats)
        eager_mib, fused_mib = (peak_mib(s, device) for s in (eager_step, fused_step))
        print(row + f"{fused_ms:9.3f} {eager_ms / fused_ms:8.2f}x {eager_mib:10.1f} {fused_mib:12.1f}", flush=True)
    print("\n" + timing_conditions(device, busy_self=torch.get_num_threads() if device.type == "cpu" else 1))


def model_cases(device: torch.device = DEVICE):
    """(title, factory) of the model steps ``--models`` times: ILPG at CUB, SAGE at CUB (batch 8 on CPU tensors,
    where a batch-32 reference step takes seconds)."""
    sage_batch = testing.SAGE_STEP["batch"] if device.type == "cuda" else 8
    return [("ILPG CUB training step", lambda: testing.ilpg_step("CUB", device)),
            (f"SAGE CUB B={sage_batch} training step", lambda: testing.sage_step(sage_batch, device))]


def run_models(args: argparse.Namespace, device: torch.device) -> None:
    names = MODEL_IMPLEMENTATIONS if args.compile else ("eager", "zslfast")
    print(f"{'training step (forward, backward, SGD)':40s} " + " ".join(f"{n + ' ms':>20s}" for n in names)
          + f" {'x eager':>8s}" + (f" {'z+c/c':>6s}" if args.compile else "") + "   peak MiB " + "/".join(names))
    for title, make in model_cases(device):
        if args.only not in title:
            continue
        fused, inputs = make()
        ms, mib = {}, {}
        for name, (model, forward) in model_variants(fused, names).items():
            step = training_step(model, inputs, forward)
            ms[name] = median_ms(step, args.repeats, warmup=2)  # the warm-up steps compile a compiled variant
            mib[name] = peak_mib(step, device)
        row = f"{title:40s} " + " ".join(f"{ms[n]:20.1f}" for n in names) + f" {ms['eager'] / ms['zslfast']:7.2f}x"
        if args.compile:
            row += f" {ms['compile'] / ms['zslfast+compile']:5.2f}x"
        print(row + "   " + "/".join(f"{mib[n]:.0f}" for n in names), flush=True)


def main(argv=None):
    from . import _cli

    return _cli.main("python -m zslfast bench", DESCRIPTION, add_arguments, run, argv)
