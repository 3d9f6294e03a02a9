"""Labels checked when the dataset is read, before any job runs.

Issue 12: a diagnosis missing from ``label_map`` or an age of ``seventy`` passed
``snakemake -n``; the error came from the fold step after all preprocessing.
Now every label is checked as the scan table is built, and every problem is
listed with its file and row; the fold step keeps the same rules
(``medtx.data.labels``) as a guard.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medtx.data.labels import AGE_RANGE, SEX_CODES, LabelError, parse_age
from medtx.data.scans import build_scan_table, read_scan_table
from medtx.errors import CohortError
from medtx.folds.manifest import make_manifest
from tests.conftest import REPO, sphere, write_nifti


def write_csv(folder: Path, lines: list[str], header="subject,t1,diagnosis,age,sex") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(lines)):
        write_nifti(folder / f"s{i}.nii.gz", sphere(shape=(12, 12, 12), radius=4, seed=i))
    path = folder / "scans.csv"
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


def csv_ds(path: Path, roles=("classification", "regression")) -> dict:
    return {"kind": "csv", "role": list(roles), "path": str(path)}


BAD = [
    "a1,s0.nii.gz,CN,seventy,M",
    "a2,s1.nii.gz,Dementia,70,F",
    "a3,s2.nii.gz,AD,150,female",
    "a4,s3.nii.gz,MCI,-1,X",
    "a5,s4.nii.gz,CN,inf,o",
]


@pytest.mark.parametrize("mode", ["fail", "exclude"])
def test_every_bad_label_is_listed_with_its_file_and_line(tmp_path, mode):
    path = write_csv(tmp_path / "in", BAD)
    with pytest.raises(CohortError) as err:
        build_scan_table("c", csv_ds(path), on_bad_scan=mode, cache_path=tmp_path / "c.tsv")
    assert err.value.problems == [
        f"{path} line 2: age 'seventy' is not a number",
        f"{path} line 3: diagnosis 'Dementia' is not in the label map (CN, MCI, AD)",
        f"{path} line 4: age '150' is outside 0-120 years",
        f"{path} line 5: age '-1' is outside 0-120 years",
        f"{path} line 5: sex 'X' is not one of m, male, f, female, o, other (any case)",
        f"{path} line 6: age 'inf' is not a number",
    ]
    assert not (tmp_path / "c.tsv").exists()  # nothing written for a dataset that failed


def test_bids_labels_are_named_by_their_participants_line_once_per_subject(tmp_path):
    root = tmp_path / "bids"
    for ses in ("1", "2"):
        name = f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_T1w.nii.gz"
        write_nifti(root / name, sphere(shape=(12, 12, 12), radius=4))
    write_nifti(root / "sub-02/anat/sub-02_T1w.nii.gz", sphere(shape=(12, 12, 12), radius=4))
    tsv = root / "participants.tsv"
    tsv.write_text(
        "participant_id\tdiagnosis\tage\tsex\nsub-01\tCN\tseventy\tM\nsub-02\tAD\t70\tm\n"
    )
    ds = {"kind": "bids", "role": ["regression"], "path": str(root)}
    with pytest.raises(CohortError) as err:
        build_scan_table("b", ds)
    assert err.value.problems == [f"{tsv} line 2: age 'seventy' is not a number"]


def test_the_configured_label_map_is_the_one_checked(tmp_path):
    path = write_csv(tmp_path / "in", ["a1,s0.nii.gz,HC,60,M", "a2,s1.nii.gz,PD,61,F"])
    table = build_scan_table("c", csv_ds(path), label_map={"HC": 0, "PD": 1})
    assert table["status"].tolist() == ["ok", "ok"]
    with pytest.raises(CohortError, match=r"line 2: diagnosis 'HC' is not in the label map"):
        build_scan_table("c", csv_ds(path))  # the default map: CN, MCI, AD


def test_a_diagnosis_is_free_text_where_no_task_uses_it(tmp_path):
    path = write_csv(tmp_path / "in", ["a1,s0.nii.gz,healthy,60,M"])
    table = build_scan_table("c", csv_ds(path, roles=["pretrain"]))
    assert table["diagnosis"].tolist() == ["healthy"]


def test_accepted_sex_codes_and_age_bounds(tmp_path):
    assert set(SEX_CODES) == {"m", "male", "f", "female", "o", "other"} and AGE_RANGE == (0, 120)
    lines = [
        "a1,s0.nii.gz,CN,0,M",
        "a2,s1.nii.gz,MCI,120,Female",
        "a3,s2.nii.gz,AD,64.5,OTHER",
        "a4,s3.nii.gz,CN,70,f",
    ]
    table = build_scan_table("c", csv_ds(write_csv(tmp_path / "in", lines)))
    assert table["status"].tolist() == ["ok"] * 4
    assert table["sex"].tolist() == ["M", "Female", "OTHER", "f"]  # kept as written


def test_missing_labels_are_fine_for_the_table_and_left_out_of_the_task(tmp_path, capsys):
    lines = [f"a{i},s{i}.nii.gz,CN,6{i},M" for i in range(3)]
    lines += ["a3,s3.nii.gz,n/a,,", "a4,s4.nii.gz,,NA,n/a"]
    path = write_csv(tmp_path / "in", lines)
    cache = tmp_path / "results" / "c.tsv"
    table = build_scan_table("c", csv_ds(path), cache_path=cache)
    assert table["status"].tolist() == ["ok"] * 5
    assert capsys.readouterr().err.splitlines() == [
        "medtx: dataset 'c': 5 taken, 0 skipped, 0 excluded; 2 without diagnosis "
        "(left out of classification); 2 without age (left out of regression)"
    ]
    _, sidecar = make_manifest(
        read_scan_table(cache),
        dataset="c",
        task="classification",
        n_folds=3,
        paths={s: f"/p/{s}.nii.gz" for s in table["scan"]},
        label_map={"CN": 0},
    )
    assert [(x["scan"], x["reason"]) for x in sidecar["exclusions"]] == [
        ("sub-a3", "missing diagnosis label"),
        ("sub-a4", "missing diagnosis label"),
    ]


def test_a_task_label_missing_on_every_scan_is_an_error(tmp_path):
    path = write_csv(tmp_path / "in", ["a1,s0.nii.gz", "a2,s1.nii.gz"], header="subject,t1")
    with pytest.raises(CohortError) as err:
        build_scan_table("c", csv_ds(path))
    assert err.value.problems == [
        f"{path}: dataset 'c' has the classification role but no scan has a label in column "
        "'diagnosis'",
        f"{path}: dataset 'c' has the regression role but no scan has a label in column 'age'",
    ]


def fold_table(ages: list[str]) -> pd.DataFrame:
    """A scan table as an older medtx wrote it, without the read-time checks."""
    rows = [
        {"dataset": "d", "subject": f"S{i}", "session": "", "scan": f"sub-S{i}", "age": age}
        for i, age in enumerate(ages)
    ]
    return pd.DataFrame(rows).assign(status="ok", reason="")


@pytest.mark.parametrize(
    "age,message",
    [("seventy", "age 'seventy' is not a number"), ("150", "age '150' is outside 0-120 years")],
)
def test_the_fold_step_applies_the_same_rules(age, message):
    table = fold_table(["60", "61", "62", age])
    with pytest.raises(CohortError) as err:
        make_manifest(
            table,
            dataset="d",
            task="regression",
            n_folds=3,
            paths={s: "/p" for s in table["scan"]},
        )
    assert err.value.problems == [f"dataset 'd' subject 'S3' scan 'sub-S3': {message}"]


def test_dry_run_lists_every_problem_of_every_dataset_before_any_job(tmp_path, medtx_env):
    csv_path = write_csv(tmp_path / "in" / "csv", BAD[:2])
    root = tmp_path / "in" / "bids"
    for sub in ("01", "02", "03"):
        write_nifti(root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz", sphere((12, 12, 12), 4))
    tsv = root / "participants.tsv"
    tsv.write_text("participant_id\tdiagnosis\tage\nsub-01\tCN\t70\nsub-02\tCN\t200\n")
    config = {
        "datasets": {
            "tab": csv_ds(csv_path),
            "bids": {"kind": "bids", "role": ["regression"], "path": str(root)},
        },
        "preprocess": {"backend": "ants"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    inputs = {p: p.stat().st_mtime_ns for p in (tmp_path / "in").rglob("*")}
    work = tmp_path / "work"
    proc = subprocess.run(
        [
            str(REPO / ".venv/bin/snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(work),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "-n",
            "all",
        ],
        capture_output=True,
        text=True,
        env=medtx_env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "medtx: error: 4 problem(s) in datasets 'bids', 'tab':" in out
    for line in [
        f"  - {csv_path} line 2: age 'seventy' is not a number",
        f"  - {csv_path} line 3: diagnosis 'Dementia' is not in the label map (CN, MCI, AD)",
        f"  - {tsv}: sub-03 has images but no participant_id row",
        f"  - {tsv} line 3: age '200' is outside 0-120 years",
    ]:
        assert line in out.splitlines(), out
    assert "Traceback" not in out and 'File "' not in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "in").rglob("*")} == inputs
    assert not (work / "results").exists()


# --- Issue 31: ages as de-identified tables write them ---


@pytest.mark.parametrize(
    "text,age",
    [
        ("89+", 89.0),
        ("90 +", 90.0),
        ("35-40", 37.5),
        ("35 - 40", 37.5),
        ("0-1", 0.5),
        ("64.5", 64.5),
    ],
)
def test_capped_and_banded_ages_read_as_numbers(text, age):
    assert parse_age(text) == age


@pytest.mark.parametrize(
    "text,message",
    [
        ("40-35", "age '40-35' is a range whose end is below its start"),
        ("130+", "age '130+' is outside 0-120 years"),
        ("-5", "age '-5' is outside 0-120 years"),
        ("+", "age '+' is not a number"),
        ("35-", "age '35-' is not a number"),
    ],
)
def test_ages_that_stay_errors(text, message):
    with pytest.raises(LabelError) as err:
        parse_age(text)
    assert str(err.value) == message


def test_a_csv_age_of_89_plus_is_a_number_in_the_table_for_regression(tmp_path, capsys):
    lines = ["a1,s0.nii.gz,CN,89+,M", "a2,s1.nii.gz,AD,70-80,F", "a3,s2.nii.gz,MCI,61,F"]
    lines += [f"a{i},s{i - 1}.nii.gz,CN,{i}0,F" for i in (4, 5, 6)]
    path = write_csv(tmp_path / "in", lines)
    cache = tmp_path / "results" / "c.tsv"
    table = build_scan_table("c", csv_ds(path), cache_path=cache)
    assert table["age"].tolist() == ["89", "75", "61", "40", "50", "60"]
    assert (
        table["reason"].tolist()
        == [
            f"{path} line 2: age '89+' read as 89, its lower bound",
            f"{path} line 3: age '70-80' read as 75, its midpoint",
        ]
        + [""] * 4
    )
    assert capsys.readouterr().err.splitlines() == [
        "medtx: dataset 'c': 6 taken, 0 skipped, 0 excluded",
        "medtx:   1 taken with a note: age '…' read as …, its lower bound",
        "medtx:   1 taken with a note: age '…' read as …, its midpoint",
    ]
    manifest, _ = make_manifest(
        read_scan_table(cache),
        dataset="c",
        task="regression",
        n_folds=3,
        paths={s: f"/p/{s}.nii.gz" for s in table["scan"]},
    )
    assert sorted(manifest["label"].astype(float)) == [40.0, 50.0, 60.0, 61.0, 75.0, 89.0]
