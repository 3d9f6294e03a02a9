"""Reading scans with checks on entry, and writing outputs atomically.

Loaders check what later steps silently assume (3-D, finite, not constant,
an invertible affine) and raise ``BadScanError`` naming the file, so a bad scan
fails in one clear line rather than inside a registration.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medtx.errors import BadScanError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_nifti(path: str | Path, *, subject: str | None = None) -> nib.Nifti1Image:
    """Load a NIfTI header and check that it is a readable NIfTI file."""
    path = Path(path)
    if not path.exists():
        raise BadScanError(path, "file does not exist", subject=subject)
    if not is_nifti_path(path):
        raise BadScanError(path, "not a NIfTI file (expected .nii or .nii.gz)", subject=subject)
    try:
        img = nib.load(str(path))
    except (
        nib.filebasedimages.ImageFileError,
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
    ) as err:
        raise BadScanError(path, f"not a readable NIfTI file ({err})", subject=subject) from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadScanError(path, f"not a NIfTI image ({type(img).__name__})", subject=subject)
    return img


def check_affine(affine: np.ndarray, path: str | Path, *, subject: str | None = None) -> None:
    """A voxel-to-world affine must be finite and invertible."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise BadScanError(
            path, f"affine shape must be (4, 4), not {affine.shape}", subject=subject
        )
    if not np.all(np.isfinite(affine)):
        raise BadScanError(path, "affine has NaN or Inf entries", subject=subject)
    det = np.linalg.det(affine[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-6:
        raise BadScanError(
            path, f"affine is zero or not invertible (|det| = {abs(det):.3g})", subject=subject
        )


def load_volume(
    path: str | Path, *, subject: str | None = None, check_data: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D scan as (float32 data, affine), checked on entry.

    A trailing singleton 4th axis (116x150x155x1, as some converters write) is
    dropped; any other 2-D or 4-D shape is an error.
    """
    img = load_nifti(path, subject=subject)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadScanError(
            path,
            f"expected a 3-D volume, found {len(img.shape)}-D data of shape {img.shape}",
            subject=subject,
        )
    if min(shape) < 2:
        raise BadScanError(path, f"expected a 3-D volume, found shape {img.shape}", subject=subject)
    _check_voxel_size(path, subject)
    affine = img.affine
    check_affine(affine, path, subject=subject)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise BadScanError(
            path, f"truncated or corrupt image data ({err})", subject=subject
        ) from err
    if check_data:
        check_voxels(data, path, subject=subject)
    return data, affine


def _check_voxel_size(path: str | Path, subject: str | None) -> None:
    """Refuse zero voxel sizes when no sform/qform overrides them.

    nibabel silently replaces a zero pixdim by 1 mm on load, which would give
    a scan of unknown size a made-up geometry; read the raw header instead.
    """
    if not str(path).endswith(".nii.gz") and not str(path).endswith(".nii"):
        return
    with nib.openers.ImageOpener(str(path)) as fh:
        raw = nib.Nifti1Header.from_fileobj(fh, check=False)
    if int(raw["sform_code"]) == 0 and int(raw["qform_code"]) == 0:
        zooms = [float(z) for z in raw["pixdim"][1:4]]
        if any(z == 0 for z in zooms) or not all(np.isfinite(zooms)):
            raise BadScanError(
                path,
                f"voxel size is zero or invalid ({zooms}) and no "
                "sform/qform gives the geometry: affine is zero or not invertible",
                subject=subject,
            )


def check_voxels(data: np.ndarray, path: str | Path, *, subject: str | None = None) -> None:
    """Voxels must be finite and not all equal (an all-zero image is empty)."""
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise BadScanError(path, f"{bad} voxel(s) are NaN or Inf", subject=subject)
    if not np.any(data):
        raise BadScanError(path, "image is all zeros", subject=subject)
    if float(data.max()) == float(data.min()):
        raise BadScanError(
            path, f"image is constant (every voxel = {float(data.max()):g})", subject=subject
        )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    A crash or a killed job leaves the previous file (or none), never a
    half-written one that a rerun would mistake for a result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def link_or_copy(src: str | Path, dst: str | Path) -> bool:
    """Hard-link ``src`` to ``dst`` (True), or copy it where linking fails (False).

    Raises ``FileNotFoundError`` when ``src`` does not exist.
    """
    try:
        os.link(src, dst)
        return True
    except FileNotFoundError:
        raise
    except OSError:  # another filesystem, links not allowed, too many links
        shutil.copyfile(src, dst)
        return False


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path, *, dtype=np.float32) -> Path:
    """Write a NIfTI atomically with sform and qform set to ``affine``, in mm."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm")  # the affine is in mm; BIDS tools read the unit
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
