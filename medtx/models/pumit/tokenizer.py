"""PUMIT's universal visual tokenizer: a SAC encoder to soft tokens, and a decoder back.

The encoder halves the in-plane size four times (stride 16, as the ViT's patch
embedding, so one token per ViT patch) with SAC downsampling layers between
residual SAC 3x3 blocks; ``SoftQuantizer`` turns each position into a distribution
over the codebook and its expected embedding; the decoder mirrors the encoder with
SAC transposed layers. Training minimises the L1 reconstruction error plus
λ1·diversity + λ2·sharpness (``quantize``). The paper adds a perceptual loss on
ImageNet VGG features, which needs weights that cannot be installed here: it is
left out. Its patch-GAN hinge term, switched on only while the discriminator's loss
is below a threshold, is not built yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from medtx.models.pumit.quantize import SoftQuantizer, SoftTokens, prior_terms
from medtx.models.pumit.sac import Grid, SACConv3d, SACConvTranspose3d

LEVELS = 4  # in-plane halvings: tokens of 16 x 16 voxels


@dataclass(frozen=True)
class TokenizerSize:
    """Channels at full size and after each halving, the codebook size and width."""

    channels: tuple[int, ...]
    codes: int
    code_dim: int


# base: the paper's codebook (1,024 codes); tiny: trains in minutes on a CPU.
TOKENIZER_SIZES = {
    "base": TokenizerSize((64, 128, 256, 256, 512), 1024, 256),
    "tiny": TokenizerSize((8, 16, 16, 32, 32), 64, 16),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, SAC 3x3, twice, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(channels), _norm(channels)
        self.conv1, self.conv2 = SACConv3d(channels, channels, 3), SACConv3d(channels, channels, 3)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        h, _ = self.conv1(self.act(self.norm1(x)), grid)
        h, _ = self.conv2(self.act(self.norm2(h)), grid)
        return x + h


class Tokenizer(nn.Module):
    """(B, C, D, H, W) of any spacing -> soft tokens on the ViT's patch grid, and back."""

    def __init__(self, size: TokenizerSize, in_channels: int = 1):
        super().__init__()
        ch = size.channels
        if len(ch) != LEVELS + 1:
            raise ValueError(f"a tokenizer needs {LEVELS + 1} channel widths, not {ch}")
        self.stem = SACConv3d(in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(ResBlock(c) for c in ch[:-1])
        self.downs = nn.ModuleList(SACConv3d(a, b, 2, stride=2) for a, b in zip(ch, ch[1:]))
        self.mid = ResBlock(ch[-1])
        self.quantizer = SoftQuantizer(ch[-1], size.codes, size.code_dim)
        self.unstem = SACConv3d(size.code_dim, ch[-1], 3)
        self.ups = nn.ModuleList(
            SACConvTranspose3d(b, a, 2) for a, b in reversed(list(zip(ch, ch[1:])))
        )
        self.up_blocks = nn.ModuleList(ResBlock(c) for c in reversed(ch[:-1]))
        self.out_norm = _norm(ch[0])
        self.out = SACConv3d(ch[0], in_channels, 3)

    def encode(self, x: Tensor, grid: Grid) -> tuple[SoftTokens, Grid]:
        h, g = self.stem(x, grid)
        for block, down in zip(self.down_blocks, self.downs):
            h, g = down(block(h, g), g)
        return self.quantizer(self.mid(h, g)), g

    def decode(self, tokens: Tensor, grid: Grid) -> Tensor:
        h, g = self.unstem(tokens, grid)
        for up, block in zip(self.ups, self.up_blocks):
            h, g = up(h, g)
            h = block(h, g)
        out, _ = self.out(nn.functional.silu(self.out_norm(h)), g)
        return out

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, SoftTokens]:
        """(reconstruction, soft tokens)."""
        soft, g = self.encode(x, grid)
        return self.decode(soft.tokens, g), soft


def tokenizer_loss(
    x: Tensor,
    recon: Tensor,
    soft: SoftTokens,
    *,
    diversity: float = 1.0,
    sharpness: float = 0.1,
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """L1 reconstruction + λ1·diversity + λ2·sharpness (no perceptual or GAN term).

    ``all_sum``: under data parallelism, the diversity's p̄ over every process's
    positions (``quantize.prior_terms``)."""
    div = soft.diversity if all_sum is None else prior_terms(soft.probs, soft.logits, all_sum)[0]
    return (recon - x).abs().mean() + diversity * div + sharpness * soft.sharpness
