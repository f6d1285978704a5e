"""attention_rollout against the reference (outputs and gradients): both modes x every head fusion x cls_only/full,
list and tensor inputs, N = 2..577, L = 1..24, start_layer, float64/float32 on CPU, float32 Triton under the
interpreter, fp16/bf16 on GPU; gradcheck, opcheck, torch.compile(fullgraph=True), bad input; NaN in a map and
thread-count independence of the CPU backend (issue 16).

    attns (L, B, H, N, N) or L x (B, H, N, N) -> (B, N) when cls_only, else (B, N, N)
"""

import pytest
import torch

import zslfast
from zslfast import reference

from conftest import DEVICE_BACKENDS, HAS_GPU, dtypes_for, low_precision_error_bound

MODES = ["abnar", "residual"]
FUSIONS = ["mean", "sum", "max", "min"]


def make_maps(L, B, H, N, dtype, device, generator, as_tensor=False, softmax=True):
    logits = torch.randn(L, B, H, N, N, generator=generator, dtype=torch.float64) * 2
    maps = logits.softmax(-1) if softmax else logits.abs()
    maps = maps.to(device=device, dtype=dtype)
    return maps if as_tensor else list(maps.unbind(0))


def rollout_and_grads(fn, maps, grad_out=None):
    """Output and the gradient of every layer (zeros for skipped layers); a 5-D tensor input stays one tensor."""
    if isinstance(maps, torch.Tensor):
        leaves = [maps.detach().requires_grad_()]
        out = fn(leaves[0])
    else:
        leaves = [m.detach().requires_grad_() for m in maps]
        out = fn(leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    if isinstance(maps, torch.Tensor):
        grads = list(grads[0].unbind(0))
    return out, grads, grad_out


def check(maps, backend, dtype, mode, fusion, start_layer=0, cls_only=True):
    exact, exact_grads, g = rollout_and_grads(
        lambda m: reference.attention_rollout(m, mode, fusion, start_layer, cls_only), maps.double()
        if isinstance(maps, torch.Tensor) else [m.double() for m in maps]
    )
    out, grads, _ = rollout_and_grads(
        lambda m: zslfast.attention_rollout(m, mode=mode, head_fusion=fusion, start_layer=start_layer, cls_only=cls_only, backend=backend),
        maps,
        g,
    )
    assert out.dtype == dtype and out.shape == exact.shape
    if dtype in (torch.float64, torch.float32):
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        scale = exact.abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * scale)
        for got, want in zip(grads, exact_grads):
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().clamp_min(1.0).item())
        return
    low, low_grads, _ = rollout_and_grads(
        lambda m: reference.attention_rollout(m, mode, fusion, start_layer, cls_only), maps, g
    )
    err, bound = low_precision_error_bound(out, low, exact)
    assert err <= bound, f"{dtype} rollout error {err:.3g} > 2x eager's {bound:.3g}"
    for got, lo, want in zip(grads[start_layer:], low_grads[start_layer:], exact_grads[start_layer:]):
        err, bound = low_precision_error_bound(got, lo, want)
        assert err <= max(bound, torch.finfo(dtype).eps * want.abs().max().item()), f"{dtype} gradient error {err:.3g}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(device, backend, mode, fusion, generator):
    for dtype in dtypes_for(device, backend):
        for L, B, H, N in [(1, 1, 1, 2), (3, 2, 3, 17), (4, 3, 2, 40)]:
            maps = make_maps(L, B, H, N, dtype, device, generator)
            check(maps, backend, dtype, mode, fusion)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_start_layer_tensor_input_and_full_matrix(device, backend, mode, generator):
    for dtype in (torch.float64, torch.float32):
        maps = make_maps(5, 2, 3, 11, dtype, device, generator, as_tensor=True)
        check(maps, backend, dtype, mode, "mean", start_layer=2)
        check(maps, backend, dtype, mode, "max", start_layer=4, cls_only=False)
        check(list(maps), backend, dtype, mode, "sum", cls_only=False)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("L,N", [(24, 5), (2, 197), (1, 577)])
def test_deep_and_wide(device, backend, L, N, generator):
    """ViT depths up to 24 layers and token counts up to 577 (ViT-B/16 at 384^2)."""
    if backend == "triton" and device == "cpu" and N == 577:
        maps = make_maps(L, 1, 1, N, torch.float32, device, generator)
    else:
        maps = make_maps(L, 2, 2, N, torch.float32, device, generator)
    for mode in MODES:
        check(maps, backend, torch.float32, mode, "mean")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_unnormalised_maps(device, backend, generator):
    """Rows that do not sum to one (e.g. gradients x attention, Chefer et al.) are normalised by their own sums."""
    maps = make_maps(3, 2, 2, 9, torch.float64, device, generator, softmax=False)
    for mode in MODES:
        check(maps, backend, torch.float64, mode, "mean")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradcheck(device, backend, generator):
    maps = [m.requires_grad_() for m in make_maps(2, 1, 2, 3, torch.float64, device, generator)]
    for mode in MODES:
        for fusion in ("mean", "max"):
            assert torch.autograd.gradcheck(
                lambda *m: zslfast.attention_rollout(list(m), mode=mode, head_fusion=fusion, backend=backend), maps
            )


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, generator):
    maps = make_maps(2, 2, 2, 5, torch.float32, device, generator)
    for mode in MODES:
        torch.library.opcheck(torch.ops.zslfast.attention_rollout_cls.default, ([m.requires_grad_() for m in maps], mode, "mean", backend))


def test_compile_fullgraph(generator):
    torch._dynamo.reset()
    maps = [m.requires_grad_() for m in make_maps(3, 2, 2, 6, torch.float32, "cpu", generator)]

    @torch.compile(fullgraph=True)
    def patch_scores(maps):
        return zslfast.attention_rollout(maps, mode="abnar")[:, 1:].sum()

    got = torch.autograd.grad(patch_scores(maps), maps)
    want = torch.autograd.grad(reference.attention_rollout(maps)[:, 1:].sum(), maps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_vit_explain_normalisation_is_not_ours(generator):
    """vit-explain's `a / a.sum(dim=-1)` (no keepdim) divides columns by row sums for B=1: zslfast divides rows."""
    maps = make_maps(1, 1, 1, 6, torch.float64, "cpu", generator, softmax=False)
    a = maps[0].mean(1) + torch.eye(6, dtype=torch.float64)
    vit_explain = a / a.sum(dim=-1)
    ours = zslfast.attention_rollout(maps, cls_only=False)
    torch.testing.assert_close(ours.sum(-1), torch.ones(1, 6, dtype=torch.float64))
    assert not torch.allclose(vit_explain, ours)


def test_backend_without_kernel_is_refused(generator):
    maps = make_maps(1, 1, 1, 3, torch.float32, "cpu", generator)
    with pytest.raises(zslfast.BackendUnavailableError, match="no 'cuda' kernel"):
        zslfast.attention_rollout(maps, backend="cuda")


@pytest.mark.parametrize(
    "maps,kwargs,error,words",
    [
        ([torch.rand(2, 3, 5, 5), torch.rand(2, 3, 6, 6)], {}, ValueError, ["attns[1]", "(2, 3, 6, 6)", "(2, 3, 5, 5)"]),
        ([torch.rand(2, 3, 5, 5), torch.rand(1, 3, 5, 5)], {}, ValueError, ["attns[1]", "(1, 3, 5, 5)"]),
        ([torch.rand(2, 3, 5, 4)], {}, ValueError, ["square", "(2, 3, 5, 4)"]),
        (torch.rand(2, 3, 5, 5), {}, ValueError, ["(L, B, H, N, N)", "4-D"]),
        ([], {}, ValueError, ["no layers"]),
        ([torch.ones(1, 1, 2, 2, dtype=torch.long)], {}, TypeError, ["attns[0]", "floating-point"]),
        ([torch.rand(1, 1, 2, 2)], {"mode": "chefer"}, ValueError, ["mode", "chefer"]),
        ([torch.rand(1, 1, 2, 2)], {"head_fusion": "median"}, ValueError, ["head_fusion", "median"]),
        ([torch.rand(1, 1, 2, 2)] * 3, {"start_layer": 3}, ValueError, ["start_layer", "L=3"]),
        ("maps", {}, TypeError, ["attns", "str"]),
    ],
)
def test_bad_input(maps, kwargs, error, words):
    with pytest.raises(error) as info:
        zslfast.attention_rollout(maps, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------ issue 16: NaN
ALL_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference"), *DEVICE_BACKENDS]

# (layer, instance, head, row, column) of the NaN in L=3, B=2, H=3, N=7 maps. The kernels walk abnar's layers 2, 1, 0
# and residual's 0, 1, 2, from v = e_0, so the first map they read is only read in row 0. The output depends on each
# of these (the last one per mode: a row other than 0 of the map that mode reads last).
NAN_AT = [(1, 0, 1, 2, 3), (0, 1, 0, 0, 4), (2, 1, 2, 0, 1), (1, 1, 0, 6, 6)]
NAN_LAST_READ = {"abnar": (0, 0, 2, 5, 0), "residual": (2, 0, 2, 5, 0)}
# In the map each mode reads first, a row other than 0 that the output does not depend on.
NAN_UNREAD = {"abnar": (2, 0, 1, 3, 2), "residual": (0, 0, 2, 4, 4)}


def _maps_with_nan(at, device, generator):
    maps = make_maps(3, 2, 3, 7, torch.float64, device, generator, as_tensor=True)
    maps[at] = float("nan")
    return maps


def _same_nan(got, want, what):
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{what}: NaN at {got.isnan().sum().item()} entries, the reference at {want.isnan().sum().item()}"
    )
    torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_nan_reaches_what_depends_on_it(device, backend, mode, fusion, generator):
    """A NaN in a map: the output and the gradient of every map are NaN exactly where the reference's are, for every
    head fusion (max/min propagate NaN as torch.max/amax: std::max and tl.maximum's default drop it, which gave a
    finite output but a NaN gradient, since the backward's torch.max selects the NaN head)."""
    for at in NAN_AT + [NAN_LAST_READ[mode], NAN_UNREAD[mode]]:
        maps = _maps_with_nan(at, device, generator)
        exact, exact_grads, g = rollout_and_grads(lambda m: reference.attention_rollout(m, mode, fusion), maps)
        out, grads, _ = rollout_and_grads(
            lambda m: zslfast.attention_rollout(m, mode=mode, head_fusion=fusion, backend=backend), maps, g
        )
        _same_nan(out, exact, f"{at} output")
        if at in NAN_UNREAD.values():
            # Not read at all: a finite output everywhere; the gradients (the op's backward, the same for every
            # kernel backend) are those of the maps without the NaN outside its row, where abnar's v / r is 0 / NaN
            # (the reference's full products spread 0 * NaN further: see zslfast/ops/attention_rollout.py).
            assert out.isfinite().all()
            if backend != "reference":
                clean, clean_grads, _ = rollout_and_grads(
                    lambda m: zslfast.attention_rollout(m, mode=mode, head_fusion=fusion, backend=backend),
                    maps.nan_to_num(0.5), g,
                )
                assert torch.equal(out, clean)
                layer, b, _, row, _ = at
                for l, (got, want) in enumerate(zip(grads, clean_grads)):
                    keep = torch.ones_like(got, dtype=torch.bool)
                    if l == layer and mode == "abnar":
                        keep[b, :, row] = False
                    assert torch.equal(got[keep], want[keep])
            continue
        for l, (got, want) in enumerate(zip(grads, exact_grads)):
            _same_nan(got, want, f"{at} gradient of layer {l}")


@pytest.mark.parametrize("fusion", ["max", "min"])
def test_fused_head_attention_selects_nan_like_torch_max(fusion, generator):
    """zslfast.nn's head fusion of softmax(q k^T) maps (one head at a time) picks the first NaN head as torch.max /
    min(dim) do: the same NaN values as reference.fuse_heads, and the gradient routed to the same head."""
    from zslfast.ops.attention_rollout import fused_head_attention

    B, H, N, d = 2, 4, 5, 8
    q = torch.randn(B, H, N, d, generator=generator, dtype=torch.float64)
    k = torch.randn(B, H, N, d, generator=generator, dtype=torch.float64)
    q[0, 2, 1, 3] = float("nan")  # head 2's row 1 of instance 0: NaN probabilities
    k[1, 1, 4, 0] = float("nan")  # head 1's column 4 of instance 1: NaN in every row
    scale = d**-0.5
    g = torch.randn(B, N, N, generator=generator, dtype=torch.float64)

    def fused_ref(q, k):
        return reference.fuse_heads(((q * scale) @ k.transpose(-2, -1)).softmax(-1), fusion)

    results = []
    for fn in (fused_ref, lambda q, k: fused_head_attention(q, k, scale, fusion)):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, g)))
    for name, got, want in zip(["fused", "grad_q", "grad_k"], results[1], results[0]):
        _same_nan(got, want, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_results_do_not_depend_on_thread_count(dtype, generator):
    """Bitwise the same output and gradients with 1 and 2 threads, both modes, every head fusion."""
    from conftest import require_backend

    require_backend("cpu")
    maps = make_maps(3, 1, 2, 577, dtype, "cpu", generator)  # B = 1: MKL threads the GEMV of torch.bmm
    before = torch.get_num_threads()
    for mode in MODES:
        for fusion in FUSIONS:
            results = []
            g = torch.randn(1, 577, generator=generator, dtype=torch.float64)
            for n in (1, 2):
                torch.set_num_threads(n)
                try:
                    results.append(rollout_and_grads(
                        lambda m: zslfast.attention_rollout(m, mode=mode, head_fusion=fusion, backend="cpu"), maps, g
                    ))
                finally:
                    torch.set_num_threads(before)
            (out1, grads1, _), (out2, grads2, _) = results
            assert torch.equal(out1, out2), f"{mode} {fusion} output"
            for l, (a, b) in enumerate(zip(grads1, grads2)):
                assert torch.equal(a, b), f"{mode} {fusion} gradient of layer {l}"
