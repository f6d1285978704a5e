"""zslfast.losses against direct per-sample loops written from the papers' equations (ILPG Eq. 7-12, SVIP Eq. 6
and 13), in float64: values, gradients (autograd through the loops, and gradcheck), every IDPP weight layout,
large logits, bad input, and that S_W (B, C, K) is never built."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zslfast import losses
from zslfast.losses import (
    ILPGLoss,
    ipm_loss,
    jsd_loss,
    patch_bce_loss,
    pcr_loss,
    sas_loss,
    vsr_loss,
)

W_LAYOUTS = ["none", "bk", "bck"]
TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------- loop references


def sw_row(s, w, b, c):
    """S_W^(c) of sample b, ILPG Eq. 5."""
    if w is None:
        return s[c]
    wb = w[b] if w.dim() == 2 else w[b, c]
    return wb * s[c] + s[c]


def ref_logits(e, s, w):
    B, C = e.shape[0], s.shape[0]
    return torch.stack([torch.stack([torch.dot(e[b], sw_row(s, w, b, c)) for c in range(C)]) for b in range(B)])


def log_softmax_row(row, i):
    return row[i] - torch.log(torch.exp(row - row.max()).sum()) - row.max()


def ref_ipm(logits, labels):
    return sum(-log_softmax_row(logits[b], labels[b]) for b in range(len(labels))) / len(labels)


def ref_sas(logits, labels, s, unseen, class_reduction="sum"):
    total = 0.0
    for b in range(len(labels)):
        y = int(labels[b])
        for c in unseen:
            with torch.no_grad():
                cos = torch.dot(s[y], s[c]) / (s[y].norm() * s[c].norm())
                weight = (1 + cos) / 2
            term = -weight * log_softmax_row(logits[b], c)
            total = total + (term / len(unseen) if class_reduction == "mean" else term)
    return total / len(labels)


def ref_vsr(e, s, w, labels):
    return sum(((e[b] - sw_row(s, w, b, int(labels[b]))) ** 2).sum() for b in range(len(labels))) / len(labels)


def ref_pcr(s, w, labels, tau):
    total = 0.0
    for b in range(len(labels)):
        y = int(labels[b])
        anchor = sw_row(s, w, b, y)
        sims = torch.stack([torch.dot(anchor, s[i]) / tau for i in range(s.shape[0])])
        total = total - log_softmax_row(sims, y)
    return total / len(labels)


def make_inputs(generator, layout, B=5, C=7, K=4, dtype=torch.float64):
    e = torch.randn(B, K, generator=generator, dtype=dtype)
    s = torch.randn(C, K, generator=generator, dtype=dtype)
    w = {"none": None, "bk": torch.randn(B, K, generator=generator, dtype=dtype),
         "bck": torch.randn(B, C, K, generator=generator, dtype=dtype)}[layout]
    labels = torch.randint(0, C - 2, (B,), generator=generator)
    return e, s, w, labels


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def assert_same_value_and_grads(fast_fn, ref_fn, tensors, **tol):
    """Value and gradients of fast_fn(*tensors) and ref_fn(*tensors) agree (None entries are skipped)."""
    a, b = leaves(*tensors), leaves(*tensors)
    out_a, out_b = fast_fn(*a), ref_fn(*b)
    torch.testing.assert_close(out_a, out_b, **(tol or TOL))
    used = [i for i, t in enumerate(a) if t is not None]
    grads_a = torch.autograd.grad(out_a, [a[i] for i in used], allow_unused=True)
    grads_b = torch.autograd.grad(out_b, [b[i] for i in used], allow_unused=True)
    for ga, gb in zip(grads_a, grads_b):
        if gb is None:
            assert ga is None or not ga.any()
        else:
            torch.testing.assert_close(ga, gb, **(tol or TOL))


# --------------------------------------------------------------------------------------------- ILPG


def test_prototype_scores_agree_with_the_loop_notation(generator):
    """The logits the losses take: zslfast.prototype_scores is <e, S_W^(c)> as written in the loops here."""
    import zslfast

    for layout in W_LAYOUTS:
        e, s, w, _ = make_inputs(generator, layout)
        torch.testing.assert_close(zslfast.prototype_scores(e, s, w, backend="reference"), ref_logits(e, s, w), **TOL)


def test_ipm_matches_loop(generator):
    e, s, w, labels = make_inputs(generator, "bck")
    logits = ref_logits(e, s, w) * 3
    assert_same_value_and_grads(lambda x: ipm_loss(x, labels), lambda x: ref_ipm(x, labels), [logits])


@pytest.mark.parametrize("class_reduction", ["sum", "mean"])
def test_sas_matches_loop(generator, class_reduction):
    e, s, w, labels = make_inputs(generator, "bck")
    logits = ref_logits(e, s, w)
    unseen = [5, 6, 2]
    assert_same_value_and_grads(
        lambda x, sp: sas_loss(x, labels, sp, unseen, class_reduction=class_reduction),
        lambda x, sp: ref_sas(x, labels, sp, unseen, class_reduction),
        [logits, s],
    )


def test_sas_weights_are_constants_in_0_1(generator):
    _, s, _, labels = make_inputs(generator, "none")
    # Uniform logits: -log p_c = log C for every c, so SAS = log C * sum_c a[y, c] with a in [0, 1].
    logits = torch.zeros(labels.shape[0], s.shape[0], dtype=torch.float64)
    value = sas_loss(logits, labels, s, [5, 6])
    a = 0.5 * (1 + F.normalize(s, dim=1)[labels] @ F.normalize(s, dim=1)[[5, 6]].T)
    assert ((a >= 0) & (a <= 1)).all()
    torch.testing.assert_close(value, math.log(s.shape[0]) * a.sum(1).mean(), **TOL)
    s = s.clone().requires_grad_(True)
    grad, = torch.autograd.grad(sas_loss(logits.requires_grad_(True), labels, s, [5, 6]), s, allow_unused=True)
    assert grad is None or not grad.any()


@pytest.mark.parametrize("layout", W_LAYOUTS)
def test_vsr_matches_loop(generator, layout):
    e, s, w, labels = make_inputs(generator, layout)
    assert_same_value_and_grads(
        lambda e_, s_, w_: vsr_loss(e_, s_, w_, labels), lambda e_, s_, w_: ref_vsr(e_, s_, w_, labels), [e, s, w]
    )


@pytest.mark.parametrize("layout", W_LAYOUTS)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_pcr_matches_loop(generator, layout, tau):
    _, s, w, labels = make_inputs(generator, layout)
    assert_same_value_and_grads(
        lambda s_, w_: pcr_loss(s_, w_, labels, tau), lambda s_, w_: ref_pcr(s_, w_, labels, tau), [s, w]
    )


@pytest.mark.parametrize("layout", W_LAYOUTS)
def test_ilpg_loss_is_the_weighted_sum_of_the_loops(generator, layout):
    e, s, w, labels = make_inputs(generator, layout)
    unseen = [5, 6]
    module = ILPGLoss(lambda_sas=0.3, lambda_vsr=0.01, lambda_pcr=0.4, tau=0.2, unseen_classes=unseen)

    def fast(e_, s_, w_):
        import zslfast

        total, parts = module(zslfast.prototype_scores(e_, s_, w_, backend="reference"), labels, e_, s_, w_)
        fast.parts = parts
        return total

    def ref(e_, s_, w_):
        logits = ref_logits(e_, s_, w_)
        return (ref_ipm(logits, labels) + 0.3 * ref_sas(logits, labels, s_, unseen)
                + 0.01 * ref_vsr(e_, s_, w_, labels) + 0.4 * ref_pcr(s_, w_, labels, 0.2))

    assert_same_value_and_grads(fast, ref, [e, s, w])
    assert set(fast.parts) == {"ipm", "sas", "vsr", "pcr"}
    logits = ref_logits(e, s, w)
    torch.testing.assert_close(fast.parts["sas"], ref_sas(logits, labels, s, unseen), **TOL)
    torch.testing.assert_close(fast.parts["pcr"], ref_pcr(s, w, labels, 0.2), **TOL)


def test_ilpg_loss_without_unseen_classes_skips_sas(generator):
    e, s, w, labels = make_inputs(generator, "bk")
    logits = ref_logits(e, s, w)
    with pytest.warns(UserWarning, match="unseen_classes=None"):
        total, parts = ILPGLoss(0.5, 0.0, 0.0)(logits, labels, e, s, w)
    assert parts["sas"] == 0 and parts["vsr"] == 0 and parts["pcr"] == 0
    torch.testing.assert_close(total, ref_ipm(logits, labels), **TOL)


def test_from_preset_uses_the_paper_weights():
    expected = {"CUB": (0.05, 0.005, 0.05), "SUN": (0.3, 0.01, 0.4), "AwA2": (0.4, 0.005, 0.01)}
    for name, weights in expected.items():
        loss = ILPGLoss.from_preset(name)
        assert (loss.lambda_sas, loss.lambda_vsr, loss.lambda_pcr) == weights
        assert loss.tau == losses.DEFAULT_TAU and loss.unseen_classes is None
    loss = ILPGLoss.from_preset("awa2", unseen_classes=[1, 2], lambda_vsr=0.5, tau=0.3)
    assert (loss.lambda_sas, loss.lambda_vsr, loss.lambda_pcr, loss.tau) == (0.4, 0.5, 0.01, 0.3)
    assert loss.unseen_classes.tolist() == [1, 2]
    with pytest.raises(ValueError, match="unknown dataset preset"):
        ILPGLoss.from_preset("ImageNet")
    with pytest.raises(TypeError, match="unexpected"):
        ILPGLoss.from_preset("CUB", lambda_foo=1.0)


def test_ilpg_gradcheck(generator):
    import zslfast

    for layout in W_LAYOUTS:
        e, s, w, labels = make_inputs(generator, layout, B=3, C=4, K=2)
        module = ILPGLoss(0.3, 0.1, 0.4, tau=0.5, unseen_classes=[2, 3])
        e_, s_, w_ = leaves(e, s, w)

        def total(e_, s_, w_):
            return module(zslfast.prototype_scores(e_, s_, w_, backend="reference"), labels, e_, s_, w_)[0]

        # SAS's weights are constants of s (no gradient by design), so s is checked with SAS off.
        inputs = [e_] + ([w_] if w_ is not None else [])
        assert torch.autograd.gradcheck(lambda e_, *w_: total(e_, s, w_[0] if w_ else None), inputs)
        assert torch.autograd.gradcheck(lambda s_: vsr_loss(e, s_, w, labels) + pcr_loss(s_, w, labels, 0.5), [s_])


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((func.__name__, tuple(t.shape)))
        return out


def test_forward_never_builds_a_bck_tensor(generator):
    """VSR, PCR and ILPGLoss gather S_W^(y): no op in their forward returns a (B, C, K)-sized tensor."""
    B, C, K = 3, 11, 5
    e, s, w, labels = make_inputs(generator, "bck", B=B, C=C, K=K)
    e, s, w = leaves(e, s, w)
    logits = ref_logits(e, s, w)
    with RecordShapes() as record:
        loss = vsr_loss(e, s, w, labels) + pcr_loss(s, w, labels, 0.1)
        loss = loss + ILPGLoss(0.1, 0.1, 0.1, unseen_classes=[9, 10])(logits, labels, e, s, w)[0]
    big = [(name, shape) for name, shape in record.shapes if math.prod(shape) >= B * C * K]
    assert not big, big
    loss.backward()
    assert w.grad.shape == (B, C, K)
    # The check can fail: materialising S_W as the papers' code does is caught.
    with RecordShapes() as record:
        ((e - (w * s + s)[torch.arange(B), labels]) ** 2).sum()
    assert any(math.prod(shape) >= B * C * K for _, shape in record.shapes)


def test_ilpg_losses_are_finite_for_large_logits(generator):
    e, s, w, labels = make_inputs(generator, "bck", dtype=torch.float32)
    logits = (ref_logits(e, s, w) * 1e4).requires_grad_(True)
    total, parts = ILPGLoss(0.3, 0.01, 0.4, tau=1e-4, unseen_classes=[5, 6])(logits, labels, e, s * 100, w)
    assert all(torch.isfinite(v) for v in parts.values()) and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_ilpg_float32_matches_float64(generator):
    e, s, w, labels = make_inputs(generator, "bck")
    module = ILPGLoss.from_preset("SUN", unseen_classes=[5, 6])
    t64, _ = module(ref_logits(e, s, w), labels, e, s, w)
    e32, s32, w32 = e.float(), s.float(), w.float()
    t32, _ = module(ref_logits(e32, s32, w32), labels, e32, s32, w32)
    torch.testing.assert_close(t32.double(), t64, rtol=1e-5, atol=1e-5)


def test_ilpg_loss_compiles_without_graph_breaks(generator):
    e, s, w, labels = make_inputs(generator, "bck", dtype=torch.float32)
    module = ILPGLoss.from_preset("CUB", unseen_classes=[5, 6])
    logits = ref_logits(e, s, w)
    compiled = torch.compile(lambda *a: module(*a)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, labels, e, s, w), module(logits, labels, e, s, w)[0])


def test_ilpg_bad_input(generator):
    e, s, w, labels = make_inputs(generator, "bck")
    logits = ref_logits(e, s, w)
    module = ILPGLoss(unseen_classes=[5, 6])
    with pytest.raises(ValueError, match=r"labels holds the label 7, outside \[0, 7\)"):
        module(logits, torch.tensor([0, 1, 2, 3, 7]), e, s, w)
    with pytest.raises(ValueError, match=r"labels must be \(B,\)"):
        ipm_loss(logits, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        ipm_loss(logits, labels.double())
    with pytest.raises(ValueError, match=r"w must be None, \(B, K\)"):
        vsr_loss(e, s, w[:, :3], labels)
    with pytest.raises(ValueError, match="disagree on K"):
        vsr_loss(e[:, :3], s, None, labels)
    with pytest.raises(ValueError, match="disagree on C"):
        sas_loss(logits[:, :5], labels, s, [5])
    with pytest.raises(ValueError, match=r"sas_loss: unseen_classes must be class ids in \[0, 7\)"):
        sas_loss(logits, labels, s, [9])
    with pytest.raises(ValueError, match="tau"):
        pcr_loss(s, w, labels, 0.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        module(logits, labels, e[:, :3], s, w)
    with pytest.raises(ValueError, match="tau"):
        ILPGLoss(tau=-1.0)
    with pytest.raises(ValueError, match="lambda_vsr"):
        ILPGLoss(lambda_vsr=-1.0)


# --------------------------------------------------------------------------------------------- SVIP


def ref_jsd_eq13(a, b):
    total = 0.0
    for i in range(a.shape[0]):
        p, q = torch.softmax(a[i], 0), torch.softmax(b[i], 0)
        total = total + 0.5 * (p * torch.log(p / q)).sum() + 0.5 * (q * torch.log(q / p)).sum()
    return total / a.shape[0]


def test_jsd_eq13_matches_loop(generator):
    a = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    b = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    assert_same_value_and_grads(jsd_loss, ref_jsd_eq13, [a, b])
    assert torch.autograd.gradcheck(jsd_loss, leaves(a[:2, :4], b[:2, :4]))


def test_jsd_mixture_matches_scipy(generator):
    from scipy.spatial.distance import jensenshannon

    a = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    b = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    expected = sum(
        jensenshannon(torch.softmax(a[i], 0).numpy(), torch.softmax(b[i], 0).numpy()) ** 2 for i in range(6)
    ) / 6
    value = jsd_loss(a, b, mode="mixture")
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert torch.autograd.gradcheck(lambda x, y: jsd_loss(x, y, mode="mixture"), leaves(a[:2, :4], b[:2, :4]))


@pytest.mark.parametrize("mode", ["eq13", "mixture"])
def test_jsd_properties_and_large_logits(generator, mode):
    a = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    b = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    assert abs(jsd_loss(a, a, mode).item()) < 1e-14
    torch.testing.assert_close(jsd_loss(a, b, mode), jsd_loss(b, a, mode), **TOL)
    torch.testing.assert_close(jsd_loss(a, b, mode), jsd_loss(a + 5.0, b - 3.0, mode), **TOL)  # shift invariant
    big_a, big_b = leaves(a.float() * 1e4, b.float() * 1e4)
    value = jsd_loss(big_a, big_b, mode)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big_a.grad).all() and torch.isfinite(big_b.grad).all()
    if mode == "mixture":
        assert value <= math.log(2) + 1e-6
    # leading dims: (B, T, C) is the mean over B and T
    a3, b3 = a.view(2, 2, 10), b.view(2, 2, 10)
    torch.testing.assert_close(jsd_loss(a3, b3, mode), jsd_loss(a, b, mode), **TOL)
    with pytest.raises(ValueError, match="one shape"):
        jsd_loss(a, b[:, :5], mode)


def test_jsd_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        jsd_loss(torch.zeros(1, 2), torch.zeros(1, 2), mode="kl")


def ref_patch_bce(logits, target, mask=None):
    per_image = []
    for b in range(logits.shape[0]):
        terms = []
        for i in range(logits.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            r_hat = torch.sigmoid(logits[b, i])
            r = target[b, i]
            terms.append(-(r * torch.log(r_hat) + (1 - r) * torch.log(1 - r_hat)))
        if terms:
            per_image.append(sum(terms) / len(terms))
    return sum(per_image) / len(per_image)


def test_patch_bce_matches_eq6(generator):
    logits = torch.randn(3, 7, generator=generator, dtype=torch.float64) * 2
    target = torch.rand(3, 7, generator=generator, dtype=torch.float64)
    assert_same_value_and_grads(lambda x: patch_bce_loss(x, target), lambda x: ref_patch_bce(x, target), [logits])
    hard = target > 0.5
    assert_same_value_and_grads(lambda x: patch_bce_loss(x, hard), lambda x: ref_patch_bce(x, hard.double()), [logits])
    probs = torch.sigmoid(logits)
    torch.testing.assert_close(patch_bce_loss(probs, target, probabilities=True), ref_patch_bce(logits, target), **TOL)
    assert torch.autograd.gradcheck(lambda x: patch_bce_loss(x, target), leaves(logits))


def test_patch_bce_mask(generator):
    logits = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    target = torch.rand(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=generator) > 0.4
    mask[0] = True
    mask[2] = False  # an image with no valid patch is left out of the mean
    assert_same_value_and_grads(
        lambda x: patch_bce_loss(x, target, mask), lambda x: ref_patch_bce(x, target, mask), [logits]
    )
    masked = logits.clone()
    masked[~mask] = float("nan")  # whatever sits in masked-out patches, they give 0, not NaN
    torch.testing.assert_close(patch_bce_loss(masked, target, mask), patch_bce_loss(logits, target, mask), **TOL)
    assert patch_bce_loss(logits, target, torch.zeros(4, 6, dtype=torch.bool)) == 0


def test_patch_bce_large_logits_and_bad_input(generator):
    logits = (torch.randn(2, 5, generator=generator) * 1e4).requires_grad_(True)
    target = torch.rand(2, 5, generator=generator)
    value = patch_bce_loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        patch_bce_loss(logits, target * 3)
    with pytest.raises(ValueError, match=r"pseudo_labels must be \(B, N\)"):
        patch_bce_loss(logits, target[:, :4])
    with pytest.raises(ValueError, match="mask"):
        patch_bce_loss(logits, target, torch.ones(2, 4, dtype=torch.bool))


def test_attention_alignment_matches_autograd_of_the_formula(generator):
    """SAGE Eq. 5: value and gradients equal autograd of sum (p - q)(log p - log q), underflowed entries included."""
    from zslfast.losses import attention_alignment

    a = torch.rand(3, 4, 5, generator=generator, dtype=torch.float64).softmax(-1)
    b = torch.rand(3, 4, 5, generator=generator, dtype=torch.float64).softmax(-2)
    a[0, 0, 0] = 0.0  # an underflowed probability
    a.requires_grad_(), b.requires_grad_()
    tiny = torch.finfo(torch.float64).tiny
    p, q = a / 4, b / 5
    expected = ((p - q) * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(dim=(1, 2))
    weights = torch.randn(3, generator=generator, dtype=torch.float64)
    got = attention_alignment(a, b, 1 / 4, 1 / 5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad((got * weights).sum(), (a, b)),
                    torch.autograd.grad((expected * weights).sum(), (a, b))):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    inputs = (a.detach()[1:].requires_grad_(), b.detach()[1:].requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: attention_alignment(x, y, 0.25, 0.2), inputs)
    with pytest.raises(ValueError, match="one shape"):
        attention_alignment(a, b[:, :2])
