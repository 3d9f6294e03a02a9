"""QC thumbnails: mid-slices of each preprocessing stage with the brain-mask outline.

One small PNG per scan: a row per panel (raw, brain, registered, bias-corrected,
pooled), columns sagittal, coronal and axial through the middle of each
volume's own grid. Panels may sit on different grids (native scan, 1 mm
template, 2 mm pooled); each cell keeps its slice's physical aspect ratio.

Every volume is shown in the closest canonical (RAS+) orientation, as
``nibabel.as_closest_canonical`` gives it, and laid out so that superior is up:
sagittal with anterior to the left, coronal and axial in neurological
convention (the subject's right on the right), axial with anterior up.

The image is built with numpy as an indexed PNG (a 255-level gray ramp plus one
pure red entry for the mask outline), so it is small (about 30-100 KB for five
rows), fast, and free of pyplot state. The outline is the in-plane boundary
(mask XOR its 4-neighbour erosion) of the mask resampled, nearest neighbour
through the world coordinates of both affines, onto the displayed pixels, so a
mask on another grid than its volume is still drawn in the right place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medtx.errors import MedtxError
from medtx.io import atomic_path, load_volume

PLANES = ("sagittal", "coronal", "axial")
CELL_PX = 120  # longest side of a slice, in pixels
LABEL_PX = 14  # text band above each row
HEADER_PX = 14  # column names at the top
GAP_PX = 2  # between columns
WINDOW_PERCENTILES = (1.0, 99.0)

# Palette: indices 0..254 are a gray ramp (0 = black, 254 = white), 255 is red.
WHITE = 254
RED = 255
OUTLINE_RGB = (255, 0, 0)

Panel = tuple[str, "str | Path", "str | Path | None"]


@dataclass
class PlaneSlice:
    """One displayed slice: rows top to bottom, columns left to right.

    ``to_voxel`` maps homogeneous display coordinates (row, col, 1) to the
    canonical voxel indices (i, j, k) of the volume the slice was cut from.
    """

    plane: str
    image: np.ndarray
    pixel_mm: tuple[float, float]  # (row height, column width)
    to_voxel: np.ndarray  # 3x3


def thumbnail_shape(n_panels: int, *, cell: int = CELL_PX) -> tuple[int, int]:
    """(height, width) in pixels of the PNG for ``n_panels`` rows."""
    return HEADER_PX + n_panels * (LABEL_PX + cell), 3 * cell + 2 * GAP_PX


def canonical_volume(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a volume to the closest canonical (RAS+) axes, as nibabel does."""
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, np.asarray(affine, dtype=float)))
    return np.asanyarray(canon.dataobj), canon.affine


def plane_slices(data: np.ndarray, affine: np.ndarray) -> list[PlaneSlice]:
    """Mid-slices of a canonical (RAS+) volume, oriented for display (superior up)."""
    ni, nj, nk = data.shape
    i0, j0, k0 = ni // 2, nj // 2, nk // 2
    vi, vj, vk = (float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    sag = data[i0, :, :].T[::-1, ::-1]  # rows: S->I, cols: A->P
    cor = data[:, j0, :].T[::-1, :]  # rows: S->I, cols: L->R
    axi = data[:, :, k0].T[::-1, :]  # rows: A->P, cols: L->R
    return [
        PlaneSlice(
            "sagittal",
            sag,
            (vk, vj),
            np.array([[0, 0, i0], [0, -1, nj - 1], [-1, 0, nk - 1]], dtype=float),
        ),
        PlaneSlice(
            "coronal",
            cor,
            (vk, vi),
            np.array([[0, 1, 0], [0, 0, j0], [-1, 0, nk - 1]], dtype=float),
        ),
        PlaneSlice(
            "axial", axi, (vj, vi), np.array([[0, 1, 0], [-1, 0, nj - 1], [0, 0, k0]], dtype=float)
        ),
    ]


def window(slices: list[np.ndarray]) -> tuple[float, float]:
    """Robust display range: 1st-99th percentile of the finite non-zero pixels."""
    finite = np.concatenate([s[np.isfinite(s)].ravel() for s in slices])
    vals = finite[finite != 0]
    lo = hi = 0.0
    if vals.size:
        lo, hi = (float(v) for v in np.percentile(vals, WINDOW_PERCENTILES))
    if hi <= lo and finite.size:  # e.g. a binary image: show its full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def display_grid(
    shape: tuple[int, int], pixel_mm: tuple[float, float], cell: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source (row, col) coordinates of each displayed pixel, aspect-correct in ``cell``."""
    h, w = shape
    height_mm, width_mm = h * pixel_mm[0], w * pixel_mm[1]
    scale = cell / max(height_mm, width_mm)
    oh = int(min(cell, max(1, round(height_mm * scale))))
    ow = int(min(cell, max(1, round(width_mm * scale))))
    rows = (np.arange(oh) + 0.5) * (h / oh) - 0.5
    cols = (np.arange(ow) + 0.5) * (w / ow) - 0.5
    return np.meshgrid(rows, cols, indexing="ij")


def _bilinear(image: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    h, w = image.shape
    rr = np.clip(rr, 0, h - 1)
    cc = np.clip(cc, 0, w - 1)
    r0 = np.minimum(np.floor(rr).astype(int), max(h - 2, 0))
    c0 = np.minimum(np.floor(cc).astype(int), max(w - 2, 0))
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr, fc = rr - r0, cc - c0
    top = image[r0, c0] * (1 - fc) + image[r0, c1] * fc
    bottom = image[r1, c0] * (1 - fc) + image[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def sample_mask(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    vol_affine: np.ndarray,
    to_voxel: np.ndarray,
    rr: np.ndarray,
    cc: np.ndarray,
) -> np.ndarray:
    """Nearest-neighbour mask values at displayed pixels, through world coordinates."""
    display = np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)])
    ijk = to_voxel @ display
    world = vol_affine[:3, :3] @ ijk + vol_affine[:3, 3:4]
    inv = np.linalg.inv(mask_affine)
    idx = np.rint(inv[:3, :3] @ world + inv[:3, 3:4]).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros(rr.size, dtype=bool)
    out[inside] = mask[idx[0, inside], idx[1, inside], idx[2, inside]]
    return out.reshape(rr.shape)


def outline(mask: np.ndarray) -> np.ndarray:
    """In-plane boundary: mask XOR its erosion by the 4-neighbourhood."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~eroded


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D volume; ``file.nii.gz#k`` picks channel k of a 4-D one (BraTS)."""
    name, _, channel = str(path).rpartition("#")
    if name and channel.isdigit():
        img: Any = nib.load(name)
        return np.asarray(img.dataobj[..., int(channel)], dtype=np.float32), img.affine
    return load_volume(path, check_data=False)


def _render_row(
    data: np.ndarray, affine: np.ndarray, mask: tuple[np.ndarray, np.ndarray] | None, cell: int
) -> list[np.ndarray]:
    """Three cells (uint8 palette indices, ``cell`` x ``cell``) for one panel."""
    cdata, caffine = canonical_volume(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), affine)
    slices = plane_slices(cdata, caffine)
    lo, hi = window([s.image for s in slices])
    cells = []
    for s in slices:
        rr, cc = display_grid(s.image.shape, s.pixel_mm, cell)
        gray = _bilinear(s.image.astype(np.float32), rr, cc)
        idx = np.rint(np.clip((gray - lo) / (hi - lo), 0.0, 1.0) * WHITE).astype(np.uint8)
        if mask is not None:
            m = sample_mask(mask[0], mask[1], caffine, s.to_voxel, rr, cc)
            idx[outline(m)] = RED
        out = np.zeros((cell, cell), dtype=np.uint8)
        top, left = (cell - idx.shape[0]) // 2, (cell - idx.shape[1]) // 2
        out[top : top + idx.shape[0], left : left + idx.shape[1]] = idx
        cells.append(out)
    return cells


def _palette() -> list[int]:
    ramp = np.rint(np.arange(WHITE + 1) * 255.0 / WHITE).astype(int)
    pal = np.repeat(ramp[:, None], 3, axis=1).ravel().tolist()
    return pal + list(OUTLINE_RGB)


def _fit(text: str, font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def scan_thumbnails(panels: Sequence[Panel], out_png: str | Path, *, cell: int = CELL_PX) -> Path:
    """Write a PNG of mid-slices, one row per panel, with mask outlines in red.

    Args:
        panels: ``(label, volume_path, mask_path_or_None)`` per row, e.g.
            ``("raw", raw, None)``, ``("brain", brain, mask)``. Volume and mask
            of a panel may be on different grids; they are matched in world
            coordinates.
        out_png: the PNG to write (atomically).
        cell: longest side of each slice in pixels.

    Returns:
        ``Path(out_png)``.

    Example:
        scan_thumbnails([("raw", "raw.nii.gz", None),
                         ("pooled", "pool.nii.gz", "pool_mask.nii.gz")], "qc.png")
    """
    from PIL import Image, ImageDraw, ImageFont

    if not panels:
        raise MedtxError(f"no panels to draw for {out_png}")
    for p in panels:
        if len(p) != 3:
            raise MedtxError(f"a panel is (label, volume, mask or None), not {p!r}")
    paths = list(
        dict.fromkeys(Path(p) for _, vol, mask in panels for p in (vol, mask) if p is not None)
    )
    workers = max(1, min(len(paths), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = dict(zip(paths, pool.map(_load, paths)))

    height, width = thumbnail_shape(len(panels), cell=cell)
    canvas = np.zeros((height, width), dtype=np.uint8)
    texts: list[tuple[int, int, str, int]] = []  # x, y, text, width to centre in (0: left)
    for col, name in enumerate(PLANES):
        texts.append((col * (cell + GAP_PX), 1, name, cell))
    for row, (label, vol, mask_path) in enumerate(panels):
        data, affine = loaded[Path(vol)]
        mask = None
        if mask_path is not None:
            mdata, maffine = loaded[Path(mask_path)]
            mask = (np.nan_to_num(mdata) > 0.5, maffine)
        y = HEADER_PX + row * (LABEL_PX + cell)
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        grid = "x".join(str(n) for n in data.shape) + " @ " + "x".join(f"{z:.3g}" for z in zooms)
        texts.append((2, y + 1, f"{label}   {grid} mm", 0))
        for col, img in enumerate(_render_row(data, affine, mask, cell)):
            x = col * (cell + GAP_PX)
            canvas[y + LABEL_PX : y + LABEL_PX + cell, x : x + cell] = img

    image = Image.frombytes("P", (width, height), canvas.tobytes())
    image.putpalette(_palette())
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no antialiasing: palette indices must not blend
    font = ImageFont.load_default()
    for x, y, text, centre in texts:
        text = _fit(text, font, (centre or width - x) - 2)
        if centre:
            x += max(0, int((centre - font.getlength(text)) / 2))
        draw.text((x, y), text, fill=WHITE, font=font)
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG")
    return Path(out_png)
