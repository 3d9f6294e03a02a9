"""Step records, QC judging at merge time, and the per-stage code hashes."""

import json
import os

import pytest

from medtx import codehash
from medtx.provenance import StepRecord, merge_scan
from medtx.qc import judge


def make_step(tmp_path, step, metrics, name=None):
    out = tmp_path / f"{name or step}.out"
    out.write_text(step)
    rec = StepRecord(step, scan="sub-01", backend="ants", params={"a": 1}, seed=7)
    rec.add_output(step, out)
    rec.call("f", x=1)
    rec.set_qc(metrics, [])
    path = tmp_path / f"{name or step}.json"
    rec.finish(path)
    return path


def test_record_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    data = json.loads(make_step(tmp_path, "n4", {"bias_ratio": 1.2}).read_text())
    assert data["slurm_job_id"] == "4242" and data["seed"] == 7 and data["backend"] == "ants"
    assert data["outputs"][0]["sha256"] and data["duration_s"] >= 0
    assert data["function"] == "f" and data["arguments"] == {"x": 1}
    assert data["versions"]["antspyx"]


def test_judge_uses_thresholds():
    step = {"step": "bet", "qc": {"metrics": {"brain_volume_ml": 500.0}, "checks": []}}
    (check,) = judge(step, {"brain_volume_ml": [700, 2300]})
    assert check["passed"] is False and check["min"] == 700
    assert judge(step, {"brain_volume_ml": [400, 2300]})[0]["passed"] is True
    assert judge(step, {}) == []


def test_merge_judges_and_lists_failures(tmp_path):
    files = [make_step(tmp_path, "bet", {"brain_volume_ml": 1200.0}),
             make_step(tmp_path, "flirt", {"ncc_template": 0.1}),
             make_step(tmp_path, "n4", {"bias_ratio": 1.3})]
    rec = merge_scan(files, tmp_path / "p.json", scan="sub-01", dataset="d", subject="01",
                     session=None, qc={"brain_volume_ml": [700, 2300], "ncc_min": 0.25,
                                       "bias_max_ratio": 3.0})
    assert rec["qc_passed"] is False
    assert rec["qc_failures"] == ["flirt: ncc_template=0.1"]
    assert [s["qc"]["passed"] for s in rec["steps"]] == [True, False, True]


def test_code_hash_changes_only_for_the_stage_that_uses_a_file(tmp_path, monkeypatch):
    pkg = tmp_path / "medtx"
    for rel in {f for files in codehash.STAGE_MODULES.values() for f in files}:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(rel)
    monkeypatch.setattr(codehash, "PACKAGE", pkg)
    codehash.code_hash.cache_clear()
    before = {s: codehash.code_hash(s) for s in codehash.STAGE_MODULES}
    (pkg / "preprocess/n4.py").write_text("changed")
    codehash.code_hash.cache_clear()
    after = {s: codehash.code_hash(s) for s in codehash.STAGE_MODULES}
    codehash.code_hash.cache_clear()
    assert {s for s in before if before[s] != after[s]} == {"n4"}


def test_code_table_lists_existing_files():
    for stage, files in codehash.STAGE_MODULES.items():
        for rel in files:
            assert (codehash.PACKAGE / rel).exists(), (stage, rel)
    with pytest.raises(KeyError, match="known"):
        codehash.code_hash("nope")
