"""Which preprocessing backend runs: FSL (the paper's path) or antspyx.

``auto`` picks FSL when its programs are installed, so a user on a cluster with
FSL gets the paper's BET/FLIRT without changing the config, and a laptop
without FSL still runs. The choice is recorded in every provenance record.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medtx.errors import ConfigError, ToolNotFoundError

BACKENDS = ("auto", "fsl", "ants")


def fsl_program(name: str) -> str | None:
    """Path of an FSL program from PATH or $FSLDIR/bin, or None."""
    found = shutil.which(name)
    if found:
        return found
    fsldir = os.environ.get("FSLDIR")
    if fsldir and (Path(fsldir) / "bin" / name).exists():
        return str(Path(fsldir) / "bin" / name)
    return None


def fsl_available() -> bool:
    return all(fsl_program(p) for p in ("bet", "flirt"))


def resolve_backend(name: str) -> str:
    """Turn ``auto | fsl | ants`` into the backend that will run."""
    if name not in BACKENDS:
        raise ConfigError(
            f"config key 'preprocess/backend': {name!r} is not one of {list(BACKENDS)}"
        )
    if name == "auto":
        return "fsl" if fsl_available() else "ants"
    return name


def require_fsl() -> None:
    """Fail up front, with what to do, when the fsl backend has no FSL."""
    missing = [p for p in ("bet", "flirt") if not fsl_program(p)]
    if missing:
        raise ToolNotFoundError(
            f"backend 'fsl' needs FSL, but {', '.join(missing)} is not on PATH and FSLDIR "
            f"is {os.environ.get('FSLDIR') or 'unset'}; install FSL (or `module load fsl`) "
            "or set preprocess/backend to 'ants' or 'auto'"
        )
