"""attention_rollout against the reference (outputs and gradients): both modes x every head fusion x cls_only/full,
list and tensor inputs, N = 2..577, L = 1..24, start_layer, float64/float32 on CPU, float32 Triton under the
interpreter, fp16/bf16 on GPU; bad input; NaN in a map. The papers' options: discard_ratio (against
vit-explain's discard written out per instance) and normalize="none" (against Transformer-Explainability's
compute_rollout_attention) on every backend, cls_only and full, non-contiguous and expanded input, bad values.
gradcheck, opcheck, torch.compile, layouts, determinism, thread counts and backends: test_contract.py.

    attns (L, B, H, N, N) or L x (B, H, N, N) -> (B, N) when cls_only, else (B, N, N)
"""

import pytest
import torch

import zslfast
from zslfast import reference

from helpers import (
    ALL_BACKENDS, DEVICE_BACKENDS, dtypes_for, exact_softmax_grad, low_precision_error_bound, softmax_grad_error_scale,
)

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


def check(maps, backend, dtype, mode, fusion, start_layer=0, cls_only=True, discard_ratio=0.0, normalize="row"):
    exact, exact_grads, g = rollout_and_grads(
        lambda m: reference.attention_rollout(m, mode, fusion, start_layer, cls_only, discard_ratio, normalize),
        maps.double() if isinstance(maps, torch.Tensor) else [m.double() for m in maps]
    )
    out, grads, _ = rollout_and_grads(
        lambda m: zslfast.attention_rollout(m, mode=mode, head_fusion=fusion, start_layer=start_layer, cls_only=cls_only,
                                            discard_ratio=discard_ratio, normalize=normalize, backend=backend),
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


def test_vit_explain_normalisation_is_not_ours(generator):
    """vit-explain's `a / a.sum(dim=-1)` (no keepdim) divides columns by row sums for B=1: zslfast divides rows."""
    maps = make_maps(1, 1, 1, 6, torch.float64, "cpu", generator, softmax=False)
    a = maps[0].mean(1) + torch.eye(6, dtype=torch.float64)
    vit_explain = a / a.sum(dim=-1)
    ours = zslfast.attention_rollout(maps, cls_only=False)
    torch.testing.assert_close(ours.sum(-1), torch.ones(1, 6, dtype=torch.float64))
    assert not torch.allclose(vit_explain, ours)


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
        ([torch.rand(1, 1, 2, 2)], {"normalize": "col"}, ValueError, ["normalize", "col"]),
        ([torch.rand(1, 1, 2, 2)], {"discard_ratio": 1.0}, ValueError, ["discard_ratio", "[0, 1)"]),
        ("maps", {}, TypeError, ["attns", "str"]),
    ],
)
def test_bad_input(maps, kwargs, error, words):
    with pytest.raises(error) as info:
        zslfast.attention_rollout(maps, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------------- NaN in a map
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
    from zslfast.nn.rollout import fused_head_attention

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


def test_fused_head_attention_saturated_gradients(generator):
    """Near one-hot maps (whole-number q, k at scale 1: logits ~1e2-1e3, each row's top two >= 40 apart, the
    closest <= 60): the float32 q and k gradients of zslfast.nn's head fusion are within 4x float32's own rounding
    (helpers.softmax_grad_error_scale) of the softmax backward in 60-digit arithmetic; the
    textbook dS = P (dP - rowsum(P dP)) loses them (its top entry rounds to 0)."""
    from zslfast.nn.rollout import fused_head_attention

    B, H, N, d = 2, 2, 6, 8
    for _ in range(400):
        q = (torch.randn(B, H, N, d, generator=generator, dtype=torch.float64) * 20).round()
        k = (torch.randn(B, H, N, d, generator=generator, dtype=torch.float64) * 20).round()
        top2 = (q @ k.transpose(-2, -1)).topk(2, dim=-1).values
        if 40 <= (top2[..., 0] - top2[..., 1]).min() <= 60:
            break
    g = torch.randn(B, N, N, generator=generator, dtype=torch.float64)
    leaves = [q.float().requires_grad_(), k.float().requires_grad_()]
    got = torch.autograd.grad(fused_head_attention(*leaves, 1.0, "sum"), leaves, g.float())
    s = q @ k.transpose(-2, -1)
    ds = exact_softmax_grad(s, g[:, None].expand_as(s), -1)  # "sum": every head gets dL/dfused
    scale = softmax_grad_error_scale(s.softmax(-1), g.abs()[:, None].expand_as(s), -1)
    t = lambda x: x.transpose(-2, -1)  # noqa: E731
    for name, got_grad, exact, size in (("grad_q", got[0], ds @ k, scale @ k.abs()),
                                        ("grad_k", got[1], t(ds) @ q, t(scale) @ q.abs())):
        ratio = (got_grad.double() - exact).abs() / (torch.finfo(torch.float32).eps * size)
        assert ratio.max() <= 4.0, f"{name}: {ratio.max():.3g} x float32's rounding scale"


# ----------------------------------------------------------------------------- discard_ratio and normalize="none"
RATIOS = [0.0, 0.5, 0.9]


def _normalizes(mode):
    return ("row", "none") if mode == "abnar" else ("row",)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_options_match_reference(device, backend, mode, fusion, generator):
    """discard_ratio x normalize x cls_only, B = 1 and B > 1, odd N, float64 and float32: outputs and gradients."""
    for dtype in dtypes_for(device, backend):
        for L, B, H, N in [(2, 1, 2, 7), (3, 3, 3, 9)]:
            maps = make_maps(L, B, H, N, dtype, device, generator)
            for discard_ratio in RATIOS:
                for normalize in _normalizes(mode):
                    for cls_only in (True, False):
                        check(maps, backend, dtype, mode, fusion, cls_only=cls_only, discard_ratio=discard_ratio,
                              normalize=normalize)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_options_non_contiguous_and_start_layer(device, backend, generator):
    """A transposed view (columns strided), an expanded batch (stride 0) and a 5-D tensor with start_layer."""
    maps = make_maps(3, 2, 2, 11, torch.float64, device, generator, as_tensor=True)
    transposed = maps.transpose(-1, -2).contiguous().transpose(-1, -2)
    expanded = maps[:, :1].expand(3, 3, 2, 11, 11)
    assert not transposed.is_contiguous() and not expanded.is_contiguous()
    for mode in MODES:
        for normalize in _normalizes(mode):
            for cls_only in (True, False):
                check(list(transposed.unbind(0)), backend, torch.float64, mode, "max", cls_only=cls_only,
                      discard_ratio=0.9, normalize=normalize)
                check(list(expanded.unbind(0)), backend, torch.float64, mode, "mean", cls_only=cls_only,
                      discard_ratio=0.5, normalize=normalize)
                check(maps, backend, torch.float64, mode, "min", start_layer=1, cls_only=cls_only,
                      discard_ratio=0.5, normalize=normalize)


def _vit_explain_rollout(maps, discard_ratio, head_fusion, first_instance_only=False, keep_cls=True):
    """jacobgil/vit-explain's ``rollout`` written out, except that each instance is discarded with its own indices
    (``first_instance_only`` is vit-explain's own: instance 0 zeroed with every instance's indices pooled) and rows
    divided by their own sums (keepdim). ``keep_cls=False`` also drops flat index 0 (what zslfast must not do)."""
    result = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype).expand(maps[0].shape[0], -1, -1)
    for attention in maps:
        fused = getattr(attention, head_fusion)(dim=1)
        fused = (fused.values if head_fusion in ("max", "min") else fused).clone()
        flat = fused.view(fused.size(0), -1)
        k = int(flat.size(-1) * discard_ratio)
        if first_instance_only:
            _, indices = flat.topk(k, -1, False)
            indices = indices[indices != 0] if keep_cls else indices.flatten()
            flat[0, indices] = 0
        else:
            for b in range(flat.size(0)):
                _, indices = flat[b].topk(k, -1, False)
                if keep_cls:
                    indices = indices[indices != 0]
                flat[b, indices] = 0
        eye = torch.eye(fused.size(-1), dtype=fused.dtype)
        a = (fused + 1.0 * eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = torch.matmul(a, result)
    return result[:, 0]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("fusion", ["max", "mean"])
def test_discard_matches_vit_explain_per_instance(device, backend, fusion, generator):
    """vit-explain's discard (topk(largest=False) over the flattened fused map, flat index 0 dropped from it, the
    rest zeroed), for every instance; the CLS->CLS entry is the smallest of every map here and is kept."""
    maps = [m + 0.1 for m in make_maps(3, 3, 2, 9, torch.float64, device, generator, softmax=False)]
    for m in maps:
        m[:, :, 0, 0] = 0.05  # CLS->CLS the smallest entry of every fused map: topk selects it, zslfast keeps it
    for ratio in (0.5, 0.9):
        want = _vit_explain_rollout(maps, ratio, fusion)
        got = zslfast.attention_rollout(maps, head_fusion=fusion, discard_ratio=ratio, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        # the checks above are sensitive to both properties
        assert not torch.allclose(got, _vit_explain_rollout(maps, ratio, fusion, keep_cls=False))
        only_first = _vit_explain_rollout(maps, ratio, fusion, first_instance_only=True)
        assert not torch.allclose(got[1:], only_first[1:])
    # fewer than k go when index 0 is among the k smallest: the fused map keeps N*N - k + 1 nonzeros
    fused = reference.discard_lowest(reference.fuse_heads(maps[0], fusion), 0.5)
    assert (fused.flatten(1) != 0).sum(1).tolist() == [81 - 40 + 1] * 3


def test_discard_ties_follow_torch_topk():
    """Ties: the entries discarded are torch.topk's choice, for every instance."""
    fused = torch.tensor([[[0.5, 0.1, 0.1], [0.1, 0.1, 0.3], [0.2, 0.1, 0.4]]], dtype=torch.float64).repeat(2, 1, 1)
    fused[1] = fused[1].flip(-1)
    maps = [fused[:, None]]  # one head
    ratio = 0.4  # k = int(9 * 0.4) = 3 of the five 0.1 entries
    want = fused.clone()
    for b in range(2):
        idx = want[b].flatten().topk(3, largest=False).indices
        want[b].view(-1)[idx[idx != 0]] = 0
    assert torch.equal(reference.discard_lowest(fused, ratio), want)
    for backend in ["reference", "cpu", "triton"]:
        got = zslfast.attention_rollout(maps, head_fusion="sum", discard_ratio=ratio, cls_only=False, backend=backend)
        want_full = reference.attention_rollout([want[:, None]], "abnar", "sum", 0, False)
        torch.testing.assert_close(got, want_full, rtol=0, atol=1e-15)


def _transformer_explainability_rollout(all_layer_matrices, start_layer=0):
    """hila-chefer/Transformer-Explainability's ViT_LRP ``compute_rollout_attention`` (of the head-averaged maps)."""
    num_tokens = all_layer_matrices[0].shape[1]
    batch_size = all_layer_matrices[0].shape[0]
    eye = torch.eye(num_tokens).expand(batch_size, num_tokens, num_tokens).to(all_layer_matrices[0])
    all_layer_matrices = [all_layer_matrices[i] + eye for i in range(len(all_layer_matrices))]
    joint_attention = all_layer_matrices[start_layer]
    for i in range(start_layer + 1, len(all_layer_matrices)):
        joint_attention = all_layer_matrices[i].bmm(joint_attention)
    return joint_attention


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_normalize_none_matches_transformer_explainability(device, backend, generator):
    """normalize="none": products of (mean_h A + I) with bmm, no row normalisation, on relevance maps whose rows do
    not sum to 1 (outputs and gradients), start_layer included."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        maps = [m * 0.2 for m in make_maps(4, 2, 3, 9, dtype, device, generator, softmax=False)]
        for start_layer in (0, 2):
            for cls_only in (True, False):
                leaves = [m.clone().requires_grad_() for m in maps]
                joint = _transformer_explainability_rollout([m.sum(dim=1) / m.shape[1] for m in leaves], start_layer)
                want = joint[:, 0] if cls_only else joint
                want_grads = torch.autograd.grad(want[..., 1:].sum(), leaves, allow_unused=True)
                leaves = [m.clone().requires_grad_() for m in maps]
                got = zslfast.attention_rollout(leaves, start_layer=start_layer, cls_only=cls_only, normalize="none",
                                                backend=backend)
                got_grads = torch.autograd.grad(got[..., 1:].sum(), leaves, allow_unused=True)
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                for g, w in zip(got_grads, want_grads):
                    if w is None:
                        assert g is None or not g.any()
                    else:
                        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
                # not the row-normalised rollout: the flag reached the kernel
                assert not torch.allclose(got, zslfast.attention_rollout(maps, start_layer=start_layer,
                                                                         cls_only=cls_only, backend=backend))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"normalize": "col"}, ValueError, ["normalize", "'row', 'none'", "'col'"]),
        ({"normalize": None}, ValueError, ["normalize"]),
        ({"mode": "residual", "normalize": "none"}, ValueError, ["normalize", "abnar", "residual"]),
        ({"discard_ratio": 1.0}, ValueError, ["discard_ratio", "[0, 1)"]),
        ({"discard_ratio": -0.1}, ValueError, ["discard_ratio", "[0, 1)"]),
        ({"discard_ratio": float("nan")}, ValueError, ["discard_ratio", "finite"]),
        ({"discard_ratio": float("inf")}, ValueError, ["discard_ratio", "finite"]),
        ({"discard_ratio": True}, TypeError, ["discard_ratio", "bool"]),
        ({"discard_ratio": "0.9"}, TypeError, ["discard_ratio", "str"]),
        ({"discard_ratio": torch.tensor(0.9)}, TypeError, ["discard_ratio", "Tensor"]),
    ],
)
def test_bad_options_same_error_on_every_backend(device, backend, kwargs, error, words):
    with pytest.raises(error) as info:
        zslfast.attention_rollout([torch.rand(1, 1, 3, 3, device=device)], backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)

