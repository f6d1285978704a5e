"""zslfast.nn.CosineClassifier and InstancePrototypeClassifier against the same math written by hand."""

import pytest
import torch
import torch.nn.functional as F

from zslfast.nn import CosineClassifier, InstancePrototypeClassifier

from helpers import backend_param

BACKENDS = [None, "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_classifier_learnable_matches_formula(backend, generator):
    head = CosineClassifier(13, 7, scale=10.0, learnable_scale=True, backend=backend).double()
    x = torch.randn(5, 3, 13, dtype=torch.float64, generator=generator, requires_grad=True)
    out = head(x)
    expected = head.log_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(head.prototypes, dim=-1).T
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), (x, head.prototypes, head.log_scale))
    grads_ref = torch.autograd.grad(expected.square().sum(), (x, head.prototypes, head.log_scale))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cosine_classifier_fixed_embeddings_are_a_buffer(generator):
    emb = torch.randn(9, 6, generator=generator)
    head = CosineClassifier(6, class_embeddings=emb, scale=5.0)
    assert "prototypes" in dict(head.named_buffers()) and not list(head.parameters())
    x = torch.randn(4, 6, generator=generator)
    torch.testing.assert_close(head(x), 5.0 * F.normalize(x, dim=-1) @ F.normalize(emb, dim=-1).T, rtol=1e-5, atol=1e-5)
    other = torch.randn(3, 6, generator=generator)
    assert head(x, other).shape == (4, 3)


@pytest.mark.parametrize("backend", [*BACKENDS, backend_param("cpu"), backend_param("triton")])
def test_cosine_classifier_eps_mode_add_matches_gem_zsl(backend, generator):
    """GEM-ZSL's head, x / (|x| + 1e-5) @ (p / (|p| + 1e-5)).T * scale, through the module, with its gradients."""
    head = CosineClassifier(13, 7, scale=10.0, learnable_scale=True, eps=1e-5, eps_mode="add", backend=backend)
    head = head.double()
    assert "eps_mode='add'" in repr(head)
    x = torch.randn(5, 13, dtype=torch.float64, generator=generator) * 1e-4  # |x| ~ 4e-4: eps's place matters
    x.requires_grad_()
    out = head(x)
    p = head.prototypes
    expected = x / (x.norm(dim=-1, keepdim=True) + 1e-5) @ (p / (p.norm(dim=-1, keepdim=True) + 1e-5)).T
    expected = expected * head.log_scale.exp()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), (x, head.prototypes, head.log_scale))
    grads_ref = torch.autograd.grad(expected.square().sum(), (x, head.prototypes, head.log_scale))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    clamped = CosineClassifier(13, 7, scale=10.0, eps=1e-5, backend=backend).double()
    clamped.prototypes.data.copy_(p.detach())
    assert not torch.allclose(clamped(x.detach()), out.detach(), rtol=1e-6, atol=0)


def test_cosine_classifier_bad_eps_mode():
    with pytest.raises(ValueError, match=r"CosineClassifier: eps_mode must be one of \('clamp', 'add'\), got 'sum'"):
        CosineClassifier(4, 3, eps_mode="sum")
    with pytest.raises(ValueError, match="CosineClassifier: eps must be a finite float > 0"):
        CosineClassifier(4, 3, eps=0.0)


def test_cosine_classifier_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        CosineClassifier(4)
    with pytest.raises(ValueError, match="class_embeddings"):
        CosineClassifier(4, class_embeddings=torch.randn(3, 5))
    with pytest.raises(ValueError, match="scale"):
        CosineClassifier(4, 3, scale=0.0)


def _hand_logits(module, e, g, s):
    hidden = torch.relu(g @ module.hidden[0].weight.T + module.hidden[0].bias)
    w = hidden @ module.last.weight.T + module.last.bias
    B, (C, K) = e.shape[0], s.shape
    w = w[:, None, :] if module.weights == "attribute" else w.reshape(B, C, K)
    return (e[:, None, :] * (w * s + s)).sum(-1), w


@pytest.mark.parametrize("weights", ["full", "attribute", "factored"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 6])
def test_instance_prototype_classifier_matches_eq5_6(weights, backend, B, generator):
    C, K, Dg, J = 7, 11, 9, 4
    module = InstancePrototypeClassifier(Dg, K, C, hidden_dim=J, weights=weights, backend=backend).double()
    with torch.no_grad():  # the last layer starts at zero (S_W = S); give it values so w matters
        module.last.weight.normal_(generator=generator)
        module.last.bias.normal_(generator=generator)
    e = torch.randn(B, K, dtype=torch.float64, generator=generator, requires_grad=True)
    g = torch.randn(B, Dg, dtype=torch.float64, generator=generator)
    s = torch.randn(C, K, dtype=torch.float64, generator=generator, requires_grad=True)
    logits, hidden, formed = module(e, g, s)
    expected, w = _hand_logits(module, e, g, s)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    params = (e, s, module.last.weight, module.last.bias, module.hidden[0].weight)
    grads = torch.autograd.grad((logits * logits.detach().sin()).sum(), params)
    grads_ref = torch.autograd.grad((expected * expected.detach().sin()).sum(), params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    labels = torch.randint(0, C, (B,), generator=generator)
    want_rows = w[:, 0] if weights == "attribute" else w[torch.arange(B), labels]
    assert (formed is not None) == (weights == "full")  # w is formed, and gathered from, in "full" only
    for given in (None, formed):  # from the layer's label rows, and from the forward's w
        torch.testing.assert_close(module.label_weights(hidden, labels, given), want_rows, rtol=1e-10, atol=1e-10)


def test_instance_prototype_classifier_starts_at_static_prototypes(generator):
    module = InstancePrototypeClassifier(5, 4, 3, hidden_dim=2)
    e, g, s = torch.randn(2, 4, generator=generator), torch.randn(2, 5, generator=generator), torch.randn(3, 4, generator=generator)
    torch.testing.assert_close(module(e, g, s).logits, e @ s.T)


def test_instance_prototype_classifier_bad_input(generator):
    with pytest.raises(ValueError, match="weights"):
        InstancePrototypeClassifier(5, 4, 3, weights="diagonal")
    with pytest.raises(ValueError, match="num_classes"):
        InstancePrototypeClassifier(5, 4, weights="full")
    module = InstancePrototypeClassifier(5, 4, 3, hidden_dim=2)
    with pytest.raises(ValueError, match=r"s must be \(C, K\)"):
        module(torch.randn(2, 4), torch.randn(2, 5), torch.randn(6, 4))
    with pytest.raises(ValueError, match="g"):
        module(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3, 4))
