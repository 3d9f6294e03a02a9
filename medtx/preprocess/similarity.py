"""How well a registered image matches the template: the figures QC and the benchmark share.

NCC with the ICBM 2009c head on the model's 2 mm grid, in the template brain
eroded by two voxels (so the brain's edge, which extraction decides, does not
count), after smoothing both by one voxel (so it measures alignment rather
than one person's folding). The realigning shift is the integer translation
that would raise that NCC further: a well-registered scan needs none, and a
scan a voxel or more off shows it, however good its NCC looks.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalized cross-correlation of two images inside a mask."""
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


@functools.cache
def template_reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The smoothed 2 mm template head, its eroded brain core, and the 2 mm affine."""
    import nibabel as nib
    from scipy.ndimage import binary_erosion, gaussian_filter

    from medtx.data.templates import template_path
    from medtx.preprocess.intensity import average_pool, pooled_affine

    tpl: Any = nib.load(str(template_path("t1")))
    mask_img: Any = nib.load(str(template_path("brain_mask")))
    mask = np.asarray(mask_img.dataobj) > 0.5
    smooth = gaussian_filter(average_pool(np.asarray(tpl.dataobj, np.float32), 2), 1.0)
    core = binary_erosion(average_pool(mask.astype(np.float32), 2) > 0.5, iterations=2)
    return smooth, core, pooled_affine(tpl.affine, 2)


def template_similarity(image_2mm: np.ndarray, radius: int = 2) -> tuple[float, tuple[int, ...]]:
    """NCC of a 2 mm template-grid image with the template, and its realigning shift.

    Returns the NCC as registered and the shift (voxels per axis, within
    ``radius``) that maximizes it; ``(0, 0, 0)`` when none does better.
    """
    from scipy.ndimage import gaussian_filter

    tpl, core, _ = template_reference()
    smooth = gaussian_filter(np.asarray(image_2mm, dtype=np.float32), 1.0)
    scores = {
        shift: ncc(np.roll(smooth, shift, axis=(0, 1, 2)), tpl, core)
        for shift in (
            tuple(int(v) - radius for v in offset) for offset in np.ndindex(*(2 * radius + 1,) * 3)
        )
    }
    unshifted = scores[(0, 0, 0)]
    best = max(scores, key=lambda s: scores[s])
    return unshifted, (best if scores[best] > unshifted + 1e-9 else (0, 0, 0))


def shift_mm(shift: tuple[int, ...], voxel_mm: float = 2.0) -> float:
    """Length of a realigning shift in mm."""
    return round(float(np.linalg.norm(shift)) * voxel_mm, 2)
