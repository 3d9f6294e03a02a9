"""A training-time cache of preprocessed volumes: one float16 .npy per scan.

Decompressing a 96x114x96 .nii.gz costs tens of milliseconds and a training
step hundreds; a memory-mapped float16 array loads in well under a
millisecond, so the loader never starves the step (bench/train.py measures
the ratio). Planes are sliced on the fly by the model, not stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtx.io import atomic_path, load_volume

BRATS_REGIONS = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}


def cache_paths(cache_dir: str | Path, dataset: str, scan: str) -> dict[str, str]:
    """Where a scan's cached image and (BraTS) region masks live: one naming for
    the rules that write them and the stages that read them."""
    base = Path(cache_dir) / dataset / scan
    return {"image": f"{base}.npy", "regions": f"{base}_regions.npy"}


def cache_volume(image: str | Path, out: str | Path, *, channels_last: bool = True) -> Path:
    """Write ``image`` (3-D, or 4-D channels-last) as float16 (C, X, Y, Z) .npy."""
    import nibabel as nib

    img = nib.load(str(image))
    if img.ndim == 3:
        data, _ = load_volume(image)
        array = data[None]
    else:
        array = np.asarray(img.dataobj, dtype=np.float32)
        array = np.moveaxis(array, -1, 0) if channels_last else array
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array.astype(np.float16))
    return Path(out)


def cache_labels(seg: str | Path, out: str | Path) -> Path:
    """BraTS labels (0/1/2/4) as the three region masks WT/TC/ET, uint8 (3, X, Y, Z)."""
    labels, _ = load_volume(seg, check_data=False)
    regions = np.stack([np.isin(labels, v) for v in BRATS_REGIONS.values()]).astype(np.uint8)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, regions)
    return Path(out)


def load_cached(path: str | Path) -> np.ndarray:
    """Memory-mapped read of a cached volume (no copy until used)."""
    return np.load(str(path), mmap_mode="r")


def write_cache_index(images: list[str], out: str | Path, regions: list[str] | None = None) -> Path:
    """One dataset's cached volumes as a TSV (scan, image[, regions]).

    Fine-tuning jobs depend on this one file instead of every cache: with 2,000
    scans and 30 runs that is 30 inputs, not 60,000, which Snakemake plans in
    seconds less. Rewritten whenever a cache is (the rule's inputs), so a new
    or changed scan still retrains the dataset's models.
    """
    lines = ["scan\timage" + ("\tregions" if regions else "")]
    for i, image in enumerate(images):
        row = [Path(image).name.removesuffix(".npy"), str(image)]
        lines.append("\t".join(row + ([str(regions[i])] if regions else [])))
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return Path(out)
