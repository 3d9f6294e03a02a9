"""The FSL backend run against a fake FSL: folders, PATH, errors, records, versions.

FSL is not installable here, so ``$FSLDIR/bin`` holds small programs named
``bet`` and ``flirt`` that take FSL's arguments and write files of the right
kind (or fail the way FSL does). Only ``$FSLDIR`` points at them, never PATH,
as on a cluster where FSL's setup script was not sourced.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from medtx.errors import ToolFailedError
from medtx.io import sha256
from medtx.preprocess.backend import fsl_environment, resolve_backend
from medtx.preprocess.bet import run_bet
from medtx.preprocess.context import StepContext
from medtx.preprocess.flirt import run_flirt
from medtx.provenance.records import StepRecord, merge_steps
from medtx.provenance.report import build_report, methods_paragraph
from tests.conftest import REPO, sphere, write_nifti

FSL_VERSION = "6.0.7.9"

# BET: brain = voxels above 50 (the test sphere), mask beside it as `-m` asks.
# It refuses to run without FSLOUTPUTTYPE, and logs its cwd and arguments.
GOOD_BET = f"""#!{sys.executable}
import os, sys
import nibabel as nib, numpy as np
if os.environ.get("FSLOUTPUTTYPE") != "NIFTI_GZ":
    sys.exit("bet: FSLOUTPUTTYPE is not NIFTI_GZ")
with open(os.environ["FAKE_FSL_LOG"], "a") as log:
    log.write(os.getcwd() + "\\t" + "\\t".join(sys.argv) + "\\n")
src, out = sys.argv[1], sys.argv[2]
img = nib.load(src)
data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
mask = (data > 50).astype(np.uint8)
nib.save(nib.Nifti1Image(data * mask, img.affine), out)
if "-m" in sys.argv:
    nib.save(nib.Nifti1Image(mask, img.affine), out.replace(".nii.gz", "_mask.nii.gz"))
"""

# FLIRT: prints its own version; otherwise the output is the reference itself
# and the matrix the identity (-applyxfm reads its -init like FLIRT does).
GOOD_FLIRT = f"""#!{sys.executable}
import sys
import nibabel as nib
args = sys.argv[1:]
if args == ["-version"]:
    print("FLIRT version 6.0")
    sys.exit(0)
opt = dict(zip(args, args[1:]))
open(opt["-in"]).close()
if "-init" in opt:
    open(opt["-init"]).close()
nib.save(nib.load(opt["-ref"]), opt["-out"])
if "-omat" in opt:
    open(opt["-omat"], "w").write("1 0 0 0\\n0 1 0 0\\n0 0 1 0\\n0 0 0 1\\n")
"""

FAILING_BET = """#!/bin/sh
echo "** ERROR (nifti_image_read): failed to read image" >&2
echo "Image Exception : #22 :: Failed to read volume" >&2
exit 1
"""

SILENT_BET = "#!/bin/sh\nexit 0\n"

# Writes everything FLIRT should, then exits 1: nipype itself says nothing.
LATE_FAILING_FLIRT = (
    GOOD_FLIRT + 'sys.stderr.write("Warning: singular matrix\\nERROR: registration failed\\n")\n'
    "sys.exit(1)\n"
)

SETTINGS = {
    "backend": "fsl",
    "bet": {"fsl": {"frac": 0.5, "robust": True}},
    "flirt": {"fsl": {"dof": 12, "cost": "corratio"}},
    "n4": {"shrink_factor": 4},
    "pool": {"factor": 2},
    "normalize": {"method": "minmax"},
}


@pytest.fixture
def fake_fsl(tmp_path, monkeypatch):
    """Install fake FSL programs under a fresh ``$FSLDIR`` (not on PATH)."""
    fsldir = tmp_path / "fsl"
    (fsldir / "bin").mkdir(parents=True)
    (fsldir / "etc").mkdir()
    (fsldir / "etc" / "fslversion").write_text(f"{FSL_VERSION}:1a2b3c4d\n")
    monkeypatch.setenv("FSLDIR", str(fsldir))
    monkeypatch.setenv("FAKE_FSL_LOG", str(tmp_path / "fsl-calls.log"))

    def install(bet: str = GOOD_BET, flirt: str = GOOD_FLIRT) -> Path:
        for name, text in (("bet", bet), ("flirt", flirt)):
            program = fsldir / "bin" / name
            program.write_text(text)
            program.chmod(0o755)
        return fsldir

    return install


def fsl_ctx() -> StepContext:
    return StepContext(scan="sub-01", backend="fsl", subject="01")


def bet_and_flirt(t1, outdir) -> tuple[dict, dict]:
    """The chain's first two steps on the fsl backend, named as the chain names them."""
    from medtx.workflow.paths import t1_outputs

    f = t1_outputs(outdir, "sub-01")
    params = {"bet": {"fsl": {"frac": 0.5}}, "flirt": {"fsl": {"dof": 12}}}
    bet = run_bet(
        t1,
        brain_out=f["bet_brain"],
        mask_out=f["bet_mask"],
        record_out=f["bet_record"],
        ctx=fsl_ctx(),
        params=params["bet"],
    )
    flirt = run_flirt(
        f["bet_brain"],
        f["bet_mask"],
        brain_out=f["flirt_brain"],
        mask_out=f["flirt_mask"],
        xfm_out=f["transform"],
        record_out=f["flirt_record"],
        ctx=fsl_ctx(),
        params=params["flirt"],
    )
    return bet, flirt


def test_fsl_under_fsldir_only_runs(fake_fsl, tiny_t1, tmp_path):
    """$FSLDIR/bin off PATH: auto picks FSL, so the commands must find it too."""
    fsldir = fake_fsl()
    assert str(fsldir / "bin") not in os.environ["PATH"].split(os.pathsep)
    assert resolve_backend("auto") == "fsl"
    env = fsl_environment()
    assert env["FSLOUTPUTTYPE"] == "NIFTI_GZ"
    assert env["PATH"].split(os.pathsep)[0] == str(fsldir / "bin")
    bet, flirt = bet_and_flirt(tiny_t1, tmp_path / "out")
    assert bet["qc"]["metrics"]["brain_volume_ml"] > 0
    assert nib.load(flirt["outputs"][0]["path"]).shape == (193, 229, 193)


def test_preprocess_into_a_new_folder(fake_fsl, tiny_t1, tmp_path, capsys):
    """--out names a folder that does not exist: made before the scratch folder in it."""
    from medtx.cli import main

    fake_fsl(flirt="#!/bin/sh\necho 'flirt: ERROR: cannot open reference' >&2\nexit 1\n")
    new = tmp_path / "new" / "dir"
    code = main(["preprocess", str(tiny_t1), "--out", str(new), "--backend", "fsl"])
    err = capsys.readouterr().err
    assert code == 1, err  # a tool's failure, not an unexpected FileNotFoundError (2)
    assert (new / "sub-01_desc-brain_T1w.nii.gz").exists()  # bet ran in the new folder
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"medtx: error: scan sub-01, step flirt: flirt failed on "
        f"{new / 'sub-01_desc-brain_T1w.nii.gz'}: exit status 1: "
        "flirt: ERROR: cannot open reference"
    )
    assert not [p for p in new.iterdir() if p.is_dir()]  # no scratch folder left behind


def test_failing_bet_is_one_error_line(fake_fsl, tiny_t1, tmp_path, medtx_env):
    """The real command: exit 1 and one `medtx: error:` line, no nipype traceback."""
    fake_fsl(bet=FAILING_BET)
    env = dict(os.environ, PATH=medtx_env["PATH"])
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "medtx"), "preprocess", str(tiny_t1)]
        + ["--out", str(tmp_path / "out"), "--backend", "fsl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        f"medtx: error: scan sub-01, step bet: bet failed on {tiny_t1}: exit status 1: "
        "Image Exception : #22 :: Failed to read volume"
    ], done.stderr


def test_tool_that_writes_nothing_fails(fake_fsl, tiny_t1, tmp_path):
    fake_fsl(bet=SILENT_BET)
    with pytest.raises(
        ToolFailedError,
        match=r"step bet: bet failed on .*sub-01_T1w\.nii\.gz: "
        r"it wrote no brain\.nii\.gz, brain_mask\.nii\.gz$",
    ):
        bet_and_flirt(tiny_t1, tmp_path / "out")


def test_tool_that_exits_non_zero_fails_even_with_its_files(fake_fsl, tiny_t1, tmp_path):
    """nipype returns quietly when FLIRT exits 1 after writing its outputs."""
    fake_fsl(flirt=LATE_FAILING_FLIRT)
    with pytest.raises(
        ToolFailedError,
        match=r"step flirt: flirt failed on .*: exit status 1: ERROR: registration failed$",
    ) as err:
        bet_and_flirt(tiny_t1, tmp_path / "out")
    assert "\n" not in str(err.value)


def _paths(line: str) -> tuple[list[str], list[str]]:
    """A recorded command's (files read, files written)."""
    args = shlex.split(line)
    if args[0] == "bet":
        return [args[1]], [args[2]]
    opt = dict(zip(args, args[1:]))
    reads = [opt[k] for k in ("-in", "-ref", "-init") if k in opt]
    return reads, [opt[k] for k in ("-out", "-omat") if k in opt]


@pytest.mark.parametrize("four_d", [False, True], ids=["3d", "4d-singleton"])
def test_recorded_commands_replay(fake_fsl, tmp_path, monkeypatch, four_d):
    """Absolute paths of kept files; replayed, they write beside the outputs, not over them."""
    fake_fsl()
    data = sphere()
    write_nifti(tmp_path / "raw" / "sub-01_T1w.nii.gz", data[..., None] if four_d else data)
    monkeypatch.chdir(tmp_path)
    bet, flirt = bet_and_flirt("raw/sub-01_T1w.nii.gz", "out")  # relative, as Snakemake gives

    log = (tmp_path / "fsl-calls.log").read_text().splitlines()
    cwd, _, bet_in = log[0].split("\t")[:3]
    read = (Path(cwd) / bet_in).resolve()
    assert (read == tmp_path / "raw" / "sub-01_T1w.nii.gz") is not four_d  # BET read the scan

    # outputs are recorded as given, relative to the recorded cwd
    kept = {str(tmp_path / e["path"]): e["sha256"] for r in (bet, flirt) for e in r["outputs"]}
    for record in (bet, flirt):
        assert record["cwd"] == str(tmp_path)
        lines = [ln for ln in record["command"].splitlines() if not ln.startswith("#")]
        assert len(lines) == (1 if record["step"] == "bet" else 2)
        for line in lines:
            reads, writes = _paths(line)
            assert all(Path(p).is_absolute() and Path(p).exists() for p in reads), line
            assert all(Path(p).parent == tmp_path / "out" for p in writes), line
            assert not set(writes) & set(kept), line
    assert ("# bet read a 3-D scratch copy" in bet["command"]) is four_d
    assert f"-init {tmp_path}/out/sub-01_from-" in flirt["command"]  # the kept transform

    # Replay from elsewhere: every command runs, and the step outputs are untouched.
    monkeypatch.chdir(tmp_path / "raw")
    env = dict(os.environ, **fsl_environment())
    for record in (bet, flirt):
        subprocess.run(["sh", "-ec", record["command"]], check=True, env=env)
    assert {p: sha256(p) for p in kept} == kept


def test_each_tool_has_its_own_version(fake_fsl, tiny_t1, tmp_path):
    fake_fsl()
    bet, flirt = bet_and_flirt(tiny_t1, tmp_path / "out")
    assert bet["tool"] == {"name": "bet", "version": FSL_VERSION}
    assert flirt["tool"] == {"name": "flirt", "version": "6.0"}
    assert bet["versions"]["fsl"] == flirt["versions"]["fsl"] == FSL_VERSION

    scan = merge_steps([bet, flirt], tmp_path / "p.json")
    html = build_report([scan], [], SETTINGS, tmp_path / "r.html", base_dir=tmp_path).read_text()
    assert f"FSL BET {FSL_VERSION} (" in html
    assert "FSL FLIRT 6.0 (" in html and f"FLIRT {FSL_VERSION}" not in html
    assert f"FSL {FSL_VERSION}." in html  # the install, in the software list
    assert f"(run from {tmp_path})" in html or f"(run from {os.getcwd()})" in html


def test_fsl_on_path_without_fsldir_is_still_versioned(fake_fsl, tiny_t1, tmp_path, monkeypatch):
    fsldir = fake_fsl()
    monkeypatch.delenv("FSLDIR")
    monkeypatch.setenv("PATH", f"{fsldir / 'bin'}{os.pathsep}{os.environ['PATH']}")
    bet, flirt = bet_and_flirt(tiny_t1, tmp_path / "out")
    assert bet["tool"]["version"] == bet["versions"]["fsl"] == FSL_VERSION
    assert flirt["tool"]["version"] == "6.0"


def test_ants_records_list_no_fsl(fake_fsl):
    """$FSLDIR set, FSL installed, but the ants backend ran: no FSL version."""
    fake_fsl()
    rec = StepRecord("n4", scan="sub-01", backend="ants", params={}, seed=1)
    assert "fsl" not in rec.data["versions"]
    # records written before this fix listed it; the ants methods text ignores it
    ants = methods_paragraph(dict(SETTINGS, backend="ants"), {"fsl": FSL_VERSION})
    assert "FSL" not in ants
    fsl = methods_paragraph(SETTINGS, {"fsl": FSL_VERSION})
    assert f"FSL BET {FSL_VERSION}" in fsl and f"FSL {FSL_VERSION}." in fsl


def test_old_records_keep_bet_version_but_not_flirts():
    """A record with one FSL version still cites BET's; FLIRT's is not FSL's."""
    text = methods_paragraph(SETTINGS, {"fsl": FSL_VERSION})
    assert f"FSL BET {FSL_VERSION}" in text and f"FSL FLIRT {FSL_VERSION}" not in text
