"""Weights without a hub: a whole model from ``checkpoint=`` (a saved state dict) gives the saved model's outputs
exactly; a timm backbone from ``pretrained=path`` (timm's local-file route) holds the file's weights; a missing file
or a file of another architecture -> FileNotFoundError / ValueError naming the argument, the file and the keys.
Every load is all or nothing: a bad argument or file (one battery over both routes) raises before any weight is
copied, and a code-running pickle never runs.

Tiny models: ILPG and SAGE on precomputed features (no timm), SVIPHead and the backbone routes on tiny timm ViTs
(img 32, patch 8) and a ResNet-18 (random weights, saved here: nothing is downloaded).
"""

import os
import re

import pytest
import torch

from zslfast.models import ILPG, SAGE, SVIPHead, load_checkpoint

C, K, DA, DV, DG, DW = 7, 5, 6, 8, 5, 4
VIT = dict(img_size=32, backbone_kwargs=dict(patch_size=8, embed_dim=24, depth=2, num_heads=3))


def _classes(c=C):
    g = torch.Generator().manual_seed(0)
    return torch.rand(c, K, generator=g), torch.randn(K, DA, generator=g), torch.randn(K, DW, generator=g)


def _ilpg(seed, c=C, **kwargs):
    s, a, _ = _classes(c)
    torch.manual_seed(seed)
    model = ILPG(s, a, region_dim=DV, signature_dim=DG, hidden_dim=3, **kwargs)
    if kwargs.get("checkpoint") is None:  # the generator's last layer starts at zero: give it values
        model.apc.last.weight.data.normal_()
        model.apc.last.bias.data.normal_()
    return model


def _sage(seed, backbone=None, **kwargs):
    s, _, w = _classes()
    torch.manual_seed(seed)
    if backbone is None:
        kwargs.setdefault("embed_dim", 16)
    return SAGE(s, backbone, attribute_word_embeddings=w, dim=8, bank_threshold=-1.0, **kwargs)


def _svip(seed, **kwargs):
    pytest.importorskip("timm")
    s, _, w = _classes()
    torch.manual_seed(seed)
    return SVIPHead(s, "vit_tiny_patch16_224", attribute_word_embeddings=w, num_keep=3, **VIT, **kwargs)


def _inputs(name):
    g = torch.Generator().manual_seed(1)
    if name == "ILPG":
        return dict(regions=torch.randn(3, 4, DV, generator=g), signatures=torch.randn(3, DG, generator=g))
    if name == "SAGE":
        return dict(hidden_states=[torch.randn(3, 17, 16, generator=g) for _ in range(3)])
    return dict(images=torch.randn(3, 3, 32, 32, generator=g))


BUILDERS = {"ILPG": _ilpg, "SAGE": _sage, "SVIPHead": _svip}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_checkpoint_gives_the_saved_models_outputs(name, tmp_path):
    build = BUILDERS[name]
    saved = build(seed=1).eval()
    path = tmp_path / "model.pth"
    torch.save(saved.state_dict(), path)
    fresh = build(seed=2).eval()  # other random weights: the check below needs the load
    loaded = build(seed=2, checkpoint=path).eval()
    with torch.no_grad():
        expected = saved(**_inputs(name)).logits
        assert not torch.equal(fresh(**_inputs(name)).logits, expected)
        assert torch.equal(loaded(**_inputs(name)).logits, expected)
    for (key, a), (key_b, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module.", "float64"])
def test_checkpoint_in_a_training_scripts_dict(wrap, tmp_path):
    saved = _ilpg(seed=1)
    state = saved.state_dict()
    if wrap == "module.":  # DistributedDataParallel's prefix
        blob = {"module." + k: v for k, v in state.items()}
    elif wrap == "float64":  # another floating dtype is cast to the model's (float32 -> float64 -> float32: exact)
        blob = {k: v.double() for k, v in state.items()}
    else:
        blob = {wrap: state, "epoch": 3}
    torch.save(blob, tmp_path / "run.pth")
    loaded = _ilpg(seed=2, checkpoint=str(tmp_path / "run.pth"))
    assert all(torch.equal(a, b) for a, b in zip(state.values(), loaded.state_dict().values()))


def test_load_checkpoint_function_and_non_strict(tmp_path):
    saved = _sage(seed=1)
    path = tmp_path / "sage.pth"
    torch.save({k: v for k, v in saved.state_dict().items() if not k.startswith("mixer.")}, path)
    with pytest.raises(ValueError, match=r"missing keys \(mixer\."):
        load_checkpoint(_sage(seed=2), path)
    model = _sage(seed=2)
    mixer = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mixer.")}
    assert load_checkpoint(model, path, strict=False) is model
    assert torch.equal(model.vsa_query.weight, saved.vsa_query.weight)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in mixer.items())  # left as they were


def test_missing_files(tmp_path):
    missing = os.path.join(str(tmp_path), "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"ILPG: checkpoint=.*nope\.pth.*no such file"):
        _ilpg(seed=1, checkpoint=missing)
    with pytest.raises(FileNotFoundError, match=r"SAGE: checkpoint=.*nope\.pth"):
        load_checkpoint(_sage(seed=1), missing)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "c9.pth"
    torch.save(_ilpg(seed=1, c=9).state_dict(), path)
    model = _ilpg(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(model, path)
    message = str(info.value)
    assert "ILPG: checkpoint=" in message and "c9.pth" in message and "does not match the model" in message
    assert "class_attributes: checkpoint (9, 5) vs model (7, 5)" in message and "other sizes" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match=r"SAGE: checkpoint=.*unexpected keys"):
        _sage(seed=1, checkpoint=path)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        _sage(seed=1, checkpoint=tmp_path / "list.pth")


class _RunsCode:
    """Unpickled by a full pickle load, it would create ``marker`` (builtins.open): weights-only loading refuses it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


UNREADABLE = ["truncated .pth", "empty file", "garbage .safetensors", "code in the pickle", "not a path"]
BAD = ["not a tensor", "wrong dtype", "wrong shape", "missing key", "unexpected key"] + UNREADABLE
REFUSED = {  # what the message says after "SAGE: <argument>='<file>'" ({key}: where the good state was spoilt)
    "not a tensor": r"not tensors \({key}: int",
    "wrong dtype": r"dtype mismatches \({key}: checkpoint torch\.int64 vs model torch\.float32",
    "wrong shape": r"{key}: checkpoint \(2, ",
    "missing key": r"missing keys \({key}",
    "unexpected key": r"unexpected keys \(extra\.weight",
    "code in the pickle": r"could not be read as a weights-only checkpoint \(UnpicklingError",
}


def _bad_checkpoint(kind, state, key, tmp_path):
    """The ``kind`` of bad argument made from a good ``state`` (spoilt at ``key``, the last one a load would copy)."""
    if kind == "not a path":
        return 123
    path = tmp_path / ("bad.safetensors" if kind == "garbage .safetensors" else "bad.pth")
    state = dict(state)
    if kind == "not a tensor":
        state[key] = 7
    elif kind == "wrong dtype":
        state[key] = state[key].to(torch.int64)
    elif kind == "wrong shape":
        state[key] = torch.stack([state[key], state[key]])
    elif kind == "missing key":
        del state[key]
    elif kind == "unexpected key":
        state["extra.weight"] = torch.zeros(2)
    elif kind == "code in the pickle":
        state[key] = _RunsCode(tmp_path / "ran")
    torch.save(state, path)
    if kind == "truncated .pth":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "garbage .safetensors":
        path.write_bytes(b"\xff" * 64)
    return path


def _bits(model):
    """Every state-dict tensor of ``model`` (parameters and buffers) as its bytes, to compare bit for bit."""
    state = model.state_dict()
    return {k: (v.dtype, v.shape, v.detach().reshape(-1).view(torch.uint8).clone()) for k, v in state.items()}


def _same_bits(a, b):
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize("route", ["checkpoint", "pretrained"])
@pytest.mark.parametrize("kind", BAD)
def test_a_bad_argument_or_file_loads_nothing(kind, route, tmp_path, monkeypatch):
    if route == "checkpoint":
        state, key = _sage(seed=1).state_dict(), "mbgf.bank.means"  # the last key: torch would copy all others
        def build(**kwargs):
            return _sage(seed=2, **kwargs)
    else:
        vit, _ = _saved_vit(tmp_path)
        state, key = vit.state_dict(), "norm.bias"  # the backbone's last (the head's are dropped)
        def build(**kwargs):
            return _sage(seed=2, backbone="vit_tiny_patch16_224", levels=(0, 1), **VIT, **kwargs)
    assert list(state)[-1 if route == "checkpoint" else -3] == key
    bad = _bad_checkpoint(kind, state, key, tmp_path)
    if kind == "not a path":
        expected, message = TypeError, rf"SAGE: {route} must be .*, got int"
    else:
        reason = REFUSED.get(kind, "could not be read as a weights-only checkpoint").format(key=re.escape(key))
        expected, message = ValueError, rf"SAGE: {route}='.*{bad.name}'.*({reason})"
    with pytest.raises(expected, match=message):
        build(**{route: bad})
    if route == "checkpoint":
        model = build()
        before = _bits(model)
        with pytest.raises(expected, match=message):
            load_checkpoint(model, bad)
        assert _same_bits(_bits(model), before)  # nothing half-loaded
        if kind in UNREADABLE:  # refused before the model is built: timm is never asked for a backbone
            def build_nothing(*args, **kwargs):
                raise AssertionError("a backbone was built before checkpoint= was read")

            monkeypatch.setattr(pytest.importorskip("timm"), "create_model", build_nothing)
            with pytest.raises(expected, match=message):
                _sage(seed=2, backbone="vit_tiny_patch16_224", checkpoint=bad, **VIT)
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran


# ----------------------------------------------------------------------------------------------------------------
# pretrained=path: a timm backbone from a local file.


def _saved_vit(tmp_path, name="vit.pth", **overrides):
    timm = pytest.importorskip("timm")
    torch.manual_seed(11)
    kwargs = dict(VIT["backbone_kwargs"], **overrides)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, **kwargs)  # with its 1000-class head, as the hub's
    path = tmp_path / name
    torch.save(vit.state_dict(), path)
    return vit, path


@pytest.mark.parametrize("name", ["SVIPHead", "SAGE"])
def test_backbone_from_a_local_timm_checkpoint(name, tmp_path):
    vit, path = _saved_vit(tmp_path)
    def build(seed, **kwargs):
        if name == "SVIPHead":
            return _svip(seed, **kwargs)
        return _sage(seed, "vit_tiny_patch16_224", levels=(0, 1), **VIT, **kwargs)

    reference = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    for kwargs in (dict(pretrained=path), dict(pretrained=str(path))):
        model = build(seed=3, **kwargs)
        assert model.backbone.state_dict().keys() == reference.keys()
        assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in reference.items())
    assert not torch.equal(build(seed=3).backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_backbone_through_timms_own_overlay(tmp_path):
    vit, path = _saved_vit(tmp_path)
    s, _, w = _classes()
    # custom_load=False: timm < 1.0.31 keeps a ViT's registry .npz loader for a file overlay (not a .npz here)
    kwargs = dict(VIT["backbone_kwargs"], pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
    head = SVIPHead(s, "vit_tiny_patch16_224", pretrained=True, img_size=32, backbone_kwargs=kwargs, num_keep=3)
    assert torch.equal(head.backbone.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


def test_ilpg_backbones_from_local_timm_checkpoints(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    resnet = timm.create_model("resnet18")  # with its fc head
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    s, a, _ = _classes()
    model = ILPG(s, a, region_dim=512, signature_dim=DG, hidden_dim=3, build_backbones=True, backbone="resnet18",
                 instance_encoder="resnet10t", pretrained={"backbone": tmp_path / "resnet18.pth"})
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match=r"ILPG: pretrained='.*resnet18\.pth': ILPG builds two timm models"):
        ILPG(s, a, build_backbones=True, pretrained=str(tmp_path / "resnet18.pth"))
    with pytest.raises(ValueError, match=r"pretrained\['backbone'\]=.*build_backbones=False"):
        ILPG(s, a, pretrained={"backbone": tmp_path / "resnet18.pth"})
    with pytest.raises(ValueError, match=r"ILPG: pretrained\['instance_encoder'\]=.*resnet18\.pth.*'resnet10t'"):
        ILPG(s, a, region_dim=512, build_backbones=True, backbone="resnet18", instance_encoder="resnet10t",
             pretrained={"instance_encoder": tmp_path / "resnet18.pth"})
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ILPG: pretrained\['backbone'\]=.*empty\.pth.*could not be read"):
        ILPG(s, a, region_dim=512, build_backbones=True, backbone="resnet18", instance_encoder="resnet10t",
             pretrained={"backbone": tmp_path / "empty.pth"})


def test_backbone_file_missing_or_of_another_architecture(tmp_path):
    _, shallow = _saved_vit(tmp_path, "depth1.pth", depth=1)
    _, wide = _saved_vit(tmp_path, "wide.pth", embed_dim=48)
    with pytest.raises(FileNotFoundError, match=r"SVIPHead: pretrained=.*nope\.pth.*'vit_tiny_patch16_224'"):
        _svip(seed=1, pretrained=tmp_path / "nope.pth")
    # timm alone would load the one block silently (non-strict once the head is dropped)
    with pytest.raises(ValueError, match=r"SVIPHead: pretrained=.*depth1\.pth.*missing keys \(blocks\.1\."):
        _svip(seed=1, pretrained=shallow)
    wrong_width = r"SAGE: pretrained=.*wide\.pth.*does not match the 'vit_tiny_patch16_224'.*cls_token: checkpoint"
    with pytest.raises(ValueError, match=wrong_width) as info:
        _sage(seed=1, backbone="vit_tiny_patch16_224", pretrained=wide, **VIT)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match=r"SAGE: pretrained=.*is a backbone checkpoint, but no backbone is built"):
        _sage(seed=1, pretrained=wide)
    with pytest.raises(TypeError, match=r"SVIPHead: pretrained must be False, True .* got int"):
        _svip(seed=1, pretrained=1)
