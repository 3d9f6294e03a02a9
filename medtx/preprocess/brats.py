"""BraTS 2020 cases: already skull-stripped and co-registered at 1 mm.

Only three things apply (as in the paper's BraTS setup): a 160x192x128 crop centred on the
brain, per-modality min-max inside the brain, and a check of the labels
(1 necrosis/non-enhancing core, 2 edema, 4 enhancing tumour).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtx.data.cache import cache_labels, cache_volume
from medtx.domain import BRATS_LABELS, BRATS_MODALITIES, BRATS_REGIONS
from medtx.errors import BadScanError
from medtx.io import load_volume, save_nifti
from medtx.preprocess.context import StepContext
from medtx.preprocess.intensity import minmax, percentiles
from medtx.provenance.records import package_version


def crop_box(brain: np.ndarray, size: tuple[int, int, int]) -> tuple[slice, ...]:
    """A box of ``size`` centred on the brain's bounding box, inside the image.

    Raises ValueError if the image is smaller than the crop in any axis.
    """
    idx = np.argwhere(brain)
    centre = (idx.min(axis=0) + idx.max(axis=0) + 1) / 2.0
    box = []
    for c, s, n in zip(centre, size, brain.shape):
        if s > n:
            raise ValueError(f"crop size {tuple(size)} is larger than the image {brain.shape}")
        start = int(round(c - s / 2.0))
        start = min(max(start, 0), n - s)
        box.append(slice(start, start + s))
    return tuple(box)


def check_labels(seg: np.ndarray, path: str | Path, subject: str | None = None) -> np.ndarray:
    values = np.unique(seg)
    if np.any(values != np.round(values)):
        raise BadScanError(path, "segmentation has non-integer values", subject=subject)
    unexpected = sorted(set(values.astype(int).tolist()) - set(BRATS_LABELS))
    if unexpected:
        raise BadScanError(
            path,
            f"unexpected label value(s) {unexpected}; BraTS 2020 uses {list(BRATS_LABELS)}",
            subject=subject,
        )
    return seg.astype(np.uint8)


def run_brats(
    images: dict[str, str],
    seg: str | None,
    *,
    image_out: str | Path,
    seg_out: str | Path | None,
    record_out: str | Path,
    ctx: StepContext,
    params: dict,
    cache_out: str | Path | None = None,
    regions_out: str | Path | None = None,
) -> dict:
    """Crop and normalize a BraTS case into a 4-channel volume and its labels,
    and (``cache_out``, ``regions_out``) their float16 / WT-TC-ET training caches."""
    modalities = list(params.get("modalities", BRATS_MODALITIES))
    size = tuple(params.get("crop", [160, 192, 128]))
    rec = ctx.record("brats", dict(params))
    rec.set_tool("medtx", package_version("medtx"))
    volumes: list[np.ndarray] = []
    affine: np.ndarray | None = None
    for mod in modalities:
        data, aff = load_volume(images[mod], subject=ctx.subject)
        if volumes and data.shape != volumes[0].shape:
            raise BadScanError(
                images[mod],
                f"shape {data.shape} differs from the case's {modalities[0]} {volumes[0].shape}",
                subject=ctx.subject,
            )
        volumes.append(data)
        affine = aff if affine is None else affine
        rec.add_input(mod, images[mod])
    brain = np.any(np.stack(volumes) != 0, axis=0)
    try:
        box = crop_box(brain, size)
    except ValueError as err:
        raise BadScanError(images[modalities[0]], str(err), subject=ctx.subject) from err
    rec.call("medtx.preprocess.brats.crop_box", size=list(size))
    brain_c = brain[box]
    channels = [minmax(v[box], brain_c) for v in volumes]
    rec.call("medtx.preprocess.intensity.minmax", within="brain", per="modality")
    offset = np.array([s.start for s in box] + [1.0])
    assert affine is not None  # modalities is never empty (the schema's minItems)
    new_affine = affine.copy()
    new_affine[:3, 3] = (affine @ offset)[:3]
    save_nifti(np.stack(channels, axis=-1), new_affine, image_out)
    rec.add_output("preproc", image_out)
    metrics = {
        "crop_start": [s.start for s in box],
        "brain_voxels": int(brain_c.sum()),
        "brain_fraction_kept": round(float(brain_c.sum() / max(brain.sum(), 1)), 4),
    }
    if seg is not None and seg_out is not None:
        labels, _ = load_volume(seg, subject=ctx.subject, check_data=False)
        labels = check_labels(labels, seg, ctx.subject)
        rec.add_input("seg", seg)
        cropped = labels[box]
        save_nifti(cropped, new_affine, seg_out, dtype=np.uint8)
        rec.add_output("seg", seg_out)
        for name, values in BRATS_REGIONS.items():
            metrics[f"{name.lower()}_voxels"] = int(np.isin(cropped, values).sum())
        metrics["tumour_fraction_kept"] = round(
            float(
                np.isin(cropped, BRATS_REGIONS["WT"]).sum()
                / max(np.isin(labels, BRATS_REGIONS["WT"]).sum(), 1)
            ),
            4,
        )
    if cache_out is not None:
        rec.call("medtx.data.cache.cache_volume", dtype="float16")
        rec.add_output("cache", cache_volume(image_out, cache_out))
    if regions_out is not None and seg_out is not None and seg is not None:
        rec.call("medtx.data.cache.cache_labels", regions=[r.lower() for r in BRATS_REGIONS])
        rec.add_output("regions", cache_labels(seg_out, regions_out))
    for mod, ch in zip(modalities, channels):
        metrics[mod] = percentiles(ch, brain_c, (1, 50, 99))
    rec.set_qc(metrics, [])
    return rec.finish(record_out)


def run_step(i: dict, o: dict, params: dict, ctx: StepContext) -> dict:
    """``medtx step brats``: the rule's files by role (one input per modality, seg)."""
    images = {k: v for k, v in i.items() if k != "seg"}
    return run_brats(
        images,
        i.get("seg"),
        image_out=o["image"],
        seg_out=o.get("seg"),
        record_out=o["record"],
        ctx=ctx,
        params=params,
        cache_out=o.get("cache"),
        regions_out=o.get("regions"),
    )
