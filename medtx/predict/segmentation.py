"""A predicted tumour segmentation back on the case's own grid, and its volumes.

The model sees the BraTS crop (``medtx.preprocess.brats.crop_box``) average-pooled
by ``downsample``; its WT/TC/ET probabilities are brought back by trilinear
upsampling (each pooled voxel's value sits at its block's centre), edge-padded
where pooling floored the size, and put back into the uncropped volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medtx.domain import BRATS_REGIONS, REGION_NAMES


def labels_from_regions(regions: np.ndarray) -> np.ndarray:
    """WT/TC/ET masks (3, ...) as one BraTS label volume (uint8): the inverse of
    ``medtx.domain.regions_from_labels``.

    Predicted masks need not nest; each inner region is taken as part of the
    outer ones, as the challenge defines them. Each region then gets the one
    label it holds that the next inner region does not (WT 2, TC 1, ET 4).
    """
    masks = [np.asarray(r, dtype=bool) for r in regions]
    for i in range(len(masks) - 2, -1, -1):
        masks[i] = masks[i] | masks[i + 1]
    groups = [set(v) for v in BRATS_REGIONS.values()]
    labels = np.zeros(masks[0].shape, dtype=np.uint8)
    for i, mask in enumerate(masks):
        (own,) = groups[i] - (groups[i + 1] if i + 1 < len(groups) else set())
        labels[mask] = own
    return labels


def upsample_probabilities(probs: np.ndarray, factor: int, size: Sequence[int]) -> np.ndarray:
    """(3, x, y, z) probabilities on the pooled grid -> (3, *size) on the crop's grid."""
    t = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
    if factor > 1:
        t = F.interpolate(t, scale_factor=factor, mode="trilinear", align_corners=False)
    pad = [s - n for s, n in zip(size, t.shape[2:])]
    if any(p < 0 for p in pad):
        raise ValueError(f"probabilities {tuple(t.shape[2:])} exceed the crop {tuple(size)}")
    if any(pad):
        t = F.pad(t, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")
    return t[0].numpy()


def native_labels(
    probs: np.ndarray,
    *,
    factor: int,
    crop_start: Sequence[int],
    crop_size: Sequence[int],
    native_shape: Sequence[int],
) -> np.ndarray:
    """The label volume (uint8, ``native_shape``) of pooled WT/TC/ET probabilities."""
    regions = upsample_probabilities(probs, factor, crop_size) > 0.5
    labels = np.zeros(tuple(native_shape), dtype=np.uint8)
    box = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(crop_start, crop_size))
    labels[box] = labels_from_regions(regions)
    return labels


def region_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume of each region (WT, TC, ET) in ml, from the voxel size in ``affine``."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    return {
        f"volume_{name}_ml": round(float(np.isin(labels, BRATS_REGIONS[name]).sum()) * voxel_ml, 3)
        for name in REGION_NAMES
    }
