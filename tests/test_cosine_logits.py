"""cosine_logits against the float64 reference: outputs and gradients (x, protos, a tensor scale) for every backend
available here, odd sizes, leading dims (permuted ones too), large values, zero and sub-eps rows, scale float /
tensor / 0; what autograd keeps, and bad-input errors; norms past float32's squared range; eps_mode="add"
(GEM-ZSL's and PSVMA's x / (|x| + eps)) against the reference and the papers' eager formula. gradcheck,
opcheck, torch.compile, autocast, layouts, determinism, thread counts and backends: test_contract.py.

    out[..., c] = scale * cos(x[...], protos[c]);  x (..., D), protos (C, D), scale float | one-element tensor
"""

import pytest
import torch

import zslfast
from zslfast import baselines, reference

from helpers import ALL_BACKENDS, DEVICE_BACKENDS, TOLERANCES, dtypes_for, low_precision_error_bound, requires_gpu

EPS = 1e-8

# (leading dims of x, C, D, scale): D = 1/33/129/312, C = 1/7/200, N = 1/50, leading dims (2, 3)
CASES = [
    ((1,), 1, 1, 1.0),
    ((5,), 3, 1, "tensor"),
    ((50,), 7, 33, "tensor"),
    ((1,), 200, 129, 0.3),
    ((2, 3), 7, 312, "tensor"),
    ((50,), 200, 312, "tensor"),
]


def scale_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(lead, C, D, dtype, device, generator, x_magnitude=1.0, p_magnitude=1.0):
    x = torch.randn(*lead, D, generator=generator, dtype=torch.float64) * x_magnitude
    p = torch.randn(C, D, generator=generator, dtype=torch.float64) * p_magnitude
    return x.to(device=device, dtype=dtype), p.to(device=device, dtype=dtype)


def make_scale(kind, dtype, device, generator):
    if kind == "tensor":
        value = 0.5 + 3 * torch.rand((), generator=generator, dtype=torch.float64)
        return value.to(device=device, dtype=scale_dtype(dtype))
    return kind


def run(fn, x, p, scale, grad_out):
    """Output and gradients of every differentiable input (x, protos and scale when it is a tensor)."""
    leaves = [x.detach().requires_grad_(), p.detach().requires_grad_()]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().requires_grad_()
        leaves.append(scale)
    out = fn(*leaves[:2], scale)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def inverse_norms(v, eps=EPS, eps_mode="clamp"):
    n = v.double().norm(dim=1)
    return 1 / (n + eps) if eps_mode == "add" else 1 / n.clamp_min(eps)


def natural_sizes(x, p, scale, grad_out, eps=EPS, eps_mode="clamp"):
    """What each result's rounding errors are relative to (cancellation-aware): |scale| * |cos| <= |scale| for out;
    |scale| ix[n] sum_c |g[n, c]| for grad_x[n] (and the like for grad_p[c]); sum |g| for grad_scale."""
    s = abs(float(scale))
    x2, g2 = x.double().reshape(-1, x.shape[-1]), grad_out.double().reshape(-1, p.shape[0]).abs()
    ix = inverse_norms(x2, eps, eps_mode)
    ip = inverse_norms(p, eps, eps_mode)
    size_x = (s * ix * g2.sum(1)).reshape(*x.shape[:-1], 1)
    size_p = (s * ip * g2.sum(0))[:, None]
    return [torch.tensor(s, dtype=torch.float64, device=x.device), size_x, size_p, g2.sum()]


def assert_matches_reference(x, p, scale, backend, dtype, generator, eps=EPS, eps_mode="clamp"):
    exact_scale = scale.double() if isinstance(scale, torch.Tensor) else scale
    grad_out = torch.randn(*x.shape[:-1], p.shape[0], generator=generator, dtype=torch.float64).to(x.device)
    reference_fn = lambda *a: reference.cosine_logits(*a, eps=eps, eps_mode=eps_mode)  # noqa: E731
    exact_out, exact_grads = run(reference_fn, x.double(), p.double(), exact_scale, grad_out)
    out, got_grads = run(
        lambda *a: zslfast.cosine_logits(*a, eps=eps, eps_mode=eps_mode, backend=backend), x, p, scale, grad_out
    )
    assert out.dtype == dtype and out.shape == exact_out.shape
    assert all(g.shape == w.shape and g.dtype == t.dtype for g, w, t in zip(got_grads, exact_grads, (x, p, scale)))
    sizes = natural_sizes(x, p, scale, grad_out, eps, eps_mode)
    names = ["out", "grad_x", "grad_protos", "grad_scale"]

    if dtype in TOLERANCES:
        _, atol = TOLERANCES[dtype]
        for name, got, want, size in zip(names, (out, *got_grads), (exact_out, *exact_grads), sizes):
            err = (got.double() - want).abs()
            assert err.le(atol * size).all(), f"{name} off by {err.max().item():.3g} (tolerance {atol} x size)"
        return

    # fp16/bf16: no worse than twice the error of the same eager code run in that dtype, or than one unit of the
    # dtype's precision relative to the terms summed (eager can be exact by luck where the result is ~0, e.g. D=1)
    low_out, low_grads = run(reference_fn, x, p, scale, grad_out)
    unit = torch.finfo(dtype).eps
    results = zip(names, (out, *got_grads), (low_out, *low_grads), (exact_out, *exact_grads), sizes)
    for name, got, low, want, size in results:
        err, bound = low_precision_error_bound(got, low, want)
        assert err <= max(bound, unit * size.max().item()), f"{dtype} {name} error {err:.3g} > 2x eager's ({bound:.3g})"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("lead,C,D,scale_kind", CASES, ids=[f"x{c[0]}-C{c[1]}-D{c[2]}-{c[3]}" for c in CASES])
def test_matches_reference(device, backend, lead, C, D, scale_kind, generator):
    for dtype in dtypes_for(device, backend):
        x, p = make_inputs(lead, C, D, dtype, device, generator)
        assert_matches_reference(x, p, make_scale(scale_kind, dtype, device, generator), backend, dtype, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_scale_zero(device, backend, generator):
    """A Python scale of 0 is refused (it would zero every logit); a learnable tensor scale that reaches 0 is
    the model's own: out and grad_x/grad_protos are 0, and the scale still gets sum(g * cos) (no 0/0)."""
    x, p = make_inputs((9,), 13, 40, torch.float64, device, generator)
    with pytest.raises(ValueError, match="cosine_logits: scale must be finite and > 0, got 0.0"):
        zslfast.cosine_logits(x, p, 0.0, backend=backend)
    for dtype in (torch.float64, torch.float32):
        x, p = make_inputs((9,), 13, 40, dtype, device, generator)
        s = torch.zeros((), dtype=scale_dtype(dtype), device=device)
        assert_matches_reference(x, p, s, backend, dtype, generator)
        grad_out = torch.randn(9, 13, generator=generator, dtype=torch.float64).to(device, dtype)
        out, grads = run(lambda *a: zslfast.cosine_logits(*a, backend=backend), x, p, s, grad_out)
        assert not out.any() and not grads[0].any() and not grads[1].any()
        cos = reference.cosine_logits(x.double(), p.double())
        torch.testing.assert_close(grads[2].double(), (grad_out.double() * cos).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_permuted_leading_dims(device, backend, generator):
    N, C, D = 6, 11, 40
    for dtype in (torch.float64, torch.float32):
        scale = make_scale("tensor", dtype, device, generator)
        x3 = torch.randn(3, N, D, generator=generator, dtype=dtype).to(device).transpose(0, 1)  # permuted leading dims
        p_t = torch.randn(D, C, generator=generator, dtype=dtype).to(device).T  # transposed protos
        assert_matches_reference(x3, p_t, scale, backend, dtype, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_large_and_small_values(device, backend, generator):
    for dtype in (torch.float64, torch.float32):
        x, p = make_inputs((7,), 9, 70, dtype, device, generator, x_magnitude=1e4, p_magnitude=1e-3)
        assert_matches_reference(x, p, make_scale("tensor", dtype, device, generator), backend, dtype, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_and_sub_eps_rows(device, backend, generator):
    """|v| <= eps: normalised by eps as F.normalize does (zero rows give 0 logits), finite gradients without the
    norm's derivative, exactly as the reference."""
    for dtype in (torch.float64, torch.float32):
        x, p = make_inputs((6,), 8, 33, dtype, device, generator)
        x[1] = 0
        x[4] *= 1e-11  # |x| ~ 6e-11 < eps: scaled by 1/eps, not normalised
        p[2] = 0
        p[5] *= 1e-11
        scale = make_scale("tensor", dtype, device, generator)
        assert_matches_reference(x, p, scale, backend, dtype, generator)
        grad_out = torch.randn(6, 8, generator=generator, dtype=torch.float64).to(device, dtype)
        out, grads = run(lambda *a: zslfast.cosine_logits(*a, backend=backend), x, p, scale, grad_out)
        assert not out[1].any() and not out[:, 2].any()
        assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_one_dimensional_x(device, backend, generator):
    x, p = make_inputs((), 5, 12, torch.float64, device, generator)
    assert zslfast.cosine_logits(x, p, backend=backend).shape == (5,)
    assert_matches_reference(x, p, 2.0, backend, torch.float64, generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_only_requested_gradients(device, backend, generator):
    """Frozen prototypes (class embeddings) and a float scale: only grad_x is computed, and it is exact; a sum()
    loss hands the backward an expanded (stride 0) grad."""
    x, p = make_inputs((4,), 6, 17, torch.float64, device, generator)
    x.requires_grad_()
    (got,) = torch.autograd.grad(zslfast.cosine_logits(x, p, 3.0, backend=backend).sum(), x)
    x_ref = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(reference.cosine_logits(x_ref, p, 3.0).sum(), x_ref)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    scale = torch.tensor(2.0, dtype=torch.float64, device=device, requires_grad=True)
    (got,) = torch.autograd.grad(zslfast.cosine_logits(x.detach(), p, scale, backend=backend).sum(), scale)
    torch.testing.assert_close(got, reference.cosine_logits(x.detach(), p).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autograd_keeps_no_normalised_copies(device, backend, generator):
    """Saved for backward: x, protos, the inverse norms, scale (and out for Triton), nothing (N, D) or (C, D) more."""
    N, C, D = 5, 6, 7
    x, p = make_inputs((N,), C, D, torch.float32, device, generator)
    scale = make_scale("tensor", torch.float32, device, generator)
    inputs = [t.requires_grad_() for t in (x, p, scale)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        zslfast.cosine_logits(*inputs, backend=backend)
    def is_input(t):  # the input itself or a view of it, not a copy
        return any(t.data_ptr() == i.data_ptr() and t.shape == i.shape for i in (x, p))

    assert sum(is_input(t) for t in saved) == 2
    others = sorted(tuple(t.shape) for t in saved if not is_input(t))
    expected = sorted([(N,), (C,), ()] + ([(N, C)] if backend == "triton" else []))
    assert others == expected


def test_mixed_dtypes_are_promoted(generator):
    x, p = make_inputs((2,), 3, 4, torch.float64, "cpu", generator)
    out = zslfast.cosine_logits(x.float(), p, torch.tensor(2.0))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.cosine_logits(x.float().double(), p, 2.0))


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape,p_shape,error,words",
    [
        ((), (4, 5), ValueError, ["x", "(..., D)", "0-D"]),
        ((3, 5), (5,), ValueError, ["protos", "(C, D)", "(5)"]),
        ((3, 5), (2, 4, 5), ValueError, ["protos", "3-D"]),
        ((3, 5), (4, 6), ValueError, ["protos", "D=5", "(4, 6)", "(3, 5)"]),
        ((2, 3, 5), (4, 3), ValueError, ["protos", "D=5", "(2, 3, 5)"]),
        ((0, 5), (4, 5), ValueError, ["x", "empty"]),
        ((3, 0), (4, 0), ValueError, ["x", "empty"]),
        ((3, 5), (0, 5), ValueError, ["protos", "empty"]),
    ],
)
def test_bad_shapes(x_shape, p_shape, error, words):
    with pytest.raises(error) as info:
        zslfast.cosine_logits(torch.randn(x_shape), torch.randn(p_shape))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_types():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        zslfast.cosine_logits(torch.ones(2, 3, dtype=torch.long), torch.randn(4, 3))
    with pytest.raises(TypeError, match="protos must be a floating-point"):
        zslfast.cosine_logits(torch.randn(2, 3), torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="protos must be a torch.Tensor"):
        zslfast.cosine_logits(torch.randn(2, 3), [[1.0, 2.0, 3.0]])


@pytest.mark.parametrize(
    "scale,error,words",
    [
        (torch.ones(2), ValueError, ["scale", "one-element", "(2)"]),
        (torch.ones(2, 2), ValueError, ["scale", "(2, 2)"]),
        (torch.tensor(3), TypeError, ["scale", "torch.int64"]),
        ("10", TypeError, ["scale", "str"]),
        (None, TypeError, ["scale", "NoneType"]),
        (torch.tensor(1.0, device="meta"), ValueError, ["scale", "one device", "meta"]),
    ],
)
def test_bad_scale(scale, error, words):
    with pytest.raises(error) as info:
        zslfast.cosine_logits(torch.randn(2, 3), torch.randn(4, 3), scale)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_one_element_scale_tensor_gets_its_gradient(generator):
    x, p = make_inputs((3,), 4, 5, torch.float64, "cpu", generator)
    scale = torch.full((1,), 2.0, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(zslfast.cosine_logits(x, p, scale).sum(), scale)
    assert got.shape == (1,)
    torch.testing.assert_close(got, reference.cosine_logits(x, p).sum().reshape(1))


def test_mixed_devices():
    """meta stands in for a second device: the check runs before any kernel."""
    with pytest.raises(ValueError, match="one device.*x on cpu, protos on meta"):
        zslfast.cosine_logits(torch.randn(2, 3), torch.randn(4, 3, device="meta"))


@requires_gpu
def test_cpu_scalar_scale_with_cuda_tensors(generator):
    x, p = make_inputs((3,), 4, 5, torch.float32, "cuda", generator)
    scale = torch.tensor(2.0, requires_grad=True)
    out = zslfast.cosine_logits(x, p, scale)
    (got,) = torch.autograd.grad(out.sum(), scale)
    assert got.device.type == "cpu"
    torch.testing.assert_close(out, reference.cosine_logits(x, p, 2.0))


# ---------------------------------------------------------------------------- norms past float32's squared range
# (x magnitude, protos magnitude) per element, D = 64: a sum of squares overflows float32 beyond |v| ~ 1.8e19 (F.normalize
# then gives 0 where the cosines are O(1)). 2.4e18 * sqrt(64) ~ 1.9e19: most rows' squares overflow on both sides
# while <x, p> = |x| |p| cos stays finite for |cos| < ~0.9 (checked below); 1e30 overflows the square, not the dot.
HUGE = [(1e30, 1.0), (1.0, 1e30), (2.4e18, 2.4e18), (1e30, 1e-3)]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_magnitude,p_magnitude", HUGE, ids=[f"x{a:g}-p{b:g}" for a, b in HUGE])
def test_huge_values_do_not_overflow(device, backend, x_magnitude, p_magnitude, generator):
    """float32 outputs and gradients (x, protos, tensor scale) at magnitudes whose squared norms overflow, against
    the float64 reference: F.normalize's plain norm would give 0 logits (and ix^2 ~ 1e-60 a wrong grad_x)."""
    x, p = make_inputs((2, 25), 9, 64, torch.float32, device, generator, x_magnitude, p_magnitude)
    x[0, 3] *= 1e-6  # rows of other magnitudes in the same blocks
    p[4] /= max(x_magnitude, p_magnitude)
    exact_dot = x.double().reshape(-1, 64) @ p.double().T
    assert exact_dot.abs().max() < 0.9 * torch.finfo(torch.float32).max  # the dot itself stays finite
    assert (x.float().pow(2).sum(-1).isinf().any() or p.float().pow(2).sum(-1).isinf().any())
    scale = make_scale("tensor", torch.float32, device, generator)
    assert_matches_reference(x, p, scale, backend, torch.float32, generator)
    out = zslfast.cosine_logits(x, p, scale, backend=backend)
    assert out.abs().max() > 0.1 * float(scale)  # O(1) cosines, not the overflowed norm's 0


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("side", ["x", "protos"])
@pytest.mark.parametrize("eps_mode", ["clamp", "add"])
def test_huge_rows_under_aligned_gradients(device, backend, side, eps_mode, generator):
    """float32 rows of norm ~4e37 (x, or protos) against small rows on the other side, under the gradient g = cos
    itself: <x, A> = |x| sum_c g[n, c] cos[n, c] ~ 16 |x| (A = sum_c g ip p, C = 16 D) is past float32's range
    while every result is O(1). The backwards take it of x ix, never of x (nor x * G in Triton's grad_scale
    partials)."""
    N = C = 256
    D = 16
    x, p = make_inputs((N,), C, D, torch.float32, device, generator, 1e37, 1e-3)
    if side == "protos":
        x, p = p, x
    eps = EPS if eps_mode == "clamp" else ADD_EPS
    scale = make_scale("tensor", torch.float32, device, generator)
    fn = lambda *a: reference.cosine_logits(*a, eps=eps, eps_mode=eps_mode)  # noqa: E731
    grad_out = fn(x.double(), p.double(), 1.0)  # g = cos
    huge, small = (x, p) if side == "x" else (p, x)
    aligned = (grad_out if side == "x" else grad_out.T) @ (small.double() * inverse_norms(small, eps, eps_mode)[:, None])
    assert (huge.double() * aligned).sum(-1).abs().max() > torch.finfo(torch.float32).max  # the rule itself
    exact_out, exact_grads = run(fn, x.double(), p.double(), scale.double(), grad_out)
    out, grads = run(lambda *a: zslfast.cosine_logits(*a, eps=eps, eps_mode=eps_mode, backend=backend), x, p, scale,
                     grad_out)
    _, atol = TOLERANCES[torch.float32]
    names = ["out", "grad_x", "grad_protos", "grad_scale"]
    sizes = natural_sizes(x, p, scale, grad_out, eps, eps_mode)
    for name, got, want, size in zip(names, (out, *grads), (exact_out, *exact_grads), sizes):
        err = (got.double() - want).abs()
        assert err.le(atol * size).all(), f"{name} off by {err.max().item():.3g} (tolerance {atol} x size)"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_huge_row_leaves_other_rows_bit_identical(device, backend, generator):
    """The rescaled norm is a rare branch: rows whose sum of squares is finite get bit-for-bit what they get in a
    batch without any huge row (their logits and grad_x rows), also in the same Triton program."""
    x, p = make_inputs((20,), 30, 48, torch.float32, device, generator)
    scale = make_scale("tensor", torch.float32, device, generator)
    g = torch.randn(20, 30, generator=generator).to(device)
    huge = x.clone()
    huge[7] *= 1e30
    normal = [i for i in range(20) if i != 7]
    results = []
    for inputs in (x, huge):
        out, grads = run(lambda *a: zslfast.cosine_logits(*a, backend=backend), inputs, p, scale, g)
        results.append((out[normal], grads[0][normal]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# eps_mode="add": GEM-ZSL's base_module and PSVMA's compute_score normalise as x / (|x| + 1e-5).
ADD_EPS = 1e-5


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("lead,C,D,scale_kind", CASES, ids=[f"x{c[0]}-C{c[1]}-D{c[2]}-{c[3]}" for c in CASES])
def test_add_mode_matches_reference(device, backend, lead, C, D, scale_kind, generator):
    """Outputs and the gradients of x, protos and a tensor scale, batch 1 and leading dims included; eps 1e-5 moves
    every cosine by ~1e-5 relative from the clamped one, so a kernel that clamps instead fails at 1e-10 and 1e-5."""
    for dtype in dtypes_for(device, backend):
        x, p = make_inputs(lead, C, D, dtype, device, generator)
        scale = make_scale(scale_kind, dtype, device, generator)
        assert_matches_reference(x, p, scale, backend, dtype, generator, eps=ADD_EPS, eps_mode="add")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_add_mode_small_norms_and_default_eps(device, backend, generator):
    """Norms of the order of eps, where clamp and add differ most, and the default eps 1e-8 with add."""
    for dtype in (torch.float64, torch.float32):
        x, p = make_inputs((9,), 6, 20, dtype, device, generator, x_magnitude=1e-5, p_magnitude=3e-6)
        scale = make_scale("tensor", dtype, device, generator)
        assert_matches_reference(x, p, scale, backend, dtype, generator, eps=ADD_EPS, eps_mode="add")
        x, p = make_inputs((9,), 6, 20, dtype, device, generator)
        assert_matches_reference(x, p, scale, backend, dtype, generator, eps=EPS, eps_mode="add")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_add_mode_zero_and_tiny_rows(device, backend, generator):
    """A zero row gives 0 logits and the gradient A / eps (the projection term's limit is 0); rows far below eps
    are scaled by ~1 / eps. Both match the reference, and every gradient is finite."""
    for dtype in (torch.float64, torch.float32):
        x, p = make_inputs((6,), 8, 33, dtype, device, generator)
        x[1] = 0
        x[4] *= 1e-11
        p[2] = 0
        p[5] *= 1e-11
        scale = make_scale("tensor", dtype, device, generator)
        assert_matches_reference(x, p, scale, backend, dtype, generator, eps=ADD_EPS, eps_mode="add")
        grad_out = torch.randn(6, 8, generator=generator, dtype=torch.float64).to(device, dtype)
        run_add = lambda *a: zslfast.cosine_logits(*a, eps=ADD_EPS, eps_mode="add", backend=backend)  # noqa: E731
        out, grads = run(run_add, x, p, scale, grad_out)
        assert not out[1].any() and not out[:, 2].any()
        assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_add_mode_matches_gem_zsl_eager_code(device, backend, generator):
    """The papers' own formula, x / (x.norm(dim=-1, keepdim=True) + 1e-5) (zslfast.baselines), to ~1e-15 in float64,
    outputs and gradients; a zero row included (its eager norm's gradient is 0 as well)."""
    x, p = make_inputs((2, 7), 9, 31, torch.float64, device, generator)
    x[0, 3] = 0
    scale = torch.tensor(12.5, dtype=torch.float64, device=device)
    grad_out = torch.randn(2, 7, 9, generator=generator, dtype=torch.float64).to(device)
    want_out, want_grads = run(baselines.cosine_logits_eps_added, x, p, scale, grad_out)
    got_out, got_grads = run(
        lambda *a: zslfast.cosine_logits(*a, eps=1e-5, eps_mode="add", backend=backend), x, p, scale, grad_out
    )
    torch.testing.assert_close(got_out, want_out, rtol=1e-14, atol=1e-14)
    # Relative to each row's natural size (natural_sizes: scale ix sum_c |g|, ~1e7 for the zero row, whose gradient
    # is scale A / eps): an entry of A = sum_c g ip p that cancels keeps only the sum's rounding. 10 float64 eps of
    # it: the CPU kernel reached 0.9 eps over 1,000 seeds, Triton 0.7 over 300 (rtol 1e-12 of the entry itself
    # failed the CPU kernel on 2 seeds of 1,000, e.g. 328).
    sizes = natural_sizes(x, p, scale, grad_out, eps=1e-5, eps_mode="add")[1:]
    for name, got, want, size in zip(["grad_x", "grad_protos", "grad_scale"], got_grads, want_grads, sizes):
        err = (got - want).abs()
        assert err.le(10 * torch.finfo(torch.float64).eps * size).all(), f"{name} off by {err.max().item():.3g}"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_clamp_mode_is_the_default(device, backend, generator):
    x, p = make_inputs((5,), 4, 9, torch.float64, device, generator)
    x[2] *= 1e-9
    default = zslfast.cosine_logits(x, p, 2.0, backend=backend)
    assert torch.equal(default, zslfast.cosine_logits(x, p, 2.0, eps_mode="clamp", backend=backend))
    assert not torch.equal(default, zslfast.cosine_logits(x, p, 2.0, eps=EPS, eps_mode="add", backend=backend))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("eps_mode", ["Add", "max", "", None, 1])
def test_bad_eps_mode(device, backend, eps_mode):
    x, p = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(ValueError, match=r"cosine_logits: eps_mode must be one of \('clamp', 'add'\)"):
        zslfast.cosine_logits(x, p, eps_mode=eps_mode, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_magnitude,p_magnitude", HUGE, ids=[f"x{a:g}-p{b:g}" for a, b in HUGE])
def test_add_mode_huge_values_do_not_overflow(device, backend, x_magnitude, p_magnitude, generator):
    """The add mode keeps the clamp mode's care: norms past float32's squared range, and 1 / |x| read off ix ~ 1e-30
    (1 - eps * ix rounds to 1 there, never to 0)."""
    x, p = make_inputs((2, 25), 9, 64, torch.float32, device, generator, x_magnitude, p_magnitude)
    x[0, 3] *= 1e-6
    p[4] /= max(x_magnitude, p_magnitude)
    scale = make_scale("tensor", torch.float32, device, generator)
    assert_matches_reference(x, p, scale, backend, torch.float32, generator, eps=ADD_EPS, eps_mode="add")
    out = zslfast.cosine_logits(x, p, scale, eps=ADD_EPS, eps_mode="add", backend=backend)
    assert out.abs().max() > 0.1 * float(scale)
