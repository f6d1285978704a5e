"""The contract every op keeps, run over every op record of zslfast.testing: one battery instead of a copy per op.

For each op and each of its kernel backends that runs here, in float64 at the record's small shape unless said
otherwise, with the default options and with each of the record's variants:

- the papers' code: the op equals its eager baseline (zslfast.baselines), values and gradients, on every backend
  and the reference one (a second oracle beside the reference);
- gradcheck: the gradients equal finite differences (Triton through the interpreter: a random projection);
- opcheck: every zslfast op the call reaches, forward and backward, without gradients, with every gradient and
  with the first input's alone (schema, fake kernel, autograd registration, AOT dispatch);
- torch.compile(fullgraph=True) of one function calling every option set gives eager's loss and gradients;
- autocast: the spec's rule (lower, fp32 or none) sets the output dtype, mixed dtypes in; the result is close to
  the reference on the inputs as autocast cast them, and the gradients keep their inputs' dtypes;
- non-contiguous inputs (storage in reversed dimension order, a strided last dimension) give the results of
  contiguous ones; two calls give bit-identical results; the CPU kernels' results do not depend on the thread
  count (at the record's thread shapes, float32 and float64);
- backends: each backend runs its own kernel (the reference backend the reference), also through ZSLFAST_BACKEND;
  an unknown name is a ValueError, a backend without a kernel for these tensors a BackendUnavailableError.

Each op's own math (shapes, options, edge values, precision) stays in its own test file.
"""

import pytest
import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import TorchDispatchMode

import zslfast
from zslfast import _backend
from zslfast.testing import RECORDS

from helpers import (
    assert_compiles_like_eager, backend_param, low_precision_error_bound, require_backend, requires_gpu, threads,
)

OPS = list(RECORDS.values())
OP_IDS = [op.name for op in OPS]
f64 = torch.float64


def kernel_cases():
    """(op, device, backend) of every kernel of every op, as params (a composite op: its one implementation on
    each device); those that cannot run here skip with the reason."""
    params = []
    for op in OPS:
        backends = tuple(op.spec.kernels) if op.spec.kernels else ("cpu", "cuda")
        for device, backend in (("cpu", "cpu"), ("cpu", "triton"), ("cuda", "triton"), ("cuda", "cuda")):
            if backend in backends:
                params.append(pytest.param(op, device, backend, id=f"{op.name}-{device}-{backend}",
                                           marks=backend_param(backend, device).marks))
    return params


KERNELS = kernel_cases()
DEVICES = ["cpu", pytest.param("cuda", marks=requires_gpu)]


def option_sets(op):
    return ({},) + op.variants


def outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def results(op, inputs, backend=None, options=None, requires_grad=True, fn=None):
    """[outputs..., gradients of the differentiable inputs...] of one call (of the op, or of ``fn``: its eager
    code), for fixed random output gradients."""
    leaves = [t.detach().requires_grad_(requires_grad and op.differentiates(i, t)) for i, t in enumerate(inputs)]
    outs = outputs(fn(*leaves) if fn is not None else op.fused(*leaves, backend=backend, **(options or {})))
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=f64).to(o)).sum() for o in outs)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()  # score=None leaves ref unused
    return [o.detach() for o in outs] + [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


def assert_close_all(got, want, rtol=1e-9, what=""):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i, g.dtype, w.dtype, g.shape, w.shape)
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * max(1.0, w.abs().max().item()), msg=f"{what} [{i}]")


def assert_equal_all(got, want, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"{what} [{i}] differs by {(g.double() - w.double()).abs().max().item():.3g}"


def small_inputs(op, device, generator, dtype=f64, shape=None):
    """The op's inputs at ``shape`` (default its small one), drawn on CPU from the case's seed."""
    return [t.to(device) for t in op.make(shape or op.small, dtype, "cpu", generator)]


# ------------------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("op,device,backend", KERNELS + [
    pytest.param(op, "cpu", "reference", id=f"{op.name}-cpu-reference") for op in OPS])
def test_matches_the_papers_code(op, device, backend, generator):
    """The op at the papers' options equals their own eager code, values and gradients."""
    inputs = small_inputs(op, device, generator)
    leaves = [t.detach().requires_grad_(op.differentiates(i, t)) for i, t in enumerate(inputs)]
    want_out = op.eager(*leaves)
    grad = torch.randn(want_out.shape, generator=generator, dtype=f64).to(device)
    wrt = [t for t in leaves if t.requires_grad]
    want = [want_out.detach(), *torch.autograd.grad(want_out, wrt, grad)]
    got_out = op.fused(*leaves, backend=backend)
    got = [got_out.detach(), *torch.autograd.grad(got_out, wrt, grad)]
    assert_close_all(got, want)


@pytest.mark.parametrize("op,device,backend", [p for p in KERNELS if tuple(p.values[1:]) == ("cuda", "triton")])
def test_tf32_products_stay_within_twice_the_eager_codes_error(op, device, backend, generator):
    """Under torch's allow_tf32 (set_float32_matmul_precision("high")) the Triton kernels form fp32 products in TF32,
    as the eager code's matmuls then do: outputs and gradients within 2x the eager code's error there (the float64
    result the measure)."""
    inputs = small_inputs(op, device, generator)
    exact = results(op, inputs, "reference")
    f32 = [t.float() if t.is_floating_point() else t for t in inputs]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got, eager = results(op, f32, backend), results(op, f32, fn=op.eager)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for i, (g, e, x) in enumerate(zip(got, eager, exact)):
        err, bound = low_precision_error_bound(g, e, x)
        assert err <= bound, f"[{i}] error {err:.3g} > 2x the eager code's in TF32 ({bound:.3g})"


@pytest.mark.parametrize("op,device,backend", KERNELS)
def test_gradcheck(op, device, backend, generator):
    inputs = small_inputs(op, device, generator)
    wrt = [i for i, t in enumerate(inputs) if op.differentiates(i, t)]
    for options in option_sets(op):
        def fn(*diff):
            full = list(inputs)
            for i, t in zip(wrt, diff):
                full[i] = t
            return op.fused(*full, backend=backend, **options)

        diff = [inputs[i].detach().requires_grad_() for i in wrt]
        # The interpreter runs each Triton call slowly: a random projection of the Jacobian there (fast_mode).
        assert torch.autograd.gradcheck(fn, diff, fast_mode=backend == "triton"), options


# ----------------------------------------------------------------------------------------- the registration
class ZslfastCalls(TorchDispatchMode):
    """Records every public zslfast op called (forward and backward) with copies of its arguments."""

    def __init__(self, forward: str):
        super().__init__()
        self.forward, self.calls = forward, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("zslfast::") and not name.startswith("zslfast::_"):
            keep_grad = name == self.forward  # a backward op has no autograd of its own

            def copy(a):
                if not isinstance(a, torch.Tensor):
                    return a
                return a.detach().clone().requires_grad_(keep_grad and a.requires_grad)

            args_copy, kwargs_copy = tree_map(copy, args), tree_map(copy, kwargs)
            key = (name, repr(tree_map(lambda a: (a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else a,
                                       (args_copy, kwargs_copy))))
            self.calls.setdefault(key, (func, args_copy, kwargs_copy))
        return func(*args, **kwargs)


@pytest.mark.parametrize("op,device,backend", KERNELS)
def test_opcheck(op, device, backend, generator):
    inputs = [t.to(torch.float32) if t.is_floating_point() else t
              for t in small_inputs(op, device, generator)]
    first = next(i for i, t in enumerate(inputs) if op.differentiates(i, t))
    with ZslfastCalls(f"zslfast::{op.spec.name}") as recorder:
        for n, options in enumerate(option_sets(op)):
            results(op, inputs, backend, options, requires_grad=False)
            results(op, inputs, backend, options)
            if n == 0:  # only the first input's gradient: the backward's output mask
                partial = [t.detach().requires_grad_(i == first) for i, t in enumerate(inputs)]
                out = outputs(op.fused(*partial, backend=backend))[0]
                torch.autograd.grad(out.sum(), partial[first])
    assert any(name == f"zslfast::{op.spec.name}" for name, _ in recorder.calls), list(recorder.calls)
    for func, args, kwargs in recorder.calls.values():
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_compile_fullgraph(op, device, generator):
    """torch.compile(fullgraph=True) of a loss on the op, one graph per option set: no graph break, eager's loss and
    gradients. (One graph of two rollouts, residual with max heads and the full matrix with min heads and
    normalize="none", gets wrong gradients from inductor on torch 2.11 where aot_eager gets them right.)"""
    inputs = small_inputs(op, device, generator, torch.float32)
    wrt = [i for i, t in enumerate(inputs) if op.differentiates(i, t)]
    for options in option_sets(op):
        def loss(*diff):
            full = list(inputs)
            for i, t in zip(wrt, diff):
                full[i] = t
            return sum(o.square().sum() for o in outputs(op.fused(*full, **options)))

        assert_compiles_like_eager(loss, [inputs[i].detach().requires_grad_() for i in wrt])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_autocast(op, device, generator):
    """Under autocast the spec's rule decides: "lower" casts to the autocast dtype (but the positions it keeps),
    "fp32" to float32, None leaves the inputs alone; mixed dtypes in give one dtype out."""
    require_backend("cpu" if device == "cpu" else op.gpu_backends[0], device)  # the registered op's autocast rule
    low = torch.bfloat16 if device == "cpu" else torch.float16
    rule = op.spec.autocast
    inputs = small_inputs(op, device, generator, torch.float32, op.tiny)
    floating = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.dim() > 0]
    if rule is not None:
        inputs[floating[1]] = inputs[floating[1]].to(low)  # mixed dtypes in
    target = {"lower": low, "fp32": torch.float32, None: torch.float32}[rule]

    def as_autocast(i, t):
        return t if rule is None or i in op.spec.autocast_keep or not t.is_floating_point() else t.to(target)

    leaves = [t.detach().requires_grad_(op.differentiates(i, t)) for i, t in enumerate(inputs)]
    with torch.autocast(device_type=device, dtype=low):
        out = op.fused(*leaves)
    assert out.dtype == target
    want = op.reference(*(as_autocast(i, t).double() if t.is_floating_point() else t for i, t in enumerate(inputs)))
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    wrt = [t for t in leaves if t.requires_grad]
    for t, g in zip(wrt, torch.autograd.grad(out.float().sum(), wrt)):
        assert g.dtype == t.dtype and g.isfinite().all()


# --------------------------------------------------------------------------------------------- the layouts
def reversed_storage(t):
    """The same values stored in reversed dimension order (a transposed matrix)."""
    if t.dim() < 2:
        return strided(t)
    dims = tuple(reversed(range(t.dim())))
    return t.permute(dims).contiguous().permute(dims)


def strided(t):
    """The same values every other element of a wider last dimension."""
    return t if t.dim() == 0 else torch.stack((t, torch.zeros_like(t)), dim=-1)[..., 0]


@pytest.mark.parametrize("op,device,backend", KERNELS)
def test_non_contiguous_inputs(op, device, backend, generator):
    inputs = small_inputs(op, device, generator, shape=op.tiny)
    for layout in (reversed_storage, strided):
        laid = [layout(t) for t in inputs]
        assert all(not t.is_contiguous() for t in laid if t.numel() > 1 and max(t.shape) < t.numel()), layout
        for options in option_sets(op):
            assert_close_all(results(op, laid, backend, options), results(op, inputs, backend, options),
                             what=f"{layout.__name__} {options}")


@pytest.mark.parametrize("op,device,backend", KERNELS)
def test_deterministic(op, device, backend, generator):
    """Two calls, bit-identical outputs and gradients (reductions over the batch run in a fixed order)."""
    inputs = small_inputs(op, device, generator, torch.float32, op.tiny)
    for options in option_sets(op):
        assert_equal_all(results(op, inputs, backend, options), results(op, inputs, backend, options), str(options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [op for op in OPS if op.threads], ids=[op.name for op in OPS if op.threads])
def test_cpu_results_do_not_depend_on_thread_count(op, dtype, generator):
    """Bitwise the same with 1 and 2 threads: a multithreaded BLAS splits its reductions by thread count, so the
    CPU kernels run their GEMMs in fixed single-threaded blocks."""
    require_backend("cpu")
    for shape in op.threads:
        inputs = small_inputs(op, "cpu", generator, dtype, shape)
        for options in option_sets(op) if shape == op.threads[0] else ({},):
            with threads(1):
                one = results(op, inputs, "cpu", options)
            with threads(2):
                two = results(op, inputs, "cpu", options)
            assert_equal_all(one, two, f"{shape} {options}")


# -------------------------------------------------------------------------------------------- the backends
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_each_backend_runs_its_own_kernel(op, generator, monkeypatch):
    """backend= (and ZSLFAST_BACKEND, for backend=None) runs the named backend's kernels and no other: "cpu" the
    compiled kernels of zslfast._C (torch.ops.zslfast._*), "triton" Triton launches, "reference" zslfast.reference
    (a composite op runs torch ops on every kernel backend: none of them)."""
    ran = set()

    def recording(name, fn):
        def call(*args, **kwargs):
            ran.add(name)
            return fn(*args, **kwargs)

        return call

    for raw in sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("zslfast::_")):
        monkeypatch.setattr(torch.ops.zslfast, raw, recording("cpu", getattr(torch.ops.zslfast, raw)))
    if _backend.TRITON_ERROR is None:
        from zslfast.triton import _launch

        monkeypatch.setattr(_launch.Launch, "__call__", recording("triton", _launch.Launch.__call__))
    monkeypatch.setattr(zslfast.reference, op.name, recording("reference", getattr(zslfast.reference, op.name)))
    inputs = small_inputs(op, "cpu", generator)
    for backend in [b for b in op.spec.backends if _backend.why_unavailable(b, torch.device("cpu")) is None]:
        want = {backend} if backend == "reference" or op.spec.kernels else set()
        for chosen, environment in ((backend, ""), (None, backend)):
            monkeypatch.setenv("ZSLFAST_BACKEND", environment)
            ran.clear()
            op.fused(*inputs, backend=chosen)
            assert ran == want, (chosen, environment, ran)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_bad_backend(op, generator):
    inputs = small_inputs(op, "cpu", generator)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        op.fused(*inputs, backend="tpu")
    # CPU tensors: an op with CUDA kernels names the device, one without names the missing kernel
    message = "runs on CUDA tensors" if "cuda" in op.spec.backends else "no 'cuda' kernel"
    with pytest.raises(zslfast.BackendUnavailableError, match=message):
        op.fused(*inputs, backend="cuda")
