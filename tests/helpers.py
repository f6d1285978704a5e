"""What the tests share: which (device, backend) pairs run here, tolerances per dtype, and a few checks and inputs.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set here
before any kernel is compiled: conftest.py imports this module first); the interpreter computes bf16 wrong, so
interpreted Triton is tested in fp32/fp64. GPU-only cases skip cleanly where no GPU is visible (reason NO_GPU,
from which conftest.py derives the ``gpu`` marker). The ops' own inputs, shapes and implementations are their
records in zslfast.testing.
"""

import os

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
REQUIRED_BY = {
    "cpu": "ZSLFAST_REQUIRE_EXTENSION", "cuda": "ZSLFAST_REQUIRE_CUDA_KERNELS", "triton": "ZSLFAST_REQUIRE_TRITON",
}


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


def device_backend_pairs(backends=KERNEL_BACKENDS, id_prefix=""):
    """Every (device, backend) of ``backends`` a kernel can run on, as pytest params; unavailable ones skip with the
    reason."""
    pairs = []
    for device in ("cpu", "cuda"):
        for backend in backends:
            if (device, backend) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            marks = backend_param(backend, device).marks
            pairs.append(pytest.param(device, backend, id=f"{id_prefix}{device}-{backend}", marks=marks))
    return pairs


DEVICE_BACKENDS = device_backend_pairs()
# Every backend that runs on CPU tensors or a GPU, the reference itself included (its masking and norms are part
# of the contract)
ALL_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference"), *DEVICE_BACKENDS]

# (rtol, atol) against the float64 reference.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def dtypes_for(device: str, backend: str):
    """fp64/fp32 everywhere; fp16/bf16 only on a real GPU (the Triton interpreter computes bf16 wrong)."""
    dtypes = [torch.float64, torch.float32]
    if device == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    return dtypes


def assert_compiles_like_eager(fn, leaves):
    """torch.compile(fn, fullgraph=True) (a fresh dynamo cache) gives fn's scalar loss and its gradients to leaves
    (None for a leaf the loss does not use, in both)."""
    import torch._dynamo

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*leaves)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    want = fn(*leaves)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w)


def low_precision_error_bound(kernel_out, eager_low_out, exact):
    """Low-precision rule: the kernel's error may be at most 2x that of the eager code run in the same dtype."""
    kernel_err = (kernel_out.double() - exact).abs().max().item()
    eager_err = (eager_low_out.double() - exact).abs().max().item()
    return kernel_err, max(2 * eager_err, 1e-6 * exact.abs().max().item())


def threads(n: int):
    """torch.set_num_threads(n) for a with-block, restoring the count afterwards."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return guard()


# ------------------------------------------------------------------------------- attribute_attention's inputs
def attention_inputs(B, K, R, D, Dv, q_kind, ref_kind, dtype, device, generator, magnitude=1.0):
    """q (K, D) shared ("shared") or (B, K, D) ("per"), k (B, R, D) times ``magnitude``, v (B, R, Dv), ref None /
    (K, Dv) / (B, K, Dv)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(K, D) if q_kind == "shared" else rand(B, K, D)
    k = rand(B, R, D) * magnitude
    v = rand(B, R, Dv)
    ref = None if ref_kind is None else (rand(K, Dv) if ref_kind == "shared" else rand(B, K, Dv))
    return q, k, v, ref


def tiled_r_cases(device, backend, generator, monkeypatch):
    """(q, k, v, ref, mask, score) over R = 40 with Triton's R tile forced to 16 (its R-tiled, online-softmax
    path), a whole tile of sample 1 masked: fp64 and fp32, shared q scored by cosine and per-sample q unscored."""
    if backend == "triton":
        from zslfast.triton.attribute_attention import config as triton_config

        monkeypatch.setattr(triton_config, "MAX_BLOCK_R", 16)
    B, K, R, D, Dv = 2, 5, 40, 10, 7
    for dtype in (torch.float64, torch.float32):
        for q_kind, score in (("shared", "cosine"), ("per", None)):
            q, k, v, ref = attention_inputs(B, K, R, D, Dv, q_kind, "shared", dtype, device, generator)
            mask = (torch.rand(B, R, generator=generator) > 0.3).to(device)
            mask[1, :20] = False  # a whole tile masked
            yield q, k, v, ref, mask, score


# ------------------------------------------------------------------------------------------- several processes
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


def exact_softmax_grad(logits, grad, dim):
    """P (dP - sum P dP) of P = softmax(logits) along dim, for float64 logits and dP, evaluated in 60-digit
    arithmetic (mpmath, which torch installs with sympy) and rounded once to float64: the textbook formula, exact
    where float64 itself loses the near one-hot rows (dP_top - sum P dP rounds to 0 for a top-two gap past ~37)."""
    import mpmath

    x, g = logits.movedim(dim, -1), grad.movedim(dim, -1)
    out = []
    with mpmath.workdps(60):
        for row_s, row_g in zip(x.reshape(-1, x.shape[-1]).tolist(), g.reshape(-1, x.shape[-1]).tolist()):
            top = max(row_s)
            # e^-1000 of anything is far below float64's smallest number: 0 (finfo.min on masked entries, too)
            e = [mpmath.exp(mpmath.mpf(s) - top) if s - top > -1000 else mpmath.mpf(0) for s in row_s]
            total = mpmath.fsum(e)
            p = [t / total for t in e]
            delta = mpmath.fsum(pi * gi for pi, gi in zip(p, row_g))
            out.append([float(pi * (gi - delta)) for pi, gi in zip(p, row_g)])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).movedim(-1, dim).to(logits.dtype)


def softmax_grad_error_scale(p, n, dim):
    """The first-order scale (in units of float32's eps) of a float32 softmax backward's error in dS, for the
    softmax P along dim and N, the scale of float32's rounding in each dP. As dS_r = P_r ((dP_r - dP_t) -
    sum_j P_j (dP_j - dP_t)) (sum P = 1; t: the arg-max), errors in dP move dS_r by at most P_r (M_r + sum_j P_j M_j),
    M_r = N_r + N_t and M_t = 0: no error of dP_t reaches dS_t. P's own rounding adds as much again (eps P, or
    float32's smallest normal, below which a P may become 0 and no relative error covers it: P + tiny / eps here,
    in both places). Where dP_r - dP_t is itself tiny, float32 cannot know dS_r better than this, whatever its
    softmax backward does."""
    top = p.argmax(dim, keepdim=True)
    m = (n + n.gather(dim, top)).scatter(dim, top, 0.0)
    fp32 = torch.finfo(torch.float32)
    p = p + fp32.tiny / fp32.eps
    return p * (m + (p * m).sum(dim, keepdim=True))
