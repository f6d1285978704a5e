"""``python -m zslfast audit``: what every GPU kernel of zslfast costs on a real SM, found without a GPU.

For each op at the papers' shapes (CUB, SUN, AwA2, ViT-B N=197/577) and its large ones (a 21K-class head, batch
256): the GPU shapes of its record (zslfast.testing), the cases every benchmark times; and each dtype it supports on
a GPU (fp32, bf16, fp16, and tf32: fp32 under torch's allow_tf32, for the launches whose products then run on
tensor cores), the audit runs the record's plan, which builds the inputs as meta tensors and asks the op's own
Triton planners (zslfast/triton/*: ``plan_forward`` / ``plan_backward``) for their launches, and compiles
each launch exactly as configured (grid, constants, num_warps, num_stages, register budget) for sm_80 and sm_90 with
the installed triton and its own ptxas. Resource usage comes from the cubin (triton's bundled ``cuobjdump
--dump-resource-usage``); the CUDA C++ kernels of the built extension are read the same way.

Per kernel x shape x dtype x arch it reports registers per thread, spills, shared memory, theoretical occupancy,
CTAs and waves on the H200's 132 SMs, the bytes that must move and the FLOPs, and the roofline floor at the H200's
4.3 TB/s (measured copy bandwidth) and its matrix/vector rates. **The floor is a model**, never a measurement.

It exits non-zero on a compile error, shared memory over the architecture's limit, any register spill, or a
bandwidth-bound launch that fills fewer CTAs than SMs, unless its floor is below one launch's latency (then
the fill cannot matter, and the table says so).
With ``--headroom FRACTION`` each launch that uses more than that fraction of its register ceiling (its register
budget, else the hardware's 255 per thread, 128 at 16 warps) is compiled again within that fraction, and a spill
there is a problem too: room for a later triton's code to grow before the launch spills.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..testing import RECORDS, VARIANT_MARK
from ..triton._common import H200_SMS as SMS

BANDWIDTH = 4.3e12  # bytes/s, H200 copy bandwidth measured on the lent machine (H200.md / KINDS.md)
# FLOP/s by the audit's dtype names: bf16/fp16 is the measured dense matrix rate; fp32 (plain FMA, tl.dot in "ieee"
# precision, as zslfast launches it by default) the datasheet's vector rate, tf32 its dense tensor-core rate (989
# with sparsity): leads, not measurements.
PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "tf32": 494e12, "fp32": 67e12, "fp64": 34e12}
LAUNCH_LATENCY_US = 5.0  # below this floor a kernel's time is its launch, whatever its grid
ARCHS = {
    # arch: (registers per SM, max threads per SM, max CTAs per SM, shared memory per SM, max per CTA) in bytes
    80: (65536, 2048, 32, 167936, 166912),
    90: (65536, 2048, 32, 233472, 232448),
}
# tf32: fp32 inputs with torch's allow_tf32 set (torch.set_float32_matmul_precision("high")), under which the
# kernels' fp32 products run on tensor cores, another register layout: audited where a launch has such products.
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPE_NAMES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


# ------------------------------------------------------------------------------------------------- the cases
# op -> (its record's plan, {case: shape}) of every record with a Triton plan, at the GPU shapes of its cases: the
# papers' shapes first, where the fill rule applies, then the large ones (LARGE_CASES), where it does not.
CASES = {op.name: (op.plan, {case.label(): case.shape for case in op.shapes.cases.values()})
         for op in RECORDS.values() if op.plan is not None}
LARGE_CASES = {case.label() for op in RECORDS.values() if op.plan is not None for case in op.shapes.cases.values()
               if case.large}


# ---------------------------------------------------------------------------------------------- compiling
@dataclass
class Row:
    op: str
    case: str
    dtype: str
    pass_name: str
    kernel: str
    arch: int
    grid: List[int]
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # the launch's register budget (maxnreg), None: ptxas's choice
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    ctas_per_sm: Optional[int] = None
    occupancy: Optional[float] = None
    ctas: int = 0
    waves: float = 0.0
    bytes: int = 0
    flops: float = 0.0
    floor_us: float = 0.0
    bound: str = ""
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _signature(launch):
    """(signature, constexprs, attrs) as triton's launcher would specialise this launch's arguments."""
    kernel = launch.kernel
    runtime = [name for name in kernel.arg_names if name not in launch.constexprs]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{launch.name}: {len(launch.args)} arguments for parameters {runtime}")
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    values = dict(zip(runtime, launch.args))
    for index, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
            if (value.storage_offset() * value.element_size()) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # triton specialises the integer 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            raise TypeError(f"{launch.name}: argument {name} of type {type(value).__name__}")
    return signature, constexprs, attrs


def compiler_problem() -> Optional[str]:
    """Why the installed triton cannot compile for a GPU target here, or None."""
    try:
        import inspect

        import triton
        from triton.compiler import ASTSource
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return (f"triton {triton.__version__}'s compiler takes index-keyed signatures; the audit uses the name-keyed "
                "ASTSource of newer triton (tested: 3.6, 3.9)")
    if _cuobjdump() is None:
        return NO_CUOBJDUMP
    return None


NO_CUOBJDUMP = "no cuobjdump: neither triton's bundled one nor $CUDA_HOME/bin/cuobjdump"


def _cuobjdump() -> Optional[str]:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return str(Path(home) / "bin" / "cuobjdump") if (Path(home) / "bin" / "cuobjdump").exists() else None


RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(binary: bytes, suffix: str = ".cubin") -> List[tuple]:
    """[(function, registers, stack, static shared, local)] of a cubin or fat binary."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError(NO_CUOBJDUMP)
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(binary)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return [(m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in RESOURCE.findall(text)]


_compiled: Dict[tuple, tuple] = {}


def _compile(launch, arch: int, maxnreg: Optional[int] = None):
    """(registers, spill bytes, shared bytes) of the launch compiled for sm_<arch> (within maxnreg registers, else
    its own budget); cached per specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    maxnreg = maxnreg or launch.maxnreg
    key = (launch.name, arch, _signature_key(launch), maxnreg)
    if key not in _compiled:
        signature, constexprs, attrs = _signature(launch)
        target = GPUTarget("cuda", arch, 32)
        budget = {} if maxnreg is None else {"maxnreg": maxnreg}
        options = triton.compiler.make_backend(target).parse_options(
            {"num_warps": launch.num_warps, "num_stages": launch.num_stages, **budget})
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        if os.environ.get("ZSLFAST_AUDIT_VERBOSE") == "1":
            print(f"compiled {launch.name} sm_{arch} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        (_, registers, stack, static_shared, local), = _resource_usage(compiled.asm["cubin"])
        _compiled[key] = (registers, stack + local, compiled.metadata.shared + static_shared)
    return _compiled[key]


def occupancy(arch: int, registers: int, shared: int, num_warps: int):
    """(CTAs per SM, fraction of the SM's warp slots) from registers, shared memory and thread limits."""
    regs_per_sm, threads_per_sm, ctas_limit, shared_per_sm, _ = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared + 1024) if shared else ctas_limit  # 1 KiB reserved per CTA
    ctas = max(0, min(by_regs, by_threads, by_shared, ctas_limit))
    return ctas, ctas * num_warps * 32 / threads_per_sm


def register_ceiling(launch) -> int:
    """The registers per thread a launch may use: its budget, else the hardware's (64 K per SM, 255 at most)."""
    return launch.maxnreg or min(255, 65536 // (32 * launch.num_warps))


def audit_launch(op, case, dtype_name, pass_name, launch, arch, compile: bool = True,
                 headroom: Optional[float] = None) -> Row:
    """The row of one launch: its traffic model and fill, and (when compile) its resources on sm_<arch>; with
    headroom, whether it still compiles without spills within that fraction of its register ceiling."""
    ctas = math.prod(int(g) for g in launch.grid)
    row = Row(op, case, dtype_name, pass_name, launch.name + (f" ({launch.label})" if launch.label else ""), arch,
              [int(g) for g in launch.grid], launch.num_warps, launch.num_stages, launch.maxnreg, ctas=ctas,
              bytes=launch.bytes_moved(), flops=float(launch.flops))
    memory_s, compute_s = row.bytes / BANDWIDTH, row.flops / PEAK_FLOPS[dtype_name]
    row.floor_us = 1e6 * max(memory_s, compute_s)
    row.bound = "memory" if memory_s >= compute_s else "compute"
    if compile:
        try:
            row.registers, row.spill_bytes, row.shared_bytes = _compile(launch, arch)
        except Exception as exc:  # noqa: BLE001 - any compiler failure is a finding, reported with its message
            row.problems.append(f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
            return row
        row.ctas_per_sm, row.occupancy = occupancy(arch, row.registers, row.shared_bytes, launch.num_warps)
        row.waves = ctas / (max(row.ctas_per_sm, 1) * SMS)
        if row.shared_bytes > ARCHS[arch][4]:
            row.problems.append(f"shared memory {row.shared_bytes} B over sm_{arch}'s {ARCHS[arch][4]} B per CTA")
        if row.spill_bytes:
            row.problems.append(f"{row.spill_bytes} B of register spills")
        elif headroom is not None:
            ceiling = register_ceiling(launch)
            within = int(ceiling * headroom) // 8 * 8
            if row.registers > within:
                spill = _compile(launch, arch, within)[1]
                if spill:
                    row.problems.append(f"{spill} B of register spills within {within} registers ({headroom:g} of "
                                        f"its {ceiling}): no headroom")
        if row.ctas_per_sm == 0:
            row.problems.append("no CTA fits on an SM")
    if row.bound == "memory" and ctas < SMS and case not in LARGE_CASES:
        if row.floor_us < LAUNCH_LATENCY_US:
            row.notes.append(f"{ctas} CTAs < {SMS} SMs, but the floor {row.floor_us:.2f} us is below a launch's "
                             f"~{LAUNCH_LATENCY_US:.0f} us: the fill cannot matter")
        else:
            row.problems.append(f"memory-bound with {ctas} CTAs on {SMS} SMs")
    return row


def selected_cases(ops=None, cases=None) -> list:
    """(op, case, shape) of CASES whose op is in ``ops`` and whose name contains one of ``cases`` (None: all)."""
    return [(op, case, shape) for op, (_, shapes) in CASES.items() if not ops or op in ops
            for case, shape in shapes.items() if not cases or any(c in case for c in cases)]


def planned(op: str, shape, dtype_name: str):
    """[(pass, steps)] of ``op``'s audit plan at ``shape`` in the audit's dtype ``dtype_name``: tf32 plans fp32
    inputs with torch's allow_tf32 set, and keeps only the launches whose products then run on tensor cores."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        passes = list(CASES[op][0](*shape, DTYPES[dtype_name]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    if dtype_name == "tf32":
        passes = [(name, [launch for launch in _launches(steps) if launch.constexprs.get("DOT_PRECISION") == "tf32"])
                  for name, steps in passes]
    return [(name, steps) for name, steps in passes if _launches(steps)]


def audit_triton(ops=None, archs=(80, 90), dtypes=tuple(DTYPES), cases=None, headroom=None) -> List[Row]:
    rows = []
    for op, case, shape in selected_cases(ops, cases):
        for dtype_name in dtypes:
            for pass_name, steps in planned(op, shape, dtype_name):
                # glue between launches (fixed-order sums) is plain torch ops; identical launches (the
                # rollout's per-layer steps) are audited once and counted
                launches, counts = {}, {}
                for launch in _launches(steps):
                    key = (launch.name, tuple(launch.grid), _signature_key(launch))
                    launches.setdefault(key, launch)
                    counts[key] = counts.get(key, 0) + 1
                for key, launch in launches.items():
                    for arch in archs:
                        row = audit_launch(op, case, dtype_name, pass_name, launch, arch, headroom=headroom)
                        if counts[key] > 1:
                            row.kernel = f"{launch.name} x{counts[key]}"
                        rows.append(row)
    return rows


def _launches(steps):
    """The kernel launches among a planner's steps (the rest is glue: fixed-order sums in torch)."""
    from ..triton._launch import Launch

    return [step for step in steps if isinstance(step, Launch)]


def traffic(op: str, shape, dtype) -> dict:
    """{pass: (bytes, FLOPs)} of ``op`` at ``shape``: its launches' sums, the model gpucheck measures against (the
    default options' passes: the variants compiled besides them, named "pass [variant]", are left out)."""
    return {pass_name: (sum(l.bytes_moved() for l in _launches(steps)), sum(l.flops for l in _launches(steps)))
            for pass_name, steps in CASES[op][0](*shape, dtype) if VARIANT_MARK not in pass_name}


def _signature_key(launch):
    signature, constexprs, attrs = _signature(launch)
    return (tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()), tuple(sorted(attrs)),
            launch.num_warps, launch.num_stages, launch.maxnreg)


def audit_cuda_extension() -> List[dict]:
    """Registers, spills and shared memory of the CUDA C++ kernels in zslfast._C, per architecture built."""
    from .. import _backend

    if not _backend.HAS_CUDA_KERNELS:
        return []
    import importlib

    path = importlib.import_module("zslfast._C").__file__
    tool = _cuobjdump()
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found, arch, function = [], None, None
    for line in text.splitlines():
        if re.search(r"arch = sm_(\d+)", line):
            arch = int(re.search(r"arch = sm_(\d+)", line).group(1))
        if re.search(r"Function (\S+):", line):
            function = re.search(r"Function (\S+):", line).group(1)
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if usage:
            found.append((function, arch, *(int(x) for x in usage.groups())))
    names = subprocess.run(["c++filt"], input="\n".join(f[0] for f in found), capture_output=True,
                           text=True).stdout.splitlines()
    out = []
    for (mangled, arch, regs, stack, shared, local), name in zip(found, names + [None] * len(found)):
        name = (name or mangled).replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
        out.append(dict(kernel=name, arch=arch, registers=regs, spill_bytes=stack + local, shared_bytes=shared,
                        problems=[f"{stack + local} B of register spills"] if stack + local else []))
    return out


# ------------------------------------------------------------------------------------------------ reports
def _fmt_row(r: Row) -> str:
    occ = f"{100 * r.occupancy:.0f}%" if r.occupancy is not None else "-"
    status = "; ".join(r.problems) if r.problems else ("ok; " + "; ".join(r.notes) if r.notes else "ok")
    budget = f" <={r.max_registers} regs" if r.max_registers else ""
    return (f"| {r.op} | {r.case} | {r.dtype} | {r.pass_name} | {r.kernel} | sm_{r.arch} | {r.registers} | "
            f"{r.spill_bytes} | {r.shared_bytes} | {r.num_warps}/{r.num_stages}{budget} | {occ} | {r.ctas} | "
            f"{r.waves:.2f} | {r.bytes / 1e6:.2f} | {r.flops / 1e9:.3f} | {r.floor_us:.2f} ({r.bound}) | {status} |")


HEADER = ("| op | case | dtype | pass | kernel | arch | regs | spill B | smem B | warps/stages | occupancy | CTAs | "
          "waves (132 SMs) | MB moved | GFLOP | floor us (model) | status |\n" + "|---" * 17 + "|")


def markdown(rows: List[Row], cuda_rows: List[dict], versions: str) -> str:
    lines = [
        "# GPU audit (generated by `python -m zslfast audit --markdown benchmarks/gpu_audit.md`; only the "
        "hand-written section at the end is edited by hand)", "",
        f"Compiled on a machine without a GPU: {versions}. Registers, spills and shared memory are read from the "
        "cubins; occupancy is theoretical; waves count CTAs over 132 SMs (H200) at that occupancy.",
        f"**The floor is a model**: max(bytes / {BANDWIDTH / 1e12:.1f} TB/s, FLOPs / peak) with peaks "
        + ", ".join(f"{name} {v / 1e12:.0f} TFLOP/s" for name, v in PEAK_FLOPS.items())
        + " (4.3 TB/s and the bf16 rate measured on an H200 here; tf32/fp32/fp64 from the datasheet). Bytes count "
        "each tensor argument once. Nothing here is a GPU measurement.",
        "Not Triton, so not in the first table: prototype_scores with w None/(B, K) and prototype_scores_factored "
        "(the 21K-class case) are torch GEMMs (cuBLAS); MemoryBank.update/refresh run the CUDA C++ kernels listed "
        "last.", "",
        "## Triton kernels", "", HEADER,
    ]
    lines += [_fmt_row(r) for r in rows]
    if cuda_rows:
        lines += ["", "## CUDA C++ kernels (zslfast._C)", "", "| kernel | arch | regs | spill B | static smem B | status |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| `{r['kernel']}` | sm_{r['arch']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                  f"{'; '.join(r['problems']) or 'ok'} |" for r in cuda_rows]
    return "\n".join(lines) + "\n"


# The markdown report keeps everything after this line of the file it replaces: the hand-written log of what each
# change to a kernel did to the figures above.
CHANGES_MARKER = "<!-- hand-written below: kept when the report is regenerated -->"


def versions() -> str:
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}"


def _interpreted() -> bool:
    from .._backend import triton_interpreted

    return triton_interpreted()


DESCRIPTION = """\
Compile every Triton kernel launch of zslfast at the papers' shapes, exactly as configured, for sm_80 and sm_90
with the installed triton, without a GPU; read registers, spills and shared memory from the cubins, and print
occupancy, waves on the H200's 132 SMs and the roofline floor (a model, never a measurement). The CUDA C++
kernels of the built extension are read the same way. Exits 1 on a compile error, a spill, shared memory over
the limit or an under-filled bandwidth-bound launch."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import matching, output_file, positive_float

    parser.add_argument("--ops", nargs="+", choices=list(CASES), metavar="OP",
                        help=f"only these ops (default: all of {', '.join(CASES)})")
    parser.add_argument("--cases", nargs="+", metavar="TEXT",
                        type=matching(list(dict.fromkeys(case for _, case, _ in selected_cases())), "case"),
                        help="only cases whose name contains one of these")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=sorted(ARCHS))
    parser.add_argument("--headroom", metavar="FRACTION", type=positive_float,
                        help="also compile each launch that uses more than this fraction of its register ceiling "
                             "(e.g. 0.875) within it; a spill there is a problem")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", metavar="PATH", type=output_file,
                        help="also write the markdown report to this file")


def _argv(args: argparse.Namespace) -> List[str]:
    """The command line that gives ``args`` again (for the rerun without the interpreter)."""
    argv = []
    for option in ("ops", "cases", "dtypes", "archs", "headroom"):
        if getattr(args, option) is not None:
            value = getattr(args, option)
            argv += [f"--{option}", *map(str, value if isinstance(value, list) else [value])]
    for option in ("json", "markdown"):
        if getattr(args, option):
            argv += [f"--{option}", getattr(args, option)]
    return argv


def run(args: argparse.Namespace) -> int:
    from ._cli import UsageError

    if not selected_cases(args.ops, args.cases):
        raise UsageError(f"--cases {' '.join(args.cases)} matches no case of --ops {' '.join(args.ops)}; their "
                         f"cases: {', '.join(case for _, case, _ in selected_cases(args.ops))}")
    if _interpreted():
        # Under TRITON_INTERPRET=1 @triton.jit makes interpreter functions, which do not compile: rerun without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "zslfast.tools.audit", *_argv(args)], env=env).returncode
    problem = compiler_problem()
    if problem:
        raise UsageError(f"cannot compile GPU kernels here: {problem}")
    start = time.perf_counter()
    rows = audit_triton(args.ops, tuple(args.archs), tuple(args.dtypes), args.cases, args.headroom)
    cuda_rows = audit_cuda_extension() if not args.ops else []
    report = markdown(rows, cuda_rows, versions())
    print(report)
    problems = [r for r in rows if r.problems] + [r for r in cuda_rows if r["problems"]]
    print(f"{len(rows)} Triton launches x archs audited, {len(cuda_rows)} CUDA C++ kernels; "
          f"{len(_compiled)} compilations in {time.perf_counter() - start:.0f} s; {len(problems)} with problems")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            dict(versions=versions(), triton=[asdict(r) for r in rows], cuda=cuda_rows), indent=1))
    if args.markdown:
        path = Path(args.markdown)
        kept = path.read_text().partition(CHANGES_MARKER)[2] if path.exists() else ""
        path.write_text(report + ("\n" + CHANGES_MARKER + kept if kept else ""))
    for r in problems:
        print("PROBLEM:", r.op if isinstance(r, Row) else r["kernel"], getattr(r, "case", ""),
              getattr(r, "dtype", ""), getattr(r, "kernel", ""), r.problems if isinstance(r, Row) else r["problems"],
              file=sys.stderr)
    return 1 if problems else 0


def main(argv=None):
    from . import _cli

    return _cli.main("python -m zslfast audit", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
