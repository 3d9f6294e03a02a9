"""Reading scans with checks on entry, and writing outputs atomically.

Loaders check what later steps silently assume (3-D, finite, not constant,
an invertible affine) and raise ``BadScanError`` naming the file, so a bad scan
fails in one clear line rather than inside a registration.

Reads are bounded before anything is allocated: the size the header declares
is checked against ``MEDTX_MAX_IMAGE_BYTES`` (default 2 GiB), a .nii.gz that
would expand more than 1000:1 is refused unread, and the rest is streamed
through in chunks to check its length (and emptiness) before the volume is
read, so a forged header or a gzip bomb costs a few MB, not a MemoryError.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medtx.errors import BadScanError, MedtxError

NIFTI_SUFFIXES = (".nii", ".nii.gz")

MAX_IMAGE_BYTES_ENV = "MEDTX_MAX_IMAGE_BYTES"
# 5x a 0.5 mm head (512x512x400 voxels, 0.4 GiB as float32): 536M float32 voxels.
DEFAULT_MAX_IMAGE_BYTES = 2 << 30
# Deflate tops out near 1032:1 (runs of one byte); scans compress 2-50:1, masks a few
# hundred. Below the floor even an all-zero image is cheap to stream through.
MAX_GZIP_RATIO = 1000
GZIP_RATIO_FLOOR = 64 << 20
TRAILING_SLACK = 1 << 20  # bytes after the declared data tolerated in a .nii.gz
_CHUNK = 4 << 20
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def max_image_bytes() -> int:
    """The largest image a loader reads, from ``$MEDTX_MAX_IMAGE_BYTES`` (bytes, or 4G, 500M).

    Counted as voxels x max(itemsize, 4): loaders make a float32 copy, so an
    int16 scan costs its float32 size and a float64 one its own.
    """
    raw = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_BYTES
    match = _SIZE.fullmatch(raw)
    value = 0.0
    if match:
        value = float(match.group(1)) * 1024 ** " kmgt".find(match.group(2).lower())
    if value < 1:
        raise MedtxError(
            f"{MAX_IMAGE_BYTES_ENV}={raw!r}: not a size in bytes (e.g. 4294967296 or 4G)"
        )
    return int(value)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def is_nifti_path(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_nifti(path: str | Path, *, subject: str | None = None) -> nib.Nifti1Image:
    """Load a NIfTI header and check that it is a readable NIfTI file of a size we
    can hold (``check_declared_size``); no voxel data is read."""
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
        nib.spatialimages.HeaderDataError,  # e.g. dim[0] outside 1..7 reads as a bad byte order
    ) as err:
        raise BadScanError(path, f"not a readable NIfTI file ({err})", subject=subject) from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadScanError(path, f"not a NIfTI image ({type(img).__name__})", subject=subject)
    check_declared_size(img, path, subject=subject)
    return img


def check_declared_size(
    img: nib.Nifti1Image, path: str | Path, *, subject: str | None = None
) -> None:
    """Refuse, from the header alone, dimensions no scan has and sizes we will not allocate.

    A 54-byte .nii.gz can declare 2000^3 float32 (30 GiB); reading it would end
    in a MemoryError. A .nii.gz whose declared size is over 1000 times the
    file's (past a 64 MiB floor) is a bomb, an empty image or a truncated file.
    """
    hdr = img.header
    dims = [int(d) for d in hdr["dim"]]
    if not 1 <= dims[0] <= 7:
        raise BadScanError(
            path, f"header dim[0] = {dims[0]}: a NIfTI image has 1 to 7 axes", subject=subject
        )
    shape = dims[1 : dims[0] + 1]
    if any(d < 1 for d in shape):
        raise BadScanError(
            path,
            f"header declares shape {tuple(shape)}: every axis needs 1 voxel or more",
            subject=subject,
        )
    dtype = hdr.get_data_dtype()
    voxels = int(np.prod(shape, dtype=object))
    need = voxels * max(dtype.itemsize, 4)
    limit = max_image_bytes()
    if need > limit:
        raise BadScanError(
            path,
            f"header declares {'x'.join(map(str, shape))} {dtype.name} voxels: {_size(need)} "
            f"to read, more than the {_size(limit)} limit ({MAX_IMAGE_BYTES_ENV})",
            subject=subject,
        )
    if str(path).endswith(".gz"):
        declared = _data_offset(img) + voxels * dtype.itemsize
        packed = max(Path(path).stat().st_size, 1)
        if declared > GZIP_RATIO_FLOOR and declared > MAX_GZIP_RATIO * packed:
            raise BadScanError(
                path,
                f"gzip expands {declared / packed:.0f}:1 ({_size(declared)} declared from "
                f"{_size(packed)}), more than the {MAX_GZIP_RATIO}:1 a scan compresses: "
                "an empty, forged or truncated image",
                subject=subject,
            )


def _data_offset(img: nib.Nifti1Image) -> int:
    """Where the voxels start in the file (a loaded image's header says 0 until saved)."""
    return int(getattr(img.dataobj, "offset", 0) or img.header.get_data_offset())


def _stream_gzip(
    img: nib.Nifti1Image, path: str | Path, *, subject: str | None, check_data: bool
) -> None:
    """Inflate a .nii.gz a chunk at a time before it is read whole: its length must
    be what the header declares, and (``check_data``) its voxels not all zero.

    Memory stays at one chunk, so a stream longer than declared stops early and
    an empty image is named without its float32 copy being made.
    """
    hdr = img.header
    offset = _data_offset(img)
    declared = offset + int(np.prod(img.shape, dtype=object)) * hdr.get_data_dtype().itemsize
    seen, nonzero = 0, False
    try:
        with gzip.open(str(path), "rb") as fh:
            while block := fh.read(_CHUNK):
                if not nonzero:  # the voxel bytes of this block, header and tail left out
                    start, stop = max(offset - seen, 0), max(declared - seen, 0)
                    voxels = np.frombuffer(block, np.uint8)[start:stop]
                    nonzero = bool(voxels.any())
                seen += len(block)
                if seen > declared + TRAILING_SLACK:
                    raise BadScanError(
                        path,
                        f"gzip decompresses to more than the {_size(declared)} its header "
                        "declares; stopped reading",
                        subject=subject,
                    )
    except (OSError, EOFError, zlib.error) as err:
        raise BadScanError(
            path, f"truncated or corrupt gzip after {_size(seen)} ({err})", subject=subject
        ) from err
    if seen < declared:
        raise BadScanError(
            path,
            f"truncated: {_size(seen)} of the {_size(declared)} its header declares",
            subject=subject,
        )
    if check_data and not nonzero:
        inter = float(getattr(img.dataobj, "inter", 0.0))  # nibabel moved scl_* off the header
        if not inter:
            raise BadScanError(path, "image is all zeros", subject=subject)
        raise BadScanError(path, f"image is constant (every voxel = {inter:g})", subject=subject)


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
    if str(path).endswith(".gz"):
        _stream_gzip(img, path, subject=subject, check_data=check_data)
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
