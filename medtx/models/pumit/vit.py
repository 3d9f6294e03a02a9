"""PUMIT's universal ViT, laid out as the authors' ``pumit/model/vit.py`` (commit 67218a2).

- Patch embedding: ``SACConv3d`` with kernel = stride = 16, so one set of weights
  takes 1 mm isotropic volumes, thick-slice scans and 2D slices (``Grid``).
- A learnable class token (no position) and a learnable 3D position embedding on a
  fixed grid (5 x 10 x 10 for base, the authors' ``pos_embed_shape``), resampled to
  each input's token grid as the authors' ``sac.resample``: area-averaged along
  the axes where the token grid is smaller (``shrink_pos_embed``), then trilinear
  to the token grid (``resample_pos_embed``). Both are matrix products here, whose
  CUDA backward is deterministic.
- Blocks as the authors' with ``sub_ln=True, qkv_bias=True`` (EVA-02's): pre-LN
  attention with separate query/key/value projections, biases on the query and the
  value only, 3D RoPE on queries and keys (``Rope3d``; the class token is not
  rotated); a pre-LN SwiGLU MLP (hidden ``int(dim * 8/3)``) with a LayerNorm on its
  hidden (the sub-LN, ``ffn_ln``). No layer scale, no drop path. Parameter names
  are the authors' except the patch embedding (``patch_embed.*``, theirs
  ``patch_embed.proj.*``): ``OFFICIAL_NAMES`` maps them.
- Masked image modelling: the position embedding is added to the patch embeddings,
  then the masked positions are replaced by the mask token (the authors'
  ``ViTForMIM.forward``), so a mask token carries no absolute position; RoPE still
  gives it its position in attention. Every block sees the mask tokens (their
  ``mask_layer_ids``: all layers).

``docs/pumit-parity.md`` lists each choice against the authors' code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtx.models.pumit.rope import Rope3d
from medtx.models.pumit.sac import Grid, SACConv3d
from medtx.models.slice_transformer import bilinear_matrix

PATCH = 16
MLP_RATIO = 8 / 3  # the authors' ``mlp_ratio``; hidden = int(dim * MLP_RATIO), as theirs


@dataclass(frozen=True)
class VitSize:
    """A preset's widths: embedding ``dim``, ``depth`` blocks of ``heads`` heads, the
    position embedding's grid (depth, height, width tokens before resampling)."""

    dim: int
    depth: int
    heads: int
    pos_grid: tuple[int, int, int] = (5, 10, 10)


# base: ViT-B with the authors' pos_embed_shape [5, 10, 10] (conf/model/model.yaml);
# tiny: trains in minutes on a CPU (demo, tests), the same 1:2:2 grid, smaller.
VIT_SIZES = {"base": VitSize(768, 12, 12, (5, 10, 10)), "tiny": VitSize(64, 2, 4, (2, 4, 4))}

# Our parameter names that differ from the authors' ViT's (the rest are the same).
OFFICIAL_NAMES = {
    "patch_embed.weight": "patch_embed.proj.weight",
    "patch_embed.bias": "patch_embed.proj.bias",
}


def mlp_hidden(dim: int) -> int:
    return int(dim * MLP_RATIO)


class Attention(nn.Module):
    """Multi-head self-attention as the authors' ``Attention(sub_ln=True,
    qkv_bias=True)``: q, k, v projections without bias, then learned biases on q and
    v only (k has none); RoPE on q and k; an output projection with bias.

    The three projections run as one matrix product on the concatenated weights
    (k's bias zero), the values of the authors' three ``F.linear`` calls."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.rope = Rope3d(dim // heads)

    def forward(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        b, n, d = x.shape
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, weight, bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, grid), self.rope(k, grid)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(attended)


class SwiGLU(nn.Module):
    """The authors' ``SwiGLU(sub_ln=True)``: w3(LayerNorm(silu(w1 x) * w2 x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-LN attention with 3D RoPE, then a pre-LN SwiGLU MLP, each residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden(dim))

    def forward(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class UniversalViT(nn.Module):
    """Tokens of a (B, C, D, H, W) volume of any spacing: (B, 1 + D'·H'·W', dim),
    the class token first, and the token grid (D', H', W').

    ``mask_token`` is used by masked image modelling only (the authors keep it in
    ``ViTForMIM``, not in their ``ViT``); ``vit_parameter_count`` leaves it out."""

    def __init__(self, size: VitSize, in_channels: int = 1):
        super().__init__()
        self.size = size
        self.patch_embed = SACConv3d(in_channels, size.dim, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, size.dim, *size.pos_grid))
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(Block(size.dim, size.heads) for _ in range(size.depth))
        self.norm = nn.LayerNorm(size.dim)

    def position_embedding(self, grid: tuple[int, int, int]) -> Tensor:
        """(1, dim, *grid): the authors' ``sac.resample(pos_embed, grid)``."""
        return resample_pos_embed(shrink_pos_embed(self.pos_embed, grid), grid)

    def forward(
        self, x: Tensor, grid: Grid, mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int, int]]:
        """``mask`` (B, D'·H'·W') bool: patches whose embedding (with its position)
        the mask token replaces."""
        patches, _ = self.patch_embed(x, grid)
        tokens_grid = (patches.shape[2], patches.shape[3], patches.shape[4])
        patches = patches + self.position_embedding(tokens_grid)
        tokens = patches.flatten(2).transpose(1, 2)
        if mask is not None:
            tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        out = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        for block in self.blocks:
            out = block(out, tokens_grid)
        return self.norm(out), tokens_grid


def vit_parameter_count(vit: UniversalViT) -> int:
    """Parameters of the ViT as the authors' ``ViT`` holds them: all but the MIM mask
    token (theirs is in ``ViTForMIM``)."""
    return sum(p.numel() for name, p in vit.named_parameters() if name != "mask_token")


def official_vit_parameters(size: VitSize, in_channels: int) -> int:
    """The authors' ``ViT(in_channels, embed_dim=dim, depth, num_heads, pos_embed_shape,
    sub_ln=True, qkv_bias=True, mlp_ratio=8/3)``'s parameter count, by formula
    (``docs/pumit-parity.md``; checked against their code instantiated at 67218a2).

    Per block, D = dim, H = int(D · 8/3): 4D² + 3DH + 8D + 4H (q, k, v, proj
    weights 4D²; w1, w2, w3 weights 3DH; norm1, norm2 2D each, q_bias, v_bias,
    proj.bias, w3.bias D each; w1, w2 biases H each, ffn_ln 2H). Then the patch
    embedding D·C·16³ + D, the class token D, the position embedding D·|grid| and
    the final norm 2D.
    """
    d, h = size.dim, mlp_hidden(size.dim)
    block = 4 * d * d + 3 * d * h + 8 * d + 4 * h
    grid = size.pos_grid[0] * size.pos_grid[1] * size.pos_grid[2]
    patch_embed = d * in_channels * PATCH**3 + d
    return size.depth * block + patch_embed + d + d * grid + 2 * d


def area_matrix(n_out: int, n_in: int, *, device=None, dtype=None) -> Tensor:
    """The (n_out, n_in) matrix of 1D ``F.interpolate(mode="area")`` (adaptive average
    pooling): row i averages inputs floor(i·n_in/n_out) to ceil((i+1)·n_in/n_out) - 1."""
    rows = torch.arange(n_out, device=device)[:, None]
    cols = torch.arange(n_in, device=device)[None, :]
    start = rows * n_in // n_out
    end = -(-(rows + 1) * n_in // n_out)
    inside = (cols >= start) & (cols < end)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    matrix = inside.to(work) / (end - start).to(work)
    return matrix.to(dtype or torch.get_default_dtype())


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``; nothing to switch off where it has none (meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def shrink_pos_embed(pos: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(1, dim, *g) -> (1, dim, *min(g, grid)): area-averaged along each axis longer
    than the grid's, the first step of the authors' ``sac.resample``
    (``F.interpolate(mode="area")`` to the elementwise minimum, which is separable),
    as one matrix per axis. Unchanged, the parameter itself, where no axis is longer."""
    shape = tuple(pos.shape[2:])
    target = tuple(min(s, g) for s, g in zip(shape, grid))
    if target == shape:
        return pos
    with _autocast_off(pos.device):
        a_d, a_h, a_w = (
            area_matrix(n_out, n_in, device=pos.device, dtype=pos.dtype)
            for n_out, n_in in zip(target, shape)
        )
        return torch.einsum("bcxyz,ix,jy,kz->bcijk", pos, a_d, a_h, a_w)


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
    with _autocast_off(pos.device):
        a_d, a_h, a_w = (
            bilinear_matrix(n_out, n_in, device=pos.device, dtype=pos.dtype)
            for n_out, n_in in zip(grid, pos.shape[2:])
        )
        return torch.einsum("bcxyz,ix,jy,kz->bcijk", pos, a_d, a_h, a_w)


def random_token_mask(
    batch: int, tokens: int, ratio: float = 0.55, generator: torch.Generator | None = None
) -> Tensor:
    """(batch, tokens) bool, True where masked: as the authors' ``ViTForMIM``,
    int(tokens · (1 - ratio)) positions stay visible, a uniformly random subset drawn
    afresh for each volume (theirs: ``multinomial`` of equal weights); at least one
    position is masked and one visible."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), not {ratio}")
    visible = int(tokens * (1 - ratio))
    count = min(max(tokens - visible, 1), tokens - 1)
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order < count
