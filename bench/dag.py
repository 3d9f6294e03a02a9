#!/usr/bin/env python
"""Planning benchmark: `snakemake -n all` on synthetic cohorts of growing size.

For 200, 2,000 and 10,000 subjects it writes a CSV dataset whose scans are
symbolic links to one small NIfTI (a dry run needs files to check, not
images to process), then times, side by side:
  first    `snakemake -n all` on a fresh directory (every scan is checked once
           and the scan-table cache written)
  again    the same dry run again (checks come from the cache)
  profile  `snakemake --profile slurm -n all`, the user's command: it adds the
           per-scan groups and the SLURM resources to the plan
  unchanged `snakemake -n all` once every output exists with its Snakemake
           metadata, as after a finished run: it must plan 0 jobs. The outputs
           are made by `snakemake --touch all` with each job's files created
           empty first (setup, not timed; --no-unchanged skips it)
and prints seconds, jobs planned, and seconds per 1,000 jobs, so growth can be
read as linear or not. Target: the 2,000-subject dry run in <= 20 s on 2 cores.

A first line times the fixed cost of any `snakemake -n` (imports, plugin
discovery) on a one-rule workflow. It includes the SLURM executor plugin's
`scontrol show config` at import: instant without SLURM or on a cluster, but
it waits for its 10 s timeout where SLURM is installed and its controller is
down (start tests/slurm/cluster.sh first on such a machine).

    .venv/bin/python bench/dag.py [--sizes 200 2000 10000] [--keep DIR] [--no-unchanged]
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


def snakemake_args(workdir: Path, config: Path) -> list[str]:
    return ["-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(config)]


def dry_run(workdir: Path, config: Path, *, profile: bool = False) -> tuple[float, int]:
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    extra = ["--profile", str(REPO / "slurm")] if profile else []
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "snakemake"),
            *snakemake_args(workdir, config),
            *extra,
            "-n",
            "--quiet",
            "rules",
            "all",
        ],
        capture_output=True,
        text=True,
        env=env,
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


# `snakemake --touch all`, in a child Python: each job's outputs are created
# empty just before Snakemake touches them (it touches only files that exist)
# and records their metadata, and the touch executor's 0.1 s pause per job is
# dropped (hours at 10,000 subjects). Unlimited cores let every ready job start
# in one scheduling round; one core makes the scheduler quadratic.
TOUCH_ALL = """
import sys
from pathlib import Path
from snakemake.cli import main
from snakemake.executors import touch

run_job = touch.Executor.run_job
def create_then_touch(self, job):
    for f in job.output:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).touch()
    return run_job(self, job)
touch.Executor.run_job = create_then_touch
touch.Executor.SLEEPING_TIME = 0
sys.exit(main(sys.argv[1:]))
"""


def make_outputs(workdir: Path, config: Path) -> None:
    """Every output of `all`, empty, with Snakemake's metadata: a finished run."""
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            "-c",
            TOUCH_ALL,
            *snakemake_args(workdir, config),
            "--touch",
            "--cores",
            "1000000",
            "all",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])


def startup(base: Path) -> float:
    """Seconds of `snakemake -n` on a one-rule workflow: the fixed cost of a run."""
    root = base / "startup"
    root.mkdir(parents=True, exist_ok=True)
    (root / "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch {output}"\n')
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "snakemake"),
            "-s",
            str(root / "Snakefile"),
            "-d",
            str(root),
            "-n",
            "--quiet",
            "rules",
        ],
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 10000])
    parser.add_argument("--keep", help="keep the synthetic cohorts here")
    parser.add_argument(
        "--no-unchanged",
        action="store_true",
        help="skip the unchanged-rerun column (its setup touches every output)",
    )
    args = parser.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="medtx-dag-"))
    print(f"# snakemake dry-run planning ({os.cpu_count()} cores)")
    print(f"# fixed cost of any snakemake -n (one-rule workflow): {startup(base):.1f} s")
    print(
        f"{'subjects':>9} {'jobs':>8} {'first s':>8} {'again s':>8} {'profile s':>10}"
        f" {'unchanged s':>12} {'s/1k jobs':>10} {'vs smallest':>12}"
    )
    first_rate = None
    for n in args.sizes:
        root = base / f"n{n}"
        config = make_cohort(root, n)
        first, jobs = dry_run(root, config)
        again, _ = dry_run(root, config)
        with_profile, _ = dry_run(root, config, profile=True)
        unchanged = "-"
        if not args.no_unchanged:
            make_outputs(root, config)
            seconds, left = dry_run(root, config)
            unchanged = f"{seconds:.1f} ({left} jobs)" if left else f"{seconds:.1f}"
        rate = again / max(jobs, 1) * 1000
        first_rate = first_rate or rate
        print(
            f"{n:>9} {jobs:>8} {first:>8.1f} {again:>8.1f} {with_profile:>10.1f}"
            f" {unchanged:>12} {rate:>10.2f} {rate / first_rate:>11.2f}x"
        )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
