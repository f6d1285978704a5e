"""Training losses of ILPG (Eq. 7-12) and SVIP (Eq. 6 and 13), written so that ILPG's never build S_W.

ILPG notation (shapes): e = E~ (B, K) visual attribute scores, s = S (C, K) static class prototypes (class
attribute vectors), w = IDPP weights W: None, (B, K) (per instance and attribute) or (B, C, K) (per instance,
class and attribute); S_W[b, c] = w[b, c] * s[c] + s[c] (Eq. 5); logits (B, C) = <e[b], S_W[b, c]> (Eq. 6, what
``zslfast.prototype_scores(e, s, w)`` computes); labels (B,) int class ids, 0-based; unseen_classes (U,) ids.
The label rows S_W^(y)[b] = w[b, y_b] * s[y_b] + s[y_b] (B, K) are gathered directly: the (B, C, K) S_W is
never formed (the only (B, C, K) tensor is w's own gradient, which autograd needs anyway).

    ipm_loss(logits, labels)                        Eq. 7   mean_b CE(logits[b], y_b)
    sas_loss(logits, labels, s, unseen_classes)     Eq. 8-9 mean_b -sum_{c in unseen} a[y_b, c] log softmax(logits[b])_c
                                                            a[y, c] = (1 + cos(s[y], s[c])) / 2 (constants: no gradient)
    vsr_loss(e, s, w, labels)                       Eq. 10  mean_b ||e[b] - S_W^(y)[b]||^2
    pcr_loss(s, w, labels, tau)                     Eq. 11  mean_b CE(<S_W^(y)[b], s[i]> / tau over classes i, y_b)
    ILPGLoss(lambda_sas, lambda_vsr, lambda_pcr, tau, unseen_classes)   Eq. 12, the weighted sum; from_preset(...)

The paper writes Eq. 7, 9 and 10 as sums over the training samples; here every loss is a mean over the batch
(so a loss value does not scale with the batch size, and Eq. 12's lambdas weight per-sample averages). Eq. 9 sums
over the unseen classes, kept here (``sas_class_reduction="mean"`` divides by their number instead).

SAGE:
    attention_alignment(attn_a, attn_b, scale_a, scale_b)   Eq. 5 per row n: KL(p || q) + KL(q || p) =
                                                    sum (p - q)(log p - log q), p = scale_a attn_a, q = scale_b attn_b

SVIP:
    jsd_loss(logits_a, logits_b)                    Eq. 13  0.5 KL(p_a || p_b) + 0.5 KL(p_b || p_a), batch mean
    patch_bce_loss(patch_logits, pseudo_labels, mask=None)   Eq. 6   per-image mean BCE over patches, batch mean

All work in log space (log_softmax, BCE with logits), so large logits give finite losses and gradients. An empty
batch (B = 0) gives a zero loss with zero gradients, as memory_bank_kl does with nothing active, never the NaN of
an empty mean; empty class or attribute dimensions are an error.
Shape and label checks raise ValueError/TypeError naming the argument; the data-dependent ones (label range,
pseudo-labels in [0, 1]) are skipped under torch.compile, where they would force a graph break.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .validation import (
    check_class_ids, check_labels, check_number, check_option, check_positive, check_scale, check_tensor, compiling,
    shape_str,
)

# ILPG Eq. 12 weights from the paper's experiments (main text for CUB, Appendix G for SUN and AwA2).
ILPG_LOSS_WEIGHTS = {
    "CUB": {"lambda_sas": 0.05, "lambda_vsr": 0.005, "lambda_pcr": 0.05},
    "SUN": {"lambda_sas": 0.3, "lambda_vsr": 0.01, "lambda_pcr": 0.4},
    "AwA2": {"lambda_sas": 0.4, "lambda_vsr": 0.005, "lambda_pcr": 0.01},
}
# ILPG gives no value for the PCR temperature (its analysis only needs tau in (0, 2]); 0.1 is the usual
# contrastive choice and puts <S_W^(y), S^(i)> of unit-norm class vectors (xlsa17 att) on a logit scale of ~10.
DEFAULT_TAU = 0.1


def _check_float(fn: str, name: str, t, ndim: int, layout: str, batched: bool = True) -> None:
    """A floating tensor of ``ndim`` dims; only its batch dim (the first, when ``batched``) may be empty."""
    check_tensor(fn, name, t, (ndim,), layout, allow_empty=True)
    if 0 in t.shape[1 if batched else 0:]:
        raise ValueError(f"{fn}: {name} {layout} may be empty only in its batch dimension, got shape {shape_str(t)}")


def _check_labels(fn: str, labels, batch: int, num_classes: int) -> torch.Tensor:
    return check_labels(fn, "labels", labels, batch, num_classes)


def _check_w(fn: str, w, batch: int, num_classes: int, dim: int) -> None:
    if w is None:
        return
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{fn}: w must be None or a floating-point tensor (B, K) or (B, C, K)")
    if w.shape not in ((batch, dim), (batch, num_classes, dim)):
        raise ValueError(
            f"{fn}: w must be None, (B, K) = ({batch}, {dim}) or (B, C, K) = ({batch}, {num_classes}, {dim}), "
            f"got shape {shape_str(w)}"
        )


def _check_unseen(fn: str, unseen_classes, num_classes: int, device) -> torch.Tensor:
    return check_class_ids(fn, "unseen_classes", unseen_classes, num_classes, device)


def label_prototypes(s: torch.Tensor, w: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """S_W^(y) rows (B, K): w[b, y_b] * s[y_b] + s[y_b] (w (B, C, K)), w[b] * s[y_b] + s[y_b] (w (B, K)) or s[y_b]
    (w None), gathered without forming S_W (B, C, K)."""
    s_y = s[labels]
    if w is None:
        return s_y
    w_y = w if w.dim() == 2 else w[torch.arange(labels.shape[0], device=labels.device), labels]
    return torch.addcmul(s_y, w_y, s_y)


# ----------------------------------------------------------------------------------------------------- ILPG


def _batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """The mean over every element, and 0 over none: an empty batch gives a zero loss whose gradients are zero
    (it stays connected to the graph), never the NaN of an empty mean."""
    return per_sample.sum() / max(per_sample.numel(), 1)


def _ipm(logits, labels):
    return _batch_mean(F.cross_entropy(logits, labels, reduction="none"))


def _sas(logits, labels, s, unseen, class_reduction):
    unit = F.normalize(s.detach(), dim=1, eps=1e-12)
    # Eq. 8's reachability weights gate the loss; they are constants (no gradient into s through them).
    reach = 0.5 * (1.0 + unit[labels] @ unit[unseen].T)  # (B, U)
    log_p = torch.log_softmax(logits, dim=1)[:, unseen]
    per_sample = -(reach.to(log_p.dtype) * log_p).sum(dim=1)
    if class_reduction == "mean":
        per_sample = per_sample / unseen.numel()
    return _batch_mean(per_sample)


def _vsr(e, s, w, labels):
    return _batch_mean((e - label_prototypes(s, w, labels)).pow(2).sum(dim=1))


def _pcr(s, w, labels, tau):
    return _batch_mean(F.cross_entropy(label_prototypes(s, w, labels) @ s.T / tau, labels, reduction="none"))


def ipm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ILPG Eq. 7, instance-prototype matching: cross-entropy of the APC logits (B, C), mean over the batch."""
    _check_float("ipm_loss", "logits", logits, 2, "(B, C)")
    labels = _check_labels("ipm_loss", labels, logits.shape[0], logits.shape[1])
    return _ipm(logits, labels)


def sas_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    s: torch.Tensor,
    unseen_classes,
    class_reduction: str = "sum",
) -> torch.Tensor:
    """ILPG Eq. 8-9, semantic-aware self-calibration.

    loss = mean_b [ -sum_{c in unseen} a[y_b, c] * log softmax(logits[b])_c ],  a[y, c] = (1 + cos(s[y], s[c])) / 2.
    logits (B, C) APC logits over all classes, labels (B,) (seen-class samples), s (C, K) static prototypes,
    unseen_classes (U,) ids. The weights a are computed from s without gradient. The sum over the unseen classes
    follows Eq. 9; ``class_reduction="mean"`` averages over them instead.
    """
    check_option("sas_loss", "class_reduction", class_reduction, ("sum", "mean"))
    _check_float("sas_loss", "logits", logits, 2, "(B, C)")
    _check_float("sas_loss", "s", s, 2, "(C, K)", batched=False)
    if s.shape[0] != logits.shape[1]:
        raise ValueError(f"sas_loss: logits (B, C) = {shape_str(logits)} and s (C, K) = {shape_str(s)} disagree on C")
    labels = _check_labels("sas_loss", labels, logits.shape[0], logits.shape[1])
    unseen = _check_unseen("sas_loss", unseen_classes, logits.shape[1], logits.device)
    return _sas(logits, labels, s, unseen, class_reduction)


def vsr_loss(e: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """ILPG Eq. 10, visual-semantic residual alignment: mean_b ||e[b] - S_W^(y)[b]||_2^2 (squared norm summed over
    the K attributes, mean over the batch). e (B, K), s (C, K), w None/(B, K)/(B, C, K): only w[b, y_b] is read."""
    _check_float("vsr_loss", "e", e, 2, "(B, K)")
    _check_float("vsr_loss", "s", s, 2, "(C, K)", batched=False)
    if e.shape[1] != s.shape[1]:
        raise ValueError(f"vsr_loss: e (B, K) = {shape_str(e)} and s (C, K) = {shape_str(s)} disagree on K")
    _check_w("vsr_loss", w, e.shape[0], s.shape[0], s.shape[1])
    labels = _check_labels("vsr_loss", labels, e.shape[0], s.shape[0])
    return _vsr(e, s, w, labels)


def pcr_loss(
    s: torch.Tensor, w: Optional[torch.Tensor], labels: torch.Tensor, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """ILPG Eq. 11, prototype contrast refinement:
    mean_b -log( exp(<S_W^(y)[b], s[y_b]> / tau) / sum_i exp(<S_W^(y)[b], s[i]> / tau) ).
    s (C, K), w None/(B, K)/(B, C, K), labels (B,); the positive is the static prototype of the label, the
    negatives every other static prototype."""
    _check_float("pcr_loss", "s", s, 2, "(C, K)", batched=False)
    check_scale("pcr_loss", "tau", tau, s.device)
    if w is not None and not isinstance(w, torch.Tensor):
        raise TypeError("pcr_loss: w must be None or a floating-point tensor (B, K) or (B, C, K)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"pcr_loss: labels must be a torch.Tensor (B,), got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"pcr_loss: labels must be (B,), got shape {shape_str(labels)}")
    batch = labels.shape[0]
    _check_w("pcr_loss", w, batch, s.shape[0], s.shape[1])
    labels = _check_labels("pcr_loss", labels, batch, s.shape[0])
    return _pcr(s, w, labels, tau)


class ILPGLoss(nn.Module):
    """ILPG Eq. 12: L = IPM + lambda_sas SAS + lambda_vsr VSR + lambda_pcr PCR (each a batch mean, see above).

    ``unseen_classes`` (ids, 0-based) enable SAS; None skips it (its part is 0), and while lambda_sas > 0 the first
    forward warns once, naming ``unseen_classes`` (the paper's ablation: CUB's H 75.6 -> 48.0 without SAS); give
    lambda_sas=0 to train without SAS knowingly. ``forward(logits, labels, e, s,
    w=None)`` -> (total, {"ipm", "sas", "vsr", "pcr"}: the unweighted parts). Terms whose lambda is 0 are not
    computed. ``ILPGLoss.from_preset("CUB"|"SUN"|"AwA2")`` uses the paper's lambdas; tau defaults to 0.1 (the
    paper gives none).
    """

    def __init__(
        self,
        lambda_sas: float = 0.05,
        lambda_vsr: float = 0.005,
        lambda_pcr: float = 0.05,
        tau: float = DEFAULT_TAU,
        unseen_classes=None,
        sas_class_reduction: str = "sum",
    ):
        super().__init__()
        fn = "ILPGLoss"
        self.tau = check_positive(fn, "tau", tau)
        check_option(fn, "sas_class_reduction", sas_class_reduction, ("sum", "mean"))
        self.lambda_sas = check_number(fn, "lambda_sas", lambda_sas, minimum=0)
        self.lambda_vsr = check_number(fn, "lambda_vsr", lambda_vsr, minimum=0)
        self.lambda_pcr = check_number(fn, "lambda_pcr", lambda_pcr, minimum=0)
        self.sas_class_reduction = sas_class_reduction
        # The range is checked against C at the first forward (C is not known here).
        unseen = None if unseen_classes is None else check_class_ids(fn, "unseen_classes", unseen_classes, None)
        self.register_buffer("unseen_classes", unseen, persistent=False)
        self._unseen_checked_for = None
        self._warned_no_unseen = False

    @classmethod
    def from_preset(cls, name: str, *, tau: float = DEFAULT_TAU, unseen_classes=None, **overrides) -> "ILPGLoss":
        """The paper's lambdas for "CUB", "SUN" or "AwA2" (case-insensitive); ``overrides`` replace any of them."""
        key = getattr(name, "name", name)  # a zslfast.data preset, or its name
        known = {k.lower(): k for k in ILPG_LOSS_WEIGHTS}
        if not isinstance(key, str) or key.lower() not in known:
            raise ValueError(f"unknown dataset preset {name!r}; known presets: {', '.join(ILPG_LOSS_WEIGHTS)}")
        weights = dict(ILPG_LOSS_WEIGHTS[known[key.lower()]])
        unknown = set(overrides) - set(weights) - {"sas_class_reduction"}
        if unknown:
            raise TypeError(f"ILPGLoss.from_preset: unexpected arguments {sorted(unknown)}")
        weights.update(overrides)
        return cls(tau=tau, unseen_classes=unseen_classes, **weights)

    def extra_repr(self) -> str:
        unseen = "None" if self.unseen_classes is None else f"{self.unseen_classes.numel()} classes"
        return (
            f"lambda_sas={self.lambda_sas}, lambda_vsr={self.lambda_vsr}, lambda_pcr={self.lambda_pcr}, "
            f"tau={self.tau}, unseen_classes={unseen}"
        )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        e: torch.Tensor,
        s: torch.Tensor,
        w: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict]:
        fn = "ILPGLoss"
        _check_float(fn, "logits", logits, 2, "(B, C)")
        _check_float(fn, "e", e, 2, "(B, K)")
        _check_float(fn, "s", s, 2, "(C, K)", batched=False)
        batch, num_classes = logits.shape
        if s.shape[0] != num_classes or e.shape != (batch, s.shape[1]):
            raise ValueError(
                f"{fn}: shapes disagree: logits (B, C) = {shape_str(logits)}, e (B, K) = {shape_str(e)}, "
                f"s (C, K) = {shape_str(s)}"
            )
        _check_w(fn, w, batch, num_classes, s.shape[1])
        labels = _check_labels(fn, labels, batch, num_classes)

        if self.unseen_classes is None and self.lambda_sas and not self._warned_no_unseen:
            self._warned_no_unseen = True
            warnings.warn(
                f"{fn}: unseen_classes=None, so the SAS term (Eq. 9, lambda_sas={self.lambda_sas}) is skipped; give "
                f"unseen_classes (e.g. ILPG(..., unseen_classes=ids)), or lambda_sas=0 to train without SAS",
                UserWarning, stacklevel=3,
            )
        zero = logits.new_zeros(())
        parts = {"ipm": _ipm(logits, labels), "sas": zero, "vsr": zero, "pcr": zero}
        total = parts["ipm"]
        if self.unseen_classes is not None and self.lambda_sas:
            unseen = self.unseen_classes.to(logits.device)
            if not compiling() and self._unseen_checked_for != num_classes:  # once, not a host sync every step
                _check_unseen(fn, unseen, num_classes, logits.device)
                self._unseen_checked_for = num_classes
            parts["sas"] = _sas(logits, labels, s, unseen, self.sas_class_reduction)
            total = total + self.lambda_sas * parts["sas"]
        if self.lambda_vsr:
            parts["vsr"] = _vsr(e, s, w, labels)
            total = total + self.lambda_vsr * parts["vsr"]
        if self.lambda_pcr:
            parts["pcr"] = _pcr(s, w, labels, self.tau)
            total = total + self.lambda_pcr * parts["pcr"]
        return total, parts


# ----------------------------------------------------------------------------------------------------- SAGE


class _AttentionAlignment(torch.autograd.Function):
    """sum over all but dim 0 of (p - q)(log p - log q), p = sa·a, q = sb·b, logs of max(., tiny).

    Autograd of the plain expression would keep five map-sized tensors (p, q, both logs, their difference) for the
    backward; this keeps a and b only (the attention maps, alive anyway) and recomputes the rest:
        d/dp = (log p - log q) + [p >= tiny] (p - q) / max(p, tiny)
        d/dq = -(log p - log q) - [q >= tiny] (p - q) / max(q, tiny)      ([·] as clamp_min's own backward)"""

    @staticmethod
    def forward(ctx, a, b, scale_a, scale_b):
        tiny = torch.finfo(a.dtype).tiny
        p, q = a * scale_a, b * scale_b
        log_ratio = p.clamp_min(tiny).log_().sub_(q.clamp_min(tiny).log_())
        ctx.save_for_backward(a, b)
        ctx.scales = (scale_a, scale_b)
        return log_ratio.mul_(p - q).flatten(1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        scale_a, scale_b = ctx.scales
        tiny = torch.finfo(a.dtype).tiny
        p, q = a * scale_a, b * scale_b
        p_safe, q_safe = p.clamp_min(tiny), q.clamp_min(tiny)
        log_ratio = p_safe.log().sub_(q_safe.log())
        diff = p - q
        g = grad.reshape(-1, *([1] * (a.dim() - 1)))
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.where(p >= tiny, diff / p_safe, 0.0).add_(log_ratio).mul_(g * scale_a)
        if ctx.needs_input_grad[1]:
            grad_b = torch.where(q >= tiny, diff / q_safe, 0.0).add_(log_ratio).mul_(g * -scale_b)
        return grad_a, grad_b, None, None


def attention_alignment(attn_a: torch.Tensor, attn_b: torch.Tensor, scale_a: float = 1.0, scale_b: float = 1.0):
    """SAGE Eq. 5 per row: the symmetric KL between p = scale_a·attn_a and q = scale_b·attn_b, distributions over
    all their dims but the first: (n, ...) maps -> (n,). The scales normalise each map (SAGE: a VSA map sums to K
    over its (attribute, patch) entries, an SVA map to R). Probabilities under the float's smallest normal count as
    that (finite logs). Differentiable in both maps; keeps only the two maps for the backward."""
    for name, t in (("attn_a", attn_a), ("attn_b", attn_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise TypeError(f"attention_alignment: {name} must be a floating-point tensor (n, ...)")
    if attn_a.shape != attn_b.shape:
        raise ValueError(
            f"attention_alignment: attn_a {shape_str(attn_a)} and attn_b {shape_str(attn_b)} must have one shape"
        )
    scale_a = check_positive("attention_alignment", "scale_a", scale_a)
    scale_b = check_positive("attention_alignment", "scale_b", scale_b)
    return _AttentionAlignment.apply(attn_a, attn_b, scale_a, scale_b)


# ----------------------------------------------------------------------------------------------------- SVIP


def jsd_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, mode: str = "eq13") -> torch.Tensor:
    """SVIP Eq. 13: divergence between the class distributions of the two passes (original / contextualised
    patches), softmax over the last dim, summed over classes, mean over every other dim.

    mode "eq13" (default, the formula as the paper prints it): 0.5 KL(p_a || p_b) + 0.5 KL(p_b || p_a)
        = 0.5 sum_c (p_a - p_b)(log p_a - log p_b), symmetric, unbounded.
    mode "mixture" (the textbook Jensen-Shannon divergence the paper names): 0.5 KL(p_a || m) + 0.5 KL(p_b || m),
        m = (p_a + p_b) / 2, bounded by log 2.
    Both are computed from log_softmax (log m by logaddexp), finite for any finite logits.
    """
    for name, t in (("logits_a", logits_a), ("logits_b", logits_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            raise TypeError(f"jsd_loss: {name} must be a floating-point tensor (..., C)")
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"jsd_loss: logits_a {shape_str(logits_a)} and logits_b {shape_str(logits_b)} must have one shape (..., C)"
        )
    check_option("jsd_loss", "mode", mode, ("eq13", "mixture"))
    log_a = torch.log_softmax(logits_a, dim=-1)
    log_b = torch.log_softmax(logits_b, dim=-1)
    if mode == "eq13":
        per_row = 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(dim=-1)
    else:
        log_m = torch.logaddexp(log_a, log_b) - math.log(2.0)
        per_row = 0.5 * ((log_a.exp() * (log_a - log_m)).sum(dim=-1) + (log_b.exp() * (log_b - log_m)).sum(dim=-1))
    return _batch_mean(per_row)


def patch_bce_loss(
    patch_logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    probabilities: bool = False,
) -> torch.Tensor:
    """SVIP Eq. 6: L_patch = -(1/N) sum_i [r_i log r^_i + (1 - r_i) log(1 - r^_i)], per image, then mean over B.

    patch_logits (B, N): the patch classifier's outputs before the sigmoid (r^_i = sigmoid(logit), computed as
    BCE-with-logits, stable for large logits); ``probabilities=True`` takes r^_i directly (logs clamped at -100 as
    torch's BCELoss does). pseudo_labels (B, N): r_i in [0, 1] (e.g. normalised attention rollout) or bool (top-M
    selection). mask (B, N) bool/0-1, optional: patches that count; each image averages over its own valid
    patches and images with none are left out of the batch mean (0 if no image has any).
    """
    _check_float("patch_bce_loss", "patch_logits", patch_logits, 2, "(B, N)")
    if not isinstance(pseudo_labels, torch.Tensor):
        raise TypeError(
            f"patch_bce_loss: pseudo_labels must be a torch.Tensor (B, N), got {type(pseudo_labels).__name__}"
        )
    if pseudo_labels.shape != patch_logits.shape:
        raise ValueError(
            f"patch_bce_loss: pseudo_labels must be (B, N) = {shape_str(patch_logits)} like patch_logits, "
            f"got shape {shape_str(pseudo_labels)}"
        )
    target = pseudo_labels.to(patch_logits.dtype)
    if not compiling() and pseudo_labels.dtype != torch.bool and target.numel():
        lo, hi = float(target.min()), float(target.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"patch_bce_loss: pseudo_labels must lie in [0, 1], got values in [{lo}, {hi}]")
    if probabilities:
        per_patch = F.binary_cross_entropy(patch_logits, target, reduction="none")
    else:
        per_patch = F.binary_cross_entropy_with_logits(patch_logits, target, reduction="none")
    if mask is None:
        return _batch_mean(per_patch)
    if not isinstance(mask, torch.Tensor) or mask.shape != patch_logits.shape:
        raise ValueError(
            f"patch_bce_loss: mask must be a (B, N) = {shape_str(patch_logits)} tensor, "
            f"got {shape_str(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    keep = mask.bool()
    count = keep.sum(dim=1).to(per_patch.dtype)
    # where, not a product: a masked-out patch contributes exactly 0 whatever its logit.
    per_image = torch.where(keep, per_patch, per_patch.new_zeros(())).sum(dim=1) / count.clamp_min(1.0)
    return per_image.sum() / (count > 0).sum().clamp_min(1).to(per_image.dtype)
