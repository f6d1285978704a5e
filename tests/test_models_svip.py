"""zslfast.models.SVIPHead on a tiny timm ViT (img 32, patch 8: N = 16 patches, D = 24, depth 2) and in the
precomputed mode (tokens + attention maps, no backbone): the fused and the reference backends give the same logits,
loss and parameter gradients for the same weights and batch (fp64 ~1e-10, fp32 ~1e-5), per patch and on 2x2 merged
patches; shapes; the mask keeps exactly M patches chosen by the patch classifier; pseudo-labels equal the top
patches of the reference rollout of maps captured independently from timm; the context patch acts only through the
dropped patches (Eq. 9); the pools against direct computations; the loss against its terms; at ViT-B/16's grid the
default merges into 49 units scored by the MLP patch classifier; bad input -> clear errors. (The behaviour tests
run per patch, merge_patches=False, where each of the 16 patches is visible.)
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCES, requires_gpu
from zslfast import _backend, reference

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from zslfast.models import SVIPHead  # noqa: E402

B, C, K, DW, D, N = 3, 5, 7, 12, 24, 16
M = 10
# (device, fused backend): the compiled CPU kernels here; on a GPU the default (fastest) GPU backends. The Triton
# kernels under the CPU interpreter are covered by the ops' own tests.
CPU_MISSING = _backend.why_unavailable("cpu", torch.device("cpu"))
FUSED = [
    pytest.param("cpu", "cpu", id="cpu-cpu", marks=[pytest.mark.skip(reason=CPU_MISSING)] if CPU_MISSING else []),
    pytest.param("cuda", None, id="cuda-default", marks=requires_gpu),
]


def tiny_vit(dtype, depth=2):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=3, num_classes=0).to(dtype)


def make_head(dtype, generator, backbone=True, **kwargs):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    class_attributes = torch.rand(C, K, generator=generator, dtype=torch.float64)
    words = torch.randn(K, DW, generator=generator, dtype=torch.float64)
    kwargs.setdefault("merge_patches", False)
    kwargs.setdefault("num_keep", M if not kwargs["merge_patches"] else 3)  # of 16 patches, or of 4 2x2 groups
    if backbone:
        head = SVIPHead(class_attributes, tiny_vit(dtype), attribute_word_embeddings=words, **kwargs)
    else:
        head = SVIPHead(class_attributes, None, embed_dim=D, attribute_word_embeddings=words, **kwargs)
    return head.to(dtype)


def make_batch(dtype, generator):
    images = torch.randn(B, 3, 32, 32, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, C, (B,), generator=generator)
    return images, labels


def make_tokens(dtype, generator, L=3, H=2):
    tokens = torch.randn(B, 1 + N, D, generator=generator, dtype=torch.float64).to(dtype)
    maps = [
        torch.randn(B, H, 1 + N, 1 + N, generator=generator, dtype=torch.float64).softmax(-1).to(dtype)
        for _ in range(L)
    ]
    return tokens, maps


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def run(head, backbone, batch, labels):
    head.zero_grad()
    if backbone:
        out = head(batch, labels)
    else:
        tokens, maps = batch
        tokens = tokens.clone().requires_grad_()
        out = head(tokens=tokens, attentions=maps, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    if not backbone:
        grads["tokens"] = tokens.grad
    return out, grads


# ----------------------------------------------------------------------------------------------------------------
# Fused == reference.


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backbone,pool,merge", [(True, "attention", False), (False, "attention", False),
                                                 (False, "max", False), (True, "attention", True),
                                                 (False, "attention", True)],
                         ids=["vit-attention", "tokens-attention", "tokens-max", "vit-merged", "tokens-merged"])
def test_fused_and_reference_agree(device, backend, dtype, backbone, pool, merge, generator):
    fused = make_head(dtype, generator, backbone, pool=pool, merge_patches=merge, backend=backend).train().to(device)
    ref = copy.deepcopy(fused).set_backend("reference")
    assert ref.backend == ref.rollout.backend == "reference" and fused.rollout.backend == backend
    images, labels = make_batch(dtype, generator)
    labels = labels.to(device)
    if backbone:
        batch = images.to(device)
    else:
        tokens, maps = make_tokens(dtype, generator)
        batch = (tokens.to(device), [m.to(device) for m in maps])
    out_f, grads_f = run(fused, backbone, batch, labels)
    out_r, grads_r = run(ref, backbone, batch, labels)
    assert torch.equal(out_f.patch_mask, out_r.patch_mask)
    assert torch.equal(out_f.parts["pseudo_labels"], out_r.parts["pseudo_labels"])
    close(out_f.logits, out_r.logits, dtype)
    close(out_f.parts["logits_original"], out_r.parts["logits_original"], dtype)
    close(out_f.loss, out_r.loss, dtype)
    for term in ("loss_cls", "loss_jsd", "loss_patch"):
        close(out_f.parts[term], out_r.parts[term], dtype)
    assert grads_f.keys() == grads_r.keys()
    expected = {"p2a.weight", "p2a.bias", "patch_classifier.0.weight", "patch_classifier.2.weight",
                "word_to_patch.weight"}
    if backbone:
        expected |= {"backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight"}
    assert expected <= grads_f.keys()
    for name in grads_f:
        # (a hard max reaches the appended context patch only when it wins for some attribute)
        if not (pool == "max" and name.startswith("word_to_patch")):
            assert grads_f[name].abs().sum() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        close(grads_f[name], grads_r[name], dtype)


# ----------------------------------------------------------------------------------------------------------------
# Behaviour.


def test_shapes_mask_and_pseudo_labels_match_reference_rollout(generator):
    head = make_head(torch.float64, generator, label_fraction=0.25).train()
    images, labels = make_batch(torch.float64, generator)
    out = head(images, labels)
    assert out.logits.shape == (B, C) and out.loss.shape == ()
    assert out.patch_mask.shape == (B, N) and out.patch_mask.dtype == torch.bool
    assert (out.patch_mask.sum(1) == M).all()
    patch_logits = out.parts["patch_logits"]
    assert patch_logits.shape == (B, N) and out.parts["attribute_scores"].shape == (B, K)
    # the kept patches are the classifier's top M
    kept_min = patch_logits.masked_fill(~out.patch_mask, float("inf")).amin(1)
    dropped_max = patch_logits.masked_fill(out.patch_mask, float("-inf")).amax(1)
    assert (kept_min >= dropped_max).all()
    # pseudo-labels: top round(0.25 N) = 4 patches of the reference rollout of timm's own maps on the plain patches
    vit = head.backbone
    maps, handles = [], []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda _m, i, _o: maps.append(i[0].detach())))
    with torch.no_grad():
        vit.forward_features(images)
    for blk, h in zip(vit.blocks, handles):
        h.remove()
        blk.attn.fused_attn = True
    row = reference.attention_rollout(maps, "abnar", "mean", 0, True)[:, 1:]
    expected = torch.zeros(B, N, dtype=torch.float64).scatter_(1, row.topk(4, dim=1).indices, 1.0)
    assert torch.equal(out.parts["pseudo_labels"], expected)


def test_loss_is_the_sum_of_its_terms(generator):
    head = make_head(torch.float64, generator, backbone=False, lambda_jsd=0.7, lambda_patch=2.5)
    tokens, maps = make_tokens(torch.float64, generator)
    labels = torch.randint(0, C, (B,), generator=generator)
    out = head(tokens=tokens, attentions=maps, labels=labels)
    p = out.parts
    loss_cls = F.cross_entropy(p["logits_original"], labels) + F.cross_entropy(out.logits, labels)
    loss_patch = F.binary_cross_entropy_with_logits(p["patch_logits"], p["pseudo_labels"])
    close(p["loss_cls"], loss_cls.detach(), torch.float64)
    close(p["loss_patch"], loss_patch.detach(), torch.float64)
    log_a, log_b = p["logits_original"].log_softmax(-1), out.logits.log_softmax(-1)  # Eq. 13 as printed
    loss_jsd = 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean()
    close(p["loss_jsd"], loss_jsd.detach(), torch.float64)
    assert p["loss_jsd"] > 0
    close(out.loss.detach(), loss_cls.detach() + 0.7 * p["loss_jsd"] + 2.5 * loss_patch.detach(), torch.float64)
    assert (p["pseudo_labels"].sum(1) == M).all()  # label_fraction None: the top M


def test_context_patch_acts_only_through_dropped_patches(generator):
    """Eq. 9: with M = N nothing is dropped, so both passes see the same input: equal logits, JSD 0, no W2P grad."""
    head = make_head(torch.float64, generator, num_keep=1.0).train()
    images, labels = make_batch(torch.float64, generator)
    out = head(images, labels)
    assert out.patch_mask.all()
    close(out.logits, out.parts["logits_original"], torch.float64)
    assert abs(float(out.parts["loss_jsd"])) < 1e-12
    out.loss.backward()
    assert head.word_to_patch.weight.grad is None or not head.word_to_patch.weight.grad.any()
    # and with patches dropped, the context patch changes the prediction
    head.num_keep = 0.5
    out = head(images, labels)
    assert (out.logits - out.parts["logits_original"]).abs().max() > 1e-6


def test_pools_against_direct_computation(generator):
    tokens, _ = make_tokens(torch.float64, generator)
    head = make_head(torch.float64, generator, backbone=False, pool="max")
    patches, keep = tokens[:, 1:], torch.rand(B, N, generator=generator) < 0.5
    keep[:, 0] = True
    per_patch = patches @ head.p2a.weight.T + head.p2a.bias
    hard = per_patch.masked_fill(~keep[..., None], float("-inf")).amax(1)
    torch.testing.assert_close(head.attribute_scores(patches, keep), hard, rtol=0, atol=0)
    # attention pool: softmax-weighted mean of the per-patch scores over the kept patches -> max as tau -> 0
    head.pool = "attention"
    weights = (per_patch - head.p2a.bias).div(0.1).masked_fill(~keep[..., None], float("-inf")).softmax(1)
    soft = (weights * per_patch).sum(1)
    close(head.attribute_scores(patches, keep), soft, torch.float64)
    head.pool_temperature = 1e-6  # soft - hard <= tau / e
    torch.testing.assert_close(head.attribute_scores(patches, keep), hard, rtol=0, atol=1e-6)
    # the precomputed mode appends the context patch as an always-kept region
    context = head.context_patch()
    with_context = head.attribute_scores(patches, keep, context)
    extra = context @ head.p2a.weight.T + head.p2a.bias
    torch.testing.assert_close(with_context, torch.maximum(hard, extra), rtol=0, atol=1e-6)


def test_merged_patches_at_vit_b_16s_grid(generator):
    """§4.1: ViT-B/16 at 224² (14x14 patches) merged 2x2 -> 49 units; the MLP patch classifier (4D -> 512 -> ReLU
    -> 1) reads each group's four patch embeddings concatenated; M and the pseudo-labels count units."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=12, depth=1, num_heads=3, num_classes=0).double()
    head = SVIPHead(torch.rand(C, K, dtype=torch.float64), vit).double().train()
    images = torch.randn(2, 3, 224, 224, generator=generator, dtype=torch.float64)
    out = head(images, torch.tensor([0, 3]))
    assert out.patch_mask.shape == (2, 49) and (out.patch_mask.sum(1) == round(0.8 * 49)).all()
    assert out.parts["pseudo_labels"].shape == (2, 49) and (out.parts["pseudo_labels"].sum(1) == 39).all()
    assert [type(m) for m in head.patch_classifier] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head.patch_classifier[0].in_features, head.patch_classifier[0].out_features) == (4 * 12, 512)
    assert head.p2a.in_features == head.context.shape[0] == 4 * 12
    v = vit.patch_embed(images)  # (2, 196, 12), row-major on the 14x14 grid
    groups = v.view(2, 7, 2, 7, 2, 12).permute(0, 1, 3, 2, 4, 5).reshape(2, 49, 4 * 12)  # group (i, j): 2i+p, 2j+q
    mlp = head.patch_classifier
    expected = mlp[2](torch.relu(mlp[0](groups))).squeeze(-1)
    torch.testing.assert_close(out.parts["patch_logits"], expected, rtol=1e-12, atol=1e-12)


def test_inference_runs_only_the_contextualised_pass(generator, monkeypatch):
    head = make_head(torch.float64, generator).eval()
    monkeypatch.setattr(head.rollout, "from_model", lambda *a: pytest.fail("rollout pass ran without labels"))
    images, _ = make_batch(torch.float64, generator)
    with torch.no_grad():
        out = head(images)
    assert out.loss is None and out.parts["pseudo_labels"] is None and out.logits.shape == (B, C)
    # scoring against other classes (e.g. seen + unseen at test time)
    other = torch.rand(11, K, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        assert head(images, class_attributes=other).logits.shape == (B, 11)


def test_builds_from_a_timm_name_and_without_word_vectors():
    head = SVIPHead(torch.rand(C, K), "vit_tiny_patch16_224", img_size=64, backbone_kwargs=dict(depth=1), num_keep=2)
    assert head.backbone.num_classes == 0 and head.word_to_patch is None and head.context.shape == (4 * 192,)
    out = head(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    out.loss.backward()
    assert out.logits.shape == (2, C) and (out.patch_mask.sum(1) == 2).all() and head.context.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clear_errors(generator):
    ca = torch.rand(C, K)
    with pytest.raises(ValueError, match="class_attributes"):
        SVIPHead(torch.rand(C), None, embed_dim=D)
    with pytest.raises(ValueError, match="embed_dim"):
        SVIPHead(ca, None)
    with pytest.raises(TypeError, match="backbone"):
        SVIPHead(ca, torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="attribute_word_embeddings"):
        SVIPHead(ca, None, embed_dim=D, attribute_word_embeddings=torch.rand(K + 1, DW))
    with pytest.raises(ValueError, match="num_keep"):
        SVIPHead(ca, None, embed_dim=D, num_keep=0)
    with pytest.raises(ValueError, match="num_keep"):
        SVIPHead(ca, None, embed_dim=D, num_keep=1.5)
    with pytest.raises(ValueError, match="pool"):
        SVIPHead(ca, None, embed_dim=D, pool="mean")
    with pytest.raises(ValueError, match="backend"):
        SVIPHead(ca, None, embed_dim=D, backend="metal")
    head = SVIPHead(ca, None, embed_dim=D, num_keep=M, merge_patches=False)
    with pytest.raises(ValueError, match="backend"):
        head.set_backend("metal")
    tokens, maps = make_tokens(torch.float32, generator)
    labels = torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens must be \(B, P\+N, D\).*\(3, 17, 23\)"):
        head(tokens=tokens[..., :-1])
    with pytest.raises(TypeError, match="tokens have dtype torch.float64"):
        head(tokens=tokens.double())
    with pytest.raises(ValueError, match="no backbone"):
        head(torch.rand(B, 3, 32, 32), tokens=tokens)
    with pytest.raises(ValueError, match="num_keep M=20 exceeds the N'=16 patches"):
        SVIPHead(ca, None, embed_dim=D, num_keep=20, merge_patches=False)(tokens=tokens)
    with pytest.raises(ValueError, match=r"num_keep M=10 exceeds the N'=4 merged patches \(2x2 groups\)"):
        SVIPHead(ca, None, embed_dim=D, num_keep=M)(tokens=tokens)
    with pytest.raises(ValueError, match=r"merge_patches=True .* even patch grid, got \(3, 3\)"):
        SVIPHead(ca, None, embed_dim=D, num_keep=2)(tokens=tokens[:, :10])
    with pytest.raises(ValueError, match=r"merge_patches=True .* even patch grid, got \(2, 3\)"):
        SVIPHead(ca, None, embed_dim=D, grid_size=(2, 3))
    with pytest.raises(ValueError, match="needs attentions"):
        head(tokens=tokens, labels=labels)
    with pytest.raises(ValueError, match=r"labels holds the label 5, outside \[0, 5\)"):
        head(tokens=tokens, attentions=maps, labels=torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"labels must be \(B,\) with B=3"):
        head(tokens=tokens, attentions=maps, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="attentions must be maps over the tokens"):
        head(tokens=tokens, attentions=[m[:, :, 1:, 1:] for m in maps], labels=labels)
    with pytest.raises(ValueError, match=r"class_attributes must be \(C, K=7\)"):
        head(tokens=tokens, class_attributes=torch.rand(4, K + 1))
    vit_head = SVIPHead(ca, tiny_vit(torch.float32), num_keep=M)
    with pytest.raises(ValueError, match="images must be a"):
        vit_head(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="has a backbone"):
        vit_head(torch.rand(1, 3, 32, 32), tokens=tokens)
