"""memory_bank: SAGE's class-wise bank of confident features (update) and the KL to its prototypes (SAGE Eq. 9).

Bank state (zslfast.MemoryBank's buffers), C classes, M branches, K = capacity slots, D features:
    features (C, M, K, D), confidences (C, M, K), counts (C, M) int64 (entries stored, always in slots
    0..counts-1), next_slot (C, M) int64 (FIFO write head), stale (C, M) bool (queues changed since their mean was
    taken), means (C, M, D) = mean of the stored entries (0 where none), valid where not stale.

memory_bank_update(state..., z (N, M, D), y (N,), conf (N, M), threshold, policy), in place:
    entry (n, m) is offered to queue (y[n], m) when conf[n, m] > threshold (conf cast to the bank's dtype first)
    and z[n, m] is finite (non-finite features are dropped, never stored); offers arrive in batch order. NaN
    confidences and out-of-range labels are a ValueError in eager mode; under torch.compile (no host sync in
    the graph) an entry with a NaN confidence or label outside [0, C) is not stored.
    fifo      written at next_slot, overwriting the oldest once full
    min_conf  appended while not full; when full, replaces the least confident stored entry (the first such slot
              on ties) only if strictly more confident (next_slot is left as it is)
    Kernels sort the accepted entries stably by queue id y * M + m and process each queue's segment on its own:
    FIFO in closed form (only the last K of a segment survive, at slots (head + i) % K), min_conf sequentially per
    segment, segments in parallel; no atomics, deterministic, equal to offering the entries one by one.
    Every queue that changed is marked stale. Backends: "cpu" (csrc/cpu/memory_bank.cpp), "cuda"
    (csrc/cuda/memory_bank.cu), "reference" (the one-by-one Python loop of zslfast/reference.py, which marks every
    queue stale). No autograd (the bank holds detached features).

memory_bank_refresh(features, counts, stale, means), in place: means[q] = mean of queue q's stored slots for the
    stale queues, stale cleared. Kept apart from the update so the means (K * D reads per queue, the update's
    largest cost otherwise) are taken once per step, when read (MemoryBank.prototypes()), however many updates ran.

memory_bank_kl(z (B, M, D), protos (C, M, D), labels (B,), active (B, M) bool) -> loss ():
    P = softmax(z[b, m]), Q = softmax(protos[labels[b], m]), softmax over D
    (SAGE Eq. 9: L_kl^m = KL[softmax(Z_m) || softmax(Z~_y^m)])
    KL(P || Q) = sum_d P_d (log P_d - log Q_d)
    loss = sum_{active (b, m)} KL(P || Q) / max(#active, 1)            (0, with a zero gradient, when none is active)
    grad_z[b, m] = P * (log P - log Q - KL(P || Q)) / #active for active (b, m), 0 elsewhere
                   (a softmax backward: the kernels take it as P ((a - a_t) - sum_d P_d (a_d - a_t)), a = log P -
                   log Q, t the arg-max of z, exact where P is near one-hot: attribute_attention's "saturation")
    The prototypes are a constant: no gradient flows to protos (they are detached). Note that the common idiom
    F.kl_div(F.log_softmax(z), F.softmax(proto)) computes the reverse direction, KL(Q || P); this op follows Eq. 9.
    Fused: each program/row reads protos[labels[b], m] in place (no (B, M, D) gathered copy), takes both
    log-softmaxes, the KL and its gradient in one pass; the forward returns d loss / dz along with the loss (it is
    a scalar loss, so the backward only scales it by the incoming grad; no double backward: that gradient is a
    constant to autograd). Backends "cpu" (C++), "triton", "reference".
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._enums import choices
from ..validation import (
    check_labels, check_number, check_option, check_same_device, check_tensor, compiling, promote, shape_str,
)
from ._spec import OpSpec, compiled_kernel, define, triton_kernel

OP_UPDATE = "memory_bank_update"
OP_KL = "memory_bank_kl"


def _update_reference(features, confidences, counts, next_slot, stale, z, y, conf, threshold, policy):
    reference.memory_bank_update(features, confidences, counts, next_slot, z, y, conf, threshold, policy)
    stale.fill_(True)


def _update_fake(features, confidences, counts, next_slot, stale, z, y, conf, threshold, policy, backend):
    return None


UPDATE = define(OpSpec(
    name=OP_UPDATE,
    schema="(Tensor(a!) features, Tensor(b!) confidences, Tensor(c!) counts, Tensor(d!) next_slot,"
    " Tensor(e!) stale, Tensor z, Tensor y, Tensor conf, float threshold, str policy, str backend) -> ()",
    kernels={"cpu": compiled_kernel("_memory_bank_update"), "cuda": compiled_kernel("_memory_bank_update")},
    reference=_update_reference,
    gpu_preference=("cuda",),
    fake=_update_fake,
    autocast=None,
))


def _refresh_reference(features, counts, stale, means):
    means.copy_(reference.memory_bank_prototypes(features, counts))
    stale.fill_(False)


def _refresh_fake(features, counts, stale, means, backend):
    return None


REFRESH = define(OpSpec(
    name="memory_bank_refresh",
    schema="(Tensor features, Tensor counts, Tensor(a!) stale, Tensor(b!) means, str backend) -> ()",
    kernels={"cpu": compiled_kernel("_memory_bank_refresh"), "cuda": compiled_kernel("_memory_bank_refresh")},
    reference=_refresh_reference,
    gpu_preference=("cuda",),
    fake=_refresh_fake,
    autocast=None,
))


def _kl_fake(z, protos, labels, active, output_mask, backend):
    # The kernels return a contiguous gradient whatever z's strides, hence new_empty, not empty_like.
    return z.new_empty(()), z.new_empty(z.shape if output_mask[0] else (0,))


def _kl_reference(z, protos, labels, active, output_mask):
    return reference.memory_bank_kl(z, protos, labels, active), None


def _kl_setup_context(ctx, inputs, output):
    z, protos, labels, active, output_mask, backend = inputs
    _, grad_z = output
    ctx.mark_non_differentiable(grad_z)
    if output_mask[0]:
        ctx.save_for_backward(grad_z)
    else:  # called without the gradient yet differentiated (opcheck does): the backward computes it then
        ctx.save_for_backward(z, protos, labels, active)
    ctx.has_grad = output_mask[0]
    ctx.backend = backend


def _kl_backward(ctx, grad_loss, _grad_grad_z):
    if ctx.has_grad:
        (grad_z,) = ctx.saved_tensors
    else:
        z, protos, labels, active = ctx.saved_tensors
        _, grad_z = KL.op(z, protos, labels, active, [True], ctx.backend)
    return grad_z * grad_loss, None, None, None, None, None


KL = define(OpSpec(
    name=OP_KL,
    schema="(Tensor z, Tensor protos, Tensor labels, Tensor active, bool[1] output_mask, str backend)"
    " -> (Tensor, Tensor)",
    # output_mask[0]: the kernels also return d loss / dz (z is the only differentiable input)
    kernels={"cpu": compiled_kernel("_memory_bank_kl"), "triton": triton_kernel("memory_bank", "kl_forward")},
    reference=_kl_reference,
    gpu_preference=("triton",),
    fake=_kl_fake,
    backward=_kl_backward,
    setup_context=_kl_setup_context,
    autocast="fp32",  # a softmax/KL loss: PyTorch's autocast runs those in fp32 too
))


def memory_bank_kl(
    z: torch.Tensor,
    protos: torch.Tensor,
    labels: torch.Tensor,
    active: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SAGE Eq. 9: mean over the active (b, m) of ``KL(softmax(z[b, m]) || softmax(protos[labels[b], m]))``.

    ``KL(P || Q) = sum_d P_d (log P_d - log Q_d)``, softmax over the feature dim D, P from the branch features z,
    Q from the class prototype of the branch. 0 (with zero gradient, no NaN) when nothing is active, B = 0 included;
    an inactive (b, m) never reaches the loss or a gradient, whatever z[b, m] holds (NaN, inf). The gradient
    flows to z only: protos is treated as a constant (detached), as the bank is.

    Args:
        z: (B, M, D) branch features.
        protos: (C, M, D) per-(class, branch) prototypes, e.g. ``MemoryBank.prototypes()[0]``.
        labels: (B,) integer class labels in [0, C).
        active: (B, M) bool, which (sample, branch) pairs the loss averages over.
        backend: None (by device, or ``ZSLFAST_BACKEND``), "reference", "cpu" or "triton".
    Returns:
        () loss in the common dtype of z and protos.
    """
    check_tensor(OP_KL, "z", z, (3,), "(B, M, D)", allow_empty=True)
    check_tensor(OP_KL, "protos", protos, (3,), "(C, M, D)")
    if 0 in z.shape[1:]:
        raise ValueError(f"{OP_KL}: z (B, M, D) may be empty only in its batch dimension, got shape {shape_str(z)}")
    B, M, D = z.shape
    C = protos.shape[0]
    if protos.shape[1:] != z.shape[1:]:
        raise ValueError(
            f"{OP_KL}: protos (C, M, D) must have M={M}, D={D} to match z (B, M, D) {shape_str(z)}, "
            f"got protos {shape_str(protos)}"
        )
    labels = check_labels(OP_KL, "labels", labels, B, C)
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"{OP_KL}: active must be a bool torch.Tensor (B, M), got {type(active).__name__}")
    if active.dtype != torch.bool:
        raise TypeError(f"{OP_KL}: active must be a bool tensor (B, M), got dtype {active.dtype}")
    if active.shape != (B, M):
        raise ValueError(
            f"{OP_KL}: active must be (B, M) = ({B}, {M}) to match z {shape_str(z)}, got {shape_str(active)}"
        )
    device = check_same_device(OP_KL, z=z, protos=protos, labels=labels, active=active)
    z, protos = promote(z, protos)
    protos = protos.detach()
    which = KL.resolve(backend, device)
    if B == 0:  # the losses' rule (zslfast/losses.py): an empty batch gives 0, with zero gradients
        return z.sum()
    compute_grad = torch.is_grad_enabled() and z.requires_grad
    loss, _ = KL(which, z, protos, labels, active, [compute_grad])
    return loss


def check_offers(fn: str, features: torch.Tensor, z, y, conf, label_values: bool = True) -> torch.Tensor:
    """Offers to a bank of ``features`` (C, M, K, D): z (B, M, D) and conf (B, M) floating, y (B,) integer labels
    in [0, C) (values checked when ``label_values``), all on the bank's device; B may be 0. Returns y as int64."""
    C, M, _, D = features.shape
    for name, t, layout in (("z", z, "(B, M, D)"), ("conf", conf, "(B, M)")):
        check_tensor(fn, name, t, (3,) if name == "z" else (2,), layout, allow_empty=True)
    if z.shape[1:] != (M, D):
        raise ValueError(f"{fn}: z must be (B, M, D) with M={M}, D={D}, got shape {shape_str(z)}")
    B = z.shape[0]
    if conf.shape != (B, M):
        raise ValueError(f"{fn}: conf must be (B, M) = ({B}, {M}) to match z {shape_str(z)}, got shape {shape_str(conf)}")
    y = check_labels(fn, "y", y, B, C, values=label_values)
    for name, t in (("z", z), ("y", y), ("conf", conf)):
        if t.device != features.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the bank is on {features.device}")
    return y


def memory_bank_update(
    features: torch.Tensor,
    confidences: torch.Tensor,
    counts: torch.Tensor,
    next_slot: torch.Tensor,
    stale: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    conf: torch.Tensor,
    threshold: float,
    policy: str = "fifo",
    *,
    backend: Optional[str] = None,
) -> None:
    """Offer z (B, M, D) with labels y (B,) and confidences conf (B, M) to the bank state, in place (see the module
    docstring); z and conf are cast to the bank's dtype. The state is zslfast.MemoryBank's buffers."""
    y = check_offers(OP_UPDATE, features, z, y, conf)
    check_option(OP_UPDATE, "policy", policy, choices("policy"))
    check_number(OP_UPDATE, "threshold", threshold)
    # Eager only, as check_labels' value check: under torch.compile a host sync would break the graph, and a NaN
    # confidence is never above the threshold, so the kernels store nothing of it.
    if not compiling() and bool(torch.isnan(conf).any()):
        raise ValueError(f"{OP_UPDATE}: conf {shape_str(conf)} holds NaN confidences")
    which = UPDATE.resolve(backend, features.device)
    if z.shape[0] == 0:
        return
    z = z.detach().to(features.dtype)
    conf = conf.detach().to(confidences.dtype)
    UPDATE(which, features, confidences, counts, next_slot, stale, z, y, conf, float(threshold), policy)


def memory_bank_refresh(
    features: torch.Tensor,
    counts: torch.Tensor,
    stale: torch.Tensor,
    means: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> None:
    """means (C, M, D) = the mean of each stale queue's stored entries, in place; stale cleared."""
    REFRESH(REFRESH.resolve(backend, features.device), features, counts, stale, means)
