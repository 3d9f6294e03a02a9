#!/usr/bin/env python
"""Planning benchmark: `snakemake -n all` on synthetic cohorts of growing size.

For 200, 2,000 and 10,000 subjects it writes a CSV dataset whose scans are
symbolic links to one small NIfTI (a dry run needs files to check, not
images to process), then times, side by side:
  first    `snakemake -n all` on a fresh directory (every scan is checked once
           and the scan-table cache written)
  rerun    the same dry run again (checks come from the cache)
and prints seconds, jobs planned, and seconds per 1,000 jobs, so growth can be
read as linear or not. Target: the 2,000-subject dry run in <= 20 s on 2 cores.

A first line times the fixed cost of any `snakemake -n` (imports, plugin
discovery) on a one-rule workflow. It includes the SLURM executor plugin's
`scontrol show config` at import: instant without SLURM or on a cluster, but
it waits for its 10 s timeout where SLURM is installed and its controller is
down (start tests/slurm/cluster.sh first on such a machine).

    .venv/bin/python bench/dag.py [--sizes 200 2000 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_cohort(root: Path, n: int) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    scans = root / "scans"
    scans.mkdir(parents=True)
    source = scans / "template_T1w.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8), dtype=np.float32), np.eye(4)), str(source))
    lines = ["subject,t1,age,diagnosis"]
    for i in range(n):
        link = scans / f"s{i:05d}.nii.gz"
        os.symlink(source.name, link)
        lines.append(f"s{i:05d},scans/{link.name},{55 + i % 35},{('CN', 'MCI', 'AD')[i % 3]}")
    (root / "cohort.csv").write_text("\n".join(lines) + "\n")
    (root / "config.yaml").write_text(
        "results: results\n"
        "datasets:\n"
        "  cohort:\n"
        "    kind: csv\n"
        "    role: [classification, regression]\n"
        f"    path: {root / 'cohort.csv'}\n"
        "preprocess: {backend: ants}\n"
    )
    return root / "config.yaml"


def dry_run(workdir: Path, config: Path) -> tuple[float, int]:
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(config), "-n", "--quiet", "rules", "all"],
        capture_output=True, text=True, env=env,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    jobs = 0
    for line in proc.stdout.splitlines():
        m = re.match(r"^total\s+(\d+)$", line.strip())
        if m:
            jobs = int(m.group(1))
    return seconds, jobs


def startup(base: Path) -> float:
    """Seconds of `snakemake -n` on a one-rule workflow: the fixed cost of a run."""
    root = base / "startup"
    root.mkdir(parents=True, exist_ok=True)
    (root / "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch {output}"\n')
    t0 = time.perf_counter()
    subprocess.run([str(REPO / ".venv" / "bin" / "snakemake"), "-s", str(root / "Snakefile"),
                    "-d", str(root), "-n", "--quiet", "rules"], capture_output=True, check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 10000])
    parser.add_argument("--keep", help="keep the synthetic cohorts here")
    args = parser.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="medtx-dag-"))
    print(f"# snakemake dry-run planning ({os.cpu_count()} cores)")
    print(f"# fixed cost of any snakemake -n (one-rule workflow): {startup(base):.1f} s")
    print(f"{'subjects':>9} {'jobs':>8} {'first s':>8} {'rerun s':>8} {'s/1k jobs':>10} {'vs smallest':>12}")
    first_rate = None
    for n in args.sizes:
        root = base / f"n{n}"
        config = make_cohort(root, n)
        first, jobs = dry_run(root, config)
        rerun, _ = dry_run(root, config)
        rate = rerun / max(jobs, 1) * 1000
        first_rate = first_rate or rate
        print(f"{n:>9} {jobs:>8} {first:>8.1f} {rerun:>8.1f} {rate:>10.2f} {rate / first_rate:>11.2f}x")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
