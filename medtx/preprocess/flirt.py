"""Affine registration of the brain to the ICBM 2009c brain (1 mm grid).

FSL FLIRT (12 dof, correlation ratio) on the paper's path; antspyx ``Affine``
otherwise, started from the head-to-template affine of the bet step and run
at 2 mm (the model's input is 2 mm after pooling, so finer levels cost time
without changing it). Outputs are on the 193x229x193 template grid.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medtx.data.templates import template_path
from medtx.io import atomic_path, load_volume, save_nifti
from medtx.preprocess.antsio import (
    at_resolution,
    configure_ants,
    from_ants,
    ncc,
    read_template,
    to_ants,
)
from medtx.preprocess.context import StepContext
from medtx.preprocess.intensity import average_pool
from medtx.provenance.records import package_version


def flirt_command(brain: str | Path, out: str | Path, matrix_out: str | Path, params: dict):
    """The nipype FLIRT interface for ``params`` (its ``.cmdline`` is what runs)."""
    from nipype.interfaces import fsl

    fsl.FSLCommand.set_default_output_type("NIFTI_GZ")
    r = int(params.get("searchr", 90))
    return fsl.FLIRT(
        in_file=str(brain),
        reference=str(template_path("t1_brain")),
        out_file=str(out),
        out_matrix_file=str(matrix_out),
        dof=int(params.get("dof", 12)),
        cost=params.get("cost", "corratio"),
        searchr_x=[-r, r],
        searchr_y=[-r, r],
        searchr_z=[-r, r],
        interp=params.get("interp", "trilinear"),
    )


def apply_xfm_command(mask: str | Path, matrix: str | Path, out: str | Path):
    """FLIRT -applyxfm of the brain mask with nearest-neighbour interpolation."""
    from nipype.interfaces import fsl

    fsl.FSLCommand.set_default_output_type("NIFTI_GZ")
    return fsl.FLIRT(
        in_file=str(mask),
        reference=str(template_path("t1_brain")),
        out_file=str(out),
        apply_xfm=True,
        in_matrix_file=str(matrix),
        out_matrix_file=str(Path(out).with_suffix("").with_suffix(".mat")),
        interp="nearestneighbour",
    )


def run_flirt(
    brain: str | Path,
    mask: str | Path,
    *,
    brain_out: str | Path,
    mask_out: str | Path,
    xfm_out: str | Path,
    record_out: str | Path,
    ctx: StepContext,
    params: dict,
    xfm_init: str | Path | None = None,
) -> dict:
    """Register a native-space brain to the template; write brain, mask, transform.

    With antspyx, ``xfm_init`` (the bet step's head-to-template affine) is the
    starting point; without it the registration starts from image centres.
    """
    data, affine = load_volume(brain, subject=ctx.subject)
    mask_data, _ = load_volume(mask, subject=ctx.subject, check_data=False)
    sub = params.get(ctx.backend, {})
    rec = ctx.record("flirt", {ctx.backend: sub})
    rec.add_input("brain", brain)
    rec.add_input("brain_mask", mask)
    if ctx.backend == "fsl":
        warped, warped_mask = _flirt_fsl(brain, mask, xfm_out, sub, rec)
    else:
        if xfm_init is not None:
            rec.add_input("transform_init", xfm_init)
        warped, warped_mask = _flirt_ants(data, affine, mask_data, xfm_init, xfm_out, sub, ctx, rec)
    tpl_affine = _template_affine()
    save_nifti(warped * warped_mask, tpl_affine, brain_out)
    save_nifti(warped_mask.astype(np.uint8), tpl_affine, mask_out, dtype=np.uint8)
    for role, path in (("brain", brain_out), ("brain_mask", mask_out), ("transform", xfm_out)):
        rec.add_output(role, path)
    metrics = registration_qc(warped, warped_mask)
    rec.set_qc(metrics, [])
    return rec.finish(record_out)


def registration_qc(warped: np.ndarray, warped_mask: np.ndarray) -> dict[str, float]:
    """NCC with the template brain at 2 mm, and mask overlap with the template mask.

    At 2 mm (the model's resolution) the NCC measures alignment rather than
    individual 1 mm folding patterns.
    """
    tpl, _ = load_volume(template_path("t1_brain"), check_data=False)
    tpl_mask, _ = load_volume(template_path("brain_mask"), check_data=False)
    tpl_mask = tpl_mask > 0.5
    pooled_mask = average_pool(tpl_mask.astype(np.float32), 2) > 0.5
    score = ncc(average_pool(warped, 2), average_pool(tpl, 2), pooled_mask)
    inter = np.logical_and(warped_mask, tpl_mask).sum()
    dice = 2.0 * inter / (warped_mask.sum() + tpl_mask.sum())
    return {"ncc_template": round(score, 4), "dice_template_mask": round(float(dice), 4)}


def _template_affine() -> np.ndarray:
    import nibabel as nib

    img: Any = nib.load(str(template_path("t1_brain")))
    return img.affine


def _flirt_fsl(brain, mask, xfm_out, params, rec):
    from medtx.preprocess.backend import require_fsl
    from medtx.provenance.records import fsl_version

    require_fsl()
    rec.set_tool("fsl", fsl_version())
    with tempfile.TemporaryDirectory(dir=Path(xfm_out).parent) as tmp:
        out, mat = Path(tmp) / "brain.nii.gz", Path(tmp) / "brain.mat"
        flirt = flirt_command(brain, out, mat, params)
        rec.command(flirt.cmdline)
        flirt.run()
        apply = apply_xfm_command(mask, mat, Path(tmp) / "mask.nii.gz")
        rec.command(apply.cmdline)
        apply.run()
        warped, _ = load_volume(out, check_data=False)
        warped_mask, _ = load_volume(Path(tmp) / "mask.nii.gz", check_data=False)
        with atomic_path(xfm_out) as dst:
            shutil.copyfile(mat, dst)
    return warped, warped_mask > 0.5


def _flirt_ants(data, affine, mask_data, xfm_init, xfm_out, params, ctx, rec):
    configure_ants(seed=ctx.seed, threads=ctx.threads, deterministic=ctx.deterministic)
    import ants

    mm = float(params.get("registration_mm", 2.0))
    kw = {
        "type_of_transform": params.get("type_of_transform", "Affine"),
        "aff_iterations": tuple(params.get("aff_iterations", (100, 50))),
        "aff_shrink_factors": tuple(params.get("aff_shrink_factors", (2, 1))),
        "aff_smoothing_sigmas": tuple(params.get("aff_smoothing_sigmas", (1, 0))),
    }
    rec.set_tool("antspyx", package_version("antspyx"))
    moving = to_ants(data, affine)
    rec.call(
        "ants.registration",
        fixed=f"ICBM 2009c T1 brain at {mm:g} mm",
        moving=f"brain at {mm:g} mm",
        initial_transform="transform_init" if xfm_init else None,
        random_seed=ctx.seed,
        **kw,
    )
    reg = ants.registration(
        fixed=read_template("t1_brain", mm),
        moving=at_resolution(moving, mm),
        initial_transform=[str(xfm_init)] if xfm_init else None,
        **kw,
    )
    fixed = read_template("t1_brain")
    rec.call(
        "ants.apply_transforms",
        fixed="ICBM 2009c T1 brain (1 mm)",
        moving="brain",
        interpolator="linear",
    )
    warped = ants.apply_transforms(
        fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"], interpolator="linear"
    )
    rec.call(
        "ants.apply_transforms",
        fixed="ICBM 2009c T1 brain (1 mm)",
        moving="brain_mask",
        interpolator="nearestNeighbor",
    )
    warped_mask = ants.apply_transforms(
        fixed=fixed,
        moving=to_ants(mask_data, affine),
        transformlist=reg["fwdtransforms"],
        interpolator="nearestNeighbor",
    )
    with atomic_path(xfm_out) as dst:
        shutil.copyfile(reg["fwdtransforms"][0], dst)
    return from_ants(warped)[0], warped_mask.numpy() > 0.5


def run_step(i: dict, o: dict, params: dict, ctx: StepContext) -> dict:
    """``medtx step flirt``: the rule's files by role."""
    return run_flirt(
        i["brain"],
        i["mask"],
        brain_out=o["brain"],
        mask_out=o["mask"],
        xfm_out=o["xfm"],
        record_out=o["record"],
        ctx=ctx,
        params=params,
        xfm_init=i.get("xfm_init"),
    )
