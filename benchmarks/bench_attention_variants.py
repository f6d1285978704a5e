"""The attention variants of issue 17 at CUB's shapes: the papers' eager code, torch.compile of it, and zslfast.

    MSDN (core/MSDN.py), both branches, dot-scored against V W:
        V2A  A = softmax(V W_2 Fs, over the attributes),  S_p[b, i] = sum_r A[b, i, r] <Fs_r, (V W_1)_i>
        A2V  A = softmax(V W_3 Fs, over the regions),     S_v[b, i] = sum_r A[b, i, r] <Fs_r, (V W_4)_i>
        zslfast: attribute_attention(V W_2, Fs^T, Fs^T, ref=V W_1, scale=1, score="dot", softmax_over="queries"),
        and the same with the default softmax over the keys for A2V.
        V (K, Dw) attribute word vectors, W_* (Dw, F), Fs (B, F, R)  ->  (2, B, K)
    GEM-ZSL: attention maps of attribute prototypes over regions (softmax over the regions), the part features'
        cosine with the attributes, and each map's max over the regions (regressed to the attributes):
        zslfast: attribute_attention(q, x, x, ref, scale=1, return_max="attention")
        q (K, D), x (B, R, D), ref (K, D)  ->  (2, B, K)

    Issue 33's (zslfast.baselines has each eager form):
    geometry  TransZero++'s encoder attention (h = 1, d = 300 in its CUB config): softmax(q kᵀ/√d − w_g) v over the
        196 regions, w_g (B, 1, R, R) the relu'd geometry weights (learned: its gradient too)
        zslfast: attribute_attention(q, k, v, bias=-w_g, score=None)
    e_v2s     TransZero++'s E_v2s = (q kᵀ) S_p without a softmax, K = 312, C = 300
        zslfast: attribute_attention(emb_att * diag(W_4), emb_vis, S_p[..., None], scale=1, score=None,
        softmax_over=None)
    apn       APN's attribute maps (B, 312, 7 x 7) of 2048-d layer4 features and their max
        zslfast: attribute_attention(prototypes, x, 1/49, scale=1, score=None, softmax_over=None,
        return_attention="logits", return_max="logits")
    dppn      DPPN's nn.MultiheadAttention(512, 8) between its projections, the 312 prototypes over 196 regions,
        B = 32 (its fine-tuning batch): attribute_attention(q, k, v, score=None, num_heads=8)

Shapes: CUB, B=50, K=312, R=196 (14 x 14 regions of a 448^2 ResNet-101 input), F = D = 2048, Dw = 300 (GloVe);
the quick set (without --full) runs GEM-ZSL's only, at B=8 on CPU tensors.
Forward+backward (gradients of every input that is a parameter or a feature map). extra_info: saved_MiB (what
autograd keeps beyond the inputs), peak_extra_MiB (see conftest.py).

Interleaved A/B timing (the pytest-benchmark blocks drift on a shared machine):
    python benchmarks/bench_attention_variants.py [msdn|gem|geometry|e_v2s|apn|dppn] [rounds] [threads]
"""

import sys

import pytest
import torch

import zslfast
from zslfast import baselines
from zslfast.tools import timing
from zslfast.data import PRESETS
from conftest import DEVICE, full_unless, quick, run_benchmark

CUB = PRESETS["CUB"]
B, K, R, D, DW = 50, CUB.num_attributes, 196, 2048, 300
QUICK_B = 8  # the quick set's batch (a B=50 eager step takes 5-7 s on 2 CPU cores); --full runs B=50


def msdn_attention_fused(V, W_1, W_2, W_3, W_4, Fs):
    regions = Fs.transpose(1, 2)  # (B, R, F): a view, read in place
    S_p = zslfast.attribute_attention(V @ W_2, regions, regions, V @ W_1, scale=1.0, score="dot",
                                      softmax_over="queries")
    S_v = zslfast.attribute_attention(V @ W_3, regions, regions, V @ W_4, scale=1.0, score="dot")
    return torch.stack((S_p, S_v))


def gem_attention_fused(q, x, ref):
    score, best = zslfast.attribute_attention(q, x, x, ref, scale=1.0, return_max="attention")
    return torch.stack((score, best))


def make_msdn(device, batch=B):
    g = torch.Generator(device=device).manual_seed(0)
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).requires_grad_()
    # Scaled so the logits are O(1), as trained weights keep them (a saturated softmax would time the same).
    return [randn(K, DW, scale=DW ** -0.5), *(randn(DW, D, scale=D ** -0.5) for _ in range(4)),
            torch.relu(torch.randn(batch, D, R, generator=g, device=device)).requires_grad_()]


def make_gem(device, batch=B):
    g = torch.Generator(device=device).manual_seed(0)
    q = (torch.randn(K, D, generator=g, device=device) * D ** -0.5).requires_grad_()
    x = torch.relu(torch.randn(batch, R, D, generator=g, device=device)).requires_grad_()
    ref = torch.randn(K, D, generator=g, device=device).requires_grad_()
    return [q, x, ref]


def geometry_fused(q, k, v, w_g):
    return zslfast.attribute_attention(q, k, v, bias=-w_g, score=None, num_heads=w_g.shape[1])


def e_v2s_fused(emb_vis, W_4, emb_att, S_p):
    return zslfast.attribute_attention(emb_att * W_4.diagonal(), emb_vis, S_p[..., None], scale=1.0, score=None,
                                       softmax_over=None)[..., 0]


def apn_fused(x, prototypes):
    B, R = x.shape[0], x.shape[2] * x.shape[3]
    mean = torch.full((B, R, 1), 1.0 / R, device=x.device)  # E = the map's mean (unused here, one column)
    _, maps, best = zslfast.attribute_attention(prototypes.flatten(1), x.flatten(2).transpose(1, 2), mean, scale=1.0,
                                                score=None, softmax_over=None, return_attention="logits",
                                                return_max="logits")
    return torch.cat((maps, best[..., None]), dim=-1)


def dppn_eager(q, k, v):
    return baselines.multihead_attention(q.expand(k.shape[0], *q.shape), k, v, DPPN_HEADS)


def dppn_fused(q, k, v):
    return zslfast.attribute_attention(q, k, v, score=None, num_heads=DPPN_HEADS)


TZ_DIM, APN_SIDE, DPPN_DIM, DPPN_HEADS, DPPN_B = 300, 7, 512, 8, 32


def _randn(g, device, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, device=device) * scale).requires_grad_()


def make_geometry(device, batch=B):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (_randn(g, device, batch, R, TZ_DIM) for _ in range(3))
    w_g = torch.relu(torch.randn(batch, 1, R, R, generator=g, device=device)).requires_grad_()
    return [q, k, v, w_g]


def make_e_v2s(device, batch=B):
    g = torch.Generator(device=device).manual_seed(0)
    return [_randn(g, device, batch, R, TZ_DIM, scale=TZ_DIM ** -0.5), _randn(g, device, TZ_DIM, TZ_DIM),
            _randn(g, device, batch, K, TZ_DIM, scale=TZ_DIM ** -0.5), _randn(g, device, batch, R)]


def make_apn(device, batch=B):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.relu(torch.randn(batch, D, APN_SIDE, APN_SIDE, generator=g, device=device)).requires_grad_()
    return [x, _randn(g, device, K, D, 1, 1, scale=D ** -0.5)]


def make_dppn(device, batch=DPPN_B):
    g = torch.Generator(device=device).manual_seed(0)
    return [_randn(g, device, K, DPPN_DIM, scale=DPPN_DIM ** -0.25),
            *(_randn(g, device, batch, R, DPPN_DIM, scale=DPPN_DIM ** -0.25) for _ in range(2))]


VARIANTS = {
    "msdn": (make_msdn, baselines.msdn_attention, msdn_attention_fused),
    "gem": (make_gem, baselines.gem_attention, gem_attention_fused),
    "geometry": (make_geometry, baselines.transzero_pp_geometry_attention, geometry_fused),
    "e_v2s": (make_e_v2s, baselines.transzero_pp_e_v2s, e_v2s_fused),
    "apn": (make_apn, baselines.apn_attribute_maps, apn_fused),
    "dppn": (make_dppn, dppn_eager, dppn_fused),
}


def implementation(variant, name):
    _, eager, fused = VARIANTS[variant]
    return {"eager": eager, "compile": timing.compiled(eager), "zslfast": fused}[name]


@pytest.mark.parametrize("impl", timing.IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", full_unless(lambda v: v == "gem", *VARIANTS))
def test_attention_variant(benchmark, variant, impl):
    make = VARIANTS[variant][0]
    inputs = make(DEVICE, QUICK_B) if quick() and DEVICE.type == "cpu" else make(DEVICE)  # else the paper's batch
    shapes = " ".join("x".join(map(str, t.shape)) for t in inputs)
    benchmark.group = f"{variant} attention CUB inputs {shapes} fwd+bwd {DEVICE.type}"
    fn = implementation(variant, impl)
    run_benchmark(benchmark, timing.step(fn, inputs, True), rounds=None if DEVICE.type == "cuda" else 3, warmup=1,
                  saved=(fn, inputs))  # its first call compiles outside the measurement


def run_interleaved(variant, rounds=5):
    inputs = VARIANTS[variant][0](torch.device("cpu"))
    fns = {name: implementation(variant, name) for name in timing.IMPLEMENTATIONS}
    for name, fn in fns.items():
        print(f"{variant} {name}: saved for backward {timing.saved_mib(fn, inputs):.1f} MiB")
    steps = {name: timing.step(fn, inputs, True) for name, fn in fns.items()}
    shapes = " ".join("x".join(map(str, t.shape)) for t in inputs)
    timing.interleaved(f"{variant} attention CUB inputs {shapes} fwd+bwd", steps, rounds, calls=1, warmup=1)


if __name__ == "__main__":
    which = sys.argv[1:2] or list(VARIANTS)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    for variant in which:
        run_interleaved(variant, n)
