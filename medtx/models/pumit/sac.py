"""Spatially adaptive convolution (SAC): one set of isotropic 3D weights for any spacing.

A scan of in-plane spacing s and slice thickness t has degree of anisotropy
``aniso_d = floor(log2(t / s))``, computed as the authors do (``pumit/datamodule.py``
lines 118-119 at commit 67218a2): ``int(r).bit_length() - 1`` with the ratio r = t / s
clipped to [1, 2 · 16], so 0 for isotropic voxels (and for t < s), 1 for 1 x 1 x 3 mm,
and at most ``MAX_ANISO_D`` = 5. A 2D image is one slice of "infinite" thickness
(``PLANAR_ANISO_D``). While in-plane downsamplings are still owed before the voxels
are isotropic, a SAC layer does not stride in depth, and its depth kernel is the
isotropic kernel sum-pooled to the depth stride it does take. Summing, not averaging,
keeps the output of a thick slice equal to that of the isotropic volume it stands
for: for a volume whose depth is constant within blocks of 2**aniso_d slices, the
isotropic convolution of the full volume and the adapted convolution of one slice
per block give the same map. Transposed (upsampling) layers undo the depth strides
in the same way.

The spacing travels as a ``Grid`` passed with the tensor, not as a tensor subclass
(the authors' ``SpatialTensor``), so autograd, checkpointing and torch.compile see
plain tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor, nn

# The authors' cap: their sampler clips t / s to 2 · stride = 32 (datamodule.py:118).
MAX_ANISO_D = 5
# A 2D image: depth 1 and thicker than any downsampling can make isotropic. (The
# authors' 2D images reach their cap, 5; every SAC layer here starts from at most 4
# halvings, where 5 and 64 give the same strides.)
PLANAR_ANISO_D = 64


def aniso_d(spacing: tuple[float, float, float]) -> int:
    """Degree of anisotropy of (depth, height, width) spacing in mm, as the authors'
    sampler (``pumit/datamodule.py:118-119``): with t the depth spacing and s the
    finer in-plane one, ``int(clip(t / s, 1, 32)).bit_length() - 1``, that is
    floor(log2(t / s)) between 0 and ``MAX_ANISO_D``."""
    depth, height, width = (float(v) for v in spacing)
    if min(depth, height, width) <= 0 or not all(map(math.isfinite, (depth, height, width))):
        raise ValueError(f"spacing must be positive and finite, not {spacing}")
    ratio = min(max(depth / min(height, width), 1.0), float(1 << MAX_ANISO_D))  # 32
    return int(ratio).bit_length() - 1


@dataclass(frozen=True)
class Grid:
    """Where a feature map stands: its input's ``aniso_d`` and the in-plane halvings
    (``downsamples``) done since, net of upsamplings."""

    aniso_d: int
    downsamples: int = 0

    @classmethod
    def of(cls, spacing: tuple[float, float, float], depth: int) -> Grid:
        """The grid of an input of ``depth`` slices (1: a 2D image) and this spacing."""
        return cls(PLANAR_ANISO_D if depth == 1 else aniso_d(spacing))

    @property
    def pending(self) -> int:
        """In-plane halvings still owed before the voxels are isotropic: the feature
        map's own degree of anisotropy; no depth stride while it is above 0."""
        return max(self.aniso_d - self.downsamples, 0)

    @property
    def depth_upsamples(self) -> int:
        """Depth halvings done so far, which upsampling may undo."""
        return max(self.downsamples - self.aniso_d, 0)


def _halvings(stride: int) -> int:
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"SAC strides are powers of 2, not {stride}")
    return stride.bit_length() - 1


def _pool_depth(weight: Tensor, size: int) -> Tensor:
    """Sum-pool the depth axis (2) of a kernel down to ``size`` (it divides it)."""
    if weight.shape[2] == size:
        return weight
    return weight.unflatten(2, (size, weight.shape[2] // size)).sum(3)


class SACConv3d(nn.Conv3d):
    """A 3D convolution with an isotropic kernel and stride that adapts its depth.

    Two forms, as in the paper: downsampling, kernel = stride = 2**n (a patch
    embedding is n = 4); or kernel 3 (odd), stride 1, padded to keep the size. The
    depth stride is ``stride >> grid.pending`` (at least 1) and the depth kernel the
    isotropic one sum-pooled to it; a stride-1 layer on an anisotropic map uses its
    kernel summed over the whole depth (a 2D convolution of each slice).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
    ):
        self.halvings = _halvings(stride)
        if stride > 1 and kernel_size != stride:
            raise ValueError(
                f"a downsampling SAC has kernel = stride, not {kernel_size} and {stride}"
            )
        if stride == 1 and kernel_size % 2 == 0:
            raise ValueError(f"a stride-1 SAC needs an odd kernel, not {kernel_size}")
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:  # type: ignore[override]
        stride, pad = self.stride[1], int(self.padding[1])  # padding is ints here, not "same"
        depth_stride = max(stride >> grid.pending, 1)
        weight = self.weight
        depth_pad = pad
        if grid.pending:
            weight = _pool_depth(weight, 1 if stride == 1 else depth_stride)
            depth_pad = 0
        y = F.conv3d(x, weight, self.bias, (depth_stride, stride, stride), (depth_pad, pad, pad))
        return y, replace(grid, downsamples=grid.downsamples + self.halvings)


class SACConvTranspose3d(nn.ConvTranspose3d):
    """Upsampling by 2**n in-plane (kernel = stride); in depth only by the depth
    halvings done before (``grid.depth_upsamples``), with the depth kernel sum-pooled
    to that stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True):
        self.halvings = _halvings(stride)
        super().__init__(in_channels, out_channels, stride, stride, bias=bias)

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:  # type: ignore[override]
        stride = self.stride[1]
        depth_stride = 1 << min(self.halvings, grid.depth_upsamples)
        weight = _pool_depth(self.weight, depth_stride)
        y = F.conv_transpose3d(x, weight, self.bias, (depth_stride, stride, stride))
        return y, replace(grid, downsamples=grid.downsamples - self.halvings)
