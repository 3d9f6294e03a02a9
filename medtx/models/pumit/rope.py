"""3D rotary position embedding: EVA-02's 2D RoPE on (h, w) plus a depth angle.

Each query/key vector of a head is read as dim/2 pairs (x[2i], x[2i+1]); pair i is
rotated by an angle. As 2D RoPE (base 10000), the first half of the pairs turn with
the row h and the second half with the column w, at frequencies
base**(-2j / (dim/2)). PUMIT adds to every pair a depth angle d·ω_d with
ω_d = 2333**(-(2j + 1) / (dim/2)) (odd exponents, as in the authors' code), so a
token's rotation is the 2D one when depths agree, attention still depends only on
relative positions, and no two positions share a rotation (the paper's appendix).
The class token has no position and is not rotated. The rotation is the authors'
(``pumit/model/rope.py`` with ``merge_hw=True`` at commit 67218a2), angles computed in
float64 where theirs are float32 (``docs/pumit-parity.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BASE_HW = 10000.0
BASE_D = 2333.0


class Rope3d(nn.Module):
    """Rotations for the tokens of a (D, H, W) grid, for heads of width ``head_dim``
    (a multiple of 4)."""

    omega_hw: Tensor  # (head_dim/4,) row and column frequencies
    omega_d: Tensor  # (head_dim/2,) depth frequencies, one per pair

    def __init__(self, head_dim: int, base_hw: float = BASE_HW, base_d: float = BASE_D):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"3D RoPE needs a head width divisible by 4, not {head_dim}")
        half = head_dim // 2  # pairs
        quarter = half // 2
        self.head_dim = head_dim
        exponents = torch.arange(quarter, dtype=torch.float64)
        self.register_buffer("omega_hw", base_hw ** (-2 * exponents / half), persistent=False)
        odd = torch.cat([exponents, exponents])
        self.register_buffer("omega_d", base_d ** (-(2 * odd + 1) / half), persistent=False)

    def angles(self, grid: tuple[int, int, int]) -> Tensor:
        """(D·H·W, head_dim/2) rotation angles of the grid's tokens, in d, h, w order."""
        device = self.omega_hw.device
        d, h, w = torch.meshgrid(
            *(torch.arange(n, dtype=torch.float64, device=device) for n in grid), indexing="ij"
        )
        d, h, w = d.reshape(-1, 1), h.reshape(-1, 1), w.reshape(-1, 1)
        planar = torch.cat([h * self.omega_hw, w * self.omega_hw], dim=1)
        return planar + d * self.omega_d

    def forward(self, x: Tensor, grid: tuple[int, int, int], *, cls_token: bool = True) -> Tensor:
        """``x`` (..., L, head_dim) with L = D·H·W tokens, after a class token if
        ``cls_token``; returns it rotated (the class token as it was)."""
        theta = self.angles(grid)
        start = 1 if cls_token else 0
        if x.shape[-2] - start != theta.shape[0] or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{tuple(x.shape)} does not hold {theta.shape[0]} tokens of width "
                f"{self.head_dim}" + (" after a class token" if cls_token else "")
            )
        tokens = x[..., start:, :]
        pairs = tokens.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([x[..., :start, :], rotated], dim=-2)
