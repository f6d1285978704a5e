"""pytest-benchmark glue over zslfast.tools.bench, the one harness (its timer's synchronisation, peak and saved memory,
train step, compile cache and the shapes of every op: see zslfast/tools/bench.py).

Run: ``pytest benchmarks/ --benchmark-only`` (CUDA tensors when a GPU is visible, else CPU tensors): the quick set,
each op and each model step at one paper shape (CUB), a few rounds each (≈ 2–3 minutes on 2 CPU cores).
``pytest benchmarks/ --benchmark-only --full`` runs every case (the ``full`` marker: the other shapes, the large
ones, the Python-loop baselines that take seconds) with pytest-benchmark's usual rounds (≈ 15 minutes on 2 cores).
``-m full`` / ``-m "not full"`` select by the marker as usual.

Each result's ``extra_info`` holds ``peak_extra_MiB``: what one call allocates at its peak beyond its inputs, from
the CUDA allocator's statistics on GPU and from the profiler's allocation events on CPU (timing.peak_mib), and, for
the forward+backward benchmarks, ``saved_MiB`` (what autograd keeps for the backward beyond the inputs;
timing.saved_mib). A case with no shape on CPU tensors (testing.Case.cpu is None) is skipped there.

At the end of the session a compact summary (report.summary_table: per op, shape and pass the zslfast speed-up
over eager and torch.compile and the memory figures) follows pytest-benchmark's own table, which shows only
median, iqr and rounds unless ``--benchmark-columns`` says otherwise.
"""

import time

import pytest
import torch

import report
from zslfast import testing
from zslfast.tools import _cli, timing
from zslfast.tools.timing import DEVICE, ON_GPU

QUICK_CASE = "CUB"  # the paper shape every op runs at in the quick set
QUICK_SECONDS = 2.0  # in the quick set, a benchmark with fixed rounds times about this long (at least one round)
QUICK_MAX_TIME = "0.5"  # pytest-benchmark's --benchmark-max-time in the quick set (its default is 1.0)
FULL = pytest.mark.full
_quick = {"on": True}  # set from --full in pytest_configure


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="zslfast benchmarks: run every shape and baseline (the `full` marker), not only the quick set")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a benchmark of the full suite only (run with --full)")
    _quick["on"] = not config.getoption("--full")
    # pytest-benchmark's table: fewer columns unless asked; shorter runs in the quick set unless asked.
    if getattr(config.option, "benchmark_columns", "absent") is None:
        config.option.benchmark_columns = ["median", "iqr", "rounds"]
    if _quick["on"] and getattr(config.option, "benchmark_max_time", None) == "1.0":
        config.option.benchmark_max_time = QUICK_MAX_TIME


def pytest_collection_modifyitems(config, items):
    if not _quick["on"] or config.getoption("-m"):
        return  # --full, or an explicit marker expression decides
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    results = [b.as_dict(include_data=False) for b in session.benchmarks]
    terminalreporter.write_sep("-", "zslfast summary (medians; speed-up = other time / zslfast time)")
    for line in report.summary_table(report.group_rows(results)):
        terminalreporter.write_line(line)
    if _quick["on"]:
        terminalreporter.write_line("quick set (one paper shape per op); every shape and baseline: --full")
    # the threads, cores and load the run had, and a warning when other processes competed (asked after timing:
    # this process's own threads are part of the load average)
    terminalreporter.write_line(_cli.timing_conditions(DEVICE, busy_self=torch.get_num_threads() if not ON_GPU else 1))


def quick():
    """True unless the session runs the full suite (--full)."""
    return _quick["on"]


def cases(op_name, quick_case=QUICK_CASE):
    """testing.SHAPES[op_name]'s case names as pytest params, all but ``quick_case`` marked ``full``."""
    return [pytest.param(name, marks=() if name == quick_case else FULL) for name in testing.SHAPES[op_name].cases]


def full_unless(condition, *values):
    """``values`` as pytest params marked ``full`` unless ``condition(value)``."""
    return [pytest.param(v, marks=() if condition(v) else FULL) for v in values]


def run_benchmark(benchmark, fn, *, rounds=None, warmup=2, saved=None):
    """Time ``fn`` with pytest-benchmark, synchronised on GPU, after ``warmup`` untimed calls (compile steps stay
    outside the timing); ``extra_info`` gets the device, torch, threads, ``peak_extra_MiB`` and, given
    ``saved=(f, inputs)``, ``saved_MiB`` of ``f(*inputs)`` (its first call also compiles a compiled ``f``).

    In the quick set: one warm-up call; a benchmark with fixed ``rounds`` (a slow one) then runs as many of them as
    fit in about QUICK_SECONDS (at least one), the others pytest-benchmark's calibrated rounds (QUICK_MAX_TIME)."""
    if saved is not None:
        benchmark.extra_info["saved_MiB"] = round(timing.saved_mib(*saved), 3)
    timed = timing.synchronised(fn)
    start = time.perf_counter()
    for _ in range(min(warmup, 1) if quick() else warmup):
        start = time.perf_counter()
        timed()
    call_s = time.perf_counter() - start
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["peak_extra_MiB"] = round(timing.peak_mib(fn, DEVICE), 2)
    if quick() and rounds is not None:
        rounds = max(1, min(rounds, round(QUICK_SECONDS / max(call_s, 1e-9))))
    if rounds is not None:
        return benchmark.pedantic(timed, rounds=rounds, iterations=1)
    return benchmark(timed)


def shape_of(op_name, case_name):
    """The shape of testing.SHAPES[op_name][case_name] on this device; skips the test where the case has none."""
    shape = testing.SHAPES[op_name][case_name].on(DEVICE)
    if shape is None:
        pytest.skip(f"{op_name} {case_name} runs on a GPU only ({testing.SHAPES[op_name][case_name].label()})")
    return shape


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield
