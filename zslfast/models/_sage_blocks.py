"""SAGE's two learned blocks (zslfast.models.sage has the model and the paper's equations): the Attribute-Mixer
over the attributes' word vectors and MSFE's three scales of patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttributeMixer(nn.Module):
    """AMCL's Attribute-Mixer, MLP-Mixer style, on the K attribute word vectors W (K, Dw):

        T = W + (Linear(GELU(Linear(LayerNorm(W)ᵀ))))ᵀ     ``mix``: each feature mixed across the K attributes
                                                         (K -> expansion·K -> K), with a residual
        φ(x) = Linear(GELU(Linear(LayerNorm(x))))        ``embed``: (..., Dw) -> (..., d), per vector
        A = φ(T) (K, d)                                  ``forward``

    ``mix_attributes=False`` leaves out the mixing across attributes (T = W)."""

    def __init__(self, num_attributes: int, dim_in: int, dim_out: int, expansion: int = 4,
                 mix_attributes: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.expand = nn.Linear(dim_in, expansion * dim_in)
        self.reduce = nn.Linear(expansion * dim_in, dim_out)
        self.token_norm = self.token_expand = self.token_reduce = None
        if mix_attributes:
            self.token_norm = nn.LayerNorm(dim_in)
            self.token_expand = nn.Linear(num_attributes, expansion * num_attributes)
            self.token_reduce = nn.Linear(expansion * num_attributes, num_attributes)

    def mix(self, w: torch.Tensor) -> torch.Tensor:
        """W (K, Dw) -> T (K, Dw): the token-mixing step across the attributes (identity when off)."""
        if self.token_norm is None:
            return w
        return w + self.token_reduce(F.gelu(self.token_expand(self.token_norm(w).T))).T

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """φ: (..., Dw) -> (..., d)."""
        return self.reduce(F.gelu(self.expand(self.norm(x))))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.embed(self.mix(w))


class MultiScaleBranches(nn.Module):
    """MSFE for all L levels at once, each level with its own weights:
    hidden-state patches (L, B, N, D) on an h x w grid -> [F_0 (L·B, R_0, d), F_1 (L·B, N, d), F_2 (L·B, 4N, d)].

        X   = LayerNorm_l(H) W_l + b_l                     (L, B, h, w, d)   a batched matmul over the levels
        P⁻  F_0[i, j] = Σ_{p,q ∈ {0,1}} X[2i+p, 2j+q] ⊙ down_l[p, q] + down_bias_l     (ceil(h/2) x ceil(w/2))
        P   F_1 = X
        P⁺  F_2[2i+p, 2j+q] = X[i, j] ⊙ up_l[p, q] + up_bias_l                          (2h x 2w, as 4N tokens
                                                                                   in (p, q, i, j) order)

    P⁻ and P⁺ are depthwise 2x2 stride-2 convolutions (nn.Conv2d / nn.ConvTranspose2d with groups=d, kernel 2,
    stride 2; P⁻ zero-pads an odd grid at the bottom/right). Written as reshapes and broadcasts in the tokens' own
    (…, d) layout: no (B, d, h, w) transposes, and no oneDNN depthwise backward (the step's slowest op on CPU).
    """

    def __init__(self, num_levels: int, embed_dim: int, dim: int):
        super().__init__()
        L, D, d = num_levels, embed_dim, dim
        self.norm_weight = nn.Parameter(torch.ones(L, D))
        self.norm_bias = nn.Parameter(torch.zeros(L, D))
        bound = D**-0.5  # nn.Linear's init
        self.proj_weight = nn.Parameter(torch.empty(L, D, d).uniform_(-bound, bound))
        self.proj_bias = nn.Parameter(torch.empty(L, d).uniform_(-bound, bound))
        # nn.Conv2d's init for a depthwise 2x2 kernel (fan-in 4): U(-1/2, 1/2)
        self.down_weight = nn.Parameter(torch.empty(L, 2, 2, d).uniform_(-0.5, 0.5))
        self.down_bias = nn.Parameter(torch.empty(L, d).uniform_(-0.5, 0.5))
        self.up_weight = nn.Parameter(torch.empty(L, 2, 2, d).uniform_(-0.5, 0.5))
        self.up_bias = nn.Parameter(torch.empty(L, d).uniform_(-0.5, 0.5))

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        L, B, N, D = patches.shape
        h, w = grid
        # LayerNorm's affine folded into the projection: (x̂ γ + β) W + b = x̂ (γ W) + (β W + b), the same function
        # without two passes (and their backward) over the (L, B, N, D) hidden states
        weight = self.norm_weight[:, :, None] * self.proj_weight  # (L, D, d)
        bias = torch.baddbmm(self.proj_bias[:, None], self.norm_bias[:, None], self.proj_weight)  # (L, 1, d)
        x = torch.baddbmm(bias, F.layer_norm(patches, (D,)).reshape(L, B * N, D), weight)  # (L, B·N, d)
        d = x.shape[-1]
        grid_x = x.view(L, B, h, w, d)
        padded = F.pad(grid_x, (0, 0, 0, w % 2, 0, h % 2)) if h % 2 or w % 2 else grid_x
        h2, w2 = padded.shape[2] // 2, padded.shape[3] // 2
        blocks = padded.view(L, B, h2, 2, w2, 2, d)
        down = (blocks * self.down_weight[:, None, None, :, None, :, :]).sum(dim=(3, 5))
        down = down + self.down_bias[:, None, None, None]
        # P⁺'s tokens in sub-pixel-major order (p, q, i, j), not the output grid's (2i+p, 2j+q): the same 4N tokens,
        # and nothing downstream depends on their order (softmaxes, maxima and Eq. 5 run over the whole set); with
        # (p, q) outside (i, j), one addcmul writes them and the backward's reductions are 1.6x faster on CPU.
        up_bias, up_weight = self.up_bias[:, None, None, None, None, None], self.up_weight[:, None, :, :, None, None]
        up = torch.addcmul(up_bias, grid_x[:, :, None, None], up_weight)  # (L, B, 2, 2, h, w, d)
        return [down.reshape(L * B, h2 * w2, d), x.view(L * B, N, d), up.reshape(L * B, 4 * N, d)]
