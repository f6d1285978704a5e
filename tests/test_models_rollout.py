"""vit_attention_rollout against the reference rollout of the softmax maps captured from timm's non-fused attention:
values (float64 and float32, both modes x four head fusions x cls_only x start_layer), the model output left
bit-for-bit unchanged, attention forwards restored (also after an error), the model zoo's variants (class token,
registers, no class token, DINOv2, qk_norm), gradients (images and parameters; gradcheck of the per-head op), attention
masks, peak memory against a store-all-maps baseline, bad-input errors, and the discard_ratio / normalize options
(values and gradients, fold and stored-maps paths). Models are random (pretrained=False).

    A^l = softmax(q k^T * d^-0.5) (B, H, N, N)
    vit_attention_rollout(model, images, ...)[1] == reference.attention_rollout([A^0..A^(L-1)], mode, fusion, s, cls)
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from zslfast import reference  # noqa: E402
from zslfast.tools._memory import peak_cpu_bytes  # noqa: E402
from zslfast.models import vit_attention_rollout  # noqa: E402
from zslfast.nn import rollout as rollout_module  # noqa: E402

MODES = ("abnar", "residual")
FUSIONS = ("mean", "sum", "max", "min")
B = 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_model(name="vit_small_patch16_224", dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("depth", 3)
    kwargs.setdefault("img_size", 64)
    return timm.create_model(name, pretrained=False, **kwargs).eval().to(dtype)


def make_images(model, dtype, seed=1):
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, *size, generator=g, dtype=torch.float64).to(dtype)


def captured_attention(model, images, **forward_kwargs):
    """(output, [A^l (B, H, N, N)]) from timm's own non-fused path: the input of each block's attn_drop."""
    maps, handles = [], []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: maps.append(inputs[0])))
    try:
        output = model(images, **forward_kwargs)
    finally:
        for blk, handle in zip(model.blocks, handles):
            handle.remove()
            blk.attn.fused_attn = True
    return output, maps


def assert_restored(model):
    for i, blk in enumerate(model.blocks):
        assert "forward" not in blk.attn.__dict__, f"blocks[{i}].attn.forward left patched"
        assert blk.attn.forward.__func__ is type(blk.attn).forward


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------
# Against the reference, every mode / fusion / cls_only / start_layer.


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["fp64", "fp32"])
def small_vit(request):
    """(model, images, plain output, captured maps): vit_small_patch16_224 with depth 3, 64 px (N = 17, H = 6)."""
    dtype = request.param
    model = make_model(dtype=dtype)
    images = make_images(model, dtype)
    with torch.no_grad():
        plain = model(images)
        _, maps = captured_attention(model, images)
    return model, images, plain, maps


@pytest.mark.parametrize("start_layer", [0, 2, -2])
@pytest.mark.parametrize("cls_only", [True, False], ids=["cls", "full"])
@pytest.mark.parametrize("head_fusion", FUSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(small_vit, mode, head_fusion, cls_only, start_layer):
    model, images, plain, maps = small_vit
    with torch.no_grad():
        output, rollout = vit_attention_rollout(
            model, images, mode=mode, head_fusion=head_fusion, start_layer=start_layer, cls_only=cls_only
        )
    expected = reference.attention_rollout(maps, mode, head_fusion, start_layer, cls_only)
    N = maps[0].shape[-1]
    assert rollout.shape == ((B, N) if cls_only else (B, N, N))
    assert rollout.dtype == images.dtype
    close(rollout, expected, images.dtype)
    assert torch.equal(output, plain)
    assert_restored(model)


def test_output_bit_identical_with_grad_and_in_train_mode():
    """Autograd on, train mode with dropout / drop-path: the extra work draws no random numbers, output unchanged."""
    model = make_model(dtype=torch.float32, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2).train()
    images = make_images(model, torch.float32).requires_grad_()
    torch.manual_seed(123)
    plain = model(images)
    torch.manual_seed(123)
    output, rollout = vit_attention_rollout(model, images, mode="residual", head_fusion="max")
    assert torch.equal(output, plain)
    assert rollout.requires_grad and torch.isfinite(rollout).all()
    assert all(blk.attn.fused_attn for blk in model.blocks)  # fused SDPA stays on for the output


def test_restored_after_error_and_existing_patch_kept():
    model = make_model(dtype=torch.float32)
    images = make_images(model, torch.float32)

    def boom(*_):
        raise RuntimeError("boom in block 1")

    handle = model.blocks[1].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom in block 1"):
        vit_attention_rollout(model, images)
    handle.remove()
    assert_restored(model)

    # An instance-level forward someone else installed is put back as it was, not deleted.
    own = model.blocks[0].attn.forward
    model.blocks[0].attn.forward = own
    model.set_grad_checkpointing(True)
    vit_attention_rollout(model, images, mode="residual")
    assert model.blocks[0].attn.__dict__["forward"] is own
    assert model.grad_checkpointing is True
    del model.blocks[0].attn.forward
    assert_restored(model)


def test_blocks_skipped_or_repeated_raise():
    model = make_model(dtype=torch.float32)
    images = make_images(model, torch.float32)
    model.forward = lambda x: model.blocks[0](model._pos_embed(model.patch_embed(x)))  # runs block 0 only
    with pytest.raises(RuntimeError, match=r"blocks\[0:1\] only"):
        vit_attention_rollout(model, images)
    model.forward = lambda x: model.blocks[1](model.blocks[0](model.blocks[0](model._pos_embed(model.patch_embed(x)))))
    with pytest.raises(RuntimeError, match="once, in order"):
        vit_attention_rollout(model, images)
    del model.forward  # back to VisionTransformer.forward
    assert model.forward.__func__ is type(model).forward
    assert_restored(model)


# ----------------------------------------------------------------------------------------------------------------
# Model variants.

VARIANTS = [
    pytest.param("vit_base_patch16_224", dict(depth=2, img_size=48), id="base-cls"),
    pytest.param("vit_small_patch16_224", dict(depth=2, img_size=64, qk_norm=True), id="small-qk_norm"),
    pytest.param("vit_small_patch14_dinov2", dict(depth=2, img_size=56), id="dinov2"),
    pytest.param("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=56), id="dinov2-reg4"),
    pytest.param(
        "vit_small_patch16_224", dict(depth=2, img_size=64, class_token=False, global_pool="avg"), id="no-cls"
    ),
    pytest.param(
        "vit_small_patch16_224", dict(depth=2, img_size=64, class_token=False, reg_tokens=2, global_pool="avg"),
        id="no-cls-reg2",
    ),
]


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_model_variants(name, kwargs):
    model = make_model(name, **kwargs)
    if kwargs.get("qk_norm"):  # LayerNorm at init is the identity on the normalised vector; perturb it
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.q_norm.weight.uniform_(0.5, 1.5)
                blk.attn.k_norm.bias.normal_()
    images = make_images(model, torch.float64)
    with torch.no_grad():
        plain = model(images)
        _, maps = captured_attention(model, images)
        N = model.num_prefix_tokens + model.patch_embed.num_patches
        assert maps[0].shape[-1] == N
        for mode, fusion, cls_only in [("abnar", "mean", True), ("residual", "max", False), ("residual", "sum", True)]:
            output, rollout = vit_attention_rollout(model, images, mode=mode, head_fusion=fusion, cls_only=cls_only)
            assert torch.equal(output, plain)
            close(rollout, reference.attention_rollout(maps, mode, fusion, 0, cls_only), torch.float64)
            assert rollout.shape[-1] == N
            patches = rollout[..., model.num_prefix_tokens:]
            assert patches.shape[-1] == model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1]
    assert_restored(model)


# ----------------------------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("head_fusion", FUSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference(mode, head_fusion):
    """Image and parameter gradients of a weighted sum (a plain sum is constant for row-stochastic "mean" maps)."""
    model = make_model(depth=3, img_size=48)
    images = make_images(model, torch.float64)
    params = [model.patch_embed.proj.weight]
    params += [p for blk in model.blocks for p in (blk.attn.qkv.weight, blk.norm1.bias)]
    weight = torch.randn(B, model.num_prefix_tokens + model.patch_embed.num_patches, dtype=torch.float64)

    x = images.clone().requires_grad_()
    _, rollout = vit_attention_rollout(model, x, mode=mode, head_fusion=head_fusion, start_layer=1)
    got = torch.autograd.grad((rollout * weight).sum(), [x] + params)

    x = images.clone().requires_grad_()
    _, maps = captured_attention(model, x)
    expected_rollout = reference.attention_rollout(maps, mode, head_fusion, 1)
    expected = torch.autograd.grad((expected_rollout * weight).sum(), [x] + params)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        close(g, e, torch.float64)


# Issue 17's options: discard_ratio and normalize="none".
OPTIONS = [("abnar", "max", 0.9, "row"), ("abnar", "mean", 0.5, "none"), ("residual", "sum", 0.5, "row"),
           ("abnar", "min", 0.0, "none")]


@pytest.mark.parametrize("cls_only", [True, False], ids=["cls", "full"])
@pytest.mark.parametrize("mode,head_fusion,discard_ratio,normalize", OPTIONS)
def test_options_match_reference(small_vit, mode, head_fusion, discard_ratio, normalize, cls_only):
    """The fold (backend None) and the stored-maps path (backend "reference") against the reference rollout of the
    captured maps, B = 2 (every instance discarded on its own)."""
    model, images, plain, maps = small_vit
    expected = reference.attention_rollout(maps, mode, head_fusion, 1, cls_only, discard_ratio, normalize)
    for backend in (None, "reference"):
        with torch.no_grad():
            output, rollout = vit_attention_rollout(
                model, images, mode=mode, head_fusion=head_fusion, start_layer=1, cls_only=cls_only,
                discard_ratio=discard_ratio, normalize=normalize, backend=backend,
            )
        close(rollout, expected, images.dtype)
        if backend is None:  # the fold runs the model's own (fused SDPA) forward; "reference" its non-fused one
            assert torch.equal(output, plain)
        assert_restored(model)
    if discard_ratio > 0:  # the option reached the fold
        assert not torch.allclose(rollout, reference.attention_rollout(maps, mode, head_fusion, 1, cls_only, 0.0,
                                                                       normalize))


@pytest.mark.parametrize("mode,head_fusion,discard_ratio,normalize", OPTIONS[:3])
def test_options_gradients_match_reference(mode, head_fusion, discard_ratio, normalize):
    """Image and parameter gradients with discard / normalize="none": discarded entries pass no gradient."""
    model = make_model(depth=3, img_size=48)
    images = make_images(model, torch.float64)
    params = [model.patch_embed.proj.weight] + [blk.attn.qkv.weight for blk in model.blocks]
    weight = torch.randn(B, model.num_prefix_tokens + model.patch_embed.num_patches, dtype=torch.float64)
    options = dict(mode=mode, head_fusion=head_fusion, discard_ratio=discard_ratio, normalize=normalize)

    x = images.clone().requires_grad_()
    _, rollout = vit_attention_rollout(model, x, **options)
    got = torch.autograd.grad((rollout * weight).sum(), [x] + params)

    x = images.clone().requires_grad_()
    _, maps = captured_attention(model, x)
    expected_rollout = reference.attention_rollout(maps, mode, head_fusion, 0, True, discard_ratio, normalize)
    expected = torch.autograd.grad((expected_rollout * weight).sum(), [x] + params)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        close(g, e, torch.float64)


def test_sum_backward_image_gradient_and_grad_checkpointing():
    """rollout.sum().backward() (as SVIP does) gives the reference's image gradient, also with timm grad
    checkpointing switched on (turned off for the call, restored after)."""
    model = make_model(depth=3, img_size=48)
    images = make_images(model, torch.float64)
    x = images.clone().requires_grad_()
    _, maps = captured_attention(model, x)
    reference.attention_rollout(maps, "residual", "max", 0, False).sum().backward()
    expected = x.grad
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        x = images.clone().requires_grad_()
        output, rollout = vit_attention_rollout(model, x, mode="residual", head_fusion="max", cls_only=False)
        (rollout.sum() + 0 * output.sum()).backward()
        close(x.grad, expected, torch.float64)
        assert model.grad_checkpointing is checkpointing


@pytest.mark.parametrize("head_fusion", FUSIONS)
def test_fused_head_attention_gradcheck(head_fusion):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = rollout_module.fused_head_attention
    torch.autograd.gradcheck(lambda q, k, m: fn(q, k, 0.5, head_fusion, m), (q, k, bias))
    torch.autograd.gradcheck(lambda q, k: fn(q, k, 0.5, head_fusion, is_causal=True), (q, k))
    keep = torch.rand(5, 5, generator=g) > 0.3
    keep.fill_diagonal_(True)
    torch.autograd.gradcheck(lambda q, k: fn(q, k, 0.5, head_fusion, keep), (q, k))
    # values against the plain (B, H, N, N) computation, for each mask kind
    scores = (q * 0.5) @ k.transpose(-2, -1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs, s in [
        (dict(attn_mask=bias), scores + bias),
        (dict(is_causal=True), scores.masked_fill(causal, float("-inf"))),
        (dict(attn_mask=keep), scores.masked_fill(~keep, float("-inf"))),
    ]:
        close(fn(q, k, 0.5, head_fusion, **kwargs), reference.fuse_heads(s.softmax(-1), head_fusion), torch.float64)


def test_attention_mask_passed_by_the_model():
    """A mask given to model(...) reaches every block; the maps follow it as timm's non-fused path does."""
    model = make_model(depth=2, img_size=48)
    images = make_images(model, torch.float64)
    N = model.num_prefix_tokens + model.patch_embed.num_patches
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) > 0.4
    keep |= torch.eye(N, dtype=torch.bool)
    with torch.no_grad():
        _, maps = captured_attention(model, images, attn_mask=keep)
        state = rollout_module.RolloutFold("abnar", False)
        with rollout_module._patched_attention(model.blocks, 0, lambda _l, t: state.fold(t), "min"):
            model(images, attn_mask=keep)
    close(state.result(), reference.attention_rollout(maps, "abnar", "min", 0, False), torch.float64)
    assert_restored(model)


# ----------------------------------------------------------------------------------------------------------------
# Memory.


peak_extra_bytes = peak_cpu_bytes


class LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest number of elements any single op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_memory_is_per_layer_not_all_heads_all_layers(capsys):
    """Attention-heavy config (N = 257 tokens, H = 16 heads of dim 4, L = 4): one (B, N, N) map is 516 KiB, the
    stored maps L*H*B*N^2 33 MiB. Without autograd the rollout may add a few maps to the plain forward's peak
    (independent of L and H); with autograd it keeps what the fold's backward needs, a few maps per layer."""
    L, H = 4, 16
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=4, embed_dim=64, num_heads=H, depth=L, num_classes=10
    ).eval()
    images = torch.randn(B, 3, 64, 64)
    N = model.patch_embed.num_patches + 1
    one_map = B * N * N * 4

    def store_all(mode="abnar", head_fusion="mean", cls_only=True):
        output, maps = captured_attention(model, images)
        return output, reference.attention_rollout(maps, mode, head_fusion, 0, cls_only)

    figures = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            plain = peak_extra_bytes(lambda: model(images))
            for name, kwargs in [
                ("abnar-mean-cls", dict()),
                ("abnar-max-full", dict(head_fusion="max", cls_only=False)),
                ("residual-mean-cls", dict(mode="residual")),
            ]:
                peak = peak_extra_bytes(lambda: vit_attention_rollout(model, images, **kwargs))
                figures[grad, name] = (peak - plain) / one_map
                with LargestOutput() as largest:
                    vit_attention_rollout(model, images, **kwargs)
                assert largest.largest <= B * N * N, f"an op produced {largest.largest} elements > B*N^2"
            figures[grad, "store-all"] = (peak_extra_bytes(store_all) - plain) / one_map
    with capsys.disabled():
        print("\npeak extra memory over plain model(images), in (B, N, N) fp32 maps of", one_map, "bytes:",
              {f"{'grad' if g else 'no_grad'}/{n}": round(v, 2) for (g, n), v in figures.items()})
    for grad in (False, True):
        assert figures[grad, "store-all"] >= L * H * 0.9  # the baseline the measurement must be able to see
    for name in ("abnar-mean-cls", "abnar-max-full", "residual-mean-cls"):
        assert figures[False, name] <= 4, (name, figures[False, name])
        assert figures[True, name] <= 4 * L, (name, figures[True, name])


# ----------------------------------------------------------------------------------------------------------------
# Errors.


class _NoQkv(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads = 2


class _Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        if attn is not None:
            self.attn = attn


class _Model(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.blocks = nn.Sequential(_Block(attn))


def test_bad_model():
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(TypeError, match="got function"):
        vit_attention_rollout(lambda x: x, images)
    with pytest.raises(TypeError, match="Linear has no .blocks"):
        vit_attention_rollout(nn.Linear(2, 2), images)
    with pytest.raises(TypeError, match=r"blocks\[0\] \(_Block\) has no .attn"):
        vit_attention_rollout(_Model(None), images)
    with pytest.raises(TypeError, match=r"blocks\[0\].attn \(_NoQkv\) has no .qkv"):
        vit_attention_rollout(_Model(_NoQkv()), images)
    attn = _NoQkv()
    attn.qkv = nn.Linear(4, 12)
    del attn.num_heads
    with pytest.raises(TypeError, match="has no .num_heads"):
        vit_attention_rollout(_Model(attn), images)


def test_bad_arguments():
    model = make_model(dtype=torch.float32, depth=3, img_size=32)
    images = make_images(model, torch.float32)
    with pytest.raises(ValueError, match="mode must be one of .*'abnar', 'residual'.*got 'attention'"):
        vit_attention_rollout(model, images, mode="attention")
    with pytest.raises(ValueError, match="head_fusion must be .* got 'median'"):
        vit_attention_rollout(model, images, head_fusion="median")
    for bad in (3, 7, -4):
        with pytest.raises(ValueError, match=rf"L=3 layers .*got {bad}"):
            vit_attention_rollout(model, images, start_layer=bad)
    with pytest.raises(TypeError, match="start_layer must be an int"):
        vit_attention_rollout(model, images, start_layer=1.0)
    with pytest.raises(ValueError, match=r"normalize must be one of \('row', 'none'\), got 'col'"):
        vit_attention_rollout(model, images, normalize="col")
    with pytest.raises(ValueError, match="normalize applies to mode 'abnar' only"):
        vit_attention_rollout(model, images, mode="residual", normalize="none", backend="reference")
    for bad in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"discard_ratio must be a finite number in \[0, 1\)"):
            vit_attention_rollout(model, images, discard_ratio=bad)
    with pytest.raises(TypeError, match="discard_ratio must be a Python number, got bool"):
        vit_attention_rollout(model, images, discard_ratio=True, backend="reference")
    assert_restored(model)


def test_models_package_imports_without_timm():
    code = """
        import sys
        sys.modules["timm"] = None  # import timm -> ImportError
        import zslfast.models
        print(zslfast.models.vit_attention_rollout.__name__)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "vit_attention_rollout"
