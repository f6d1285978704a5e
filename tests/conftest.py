"""Shared test setup: which (device, backend) pairs run here, and tolerances per dtype.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set here
before any kernel is compiled); the interpreter computes bf16 wrong, so interpreted Triton is tested in fp32/fp64.
GPU-only cases skip cleanly where no GPU is visible, and carry the ``gpu`` marker wherever they are (see
pytest_collection_modifyitems): ``pytest -m gpu`` runs exactly them on a GPU machine (benchmarks/gpu_session.sh).
"""

import os
import time

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
NO_GPU = "no GPU visible"  # the one skip reason of a GPU-only case: the gpu marker is derived from it
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from zslfast import _backend  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")

# CI sets these so that a backend that should have been built fails its tests instead of skipping them.
REQUIRED_BY = {"cpu": "ZSLFAST_REQUIRE_EXTENSION", "cuda": "ZSLFAST_REQUIRE_CUDA_KERNELS", "triton": "ZSLFAST_REQUIRE_TRITON"}


def backend_param(backend: str, device: str = "cpu"):
    """``backend`` on ``device`` as a pytest param: skipped with the reason where it cannot run, unless CI requires
    it (then the test runs and fails with the BackendUnavailableError naming what is missing). No GPU always skips."""
    if device == "cuda" and not HAS_GPU:
        reason = NO_GPU
    else:
        reason = _backend.why_unavailable(backend, torch.device(device))
        if reason and os.environ.get(REQUIRED_BY.get(backend, ""), "0") == "1":
            reason = None
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(backend, id=backend, marks=marks)


def require_backend(backend: str, device: str = "cpu"):
    """Inside a test that needs ``backend`` (the registered op's own behaviour, not the reference fallback): skip
    with the reason where it cannot run, unless CI requires it (then the test goes on and fails)."""
    marks = backend_param(backend, device).marks
    if marks:
        pytest.skip(marks[0].kwargs["reason"])


def device_backend_pairs():
    """Every (device, backend) a kernel can run on, as pytest params; unavailable ones skip with the reason."""
    pairs = []
    for device in ("cpu", "cuda"):
        for backend in KERNEL_BACKENDS:
            if (device, backend) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            marks = backend_param(backend, device).marks
            pairs.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return pairs


DEVICE_BACKENDS = device_backend_pairs()

# (rtol, atol) against the float64 reference.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def dtypes_for(device: str, backend: str):
    """fp64/fp32 everywhere; fp16/bf16 only on a real GPU (the Triton interpreter computes bf16 wrong)."""
    dtypes = [torch.float64, torch.float32]
    if device == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    return dtypes


def assert_compiles_like_eager(fn, leaves):
    """torch.compile(fn, fullgraph=True) (a fresh dynamo cache) gives fn's scalar loss and its gradients to leaves."""
    import torch._dynamo

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = fn(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def low_precision_error_bound(kernel_out, eager_low_out, exact):
    """Low-precision rule: the kernel's error may be at most 2x that of the eager code run in the same dtype."""
    kernel_err = (kernel_out.double() - exact).abs().max().item()
    eager_err = (eager_low_out.double() - exact).abs().max().item()
    return kernel_err, max(2 * eager_err, 1e-6 * exact.abs().max().item())


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


def free_port() -> int:
    """A free local TCP port for a test's process group rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args: tuple, world: int, folder, result_name, timeout: float):
    """Start ``world`` processes running ``worker(rank, *args)`` (torch.multiprocessing.spawn) and wait until each
    rank has written ``folder / result_name(rank)`` or ``folder / f"error{rank}"`` (its traceback); then reap them.

    The wait polls the files, not ProcessContext.join: join terminates the other ranks as soon as one exits
    non-zero, and a gloo teardown can crash or hang at interpreter exit after a rank has written its result (torch
    2.4). Bounded, so a hang fails the test instead of stalling the suite. Asserts no rank wrote an error and every
    rank its result; returns the result paths, rank by rank.
    """
    import time

    import torch.multiprocessing as mp

    results = [folder / result_name(rank) for rank in range(world)]
    errors = [folder / f"error{rank}" for rank in range(world)]
    context = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(r.exists() or e.exists() for r, e in zip(results, errors)):
        if not any(process.is_alive() for process in context.processes):
            break
        time.sleep(0.2)
    for process in context.processes:
        process.join(20)
        if process.is_alive():
            process.terminate()
            process.join(5)
    failed = [e.read_text() for e in errors if e.exists()]
    assert not failed, "rank failed:\n" + "\n".join(failed)
    missing = [rank for rank, r in enumerate(results) if not r.exists()]
    assert not missing, f"ranks {missing} wrote no result; exit codes {[p.exitcode for p in context.processes]}"
    return results
