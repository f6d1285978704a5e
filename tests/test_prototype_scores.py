"""prototype_scores and prototype_scores_factored against the float64 reference: outputs and gradients for every
backend available here, odd sizes, batch 1, large values, only the gradients asked for, mixed dtypes and bad-input
errors. gradcheck, opcheck, torch.compile, autocast, layouts, determinism and backends: test_contract.py.

    logits[b, c] = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k]);  e (B, K), s (C, K), w None | (B, K) | (B, C, K)
"""

import pytest
import torch

import zslfast
from zslfast import reference
from zslfast.ops import prototype_scores as ps_module

from helpers import DEVICE_BACKENDS, TOLERANCES, dtypes_for, low_precision_error_bound, requires_gpu

SHAPES = [(1, 1, 1), (1, 7, 33), (4, 13, 129), (3, 37, 312)]  # (B, C, K): batch 1, one class, K=1/33/129/312
W_MODES = [None, "bk", "bck"]


def make_inputs(B, C, K, w_mode, dtype, device, generator, magnitude=1.0):
    def rand(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * magnitude).to(device=device, dtype=dtype)

    e, s = rand(B, K), rand(C, K)
    w = None if w_mode is None else (rand(B, K) if w_mode == "bk" else rand(B, C, K))
    return e, s, w


def value_scale(e, s, w):
    """|e| |s| |1 + w| summed over k: what a rounding error in the sum is relative to (cancellation-aware)."""
    e, s = e.double().abs(), s.double().abs()
    w_abs = None if w is None else (1 + w.double()).abs() - 1
    return reference.prototype_scores(e, s, w_abs)


def grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wrt, grad_out)


def assert_matches_reference(e, s, w, backend, dtype, generator):
    exact_inputs = [t.double() if t is not None else None for t in (e, s, w)]
    grad_out = torch.randn(e.shape[0], s.shape[0], generator=generator, dtype=torch.float64).to(e.device)
    exact_out, exact_grads = grads(reference.prototype_scores, exact_inputs, grad_out)
    out, got_grads = grads(lambda *a: zslfast.prototype_scores(*a, backend=backend), (e, s, w), grad_out.to(dtype))
    assert out.dtype == dtype and out.shape == exact_out.shape

    if dtype in TOLERANCES:
        rtol, atol = TOLERANCES[dtype]
        scale = value_scale(e, s, w)
        assert (out.double() - exact_out).abs().le(atol * scale + rtol * exact_out.abs() + 1e-300).all(), (
            f"forward off by {(out.double() - exact_out).abs().max().item():.3g}"
        )
        for name, got, want in zip("esw", got_grads, exact_grads):
            bound = atol * want.abs().max().clamp_min(1.0) * max(e.shape[0], s.shape[0]) ** 0.5
            err = (got.double() - want).abs().max().item()
            assert err <= bound, f"grad_{name} off by {err:.3g} (bound {bound:.3g})"
        return

    # fp16/bf16: no worse than twice the error of the same eager code run in that dtype
    low_out, low_grads = grads(reference.prototype_scores, (e, s, w), grad_out.to(dtype))
    err, bound = low_precision_error_bound(out, low_out, exact_out)
    assert err <= bound, f"{dtype} forward error {err:.3g} > 2x eager's"
    for got, low, want in zip(got_grads, low_grads, exact_grads):
        err, bound = low_precision_error_bound(got, low, want)
        assert err <= bound, f"{dtype} gradient error {err:.3g} > 2x eager's"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("w_mode", W_MODES)
@pytest.mark.parametrize("B,C,K", SHAPES)
def test_matches_reference(device, backend, w_mode, B, C, K, generator):
    for dtype in dtypes_for(device, backend):
        e, s, w = make_inputs(B, C, K, w_mode, dtype, device, generator)
        assert_matches_reference(e, s, w, backend, dtype, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_paper_shape_cub(device, backend, generator):
    """ILPG's CUB shape B=50 C=200 K=312 (interpreted Triton gets a slice of it: the interpreter is slow)."""
    B = 50 if backend != "triton" or device == "cuda" else 3
    e, s, w = make_inputs(B, 200, 312, "bck", torch.float32, device, generator)
    assert_matches_reference(e, s, w, backend, torch.float32, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_large_values(device, backend, generator):
    for dtype in (torch.float64, torch.float32):
        e, s, w = make_inputs(3, 9, 70, "bck", dtype, device, generator, magnitude=1e3)
        assert_matches_reference(e, s, w, backend, dtype, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_only_requested_gradients(device, backend, generator):
    """w not requiring grad: grad_w is not written, e and s still get exact gradients."""
    e, s, w = make_inputs(3, 6, 17, "bck", torch.float64, device, generator)
    e.requires_grad_()
    out = zslfast.prototype_scores(e, s, w, backend=backend)
    (got,) = torch.autograd.grad(out.sum(), e)
    e_ref = e.detach().requires_grad_()
    (want,) = torch.autograd.grad(reference.prototype_scores(e_ref, s, w).sum(), e_ref)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mixed_dtypes_are_promoted(generator):
    e, s, w = make_inputs(2, 3, 4, "bck", torch.float64, "cpu", generator)
    out = zslfast.prototype_scores(e.float(), s, w.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.prototype_scores(e.float().double(), s, w.float().double()))


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "e_shape,s_shape,w_shape,error,words",
    [
        ((3,), (4, 5), None, ValueError, ["e", "(B, K)", "(3)"]),
        ((3, 5), (4, 6), None, ValueError, ["s", "K=5", "(4, 6)"]),
        ((3, 5), (4, 5), (3, 4, 6), ValueError, ["w", "(3, 4, 6)"]),
        ((3, 5), (4, 5), (2, 5), ValueError, ["w", "(2, 5)"]),
        ((3, 5), (4, 5), (3, 4, 5, 1), ValueError, ["w", "4-D"]),
        ((0, 5), (4, 5), None, ValueError, ["e", "empty"]),
        ((3, 5), (0, 5), None, ValueError, ["s", "empty"]),
    ],
)
def test_bad_shapes(e_shape, s_shape, w_shape, error, words):
    w = None if w_shape is None else torch.randn(w_shape)
    with pytest.raises(error) as info:
        zslfast.prototype_scores(torch.randn(e_shape), torch.randn(s_shape), w)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_types():
    with pytest.raises(TypeError, match="e must be a floating-point"):
        zslfast.prototype_scores(torch.ones(2, 3, dtype=torch.long), torch.randn(4, 3))
    with pytest.raises(TypeError, match="s must be a torch.Tensor"):
        zslfast.prototype_scores(torch.randn(2, 3), [[1.0, 2.0, 3.0]])


@requires_gpu
def test_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        zslfast.prototype_scores(torch.randn(2, 3), torch.randn(4, 3, device="cuda"))


# --- factored weights w = h @ u (+ bias) ---------------------------------------------------------------------------


def make_factored(B, C, K, J, dtype, device, generator, with_bias):
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    return rand(B, K), rand(C, K), rand(B, J), rand(J, C, K) * 0.3, (rand(C, K) if with_bias else None)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("B,C,K,J", [(1, 1, 1, 1), (4, 13, 33, 5), (3, 37, 129, 2)])
@pytest.mark.parametrize("chunked", [False, True])
def test_factored_matches_reference(B, C, K, J, with_bias, chunked, monkeypatch, generator):
    if chunked:  # build V one j at a time: exercises the chunk loop
        monkeypatch.setattr(ps_module, "_CHUNK_ELEMENTS", 1)
    for dtype in (torch.float64, torch.float32):
        inputs = make_factored(B, C, K, J, dtype, "cpu", generator, with_bias)
        present = [t for t in inputs if t is not None]
        grad_out = torch.randn(B, C, generator=generator, dtype=torch.float64)

        def run(fn, tensors):
            leaves = [t.detach().requires_grad_() for t in tensors]
            it = iter(leaves)
            args = [next(it) if t is not None else None for t in inputs]
            out = fn(*args)
            return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

        want_out, want_grads = run(reference.prototype_scores_factored, [t.double() for t in present])
        got_out, got_grads = run(zslfast.prototype_scores_factored, present)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        scale = want_out.abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(got_out.double(), want_out, rtol=tol, atol=tol * scale)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().clamp_min(1.0).item())


def test_factored_bad_input():
    e, s, h, u = torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 5), torch.randn(5, 3, 4)
    with pytest.raises(ValueError, match=r"u must be \(J, C, K\)"):
        zslfast.prototype_scores_factored(e, s, h, u[:, :2])
    with pytest.raises(ValueError, match="h .* B=2"):
        zslfast.prototype_scores_factored(e, s, h[:1], u)
    with pytest.raises(ValueError, match="bias"):
        zslfast.prototype_scores_factored(e, s, h, u, torch.randn(4, 3))
