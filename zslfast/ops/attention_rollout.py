"""attention_rollout: attention aggregated across ViT layers (SVIP's patch pseudo-labels), CLS row in O(L·N²).

    attns     (L, B, H, N, N) tensor, or a sequence of L tensors (B, H, N, N), first layer first
    F^l       = fuse_h(A^l)                       (B, N, N), head_fusion "mean" | "sum" | "max" | "min"
    discard   (discard_ratio > 0) F^l <- F^l with, per instance b, the k = int(N*N*discard_ratio) smallest entries of
              F^l[b] flattened to N*N (torch.topk(k, largest=False), its ties) set to 0, except flat index 0 (CLS->CLS,
              never discarded, so fewer than k may go): vit-explain's ``rollout(discard_ratio=...)``, which zeroes
              instance 0 alone with every instance's indices pooled; here each instance has its own. The selection is
              not differentiated: discarded entries get gradient 0. discard_ratio in [0, 1), 0 = none (the default).
    abnar     A'^l = (F^l + I) / rowsum(F^l + I)  (each row divided by its own sum), R = A'^L ... A'^1
              (Abnar & Zuidema 2020; SVIP's released code; Chefer et al.'s baseline: ``result = a @ result``;
              vit-explain's ``(A + I) / 2`` then row normalisation is the same map)
              normalize "none": A'^l = F^l + I, no division (Transformer-Explainability's ``compute_rollout_attention``
              on relevance maps whose rows do not sum to 1); "row" (the default) as above
    residual  W^1 = F^1, W^l = W^(l-1) + W^(l-1) F^l                                (SVIP paper Eq. 4)
              never normalises: normalize must be "row" (the default); "none" is a ValueError, not a silent no-op
    out       row 0 of R (or W^L): (B, N), index 0 included, when cls_only; else the full (B, N, N)
Layers before ``start_layer`` are skipped. Callers take ``out[:, 1:]`` (or ``[:, num_prefix_tokens:]``) for
the patch scores.

Row normalisation: vit-explain writes ``a / a.sum(dim=-1)`` without keepdim, which broadcasts the row sums
along the last axis, so for B=1 it divides *columns* by row sums, and for B>1 it fails. zslfast divides rows.

CLS row (``cls_only=True``, the registered op ``zslfast::attention_rollout_cls``): row 0 of a product of
matrices is a vector walked through them, ``v <- v M^l`` with ``v = e_0``, so no N x N product is ever formed:
abnar walks the layers from last to first with ``M = A'``; residual walks first to last with ``M^1 = F^1`` and
``M^l = I + F^l``. Head fusion, identity and normalisation happen as each map is read, once (O(L·H·N²) reads,
O(B·N) writes), in C++ (CPU) or Triton (GPU); normalize "none" is the kernels' flag dropping r. With
discard_ratio > 0 the maps are fused and discarded in PyTorch first (the top-k is a data-dependent selection over
the whole map) and reach the kernels as one head, (B, 1, N, N) with fusion "sum", so the kernels know nothing of it;
autograd takes the gradient from the kernels' F back through the discard and the fusion. The vectors entering each
step, states (L, B, N), are saved; the backward walks the steps in reverse with PyTorch ops, one layer's (B, N, N)
at a time:

    grad_v_in = M g,   grad_M[i, j] = v_in[i] g[j]
    abnar ("row"):   grad_F[i, j] = v_in[i] / r_i * (g[j] - (M g)[i]),   r_i = 1 + sum_j F[i, j]
    abnar ("none"), residual:  grad_F[i, j] = v_in[i] g[j]   (M = F + I, or F: no r)
    fusion:    mean -> grad_F / H to every head, sum -> grad_F, max/min -> grad_F to the selected head

NaN: max/min fusion propagates a NaN head (torch.max/amax's rule) in every backend, and the selected head of the
backward is torch.max/min(dim)'s index, the first NaN head where there is one, so the gradient reaches the head whose
NaN the forward passed on. A NaN reaches the outputs the reference's full products reach: the kernels' first step
reads row 0 of its map only (the reference selects row 0 of R), later steps every row, zero weight or not. Where
the output depends on the NaN, gradients are NaN where the reference's are. A NaN in a row that first map never
reads leaves the output finite everywhere; the backward then gives that row alone a NaN gradient in abnar (v / r =
0 / NaN) and none in residual, while the reference's autograd, through its full products (0 * NaN), makes gradients NaN there and in
every earlier layer of that instance: the one case where the backends' NaN differ from the reference's.

Full matrix (``cls_only=False``): batched GEMMs (torch.bmm) layer by layer (:class:`RolloutFold`, which
zslfast.nn's rollout of a running ViT folds with too), the same for every kernel backend.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import reference
from ..reference import discard_lowest
from ..validation import accumulator_dtype, check_flag, check_rollout_options, check_start_layer, promote, shape_str
from ._spec import OpSpec, compiled_kernel, define, triton_kernel

OP = "attention_rollout"


# ----------------------------------------------------------------------------------------------------------------
# Head fusion and the fold: the one implementation, used by the op's backward and full-matrix path and by
# zslfast.nn.rollout's rollout of a running ViT (which fuses the heads of each block as it runs).


def fuse_heads(a: torch.Tensor, head_fusion: str):
    """(B, H, N, N) -> (fused (B, N, N), index): index (B, N, N) of the selected head for max/min, else None."""
    if head_fusion == "max":
        return a.max(dim=1)
    if head_fusion == "min":
        return a.min(dim=1)
    return (a.mean(dim=1) if head_fusion == "mean" else a.sum(dim=1)), None


def unfuse_heads(grad_fused: torch.Tensor, index, head_fusion: str, like: torch.Tensor) -> torch.Tensor:
    """Gradient of the head fusion: (B, N, N) -> (B, H, N, N)."""
    B, H, N, _ = like.shape
    if head_fusion in ("max", "min"):
        grad = torch.zeros((B, H, N, N), dtype=grad_fused.dtype, device=grad_fused.device)
        return grad.scatter_(1, index[:, None], grad_fused[:, None]).to(like.dtype)
    if head_fusion == "mean":
        grad_fused = grad_fused / H
    return grad_fused[:, None].expand(B, H, N, N).to(like.dtype)


class RolloutFold:
    """Folds the head-fused maps T^l (B, N, N), first layer first, into R (abnar), W or w (residual);
    ``result()`` is what ``attention_rollout`` returns for them. Each T^l is discarded first when discard_ratio > 0
    (the whole map: the top-k runs over all N*N entries, also for residual's cls_only row). Without autograd, abnar's
    identity and row normalisation happen in place on T^l (the caller's fused map, which it no longer needs, or the
    discard's new one)."""

    def __init__(self, mode: str, cls_only: bool, discard_ratio: float = 0.0, normalize: str = "row"):
        self.mode = mode
        self.cls_only = cls_only
        self.discard_ratio = discard_ratio
        self.row_norm = normalize == "row"
        self.state: Optional[torch.Tensor] = None

    def fold(self, t: torch.Tensor) -> None:
        if self.discard_ratio > 0:
            t = discard_lowest(t, self.discard_ratio)
        in_place = not (torch.is_grad_enabled() and t.requires_grad)
        if self.mode == "abnar":
            if in_place:  # same values as t + eye: off-diagonal entries + 0 are exact
                a = t
                a.diagonal(dim1=-2, dim2=-1).add_(1)
                if self.row_norm:
                    a /= a.sum(dim=-1, keepdim=True)
            else:
                a = t + torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
                if self.row_norm:
                    a = a / a.sum(dim=-1, keepdim=True)
            del t
            self.state = a if self.state is None else a @ self.state
        elif self.cls_only:  # residual, row 0 only: w <- w + w T
            if self.state is None:
                self.state = t[:, 0].clone()  # not a view: T^s itself need not stay alive
            else:
                self.state = self.state + (self.state.unsqueeze(1) @ t).squeeze(1)
        else:
            self.state = t if self.state is None else self.state + self.state @ t

    def result(self) -> torch.Tensor:
        if self.mode == "abnar" and self.cls_only:
            return self.state[:, 0]
        return self.state


# ----------------------------------------------------------------------------------------------------------------
# The registered op: the CLS row as a vector chain.


def _forward_fake(attns, mode, head_fusion, normalize, backend):
    L = len(attns)
    B, _, N, _ = attns[0].shape
    return attns[0].new_empty((B, N)), attns[0].new_empty((L, B, N), dtype=accumulator_dtype(attns[0].dtype))


def _reference(attns, mode, head_fusion, normalize):
    return reference.attention_rollout(attns, mode, head_fusion, 0, True, 0.0, normalize), None


def _setup_context(ctx, inputs, output):
    attns, mode, head_fusion, normalize, _ = inputs
    ctx.save_for_backward(*attns, output[1])
    ctx.mode, ctx.head_fusion = mode, head_fusion
    ctx.row_norm = mode == "abnar" and normalize == "row"
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_states):
    *attns, states = ctx.saved_tensors
    L = len(attns)
    abnar = ctx.mode == "abnar"
    g = grad_out.to(states.dtype)
    grads = [None] * L
    for l in (range(L) if abnar else range(L - 1, -1, -1)):  # the forward's steps in reverse
        fused, index = fuse_heads(attns[l].to(states.dtype), ctx.head_fusion)
        v_in = states[l]
        # F g as a product and a row sum, not torch.bmm: a multithreaded GEMV (MKL's at B = 1, N = 577) splits its
        # reduction by thread count, a row sum over N with more than one row never does.
        f_g = (fused * g[:, None, :]).sum(-1)
        if abnar and ctx.row_norm:
            r = fused.sum(-1) + 1
            m_g = (f_g + g) / r
            grad_fused = (v_in / r)[:, :, None] * (g[:, None, :] - m_g[:, :, None])
            g = m_g
        elif abnar:  # M = F + I: residual's step with the identity in every layer
            grad_fused = v_in[:, :, None] * g[:, None, :]
            g = f_g + g
        else:
            grad_fused = v_in[:, :, None] * g[:, None, :]
            g = f_g + g if l > 0 else f_g
        grads[l] = unfuse_heads(grad_fused, index, ctx.head_fusion, attns[l])
    return grads, None, None, None, None


SPEC = define(OpSpec(
    name="attention_rollout_cls",
    schema="(Tensor[] attns, str mode, str head_fusion, str normalize, str backend) -> (Tensor, Tensor)",
    kernels={  # GPU: Triton (no CUDA C++ kernel)
        "cpu": compiled_kernel("_attention_rollout_cls_fwd"),
        "triton": triton_kernel("attention_rollout", "forward"),
    },
    reference=_reference,
    gpu_preference=("triton",),
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
    autocast=None,  # the maps' own dtype: the kernels accumulate in fp32, and a cast would copy L maps
))


def _check_layers(attns) -> list[torch.Tensor]:
    if isinstance(attns, torch.Tensor):
        if attns.dim() != 5:
            raise ValueError(
                f"{OP}: attns must be (L, B, H, N, N) or a sequence of L tensors (B, H, N, N), "
                f"got a {attns.dim()}-D tensor of shape {shape_str(attns)}"
            )
        layers = list(attns.unbind(0))
    elif isinstance(attns, (list, tuple)):
        layers = list(attns)
    else:
        raise TypeError(f"{OP}: attns must be a tensor (L, B, H, N, N) or a list of tensors (B, H, N, N), got {type(attns).__name__}")
    if not layers:
        raise ValueError(f"{OP}: attns holds no layers")
    for l, a in enumerate(layers):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{OP}: attns[{l}] must be a tensor (B, H, N, N), got {type(a).__name__}")
        if not a.is_floating_point():
            raise TypeError(f"{OP}: attns[{l}] must be a floating-point tensor (B, H, N, N), got dtype {a.dtype}")
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"{OP}: attns[{l}] must be (B, H, N, N) with square maps, got shape {shape_str(a)}")
        if 0 in a.shape:
            raise ValueError(f"{OP}: attns[{l}] (B, H, N, N) is empty, got shape {shape_str(a)}")
        if a.shape != layers[0].shape:
            raise ValueError(
                f"{OP}: every layer must have the same (B, H, N, N); attns[{l}] has {shape_str(a)} but attns[0] has "
                f"{shape_str(layers[0])}"
            )
        if a.device != layers[0].device:
            raise ValueError(f"{OP}: every layer must be on one device; attns[{l}] is on {a.device}, attns[0] on {layers[0].device}")
    return layers


def attention_rollout(
    attns: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    mode: str = "abnar",
    head_fusion: str = "mean",
    start_layer: int = 0,
    cls_only: bool = True,
    discard_ratio: float = 0.0,
    normalize: str = "row",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention rollout across ViT layers (see the module docstring for the math).

    Args:
        attns: (L, B, H, N, N), or a sequence of L tensors (B, H, N, N) as hooks collect them, first layer first.
        mode: "abnar" (rownorm(fuse(A) + I), left-multiplied) or "residual" (SVIP Eq. 4).
        head_fusion: "mean", "sum", "max" or "min" over the heads.
        start_layer: the first layer rolled out, in [-L, L) (negative counts from the end); earlier ones are skipped.
        cls_only: return row 0, (B, N), computed as a vector chain in O(L·N²); else the full (B, N, N).
        discard_ratio: in [0, 1): per instance and layer, zero the int(N*N*discard_ratio) smallest entries of the
            fused map (vit-explain's discard; CLS->CLS is kept). 0 (the default) discards nothing.
        normalize: "row" (abnar divides each row of fuse(A) + I by its sum) or "none" (plain products of
            fuse(A) + I, Transformer-Explainability's). Mode "residual" never normalises and takes "row" only.
        backend: None (by device, or ZSLFAST_BACKEND), "reference", "cpu" or "triton".
    Returns:
        (B, N) or (B, N, N) in the maps' dtype, differentiable with respect to every map.
    """
    layers = _check_layers(attns)
    discard_ratio = check_rollout_options(OP, mode, head_fusion, discard_ratio, normalize)
    start = check_start_layer(OP, start_layer, len(layers))
    check_flag(OP, "cls_only", cls_only)
    layers = promote(*layers[start:])
    which = SPEC.resolve(backend, layers[0].device)
    if which == "reference":
        return reference.attention_rollout(layers, mode, head_fusion, 0, cls_only, discard_ratio, normalize)
    if cls_only:
        if discard_ratio > 0:
            # The top-k needs each whole fused map: fuse and discard in PyTorch (autograd differentiates both), then
            # hand the kernels one "head" per layer, summed, i.e. read as it is.
            layers = [discard_lowest(fuse_heads(a, head_fusion)[0], discard_ratio).unsqueeze(1) for a in layers]
            head_fusion = "sum"
        out, _ = SPEC(which, layers, mode, head_fusion, normalize)
        return out
    # The full matrix: batched GEMMs layer by layer (torch.bmm), the same on every kernel backend.
    fold = RolloutFold(mode, cls_only=False, discard_ratio=discard_ratio, normalize=normalize)
    for a in layers:
        fold.fold(fuse_heads(a, head_fusion)[0])
    return fold.result()
