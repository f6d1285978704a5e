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


def test_issue_33_attention_baselines(generator):
    """TransZero++'s geometry attention and E_v2s, APN's maps and their max, multi-head attention (DPPN): the eager
    forms benchmarks/bench_attention_variants.py times, against the reference's bias, no softmax, logits map and
    heads."""
    B, K, R, C, H = 2, 5, 9, 6, 3
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=f64)  # noqa: E731
    q, k, v, w_g = rand(B, R, C), rand(B, R, C), rand(B, R, C), rand(B, H, R, R).relu()
    assert_same(baselines.transzero_pp_geometry_attention,
                lambda q, k, v, w_g: reference.attribute_attention(q, k, v, bias=-w_g, score=None, num_heads=H),
                (q, k, v, w_g), 4)
    emb_vis, W_4, emb_att, S_p = rand(B, R, C), rand(C, C), rand(B, K, C), rand(B, R)
    assert_same(baselines.transzero_pp_e_v2s,
                lambda emb_vis, W_4, emb_att, S_p: reference.attribute_attention(
                    emb_att * W_4.diagonal(), emb_vis, S_p[..., None], scale=1.0, score=None,
                    softmax_over=None)[..., 0],
                (emb_vis, W_4, emb_att, S_p), 4)

    def apn(x, prototypes):
        _, maps, best = reference.attribute_attention(
            prototypes.flatten(1), x.flatten(2).transpose(1, 2), x.new_zeros(B, R, 1), scale=1.0, score=None,
            softmax_over=None, return_attention="logits", return_max="logits")
        return torch.cat((maps, best[..., None]), dim=-1)

    assert_same(baselines.apn_attribute_maps, apn, (rand(B, C, 3, 3), rand(K, C, 1, 1)), 2)
    assert_same(lambda q, k, v: baselines.multihead_attention(q, k, v, H),
                lambda q, k, v: reference.attribute_attention(q, k, v, score=None, num_heads=H),
                (rand(B, K, C), rand(B, R, C), rand(B, R, 2 * C)), 3)


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
