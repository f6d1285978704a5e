"""python -m zslfast: info, bench and demo run end to end (tiny settings) and print what they promise."""

import pytest

from zslfast.__main__ import main

from conftest import require_backend


def test_info(capsys):
    main([])
    out = capsys.readouterr().out
    assert "backends for cpu tensors" in out and "reference" in out


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2 and "demo" in capsys.readouterr().out


def test_bench_one_case(capsys):
    main(["bench", "--only", "prototype_scores AwA2", "--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prototype_scores AwA2")]
    assert len(lines) == 1 and lines[0].rstrip().split()[-3].endswith("x")


def test_demo_tiny(capsys):
    from zslfast.demo import main as demo

    require_backend("cpu")  # the demo refuses to compare the reference with itself
    results = demo(["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "6", "--regions", "3", "--hidden-dim", "4"])
    out = capsys.readouterr().out
    assert "speed-up" in out and "U / S / H" in out
    assert results["lockstep_max_rel_diff"] < 1e-5  # fused and reference losses at the same weights, float32
    for name in ("reference", "fused"):
        assert len(results[name]["losses"]) == 2 and 0.0 <= results[name]["gzsl"].h <= 1.0
    assert results["reference"]["losses"][0] == pytest.approx(results["fused"]["losses"][0], rel=1e-5)


def test_demo_sage_tiny(capsys):
    from zslfast.demo import main as demo

    require_backend("cpu")
    results = demo(["--model", "sage", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "6",
                    "--patches", "4", "--embed-dim", "8", "--hidden-dim", "4"])
    out = capsys.readouterr().out
    assert "model: SAGE" in out and "speed-up" in out and "U / S / H" in out
    assert results["lockstep_max_rel_diff"] < 1e-5
    for name in ("reference", "fused"):
        assert len(results[name]["losses"]) == 2 and 0.0 <= results[name]["gzsl"].h <= 1.0
    assert results["reference"]["losses"][0] == pytest.approx(results["fused"]["losses"][0], rel=1e-5)


def test_demo_refuses_reference_against_reference(monkeypatch):
    """With the fused ops resolving to the reference (here: ZSLFAST_BACKEND=reference), the demo says so and stops
    instead of printing a "fused" row that is the reference again."""
    from zslfast.demo import main as demo

    monkeypatch.setenv("ZSLFAST_BACKEND", "reference")
    with pytest.raises(SystemExit, match="would compare the reference with itself"):
        demo(["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4"])
