"""What a training stage reads: cached volumes and their targets, by fold and split.

Data come from the float16 ``.npy`` cache of ``medtx.data.cache`` through
``VolumeSet``; ``manifest_items`` picks one fold's train/val/test rows of a fold
manifest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from medtx.data.cache import load_cached, read_cache_index
from medtx.domain import SPLITS, TASKS
from medtx.errors import BadScanError, CohortError, ConfigError, MedtxError

DATA_TASKS = (*TASKS, "pretrain")


def downsample_volume(volume: Tensor, factor: int) -> Tensor:
    """Average-pool (C, X, Y, Z), or a batch of them, by ``factor`` in each axis
    (sizes floor-divided)."""
    if factor == 1:
        return volume
    return F.avg_pool3d(volume, factor)


def downsample_regions(regions: Tensor, factor: int) -> Tensor:
    """Max-pool binary region masks (3, X, Y, Z): a region touching a block keeps it.

    Max rather than nearest so a small enhancing tumour does not vanish (which would
    turn its Dice into the empty-vs-empty 1.0); WT ⊇ TC ⊇ ET nesting is kept. A batch
    (B, 3, X, Y, Z) is pooled the same way.
    """
    if factor == 1:
        return regions
    return F.max_pool3d(regions, factor)


def read_cached(path: str | Path, *, scan: str | None = None, what: str = "volume") -> np.ndarray:
    """A cached .npy as float32 (C, X, Y, Z) (a 3-D array gets a channel axis)."""
    out = np.asarray(read_stored(path, scan=scan, what=what), dtype=np.float32)
    if not np.isfinite(out).all():
        raise BadScanError(Path(path), f"cached {what} has NaN or Inf voxels", subject=scan)
    return out


def read_stored(path: str | Path, *, scan: str | None = None, what: str = "volume") -> np.ndarray:
    """A cached .npy as stored (float16 image, uint8 region masks), (C, X, Y, Z), in memory.

    No conversion and no finiteness check: the cache was checked when written
    (``medtx.data.cache.cache_volume``), and a loader that converts on the device
    moves half the bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise BadScanError(path, f"cached {what} does not exist", subject=scan)
    try:
        array = load_cached(path)
    except (OSError, ValueError) as err:
        raise BadScanError(path, f"not a readable .npy cache ({err})", subject=scan) from err
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise BadScanError(
            path,
            f"cached {what} must be 3-D or 4-D (C, X, Y, Z), but it is "
            f"{array.ndim}-D with shape {array.shape}",
            subject=scan,
        )
    return np.array(array)  # out of the memory map: a writable copy torch can share


class VolumeSet(torch.utils.data.Dataset):
    """Cached volumes and their targets for one task.

    Each item is a dict with "scan", "image" (.npy cache path), "label" (class index
    for classification, age for regression) and, for segmentation, "seg" (.npy WT/TC/ET
    region masks, ``medtx.data.cache.cache_labels``). ``dataset[i]`` is
    {"image": float32 (C, X, Y, Z), "target": ..., "index": i} with target a long class
    index, a float age, or float (3, X, Y, Z) region masks; "pretrain" has no target.

    With ``stored=True`` an item keeps the cache's size and a compact type (float16 image,
    bool region masks, not downsampled): a loader then pins and moves half the bytes, and
    ``prepare`` converts and downsamples the batch on the device it was moved to.

    Args:
        items: the scans (``manifest_items``).
        task: classification, regression, segmentation or pretrain.
        downsample: integer factor ≥ 1: average-pool the image (max-pool the regions)
            on load, e.g. 2 for 96×114×96 -> 48×57×48.
        stored: items as stored; ``prepare`` makes a batch of them model input.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        task: str,
        downsample: int = 1,
        stored: bool = False,
    ):
        if task not in DATA_TASKS:
            raise ConfigError(f"task {task!r} is not one of {list(DATA_TASKS)}")
        if not isinstance(downsample, int) or downsample < 1:
            raise ConfigError(f"downsample must be an integer >= 1, not {downsample!r}")
        self.items, self.task, self.downsample = [dict(i) for i in items], task, downsample
        self.stored = stored
        self.targets: list[Any] = []
        problems = []
        for n, item in enumerate(self.items):
            where = f"item {n} (scan {item.get('scan', '?')!r})"
            if not item.get("image"):
                problems.append(f"{where}: no 'image' cache path")
            target: float | None = None
            if task == "classification":
                try:
                    target = int(str(item.get("label")).strip())
                except ValueError:
                    problems.append(f"{where}: class label {item.get('label')!r} is not an integer")
            elif task == "regression":
                try:
                    target = float(str(item.get("label")).strip())
                    if not np.isfinite(target):
                        raise ValueError
                except ValueError:
                    problems.append(f"{where}: age {item.get('label')!r} is not a number")
            elif task == "segmentation" and not item.get("seg"):
                problems.append(f"{where}: no 'seg' region cache path")
            self.targets.append(target)
        if problems:
            raise CohortError(problems, what=f"the {task} data")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> VolumeSet:
        """The same set restricted to ``indices`` (in their order): a process's shard."""
        part = copy.copy(self)
        part.items = [self.items[i] for i in indices]
        part.targets = [self.targets[i] for i in indices]
        return part

    def image(self, i: int) -> Tensor:
        item = self.items[i]
        if self.stored:
            return torch.from_numpy(read_stored(item["image"], scan=item.get("scan")))
        volume = torch.from_numpy(read_cached(item["image"], scan=item.get("scan")))
        return downsample_volume(volume, self.downsample)

    def regions(self, i: int) -> Tensor:
        item = self.items[i]
        if self.stored:
            masks = read_stored(item["seg"], scan=item.get("scan"), what="region masks")
            return torch.from_numpy(masks > 0.5)
        masks = read_cached(item["seg"], scan=item.get("scan"), what="region masks")
        return downsample_regions(torch.from_numpy(masks > 0.5).float(), self.downsample)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image(i), "index": i}
        if self.task == "classification":
            out["target"] = torch.tensor(self.targets[i], dtype=torch.long)
        elif self.task == "regression":
            out["target"] = torch.tensor(self.targets[i], dtype=torch.float32)
        elif self.task == "segmentation":
            out["target"] = self.regions(i)
        return out

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A collated batch as model input, on whatever device it lies: float32
        images and region masks, downsampled when the items were ``stored``."""
        out = dict(batch)
        out["image"] = batch["image"].float()
        if self.task == "segmentation":
            out["target"] = batch["target"].float()
        if self.stored:
            out["image"] = downsample_volume(out["image"], self.downsample)
            if self.task == "segmentation":
                out["target"] = downsample_regions(out["target"], self.downsample)
        return out


def stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``; in a DataLoader worker straight into shared memory, as
    torch's default collate does, so the batch is not copied again to reach the
    training process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    numel = sum(t.numel() for t in tensors)
    shared = first.new(first._typed_storage()._new_shared(numel, device=first.device))
    return torch.stack(tensors, out=shared.resize_(len(tensors), *first.shape))


def collate(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack a list of ``VolumeSet`` items into one batch dict."""
    batch = {
        "image": stack([s["image"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
    if "target" in samples[0]:
        batch["target"] = stack([s["target"] for s in samples])
    return batch


def default_cache_path(row: Mapping[str, Any]) -> Path:
    """The manifest row's image with .nii/.nii.gz replaced by .npy (its cache beside it)."""
    path = str(row["path"])
    for suffix in (".nii.gz", ".nii"):
        if path.endswith(suffix):
            return Path(path[: -len(suffix)] + ".npy")
    return Path(path)


def manifest_items(
    manifest: pd.DataFrame,
    *,
    fold: int,
    role: str,
    fraction: int = 100,
    cache_dir_fn: Callable[[Mapping[str, Any]], str | Path] | None = None,
    seg_fn: Callable[[Mapping[str, Any]], str | Path] | None = None,
) -> list[dict[str, Any]]:
    """The scans of one role in fold ``fold`` of a fold manifest, as items.

    Training rows are those with ``role_<k> == "train"`` and ``frac_<k> <= fraction``
    (the nested label fractions); val and test rows ignore ``fraction``.

    Args:
        manifest: a fold manifest (``medtx.folds.manifest.read_manifest``).
        fold: k, the fold tested (test = fold k, val = fold k + 1).
        role: train, val or test.
        fraction: label fraction in percent (training rows only).
        cache_dir_fn: manifest row (dict) -> the image's .npy cache path
            (default ``default_cache_path``: the ``path`` column with .npy).
        seg_fn: manifest row -> the region-mask .npy (segmentation); default the
            row's ``seg`` column when there is one.

    Returns:
        [{"dataset", "subject", "session", "scan", "image", "label", "seg"}], in
        manifest order.
    """
    column, frac_column = f"role_{fold}", f"frac_{fold}"
    if column not in manifest.columns:
        have = sorted(c for c in manifest.columns if c.startswith("role_"))
        raise MedtxError(
            f"the manifest has no fold {fold} (column {column!r}); it has "
            f"{have or 'no role_<k> columns'}"
        )
    if role not in SPLITS:
        raise ConfigError(f"role {role!r} is not one of {list(SPLITS)}")
    rows = manifest[manifest[column].astype(str).str.strip() == role]
    if role == "train":
        fracs = pd.to_numeric(rows[frac_column], errors="coerce")
        if fracs.isna().any():
            bad = rows.loc[fracs.isna(), "scan"].tolist()
            raise MedtxError(f"training rows of fold {fold} without a {frac_column}: {bad[:5]}")
        rows = rows[fracs <= fraction]
    if rows.empty:
        raise MedtxError(
            f"the manifest has no {role} scans in fold {fold}"
            + (f" at fraction {fraction}%" if role == "train" else "")
        )
    to_image = cache_dir_fn or default_cache_path
    items = []
    for rec in rows.to_dict("records"):
        seg = seg_fn(rec) if seg_fn else rec.get("seg") or None
        items.append(
            {
                "dataset": rec.get("dataset", ""),
                "subject": rec.get("subject", ""),
                "session": rec.get("session", ""),
                "scan": rec["scan"],
                "image": str(to_image(rec)),
                "label": rec.get("label", ""),
                "seg": str(seg) if seg else None,
            }
        )
    return items


def items_from_indexes(indexes: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Pre-training items (dataset, subject, scan, image) from cache indexes."""
    items = []
    for path in indexes:
        for row in read_cache_index(path).to_dict("records"):
            items.append(
                {
                    "dataset": row["dataset"],
                    "subject": row["subject"],
                    "session": row["session"],
                    "scan": row["scan"],
                    "image": row["image"],
                    "label": "",
                }
            )
    return items
