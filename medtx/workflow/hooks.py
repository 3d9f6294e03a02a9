"""Helpers the Snakefile needs at parse time (kept here, not in .smk files)."""

from __future__ import annotations

import gc
import os


def use_checkout(basedir: str) -> None:
    """Put this checkout first on PYTHONPATH so rules' ``python -m medtx`` runs it.

    Jobs inherit the variable, locally and through SLURM (sbatch exports the
    environment), whichever Python env (.venv or a conda env) runs them.
    """
    parts = [basedir] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != basedir
    ]
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


# CPython collects its youngest generation every 700 net allocations, and every
# pass walks objects that are still alive. Planning a 2,000-subject DAG creates
# millions of objects that all stay alive (jobs, files, wildcards), so with the
# defaults about 12 % of `snakemake -n all` went to collections that free
# nothing (bench/dag.py). Rarer passes while planning; defaults for the run.
PLANNING_GC_THRESHOLDS = (100_000, 50, 100)
RUN_GC_THRESHOLDS = gc.get_threshold()


def plan_with_fewer_gc_passes() -> None:
    """Raise the garbage collector's thresholds while Snakemake builds the DAG.

    Only collections of reference cycles are deferred; objects without cycles
    are still freed at once. ``restore_gc`` (the workflow's ``onstart``) puts
    the usual thresholds back before the first job runs.
    """
    gc.set_threshold(*PLANNING_GC_THRESHOLDS)


def restore_gc() -> None:
    """The thresholds this process started with, for a run that may take days."""
    gc.set_threshold(*RUN_GC_THRESHOLDS)
