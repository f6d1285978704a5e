"""ILPG and SAGE training steps on a GPU: the model on reference ops (eager), torch.compile of that, the model on
zslfast ops, torch.compile of that, and both compiled with ``mode="reduce-overhead"`` (CUDA graphs: the zslfast
ops must be capturable). Models and inputs are bench_ilpg.make / bench_sage.make (CUB; SAGE at B=32).

    python benchmarks/gpu_models.py OUT_JSON [--budget SECONDS] [--models ilpg sage]

Each figure is triton's do_bench median of whole steps (forward, backward, SGD update) after warm-up steps that
include the compile (its seconds reported as ``warmup_s``); peak memory is timing.peak_mib of one step. A variant
that raises is recorded with its error instead of a time. On CPU tensors (no GPU) it runs the same pipeline with
timing.median_ms at the quick set's batch and without the CUDA-graph variants: a dry run, not a figure.
"""

import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the benchmarks' modules, and zslfast from this tree

import bench_ilpg  # noqa: E402
import bench_sage  # noqa: E402
from zslfast.tools import _cli, timing  # noqa: E402

ON_GPU = torch.cuda.is_available()


def variants(fused: torch.nn.Module, use_graphs: bool):
    """name -> (model the step updates, its forward): timing.model_variants, and with ``use_graphs`` both compiled
    models again with mode="reduce-overhead"."""
    out = timing.model_variants(fused)
    if use_graphs:
        graphed = timing.model_variants(fused, ("compile", "zslfast+compile"), mode="reduce-overhead")
        out.update({f"{name}[reduce-overhead]": pair for name, pair in graphed.items()})
    return out


def time_model(name: str, fused, inputs, deadline: float) -> dict:
    result = dict(model=name, impls={})
    for impl, (model, forward) in variants(fused, ON_GPU).items():
        if time.monotonic() > deadline:
            result["impls"][impl] = dict(skipped="over the time budget")
            continue
        try:
            step = timing.training_step(model, inputs, forward)
            start = time.perf_counter()
            for _ in range(3):
                step()
            timing.sync()
            entry = dict(warmup_s=time.perf_counter() - start)
            entry["step_ms"] = timing.cuda_median_ms(step) if ON_GPU else timing.median_ms(step, 3)
            entry["peak_mib"] = timing.peak_mib(step)
        except Exception as error:  # a variant that cannot run is a finding, not the end of the run
            entry = dict(error=f"{type(error).__name__}: {error}"[:2000], trace=traceback.format_exc()[-4000:])
        result["impls"][impl] = entry
        print(f"{name:5s} {impl:34s} " + (f"{entry['step_ms']:9.3f} ms  peak {entry['peak_mib']:8.1f} MiB  "
                                          f"warm-up {entry['warmup_s']:.1f} s" if "step_ms" in entry
                                          else entry.get("error", entry.get("skipped", ""))[:200]), flush=True)
    return result


def main(argv=None):
    parser = _cli.Parser(prog="benchmarks/gpu_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=_cli.output_file, help="JSON file for the results")
    parser.add_argument("--budget", type=_cli.positive_float, default=240.0,
                        help="seconds after which no variant is started")
    parser.add_argument("--models", nargs="+", default=["ilpg", "sage"], choices=["ilpg", "sage"])
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    results = dict(device=torch.cuda.get_device_name() if ON_GPU else "cpu", torch=torch.__version__, models=[])
    for name in args.models:
        if name == "ilpg":
            model, inputs = bench_ilpg.make("CUB")
            shape = dict(zip("BCKU", bench_ilpg.CASES["CUB"].on(timing.DEVICE)))
        else:
            batch = bench_sage.B if ON_GPU else bench_sage.QUICK_B
            model, inputs = bench_sage.make(batch)
            shape = dict(B=batch, C=bench_sage.C, K=bench_sage.K)
        entry = time_model(name, model, inputs, deadline)
        entry["shape"] = shape
        results["models"].append(entry)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after each model: a timeout keeps what ran
    return 0


if __name__ == "__main__":
    sys.exit(main())
