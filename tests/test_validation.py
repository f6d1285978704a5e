"""Reliability under bad and extreme input, the Python layer: one validation module for every op,
module, loss, metric and generative function, checked the same way whatever the backend.

    1  every backend accepts and refuses the same input, with the same message, and returns the same shape
    2  bad values (NaN/inf/<= 0 scales and temperatures, NaN gamma/threshold/lambdas) raise a ValueError naming
       the argument
    4  modules keep their promises: MBGF drops the offer of a NaN branch and trains on; losses over an empty batch
       are 0 with zero gradients
    5  solvers' inputs (SVD, eigh) are checked finite first: a ValueError, not torch's LinAlgError

The kernels' own NaN, overflow and saturation cases are in each op's test file.
"""

import math

import numpy as np
import pytest
import torch

import zslfast
from helpers import DEVICE_BACKENDS
from zslfast import generative, losses, metrics
from zslfast.nn import AttentionRollout, CosineClassifier, MemoryBankGuidedFusion

CPU_BACKENDS = [pytest.param("reference", id="reference")] + [
    pytest.param(p.values[1], id=p.values[1], marks=p.marks) for p in DEVICE_BACKENDS if p.values[0] == "cpu"
]
NAN, INF = float("nan"), float("inf")


def _error(fn):
    """(type, message) of what ``fn()`` raises, or None."""
    try:
        fn()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None


# -------------------------------------------------------------------------------- 1. one contract, every backend


def _bad_inputs():
    """(name, call(backend)) of input every backend must refuse alike."""
    g = torch.Generator().manual_seed(0)
    x, p = torch.randn(4, 7, generator=g), torch.randn(5, 7, generator=g)
    q, k, v, ref = torch.randn(3, 8, generator=g), torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g), torch.randn(3, 8, generator=g)
    a = torch.rand(3, 2, 2, 5, 5, generator=g)
    z, protos = torch.randn(4, 3, 6, generator=g), torch.randn(5, 3, 6, generator=g)
    active = torch.ones(4, 3, dtype=torch.bool)
    e, s = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    cases = {
        "cosine scale nan": lambda be: zslfast.cosine_logits(x, p, NAN, backend=be),
        "cosine scale inf": lambda be: zslfast.cosine_logits(x, p, INF, backend=be),
        "cosine scale 0": lambda be: zslfast.cosine_logits(x, p, 0.0, backend=be),
        "cosine scale -1": lambda be: zslfast.cosine_logits(x, p, -1.0, backend=be),
        "cosine scale (2,)": lambda be: zslfast.cosine_logits(x, p, torch.ones(2), backend=be),
        "cosine scale int tensor": lambda be: zslfast.cosine_logits(x, p, torch.tensor(2), backend=be),
        "cosine eps nan": lambda be: zslfast.cosine_logits(x, p, eps=NAN, backend=be),
        "cosine D mismatch": lambda be: zslfast.cosine_logits(x, p[:, :6], backend=be),
        "attention scale nan": lambda be: zslfast.attribute_attention(q, k, v, ref, scale=NAN, backend=be),
        "attention scale inf": lambda be: zslfast.attribute_attention(q, k, v, ref, scale=INF, backend=be),
        "attention scale 0": lambda be: zslfast.attribute_attention(q, k, v, ref, scale=0.0, backend=be),
        "attention scale -1": lambda be: zslfast.attribute_attention(q, k, v, ref, scale=-1.0, backend=be),
        "attention score": lambda be: zslfast.attribute_attention(q, k, v, ref, score="cos", backend=be),
        "attention mask float": lambda be: zslfast.attribute_attention(q, k, v, ref, mask=torch.ones(2, 6), backend=be),
        "rollout cls_only str": lambda be: zslfast.attention_rollout(a, cls_only="no", backend=be),
        "rollout mode": lambda be: zslfast.attention_rollout(a, mode="avg", backend=be),
        "rollout start_layer": lambda be: zslfast.attention_rollout(a, start_layer=3, backend=be),
        "kl labels float": lambda be: zslfast.memory_bank_kl(z, protos, torch.zeros(4), active, backend=be),
        "kl labels bool": lambda be: zslfast.memory_bank_kl(z, protos, torch.zeros(4, dtype=torch.bool), active, backend=be),
        "kl labels range": lambda be: zslfast.memory_bank_kl(z, protos, torch.tensor([0, 1, 5, 2]), active, backend=be),
        "kl labels negative": lambda be: zslfast.memory_bank_kl(z, protos, torch.tensor([0, -1, 2, 2], dtype=torch.int8), active, backend=be),
        "kl active float": lambda be: zslfast.memory_bank_kl(z, protos, torch.zeros(4, dtype=torch.long), active.float(), backend=be),
        "scores s mismatch": lambda be: zslfast.prototype_scores(e, s[:, :5], backend=be),
        "scores labels-like e": lambda be: zslfast.prototype_scores(e.long(), s, backend=be),
    }
    return cases


BAD = _bad_inputs()


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_backend_refuses_bad_input_alike(case):
    """The same TypeError/ValueError, word for word, on every backend (checks run before any kernel)."""
    seen = {}
    for param in CPU_BACKENDS:
        if param.marks:
            continue
        seen[param.values[0]] = _error(lambda: BAD[case](param.values[0]))
    assert all(error is not None for error in seen.values()), seen
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_labels_of_any_width_give_the_int64_result(backend, dtype):
    """uint8 labels are class ids, never a boolean mask (indexing with a uint8 tensor would read it as one)."""
    g = torch.Generator().manual_seed(1)
    z, protos = torch.randn(6, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    active = torch.ones(6, 3, dtype=torch.bool)
    want = zslfast.reference.memory_bank_kl(z, protos, labels, active)
    got = zslfast.memory_bank_kl(z, protos, labels.to(dtype), active, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [2.0, torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([[[2.0]]])])
def test_scale_shapes_give_one_output_shape(backend, scale):
    """Any one-element scale, on every backend: out (..., C) follows x (..., D), never the scale's shape."""
    g = torch.Generator().manual_seed(2)
    x, p = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    scale = scale.double() if isinstance(scale, torch.Tensor) else scale
    assert zslfast.cosine_logits(x[0], p, scale, backend=backend).shape == (5,)
    assert zslfast.cosine_logits(x, p, scale, backend=backend).shape == (2, 5)
    torch.testing.assert_close(
        zslfast.cosine_logits(x[0], p, scale, backend=backend), zslfast.reference.cosine_logits(x[0], p, 2.0)
    )


def test_modules_and_ops_refuse_the_same_options():
    a = torch.rand(3, 2, 2, 5, 5)
    op_error = _error(lambda: zslfast.attention_rollout(a, cls_only="no"))
    module_error = _error(lambda: AttentionRollout(cls_only="no"))
    assert op_error is not None and module_error is not None
    assert op_error[0] is module_error[0] is TypeError
    assert "cls_only must be a bool" in op_error[1] and "cls_only must be a bool" in module_error[1]


# -------------------------------------------------------------------------------------------- 2. bad values


@pytest.mark.parametrize("value", [NAN, INF, -INF, 0.0, -2.0])
def test_temperatures_and_scales_must_be_finite_and_positive(value):
    calls = {
        "CosineClassifier": lambda: CosineClassifier(7, 5, scale=value),
        "ILPGLoss": lambda: losses.ILPGLoss(tau=value),
        "pcr_loss": lambda: losses.pcr_loss(torch.randn(5, 4), None, torch.tensor([0, 1]), tau=value),
        "MemoryBankGuidedFusion": lambda: MemoryBankGuidedFusion(8, 3, 5, 4, threshold=0.1, alpha=1.0, scale=value),
        "MemoryBankGuidedFusion ": lambda: MemoryBankGuidedFusion(8, 3, 5, 4, threshold=0.1, alpha=1.0, scale=1.0,
                                                                  kl_scale=value),
    }
    for name, call in calls.items():
        error = _error(call)
        assert error is not None and error[0] is ValueError, (name, error)
        assert name.strip() in error[1] and ("scale" in error[1] or "tau" in error[1]), error


@pytest.mark.parametrize("value", [NAN, INF])
def test_numbers_that_select_must_be_finite(value):
    """A NaN gamma, threshold or weight compares false with everything and silently selects nothing."""
    scores = torch.randn(10, 5)
    labels = torch.randint(0, 5, (10,))
    calls = {
        "gamma": lambda: metrics.gzsl_accuracy(scores, labels, scores, labels, [0, 1], [2, 3, 4], gamma=value),
        "gamma ": lambda: metrics.calibrated_stacking(scores, [0, 1], value),
        "gammas": lambda: metrics.gamma_sweep(scores, labels, scores, labels, [0, 1], [2, 3, 4], gammas=[0.0, value]),
        "threshold": lambda: generative.msas(torch.rand(5, 7), threshold=value),
        "threshold  ": lambda: generative.msas(torch.rand(5, 7), threshold=torch.full((7,), value)),
        "lambda_sas": lambda: losses.ILPGLoss(lambda_sas=value),
        "beta": lambda: generative.semantic_regularised_contrastive_loss(
            scores, labels, torch.rand(5, 5), value, torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)),
        "threshold ": lambda: MemoryBankGuidedFusion(8, 3, 5, 4, threshold=value, alpha=1.0, scale=4.0),
        "alpha": lambda: MemoryBankGuidedFusion(8, 3, 5, 4, threshold=0.1, alpha=value, scale=4.0),
    }
    for name, call in calls.items():
        error = _error(call)
        assert error is not None and error[0] is ValueError, (name, error)
        assert name.strip() in error[1], error


def test_metrics_refuse_nan_scores_and_accept_minus_inf():
    scores = torch.randn(6, 4)
    labels = torch.tensor([2, 2, 3, 3, 2, 3])
    masked = scores.clone()
    masked[:, 0] = -INF  # a class masked out of the prediction: allowed
    assert 0 <= metrics.czsl_accuracy(masked, labels, [2, 3]) <= 1
    scores[4, 1] = NAN
    with pytest.raises(ValueError, match=r"czsl_accuracy: scores \(6, 4\) holds NaN scores in 1 row\(s\), the first row 4"):
        metrics.czsl_accuracy(scores, labels, [2, 3])
    with pytest.raises(TypeError, match="czsl_accuracy: labels must hold integer class ids"):
        metrics.czsl_accuracy(masked, labels.float(), [2, 3])
    with pytest.raises(ValueError, match=r"gzsl_accuracy: unseen_classes must be class ids in \[0, 4\)"):
        metrics.gzsl_accuracy(masked, labels, masked, labels, [0, 1], [2, 4])


# ------------------------------------------------------------------------------------- 4. modules and losses


@pytest.mark.parametrize("backend", [None, "reference"])
def test_mbgf_drops_the_offer_of_a_nan_branch_and_trains_on(backend):
    torch.manual_seed(0)
    module = MemoryBankGuidedFusion(8, 3, 5, 4, threshold=0.0, alpha=2.0, scale=4.0, backend=backend).train()
    a = torch.randn(5, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for _ in range(2):
        module(torch.randn(6, 3, 8), a, y)
    counts = module.bank.counts.clone()
    z = torch.randn(6, 3, 8)
    z[1, 2, 3] = NAN
    z.requires_grad_(True)
    # no ValueError: the NaN branch's offer (its confidence is NaN too) is dropped before the bank update, which
    # refuses NaN confidences
    out = module(z, a, y)
    # sample 1 depends on the NaN (its fusion weights do), every other sample does not
    assert out.logits[1].isnan().all() and out.logits[[0, 2, 3, 4, 5]].isfinite().all()
    out.kl_loss.backward()
    assert torch.isfinite(out.kl_loss) and z.grad.isfinite().all()
    after = module.bank.counts
    # every finite offer above threshold 0 was taken (confidences are > 0); the NaN branch's was not
    expected = counts.clone()
    for b, c in enumerate(y.tolist()):
        for m in range(3):
            if (b, m) != (1, 2):
                expected[c, m] = min(expected[c, m] + 1, 4)
    assert torch.equal(after, expected)
    assert module.bank.features.isfinite().all()


EMPTY_LOSSES = {
    "ipm_loss": lambda lg, e, s, y: losses.ipm_loss(lg, y),
    "sas_loss": lambda lg, e, s, y: losses.sas_loss(lg, y, s, [3, 4]),
    "vsr_loss": lambda lg, e, s, y: losses.vsr_loss(e, s, None, y),
    "pcr_loss": lambda lg, e, s, y: losses.pcr_loss(s, None, y),
    "ILPGLoss": lambda lg, e, s, y: losses.ILPGLoss(unseen_classes=[3, 4])(lg, y, e, s)[0],
    "jsd_loss": lambda lg, e, s, y: losses.jsd_loss(lg, 2 * lg),
    "patch_bce_loss": lambda lg, e, s, y: losses.patch_bce_loss(lg, torch.rand(lg.shape)),
    "patch_bce_loss mask": lambda lg, e, s, y: losses.patch_bce_loss(
        lg, torch.rand(lg.shape), mask=torch.ones(lg.shape, dtype=torch.bool)),
    "memory_bank_kl": lambda lg, e, s, y: zslfast.memory_bank_kl(
        e.reshape(0, 2, 3), s.reshape(5, 2, 3), y, torch.zeros(0, 2, dtype=torch.bool)),
    "dpsr": lambda lg, e, s, y: generative.semantic_regularised_contrastive_loss(
        lg, y, torch.rand(5, 5), 0.2, torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)),
}


@pytest.mark.parametrize("name", sorted(EMPTY_LOSSES))
def test_losses_over_an_empty_batch_are_zero_with_zero_gradients(name):
    """One rule (losses.py docstring): B = 0 gives 0 and zero gradients, never the NaN of an empty mean."""
    logits = torch.randn(0, 5, requires_grad=True)
    e = torch.randn(0, 6, requires_grad=True)
    s = torch.randn(5, 6, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    loss = EMPTY_LOSSES[name](logits, e, s, labels)
    assert loss.shape == () and loss.item() == 0.0
    inputs = [t for t in (logits, e, s)]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for grad in grads:
        assert grad is None or (grad.isfinite().all() and not grad.any())


def test_losses_refuse_empty_classes():
    with pytest.raises(ValueError, match=r"ipm_loss: logits \(B, C\) may be empty only in its batch dimension"):
        losses.ipm_loss(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ 5. solvers


def test_solvers_inputs_must_be_finite():
    att = torch.rand(6, 5)
    att[2, 1] = NAN
    with pytest.raises(ValueError, match=r"ridge_prototypes: seen_att \(6, 5\) must be finite, got 1 NaN/inf"):
        generative.ridge_prototypes(torch.rand(3, 5), att, torch.randn(6, 4), 0.1)
    for center in (False, True):
        with pytest.raises(ValueError, match=r"class_diversity_promotion: sem \(6, 5\) must be finite"):
            generative.class_diversity_promotion(att, 1, center=center)
    # n_remove=0 runs no solver: NaN propagates to its row only
    out = generative.class_diversity_promotion(att, 0).sem
    assert out[2].isnan().all() and out[[0, 1, 3, 4, 5]].isfinite().all()


def test_labels_are_checked_through_numpy_and_lists():
    assert metrics.per_class_accuracy(np.array([0, 1, 1]), [0, 1, 0]) == pytest.approx(0.75)
    with pytest.raises(TypeError, match="per_class_accuracy: pred must hold integer class ids"):
        metrics.per_class_accuracy(np.array([0.0, 1.0]), [0, 1])
    assert math.isclose(metrics.per_class_accuracy([], []), 0.0)


# ------------------------------------------------------------------ 3. NaN reaches what depends on it, alike


def _nan_pattern(fn, inputs):
    """(NaN mask of the output, NaN masks of the input gradients) of ``fn(*inputs)`` with a random upstream grad."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], upstream, allow_unused=True)
    return out, [None if grad is None else grad for grad in grads]


NAN_CASES = {
    # name: (op, reference, inputs builder, where to put the NaN: (input index, index))
    "prototype_scores e": ("prototype_scores", lambda g: [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g),
                                                          torch.randn(4, 5, 6, generator=g)], (0, (1, 2))),
    "prototype_scores s": ("prototype_scores", lambda g: [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g),
                                                          torch.randn(4, 5, 6, generator=g)], (1, (3, 0))),
    "prototype_scores w": ("prototype_scores", lambda g: [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g),
                                                          torch.randn(4, 5, 6, generator=g)], (2, (2, 1, 4))),
    "cosine_logits x": ("cosine_logits", lambda g: [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)], (0, (2, 3))),
    "cosine_logits protos": ("cosine_logits", lambda g: [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)], (1, (0, 5))),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS[1:])
@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_nan_reaches_what_depends_on_it_as_in_the_reference(case, backend):
    """A NaN in one input element: every backend's output and gradients are NaN exactly where the reference's
    are (the plain PyTorch math), and equal to it elsewhere."""
    op_name, build, (which, index) = NAN_CASES[case]
    op = getattr(zslfast, op_name)
    inputs = [t.double() for t in build(torch.Generator().manual_seed(3))]
    inputs[which][index] = NAN
    want_out, want_grads = _nan_pattern(lambda *a: op(*a, backend="reference"), inputs)
    got_out, got_grads = _nan_pattern(lambda *a: op(*a, backend=backend), inputs)
    assert want_out.isnan().any() and not want_out.isnan().all()
    torch.testing.assert_close(got_out, want_out, equal_nan=True)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("poison", [NAN, INF, -INF])
def test_memory_bank_kl_inactive_rows_never_reach_loss_or_gradient(backend, poison):
    """"active" selects: whatever an inactive z[b, m] or its prototype holds, the loss and every gradient are those
    of the same batch with finite values there."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    protos = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    active = torch.rand(5, 3, generator=g) > 0.4
    active[2, 1], active[0, 0] = False, True
    poisoned, poisoned_protos = z.clone(), protos.clone()
    poisoned[2, 1, 3] = poison
    poisoned_protos[2, 1, :] = poison  # class 2's branch 1 prototype: only sample 2 reads it, and (2, 1) is inactive
    want_out, (want_grad,) = _nan_pattern(
        lambda t: zslfast.memory_bank_kl(t, protos, labels, active, backend="reference"), [z])
    got_out, (got_grad,) = _nan_pattern(
        lambda t: zslfast.memory_bank_kl(t, poisoned_protos, labels, active, backend=backend), [poisoned])
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_grad, want_grad)
    assert not got_grad[2, 1].any()
