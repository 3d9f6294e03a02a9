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
        tmp_path / "one",
        ["sub-01/anat/sub-01_T1w.nii.gz"],
        ["sub-01\t60", "sub-01\t61", "sub-09\t1"],
    )
    two = make_bids(tmp_path / "two", ["sub-01/anat/sub-01_T1w.nii.gz"], ["sub-02\t60"])
    datasets = {
        n: {"kind": "bids", "role": ["pretrain"], "path": str(p)}
        for n, p in [("one", one), ("two", two)]
    }
    with pytest.raises(CohortError, match=r"problem\(s\) in datasets 'one', 'two'") as err:
        build_scan_tables(datasets, table_path=lambda n: tmp_path / f"{n}.tsv")
    text = "\n".join(problems_of(err.value))
    assert "sub-09 is listed but" not in text  # a row without a folder is skipped, not a failure
    assert "line 3: participant_id 'sub-01' is listed more than once" in text
    assert "sub-01 has images but no participant_id" in text
    assert isinstance(err.value, MedtxError)


# --- Issue 31: valid datasets of the bids-examples collection -----------------------------


def write_file(root: Path, name: str) -> None:
    """A non-T1w file the reader must walk past (MEG recording, functional run)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".nii.gz"):
        write_nifti(path, sphere(shape=(6, 6, 6), radius=2))
    else:
        path.write_bytes(b"\x00" * 16)


def rows_of(table: pd.DataFrame) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(subject, session) -> (status, scan, reason), for rows that may have no image."""
    return {
        (r["subject"], r["session"] or ""): (r["status"], r["scan"] or "", r["reason"] or "")
        for r in table.to_dict("records")
    }


def test_bids_examples_layouts_give_a_usable_table_under_the_default_policy(tmp_path, capsys):
    """Modelled on the 8 bids-examples datasets with T1w images that stopped the run."""
    names = [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        # functional-only second session (ds000117-like)
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz",
        # a scanner test the authors hid from the validator in .bidsignore
        "sub-04/anat/sub-04_T1w.nii.gz",
        "sub-04/anat/sub-04_acq-lowres_T1w.nii.gz",
    ]
    root = make_bids(
        tmp_path / "bids",
        names,
        # ages capped for de-identification and given as a band; sub-09 shared no data
        ["sub-01\t89+", "sub-02\t35-40", "sub-03\t60", "sub-04\t61", "sub-09\t70"],
    )
    write_file(root, "sub-03/ses-2/func/sub-03_ses-2_task-rest_bold.nii.gz")
    # MEG empty-room recordings filed as a subject of their own (ds000248-like), not listed
    write_file(root, "sub-emptyroom/ses-20170324/meg/sub-emptyroom_ses-20170324_task-noise_meg.fif")
    (root / ".bidsignore").write_text("# scanner tests\n\n**/*_acq-lowres_*\n")
    tsv = root / "participants.tsv"

    table = read(tmp_path, root, roles=("pretrain", "regression"))

    assert rows_of(table) == {
        ("01", ""): ("ok", "sub-01", f"{tsv} line 2: age '89+' read as 89, its lower bound"),
        ("02", ""): ("ok", "sub-02", f"{tsv} line 3: age '35-40' read as 37.5, its midpoint"),
        ("03", "1"): ("ok", "sub-03_ses-1", ""),
        ("03", "2"): ("skipped", "", f"{root}/sub-03/ses-2: no T1w image in anat (found: func)"),
        ("04", ""): ("ok", "sub-04", ""),
        ("emptyroom", ""): (
            "skipped",
            "",
            f"{root}/sub-emptyroom: no T1w image in anat (found: meg)",
        ),
        ("09", ""): (
            "skipped",
            "",
            f"{tsv} line 6: sub-09 is listed but {root}/sub-09 does not exist",
        ),
    }
    ok = table[table["status"] == "ok"]
    assert ok["age"].tolist() == ["89", "37.5", "60", "61"]  # numbers every later step reads
    assert Path(ok["t1"].iloc[3]).name == "sub-04_T1w.nii.gz"
    assert not any("lowres" in str(t) for t in table["t1"])  # ignored: not even a row
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "medtx: dataset 'ds': 4 taken, 3 skipped, 0 excluded"
    written = read_scan_table(tmp_path / "results/scans/ds.tsv")
    assert written["status"].tolist().count("skipped") == 3
    assert usable_subjects([str(tmp_path / "results/scans/ds.tsv")]) == [
        ("ds", s) for s in ("01", "02", "03", "04")
    ]


def test_without_its_bidsignore_the_hidden_image_makes_the_subject_ambiguous(tmp_path):
    names = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_acq-lowres_T1w.nii.gz"]
    root = make_bids(tmp_path / "bids", names)
    with pytest.raises(CohortError, match="differing in acq"):
        read(tmp_path, root)
    (root / ".bidsignore").write_text("sub-01/anat/sub-01_acq-lowres_T1w.nii.gz\r\n")
    assert by_file(read(tmp_path, root)) == {"sub-01_T1w.nii.gz": ("ok", "sub-01", "")}
    (root / ".bidsignore").write_text("sub-01/\n")  # a whole subject hidden
    with pytest.raises(MedtxError, match="no usable scans; 1 skipped .*sub-01 is listed but"):
        read(tmp_path, root)


def test_a_subject_without_t1w_is_skipped_also_when_participants_tsv_lacks_it(tmp_path):
    root = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"])
    write_file(root, "sub-02/func/sub-02_task-rest_bold.nii.gz")
    write_file(root, "sub-02/anat/sub-02_T2w.nii.gz")
    table = read(tmp_path, root)
    assert rows_of(table)[("02", "")] == (
        "skipped",
        "",
        f"{root}/sub-02: no T1w image in anat (found: anat, func)",
    )


@pytest.mark.parametrize("roles", [("pretrain",), ("classification",)])
def test_an_unreadable_age_is_left_empty_where_no_task_reads_age(tmp_path, roles):
    names = [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in (1, 2, 3)]
    rows = ["sub-01\tseventy", "sub-02\t150", "sub-03\t90+"]
    root = make_bids(tmp_path / "bids", names, rows)
    tsv = root / "participants.tsv"
    tsv.write_text("participant_id\tage\tdiagnosis\n" + "\n".join(f"{r}\tCN" for r in rows) + "\n")
    table = read(tmp_path, root, roles=roles)
    assert table["status"].tolist() == ["ok"] * 3
    assert table["age"].tolist() == [None, None, "90"]
    assert table["reason"].tolist() == [
        f"{tsv} line 2: age 'seventy' is not a number; left empty (no task of dataset 'ds' "
        "reads age)",
        f"{tsv} line 3: age '150' is outside 0-120 years; left empty (no task of dataset 'ds' "
        "reads age)",
        f"{tsv} line 4: age '90+' read as 90, its lower bound",
    ]
    with pytest.raises(CohortError) as err:  # regression reads age: the checks stand
        read(tmp_path, root, roles=("regression",))
    assert problems_of(err.value) == [
        f"{tsv} line 2: age 'seventy' is not a number",
        f"{tsv} line 3: age '150' is outside 0-120 years",
    ]


def test_an_uppercase_extension_or_suffix_is_named_with_the_name_to_use(tmp_path):
    names = [
        "sub-01/anat/sub-01_T1w.NII.GZ",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "sub-03/anat/sub-03_t1w.nii",
    ]
    root = make_bids(tmp_path / "bids", names)
    with pytest.raises(CohortError) as err:
        read(tmp_path, root)
    assert problems_of(err.value) == [
        f"{root / names[0]}: not a BIDS file name: the extension '.NII.GZ' must be lowercase "
        "(BIDS names are case-sensitive; medtx and FSL read .nii.gz and .nii only); "
        "rename it sub-01_T1w.nii.gz",
        f"{root / names[2]}: not a BIDS file name: the suffix 't1w' must be written T1w "
        "(BIDS names are case-sensitive); rename it sub-03_T1w.nii",
    ]
    files = by_file(read(tmp_path, root, mode="exclude"))
    assert files["sub-02_T1w.nii.gz"][0] == "ok"
    assert files["sub-01_T1w.NII.GZ"][0] == files["sub-03_t1w.nii"][0] == "excluded"


def test_run_1_beside_run_01_names_a_fix_that_works(tmp_path):
    names = ["sub-01/anat/sub-01_run-01_T1w.nii.gz", "sub-01/anat/sub-01_run-1_T1w.nii.gz"]
    root = make_bids(tmp_path / "bids", names)
    for select in (None, {"runs": "all"}, {"filters": {"run": 1}}):
        with pytest.raises(CohortError) as err:
            read(tmp_path, root, select)
        lines = problems_of(err.value)
        assert lines == [
            f"{root / name}: 2 images left for one scan: run-01 and run-1 are one run "
            "(runs compare as numbers), which no select key can tell apart; rename or "
            "remove one, or list one in the dataset's .bidsignore"
            for name in names
        ]
    (root / ".bidsignore").write_text("sub-01_run-1_T1w.nii.gz\n")  # the fix the line names
    assert by_file(read(tmp_path, root)) == {"sub-01_run-01_T1w.nii.gz": ("ok", "sub-01", "")}


def test_a_duplicated_participants_column_is_one_line_naming_it(tmp_path):
    root = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"])
    tsv = root / "participants.tsv"
    tsv.write_text("participant_id\tage\tsex\tage\nsub-01\t60\tM\t61\n")
    with pytest.raises(MedtxError) as err:
        read(tmp_path, root, roles=("regression",))
    assert str(err.value) == (
        f"{tsv}: participants.tsv has two columns named 'age' (columns 2 and 4 of line 1); keep one"
    )
    assert not (tmp_path / "results").exists()


def test_a_bidsignore_that_is_not_text_is_one_line(tmp_path):
    root = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"])
    (root / ".bidsignore").write_bytes(b"sub-02/\n\xff\xfe*.nii\n")
    with pytest.raises(MedtxError) as err:
        read(tmp_path, root)
    assert str(err.value) == (
        f"{root / '.bidsignore'}: not UTF-8 text (invalid start byte at byte 8)"
    )
