"""Brain extraction: FSL BET (paper) or template-mask propagation (antspyx).

The antspyx path registers the head to the ICBM 2009c head template (affine,
at ``registration_mm``) and pulls the template brain mask back into the scan's
space. That affine is kept as the starting point of the brain registration,
so the ``flirt`` step only refines it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medtx.io import atomic_path, load_volume, save_nifti
from medtx.preprocess.antsio import at_resolution, configure_ants, read_template, to_ants
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
    if ctx.backend == "fsl":
        mask = _bet_fsl(t1, data, affine, brain_out, mask_out, sub, rec)
    else:
        if xfm_out is None:
            raise ValueError("the ants backend writes a head-to-template transform: give xfm_out")
        mask = _bet_ants(data, affine, brain_out, mask_out, xfm_out, sub, ctx, rec)
    rec.add_output("brain", brain_out)
    rec.add_output("brain_mask", mask_out)
    if xfm_out is not None and ctx.backend == "ants":
        rec.add_output("transform_init", xfm_out)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    volume = round(float(mask.sum()) * voxel_ml, 1)
    rec.set_qc({"brain_volume_ml": volume}, [])
    return rec.finish(record_out)


def _bet_fsl(t1, data, affine, brain_out, mask_out, params, rec) -> np.ndarray:
    from medtx.preprocess.backend import require_fsl

    require_fsl()
    with tempfile.TemporaryDirectory(dir=Path(brain_out).parent) as tmp:
        # BET needs a 3-D input: a trailing singleton axis is squeezed first.
        src = Path(tmp) / "t1.nii.gz"
        save_nifti(data, affine, src)
        out = Path(tmp) / "brain.nii.gz"
        bet = bet_command(src, out, params)
        rec.set_tool("fsl", _fsl_version())
        rec.command(bet.cmdline)
        bet.run()
        brain, _ = load_volume(out, check_data=False)
        mask, _ = load_volume(Path(tmp) / "brain_mask.nii.gz", check_data=False)
    # Re-save on the input's affine so every output shares one header.
    save_nifti(brain, affine, brain_out)
    save_nifti((mask > 0.5).astype(np.uint8), affine, mask_out, dtype=np.uint8)
    return mask > 0.5


def _bet_ants(data, affine, brain_out, mask_out, xfm_out, params, ctx, rec) -> np.ndarray:
    configure_ants(seed=ctx.seed, threads=ctx.threads, deterministic=ctx.deterministic)
    import ants

    mm = float(params.get("registration_mm", 2.0))
    kind = params.get("type_of_transform", "AffineFast")
    rec.set_tool("antspyx", package_version("antspyx"))
    head = to_ants(data, affine)
    fixed = read_template("t1", mm)
    rec.call(
        "ants.registration",
        fixed=f"ICBM 2009c T1 head at {mm:g} mm",
        moving=f"t1 at {mm:g} mm",
        type_of_transform=kind,
        random_seed=ctx.seed,
    )
    reg = ants.registration(fixed=fixed, moving=at_resolution(head, mm), type_of_transform=kind)
    rec.call(
        "ants.apply_transforms",
        fixed="t1",
        moving="ICBM 2009c brain mask",
        whichtoinvert=[True],
        interpolator="nearestNeighbor",
    )
    mask_img = ants.apply_transforms(
        fixed=head,
        moving=read_template("brain_mask"),
        transformlist=reg["fwdtransforms"],
        whichtoinvert=[True],
        interpolator="nearestNeighbor",
    )
    mask = mask_img.numpy() > 0.5
    save_nifti(np.where(mask, data, 0.0), affine, brain_out)
    save_nifti(mask.astype(np.uint8), affine, mask_out, dtype=np.uint8)
    with atomic_path(xfm_out) as tmp:
        shutil.copyfile(reg["fwdtransforms"][0], tmp)
    return mask


def _fsl_version() -> str | None:
    from medtx.provenance.records import fsl_version

    return fsl_version()


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
