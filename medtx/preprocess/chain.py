"""The whole T1 chain for one scan, with the file names the workflow uses.

``medtx preprocess`` and the Snakemake rules name files through
``medtx.workflow.paths.t1_outputs``, so a scan processed either way lands in
the same place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtx.data.scan_ids import SCAN_ID_PATTERN, scan_identity
from medtx.preprocess.backend import require_fsl, resolve_backend
from medtx.preprocess.bet import run_bet
from medtx.preprocess.context import StepContext
from medtx.preprocess.flirt import run_flirt
from medtx.preprocess.intensity import run_normalize, run_pool
from medtx.preprocess.n4 import run_n4
from medtx.provenance.records import merge_scan
from medtx.workflow.paths import step_records, t1_outputs


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

    The ``qc`` entry holds the verdict (``passed``, ``failures``) the scan's
    provenance records: a scan that fails QC is still processed to the end.

    Args:
        settings: the config's ``preprocess`` section (defaults filled in).
        qc: the config's ``qc`` thresholds.
    """
    f = t1_outputs(outdir, ctx.scan)
    ants_backend = ctx.backend == "ants"
    run_bet(
        t1,
        brain_out=f["bet_brain"],
        mask_out=f["bet_mask"],
        record_out=f["bet_record"],
        xfm_out=f["bet_xfm"] if ants_backend else None,
        ctx=ctx,
        params=settings["bet"],
    )
    run_flirt(
        f["bet_brain"],
        f["bet_mask"],
        brain_out=f["flirt_brain"],
        mask_out=f["flirt_mask"],
        xfm_out=f["transform"],
        record_out=f["flirt_record"],
        ctx=ctx,
        params=settings["flirt"],
        xfm_init=f["bet_xfm"] if ants_backend else None,
        t1=t1 if ants_backend else None,
    )
    run_n4(
        f["flirt_brain"],
        f["flirt_mask"],
        n4_out=f["n4"],
        record_out=f["n4_record"],
        ctx=ctx,
        params=settings["n4"],
    )
    run_pool(
        f["n4"],
        f["flirt_mask"],
        image_out=f["pooled"],
        mask_out=f["brain_mask"],
        record_out=f["pool_record"],
        ctx=ctx,
        params=settings["pool"],
    )
    run_normalize(
        f["pooled"],
        f["brain_mask"],
        image_out=f["preproc"],
        record_out=f["normalize_record"],
        ctx=ctx,
        params=settings["normalize"],
        face_margin_mm=(qc or {}).get("face_margin_mm"),
    )
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
