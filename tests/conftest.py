"""The suite's fixtures and hooks: the ``gpu`` marker, the session's time budget, the per-case seed, the header line.

The shared helpers (which (device, backend) pairs run here, tolerances, ...) are in helpers.py, imported first here
because it sets TRITON_INTERPRET where there is no GPU before any kernel is compiled. GPU-only cases carry the
``gpu`` marker wherever they are (see pytest_collection_modifyitems): ``pytest -m gpu`` runs exactly them on a GPU
machine (benchmarks/gpu_session.sh).
"""

import os
import time

import pytest
import torch

from helpers import NO_GPU  # first: it sets TRITON_INTERPRET before zslfast loads

from zslfast import _backend


def _is_gpu_only(item) -> bool:
    """A case that needs a GPU: a CUDA device among its parameters, or a skip whose reason is NO_GPU."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda") for v in params.values()):
        return True
    for mark in item.iter_markers():
        if mark.name in ("skip", "skipif") and mark.kwargs.get("reason") == NO_GPU:
            return True
    return False


# Epoch seconds after which the remaining cases skip (a GPU lease's time box: the summary still prints and counts).
DEADLINE = float(os.environ.get("ZSLFAST_TEST_DEADLINE", "inf"))


def pytest_runtest_setup(item):
    if time.time() > DEADLINE:
        pytest.skip("over the session's time budget (ZSLFAST_TEST_DEADLINE)")
    # torch 2.4's inductor loads CPU kernels built with -ffast-math, which sets flush-to-zero for the whole process
    # at the first torch.compile; every test starts with float32's denormals, whatever ran before it.
    torch.set_flush_denormal(False)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (derived in conftest; select with -m gpu)")


def pytest_collection_modifyitems(config, items):
    """Mark every GPU-only case ``gpu``, so that one selection (-m gpu) stays right as tests are added."""
    for item in items:
        if _is_gpu_only(item):
            item.add_marker(pytest.mark.gpu)


def _seeds(spec):
    """ZSLFAST_TEST_SEEDS: unset (a fresh seed each case), "N" (that seed: re-run a failure) or "A:B" (every seed
    of range(A, B), each its own case: a sweep outside CI, e.g. 0:1000)."""
    if not spec:
        return None
    start, _, stop = spec.partition(":")
    return [int(start)] if not stop else list(range(int(start), int(stop)))


SEEDS = _seeds(os.environ.get("ZSLFAST_TEST_SEEDS", ""))


def pytest_generate_tests(metafunc):
    if SEEDS is not None and "generator" in metafunc.fixturenames:
        metafunc.parametrize("generator", SEEDS, indirect=True, ids=[f"seed{s}" for s in SEEDS])


@pytest.fixture
def generator(request):
    """A fresh seed each case (or ZSLFAST_TEST_SEEDS'): the inputs differ run to run, the seed is printed on
    failure."""
    seed = getattr(request, "param", None)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    """The stack under test, one line (CI's summary quotes it)."""
    import sys

    import numpy

    triton_version = "-" if _backend.TRITON_ERROR else __import__("triton").__version__
    extension = "cpu+cuda" if _backend.HAS_CUDA_KERNELS else "cpu" if _backend.HAS_EXTENSION else "MISSING"
    return (
        f"zslfast on torch {torch.__version__}, triton {triton_version}, numpy {numpy.__version__}, "
        f"python {sys.version.split()[0]}; extension: {extension}"
    )
