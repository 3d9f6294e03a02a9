"""``medtx audit``: outputs re-hashed, records checked against their manifests."""

from __future__ import annotations

import numpy as np
import pytest

import medtx.provenance.audit
from medtx.cli import main
from medtx.io import save_nifti
from medtx.provenance.audit import audit, format_audit, main_audit, run_audit
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
    result = run_audit(tmp_path)
    assert result.problems == [] and result.n_files == 6  # 2 scans x (brain, mask, n4)
    assert (result.n_scans, result.n_records) == (2, 6)  # 2 merged + 4 step records
    assert main_audit(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "audit: OK: all 6 recorded output file(s) match" in out and "unsigned" in out


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
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("CHANGED    scan sub-01, step n4: output n4 " + str(n4))
    assert lines[1].startswith("MISSING    scan sub-02, step bet: output bet ")
    assert lines[-1].startswith("audit: 2 problem(s) in 2 of 2 scan(s): 1 changed, 1 missing")


def test_explicit_file_list(tmp_path, cohort):
    cohort["sub-01"]["bet"].unlink()
    jsons = sorted(tmp_path.rglob("*_provenance.json"))
    assert len(audit(jsons)) == 1
    assert audit([jsons[1]]) == []  # sub-02 only
    with pytest.raises(ValueError, match="not a \\*_provenance.json record"):
        audit([cohort["sub-01"]["n4"]])


def test_each_file_hashed_once(tmp_path, cohort, monkeypatch):
    calls = []
    real = medtx.provenance.audit.sha256
    monkeypatch.setattr(medtx.provenance.audit, "sha256", lambda p: calls.append(p) or real(p))
    jsons = sorted(tmp_path.rglob("*_provenance.json"))
    result = run_audit(jsons + jsons + [tmp_path])  # every scan named three times
    assert result.problems == [] and result.n_files == 6 and len(calls) == 6


def test_relative_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workflow records paths relative to where it runs
    make_scan(tmp_path, "sub-03", relative=True)
    assert audit("results") == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert audit(tmp_path) == []  # the records keep their cwd
    assert audit(tmp_path, base_dir=tmp_path) == []
    wrong = audit(tmp_path, base_dir=elsewhere)  # --base says where: said so if wrong
    assert {p["status"] for p in wrong} == {"missing"}
    assert f"looked at {elsewhere}" in wrong[0]["message"]


def test_format_audit():
    result = medtx.provenance.audit.AuditResult(n_scans=1, n_records=2, n_files=3)
    assert "all 3 recorded output file(s) match" in format_audit(result)
    result.problems = [
        {"status": "missing", "scan": "s", "step": "n4", "message": "output n4 a.nii.gz is gone"},
        {"status": "qc", "scan": "s", "step": None, "message": "qc_passed is True, but ..."},
    ]
    lines = format_audit(result).splitlines()
    assert lines[0] == "MISSING    scan s, step n4: output n4 a.nii.gz is gone"
    assert lines[1] == "QC         scan s: qc_passed is True, but ..."
    assert lines[2].startswith("audit: 2 problem(s) in 1 of 1 scan(s): 1 missing, 1 qc (")


def test_bad_roots_are_one_line_errors(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nope")]) == 1
    assert "medtx: error: provenance root does not exist" in capsys.readouterr().err
    assert main(["audit", str(tmp_path)]) == 1
    assert "medtx: error: no *_provenance.json" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--base", str(tmp_path / "nope")]) == 1
    assert "--base" in capsys.readouterr().err


def test_unreadable_record_is_a_problem_among_others(tmp_path, cohort, capsys):
    (tmp_path / "x_provenance.json").write_text("{")
    assert main_audit(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "UNREADABLE scan x: " in out and "x_provenance.json" in out
    assert "scan sub-01" not in out  # the others were still audited, and are fine


def test_records_without_a_manifest_are_unchained(tmp_path, cohort):
    (tmp_path / "results/preprocess/demo/sub-01/sub-01_manifest.jsonl").unlink()
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"]) == ("unchained", "sub-01")
    assert "no record manifest sub-01_manifest.jsonl" in problem["message"]


def test_a_step_rerun_after_collect_is_stale_until_collect_reruns(tmp_path, cohort):
    d = tmp_path / "results/preprocess/demo/sub-01"
    rec = StepRecord("n4", scan="sub-01", backend="ants", params={"x": 2}, seed=42)
    rec.add_input("in", cohort["sub-01"]["bet"])
    rec.add_output("n4", save_nifti(np.full((6, 6, 6), 2.0), np.eye(4), d / "n4.nii.gz"))
    rec.finish(d / "n4.json")
    stale = [p for p in audit(tmp_path) if p["status"] == "stale"]
    assert [(p["scan"], p["step"]) for p in stale] == [("sub-01", "n4")]
    assert "rerun collect" in stale[0]["message"]
    merge_scan([d / "bet.json", d / "n4.json"], d / "sub-01_provenance.json")
    assert audit(tmp_path) == []


def test_an_input_that_is_not_what_the_step_before_wrote(tmp_path, cohort):
    """bet reran (new bytes) but n4 did not: n4's record names the old brain."""
    d = tmp_path / "results/preprocess/demo/sub-01"
    rec = StepRecord("bet", scan="sub-01", backend="ants", params={}, seed=42)
    rec.add_input("in", d / "raw.nii.gz")
    rec.add_output("bet", save_nifti(np.full((6, 6, 6), 3.0), np.eye(4), d / "bet.nii.gz"))
    rec.add_output("mask", d / "mask.nii.gz")
    rec.finish(d / "bet.json")
    merge_scan([d / "bet.json", d / "n4.json"], d / "sub-01_provenance.json")
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"], problem["step"]) == ("stale", "sub-01", "n4")
    assert "but step bet recorded writing" in problem["message"]


def test_a_deleted_merged_record_is_named(tmp_path, cohort):
    d = tmp_path / "results/preprocess/demo/sub-02"
    (d / "sub-02_provenance.json").unlink()
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"]) == ("dropped", "sub-02")
    assert "sub-02_provenance.json is gone, though collect wrote it (entry 3)" in problem["message"]
    manifest = d / "sub-02_manifest.jsonl"  # its collect entry struck too: the last line
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"]) == ("incomplete", "sub-02")
