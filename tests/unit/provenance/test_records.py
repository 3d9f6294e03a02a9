"""Step records and QC judging at merge time."""

import json

from medtx.provenance.qc import judge
from medtx.provenance.records import StepRecord, merge_scan


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
    files = [
        make_step(tmp_path, "bet", {"brain_volume_ml": 1200.0}),
        make_step(tmp_path, "flirt", {"ncc_template": 0.1}),
        make_step(tmp_path, "n4", {"bias_ratio": 1.3}),
    ]
    rec = merge_scan(
        files,
        tmp_path / "p.json",
        scan="sub-01",
        dataset="d",
        subject="01",
        session=None,
        qc={"brain_volume_ml": [700, 2300], "ncc_min": 0.25, "bias_max_ratio": 3.0},
    )
    assert rec["qc_passed"] is False
    assert rec["qc_failures"] == ["flirt: ncc_template=0.1"]
    assert [s["qc"]["passed"] for s in rec["steps"]] == [True, False, True]


def chain_records(tmp_path, image, *, subject="01", session="2"):
    """Step records of a T1 chain whose files are all ``image``, as the steps record them."""
    from medtx.preprocess.context import StepContext
    from medtx.provenance.collect import T1_PANELS

    ctx = StepContext(
        scan=f"sub-{subject}_ses-{session}", dataset="d", subject=subject, session=session
    )
    roles = {}
    for _, *files in T1_PANELS:
        for step, direction, role in files:
            roles.setdefault(step, []).append((direction, role))
    paths = []
    for step in ("bet", "flirt", "n4", "pool", "normalize"):
        rec = ctx.record(step, {})
        for direction, role in roles.get(step, []):
            (rec.add_input if direction == "inputs" else rec.add_output)(role, image)
        path = tmp_path / f"{step}.json"
        rec.finish(path)
        paths.append(path)
    return paths


def test_merge_takes_the_scan_identity_from_the_records(tmp_path, tiny_t1):
    files = chain_records(tmp_path, tiny_t1)
    rec = merge_scan(files, tmp_path / "p.json")
    assert (rec["scan"], rec["dataset"], rec["subject"], rec["session"]) == (
        "sub-01_ses-2",
        "d",
        "01",
        "2",
    )
    assert merge_scan(files, tmp_path / "q.json", subject="x")["subject"] == "x"


def test_collect_draws_the_recorded_files(tmp_path, tiny_t1):
    """`medtx collect` finds every thumbnail row's files in the step records."""
    from PIL import Image

    from medtx.cli import main
    from medtx.provenance.collect import T1_PANELS, t1_panels
    from medtx.provenance.records import load_step_records
    from medtx.provenance.thumbnails import thumbnail_shape

    files = chain_records(tmp_path, tiny_t1)
    panels = t1_panels(load_step_records(files))
    assert [p[0] for p in panels] == [p[0] for p in T1_PANELS]
    assert {p[1] for p in panels} == {str(tiny_t1)}

    png, out = tmp_path / "qc.png", tmp_path / "prov.json"
    assert (
        main(
            [
                "collect",
                "--record",
                *map(str, files),
                "--thumbnail",
                str(png),
                "--qc",
                "{}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(png) as im:
        assert im.size[::-1] == thumbnail_shape(len(T1_PANELS))
    assert json.loads(out.read_text())["thumbnail"] == str(png)


def test_collect_names_a_step_that_did_not_record_a_file(tmp_path, tiny_t1, capsys):
    from medtx.cli import main

    files = chain_records(tmp_path, tiny_t1)
    data = json.loads(files[2].read_text())  # n4
    data["outputs"] = []
    files[2].write_text(json.dumps(data))
    assert (
        main(
            [
                "collect",
                "--record",
                *map(str, files),
                "--thumbnail",
                str(tmp_path / "qc.png"),
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no output 'n4' of step 'n4'" in err
    assert not (tmp_path / "p.json").exists()


def test_brats_panels_show_each_recorded_modality_with_the_tumour(tmp_path, tiny_t1):
    from medtx.preprocess.context import StepContext
    from medtx.provenance.collect import brats_panels

    rec = StepContext(scan="sub-c1").record("brats", {"modalities": ["t1", "flair"]})
    rec.add_output("preproc", tiny_t1)
    rec.add_output("seg", tiny_t1)
    step = rec.finish(tmp_path / "brats.json")
    assert brats_panels([step]) == [
        ("t1 + tumour", f"{tiny_t1}#0", str(tiny_t1)),
        ("flair + tumour", f"{tiny_t1}#1", str(tiny_t1)),
    ]
    step["outputs"] = step["outputs"][:1]  # a case without labels: no outline
    assert [p[2] for p in brats_panels([step])] == [None, None]
