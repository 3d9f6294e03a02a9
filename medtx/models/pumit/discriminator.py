"""PUMIT's patch discriminator and its hinge loss, as the official code builds them.

``PatchDiscriminator`` is the official ``SimplePatchDiscriminator``
(``pumit/tokenizer/discriminator.py``, function2-llx/PUMIT at 67218a2): per entry
of ``layer_channels`` a 3x3x3 convolution of stride 2 (padding 1), GroupNorm(16)
and LeakyReLU; one more 3x3x3 convolution at the last width with its GroupNorm and
LeakyReLU (``num_post_convs`` 1); a 3x3x3 convolution to one score per patch.
Every convolution adapts to the input's spacing as SAC layers do
(``medtx.models.pumit.sac``): the official ``InflatableConv3d`` with kernel 3 and
stride 2 takes no depth stride while in-plane halvings are still owed, and then
convolves each slice with its kernel summed over depth (``SACStridedConv3d``; our
``SACConv3d`` only has kernel = stride downsampling).

The losses are the official ``VQGANLoss``'s (``pumit/tokenizer/loss.py``): the
discriminator's is half the hinge loss of real and reconstructed volumes
(``disc_loss``), the generator's adversarial term minus the mean score of its
reconstruction (``generator_adversarial``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from medtx.models.pumit.sac import Grid, SACConv3d

GROUPS = 16  # the official discriminator's GroupNorm(16, ·)


class SACStridedConv3d(nn.Conv3d):
    """A 3x3x3 convolution of stride 2, padding 1, adapting its depth as the official
    ``InflatableConv3d(k=3, stride=2, padding=1)``: on an isotropic map (no in-plane
    halving owed, ``grid.pending == 0``) a plain 3D convolution of stride 2; else
    depth stride 1, no depth padding, and the kernel summed over depth (each slice
    convolved in-plane). Either way one in-plane halving."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, stride=2, padding=1, bias=bias)

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:  # type: ignore[override]
        if grid.pending:
            weight = self.weight.sum(dim=2, keepdim=True)
            y = F.conv3d(x, weight, self.bias, (1, 2, 2), (0, 1, 1))
        else:
            y = F.conv3d(x, self.weight, self.bias, 2, 1)
        return y, replace(grid, downsamples=grid.downsamples + 1)


class PatchDiscriminator(nn.Module):
    """The official ``SimplePatchDiscriminator(in_channels, layer_channels,
    num_post_convs=1)``; module indices as the official ``nn.Sequential``'s."""

    def __init__(self, in_channels: int, layer_channels: Sequence[int], num_post_convs: int = 1):
        super().__init__()
        if not layer_channels or any(c % GROUPS for c in layer_channels):
            raise ValueError(
                f"discriminator widths must be multiples of {GROUPS}, not {layer_channels}"
            )
        layers: list[nn.Module] = []
        widths = [in_channels, *layer_channels]
        for a, b in zip(widths, widths[1:]):
            layers += [SACStridedConv3d(a, b), nn.GroupNorm(GROUPS, b), nn.LeakyReLU()]
        last = layer_channels[-1]
        for _ in range(num_post_convs):
            layers += [SACConv3d(last, last, 3), nn.GroupNorm(GROUPS, last), nn.LeakyReLU()]
        layers.append(SACConv3d(last, 1, 3))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """(B, C, D, H, W) in the tokenizer's signed scale ([-1, 1]) -> patch scores
        (B, 1, d, h, w)."""
        for layer in self.layers:
            if isinstance(layer, (SACConv3d, SACStridedConv3d)):
                x, grid = layer(x, grid)
            else:
                x = layer(x)
        return x


def hinge_loss(score_real: Tensor, score_fake: Tensor) -> Tensor:
    """The official ``hinge_loss``: mean relu(1 - real) + mean relu(1 + fake)."""
    return (1 - score_real).relu().mean() + (1 + score_fake).relu().mean()


def disc_loss(score_real: Tensor, score_fake: Tensor) -> Tensor:
    """The discriminator's loss (official ``forward_disc``): 0.5 x hinge, in float32."""
    return 0.5 * hinge_loss(score_real.float(), score_fake.float())


def generator_adversarial(score_fake: Tensor) -> Tensor:
    """The generator's adversarial term (official ``forward_gen``): -mean score."""
    return -score_fake.float().mean()
