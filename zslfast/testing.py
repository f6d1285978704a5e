"""One record per op: its inputs, its shapes, its three implementations and its audit plan, in one place.

An :class:`OpRecord` is everything that the tools and the tests know about one public op of zslfast:

    name        the op, ``zslfast.<name>``; also the key of SHAPES
    spec        its OpSpec (zslfast/ops/): its backends and its autocast rule
    shapes      its cases: the papers' shapes, named by dataset (CUB C=200 K=312 at B=50, SUN C=717 K=102, AwA2
                C=50 K=85, from zslfast.data.PRESETS; ViT-B/16 L=12 H=12 N=197 at 224^2, N=577 at 384^2), then a
                large one, each with its shape on a GPU and on CPU tensors (smaller where the GPU shape takes minutes
                on 2 cores, none where it is GPU-only)
    make        its inputs, ``make(shape, dtype, device, generator, requires_grad)`` (seed 0 unless a generator is
                given; requires_grad on the ``differentiable`` ones)
    eager       the papers' code (zslfast.baselines), ``fn(*inputs)``
    fused       zslfast's call, ``fn(*inputs, backend=None, **options)``
    reference   zslfast.reference, ``fn(*inputs)``
    plan        its audit plan: ``plan(*shape, dtype)`` yields (pass, steps) from the op's own Triton planners
                (zslfast/triton/*) on meta tensors, the launches the audit compiles (None: no Triton kernel)
    small, threads, variants    the contract tests' shape, their thread-count shapes and the options they run
    tiny, checked               gpucheck's shape on CPU tensors and its GPU case (tiny None: gpucheck leaves it out)

``python -m zslfast bench``, ``benchmarks/``, ``python -m zslfast audit``, ``python -m zslfast gpucheck`` and
tests/test_contract.py derive their tables from RECORDS; a new op fills one record. SHAPES also holds the model
steps' shapes (ILPG, generative preprocessing) that benchmarks/ time. Importing this module imports no Triton
kernel module: each plan imports its planners when it runs.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import zslfast

from . import baselines, reference
from ._enums import EpsMode, HeadFusion, LogitActivation, Mode, Normalize, ReturnAttention, ReturnMax, SoftmaxOver
from .data import PRESETS
from .ops import attention_rollout as _rollout_op
from .ops import attribute_attention as _attention_op
from .ops import cosine_logits as _cosine_op
from .ops import memory_bank as _bank_op
from .ops import prototype_scores as _scores_op

# --------------------------------------------------------------------------------------------------- the shapes
# Backbones and embeddings of the papers: ResNet-101 7x7 regions of 2048 features, GloVe attribute vectors,
# ViT-B/16 (12 layers, 12 heads, 197 tokens at 224^2 and 577 at 384^2, 768 features), DINOv2 ViT-S/14 signatures,
# CLIP text embeddings; ILPG's IDPP hidden size.
REGIONS, RESNET_DIM, GLOVE_DIM = 49, 2048, 300
VIT_LAYERS, VIT_HEADS, VIT_TOKENS, VIT_TOKENS_384, VIT_DIM = 12, 12, 197, 577, 768
DINO_DIM, CLIP_DIM, HIDDEN = 384, 512, 64
BANK_SLOTS, BANK_CAPACITY = 3, 8  # SAGE's memory bank: M slots per class, K entries per (class, slot) queue
IMAGENET21K_CLASSES = 21841

AwA2, CUB, SUN = PRESETS["AwA2"], PRESETS["CUB"], PRESETS["SUN"]

SAME = "same"  # a case's CPU shape is its GPU shape


@dataclass(frozen=True)
class Case:
    """One shape of one op: ``shape`` on a GPU, ``cpu`` on CPU tensors (None: not run on CPU)."""

    name: str  # the dataset (or backbone) it comes from; the benchmarks' test id
    shape: Tuple[int, ...]
    cpu: Optional[Tuple[int, ...]]
    large: bool  # not one of the papers' shapes (the audit does not ask these to fill the GPU)
    dims: Tuple[str, ...]

    def on(self, device: torch.device) -> Optional[Tuple[int, ...]]:
        """The shape run on ``device`` (None: this case does not run there)."""
        return self.shape if device.type == "cuda" else self.cpu

    def label(self, shape: Optional[Tuple[int, ...]] = None) -> str:
        """``CUB B=50 C=200 K=312``: the name and the named dimensions (of ``shape``, default the GPU shape)."""
        return f"{self.name} " + " ".join(f"{d}={n}" for d, n in zip(self.dims, shape or self.shape))

    def named(self, device: torch.device) -> Dict[str, int]:
        """{dimension: size} of the shape run on ``device``."""
        return dict(zip(self.dims, self.on(device)))


@dataclass(frozen=True)
class Shapes:
    """One op's cases, in order: the papers' shapes first, then the large ones."""

    dims: Tuple[str, ...]
    cases: Dict[str, Case]

    def __getitem__(self, name: str) -> Case:
        return self.cases[name]

    def papers(self):
        return [case for case in self.cases.values() if not case.large]


def _shapes(dims: str, *cases) -> Shapes:
    """cases: (name, shape) or (name, shape, cpu shape or None, large)."""
    names = tuple(dims.split())
    table = {}
    for name, shape, cpu, large in (c if len(c) == 4 else (*c, SAME, False) for c in cases):
        assert len(shape) == len(names) and (cpu in (None, SAME) or len(cpu) == len(names)), (name, shape, cpu)
        table[name] = Case(name, tuple(shape), tuple(shape) if cpu == SAME else cpu, large, names)
    return Shapes(names, table)


# ---------------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class OpRecord:
    name: str
    spec: object  # the op's OpSpec
    shapes: Shapes
    inputs: Callable  # (shape, dtype, device, generator) -> list of inputs; make() is the public form
    eager: Callable
    fused: Callable
    reference: Callable
    differentiable: Optional[int] = None  # the first n inputs are differentiable (None: every floating input)
    plan: Optional[Callable] = None
    small: Tuple[int, ...] = ()  # the contract tests' shape: gradcheck's, so every size is a few elements
    threads: Tuple[Tuple[int, ...], ...] = ()  # shapes at which the CPU kernels would split work by thread count
    variants: Tuple[dict, ...] = ()  # options besides the default ones, each run by the contract tests
    tiny: Optional[Tuple[int, ...]] = None  # gpucheck's shape on CPU tensors
    checked: Optional[str] = None  # gpucheck's correctness case on a GPU: one of the papers' shapes

    def make(self, shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False) -> list:
        """The op's inputs at ``shape``, drawn in float64 and rounded to ``dtype`` (seed 0 without a generator)."""
        device = torch.device(device)
        g = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
        inputs = list(self.inputs(tuple(shape), dtype, device, g))
        for index, t in enumerate(inputs):
            t.requires_grad_(requires_grad and self.differentiates(index, t))
        return inputs

    def differentiates(self, index: int, tensor: torch.Tensor) -> bool:
        """Whether input ``index`` is one the op differentiates (and the tools time and check gradients of)."""
        return tensor.is_floating_point() and (self.differentiable is None or index < self.differentiable)

    @property
    def gpu_backends(self) -> Tuple[str, ...]:
        """The op's GPU kernels, fastest first."""
        return tuple(b for b in self.spec.gpu_preference if b in self.spec.backends)


def _randn(g, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64, device=device) * scale).to(dtype)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# --------------------------------------------------------------------------------------------------- the records
# logits[b, c] = sum_k e[b, k] s[c, k] (1 + w[b, c, k]): ILPG's IDPP + APC
def _prototype_scores_inputs(shape, dtype, device, g):
    B, C, K = shape
    return _randn(g, device, dtype, B, K), _randn(g, device, dtype, C, K), _randn(g, device, dtype, B, C, K, scale=0.1)


def _prototype_scores_plan(B, C, K, dtype):
    from .triton import prototype_scores as kernels

    e, s, w = _meta(B, K, dtype=dtype), _meta(C, K, dtype=dtype), _meta(B, C, K, dtype=dtype)
    yield "forward", kernels.plan_forward(e, s, w)[1]
    yield "backward", kernels.plan_backward(_meta(B, C, dtype=dtype), e, s, w, (True, True, True))[1]


PROTOTYPE_SCORES = OpRecord(
    "prototype_scores", _scores_op.SPEC,
    _shapes("B C K",
            ("AwA2", (50, AwA2.num_classes, AwA2.num_attributes)),
            ("CUB", (50, CUB.num_classes, CUB.num_attributes)),
            ("SUN-B64", (64, SUN.num_classes, SUN.num_attributes)),
            ("large", (256, 1000, CUB.num_attributes), SAME, True)),
    _prototype_scores_inputs, baselines.prototype_scores, zslfast.prototype_scores, reference.prototype_scores,
    plan=_prototype_scores_plan, small=(2, 3, 5), threads=((9, 130, 33),), tiny=(5, 37, 70), checked="CUB",
)


# w = h @ u: the factored IDPP weights of hidden size J, up to ImageNet-21K's classes (torch GEMMs: no kernel)
def _prototype_scores_factored_inputs(shape, dtype, device, g):
    B, C, K, J = shape
    e, s, h = _randn(g, device, dtype, B, K), _randn(g, device, dtype, C, K), _randn(g, device, dtype, B, J)
    return e, s, h, _randn(g, device, dtype, J, C, K, scale=0.05)


PROTOTYPE_SCORES_FACTORED = OpRecord(
    "prototype_scores_factored", _scores_op.FACTORED,
    _shapes("B C K J",
            ("CUB-J64", (50, CUB.num_classes, CUB.num_attributes, HIDDEN)),
            ("21K-classes", (256, IMAGENET21K_CLASSES, GLOVE_DIM, HIDDEN), SAME, True)),
    _prototype_scores_factored_inputs, baselines.prototype_scores_factored, zslfast.prototype_scores_factored,
    reference.prototype_scores_factored, small=(3, 3, 4, 2),  # B > J: the factored form, never forming w
)


# scale * cos(x[n], protos[c]): SVIP/SAGE-style cosine heads on ViT-B features, scale a learnable temperature
def _cosine_logits_inputs(shape, dtype, device, g):
    N, C, D = shape
    return _randn(g, device, dtype, N, D), _randn(g, device, dtype, C, D), torch.full((), 16.0, dtype=dtype,
                                                                                      device=device)


def _cosine_logits_plan(N, C, D, dtype):
    from .triton import cosine_logits as kernels

    x, p, scale = _meta(N, D, dtype=dtype), _meta(C, D, dtype=dtype), _meta(dtype=dtype)
    clamp = EpsMode.CLAMP  # the default eps_mode
    (out, ix, ip), steps = kernels.plan_forward(x, p, scale, _cosine_op.EPS, clamp)
    yield "forward", steps
    yield "backward", kernels.plan_backward(_meta(N, C, dtype=dtype), x, p, out, ix, ip, scale, _cosine_op.EPS,
                                            clamp, (True, True, True))[1]


COSINE_LOGITS = OpRecord(
    "cosine_logits", _cosine_op.SPEC,
    _shapes("N C D",
            ("AwA2", (64, AwA2.num_classes, VIT_DIM)),
            ("CUB", (64, CUB.num_classes, VIT_DIM)),
            ("SUN", (64, SUN.num_classes, VIT_DIM)),
            ("21K-classes", (256, IMAGENET21K_CLASSES, VIT_DIM), (256, IMAGENET21K_CLASSES, GLOVE_DIM), True)),
    _cosine_logits_inputs, baselines.cosine_logits, zslfast.cosine_logits, reference.cosine_logits,
    plan=_cosine_logits_plan, small=(3, 4, 5),
    # a multithreaded GEMM splits its reduction: grad_protos at N=1024, C=100, D=64 differs by ~7.6e-6 across threads
    threads=((1024, 100, 64), (900, 7, 33), (1, 1, 200), (1, 50, 64), (4096, 5, 16)),
    variants=({"eps": 1e-3, "eps_mode": "add"},), tiny=(6, 9, 40), checked="CUB",
)


# ILPG's AVL: attribute queries over ResNet regions (R=49, GloVe D=300) or ViT-B tokens against CUB's attributes
def _attribute_attention_inputs(shape, dtype, device, g):
    B, K, R, D, Dv = shape
    return (_randn(g, device, dtype, K, D), _randn(g, device, dtype, B, R, D), _randn(g, device, dtype, B, R, Dv),
            _randn(g, device, dtype, K, Dv))


# The options the audit compiles besides the default (ILPG's), as the raw kernels' ids: (name, softmax_over,
# logit_activation, return_max, bias, return_attention); a bias is a dense (B, 1, K, R) view with its gradient (as
# TransZero++'s geometry bias), and a returned attention has a gradient. Each path of the kernels runs in one of
# them at least (the softmax over the queries with either max, the relu on either axis, each max on the keys; the
# bias and the returned logits over either axis, the relu beside a bias, no softmax; the returned map, with and
# without a bias, over either axis and beside a max), and each row of the launch table configures one of their
# launches (tests/test_audit.py). They are compiled at CUB's K = 312 (R = 49, 197, 577: the single-tile,
# wide-tile and R-tiled paths; B = 64, 128, 256: the columns kernels' 16-, 32- and 64-token tiles; AwA2's and
# SUN's K pick CUB's tiles) in fp32 and bf16 (fp16 takes bf16's tiles and registers): every case and dtype tripled
# the audit's time.
ATTRIBUTE_ATTENTION_VARIANTS = (
    ("queries+attention-max", SoftmaxOver.QUERIES, LogitActivation.NONE, ReturnMax.ATTENTION, False,
     ReturnAttention.NONE),  # over the queries, with the attention's max
    ("relu+logits-max", SoftmaxOver.KEYS, LogitActivation.RELU, ReturnMax.LOGITS, False, ReturnAttention.NONE),  # PSVMA
    ("attention-max", SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.ATTENTION, False,
     ReturnAttention.NONE),  # GEM-ZSL
    ("queries+relu+logits-max", SoftmaxOver.QUERIES, LogitActivation.RELU, ReturnMax.LOGITS, False,
     ReturnAttention.NONE),
    ("bias+logits", SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.NONE, True,
     ReturnAttention.LOGITS),  # TransZero++'s geometry bias; APN's raw map
    ("bias+relu+attention-max", SoftmaxOver.KEYS, LogitActivation.RELU, ReturnMax.ATTENTION, True,
     ReturnAttention.NONE),
    ("queries+bias+relu+attention", SoftmaxOver.QUERIES, LogitActivation.RELU, ReturnMax.LOGITS, True,
     ReturnAttention.ATTENTION),
    ("no-softmax+bias+relu+logits-max", SoftmaxOver.NONE, LogitActivation.RELU, ReturnMax.LOGITS, True,
     ReturnAttention.LOGITS),
    ("no-softmax", SoftmaxOver.NONE, LogitActivation.NONE, ReturnMax.NONE, False,
     ReturnAttention.NONE),  # TransZero++'s E_v2s
    ("attention", SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.NONE, False,
     ReturnAttention.ATTENTION),  # the map returned for a loss on it
    ("queries+attention", SoftmaxOver.QUERIES, LogitActivation.NONE, ReturnMax.NONE, False,
     ReturnAttention.ATTENTION),
    ("attention+attention-max", SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.ATTENTION, False,
     ReturnAttention.ATTENTION),
)
VARIANT_MARK = "["  # a pass of an op's non-default options is named "forward [variant]"


def _attribute_attention_plan(B, K, R, D, Dv, dtype):
    from ._enums import enum_id
    from .triton import attribute_attention as kernels

    q, k, v, ref = _meta(K, D, dtype=dtype), _meta(B, R, D, dtype=dtype), _meta(B, R, Dv, dtype=dtype), \
        _meta(K, Dv, dtype=dtype)
    score, scale, eps = enum_id("score", "cosine"), D ** -0.5, _attention_op.EPS  # ILPG's score
    variants = (("", SoftmaxOver.KEYS, LogitActivation.NONE, ReturnMax.NONE, False, ReturnAttention.NONE),)
    if K == 312 and dtype != torch.float16:
        variants += ATTRIBUTE_ATTENTION_VARIANTS
    for name, softmax_over, activation, return_max, has_bias, return_attention in variants:
        options = (int(softmax_over), int(activation), int(return_max))
        bias = _meta(B, 1, K, R, dtype=dtype) if has_bias else None
        (_, e, lse, _, best, index), steps = kernels.plan_forward(
            q, k, v, ref, None, bias, scale, score, eps, int(return_attention), True, *options)
        mark = f" {VARIANT_MARK}{name}]" if name else ""
        yield f"forward{mark}", steps
        grad_max = _meta(B, K, dtype=dtype) if return_max else None
        grad_attn = _meta(B, K, R, dtype=dtype) if return_attention else None
        yield f"backward{mark}", kernels.plan_backward(
            _meta(B, K, dtype=dtype), grad_attn, grad_max, q, k, v, ref, None, bias, e, lse, best, index, None,
            scale, score, eps, (True, True, True, True, has_bias), int(return_attention), *options)[1]


def _att(preset, batch):  # attribute_attention over one dataset's attribute queries and ResNet regions
    return (batch, preset.num_attributes, REGIONS, GLOVE_DIM, GLOVE_DIM)


ATTRIBUTE_ATTENTION = OpRecord(
    "attribute_attention", _attention_op.SPEC,
    _shapes("B K R D Dv",
            ("CUB", _att(CUB, 64)),
            ("AwA2", _att(AwA2, 64)),
            ("SUN", _att(SUN, 64)),
            ("ViT-CUB", (64, CUB.num_attributes, VIT_TOKENS, VIT_DIM, VIT_DIM)),
            ("ViT-CUB-384", (16, CUB.num_attributes, VIT_TOKENS_384, VIT_DIM, VIT_DIM), None, False),
            ("CUB-128", _att(CUB, 128), None, True),  # the columns kernels' 32-token tiles (config.py)
            ("large", _att(CUB, 256), None, True)),
    _attribute_attention_inputs, baselines.attribute_attention, zslfast.attribute_attention,
    reference.attribute_attention, plan=_attribute_attention_plan, small=(2, 2, 3, 4, 2),  # Dv = 2: two heads
    # CUB's attributes over ViT-B tokens: the shared q's gradient is one GEMM over B*R, which MKL split by threads
    threads=((8, 312, 196, 300, 96),),
    variants=({"score": "dot", "return_attention": True}, {"score": None},
              {"softmax_over": "queries", "return_max": "attention"},
              {"logit_activation": "relu", "return_max": "logits", "return_attention": True},
              {"softmax_over": None, "return_attention": "logits", "return_max": "logits"},  # APN, TransZero++
              {"num_heads": 2, "score": "dot", "return_attention": True, "return_max": "attention"}),  # DPPN
    tiny=(3, 11, 7, 20, 20), checked="CUB",
)


# SVIP's rollout of ViT-B/16's attention maps: the inputs are the L layers' maps
def _attention_rollout_inputs(shape, dtype, device, g):
    L, B, H, N = shape
    return [_randn(g, device, torch.float64, B, H, N, N, scale=2.0).softmax(-1).to(dtype) for _ in range(L)]


def _attention_rollout_plan(L, B, H, N, dtype):
    from .triton import attention_rollout as kernels

    attns = [_meta(B, H, N, N, dtype=dtype) for _ in range(L)]
    yield "forward", kernels.plan_forward(attns, Mode.ABNAR, HeadFusion.MEAN, Normalize.ROW)[2]  # the defaults


ATTENTION_ROLLOUT = OpRecord(
    "attention_rollout", _rollout_op.SPEC,
    _shapes("L B H N",
            ("ViT-B-224-B8", (VIT_LAYERS, 8, VIT_HEADS, VIT_TOKENS)),
            ("ViT-B-224-batch", (VIT_LAYERS, 64, VIT_HEADS, VIT_TOKENS), (VIT_LAYERS, 32, VIT_HEADS, VIT_TOKENS),
             False),
            ("ViT-B-384", (VIT_LAYERS, 16, VIT_HEADS, VIT_TOKENS_384), (VIT_LAYERS, 8, VIT_HEADS, VIT_TOKENS_384),
             False),
            ("large", (VIT_LAYERS, 256, VIT_HEADS, VIT_TOKENS), None, True)),
    _attention_rollout_inputs, lambda *attns: baselines.attention_rollout(attns),
    lambda *attns, **options: zslfast.attention_rollout(list(attns), **options),
    lambda *attns: reference.attention_rollout(list(attns)), plan=_attention_rollout_plan, small=(2, 1, 2, 3),
    threads=((3, 1, 2, 577),),  # B = 1: MKL threads the GEMV of torch.bmm
    variants=({"mode": "residual", "head_fusion": "max"},
              {"head_fusion": "min", "normalize": "none", "discard_ratio": 0.5, "cls_only": False}),
    tiny=(3, 2, 2, 17), checked="ViT-B-224-B8",
)


# SAGE's memory bank on ViT-B features: KL to the class prototypes (and the bank update: + BANK_CAPACITY)
def _memory_bank_kl_inputs(shape, dtype, device, g):
    B, M, D, C = shape
    z, protos = _randn(g, device, dtype, B, M, D), _randn(g, device, dtype, C, M, D)
    labels = torch.randint(0, C, (B,), generator=g, device=device)
    active = torch.rand(B, M, generator=g, device=device) < 0.5
    active[0, 0] = True  # never an empty loss
    return z, protos, labels, active


def _memory_bank_kl_plan(B, M, D, C, dtype):
    from .triton import memory_bank as kernels

    z, protos = _meta(B, M, D, dtype=dtype), _meta(C, M, D, dtype=dtype)
    labels, active = _meta(B, dtype=torch.int64), _meta(B, M, dtype=torch.bool)
    yield "forward+grad", kernels.plan_kl_forward(z, protos, labels, active, (True,))[1]


MEMORY_BANK_KL = OpRecord(
    "memory_bank_kl", _bank_op.KL,
    _shapes("B M D C",
            ("CUB", (128, BANK_SLOTS, VIT_DIM, CUB.num_classes)),
            ("SUN", (256, BANK_SLOTS, VIT_DIM, SUN.num_classes))),
    _memory_bank_kl_inputs, baselines.memory_bank_kl, zslfast.memory_bank_kl, reference.memory_bank_kl,
    differentiable=1, plan=_memory_bank_kl_plan, small=(3, 2, 5, 3), threads=((64, 4, 512, 50),),
    tiny=(4, 2, 33, 5), checked="CUB",
)

RECORDS: Dict[str, OpRecord] = {r.name: r for r in (
    PROTOTYPE_SCORES, PROTOTYPE_SCORES_FACTORED, COSINE_LOGITS, ATTRIBUTE_ATTENTION, ATTENTION_ROLLOUT, MEMORY_BANK_KL,
)}

SHAPES: Dict[str, Shapes] = {
    **{r.name: r.shapes for r in RECORDS.values()},
    # one ILPG training step (zslfast.models.ILPG): batch, classes, attributes, unseen classes
    "ilpg": _shapes(
        "B C K U",
        *((p.name, (50, p.num_classes, p.num_attributes, p.num_unseen)) for p in (AwA2, CUB, SUN)),
        ("large", (128, 1000, CUB.num_attributes, 250), SAME, True),
    ),
    # FSIGenZ / GenZSL preprocessing at SUN scale: unseen and seen classes, attributes, lambda values, features
    "generative": _shapes(
        "U S K P D",
        ("SUN", (SUN.num_unseen, SUN.num_classes - SUN.num_unseen, SUN.num_attributes, 20, RESNET_DIM)),
    ),
}


# ----------------------------------------------------------------------------------------------- model steps
# One training batch of each seed model on its frozen backbones' features (as ZSL code trains on cached features),
# seed 0: benchmarks/bench_ilpg.py, bench_sage.py, gpu_models.py and ``python -m zslfast bench --models`` time them.
SAGE_STEP = dict(batch=32, levels=3, tokens=VIT_TOKENS, dim=VIT_DIM, words=GLOVE_DIM)  # CUB on ViT-B/16 levels


def ilpg_step(case: str = "CUB", device=torch.device("cpu"), hidden_dim: int = HIDDEN, weights: str = "full"):
    """(ILPG model, its inputs) at SHAPES["ilpg"][case]: ResNet-101 regions (R=49, Dv=2048), DINOv2 ViT-S/14
    signatures (Dg=384), GloVe attribute vectors (Da=300), labels of seen classes; the dataset's loss preset."""
    from .models import ILPG

    B, C, K, U = SHAPES["ilpg"][case].on(torch.device(device))
    g = torch.Generator().manual_seed(0)
    s = torch.rand(C, K, generator=g)
    a = torch.randn(K, GLOVE_DIM, generator=g)
    torch.manual_seed(0)
    model = ILPG(s, a, region_dim=RESNET_DIM, signature_dim=DINO_DIM, hidden_dim=hidden_dim, weights=weights,
                 unseen_classes=torch.arange(C - U, C), preset=case if case in PRESETS else "CUB").to(device)
    inputs = dict(
        regions=torch.rand(B, REGIONS, RESNET_DIM, generator=g).to(device),
        signatures=torch.randn(B, DINO_DIM, generator=g).to(device),
        labels=torch.randint(0, C - U, (B,), generator=g).to(device),
    )
    return model, inputs


def sage_step(batch: int = SAGE_STEP["batch"], device=torch.device("cpu"), lambda_align: float = 0.1):
    """(SAGE model, its inputs) at CUB (C=200, K=312, 50 unseen): L=3 levels of ViT-B/16 hidden states at 224²
    (batch, 1+196, 768), GloVe-sized attribute word vectors (300), every loss on (lambda_align > 0)."""
    from .models import SAGE

    C, K, U = CUB.num_classes, CUB.num_attributes, CUB.num_unseen
    g = torch.Generator().manual_seed(0)
    s = torch.rand(C, K, generator=g)
    w = torch.randn(K, SAGE_STEP["words"], generator=g)
    torch.manual_seed(0)
    model = SAGE(s, None, attribute_word_embeddings=w, embed_dim=SAGE_STEP["dim"], lambda_align=lambda_align)
    inputs = dict(
        hidden_states=[torch.randn(batch, SAGE_STEP["tokens"], SAGE_STEP["dim"], generator=g).to(device)
                       for _ in range(SAGE_STEP["levels"])],
        labels=torch.randint(0, C - U, (batch,), generator=g).to(device),
    )
    return model.to(device).train(), inputs
