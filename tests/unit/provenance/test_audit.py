"""``medtx audit``: outputs re-hashed, records checked against their manifests."""

from __future__ import annotations

import json
import shutil

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
    assert result.problems == [] and result.n_files == 6 and result.n_raw == 2
    assert len(calls) == 8 == len(set(calls))  # 6 outputs, and each scan's raw.nii.gz


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


# -- the run index (issue 31) ----------------------------------------------------------------


def index_run(root, *records):
    """The workflow's last step: the run index under results/reports/."""
    from medtx.provenance.run_index import write_run_index

    out = root / "results/reports/run_index.json"
    return out, write_run_index(records or [root / "results"], out)


def test_the_run_index_lists_each_scan_with_its_chain_head_and_raw_input(tmp_path, cohort):
    from medtx.provenance.manifest import chain_head

    index_path, index = index_run(tmp_path)
    assert "hmac" not in index and [s["scan"] for s in index["scans"]] == ["sub-01", "sub-02"]
    row = index["scans"][0]
    d = tmp_path / "results/preprocess/demo/sub-01"
    assert row["folder"] == "../preprocess/demo/sub-01"  # relative: moves with the results
    assert (row["dataset"], row["subject"], row["provenance"]) == (
        "demo",
        "01",
        "sub-01_provenance.json",
    )
    assert row["head"] == chain_head(d / "sub-01_manifest.jsonl") and row["head"]["seq"] == 3
    # n4 read bet's output; only the image bet read came from outside the scan's steps
    (raw,) = row["raw"]
    assert (raw["role"], raw["step"], raw["path"]) == ("in", "bet", str(d / "raw.nii.gz"))
    assert json.loads(index_path.read_text()) == index


def test_a_signed_index_verifies_and_an_edit_to_it_does_not(tmp_path, cohort, monkeypatch):
    from medtx.provenance.run_index import read_run_index

    monkeypatch.setenv("MEDTX_PROVENANCE_KEY", "k1")
    path, index = index_run(tmp_path)
    assert read_run_index(path, key=b"k1") == (index, [])
    assert read_run_index(path, key=b"k2")[1][0][0] == "signature"
    index["scans"].pop()
    path.write_text(json.dumps(index))
    ((kind, message),) = read_run_index(path, key=b"k1")[1]
    assert kind == "signature" and "does not give: edited without the key" in message
    monkeypatch.delenv("MEDTX_PROVENANCE_KEY")
    index_run(tmp_path)
    ((kind, message),) = read_run_index(path, key=b"k1")[1]
    assert "is unsigned, but MEDTX_PROVENANCE_KEY is set" in message


def test_a_malformed_index_is_one_line_naming_its_row(tmp_path, cohort, capsys):
    path, index = index_run(tmp_path)
    del index["scans"][1]["folder"]
    path.write_text(json.dumps(index))
    assert main_audit(str(tmp_path)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"UNREADABLE run index: {path}: scans row 2 has no folder"
    path.write_text("{")
    assert main_audit(str(tmp_path)) == 1
    assert "not a readable run index" in capsys.readouterr().out
    index["scans"][1]["folder"] = "../preprocess/demo/sub-02"
    index["scans"][1]["head"] = {"sha256": "0", "seq": "five"}  # nonsense, not a traceback
    path.write_text(json.dumps(index))
    assert main_audit(str(tmp_path)) == 1
    assert "UNREADABLE run index: the run index is malformed (TypeError(" in capsys.readouterr().out


def test_the_index_writer_names_a_bad_record_in_one_line(tmp_path, capsys):
    from medtx.provenance.run_index import main as index_main

    bad = tmp_path / "x_provenance.json"
    bad.write_text("[1]")
    out = tmp_path / "run_index.json"
    assert index_main(["--records", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"medtx: error: {bad}: not a scan's provenance record (no list of steps)\n"
    assert index_main(["--records", str(tmp_path / "nope.json"), "--out", str(out)]) == 1
    assert "nope.json: not a *_provenance.json record" in capsys.readouterr().err
    assert not out.exists()


def test_a_step_rerun_after_the_index_is_stale_not_a_rollback(tmp_path, cohort):
    index_run(tmp_path)
    assert audit(tmp_path) == []
    d = tmp_path / "results/preprocess/demo/sub-02"
    merge_scan([d / "bet.json", d / "n4.json"], d / "sub-02_provenance.json")  # collect again
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"]) == ("stale", "sub-02")
    assert "1 entry after the one the run index records (entry 3)" in problem["message"]
    index_run(tmp_path)  # the report rule reruns
    assert audit(tmp_path) == []


def test_auditing_one_scan_folder_holds_it_to_the_index_above(tmp_path, cohort, monkeypatch):
    """The index is found above a scan folder; only the scans audited must be there."""
    index_run(tmp_path)
    d = tmp_path / "results/preprocess/demo"
    shutil.rmtree(d / "sub-02")
    assert audit(d / "sub-01") == []
    monkeypatch.setenv("MEDTX_PROVENANCE_KEY", "k")  # it was found: its missing hmac is said
    (problem,) = [p for p in audit(d / "sub-01") if p["scan"] is None]
    assert problem["status"] == "signature" and "run_index.json is unsigned" in problem["message"]
    monkeypatch.delenv("MEDTX_PROVENANCE_KEY")
    (problem,) = audit(tmp_path)
    assert (problem["status"], problem["scan"]) == ("missing-scan", "sub-02")


def test_raw_inputs_are_rehashed_without_an_index_too(tmp_path, cohort, capsys):
    """Against the step records when no index lists the scan; a raw file that is gone
    (archived apart from the results) is counted, not a problem."""
    d = tmp_path / "results/preprocess/demo"
    save_nifti(np.zeros((6, 6, 6)), np.eye(4), d / "sub-01/raw.nii.gz")
    (d / "sub-02/raw.nii.gz").unlink()
    assert main_audit(str(tmp_path)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("RAW-CHANGED scan sub-01, step bet: raw input in ")
    assert "the run read sha256" in out[0] and "(per its records)" in out[0]
    assert "1 raw input(s) (1 not found, not re-checked)" in out[-1]
    assert "no run index: a scan rolled back, substituted or deleted is not seen" in out[-1]
