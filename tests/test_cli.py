"""python -m zslfast: info, bench and demo run end to end (tiny settings) and print what they promise."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import zslfast
from zslfast.tools import _cli
from zslfast.__main__ import COMMANDS, main

from helpers import require_backend


def test_info(capsys):
    main([])
    out = capsys.readouterr().out
    assert "backends for cpu tensors" in out and "reference" in out


def test_unknown_command_is_one_line_with_exit_2():
    """End to end, as a user types it: one line on stderr naming the command and the closest one, exit code 2."""
    # (-W: where the extension was built for another torch, `import zslfast` warns so first; not the CLI's output)
    result = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-m", "zslfast", "benchh"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unknown command 'benchh'; did you mean 'bench'?" in result.stderr


# Tiny settings: were a bad value ever let through again, the demo would stop in seconds (and fail the test).
TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4", "--regions", "2", "--hidden-dim", "4",
        "--embed-dim", "8", "--patches", "4"]
NO_PROC = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--data", "{missing}"], "no such folder"),
    (["demo", "--data", "{empty}"], "not an xlsa17 dataset folder (no res101.mat and no att_splits.mat"),
    (["demo", "--preset", "ImageNet"], "argument --preset: invalid choice: 'ImageNet'"),
    (["demo", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["demo", "--epochs", "1.5"], "argument --epochs: must be a whole number, got '1.5'"),
    (["demo", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["demo", *TINY, "--lr", "-1"], "argument --lr: must be a finite number >= 0, got '-1'"),
    (["demo", *TINY, "--lr", "nan"], "argument --lr: must be a finite number >= 0, got 'nan'"),
    (["demo", *TINY, "--lr", "inf"], "argument --lr: must be a finite number >= 0, got 'inf'"),
    (["demo", *TINY, "--seed", "-1"], "argument --seed: must be in 0..4294967295, got -1"),
    (["demo", *TINY, "--seed", "99999999999999999999999"], "argument --seed: must be in 0..4294967295"),
    (["demo", *TINY, "--model", "sage", "--patches", "50"], "--patches 50 is not a square"),
    (["demo", *TINY, "--save", "{blocker}/x.pth"], "argument --save: {blocker}/x.pth: {blocker} is a file, not a"),
    (["demo", *TINY, "--save", "{empty}"], "argument --save: {empty} is a folder, not a file"),
    pytest.param(["demo", *TINY, "--save", "/proc/nope/x.pth"], "argument --save: /proc/nope/x.pth: /proc is not "
                 "writable", marks=NO_PROC),
    (["demo", *TINY, "--weights", "{missing}"], "argument --weights: {missing}: no such file"),
    (["bench", "--only", "no such case"], "argument --only: 'no such case' matches no case"),
    (["audit", "--ops", "X"], "argument --ops: invalid choice: 'X'"),
    (["audit", "--cases", "no such case"], "argument --cases: 'no such case' matches no case"),
    (["audit", "--ops", "cosine_logits", "--cases", "ViT"], "--cases ViT matches no case of --ops cosine_logits"),
    (["audit", "--ops", "cosine_logits", "--json", "{blocker}/rows.json"], "argument --json: {blocker}/rows.json"),
    (["gpucheck", "--out", "{empty}", "--ops", "X"], "argument --ops: invalid choice: 'X'"),
    (["gpucheck", "--out", "{empty}", "--ops", "cosine_logits", "--no-check", "--budget", "-1"],
     "argument --budget: must be a finite number > 0, got '-1'"),
    (["gpucheck", "--out", "{empty}", "--ops", "cosine_logits", "--no-check", "--budget", "nan"],
     "argument --budget: must be a finite number > 0, got 'nan'"),
    (["gpucheck", "--out", "{empty}", "--no-check", "--no-timing"], "not allowed with argument"),
    (["gpucheck", "--out", "{blocker}", "--ops", "cosine_logits", "--no-timing"], "argument --out: {blocker} is a "
     "file"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
])
def test_usage_errors_are_one_line_with_exit_2(argv, message, tmp_path, capsys):
    """One line on stderr naming the option, exit code 2, and nothing done: no output printed, no file written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    paths = dict(missing=tmp_path / "missing", empty=tmp_path, blocker=blocker)
    argv, message = [a.format(**paths) for a in argv], message.format(**paths)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert out == "" and sorted(tmp_path.rglob("*")) == before


def test_every_option_is_read_by_the_one_rule():
    """Every number of every command is read by one of zslfast.tools._cli's types, never a bare int or float (a negative
    seed, a NaN rate), or is a choice; and every default passes its own option's check."""
    loose = []
    for command, (module_name, _) in COMMANDS.items():
        parser = _cli.Parser(command)
        importlib.import_module(module_name).add_arguments(parser)
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:  # flags (--help, --compile, ...) take no value
                continue
            checked = action.choices is not None or getattr(action.type, "__module__", None) == _cli.__name__
            numeric = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
            if (action.type in (int, float) and action.choices is None) or (numeric and not checked):
                loose.append(f"{command} {action.option_strings[0]}")
            elif numeric and action.type(str(action.default)) != action.default:
                loose.append(f"{command} {action.option_strings[0]} (its default)")
    assert not loose, loose


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_demo_on_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device here" in err and err.count("\n") == 1
    assert zslfast.available_backends("cuda") == []  # nothing runs on CUDA tensors here


@pytest.mark.parametrize("command", ["train", "demo", "bench", "audit", "gpucheck", "info"])
def test_help_describes_each_command_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: python -m zslfast {command}")
    assert "``" not in out and "(default: None)" not in out  # no RST markup, no empty defaults
    if command == "demo":
        assert "(default: 5)" in out and "H ≈" not in out  # the epochs' default shown; no promised accuracy
    if command == "train":  # each recipe with its source
        assert all(source in out for source in ("ilpg: ILPG §5", "svip: SVIP §4.1", "sage: SAGE"))


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(name in out for name in ("info", "train", "demo", "bench", "audit",
                                                                        "gpucheck"))


def test_timing_conditions_warn_on_a_busy_machine(monkeypatch):
    from zslfast.tools import _cli

    monkeypatch.setattr(_cli, "_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(_cli, "_load_average", lambda: 0.1)
    assert _cli.timing_conditions(torch.device("cpu")) == "timed on cpu: 2 torch threads, 2 cores, load average 0.1 (1 min)"
    monkeypatch.setattr(_cli, "_load_average", lambda: 1.2)  # one competing process on 2 cores
    assert "WARNING: other processes keep ~1.2 of 2 cores busy" in _cli.timing_conditions(torch.device("cpu"))
    # after timing, this process's own 2 threads are part of the load: 2.3 - 2 is idle enough
    monkeypatch.setattr(_cli, "_load_average", lambda: 2.3)
    assert "WARNING" not in _cli.timing_conditions(torch.device("cpu"), busy_self=2)


def test_profiler_logs_are_filtered_and_the_rest_kept(capfd):
    """peak_cpu_bytes's profiler writes USDT/STAGE/ERROR lines and a CPUAllocator warning on stderr (C++ side);
    they go, what the measured code writes stays."""
    from zslfast.tools._memory import PROFILER_NOISE, peak_cpu_bytes

    held = [torch.randn(256, 256)]

    def measured():
        held.pop()  # frees a block allocated before the profile: the CPUAllocator warning
        sys.stderr.write("the measured code's own line\n")
        return torch.ones(1000)

    assert peak_cpu_bytes(measured) >= 4000
    err = capfd.readouterr().err
    assert "the measured code's own line" in err
    assert not any(PROFILER_NOISE.search(line) for line in err.splitlines()), err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err and "Memory block of unknown size" not in err
    for line in ("USDT:2026-11-29 13:54:05 18055:18055 SyncActivityProfilerHandler.cpp:39] profiler_start",
                 "ERROR:2026-11-29 13:54:05 18055:18055 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35",
                 "[W1129 13:54:58.407944373 CPUAllocator.cpp:245] Memory block of unknown size was allocated before "
                 "the profiling started, profiler results will not include the deallocation event"):
        assert PROFILER_NOISE.search(line)  # the pattern matches what torch 2.15 printed here


def test_bench_one_case(capsys):
    main(["bench", "--only", "prototype_scores AwA2", "--repeats", "1"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("prototype_scores AwA2")]
    assert len(lines) == 1 and lines[0].rstrip().split()[-3].endswith("x")
    assert f"{torch.get_num_threads()} torch threads" in out  # every timing print states its conditions


def test_demo_tiny(capsys):
    from zslfast.tools.demo import main as demo

    require_backend("cpu")  # the demo refuses to compare the reference with itself
    results = demo(["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "6", "--regions", "3", "--hidden-dim", "4"])
    out = capsys.readouterr().out
    assert "speed-up" in out and "U / S / H" in out
    assert results["lockstep_max_rel_diff"] < 1e-5  # fused and reference losses at the same weights, float32
    for name in ("reference", "fused"):
        assert len(results[name]["losses"]) == 2 and 0.0 <= results[name]["gzsl"].h <= 1.0
    assert results["reference"]["losses"][0] == pytest.approx(results["fused"]["losses"][0], rel=1e-5)


def test_demo_sage_tiny(capsys):
    from zslfast.tools.demo import main as demo

    require_backend("cpu")
    results = demo(["--model", "sage", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "6",
                    "--patches", "4", "--embed-dim", "8", "--hidden-dim", "4"])
    out = capsys.readouterr().out
    assert "model: SAGE" in out and "speed-up" in out and "U / S / H" in out
    assert results["lockstep_max_rel_diff"] < 1e-5
    for name in ("reference", "fused"):
        assert len(results[name]["losses"]) == 2 and 0.0 <= results[name]["gzsl"].h <= 1.0
    assert results["reference"]["losses"][0] == pytest.approx(results["fused"]["losses"][0], rel=1e-5)


def test_demo_refuses_reference_against_reference(monkeypatch, capsys):
    """With the fused ops resolving to the reference (here: ZSLFAST_BACKEND=reference), the demo says so and stops
    instead of printing a "fused" row that is the reference again."""
    from zslfast.tools.demo import main as demo

    monkeypatch.setenv("ZSLFAST_BACKEND", "reference")
    with pytest.raises(SystemExit) as exit_info:
        demo(["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4"])
    assert exit_info.value.code == 2 and "would compare the reference with itself" in capsys.readouterr().err


def test_demo_saves_and_starts_from_weights(tmp_path, capsys):
    """--save writes the fused run's trained weights; --weights starts both runs from them (with lr 0 they stay
    exactly those weights); a missing file or another model's checkpoint is a one-line error, exit 2."""
    from zslfast.tools.demo import main as demo

    require_backend("cpu")
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "6", "--regions", "3", "--hidden-dim", "4"]
    saved = tmp_path / "ilpg.pth"
    first = demo(tiny + ["--save", str(saved)])
    trained = torch.load(saved, weights_only=True)
    assert trained.keys() == first["fused"]["state_dict"].keys()
    again = demo(tiny + ["--weights", str(saved), "--lr", "0"])
    for name in ("reference", "fused"):
        state = again[name]["state_dict"]
        assert all(torch.equal(state[key], trained[key]) for key in trained)
    assert again["reference"]["losses"][0] != first["reference"]["losses"][0]  # not the random start
    capsys.readouterr()
    for weights, message in ((tmp_path / "missing.pth", "no such file"),
                             (saved, "does not match the model")):
        with pytest.raises(SystemExit) as exit_info:
            demo(tiny[:6] + ["--model", "sage", "--patches", "4", "--embed-dim", "8", "--weights", str(weights)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "--weights" in err and message in err and err.count("\n") == 1, err
