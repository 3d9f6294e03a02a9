"""Helpers the Snakefile needs at parse time (kept here, not in .smk files)."""

from __future__ import annotations

import os


def use_checkout(basedir: str) -> None:
    """Put this checkout first on PYTHONPATH so rules' ``python -m medtx`` runs it.

    Jobs inherit the variable, locally and through SLURM (sbatch exports the
    environment), whichever Python env (.venv or a conda env) runs them.
    """
    parts = [basedir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != basedir]
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
