"""zslfast.baselines (the papers' eager code, timed by bench, gpucheck and benchmarks/) equals zslfast.reference in
float64, forward and backward, at the options the papers use: so a speed-up is measured against the same
computation, and the baselines can serve as a second oracle. The baselines of the op records (zslfast.testing) are
checked against every backend by test_contract.py; here the others: SDPA, per-sample queries, Python loops, the
bank's updates."""

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


@pytest.mark.parametrize("shared_q, sdpa", [(True, True), (False, False), (False, True)])
def test_attribute_attention(generator, shared_q, sdpa):
    B, K, R, D = 3, 5, 7, 8
    q = torch.randn(*((K, D) if shared_q else (B, K, D)), generator=generator, dtype=f64)
    k, v = torch.randn(B, R, D, generator=generator, dtype=f64), torch.randn(B, R, D, generator=generator, dtype=f64)
    ref = torch.randn(K, D, generator=generator, dtype=f64)
    baseline = baselines.attribute_attention_sdpa if sdpa else baselines.attribute_attention
    assert_same(baseline, reference.attribute_attention, (q, k, v, ref), 4)


def test_memory_bank_kl_loop(generator):
    z, protos = torch.randn(5, 2, 9, generator=generator, dtype=f64), torch.randn(4, 2, 9, generator=generator, dtype=f64)
    labels = torch.randint(0, 4, (5,), generator=generator)
    active = torch.rand(5, 2, generator=generator) < 0.6
    assert_same(baselines.memory_bank_kl_loop, reference.memory_bank_kl, (z, protos, labels, active), 1)


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
