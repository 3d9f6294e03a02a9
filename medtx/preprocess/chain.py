"""The whole T1 chain for one scan, with the file names the workflow uses.

``medtx preprocess`` and the Snakemake rules name files through
``t1_outputs`` so a scan processed either way lands in the same place.
"""

from __future__ import annotations

from pathlib import Path

from medtx.preprocess.bet import run_bet
from medtx.preprocess.context import StepContext
from medtx.preprocess.flirt import run_flirt
from medtx.preprocess.intensity import run_normalize, run_pool
from medtx.preprocess.n4 import run_n4
from medtx.provenance import merge_scan, step_file
from medtx.templates import TEMPLATE_NAME

SPACE = f"space-{TEMPLATE_NAME}"


def t1_outputs(outdir: str | Path, scan: str) -> dict[str, str]:
    """Every file of the chain for ``scan``, BIDS-derivatives style."""
    d = Path(outdir)
    p = f"{scan}_"
    names = {
        "bet_brain": f"{p}desc-brain_T1w.nii.gz",
        "bet_mask": f"{p}desc-brain_mask.nii.gz",
        "bet_xfm": f"{p}from-T1w_to-{TEMPLATE_NAME}_desc-init_xfm.mat",
        "bet_record": f"{p}step-bet.json",
        "flirt_brain": f"{p}{SPACE}_desc-brain_T1w.nii.gz",
        "flirt_mask": f"{p}{SPACE}_desc-brain_mask.nii.gz",
        "transform": f"{p}from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.mat",
        "flirt_record": f"{p}step-flirt.json",
        "n4": f"{p}{SPACE}_desc-n4_T1w.nii.gz",
        "n4_record": f"{p}step-n4.json",
        "pooled": f"{p}{SPACE}_res-2_desc-pooled_T1w.nii.gz",
        "brain_mask": f"{p}{SPACE}_res-2_desc-brain_mask.nii.gz",
        "pool_record": f"{p}step-pool.json",
        "preproc": f"{p}{SPACE}_res-2_desc-preproc_T1w.nii.gz",
        "normalize_record": f"{p}step-normalize.json",
        "provenance": f"{p}provenance.json",
        "qc_png": f"{p}qc.png",
    }
    return {k: str(d / v) for k, v in names.items()}


def step_records(files: dict[str, str]) -> list[str]:
    return [files[f"{s}_record"] for s in ("bet", "flirt", "n4", "pool", "normalize")]


# QC thumbnail rows: (label, image, mask), each file named by the step that
# recorded it, as (step, direction, role).
T1_PANELS = (
    ("raw + brain mask", ("bet", "inputs", "t1"), ("bet", "outputs", "brain_mask")),
    ("affine to template", ("flirt", "outputs", "brain"), ("flirt", "outputs", "brain_mask")),
    ("N4", ("n4", "outputs", "n4"), ("n4", "inputs", "brain_mask")),
    ("model input 2 mm", ("normalize", "outputs", "preproc"),
     ("normalize", "inputs", "brain_mask")),
)


def t1_panels(steps: list[dict]) -> list[tuple[str, str, str]]:
    """The T1 chain's thumbnail rows, with the files the step records name."""
    def find(step: str, direction: str, role: str) -> str:
        return step_file(steps, step, role, direction=direction)

    return [(label, find(*image), find(*mask)) for label, image, mask in T1_PANELS]


def run_chain(t1: str | Path, outdir: str | Path, *, ctx: StepContext, settings: dict,
              qc: dict | None = None, subject: str | None = None,
              session: str | None = None) -> dict[str, str]:
    """Run bet -> flirt -> n4 -> pool -> normalize; return role -> written file.

    Args:
        settings: the config's ``preprocess`` section (defaults filled in).
        qc: the config's ``qc`` thresholds.
    """
    f = t1_outputs(outdir, ctx.scan)
    ants_backend = ctx.backend == "ants"
    run_bet(t1, brain_out=f["bet_brain"], mask_out=f["bet_mask"], record_out=f["bet_record"],
            xfm_out=f["bet_xfm"] if ants_backend else None, ctx=ctx, params=settings["bet"])
    run_flirt(f["bet_brain"], f["bet_mask"], brain_out=f["flirt_brain"], mask_out=f["flirt_mask"],
              xfm_out=f["transform"], record_out=f["flirt_record"], ctx=ctx,
              params=settings["flirt"], xfm_init=f["bet_xfm"] if ants_backend else None)
    run_n4(f["flirt_brain"], f["flirt_mask"], n4_out=f["n4"], record_out=f["n4_record"], ctx=ctx,
           params=settings["n4"])
    run_pool(f["n4"], f["flirt_mask"], image_out=f["pooled"], mask_out=f["brain_mask"],
             record_out=f["pool_record"], ctx=ctx, params=settings["pool"])
    run_normalize(f["pooled"], f["brain_mask"], image_out=f["preproc"],
                  record_out=f["normalize_record"], ctx=ctx, params=settings["normalize"])
    merge_scan(step_records(f), f["provenance"], scan=ctx.scan, dataset=ctx.dataset or "",
               subject=subject or ctx.scan, session=session, qc=qc)
    return {
        "preproc": f["preproc"],
        "brain_mask": f["brain_mask"],
        "transform": f["transform"],
        "provenance": f["provenance"],
        "brain_mask_1mm": f["flirt_mask"],
        "n4": f["n4"],
        "native_brain_mask": f["bet_mask"],
    }
