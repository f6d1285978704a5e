"""attribute_attention against the float64 reference: outputs and the gradients of q, k, v and ref for every backend
available here; shared and per-sample q; ref None / (K, Dv) / (B, K, Dv); score cosine / dot / None; masks with fully
masked rows; logits up to +-1e3; K=1, R=1, odd D; the R-tiled (online softmax) Triton path;
return_attention with a loss on the attention; what autograd keeps (never a (B, K, R) tensor); bad-input errors;
AttributeCrossAttention against the same math by hand. gradcheck, opcheck, torch.compile, layouts, determinism and
backends: test_contract.py.

    E = softmax(q k^T * scale over kept r) v;  out = cos(E, ref) | <E, ref> | E
"""

import math

import pytest
import torch
import torch.nn.functional as F

import zslfast
from zslfast import reference
from zslfast.nn import AttributeCrossAttention

from helpers import (
    DEVICE_BACKENDS, TOLERANCES, attention_inputs as make_inputs, dtypes_for, exact_softmax_grad,
    low_precision_error_bound, require_backend, requires_gpu, softmax_grad_error_scale, tiled_r_cases,
)

EPS = 1e-8  # the cosine's norm clamp, F.cosine_similarity's

# (B, K, R, D, Dv, q kind, ref kind, score)
CASES = [
    # Dv = 1 scored with "dot": a 1-D cosine is +-1 with a zero gradient that fp32 forms by cancellation (~1e-7 /
    # |ref|: 1.6e-5 at |ref| = 0.007, seed 98, past the 1e-5 tolerance on about 1 draw in 100), not a kernel's error
    (1, 1, 1, 1, 1, "shared", "shared", "dot"),
    (3, 5, 7, 37, 6, "shared", "shared", "cosine"),
    (2, 9, 13, 37, 11, "per", "per", "dot"),
    (4, 3, 49, 20, 17, "shared", None, "cosine"),
    (2, 17, 5, 300, 300, "shared", "shared", "dot"),
    (2, 6, 1, 9, 4, "per", "shared", None),
    (3, 1, 33, 16, 24, "per", "per", "cosine"),
    (2, 70, 6, 5, 4, "shared", "shared", "cosine"),  # K over two query-row tiles
    (20, 3, 4, 5, 6, "shared", "shared", "dot"),  # Triton's shared-q dq: two samples per batch split
]


def run(fn, q, k, v, ref, grad_out, grad_attn=None):
    """Output and gradients of q, k, v, ref (None for an unused ref); a loss on the attention when grad_attn."""
    leaves = [t if t is None else t.detach().requires_grad_() for t in (q, k, v, ref)]
    result = fn(*leaves)
    out, attn = result if grad_attn is not None else (result, None)
    loss = (out * grad_out.to(out.dtype)).sum()
    if attn is not None:
        loss = loss + (attn * grad_attn.to(attn.dtype)).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    return out, attn, list(grads)


def assert_matches_reference(q, k, v, ref, backend, *, mask=None, score="cosine", scale=None, attention=False,
                             generator=None, rtol_scale=1.0):
    dtype = q.dtype
    B, K, Dv = k.shape[0], q.shape[-2], v.shape[-1]
    out_shape = (B, K) if ref is not None and score is not None else (B, K, Dv)
    grad_out = torch.randn(out_shape, generator=generator, dtype=torch.float64).to(q.device)
    grad_attn = (
        torch.randn(B, K, k.shape[1], generator=generator, dtype=torch.float64).to(q.device) if attention else None
    )
    kwargs = dict(mask=mask, score=score, scale=scale, return_attention=attention)
    exact = run(lambda *a: reference.attribute_attention(*a, **kwargs), *(t if t is None else t.double()
                                                                         for t in (q, k, v, ref)), grad_out, grad_attn)
    got = run(lambda *a: zslfast.attribute_attention(*a, backend=backend, **kwargs), q, k, v, ref, grad_out, grad_attn)
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape
    names = ["out", "attn", "grad_q", "grad_k", "grad_v", "grad_ref"]
    pairs = list(zip(names, [got[0], got[1], *got[2]], [exact[0], exact[1], *exact[2]]))
    if dtype in TOLERANCES:
        rtol, atol = TOLERANCES[dtype]
        for name, g, w in pairs:
            if w is None:
                assert g is None or not g.any(), f"{name}: expected no gradient"
                continue
            assert g is not None and g.shape == w.shape, f"{name}: shape {None if g is None else g.shape}"
            assert g.isfinite().all(), f"{name} has non-finite values"
            size = w.abs().max().item() + 1.0
            err = (g.double() - w).abs().max().item()
            assert err <= rtol_scale * atol * size, f"{name} off by {err:.3g} (tolerance {atol} x {size:.3g})"
        return
    low = run(lambda *a: reference.attribute_attention(*a, **kwargs), q, k, v, ref, grad_out, grad_attn)
    for (name, g, w), lw in zip(pairs, [low[0], low[1], *low[2]]):
        if w is None:
            continue
        err, bound = low_precision_error_bound(g, lw, w)
        assert err <= bound, f"{dtype} {name} error {err:.3g} > 2x eager's ({bound:.3g})"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_matches_reference(device, backend, case, generator):
    *sizes, q_kind, ref_kind, score = case
    for dtype in dtypes_for(device, backend):
        q, k, v, ref = make_inputs(*sizes, q_kind, ref_kind, dtype, device, generator)
        assert_matches_reference(q, k, v, ref, backend, score=score, generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("q_kind,ref_kind,score", [("shared", "shared", "cosine"), ("per", "per", "dot"),
                                                   ("shared", None, None)])
def test_masks_and_fully_masked_rows(device, backend, q_kind, ref_kind, score, generator):
    """Masked tokens get no weight; a sample with every token masked gives E = 0, score 0 and zero gradients."""
    B, K, R, D, Dv = 4, 6, 11, 13, 7
    for dtype in (torch.float64, torch.float32):
        q, k, v, ref = make_inputs(B, K, R, D, Dv, q_kind, ref_kind, dtype, device, generator)
        mask = torch.rand(B, R, generator=generator) > 0.5
        mask[:, 0] = True
        mask[2] = False  # sample 2: every token masked
        mask = mask.to(device)
        assert_matches_reference(q, k, v, ref, backend, mask=mask, score=score, generator=generator, attention=True)
        leaves = [t if t is None else t.detach().requires_grad_() for t in (q, k, v, ref)]
        out, attn = zslfast.attribute_attention(*leaves, mask=mask, score=score, return_attention=True,
                                                backend=backend)
        assert out.isfinite().all() and not out[2].any() and not attn[2].any()
        assert not attn.masked_select(~mask[:, None, :].expand_as(attn)).any()
        grads = torch.autograd.grad(out.sum(), [t for t in leaves if t is not None], allow_unused=True)
        assert all(g is None or g.isfinite().all() for g in grads)
        assert not grads[1][2].any() and not grads[2][2].any()  # grad_k, grad_v of the fully masked sample
        if q_kind == "per":
            assert not grads[0][2].any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_large_logits(device, backend, generator):
    """Logits up to +-1e3 (a near one-hot softmax) do not overflow."""
    for dtype in (torch.float64, torch.float32):
        q, k, v, ref = make_inputs(2, 5, 9, 8, 6, "shared", "shared", dtype, device, generator)
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True) * 1e3  # scale 1 below: |logit| <= 1e3
        out = zslfast.attribute_attention(q, k, v, ref, scale=1.0, backend=backend)
        assert out.isfinite().all()
        assert_matches_reference(q, k, v, ref, backend, scale=1.0, generator=generator, rtol_scale=1e3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_tiled_r_online_softmax(device, backend, generator, monkeypatch):
    """R larger than one tile: the Triton kernels take the online-softmax path (tile forced to 16 here)."""
    for q, k, v, ref, mask, score in tiled_r_cases(device, backend, generator, monkeypatch):
        assert_matches_reference(q, k, v, ref, backend, mask=mask, score=score, attention=True, generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_return_attention(device, backend, generator):
    q, k, v, ref = make_inputs(3, 4, 6, 5, 5, "shared", "shared", torch.float64, device, generator)
    out, attn = zslfast.attribute_attention(q, k, v, ref, return_attention=True, backend=backend)
    want = torch.softmax(q @ k.transpose(1, 2) * 5**-0.5, -1)
    torch.testing.assert_close(attn, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, dtype=torch.float64, device=device))
    torch.testing.assert_close(out, F.cosine_similarity(want @ v, ref.expand(3, 4, 5), dim=-1, eps=1e-8))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("score", ["cosine", None])
def test_saved_activations_exclude_attention(device, backend, score, generator):
    """Autograd keeps O(B·K·Dv + B·K) beyond the inputs: no (B, K, R)-sized tensor (R chosen larger than Dv)."""
    B, K, R, D, Dv = 2, 3, 64, 4, 5
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
    leaves = [t.requires_grad_() for t in (q, k, v, ref)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = zslfast.attribute_attention(*leaves, score=score, backend=backend)
    own = {t.data_ptr() for t in leaves}
    extra = [t for t in saved if t.data_ptr() not in own]
    assert extra, "expected E and lse to be saved"
    assert all(t.numel() <= B * K * Dv for t in extra), [tuple(t.shape) for t in extra]
    assert not any(R in t.shape for t in saved if t.dim() == 3 and t.shape[-1] == R and t.shape[1] == K)
    out.sum().backward()


@pytest.mark.parametrize("softmax_over", ["keys", "queries", None])
def test_cpu_backward_reads_the_kept_probabilities(softmax_over, generator):
    """CPU, R <= Dv: autograd keeps P (B, K, R) (the op's "Memory and the backward"), and the backward reads it:
    given P, the raw backward's gradients are the ones it gets by recomputing P, and a changed P changes them."""
    require_backend("cpu")
    from zslfast.ops import attribute_attention as op

    B, K, R, D, Dv = 2, 3, 4, 5, 6
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float64, "cpu", generator)
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    leaves = [t.requires_grad_() for t in (q, k, v, ref)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        zslfast.attribute_attention(*leaves, mask=mask, softmax_over=softmax_over, backend="cpu")
    assert (B, K, R) in saved, saved
    args = (q.detach(), k.detach(), v.detach(), ref.detach(), mask, None, D ** -0.5, "cosine", EPS)
    out, e, lse, attn, best, index = op.SPEC.op(*args, "attention", True, softmax_over, None, None, "cpu")
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)

    def backward(probs):
        return op.BACKWARD.op(grad, None, None, *args[:6], e, lse, best, index, probs, *args[6:], [True] * 5,
                              "attention", softmax_over, None, None, "cpu")[:4]

    recomputed, read, changed = backward(None), backward(attn), backward(attn * 0.5)
    for r, g, c in zip(recomputed, read, changed):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(c, r) for c, r in zip(changed, recomputed))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("wanted", ["k v", "v ref"])
def test_only_requested_gradients(device, backend, wanted, generator):
    """Only some inputs require grad, and their gradients are exact: frozen attribute vectors (q, ref: grad_k,
    grad_v), or frozen queries and keys (grad_v, grad_ref: no softmax gradient at all)."""
    inputs = dict(zip("q k v ref".split(), make_inputs(3, 4, 5, 6, 3, "shared", "shared", torch.float64, device,
                                                      generator)))
    wanted = [inputs[name].requires_grad_() for name in wanted.split()]
    got = torch.autograd.grad(zslfast.attribute_attention(**inputs, backend=backend).sum(), wanted)
    want = torch.autograd.grad(reference.attribute_attention(**inputs).sum(), wanted)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_bad_inputs():
    q, k, v, ref = torch.randn(4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 6), torch.randn(4, 6)
    cases = [
        ((q, k[..., :7], v, ref), {}, ValueError, r"share D"),
        ((q, k, v[:, :4], ref), {}, ValueError, r"v \(B, R, Dv\) must match k"),
        ((q, k, v[:1], ref), {}, ValueError, r"v \(B, R, Dv\) must match k"),
        ((torch.randn(3, 4, 8), k, v, ref), {}, ValueError, r"per-sample q"),
        ((q, k, v, ref[:, :5]), {}, ValueError, r"ref must be \(K, Dv\)"),
        ((q, k, v, torch.randn(3, 4, 6)), {}, ValueError, r"ref must be"),
        ((q, k[0], v, ref), {}, ValueError, r"k must be \(B, R, D\)"),
        ((q.long(), k, v, ref), {}, TypeError, r"q must be a floating-point"),
        ((q, k, v, ref), {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"mask must be \(B, R\)"),
        ((q, k, v, ref), {"mask": torch.ones(2, 5)}, TypeError, r"mask must be a bool tensor"),
        ((q, k, v, ref), {"score": "l2"}, ValueError, r"score must be"),
        ((q, k, v, ref), {"scale": torch.tensor(1.0)}, TypeError, r"scale must be"),
    ]
    for args, kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            zslfast.attribute_attention(*args, **kwargs)


@requires_gpu
def test_bf16_d300_on_gpu(generator):
    """D = 300 (GloVe) in bf16, where SDPA's fused backends do not apply: Triton within 2x eager's error."""
    q, k, v, ref = make_inputs(8, 312, 49, 300, 300, "shared", "shared", torch.bfloat16, "cuda", generator)
    assert_matches_reference(q, k, v, ref, "triton", generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("score", ["cosine", "dot", None])
def test_module_matches_hand_written(device, backend, score, generator):
    """AttributeCrossAttention == ILPG's AVL written out: q = A W_q, k = X W_k, v = X W_v, cos(softmax(qk^T/sqrt d) v, A)."""
    torch.manual_seed(generator.initial_seed())
    B, R, dim_visual, K, dim_attr, dim = 3, 7, 20, 6, 9, 12
    module = AttributeCrossAttention(dim_visual, dim_attr, dim, score=score, backend=backend).to(device).double()
    regions = torch.randn(B, R, dim_visual, generator=generator, dtype=torch.float64).to(device)
    attributes = torch.randn(K, dim_attr, generator=generator, dtype=torch.float64).to(device)
    out = module(regions, attributes)
    q = attributes @ module.W_q.weight.T
    k = regions @ module.W_k.weight.T
    v = regions @ module.W_v.weight.T
    e = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1) @ v
    if score == "cosine":
        want = F.cosine_similarity(e, attributes.expand_as(e), dim=-1, eps=1e-8)
    elif score == "dot":
        want = (e * attributes).sum(-1)
    else:
        want = e
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(module.parameters()))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    out, attn = module(regions, attributes[None].expand(B, K, dim_attr), return_attention=True)
    assert attn.shape == (B, K, R)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_scores_without_grad_do_not_write_e(device, backend, generator):
    """Inference (no input requires grad): the scores come without any (B, K, Dv) tensor allocated."""
    from zslfast.tools._memory import peak_bytes

    B, K, R, D, Dv = 4, 16, 9, 8, 256
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
    _, e, _, _, _, _ = torch.ops.zslfast.attribute_attention(q, k, v, ref, None, None, 0.3, "cosine", 1e-8, None,
                                                             False, "keys", None, None, backend)
    assert e.numel() == 0
    zslfast.attribute_attention(q, k, v, ref, backend=backend)  # warm-up (Triton compiles, CPU pool starts)
    peak = peak_bytes(lambda: zslfast.attribute_attention(q, k, v, ref, backend=backend), torch.device(device))
    assert peak < B * K * Dv * 4 // 2, f"peak {peak} bytes, E alone would be {B * K * Dv * 4}"
    torch.testing.assert_close(
        zslfast.attribute_attention(q, k, v, ref, backend=backend).double(),
        reference.attribute_attention(q.double(), k.double(), v.double(), ref.double()),
        rtol=1e-5, atol=1e-5,
    )


# ----------------------------------------------------------------------------------- masks, NaN, inf, overflow
# Every backend that runs on CPU: the reference itself (its masking and norms are part of the contract) and the
# kernels (the Triton ones through the interpreter where there is no GPU).
ALL_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference"), *DEVICE_BACKENDS]


def outputs_and_grads(backend, q, k, v, ref, grad_out, *, mask=None, score="cosine", scale=None, grad_attn=None,
                      **options):
    """[out, (attn,) grad_q, grad_k, grad_v(, grad_ref)] of ``backend`` ("eager" = reference.attribute_attention
    called directly, in the inputs' dtype); options: the op's (softmax_over=...)."""
    kwargs = dict(mask=mask, score=score, scale=scale, return_attention=grad_attn is not None, **options)
    if backend == "eager":
        fn = lambda *a: reference.attribute_attention(*a, **kwargs)  # noqa: E731
    else:
        fn = lambda *a: zslfast.attribute_attention(*a, backend=backend, **kwargs)  # noqa: E731
    out, attn, grads = run(fn, q, k, v, ref, grad_out, grad_attn)
    return [out] + ([attn] if attn is not None else []) + grads


def assert_same_nan_and_close(got, want, names, dtype):
    """Same NaN positions as the float64 reference (NaN goes exactly where it depends, nowhere else), and the
    other values within the dtype's tolerance."""
    rtol, atol = TOLERANCES[dtype]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        assert torch.equal(g.isnan(), w.isnan()), (
            f"{name}: NaN at {g.isnan().nonzero().tolist()}, the reference at {w.isnan().nonzero().tolist()}")
        assert g.isfinite().eq(w.isfinite()).all(), f"{name}: inf where the reference has none (or the reverse)"
        fin = w.isfinite()
        if fin.any():
            err = (g.double()[fin] - w[fin]).abs().max().item()
            assert err <= atol * (w[fin].abs().max().item() + 1.0), f"{name} off by {err:.3g}"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["q_row", "q_row_masked", "per_q_row", "k_token", "v_token"])
def test_nan_propagates_to_exactly_its_rows(device, backend, where, generator):
    """A NaN input makes exactly the outputs and gradients that depend on it NaN, as the float64 reference does:
    q[i] -> row i of every sample (not a fully masked sample's), k[b, r] or v[b, r] kept -> sample b; everything
    else stays finite and exact (a row of NaN logits must not pass for a fully masked row, whose output is 0)."""
    B, K, R, D, Dv = 3, 4, 6, 5, 7
    i, b, r = 2, 1, 3
    for dtype in (torch.float64, torch.float32):
        q_kind = "per" if where == "per_q_row" else "shared"
        q, k, v, ref = make_inputs(B, K, R, D, Dv, q_kind, "shared", dtype, device, generator)
        mask = None
        if where in ("q_row", "q_row_masked"):
            q[i, 1] = float("nan")
        elif where == "per_q_row":
            q[b, i, 0] = float("nan")
        elif where == "k_token":
            k[b, r, 2] = float("nan")
        else:
            v[b, r, 4] = float("nan")
        if where == "q_row_masked":
            mask = torch.ones(B, R, dtype=torch.bool, device=device)
            mask[0, 1] = False
            mask[2] = False  # sample 2 fully masked: its E = 0 and score 0 do not depend on q
        grad_out = torch.randn(B, K, generator=generator, dtype=torch.float64).to(device)
        names = ["out", "grad_q", "grad_k", "grad_v", "grad_ref"]
        got = outputs_and_grads(backend, q, k, v, ref, grad_out, mask=mask)
        want = outputs_and_grads("eager", *(t.double() for t in (q, k, v, ref)), grad_out, mask=mask)
        out_nan = torch.zeros(B, K, dtype=torch.bool)
        if where.startswith("q_row"):
            out_nan[:, i] = True
            if mask is not None:
                out_nan[2] = False
        elif where == "per_q_row":
            out_nan[b, i] = True
        else:
            out_nan[b] = True
        assert torch.equal(want[0].isnan().cpu(), out_nan)  # the rule itself, on the reference
        assert_same_nan_and_close(got, want, names, dtype)
        if mask is not None:  # masked tokens: exactly zero gradients, NaN query row or not
            assert not got[2][~mask].any() and not got[3][~mask].any()


def dirty_masked(t, mask, values):
    """t with its masked tokens' rows (mask False) filled with NaN / inf / -inf in turn."""
    t = t.clone()
    idx = (~mask).nonzero().tolist()
    for n, (b, r) in enumerate(idx):
        t[b, r] = values[n % len(values)]
    return t


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("q_kind,ref_kind,score,attention", [("shared", "shared", "cosine", False),
                                                             ("per", "per", "dot", True),
                                                             ("shared", None, None, False)])
def test_nonfinite_in_masked_tokens_never_leaks(device, backend, q_kind, ref_kind, score, attention, generator,
                                                monkeypatch):
    """NaN or inf in masked-out k and v (padding) changes nothing: outputs and gradients equal those of the same
    inputs with ordinary values there (the float64 reference on clean inputs), the gradients of masked k and v
    are exactly 0, and a fully masked sample keeps E = 0 / score 0 with no NaN anywhere. Also over R tiles."""
    B, K, R, D, Dv = 3, 5, 40, 6, 7
    for tiled in (False, True):
        if tiled and backend != "triton":
            continue
        if backend == "triton":
            from zslfast.triton.attribute_attention import config as triton_config

            monkeypatch.setattr(triton_config, "MAX_BLOCK_R", 16 if tiled else 256)
        for dtype in (torch.float64, torch.float32):
            q, k, v, ref = make_inputs(B, K, R, D, Dv, q_kind, ref_kind, dtype, device, generator)
            mask = (torch.rand(B, R, generator=generator) > 0.4).to(device)
            mask[:, 0] = True
            mask[1, 16:32] = False  # a whole R tile masked
            mask[2] = False  # sample 2 fully masked
            nonfinite = [float("nan"), float("inf"), float("-inf")]
            k_dirty = dirty_masked(k, mask, nonfinite)
            v_dirty = dirty_masked(v, mask, nonfinite[::-1])
            shape = (B, K) if score is not None else (B, K, Dv)
            grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
            grad_attn = torch.randn(B, K, R, generator=generator, dtype=torch.float64).to(device) if attention else None
            got = outputs_and_grads(backend, q, k_dirty, v_dirty, ref, grad_out, mask=mask, score=score,
                                    grad_attn=grad_attn)
            want = outputs_and_grads("eager", *(t if t is None else t.double() for t in (q, k, v, ref)), grad_out,
                                     mask=mask, score=score, grad_attn=grad_attn)
            names = ["out"] + (["attn"] if attention else []) + ["grad_q", "grad_k", "grad_v", "grad_ref"]
            for name, g in zip(names, got):
                assert g.isfinite().all(), f"{name} has non-finite values (tiled={tiled}, {dtype})"
            assert_same_nan_and_close(got, want, names, dtype)
            grad_k, grad_v = got[-3:-1] if ref is not None and score is not None else got[-2:]
            assert not grad_k[~mask].any() and not grad_v[~mask].any()
            assert not got[0][2].any()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("score", ["cosine", None])
def test_nonfinite_gradient_of_a_fully_masked_sample(device, backend, score, generator, monkeypatch):
    """A fully masked sample's outputs are constants (E = 0, score 0); NaN and inf in their incoming gradient reach
    none of q, k, v's gradients (its dS is 0 by a select, not 0 * NaN), as in the reference: the shared q's, summed
    over the batch, stays finite. (A shared ref's gradient is NaN where the reference's is: g * 0.) One R tile and
    R tiles (Triton's tile forced to 16)."""
    B, K, R, D, Dv = 3, 4, 40, 6, 5
    for tiled in (False, True):
        if tiled and backend != "triton":
            continue
        if backend == "triton":
            from zslfast.triton.attribute_attention import config as triton_config

            monkeypatch.setattr(triton_config, "MAX_BLOCK_R", 16 if tiled else 256)
        q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
        ref = ref if score is not None else None
        mask = (torch.rand(B, R, generator=generator) > 0.4).to(device)
        mask[:, 0] = True
        mask[2] = False
        grad_out = torch.randn((B, K) if score is not None else (B, K, Dv), generator=generator, dtype=torch.float64)
        grad_out[2] = float("nan")
        grad_out[2, 1] = float("inf")
        grad_out = grad_out.to(device)
        got = outputs_and_grads(backend, q, k, v, ref, grad_out, mask=mask, score=score)
        want = outputs_and_grads("eager", *(t if t is None else t.double() for t in (q, k, v, ref)), grad_out,
                                 mask=mask, score=score)
        names = ["out", "grad_q", "grad_k", "grad_v", "grad_ref"]
        assert all(w.isfinite().all() for w in want[1:4])  # the rule itself, on the reference
        assert_same_nan_and_close(got, want, names, torch.float32)


def assert_relative(got, want, names, rtol):
    for name, g, w in zip(names, got, want):
        size = w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        assert g.isfinite().all() and err <= rtol * size, f"{name} off by {err:.3g} (|{name}| up to {size:.3g})"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("huge", ["v_and_ref", "v_only"])
def test_cosine_at_1e30_float32(device, backend, huge, generator, monkeypatch):
    """|E| ~ 1e30 (and |ref| ~ 1e30) in float32: |E|^2 overflows, but the cosines (O(0.3)) and every gradient
    (down to ~1e-30) match the float64 reference to float32 accuracy, on the one-tile and the R-tiled paths.
    Shared and per-sample ref: the shared one's gradient sums over b."""
    B, K, R, D, Dv = 3, 4, 40, 6, 24
    for tiled in (False, True):
        if tiled and backend != "triton":
            continue
        if backend == "triton":
            from zslfast.triton.attribute_attention import config as triton_config

            monkeypatch.setattr(triton_config, "MAX_BLOCK_R", 16 if tiled else 256)
        for ref_kind in ("shared", "per"):
            q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", ref_kind, torch.float32, device, generator)
            v = v * 1e30
            if huge == "v_and_ref":
                ref = ref * 1e30
            grad_out = torch.randn(B, K, generator=generator, dtype=torch.float64).to(device)
            got = outputs_and_grads(backend, q, k, v, ref, grad_out)
            want = outputs_and_grads("eager", q.double(), k.double(), v.double(), ref.double(), grad_out)
            assert want[0].abs().max() > 0.05  # true cosines are O(0.3), not 0
            assert_relative(got, want, ["out", "grad_q", "grad_k", "grad_v", "grad_ref"], 1e-4)


def saturated_inputs(generator, device, B=2, K=4, R=9, D=8, Dv=40, dim=-1, gaps=(40.0, 60.0)):
    """q, k with whole-number entries ~ 20 (unscaled attention over unnormalised features): logits in the
    hundreds to thousands, the top two of every softmax (the rows over the keys, dim -1; the columns over the
    queries, dim -2) at least gaps[0] apart, so that P is one-hot to float64's eye, and the closest at most gaps[1]
    apart, so that the true q/k gradients (~e^-gap) lie inside float32's range (e^-60 ~ 1e-26), not below it where
    every backend rounds them to 0 alike. Drawn again until that holds (about one draw in six)."""
    for _ in range(400):
        q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float64, device, generator)
        # whole numbers: every backend's logits are then exact (any summation order), so that the comparison is
        # about the softmax backward, not about which GEMM rounded a logit ~1e3 by its ulp (~6e-5)
        q, k = (q * 20).round(), (k * 20).round()
        top2 = torch.topk(q @ k.transpose(1, 2), 2, dim=dim).values
        gap = (top2.select(dim, 0) - top2.select(dim, 1)).min()
        if gaps[0] <= gap <= gaps[1]:
            return q.float(), k.float(), v.float(), ref.float()
    raise AssertionError("no saturated draw")


class _ExactSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, dim):
        ctx.save_for_backward(logits)
        ctx.dim = dim
        return _TORCH_SOFTMAX(logits, dim)

    @staticmethod
    def backward(ctx, grad):
        return exact_softmax_grad(ctx.saved_tensors[0], grad, ctx.dim), None


_TORCH_SOFTMAX = torch.softmax


def exact_outputs_and_grads(q, k, v, ref, grad_out, **kwargs):
    """outputs_and_grads of the reference with torch.softmax's backward exact (exact_softmax_grad), in the inputs'
    dtype."""
    torch.softmax = lambda input, dim, dtype=None: _ExactSoftmax.apply(input, dim)
    try:
        return outputs_and_grads("eager", q, k, v, ref, grad_out, **kwargs)
    finally:
        torch.softmax = _TORCH_SOFTMAX


def float32_error_scale(q, k, v, ref, grad_out, grad_attn, score, dim):
    """softmax_grad_error_scale carried to the shared q's gradient (K, D) and k's (B, R, D), for scale 1 and no
    mask: dP = dE v^T (+ dL/dattn) is a float32 sum, off by up to ~Dv eps sum_j |dE_j| |v_rj| (N) however it is
    summed, and dS reaches dq = dS k and dk = dS^T q through |k| and |q|. (The cosine's dE is orthogonal to
    E ~ v_top, so dP_r - dP_top can be tiny by chance: this scale, not |exact|, is what float32 can promise.)"""
    q, k, v = q.double(), k.double(), v.double()
    p = _TORCH_SOFTMAX(q @ k.transpose(1, 2), dim)
    e = (p @ v).requires_grad_()
    if score is None:
        out = e
    else:
        out = (reference.normalize(e, -1, EPS) * reference.normalize(ref.double().expand_as(e), -1, EPS)).sum(-1)
    (de,) = torch.autograd.grad(out, e, grad_out)
    n = de.abs() @ v.abs().transpose(1, 2) + (0 if grad_attn is None else grad_attn.abs())
    ds = softmax_grad_error_scale(p, n, dim)
    return (ds @ k.abs()).sum(0), ds.transpose(1, 2) @ q.abs()


# variant: (saturated_inputs' shapes and softmax dim, the op's options, a loss on the returned attention)
SATURATED = {
    "keys": (dict(), dict(), False),
    "attention": (dict(), dict(), True),
    # over the queries: K over two of the Triton columns kernel's 16-row tiles
    "queries": (dict(K=20, R=5, dim=-2), dict(softmax_over="queries"), False),
    # R over three R tiles: the Triton kernels' R-tiled path, with the tile forced to 16 below
    "tiled_r": (dict(R=40), dict(), False),
}
# The saturated battery's bound, in units of float32_error_scale: the CPU kernel's largest ratio over 1,000 seeds of
# every variant was 1.35 (median 0.1-0.3); the textbook dS = P (dP - sum P dP) in float32 (eager's) is at 1e5-1e6.
SATURATED_BOUND = 4.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("variant", list(SATURATED))
@pytest.mark.parametrize("score", ["cosine", None])
def test_saturated_softmax_gradients(device, backend, variant, score, generator, monkeypatch):
    """Near one-hot softmaxes (scale 1, logits ~ 1e2-1e3, saturated_inputs): the float32 q and k gradients, ~e^-gap
    of everything around them, are exact to float32's own rounding of dP (float32_error_scale), entry by entry,
    against the softmax backward in 60-digit arithmetic (exact_softmax_grad). dS = P (dP - sum P dP) loses them
    entirely (its top entry rounds to 0, or to noise with the cosine's dP_top ~ 1e-9 +- 1e-18), in float32 and in
    float64 alike: the eager code is off by up to 100% on such draws. The kernels shift dP by its value at the
    arg-max first. Over the keys with and without a loss on the returned attention, over the queries, R-tiled."""
    shapes, options, attention = SATURATED[variant]
    if backend == "triton" and variant == "tiled_r":
        from zslfast.triton.attribute_attention import config as triton_config

        monkeypatch.setattr(triton_config, "MAX_BLOCK_R", 16)
    q, k, v, ref = saturated_inputs(generator, "cpu", **shapes)
    B, R, K, Dv = k.shape[0], k.shape[1], q.shape[0], v.shape[-1]
    ref = ref if score is not None else None
    grad_out = torch.randn((B, K) if score is not None else (B, K, Dv), generator=generator, dtype=torch.float64)
    grad_attn = torch.randn(B, K, R, generator=generator, dtype=torch.float64) if attention else None
    kwargs = dict(score=score, scale=1.0, **options)
    exact = exact_outputs_and_grads(*(t if t is None else t.double() for t in (q, k, v, ref)), grad_out,
                                    grad_attn=grad_attn, **kwargs)
    got = outputs_and_grads(backend, *(t if t is None else t.to(device) for t in (q, k, v, ref, grad_out)),
                            grad_attn=None if grad_attn is None else grad_attn.to(device), **kwargs)
    scales = dict(zip(("grad_q", "grad_k"),
                      float32_error_scale(q, k, v, ref, grad_out, grad_attn, score, shapes.get("dim", -1))))
    names = ["out"] + (["attn"] if attention else []) + ["grad_q", "grad_k", "grad_v", "grad_ref"]
    _, atol = TOLERANCES[torch.float32]
    for name, g, w in zip(names, got, exact):
        err = (g.cpu().double() - w).abs()
        if name not in scales:  # no softmax backward in these: the usual float32 tolerance
            assert err.max() <= atol * (w.abs().max() + 1.0), f"{name} off by {err.max():.3g}"
            continue
        ratio = err / (torch.finfo(torch.float32).eps * scales[name])
        worst = tuple(i.item() for i in torch.unravel_index(ratio.argmax(), ratio.shape))
        assert ratio.max() <= SATURATED_BOUND, (
            f"{name}{list(worst)}: error {err[worst]:.3g} (exact {w[worst]:.3g}) is {ratio.max():.3g} x float32's "
            f"rounding scale, over {SATURATED_BOUND}")


def test_triton_refuses_maps_past_int32_offsets():
    """The Triton kernels address one sample's (K, R) maps with int32 offsets: a returned map of 2^31 elements or a
    bias whose strides span that many is a ValueError from the planner, before anything is allocated or launched;
    one element less, or no map at all, plans (meta tensors: nothing is allocated)."""
    pytest.importorskip("triton")
    from zslfast._enums import LogitActivation, ReturnAttention, ReturnMax, Score, SoftmaxOver
    from zslfast.triton.attribute_attention import fwd

    def plan(K, R, return_attention, bias=None):
        q, k, v = (torch.empty(*shape, device="meta") for shape in ((K, 4), (1, R, 4), (1, R, 4)))
        return fwd.plan_forward(q, k, v, None, None, bias, 0.5, Score.NONE, 0.0, return_attention, False,
                                SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.NONE)

    with pytest.raises(ValueError, match=r"\(65536, 32768\) map spans 2147483648 elements"):
        plan(2 ** 16, 2 ** 15, ReturnAttention.ATTENTION)
    plan(2 ** 16, 2 ** 15 - 1, ReturnAttention.ATTENTION)
    plan(2 ** 16, 2 ** 15, ReturnAttention.NONE)
    strided = torch.empty_strided((1, 1, 2, 2), (0, 0, 2 ** 31, 1), device="meta")  # K = R = 2, rows 2^31 apart
    with pytest.raises(ValueError, match="bias strides"):
        plan(2, 2, ReturnAttention.NONE, strided)
