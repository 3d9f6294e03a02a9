"""``medtx audit``: re-hash recorded outputs, flag changed and missing files."""

from __future__ import annotations

import numpy as np
import pytest

import medtx.provenance.audit
from medtx.io import save_nifti
from medtx.provenance.audit import audit, audit_outputs, format_audit, main_audit
from medtx.provenance.records import StepRecord, merge_scan


def make_scan(root, scan, *, relative=False):
    """A scan with steps bet -> n4 whose outputs are real files with real sha256."""
    d = root / "results" / "preprocess" / "demo" / scan
    rng = np.random.default_rng(sum(map(ord, scan)))
    raw = save_nifti(rng.normal(size=(6, 6, 6)), np.eye(4), d / "raw.nii.gz")
    files = {}
    for step, prev in (("bet", raw), ("n4", None)):
        out = save_nifti(rng.normal(size=(6, 6, 6)), np.eye(4), d / f"{step}.nii.gz")
        rec = StepRecord(step, scan=scan, backend="ants", params={}, seed=42, dataset="demo")
        rec.add_input("in", prev or files["bet"])
        rec.add_output(step, out.relative_to(root) if relative else out)
        if step == "bet":
            rec.add_output("mask", save_nifti(np.ones((6, 6, 6)), np.eye(4), d / "mask.nii.gz"))
        rec.finish(d / f"{step}.json")
        files[step] = out
    merge_scan(
        [d / "bet.json", d / "n4.json"],
        d / f"{scan}_provenance.json",
        scan=scan,
        dataset="demo",
        subject=scan[4:],
        session=None,
    )
    return files


@pytest.fixture
def cohort(tmp_path):
    return {s: make_scan(tmp_path, s) for s in ("sub-01", "sub-02")}


def test_untouched_outputs_pass(tmp_path, cohort, capsys):
    problems, n_files = audit_outputs(tmp_path)
    assert problems == [] and n_files == 6  # 2 scans x (brain, mask, n4)
    assert main_audit(str(tmp_path)) == 0
    assert "all 6 recorded output file(s) match" in capsys.readouterr().out


def test_changed_and_missing_outputs_are_flagged(tmp_path, cohort, capsys):
    n4 = cohort["sub-01"]["n4"]
    n4.write_bytes(n4.read_bytes() + b"\0")  # modified after it was recorded
    cohort["sub-02"]["bet"].unlink()
    problems = {p["status"]: p for p in audit(tmp_path)}
    assert set(problems) == {"changed", "missing"}
    changed, missing = problems["changed"], problems["missing"]
    assert (changed["scan"], changed["step"], changed["path"]) == ("sub-01", "n4", str(n4))
    assert changed["current_sha256"] != changed["recorded_sha256"]
    assert len(changed["current_sha256"]) == 64
    assert (missing["scan"], missing["step"]) == ("sub-02", "bet")
    assert missing["current_sha256"] is None and len(missing["recorded_sha256"]) == 64
    assert missing["provenance"].endswith("sub-02_provenance.json")

    assert main_audit(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and "MISSING" in out and str(n4) in out
    assert out.strip().splitlines()[-1].startswith("audit: 2 problem(s) among 6")


def test_explicit_json_list_and_loaded_records(tmp_path, cohort):
    cohort["sub-01"]["bet"].unlink()
    jsons = sorted(tmp_path.rglob("*_provenance.json"))
    assert len(audit(jsons)) == 1
    assert audit([jsons[1]]) == []  # sub-02 only
    import json

    assert len(audit([json.loads(p.read_text()) for p in jsons])) == 1


def test_each_file_hashed_once(tmp_path, cohort, monkeypatch):
    import json

    calls = []
    real = medtx.provenance.audit.sha256
    monkeypatch.setattr(medtx.provenance.audit, "sha256", lambda p: calls.append(p) or real(p))
    jsons = sorted(tmp_path.rglob("*_provenance.json"))
    records = [json.loads(p.read_text()) for p in jsons]
    problems, n = audit_outputs(records + records)  # every output named twice
    assert problems == [] and n == 6 and len(calls) == 6


def test_relative_paths_resolve_against_base_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workflow records paths relative to where it runs
    make_scan(tmp_path, "sub-03", relative=True)
    assert audit("results") == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert audit(tmp_path, base_dir=tmp_path) == []
    assert {p["status"] for p in audit(tmp_path)} == {"missing"}  # cwd is wrong: said so


def test_format_audit():
    assert "all 3 recorded" in format_audit([], 3)
    text = format_audit(
        [
            {
                "path": "a.nii.gz",
                "scan": "s",
                "step": "n4",
                "status": "missing",
                "recorded_sha256": "f" * 64,
                "current_sha256": None,
            }
        ],
        3,
    )
    assert text.splitlines()[0].startswith("MISSING  a.nii.gz  (scan s, step n4)")
    assert "1 changed" not in text and "0 changed, 1 missing" in text


def test_main_audit_bad_roots(tmp_path, capsys):
    assert main_audit(str(tmp_path / "nope")) == 1
    assert "does not exist" in capsys.readouterr().out
    assert main_audit(str(tmp_path)) == 1
    assert "no *_provenance.json" in capsys.readouterr().out
    (tmp_path / "x_provenance.json").write_text("{")
    assert main_audit(str(tmp_path)) == 1
    assert "x_provenance.json" in capsys.readouterr().out
