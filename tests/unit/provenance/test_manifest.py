"""The record manifest: a hash chain per scan, safe under concurrent appends."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from medtx.provenance.manifest import (
    KEY_ENV,
    append,
    chain_head,
    flatten,
    latest,
    line_hashes,
    line_sha256,
    read_manifest,
    record_sha256,
)
from medtx.provenance.records import StepRecord
from medtx.workflow.paths import record_manifest


def test_each_entry_chains_the_line_before(tmp_path):
    m = tmp_path / "m.jsonl"
    for step in ("bet", "flirt", "bet"):
        append(m, {"kind": "step", "step": step, "sha256": step})
    lines = m.read_bytes().splitlines()
    entries, problems = read_manifest(m)
    assert problems == [] and [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == "0" * 64
    assert entries[2]["prev"] == line_sha256(lines[1])
    steps, merged = latest(entries)
    assert steps["bet"]["seq"] == 3 and merged is None  # a rerun wins


def test_a_removed_or_edited_entry_breaks_the_chain_at_the_next(tmp_path):
    m = tmp_path / "m.jsonl"
    for step in ("bet", "flirt", "n4"):
        append(m, {"kind": "step", "step": step, "sha256": step})
    lines = m.read_text().splitlines()
    m.write_text("\n".join([lines[0], lines[2]]) + "\n")
    (problem,) = read_manifest(m)[1]
    assert problem[:2] == ("chain", "n4")
    assert "entry 3 (step n4): it does not follow entry 1 (step bet)" in problem[2]

    edited = json.loads(lines[0]) | {"sha256": "forged"}
    m.write_text("\n".join([json.dumps(edited), lines[1], lines[2]]) + "\n")
    assert [p[1] for p in read_manifest(m)[1]] == ["flirt"]


def test_a_line_cut_short_is_dropped_by_the_next_append(tmp_path):
    m = tmp_path / "m.jsonl"
    append(m, {"kind": "step", "step": "bet"})
    with open(m, "ab") as fh:
        fh.write(b'{"kind": "st')  # a writer killed mid-line
    assert read_manifest(m)[1][0][0] == "chain"
    append(m, {"kind": "step", "step": "flirt"})
    entries, problems = read_manifest(m)
    assert problems == [] and [e["seq"] for e in entries] == [1, 2]


def test_signed_entries_verify_only_with_their_key(tmp_path, monkeypatch):
    m = tmp_path / "m.jsonl"
    monkeypatch.setenv(KEY_ENV, "lab-secret")
    append(m, {"kind": "step", "step": "bet", "sha256": "a"})
    monkeypatch.delenv(KEY_ENV)
    append(m, {"kind": "step", "step": "n4", "sha256": "b"})
    entries, problems = read_manifest(m)
    assert "hmac" in entries[0] and "hmac" not in entries[1] and problems == []
    problems = read_manifest(m, key=b"lab-secret")[1]
    assert [(p[0], p[1]) for p in problems] == [("signature", None)]
    assert "1 of 2 entries unsigned (entry 2)" in problems[0][2]
    assert "signed with another key" in read_manifest(m, key=b"other")[1][0][2]


def _append_many(args):
    path, worker = args
    for i in range(25):
        append(path, {"kind": "step", "step": f"w{worker}-{i}", "sha256": "x" * 64})


def test_concurrent_appends_keep_the_chain(tmp_path):
    """Processes appending side by side (flock) leave one unbroken chain."""
    m = tmp_path / "m.jsonl"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append_many, [(str(m), w) for w in range(4)])
    entries, problems = read_manifest(m)
    assert problems == [] and len(entries) == 100
    assert [e["seq"] for e in entries] == list(range(1, 101))


def test_fields_are_named_by_role_and_step():
    record = {
        "outputs": [{"role": "n4", "sha256": "a"}, {"role": "mask", "sha256": "b"}],
        "qc": {"metrics": {"bias_ratio": 1.2}, "checks": []},
        "shape": [96, 114, 96],
    }
    assert flatten(record) == {
        "outputs[n4].role": "n4",
        "outputs[n4].sha256": "a",
        "outputs[mask].role": "mask",
        "outputs[mask].sha256": "b",
        "qc.metrics.bias_ratio": 1.2,
        "qc.checks": [],
        "shape": [96, 114, 96],
    }


def test_finish_chains_the_record_as_written(tmp_path):
    rec = StepRecord("n4", scan="sub-01", backend="ants", params={}, seed=1)
    path = tmp_path / "sub-01_step-n4.json"
    data = rec.finish(path)
    entries, _ = read_manifest(record_manifest(tmp_path, "sub-01"))
    (entry,) = entries
    assert entry["sha256"] == record_sha256(json.loads(path.read_text()))
    assert (entry["kind"], entry["step"], entry["record"]) == ("step", "n4", "sub-01_step-n4.json")
    assert data["cwd"] and entry["cwd"] == data["cwd"]


def test_an_unwritable_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "m.jsonl").mkdir()
    with pytest.raises(ValueError, match="m.jsonl: cannot append to the record manifest"):
        append(tmp_path / "m.jsonl", {"kind": "step"})


def test_the_chain_head_is_the_last_lines_hash_which_the_next_entry_links(tmp_path):
    """What a run index keeps: the hash a later entry's ``prev`` would carry."""
    m = tmp_path / "m.jsonl"
    m.write_text("")
    assert chain_head(m) is None and line_hashes(m) == []
    for step in ("bet", "flirt"):
        append(m, {"kind": "step", "step": step, "sha256": step})
    head = chain_head(m)
    assert head is not None and head["seq"] == 2 and head["time"]
    assert line_hashes(m)[-1] == head["sha256"]
    after = append(m, {"kind": "step", "step": "n4", "sha256": "n4"})
    assert after["prev"] == head["sha256"] and line_hashes(m)[1] == head["sha256"]
