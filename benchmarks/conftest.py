"""Shared benchmark helpers: device choice, synchronisation, peak memory, and the papers' shapes.

Run: ``pytest benchmarks/ --benchmark-only`` (CUDA tensors when a GPU is visible, else CPU tensors).
Peak memory goes into each result's ``extra_info``: on GPU ``torch.cuda.max_memory_allocated`` above the inputs,
on CPU the process's resident-set growth sampled every 0.5 ms during one call (approximate, but measured).
"""

import os
import threading
import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(fn):
    """Extra memory one call of ``fn`` needs at its peak, in MiB."""
    if ON_GPU:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak / 2**20
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = fn()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    del result
    return (peak[0] - base) / 2**20


def run_benchmark(benchmark, fn, *, rounds=None, warmup=2):
    """Time ``fn`` (synchronised on GPU) after ``warmup`` untimed calls (compile steps stay outside the timing)."""

    def timed():
        out = fn()
        sync()
        return out

    for _ in range(warmup):
        timed()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["peak_extra_MiB"] = round(peak_memory_mib(fn), 2)
    if rounds is not None:
        return benchmark.pedantic(timed, rounds=rounds, iterations=1)
    return benchmark(timed)


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield
