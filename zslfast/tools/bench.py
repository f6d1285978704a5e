"""zslfast's one benchmark harness, and ``python -m zslfast bench``.

What it measures, for everything that times zslfast (``python -m zslfast bench``, ``pytest benchmarks/
--benchmark-only``, ``benchmarks/ab_*.py``, ``python -m zslfast gpucheck``) and the shapes the audit compiles
(``python -m zslfast audit``):

- time: ``median_ms`` (the median of synchronised wall-clock calls after warm-up calls), ``interleaved`` (the
  implementations alternate round by round, for A/B ratios on a machine whose speed drifts) and ``cuda_median_ms``
  (triton's do_bench: CUDA events, L2 flushed between calls; gpucheck's GPU figures);
- a training step: ``step`` = forward, and with backward the gradients of every input that requires them for a fixed
  random output gradient made outside the timing;
- memory: ``peak_mib`` (what one call allocates at its peak beyond its inputs: the CUDA allocator's statistics on a
  GPU, the profiler's allocation events on CPU; zslfast.tools._memory) and ``saved_mib`` (what autograd keeps for the
  backward beyond the inputs);
- the cases: ``SHAPES``, the one table of shapes, per op the papers' shapes named by dataset (CUB C=200 K=312 at
  B=50, SUN C=717 K=102, AwA2 C=50 K=85, from zslfast.data.PRESETS; ViT-B/16 L=12 H=12 N=197 at 224^2, N=577 at
  384^2) and a large one, each with its shape on a GPU and on CPU tensors (smaller where the GPU shape takes
  minutes on 2 cores, none where it is GPU-only); and ``OPS``, per op the inputs' factory, the eager baseline
  (zslfast.baselines), torch.compile of it and the zslfast call.

``python -m zslfast bench`` prints a table of each op's forward + backward time (median of ``--repeats`` calls) and
peak extra memory at the papers' shapes on the current device, eager against zslfast; ``--compile`` adds
torch.compile of the eager code (its first call compiles, outside the timing). The benchmark suite is
``pytest benchmarks/ --benchmark-only`` (a quick set, one paper shape per op; ``--full`` for every case).
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

import zslfast

from .. import _backend, available_backends, baselines
from ._memory import peak_bytes
from ..data import PRESETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

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

    def named(self, device: torch.device = DEVICE) -> Dict[str, int]:
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


def _att(preset, batch):  # attribute_attention over one dataset's attribute queries and ResNet regions
    return (batch, preset.num_attributes, REGIONS, GLOVE_DIM, GLOVE_DIM)


SHAPES: Dict[str, Shapes] = {
    # logits[b, c] = sum_k e[b, k] s[c, k] (1 + w[b, c, k]): ILPG's IDPP + APC
    "prototype_scores": _shapes(
        "B C K",
        ("AwA2", (50, AwA2.num_classes, AwA2.num_attributes)),
        ("CUB", (50, CUB.num_classes, CUB.num_attributes)),
        ("SUN-B64", (64, SUN.num_classes, SUN.num_attributes)),
        ("large", (256, 1000, CUB.num_attributes), SAME, True),
    ),
    # w = h @ u: the factored IDPP weights of hidden size J, up to ImageNet-21K's classes
    "prototype_scores_factored": _shapes(
        "B C K J",
        ("CUB-J64", (50, CUB.num_classes, CUB.num_attributes, HIDDEN)),
        ("21K-classes", (256, IMAGENET21K_CLASSES, GLOVE_DIM, HIDDEN), SAME, True),
    ),
    # scale * cos(x[n], protos[c]): SVIP/SAGE-style cosine heads on ViT-B features
    "cosine_logits": _shapes(
        "N C D",
        ("AwA2", (64, AwA2.num_classes, VIT_DIM)),
        ("CUB", (64, CUB.num_classes, VIT_DIM)),
        ("SUN", (64, SUN.num_classes, VIT_DIM)),
        ("21K-classes", (256, IMAGENET21K_CLASSES, VIT_DIM), (256, IMAGENET21K_CLASSES, GLOVE_DIM), True),
    ),
    # ILPG's AVL: attribute queries over ResNet regions (R=49, GloVe D=300) or ViT-B tokens against CUB's attributes
    "attribute_attention": _shapes(
        "B K R D Dv",
        ("CUB", _att(CUB, 64)),
        ("AwA2", _att(AwA2, 64)),
        ("SUN", _att(SUN, 64)),
        ("ViT-CUB", (64, CUB.num_attributes, VIT_TOKENS, VIT_DIM, VIT_DIM)),
        ("ViT-CUB-384", (16, CUB.num_attributes, VIT_TOKENS_384, VIT_DIM, VIT_DIM), None, False),
        ("large", _att(CUB, 256), None, True),
    ),
    # SVIP's rollout of ViT-B/16's attention maps
    "attention_rollout": _shapes(
        "L B H N",
        ("ViT-B-224-B8", (VIT_LAYERS, 8, VIT_HEADS, VIT_TOKENS)),
        ("ViT-B-224-batch", (VIT_LAYERS, 64, VIT_HEADS, VIT_TOKENS), (VIT_LAYERS, 32, VIT_HEADS, VIT_TOKENS), False),
        ("ViT-B-384", (VIT_LAYERS, 16, VIT_HEADS, VIT_TOKENS_384), (VIT_LAYERS, 8, VIT_HEADS, VIT_TOKENS_384), False),
        ("large", (VIT_LAYERS, 256, VIT_HEADS, VIT_TOKENS), None, True),
    ),
    # SAGE's memory bank on ViT-B features: KL to the class prototypes (and the bank update: + BANK_CAPACITY)
    "memory_bank_kl": _shapes(
        "B M D C",
        ("CUB", (128, BANK_SLOTS, VIT_DIM, CUB.num_classes)),
        ("SUN", (256, BANK_SLOTS, VIT_DIM, SUN.num_classes)),
    ),
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


# ---------------------------------------------------------------------------------------------------- the ops
def _generator(device):
    return torch.Generator(device=device).manual_seed(0)


def _randn(g, device, *shape):
    return torch.randn(*shape, device=device, generator=g)


def _grad(tensors, requires_grad):
    return [t.requires_grad_(requires_grad) for t in tensors]


def _make_prototype_scores(shape, device, requires_grad):
    B, C, K = shape
    g = _generator(device)
    return _grad([_randn(g, device, *dims) for dims in ((B, K), (C, K), (B, C, K))], requires_grad)


def _make_prototype_scores_factored(shape, device, requires_grad):
    B, C, K, J = shape
    g = _generator(device)
    e, s, h = (_randn(g, device, *dims) for dims in ((B, K), (C, K), (B, J)))
    return _grad([e, s, h, _randn(g, device, J, C, K) * 0.05], requires_grad)


def _make_cosine_logits(shape, device, requires_grad):
    N, C, D = shape
    g = _generator(device)
    scale = torch.tensor(10.0, device=device)  # learnable, as in SVIP/SAGE
    return _grad([_randn(g, device, N, D), _randn(g, device, C, D), scale], requires_grad)


def _make_attribute_attention(shape, device, requires_grad):
    B, K, R, D, Dv = shape
    g = _generator(device)
    return _grad([_randn(g, device, *dims) for dims in ((K, D), (B, R, D), (B, R, Dv), (K, Dv))], requires_grad)


def _make_attention_rollout(shape, device, requires_grad):
    L, B, H, N = shape
    g = _generator(device)
    return _grad([_randn(g, device, B, H, N, N).softmax(-1) for _ in range(L)], requires_grad)


def _make_memory_bank_kl(shape, device, requires_grad, active_fraction=0.5):
    B, M, D, C = shape
    g = _generator(device)
    z = _randn(g, device, B, M, D).requires_grad_(requires_grad)
    protos = _randn(g, device, C, M, D)
    labels = torch.randint(0, C, (B,), device=device, generator=g)
    active = torch.rand(B, M, device=device, generator=g) < active_fraction
    return [z, protos, labels, active]


def _eager_rollout(*attns):
    return baselines.attention_rollout(attns)


def _fused_rollout(*attns):
    return zslfast.attention_rollout(list(attns))


@dataclass(frozen=True)
class Op:
    """One op: its cases, its inputs, the papers' eager code, torch.compile of it and zslfast's call. Every callable
    takes the inputs as ``fn(*inputs)``."""

    name: str
    make: Callable  # (shape, device, requires_grad) -> inputs (seed 0); requires_grad on the differentiable ones
    eager: Callable  # the papers' code, from zslfast.baselines
    fused: Callable  # zslfast's op

    @property
    def shapes(self) -> Shapes:
        return SHAPES[self.name]

    @property
    def cases(self) -> Dict[str, Case]:
        return self.shapes.cases

    def implementation(self, name: str) -> Callable:
        """"eager", "compile" (torch.compile of eager, one per session: see ``compiled``) or "zslfast"."""
        if name not in IMPLEMENTATIONS:
            raise KeyError(f"{self.name}: no implementation {name!r}; there are {IMPLEMENTATIONS}")
        return compiled(self.eager) if name == "compile" else self.fused if name == "zslfast" else self.eager


IMPLEMENTATIONS = ("eager", "compile", "zslfast")

OPS: Dict[str, Op] = {op.name: op for op in (
    Op("prototype_scores", _make_prototype_scores, baselines.prototype_scores, zslfast.prototype_scores),
    Op("prototype_scores_factored", _make_prototype_scores_factored, baselines.prototype_scores_factored,
       zslfast.prototype_scores_factored),
    Op("cosine_logits", _make_cosine_logits, baselines.cosine_logits, zslfast.cosine_logits),
    Op("attribute_attention", _make_attribute_attention, baselines.attribute_attention, zslfast.attribute_attention),
    Op("attention_rollout", _make_attention_rollout, _eager_rollout, _fused_rollout),
    Op("memory_bank_kl", _make_memory_bank_kl, baselines.memory_bank_kl, zslfast.memory_bank_kl),
)}

_compiled: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), one compiled object per function for the whole session (compile once, time many)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


# ----------------------------------------------------------------------------------------- steps and memory
def _differentiable(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def step(fn: Callable, inputs: Sequence, backward: bool = True, more: Sequence[Sequence] = ()) -> Callable:
    """One call of ``fn(*inputs)``; with ``backward``, also the gradients of every input that requires them, as a
    training step needs, for a fixed random output gradient shaped like the output (made by the first call: warm up
    before timing, as every timer here does).

    ``more``: further input sets, shaped like ``inputs``; successive calls then cycle through all of them (a step
    that reads more than the L2 cache holds). A forward-only step on inputs that require gradients runs under
    torch.no_grad()."""
    if backward:
        grad_out = []

        def call(s, wrt):
            out = fn(*s)
            if not grad_out:
                grad_out.append(torch.randn_like(out))
            return torch.autograd.grad(out, wrt, grad_out[0])
    elif _differentiable(inputs):
        def call(s, wrt):
            with torch.no_grad():
                return fn(*s)
    else:
        call = lambda s, wrt: fn(*s)  # noqa: E731
    if not more:
        wrt = _differentiable(inputs)
        return lambda: call(inputs, wrt)
    pairs, turn = [(s, _differentiable(s)) for s in (inputs, *more)], [0]

    def rotating():
        turn[0] = (turn[0] + 1) % len(pairs)
        return call(*pairs[turn[0]])

    return rotating


def training_step(model: torch.nn.Module, inputs: Dict, forward: Optional[Callable] = None) -> Callable:
    """One SGD step of a model whose output has ``.loss`` (ILPG, SAGE): ``forward(**inputs)`` (default the model;
    torch.compile of it, or of a reference-ops copy sharing nothing), backward, update; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    forward = model if forward is None else forward

    def step():
        loss = forward(**inputs).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.detach()

    return step


def peak_mib(fn: Callable, device: torch.device = DEVICE) -> float:
    """Extra memory one call of ``fn`` needs at its peak, in MiB (zslfast.tools._memory.peak_bytes)."""
    return peak_bytes(fn, device) / 2**20


def saved_mib(fn: Callable, inputs: Sequence) -> float:
    """MiB of the distinct storages autograd saves for the backward of ``fn(*inputs)``, the inputs' own not counted."""
    own = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(storages.values()) / 2**20


# ---------------------------------------------------------------------------------------------------- timing
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synchronised(fn: Callable) -> Callable:
    """``fn`` followed by a CUDA synchronisation (where there is a GPU), so that a timer sees its kernels' end."""

    def call():
        out = fn()
        sync()
        return out

    return call


def call_seconds(fn: Callable, calls: int):
    """Wall-clock seconds of each of ``calls`` synchronised calls of ``fn`` (the one clock of every figure here)."""
    timed = synchronised(fn)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        timed()
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn: Callable, repeats: int = 10, warmup: int = 1) -> float:
    """Median ms of ``repeats`` synchronised calls of ``fn`` after ``warmup`` untimed ones."""
    call_seconds(fn, warmup)
    return 1e3 * statistics.median(call_seconds(fn, repeats))


def cuda_median_ms(fn: Callable) -> float:
    """triton.testing.do_bench's median ms (CUDA events, the L2 flushed between calls): GPU only."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def interleaved(title: str, fns: Dict[str, Callable], rounds: int = 11, calls: int = 5, warmup: int = 3):
    """Alternate the implementations ``fns`` (name -> callable) each round, ``calls`` timed calls per round, and print
    the median ms of each and zslfast's per-round speed-up over each other one (median, min, max).

    On a machine whose speed drifts between minutes, timing each implementation in its own block (as
    pytest-benchmark does) skews ratios; alternating them round by round does not. Used by the benchmarks'
    ``python benchmarks/<file>.py ...`` entry points.
    """
    for fn in fns.values():
        call_seconds(fn, warmup)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(statistics.median(call_seconds(fn, calls)))
    medians = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
    print(f"{title} median ms: {medians}")
    for other in fns:
        if other == "zslfast":
            continue
        ratios = [a / b for a, b in zip(times[other], times["zslfast"])]
        print(f"  zslfast speed-up vs {other}: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    return medians


# ---------------------------------------------------------------------------------------- python -m zslfast bench
def cases(device: torch.device = DEVICE):
    """(title, op, case, shape on ``device``) of every op at the papers' shapes that run on ``device``."""
    for op in OPS.values():
        for case in op.shapes.papers():
            shape = case.on(device)
            if shape is not None:
                yield f"{op.name} {case.label(shape)}", op, case, shape


DESCRIPTION = """\
Time each op's forward+backward (the median of --repeats calls) and measure its peak extra memory at the papers'
shapes (CUB, SUN, AwA2, ViT-B) on this machine's device, eager PyTorch code (the papers') against zslfast;
--compile adds torch.compile of the eager code (its first call compiles, outside the timing). The timings state
the threads and the machine's load: on a busy machine they are not reliable.
The full suite, with every shape, the forward alone and the summary table: pytest benchmarks/ --benchmark-only"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import matching, positive_int

    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager code")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per case (their median)")
    parser.add_argument("--only", default="", metavar="TEXT", type=matching([title for title, *_ in cases()], "case"),
                        help="run only the cases whose title contains TEXT, e.g. 'prototype_scores CUB'")


def run(args: argparse.Namespace) -> None:
    from ._cli import timing_conditions

    device = DEVICE
    selected = [c for c in cases(device) if args.only in c[0]]
    info = _backend.BUILD_INFO
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    print(f"zslfast on torch {torch.__version__}")
    print(f"extension: {'built for torch ' + info.TORCH_VERSION + (', with CUDA kernels' if info.WITH_CUDA else ', CPU only') if info else _backend.EXTENSION_ERROR}")
    print(f"backends for {device.type} tensors: {', '.join(available_backends(device))}")
    print(timing_conditions(device) + "\n")

    width = max([52] + [len(title) for title, *_ in selected])
    header = (f"{'forward+backward':{width}s} {'eager ms':>9s} " + (f"{'compile':>9s} " if args.compile else "")
              + f"{'zslfast':>9s} {'speed-up':>9s} {'eager MiB':>10s} {'zslfast MiB':>12s}")
    print(header)
    for title, op, case, shape in selected:
        inputs = op.make(shape, device, True)
        eager_step, fused_step = step(op.eager, inputs), step(op.fused, inputs)
        eager_ms = median_ms(eager_step, args.repeats)
        row = f"{title:{width}s} {eager_ms:9.3f} "
        if args.compile:
            torch._dynamo.reset()  # compile for this shape, as the benchmarks do
            row += f"{median_ms(step(compiled(op.eager), inputs), args.repeats):9.3f} "
        fused_ms = median_ms(fused_step, args.repeats)
        eager_mib, fused_mib = (peak_mib(s, device) for s in (eager_step, fused_step))
        print(row + f"{fused_ms:9.3f} {eager_ms / fused_ms:8.2f}x {eager_mib:10.1f} {fused_mib:12.1f}", flush=True)
    print("\n" + timing_conditions(device, busy_self=torch.get_num_threads() if device.type == "cpu" else 1))


def main(argv=None):
    from . import _cli

    return _cli.main("python -m zslfast bench", DESCRIPTION, add_arguments, run, argv)
