"""pytest-benchmark glue over zslfast.bench, the one harness (its timer's synchronisation, peak and saved memory,
train step, compile cache and the shapes of every op: see zslfast/bench.py).

Run: ``pytest benchmarks/ --benchmark-only`` (CUDA tensors when a GPU is visible, else CPU tensors).
Peak memory goes into each result's ``extra_info`` (``peak_extra_MiB``): what one call allocates at its peak
beyond its inputs, from the CUDA allocator's statistics on GPU and from the profiler's allocation events on CPU
(bench.peak_mib). A case with no shape on CPU tensors (bench.Case.cpu is None) is skipped there.
"""

import pytest
import torch

from zslfast import bench
from zslfast.bench import DEVICE, ON_GPU


def run_benchmark(benchmark, fn, *, rounds=None, warmup=2):
    """Time ``fn`` with pytest-benchmark, synchronised on GPU, after ``warmup`` untimed calls (compile steps stay
    outside the timing); ``extra_info`` gets the device, torch, threads and ``peak_extra_MiB``."""
    timed = bench.synchronised(fn)
    for _ in range(warmup):
        timed()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["peak_extra_MiB"] = round(bench.peak_mib(fn, DEVICE), 2)
    if rounds is not None:
        return benchmark.pedantic(timed, rounds=rounds, iterations=1)
    return benchmark(timed)


def shape_of(op_name, case_name):
    """The shape of bench.SHAPES[op_name][case_name] on this device; skips the test where the case has none."""
    shape = bench.SHAPES[op_name][case_name].on(DEVICE)
    if shape is None:
        pytest.skip(f"{op_name} {case_name} runs on a GPU only ({bench.SHAPES[op_name][case_name].label()})")
    return shape


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield
