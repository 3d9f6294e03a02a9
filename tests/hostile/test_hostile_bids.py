"""BIDS inputs nobody planned for: every image is taken, skipped or a problem, and said so.

Issue 12: with run-1/run-2, two acq- values, .nii beside .nii.gz or a
session-less image beside sessions, medtx took the alphabetically first file
and said nothing; an image without a participants.tsv row got empty labels;
``sub-07`` and ``07`` overwrote each other's labels. Each test builds a real
BIDS folder of tiny NIfTI files and reads it as the workflow does.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medtx.data.scan_ids import scan_identity
from medtx.data.scans import (
    build_scan_table,
    build_scan_tables,
    excluded_scans,
    read_scan_table,
    usable_subjects,
)
from medtx.errors import CohortError, ConfigError, MedtxError
from medtx.folds.manifest import make_manifest
from tests.conftest import sphere, write_nifti


def make_bids(root: Path, names: list[str], participants: list[str] | None = None) -> Path:
    """A BIDS folder with these image paths (relative to root) and participants rows."""
    for i, name in enumerate(names):
        write_nifti(root / name, sphere(shape=(12, 12, 12), radius=4, seed=i))
    subjects = sorted({n.split("/")[0] for n in names})
    rows = participants if participants is not None else [f"{s}\t60" for s in subjects]
    (root / "participants.tsv").write_text("participant_id\tage\n" + "\n".join(rows) + "\n")
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def read(tmp_path, root, select=None, mode="fail", name="ds", roles=("pretrain",)):
    """build_scan_table as the workflow calls it, the table under tmp_path/results."""
    ds = {"kind": "bids", "role": list(roles), "path": str(root)}
    if select is not None:
        ds["select"] = select
    cache = tmp_path / "results" / "scans" / f"{name}.tsv"
    return build_scan_table(name, ds, cache_path=cache, on_bad_scan=mode)


def by_file(table: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """image file name -> (status, scan, reason)."""
    return {
        Path(r["t1"]).name: (r["status"], r["scan"] or "", r["reason"] or "")
        for r in table.to_dict("records")
    }


def problems_of(err: CohortError) -> list[str]:
    for line in err.problems:
        assert "\n" not in line and "Traceback" not in line
    return err.problems


RUNS = ["sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz"]


def test_runs_first_by_default_and_the_other_run_is_reported(tmp_path, capsys):
    root = make_bids(tmp_path / "bids", RUNS + ["sub-02/anat/sub-02_T1w.nii.gz"])
    table = read(tmp_path, root)
    files = by_file(table)
    assert files["sub-01_run-1_T1w.nii.gz"] == ("ok", "sub-01", "")
    assert files["sub-01_run-2_T1w.nii.gz"] == ("skipped", "", "run-2 not selected (runs: first)")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "medtx: dataset 'ds': 2 taken, 1 skipped, 0 excluded"
    assert err[1] == "medtx:   1 skipped: run-* not selected (runs: first)"
    written = read_scan_table(tmp_path / "results/scans/ds.tsv")
    assert written["status"].tolist().count("skipped") == 1


def test_runs_last_takes_the_highest_run_numerically(tmp_path):
    names = RUNS + ["sub-01/anat/sub-01_run-10_T1w.nii.gz"]
    files = by_file(read(tmp_path, make_bids(tmp_path / "bids", names), {"runs": "last"}))
    assert files["sub-01_run-10_T1w.nii.gz"][0] == "ok"  # 10 > 2, not "10" < "2"
    assert files["sub-01_run-1_T1w.nii.gz"] == ("skipped", "", "run-1 not selected (runs: last)")


def test_runs_all_makes_one_scan_per_run_with_a_safe_unique_id(tmp_path):
    names = RUNS + ["sub-02/ses-1/anat/sub-02_ses-1_run-01_T1w.nii.gz"]
    table = read(tmp_path, make_bids(tmp_path / "bids", names), {"runs": "all"})
    scans = table.loc[table["status"] == "ok", "scan"].tolist()
    assert scans == ["sub-01_run-1", "sub-01_run-2", "sub-02_ses-1_run-01"]
    assert [scan_identity(s) for s in scans][2] == {"subject": "02", "session": "1"}


def test_two_acquisitions_are_a_problem_naming_the_key_to_set(tmp_path):
    names = ["sub-01/anat/sub-01_acq-mprage_T1w.nii.gz", "sub-01/anat/sub-01_acq-spgr_T1w.nii.gz"]
    root = make_bids(tmp_path / "bids", names + ["sub-02/anat/sub-02_acq-mprage_T1w.nii.gz"])
    before = snapshot(tmp_path)
    with pytest.raises(CohortError) as err:
        read(tmp_path, root)
    lines = problems_of(err.value)
    assert len(lines) == 2
    for name, line in zip(names, lines):
        assert line.startswith(f"{root / name}: 2 images left for one scan, differing in acq")
        assert "(acq-mprage, acq-spgr)" in line
        assert line.endswith("choose with config key 'datasets/ds/select/filters/acq'")
    assert snapshot(tmp_path) == before  # no table written, nothing touched
    table = read(tmp_path, root, mode="exclude")
    files = by_file(table)
    assert files["sub-01_acq-spgr_T1w.nii.gz"][0] == "excluded"
    assert files["sub-01_acq-mprage_T1w.nii.gz"][0] == "excluded"
    assert files["sub-02_acq-mprage_T1w.nii.gz"][0] == "ok"


def test_entity_filters_take_values_lists_and_presence(tmp_path):
    names = [
        "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz",
        "sub-01/anat/sub-01_acq-spgr_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-spgr_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-spgr_ce-gad_T1w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii.gz",
    ]
    root = make_bids(tmp_path / "bids", names)
    files = by_file(read(tmp_path, root, {"filters": {"acquisition": "mprage"}}))
    assert files["sub-01_acq-spgr_T1w.nii.gz"] == (
        "skipped",
        "",
        "acq-spgr not selected (filters: acq: mprage)",
    )
    assert files["sub-03_T1w.nii.gz"][2] == "no acq entity (filters: acq: mprage)"
    both = {"filters": {"acq": ["mprage", "spgr"], "ce": False}}
    files = by_file(read(tmp_path, root, both, mode="exclude"))
    assert files["sub-01_acq-spgr_T1w.nii.gz"][0] == "excluded"  # both acquisitions match
    assert (
        files["sub-02_acq-spgr_ce-gad_T1w.nii.gz"][2] == "ce-gad not selected (filters: ce: false)"
    )
    assert files["sub-02_acq-spgr_T1w.nii.gz"][0] == "ok"
    files = by_file(read(tmp_path, root, {"filters": {"ce": True}}))
    assert [f for f, v in files.items() if v[0] == "ok"] == ["sub-02_acq-spgr_ce-gad_T1w.nii.gz"]


def test_nii_gz_wins_over_nii_by_default_and_the_config_can_turn_it(tmp_path):
    names = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T1w.nii"]
    root = make_bids(tmp_path / "bids", names)
    files = by_file(read(tmp_path, root))
    assert files["sub-01_T1w.nii.gz"][0] == "ok"
    assert files["sub-01_T1w.nii"] == (
        "skipped",
        "",
        ".nii beside .nii.gz (prefer_extension: .nii.gz)",
    )
    files = by_file(read(tmp_path, root, {"prefer_extension": ".nii"}))
    assert files["sub-01_T1w.nii"][0] == "ok" and files["sub-01_T1w.nii.gz"][0] == "skipped"


def test_a_sessionless_image_beside_sessions_is_skipped_with_its_reason(tmp_path):
    names = [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "sub-01/ses-10/anat/sub-01_ses-10_T1w.nii.gz",
    ]
    root = make_bids(tmp_path / "bids", names)
    files = by_file(read(tmp_path, root))
    assert files["sub-01_T1w.nii.gz"] == (
        "skipped",
        "",
        "outside ses-* folders while the subject has sessions",
    )
    assert files["sub-01_ses-10_T1w.nii.gz"][:2] == ("ok", "sub-01_ses-10")
    files = by_file(read(tmp_path, root, {"sessions": "first"}))
    assert files["sub-01_ses-2_T1w.nii.gz"][0] == "ok"  # natural order: 2 before 10
    assert files["sub-01_ses-10_T1w.nii.gz"][2] == "ses-10 not selected (sessions: first)"
    files = by_file(read(tmp_path, root, {"sessions": [10]}))
    assert files["sub-01_ses-2_T1w.nii.gz"][2] == "ses-2 not selected (sessions: 10)"


@pytest.mark.parametrize(
    "select,message",
    [
        ({"runs": "lasst"}, "config key 'datasets/ds/select/runs': 'lasst' is not one of"),
        ({"filters": {"aqc": "x"}}, "config key 'datasets/ds/select/filters/aqc': not an entity"),
        (
            {"filters": {"acq": "mprag"}},
            "config key 'datasets/ds/select/filters/acq': no image has acq-mprag (found: mprage)",
        ),
        ({"sessions": ["9"]}, "config key 'datasets/ds/select/sessions': no image has ses-9"),
        ({"sessions": "fist"}, "config key 'datasets/ds/select/sessions': 'fist' is not all"),
        ({"prefer_extension": "gz"}, "config key 'datasets/ds/select/prefer_extension'"),
        ({"run": "last"}, "config key 'datasets/ds/select/run': not a select key"),
    ],
)
def test_select_mistakes_are_one_line_naming_the_key(tmp_path, select, message):
    root = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_T1w.nii.gz"])
    with pytest.raises(ConfigError) as err:
        read(tmp_path, root, select)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "results").exists()


def test_select_on_a_csv_dataset_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("subject,t1\n01,a.nii.gz\n")
    ds = {"kind": "csv", "role": ["pretrain"], "path": str(tmp_path / "x.csv"), "select": {}}
    with pytest.raises(ConfigError, match=r"^config key 'datasets/c/select': only a bids"):
        build_scan_table("c", ds)


def test_an_image_without_a_participants_row_fails_or_is_excluded(tmp_path):
    names = [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in (1, 2, 3)]
    root = make_bids(tmp_path / "bids", names, ["sub-01\t60", "sub-02\t61"])
    with pytest.raises(CohortError) as err:
        read(tmp_path, root)
    assert problems_of(err.value) == [
        f"{root / 'participants.tsv'}: sub-03 has images but no participant_id row"
    ]
    table = read(tmp_path, root, mode="exclude")
    assert by_file(table)["sub-03_T1w.nii.gz"][0] == "excluded"
    assert excluded_scans([str(tmp_path / "results/scans/ds.tsv")])[0]["subject"] == "03"


def test_participant_ids_that_collide_once_normalised(tmp_path):
    names = ["sub-07/anat/sub-07_T1w.nii.gz", "sub-AB/anat/sub-AB_T1w.nii.gz"]
    names += ["sub-01/anat/sub-01_T1w.nii.gz"]
    rows = ["sub-07\t60", "sub-01\t50", "07\t70", "sub-AB\t30", "sub-ab\t31"]
    root = make_bids(tmp_path / "bids", names, rows)
    tsv = root / "participants.tsv"
    with pytest.raises(CohortError) as err:
        read(tmp_path, root)
    lines = problems_of(err.value)
    assert f"{tsv} line 4: participant_id '07' is the same subject as 'sub-07'" in lines[0]
    assert "(first on line 2)" in lines[0]
    assert f"{tsv} line 6: participant_id 'sub-ab' is the same subject as 'sub-AB'" in lines[1]
    table = read(tmp_path, root, mode="exclude")
    files = by_file(table)
    assert files["sub-07_T1w.nii.gz"][0] == files["sub-AB_T1w.nii.gz"][0] == "excluded"
    assert "line 4" in files["sub-07_T1w.nii.gz"][2]
    assert table.loc[table["status"] == "ok", "subject"].tolist() == ["01"]


def test_folders_differing_only_in_case_and_names_that_lie(tmp_path):
    names = [
        "sub-ab/anat/sub-ab_T1w.nii.gz",
        "sub-AB/anat/sub-AB_T1w.nii.gz",
        "sub-01/anat/sub-02_T1w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii.gz",
    ]
    root = make_bids(tmp_path / "bids", names, ["sub-ab\t1", "sub-AB\t2", "sub-01\t3", "sub-03\t4"])
    with pytest.raises(CohortError) as err:
        read(tmp_path, root)
    text = "\n".join(problems_of(err.value))
    assert "sub-AB and sub-ab differ only in case" in text
    assert f"{root}/sub-01/anat/sub-02_T1w.nii.gz: the file name says sub-02" in text


def test_skipped_images_are_never_usable_scans(tmp_path):
    names = [f"sub-0{i}/anat/sub-0{i}_run-{r}_T1w.nii.gz" for i in (1, 2, 3) for r in (1, 2)]
    root = make_bids(tmp_path / "bids", names)
    table = read(tmp_path, root)
    tsv = str(tmp_path / "results/scans/ds.tsv")
    assert usable_subjects([tsv]) == [("ds", "01"), ("ds", "02"), ("ds", "03")]
    assert excluded_scans([tsv]) == []
    ok = table[table["status"] == "ok"]
    paths = {scan: f"/p/{scan}.nii.gz" for scan in ok["scan"]}
    manifest, sidecar = make_manifest(
        read_scan_table(tsv), dataset="ds", task="segmentation", n_folds=3, paths=paths
    )
    assert manifest["scan"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert sidecar["exclusions"] == []


def test_the_summary_is_one_line_per_dataset_and_a_few_reasons(tmp_path, capsys):
    names = []
    for i in range(1, 7):
        names += [
            f"sub-0{i}/anat/sub-0{i}_run-1_T1w.nii.gz",
            f"sub-0{i}/anat/sub-0{i}_run-2_T1w.nii",
        ]
        names += [f"sub-0{i}/anat/sub-0{i}_run-2_T1w.nii.gz"]
    names += ["sub-07/anat/sub-07_acq-a_T1w.nii.gz", "sub-07/anat/sub-07_acq-b_T1w.nii.gz"]
    names += ["sub-08/anat/sub-08_T1w.nii.gz", "sub-08/ses-1/anat/sub-08_ses-1_T1w.nii.gz"]
    names += ["sub-09/anat/sub-09_T1w.nii.gz"]
    root = make_bids(tmp_path / "bids", names)
    (root / "sub-09/anat/sub-09_T1w.nii.gz").write_text("not a nifti")
    other = make_bids(tmp_path / "other", ["sub-01/anat/sub-01_T1w.nii.gz"])
    datasets = {
        "ds": {"kind": "bids", "role": ["pretrain"], "path": str(root), "select": {"runs": "last"}},
        "other": {"kind": "bids", "role": ["pretrain"], "path": str(other)},
    }
    tables = build_scan_tables(
        datasets,
        table_path=lambda name: tmp_path / "results" / f"{name}.tsv",
        on_bad_scan="exclude",
    )
    assert len(tables["ds"]) == len(names)  # every image found has a row
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "medtx: dataset 'ds': 7 taken, 13 skipped, 3 excluded",
        "medtx:   6 skipped: run-* not selected (runs: last)",
        "medtx:   6 skipped: .nii beside .nii.gz (prefer_extension: .nii.gz)",
        "medtx:   2 excluded: … 2 images left for one scan, differing in acq (acq-*, acq-*); "
        "choose with config key …",
        f"medtx:   and 2 more reason(s) in {tmp_path / 'results' / 'ds.tsv'}",
        "medtx: dataset 'other': 1 taken, 0 skipped, 0 excluded",
    ]


def test_problems_of_every_dataset_are_raised_together(tmp_path):
    one = make_bids(
        tmp_path / "one", ["sub-01/anat/sub-01_T1w.nii.gz"], ["sub-01\t60", "sub-09\t1"]
    )
    two = make_bids(tmp_path / "two", ["sub-01/anat/sub-01_T1w.nii.gz"], ["sub-02\t60"])
    datasets = {
        n: {"kind": "bids", "role": ["pretrain"], "path": str(p)}
        for n, p in [("one", one), ("two", two)]
    }
    with pytest.raises(CohortError, match=r"problem\(s\) in datasets 'one', 'two'") as err:
        build_scan_tables(datasets, table_path=lambda n: tmp_path / f"{n}.tsv")
    text = "\n".join(problems_of(err.value))
    assert "sub-09 is listed but" in text and "sub-01 has images but no participant_id" in text
    assert isinstance(err.value, MedtxError)
