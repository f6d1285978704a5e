"""zslfast.nn.AttentionRollout against zslfast.reference.attention_rollout: forward over collected maps on every
backend (values and gradients, fp64 / fp32, both modes, four head fusions, cls_only, start_layer), from_model on a
tiny timm ViT (fused path = vit_attention_rollout, reference path = stored eager maps; both equal the reference on
maps captured independently), the ``backend`` attribute really switching the path, bad-input errors, and the
discard_ratio / normalize options (forward and from_model).
"""

import pytest
import torch

from helpers import DEVICE_BACKENDS, TOLERANCES
from zslfast import reference
from zslfast.nn import rollout as nn_rollout
from zslfast.nn import AttentionRollout

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

MODES = ("abnar", "residual")
FUSIONS = ("mean", "sum", "max", "min")


def random_maps(L, B, H, N, dtype, generator, device="cpu"):
    """L softmax-normalised maps (B, H, N, N), like a ViT's attention."""
    return [
        torch.randn(B, H, N, N, generator=generator, dtype=torch.float64).mul(2).softmax(-1).to(device, dtype)
        for _ in range(L)
    ]


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode,head_fusion", list(zip(MODES * 2, FUSIONS)))  # every mode and every fusion
def test_forward_matches_reference_values_and_gradients(device, backend, dtype, mode, head_fusion, generator):
    maps = random_maps(3, 2, 3, 7, dtype, generator, device)
    for cls_only, start_layer in ((True, 0), (True, 1), (False, 0)):
        module = AttentionRollout(mode, head_fusion, start_layer=start_layer, cls_only=cls_only, backend=backend)
        leaves = [m.clone().requires_grad_() for m in maps]
        out = module(leaves)
        exact_leaves = [m.detach().double().requires_grad_() for m in maps]
        exact = reference.attention_rollout(exact_leaves, mode, head_fusion, start_layer, cls_only)
        assert out.shape == exact.shape == ((2, 7) if cls_only else (2, 7, 7))
        assert out.dtype == dtype
        close(out, exact, dtype)
        weight = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
        (out * weight.to(device=device, dtype=dtype)).sum().backward()
        (exact * weight.to(exact.device)).sum().backward()
        for layer, (got, want) in enumerate(zip(leaves, exact_leaves)):
            if layer < start_layer:  # skipped layers: no gradient at all, or zeros
                assert got.grad is None or not got.grad.any()
                continue
            close(got.grad, want.grad.to(device), dtype)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="reference"), *DEVICE_BACKENDS])
@pytest.mark.parametrize("mode,normalize", [("abnar", "row"), ("abnar", "none"), ("residual", "row")])
def test_forward_options_match_reference(device, backend, mode, normalize, generator):
    """discard_ratio and normalize through the module, cls_only and full, fp64: values and gradients."""
    maps = random_maps(3, 2, 3, 7, torch.float64, generator, device)
    for cls_only, discard_ratio, fusion in ((True, 0.9, "max"), (False, 0.5, "mean"), (True, 0.5, "min")):
        module = AttentionRollout(mode, fusion, cls_only=cls_only, discard_ratio=discard_ratio, normalize=normalize,
                                  backend=backend)
        leaves = [m.clone().requires_grad_() for m in maps]
        out = module(leaves)
        exact_leaves = [m.detach().clone().requires_grad_() for m in maps]
        exact = reference.attention_rollout(exact_leaves, mode, fusion, 0, cls_only, discard_ratio, normalize)
        close(out, exact, torch.float64)
        weight = torch.randn(exact.shape, generator=generator, dtype=torch.float64).to(device)
        (out * weight).sum().backward()
        (exact * weight).sum().backward()
        for got, want in zip(leaves, exact_leaves):
            close(got.grad, want.grad, torch.float64)


def test_from_model_options_match_captured_maps(generator):
    model = tiny_vit(reg_tokens=1)
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    _, maps = captured_maps(model, images)
    for head_fusion, discard_ratio, normalize in (("max", 0.9, "row"), ("mean", 0.5, "none")):
        exact = reference.attention_rollout(maps, "abnar", head_fusion, 0, True, discard_ratio, normalize)
        for backend in (None, "reference"):
            module = AttentionRollout(head_fusion=head_fusion, discard_ratio=discard_ratio, normalize=normalize,
                                      backend=backend)
            with torch.no_grad():
                _, rollout = module.from_model(model, images)
            close(rollout, exact, torch.float64)


def test_accepts_a_stacked_tensor_and_repr(generator):
    maps = random_maps(2, 1, 2, 5, torch.float64, generator)
    module = AttentionRollout(backend="reference")
    torch.testing.assert_close(module(torch.stack(maps)), module(maps), rtol=0, atol=0)
    assert "abnar" in repr(module) and "reference" in repr(module)
    assert "discard_ratio=0, normalize='row'" in repr(module)
    assert "discard_ratio=0.9, normalize='none'" in repr(AttentionRollout(discard_ratio=0.9, normalize="none"))
    assert list(module.parameters()) == []


# ----------------------------------------------------------------------------------------------------------------
# from_model on a tiny timm ViT.


def tiny_vit(dtype=torch.float64, depth=3, **kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=depth, num_heads=3, num_classes=0,
                             **kwargs).eval().to(dtype)


def captured_maps(model, images):
    """Independently of zslfast: timm's non-fused path, the input of each block's attn_drop."""
    maps, handles = [], []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: maps.append(inputs[0].detach())))
    try:
        output = model(images)
    finally:
        for blk, handle in zip(model.blocks, handles):
            handle.remove()
            blk.attn.fused_attn = True
    return output, maps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode,head_fusion,start_layer,cls_only",
                         [("abnar", "mean", 0, True), ("residual", "sum", 1, True), ("abnar", "max", 0, False)])
def test_from_model_fused_and_reference_match_captured_maps(dtype, mode, head_fusion, start_layer, cls_only, generator):
    model = tiny_vit(dtype, reg_tokens=1)
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64).to(dtype)
    plain, maps = captured_maps(model, images)
    exact = reference.attention_rollout([m.double() for m in maps], mode, head_fusion, start_layer, cls_only)
    for backend in (None, "reference"):
        module = AttentionRollout(mode, head_fusion, start_layer=start_layer, cls_only=cls_only, backend=backend)
        with torch.no_grad():
            output, rollout = module.from_model(model, images)
        close(output, plain, dtype)
        assert rollout.shape == ((2, 18) if cls_only else (2, 18, 18))  # 1 cls + 1 register + 16 patches
        close(rollout, exact, dtype)
        assert all(blk.attn.fused_attn for blk in model.blocks), "fused_attn flags not restored"


def test_from_model_gradients_agree_between_paths(generator):
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(2, 17, generator=generator, dtype=torch.float64)
    grads = []
    for backend in (None, "reference"):
        model.zero_grad()
        x = images.clone().requires_grad_()
        output, rollout = AttentionRollout(backend=backend).from_model(model, x)
        ((rollout * weight).sum() + output.sum()).backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_backend_attribute_switches_the_path(monkeypatch, generator):
    model = tiny_vit(depth=2)
    images = torch.randn(1, 3, 32, 32, generator=generator, dtype=torch.float64)
    calls = []
    original = nn_rollout.RolloutFold

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(nn_rollout, "RolloutFold", counting)
    module = AttentionRollout()
    module.from_model(model, images)
    assert calls == [1]
    module.backend = "reference"
    module.from_model(model, images)
    assert calls == [1], "backend='reference' must not use the fused vit_attention_rollout"


def test_reference_path_restores_flags_on_error(generator):
    model = tiny_vit(depth=2)
    images = torch.randn(1, 3, 16, 16, generator=generator, dtype=torch.float64)  # wrong size: timm raises
    with pytest.raises(Exception):
        AttentionRollout(backend="reference").from_model(model, images)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert all(not blk.attn.attn_drop._forward_hooks for blk in model.blocks)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_arguments_raise_clear_errors(generator):
    with pytest.raises(ValueError, match="mode"):
        AttentionRollout(mode="chefer")
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(head_fusion="median")
    with pytest.raises(TypeError, match="start_layer"):
        AttentionRollout(start_layer=1.0)
    with pytest.raises(ValueError, match="normalize"):
        AttentionRollout(normalize="col")
    with pytest.raises(ValueError, match="normalize applies to mode 'abnar' only"):
        AttentionRollout("residual", normalize="none")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(discard_ratio=1.0)
    with pytest.raises(TypeError, match="discard_ratio"):
        AttentionRollout(discard_ratio="0.9")
    with pytest.raises(ValueError, match="backend"):
        AttentionRollout(backend="metal")
    module = AttentionRollout()
    with pytest.raises(ValueError, match="backend"):
        module.backend = "metal"
    with pytest.raises(ValueError, match=r"attns\[1\]"):
        AttentionRollout()([torch.rand(1, 2, 4, 4), torch.rand(1, 2, 5, 5)])
    with pytest.raises(ValueError, match="start_layer"):
        AttentionRollout(start_layer=3)(random_maps(2, 1, 1, 3, torch.float64, generator))
    with pytest.raises(TypeError, match="blocks"):
        AttentionRollout().from_model(torch.nn.Linear(3, 3), torch.rand(1, 3))
    with pytest.raises(TypeError, match="blocks"):
        AttentionRollout(backend="reference").from_model(torch.nn.Linear(3, 3), torch.rand(1, 3))
    with pytest.raises(ValueError, match="start_layer"):
        AttentionRollout(start_layer=5, backend="reference").from_model(tiny_vit(depth=2), torch.rand(1, 3, 32, 32))
