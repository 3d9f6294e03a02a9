"""The whole T1 chain for one scan, with the file names the workflow uses.

``medtx preprocess`` and the Snakemake rules name files through
``medtx.workflow.paths.t1_outputs``, so a scan processed either way lands in
the same place.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from medtx.data.scan_ids import SCAN_ID_PATTERN, scan_identity
from medtx.errors import MedtxError
from medtx.preprocess import steps
from medtx.preprocess.backend import require_fsl, resolve_backend
from medtx.preprocess.context import StepContext
from medtx.provenance.collect import collect_scan
from medtx.provenance.records import merge_scan
from medtx.workflow.paths import cache_paths, step_records, t1_outputs


def chain_files(t1: str, f: dict[str, str], backend: str) -> list[tuple[str, dict, dict]]:
    """(step, inputs, outputs) of each step, files by the roles ``medtx step``
    names, from the scan's files by ``t1_outputs`` key (and ``cache``, the
    training cache, when the workflow asks for it)."""
    ants = backend == "ants"
    bet_out = {"brain": f["bet_brain"], "mask": f["bet_mask"], "record": f["bet_record"]}
    flirt_in = {"brain": f["bet_brain"], "mask": f["bet_mask"]}
    if ants:  # the head-to-template affine that flirt refines, from the head
        bet_out["xfm"] = f["bet_xfm"]
        flirt_in.update(xfm_init=f["bet_xfm"], t1=t1)
    pool_out = {
        "pooled": f["pooled"],
        "mask": f["brain_mask"],
        "pool_record": f["pool_record"],
        "image": f["preproc"],
        "record": f["normalize_record"],
    }
    if "cache" in f:
        pool_out["cache"] = f["cache"]
    return [
        ("bet", {"t1": t1}, bet_out),
        (
            "flirt",
            flirt_in,
            {
                "brain": f["flirt_brain"],
                "mask": f["flirt_mask"],
                "xfm": f["transform"],
                "record": f["flirt_record"],
            },
        ),
        (
            "n4",
            {"brain": f["flirt_brain"], "mask": f["flirt_mask"]},
            {"n4": f["n4"], "record": f["n4_record"]},
        ),
        ("pool_normalize", {"image": f["n4"], "mask": f["flirt_mask"]}, pool_out),
    ]


def chain_params(settings: dict, backend: str, qc: dict | None = None) -> dict:
    """Each step's params from the config's ``preprocess`` section, as the
    step-per-job rules pass them (so a record made either way has one rerun key)."""
    return {
        "bet": {backend: settings["bet"][backend]},
        "flirt": {backend: settings["flirt"][backend]},
        "n4": settings["n4"],
        "pool_normalize": {
            "pool": settings["pool"],
            "normalize": settings["normalize"],
            "face_margin_mm": (qc or {}).get("face_margin_mm"),
        },
    }


def run_steps(
    t1: str | Path, files: dict[str, str], *, params: dict, ctx: StepContext, log=None
) -> list:
    """bet -> flirt -> n4 -> pool -> normalize, each skipped while its record
    matches (``medtx.preprocess.steps``); after a step that ran, all run.
    Returns the steps that ran; ``log`` gets a line per step."""
    ran: list[str] = []
    for step, inputs, outputs in chain_files(str(t1), files, ctx.backend):
        if steps.run_step(step, inputs, outputs, params[step], ctx, force=bool(ran), log=log):
            ran.append(step)
    return ran


def run_step(i: dict, o: dict, params: dict, ctx: StepContext) -> dict:
    """``medtx step chain``: one workflow job per scan (``preprocess/job_per: scan``).

    ``o`` holds at least ``provenance``, and any file of the chain by its
    ``t1_outputs`` key, and ``cache`` or ``cache_dir`` (the training cache, or
    the folder whose ``cache_paths`` name it); the others are named by
    ``t1_outputs`` in the provenance record's folder. ``params`` holds each
    step's params (``chain_params``) and ``qc``. The files and records are those
    the step-per-job rules write.
    """
    f = {**t1_outputs(Path(o["provenance"]).parent, ctx.scan), **o}
    if "cache_dir" in f:
        if not ctx.dataset:
            raise MedtxError("medtx step chain: --output cache_dir=DIR needs --dataset")
        f["cache"] = cache_paths(f.pop("cache_dir"), ctx.dataset, ctx.scan)["image"]
    # the job's log says which steps ran and which were skipped
    run_steps(i["t1"], f, params=params, ctx=ctx, log=lambda line: print(line, file=sys.stderr))
    return collect_scan(step_records(f), f["provenance"], thumbnail=f["qc_png"], qc=params["qc"])


def run_chain(
    t1: str | Path,
    outdir: str | Path,
    *,
    ctx: StepContext,
    settings: dict,
    qc: dict | None = None,
    subject: str | None = None,
    session: str | None = None,
) -> dict[str, Any]:
    """Run bet -> flirt -> n4 -> pool -> normalize; return role -> written file.

    A step whose record in ``outdir`` shows it already ran on these inputs with
    these settings and code is skipped. The ``qc`` entry holds the verdict
    (``passed``, ``failures``) the scan's provenance records: a scan that fails
    QC is still processed to the end.

    Args:
        settings: the config's ``preprocess`` section (defaults filled in).
        qc: the config's ``qc`` thresholds.
    """
    f = t1_outputs(outdir, ctx.scan)
    run_steps(t1, f, params=chain_params(settings, ctx.backend, qc), ctx=ctx)
    record = merge_scan(
        step_records(f),
        f["provenance"],
        scan=ctx.scan,
        dataset=ctx.dataset or "",
        subject=subject or ctx.scan,
        session=session,
        qc=qc,
    )
    return {
        "preproc": f["preproc"],
        "brain_mask": f["brain_mask"],
        "transform": f["transform"],
        "provenance": f["provenance"],
        "brain_mask_1mm": f["flirt_mask"],
        "n4": f["n4"],
        "native_brain_mask": f["bet_mask"],
        "qc": {"passed": record["qc_passed"], "failures": record["qc_failures"]},
    }


def default_scan_id(t1: str | Path) -> str:
    """``sub-01_ses-2_T1w.nii.gz`` -> ``sub-01_ses-2``; other names -> ``sub-<alnum>``."""
    name = Path(t1).name.split(".")[0].removesuffix("_T1w")
    if SCAN_ID_PATTERN.match(name):
        return name
    return "sub-" + ("".join(c for c in name if c.isalnum()) or "scan")


def preprocess_scan(
    t1: str | Path,
    outdir: str | Path,
    *,
    config: dict,
    backend: str | None = None,
    scan: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``medtx preprocess``: one scan through the chain, outside Snakemake.

    Args:
        config: a loaded, validated config (``medtx.config.load_config``).
        backend: overrides ``preprocess/backend`` (auto, fsl or ants).
        scan: the id used in file names (default: from the file name).
        threads: ITK threads when the config is not deterministic.
    """
    settings = config["preprocess"]
    backend = resolve_backend(backend or settings["backend"])
    if backend == "fsl":
        require_fsl()
    scan = scan or default_scan_id(t1)
    scan_identity(scan)  # a --scan that is not sub-<id>[_ses-<id>] is named here
    ctx = StepContext(
        scan=scan,
        backend=backend,
        seed=config["seed"],
        threads=threads or settings["threads"],
        deterministic=settings["deterministic"],
    )
    return run_chain(t1, outdir, ctx=ctx, settings=settings, qc=config["qc"])
