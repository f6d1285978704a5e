"""``python -m zslfast gpucheck``: the one-command GPU self-test, for whoever has a GPU.

1. Prints the build: torch, triton, CUDA, the GPU and its arch, and which kernels the extension holds.
2. Correctness: every op x every GPU backend (triton, cuda) x fp32/bf16/fp16, forward and backward, against the
   reference (zslfast.reference) run in fp64 on the same device. An error must stay within 2x the error of the
   same eager code (the paper's) run in that dtype (and within 1e-5 relative in fp32).
3. Speed: eager, torch.compile of the eager code and zslfast at the papers' shapes and the large ones (the GPU
   shapes of the ops' records in zslfast.testing, which the audit compiles too), forward and forward+backward, with
   peak memory (zslfast.tools.timing: step, peak_mib). GPU times are triton.testing.do_bench medians
   (timing.cuda_median_ms) over inputs rotated beyond the 60 MB L2; torch.compile's warm-up is excluded and reported
   on its own. For attribute_attention it also times SDPA + cosine, and records which SDPA backend runs at head dim
   300 in bf16.
4. Writes ``<out>/<gpu>-<date>.json`` and ``.md``: achieved GB/s and TFLOP/s against the audit's bytes and FLOPs
   (a model of the traffic floor) and the ceilings, ratios against eager and compile.

On a machine without a GPU it runs the same pipeline on CPU tensors at tiny shapes (Triton through its
interpreter when TRITON_INTERPRET=1, the C++ kernels as "cpu"), so that it cannot rot; a test runs it.
It needs nothing but this repository and the GPU machine's own torch, triton, nvcc and ninja.
"""

import argparse
import datetime
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, baselines
from ..testing import RECORDS, OpRecord
from . import audit, timing

L2_BYTES = 60 * 2**20  # H200's L2: inputs are rotated over at least twice this


# ----------------------------------------------------------------------------------------------- the ops
# The ops with GPU kernels of their own, from their records (zslfast.testing): inputs, the paper's code, the
# reference, the GPU backends, the CPU self-check's shape (tiny) and the GPU correctness check's case (checked).
OPS = [op for op in RECORDS.values() if op.tiny is not None]


# --------------------------------------------------------------------------------------------- correctness
def _differentiated(op: OpRecord, index: int, tensor: torch.Tensor) -> bool:
    """The inputs checked and timed with their gradients: those the op differentiates, less one-element ones (a
    temperature, held fixed here: its gradient is a sum whose relative error measures cancellation, not the kernel;
    the op's tests check it against a cancellation-aware size)."""
    return op.differentiates(index, tensor) and tensor.numel() > 1


def _outputs_and_grads(op: OpRecord, fn, inputs, grad_out=None):
    """The output and the gradients of the differentiated inputs, for grad_out."""
    leaves = [t.detach().requires_grad_(_differentiated(op, i, t)) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    wrt = [t for t in leaves if t.requires_grad]
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(1),
                               dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype)) if wrt else ()
    return [out.detach()] + [g.detach() for g in grads], grad_out


def _relative_errors(values, exact):
    return [((v.double() - x).abs().max() / x.abs().max().clamp_min(1e-30)).item() for v, x in zip(values, exact)]


def exact_case(op: OpRecord, shape, device):
    """(fp64 inputs, the reference's output and gradients, the output gradient used) of one check."""
    inputs64 = op.make(shape, torch.float64, device, torch.Generator(device=device).manual_seed(0))
    exact, grad_out = _outputs_and_grads(op, op.reference, inputs64)
    return inputs64, exact, grad_out


def check_correctness(op: OpRecord, backend: str, dtype: torch.dtype, case) -> dict:
    inputs64, exact, grad_out = case
    shape = [list(t.shape) for t in inputs64]
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs64)
    kernel, _ = _outputs_and_grads(op, functools.partial(op.fused, backend=backend), low, grad_out)
    eager, _ = _outputs_and_grads(op, op.eager, low, grad_out)
    kernel_err, eager_err = _relative_errors(kernel, exact), _relative_errors(eager, exact)
    floor = 1e-5 if dtype == torch.float32 else 1e-10 if dtype == torch.float64 else 1e-3
    bounds = [max(2 * e, floor) for e in eager_err]
    names = ["out"] + [f"grad{i}" for i in range(len(kernel) - 1)]
    failed = [n for n, k, b in zip(names, kernel_err, bounds) if not k <= b]  # NaN fails
    return dict(op=op.name, backend=backend, dtype=str(dtype).replace("torch.", ""), shapes=shape,
                errors=dict(zip(names, kernel_err)), eager_errors=dict(zip(names, eager_err)),
                bounds=dict(zip(names, bounds)), passed=not failed, failed=failed)


# ------------------------------------------------------------------------------------------------- timing
def _time_ms(fn, device) -> float:
    """do_bench's median on a GPU; on CPU the median of a few calls (the pipeline check, not a figure)."""
    return timing.cuda_median_ms(fn) if device.type == "cuda" else timing.median_ms(fn, 3)


def _rotated(op: OpRecord, shape, dtype, device):
    """Enough copies of the inputs that one pass over them overflows the L2 twice (one on CPU)."""
    g = torch.Generator(device=device).manual_seed(2)
    first = op.make(shape, dtype, device, g)
    size = sum(t.numel() * t.element_size() for t in first)
    copies = 1 if device.type != "cuda" else max(1, min(32, -(-2 * L2_BYTES // max(size, 1))))
    sets = [first] + [op.make(shape, dtype, device, g) for _ in range(copies - 1)]
    for inputs in sets:
        for i, t in enumerate(inputs):
            t.requires_grad_(_differentiated(op, i, t))
    return sets


def _steps(fn, sets):
    """(forward, forward+backward) callables cycling through the input sets (timing.step)."""
    return timing.step(fn, sets[0], False, sets[1:]), timing.step(fn, sets[0], True, sets[1:])


def sdpa_backend_at(D: int, dtype, device) -> Optional[str]:
    """The SDPA backend PyTorch picks at head dim D (the first of its priority order that accepts the input)."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 1, 64, D, device=device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            return backend.name
        except RuntimeError:
            continue
    return None


def time_case(op: OpRecord, case: str, shape, dtype, device, backends, use_compile: bool) -> dict:
    sets = _rotated(op, shape, dtype, device)
    impls = {"eager": op.eager}
    if op.name == "attribute_attention" and device.type == "cuda":
        impls["sdpa+cosine"] = baselines.attribute_attention_sdpa
    if use_compile:
        impls["compile"] = torch.compile(op.eager, dynamic=False)
    impls.update({f"zslfast[{b}]": functools.partial(op.fused, backend=b) for b in backends})
    traffic = audit.traffic(op.name, shape, dtype)
    result = dict(op=op.name, case=case, shape=list(shape), dtype=str(dtype).replace("torch.", ""), impls={})
    for name, fn in impls.items():
        forward, train = _steps(fn, sets)
        entry = {}
        if name == "compile":
            entry["warmup_s"] = timing.call_seconds(lambda: (train(), forward()), 1)[0]
        entry["forward_ms"] = _time_ms(forward, device)
        entry["train_ms"] = _time_ms(train, device)
        entry["train_peak_mib"] = timing.peak_mib(train, device)
        result["impls"][name] = entry
    fwd_bytes, fwd_flops = traffic.get("forward", (0, 0))
    bwd_bytes, bwd_flops = (sum(v[0] for v in traffic.values()), sum(v[1] for v in traffic.values()))
    result["model"] = dict(forward_bytes=fwd_bytes, forward_flops=fwd_flops, train_bytes=bwd_bytes,
                           train_flops=bwd_flops)
    return result


# -------------------------------------------------------------------------------------------------- report
def _build_lines(device) -> list:
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lines.append(f"GPU {torch.cuda.get_device_name(device)}, sm_{major}{minor}, "
                     f"{torch.cuda.get_device_properties(device).multi_processor_count} SMs")
    info = _backend.BUILD_INFO
    if info:
        cpu, cuda = _raw_kernels()
        lines.append(f"extension built for torch {info.TORCH_VERSION}, arch {info.CUDA_ARCH_LIST}; CPU kernels: "
                     f"{', '.join(cpu) or '-'}; CUDA kernels: {', '.join(cuda) or '-'}")
    else:
        lines.append(f"extension: NOT in use ({_backend.EXTENSION_ERROR})")
    return lines


def _raw_kernels():
    """The extension's raw kernels (zslfast::_*) with a CPU and with a CUDA implementation."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("zslfast::_"))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return ([n.split("::")[1] for n in names if has(n, "CPU")], [n.split("::")[1] for n in names if has(n, "CUDA")])


def _fmt_ms(x):
    return "-" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    lines = [f"# zslfast gpucheck on {report['device']} ({report['date']})", ""] + [f"- {l}" for l in report["build"]]
    lines += ["", "## Correctness (max relative error against the fp64 reference; bound = 2x eager in that dtype)", "",
              "| op | backend | dtype | output | worst gradient | bound (worst) | passed |", "|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        grads = [v for k, v in c["errors"].items() if k != "out"]
        lines.append(f"| {c['op']} | {c['backend']} | {c['dtype']} | {c['errors']['out']:.2e} | "
                     f"{max(grads) if grads else 0:.2e} | {min(c['bounds'].values()):.2e} | "
                     f"{'yes' if c['passed'] else 'NO: ' + ', '.join(c['failed'])} |")
    lines += ["", "## Speed (forward+backward; ms are medians; GB/s and TFLOP/s from the audit's traffic model)", "",
              "| op | case | dtype | eager ms | compile ms (warm-up s) | zslfast ms | vs eager | vs compile | GB/s "
              "(% of 4.3 TB/s) | TFLOP/s | peak MiB eager / zslfast |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["timings"]:
        impls = t["impls"]
        ours = [k for k in impls if k.startswith("zslfast")]
        best = min(ours, key=lambda k: impls[k]["train_ms"]) if ours else None
        z = impls[best]["train_ms"] if best else None
        e = impls["eager"]["train_ms"]
        c = impls.get("compile", {}).get("train_ms")
        gbs = t["model"]["train_bytes"] / (z * 1e-3) / 1e9 if z else 0
        tfs = t["model"]["train_flops"] / (z * 1e-3) / 1e12 if z else 0
        lines.append(
            f"| {t['op']} | {t['case']} | {t['dtype']} | {_fmt_ms(e)} | "
            f"{_fmt_ms(c)}{' (%.1f)' % impls['compile']['warmup_s'] if c else ''} | {_fmt_ms(z)} {best or ''} | "
            f"{e / z if z else 0:.2f}x | {(c / z if c and z else 0):.2f}x | {gbs:.0f} ({100 * gbs / 4300:.0f}%) | "
            f"{tfs:.1f} | {impls['eager']['train_peak_mib']:.1f} / {impls[best]['train_peak_mib'] if best else 0:.1f} |")
    if report.get("sdpa_backend_d300_bf16"):
        lines += ["", f"SDPA at head dim 300 in bf16 runs: {report['sdpa_backend_d300_bf16']}"]
    if report.get("skipped"):
        lines += ["", "Not timed: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


DESCRIPTION = """\
The GPU self-test: every op x GPU backend (triton, cuda) x fp32/bf16/fp16, forward and backward, against the
fp64 reference on the same device, then eager / torch.compile / zslfast timings and peak memory at the papers'
shapes, written to --out as JSON and markdown. Without a GPU it runs the same pipeline on CPU tensors at tiny
shapes. Exits 1 when a check fails."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import output_folder, positive_float

    parser.add_argument("--out", default="benchmarks/results", metavar="DIR", type=output_folder,
                        help="folder for the JSON and markdown reports")
    names = [op.name for op in OPS]
    parser.add_argument("--ops", nargs="+", choices=names, metavar="OP",
                        help=f"only these ops (default: all of {', '.join(names)})")
    parser.add_argument("--time-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the timed runs on a GPU (the CPU check times fp32)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the eager code (default: on a GPU only)")
    only = parser.add_mutually_exclusive_group()  # both would run nothing
    only.add_argument("--no-timing", action="store_true", help="correctness only")
    only.add_argument("--no-check", action="store_true", help="timing only")
    parser.add_argument("--compile-all", action="store_true",
                        help="compile the eager code at every timed shape (default: each op's first shape only)")
    parser.add_argument("--budget", type=positive_float, default=330.0,
                        help="seconds after which no further shape is timed (the rest are listed as skipped)")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    use_compile = on_gpu if args.compile is None else args.compile
    build = _build_lines(device)
    if not args.no_timing:
        from ._cli import timing_conditions

        build.append(timing_conditions(device))
    print("\n".join(build))
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    ops = [op for op in OPS if not args.ops or op.name in args.ops]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if on_gpu else [torch.float32]
    report = dict(device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                  date=datetime.date.today().isoformat(), build=build, checks=[], timings=[])
    deadline = time.monotonic() + args.budget  # a time budget, not a measurement (those are timing's)
    report["skipped"] = []
    for op in ops:
        backends = [b for b in (op.gpu_backends if on_gpu else ("cpu", "triton"))
                    if _backend.why_unavailable(b, device) is None]
        checked = backends if not args.no_check else []
        case = exact_case(op, op.shapes[op.checked].shape if on_gpu else op.tiny, device) if checked else None
        for backend in checked:
            for dtype in dtypes:
                result = check_correctness(op, backend, dtype, case)
                report["checks"].append(result)
                print(f"check {op.name:20s} {backend:7s} {result['dtype']:9s} "
                      f"{'ok' if result['passed'] else 'FAILED ' + ', '.join(result['failed'])} "
                      f"(worst {max(result['errors'].values()):.1e}, bound {min(result['bounds'].values()):.1e})",
                      flush=True)
        if args.no_timing or not backends:
            continue
        cases = [(c.label(), c.shape) for c in op.shapes.cases.values()] if on_gpu else [("tiny", op.tiny)]
        time_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.time_dtype]
        for i, (case, case_shape) in enumerate(cases):
            if time.monotonic() > deadline:
                report["skipped"].append(f"{op.name} {case}: over the {args.budget:.0f} s budget")
                continue
            timing = time_case(op, case, case_shape, time_dtype if on_gpu else torch.float32, device, backends,
                               use_compile and (i == 0 or args.compile_all))
            report["timings"].append(timing)
            print(f"time  {op.name:20s} {case:34s} " + "  ".join(
                f"{k} {v['train_ms']:.3f} ms" for k, v in timing["impls"].items()), flush=True)
    report["sdpa_backend_d300_bf16"] = sdpa_backend_at(300, torch.bfloat16, device)
    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-") + "-" + report["date"]
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(text)
    failed = [c for c in report["checks"] if not c["passed"]]
    print(f"{len(report['checks'])} checks, {len(failed)} failed; reports in {out / stem}.json and .md")
    return 1 if failed else 0


def main(argv=None):
    from . import _cli

    return _cli.main("python -m zslfast gpucheck", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
