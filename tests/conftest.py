"""Shared fixtures: tiny synthetic NIfTI volumes with fixed seeds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.2, 1.2, 1.2, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def sphere(shape=(20, 24, 20), radius=7.0, seed=0) -> np.ndarray:
    """A bright noisy sphere on a dark background, float32."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2.0
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    return (np.where(dist < radius, 100.0, 5.0) + rng.normal(0, 1, shape)).astype(np.float32)


@pytest.fixture
def tiny_t1(tmp_path) -> Path:
    return write_nifti(tmp_path / "sub-01_T1w.nii.gz", sphere())


@pytest.fixture
def medtx_env() -> dict:
    """Environment whose PATH finds the venv's medtx and snakemake."""
    env = dict(os.environ)
    bindir = str(Path(shutil.which("python") or "").parent)
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join([venv_bin, bindir, env.get("PATH", "")])
    return env


# The learning tier (tests/learning): its option and its summary live here, in the
# conftest the pytest-xdist controller loads (a sub-folder's is loaded by workers only).
LEARNING_SECTION = "learnability"


def pytest_addoption(parser):
    parser.addoption(
        "--broken",
        choices=["labels"],
        default=None,
        help="learning tier: train and select on shuffled labels (every check must then fail)",
    )


def pytest_terminal_summary(terminalreporter):
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for key, value in getattr(report, "user_properties", [])
        if key == LEARNING_SECTION
    ]
    if lines:
        terminalreporter.write_sep("-", "learnability: test metric beside the cohort's ceiling")
        for line in sorted(lines, key=lambda line: line.split(":")[0]):
            terminalreporter.write_line(line)
