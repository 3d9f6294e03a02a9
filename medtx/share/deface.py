"""Defaced native-space T1 copies for sharing: quickshear, then the face check.

``deface`` cuts the face off a raw T1 with quickshear (Schimke & Hale 2011,
the ``quickshear`` package on PyPI): it fits a plane under the brain mask's
convex hull on the face side (seen from the side, the hull's lower edge from
the frontal pole back), lowers it by ``buffer`` voxels and zeroes everything
below it. The brain mask is the one brain extraction (the bet step) already
makes. The copy keeps the T1's grid, header and data type. The face check
(``medtx.provenance.face``) then measures the copy against the same mask and
is judged with the config's ``qc`` face thresholds, and a provenance record
names the tool and its version, the inputs' and output's sha256 and the
verdict. The input is never overwritten.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medtx.errors import MedtxError

# quickshear's own default: voxels between the brain's hull and the cutting plane.
DEFAULT_BUFFER = 10
# Largest difference (mm) between the T1's and the mask's affines for one grid.
AFFINE_TOLERANCE_MM = 1e-3


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def qc_defaults() -> dict[str, Any]:
    """The config schema's ``qc`` defaults (the face thresholds among them)."""
    return copy.deepcopy(_qc_defaults())


@functools.cache
def _qc_defaults() -> dict[str, Any]:
    from medtx.config import load_schema

    section = load_schema()["properties"]["qc"]["properties"]
    return {key: entry["default"] for key, entry in section.items() if "default" in entry}


def _three_d(img: Any, path: Path) -> Any:
    """The image as 3-D (a trailing singleton 4th axis dropped, header kept)."""
    from medtx.errors import BadScanError

    if len(img.shape) == 4 and img.shape[3] == 1:
        return img.slicer[..., 0]
    if len(img.shape) != 3:
        raise BadScanError(path, f"expected a 3-D volume, found shape {img.shape}")
    return img


def _check_paths(t1: Path, mask: Path, out: Path, record_out: Path | None) -> None:
    from medtx.io import is_nifti_path

    if not is_nifti_path(out):
        raise MedtxError(f"{out}: the defaced copy must be a .nii or .nii.gz file")
    for written in (out, record_out):
        if written is None:
            continue
        for given in (t1, mask):
            if _same_file(written, given):
                raise MedtxError(
                    f"{written}: writing there would overwrite the input {given}; "
                    "write the defaced copy and its record elsewhere"
                )
    if record_out is not None and _same_file(record_out, out):
        raise MedtxError(f"{record_out}: the record cannot be the defaced copy's own path")


def deface(
    t1: str | Path,
    brain_mask: str | Path,
    out: str | Path,
    *,
    record_out: str | Path | None = None,
    qc: dict[str, Any] | None = None,
    buffer: int = DEFAULT_BUFFER,
    scan: str | None = None,
) -> dict[str, Any]:
    """Write a defaced copy of ``t1`` to ``out`` (atomically) and return its record.

    Args:
        t1: a native-space T1 (NIfTI; a trailing singleton 4th axis is dropped).
        brain_mask: its brain mask on the same grid (nonzero = brain), e.g. the
            bet step's ``*_desc-brain_mask.nii.gz``.
        out: the defaced copy (.nii or .nii.gz); must not be an input.
        record_out: where to write the provenance record as JSON (optional).
        qc: the config's ``qc`` section; its ``face_*`` keys set the check's
            margin and thresholds (default: the schema's defaults).
        buffer: quickshear's distance (voxels) from the brain's hull to the plane.
        scan: the scan id to put in the record (optional).

    Returns:
        The record: ``tool`` (quickshear and its version), ``inputs`` and
        ``outputs`` with sha256, ``qc`` (``metrics`` of the defaced copy,
        ``checks``, ``passed``) and ``input_face`` (the same figures of the
        T1 as given). A copy that fails the check is still written; the
        caller decides (``record["qc"]["passed"]``).

    Raises:
        MedtxError: a missing or unreadable file, a mask whose shape or affine
            differs from the T1's, an empty mask, or an output path that would
            overwrite an input; one line naming the file and the problem.
    """
    import nibabel as nib
    import quickshear  # type: ignore[import-untyped]

    from medtx.io import atomic_path, load_nifti, load_volume
    from medtx.provenance.face import TISSUE_FRACTION, face_metrics, face_region
    from medtx.provenance.qc import judge_face
    from medtx.provenance.records import (
        SCHEMA_VERSION,
        file_entry,
        package_version,
        tool_versions,
    )

    t0, start = time.perf_counter(), _now()
    t1, mask_path, out = Path(t1), Path(brain_mask), Path(out)
    record_path = Path(record_out) if record_out is not None else None
    _check_paths(t1, mask_path, out, record_path)
    thresholds = {**qc_defaults(), **(qc or {})}
    margin = float(thresholds["face_margin_mm"])

    data, affine = load_volume(t1)
    mask_data, mask_affine = load_volume(mask_path, check_data=False)
    if mask_data.shape != data.shape:
        raise MedtxError(
            f"{mask_path}: brain mask shape {mask_data.shape} differs from the T1's "
            f"{data.shape} ({t1}); it must be the T1's own mask, on its grid"
        )
    off = float(np.abs(np.asarray(mask_affine) - np.asarray(affine)).max())
    if off > AFFINE_TOLERANCE_MM:
        raise MedtxError(
            f"{mask_path}: brain mask affine differs from the T1's ({t1}) by up to "
            f"{off:.3g} mm; it must be the T1's own mask, on its grid"
        )
    brain = mask_data > 0.5
    if not brain.any():
        raise MedtxError(f"{mask_path}: brain mask is empty")
    region = face_region(brain, affine, margin_mm=margin)
    try:
        input_face = face_metrics(data, brain, affine, margin_mm=margin, region=region)
    except MedtxError as err:
        raise MedtxError(f"{t1}: {err}") from err

    anat = _three_d(load_nifti(t1), t1)
    mask_img = nib.Nifti1Image(brain.astype(np.uint8), affine)
    try:
        with warnings.catch_warnings():
            # quickshear 1.2.0 takes np.cross of 2-D vectors, deprecated in NumPy 2.0
            warnings.filterwarnings("ignore", "Arrays of 2-dimensional vectors", DeprecationWarning)
            defaced = quickshear.quickshear(anat, mask_img, buffer)
    except (IndexError, ValueError, FloatingPointError) as err:
        raise MedtxError(f"{mask_path}: quickshear could not fit its plane ({err})") from err
    with atomic_path(out) as tmp:
        nib.save(defaced, str(tmp))

    # The face check of the file as written (its data type and scaling included).
    shared, _ = load_volume(out, check_data=False)
    try:
        metrics: dict[str, Any] = face_metrics(
            shared, brain, affine, margin_mm=margin, region=region
        )
    except MedtxError as err:
        raise MedtxError(f"{out}: {err}") from err
    metrics["face_margin_mm"] = margin
    checks = judge_face(metrics, thresholds)
    version = package_version("quickshear")
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "step": "deface",
        "scan": scan,
        "tool": {"name": "quickshear", "version": version},
        "function": "quickshear.quickshear",
        "arguments": {"buff": buffer},
        "calls": [
            {"function": "quickshear.quickshear", "arguments": {"buff": buffer}},
            {
                "function": "medtx.provenance.face.face_metrics",
                "arguments": {"margin_mm": margin, "tissue_fraction": TISSUE_FRACTION},
            },
        ],
        "params": {"buffer_voxels": buffer, "face_margin_mm": margin},
        "cwd": os.getcwd(),
        "inputs": [file_entry("t1", t1), file_entry("brain_mask", mask_path)],
        "outputs": [file_entry("defaced", out)],
        "versions": {**tool_versions(), "quickshear": version},
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "start": start,
        "end": _now(),
        "duration_s": round(time.perf_counter() - t0, 3),
        "input_face": input_face,
        "qc": {
            "metrics": metrics,
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
            "thresholds": {k: thresholds[k] for k in sorted(thresholds) if k.startswith("face_")},
        },
    }
    if record_path is not None:
        from medtx.io import write_json

        write_json(record, record_path)
    return record
