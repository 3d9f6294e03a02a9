"""A training-time cache of preprocessed volumes: one float16 .npy per scan.

Decompressing a 96x114x96 .nii.gz costs tens of milliseconds and a training
step hundreds; a memory-mapped float16 array loads in well under a
millisecond, so the loader never starves the step (bench/train.py measures
the ratio). Planes are sliced on the fly by the model, not stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtx.data.scan_ids import scan_identity
from medtx.domain import regions_from_labels
from medtx.errors import BadScanError, MedtxError
from medtx.io import atomic_path, load_volume


def cache_volume(image: str | Path, out: str | Path, *, channels_last: bool = True) -> Path:
    """Write ``image`` (3-D, or 4-D channels-last) as float16 (C, X, Y, Z) .npy."""
    import nibabel as nib

    img: Any = nib.load(str(image))
    if img.ndim == 3:
        data, _ = load_volume(image)
        array = data[None]
    else:
        array = np.asarray(img.dataobj, dtype=np.float32)
        array = np.moveaxis(array, -1, 0) if channels_last else array
    half = array.astype(np.float16)
    if not np.isfinite(half).all():  # checked here once, not on every training load
        raise BadScanError(
            image,
            f"{int((~np.isfinite(half)).sum())} voxel(s) are NaN or Inf in float16 "
            "(beyond its ±65504); normalize intensities before caching",
        )
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, half)
    return Path(out)


def cache_labels(seg: str | Path, out: str | Path) -> Path:
    """BraTS labels (0/1/2/4) as the three region masks WT/TC/ET, uint8 (3, X, Y, Z)."""
    labels, _ = load_volume(seg, check_data=False)
    regions = regions_from_labels(labels).astype(np.uint8)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, regions)
    return Path(out)


def load_cached(path: str | Path) -> np.ndarray:
    """Memory-mapped read of a cached volume (no copy until used)."""
    return np.load(str(path), mmap_mode="r")


INDEX_COLUMNS = ("dataset", "subject", "session", "scan", "image", "regions")


def write_cache_index(
    dataset: str,
    scans: Sequence[str],
    images: Sequence[str],
    out: str | Path,
    regions: Sequence[str] | None = None,
    *,
    brats: bool = False,
    record_list: str | Path | None = None,
) -> Path:
    """One dataset's cached volumes as a TSV: who each scan is, and its cache files.

    Training reads scans and their identity from here (never from file names).
    Fine-tuning jobs depend on this one file instead of every cache: with 2,000
    scans and 30 runs that is 30 inputs, not 60,000, which Snakemake plans in
    seconds less. Rewritten whenever a cache is (the rule's inputs), so a new
    or changed scan still retrains the dataset's models.

    ``record_list`` is the workflow's list of the dataset's provenance records,
    one path per line in scan order (``medtx.workflow.argfile``). A T1 scan's job
    declares only its record (each declared file costs planning time on every
    scan), so Snakemake does not see a deleted cache: it is found here, named
    with the file to force (``--forcerun``), which rebuilds it.
    """
    if len(scans) != len(images) or (regions is not None and len(regions) != len(images)):
        raise MedtxError(
            f"{out}: {len(scans)} scans but {len(images)} cached images"
            + (f" and {len(regions)} region masks" if regions is not None else "")
        )
    if record_list is not None:
        records = Path(record_list).read_text().splitlines()
        _check_caches(scans, images, regions, records, out, brats=brats)
    rows = []
    for i, (scan, image) in enumerate(zip(scans, images)):
        who = scan_identity(scan, brats=brats)
        rows.append(
            {
                "dataset": dataset,
                "subject": who["subject"],
                "session": who["session"] or "",
                "scan": scan,
                "image": str(image),
                "regions": str(regions[i]) if regions is not None else "",
            }
        )
    table = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return Path(out)


def _check_caches(
    scans: Sequence[str],
    images: Sequence[str],
    regions: Sequence[str] | None,
    records: Sequence[str],
    out: str | Path,
    *,
    brats: bool,
) -> None:
    """Every cache file exists; a missing one is named with what to force: a T1
    scan's record (its job skips the intact steps), a BraTS case's cache (which
    its job declares)."""
    if len(records) != len(scans):
        raise MedtxError(f"{out}: {len(scans)} scans but {len(records)} provenance records")
    for i, scan in enumerate(scans):
        for path in (images[i], *([regions[i]] if regions is not None else [])):
            if not Path(path).is_file():
                force = path if brats else records[i]
                raise MedtxError(
                    f"{path}: the training cache of scan {scan} is missing; run again"
                    f" with --forcerun {force}: its job rebuilds it"
                )


def read_cache_index(path: str | Path) -> pd.DataFrame:
    """A cache index (``write_cache_index``), every column text; a bad file is named."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.EmptyDataError) as err:
        raise MedtxError(f"{path}: cannot read cache index ({err})") from err
    missing = [c for c in INDEX_COLUMNS if c not in table.columns]
    if missing:
        raise MedtxError(f"{path}: not a cache index (missing column(s) {missing})")
    return table
