"""attribute_attention's drop-in options (the papers' variants, one call each) against the float64 reference, on every
backend available here: softmax_over "queries" (MSDN V2A) and None (TransZero++'s E_v2s), logit_activation "relu"
(PSVMA AnyAttention), return_max "attention" (GEM-ZSL, SAGE Eq. 3) and "logits" (PSVMA, APN), return_attention
"attention" and "logits" (APN's maps), an additive bias broadcast from every shape (TransZero++'s geometry bias) and
num_heads (DPPN, TransZero++), alone and together; outputs and the gradients of q, k, v, ref, bias and of a loss on
the max and on the map. Masks with fully masked samples, NaN confined, K=1, R=1, the R-tiled Triton path, what
autograd keeps, bad options; and the papers' own eager formulas (docs/ops.md's before/after examples). gradcheck,
opcheck, torch.compile and layouts with the options: test_contract.py (the record's variants), and here for the
bias (not one of the record's inputs).

    S = act(q k^T) * scale + bias;  P = softmax(S) over the keys (r), over the queries (i), or S;  E = P v
    max[b, i] = max over kept r of P[b, i, r] or S[b, i, r] (0 for a row with no kept r)
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zslfast
from zslfast import reference

from helpers import (
    ALL_BACKENDS, DEVICE_BACKENDS, TOLERANCES, assert_compiles_like_eager, attention_inputs as make_inputs,
    device_backend_pairs, dtypes_for, low_precision_error_bound, tiled_r_cases,
)

# (softmax_over, logit_activation, return_max, return_attention)
OPTIONS = [
    ("queries", None, None, False),          # MSDN V2A
    ("queries", None, None, True),
    ("keys", "relu", None, False),
    ("keys", None, "attention", False),      # GEM-ZSL
    ("keys", None, "logits", True),
    ("keys", "relu", "logits", False),       # PSVMA
    ("queries", None, "attention", False),   # over the queries with the attention's max
    ("queries", "relu", "logits", True),
    ("keys", "relu", "attention", True),
    (None, None, None, False),               # TransZero++ E_v2s: no softmax
    ("keys", None, "logits", "logits"),      # APN: the logits map and its max
    (None, "relu", "attention", "logits"),
    ("queries", None, None, "logits"),
]
OPTION_IDS = ["-".join(str(x) for x in o) for o in OPTIONS]

# (B, K, R, D, Dv, q kind, ref kind, score)
CASES = [
    # Dv = 1 scored with "dot": a 1-D cosine is +-1 with a zero gradient that fp32 forms by cancellation (~1e-7 / |E|,
    # 3.6e-5 at |E| = 1e-3 on every backend alike), not a kernel's error
    (1, 1, 1, 1, 1, "shared", "shared", "dot"),
    (3, 5, 7, 37, 6, "shared", "shared", "cosine"),
    (2, 9, 13, 37, 11, "per", "per", "dot"),
    (2, 6, 1, 9, 4, "per", "shared", None),  # R = 1
    (3, 1, 33, 16, 24, "per", "per", "cosine"),  # K = 1
    (2, 70, 6, 5, 4, "shared", "shared", "dot"),  # K over two query-row tiles
    (20, 3, 4, 5, 6, "shared", None, None),  # Triton's shared-q dq: two samples per batch split
]


def call(fn, q, k, v, ref, options, **kwargs):
    """[out, (attn), (max)] of fn with the options."""
    softmax_over, activation, return_max, attention = options
    result = fn(q, k, v, ref, softmax_over=softmax_over, logit_activation=activation, return_max=return_max,
                return_attention=attention, **kwargs)
    return list(result) if isinstance(result, tuple) else [result]


def outputs_and_grads(fn, q, k, v, ref, options, cotangents, bias=None, **kwargs):
    """[out, (map), (max), dq, dk, dv, (dref), (dbias)] of fn for a loss sum(output * cotangent)."""
    leaves = [t if t is None else t.detach().requires_grad_() for t in (q, k, v, ref, bias)]
    outs = call(fn, *leaves[:4], options, bias=leaves[4], **kwargs)
    # The logits map is -inf at masked tokens: the loss is then -inf or NaN, but its gradient is the cotangent.
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
    return outs + [g for g in grads]


def cotangents_for(q, k, v, ref, options, score, generator, num_heads=1):
    B, R, K, Dv = k.shape[0], k.shape[1], q.shape[-2], v.shape[-1]
    heads = (num_heads,) if num_heads > 1 else ()
    out_shape = (B, K) if ref is not None and score is not None else (B, K, Dv)
    shapes = [out_shape] + ([(B, *heads, K, R)] if options[3] else []) + ([(B, *heads, K)] if options[2] else [])
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(q.device) for s in shapes]


def assert_options_match(q, k, v, ref, backend, options, *, generator, mask=None, score="cosine", scale=None,
                         bias=None, num_heads=1):
    kwargs = dict(mask=mask, score=score, scale=scale, num_heads=num_heads)
    cot = cotangents_for(q, k, v, ref, options, score, generator, num_heads)
    exact = outputs_and_grads(reference.attribute_attention, *(t if t is None else t.double() for t in (q, k, v, ref)),
                              options, cot, bias=None if bias is None else bias.double(), **kwargs)
    got = outputs_and_grads(lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw), q, k, v, ref,
                            options, cot, bias=bias, **kwargs)
    assert len(got) == len(exact)
    names = ["out"] + (["map"] if options[3] else []) + (["max"] if options[2] else []) + ["dq", "dk", "dv"]
    names += (["dref"] if ref is not None else []) + (["dbias"] if bias is not None else [])
    dtype = q.dtype
    for name, g, w in zip(names, got, exact):
        if w is not None and g is not None:  # the logits map: -inf exactly where the reference's is (masked tokens)
            assert g.shape == w.shape and torch.equal(g.isinf(), w.isinf()) and (g[g.isinf()] < 0).all(), name
    if dtype in TOLERANCES:
        _, atol = TOLERANCES[dtype]
        for name, g, w in zip(names, got, exact):
            if w is None:
                assert g is None or not g.any(), f"{name}: expected no gradient"
                continue
            assert g is not None and g.shape == w.shape and g.dtype == dtype, f"{name}: {None if g is None else g.shape}"
            g, w = g[~w.isinf()], w[~w.isinf()]
            assert g.isfinite().all(), f"{name} has non-finite values"
            size = (w.abs().max().item() if w.numel() else 0.0) + 1.0
            err = (g.double() - w).abs().max().item() if w.numel() else 0.0
            assert err <= atol * size, f"{name} off by {err:.3g} (tolerance {atol} x {size:.3g})"
        return
    low = outputs_and_grads(reference.attribute_attention, q, k, v, ref, options, cot, bias=bias, **kwargs)
    for name, g, w, lw in zip(names, got, exact, low):
        if w is not None:
            finite = w.isfinite()
            err, bound = low_precision_error_bound(g[finite], lw[finite], w[finite])
            assert err <= bound, f"{dtype} {name} error {err:.3g} > 2x eager's ({bound:.3g})"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_options_match_reference(device, backend, options, case, generator):
    *sizes, q_kind, ref_kind, score = case
    for dtype in dtypes_for(device, backend):
        q, k, v, ref = make_inputs(*sizes, q_kind, ref_kind, dtype, device, generator)
        assert_options_match(q, k, v, ref, backend, options, score=score, generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_options_with_masks(device, backend, options, generator):
    """Masked tokens get no weight from any query and never win the max; a fully masked sample gives E = 0,
    max 0 and zero gradients, even from a NaN gradient of its logits map (-inf at every masked token)."""
    B, K, R, D, Dv = 4, 6, 11, 13, 7
    for dtype in (torch.float64, torch.float32):
        q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", dtype, device, generator)
        mask = torch.rand(B, R, generator=generator) > 0.5
        mask[:, 0] = True
        mask[2] = False
        mask = mask.to(device)
        assert_options_match(q, k, v, ref, backend, options, mask=mask, generator=generator)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, ref)]
        outs = call(lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw), *leaves, options,
                    mask=mask)
        masked = ~mask[:, None, :].expand(B, K, R)
        for n, o in enumerate(outs):
            if n == 1 and options[3] == "logits":
                assert torch.equal(o.isinf(), masked) and (o[masked] < 0).all() and o[~masked].isfinite().all()
            else:
                assert o.isfinite().all() and not o[2].any()
        if options[3] is True:
            assert not outs[1][masked].any()
        # a NaN gradient at the map's -inf entries (as sum(sigmoid(S) * w) with an inf w would give) reaches nothing
        loss = sum((o * torch.where(o.isinf(), float("nan"), 1.0)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
        assert all(g.isfinite().all() for g in grads)
        assert not grads[1][2].any() and not grads[2][2].any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", [o for o in OPTIONS if o[0] == "queries" or o[2]], ids=lambda o: "-".join(map(str, o)))
def test_tiled_r(device, backend, options, generator, monkeypatch):
    """R over several tiles: the Triton kernels' R-tiled path (tile forced to 16 here), a whole tile masked."""
    for q, k, v, ref, mask, score in tiled_r_cases(device, backend, generator, monkeypatch):
        assert_options_match(q, k, v, ref, backend, options, mask=mask, score=score, generator=generator)


@pytest.mark.parametrize("device,backend", device_backend_pairs(("triton",)))
def test_a_launch_row_caps_the_r_tile(device, backend, generator):
    """A launch-table row that caps the R tile (a returned map in fp32 at ViT's row lengths: 128 tokens of the
    rule's 256) runs forward and backward over R tiles of that width, and matches the reference."""
    from zslfast.triton.attribute_attention import config

    B, K, R, D, Dv = 1, 3, 130, 4, 5
    for kernel, flags in (("forward", dict(attention=True)), ("rows_backward", dict(grad_attn=True))):
        tiles, _ = config.launch_config(kernel, B, K, R, D, Dv, torch.float32, 0, 0, **flags)
        assert tiles["BLOCK_R"] == 128 < R, (kernel, tiles)  # two R tiles, not the rule's one of 256
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
    assert_options_match(q, k, v, ref, backend, ("keys", None, None, True), generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_options_large_logits(device, backend, generator):
    """Logits up to +-1e3: near one-hot softmaxes over either axis do not overflow."""
    for options in (OPTIONS[0], OPTIONS[3], OPTIONS[6]):
        q, k, v, ref = make_inputs(2, 5, 9, 8, 6, "shared", "shared", torch.float64, device, generator)
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True) * 1e3
        assert_options_match(q, k, v, ref, backend, options, scale=1.0, generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", [("queries", None, None, False), ("keys", None, "attention", False),
                                     ("queries", "relu", "logits", False)], ids=lambda o: "-".join(map(str, o)))
def test_saved_memory_stays_linear(device, backend, options, generator):
    """Autograd keeps O(B·K·Dv) + O(B·K) (+ O(B·R): the lse over the queries), never (B, K, R)."""
    B, K, R, D, Dv = 2, 3, 64, 4, 5
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
    leaves = [t.requires_grad_() for t in (q, k, v, ref)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = call(lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw), *leaves, options)
    own = {t.data_ptr() for t in leaves}
    extra = [t for t in saved if t.data_ptr() not in own]
    assert all(t.numel() <= max(B * K * Dv, B * R) for t in extra), [tuple(t.shape) for t in extra]
    sum(o.sum() for o in outs).backward()


# ------------------------------------------------------------------------------------------- bias and heads
# The bias's shapes: broadcast over the batch, over the queries, over the tokens, none.
BIAS_DIMS = ["K R", "B 1 R", "1 K 1", "B K R"]
BIAS_OPTIONS = [("queries", None, "attention", True), (None, None, None, False), ("keys", "relu", "logits", "logits")]


def bias_like(dims, generator, dtype, device, **sizes):
    shape = [sizes.get(d, 1) if d != "1" else 1 for d in dims.split()]
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", BIAS_OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("dims", BIAS_DIMS, ids=lambda d: d.replace(" ", ""))
def test_bias_matches_reference(device, backend, dims, options, generator):
    """A bias broadcast from each shape, with a mask (a fully masked sample) and each softmax, the relu and both
    maps and maxima: outputs and the gradients of q, k, v, ref and of the bias (dS summed to its shape)."""
    B, K, R, D, Dv = 3, 5, 7, 6, 4
    for dtype in dtypes_for(device, backend):
        q, k, v, ref = make_inputs(B, K, R, D, Dv, "per", "shared", dtype, device, generator)
        mask = torch.rand(B, R, generator=generator) > 0.4
        mask[:, 0] = True
        mask[1] = False
        bias = bias_like(dims, generator, dtype, device, B=B, K=K, R=R)
        assert_options_match(q, k, v, ref, backend, options, mask=mask.to(device), bias=bias, generator=generator)


# (B, K, R, D, Dv, H, q kind, score, bias dims, masked, options)
HEAD_CASES = [
    (1, 3, 5, 6, 4, 2, "shared", "cosine", "1 H 1 R", True, ("keys", None, "attention", "logits")),  # batch 1
    (2, 4, 7, 9, 6, 3, "per", None, "B H K R", False, (None, None, None, True)),
    (3, 2, 4, 8, 8, 4, "shared", "dot", None, True, ("queries", "relu", "logits", "attention")),
    (2, 5, 3, 4, 6, 2, "per", "cosine", "K R", False, ("keys", None, None, False)),  # a bias shared by the heads
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_heads_match_reference(device, backend, case, generator):
    """num_heads: heads folded into the batch and merged back side by side, a shared q given the batch, the score
    after the merge, a bias per head or shared by the heads, masks: the (B, H, K, R) map, the (B, H, K) max and the
    gradients of every input against the reference's per-head math."""
    B, K, R, D, Dv, H, q_kind, score, dims, masked, options = case
    for dtype in dtypes_for(device, backend):
        q, k, v, ref = make_inputs(B, K, R, D, Dv, q_kind, "shared", dtype, device, generator)
        mask = None
        if masked:
            mask = torch.rand(B, R, generator=generator) > 0.5
            mask[0, 0] = True
            mask = mask.to(device)
        bias = None if dims is None else bias_like(dims, generator, dtype, device, B=B, H=H, K=K, R=R)
        assert_options_match(q, k, v, ref, backend, options, mask=mask, score=score, bias=bias, num_heads=H,
                             generator=generator)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("softmax_over", ["keys", "queries"])
def test_minus_inf_bias_masks(device, backend, softmax_over, generator):
    """A -inf bias (SDPA's float attn_mask) gives its tokens no weight, as the mask does; a row (a column over the
    queries) whose every logit is -inf is all 0, as a fully masked one (and as torch's SDPA gives it)."""
    B, K, R, D, Dv = 2, 4, 5, 6, 3
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float64, device, generator)
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]], device=device)
    bias = torch.zeros(B, 1, R, dtype=torch.float64, device=device).masked_fill(~keep[:, None], float("-inf"))
    options = (softmax_over, None, "attention", True)
    cot = cotangents_for(q, k, v, ref, options, "cosine", generator)
    fused = lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw)  # noqa: E731
    got = outputs_and_grads(fused, q, k, v, ref, options, cot, bias=bias)
    masked = outputs_and_grads(fused, q, k, v, ref, options, cot, mask=keep)
    for g, w in zip(got[:-1], masked):  # every output and gradient but the bias's
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    dead = torch.zeros(K, R, dtype=torch.float64, device=device)
    if softmax_over == "keys":
        dead[1] = float("-inf")
    else:
        dead[:, 2] = float("-inf")
    assert_options_match(q, k, v, ref, backend, options, bias=dead, generator=generator)
    _, attn, best = fused(q, k, v, ref, bias=dead, softmax_over=softmax_over, return_attention=True,
                          return_max="attention")
    zero = attn[:, 1] if softmax_over == "keys" else attn[:, :, 2]
    assert not zero.any() and torch.isfinite(attn).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bias_gradcheck_and_opcheck(device, backend, generator):
    """gradcheck of every input with a broadcast bias (the logits map and max, a mask; then no softmax and heads),
    torch.compile(fullgraph=True) of the first, and opcheck of the forward and backward ops on a stride-0 bias view (the
    contract battery covers the rest)."""
    B, K, R, D, Dv = 2, 2, 3, 4, 2
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float64, device, generator)
    mask = torch.tensor([[True, False, True], [True, True, True]], device=device)
    cases = [(bias_like("K R", generator, torch.float64, device, K=K, R=R),
              dict(mask=mask, return_attention="logits", return_max="logits")),
             (bias_like("B 2 1 R", generator, torch.float64, device, B=B, R=R),
              dict(softmax_over=None, num_heads=2, return_attention=True, score="dot"))]
    for bias, options in cases:
        def fn(*leaves):
            outs = zslfast.attribute_attention(*leaves[:4], bias=leaves[4], backend=backend, **options)
            return tuple(o.masked_fill(o.isinf(), 0) for o in outs)  # finite differences of -inf are NaN

        leaves = [t.detach().requires_grad_() for t in (q, k, v, ref, bias)]
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend == "triton"), options
        if "mask" in options:  # one graph (each costs seconds): the bias with a mask, the map and the max
            assert_compiles_like_eager(lambda *leaves: sum(o.square().sum() for o in fn(*leaves)),
                                       [t.detach().float().requires_grad_() for t in leaves])
    from zslfast.ops import attribute_attention as op

    leaves = [t.float().requires_grad_() for t in (q, k, v, ref)]
    bias = bias_like("K R", generator, torch.float32, device, K=K, R=R).expand(B, K, R).unsqueeze(1)
    forward = (*leaves, mask, bias.requires_grad_(), D ** -0.5, "cosine", 1e-8, "logits", True, "keys", None,
               "attention", backend)
    torch.library.opcheck(op.SPEC.op, forward)
    out, e, lse, attn, best, index = (t.detach() for t in op.SPEC.op(*forward))
    backward = (torch.ones_like(out), torch.ones_like(attn), torch.ones_like(best), *[t.detach() for t in leaves],
                mask, bias.detach(), e, lse, best, index, None, D ** -0.5, "cosine", 1e-8, [True] * 5, "logits", "keys",
                None, "attention", backend)
    torch.library.opcheck(op.BACKWARD.op, backward)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bias_is_never_expanded(device, backend, generator):
    """A broadcast bias is read in place: no (B, K, R) tensor in the forward, and autograd keeps the caller's bias,
    not its broadcast (its gradient alone forms (B, K, R), documented)."""
    from zslfast.tools._memory import peak_bytes

    B, K, R, D, Dv = 32, 16, 64, 8, 4
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float32, device, generator)
    bias = bias_like("K R", generator, torch.float32, device, K=K, R=R)
    call = lambda: zslfast.attribute_attention(q, k, v, ref, bias=bias, backend=backend)  # noqa: E731
    call()  # warm-up (Triton compiles, CPU pool starts)
    peak = peak_bytes(call, torch.device(device))
    assert peak < B * K * R * 4 // 4, f"peak {peak} bytes, the broadcast bias would be {B * K * R * 4}"
    leaves = [t.requires_grad_() for t in (q, k, v, ref, bias)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        zslfast.attribute_attention(*leaves[:4], bias=leaves[4], backend=backend).sum().backward()
    own = {t.data_ptr() for t in leaves}
    assert all(t.numel() <= B * K * Dv for t in saved if t.data_ptr() not in own), [tuple(t.shape) for t in saved]


def test_bad_options():
    q, k, v, ref = torch.randn(4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 6), torch.randn(4, 6)
    for kwargs, name in (({"softmax_over": "rows"}, "softmax_over"), ({"softmax_over": "none"}, "softmax_over"),
                         ({"logit_activation": "gelu"}, "logit_activation"), ({"return_max": True}, "return_max"),
                         ({"return_max": "probs"}, "return_max"), ({"return_attention": "probs"}, "return_attention"),
                         ({"return_attention": None}, "return_attention")):
        for backend in ("reference", None):
            with pytest.raises(ValueError, match=f"{name} must be one of"):
                zslfast.attribute_attention(q, k, v, ref, backend=backend, **kwargs)
    bias = torch.randn(4, 5)
    for kwargs, error, match in (
        ({"bias": bias > 0}, TypeError, "bias must be a floating tensor .* pass it as mask="),
        ({"bias": bias.long()}, TypeError, "bias must be a floating-point tensor"),
        ({"bias": torch.randn(3, 5)}, ValueError, r"bias must broadcast to \(B, K, R\) = \(2, 4, 5\)"),
        ({"bias": torch.randn(2, 2, 4, 5)}, ValueError, r"bias must broadcast to \(B, H, K, R\) = \(2, 1, 4, 5\)"),
        ({"bias": torch.randn(2, 4, 5), "num_heads": 2}, ValueError, r"\(B, H, K, R\) .*with heads a bias is 4-D"),
        ({"bias": torch.randn(2, 4, 5, 1, 1)}, ValueError, "bias must be broadcastable"),
        ({"num_heads": 3}, ValueError, "num_heads=3 must divide D=8 and Dv=6"),
        ({"num_heads": 4}, ValueError, "num_heads=4 must divide D=8 and Dv=6"),
        ({"num_heads": 0}, ValueError, "num_heads must be an int >= 1"),
        ({"num_heads": True}, TypeError, "num_heads must be an int"),
    ):
        for backend in ("reference", None):
            with pytest.raises(error, match=match):
                zslfast.attribute_attention(q, k, v, ref, backend=backend, **kwargs)


# ------------------------------------------------------------------------- the papers' code (docs/ops.md examples)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_msdn_v2a_and_a2v(device, backend, generator):
    """MSDN (core/MSDN.py): V2A's softmax over the attributes, A2V's over the regions, each scored with a dot."""
    B, K, R, F_, Dw = 3, 7, 9, 12, 5
    g = generator
    Fs = torch.randn(B, F_, R, generator=g, dtype=torch.float64)
    V = torch.randn(K, Dw, generator=g, dtype=torch.float64)
    W_1, W_2 = torch.randn(Dw, F_, generator=g, dtype=torch.float64), torch.randn(Dw, F_, generator=g, dtype=torch.float64)
    # MSDN's eager code, V2A
    A = torch.softmax(torch.einsum("iv,vf,bfr->bir", V, W_2, Fs), dim=1)
    S_p_eager = torch.einsum("bir,iv,vf,bfr->bi", A, V, W_1, Fs)
    Fs_t = Fs.transpose(1, 2)
    S_p = zslfast.attribute_attention(V @ W_2, Fs_t, Fs_t, ref=V @ W_1, scale=1.0, score="dot",
                                      softmax_over="queries", backend=backend)
    torch.testing.assert_close(S_p, S_p_eager, rtol=1e-10, atol=1e-10)
    # A2V: the softmax over the regions (today's default)
    A2 = torch.softmax(torch.einsum("iv,vf,bfr->bir", V, W_1, Fs), dim=-1)
    S_v_eager = torch.einsum("bir,iv,vf,bfr->bi", A2, V, W_2, Fs)
    S_v = zslfast.attribute_attention(V @ W_1, Fs_t, Fs_t, ref=V @ W_2, scale=1.0, score="dot", backend=backend)
    torch.testing.assert_close(S_v, S_v_eager, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_psvma_relu_logits_and_gem_max(device, backend, generator):
    """PSVMA AnyAttention: relu(q k^T) * dim^-0.5, softmax, and the max-pool of the pre-softmax logits; GEM-ZSL:
    the max over regions of the attention map."""
    B, K, R, D = 2, 6, 10, 16
    g = generator
    q = torch.randn(K, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, R, D, generator=g, dtype=torch.float64)
    attn = torch.relu(torch.einsum("kd,brd->bkr", q, x)) * D ** -0.5
    pooled_eager = torch.nn.functional.max_pool1d(attn, kernel_size=R).squeeze(-1)
    out_eager = torch.softmax(attn, dim=-1) @ x
    out, pooled = zslfast.attribute_attention(q, x, x, logit_activation="relu", return_max="logits", backend=backend)
    torch.testing.assert_close(out, out_eager, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pooled, pooled_eager, rtol=1e-10, atol=1e-10)
    # GEM-ZSL: atten_map = softmax over regions; the attribute score is its max over the regions.
    gem_eager = torch.softmax(torch.einsum("kd,brd->bkr", q, x), dim=-1).amax(dim=-1)
    _, gem = zslfast.attribute_attention(q, x, x, scale=1.0, return_max="attention", backend=backend)
    torch.testing.assert_close(gem, gem_eager, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_benchmark_baselines_are_the_same_math(device, backend, generator):
    """zslfast.baselines' MSDN and GEM-ZSL code (what benchmarks/bench_attention_variants.py times) against the
    one-call forms, outputs and gradients, in float64."""
    from zslfast import baselines

    g, B, K, R, D, Dw = generator, 2, 5, 7, 9, 4
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    V, Ws, Fs = rand(K, Dw), [rand(Dw, D) for _ in range(4)], rand(B, D, R)

    def msdn_fused(V, W_1, W_2, W_3, W_4, Fs):
        regions = Fs.transpose(1, 2)
        S_p = zslfast.attribute_attention(V @ W_2, regions, regions, V @ W_1, scale=1.0, score="dot",
                                          softmax_over="queries", backend=backend)
        S_v = zslfast.attribute_attention(V @ W_3, regions, regions, V @ W_4, scale=1.0, score="dot", backend=backend)
        return torch.stack((S_p, S_v))

    def gem_fused(q, x, ref):
        return torch.stack(zslfast.attribute_attention(q, x, x, ref, scale=1.0, return_max="attention",
                                                       backend=backend))

    for eager, fused, inputs in ((baselines.msdn_attention, msdn_fused, [V, *Ws, Fs]),
                                 (baselines.gem_attention, gem_fused, [rand(K, D), rand(B, R, D), rand(K, D)])):
        cot = rand(2, B, K)
        results = []
        for fn in (eager, fused):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            results.append([out, *torch.autograd.grad((out * cot).sum(), leaves)])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_module_passes_the_options(device, backend, generator):
    """AttributeCrossAttention(softmax_over=, logit_activation=)(..., return_max=) is the op on its projections."""
    from zslfast.nn import AttributeCrossAttention

    torch.manual_seed(0)
    avl = AttributeCrossAttention(12, 6, 8, softmax_over="queries", logit_activation="relu", backend=backend).double()
    regions = torch.randn(3, 9, 12, generator=generator, dtype=torch.float64)
    attrs = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    got = avl(regions, attrs, return_max="logits", return_attention=True)
    want = reference.attribute_attention(avl.W_q(attrs), avl.W_k(regions), avl.W_v(regions), attrs,
                                         softmax_over="queries", logit_activation="relu", return_max="logits",
                                         return_attention=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="softmax_over must be one of"):
        AttributeCrossAttention(12, 6, 8, softmax_over="attributes")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", [OPTIONS[1], OPTIONS[4], OPTIONS[5], OPTIONS[6], OPTIONS[10], OPTIONS[11]],
                         ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("where", ["q_row", "k_token", "v_token", "masked_k_token", "bias_entry", "masked_bias"])
def test_options_nan_goes_where_the_reference_puts_it(device, backend, options, where, generator):
    """A NaN input makes NaN exactly the outputs and gradients the reference's are (the softmax over the queries
    spreads a q row's NaN to its whole sample, as eager's does; a bias entry's stays in its row), and a NaN in a
    masked token (its k, v or bias) reaches nothing."""
    B, K, R, D, Dv = 3, 4, 6, 5, 3
    q, k, v, ref = make_inputs(B, K, R, D, Dv, "shared", "shared", torch.float64, device, generator)
    bias = torch.randn(B, K, R, generator=generator, dtype=torch.float64).to(device) if "bias" in where else None
    mask = torch.ones(B, R, dtype=torch.bool, device=device)
    mask[:, 4] = False
    mask[2] = False
    if where == "bias_entry":
        bias[1, 2, 3] = float("nan")
    elif where == "masked_bias":
        bias[0, :, 4] = float("nan")
        bias[1, 1, 4] = float("inf")
        bias[2] = float("-inf")
    elif where == "q_row":
        q[1, 2] = float("nan")
    elif where == "k_token":
        k[0, 3, 1] = float("nan")
    elif where == "v_token":
        v[1, 2, 0] = float("nan")
    else:
        k[0, 4] = float("nan")
        v[1, 4] = float("inf")
    cot = cotangents_for(q, k, v, ref, options, "cosine", generator)
    want = outputs_and_grads(reference.attribute_attention, q, k, v, ref, options, cot, mask=mask, bias=bias)
    got = outputs_and_grads(lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw), q, k, v, ref,
                            options, cot, mask=mask, bias=bias)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g.isnan(), w.isnan()), (i, g.isnan().nonzero().tolist(), w.isnan().nonzero().tolist())
        assert torch.equal(g.isinf(), w.isinf()), (i, g.isinf().nonzero().tolist(), w.isinf().nonzero().tolist())
        fin = w.isfinite()
        torch.testing.assert_close(g[fin], w[fin], rtol=1e-10, atol=1e-10)
    if where == "masked_bias":  # as if the bias were clean: nothing of it reached anything
        clean = torch.where(mask[:, None, :], bias, 0)
        again = outputs_and_grads(lambda *a, **kw: zslfast.attribute_attention(*a, backend=backend, **kw), q, k, v,
                                  ref, options, cot, mask=mask, bias=clean)
        for g, w in zip(got, again):
            assert torch.equal(g, w)


# ------------------------------------------------------ the papers' code, issue 33 (docs/ops.md's examples)
def assert_same_outputs_and_grads(eager, fused, inputs, generator):
    """fused(*inputs) equals eager(*inputs), both a tuple of outputs: values and the gradients of every input, for
    random cotangents, in float64."""
    results = []
    for fn in (eager, fused):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        results.append((outs, leaves))
    cot = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in results[0][0]]
    for i, (want, got) in enumerate(zip(results[0][0], results[1][0])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"output {i}")
    grads = [torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), leaves) for outs, leaves in results]
    for i, (want, got) in enumerate(zip(*grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"gradient of input {i}")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_transzero_pp_geometry_attention(device, backend, generator):
    """TransZero++ (model_tzpp.py, ScaledDotProductGeometryAttention.forward): multi-head self-attention over the
    regions, softmax(q kᵀ/√d_k − relu(geometry weights)) v per head, the heads merged side by side (before fc_o)."""
    B, N, d_model, h, d_k = 2, 9, 8, 2, 3
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = [rand(B, N, d_model), rand(h * d_k, d_model), rand(h * d_k, d_model), rand(h * d_k, d_model),
              rand(3, h * d_k), rand(B, h, N, N)]  # regions, fc_q/k/v weights and biases, geometry weights

    def eager(queries, W_q, W_k, W_v, b, geometry):  # its code, dropout off, fc_o left out
        b_s, nq, nk = queries.shape[0], queries.shape[1], queries.shape[1]
        q = (queries @ W_q.T + b[0]).view(b_s, nq, h, d_k).permute(0, 2, 1, 3)
        k = (queries @ W_k.T + b[1]).view(b_s, nk, h, d_k).permute(0, 2, 3, 1)
        v = (queries @ W_v.T + b[2]).view(b_s, nk, h, d_k).permute(0, 2, 1, 3)
        att = torch.matmul(q, k) / np.sqrt(d_k)
        w_g = torch.nn.functional.relu(geometry)  # MultiLevelEncoder_woPad: relu of the per-head WG(embedding)
        w_mn = torch.softmax(-w_g + att, -1)
        return (torch.matmul(w_mn, v).permute(0, 2, 1, 3).contiguous().view(b_s, nq, h * d_k),)

    def fused(queries, W_q, W_k, W_v, b, geometry):
        q, k, v = (queries @ W.T + bias for W, bias in zip((W_q, W_k, W_v), b))
        return (zslfast.attribute_attention(q, k, v, bias=-torch.relu(geometry), score=None, num_heads=h,
                                            backend=backend),)

    assert_same_outputs_and_grads(eager, fused, inputs, generator)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_transzero_pp_e_v2s(device, backend, generator):
    """TransZero++ (model_tzpp.py, forward_feature_transformer): E_v2s = einsum('brc,cc,bic->bir', ...) with no
    softmax, then embed_v2s = einsum('bir,br->bi', E_v2s, S_p_v2s). ('cc' reads W_4's diagonal.)"""
    B, K, R, C = 2, 5, 7, 6
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = [rand(B, R, C), rand(C, C), rand(B, K, C), rand(B, R)]  # emb_vis, W_4, emb_att, S_p

    def eager(emb_vis_v2s, W_4_v2s, emb_att_v2s, S_p_v2s):
        E_v2s = torch.einsum('brc,cc,bic->bir', emb_vis_v2s, W_4_v2s, emb_att_v2s)
        return (torch.einsum('bir,br->bi', E_v2s, S_p_v2s),)

    def fused(emb_vis_v2s, W_4_v2s, emb_att_v2s, S_p_v2s):
        q = emb_att_v2s * W_4_v2s.diagonal()
        return (zslfast.attribute_attention(q, emb_vis_v2s, S_p_v2s[..., None], scale=1.0, score=None,
                                            softmax_over=None, backend=backend)[..., 0],)

    assert_same_outputs_and_grads(eager, fused, inputs, generator)


def apn_middle_graph(kernel_size):
    """APN's get_middle_graph (model/main_utils.py): for each peak position, the squared distance of every cell."""
    raw_graph = torch.zeros((2 * kernel_size - 1, 2 * kernel_size - 1), dtype=torch.float64)
    for x in range(- kernel_size + 1, kernel_size):
        for y in range(- kernel_size + 1, kernel_size):
            raw_graph[x + (kernel_size - 1), y + (kernel_size - 1)] = x ** 2 + y ** 2
    middle_graph = torch.zeros((kernel_size ** 2, kernel_size, kernel_size), dtype=torch.float64)
    for x in range(kernel_size):
        for y in range(kernel_size):
            middle_graph[x * kernel_size + y, :, :] = \
                raw_graph[kernel_size - 1 - x: 2 * kernel_size - 1 - x, kernel_size - 1 - y: 2 * kernel_size - 1 - y]
    return middle_graph


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_apn_attribute_maps_and_compactness(device, backend, generator):
    """APN (model/model_proto.py, resnet_proto_IoU.forward; model/main_utils.py, Loss_fn): attribute maps =
    conv2d(features, prototypes) (B, K, 7, 7) (raw logits), the attribute scores their max_pool2d, the compactness
    loss on the whole map; and its avg_pool option's scores. One call gives the map, the max and the average."""
    B, C, K, side = 2, 6, 4, 3
    R = side * side
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = [rand(B, C, side, side), rand(K, C, 1, 1)]  # layer4 features, prototype_vectors
    middle_graph = apn_middle_graph(side)

    def losses(attention, pre_attri):  # the compactness loss (L_CPT) reads the whole raw map
        batch_size, attri_dim, map_dim, _ = attention.size()
        peak_id = torch.argmax(attention.view(batch_size * attri_dim, -1), dim=1)
        peak_mask = middle_graph[peak_id, :, :].view(batch_size, attri_dim, map_dim, map_dim)
        return torch.sum(torch.sigmoid(attention) * peak_mask), pre_attri.square().sum()

    def eager(x, prototypes):
        attention = F.conv2d(input=x, weight=prototypes)  # [B, K, W, H]
        pre_attri = F.max_pool2d(attention, kernel_size=side).view(B, -1)
        avg = F.avg_pool2d(attention, kernel_size=side).view(B, -1)  # opt.avg_pool
        return (attention, pre_attri, avg, *losses(attention, pre_attri))

    def fused(x, prototypes):
        regions = x.flatten(2).transpose(1, 2)  # (B, R, C), a view
        avg, maps, pre_attri = zslfast.attribute_attention(
            prototypes.flatten(1), regions, torch.full((B, R, 1), 1.0 / R, dtype=x.dtype), scale=1.0, score=None,
            softmax_over=None, return_attention="logits", return_max="logits", backend=backend)
        attention = maps.view(B, K, side, side)
        return (attention, pre_attri, avg[..., 0], *losses(attention, pre_attri))

    assert_same_outputs_and_grads(eager, fused, inputs, generator)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_dppn_multihead_prototype_assignment(device, backend, generator):
    """DPPN (models/dpn.py, PrtAttLayer.prt_assign): nn.MultiheadAttention(dim, nhead=8) with the attribute
    prototypes (shared by the batch) as queries over the region features; torch's own module against one call on
    its projections, values and the gradients of the inputs and of the module's weights."""
    B, K, R, dim = 2, 5, 6, 16
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(dim, 8, dropout=0.1).double().train(False)
    prt = torch.randn(K, dim, generator=generator, dtype=torch.float64)  # zsl_prt_emb.weight
    vis_query = torch.randn(R, B, dim, generator=generator, dtype=torch.float64)  # wh*bs*c
    inputs = [prt, vis_query, attn.in_proj_weight.detach(), attn.in_proj_bias.detach()]

    def eager(prt, vis_query, weight, bias):
        vis_prt = prt.unsqueeze(1).repeat(1, B, 1)  # DPN.forward
        return (F.multi_head_attention_forward(
            vis_prt, vis_query, vis_query, dim, 8, weight, bias, None, None, False, 0.0, attn.out_proj.weight,
            attn.out_proj.bias, training=False, need_weights=False)[0],)  # nn.MultiheadAttention.forward's call

    def fused(prt, vis_query, weight, bias):
        (W_q, W_k, W_v), (b_q, b_k, b_v) = weight.chunk(3), bias.chunk(3)
        regions = vis_query.transpose(0, 1)
        e = zslfast.attribute_attention(prt @ W_q.T + b_q, regions @ W_k.T + b_k, regions @ W_v.T + b_v,
                                        score=None, num_heads=8, backend=backend)
        return (attn.out_proj(e).transpose(0, 1),)

    torch.testing.assert_close(eager(*inputs)[0], attn(prt.unsqueeze(1).repeat(1, B, 1), vis_query, vis_query)[0])
    assert_same_outputs_and_grads(eager, fused, inputs, generator)
