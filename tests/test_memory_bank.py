"""MemoryBank, memory_bank_kl and MemoryBankGuidedFusion against plain PyTorch references.

Update: every backend against the one-by-one Python loop (zslfast.reference.memory_bank_update), both policies,
many repeats of one class in a batch, capacity 1, thresholds that admit none / all, tied confidences, non-finite
features, several batches in a row; hand-worked FIFO and min_conf examples. KL: outputs and gradients of every
backend against reference.memory_bank_kl in float64 / float32 (the Triton interpreter on CPU), the streaming
(long-row) Triton path, all / none active, large logits, NaN prototypes of inactive rows (the KL's gradcheck,
opcheck, torch.compile, layouts and backends: test_contract.py); the update's opcheck. MBGF against an eager
re-implementation of SAGE Eqs. 6-9. State_dict round trip and bad input. The gloo 2-process test is
tests/test_memory_bank_distributed.py.

    KL loss = mean over active (b, m) of KL(softmax(z[b, m]) || softmax(protos[labels[b], m]))
"""

import pytest
import torch
import torch.nn.functional as F

import zslfast
from zslfast import reference
from zslfast.nn import MemoryBank, MemoryBankGuidedFusion

from helpers import (
    DEVICE_BACKENDS, TOLERANCES, backend_param, dtypes_for, low_precision_error_bound, require_backend, requires_gpu,
    softmax_grad_error_scale,
)

UPDATE_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[1] != "triton"]  # no Triton update kernel
KL_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[1] != "cuda"]  # no CUDA KL kernel (Triton runs on GPU)
STATE = ("features", "confidences", "counts", "next_slot")  # bit-exact; means compared with a tolerance


def reference_bank(C, M, K, D, threshold, policy, dtype, device):
    return MemoryBank(C, M, K, D, threshold=threshold, policy=policy, dtype=dtype, device=device, backend="reference")


def assert_same_bank(got: MemoryBank, want: MemoryBank, dtype, exact_confidences=True):
    rtol, atol = TOLERANCES.get(dtype, (1e-2, 1e-2))
    got.prototypes(), want.prototypes()  # refresh the stale means
    for name in STATE:  # stored entries are copies: bit-exact
        if name == "confidences" and not exact_confidences:
            torch.testing.assert_close(got.confidences, want.confidences, rtol=rtol, atol=atol)
            continue
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    torch.testing.assert_close(got.means.cpu(), want.means.cpu(), rtol=rtol, atol=atol)
    protos, valid = got.prototypes()
    torch.testing.assert_close(
        protos.double().cpu(), reference.memory_bank_prototypes(want.features.double(), want.counts).cpu(),
        rtol=rtol, atol=atol,
    )
    assert torch.equal(valid.cpu(), want.counts.cpu() > 0)


def offers(B, M, D, C, generator, dtype, device, classes=None, conf_levels=None):
    z = torch.randn(B, M, D, generator=generator, dtype=torch.float64).to(device, dtype)
    pool = torch.arange(C) if classes is None else torch.tensor(classes)
    y = pool[torch.randint(0, len(pool), (B,), generator=generator)].to(device)
    conf = torch.rand(B, M, generator=generator, dtype=torch.float64)
    if conf_levels is not None:  # few distinct values: ties in min_conf
        conf = (conf * conf_levels).floor() / conf_levels
    return z, y, conf.to(device, dtype)


# (C, M, K, D, B, threshold, batches, classes, conf_levels)
UPDATE_CASES = {
    "random": (7, 3, 4, 9, 23, 0.3, 3, None, None),
    "one-class-many-repeats": (5, 2, 3, 6, 40, 0.2, 2, [3], None),
    "capacity-1": (4, 3, 1, 5, 30, 0.5, 3, [0, 1], None),
    "admits-none": (4, 2, 3, 5, 17, 1.5, 2, None, None),
    "admits-all": (3, 2, 5, 5, 26, -1.0, 3, None, None),
    "tied-confidences": (3, 2, 3, 4, 35, 0.1, 3, [0, 2], 4),
    "batch-1": (6, 1, 2, 1, 1, 0.0, 4, None, None),
}


@pytest.mark.parametrize("device,backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("policy", ["fifo", "min_conf"])
@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_matches_one_by_one_reference(device, backend, policy, case, generator):
    C, M, K, D, B, threshold, batches, classes, conf_levels = UPDATE_CASES[case]
    for dtype in (torch.float64, torch.float32):
        bank = MemoryBank(C, M, K, D, threshold=threshold, policy=policy, dtype=dtype, device=device, backend=backend)
        want = reference_bank(C, M, K, D, threshold, policy, dtype, device)
        for _ in range(batches):
            z, y, conf = offers(B, M, D, C, generator, dtype, device, classes, conf_levels)
            bank.update(z, y, conf)
            want.update(z, y, conf)
            assert_same_bank(bank, want, dtype)
        if case == "admits-none":
            assert not want.counts.any()
        if case == "admits-all":
            assert want.counts.sum() > 0 and (want.confidences[want.counts > 0] != 0).any()
        if case in ("one-class-many-repeats", "capacity-1"):
            assert (want.counts == K).any()  # the queues really overflowed


@pytest.mark.parametrize("device,backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("policy", ["fifo", "min_conf"])
def test_update_non_finite_features_are_dropped(device, backend, policy, generator):
    C, M, K, D = 3, 2, 2, 6
    z, y, conf = offers(12, M, D, C, generator, torch.float32, device)
    conf.fill_(0.9)
    z[1, 0, 3] = float("nan")
    z[4, 1, 0] = float("inf")
    z[7, 0, 5] = -float("inf")
    bank = MemoryBank(C, M, K, D, threshold=0.5, policy=policy, device=device, backend=backend)
    want = reference_bank(C, M, K, D, 0.5, policy, torch.float32, device)
    bank.update(z, y, conf)
    want.update(z, y, conf)
    assert_same_bank(bank, want, torch.float32)
    assert bank.features.isfinite().all() and bank.means.isfinite().all()


@pytest.mark.parametrize("device,backend", UPDATE_BACKENDS)
def test_update_non_contiguous_and_mixed_dtype_offers(device, backend, generator):
    C, M, K, D, B = 4, 3, 2, 7, 10
    z = torch.randn(D, M, B, generator=generator, dtype=torch.float64).to(device).permute(2, 1, 0)
    conf = torch.rand(M, B, generator=generator).to(device).T
    y = torch.randint(0, C, (B,), generator=generator, dtype=torch.int32).to(device)
    assert not z.is_contiguous() and not conf.is_contiguous()
    bank = MemoryBank(C, M, K, D, threshold=0.2, device=device, backend=backend)
    want = reference_bank(C, M, K, D, 0.2, "fifo", torch.float32, device)
    bank.update(z, y, conf)
    want.update(z.contiguous(), y.long(), conf.contiguous())
    assert_same_bank(bank, want, torch.float32)


@pytest.mark.parametrize("backend", ["reference", backend_param("cpu")])
def test_fifo_by_hand(backend):
    """Capacity 2, queue (1, 0) offered 1, 2, 3, 4 with 3 below the threshold: 1 -> slot 0, 2 -> slot 1, 4 -> slot 0
    (overwrites 1), head 1. Next batch 5, 7 to class 1 (6 to class 0): 5 -> slot 1, 7 -> slot 0, head 1."""
    bank = MemoryBank(2, 1, 2, 1, threshold=0.5, backend=backend)
    z = torch.tensor([[[1.0]], [[2.0]], [[3.0]], [[4.0]]])
    bank.update(z, torch.tensor([1, 1, 1, 1]), torch.tensor([[0.9], [0.8], [0.4], [0.7]]))
    assert bank.features[1, 0, :, 0].tolist() == [4.0, 2.0]
    assert bank.confidences[1, 0].tolist() == pytest.approx([0.7, 0.8])
    assert bank.counts.tolist() == [[0], [2]] and bank.next_slot.tolist() == [[0], [1]]
    assert bank.prototypes()[0][1, 0].item() == 3.0
    bank.update(torch.tensor([[[5.0]], [[6.0]], [[7.0]]]), torch.tensor([1, 0, 1]), torch.tensor([[0.6], [0.6], [0.6]]))
    assert bank.features[1, 0, :, 0].tolist() == [7.0, 5.0] and bank.features[0, 0, 0, 0].item() == 6.0
    assert bank.counts.tolist() == [[1], [2]] and bank.next_slot.tolist() == [[1], [1]]


@pytest.mark.parametrize("backend", ["reference", backend_param("cpu")])
def test_min_conf_by_hand(backend):
    """Capacity 2: 0.6, 0.9 stored; 0.7 replaces 0.6; 0.65 is refused (least stored is 0.7); 0.95 replaces 0.7."""
    bank = MemoryBank(1, 1, 2, 1, threshold=0.5, policy="min_conf", backend=backend)
    z = torch.tensor([[[1.0]], [[2.0]], [[3.0]], [[4.0]], [[5.0]]])
    bank.update(z, torch.zeros(5, dtype=torch.long), torch.tensor([[0.6], [0.9], [0.7], [0.65], [0.95]]))
    assert bank.features[0, 0, :, 0].tolist() == [5.0, 2.0]
    assert bank.confidences[0, 0].tolist() == pytest.approx([0.95, 0.9])
    assert bank.counts.item() == 2


def test_update_is_vectorised_no_python_loop(monkeypatch, generator):
    """The default CPU path never runs the reference loop."""
    require_backend("cpu")
    monkeypatch.setattr(reference, "memory_bank_update", lambda *a, **k: pytest.fail("reference loop called"))
    bank = MemoryBank(5, 3, 4, 8, threshold=0.1)
    bank.update(*offers(20, 3, 8, 5, generator, torch.float32, "cpu"))
    assert bank.counts.sum() > 0


def test_state_dict_round_trip_and_to(generator):
    bank = MemoryBank(6, 2, 3, 5, threshold=0.3, policy="min_conf")
    for _ in range(3):
        bank.update(*offers(15, 2, 5, 6, generator, torch.float32, "cpu"))
    state = bank.state_dict()
    assert set(state) == {"features", "confidences", "counts", "next_slot", "stale", "means"}
    restored = MemoryBank(6, 2, 3, 5, threshold=0.3, policy="min_conf")
    restored.load_state_dict(state)
    assert_same_bank(restored, bank, torch.float32)
    more = offers(15, 2, 5, 6, generator, torch.float32, "cpu")
    bank.update(*more)
    restored.update(*more)
    assert_same_bank(restored, bank, torch.float32)
    doubled = bank.to(torch.float64)
    assert doubled.features.dtype == torch.float64 and doubled.counts.dtype == torch.int64


# --- memory_bank_kl -------------------------------------------------------------------------------------------------


def kl_inputs(B, M, D, C, dtype, device, generator, magnitude=1.0, p_active=0.6):
    z = (torch.randn(B, M, D, generator=generator, dtype=torch.float64) * magnitude).to(device, dtype)
    protos = (torch.randn(C, M, D, generator=generator, dtype=torch.float64) * magnitude).to(device, dtype)
    labels = torch.randint(0, C, (B,), generator=generator).to(device)
    active = (torch.rand(B, M, generator=generator) < p_active).to(device)
    return z, protos, labels, active


def run_kl(fn, z, protos, labels, active, grad_out):
    z = z.detach().requires_grad_()
    loss = fn(z, protos, labels, active)
    (grad,) = torch.autograd.grad(loss, z, grad_out.to(loss.dtype))
    return loss, grad


def assert_kl_matches_reference(z, protos, labels, active, backend, generator):
    dtype = z.dtype
    grad_out = torch.randn((), generator=generator, dtype=torch.float64).to(z.device)
    want_loss, want_grad = run_kl(reference.memory_bank_kl, z.double(), protos.double(), labels, active, grad_out)
    got_loss, got_grad = run_kl(
        lambda *a: zslfast.memory_bank_kl(*a, backend=backend), z, protos, labels, active, grad_out
    )
    assert got_loss.shape == () and got_loss.dtype == dtype and got_grad.dtype == dtype
    if dtype in TOLERANCES:
        rtol, atol = TOLERANCES[dtype]
        # each KL term sums D products of size ~max|log P - log Q|: errors scale with it (large-logit cases)
        size = max(1.0, (want_loss.abs().item()))
        grad_size = max(1.0, abs(grad_out.item())) / max(1, int(active.sum()))
        torch.testing.assert_close(got_loss.double(), want_loss, rtol=rtol, atol=atol * size)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=rtol, atol=atol * grad_size * size)
        return
    low_loss, low_grad = run_kl(reference.memory_bank_kl, z, protos, labels, active, grad_out)
    for name, got, low, want in (("loss", got_loss, low_loss, want_loss), ("grad", got_grad, low_grad, want_grad)):
        err, bound = low_precision_error_bound(got, low, want)
        assert err <= max(bound, torch.finfo(dtype).eps * max(1.0, want.abs().max().item())), f"{dtype} {name}"


# (B, M, D, C, magnitude, p_active)
KL_CASES = {
    "tiny": (1, 1, 1, 1, 1.0, 1.0),
    "odd": (5, 3, 33, 4, 1.0, 0.6),
    "wide": (9, 3, 129, 7, 1.0, 0.5),
    "large-logits": (6, 2, 40, 3, 30.0, 0.7),
    "all-active": (4, 3, 17, 5, 1.0, 1.0),
}


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_matches_reference(device, backend, case, generator):
    B, M, D, C, magnitude, p_active = KL_CASES[case]
    for dtype in dtypes_for(device, backend):
        z, protos, labels, active = kl_inputs(B, M, D, C, dtype, device, generator, magnitude, p_active)
        if case != "tiny":
            active[0, 0] = True  # at least one row
        assert_kl_matches_reference(z, protos, labels, active, backend, generator)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_kl_streaming_rows(device, backend, monkeypatch, generator):
    """Rows longer than one Triton block (lowered to 16 here): the online-logsumexp path, D not a multiple of it."""
    from zslfast.triton import memory_bank as triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_SINGLE_BLOCK", 16)
    for dtype in (torch.float64, torch.float32):
        z, protos, labels, active = kl_inputs(4, 2, 53, 3, dtype, device, generator, magnitude=5.0)
        active[0, 1] = True
        assert_kl_matches_reference(z, protos, labels, active, backend, generator)


def exact_kl_grad(z, q):
    """d KL(softmax(z) || softmax(q)) / dz = P (a - KL), a = log P - log Q, of each row (last dim) of float64 z and
    q, in 60-digit arithmetic (mpmath) rounded once to float64."""
    import mpmath

    out = []
    with mpmath.workdps(60):
        for zr, qr in zip(z.reshape(-1, z.shape[-1]).tolist(), q.reshape(-1, q.shape[-1]).tolist()):
            lse_z = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(x)) for x in zr))
            lse_q = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(x)) for x in qr))
            a = [(mpmath.mpf(x) - lse_z) - (mpmath.mpf(y) - lse_q) for x, y in zip(zr, qr)]
            p = [mpmath.exp(mpmath.mpf(x) - lse_z) for x in zr]
            kl = mpmath.fsum(pi * ai for pi, ai in zip(p, a))
            out.append([float(pi * (ai - kl)) for pi, ai in zip(p, a)])
    return torch.tensor(out, dtype=torch.float64).reshape(z.shape)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_kl_saturated_gradient(device, backend, generator, monkeypatch):
    """Near one-hot P (each row's top logit 40-60 above the rest): the float32 gradient P (a - KL) is within 4x
    float32's own rounding (helpers.softmax_grad_error_scale, N = the rounding of a) of the
    60-digit one, entry by entry; a - KL in float32 rounds to 0 (or noise) at the top, where the true gradient is
    -P_t sum_d P_d (a_d - a_t) ~ e^-gap. One block and streamed rows (Triton's block lowered to 16)."""
    if backend == "triton":
        from zslfast.triton import memory_bank as triton_kernels

        monkeypatch.setattr(triton_kernels, "MAX_SINGLE_BLOCK", 16)
    for D in (12, 40):
        B, M, C = 3, 2, 2
        z, protos, labels, _ = kl_inputs(B, M, D, C, torch.float64, "cpu", generator, magnitude=3.0)
        z = z.round()
        top = torch.randint(0, D, (B, M, 1), generator=generator)
        gap = torch.randint(40, 61, (B, M, 1), generator=generator).double()
        z = z.scatter(-1, top, z.amax(-1, keepdim=True) + gap)
        protos = protos.float().double()  # float32 values: the kernels' inputs exactly
        active = torch.ones(B, M, dtype=torch.bool)
        q = protos[labels]
        exact = exact_kl_grad(z, q) / (B * M)
        p = z.softmax(-1)
        n = z.abs() + q.abs() + z.logsumexp(-1, keepdim=True).abs() + q.logsumexp(-1, keepdim=True).abs()
        scale = softmax_grad_error_scale(p, n, -1) / (B * M)
        _, got = run_kl(lambda *a: zslfast.memory_bank_kl(*a, backend=backend),
                        *(t.to(device) for t in (z.float(), protos.float(), labels, active)),
                        torch.tensor(1.0, device=device))
        ratio = (got.cpu().double() - exact).abs() / (torch.finfo(torch.float32).eps * scale)
        assert ratio.max() <= 4.0, f"D={D}: {ratio.max():.3g} x float32's rounding scale"


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_kl_none_active_is_zero_with_zero_grad(device, backend, generator):
    z, protos, labels, _ = kl_inputs(4, 3, 10, 5, torch.float32, device, generator)
    protos.fill_(float("nan"))  # never read for inactive rows
    active = torch.zeros(4, 3, dtype=torch.bool, device=device)
    loss, grad = run_kl(lambda *a: zslfast.memory_bank_kl(*a, backend=backend), z, protos, labels, active,
                        torch.tensor(1.0, device=device))
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_kl_inactive_nan_prototypes_do_not_leak(device, backend, generator):
    z, protos, labels, active = kl_inputs(6, 2, 12, 4, torch.float64, device, generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    active = torch.zeros(6, 2, dtype=torch.bool, device=device)
    active[labels != 3] = True
    protos[3] = float("nan")  # an empty class nobody is active for
    active[:, 1] = False
    protos[:, 1] = float("nan")  # a branch nobody is active for
    assert_kl_matches_reference(z, protos, labels, active, backend, generator)


def test_kl_direction_is_sage_eq9(generator):
    """KL(softmax(z) || softmax(proto)) = sum P (log P - log Q), P from z: F.kl_div(log Q, log P, log_target=True)."""
    z, protos, labels, active = kl_inputs(3, 2, 8, 2, torch.float64, "cpu", generator, p_active=1.0)
    want = torch.stack([
        F.kl_div(F.log_softmax(protos[labels[b], m], -1), F.log_softmax(z[b, m], -1), reduction="sum", log_target=True)
        for b in range(3) for m in range(2)
    ]).mean()
    reverse = torch.stack([
        F.kl_div(F.log_softmax(z[b, m], -1), F.softmax(protos[labels[b], m], -1), reduction="sum")
        for b in range(3) for m in range(2)
    ]).mean()
    got = zslfast.memory_bank_kl(z, protos, labels, active)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, reverse)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_kl_no_gradient_to_prototypes(device, backend, generator):
    z, protos, labels, active = kl_inputs(3, 2, 6, 2, torch.float64, device, generator, p_active=1.0)
    protos.requires_grad_()
    z.requires_grad_()
    loss = zslfast.memory_bank_kl(z, protos, labels, active, backend=backend)
    grad_z, grad_p = torch.autograd.grad(loss, (z, protos), allow_unused=True)
    assert grad_p is None and grad_z.abs().sum() > 0


@pytest.mark.parametrize("device,backend", UPDATE_BACKENDS)
def test_update_opcheck(device, backend, generator):
    bank = MemoryBank(4, 2, 3, 5, threshold=0.2, device=device)
    z, y, conf = offers(6, 2, 5, 4, generator, torch.float32, device)
    state = [bank.features, bank.confidences, bank.counts, bank.next_slot, bank.stale]
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.zslfast.memory_bank_update.default, (*state, z, y, conf, 0.2, "fifo", backend),
                          test_utils=checks)
    bank.update(z, y, conf)  # opcheck runs on copies: mutate the real bank for the refresh's input
    assert bank.stale.any()
    torch.library.opcheck(torch.ops.zslfast.memory_bank_refresh.default,
                          (bank.features, bank.counts, bank.stale, bank.means, backend), test_utils=checks)


# --- MemoryBankGuidedFusion -----------------------------------------------------------------------------------------


def eager_mbgf(z, a, y, bank_protos, bank_valid, alpha, scale):
    """SAGE Eqs. 6-9 written the eager way (F.normalize cosines, loops over branches)."""
    zn, an = F.normalize(z, dim=-1, eps=1e-8), F.normalize(a, dim=-1, eps=1e-8)
    cos = torch.einsum("bmd,cd->bmc", zn, an)
    s = cos[torch.arange(z.shape[0]), :, y]  # (B, M)
    w = torch.softmax(alpha * s, dim=1)
    fused = (w[..., None] * z).sum(1)
    logits = scale * F.normalize(fused, dim=-1, eps=1e-8) @ an.T
    wrong = logits.argmax(1) != y
    masked = cos.detach().clone()
    masked[torch.arange(z.shape[0]), :, y] = -float("inf")
    active = wrong[:, None] & (masked.amax(2) > s.detach()) & bank_valid[y]
    kl = reference.memory_bank_kl(z, bank_protos, y, active)
    conf = torch.softmax(scale * cos.detach(), dim=2)[torch.arange(z.shape[0]), :, y]
    return logits, fused, kl, active, conf


@pytest.mark.parametrize("backend", [None, "reference"])
def test_mbgf_matches_eager_sage(backend, generator):
    C, M, D, K, B = 9, 3, 12, 3, 16
    module = MemoryBankGuidedFusion(D, M, C, K, threshold=0.05, alpha=2.0, scale=5.0, backend=backend,
                                    dtype=torch.float64)
    want_bank = reference_bank(C, M, K, D, 0.05, "fifo", torch.float64, "cpu")
    a = torch.randn(C, D, generator=generator, dtype=torch.float64, requires_grad=True)
    saw_active = False
    for step in range(3):
        z = torch.randn(B, M, D, generator=generator, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, C, (B,), generator=generator)
        protos, valid = want_bank.prototypes()
        want = eager_mbgf(z, a, y, protos.clone(), valid.clone(), 2.0, 5.0)
        got = module(z, a, y)
        torch.testing.assert_close(got.logits, want[0])
        torch.testing.assert_close(got.fused, want[1])
        torch.testing.assert_close(got.kl_loss, want[2])
        assert torch.equal(got.active, want[3])
        saw_active |= bool(got.active.any())
        loss = got.logits.logsumexp(1).sum() + got.kl_loss
        want_loss = want[0].logsumexp(1).sum() + want[2]
        for g, w in zip(torch.autograd.grad(loss, (z, a)), torch.autograd.grad(want_loss, (z, a))):
            torch.testing.assert_close(g, w)
        want_bank.update(z.detach(), y, want[4])
        # the module's confidences come from the fused cosine kernel, the eager ones from F.normalize: ~1 ulp apart
        assert_same_bank(module.bank, want_bank, torch.float64, exact_confidences=False)
    assert saw_active, "the test never exercised the KL branch"


def test_mbgf_eval_and_inference(generator):
    C, M, D, B = 6, 3, 8, 10
    module = MemoryBankGuidedFusion(D, M, C, 2, threshold=0.0, alpha=1.5, scale=4.0)
    a = torch.randn(C, D, generator=generator)
    z = torch.randn(B, M, D, generator=generator)
    y = torch.randint(0, C, (B,), generator=generator)
    module(z, a, y)
    assert module.bank.counts.sum() > 0  # training mode updates
    module.eval()
    before = {k: getattr(module.bank, k).clone() for k in STATE}
    out = module(z, a, y)
    out_inf = module(z, a)
    for k in STATE:
        assert torch.equal(getattr(module.bank, k), before[k]), k  # eval never updates (prototypes() may refresh)
    assert out_inf.kl_loss.item() == 0 and not out_inf.active.any()
    # inference weights come from the class the branches vote for
    cos = reference.cosine_logits(z, a)
    y_hat = cos.sum(1).argmax(1)
    w = torch.softmax(1.5 * cos[torch.arange(B), :, y_hat], dim=1)
    torch.testing.assert_close(out_inf.fused, (w[..., None] * z).sum(1))
    torch.testing.assert_close(out_inf.logits, reference.cosine_logits(out_inf.fused, a, 4.0))
    assert out.kl_loss.dim() == 0


# --- bad input --------------------------------------------------------------------------------------------------------


def test_bank_update_bad_input():
    bank = MemoryBank(4, 2, 3, 5, threshold=0.5)
    z, y, conf = torch.randn(6, 2, 5), torch.randint(0, 4, (6,)), torch.rand(6, 2)
    cases = [
        ((z, torch.tensor([0, 1, 2, 4, 0, 1]), conf), ValueError, ["y", "label 4", "[0, 4)"]),
        ((z, torch.tensor([0, -1, 2, 3, 0, 1]), conf), ValueError, ["y", "label -1"]),
        ((torch.randn(6, 3, 5), y, conf), ValueError, ["z", "M=2", "(6, 3, 5)"]),
        ((torch.randn(6, 2, 4), y, conf), ValueError, ["z", "D=5", "(6, 2, 4)"]),
        ((z, y, torch.rand(5, 2)), ValueError, ["conf", "(6, 2)", "(5, 2)"]),
        ((z, y[:5], conf), ValueError, ["y", "B=6", "(5)"]),
        ((z, y, torch.tensor([[float("nan"), 0.1]] * 6)), ValueError, ["conf", "NaN"]),
        ((z.long(), y, conf), TypeError, ["z", "floating-point"]),
        ((z, y.float(), conf), TypeError, ["y", "integer"]),
        ((z, y, conf.bool()), TypeError, ["conf", "floating-point"]),
        ((z, y, "0.9"), TypeError, ["conf", "str"]),
        ((z.to("meta"), y, conf), ValueError, ["z", "meta", "bank is on cpu"]),
    ]
    for args, error, words in cases:
        with pytest.raises(error) as info:
            bank.update(*args)
        for word in words:
            assert word in str(info.value), (word, str(info.value))
    assert not bank.counts.any()  # nothing was stored by a rejected call


def test_bank_constructor_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(3, 2, 0, 4, threshold=0.5)
    with pytest.raises(ValueError, match="policy"):
        MemoryBank(3, 2, 1, 4, threshold=0.5, policy="lru")
    with pytest.raises(TypeError, match="dtype"):
        MemoryBank(3, 2, 1, 4, threshold=0.5, dtype=torch.int32)
    with pytest.raises(ValueError, match="MemoryBank: threshold must be a finite number, got nan"):
        MemoryBank(3, 2, 1, 4, threshold=float("nan"))


def test_kl_bad_input():
    z, protos = torch.randn(4, 2, 5), torch.randn(3, 2, 5)
    labels, active = torch.tensor([0, 1, 2, 0]), torch.ones(4, 2, dtype=torch.bool)
    cases = [
        ((z, protos, torch.tensor([0, 1, 3, 0]), active), ValueError, ["labels", "label 3", "[0, 3)"]),
        ((z, torch.randn(3, 2, 6), labels, active), ValueError, ["protos", "D=5", "(3, 2, 6)"]),
        ((z, torch.randn(3, 5), labels, active), ValueError, ["protos", "(C, M, D)", "2-D"]),
        ((z[0], protos, labels, active), ValueError, ["z", "(B, M, D)"]),
        ((z, protos, labels[:3], active), ValueError, ["labels", "B=4"]),
        ((z, protos, labels, active.float()), TypeError, ["active", "bool", "float32"]),
        ((z, protos, labels, active[:, :1]), ValueError, ["active", "(4, 2)", "(4, 1)"]),
        ((z, protos, labels.float(), active), TypeError, ["labels", "integer"]),
        ((z, protos.to("meta"), labels, active), ValueError, ["one device", "meta"]),
    ]
    for args, error, words in cases:
        with pytest.raises(error) as info:
            zslfast.memory_bank_kl(*args)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_mbgf_bad_input():
    module = MemoryBankGuidedFusion(5, 2, 3, 2, threshold=0.5, alpha=1.0, scale=1.0)
    with pytest.raises(ValueError, match=r"z must be \(B, M, D\) with M=2, D=5, got \(4, 3, 5\)"):
        module(torch.randn(4, 3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"class_emb must be \(C, D\) = \(3, 5\), got \(4, 5\)"):
        module(torch.randn(4, 2, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="labels"):
        module(torch.randn(4, 2, 5), torch.randn(3, 5), torch.tensor([0, 1, 2, 3]))


@requires_gpu
def test_gpu_bank_matches_cpu_bank(generator):
    for policy in ("fifo", "min_conf"):
        cpu_bank = MemoryBank(20, 3, 4, 16, threshold=0.2, policy=policy)
        gpu_bank = MemoryBank(20, 3, 4, 16, threshold=0.2, policy=policy, device="cuda")
        for _ in range(3):
            z, y, conf = offers(64, 3, 16, 20, generator, torch.float32, "cpu", classes=[0, 1, 2])
            cpu_bank.update(z, y, conf)
            gpu_bank.update(z.cuda(), y.cuda(), conf.cuda())
        assert_same_bank(gpu_bank, cpu_bank, torch.float32)
