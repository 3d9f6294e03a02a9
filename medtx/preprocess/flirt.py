"""Affine registration to the ICBM 2009c template (outputs on its 1 mm grid).

FSL FLIRT (12 dof, correlation ratio) on the paper's path. With antspyx the
head is registered again, starting from the bet step's head affine, with the
metric (correlation by default) counted inside the template brain only: the
scalp, neck and field of view then no longer pull the brain off, which on
real heads removed a 2-4 mm offset (bench/registration.py). The template is
sampled at 8, 4, 2 and 1 mm against the scan at its own resolution:
block-averaging the scan on its own grid first smoothed each pose
differently and cost consistency between poses, and the short last level at
1 mm is what brought the error below the full-resolution ANTs reference's.
The brain and its mask follow the transform onto the 193x229x193 grid.
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
    affine_schedule,
    at_resolution,
    configure_ants,
    from_ants,
    read_template,
    registration_scratch,
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
    t1: str | Path | None = None,
) -> dict:
    """Register a native-space brain to the template; write brain, mask, transform.

    With antspyx the head ``t1`` is registered, starting from ``xfm_init``
    (the bet step's head-to-template affine), with the metric restricted to
    the template brain; the brain and its mask then follow the transform.
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
        if t1 is None or xfm_init is None:
            raise ValueError("the ants backend registers the head: give t1 and xfm_init")
        rec.add_input("t1", t1)
        rec.add_input("transform_init", xfm_init)
        head, head_affine = load_volume(t1, subject=ctx.subject)
        warped, warped_mask = _flirt_ants(
            data, affine, mask_data, (head, head_affine), xfm_init, xfm_out, sub, ctx, rec
        )
    tpl_affine = _template_affine()
    save_nifti(warped * warped_mask, tpl_affine, brain_out)
    save_nifti(warped_mask.astype(np.uint8), tpl_affine, mask_out, dtype=np.uint8)
    for role, path in (("brain", brain_out), ("brain_mask", mask_out), ("transform", xfm_out)):
        rec.add_output(role, path)
    metrics = registration_qc(warped, warped_mask)
    rec.set_qc(metrics, [])
    return rec.finish(record_out)


def registration_qc(warped: np.ndarray, warped_mask: np.ndarray) -> dict[str, float]:
    """Checks that fail when registration fails, on the registered brain at 2 mm.

    ``ncc_template``: NCC with the template in its eroded brain core;
    ``misalignment_mm``: length of the integer shift (2 mm voxels) that would
    raise that NCC, 0 when the brain is where the template's is;
    ``dice_template_mask``: overlap of the scan's own brain mask with the
    template's, which an extractor's mask on noise or an inverted head misses
    (it tells nothing with ``bet/ants/method: template``: the mask is then the
    template's, moved to the scan and back).
    """
    from medtx.preprocess.similarity import shift_mm, template_similarity

    score, shift = template_similarity(average_pool(warped, 2))
    tpl_mask, _ = load_volume(template_path("brain_mask"), check_data=False)
    tpl_mask = tpl_mask > 0.5
    inter = np.logical_and(warped_mask, tpl_mask).sum()
    dice = 2.0 * inter / (warped_mask.sum() + tpl_mask.sum())
    return {
        "ncc_template": round(score, 4),
        "misalignment_mm": shift_mm(shift),
        "dice_template_mask": round(float(dice), 4),
    }


def _template_affine() -> np.ndarray:
    import nibabel as nib

    img: Any = nib.load(str(template_path("t1_brain")))
    return img.affine


def _flirt_fsl(brain, mask, xfm_out, params, rec):
    """FLIRT and its mask resampling in a scratch folder beside the outputs.

    The output folder is made first (it may not exist yet). The commands are
    recorded as their replay: absolute paths to the kept inputs, template and
    transform, writing nipype's default names (``<in>_flirt``) beside the
    outputs, never over them. The tool's version is FLIRT's own
    (``flirt -version``), not FSL's.
    """
    from medtx.preprocess.backend import (
        fsl_install_version,
        fsl_program_version,
        replay_command,
        require_fsl,
        run_fsl,
    )

    require_fsl()
    brain, mask, xfm_out = Path(brain).absolute(), Path(mask).absolute(), Path(xfm_out).absolute()
    outdir = xfm_out.parent
    outdir.mkdir(parents=True, exist_ok=True)
    rec.set_tool("flirt", fsl_program_version("flirt"))
    rec.add_version("fsl", fsl_install_version())
    who = {"step": "flirt", "scan": rec.data["scan"]}
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        out, mat = Path(tmp) / "brain.nii.gz", Path(tmp) / "brain.mat"
        warped_mask_file = Path(tmp) / "mask.nii.gz"
        run_fsl(flirt_command(brain, out, mat, params), source=brain, expect=[out, mat], **who)
        apply = apply_xfm_command(mask, mat, warped_mask_file)
        run_fsl(apply, source=mask, expect=[warped_mask_file], **who)
        warped, _ = load_volume(out, check_data=False)
        warped_mask, _ = load_volume(warped_mask_file, check_data=False)
        with atomic_path(xfm_out) as dst:
            shutil.copyfile(mat, dst)

    def replay_name(path: Path, ext: str) -> Path:
        return outdir / f"{path.name.removesuffix('.gz').removesuffix('.nii')}_flirt{ext}"

    flirt = flirt_command(brain, replay_name(brain, ".nii.gz"), replay_name(brain, ".mat"), params)
    rec.command(replay_command(flirt))
    rec.command(replay_command(apply_xfm_command(mask, xfm_out, replay_name(mask, ".nii.gz"))))
    return warped, warped_mask > 0.5


def _flirt_ants(data, affine, mask_data, head, xfm_init, xfm_out, params, ctx, rec):
    configure_ants(seed=ctx.seed, threads=ctx.threads, deterministic=ctx.deterministic)
    import ants

    mm = float(params["registration_mm"])
    kw = affine_schedule(params)
    rec.set_tool("antspyx", package_version("antspyx"))
    masked = bool(params["brain_masked"])
    rec.call(
        "ants.registration",
        fixed=f"ICBM 2009c T1 head at {mm:g} mm",
        moving=f"t1 at {mm:g} mm" if params["pool_moving"] else "t1",
        mask=f"ICBM 2009c brain mask at {mm:g} mm" if masked else None,
        initial_transform="transform_init",
        random_seed=ctx.seed,
        **kw,
    )
    moving = to_ants(*head)
    if params["pool_moving"]:
        moving = at_resolution(moving, mm)
    with registration_scratch() as outprefix:
        reg = ants.registration(
            fixed=read_template("t1", mm),
            moving=moving,
            mask=read_template("brain_mask", mm).threshold_image(0.5, 2) if masked else None,
            initial_transform=[str(xfm_init)],
            outprefix=outprefix,
            **kw,
        )
        with atomic_path(xfm_out) as dst:
            shutil.copyfile(reg["fwdtransforms"][0], dst)
    fixed = read_template("t1_brain")
    rec.call(
        "ants.apply_transforms",
        fixed="ICBM 2009c T1 brain (1 mm)",
        moving="brain",
        interpolator="linear",
    )
    warped = ants.apply_transforms(
        fixed=fixed,
        moving=to_ants(data, affine),
        transformlist=[str(xfm_out)],
        interpolator="linear",
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
        transformlist=[str(xfm_out)],
        interpolator="nearestNeighbor",
    )
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
        t1=i.get("t1"),
    )
