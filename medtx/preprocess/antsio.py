"""Exact conversion between (array, NIfTI affine) and ANTs images.

ITK stores geometry in LPS with separate spacing and direction; NIfTI affines
are RAS. Converting in memory (not through temp files) keeps steps fast; the
unit tests check the result against ``ants.image_read`` of the same file.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0])


def to_ants(data: np.ndarray, affine: np.ndarray):
    import ants

    m = _LPS @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    origin = _LPS @ np.asarray(affine, dtype=float)[:3, 3]
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(origin.tolist()),
        spacing=tuple(spacing.tolist()),
        direction=direction,
    )


def from_ants(img) -> tuple[np.ndarray, np.ndarray]:
    spacing = np.asarray(img.spacing, dtype=float)
    direction = np.asarray(img.direction, dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ (direction * spacing)
    affine[:3, 3] = _LPS @ np.asarray(img.origin, dtype=float)
    return img.numpy().astype(np.float32), affine


@contextlib.contextmanager
def registration_scratch() -> Iterator[str]:
    """An ``outprefix`` for ``ants.registration`` in a folder removed on exit.

    Without one, antspyx writes every transform into the system temp folder and
    never removes it: two files per scan and step, thousands after a cohort.
    """
    with tempfile.TemporaryDirectory(prefix="medtx-ants-") as tmp:
        yield str(Path(tmp) / "reg_")


def configure_ants(*, seed: int | None, threads: int, deterministic: bool) -> None:
    """Set ITK threads and the registration seed before any ANTs call.

    antspyx ignores ``random_seed`` in ``ants.registration``; the seed it uses is
    ``ants.config._random_seed``. With one thread and a seed, reruns give
    identical transforms (multi-threaded metric sums are not bit-reproducible).
    """
    import os

    n = 1 if deterministic else max(1, int(threads))
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
    os.environ["ANTS_RANDOM_SEED"] = str(seed if seed is not None else "")
    import ants

    ants.config._random_seed = seed


def affine_schedule(params: dict) -> dict:
    """``ants.registration`` keywords of an ants config section (bet or flirt):
    the transform and one iteration count, shrink factor and sigma per level."""
    kw = {
        "type_of_transform": params["type_of_transform"],
        "aff_iterations": tuple(params["aff_iterations"]),
        "aff_shrink_factors": tuple(params["aff_shrink_factors"]),
        "aff_smoothing_sigmas": tuple(params["aff_smoothing_sigmas"]),
    }
    if "metric" in params:
        kw["aff_metric"] = params["metric"]
    return kw


def read_template(name: str, mm: float = 1.0):
    """A template image (ANTs), resampled to ``mm`` isotropic when mm != 1."""
    return _read_template(name, float(mm))


def _read_template_uncached(name: str, mm: float):
    """Template at ``mm``: 2 mm is the 2x block average, the model's own grid."""
    import ants

    from medtx.data.templates import template_path

    img = ants.image_read(str(template_path(name)))
    return img if mm == 1.0 else at_resolution(img, mm)


def at_resolution(img, mm: float):
    """``img`` block-averaged towards ``mm`` voxels when its voxels are finer.

    Registration cost grows with the moving image's size, while the model's
    input is 2 mm; the transform is in physical space, so it applies to the
    full-resolution image unchanged. Each axis is averaged over
    ``round(mm / spacing)`` voxels (1.0 mm -> 2, 1.5 mm -> 1), which is both
    faster than resampling and free of aliasing.
    """
    from medtx.preprocess.intensity import block_pool, block_pooled_affine

    factors = tuple(max(1, int(round(mm / s))) for s in img.spacing)
    if factors == (1, 1, 1):
        return img
    data, affine = from_ants(img)
    return to_ants(block_pool(data, factors), block_pooled_affine(affine, factors))


import functools as _functools  # noqa: E402

_read_template = _functools.lru_cache(maxsize=8)(_read_template_uncached)
