"""benchmarks/report.py (the rows of the benchmark session's summary, summarize.py and plot.py) and
benchmarks/plot.py on a small synthetic pytest-benchmark JSON: speed-ups, memory, labels, one PNG per op.

The report code is benchmark tooling, not part of the zslfast package, so it stays in benchmarks/ and is imported
from there (benchmarks/ has no __init__.py; pytest puts it on sys.path the same way when it runs the benchmarks).
"""

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import report  # noqa: E402

sys.path.remove(BENCHMARKS)


def result(test, params, group, median_ms, peak=None, saved=None):
    extra = {"device": "cpu", "torch": "2.15.0"}
    if peak is not None:
        extra["peak_extra_MiB"] = peak
    if saved is not None:
        extra["saved_MiB"] = saved
    return {"group": group, "name": f"{test}[{params}]", "stats": {"median": median_ms / 1e3}, "extra_info": extra}


def synthetic():
    att = "attribute_attention CUB B,K,R,D,Dv=(64, 312, 49, 300, 300) fwd+bwd cpu"
    bank = "memory_bank update fifo CUB C,M,D,K,B=(200, 3, 768, 8, 128) cpu"
    ilpg = "ILPG training step CUB B,C,K=(50, 200, 312) R=49 cpu"
    benchmarks = [
        result("test_attribute_attention", "CUB-fwd+bwd-eager", att, 100.0, 72.0, 70.0),
        result("test_attribute_attention", "CUB-fwd+bwd-compile", att, 40.0, 27.0, 26.0),
        result("test_attribute_attention", "CUB-fwd+bwd-sdpa", att, 200.0, 99.0, 98.0),
        result("test_attribute_attention", "CUB-fwd+bwd-zslfast", att, 25.0, 23.0, 22.0),
        result("test_memory_bank_update", "CUB-fifo-loop", bank, 3.0, 0.0),
        result("test_memory_bank_update", "CUB-fifo-eager", bank, 0.2, 1.0),
        result("test_memory_bank_update", "CUB-fifo-compile", bank, 0.4, 0.0),
        result("test_memory_bank_update", "CUB-fifo-zslfast", bank, 0.05, 0.0),
        result("test_ilpg_training_step", "CUB-eager", ilpg, 400.0, 130.0),
        result("test_ilpg_training_step", "CUB-compile", ilpg, 300.0, 90.0),
        result("test_ilpg_training_step", "CUB-zslfast", ilpg, 200.0, 80.0),
        result("test_ilpg_training_step", "CUB-zslfast+compile", ilpg, 150.0, 70.0),
    ]
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}}, "datetime": "2026-11-29T12:00:00",
            "benchmarks": benchmarks}


def test_rows_speedups_and_memory():
    rows = report.group_rows(synthetic()["benchmarks"])
    assert [(r.op, r.label) for r in rows] == [("attribute_attention", "CUB fwd+bwd"), ("memory_bank", "update fifo CUB"),
                                               ("ILPG", "training step CUB")]
    att, bank, ilpg = rows
    assert att.speedup("eager") == pytest.approx(4.0) and att.speedup("compile") == pytest.approx(1.6)
    assert att.speedup("sdpa") == pytest.approx(8.0) and att.others == ["sdpa"]
    assert att.peak == {"eager": 72.0, "compile": 27.0, "sdpa": 99.0, "zslfast": 23.0}
    assert att.saved["zslfast"] == 22.0 and bank.saved["eager"] is None
    assert bank.speedup("eager") == pytest.approx(4.0) and bank.speedup("compile") == pytest.approx(8.0)
    assert bank.speedup("loop") == pytest.approx(60.0)
    assert ilpg.compiled_gain() == pytest.approx(2.0) and ilpg.others == [] and att.compiled_gain() is None


def test_summary_table_is_compact():
    lines = report.summary_table(report.group_rows(synthetic()["benchmarks"]))
    assert max(len(line) for line in lines) <= 110
    text = "\n".join(lines)
    assert "4.00x" in text and "1.60x" in text and "8.00x" in text  # vs eager / compile at CUB, vs compile (bank)
    assert "72/27/23" in text and "70/26/22" in text  # peak and saved MiB, eager/compile/zslfast
    assert "sdpa 200 ms (8.00x)" in text and "loop 3 ms (60.00x)" in text
    assert "zslfast+compile 150 ms, 2.00x compile's speed, peak 70 MiB" in text


def test_machine_title():
    assert report.machine(synthetic()) == "Test CPU, 2 cores, CPU tensors, torch 2.15.0, 2026-11-29"


def test_plot_writes_one_png_per_op(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, BENCHMARKS)
    try:
        import plot
    finally:
        sys.path.remove(BENCHMARKS)
    paths = plot.plot_results(synthetic(), str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["attribute_attention.png", "memory_bank.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_step_updates_the_weights_its_forward_reads():
    """A compiled step must update the compiled model's own weights: the forward of another module is refused
    (bench_ilpg once timed torch.compile of a copy while the optimiser held the original's parameters)."""
    import copy

    import torch

    from zslfast.tools import timing

    model = torch.nn.Linear(2, 2)
    timing.training_step(model, {}, model)  # the model itself: fine
    with pytest.raises(ValueError, match="forward must be model or torch.compile"):
        timing.training_step(model, {}, copy.deepcopy(model))
