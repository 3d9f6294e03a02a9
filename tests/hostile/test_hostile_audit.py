"""An audit nobody can fool: each kind of tampering is caught and named.

Two scans go through real steps (``medtx step n4`` and ``medtx step
pool_normalize``, on small spheres) and the real collector (``medtx collect``),
with paths relative to the folder they ran in, as Snakemake records them.
Each test tampers with a copy of that results folder the way issue 12 tells
(an output edited, a record edited, a step dropped, a QC field flipped, one
scan's image copied over another's with its hash rewritten) and checks that
``medtx audit`` names the scan, the step and what is wrong, and exits 1.

A run ends with its run index (issue 31): the scans it made, each one's chain
head and raw inputs. A second run is signed (``MEDTX_PROVENANCE_KEY``) with its
raw images outside the results, as the workflow's are; it is rolled back,
substituted, has its raw input replaced and a scan deleted, each of which every
chain inside the scan folders alone would let pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medtx.cli import main
from tests.conftest import sphere, write_nifti

SCANS = ("sub-01", "sub-02")
QC = {"bias_max_ratio": 3.0}
CONTEXT = json.dumps({"backend": "ants", "seed": 42})
KEY = "MEDTX_PROVENANCE_KEY"
SECRET = "lab-secret"
INDEX = "results/reports/run_index.json"


def scan_dir(scan: str) -> str:
    return f"results/preprocess/demo/{scan}"


def run_scan(scan: str, seed: int, *, steps=("n4", "pool_normalize"), raw=None) -> None:
    """A scan's steps and its collect, in the current folder, with relative paths.

    Its raw images are written in its folder, or under ``raw`` (outside the results).
    """
    d = scan_dir(scan)
    r = f"{raw}/{scan}" if raw else d
    image = sphere(seed=seed, radius=6.0 + seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(Path(f"{r}/in_brain.nii.gz"), image, affine)
    write_nifti(Path(f"{r}/in_mask.nii.gz"), (image > 50).astype(np.uint8), affine)
    common = ["--context", CONTEXT, "--scan", scan, "--dataset", "demo"]
    records = []
    source = f"{r}/in_brain.nii.gz"
    if "n4" in steps:
        n4 = [f"n4={d}/{scan}_n4.nii.gz", f"record={d}/{scan}_step-n4.json"]
        args = ["step", "n4", "--input", f"brain={source}", "--input", f"mask={r}/in_mask.nii.gz"]
        params = json.dumps({"shrink_factor": 2})  # the schema fills in the rest
        assert main([*args, *out_args(n4), "--params", params, *common]) == 0
        records.append(f"{d}/{scan}_step-n4.json")
        source = f"{d}/{scan}_n4.nii.gz"
    outputs = [
        f"pooled={d}/{scan}_pooled.nii.gz",
        f"mask={d}/{scan}_mask.nii.gz",
        f"pool_record={d}/{scan}_step-pool.json",
        f"image={d}/{scan}_preproc.nii.gz",
        f"cache=results/cache/demo/{scan}.npy",
        f"record={d}/{scan}_step-normalize.json",
    ]
    args = ["step", "pool_normalize", "--input", f"image={source}"]
    args += ["--input", f"mask={r}/in_mask.nii.gz", *out_args(outputs), "--params", "{}"]
    assert main([*args, *common]) == 0
    records += [f"{d}/{scan}_step-pool.json", f"{d}/{scan}_step-normalize.json"]
    collect(scan, records)


def collect(scan: str, records, qc=QC) -> None:
    out = f"{scan_dir(scan)}/{scan}_provenance.json"
    assert main(["collect", "--record", *records, "--qc", json.dumps(qc), "--out", out]) == 0


def write_index() -> None:
    """The end of a run: the provenance report rule's run index, by its command line."""
    from medtx.provenance.run_index import main as index_main

    records = [str(p) for p in sorted(Path("results").rglob("*_provenance.json"))]
    assert index_main(["--records", *records, "--out", INDEX]) == 0


def out_args(pairs):
    return [a for p in pairs for a in ("--output", p)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The workflow's folder after a clean run of two scans (records unsigned)."""
    work = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.delenv(KEY, raising=False)
        for seed, scan in enumerate(SCANS, start=1):
            run_scan(scan, seed)
        write_index()
    return work


@pytest.fixture
def copy(pristine, tmp_path, monkeypatch):
    """A copy of the results to tamper with, audited from a folder of its own."""
    monkeypatch.delenv(KEY, raising=False)
    shutil.copytree(pristine / "results", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def audit(root, capsys, *extra) -> tuple[int, list[str]]:
    code = main(["audit", str(root), *extra])
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def step_of(record, name):
    return next(s for s in record["steps"] if s["step"] == name)


def lines_about(out, status, scan, step=None):
    where = f"scan {scan}" + (f", step {step}" if step else ":")
    return [line for line in out[:-1] if line.startswith(status.upper()) and where in line]


def test_clean_run_reports_no_problem(pristine, capsys, monkeypatch):
    monkeypatch.chdir(pristine)
    code, out = audit("results", capsys)
    assert code == 0 and len(out) == 1
    assert out[0].startswith("audit: OK: all 10 recorded output file(s) match their sha256")
    assert "all 8 record(s) of 2 scan(s)" in out[0] and "unsigned" in out[0]


def test_edited_output_is_named(copy, capsys):
    n4 = copy / scan_dir("sub-01") / "sub-01_n4.nii.gz"
    n4.write_bytes(n4.read_bytes()[:-4] + b"\0\0\0\0")
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (line,) = lines_about(out, "changed", "sub-01", "n4")
    assert "output n4 results/preprocess/demo/sub-01/sub-01_n4.nii.gz" in line
    assert len(out) == 2 and "1 changed" in out[-1]


def test_edited_step_record_is_named_with_its_field(copy, capsys):
    record = copy / scan_dir("sub-01") / "sub-01_step-normalize.json"
    edit_json(record, lambda r: r.update(seed=7))
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (line,) = lines_about(out, "edited", "sub-01", "normalize")
    assert "sub-01_step-normalize.json edited since the step wrote it: seed edited (now 7)" in line
    assert len(out) == 2


def test_edited_merged_record_is_named_with_its_field(copy, capsys):
    prov = copy / scan_dir("sub-02") / "sub-02_provenance.json"
    edit_json(prov, lambda r: r.update(dataset="another"))
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (line,) = lines_about(out, "edited", "sub-02")
    assert "sub-02_provenance.json edited since collect wrote it: dataset edited" in line


def test_dropped_step_and_its_deleted_file_are_named(copy, capsys):
    d = copy / scan_dir("sub-02")
    edit_json(
        d / "sub-02_provenance.json",
        lambda r: r.update(steps=[s for s in r["steps"] if s["step"] != "pool"]),
    )
    (d / "sub-02_pooled.nii.gz").unlink()
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (dropped,) = lines_about(out, "dropped", "sub-02", "pool")
    assert "missing from sub-02_provenance.json, but the manifest has it" in dropped
    (missing,) = lines_about(out, "missing", "sub-02", "pool")
    assert "sub-02_pooled.nii.gz is gone" in missing
    assert not lines_about(out, "dropped", "sub-01")


def test_a_step_struck_from_the_manifest_too_breaks_its_chain(copy, capsys):
    """Dropping the step's entry and record file as well still leaves a broken link."""
    d = copy / scan_dir("sub-02")
    manifest = d / "sub-02_manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line for line in lines if '"step":"pool"' not in line) + "\n")
    (d / "sub-02_step-pool.json").unlink()
    edit_json(
        d / "sub-02_provenance.json",
        lambda r: r.update(steps=[s for s in r["steps"] if s["step"] != "pool"]),
    )
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (chain,) = lines_about(out, "chain", "sub-02", "normalize")
    assert "chain broken at entry 3 (step normalize): it does not follow entry 1 (step n4)" in (
        chain
    )
    (dropped,) = lines_about(out, "dropped", "sub-02", "pool")
    assert "collect merged it (manifest entry 4), but it is gone" in dropped


def test_flipped_qc_passed_is_named(copy, capsys):
    prov = copy / scan_dir("sub-01") / "sub-01_provenance.json"
    edit_json(prov, lambda r: r.update(qc_passed=False))
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (line,) = lines_about(out, "qc", "sub-01")
    assert "qc_passed is False, but the recorded metrics and thresholds give True" in line
    assert len(out) == 2


def test_flipped_qc_metric_is_named(copy, capsys):
    """A failing bias ratio written over the passing one, in the merged record only."""
    prov = copy / scan_dir("sub-02") / "sub-02_provenance.json"
    edit_json(prov, lambda r: step_of(r, "n4")["qc"]["metrics"].update(bias_ratio=7.5))
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (line,) = lines_about(out, "qc", "sub-02", "n4")
    assert "qc.metrics.bias_ratio is 7.5, but its check was made on" in line


def test_flipped_metric_and_verdicts_everywhere_are_named(copy, capsys):
    """A careful tamperer: metric, check and verdicts rewritten to agree, in both records."""
    d = copy / scan_dir("sub-02")

    def fail(record):
        qc = record["qc"]
        qc["metrics"]["bias_ratio"] = 7.5
        for c in qc["checks"]:
            c.update(value=7.5, passed=False)
        qc["passed"] = False

    edit_json(d / "sub-02_step-n4.json", fail)
    edit_json(
        d / "sub-02_provenance.json",
        lambda r: (
            fail(step_of(r, "n4")),
            r.update(qc_passed=False, qc_failures=["n4: bias_ratio=7.5"]),
        ),
    )
    code, out = audit(copy / "results", capsys)
    assert code == 1
    edited = lines_about(out, "edited", "sub-02", "n4")
    assert any("sub-02_step-n4.json edited" in x and "qc.metrics.bias_ratio" in x for x in edited)
    merged = lines_about(out, "edited", "sub-02")
    assert any("collect wrote it: qc_passed edited (now false)" in x for x in merged), out


def test_swapped_file_with_its_hash_rewritten_is_named(copy, capsys):
    """sub-01's model input copied over sub-02's, its sha256 rewritten in the merged record."""
    src = copy / scan_dir("sub-01") / "sub-01_preproc.nii.gz"
    dst = copy / scan_dir("sub-02") / "sub-02_preproc.nii.gz"
    shutil.copyfile(src, dst)
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()

    def rewrite(record):
        for out in step_of(record, "normalize")["outputs"]:
            if out["role"] == "preproc":
                out["sha256"] = digest

    edit_json(copy / scan_dir("sub-02") / "sub-02_provenance.json", rewrite)
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (edited,) = lines_about(out, "edited", "sub-02", "normalize")
    assert "sub-02_provenance.json says outputs[preproc].sha256" in edited
    assert "but step record sub-02_step-normalize.json gives" in edited
    assert lines_about(out, "changed", "sub-02", "normalize")
    (dup,) = lines_about(out, "duplicate", "sub-02", "normalize")
    assert "same content" in dup and "as scan sub-01's output preproc" in dup
    assert not [x for x in out if " scan sub-01, " in x or " scan sub-01: " in x]


def test_swapped_file_with_every_record_rewritten_is_named(copy, capsys):
    """The same swap, the hash rewritten in the step record too: the manifest knows."""
    src = copy / scan_dir("sub-01") / "sub-01_preproc.nii.gz"
    dst = copy / scan_dir("sub-02") / "sub-02_preproc.nii.gz"
    shutil.copyfile(src, dst)
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()

    def rewrite(step):
        for out in step["outputs"]:
            if out["role"] == "preproc":
                out["sha256"] = digest

    d = copy / scan_dir("sub-02")
    edit_json(d / "sub-02_step-normalize.json", rewrite)
    edit_json(d / "sub-02_provenance.json", lambda r: rewrite(step_of(r, "normalize")))
    code, out = audit(copy / "results", capsys)
    assert code == 1
    (edited,) = lines_about(out, "edited", "sub-02", "normalize")
    assert "sub-02_step-normalize.json edited since the step wrote it" in edited
    assert "outputs[preproc].sha256 edited" in edited
    assert lines_about(out, "duplicate", "sub-02", "normalize")
    assert not lines_about(out, "changed", "sub-02")  # the file matches the rewritten hash


def test_nonsense_in_a_record_is_named_not_a_traceback(copy, capsys):
    def garble(record):
        step_of(record, "n4")["qc"]["metrics"]["bias_ratio"] = "high"
        step_of(record, "normalize")["outputs"] = "gone"

    edit_json(copy / scan_dir("sub-01") / "sub-01_provenance.json", garble)
    code, out = audit(copy / "results", capsys)
    assert code == 1 and out[-1].startswith("audit: ")
    (metric,) = lines_about(out, "qc", "sub-01", "n4")[:1]
    assert 'qc.metrics.bias_ratio is "high"' in metric
    (outputs,) = lines_about(out, "edited", "sub-01", "normalize")
    assert 'says outputs = "gone", but step record sub-01_step-normalize.json gives {…}' in outputs


def cli(args, cwd):
    proc = subprocess.run(
        [sys.executable, "-m", "medtx", "audit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_audit_from_another_folder(copy, tmp_path_factory):
    """Relative record paths: found from anywhere, with --base or without."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    code, out = cli([str(copy / "results")], elsewhere)
    assert code == 0 and "audit: OK" in out, out
    code, out = cli([str(copy / "results"), "--base", str(copy)], elsewhere)
    assert code == 0 and "audit: OK" in out, out

    # The copy is what is audited, not the folder the records were written in.
    n4 = copy / scan_dir("sub-02") / "sub-02_n4.nii.gz"
    n4.write_bytes(n4.read_bytes() + b"\0")
    code, out = cli([str(copy / "results")], elsewhere)
    assert code == 1 and "CHANGED    scan sub-02, step n4: output n4" in out, out
    code, out = cli([str(copy / "results"), "--base", str(elsewhere)], elsewhere)
    assert code == 1 and "MISSING" in out and f"looked at {elsewhere}" in out, out


def test_signed_manifests_catch_a_rewritten_chain(tmp_path, monkeypatch, capsys):
    """With a key, a record edited and its whole chain rewritten is still caught."""
    from medtx.provenance.manifest import canonical, line_sha256, record_sha256

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KEY, "lab-secret")
    run_scan("sub-07", 7, steps=("pool_normalize",))
    write_index()
    assert audit("results", capsys)[0] == 0
    monkeypatch.delenv(KEY)
    code, out = audit("results", capsys)
    assert code == 0 and "signed, but not verified: MEDTX_PROVENANCE_KEY is not set" in out[-1]

    # Flip a metric, then recompute every hash and link as a tamperer without the key would.
    d = tmp_path / scan_dir("sub-07")
    step_record, prov = d / "sub-07_step-normalize.json", d / "sub-07_provenance.json"
    edit_json(step_record, lambda r: r["qc"]["metrics"].update(max=0.5))
    edit_json(prov, lambda r: step_of(r, "normalize")["qc"]["metrics"].update(max=0.5))
    manifest = d / "sub-07_manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    prev = "0" * 64
    lines = []
    forged = record_sha256(json.loads(step_record.read_text()))
    for entry in entries:
        if entry.get("step") == "normalize":
            entry["sha256"] = forged
            entry["fields"]["qc.metrics.max"] = hashlib.sha256(canonical(0.5)).hexdigest()[:16]
        if entry["kind"] == "merged":
            entry["sha256"] = record_sha256(json.loads(prov.read_text()))
            entry["merged"]["normalize"] = forged
        entry["prev"] = prev
        line = canonical(entry)
        prev = line_sha256(line)
        lines.append(line.decode())
    manifest.write_text("\n".join(lines) + "\n")
    # and the run index's chain head, as the same tamperer would
    edit_json(tmp_path / INDEX, lambda r: r["scans"][0]["head"].update(sha256=prev))
    assert audit("results", capsys)[0] == 0  # unsigned audit: a consistent forgery passes

    monkeypatch.setenv(KEY, "lab-secret")
    code, out = audit("results", capsys)
    assert code == 1
    (line,) = lines_about(out, "signature", "sub-07", "normalize")
    assert "entry 2 (step normalize) has a signature that MEDTX_PROVENANCE_KEY does not give" in (
        line
    )
    monkeypatch.setenv(KEY, "another-key")
    code, out = audit("results", capsys)
    assert code == 1 and sum(x.startswith("SIGNATURE  scan sub-07") for x in out) == 3


# -- issue 31: what no chain inside a scan's folder can see --------------------------------


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A signed run of two scans, raw images under data/ as the workflow's are, indexed.

    Beside it: sub-01's folder as an earlier run left it (QC thresholds it passed;
    the run re-judged it under stricter ones, which it fails), and another image
    run and signed as sub-02 in another folder with the same key.
    """
    root = tmp_path_factory.mktemp("signed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY, SECRET)
        (root / "work").mkdir()
        mp.chdir(root / "work")
        for seed, scan in enumerate(SCANS, start=1):
            run_scan(scan, seed, raw="data")
        shutil.copytree(scan_dir("sub-01"), root / "earlier")
        steps = ("n4", "pool", "normalize")
        collect("sub-01", [f"{scan_dir('sub-01')}/sub-01_step-{s}.json" for s in steps], STRICT)
        write_index()
        (root / "other").mkdir()
        mp.chdir(root / "other")
        run_scan("sub-02", 5, raw="data")
    return root


STRICT = {"bias_max_ratio": 1.0}


@pytest.fixture
def signed_copy(signed, tmp_path, monkeypatch):
    """A copy of the signed run to tamper with, audited with the key."""
    shutil.copytree(signed / "work", tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv(KEY, SECRET)
    return tmp_path / "work"


def replace_folder(dst: Path, src: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def test_signed_run_passes_with_its_index(signed_copy, capsys):
    code, out = audit("results", capsys)
    assert code == 0 and len(out) == 1, out
    assert "signatures checked with MEDTX_PROVENANCE_KEY" in out[0]
    assert "the run index results/reports/run_index.json vouches for all 2 scan(s)" in out[0]


def test_a_scan_rolled_back_to_an_earlier_signed_run_is_named(signed, signed_copy, capsys):
    """Before issue 31: rc 0, "audit: OK" (every entry of the earlier chain is signed)."""
    d = signed_copy / scan_dir("sub-01")
    prov = d / "sub-01_provenance.json"
    assert json.loads(prov.read_text())["qc_passed"] is False  # the run's verdict
    replace_folder(d, signed / "earlier")
    assert json.loads(prov.read_text())["qc_passed"] is True  # the restored one
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = lines_about(out, "rollback", "sub-01")
    assert "latest chain entry is entry 4 (" in line
    assert "but the run index records entry 5 (" in line and "an earlier state" in line
    assert len(out) == 2 and "1 rollback" in out[-1]


def test_a_scan_substituted_from_another_signed_image_is_named(signed, signed_copy, capsys):
    """Another image's signed records and outputs under sub-02's id (its cache too).

    Before issue 31: rc 0, "audit: OK"."""
    replace_folder(signed_copy / scan_dir("sub-02"), signed / "other" / scan_dir("sub-02"))
    cache = "results/cache/demo/sub-02.npy"
    shutil.copyfile(signed / "other" / cache, signed_copy / cache)
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = lines_about(out, "substituted", "sub-02")
    assert "its records belong to another image" in line
    assert "raw input brain data/sub-02/in_brain.nii.gz was read with sha256" in line
    assert "the run index has" in line
    assert len(out) == 2, out  # the raw file on disk is still the run's: not RAW-CHANGED


def test_a_raw_input_replaced_after_the_run_is_named(signed_copy, capsys):
    """Before issue 31: rc 0, "audit: OK" (no step writes a raw input, so nothing re-hashed it)."""
    raw = signed_copy / "data/sub-01/in_brain.nii.gz"
    write_nifti(raw, sphere(seed=9, radius=8.0), np.diag([2.0, 2.0, 2.0, 1.0]))
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = lines_about(out, "raw-changed", "sub-01", "n4")
    assert "raw input brain data/sub-01/in_brain.nii.gz: the run read sha256" in line
    assert len(out) == 2 and "1 raw-changed" in out[-1]


def test_a_deleted_scan_folder_is_named(signed_copy, capsys):
    """Before issue 31: rc 0, "audit: OK ... of 1 scan(s)"."""
    shutil.rmtree(signed_copy / scan_dir("sub-02"))
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = lines_about(out, "missing-scan", "sub-02")
    assert "the run index lists it in results/preprocess/demo/sub-02" in line
    assert len(out) == 2 and "in 1 of 2 scan(s): 1 missing-scan" in out[-1]


def test_an_index_rewritten_without_the_key_fails_its_signature(signed_copy, capsys):
    """The deletion again, the scan struck from the index too; then the index deleted."""
    shutil.rmtree(signed_copy / scan_dir("sub-02"))
    index = signed_copy / INDEX
    edit_json(index, lambda r: r.update(scans=[s for s in r["scans"] if s["scan"] != "sub-02"]))
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = [x for x in out if x.startswith("SIGNATURE  run index")]
    assert "has a signature that MEDTX_PROVENANCE_KEY does not give" in line
    index.unlink()
    code, out = audit("results", capsys)
    assert code == 1, out
    (line,) = [x for x in out if x.startswith("UNINDEXED")]
    assert "no run index" in line and "a scan rolled back, substituted or deleted" in line


def test_without_a_key_the_audit_says_what_it_cannot_catch(copy, capsys):
    """Unsigned: a deletion that forgot the index is caught; one that rewrote it is
    not, and the verdict says so plainly."""
    shutil.rmtree(copy / scan_dir("sub-02"))
    code, out = audit("results", capsys)
    assert code == 1 and lines_about(out, "missing-scan", "sub-02"), out
    prov = copy / scan_dir("sub-01") / "sub-01_provenance.json"
    from medtx.provenance.run_index import main as index_main

    assert index_main(["--records", str(prov), "--out", INDEX]) == 0  # the index rewritten
    assert "unsigned (MEDTX_PROVENANCE_KEY not set)" in capsys.readouterr().out
    code, out = audit("results", capsys)
    assert code == 0 and len(out) == 1, out
    assert "unsigned (set MEDTX_PROVENANCE_KEY to sign and verify)" in out[0]
    assert (
        "whoever can write the results folder can rewrite the records, their chains and "
        "the run index consistently: a scan rolled back, substituted or deleted that way "
        "passes" in out[0]
    )
