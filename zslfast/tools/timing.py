"""The timers and memory figures every timing of zslfast goes through: ``python -m zslfast bench``, ``pytest
benchmarks/ --benchmark-only``, ``benchmarks/ab_*.py`` and ``python -m zslfast gpucheck``.

- time: ``median_ms`` (the median of synchronised wall-clock calls after warm-up calls), ``interleaved`` (the
  implementations alternate round by round, for A/B ratios on a machine whose speed drifts) and ``cuda_median_ms``
  (triton's do_bench: CUDA events, L2 flushed between calls; gpucheck's GPU figures);
- the model steps: ``model_variants`` (eager, compile, zslfast and torch.compile of the zslfast model, each its
  own copy of the weights) and ``training_step`` (one SGD step of such a variant);
- a training step of an op: ``step`` = forward, and with backward the gradients of every input that requires them for a fixed
  random output gradient made outside the timing;
- memory: ``peak_mib`` (what one call allocates at its peak beyond its inputs: the CUDA allocator's statistics on a
  GPU, the profiler's allocation events on CPU; zslfast.tools._memory) and ``saved_mib`` (what autograd keeps for
  the backward beyond the inputs);
- the implementations timed against each other: ``implementation(record, name)``, the eager baseline of an op's
  record (zslfast.testing), torch.compile of it, or the zslfast call. The cases and inputs are the records'.
"""

import copy
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from ._memory import peak_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

IMPLEMENTATIONS = ("eager", "compile", "zslfast")


def implementation(record, name: str) -> Callable:
    """The op of ``record`` (zslfast.testing.OpRecord) as ``fn(*inputs)``: "eager" (the papers' code), "compile"
    (torch.compile of eager, one per session: see ``compiled``) or "zslfast"."""
    if name not in IMPLEMENTATIONS:
        raise KeyError(f"{record.name}: no implementation {name!r}; there are {IMPLEMENTATIONS}")
    return compiled(record.eager) if name == "compile" else record.fused if name == "zslfast" else record.eager


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


MODEL_IMPLEMENTATIONS = ("eager", "compile", "zslfast", "zslfast+compile")


def model_variants(fused: torch.nn.Module, names: Sequence[str] = MODEL_IMPLEMENTATIONS, **compile_options) -> Dict:
    """name -> (model, forward) for a model with ``set_backend`` (ILPG, SAGE): "eager" (a copy on the reference
    ops, the papers' code), "compile" (torch.compile of such a copy), "zslfast" (a copy on the fused ops) and
    "zslfast+compile" (torch.compile of such a copy); ``compile_options`` go to torch.compile (e.g. ``mode``).

    Each variant owns its copy of the weights, and its forward is that copy's (compiled or not): the training
    step updates the parameters its forward reads (``training_step(model, inputs, forward)``)."""
    unknown = set(names) - set(MODEL_IMPLEMENTATIONS)
    if unknown:
        raise KeyError(f"no model implementation {sorted(unknown)}; there are {MODEL_IMPLEMENTATIONS}")
    out = {}
    for name in names:
        model = copy.deepcopy(fused)
        if not name.startswith("zslfast"):
            model.set_backend("reference")
        out[name] = (model, torch.compile(model, **compile_options) if name.endswith("compile") else None)
    return out


def training_step(model: torch.nn.Module, inputs: Dict, forward: Optional[Callable] = None) -> Callable:
    """One SGD step of a model whose output has ``.loss`` (ILPG, SAGE): ``forward(**inputs)`` (default the model;
    torch.compile of that same model: see ``model_variants``), backward, update of ``model``'s parameters; returns
    the loss. A ``forward`` whose parameters are not ``model``'s is refused (its step would update nothing)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if forward is not None and forward is not model:
        own = getattr(forward, "_orig_mod", forward)
        if isinstance(own, torch.nn.Module) and own is not model:
            raise ValueError("training_step: forward must be model or torch.compile(model): the step updates model's "
                             "parameters, which another module's forward does not read")
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
    the median ms of each and zslfast's per-round speed-up over each other one (median, min, max), and that of
    "zslfast+compile" over "compile" where both are timed (a model compiled on zslfast ops against compile alone).

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
    if "compile" in fns and "zslfast+compile" in fns:  # torch.compile of the zslfast model against compile alone
        ratios = [a / b for a, b in zip(times["compile"], times["zslfast+compile"])]
        print(f"  zslfast+compile speed-up vs compile: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    return medians

