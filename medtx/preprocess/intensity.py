"""Average pooling and min-max normalization: the last two, cheap steps.

Pooling comes before min-max so the output reaches exactly 1 in the brain
(normalizing first and then averaging leaves the maximum near 0.8).

The normalize step also makes the face check of the model-ready volume
(``medtx.provenance.face``): its signal outside the template brain mask,
dilated by ``face_margin_mm``, in front of and below the brain. Its metrics
go into the step record; ``qc`` judges them when the scan's records merge.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np


def pool_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Odd sizes floor: 193x229x193 -> 96x114x96 at factor 2."""
    return tuple(s // factor for s in shape)


def average_pool(data: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping factor^3 blocks (trailing voxels dropped)."""
    return block_pool(data, (factor, factor, factor))


def pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the pooled grid: voxel i covers old voxels factor*i .. factor*i+factor-1."""
    return block_pooled_affine(affine, (factor, factor, factor))


def block_pool(data: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Mean over non-overlapping blocks with a factor per axis (remainders dropped)."""
    fx, fy, fz = factors
    nx, ny, nz = (s // f for s, f in zip(data.shape, factors))
    blocks = data[: nx * fx, : ny * fy, : nz * fz].astype(np.float32)
    return (
        blocks.reshape(nx, fx, ny, fy, nz, fz)
        .mean(axis=(1, 3, 5), dtype=np.float64)
        .astype(np.float32)
    )


def block_pooled_affine(affine: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    scale = np.diag([*map(float, factors), 1.0])
    scale[:3, 3] = (np.asarray(factors, dtype=float) - 1) / 2.0
    return np.asarray(affine, dtype=float) @ scale


def clip_value(data: np.ndarray, mask: np.ndarray | None, percentile: float) -> float:
    """The ``percentile``-th intensity inside ``mask`` (numpy's linear interpolation),
    rounded to ``data``'s float type so that clipping reaches it exactly."""
    region = data[mask] if mask is not None else data.ravel()
    value = np.percentile(region, percentile)
    if np.issubdtype(data.dtype, np.floating):
        value = data.dtype.type(value)
    return float(value)


def minmax(
    data: np.ndarray, mask: np.ndarray | None, *, clip_percentile: float | None = None
) -> np.ndarray:
    """Scale to [0, 1] by the min and max inside ``mask``; zero outside it.

    ``clip_percentile``: first clip intensities at that upper percentile inside
    ``mask`` (:func:`clip_value`), so a few bright voxels do not squeeze the rest;
    None: plain min-max (the paper's).
    """
    if clip_percentile is not None:
        data = np.minimum(data, clip_value(data, mask, clip_percentile))
    region = data[mask] if mask is not None else data.ravel()
    lo, hi = float(region.min()), float(region.max())
    if hi <= lo:
        raise ValueError(f"cannot min-max normalize: constant intensity {lo:g} in the brain")
    out = np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if mask is not None:
        out[~mask] = 0.0
    return out


def percentiles(data: np.ndarray, mask: np.ndarray, qs=(1, 5, 50, 95, 99)) -> dict[str, float]:
    values = np.percentile(data[mask], qs)
    return {f"p{q}": round(float(v), 5) for q, v in zip(qs, values)}


def run_pool(
    image: str | Path,
    mask: str | Path,
    *,
    image_out: str | Path,
    mask_out: str | Path,
    record_out: str | Path,
    ctx,
    params: dict,
) -> dict:
    """2x average pooling of the N4-corrected brain and its mask (96x114x96)."""
    from medtx.io import load_volume, save_nifti
    from medtx.provenance.records import package_version

    factor = int(params.get("factor", 2))
    data, affine = load_volume(image, subject=ctx.subject)
    mask_data, _ = load_volume(mask, subject=ctx.subject, check_data=False)
    rec = ctx.record("pool", dict(params))
    rec.set_tool("medtx", package_version("medtx"))
    rec.add_input("n4", image)
    rec.add_input("brain_mask", mask)
    rec.call("medtx.preprocess.intensity.average_pool", factor=factor)
    pooled = average_pool(data, factor)
    pooled_mask = average_pool((mask_data > 0.5).astype(np.float32), factor) > 0.5
    new_affine = pooled_affine(affine, factor)
    save_nifti(pooled, new_affine, image_out)
    save_nifti(pooled_mask.astype(np.uint8), new_affine, mask_out, dtype=np.uint8)
    rec.add_output("pooled", image_out)
    rec.add_output("brain_mask", mask_out)
    rec.set_qc({"shape": list(pooled.shape)}, [])
    return rec.finish(record_out)


@functools.lru_cache(maxsize=1)
def _normalize_defaults() -> dict[str, Any]:
    from medtx.config import load_schema

    section = load_schema()["properties"]["preprocess"]["properties"]["normalize"]
    return {k: v["default"] for k, v in section["properties"].items() if "default" in v}


def normalize_settings(params: dict) -> dict[str, Any]:
    """``params`` over the config schema's ``preprocess/normalize`` defaults: a loaded
    config has them all; direct callers (tests, ``medtx step``) may leave keys out,
    and the defaults stay written once, in the schema."""
    return {**copy.deepcopy(_normalize_defaults()), **params}


def run_normalize(
    image: str | Path,
    mask: str | Path,
    *,
    image_out: str | Path,
    record_out: str | Path,
    ctx,
    params: dict,
    cache_out: str | Path | None = None,
    face_margin_mm: float | None = None,
) -> dict:
    """Min-max to [0, 1] inside the brain, after clipping at ``clip_percentile``
    (None: plain min-max): the model-ready float32 volume, and (``cache_out``) its
    float16 training cache. Keys left out of ``params`` take the schema's defaults.

    The record's metrics include the face check of the output against the
    template brain mask (``face_signal``, ``face_outside_signal``,
    ``face_component_ml`` and the ``face_margin_mm`` it was measured at; None:
    the schema's ``qc/face_margin_mm`` default). A grid that does not hold the
    template brain (not in template space) gets no face metrics: "not measured".
    """
    from medtx.data.cache import cache_volume
    from medtx.io import load_volume, save_nifti
    from medtx.provenance.face import TISSUE_FRACTION, default_margin_mm, template_face_metrics
    from medtx.provenance.records import package_version

    settings = normalize_settings(params)
    data, affine = load_volume(image, subject=ctx.subject)
    mask_data, _ = load_volume(mask, subject=ctx.subject, check_data=False)
    inside = mask_data > 0.5 if settings["within"] == "brain" else None
    percentile = settings["clip_percentile"]
    rec = ctx.record("normalize", dict(params))
    rec.set_tool("medtx", package_version("medtx"))
    rec.add_input("pooled", image)
    rec.add_input("brain_mask", mask)
    rec.call(
        "medtx.preprocess.intensity.minmax",
        within=settings["within"],
        clip_percentile=percentile,
        clip_value=None if percentile is None else clip_value(data, inside, percentile),
    )
    out = minmax(data, inside, clip_percentile=percentile)
    save_nifti(out, affine, image_out)
    rec.add_output("preproc", image_out)
    if cache_out is not None:
        rec.call("medtx.data.cache.cache_volume", dtype="float16")
        rec.add_output("cache", cache_volume(image_out, cache_out))
    stats: dict[str, Any] = percentiles(
        out, inside if inside is not None else np.ones(out.shape, bool)
    )
    stats.update({"min": float(out.min()), "max": float(out.max()), "shape": list(out.shape)})
    margin = float(default_margin_mm() if face_margin_mm is None else face_margin_mm)
    face = template_face_metrics(out, affine, margin_mm=margin)
    if face is not None:
        rec.call(
            "medtx.provenance.face.face_metrics",
            brain_mask="template brain_mask",
            margin_mm=margin,
            tissue_fraction=TISSUE_FRACTION,
        )
        stats.update(face, face_margin_mm=margin)
    rec.set_qc(stats, [])
    return rec.finish(record_out)


def run_pool_normalize(
    image: str | Path,
    mask: str | Path,
    *,
    pooled_out: str | Path,
    mask_out: str | Path,
    pool_record_out: str | Path,
    image_out: str | Path,
    record_out: str | Path,
    ctx,
    params: dict,
    cache_out: str | Path | None = None,
) -> tuple[dict, dict]:
    """Pool, then normalize, as one workflow job with a record per step.

    ``params`` holds both config sections: ``{"pool": ..., "normalize": ...}``,
    and optionally ``face_margin_mm`` (the config's ``qc/face_margin_mm``; left
    out: the schema's default).
    Each step takes well under a second; as two jobs they cost Snakemake more
    planning time per scan (thousands of scans) than they take to run.
    """
    pooled = run_pool(
        image,
        mask,
        image_out=pooled_out,
        mask_out=mask_out,
        record_out=pool_record_out,
        ctx=ctx,
        params=params.get("pool", {}),
    )
    normalized = run_normalize(
        pooled_out,
        mask_out,
        image_out=image_out,
        record_out=record_out,
        ctx=ctx,
        params=params.get("normalize", {}),
        cache_out=cache_out,
        face_margin_mm=params.get("face_margin_mm"),
    )
    return pooled, normalized


def run_step(i: dict, o: dict, params: dict, ctx) -> tuple[dict, dict]:
    """``medtx step pool_normalize``: the rule's files by role."""
    return run_pool_normalize(
        i["image"],
        i["mask"],
        pooled_out=o["pooled"],
        mask_out=o["mask"],
        pool_record_out=o["pool_record"],
        image_out=o["image"],
        record_out=o["record"],
        cache_out=o.get("cache"),
        ctx=ctx,
        params=params,
    )
