"""Affine transforms as 4x4 world (RAS, mm) matrices, and the error between two.

ANTs writes an affine that maps template points to scan points in LPS around a
centre; FSL writes a matrix between "scaled voxel" coordinates. Both become one
form here, ``template RAS mm -> scan RAS mm``, so a recovered transform can be
composed with a known one and its error measured in millimetres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ants_affine(path: str | Path) -> np.ndarray:
    """An ANTs affine (``*GenericAffine.mat``) as template -> scan, RAS mm.

    ANTs stores ``y = A (x - c) + t + c`` in LPS, mapping fixed (template)
    points to moving (scan) points: the direction in which it resamples.
    """
    import ants

    tx = ants.read_transform(str(path))
    params = np.asarray(tx.parameters, dtype=float)
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    return _from_lps(params[:9].reshape(3, 3), params[9:12], centre)


def write_ants_affine(matrix: np.ndarray, path: str | Path) -> None:
    """Write a template -> scan RAS matrix as an ANTs affine (the inverse of ``ants_affine``)."""
    import ants

    lps = _LPS @ np.asarray(matrix, dtype=float) @ _LPS
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=lps[:3, :3],
        offset=lps[:3, 3],
    )
    ants.write_transform(tx, str(path))


def _from_lps(a: np.ndarray, t: np.ndarray, centre: np.ndarray) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + centre - a @ centre
    return _LPS @ lps @ _LPS


def fsl_scaled_voxels(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Voxel -> FSL "scaled voxel" coordinates of an image.

    FSL scales voxel indices by the voxel size and flips x when the affine has
    a positive determinant (neurological storage).
    """
    affine = np.asarray(affine, dtype=float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    scale = np.diag([*zooms, 1.0])
    if np.linalg.det(affine[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0] = -1.0
        flip[0, 3] = shape[0] - 1
        scale = scale @ flip
    return scale


def fsl_affine(
    matrix: np.ndarray,
    src_affine: np.ndarray,
    src_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    ref_shape: tuple[int, ...],
) -> np.ndarray:
    """A FLIRT matrix (``src -> ref`` scaled voxels) as ref -> src, RAS mm."""
    src_to_fsl = fsl_scaled_voxels(src_affine, src_shape) @ np.linalg.inv(src_affine)
    ref_from_fsl = np.asarray(ref_affine, dtype=float) @ np.linalg.inv(
        fsl_scaled_voxels(ref_affine, ref_shape)
    )
    world_src_to_ref = ref_from_fsl @ np.asarray(matrix, dtype=float) @ src_to_fsl
    return np.linalg.inv(world_src_to_ref)


def displacement_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Mean and max distance (mm) between ``a @ p`` and ``b @ p`` over points (N x 3)."""
    diff = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float))[:3]
    d = points @ diff[:, :3].T + diff[:, 3]
    dist = np.linalg.norm(d, axis=1)
    return float(dist.mean()), float(dist.max())


def template_brain_points(step: int = 2) -> np.ndarray:
    """RAS mm coordinates of every ``step``-th voxel of the template brain mask."""
    import nibabel as nib

    from medtx.data.templates import template_path

    img: Any = nib.load(str(template_path("brain_mask")))
    mask = np.asarray(img.dataobj)[::step, ::step, ::step] > 0.5
    ijk = np.argwhere(mask) * step
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
