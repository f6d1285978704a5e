"""Attention rollout as a module, and of a running timm VisionTransformer (SVIP's patch pseudo-labels).

``AttentionRollout(mode, head_fusion, start_layer, cls_only, backend, discard_ratio, normalize)``: ``forward(attns)`` rolls out maps the caller
collected (zslfast.attention_rollout); ``from_model(model, images)`` is ``vit_attention_rollout`` below.

vit_attention_rollout: attention rollout of a timm VisionTransformer, folded in while the forward runs.

For a ViT with L blocks, H heads of dim d, embed dim D = H d and N tokens (timm's order: class token, registers,
patches), block l (l = 0 .. L-1) gets x (B, N, D), projects qkv = attn.qkv(x) (B, N, 3 H d) -> q, k (B, H, N, d)
(after attn.q_norm / attn.k_norm), and its attention is

    A^l[b, h]  = softmax((q_h * scale) k_h^T + mask)            (B, H, N, N)  scale = attn.scale (d^-0.5), softmax
                                                                              over the last dim, before attn_drop;
                                                                              mask only if the model is given one
    T^l        = fuse_h A^l[:, h]                               (B, N, N)     mean, sum, max or min over heads
    T^l        <- discard(T^l)   when discard_ratio > 0         (B, N, N)     per instance, the int(N*N*ratio)
                                                                              smallest entries (torch.topk over the
                                                                              flattened map) set to 0, flat index 0
                                                                              (CLS->CLS) kept: vit-explain's discard

and the rollout over the layers l = s .. L-1 (s = start_layer; earlier layers are skipped entirely) is

    mode "abnar" (Abnar & Zuidema 2020; SVIP's released code):
        A'^l       = rownorm(T^l + I),  rownorm(a)[b, i, j] = a[b, i, j] / sum_j' a[b, i, j']    (B, N, N)
                     (normalize "none": A'^l = T^l + I, Transformer-Explainability's products)
        R^s        = A'^s,   R^l = A'^l R^(l-1)                                                  (B, N, N)
    mode "residual" (SVIP Eq. 4):
        W^s        = T^s,    W^l = W^(l-1) + W^(l-1) T^l                                         (B, N, N)
        cls_only:  w^s = T^s[:, 0],  w^l = w^(l-1) + w^(l-1) T^l   (row 0 alone is closed)        (B, N)

    returns R[:, 0] / w (B, N) when cls_only, else R / W (B, N, N): equal (up to rounding) to
    ``zslfast.reference.attention_rollout([A^0 .. A^(L-1)], mode, head_fusion, start_layer, cls_only,
    discard_ratio, normalize)``.

Memory. timm's blocks run fused SDPA and never form A^l. While ``model(images)`` runs, each block's ``attn.forward``
is replaced (and restored afterwards, also on error) by a wrapper that calls the original forward unchanged (so the
output is bit-for-bit ``model(images)``, SDPA included), takes q, k from the ``attn.qkv`` output it has just
produced (no second qkv projection), and builds T^l one head at a time: one head's (B, N, N) scores/probabilities
are alive at a time, never (B, H, N, N). T^l is folded into the running R / W / w at once and dropped. Extra
memory at the peak is therefore a few (B, N, N) maps (R^(l-1), T^l, A'^l, the product) for "abnar" and for
cls_only=False, and one (B, N, N) map T^l plus the (B, N) row w for "residual" with cls_only=True; nothing grows
with L or H (tests/test_models_rollout.py measures it against the eager path, which stores L*H maps).

Autograd. T^l comes from a custom autograd function (``_FusedHeadAttention``) whose forward keeps only q and k
(views of the block's qkv output, which its SDPA keeps anyway, unless q_norm/k_norm are on) and, for max/min, the
(B, N, N) index of the winning head; its backward recomputes each head's probabilities one head at a time (softmax
backward, then dq, dk), so gradients reach the images and every parameter up to the qk projection while autograd
never stores L*H*N^2 probabilities. The fold itself (+I, row normalisation, products) is plain torch ops; with
gradients on it keeps what its backward needs, a few (B, N, N) maps per layer. Max/min route the gradient to the
first head attaining the extremum, as torch.max/min(dim) do.

Note on normalisation: vit-explain (jacobgil) normalises with ``a / a.sum(dim=-1)`` without keepdim, which
broadcasts the (B, N) row sums along the last dim: for B = 1 it divides column j by row j's sum (not a row
normalisation), for B > 1 the shapes (B, N, N) / (B, N) fail to broadcast (or, if B == N, silently divide
column j of every map by row j's sum of map j). zslfast divides each row by its own sum (``keepdim=True``), as
SVIP's code and the reference do.

Backends. Any kernel backend (or None) runs the fold above: head fusion and products in PyTorch ops, one layer's
map at a time, the same on every device (``fused_head_attention`` below, and ``RolloutFold``, the fold that
zslfast.attention_rollout's full matrix runs too); the backend is still checked, so one that cannot run here raises
BackendUnavailableError, and without the compiled extension the fold still runs. ``backend="reference"`` (or
``ZSLFAST_BACKEND=reference``) runs the eager code the papers run instead: the blocks switch to timm's non-fused
attention, every softmax map (B, H, N, N) is stored from a hook on ``attn.attn_drop``, and
``zslfast.reference.attention_rollout`` rolls them out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .. import _backend, reference
from .._backend import check_module_backend
from ..ops.attention_rollout import SPEC as ROLLOUT, RolloutFold, attention_rollout
from ..validation import check_flag, check_rollout_options, check_start_layer

_NAME = "vit_attention_rollout"


# ----------------------------------------------------------------------------------------------------------------
# Patching the blocks' attention.


def _call_args(args, kwargs):
    """x, attn_mask, is_causal as timm's ``Attention.forward(x, attn_mask=None, is_causal=False)`` receives them."""
    x = args[0] if args else kwargs["x"]
    attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
    is_causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
    return x, attn_mask, is_causal


def _q_k(attn: nn.Module, x: torch.Tensor, qkv: torch.Tensor):
    """q, k (B, H, N, d) from the qkv projection's output, as timm's Attention forms them (incl. q_norm/k_norm)."""
    B, N = x.shape[0], x.shape[1]
    num_heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or qkv.shape[-1] // (3 * num_heads)
    q, k, _ = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scale = getattr(attn, "scale", None)
    if scale is None:
        scale = head_dim**-0.5
    return q, k, scale


def _head_probs(q: torch.Tensor, k: torch.Tensor, scale: float, attn_mask, is_causal: bool, h: int) -> torch.Tensor:
    """softmax((q_h * scale) k_h^T + mask_h) for one head: (B, N, N). Mirrors timm's non-fused Attention path."""
    scores = (q[:, h] * scale) @ k[:, h].transpose(-2, -1)
    n = scores.shape[-1]
    if is_causal:  # timm: is_causal takes precedence over attn_mask
        upper = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill(upper, float("-inf"))
    elif attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:  # an SDPA-style mask, broadcastable to (B, H, N, N): head h's slice (B|1, N, N)
            m = m.unsqueeze(0)
        m = m[:, h if m.shape[1] != 1 else 0]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    return scores.softmax(dim=-1)


class _FusedHeadAttention(torch.autograd.Function):
    """(q, k) (B, H, N, d) -> fuse_h softmax((q_h * scale) k_h^T + mask_h) (B, N, N), one head's map at a time.

    Saves q, k (and the (B, N, N) winning-head index for max/min); the backward recomputes one head at a time.
    Max/min route the gradient to the first head attaining the extremum, as torch.max/min(dim) do: a NaN counts as
    the extremum (the first NaN head is selected, its value NaN).
    """

    @staticmethod
    def forward(ctx, q, k, scale, attn_mask, is_causal, head_fusion):
        num_heads = q.shape[1]
        fused = None
        index = None
        for h in range(num_heads):
            p = _head_probs(q, k, scale, attn_mask, is_causal, h)
            if fused is None:
                fused = p
                if head_fusion in ("max", "min"):
                    index_dtype = torch.uint8 if num_heads <= 256 else torch.int32
                    index = torch.zeros(p.shape, dtype=index_dtype, device=p.device)
            elif head_fusion in ("mean", "sum"):
                fused += p
            else:  # strict comparison: the first head attaining the extremum wins; the first NaN beats any number
                better = p > fused if head_fusion == "max" else p < fused
                better |= p.isnan() & ~fused.isnan()  # torch.max/min(dim)'s value and index for a NaN
                fused = torch.where(better, p, fused)
                index.masked_fill_(better, h)
            del p
        if head_fusion == "mean":
            fused /= num_heads
        mask_tensor = attn_mask if isinstance(attn_mask, torch.Tensor) else None
        ctx.save_for_backward(q, k, mask_tensor, index)
        ctx.scale = scale
        ctx.is_causal = is_causal
        ctx.head_fusion = head_fusion
        return fused

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, attn_mask, index = ctx.saved_tensors
        head_fusion, scale = ctx.head_fusion, ctx.scale
        num_heads = q.shape[1]
        need_q, need_k, need_mask = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_mask = None
        if need_mask:
            mask4 = attn_mask
            while mask4.dim() < 4:
                mask4 = mask4.unsqueeze(0)
            grad_mask4 = torch.zeros(mask4.shape, dtype=grad.dtype, device=grad.device)
        grad = grad.to(q.dtype)
        if head_fusion == "mean":
            grad = grad / num_heads
        for h in range(num_heads):
            p = _head_probs(q, k, scale, attn_mask, ctx.is_causal, h)
            grad_p = grad if head_fusion in ("mean", "sum") else torch.where(index == h, grad, grad.new_zeros(()))
            # softmax backward: dS = P (dP - rowsum(P dP)), taken as P ((dP - c) - rowsum(P (dP - c))) with c = dP at
            # the row's arg-max (sum P = 1): where a row is near one-hot, rowsum(P dP) rounds to dP there and the
            # textbook form keeps nothing of dS (zslfast.ops.attribute_attention's docstring, "saturation").
            # S = (q_h * scale) k_h^T
            grad_p = grad_p - grad_p.gather(-1, p.argmax(dim=-1, keepdim=True))
            grad_s = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))
            del p, grad_p
            if need_q:
                grad_q[:, h] = (grad_s @ k[:, h]) * scale
            if need_k:
                grad_k[:, h] = grad_s.transpose(-2, -1) @ (q[:, h] * scale)
            if need_mask:
                g = grad_s if mask4.shape[0] != 1 else grad_s.sum(dim=0, keepdim=True)
                grad_mask4[:, h if mask4.shape[1] != 1 else 0] += g
        if need_mask:
            grad_mask = grad_mask4.reshape(attn_mask.shape)
        return grad_q, grad_k, None, grad_mask, None, None


def fused_head_attention(q, k, scale, head_fusion, attn_mask=None, is_causal=False):
    """fuse_h softmax(q_h k_h^T * scale + mask_h): q, k (B, H, N, d) -> (B, N, N), one head's map alive at a time.

    Equals ``reference.fuse_heads(softmax((q * scale) @ k^T + mask), head_fusion)`` without forming (B, H, N, N).
    """
    return _FusedHeadAttention.apply(q, k, float(scale), attn_mask, bool(is_causal), head_fusion)


def _make_forward(attn: nn.Module, original: Callable, layer: int, on_layer: Callable[[int, torch.Tensor], None],
                  head_fusion: str):
    def forward(*args: Any, **kwargs: Any):
        captured = []
        handle = attn.qkv.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        try:
            out = original(*args, **kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"{_NAME}: blocks[{layer}].attn ({type(attn).__name__}) called its .qkv {len(captured)} times in one "
                "forward, expected once"
            )
        x, attn_mask, is_causal = _call_args(args, kwargs)
        q, k, scale = _q_k(attn, x, captured.pop())
        on_layer(layer, fused_head_attention(q, k, scale, head_fusion, attn_mask, is_causal))
        return out

    return forward


@contextmanager
def _patched_attention(blocks, start_layer: int, on_layer, head_fusion: str):
    """Replace ``blocks[l].attn.forward`` for l >= start_layer; restore the previous attribute state on exit."""
    patched = []
    try:
        for layer in range(start_layer, len(blocks)):
            attn = blocks[layer].attn
            had_own = "forward" in attn.__dict__
            previous = attn.__dict__.get("forward")
            attn.forward = _make_forward(attn, attn.forward, layer, on_layer, head_fusion)
            patched.append((attn, had_own, previous))
        yield
    finally:
        for attn, had_own, previous in reversed(patched):
            if had_own:
                attn.forward = previous
            else:
                del attn.forward


@contextmanager
def _no_grad_checkpointing(model: nn.Module):
    """timm's grad checkpointing would re-run the blocks in backward without the wrapper: switch it off meanwhile."""
    was = getattr(model, "grad_checkpointing", False)
    if was is True:
        model.grad_checkpointing = False
    try:
        yield
    finally:
        if was is True:
            model.grad_checkpointing = True


@contextmanager
def _stored_attention_maps(model: nn.Module):
    """Within the block: ``model.blocks[i].attn`` run timm's non-fused path and append their softmax maps to a list.

    Yields that list; the blocks' ``fused_attn`` flags are restored and the hooks removed on exit (also on error).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(
            f"{_NAME}: model must be a timm VisionTransformer; {type(model).__name__} has no .blocks"
        )
    maps: list[torch.Tensor] = []
    saved = []
    try:
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            drop = getattr(attn, "attn_drop", None)
            if drop is None or not hasattr(attn, "fused_attn"):
                raise TypeError(
                    f"{_NAME} (backend='reference'): model.blocks[{i}].attn must be a timm Attention with "
                    f".fused_attn and .attn_drop, got {type(attn).__name__}"
                )
            handle = drop.register_forward_hook(lambda _m, inputs, _o: maps.append(inputs[0]))
            saved.append((attn, attn.fused_attn, handle))
            attn.fused_attn = False
        yield maps
    finally:
        for attn, fused, handle in saved:
            handle.remove()
            attn.fused_attn = fused


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def _check_model(model) -> list:
    expected = "a timm VisionTransformer (or a model whose .blocks[i].attn has .qkv and .num_heads)"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_NAME}: model must be {expected}, got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{_NAME}: model must be {expected}; {type(model).__name__} has no .blocks")
    try:
        blocks = list(blocks)
    except TypeError:
        raise TypeError(f"{_NAME}: model must be {expected}; its .blocks ({type(blocks).__name__}) is not iterable")
    seen = set()
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None:
            raise TypeError(f"{_NAME}: model must be {expected}; model.blocks[{i}] ({type(blk).__name__}) has no .attn")
        for attr in ("qkv", "num_heads"):
            if getattr(attn, attr, None) is None:
                raise TypeError(
                    f"{_NAME}: model must be {expected}; model.blocks[{i}].attn ({type(attn).__name__}) has no .{attr}"
                )
        if id(attn) in seen:
            raise ValueError(f"{_NAME}: model.blocks[{i}].attn is shared with an earlier block; not supported")
        seen.add(id(attn))
    if not blocks:
        raise ValueError(f"{_NAME}: model.blocks is empty (L=0), there is nothing to roll out")
    return blocks


def vit_attention_rollout(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "abnar",
    head_fusion: str = "mean",
    start_layer: int = 0,
    cls_only: bool = True,
    backend: Optional[str] = None,
    discard_ratio: float = 0.0,
    normalize: str = "row",
):
    """Run ``model(images)`` and return ``(output, rollout)``, the rollout folded in while the forward runs.

    Args:
        model: a timm ``VisionTransformer`` (or any module whose ``.blocks[i].attn`` is timm-Attention-like: ``qkv``
            Linear, ``num_heads``, optional ``head_dim``, ``scale``, ``q_norm``, ``k_norm``). Train or eval mode
            both work (the maps are taken before ``attn_drop``); eval mode gives the usual explanation.
        images: what ``model`` takes, e.g. (B, 3, H_img, W_img).
        mode: "abnar" (rownorm(T + I) products, SVIP's code) or "residual" (SVIP Eq. 4, W <- W + W T).
        head_fusion: "mean", "sum", "max" or "min" over heads.
        start_layer: first block included (0 <= start_layer < L; negative counts from the end, as list slicing);
            earlier blocks run unchanged and their attention is never computed.
        cls_only: return row 0 of the rollout (B, N) instead of the whole (B, N, N).
        backend: None or a kernel backend (the fold, one layer at a time), or "reference" (all maps stored, the
            eager rollout); see the module docstring.
        discard_ratio: in [0, 1): per instance and layer, zero the int(N*N*discard_ratio) smallest entries of T^l
            (vit-explain's discard, CLS->CLS kept); 0 (the default) discards nothing.
        normalize: "row" (abnar's row normalisation) or "none" (plain products of T + I); "residual" takes "row".

    Returns:
        output: exactly ``model(images)`` (bit-for-bit: the original attention forward, fused SDPA included, runs).
        rollout: (B, N) if ``cls_only`` else (B, N, N), N = num_prefix_tokens + patches, in ``model``'s token order:
            timm puts the class token first, then the register tokens, then the patches. "Row 0" is therefore the
            class token's row; for a model without a class token (``class_token=False``) it is the first register
            token, or the first patch when there are no registers either. Patch scores are
            ``rollout[..., model.num_prefix_tokens:]`` (reshape to ``model.patch_embed.grid_size``).
        Equal to ``zslfast.reference.attention_rollout([A^0 .. A^(L-1)], mode, head_fusion, start_layer,
        cls_only, discard_ratio, normalize)`` with A^l block l's softmax attention; differentiable w.r.t. images and parameters.

    Memory (backend other than "reference"): a few (B, N, N) maps beyond the forward itself (one (B, N, N) map and a (B, N) row for "residual" with
    ``cls_only``), independent of depth and heads; never (B, H, N, N) at once. timm grad checkpointing is switched
    off during the call (the wrapped blocks cannot be re-run in backward); values are unaffected.

    Raises:
        TypeError: ``model`` lacks ``.blocks``, a block's ``.attn`` or its ``.qkv`` / ``.num_heads``.
        ValueError: unknown ``mode`` / ``head_fusion`` / ``normalize`` / ``backend``, normalize "none" with mode
            "residual", ``discard_ratio`` outside [0, 1), ``start_layer`` out of [-L, L) for L blocks.
        BackendUnavailableError: ``backend`` cannot run on ``images``' device.
        RuntimeError: the forward did not run each wrapped block's attention exactly once, in order.
    """
    blocks = _check_model(model)
    discard_ratio = check_rollout_options(_NAME, mode, head_fusion, discard_ratio, normalize)
    check_flag(_NAME, "cls_only", cls_only)
    L = len(blocks)
    start = check_start_layer(_NAME, start_layer, L)
    device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
    # The fold needs no compiled kernel: only "reference" asked for (argument or ZSLFAST_BACKEND) stores the maps,
    # not the fallback of a machine without the extension.
    asked = (backend, _backend.environ("ZSLFAST_BACKEND"))
    if ROLLOUT.resolve(backend, device) == "reference" and "reference" in asked:
        return _stored_maps_rollout(model, images, mode, head_fusion, start, cls_only, discard_ratio, normalize)

    rollout = RolloutFold(mode, cls_only, discard_ratio, normalize)
    expected = [start]

    def on_layer(layer: int, fused: torch.Tensor) -> None:
        if layer != expected[0]:
            raise RuntimeError(
                f"{_NAME}: blocks[{layer}].attn ran when blocks[{expected[0]}].attn was expected (each block's "
                "attention must run once, in order)"
            )
        expected[0] += 1
        rollout.fold(fused)

    with _no_grad_checkpointing(model), _patched_attention(blocks, start, on_layer, head_fusion):
        output = model(images)
    if expected[0] != L:
        raise RuntimeError(
            f"{_NAME}: the forward ran the attention of blocks[{start}:{expected[0]}] only, of L={L} blocks"
        )
    return output, rollout.result()


def _stored_maps_rollout(model, images, mode, head_fusion, start, cls_only, discard_ratio, normalize):
    """The eager way: timm's non-fused attention stores every softmax map, then zslfast.reference rolls them out."""
    with _stored_attention_maps(model) as maps:
        output = model(images)
    depth = len(model.blocks)
    if len(maps) != depth:
        raise RuntimeError(f"{_NAME}: the forward ran {len(maps)} block attentions, expected one per block ({depth})")
    return output, reference.attention_rollout(maps, mode, head_fusion, start, cls_only, discard_ratio, normalize)


class AttentionRollout(nn.Module):
    """Attention rollout across ViT layers; no parameters.

    Args:
        mode: "abnar" (rownorm(fuse(A) + I) products, SVIP's released code) or "residual" (SVIP Eq. 4).
        head_fusion: "mean", "sum", "max" or "min" over the heads.
        start_layer: the first layer rolled out, in [-L, L) (negative counts from the end; checked against L
            when the maps or the model arrive).
        cls_only: return row 0 (B, N) (a vector chain, O(L N^2)) instead of the full (B, N, N).
        backend: None (by device), "reference" (plain PyTorch) or a kernel backend ("cpu", "triton"); an attribute,
            so a model's ``set_backend`` can switch it.
        discard_ratio: in [0, 1): zero the int(N*N*discard_ratio) smallest entries of each fused map, per instance
            (vit-explain's discard, CLS->CLS kept); 0 (the default) discards nothing.
        normalize: "row" (abnar's row normalisation, the default) or "none" (plain products of fuse(A) + I);
            mode "residual" takes "row" only.

    ``forward(attns)``: attns (L, B, H, N, N) or a sequence of L maps (B, H, N, N) -> (B, N) or (B, N, N),
    differentiable with respect to every map (zslfast.attention_rollout).
    ``from_model(model, images)``: ``vit_attention_rollout`` with these settings -> (model(images), rollout).
    """

    def __init__(
        self,
        mode: str = "abnar",
        head_fusion: str = "mean",
        start_layer: int = 0,
        cls_only: bool = True,
        backend: Optional[str] = None,
        discard_ratio: float = 0.0,
        normalize: str = "row",
    ):
        super().__init__()
        name = "AttentionRollout"
        discard_ratio = check_rollout_options(name, mode, head_fusion, discard_ratio, normalize)
        check_start_layer(name, start_layer, None)
        check_flag(name, "cls_only", cls_only)
        self.mode = mode
        self.head_fusion = head_fusion
        self.start_layer = start_layer
        self.cls_only = cls_only
        self.discard_ratio = discard_ratio
        self.normalize = normalize
        self.backend = backend

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, backend: Optional[str]) -> None:
        self._backend = check_module_backend("AttentionRollout", backend, (ROLLOUT,))

    def _settings(self) -> dict:
        return dict(mode=self.mode, head_fusion=self.head_fusion, start_layer=self.start_layer,
                    cls_only=self.cls_only, discard_ratio=self.discard_ratio, normalize=self.normalize,
                    backend=self.backend)

    def forward(self, attns: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        return attention_rollout(attns, **self._settings())

    def from_model(self, model: nn.Module, images: torch.Tensor):
        """Run ``model(images)`` (a timm VisionTransformer, or a module with its ``.blocks``) -> (output, rollout).

        ``output`` is ``model(images)``; ``rollout`` is (B, N) or (B, N, N) over the model's tokens (class token
        first, then registers, then patches: patch scores are ``rollout[:, model.num_prefix_tokens:]``).
        """
        return vit_attention_rollout(model, images, **self._settings())

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, head_fusion={self.head_fusion!r}, start_layer={self.start_layer}, "
            f"cls_only={self.cls_only}, discard_ratio={self.discard_ratio:g}, normalize={self.normalize!r}, "
            f"backend={self.backend!r}"
        )
