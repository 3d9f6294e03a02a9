"""N4 bias-field correction (antspyx), fitted inside the brain mask.

Masking is both faster (~12 s vs ~40 s at 193x229x193) and better: the
background and the skull-stripped border carry no bias information.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtx.io import load_volume, save_nifti
from medtx.preprocess.antsio import configure_ants, to_ants
from medtx.preprocess.context import StepContext
from medtx.provenance.records import package_version


def n4_arguments(params: dict) -> dict:
    """ants.n4_bias_field_correction keyword arguments from the config section
    (its defaults are the schema's, filled in by ``load_config``)."""
    return {
        "shrink_factor": int(params["shrink_factor"]),
        "convergence": {"iters": list(params["iterations"]), "tol": float(params["tol"])},
        "spline_param": float(params["spline_distance_mm"]),
    }


def run_n4(
    brain: str | Path,
    mask: str | Path,
    *,
    n4_out: str | Path,
    record_out: str | Path,
    ctx: StepContext,
    params: dict,
) -> dict:
    """Correct the bias field; the record keeps the field's range in the brain."""
    configure_ants(seed=ctx.seed, threads=ctx.threads, deterministic=ctx.deterministic)
    import ants

    data, affine = load_volume(brain, subject=ctx.subject)
    mask_data, _ = load_volume(mask, subject=ctx.subject, check_data=False)
    inside = mask_data > 0.5
    rec = ctx.record("n4", dict(params))
    rec.set_tool("antspyx", package_version("antspyx"))
    rec.add_input("brain", brain)
    rec.add_input("brain_mask", mask)
    kwargs = n4_arguments(params)
    masked = bool(params["masked"])
    rec.call(
        "ants.n4_bias_field_correction",
        mask="brain_mask" if masked else None,
        return_bias_field=True,
        **kwargs,
    )
    field = ants.n4_bias_field_correction(
        to_ants(data, affine),
        mask=to_ants(inside.astype(np.float32), affine) if masked else None,
        return_bias_field=True,
        **kwargs,
    ).numpy()
    corrected = np.where(inside, data / np.maximum(field, 1e-6), 0.0).astype(np.float32)
    save_nifti(corrected, affine, n4_out)
    rec.add_output("n4", n4_out)
    # Percentiles, not min/max: single voxels at the mask border swing widely.
    lo, hi = (float(v) for v in np.percentile(field[inside], [1, 99]))
    ratio = hi / lo if lo > 0 else float("inf")
    metrics = {"bias_p1": round(lo, 4), "bias_p99": round(hi, 4), "bias_ratio": round(ratio, 4)}
    rec.set_qc(metrics, [])
    return rec.finish(record_out)


def run_step(i: dict, o: dict, params: dict, ctx: StepContext) -> dict:
    """``medtx step n4``: the rule's files by role."""
    return run_n4(
        i["brain"], i["mask"], n4_out=o["n4"], record_out=o["record"], ctx=ctx, params=params
    )
