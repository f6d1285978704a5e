"""zslfast.models.SAGE on precomputed hidden states (L=3 levels of a 4x4 patch grid, D=16) and on a tiny timm ViT
(img 32, patch 8, embed 64, depth 4): the fused and the reference backends give the same logits, loss, every loss
term, every parameter gradient (each non-zero) and the same memory-bank updates, over two training steps (the
second one with Eq. 9 active); the loss is Eq. 11 of its parts; the attention maps are requested only where a loss
reads them; SVA's outputs are the semantic vectors mixed by each patch; the Attribute-Mixer mixes across the
attributes; Eq. 9 acts on CUB-shaped data; the default attribute subsets follow the documented prevalence rule;
the frozen default is labelled zslfast's; bad input -> clear errors.
"""

import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCES
from zslfast import _backend
from zslfast.models import SAGE
from zslfast.models import sage as sage_module

B, C, K, DW, D, N = 16, 7, 9, 5, 16, 16
CPU_MISSING = _backend.why_unavailable("cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))


def make_model(generator, dtype=torch.float64, backbone=None, **kwargs):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    s = torch.rand(C, K, generator=generator, dtype=torch.float64)
    w = torch.randn(K, DW, generator=generator, dtype=torch.float64)
    kwargs.setdefault("bank_threshold", -1.0)  # every offer stored: the bank fills at once, Eq. 9 runs at step 2
    if backbone is None:
        kwargs.setdefault("embed_dim", D)
    model = SAGE(s, backbone, attribute_word_embeddings=w, dim=8, **kwargs).to(dtype)
    return model.train()


def make_states(generator, dtype, L=3):
    return [torch.randn(B, 1 + N, D, generator=generator, dtype=torch.float64).to(dtype) for _ in range(L)]


def close(actual, expected, dtype, msg=None):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def step(model, batch, labels):
    model.zero_grad()
    out = model(hidden_states=batch, labels=labels) if isinstance(batch, list) else model(batch, labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_vit_kwargs():
    return dict(img_size=32, backbone_kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("inputs", ["hidden-states", "vit"])
def test_fused_and_reference_agree(dtype, inputs, generator):
    if inputs == "vit":
        pytest.importorskip("timm")
        fused = make_model(generator, dtype, "vit_tiny_patch16_224", train_backbone=True, **tiny_vit_kwargs())
        batches = [torch.randn(B, 3, 32, 32, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2)]
    else:
        fused = make_model(generator, dtype)
        batches = [make_states(generator, dtype) for _ in range(2)]
    fused.set_backend("cpu")
    reference = copy.deepcopy(fused).set_backend("reference")
    assert reference.mbgf.backend == reference.mbgf.bank.backend == "reference" and fused.mbgf.backend == "cpu"
    # step 2's inputs differ from step 1's (so do its features from the prototypes stored at step 1), its labels
    # are the same (so every queue it reads is filled)
    labels = torch.randint(0, C, (B,), generator=generator)
    for i, batch in enumerate(batches):
        out_f, grads_f = step(fused, batch, labels)
        out_r, grads_r = step(reference, batch, labels)
        close(out_f.logits, out_r.logits, dtype)
        close(out_f.attribute_scores, out_r.attribute_scores, dtype)
        close(out_f.loss, out_r.loss, dtype)
        assert out_f.parts.keys() == out_r.parts.keys() == {
            "cls", "cont_attr", "cont_cls", "attr_sem", "attr_vis", "align", "kl"
        }
        for term in out_f.parts:
            close(out_f.parts[term], out_r.parts[term], dtype, msg=term)
        assert torch.equal(out_f.kl_active, out_r.kl_active)
        if i == 1:  # the bank filled at step 1: Eq. 9 is live now
            assert out_f.kl_active.any() and out_f.parts["kl"] > 0
        assert grads_f.keys() == grads_r.keys()
        # (the ViT's final norm is not on the path: the levels are raw block outputs)
        expected = {n for n, p in fused.named_parameters() if p.requires_grad and not n.startswith("backbone.norm.")}
        assert grads_f.keys() == expected
        for name in grads_f:
            close(grads_f[name], grads_r[name], dtype, msg=name)
            assert grads_f[name].abs().max() > 0, f"{name}: zero gradient"
        bank_f, bank_r = fused.mbgf.bank, reference.mbgf.bank
        for buffer in ("features", "confidences", "counts", "next_slot"):
            close(getattr(bank_f, buffer), getattr(bank_r, buffer), dtype, msg=buffer)
        assert bank_f.counts.sum() > 0
    if inputs == "vit":
        assert "backbone.blocks.3.attn.qkv.weight" in grads_f and "backbone.patch_embed.proj.weight" in grads_f


def test_loss_is_eq11_of_its_parts(generator):
    model = make_model(generator, lambda_cont=0.3, lambda_attr=0.7, lambda_align=0.2, lambda_kl=1.5)
    labels = torch.randint(0, C, (B,), generator=generator)
    model(hidden_states=make_states(generator, torch.float64), labels=labels)  # fill the bank for these classes
    out = model(hidden_states=make_states(generator, torch.float64), labels=labels)
    p = out.parts
    expected = p["cls"] + 0.3 * (p["cont_attr"] + p["cont_cls"]) + 0.7 * (p["attr_sem"] + p["attr_vis"])
    expected = expected + 0.2 * p["align"] + 1.5 * p["kl"]
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p["cls"], F.cross_entropy(out.logits, labels).detach())
    assert all(p[k] > 0 for k in ("cont_attr", "cont_cls", "attr_sem", "attr_vis", "align", "kl"))
    # Eq. 10: σ cos(Z, S) over every class
    logits = model.scale * F.normalize(out.attribute_scores, dim=-1) @ F.normalize(model.class_attributes, dim=-1).T
    torch.testing.assert_close(out.logits, logits)


def test_branches_predict_only_their_subset(generator, monkeypatch):
    """Z_m is 0 outside its scale's subset: the fused Z on subset s mixes only the L branches of scale s."""
    model = make_model(generator).eval()
    seen = {}
    original = model.mbgf.forward

    def spy(z, class_emb, labels=None):
        seen["z"] = z.detach()
        return original(z, class_emb, labels)

    monkeypatch.setattr(model.mbgf, "forward", spy)
    model(hidden_states=make_states(generator, torch.float64))
    z = seen["z"].view(B, 3, 3, K)  # (B, L, scale, K)
    for scale, subset in enumerate(model.subsets()):
        outside = torch.ones(K, dtype=torch.bool)
        outside[subset] = False
        assert (z[:, :, scale][..., outside] == 0).all() and (z[:, :, scale][..., subset] != 0).all()


def test_sva_outputs_are_the_semantic_vectors_mixed_by_each_patch(generator, monkeypatch):
    """SVA: the patches query, the semantic vectors A_i (the mixer's) are "both key and value": o_r =
    Σ_i softmax_i(F_r · (A W_sva)_i / √d) A_i, in the span of the scale's A_i; the branch's SVA score is
    cos(mean_r o_r, A_i) and Z_m = ½(VSA + SVA) on the scale's subset."""
    calls, seen = [], {}
    original, fuse = sage_module.attribute_attention, None

    def spy(*args, **kwargs):
        calls.append((args, original(*args, **kwargs)))
        return calls[-1][1]

    def spy_fuse(z, class_emb, labels=None):
        seen["z"] = z.detach()
        return fuse(z, class_emb, labels)

    monkeypatch.setattr(sage_module, "attribute_attention", spy)
    model = make_model(generator).eval()
    fuse = model.mbgf.forward
    monkeypatch.setattr(model.mbgf, "forward", spy_fuse)
    model(hidden_states=make_states(generator, torch.float64))
    A = model.mixer(model.attribute_word_embeddings)  # the semantic vectors (K, d)
    z = seen["z"].view(B, 3, 3, K)  # (B, L, scale, K)
    for scale, subset in enumerate(model.subsets()):
        (feats, keys, values), o = calls[2 * scale + 1]
        a = A[subset]
        torch.testing.assert_close(values, a.expand_as(values))
        torch.testing.assert_close(keys, model.sva_query(a).expand_as(keys))
        p = torch.softmax(feats @ model.sva_query(a).T / model.dim**0.5, dim=-1)  # (L·B, R, K_s): over attributes
        torch.testing.assert_close(o, p @ a, rtol=1e-10, atol=1e-10)
        coef = torch.linalg.lstsq(a.T, o.reshape(-1, model.dim).T).solution  # o in the span of the A_i
        torch.testing.assert_close(a.T @ coef, o.reshape(-1, model.dim).T, rtol=1e-10, atol=1e-10)
        sva = F.cosine_similarity(o.mean(dim=1)[:, None], a, dim=-1).view(3, B, -1).transpose(0, 1)
        vsa = calls[2 * scale][1].view(3, B, -1).transpose(0, 1)
        torch.testing.assert_close(z[:, :, scale][..., subset], 0.5 * (vsa + sva), rtol=1e-10, atol=1e-10)


def test_the_attribute_mixer_mixes_across_attributes(generator):
    """AMCL's mixer "learns implicit relationships among attributes": a token-mixing MLP over the K word vectors,
    T = W + MLP_K(LN(W)ᵀ)ᵀ, then φ per vector, so one attribute's word vector reaches every attribute's A_i."""
    mixer = make_model(generator).mixer
    w = torch.randn(K, DW, generator=generator, dtype=torch.float64)
    mixed = w + mixer.token_reduce(F.gelu(mixer.token_expand(mixer.token_norm(w).T))).T
    torch.testing.assert_close(mixer(w), mixer.embed(mixed), rtol=1e-12, atol=1e-12)
    moved = w.clone()
    moved[0] = torch.randn(DW, generator=generator, dtype=torch.float64)  # (not a shift: LayerNorm removes those)
    assert ((mixer(moved) - mixer(w)).abs().amax(dim=1) > 1e-9).all()
    per_attribute = make_model(generator, mix_attributes=False).mixer  # the other rows stay as they were
    assert torch.equal(per_attribute(moved)[1:], per_attribute(w)[1:])


def test_eq9_acts_on_cub_shaped_data():
    """Eq. 9 on the branch features' cosines needs a temperature: at CUB's shapes (C 200, K 312; an untrained
    model, the bank filled) the KL is a few percent of cls with kl_scale = σ, a few 1e-4 without (kl_scale=1)."""
    g = torch.Generator().manual_seed(0)
    s, w = torch.rand(200, 312, generator=g), torch.randn(312, 300, generator=g)
    labels = torch.randint(0, 150, (B,), generator=g)
    batches = [[torch.randn(B, 1 + N, D, generator=g) for _ in range(3)] for _ in range(2)]
    torch.manual_seed(0)
    model = SAGE(s, None, attribute_word_embeddings=w, embed_dim=D, dim=16, bank_threshold=-1.0)
    assert model.mbgf.kl_scale == model.scale == 10
    unscaled = copy.deepcopy(model)
    unscaled.mbgf.kl_scale = 1.0
    ratio = {}
    for name, m in (("sigma", model), ("1", unscaled)):
        m(hidden_states=batches[0], labels=labels)  # fills the bank
        out = m(hidden_states=batches[1], labels=labels)
        assert out.kl_active.sum() > B  # misclassified samples' failing branches
        ratio[name] = float(out.parts["kl"] / out.parts["cls"])
    assert ratio["sigma"] > 0.01 and ratio["1"] < 0.001, ratio


def test_frozen_backbone_is_labelled_zslfasts_choice():
    """The paper trains "end-to-end"; the frozen default (cached hidden states) is zslfast's choice, and the docs'
    paper line fine-tunes."""
    assert inspect.signature(SAGE).parameters["train_backbone"].default is False
    for text in (sage_module.__doc__, SAGE.__doc__):
        assert "end-to-end" in text and "zslfast's choice" in text and "train_backbone=True" in text
    docs = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text(encoding="utf-8")
    paper_call = docs[docs.index("# The paper's: SAGE("):][:200]
    assert "train_backbone=True)" in paper_call


@pytest.mark.parametrize("lambda_align", [0.0, 0.1])
def test_attention_maps_only_where_a_loss_reads_them(lambda_align, generator, monkeypatch):
    calls = []
    original = sage_module.attribute_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sage_module, "attribute_attention", spy)
    model = make_model(generator, lambda_align=lambda_align)
    states = make_states(generator, torch.float64)
    model(hidden_states=states, labels=torch.randint(0, C, (B,), generator=generator))
    assert len(calls) == 6  # VSA and SVA per scale, the levels stacked along the batch
    vsa, sva = calls[0::2], calls[1::2]
    assert all(c["return_max"] == "attention" and c["return_attention"] == (lambda_align > 0) for c in vsa)
    # SVA's max runs over the patches of a softmax over the attributes (its keys): read from its map
    assert all(c.get("return_max") is None and c["return_attention"] for c in sva)
    calls.clear()
    model(hidden_states=states)  # inference: neither the maps nor their max
    assert all(c.get("return_max") is None and not c["return_attention"] for c in calls)


def test_inference_leaves_the_bank_alone(generator):
    model = make_model(generator)
    states = make_states(generator, torch.float64)
    out = model(hidden_states=torch.stack(states))  # one (L, B, P+N, D) tensor works too
    assert out.logits.shape == (B, C) and out.loss is None and out.parts == {} and not out.kl_active.any()
    model.eval()
    out = model(hidden_states=states, labels=torch.zeros(B, dtype=torch.long))
    assert out.loss is not None and model.mbgf.bank.counts.sum() == 0


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_msfe_is_layernorm_linear_and_depthwise_convolutions(grid, generator):
    """P⁻ / P⁺ equal nn.Conv2d / nn.ConvTranspose2d (groups=d, kernel 2, stride 2; P⁻ zero-pads an odd grid; P⁺'s
    tokens in (p, q, i, j) order)."""
    L, d = 2, 6
    h, w = grid
    msfe = sage_module.MultiScaleBranches(L, D, d).double()
    with torch.no_grad():
        for p in msfe.parameters():
            p.normal_(generator=generator)
    patches = torch.randn(L, B, h * w, D, generator=generator, dtype=torch.float64)
    down, same, up = msfe(patches, grid)
    for l in range(L):
        x = F.layer_norm(patches[l], (D,), msfe.norm_weight[l], msfe.norm_bias[l]) @ msfe.proj_weight[l]
        x = x + msfe.proj_bias[l]
        torch.testing.assert_close(same.view(L, B, h * w, d)[l], x)
        x_grid = x.transpose(1, 2).reshape(B, d, h, w)
        conv = F.conv2d(F.pad(x_grid, (0, w % 2, 0, h % 2)), msfe.down_weight[l].permute(2, 0, 1)[:, None],
                        msfe.down_bias[l], stride=2, groups=d)
        tconv = F.conv_transpose2d(x_grid, msfe.up_weight[l].permute(2, 0, 1)[:, None], msfe.up_bias[l], stride=2,
                                   groups=d)
        torch.testing.assert_close(down.view(L, B, -1, d)[l], conv.flatten(2).transpose(1, 2))
        # P⁺'s tokens come in (p, q, i, j) order: the transposed conv's grid (2i+p, 2j+q) reordered
        tconv = tconv.view(B, d, h, 2, w, 2).permute(0, 3, 5, 2, 4, 1).reshape(B, 4 * h * w, d)
        torch.testing.assert_close(up.view(L, B, -1, d)[l], tconv)


def test_default_subsets_by_prevalence():
    # prevalence mean/max per column: 1.0, 0.25, 0.5, 0.75, 0.0 (all-zero column), 0.5
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                      [1.0, 0.0, 1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    groups = sage_module.default_attribute_groups(s)
    # order: 0 (1.0), 3 (0.75), 2 (0.5), 5 (0.5, tie by index), 1 (0.25), 4 (0.0)
    assert groups.tolist() == [0, 2, 1, 0, 2, 1]
    model = SAGE(s, None, attribute_word_embeddings=torch.randn(6, 3), embed_dim=4, dim=4)
    assert model.mbgf.bank.threshold == 2 / 4  # the default confidence gate: twice chance over the C=4 classes
    assert [g.tolist() for g in model.subsets()] == [[0, 3], [2, 5], [1, 4]]


def test_given_subsets(generator):
    ids = [2, 2, 1, 0, 0, 1, 2, 0, 1]
    by_ids = make_model(generator, attribute_groups=ids)
    by_lists = make_model(generator, attribute_groups=([3, 4, 7], [2, 5, 8], [0, 1, 6]))
    assert by_ids.attribute_groups.tolist() == by_lists.attribute_groups.tolist() == ids
    with pytest.raises(ValueError, match="empty"):
        make_model(generator, attribute_groups=[0] * 5 + [1] * 4)
    with pytest.raises(ValueError, match="disjoint"):
        make_model(generator, attribute_groups=([0, 1, 2], [2, 3, 4], [5, 6, 7, 8]))
    with pytest.raises(ValueError, match="cover"):
        make_model(generator, attribute_groups=([0, 1], [2, 3, 4], [5, 6, 7]))
    with pytest.raises(ValueError, match=r"attribute_groups must be \(K=9,\)"):
        make_model(generator, attribute_groups=[0, 1, 2])
    with pytest.raises(ValueError, match="ids must be 0"):
        make_model(generator, attribute_groups=[0, 1, 2, 3, 0, 1, 2, 0, 1])
    with pytest.raises(TypeError, match="integer"):
        make_model(generator, attribute_groups=torch.zeros(K))


def test_bad_input(generator):
    model = make_model(generator)
    states = make_states(generator, torch.float64)
    with pytest.raises(ValueError, match="hidden_states must be 3 tensors"):
        model(hidden_states=states[:2])
    with pytest.raises(ValueError, match="P=1, N >= 1, D=16"):
        model(hidden_states=[h[..., :8] for h in states])
    with pytest.raises(ValueError, match="square grid"):
        model(hidden_states=[h[:, :13] for h in states])
    with pytest.raises(TypeError, match="dtype"):
        model(hidden_states=[h.float() for h in states])
    with pytest.raises(ValueError, match="labels"):
        model(hidden_states=states, labels=torch.full((B,), C))
    with pytest.raises(ValueError, match="precomputed mode"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="give images"):
        model()
    s, w = torch.rand(C, K), torch.randn(K, DW)
    with pytest.raises(ValueError, match="attribute_word_embeddings"):
        SAGE(s, None, attribute_word_embeddings=w[:3], embed_dim=D)
    with pytest.raises(TypeError, match="attribute_word_embeddings"):
        SAGE(s, None, attribute_word_embeddings=None, embed_dim=D)
    with pytest.raises(ValueError, match="embed_dim"):
        SAGE(s, None, attribute_word_embeddings=w)
    with pytest.raises(ValueError, match="embed_dim"):  # a name without build_backbone: precomputed mode
        SAGE(s, "vit_base_patch16_224", attribute_word_embeddings=w, build_backbone=False)
    with pytest.raises(TypeError, match="levels"):
        SAGE(s, None, attribute_word_embeddings=w, embed_dim=D, levels=3)
    with pytest.raises(ValueError, match="lambda_kl"):
        SAGE(s, None, attribute_word_embeddings=w, embed_dim=D, lambda_kl=-1)


def test_timm_vit_levels_and_frozen_backbone(generator):
    """By name through timm (random weights), other levels (blocks 0 and 2 of 4: M = 6 branches), frozen ViT."""
    pytest.importorskip("timm")
    model = make_model(generator, torch.float32, "vit_tiny_patch16_224", levels=(0, 2), **tiny_vit_kwargs())
    assert model.levels == (0, 2) and model.num_branches == 6 and model.grid_size == (4, 4)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    out = model(images, torch.tensor([0, 3]))
    out.loss.backward()
    assert out.logits.shape == (2, C) and out.kl_active.shape == (2, 6)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert model.vsa_query.weight.grad is not None and not model.backbone.training and model.training
    with pytest.raises(ValueError, match="distinct blocks"):
        make_model(generator, torch.float32, "vit_tiny_patch16_224", levels=(1, -3), **tiny_vit_kwargs())
