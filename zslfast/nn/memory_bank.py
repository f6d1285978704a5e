"""MemoryBank (SAGE's class-wise bank of confident branch features) and MemoryBankGuidedFusion (SAGE's MBGF).

MemoryBank(num_classes C, num_branches M, capacity K, dim D): one queue per (class, branch) of at most K features.
    update(z (B, M, D), y (B,), conf (B, M))   entry (b, m) offered to queue (y[b], m) when conf[b, m] > threshold,
                                               in batch order (policies and kernels: zslfast/ops/memory_bank.py)
    prototypes() -> (protos (C, M, D), valid (C, M) bool)   mean of each queue's stored entries; valid where any
State (buffers: saved by state_dict, moved by .to()): features (C, M, K, D), confidences (C, M, K), counts (C, M)
int64, next_slot (C, M) int64, stale (C, M) bool (queues changed since their mean was taken) and means (C, M, D)
(the prototypes; prototypes() refreshes the stale ones, so several updates cost one refresh).
Under torch.distributed (initialised with world size > 1, or a process_group given) update all-gathers every
rank's offers (sizes first, then z, y, conf padded to the largest batch) and applies them in rank order, then
batch order: every rank keeps an identical bank, equal to one bank fed the concatenated batch. The value checks
(labels in range, no NaN confidence) run on the gathered offers, so all ranks raise together, never one alone.

MemoryBankGuidedFusion (SAGE Eqs. 6-9), branch features Z (B, M, D), class embeddings a (C, D), labels y (B,):
    s[b, m]  = cos(Z[b, m], a[y[b]])                                  (Eq. 6)
    w[b]     = softmax_m(alpha * s[b])                                 (Eq. 7)
    Z[b]     = sum_m w[b, m] Z[b, m]                                   (Eq. 8)
    logits   = cosine_logits(Z, a, scale)                              (B, C)
    active[b, m] = (argmax logits[b] != y[b])                          the fused prediction is wrong
                   and max_{c != y[b]} cos(Z[b, m], a[c]) > s[b, m]    the branch prefers a wrong class
                   and queue (y[b], m) is non-empty
    kl_loss  = memory_bank_kl(kl_scale Z, kl_scale protos, y, active)  (Eq. 9 with a temperature 1/kl_scale,
                                                                        before this batch's update)
    then, in training mode only, the bank is offered the detached Z with confidence
    conf[b, m] = softmax_c(scale * cos(Z[b, m], a[c]))[y[b]]           (branch m's probability of the true class)
    (a branch whose feature holds NaN/inf has a NaN confidence: its offer is dropped, the rest still train)
Without labels (inference) there is no ground-truth class for Eq. 6: the weights use the class the branches
vote for, y_hat[b] = argmax_c sum_m cos(Z[b, m], a[c]) (one cosine_logits call, no extra pass over the classes);
kl_loss is 0 and active all False. With labels, eval mode computes the loss but leaves the bank untouched.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .._backend import check_module_backend
from .._enums import choices
from ..ops import cosine_logits as _cosine_spec, memory_bank as _bank_spec
from ..ops.cosine_logits import cosine_logits
from ..ops.memory_bank import check_offers, memory_bank_kl, memory_bank_refresh, memory_bank_update
from ..validation import (
    check_float_dtype, check_int, check_labels, check_number, check_option, check_positive, check_tensor, shape_str,
)

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch without distributed support
    dist = None


class MemoryBank(nn.Module):
    """Class-wise, branch-wise queues of confident features (SAGE's memory bank M_y^m), updated without Python loops.

    Args:
        num_classes: C.
        num_branches: M.
        capacity: K entries per (class, branch) queue.
        dim: D, the feature size.
        threshold: an entry is offered only when its confidence is strictly greater.
        policy: "fifo" (overwrite the oldest) or "min_conf" (when full, replace the least confident entry if the new
            one is more confident: SAGE's "retains only top-k high-confidence representations").
        device, dtype: of the stored features and confidences.
        process_group: the group to gather offers over; None uses the default group when torch.distributed is
            initialised with more than one rank.
        backend: None (by device), "reference" (the one-by-one Python loop), "cpu" or "cuda"; the bank's update has
            no Triton kernel, so "triton" raises BackendUnavailableError (set or switched, as every op does).
    Non-finite features are never stored: such entries are dropped (as if below the threshold).
    """

    def __init__(
        self,
        num_classes: int,
        num_branches: int,
        capacity: int,
        dim: int,
        *,
        threshold: float,
        policy: str = "fifo",
        device=None,
        dtype: torch.dtype = torch.float32,
        process_group=None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        C = check_int("MemoryBank", "num_classes", num_classes)
        M = check_int("MemoryBank", "num_branches", num_branches)
        K = check_int("MemoryBank", "capacity", capacity)
        D = check_int("MemoryBank", "dim", dim)
        check_option("MemoryBank", "policy", policy, choices("policy"))
        check_float_dtype("MemoryBank", "dtype", dtype)
        threshold = check_number("MemoryBank", "threshold", threshold)
        self.num_classes, self.num_branches, self.capacity, self.dim = C, M, K, D
        self.threshold = threshold
        self.policy = policy
        self.process_group = process_group
        self.backend = backend
        self.register_buffer("features", torch.zeros(C, M, K, D, device=device, dtype=dtype))
        self.register_buffer("confidences", torch.zeros(C, M, K, device=device, dtype=dtype))
        self.register_buffer("counts", torch.zeros(C, M, device=device, dtype=torch.int64))
        self.register_buffer("next_slot", torch.zeros(C, M, device=device, dtype=torch.int64))
        self.register_buffer("stale", torch.zeros(C, M, device=device, dtype=torch.bool))
        self.register_buffer("means", torch.zeros(C, M, D, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_branches={self.num_branches}, capacity={self.capacity}, "
            f"dim={self.dim}, threshold={self.threshold}, policy={self.policy!r}"
        )

    def _distributed_world(self) -> int:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            if self.process_group is not None:
                raise RuntimeError("MemoryBank: a process_group was given but torch.distributed is not initialised")
            return 1
        return dist.get_world_size(self.process_group)

    def _gather(self, z, y, conf):
        """Every rank's offers, rank 0's first, each rank's in batch order (padded all_gathers of z, y and conf)."""
        world = self._distributed_world()
        if world == 1:
            return z, y, conf
        from ..distributed import all_gather_rows_of

        return tuple(all_gather_rows_of((z, y, conf), self.process_group))

    @torch.no_grad()
    def update(self, z: torch.Tensor, y: torch.Tensor, conf: torch.Tensor) -> None:
        """Offer z (B, M, D) with labels y (B,) and confidences conf (B, M); B may be 0 (a rank with no offers)."""
        # The shapes here, the label values on the gathered offers (memory_bank_update): all ranks raise alike.
        check_offers("MemoryBank.update", self.features, z, y, conf, label_values=False)
        z, y, conf = self._gather(z.detach(), y, conf.detach())
        memory_bank_update(
            self.features, self.confidences, self.counts, self.next_slot, self.stale, z, y, conf,
            self.threshold, self.policy, backend=self.backend,
        )

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, backend: Optional[str]) -> None:
        self._backend = check_module_backend("MemoryBank", backend, (_bank_spec.UPDATE, _bank_spec.REFRESH))

    @torch.no_grad()
    def prototypes(self):
        """(protos (C, M, D), valid (C, M) bool): the mean of each queue's stored entries (0 where empty).

        protos is the bank's own buffer (no copy; the queues changed since the last call are re-averaged first): a
        later update changes it in place, clone it to keep it."""
        memory_bank_refresh(self.features, self.counts, self.stale, self.means, backend=self.backend)
        return self.means, self.counts > 0


class MBGFOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) scale * cos(fused, class_emb)
    fused: torch.Tensor  # (B, D) sum_m w_m Z_m
    kl_loss: torch.Tensor  # () memory-bank KL (Eq. 9), 0 without labels
    active: torch.Tensor  # (B, M) bool, the (sample, branch) pairs the KL applies to


class MemoryBankGuidedFusion(nn.Module):
    """SAGE's memory-bank-guided fusion (MBGF) over M branch features; see the module docstring for the math.

    forward(z (B, M, D), class_emb (C, D), labels (B,) or None) -> MBGFOutput(logits, fused, kl_loss, active).
    The bank (``self.bank``, a MemoryBank) is updated inside forward in training mode only, with detached
    features, after the KL is taken against the prototypes as they were before this batch.
    """

    def __init__(
        self,
        dim: int,
        num_branches: int,
        num_classes: int,
        capacity: int,
        *,
        threshold: float,
        alpha: float,
        scale: float,
        kl_scale: float = 1.0,
        policy: str = "fifo",
        backend: Optional[str] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        process_group=None,
    ):
        super().__init__()
        self.alpha = check_number("MemoryBankGuidedFusion", "alpha", alpha)
        self.scale = check_positive("MemoryBankGuidedFusion", "scale", scale)
        self.kl_scale = check_positive("MemoryBankGuidedFusion", "kl_scale", kl_scale)
        self.backend = backend
        self.bank = MemoryBank(
            num_classes, num_branches, capacity, dim, threshold=threshold, policy=policy, device=device,
            dtype=dtype, process_group=process_group, backend=backend,
        )

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, backend: Optional[str]) -> None:
        specs = (_cosine_spec.SPEC, _bank_spec.KL, _bank_spec.UPDATE, _bank_spec.REFRESH)
        self._backend = check_module_backend("MemoryBankGuidedFusion", backend, specs)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scale={self.scale}, kl_scale={self.kl_scale}"

    def forward(self, z: torch.Tensor, class_emb: torch.Tensor, labels: Optional[torch.Tensor] = None) -> MBGFOutput:
        op = "MemoryBankGuidedFusion"
        bank = self.bank
        C, M, D = bank.num_classes, bank.num_branches, bank.dim
        check_tensor(op, "z", z, (3,), "(B, M, D)")
        check_tensor(op, "class_emb", class_emb, (2,), "(C, D)")
        if z.shape[1:] != (M, D):
            raise ValueError(f"{op}: z must be (B, M, D) with M={M}, D={D}, got {shape_str(z)}")
        if class_emb.shape != (C, D):
            raise ValueError(f"{op}: class_emb must be (C, D) = ({C}, {D}), got {shape_str(class_emb)}")
        B = z.shape[0]
        backend = self.backend
        # Every branch against every class: the fusion weights, the branch failure test and the confidences.
        branch_cos = cosine_logits(z, class_emb, 1.0, backend=backend)  # (B, M, C)
        if labels is None:
            target = branch_cos.detach().sum(dim=1).argmax(dim=1)
        else:
            target = check_labels(op, "labels", labels, B, C).to(z.device)
        index = target[:, None, None].expand(B, M, 1)
        s = branch_cos.gather(2, index).squeeze(2)  # (B, M)
        w = torch.softmax(self.alpha * s, dim=1)
        fused = torch.einsum("bm,bmd->bd", w, z)
        logits = cosine_logits(fused, class_emb, self.scale, backend=backend)
        if labels is None:
            return MBGFOutput(logits, fused, z.new_zeros(()), torch.zeros(B, M, dtype=torch.bool, device=z.device))

        with torch.no_grad():
            cos_d = branch_cos.detach()
            wrong = logits.detach().argmax(dim=1) != target  # (B,)
            best_wrong = cos_d.scatter(2, index, float("-inf")).amax(dim=2)  # (B, M)
            branch_fails = best_wrong > s.detach()
            protos, valid = bank.prototypes()
            queue_ready = valid[target]  # (B, M)
            active = wrong[:, None] & branch_fails & queue_ready
        z_kl, protos = z, protos.to(z.dtype)
        if self.kl_scale != 1:  # the temperature of Eq. 9's two softmaxes
            z_kl, protos = z * self.kl_scale, protos * self.kl_scale
        kl_loss = memory_bank_kl(z_kl, protos, target, active, backend=backend)
        if self.training:
            with torch.no_grad():
                conf = torch.softmax(self.scale * cos_d, dim=2).gather(2, index).squeeze(2)
                # A branch with a NaN/inf feature has a NaN confidence, which the bank refuses from a caller; here
                # the confidence is ours, so that offer is dropped (-inf is never above the threshold).
                conf = torch.where(torch.isnan(conf), float("-inf"), conf)
                bank.update(z.detach(), target, conf)
        return MBGFOutput(logits, fused, kl_loss, active)
