"""Memory bank speed: SAGE's class-wise bank update and the KL to its prototypes (Eq. 9), forward+backward.

    update   offer z (B, M, D) with labels y (B,) and confidences conf (B, M) to the (C, M, K, D) bank, FIFO
             (and min_conf, which has no vectorised eager form)
    kl       mean over active (b, m) of KL(softmax(z[b, m]) || softmax(protos[y[b], m])), gradient of z

update+prototypes: the update followed by the (C, M, D) prototypes a training step reads next (the eager code
averages the whole bank; zslfast runs MemoryBank.update (with its input checks) + prototypes()).
Implementations (the last test parameter, as benchmarks/summarize.py reads it):
    loop     what research code writes: a per-sample (update) / per-(b, m) F.kl_div (KL) Python loop
    eager    a vectorised eager PyTorch version (stable sort by queue + closed-form FIFO slots; batched
             log_softmax over a gathered (B, M, D) copy of the prototypes)
    compile  torch.compile of the eager version (the update's boolean indexing makes it graph-break)
    zslfast  the update kernel (marks the changed queues stale; prototypes() re-averages those) / memory_bank_kl
summarize.py's table shows eager / compile / zslfast; the loop rows are in the JSON (and in the report).
Shapes (C, M, D, K, B; zslfast.testing.SHAPES["memory_bank_kl"] and testing.BANK_CAPACITY): CUB-like
(200, 3, 768, 8, 128) and SUN-like (717, 3, 768, 8, 256); ViT-B features.
"""

import functools

import pytest
import torch

import zslfast
from zslfast import baselines, testing
from zslfast.tools import timing
from zslfast.tools.timing import compiled
from zslfast.ops.memory_bank import memory_bank_update
from conftest import DEVICE, cases, full_unless, run_benchmark, shape_of

KL = testing.RECORDS["memory_bank_kl"]
THRESHOLD = 0.5


def bank_shape(shape_name):
    """(C, M, D, K, B) of a memory_bank_kl case: its classes, slots, features, the bank capacity and its batch."""
    B, M, D, C = shape_of(KL.name, shape_name)
    return C, M, D, testing.BANK_CAPACITY, B


# --- update -----------------------------------------------------------------------------------------------------


eager_fifo_update = baselines.memory_bank_fifo_update


def make_update(shape):
    C, M, D, K, B = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(B, M, D, device=DEVICE, generator=g)
    y = torch.randint(0, C, (B,), device=DEVICE, generator=g)
    conf = torch.rand(B, M, device=DEVICE, generator=g)
    bank = zslfast.MemoryBank(C, M, K, D, threshold=THRESHOLD, device=DEVICE)
    return bank, z, y, conf


UPDATE_IMPLS = {
    "loop": lambda policy: functools.partial(baselines.memory_bank_update_loop, policy=policy),
    "eager": lambda policy: eager_fifo_update,
    "compile": lambda policy: compiled(eager_fifo_update),
}


@pytest.mark.parametrize("impl", ["loop", "eager", "compile", "zslfast"])
@pytest.mark.parametrize("policy", full_unless(lambda p: p == "fifo", "fifo", "min_conf"))
@pytest.mark.parametrize("shape_name", cases(KL.name))
def test_memory_bank_update(benchmark, shape_name, policy, impl):
    if policy == "min_conf" and impl in ("eager", "compile"):
        pytest.skip("min_conf has no vectorised eager form")
    shape = bank_shape(shape_name)
    C, M, D, K, B = shape
    benchmark.group = f"memory_bank update {policy} {shape_name} C,M,D,K,B={shape} {DEVICE.type}"
    bank, z, y, conf = make_update(shape)
    if impl == "zslfast":
        state = (bank.features, bank.confidences, bank.counts, bank.next_slot, bank.stale)
        fn = lambda: memory_bank_update(*state, z, y, conf, THRESHOLD, policy)  # noqa: E731
    else:
        update = UPDATE_IMPLS[impl](policy)
        state = (bank.features, bank.confidences, bank.counts, bank.next_slot)
        fn = lambda: update(*state, z, y, conf, THRESHOLD)  # noqa: E731
    run_benchmark(benchmark, fn, rounds=5 if impl == "loop" else None, warmup=1 if impl == "loop" else 2)


# --- KL -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["loop", *timing.IMPLEMENTATIONS])
@pytest.mark.parametrize("shape_name", cases(KL.name))
def test_memory_bank_kl(benchmark, shape_name, impl):
    """Half the (b, m) active; the gradient of z."""
    B, M, D, C = shape = shape_of(KL.name, shape_name)
    benchmark.group = f"memory_bank_kl {shape_name} B,C,M,D={(B, C, M, D)} fwd+bwd {DEVICE.type}"
    inputs = KL.make(shape, device=DEVICE, requires_grad=True)
    fn = baselines.memory_bank_kl_loop if impl == "loop" else timing.implementation(KL, impl)
    run_benchmark(benchmark, timing.step(fn, inputs), rounds=5 if impl == "loop" else None,
                  warmup=1 if impl == "loop" else 2, saved=(fn, inputs))


# --- one training step's bank work: update, then the prototypes the next KL reads ----------------------------------


def masked_means(features, counts):
    K = features.shape[2]
    stored = (torch.arange(K, device=features.device) < counts[..., None]).to(features.dtype)
    return (features * stored[..., None]).sum(dim=2) / counts.clamp_min(1)[..., None].to(features.dtype)


def eager_step(features, confidences, counts, next_slot, z, y, conf, threshold):
    eager_fifo_update(features, confidences, counts, next_slot, z, y, conf, threshold)
    return masked_means(features, counts)


def loop_step(features, confidences, counts, next_slot, z, y, conf, threshold):
    baselines.memory_bank_update_loop(features, confidences, counts, next_slot, z, y, conf, threshold)
    return masked_means(features, counts)


STEP_IMPLS = {"loop": lambda: loop_step, "eager": lambda: eager_step, "compile": lambda: compiled(eager_step)}


@pytest.mark.parametrize("impl", ["loop", "eager", "compile", "zslfast"])
@pytest.mark.parametrize("shape_name", cases(KL.name))
def test_memory_bank_update_and_prototypes(benchmark, shape_name, impl):
    """FIFO update followed by the (C, M, D) prototypes: eager code averages the whole bank, zslfast re-averages the
    queues the update changed (MemoryBank.prototypes())."""
    shape = bank_shape(shape_name)
    benchmark.group = f"memory_bank update+prototypes fifo {shape_name} C,M,D,K,B={shape} {DEVICE.type}"
    bank, z, y, conf = make_update(shape)
    if impl == "zslfast":

        def fn():
            bank.update(z, y, conf)
            return bank.prototypes()

    else:
        step = STEP_IMPLS[impl]()
        state = (bank.features, bank.confidences, bank.counts, bank.next_slot)
        fn = lambda: step(*state, z, y, conf, THRESHOLD)  # noqa: E731
    run_benchmark(benchmark, fn, rounds=5 if impl == "loop" else None, warmup=1 if impl == "loop" else 2)
