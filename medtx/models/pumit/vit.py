"""PUMIT's universal ViT: a SAC patch embedding, then plain pre-LN transformer blocks.

- Patch embedding: ``SACConv3d`` with kernel = stride = 16, so one set of weights
  takes 1 mm isotropic volumes, thick-slice scans and 2D slices (``Grid``).
- A learnable class token and a learnable 3D position embedding on a fixed grid,
  resampled (trilinear) to each input's token grid (``resample_pos_embed``).
- Blocks as EVA-02's: pre-LayerNorm attention with 3D RoPE on queries and keys
  (``Rope3d``; the class token is not rotated) through
  ``scaled_dot_product_attention``, and a SwiGLU MLP (hidden 8/3 of the width).
- Masked image modelling replaces the embeddings of masked patches by a learned
  mask token before the position embedding is added (BEiT's order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.models.pumit.rope import Rope3d
from medtx.models.pumit.sac import Grid, SACConv3d
from medtx.models.slice_transformer import bilinear_matrix

PATCH = 16


@dataclass(frozen=True)
class VitSize:
    """A preset's widths: embedding ``dim``, ``depth`` blocks of ``heads`` heads, the
    position embedding's grid (tokens per axis before resampling)."""

    dim: int
    depth: int
    heads: int
    pos_grid: int = 8


# base: ViT-B, as the paper; tiny: trains in minutes on a CPU (demo, tests).
VIT_SIZES = {"base": VitSize(768, 12, 12), "tiny": VitSize(64, 2, 4, 4)}


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.value, self.out = (
            nn.Linear(dim, hidden),
            nn.Linear(dim, hidden),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.gate(x)) * self.value(x))


class Block(nn.Module):
    """Pre-LN attention with 3D RoPE, then a pre-LN SwiGLU MLP, each residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rope = Rope3d(dim // heads)
        self.mlp = SwiGLU(dim, dim * 8 // 3)

    def forward(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, grid), self.rope(k, grid)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class UniversalViT(nn.Module):
    """Tokens of a (B, C, D, H, W) volume of any spacing: (B, 1 + D'·H'·W', dim),
    the class token first, and the token grid (D', H', W')."""

    def __init__(self, size: VitSize, in_channels: int = 1):
        super().__init__()
        self.size = size
        self.patch_embed = SACConv3d(in_channels, size.dim, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        g = size.pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, size.dim, g, g, g))
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(Block(size.dim, size.heads) for _ in range(size.depth))
        self.norm = nn.LayerNorm(size.dim)

    def forward(
        self, x: Tensor, grid: Grid, mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int, int]]:
        """``mask`` (B, D'·H'·W') bool: patches whose embedding the mask token replaces."""
        patches, _ = self.patch_embed(x, grid)
        tokens_grid = (patches.shape[2], patches.shape[3], patches.shape[4])
        tokens = patches.flatten(2).transpose(1, 2)
        if mask is not None:
            tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        pos = resample_pos_embed(self.pos_embed, tokens_grid)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        out = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        for block in self.blocks:
            out = block(out, tokens_grid)
        return self.norm(out), tokens_grid


def resample_pos_embed(pos: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(1, dim, g, g, g) position embedding -> (1, dim, *grid), trilinear.

    ``F.interpolate(pos, grid, mode="trilinear", align_corners=False)``'s values, as
    one 1D linear-interpolation matrix per axis (trilinear is separable): its CUDA
    backward is matrix products, deterministic, where interpolate's backward uses
    atomicAdd and raises under ``torch.use_deterministic_algorithms(True)``. Autocast
    is off here: interpolate ran in the parameter's dtype (float32), which matrix
    products under autocast would not. On its own grid, the parameter itself.
    """
    if tuple(pos.shape[2:]) == tuple(grid):
        return pos
    with torch.autocast(pos.device.type, enabled=False):
        a_d, a_h, a_w = (
            bilinear_matrix(n_out, n_in, device=pos.device, dtype=pos.dtype)
            for n_out, n_in in zip(grid, pos.shape[2:])
        )
        return torch.einsum("bcxyz,ix,jy,kz->bcijk", pos, a_d, a_h, a_w)


def random_token_mask(
    batch: int, tokens: int, ratio: float = 0.55, generator: torch.Generator | None = None
) -> Tensor:
    """(batch, tokens) bool: exactly round(ratio · tokens) masked per volume (at least
    one, and at least one left visible), drawn afresh for each."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), not {ratio}")
    count = min(max(round(ratio * tokens), 1), tokens - 1)
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order < count
