"""zslfast.models.ILPG: the fused and the reference ops give the same logits, loss and parameter gradients; AVL's
encoder written out; the parameter counts the docstring states; SAS off only with a warning that names the
argument."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from zslfast.losses import ILPGLoss
from zslfast.models import ILPG, ilpg as ilpg_module


def _tiny(generator, dtype=torch.float64, weights="full", **kwargs):
    C, K, Da, Dv, Dg = 7, 5, 6, 8, 5
    s = torch.rand(C, K, dtype=dtype, generator=generator)
    a = torch.randn(K, Da, dtype=dtype, generator=generator)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = ILPG(s, a, region_dim=Dv, signature_dim=Dg, hidden_dim=3, weights=weights,
                 unseen_classes=torch.tensor([1, 4]), **kwargs).to(dtype)
    with torch.no_grad():  # the generator's last layer starts at zero; give it values so w matters
        model.apc.last.weight.normal_(generator=generator)
        model.apc.last.bias.normal_(generator=generator)
    return model


def _batch(generator, B=4, R=3, dtype=torch.float64):
    regions = torch.randn(B, R, 8, dtype=dtype, generator=generator)
    signatures = torch.randn(B, 5, dtype=dtype, generator=generator)
    labels = torch.randint(0, 7, (B,), generator=generator)
    return regions, signatures, labels


def _run(model, regions, signatures, labels):
    out = model(regions=regions, signatures=signatures, labels=labels)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out, dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))


@pytest.mark.parametrize("weights", ["full", "attribute", "factored"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_equals_reference(weights, dtype, tol, generator):
    fused = _tiny(generator, dtype, weights)
    reference = copy.deepcopy(fused).set_backend("reference")
    assert reference.avl.backend == "reference" and reference.apc.backend == "reference"
    assert fused.avl.backend is None
    batch = _batch(generator, dtype=dtype)
    out_f, grads_f = _run(fused, *batch)
    out_r, grads_r = _run(reference, *batch)
    torch.testing.assert_close(out_f.logits, out_r.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=tol, atol=tol)
    assert out_f.parts.keys() == out_r.parts.keys() and len(out_f.parts) >= 4
    assert set(grads_f) == set(grads_r) and len(grads_f) >= 6
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=tol, atol=tol, msg=name)


def test_loss_is_ipm_plus_weighted_terms(generator):
    model = _tiny(generator)
    regions, signatures, labels = _batch(generator)
    out = model(regions=regions, signatures=signatures, labels=labels)
    crit, parts = model.criterion, out.parts
    expected = parts["ipm"] + crit.lambda_sas * parts["sas"] + crit.lambda_vsr * parts["vsr"] + crit.lambda_pcr * parts["pcr"]
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts["ipm"], torch.nn.functional.cross_entropy(out.logits, labels).detach())
    assert parts["sas"] > 0 and parts["vsr"] > 0 and parts["pcr"] > 0


def test_avl_encodes_the_regions_before_the_decoder(generator):
    """§3's encoder–decoder: Ẽ = cos(softmax(A W_q (H W_k)ᵀ/√d) H W_v, A) on H = the encoder's output, one
    post-norm layer written out: X = LN1(E + SA(E)), H = LN2(X + FFN(X)), E = I W_e + b_e, SA over the R regions."""
    model = _tiny(generator)
    regions, signatures, _ = _batch(generator)
    layer = model.region_encoder.layers[0]
    E = model.region_encoder.embed(regions)
    q, k, v = F.linear(E, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias).chunk(3, dim=-1)
    sa = layer.self_attn.out_proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)
    X = layer.norm1(E + sa)
    H = layer.norm2(X + layer.linear2(torch.relu(layer.linear1(X))))
    avl, A = model.avl, model.attribute_vectors
    attn = torch.softmax(avl.W_q(A) @ avl.W_k(H).transpose(1, 2) / avl.W_q.out_features ** 0.5, dim=-1)
    expected = F.cosine_similarity(attn @ avl.W_v(H), A, dim=-1)
    out = model(regions=regions, signatures=signatures)
    torch.testing.assert_close(out.attribute_scores, expected, rtol=1e-10, atol=1e-10)


def test_parameter_counts_are_the_documented_ones():
    """At CUB (Dv 2048, Da 300, K 312, C 200, Dg 384, J 512), the counts the module docstring compares with
    Table 3: AVL with and without its encoder, IDPP in its "attribute" and "full" forms."""
    s, a = torch.empty(200, 312, device="meta"), torch.empty(312, 300, device="meta")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        model = ILPG(s, a, weights="attribute", unseen_classes=torch.arange(150, 200))
        plain = ILPG(s, a, encoder_layers=0, unseen_classes=torch.arange(150, 200))
    counts = {"encoder": count(model.region_encoder), "avl": count(model.region_encoder) + count(model.avl),
              "plain avl": count(plain.avl), "attribute": count(model.apc), "full": count(plain.apc)}
    assert counts == {"encoder": 1_285_112, "avl": 1_555_112, "plain avl": 1_318_800, "attribute": 357_176,
                      "full": 32_208_320}
    assert all(f"{n:,}" in ilpg_module.__doc__ for n in counts.values())


def test_without_unseen_classes_sas_is_off_with_one_warning(generator):
    s, a = torch.rand(7, 5, generator=generator), torch.randn(5, 6, generator=generator)
    regions, signatures, labels = _batch(generator, dtype=torch.float32)
    model = ILPG(s, a, region_dim=8, signature_dim=5, hidden_dim=3)
    with pytest.warns(UserWarning, match=r"unseen_classes=None, so the SAS term .* lambda_sas=0"):
        out = model(regions=regions, signatures=signatures, labels=labels)
    assert out.parts["sas"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(regions=regions, signatures=signatures, labels=labels)  # once per model
        model(regions=regions, signatures=signatures)  # inference needs no unseen classes
        off = ILPG(s, a, region_dim=8, signature_dim=5, hidden_dim=3, loss=ILPGLoss.from_preset("CUB", lambda_sas=0))
        off(regions=regions, signatures=signatures, labels=labels)  # SAS off by name: no warning


def test_inference_without_labels(generator):
    model = _tiny(generator).eval()
    regions, signatures, _ = _batch(generator, B=1, R=1)
    out = model(regions=regions, signatures=signatures)
    assert out.logits.shape == (1, 7) and out.loss is None and out.attribute_scores.shape == (1, 5)


def test_bad_input(generator):
    model = _tiny(generator)
    regions, signatures, labels = _batch(generator)
    with pytest.raises(ValueError, match="regions"):
        model(regions=regions)
    with pytest.raises(ValueError, match="same B"):
        model(regions=regions, signatures=signatures[:2])
    with pytest.raises(ValueError, match="backbones"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="attribute_vectors"):
        ILPG(torch.rand(3, 4), torch.randn(5, 6))


def test_timm_backbones_end_to_end(generator):
    pytest.importorskip("timm")
    s = torch.rand(6, 5, generator=generator)
    a = torch.randn(5, 7, generator=generator)
    model = ILPG(s, a, region_dim=512, signature_dim=192, hidden_dim=4, build_backbones=True, backbone="resnet18",
                 instance_encoder="vit_tiny_patch16_224", image_size=64, unseen_classes=torch.tensor([5]))
    images = torch.randn(2, 3, 64, 64, generator=generator)
    out = model(images, labels=torch.tensor([0, 3]))
    out.loss.backward()
    assert out.logits.shape == (2, 6)
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen
    assert model.avl.parameters().__next__().grad is not None
    assert not model.backbone.training and model.training


def test_paper_backbones_give_the_documented_shapes(generator):
    """The defaults: timm resnet101 (7x7x2048 regions at 224²) and vit_small_patch14_dinov2 (384-d signature)."""
    pytest.importorskip("timm")
    model = ILPG(torch.rand(5, 4, generator=generator), torch.randn(4, 300, generator=generator), build_backbones=True,
                 unseen_classes=torch.tensor([4]))
    regions, signatures = model.encode(torch.randn(1, 3, 224, 224, generator=generator))
    assert regions.shape == (1, 49, 2048) and signatures.shape == (1, 384)
