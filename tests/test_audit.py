"""The GPU audit (python -m zslfast audit) and the GPU self-test (python -m zslfast gpucheck), on a machine without
a GPU: the audit compiles real kernels for sm_90 through triton's own ptxas; gpucheck runs its whole pipeline on
CPU tensors at tiny shapes."""

import json

import pytest
import torch

from zslfast import _backend

from helpers import require_backend

triton = pytest.importorskip("triton")
audit = pytest.importorskip("zslfast.tools.audit")
from zslfast.triton import _launch, prototype_scores as ps_kernels  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    _backend.why_unavailable("triton", torch.device("cpu")) is not None,
    reason=str(_backend.why_unavailable("triton", torch.device("cpu"))),
)


needs_compiler = pytest.mark.skipif(audit.compiler_problem() is not None, reason=str(audit.compiler_problem()))


@needs_interpreter
def test_launchers_run_what_the_planners_plan(monkeypatch):
    """The audit's launches are the launcher's: same kernel, grid and constants as a real call at the same shape."""
    launched = []
    original = _launch.Launch.__call__

    def record(self):
        launched.append((self.name, tuple(self.grid), tuple(sorted((k, str(v)) for k, v in self.constexprs.items()))))
        return original(self)

    monkeypatch.setattr(_launch.Launch, "__call__", record)
    B, C, K = 9, 130, 33
    e, s, w = torch.randn(B, K), torch.randn(C, K), torch.randn(B, C, K)
    ps_kernels.backward(torch.randn(B, C), e, s, w, (True, True, True))
    meta = [t.to("meta") for t in (torch.empty(B, C), e, s, w)]
    planned = [(st.name, tuple(st.grid), tuple(sorted((k, str(v)) for k, v in st.constexprs.items())))
               for st in ps_kernels.plan_backward(*meta, (True, True, True))[1] if isinstance(st, _launch.Launch)]
    assert launched == planned and planned[0][1][2] > 1  # the batch is split: more than one chunk


def test_backward_fills_the_gpu_at_the_papers_shapes():
    """prototype_scores' backward cuts the batch so that CUB and SUN launch at least one CTA per H200 SM."""
    for B, C, K in [(50, 200, 312), (64, 717, 102), (256, 1000, 312)]:
        meta = [torch.empty(*shape, device="meta") for shape in ((B, C), (B, K), (C, K), (B, C, K))]
        launch = ps_kernels.plan_backward(*meta, (True, True, True))[1][0]
        ctas = launch.grid[0] * launch.grid[1] * launch.grid[2]
        assert ctas >= audit.SMS, (B, C, K, launch.grid)


def test_every_configuration_row_is_audited(monkeypatch):
    """Each row of attribute_attention's launch table configures some launch of the audit's plan (its cases x
    dtypes, tf32 included, x variants), so the audit compiles it: a row no launch there picks was never checked for
    spills."""
    from zslfast.triton.attribute_attention import config

    picked = set()
    original = config.matching_row

    def record(kernel, block_r, found):
        row = original(kernel, block_r, found)
        picked.add(config.TABLE.index(row))
        return row

    monkeypatch.setattr(config, "matching_row", record)
    for shape in audit.CASES["attribute_attention"][1].values():
        for dtype_name in audit.DTYPES:
            audit.planned("attribute_attention", shape, dtype_name)
    unused = [f"{' '.join(row.kernels)} {row.r_tile} {sorted(row.when)}" for index, row in enumerate(config.TABLE)
              if index not in picked]
    assert not unused, unused


def test_signature_follows_triton_specialisation():
    e = torch.empty(4, 16, device="meta")
    launch = ps_kernels.plan_forward(e, torch.empty(8, 16, device="meta"), torch.empty(4, 8, 16, device="meta"))[1][0]
    signature, constexprs, attrs = audit._signature(launch)
    assert signature["e_ptr"] == "*fp32" and signature["C"] == "i32"
    assert signature["stride_ek"] == "constexpr" and constexprs["stride_ek"] == 1  # unit stride: a constant
    assert [["tt.divisibility", 16]] in attrs.values()  # K = 16 and the 16-byte-aligned pointers


def test_occupancy_arithmetic():
    assert audit.occupancy(90, 32, 0, 4) == (16, 1.0)  # thread-limited: 16 CTAs x 128 threads
    assert audit.occupancy(90, 255, 0, 4)[0] == 2  # 256 registers x 128 threads = half the register file each
    assert audit.occupancy(80, 64, 100_000, 4)[0] == 1  # shared-memory-limited


@needs_compiler
def test_audit_compiles_and_reports(tmp_path):
    """One op at one shape for sm_90, fp32 and bf16: compiles with no spills, within 7/8 of its registers, and
    writes its reports."""
    md, js = tmp_path / "audit.md", tmp_path / "audit.json"
    code = audit.main(["--ops", "prototype_scores", "--cases", "CUB", "--archs", "90", "--dtypes", "fp32", "bf16",
                       "--headroom", "0.875", "--markdown", str(md), "--json", str(js)])
    rows = json.loads(js.read_text())["triton"]
    assert code == 0 and len(rows) == 4
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 and not r["problems"] for r in rows)
    assert "prototype_scores | CUB B=50 C=200 K=312 | bf16 | backward | _backward_kernel | sm_90" in md.read_text()


@needs_compiler
def test_headroom_compiles_again_within_a_fraction_of_the_register_ceiling(tmp_path):
    """--headroom: a launch using more than the fraction of its register ceiling (255 per thread at 8 warps, 128 at
    16) is compiled again within it, and spills there are a problem (exit 1)."""
    js = tmp_path / "audit.json"
    code = audit.main(["--ops", "prototype_scores", "--cases", "CUB", "--archs", "90", "--dtypes", "fp32",
                       "--headroom", "0.1", "--json", str(js)])
    rows = json.loads(js.read_text())["triton"]
    assert code == 1 and len(rows) == 2
    ceilings = {r["kernel"]: 255 if r["num_warps"] <= 8 else 128 for r in rows}
    assert all(r["spill_bytes"] == 0 and r["problems"][0].endswith(f"(0.1 of its {ceilings[r['kernel']]}): no headroom")
               for r in rows)


def test_audit_flags_an_underfilled_memory_bound_launch():
    """A launch that moves 100 MB with 4 CTAs is a finding; the same grid over a few KB is below launch latency."""
    big = ps_kernels.plan_forward(*(torch.empty(*s, device="meta") for s in ((4, 200_000), (16, 200_000),
                                                                              (4, 16, 200_000))))[1][0]
    row = audit.audit_launch("prototype_scores", "toy", "fp32", "forward", big, 90, compile=False)
    assert row.problems == ["memory-bound with 4 CTAs on 132 SMs"], row
    small = ps_kernels.plan_forward(*(torch.empty(*s, device="meta") for s in ((4, 64), (16, 64), (4, 16, 64))))[1][0]
    row = audit.audit_launch("prototype_scores", "toy", "fp32", "forward", small, 90, compile=False)
    assert not row.problems and "cannot matter" in row.notes[0]


def _some_kernel_backend():
    """gpucheck on CPU checks the "cpu" and the interpreted "triton" backends: skip when neither can run."""
    reasons = [_backend.why_unavailable(b, torch.device("cpu")) for b in ("cpu", "triton")]
    if all(reasons):
        require_backend("cpu")  # skips with the extension's reason; where CI requires it, the test runs and fails


def test_gpucheck_pipeline_on_cpu(tmp_path):
    """gpucheck on CPU tensors at tiny shapes: every check passes and both reports are written."""
    from zslfast.tools import gpucheck

    _some_kernel_backend()
    code = gpucheck.main(["--out", str(tmp_path)])
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert code == 0 and report["checks"] and all(c["passed"] for c in report["checks"])
    assert {c["op"] for c in report["checks"]} == {op.name for op in gpucheck.OPS}
    assert {t["op"] for t in report["timings"]} == {op.name for op in gpucheck.OPS}
    assert (tmp_path / report_path.name.replace(".json", ".md")).exists()


def test_gpucheck_catches_a_wrong_kernel(tmp_path, monkeypatch):
    """A kernel off by 1e-3 fails its check and the command's exit status."""
    import dataclasses

    from zslfast.tools import gpucheck

    _some_kernel_backend()
    real = next(op for op in gpucheck.OPS if op.name == "prototype_scores")
    wrong = dataclasses.replace(real, fused=lambda *a, **k: real.fused(*a, **k) * 1.001)
    monkeypatch.setattr(gpucheck, "OPS", [wrong if op is real else op for op in gpucheck.OPS])
    assert gpucheck.main(["--out", str(tmp_path), "--ops", "prototype_scores", "--no-timing"]) == 1


@pytest.mark.parametrize("units, tiles, programs, granule", [(50, 35, 264, 1), (64, 4, 132, 1), (197, 64, 264, 16),
                                                            (577, 16, 264, 32), (3, 500, 264, 1), (1, 1, 264, 1)])
def test_split_reaches_the_programs_it_can(units, tiles, programs, granule):
    """One rule cuts a batch or rows into fixed chunks: whole granules, every unit covered once, and at least the
    programs asked for wherever the units allow it."""
    from zslfast.triton._common import split

    chunks, per = split(units, tiles, programs, granule)
    assert per % granule == 0 and (chunks - 1) * per < units <= chunks * per
    assert chunks * tiles >= programs or chunks == -(-units // granule)
