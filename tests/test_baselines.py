"""zslfast.baselines (the papers' eager code, timed by bench, gpucheck and benchmarks/) equals zslfast.reference in
float64, forward and backward, at the options the papers use: so a speed-up is measured against the same
computation, and the baselines can serve as a second oracle."""

import pytest
import torch

from zslfast import baselines, reference

f64 = torch.float64


def grads(fn, inputs, num_grad):
    leaves = [t.detach().clone().requires_grad_(i < num_grad) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves[:num_grad], g)]


def assert_same(fn_a, fn_b, inputs, num_grad):
    for a, b in zip(grads(fn_a, inputs, num_grad), grads(fn_b, inputs, num_grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_prototype_scores(generator):
    e, s, w = (torch.randn(*shape, generator=generator, dtype=f64) for shape in ((5, 7), (9, 7), (5, 9, 7)))
    assert_same(baselines.prototype_scores, reference.prototype_scores, (e, s, w), 3)
    h, u = torch.randn(5, 3, generator=generator, dtype=f64), torch.randn(3, 9, 7, generator=generator, dtype=f64)
    assert_same(baselines.prototype_scores_factored, reference.prototype_scores_factored, (e, s, h, u), 4)


def test_cosine_logits(generator):
    x, p = torch.randn(6, 11, generator=generator, dtype=f64), torch.randn(4, 11, generator=generator, dtype=f64)
    assert_same(lambda x, p: baselines.cosine_logits(x, p, 16.0), lambda x, p: reference.cosine_logits(x, p, 16.0),
                (x, p), 2)


@pytest.mark.parametrize("shared_q", [True, False])
@pytest.mark.parametrize("sdpa", [False, True])
def test_attribute_attention(generator, shared_q, sdpa):
    B, K, R, D = 3, 5, 7, 8
    q = torch.randn(*((K, D) if shared_q else (B, K, D)), generator=generator, dtype=f64)
    k, v = torch.randn(B, R, D, generator=generator, dtype=f64), torch.randn(B, R, D, generator=generator, dtype=f64)
    ref = torch.randn(K, D, generator=generator, dtype=f64)
    baseline = baselines.attribute_attention_sdpa if sdpa else baselines.attribute_attention
    assert_same(baseline, reference.attribute_attention, (q, k, v, ref), 4)


def test_attention_rollout(generator):
    attns = [torch.randn(2, 3, 6, 6, generator=generator, dtype=f64).softmax(-1) for _ in range(4)]
    assert_same(lambda *a: baselines.attention_rollout(a), lambda *a: reference.attention_rollout(list(a)), attns, 4)


@pytest.mark.parametrize("loop", [False, True])
def test_memory_bank_kl(generator, loop):
    z, protos = torch.randn(5, 2, 9, generator=generator, dtype=f64), torch.randn(4, 2, 9, generator=generator, dtype=f64)
    labels = torch.randint(0, 4, (5,), generator=generator)
    active = torch.rand(5, 2, generator=generator) < 0.6
    baseline = baselines.memory_bank_kl_loop if loop else baselines.memory_bank_kl
    assert_same(baseline, reference.memory_bank_kl, (z, protos, labels, active), 1)


@pytest.mark.parametrize("update, policy", [
    (baselines.memory_bank_fifo_update, "fifo"), (baselines.memory_bank_update_loop, "fifo"),
    (baselines.memory_bank_update_loop, "min_conf"),
])
def test_memory_bank_updates(generator, update, policy):
    C, M, K, D = 3, 2, 3, 4

    def bank():
        return (torch.zeros(C, M, K, D, dtype=f64), torch.zeros(C, M, K, dtype=f64),
                torch.zeros(C, M, dtype=torch.int64), torch.zeros(C, M, dtype=torch.int64))

    got, want = bank(), bank()
    for step in range(4):
        z = torch.randn(7, M, D, generator=generator, dtype=f64)
        y = torch.randint(0, 2, (7,), generator=generator)  # two classes: the queues overflow
        conf = torch.rand(7, M, generator=generator, dtype=f64)
        update(*got, z, y, conf, 0.3, **({"policy": policy} if update is baselines.memory_bank_update_loop else {}))
        reference.memory_bank_update(*want, z, y, conf, 0.3, policy)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (step, a, b)
