"""Peak memory of one call on CPU, where PyTorch keeps no allocator statistics (benchmarks and memory tests)."""

import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Callable

import torch

# What the profiler's C++ side (kineto, the CPU allocator) writes straight to the process's stderr while it
# measures: "USDT: profiler_start/stop" and "STAGE" lines, an "ERROR: gpuGetDeviceCount failed" from a CUDA build
# of torch on a machine without a GPU, and a CPUAllocator warning about blocks freed that were allocated before
# the profile began. None of them is about the code measured; a user reads "ERROR" as a failure.
PROFILER_NOISE = re.compile(
    r"^(USDT|STAGE|ERROR|WARNING|INFO):\S* \S* \d+:\d+ \w+\.cpp:\d+\] "
    r"|CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started"
)


@contextlib.contextmanager
def profiler_logs_filtered():
    """Run the block with file descriptor 2 going to a temporary file, then write that file's lines back to
    stderr, less the profiler's own log lines (PROFILER_NOISE). Anything else the block writes is kept."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not PROFILER_NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_cpu_bytes(fn: Callable) -> int:
    """Extra bytes ``fn()`` holds at its peak: the profiler records every allocation and free (profile_memory=True)
    and the running total's maximum is taken in time order (an op's own allocations count at its start)."""
    with profiler_logs_filtered(), warnings.catch_warnings():
        # torch 2.11's profiler warns, once, that it "clears events at the end of each cycle": there is one cycle
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
        events = prof.events()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable, device: torch.device) -> int:
    """Extra bytes ``fn()`` holds at its peak on ``device``: the CUDA allocator's statistics, or peak_cpu_bytes."""
    if device.type != "cuda":
        return peak_cpu_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base
