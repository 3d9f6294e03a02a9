"""Helpers the Snakefile calls at parse time and in its hooks (kept here, not in .smk files)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

from medtx.errors import MedtxError
from medtx.workflow.lock import ResultsLock


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


def take_results_lock(lock: ResultsLock) -> None:
    """``onstart``: hold the results folder, or end the run with one line naming its holder.

    Snakemake's own lock on the working directory is released on the way out,
    and no job has started. Held, it marks every job the run starts (their
    environment carries its token), so a killed Snakemake's lock is not taken
    over while its jobs still run.
    """
    with user_errors():
        lock.acquire()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User mistakes met by the Snakefile as ``medtx: error: ...``, exit status 1.

    Raised while Snakemake reads the workflow or runs a hook, a ``MedtxError``
    would print with Snakemake's file-and-line trail through medtx's modules;
    the message alone names the key, file or row to fix, as the ``medtx``
    command prints it. It goes to the console and the run's log.
    """
    try:
        yield
    except MedtxError as err:
        from snakemake.logging import logger

        logger.error(f"medtx: error: {err}")
        raise SystemExit(1) from None
