"""Brain extraction: FSL BET (paper) or, with antspyx, a learned extractor.

The antspyx path first registers the head to the ICBM 2009c head (affine at
8 and 4 mm, from the centres of mass); that affine is where the ``flirt``
step starts. The mask then comes from ``bet/ants/method``: deepbet by
default (``medtx.preprocess.extraction`` says why).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medtx.io import atomic_path, load_volume, save_nifti
from medtx.preprocess.antsio import (
    affine_schedule,
    at_resolution,
    configure_ants,
    read_template,
    registration_scratch,
    to_ants,
)
from medtx.preprocess.context import StepContext
from medtx.provenance.records import package_version


def bet_command(t1: str | Path, brain_out: str | Path, params: dict) -> Any:
    """The nipype BET interface for ``params`` (its ``.cmdline`` is what runs)."""
    from nipype.interfaces import fsl

    fsl.FSLCommand.set_default_output_type("NIFTI_GZ")
    return fsl.BET(
        in_file=str(t1),
        out_file=str(brain_out),
        mask=True,
        frac=float(params.get("frac", 0.5)),
        robust=bool(params.get("robust", True)),
    )


def run_bet(
    t1: str | Path,
    *,
    brain_out: str | Path,
    mask_out: str | Path,
    record_out: str | Path,
    ctx: StepContext,
    params: dict,
    xfm_out: str | Path | None = None,
) -> dict:
    """Extract the brain of one raw T1 scan; write brain, mask and the record.

    Args:
        params: the config's ``preprocess/bet`` section (both backends' keys).
        xfm_out: antspyx only: where the head-to-template affine goes.
    """
    data, affine = load_volume(t1, subject=ctx.subject)
    sub = params.get(ctx.backend, {})
    rec = ctx.record("bet", {ctx.backend: sub})
    rec.add_input("t1", t1)
    metrics = scan_geometry(data.shape, affine)
    if ctx.backend == "fsl":
        mask = _bet_fsl(t1, data, affine, brain_out, mask_out, sub, rec)
    else:
        if xfm_out is None:
            raise ValueError("the ants backend writes a head-to-template transform: give xfm_out")
        mask, head_ncc = _bet_ants(data, affine, brain_out, mask_out, xfm_out, sub, ctx, rec)
        metrics["head_ncc_template"] = head_ncc
    rec.add_output("brain", brain_out)
    rec.add_output("brain_mask", mask_out)
    if xfm_out is not None and ctx.backend == "ants":
        rec.add_output("transform_init", xfm_out)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    metrics["brain_volume_ml"] = round(float(mask.sum()) * voxel_ml, 1)
    rec.set_qc(metrics, [])
    return rec.finish(record_out)


def scan_geometry(shape: tuple[int, ...], affine: np.ndarray) -> dict[str, float]:
    """Smallest and largest voxel edge and field-of-view edge of the raw scan, in mm.

    Read from the header alone, they catch what no image metric can: a
    header in cm or with voxels 10x too large, or a crop too small to hold a
    head, before anyone trusts the registration of such a scan.
    """
    edges = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    fov = edges * np.asarray(shape[:3], dtype=float)
    return {
        "voxel_mm_min": round(float(edges.min()), 3),
        "voxel_mm_max": round(float(edges.max()), 3),
        "fov_mm_min": round(float(fov.min()), 1),
        "fov_mm_max": round(float(fov.max()), 1),
    }


def _bet_fsl(t1, data, affine, brain_out, mask_out, params, rec) -> np.ndarray:
    """BET in a scratch folder beside the outputs, then re-saved into place.

    The output folder is made first (``medtx preprocess --out NEW`` names one
    that does not exist yet). BET reads the input file itself when it is 3-D,
    so the recorded command names a file that outlives the step. The command
    is recorded as its replay: absolute paths, writing BET's own names
    (``<t1>_brain``) beside the outputs, never over them (``medtx audit``
    would then find the step's outputs changed).
    """
    from medtx.io import load_nifti
    from medtx.preprocess.backend import replay_command, require_fsl, run_fsl

    require_fsl()
    t1 = Path(t1).absolute()
    outdir = Path(brain_out).absolute().parent
    outdir.mkdir(parents=True, exist_ok=True)
    version = _fsl_version()
    rec.set_tool("bet", version)
    rec.add_version("fsl", version)
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        src = t1
        # BET needs a 3-D input (a trailing singleton axis is squeezed into a
        # copy); FSL's bet script splits a path with a space (nipype quotes it).
        if len(load_nifti(t1).shape) != 3 or any(c.isspace() for c in str(t1)):
            src = Path(tmp) / "t1.nii.gz"
            save_nifti(data, affine, src)
        out, mask_file = Path(tmp) / "brain.nii.gz", Path(tmp) / "brain_mask.nii.gz"
        run_fsl(
            bet_command(src, out, params),
            source=t1,
            expect=[out, mask_file],
            step="bet",
            scan=rec.data["scan"],
        )
        brain, _ = load_volume(out, check_data=False)
        mask, _ = load_volume(mask_file, check_data=False)
    stem = t1.name.removesuffix(".gz").removesuffix(".nii")
    copied = "" if src == t1 else f"# bet read a 3-D scratch copy of {t1}\n"
    rec.command(copied + replay_command(bet_command(t1, outdir / f"{stem}_brain.nii.gz", params)))
    # Re-save on the input's affine so every output shares one header.
    save_nifti(brain, affine, brain_out)
    save_nifti((mask > 0.5).astype(np.uint8), affine, mask_out, dtype=np.uint8)
    return mask > 0.5


def _bet_ants(data, affine, brain_out, mask_out, xfm_out, params, ctx, rec):
    """Head-to-template affine (flirt's starting point), then the brain mask.

    Returns the mask and the head's NCC with the template after that affine
    (``head_similarity``).
    """
    from medtx.preprocess.extraction import extract

    configure_ants(seed=ctx.seed, threads=ctx.threads, deterministic=ctx.deterministic)
    import ants

    mm = float(params["registration_mm"])
    kw = affine_schedule(params)
    rec.set_tool("antspyx", package_version("antspyx"))
    rec.call(
        "ants.registration",
        fixed=f"ICBM 2009c T1 head at {mm:g} mm",
        moving=f"t1 at {mm:g} mm",
        initial_transform="centres of mass",
        random_seed=ctx.seed,
        **kw,
    )
    with registration_scratch() as outprefix:
        reg = ants.registration(
            fixed=read_template("t1", mm),
            moving=at_resolution(to_ants(data, affine), mm),
            outprefix=outprefix,
            **kw,
        )
        with atomic_path(xfm_out) as tmp:
            shutil.copyfile(reg["fwdtransforms"][0], tmp)
    head_ncc = head_similarity(data, affine, [str(xfm_out)])
    method = params["method"]
    rec.call(f"medtx.preprocess.extraction.extract[{method}]")
    mask, tool, version = extract(
        method, data, affine, head_to_template=xfm_out, threads=ctx.threads
    )
    rec.add_version(tool, version)
    save_nifti(np.where(mask, data, 0.0), affine, brain_out)
    save_nifti(mask.astype(np.uint8), affine, mask_out, dtype=np.uint8)
    return mask, head_ncc


def head_similarity(data: np.ndarray, affine: np.ndarray, transforms: list[str]) -> float:
    """NCC of the head, moved by its head-to-template affine, with the template.

    Scored like ``ncc_template`` (``medtx.preprocess.similarity``) but before
    extraction, so it judges the input itself: noise, an inverted contrast or
    an image that is no head scores near zero or below, whatever mask
    extraction then draws on it.
    """
    import ants

    from medtx.preprocess.similarity import template_similarity

    head = ants.apply_transforms(
        fixed=read_template("t1", 2.0),
        moving=to_ants(data, affine),
        transformlist=list(transforms),
        interpolator="linear",
    )
    score, _ = template_similarity(head.numpy(), radius=0)
    return round(score, 4)


def _fsl_version() -> str | None:
    """BET's version: BET has no version flag, so that of the FSL it came with."""
    from medtx.preprocess.backend import fsl_install_version

    return fsl_install_version()


def run_step(i: dict, o: dict, params: dict, ctx: StepContext) -> dict:
    """``medtx step bet``: the rule's files by role."""
    return run_bet(
        i["t1"],
        brain_out=o["brain"],
        mask_out=o["mask"],
        xfm_out=o.get("xfm"),
        record_out=o["record"],
        ctx=ctx,
        params=params,
    )
