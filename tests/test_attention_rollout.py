"""attention_rollout against the reference (outputs and gradients): both modes x every head fusion x cls_only/full,
list and tensor inputs, N = 2..577, L = 1..24, start_layer, float64/float32 on CPU, float32 Triton under the
interpreter, fp16/bf16 on GPU; gradcheck, opcheck, torch.compile(fullgraph=True), bad input.

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
